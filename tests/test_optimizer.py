"""Optimizer export: names and bits against torch's own full state, layout, refusals, torch format, resume."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.tensor  # noqa: F401  (lets weights_only loads rebuild DTensors)
from fixture_paths import REPO, VERL_CASES
from fixture_paths import VERL_DATA as FIXTURES
from safetensors import safe_open
from safetensors.torch import load_file

import streammerge
from streammerge.optimizer import OPTIMIZER_INDEX, OptimizerMismatchError, optimizer_save_mode_enabled
from streammerge.optimizer.naming import model_params

NAMES = VERL_CASES


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_same_optimizer(got: dict, ref: dict, ordered: bool = True) -> None:
    """Every parameter, every key, every bit; and the param groups (hyperparameters and fqns).

    With `ordered`, `got`'s state is in param-group order, as the export writes it (torch's own gather of FSDP1
    use_orig_params orders it otherwise: the order of a dict means nothing to set_optimizer_state_dict).
    """
    assert got["param_groups"] == ref["param_groups"]
    assert set(got["state"]) == set(ref["state"])
    if ordered:
        assert list(got["state"]) == [f for g in got["param_groups"] for f in g["params"] if f in got["state"]]
    for fqn, entry in ref["state"].items():
        assert set(got["state"][fqn]) == set(entry), fqn
        for key, want in entry.items():
            have = got["state"][fqn][key]
            assert have.dtype == want.dtype and have.shape == want.shape, (fqn, key)
            assert torch.equal(_bits(have), _bits(want)), (fqn, key)


def _reference(name: str) -> dict:
    return torch.load(FIXTURES / name / "reference" / "optimizer.pt", weights_only=True)


def _export(tmp_path_factory, name: str, fmt: str):
    out = tmp_path_factory.mktemp(name) / "out"
    result = streammerge.merge(FIXTURES / name, out, dtype="keep", max_shard_size="40KB", optimizer_format=fmt)
    assert result.warnings == []
    return name, out, result


@pytest.fixture(scope="module", params=NAMES)
def st_export(request, tmp_path_factory):
    """Each fixture merged with the default optimizer format (sharded safetensors + index)."""
    return _export(tmp_path_factory, request.param, "safetensors")


@pytest.fixture(scope="module", params=NAMES)
def pt_export(request, tmp_path_factory):
    """Each fixture merged with --optimizer-format torch."""
    return _export(tmp_path_factory, request.param, "torch")


def test_safetensors_export_equals_torch_full_state_bit_for_bit(st_export) -> None:
    name, out, _ = st_export
    assert_same_optimizer(streammerge.load_optimizer_state_dict(out), _reference(name))


def test_safetensors_layout(st_export) -> None:
    name, out, _ = st_export
    index = json.loads((out / "optimizer" / OPTIMIZER_INDEX).read_text())
    ref = _reference(name)
    want = {f"state.{fqn}.{key}" for fqn, entry in ref["state"].items() for key in entry}
    assert set(index["weight_map"]) == want
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all(f.startswith("optimizer-") for f in files)
    total = 0
    for f in files:
        with safe_open(str(out / "optimizer" / f), framework="pt") as st:  # the Rust reader
            sizes = {k: math.prod(st.get_slice(k).get_shape()) * 4 for k in st.keys()}
        total += sum(sizes.values())
        assert sum(sizes.values()) <= 40_000 or len(sizes) == 1  # --max-shard-size, or one oversized tensor
    assert index["metadata"]["total_size"] == total
    groups = json.loads(index["metadata"]["param_groups"])
    assert [g["params"] for g in groups] == [g["params"] for g in ref["param_groups"]]
    for key in ("lr", "betas", "eps", "weight_decay", "initial_lr"):
        assert groups[0][key] == (list(ref["param_groups"][0][key]) if key == "betas" else ref["param_groups"][0][key])


def test_export_is_memory_mapped(st_export) -> None:
    """load_optimizer_state_dict reads nothing up front: tensors are copy-on-write views of the mapped files."""
    name, out, _ = st_export
    index = json.loads((out / "optimizer" / OPTIMIZER_INDEX).read_text())
    osd = streammerge.load_optimizer_state_dict(out / "optimizer")
    fqn, entry = next(iter(osd["state"].items()))
    path = out / "optimizer" / index["weight_map"][f"state.{fqn}.exp_avg"]
    before = path.read_bytes()
    assert entry["exp_avg"].untyped_storage().nbytes() == len(before)  # a view of the whole file, not a copy
    entry["exp_avg"].add_(1)
    assert path.read_bytes() == before


def test_torch_format_equals_torch_full_state_and_is_a_valid_zip(pt_export) -> None:
    name, out, result = pt_export
    path = out / "optimizer" / "optimizer.pt"
    assert sorted(p.name for p in (out / "optimizer").iterdir()) == ["optimizer.pt"]
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every record's CRC-32 is right
        data = [i for i in zf.infolist() if "/data/" in i.filename]
        assert len(data) == sum(len(e) for e in _reference(name)["state"].values())  # one record per tensor
        with open(path, "rb") as fh:
            for info in data:  # torch's 64-byte alignment of storage records
                fh.seek(info.header_offset + 26)
                n, m = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
                assert (info.header_offset + 30 + n + m) % 64 == 0
    assert_same_optimizer(torch.load(path, weights_only=True, map_location="cpu"), _reference(name))
    entry = next(f for f in result.files if f.filename == "optimizer/optimizer.pt")
    assert entry.size == path.stat().st_size


@pytest.mark.parametrize("name", NAMES)
def test_parameter_order_is_named_parameters_order(name) -> None:
    """The ints of the rank files follow named_parameters() (FSDP1: the flat parameters' order)."""
    info = json.loads((FIXTURES / name / "reference" / "INFO.json").read_text())
    p = streammerge.plan(FIXTURES / name, dtype="keep").weights
    known = {n: t.shape for n, t in p.tensors.items()} | {n: p.tensors[k].shape for n, k in p.dropped.items()}
    model = model_params(json.loads((FIXTURES / name / "huggingface" / "config.json").read_text()), known)
    if info["fsdp_version"] == 1 and info["use_orig_params"]:  # one entry per original parameter
        assert [n for n, _ in model.params] == [f.replace("_fsdp_wrapped_module.", "") for f in info["param_order"]]
    elif info["fsdp_version"] == 1:
        flat = [f.replace("_fsdp_wrapped_module.", "").replace("._flat_param", "").replace("_flat_param", "")
                for f in info["param_order"]]
        assert [prefix for prefix, _ in model.units] == flat
    else:
        assert [n for n, _ in model.params] == info["param_order"]


def test_optimizer_save_mode_words() -> None:
    assert optimizer_save_mode_enabled("full") and optimizer_save_mode_enabled("FULL")
    for off in (None, "null", "None", ""):
        assert not optimizer_save_mode_enabled(off)
    with pytest.raises(ValueError, match="optimizer_save_mode"):
        optimizer_save_mode_enabled("sharded")


# ---------------------------------------------------------------- refusals

def _tampered(tmp: Path, name: str, change, ranks: tuple[int, ...] | None = None) -> Path:
    """A copy of a fixture whose optim rank files (of `ranks`, default all) went through `change(optim_state_dict)`."""
    src = FIXTURES / name
    dst = tmp / name
    dst.mkdir()
    for p in src.iterdir():
        if p.name.startswith("optim_") and (ranks is None or int(p.stem.rsplit("_", 1)[1]) in ranks):
            osd = torch.load(p, map_location="cpu", weights_only=True)
            change(osd)
            torch.save(osd, dst / p.name)
        elif p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            os.symlink(p, dst / p.name)
    return dst


def _swap_first_two(osd: dict) -> None:
    _swap(osd, 0, 1)


def _swap(osd: dict, a: int, b: int) -> None:
    osd["state"][a], osd["state"][b] = osd["state"][b], osd["state"][a]


def _drop_last(osd: dict) -> None:
    last = osd["param_groups"][0]["params"].pop()
    osd["state"].pop(last, None)


@pytest.mark.slow
def test_state_of_another_shape_is_refused(tmp_path) -> None:
    ck = _tampered(tmp_path, "fsdp2_llama_shard1_ws4", _swap_first_two)
    with pytest.raises(OptimizerMismatchError, match=r"model\.embed_tokens\.weight.*refusing to guess.*--no-optimizer"):
        streammerge.merge(ck, tmp_path / "out")
    cli = subprocess.run([sys.executable, "-m", "streammerge", str(ck), str(tmp_path / "out2")], cwd=REPO,
                         capture_output=True, text=True)
    assert cli.returncode == 2 and "refusing to guess" in cli.stderr and "Traceback" not in cli.stderr
    result = streammerge.merge(ck, tmp_path / "out3", optimizer=False)  # the way out the message names
    assert not (tmp_path / "out3" / "optimizer").exists() and (tmp_path / "out3" / "model.safetensors").is_file()
    assert result.warnings == []


def test_fewer_states_than_parameters_is_refused(tmp_path) -> None:
    ck = _tampered(tmp_path, "fsdp2_qwen2_tied_ws4", _drop_last)
    with pytest.raises(OptimizerMismatchError, match="holds 25 parameters but Qwen2ForCausalLM .* has 26"):
        streammerge.merge(ck, tmp_path / "out")


def test_fsdp1_unmatched_flat_parameters_still_export_weights(tmp_path) -> None:
    ck = _tampered(tmp_path, "fsdp1_llama_ws4", _swap_first_two)
    result = streammerge.merge(ck, tmp_path / "out", dtype="keep")
    assert len(result.warnings) == 1
    assert "optimizer not exported" in result.warnings[0] and "wrap policy" in result.warnings[0]
    assert not (tmp_path / "out" / "optimizer").exists()
    ref = load_file(FIXTURES / "fsdp1_llama_ws4" / "reference" / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(got[k], ref[k]) for k in got)


def test_fsdp1_orig_params_pieces_that_do_not_add_up_are_refused(tmp_path) -> None:
    """use_orig_params: rank 0 holds all of q_proj (900) and 166 of k_proj; swapped, neither adds up."""
    ck = _tampered(tmp_path, "fsdp1_origparams_llama_ws4", lambda osd: _swap(osd, 1, 2), ranks=(0,))
    with pytest.raises(OptimizerMismatchError, match=r"entry 1 \(\w+\) holds pieces of \[\[166\]\] elements on ranks "
                       r"\[0\].*q_proj.weight, has shape \[30, 30\].*--no-optimizer"):
        streammerge.merge(ck, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fsdp1_orig_params_pieces_must_come_from_consecutive_ranks(tmp_path) -> None:
    """The embedding's pieces (ranks 0 and 1) moved to ranks 0 and 2: sizes add up, the layout cannot be FSDP1's."""
    name = "fsdp1_origparams_llama_ws4"
    def load(rank: int) -> dict:
        return torch.load(FIXTURES / name / f"optim_world_size_4_rank_{rank}.pt", map_location="cpu", weights_only=True)

    ck = _tampered(tmp_path, name, lambda osd: osd["state"].pop(0), ranks=(1,))
    rank2 = load(2)
    rank2["state"][0] = load(1)["state"][0]
    (ck / "optim_world_size_4_rank_2.pt").unlink()
    torch.save(rank2, ck / "optim_world_size_4_rank_2.pt")
    with pytest.raises(OptimizerMismatchError, match=r"entry 0 .* on ranks \[0, 2\].*consecutive ranks"):
        streammerge.merge(ck, tmp_path / "out")


def test_fsdp1_hsdp_replica_of_another_shape_is_refused(tmp_path) -> None:
    """HSDP: ranks 0 and 2 hold the same shard; rank 2's copy of another length names both files."""
    def shorten(osd: dict) -> None:
        osd["state"][1]["exp_avg"] = osd["state"][1]["exp_avg"][:-1].clone()

    ck = _tampered(tmp_path, "fsdp1_hsdp_llama_2x2", shorten, ranks=(2,))
    want = (r"optim_world_size_4_rank_2.pt: optimizer entry state.1.exp_avg \(float32 \[2129\]\) differs from its "
            r"replica optim_world_size_4_rank_0.pt \(float32 \[2130\]\)")
    with pytest.raises(streammerge.CheckpointError, match=want):
        streammerge.merge(ck, tmp_path / "out")


def test_fsdp1_orig_params_step_is_taken_from_a_rank_holding_the_parameter(tmp_path) -> None:
    """v_proj (entry 3) lives on rank 1 only: its step comes from there (rank 0 has none to give)."""
    def step(osd: dict) -> None:
        osd["state"][3]["step"] = torch.tensor(7.0)

    ck = _tampered(tmp_path, "fsdp1_origparams_llama_ws4", step, ranks=(1,))
    streammerge.merge(ck, tmp_path / "out")
    got = streammerge.load_optimizer_state_dict(tmp_path / "out")["state"]
    assert got["model.layers.0.self_attn.v_proj.weight"]["step"].item() == 7.0
    assert got["model.layers.0.self_attn.q_proj.weight"]["step"].item() == 3.0


def test_config_that_does_not_match_the_model_files_is_refused(tmp_path) -> None:
    """A config of another size would load as another model: refused before anything is written."""
    ck = tmp_path / "ck"
    shutil.copytree(FIXTURES / "fsdp2_hsdp_llama_2x2", ck, symlinks=True)
    cfg = json.loads((ck / "huggingface" / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (ck / "huggingface" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(streammerge.ConfigError, match="intermediate_size"):
        streammerge.merge(ck, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fsdp1_without_fsdp_config_is_recognised_by_its_flat_entries(tmp_path) -> None:
    """Checkpoints older than fsdp_config.json: the entry count tells flat parameters from parameters."""
    ck = tmp_path / "ck"
    ck.mkdir()
    for p in (FIXTURES / "fsdp1_llama_ws4").iterdir():
        if p.is_dir():  # huggingface/ is copied into OUT: a copy, since links out of the checkpoint are refused
            shutil.copytree(p, ck / p.name)
        elif p.name != "fsdp_config.json":
            os.symlink(p, ck / p.name)
    streammerge.merge(ck, tmp_path / "out", dtype="keep")
    assert_same_optimizer(streammerge.load_optimizer_state_dict(tmp_path / "out"), _reference("fsdp1_llama_ws4"))


@pytest.mark.parametrize("kwargs", [
    dict(arch="qwen2", tie_word_embeddings=True, extra_buffers=True, world_size=2),
    dict(world_size=1, plain_tensors=True),
], ids=["buffers-and-tied-weights", "plain-world-size-1"])
def test_synthetic_checkpoints(make_ckpt, tmp_path, kwargs, monkeypatch) -> None:
    """Buffers sit between parameters in the state dict and a tied weight appears once in the
    optimizer: the names still come out right. FSDP1's plain full tensors at world size 1 too."""
    actor = make_ckpt(**kwargs)
    if kwargs.get("extra_buffers"):  # buffers transformers' class lacks: the architecture check would refuse them
        monkeypatch.setenv("STREAMMERGE_ARCH_CHECK", "0")
    result = streammerge.merge(actor, tmp_path / "out", dtype="keep")
    assert result.warnings == []
    want = torch.load(actor / "reference" / "optimizer.pt", weights_only=True)
    assert_same_optimizer(streammerge.load_optimizer_state_dict(tmp_path / "out"), want)


def test_several_param_groups_are_not_guessed(tmp_path) -> None:
    def split(osd: dict) -> None:
        group = osd["param_groups"][0]
        osd["param_groups"] = [{**group, "params": group["params"][:5]},
                               {**group, "weight_decay": 0.0, "params": group["params"][5:]}]

    ck = _tampered(tmp_path, "fsdp2_llama_shard1_ws4", split)
    result = streammerge.merge(ck, tmp_path / "out")
    assert len(result.warnings) == 1 and "2 param groups" in result.warnings[0]
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "optimizer").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_state_safetensors_cannot_hold_is_not_exported(tmp_path, fmt) -> None:
    """complex128 state (of a complex float64 parameter) stopped the merge with a bare ValueError (torch format)
    or advice to convert the checkpoint (safetensors): the weights do not depend on it."""
    def complex_state(osd: dict) -> None:
        st = osd["state"][0]
        st["exp_avg"] = torch.complex(st["exp_avg"].double(), st["exp_avg_sq"].double())

    ck = _tampered(tmp_path, "fsdp1_llama_ws4", complex_state)
    result = streammerge.merge(ck, tmp_path / "out", optimizer_format=fmt)
    assert result.warnings == ["optimizer not exported: 'state.model.embed_tokens.weight.exp_avg' is complex128, "
                               "which neither optimizer format streammerge writes can hold; the weights are exported"]
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "optimizer").exists()


def test_unknown_optimizer_format_is_rejected() -> None:
    from streammerge.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser("merge").parse_args(["a", "b", "--optimizer-format", "zip"])


@pytest.mark.slow
def test_cli_torch_format_and_resume_reuses_files(tmp_path) -> None:
    name = "fsdp2_qwen2_tied_ws4"
    args = [sys.executable, "-m", "streammerge", str(FIXTURES / name), str(tmp_path / "out"),
            "--optimizer-format", "torch", "--dtype", "keep"]
    first = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    again = streammerge.merge(FIXTURES / name, tmp_path / "out", dtype="keep", optimizer_format="torch")
    assert "optimizer/optimizer.pt" in again.reused and again.bytes_written == 0
    manifest = json.loads((tmp_path / "out" / ".streammerge" / "manifest.json").read_text())
    assert "optimizer/optimizer.pt" in manifest["files"]
    assert_same_optimizer(streammerge.load_optimizer_state_dict(tmp_path / "out"), _reference(name))
    # verify compares optimizer.pt's records with the checkpoint, as a safetensors file's tensors
    report = streammerge.verify(tmp_path / "out", FIXTURES / name)
    assert report.ok and not any("optimizer.pt: not a safetensors file" in n for n in report.notes), report.summary()
    path = tmp_path / "out" / "optimizer" / "optimizer.pt"
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        record = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 8)
    start = record.header_offset + 30 + int.from_bytes(data[record.header_offset + 26:record.header_offset + 28],
                                                        "little") + int.from_bytes(
        data[record.header_offset + 28:record.header_offset + 30], "little")
    data[start + 3] ^= 0x40  # an exponent bit of the record's first float32 (the manifest still says otherwise)
    path.write_bytes(bytes(data))
    failures = streammerge.verify(tmp_path / "out", FIXTURES / name).failures
    assert any(f.startswith("optimizer/optimizer.pt: tensor ") and "differ from rank" in f for f in failures), failures

    # a param group value nested deeper than Python recurses (torch.load reads it): a failure, not an internal error
    def nest_deep() -> None:
        state = torch.load(path, weights_only=True)
        value: object = 1e-3
        for _ in range(20_000):
            value = [value]
        state["param_groups"][0]["lr"] = value
        torch.save(state, path)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)  # torch.save pickles it recursively, on a thread with the stack for it
    try:
        stack = threading.stack_size(256 << 20)
        saver = threading.Thread(target=nest_deep)
        saver.start()
        saver.join()
        threading.stack_size(stack)
    finally:
        sys.setrecursionlimit(limit)
    failures = streammerge.verify(tmp_path / "out", FIXTURES / name).failures
    assert "optimizer/optimizer.pt: its pickle nests deeper than anything the merge writes; rerun the merge to write " \
        "it again" in failures, failures
    shutil.rmtree(tmp_path / "out" / ".streammerge")
    failures = streammerge.verify(tmp_path / "out", FIXTURES / name).failures
    assert any("param_groups differ from the checkpoint's (they nest deeper" in f for f in failures), failures


# ---------------------------------------------------------------- resume on another world size

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(job, nprocs: int) -> None:
    import _resume_train as rt
    import torch.multiprocessing as tmp

    tmp.start_processes(rt.run, args=(job,), nprocs=nprocs, join=True, start_method="forkserver")


@pytest.fixture(scope="module")
def resume_run(tmp_path_factory):
    """Train with FSDP2 on 2 gloo ranks for 2 steps, save veRL rank files, go on for a 3rd step."""
    import _resume_train as rt

    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch.distributed.fsdp", "transformers.models.llama.modeling_llama", "_resume_train", "streammerge"])
    work = tmp_path_factory.mktemp("resume")
    _ranks(rt.Job("train", 2, _port(), str(work), steps=2), 2)
    export = work / "export"
    result = streammerge.merge(work / "global_step_2" / "actor", export, dtype="keep")
    assert result.warnings == []
    return work, export


def test_export_equals_live_full_optimizer_state(resume_run) -> None:
    work, export = resume_run
    assert_same_optimizer(streammerge.load_optimizer_state_dict(export),
                          torch.load(work / "oracle_optimizer.pt", weights_only=True))


def test_flattened_form_equals_torchs(resume_run) -> None:
    """flatten_state=True gives what get_optimizer_state_dict(flatten_optimizer_state_dict=True) gives."""
    work, export = resume_run
    got = streammerge.load_optimizer_state_dict(export, flatten_state=True)
    want = torch.load(work / "oracle_optimizer_flat.pt", weights_only=True)
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(_bits(got[k]), _bits(v)), k
        else:
            assert got[k] == v, k


@pytest.mark.parametrize("world_size, fsdp", [(4, True), (1, False)], ids=["fsdp2-4-ranks", "one-process"])
def test_resume_on_another_world_size_is_bitwise_uninterrupted(resume_run, world_size, fsdp) -> None:
    import _resume_train as rt

    work, export = resume_run
    tag = f"{world_size}-{fsdp}"
    _ranks(rt.Job("resume", world_size, _port(), str(work), steps=2, export=str(export), fsdp=fsdp, tag=tag),
           world_size)
    want = load_file(work / "uninterrupted.safetensors")
    got = load_file(work / f"resumed_{tag}.safetensors")
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(_bits(got[k]), _bits(want[k])), k


def test_resume_without_optimizer_state_differs(resume_run) -> None:
    """Control: the comparison above sees the optimizer state (a fresh AdamW gives other weights)."""
    import _resume_train as rt

    work, export = resume_run
    _ranks(rt.Job("resume", 1, _port(), str(work), steps=2, export=str(export), fsdp=False, tag="fresh",
                  load_optimizer=False), 1)
    want = load_file(work / "uninterrupted.safetensors")
    got = load_file(work / "resumed_fresh.safetensors")
    assert any(not torch.equal(got[k], want[k]) for k in want)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_optimizer_rank_files_are_unpickled_once_and_weights_only(make_ckpt, tmp_path, monkeypatch) -> None:
    """metapickle's fast path never takes an optimizer file (nested state): it must not be tried at all."""
    from streammerge.errors import UnsafePickleError
    from streammerge.optimizer.fsdp import load_optim_file
    from streammerge.sources import torchpickle as metapickle

    actor = make_ckpt()
    path = actor / "optim_world_size_2_rank_0.pt"
    tries, loads = [], []
    read_state, torch_load = metapickle.read_state, torch.load
    monkeypatch.setattr(metapickle, "read_state", lambda p, *rest: tries.append(p) or read_state(p, *rest))
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("weights_only")) or torch_load(*a, **kw))

    rf = load_optim_file(path, 0, 2)
    assert rf.tensors and rf.other["param_groups"] and rf.size == path.stat().st_size
    assert tries == [] and loads == [True]
    streammerge.merge(actor, tmp_path / "out", max_shard_size="200KB")  # the whole merge: no optimizer file tried
    assert (tmp_path / "out" / "optimizer" / OPTIMIZER_INDEX).is_file()
    assert not [p for p in tries if Path(p).name.startswith("optim_")]

    marker = tmp_path / "pwned"  # still weights-only: code pickled in an optimizer file never runs
    evil = tmp_path / "optim_world_size_1_rank_0.pt"
    torch.save({"state": {0: {"step": _Payload(marker)}}, "param_groups": [{"params": [0]}]}, evil)
    with pytest.raises(UnsafePickleError):
        load_optim_file(evil, 0, 1)
    assert not marker.exists()


def _train_two_steps(rank: int, actor: str, case: str) -> None:
    """Two AdamW steps of a tiny model under FSDP2 on 2 gloo ranks, saved as veRL saves, with torch's own full
    optimizer state dict beside it (`oracle_optimizer.pt`). Cases: `critic` (veRL's value model, a token
    classifier, from a base config that ties embeddings and names the causal LM), `named` / `named_reversed`
    (AdamW over named parameters, torch >= 2.6, which records `param_names`; reversed: layers last to first),
    `tensor_lr` (a tensor learning rate in the param group)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForTokenClassification, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=67, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=case == "critic", num_labels=1)
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    model = (AutoModelForTokenClassification.from_config(config) if case == "critic" else Qwen2ForCausalLM(config))
    model = model.float()
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = list(model.named_parameters())
    if case == "named_reversed":  # the layers' parameters in reverse layer order, in the layers' slots
        layers = [np for np in params if ".layers." in np[0]]
        by_layer = sorted(layers, key=lambda np: -int(np[0].split(".")[2]))
        it = iter(by_layer)
        params = [next(it) if ".layers." in np[0] else np for np in params]
    lr = torch.tensor(1e-2) if case == "tensor_lr" else 1e-2  # torch takes a tensor lr (capturable schedules)
    optim = torch.optim.AdamW(params if case.startswith("named") else model.parameters(), lr=lr)
    for i in range(2):
        ids = torch.randint(0, 67, (2, 8), generator=torch.Generator().manual_seed(i))
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        optim.step()
        optim.zero_grad()
    out = Path(actor)
    torch.save(model.state_dict(), out / f"model_world_size_2_rank_{rank}.pt")
    torch.save(optim.state_dict(), out / f"optim_world_size_2_rank_{rank}.pt")
    dist.barrier()
    full = get_optimizer_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, out / "oracle_optimizer.pt")
        (out / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 2}))
        config.save_pretrained(out / "huggingface")


@pytest.mark.parametrize("case", ["critic", "named", "named_reversed", "tensor_lr"])
def test_optimizers_named_by_what_was_trained(case: str, tmp_path: Path) -> None:
    """A critic of a tied base is named as the token classifier it is (the tied causal LM's parameters fit inside
    it); named parameters in the model's order export as torch's full state; in another order (same shapes, so
    position alone cannot tell) the optimizer is not exported, with the reason, and the weights still are; so too
    with a tensor in a param group (it cannot go into the index's JSON), which used to end as an internal error."""
    from streammerge.testing.ranks import run_ranks

    actor = tmp_path / "actor"
    actor.mkdir()
    run_ranks(_train_two_steps, (str(actor), case), 2)
    out = tmp_path / "out"
    result = streammerge.merge(actor, out, dtype="keep")
    assert (out / "model.safetensors").is_file()
    if case in ("named_reversed", "tensor_lr"):
        why = "param_names" if case == "named_reversed" else "cannot be recorded as JSON"
        assert not (out / "optimizer").exists()
        assert any(why in w and "optimizer not exported" in w for w in result.warnings), result.warnings
        return
    if case == "critic":  # veRL saves the critic with its base's config: written as the class that has the head
        assert len(result.warnings) == 1 and "value head" in result.warnings[0], result.warnings
        assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForTokenClassification"]
    else:
        assert result.warnings == []
    ref = torch.load(actor / "oracle_optimizer.pt", weights_only=True)
    got = streammerge.load_optimizer_state_dict(out)
    assert_same_optimizer(got, ref)  # param groups included: named parameters' param_names, a list as in torch


def _step(value) -> Callable[[dict], None]:
    def set_step(osd: dict) -> None:
        for entry in osd["state"].values():
            entry["step"] = value
    return set_step


@pytest.mark.parametrize("name", ["fsdp2_llama_shard1_ws4", "fsdp1_llama_ws4", "fsdp1_hsdp_llama_2x2"])
def test_a_rank_file_from_another_step_is_refused(name, tmp_path) -> None:
    """`step` is on every rank: one optim file saved at another step (its shapes all match) names both files and
    both values, instead of rank 0's step being exported as everyone's."""
    ck = _tampered(tmp_path, name, _step(torch.tensor(9.0)), ranks=(2,))
    want = r"optim_world_size_4_rank_2.pt: optimizer entry 0 \(.*\) has step 9.0, but optim_world_size_4_rank_0.pt " \
           r"has 3.0: .*different saves.*--no-optimizer"
    with pytest.raises(streammerge.CheckpointError, match=want):
        streammerge.merge(ck, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    streammerge.merge(ck, tmp_path / "out2", optimizer=False)  # the way out the message names


def test_a_float_step_that_differs_between_ranks_is_refused(tmp_path) -> None:
    """A step kept as a Python number (not a tensor) is compared too; agreeing ranks export it."""
    ck = _tampered(tmp_path, "fsdp2_llama_shard1_ws4", _step(5.0))
    streammerge.merge(ck, tmp_path / "out")
    got = streammerge.load_optimizer_state_dict(tmp_path / "out")["state"]
    assert {v["step"] for v in got.values()} == {5.0}
    rank3 = ck / "optim_world_size_4_rank_3.pt"
    osd = torch.load(rank3, map_location="cpu", weights_only=True)
    _step(6.0)(osd)
    torch.save(osd, rank3)
    with pytest.raises(streammerge.CheckpointError, match=r"rank_3.pt: optimizer entry 0 .* has step 6.0, but "
                                                          r"optim_world_size_4_rank_0.pt has 5.0"):
        streammerge.merge(ck, tmp_path / "out2")


@pytest.mark.parametrize("edit, ranks, message", [
    # two runs' files of the same step, mixed when copied: they agree on step and shapes, not on the settings
    (lambda osd: osd["param_groups"][0].update(lr=0.5), (1,), r"rank_1.pt: param group 0 has lr 0.5, but "
                                                              r"optim_world_size_4_rank_0.pt's has"),
    (lambda osd: osd["state"].update({999: {"step": torch.tensor(3.0)}}), (0, 1, 2, 3),
     r"rank_0.pt: optimizer state entry 999 is in no param group"),
    (lambda osd: osd.update(param_groups=[[0, 1]]), (0, 1, 2, 3), r"not an optimizer state dict \(a param group"),
    (lambda osd: osd["param_groups"][0].update(params=5), (0, 1, 2, 3), r"not an optimizer state dict"),
], ids=["settings_differ", "orphan_entry", "group_not_a_dict", "params_not_a_list"])
def test_optimizer_files_that_disagree_or_are_malformed(tmp_path, edit, ranks, message) -> None:
    ck = _tampered(tmp_path, "fsdp2_qwen2_tied_ws4", edit, ranks=ranks)
    with pytest.raises(streammerge.CheckpointError, match=message):
        streammerge.merge(ck, tmp_path / "out")


def test_a_parameter_order_other_than_transformers_is_not_named_by_it(tmp_path) -> None:
    """The optimizer's integer keys follow the *trained* model's named_parameters() order, which its model rank files
    record (state_dict order). Where the transformers class built here registers parameters in another order (another
    transformers version, a patched class), same-shaped parameters (q_proj and o_proj) would swap names silently:
    the model files' order is compared first, and the optimizer is not named by position."""
    name = "fsdp2_llama_shard1_ws4"
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    config = json.loads((FIXTURES / name / "huggingface" / "config.json").read_text())
    order = [n for n, _ in model_params(config, _shapes(name)).params]
    iq, io = order.index(q), order.index(o)
    ck = _tampered(tmp_path, name, lambda osd: _swap(osd, iq, io))  # trained with o_proj registered before q_proj
    for p in sorted(ck.glob("model_world_size_*.pt")):
        sd = torch.load(p, map_location="cpu", weights_only=True)
        keys = list(sd)
        kq, ko = keys.index(q), keys.index(o)
        keys[kq], keys[ko] = o, q
        p.unlink()
        torch.save({k: sd[k] for k in keys}, p)
    result = streammerge.merge(ck, tmp_path / "out")
    assert not (tmp_path / "out" / "optimizer").exists()
    assert any("optimizer not exported" in w and o in w and q in w for w in result.warnings), result.warnings
    # the weights are named by the files, not by position: still exact
    ref = load_file(FIXTURES / name / "reference" / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(got[k], ref[k].to(got[k].dtype)) for k in got)


def _shapes(name: str) -> dict:
    sd = torch.load(FIXTURES / name / "model_world_size_4_rank_0.pt", map_location="cpu", weights_only=True)
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("names, why", [
    ({0: "optim_world_size_2_rank_0.pt", 1: "optim_world_size_2_rank_1.pt"}, "of world size 2, but the model rank "
                                                                              "files are of world size 4"),
    ({0: "optim_world_size_4_rank_0.pt", 1: "optim_world_size_4_rank_1.pt", 3: "optim_world_size_4_rank_3.pt"},
     "optim rank files missing for ranks 2"),
], ids=["another_world_size", "a_rank_missing"])
def test_optim_files_that_are_not_the_models_are_not_passed_over_silently(tmp_path, names, why) -> None:
    """Optim rank files that are not the model's world size (another run's, copied beside it), or not every rank's,
    are no optimizer to export: a warning says so, rather than a merge that quietly leaves the optimizer out."""
    name = "fsdp2_llama_shard1_ws4"
    ck = tmp_path / name
    ck.mkdir()
    for p in (FIXTURES / name).iterdir():
        if p.is_dir():
            shutil.copytree(p, ck / p.name)
        elif not p.name.startswith("optim_"):
            os.symlink(p, ck / p.name)
    for r, target in names.items():
        os.symlink(FIXTURES / name / f"optim_world_size_4_rank_{r}.pt", ck / target)
    result = streammerge.merge(ck, tmp_path / "out")
    assert not (tmp_path / "out" / "optimizer").exists()
    assert any(w.startswith("optimizer not exported") and why in w for w in result.warnings), result.warnings


@pytest.mark.parametrize("name", ["fsdp1_llama_ws4", "fsdp1_origparams_llama_ws4", "fsdp1_hsdp_llama_2x2"])
def test_fsdp1_model_files_renamed_apart_from_the_optim_files(name, tmp_path) -> None:
    """FSDP1's flat optimizer shards carry no mesh coordinate: each optim file is paired with the model file of its
    rank. Where a model file's own coordinate is not its rank's (model files renamed, optim files not), that pairing
    would export slices in the wrong places with exit 0: the optimizer is not exported, the weights (placed by their
    own coordinates) are."""
    ck = tmp_path / name
    ck.mkdir()
    swap = {"model_world_size_4_rank_1.pt": "model_world_size_4_rank_2.pt",
            "model_world_size_4_rank_2.pt": "model_world_size_4_rank_1.pt"}
    for p in (FIXTURES / name).iterdir():
        if p.is_dir():
            shutil.copytree(p, ck / p.name)
        else:
            os.symlink(p, ck / swap.get(p.name, p.name))
    result = streammerge.merge(ck, tmp_path / "out", dtype="keep")
    assert not (tmp_path / "out" / "optimizer").exists()
    assert any(w.startswith("optimizer not exported") and "model_world_size_4_rank_1.pt" in w
               for w in result.warnings), result.warnings
    ref = load_file(FIXTURES / name / "reference" / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(got[k], ref[k].to(got[k].dtype)) for k in got)


@pytest.mark.parametrize("name", ["fsdp1_llama_ws4", "fsdp1_hsdp_llama_2x2"])
def test_fsdp1_flat_shard_of_another_dtype_on_one_rank(name, tmp_path) -> None:
    """A flat shard saved in another dtype on one rank (its element count the same) is read in its own dtype by
    torch; taking rank 0's dtype for it would read other bytes (past its record) as the values: refused."""
    def to_bf16(osd: dict) -> None:
        osd["state"][0]["exp_avg"] = osd["state"][0]["exp_avg"].to(torch.bfloat16)
    ck = _tampered(tmp_path, name, to_bf16, ranks=(1,))
    with pytest.raises(streammerge.CheckpointError, match=r"optim_world_size_4_rank_1.pt.*bfloat16"):
        streammerge.merge(ck, tmp_path / "out")
    assert not (tmp_path / "out" / "optimizer").exists()


def test_state_keys_one_inside_the_other_are_not_exported(tmp_path) -> None:
    """{"exp_avg": T, "exp_avg.x": 0.5} (torch.load reads it): the export's dotted names, nested again on load,
    cannot hold both; it exited 0 with an export load_optimizer_state_dict then failed on (and verify passed)."""
    def dotted(osd: dict) -> None:
        osd["state"][0]["exp_avg.x"] = 0.5

    ck = _tampered(tmp_path, "fsdp2_llama_shard1_ws4", dotted)
    result = streammerge.merge(ck, tmp_path / "out")
    assert result.warnings == [
        "optimizer not exported: its state holds both 'state.model.embed_tokens.weight.exp_avg' and "
        "'state.model.embed_tokens.weight.exp_avg.x', which the export's dotted names cannot tell apart when loaded "
        "back; the weights are exported"]
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "optimizer").exists()


def test_a_storage_alignment_of_zero_is_one_line_not_a_crash(tmp_path) -> None:
    """torch.load reads such a file on the CPU, but its meta-device reading (the optimizer reader's) divides by the
    alignment: the merge died of SIGFPE, with no message."""
    from ckpt_tools import rewrite_with_torch

    ck = _tampered(tmp_path, "fsdp2_llama_shard1_ws4", lambda osd: None, ranks=(1,))
    path = ck / "optim_world_size_4_rank_1.pt"
    rewrite_with_torch(path, lambda name, b: b"0" if name == ".storage_alignment" else b)
    torch.load(path, map_location="cpu", weights_only=True)
    cli = subprocess.run([sys.executable, "-m", "streammerge", str(ck), str(tmp_path / "out")], cwd=REPO,
                         capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1, cli.stderr
    assert "record .storage_alignment holds no positive number" in cli.stderr


def test_a_tensor_inside_a_container_is_not_exported(tmp_path) -> None:
    """torch.load reads a state tensor held in a tuple; comparing the ranks' copies was an internal error."""
    def wrapped(osd: dict) -> None:
        osd["state"][0]["exp_avg"] = (osd["state"][0]["exp_avg"],)

    result = streammerge.merge(_tampered(tmp_path, "fsdp2_llama_shard1_ws4", wrapped), tmp_path / "out")
    assert len(result.warnings) == 1, result.warnings
    assert "optimizer not exported" in result.warnings[0] and "state.0.exp_avg holds tensors inside a tuple" \
        in result.warnings[0]
    assert not (tmp_path / "out" / "optimizer").exists()


def test_a_setting_that_is_a_tensor_on_one_rank_only_is_refused(tmp_path) -> None:
    """lr a tensor on rank 0, a float on the others: 'Tensor.item() cannot be called on meta tensors', an internal
    error; the ranks disagree, which is one line."""
    def tensor_lr(osd: dict) -> None:
        osd["param_groups"][0]["lr"] = torch.tensor(osd["param_groups"][0]["lr"])

    ck = _tampered(tmp_path, "fsdp2_llama_shard1_ws4", tensor_lr, ranks=(0,))
    with pytest.raises(streammerge.CheckpointError, match="param group 0 has lr 0.001, but optim_world_size_4_rank_0"):
        streammerge.merge(ck, tmp_path / "out")
