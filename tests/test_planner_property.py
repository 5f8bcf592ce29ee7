"""Property tests of plan + write: random shapes, meshes and placements against a torch.chunk reference.

Each example builds full tensors, cuts them into the pieces each rank holds with torch.chunk (uneven
and empty pieces, Shard on any dim, 1-D and 2-D meshes, column-major local storage, plain replicated
tensors), saves real DTensor rank files, merges them with streammerge in tiny windows, and compares
the output with the full tensors (or their cast) bit for bit; verify must agree.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from ckpt_tools import write_rank_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch.distributed.tensor import Replicate, Shard

import streammerge
from streammerge.sources.rankfile import chunk_bounds

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool]
OUT_DTYPES = {"keep": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


@st.composite
def meshes(draw) -> tuple[int, ...]:
    if draw(st.booleans()):
        return (draw(st.integers(1, 6)),)
    return (draw(st.integers(1, 3)), draw(st.integers(1, 3)))  # HSDP-style 2-D meshes


@st.composite
def tensor_specs(draw, mesh: tuple[int, ...], index: int):
    ndim = draw(st.integers(0, 3))
    shape = []
    for _ in range(ndim):
        shape.append(draw(st.integers(0, 12) if draw(st.integers(0, 9)) == 0 else st.integers(1, 12)))
    if math.prod(shape) > 2500:
        shape = [min(s, 8) for s in shape]
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if dtype == torch.bool:
        full = torch.randint(0, 2, shape, generator=g).bool()
    elif dtype.is_floating_point:
        full = (torch.randn(shape, generator=g) * 100).to(dtype)
    else:
        full = torch.randint(-2**30, 2**30, shape, generator=g).to(dtype)
    kind = draw(st.sampled_from(["dtensor", "dtensor", "dtensor", "plain"]))
    if kind == "plain":
        return f"t{index}", full, None, False
    choices = [Replicate()] + [Shard(d) for d in range(ndim)]
    placements = [draw(st.sampled_from(choices)) for _ in mesh]
    strided = ndim >= 2 and draw(st.booleans())
    return f"t{index}", full, placements, strided


@st.composite
def checkpoints(draw):
    mesh = draw(meshes())
    n = draw(st.integers(1, 3))
    specs = [draw(tensor_specs(mesh, i)) for i in range(n)]
    out_dtype = draw(st.sampled_from(list(OUT_DTYPES)))
    max_shard = draw(st.integers(16, 6000))
    return mesh, specs, out_dtype, max_shard


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(checkpoints())
def test_merge_equals_the_full_tensors(case):
    mesh, specs, out_dtype, max_shard = case
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tensors = {name: (full if placements is None else (full, placements)) for name, full, placements, _ in specs}
        strided = [name for name, _, _, s in specs if s]
        ckpt = write_rank_files(tmp / "actor", tensors, mesh, strided=strided)
        out = tmp / "out"
        streammerge.merge(ckpt, out, dtype=out_dtype, max_shard_size=max_shard, buffer_size="4KiB", workers=2,
                          weights_only=True)

        merged: dict[str, torch.Tensor] = {}
        for f in sorted(out.glob("*.safetensors")):
            part = load_file(f)
            assert not set(part) & set(merged)
            merged.update(part)
        assert set(merged) == {name for name, *_ in specs}
        cast = OUT_DTYPES[out_dtype]
        for name, full, _, _ in specs:
            want = full.to(cast) if cast is not None and full.dtype.is_floating_point else full
            got = merged[name]
            assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), name
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).contiguous().view(torch.uint8)), name
        report = streammerge.verify(out, ckpt, chunk_size=4096)
        assert report.ok, report.summary()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 60), st.integers(1, 12))
def test_chunk_bounds_match_torch_chunk(length, parts):
    """The box math behind every piece: torch.chunk, with the missing trailing chunks empty."""
    pieces = [p.tolist() for p in torch.chunk(torch.arange(length), parts)]
    for i in range(parts):
        lo, hi = chunk_bounds(length, parts, i)
        assert list(range(lo, hi)) == (pieces[i] if i < len(pieces) else [])
