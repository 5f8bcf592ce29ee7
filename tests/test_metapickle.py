"""metapickle: the allowlisted C unpickler gives exactly the records torch.load gives, and runs nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from fixture_paths import SHARED_CASES, SHARED_VERL, VERL_CASES, VERL_DATA

from streammerge.errors import UnsafePickleError
from streammerge.sources import rankfile as load
from streammerge.sources import torchpickle as metapickle
from streammerge.testing.presets import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _torch_records(path: Path, rank: int, world_size: int) -> dict:
    obj = load.torch_load_meta(path)
    return {n: load.tensor_record(n, v, rank, world_size, path) for n, v in obj.items() if isinstance(v, torch.Tensor)}


def _rank_files(actor: Path):
    for p in sorted(actor.glob("model_world_size_*_rank_*.pt")):
        ws, rank = (int(x) for x in p.stem.split("world_size_")[1].split("_rank_"))
        yield p, rank, ws


@pytest.fixture(scope="module")
def hsdp_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("hsdp"), preset="tiny", world_size=4, hsdp=2, jobs=1)


def _cases(hsdp_ckpt: Path) -> list[tuple[Path, int, int]]:
    cases = list(_rank_files(hsdp_ckpt))
    for d in [VERL_DATA / c for c in VERL_CASES] + [SHARED_VERL / c for c in SHARED_CASES]:  # shared: extras, if there
        cases += list(_rank_files(d))
    return cases


def test_same_records_as_torch_load(hsdp_ckpt):
    cases = _cases(hsdp_ckpt)
    assert len(cases) >= 4
    for path, rank, ws in cases:
        fast = load._fast_records(path, rank, ws)
        assert fast is not None, f"{path}: metapickle fell back to torch.load"
        ref = _torch_records(path, rank, ws)
        assert list(fast[0]) == list(ref), path  # same names, same state-dict order
        assert fast[0] == ref, path
    # the HSDP file really has a 2-D mesh and both placements, so the comparison covered them
    rec = next(iter(load._fast_records(*cases[3])[0].values()))
    assert rec.mesh_shape == (2, 2) and rec.placements == ("Replicate()", "Shard(0)") and rec.coordinate == (1, 1)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_in_the_file_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_world_size_1_rank_0.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, path)
    assert metapickle.read_state(path) is None  # not on the allowlist: hand over to torch.load(weights_only)
    with pytest.raises(UnsafePickleError):
        load.load_rank_file(path, 0, 1)
    assert not marker.exists()


def test_unknown_but_safe_entries_fall_back_to_torch_load(tmp_path):
    path = tmp_path / "model_world_size_1_rank_0.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "tags": {1, 2}}, path)
    assert metapickle.read_state(path) is None  # `set` is not on our list, but torch allows it
    rf = load.load_rank_file(path, 0, 1)
    assert rf.tensors == _torch_records(path, 0, 1) and rf.other == {"tags": {1, 2}}


def test_hsdp_checkpoint_of_this_torch_merges_right(hsdp_ckpt, tmp_path):
    """torch 2.13 pickles the mesh layout as `axes`, not `shape`: both loaders must read it."""
    from streammerge import merge
    from streammerge.testing.presets import check_merge

    merge(hsdp_ckpt, tmp_path / "out", dtype="keep", optimizer=False)
    assert check_merge(tmp_path / "out", "tiny") > 0
