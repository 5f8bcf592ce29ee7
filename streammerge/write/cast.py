"""Casts between floating types with numpy, bit for bit what `tensor.to(dtype)` gives on x86 CPUs.

Torch's conversions, measured against torch 2.13 on AVX2/AVX-512 (tests/test_cast.py checks every
16-bit pattern and samples of the wider ones):

- float32 -> bfloat16 rounds to nearest even on the bits and writes every NaN as 0xFFFF;
- float32 -> float16 rounds to nearest even (numpy does too); a NaN keeps its sign and the top 10
  payload bits and becomes quiet (F16C's rule; numpy keeps signalling NaNs signalling);
- float16 -> float32 is exact; a NaN becomes quiet (F16C again; numpy does not set the bit);
- float64 -> float16 / bfloat16 goes through float32 (two roundings, as torch does);
- float16 <-> bfloat16 and bfloat16 -> float64 go through float32; float16 -> bfloat16 writes NaN
  as 0x7FC0 (another kernel).

Surprise: torch itself writes other NaN bits in its scalar code path, which it takes for strided
tensors, on CPUs without AVX2, and for the last few elements of a tensor (float16 -> float32: a
signalling NaN becomes 0x7FFFFFFF; float64 and strided float32 -> bfloat16: 0x7FC0). Those depend
on where an element sits, not on its value, so no cast done in windows can follow them; we always
write what torch's vector code writes, the same bits wherever the element is. Values other than
NaN are exactly torch's everywhere.

Everything else numpy casts like C, as torch does. float8 is not handled here: the writer lets
torch cast it (`numpy_can_cast` is False).

Work is done in blocks of at most `BLOCK` elements, with per-thread temporaries, so casting a
window needs no second window-sized buffer; numpy releases the GIL inside each operation.
"""

from __future__ import annotations

import itertools
import math
import threading

import numpy as np

from .. import dtypes
from ..dtypes import DType

BLOCK = 1 << 15  # elements per step: temporaries stay at 32 K x 4 bytes per thread

_F16, _BF16, _F32, _F64 = dtypes.float16, dtypes.bfloat16, dtypes.float32, dtypes.float64
_NUMPY_FLOATS = (_F16, _BF16, _F32, _F64)
_local = threading.local()


def numpy_can_cast(src: DType, dst: DType) -> bool:
    """Whether `cast_into` reproduces torch exactly for this pair (else use torch)."""
    return src is dst or (src in _NUMPY_FLOATS and dst in _NUMPY_FLOATS)


def cast_into(dst: np.ndarray, src: np.ndarray, src_dtype: DType, dst_dtype: DType) -> None:
    """dst[...] = src.to(dst_dtype): both are views of the stored bytes (`DType.numpy`), any strides."""
    if src.shape != dst.shape:
        raise ValueError(f"cast of shape {src.shape} into {dst.shape}")
    if src_dtype is dst_dtype:
        np.copyto(dst, src)
        return
    if not numpy_can_cast(src_dtype, dst_dtype):
        raise ValueError(f"numpy cannot cast {src_dtype} to {dst_dtype} exactly like torch")
    step = _CASTS[(src_dtype.name, dst_dtype.name)]
    with np.errstate(all="ignore"):  # overflow to inf and NaN are values here, not errors
        for box in _blocks(src.shape):
            step(dst[box], src[box])


def _blocks(shape: tuple[int, ...]):
    """Index tuples of boxes of at most BLOCK elements covering `shape` (row-major order)."""
    if math.prod(shape) == 0:
        return
    if math.prod(shape) <= BLOCK:
        yield (...,)  # a view even of a 0-d array (`a[()]` would give a scalar)
        return
    # the leading dims are walked one index at a time until the rest fits, then ranges of that dim
    k, inner = 0, math.prod(shape)
    while inner // shape[k] > BLOCK:
        inner //= shape[k]
        k += 1
    inner //= shape[k]  # elements per index of dim k
    step = max(1, BLOCK // inner)
    for prefix in itertools.product(*(range(s) for s in shape[:k])):
        for a in range(0, shape[k], step):
            yield prefix + (slice(a, min(a + step, shape[k])),)


_WORK, _MASK, _MID = 0, 1, 2  # temporaries in use at once: a step's work array, its NaN mask, a float32 middle


def _tmp(dtype: str, shape: tuple[int, ...], slot: int) -> np.ndarray:
    """A per-thread scratch array of up to BLOCK elements of at most 4 bytes."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = [None, None, None]
    if bufs[slot] is None:
        bufs[slot] = np.empty(BLOCK * (1 if slot == _MASK else 4), np.uint8)
    dt = np.dtype(dtype)
    return bufs[slot][: math.prod(shape) * dt.itemsize].view(dt).reshape(shape)


def _as(a: np.ndarray, dtype: str) -> np.ndarray:
    """The same bytes seen as another type of the same width (any strides)."""
    return a.view(dtype)


def _nan(src: np.ndarray) -> np.ndarray:
    return np.isnan(src, out=_tmp("?", src.shape, _MASK))


# ---------------------------------------------------------------- the steps, one per (source, target)

def _f32_to_bf16(dst: np.ndarray, src: np.ndarray, nan_bits: int = 0xFFFF) -> None:
    bits = _as(src, "<u4")
    t = _tmp("<u4", src.shape, _WORK)
    np.right_shift(bits, 16, out=t)
    np.bitwise_and(t, 1, out=t)
    t += 0x7FFF
    t += bits  # round half to even: add 0x7FFF plus the lowest kept bit, drop the low half
    t >>= 16
    np.copyto(dst, t, casting="unsafe")
    nan = _nan(src)
    if nan.any():
        dst[nan] = nan_bits


def _f32_to_f16(dst: np.ndarray, src: np.ndarray) -> None:
    np.copyto(dst, src, casting="unsafe")
    nan = _nan(src)
    if nan.any():  # sign, quiet bit, top 10 payload bits
        b = _as(src, "<u4")[nan]
        _as(dst, "<u2")[nan] = ((b >> 16) & 0x8000) | 0x7E00 | ((b >> 13) & 0x3FF)


def _f16_to_f32(dst: np.ndarray, src: np.ndarray) -> None:
    np.copyto(dst, src, casting="unsafe")
    nan = _nan(src)
    if nan.any():
        _as(dst, "<u4")[nan] |= 0x00400000


def _bf16_to_f32(dst: np.ndarray, src: np.ndarray) -> None:
    out = _as(dst, "<u4")
    np.copyto(out, src, casting="unsafe")  # src holds bfloat16 bits as <u2
    out <<= 16


def _via_f32(first, second):
    """A cast through float32, as torch does for these pairs."""

    def step(dst: np.ndarray, src: np.ndarray) -> None:
        mid = _tmp("<f4", src.shape, _MID)
        first(mid, src)
        second(dst, mid)

    return step


def _numpy(dst: np.ndarray, src: np.ndarray) -> None:
    np.copyto(dst, src, casting="unsafe")


_CASTS = {
    ("float32", "bfloat16"): _f32_to_bf16,
    ("float32", "float16"): _f32_to_f16,
    ("float32", "float64"): _numpy,
    ("float16", "float32"): _f16_to_f32,
    ("float16", "float64"): _via_f32(_f16_to_f32, _numpy),
    ("float16", "bfloat16"): _via_f32(_f16_to_f32, lambda dst, src: _f32_to_bf16(dst, src, 0x7FC0)),
    ("bfloat16", "float32"): _bf16_to_f32,
    ("bfloat16", "float16"): _via_f32(_bf16_to_f32, _f32_to_f16),
    ("bfloat16", "float64"): _via_f32(_bf16_to_f32, _numpy),
    ("float64", "float32"): _numpy,
    ("float64", "float16"): _via_f32(_numpy, _f32_to_f16),
    ("float64", "bfloat16"): _via_f32(_numpy, _f32_to_bf16),
}
