"""cast.py and dtypes.py: numpy casts bit for bit equal to torch's `tensor.to(dtype)`, dtypes without torch."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from streammerge import dtypes
from streammerge.sources.base import row_major
from streammerge.write import cast

FLOATS = [dtypes.float16, dtypes.bfloat16, dtypes.float32, dtypes.float64]
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _torch_bits(bits: np.ndarray, src: dtypes.DType, dst: dtypes.DType) -> np.ndarray:
    """torch's result of casting the values with these bit patterns, as raw bytes per element."""
    t = torch.from_numpy(bits.view(f"<i{bits.itemsize}")).view(src.torch())
    return t.to(dst.torch()).view(_INT_OF_SIZE[dst.itemsize]).numpy().view(np.uint8).reshape(len(bits), -1)


def _ours(bits: np.ndarray, src: dtypes.DType, dst: dtypes.DType) -> np.ndarray:
    got = np.empty(len(bits), dst.numpy)
    cast.cast_into(got, bits.view(src.numpy), src, dst)
    return got.view(np.uint8).reshape(len(bits), -1)


def _assert_same(bits: np.ndarray, src: dtypes.DType, dst: dtypes.DType) -> None:
    """Same bytes as torch. torch's scalar tail (the last n mod 64 elements) writes other NaN bits
    for some pairs (see cast.py), so the arrays are cut to a multiple of 64 elements."""
    bits = bits[: len(bits) // 64 * 64]
    want, got = _torch_bits(bits, src, dst), _ours(bits, src, dst)
    bad = np.nonzero((want != got).any(axis=1))[0]
    assert not len(bad), (f"{src}->{dst}: {len(bad)} of {len(bits)} differ, first source bits "
                          f"{[hex(b) for b in bits[bad[:4]].tolist()]}")


@pytest.mark.parametrize(("src", "dst"),
                         [(s, d) for s in (dtypes.float16, dtypes.bfloat16) for d in FLOATS if s is not d])
def test_every_16_bit_pattern(src, dst):
    """All 65,536 values: NaN payloads and signs, infinities, subnormals, ties."""
    _assert_same(np.arange(1 << 16, dtype=np.uint16), src, dst)


def _float32_cases() -> np.ndarray:
    rng = np.random.default_rng(0)
    special = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA00000, 0x7F800000,
               0xFF800000, 0, 0x80000000, 1, 0x807FFFFF, 0x7F7FFFFF, 0x3F808000, 0x3F818000, 0x3F80FFFF,
               0x477FF000, 0x477FEFFF, 0x38800000, 0x33000000, 0x33000001]
    ties = (rng.integers(0, 1 << 16, 20_000, dtype=np.uint32) << 16) | 0x8000  # bfloat16 halfway cases
    half_ties = (rng.integers(0, 1 << 19, 20_000, dtype=np.uint32) << 13) | 0x1000  # float16 halfway cases
    return np.concatenate([np.array(special, np.uint32), ties, half_ties,  # specials first: never in a tail
                           rng.integers(0, 1 << 32, 300_000, dtype=np.uint32)])


@pytest.mark.parametrize("dst", [dtypes.float16, dtypes.bfloat16, dtypes.float64])
def test_float32_patterns(dst):
    _assert_same(_float32_cases(), dtypes.float32, dst)


@pytest.mark.parametrize("dst", [dtypes.float16, dtypes.bfloat16, dtypes.float32])
def test_float64_patterns(dst):
    """float64 goes to float16 and bfloat16 through float32 in torch (two roundings): so do we."""
    rng = np.random.default_rng(1)
    near = rng.integers(0, 1 << 32, 100_000, dtype=np.uint32).view(np.float32)
    near = near[np.isfinite(near)].astype(np.float64)
    double_rounding = np.array([1 + 2**-11 + 2**-40, 1 + 2**-9 + 2**-40, -(1 + 2**-11 + 2**-40), 1 + 2**-8 + 2**-40])
    values = np.concatenate([double_rounding, near, np.nextafter(near, np.inf), np.nextafter(near, -np.inf)])
    nans = np.array([0x7FF0000000000001, 0xFFF8000000000123, 0x7FF4000000000000], np.uint64)
    bits = np.concatenate([nans, values.view(np.uint64), rng.integers(0, 1 << 64, 200_000, dtype=np.uint64)])
    _assert_same(bits, dtypes.float64, dst)


def test_strided_views_and_scalars():
    """Any strides on either side, tensors larger than one block, 0-d tensors: torch's contiguous result."""
    cases = _float32_cases()
    for shape in [(), (5,), (70000,), (3, 40000), (2, 3, 9000), (300, 500)]:
        n = max(1, int(np.prod(shape)))
        base = np.resize(cases, 2 * n)
        src = np.lib.stride_tricks.as_strided(base.view(np.float32), shape, tuple(8 * s for s in row_major(shape)))
        for dst_dtype in (dtypes.bfloat16, dtypes.float16):
            big = np.zeros(3 * n, dst_dtype.numpy)
            dst = np.lib.stride_tricks.as_strided(big, shape, tuple(6 * s for s in row_major(shape)))
            cast.cast_into(dst, src, dtypes.float32, dst_dtype)
            want = torch.from_numpy(np.ascontiguousarray(src)).to(dst_dtype.torch()).view(torch.int16).numpy()
            assert np.array_equal(np.ascontiguousarray(dst).view(np.int16), want), (shape, dst_dtype)
            assert not big.reshape(n, 3)[:, 1:].any(), "wrote outside the view"


def test_float8_is_left_to_torch():
    assert not cast.numpy_can_cast(dtypes.float32, dtypes.float8_e4m3fn)
    assert not cast.numpy_can_cast(dtypes.float8_e5m2, dtypes.bfloat16)
    with pytest.raises(ValueError):
        cast.cast_into(np.zeros(2, np.uint8), np.zeros(2, np.float32), dtypes.float32, dtypes.float8_e4m3fn)


def test_dtypes_match_torch():
    for d in dtypes.BY_NAME.values():
        t = d.torch()
        assert dtypes.of(t) is d and dtypes.of(str(t)) is d and dtypes.of(d.name) is d
        assert str(d) == str(t) and d == t and t == d and not d != t and not t != d
        assert d.itemsize == t.itemsize and d.is_floating_point == t.is_floating_point, d
        assert d.numpy.itemsize == d.itemsize
        assert pickle.loads(pickle.dumps(d)) is d
    assert dtypes.of("bf16") is dtypes.bfloat16 and dtypes.of("half") is dtypes.float16
    assert dtypes.bfloat16 != dtypes.float16 and dtypes.bfloat16 != torch.float16
    assert [d.code for d in dtypes.SAFETENSORS][:3] == ["BOOL", "U8", "I8"] and dtypes.complex128.code is None
    with pytest.raises(ValueError):
        dtypes.of("float128")
    with pytest.raises(AttributeError):
        dtypes.float32.itemsize = 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_verify_takes_the_merges_nan_bits_on_torchs_scalar_paths(tmp_path, dtype):
    """torch's `.to()` writes other NaN bits for a 0-d tensor and a vector's tail than the merge's cast (documented
    in cast.py): verify, which casts with torch, must not fail the merge's own output for that, and still fails a
    real difference."""
    import streammerge
    from streammerge.testing.rankfiles import write_rank_files

    half = torch.zeros(17, dtype=torch.float16)
    half.view(torch.int16)[-1] = 0x7D00  # a signalling NaN, the last element
    ckpt = write_rank_files(tmp_path / "ckpt", {"s": torch.tensor(float("nan")), "h": half, "w": torch.ones(3)}, (2,))
    out = tmp_path / "out"
    streammerge.merge(ckpt, out, weights_only=True, dtype=dtype)
    assert streammerge.verify(out, ckpt).ok
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor, a 1.0 of w: no NaN on either side
    (out / "model.safetensors").write_bytes(bytes(data))
    report = streammerge.verify(out, ckpt)
    assert any("'w'" in f and "differ" in f for f in report.failures), report.summary()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_verify_fails_a_nan_whose_bits_changed_after_the_merge(tmp_path, dtype):
    """Torch's other NaN bits excuse the merge's own bits, not any NaN: a NaN of the output whose sign or payload was
    changed afterwards (still a NaN) is not the merge's output, with the checkpoint as without it (the crc32)."""
    import json
    import struct

    import streammerge
    from streammerge.testing.rankfiles import write_rank_files

    x = torch.randn(4, 6)
    x[0, 0] = float("nan")
    half = torch.randn(4, 6).to(torch.float16)
    half[0, 0] = float("nan")
    for name, src in [("a", x), ("h", half)]:
        ckpt = write_rank_files(tmp_path / f"ckpt_{name}", {name: src}, (2,))
        out = tmp_path / f"out_{name}"
        streammerge.merge(ckpt, out, weights_only=True, dtype=dtype)
        assert streammerge.verify(out, ckpt).ok
        data = bytearray((out / "model.safetensors").read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        entry = json.loads(data[8:8 + n])[name]
        first = 8 + n + entry["data_offsets"][0]  # element [0, 0], the NaN
        size = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
        data[first + size - 1] ^= 0x80  # its sign
        data[first] ^= 0x01  # and its lowest payload bit: a NaN still
        assert torch.isnan(torch.frombuffer(bytearray(data[first:first + size]), dtype=getattr(torch, dtype))).all()
        (out / "model.safetensors").write_bytes(bytes(data))
        for against in (ckpt, None):
            report = streammerge.verify(out, against)
            assert not report.ok, (name, against, report.summary())
