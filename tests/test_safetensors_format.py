"""Our streamed files must be byte-identical to safetensors.torch.save_file for the same tensors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import streammerge
from streammerge.write.safetensors_format import DTYPE_CODES, layout

ALL_DTYPES = [d.torch() for d in DTYPE_CODES]  # every dtype safetensors stores, as torch dtypes


def _random(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    t = raw.view(dtype)[: torch.Size(shape).numel()].reshape(shape)
    return t.clone()


def _plain_checkpoint(root: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A world-size-1 checkpoint of plain tensors, the form FSDP1 saves at world size 1."""
    actor = root / "actor"
    actor.mkdir(parents=True)
    torch.save(tensors, actor / "model_world_size_1_rank_0.pt")
    return actor


def test_header_matches_rust_writer_for_every_dtype(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i:02d}_{str(dt)[6:]}": _random(dt, (3, 2), gen) for i, dt in enumerate(ALL_DTYPES)}
    tensors.update({"zero_d": torch.tensor(1.5), "empty": torch.zeros(0, 4),
                    "a.b": torch.ones(5, dtype=torch.bfloat16)})
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    ref = (tmp_path / "ref.safetensors").read_bytes()
    ours = layout(((k, v.dtype, tuple(v.shape)) for k, v in tensors.items()), {"format": "pt"})
    assert ref[: ours.data_start] == ours.header
    assert ours.size == len(ref)


def test_merge_is_byte_identical_to_save_file(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = {f"layer.{i}.w": _random(dt, (7, 5), gen) for i, dt in enumerate(ALL_DTYPES)}
    tensors["scalar"] = torch.tensor(3, dtype=torch.int64)
    ck = _plain_checkpoint(tmp_path, tensors)
    streammerge.merge(ck, tmp_path / "out", dtype="keep", buffer_size=4096 * 8, weights_only=True)
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3), min_size=1, max_size=6),
    dtypes=st.lists(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8,
                                     torch.bool]),
                    min_size=6, max_size=6),
    names=st.lists(st.text("abcxyz._0123456789", min_size=1, max_size=12), min_size=6, max_size=6, unique=True),
    shard=st.integers(200, 2000),
)
def test_sharded_merge_matches_save_file_per_file(tmp_path_factory, shapes, dtypes, names, shard) -> None:
    """Random tensor sets, split into several files: each file equals save_file of its own tensors."""
    tmp = tmp_path_factory.mktemp("prop")
    gen = torch.Generator().manual_seed(len(shapes))
    tensors = {names[i]: _random(dtypes[i], tuple(s), gen) for i, s in enumerate(shapes)}
    ck = _plain_checkpoint(tmp, tensors)
    out = tmp / "out"
    streammerge.merge(ck, out, dtype="keep", max_shard_size=shard, buffer_size=8192 * 8, weights_only=True)
    files = sorted(out.glob("*.safetensors"))
    index = out / "model.safetensors.index.json"
    if len(files) == 1:
        assert not index.exists()
        groups = {files[0].name: list(tensors)}
    else:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert set(weight_map) == set(tensors)
        groups = {}
        for name, fname in weight_map.items():
            groups.setdefault(fname, []).append(name)
    for fname, keys in groups.items():
        save_file({k: tensors[k] for k in keys}, tmp / "ref.safetensors", metadata={"format": "pt"})
        assert (out / fname).read_bytes() == (tmp / "ref.safetensors").read_bytes(), fname


def test_large_windows_split_inside_rows(tmp_path: Path) -> None:
    """A tensor whose rows exceed the buffer is split inside rows and still comes out exact."""
    gen = torch.Generator().manual_seed(2)
    tensors = {"wide": _random(torch.float32, (3, 40000), gen), "long": _random(torch.float32, (100000,), gen),
               "cube": _random(torch.float32, (2, 3, 9000), gen)}
    ck = _plain_checkpoint(tmp_path, tensors)
    streammerge.merge(ck, tmp_path / "out", dtype="bfloat16", buffer_size=64 * 1024, weights_only=True)
    from safetensors.torch import load_file

    got = load_file(tmp_path / "out" / "model.safetensors")
    for k, v in tensors.items():  # random bits hold NaNs: compare bytes, not values
        assert torch.equal(got[k].view(torch.uint8), v.to(torch.bfloat16).view(torch.uint8)), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_casts_equal_torch_to(tmp_path: Path, dtype: torch.dtype) -> None:
    """Casting chunk by chunk gives exactly tensor.to(dtype), including NaN, inf, subnormals and ties."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4096, generator=gen, dtype=torch.float64) * torch.logspace(-40, 40, 4096, dtype=torch.float64)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, 65504.0, 65520.0, 3.0e38])
    src = {"x": torch.cat([x.float(), special]), "d": x, "h": x.to(torch.bfloat16), "i": torch.arange(10)}
    ck = _plain_checkpoint(tmp_path, src)
    streammerge.merge(ck, tmp_path / "out", dtype=str(dtype)[6:], buffer_size=4096 * 8, weights_only=True)
    from safetensors.torch import load_file

    got = load_file(tmp_path / "out" / "model.safetensors")
    for k, v in src.items():
        want = v.to(dtype) if v.is_floating_point() else v
        assert got[k].dtype == want.dtype
        assert torch.equal(got[k].view(torch.uint8), want.contiguous().view(torch.uint8)), k


def test_column_major_pieces_larger_than_the_buffer(tmp_path: Path) -> None:
    """Local tensors stored in another order than row-major, much larger than one window, merge exactly."""
    gen = torch.Generator().manual_seed(4)
    cm = torch.randn(300, 500, generator=gen).t()  # shape (500, 300), strides (1, 500)
    cube = torch.randn(20, 30, 40, generator=gen).permute(2, 0, 1)
    assert cm.stride() == (1, 500) and not cube.is_contiguous()
    ck = _plain_checkpoint(tmp_path, {"cm": cm, "cube": cube})
    streammerge.merge(ck, tmp_path / "out", dtype="bfloat16", buffer_size=64 * 1024, weights_only=True)
    from safetensors.torch import load_file

    got = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(got["cm"], cm.to(torch.bfloat16))
    assert torch.equal(got["cube"], cube.to(torch.bfloat16))


def test_float8_casts_go_through_torch(tmp_path: Path) -> None:
    """numpy has no float8: those casts (strided pieces too) fall back to torch's copy_ and equal `.to()`."""
    gen = torch.Generator().manual_seed(5)
    e4 = (torch.randn(40, 30, generator=gen) * 8).to(torch.float8_e4m3fn)
    e5 = (torch.randn(30, 40, generator=gen) * 8).to(torch.float8_e5m2).t()  # column-major piece
    ck = _plain_checkpoint(tmp_path, {"e4": e4, "e5": e5, "f": torch.randn(7, generator=gen)})
    streammerge.merge(ck, tmp_path / "out", dtype="bfloat16", buffer_size=4096 * 8, weights_only=True)
    from safetensors.torch import load_file

    got = load_file(tmp_path / "out" / "model.safetensors")
    for k, v in {"e4": e4, "e5": e5}.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16)), k


@pytest.mark.parametrize("tensors, message", [
    ({"w": torch.ones(2, dtype=torch.complex128)}, r"tensor 'w' has dtype complex128, which safetensors cannot store"),
    ({"a\ud800b": torch.ones(2)}, r"tensor name 'a\\ud800b' is not valid UTF-8"),
])
def test_a_tensor_safetensors_cannot_hold_is_refused_naming_it(tmp_path: Path, tensors, message) -> None:
    """complex128 and names with a lone surrogate (pickle keeps both) stopped the plan with a bare ValueError
    ('dtype torch.complex128 cannot be stored in safetensors', "'utf-8' codec can't encode character"), naming
    neither the checkpoint nor the tensor."""
    from streammerge.errors import CheckpointError

    actor = _plain_checkpoint(tmp_path, {**tensors, "ok": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(actor))}: {message}"):
        streammerge.merge(actor, tmp_path / "out", weights_only=True)
    assert not (tmp_path / "out").exists()
