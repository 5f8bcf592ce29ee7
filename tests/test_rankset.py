"""Loading rank files by matching them against rank 0 must give exactly what decoding each one gives.

Every check here compares against the slow path (`load_rank_file` on every rank, `tensor_pieces` on
every record), on real FSDP2 checkpoints made here and on the GPU-made veRL fixtures, and on rank files
edited the way a matcher could be fooled: swapped, re-saved with other strides, from another run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.tensor  # noqa: F401  (lets torch.load(weights_only=True) rebuild DTensors)
from fixture_paths import VERL_CASES as FIXTURES
from torch.distributed.tensor import Shard

import streammerge
from streammerge import open_checkpoint as find_checkpoint
from streammerge.errors import CheckpointError
from streammerge.sources.rankfile import load_rank_file, tensor_pieces
from streammerge.sources.rankset import ShardedPieces, load_ranks
from streammerge.testing.rankfiles import write_rank_files

SYNTHETIC = {
    "ws4": dict(world_size=4),
    "ws4-even": dict(world_size=4, vocab_size=1004),
    "ws4-shard1": dict(world_size=4, shard_placement="first_divisible"),
    "hsdp-2x2": dict(world_size=4, mesh=(2, 2)),
    "ws3-uneven": dict(world_size=3, hidden_size=40),
}


def _assert_same_as_decoding(actor: Path) -> int:
    ck = find_checkpoint(actor)
    ranks = load_ranks(ck.model_files, ck.world_size, match_min_records=0)
    full = [load_rank_file(p, k, ck.world_size) for k, p in enumerate(ck.model_files)]
    assert ranks.names == tuple(full[0].tensors)
    for k, rf in enumerate(full):
        for name in ranks.names:
            assert ranks.record(k, name) == rf.tensors[name], (k, name)
    plan = streammerge.plan(actor, dtype="keep").weights
    for name, t in plan.tensors.items():
        _, eager = tensor_pieces(name, [rf.tensors[name] for rf in full], full)
        assert tuple(t.pieces) == eager, name
    return ranks.decoded


@pytest.mark.parametrize("case", sorted(SYNTHETIC))
def test_matched_records_equal_decoded_records(case, make_ckpt):
    actor = make_ckpt(**SYNTHETIC[case])
    decoded = _assert_same_as_decoding(actor)
    if case == "ws4-even":  # every shard even: only rank 0 is decoded, the others are matched
        assert decoded == 1
    elif case in ("ws4", "ws4-shard1", "hsdp-2x2"):  # only ranks holding a short vocab piece are decoded
        assert decoded < 4


@pytest.mark.parametrize("case", FIXTURES)
def test_gpu_fixtures_match_decoding(case, verl_fixtures):
    decoded = _assert_same_as_decoding(verl_fixtures / case)
    if case.startswith("fsdp2_") and "hsdp" not in case:  # rank 3 holds short pieces of most tensors: decoded
        assert decoded <= 2


@pytest.mark.parametrize("case", ["gpu_fsdp2_llama_shard1_ws4", "gpu_fsdp2_hsdp_llama_2x2"])
def test_shared_gpu_fixtures_match_decoding(case, shared_verl_fixtures):
    """The NCCL-made extras were saved from cuda:R with cached spec hashes: still matched."""
    decoded = _assert_same_as_decoding(shared_verl_fixtures / case)
    if case == "gpu_fsdp2_llama_shard1_ws4":
        assert decoded == 1


def test_plan_shares_pieces_instead_of_listing_them(make_ckpt):
    actor = make_ckpt(world_size=4, vocab_size=1004)
    plan = streammerge.plan(actor, dtype="keep").weights
    lazy = [t for t in plan.tensors.values() if isinstance(t.pieces, ShardedPieces)]
    assert len(lazy) == len(plan.tensors)
    assert streammerge.plan(actor, dtype="keep").weights.fingerprint() == plan.fingerprint()


def _copy(actor: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run" / "global_step_2" / "actor"
    shutil.copytree(actor, dst)
    return dst


def _merged_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def test_swapped_rank_files_merge_by_their_own_mesh_coordinate(make_ckpt, tmp_path):
    actor = make_ckpt(world_size=4)
    streammerge.merge(actor, tmp_path / "ref", dtype="keep", optimizer=False, max_shard_size="40KB")
    swapped = _copy(actor, tmp_path)
    a, b = swapped / "model_world_size_4_rank_1.pt", swapped / "model_world_size_4_rank_2.pt"
    a.rename(swapped / "tmp.pt")
    b.rename(a)
    (swapped / "tmp.pt").rename(b)
    ck = find_checkpoint(swapped)
    ranks = load_ranks(ck.model_files, 4, match_min_records=0)
    assert [e.coordinates for e in ranks.entries] == [((0,),), ((2,),), ((1,),), ((3,),)]
    streammerge.merge(swapped, tmp_path / "out", dtype="keep", optimizer=False, max_shard_size="40KB")
    assert _merged_files(tmp_path / "out") == _merged_files(tmp_path / "ref")
    report = streammerge.verify(tmp_path / "out", swapped)  # torch's own placement, from each file's coordinate
    assert report.ok, report.failures


def test_a_copy_of_another_ranks_file_is_refused_even_where_it_covers_every_element(make_ckpt, tmp_path):
    """HSDP 2x2: rank 2 (replica 1, shard 0) replaced by rank 0's file still covers every element."""
    actor = make_ckpt(world_size=4, mesh=(2, 2))
    copied = _copy(actor, tmp_path)
    shutil.copyfile(copied / "model_world_size_4_rank_0.pt", copied / "model_world_size_4_rank_2.pt")
    with pytest.raises(CheckpointError, match="same mesh coordinate"):
        streammerge.merge(copied, tmp_path / "out", dtype="keep", optimizer=False)


def test_a_rank_resaved_with_other_strides_is_read_as_it_is(make_ckpt, tmp_path):
    """One tensor in the middle of rank 2 stored column-major: the bytes differ from rank 0's there."""
    actor = make_ckpt(world_size=4)
    streammerge.merge(actor, tmp_path / "ref", dtype="keep", optimizer=False, max_shard_size="40KB")
    edited = _copy(actor, tmp_path)
    path = edited / "model_world_size_4_rank_2.pt"
    sd = torch.load(path, weights_only=True)
    names = [n for n, v in sd.items() if v.dim() == 2]
    name = names[len(names) // 2]
    dt = sd[name]
    local = dt._local_tensor
    dt._local_tensor = local.t().contiguous().t()  # same values, strides (1, rows)
    assert dt._local_tensor.stride() != local.stride()
    torch.save(sd, path)
    ck = find_checkpoint(edited)
    ranks = load_ranks(ck.model_files, 4, match_min_records=0)
    entry = ranks.entries[2]
    assert entry.decoded or name in entry.overrides
    assert ranks.record(2, name).local_stride == dt._local_tensor.stride()
    streammerge.merge(edited, tmp_path / "out", dtype="keep", optimizer=False, max_shard_size="40KB")
    assert _merged_files(tmp_path / "out") == _merged_files(tmp_path / "ref")


def test_a_rank_from_another_model_is_refused(make_ckpt, tmp_path):
    actor = make_ckpt(world_size=4)
    other = make_ckpt(world_size=4, hidden_size=40)
    mixed = _copy(actor, tmp_path)
    shutil.copy(other / "model_world_size_4_rank_3.pt", mixed / "model_world_size_4_rank_3.pt")
    with pytest.raises(CheckpointError, match="rank_3"):
        streammerge.plan(mixed, dtype="keep")


def test_three_hundred_ranks_are_matched_past_rank_256(tmp_path):
    """Archive names of 1 to 3 digits (three layouts) and mesh ranks past 255 (one byte more in the
    pickle, so every offset after it shifts): still one decode, and the same records as decoding each."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.w": (torch.randn(600, 4, generator=g), [Shard(0)]) for i in range(3)}
    actor = write_rank_files(tmp_path / "c", tensors, (300,))
    ck = find_checkpoint(actor)
    ranks = load_ranks(ck.model_files, 300, match_min_records=0)
    assert ranks.decoded == 1
    assert len({id(e.base) for e in ranks.entries[1:]}) == 3  # one zip layout per archive-name length
    decoded = _assert_same_as_decoding(actor)
    assert decoded == 1
