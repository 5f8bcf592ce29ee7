"""Megatron-LM's legacy `torch` format (mp_rank_*/model_optim_rng.pt) -> Hugging Face models.

The fixtures (tests/data/megatron/legacy_*, see its README) are real megatron-core 0.19.2 models in TP/PP/EP layouts on
gloo CPU processes, saved as Megatron-LM's `--ckpt-format torch` saves them, from the same HF models as the torch_dist
cases: every merged tensor must equal that case's `save_pretrained` file bit for bit, transformers must load the output
with no missing key, and verify must agree through torch. The placement arithmetic is also checked against torch's
own cutting on layouts the fixtures lack.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_megatron import assert_equals_reference, assert_loads_as_reference
from test_strict import MUTATIONS, STRICTER, mutate
from test_torchfile import CHOICES

import streammerge
from streammerge.errors import CheckpointError, ConfigError, StreammergeError, UnsupportedLayoutError
from streammerge.sources import megatron_legacy, open_checkpoint
from streammerge.sources.megatron_legacy import FILE, LegacyReader, MegatronLegacySource
from streammerge.sources.torchfile import TorchFileOracle

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "data" / "megatron"
CASES = {  # legacy case -> the torch_dist case made from the same HF model (its reference/ and huggingface/)
    "legacy_llama_tp2_pp2": "llama_tp2_pp2",
    "legacy_qwen2_tp2_optim": "qwen2_tp2",  # tied, vocab 131 saved as 256, a non-distributed optimizer
    "legacy_qwen3_pp2": "qwen3_pp2",  # tied with PP2: the last stage keeps a copy of the embedding
    "legacy_mixtral_ep2_tp2": "mixtral_ep2_tp2",  # rank folders mp_rank_TT_EEE
    # tied, TP2 x PP2 with 2 virtual stages: each file holds model0 and model1, one layer each; global layer order
    # (v, p): model0 of stage 0, model0 of stage 1, model1 of stage 0, model1 of stage 1 (with the embedding's copy)
    "legacy_qwen2_tp2_vpp2_pp2": "qwen2_mlm_vpp2_pp2",
}


def _config(case: str) -> Path:
    return FIX / CASES[case] / "huggingface"


def _reference_file(case: str) -> Path:
    return FIX / CASES[case] / "reference" / "model.safetensors"


def _reference(case: str) -> dict[str, torch.Tensor]:
    return load_file(_reference_file(case))


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict[str, tuple[Path, streammerge.MergeResult]]:
    base = tmp_path_factory.mktemp("legacy")
    return {case: (base / case, streammerge.merge(FIX / case, base / case, model_name=str(_config(case))))
            for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_every_tensor_equals_the_hf_model(case: str, merged) -> None:
    out, result = merged[case]
    assert result.plan.source.format == "Megatron-LM legacy torch" and result.plan.source.step == 1
    assert_equals_reference(out, _reference_file(case))


@pytest.mark.parametrize("case", CASES)
def test_transformers_loads_it_as_the_hf_model(case: str, merged, tmp_path: Path) -> None:
    assert_loads_as_reference(merged[case][0], _reference_file(case), tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_verify_through_torch(case: str, merged) -> None:
    out, result = merged[case]
    report = streammerge.verify(out, FIX / case)
    assert report.ok, report.summary()
    assert report.tensors_checked == sum(len(p.tensors) for p in result.plans)


def test_the_layouts_users_type(tmp_path: Path) -> None:
    """The run folder (its tracker names iter_0000001) and the step folder open the same checkpoint; a rank's folder
    or file given alone is refused naming the folder to give, never merged as a model of its own."""
    run = FIX / "legacy_mixtral_ep2_tp2"
    for typed in (run, run / "iter_0000001"):
        src = open_checkpoint(typed)
        assert isinstance(src, MegatronLegacySource) and src.path == run / "iter_0000001"
    with pytest.raises(CheckpointError, match=r"one rank's file of a Megatron-LM checkpoint.*iter_0000001$"):
        open_checkpoint(run / "iter_0000001" / "mp_rank_00_000" / FILE)
    with pytest.raises(CheckpointError, match="one rank's folder of a Megatron-LM checkpoint"):
        open_checkpoint(run / "iter_0000001" / "mp_rank_00_000")


def test_a_release_folder_is_found_through_the_tracker(tmp_path: Path) -> None:
    """Megatron-LM's converters save under release/ and write `release` into the tracker."""
    case = "legacy_llama_tp2_pp2"
    run = _copy(case, tmp_path)
    (run / "iter_0000001").rename(run / "release")
    (run / "latest_checkpointed_iteration.txt").write_text("release")
    src = open_checkpoint(run)
    assert isinstance(src, MegatronLegacySource) and src.path == run / "release"
    out = tmp_path / "out"
    streammerge.merge(run, out, model_name=str(_config(case)))
    assert_equals_reference(out, _reference_file(case))


def test_the_optimizer_is_not_exported_and_the_merge_says_why(merged) -> None:
    out, result = merged["legacy_qwen2_tp2_optim"]
    assert not (out / "optimizer").exists()
    assert len(result.warnings) == 1 and "keys the state by each parameter's position" in result.warnings[0]
    assert "--ckpt-format torch_dist" in result.warnings[0]
    for case in ("legacy_llama_tp2_pp2", "legacy_qwen3_pp2", "legacy_mixtral_ep2_tp2"):
        assert not merged[case][1].warnings


def test_the_tied_embeddings_copy_is_left_out_and_counted(merged) -> None:
    _, result = merged["legacy_qwen3_pp2"]
    left = result.plan.source.stats.left_out
    assert left["output_layer.weight (the last stage's copy of the tied embedding)"] == 1
    assert "lm_head.weight" not in load_file(merged["legacy_qwen3_pp2"][0] / "model.safetensors")


def test_merge_never_imports_torch(tmp_path: Path) -> None:
    case = "legacy_mixtral_ep2_tp2"
    code = ("import sys, streammerge; r = streammerge.merge(sys.argv[1], sys.argv[2], model_name=sys.argv[3]); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(r.files))")
    r = subprocess.run([sys.executable, "-c", code, str(FIX / case), str(tmp_path / "out"), str(_config(case))],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- verify finds what the merge got wrong

def _copy(case: str, tmp_path: Path) -> Path:
    dst = tmp_path / case
    shutil.copytree(FIX / case, dst)
    return dst


def _rank_file(folder: Path, rank: str) -> Path:
    return folder / "iter_0000001" / rank / FILE


def _rewrite(path: Path, edit) -> None:
    """Load a rank file (the test's own file: weights_only=False), change it, save it as Megatron-LM does."""
    obj = torch.load(path, weights_only=False)
    edit(obj)
    torch.save(obj, path)


def _te_bytes(_) -> io.BytesIO:
    b = io.BytesIO()
    torch.save(None, b)
    return b


@pytest.mark.parametrize("form", [
    _te_bytes,  # Transformer Engine 1.x: torch.save of the FP8 state (None without FP8) into a BytesIO
    lambda _: torch.frombuffer(bytearray(pickle.dumps({"scale_fwd": [1.0]})), dtype=torch.uint8),  # TE 2.x: a tensor
], ids=["BytesIO", "uint8 tensor"])
def test_transformer_engines_extra_state_is_left_out(tmp_path: Path, form) -> None:
    """A run with Transformer Engine layers keeps each module's FP8 state under `_extra_state`: a nested torch.save in
    a BytesIO (TE 1.x) or a uint8 tensor of a pickle (TE 2.x). Neither is a weight: the merge leaves them out without
    running them, verify's torch.load reads past them, and the weights are the model's."""
    case = "legacy_llama_tp2_pp2"
    folder = _copy(case, tmp_path)

    def edit(obj):
        for key in [k for k in obj["model"] if k.endswith("_extra_state")]:
            obj["model"][key] = form(key)

    for rank in ("mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"):
        _rewrite(_rank_file(folder, rank), edit)
    out = tmp_path / "out"
    result = streammerge.merge(folder, out, model_name=str(_config(case)))
    assert result.plan.source.stats.left_out["_extra_state"] == 34
    assert_equals_reference(out, _reference_file(case))
    assert streammerge.verify(out, folder, model_name=str(_config(case))).ok


def test_verify_catches_shards_put_in_the_wrong_places(tmp_path: Path, monkeypatch) -> None:
    """The merge's placement of each TP shard against torch's concatenation of the shards: with the two TP ranks'
    shards of every split tensor exchanged, the output loads with every shape right; verify names the tensors."""
    monkeypatch.setenv("STREAMMERGE_ARCH_CHECK", "0")  # not what is tested here, and seconds per merge
    case = "legacy_llama_tp2_pp2"
    real = megatron_legacy._pieces

    def swapped(shard, pl, tp_size):
        return real(shard, megatron_legacy.Placement(pl.key, pl.file, pl.path, pl.lead, tp_size - 1 - pl.tp,
                                                     pl.split), tp_size)

    monkeypatch.setattr(megatron_legacy, "_pieces", swapped)
    out = tmp_path / "out"
    streammerge.merge(FIX / case, out, model_name=str(_config(case)))
    monkeypatch.undo()
    report = streammerge.verify(out, FIX / case, model_name=str(_config(case)))
    assert not report.ok
    failed = {n for f in report.failures for n in _reference(case) if f"{n!r}" in f}
    assert "model.layers.0.self_attn.o_proj.weight" in failed and "model.layers.3.mlp.up_proj.weight" in failed
    assert "model.norm.weight" not in failed  # not split: nothing was swapped


def test_verify_catches_a_changed_weight_in_a_rank_file(tmp_path: Path) -> None:
    case = "legacy_mixtral_ep2_tp2"
    folder = _copy(case, tmp_path)
    out = tmp_path / "out"
    streammerge.merge(folder, out, model_name=str(_config(case)))

    def edit(obj):
        obj["model"]["decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"][3, 2] += 1.0

    _rewrite(_rank_file(folder, "mp_rank_01_001"), edit)
    report = streammerge.verify(out, folder, model_name=str(_config(case)))
    # EP rank 1's first expert is expert 2; TP rank 1 holds fc2's second half of columns
    assert any("model.layers.1.block_sparse_moe.experts.2.w2.weight" in f for f in report.failures), report.summary()


@pytest.mark.parametrize("case, rank, key", [
    ("legacy_qwen3_pp2", "mp_rank_00_001", "output_layer.weight"),  # the tied embedding's copy
    ("legacy_llama_tp2_pp2", "mp_rank_01_000", "decoder.layers.1.input_layernorm.weight"),  # a TP replica
    ("legacy_mixtral_ep2_tp2", "mp_rank_00_001", "decoder.layers.0.self_attention.linear_qkv.weight"),  # EP replica
    ("legacy_qwen2_tp2_vpp2_pp2", "mp_rank_01_001", "model1.output_layer.weight"),  # the last virtual stage's copy
    ("legacy_qwen2_tp2_vpp2_pp2", "mp_rank_01_000", "model1.decoder.layers.0.input_layernorm.weight"),
])
def test_verify_compares_the_copies_the_merge_did_not_read(tmp_path: Path, case: str, rank: str, key: str) -> None:
    """Megatron keeps copies equal (the tied output layer by its all-reduce; norms on every TP rank; the dense layers on
    every expert rank); the merge reads one. A copy that differs means the ranks disagree on the trained model: verify
    says which."""
    folder = _copy(case, tmp_path)
    out = tmp_path / "out"
    streammerge.merge(folder, out, model_name=str(_config(case)))
    report = streammerge.verify(out, folder, model_name=str(_config(case)))
    assert report.ok, report.summary()

    chunk, local = key.split(".", 1) if key.startswith("model1.") else ("model", key)

    def edit(obj):
        obj[chunk][local].view(-1)[0] += 1.0

    _rewrite(_rank_file(folder, rank), edit)
    report = streammerge.verify(out, folder, model_name=str(_config(case)))
    assert [f for f in report.failures if "differs from the copy the merge took" in f and key in f], \
        report.summary()


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("edit, error, message", [
    (lambda o: setattr(o["args"], "virtual_pipeline_model_parallel_size", 2), CheckpointError,
     r"holds model where the run's args give 2 virtual pipeline stages \(model0, model1\): the files and the args "
     "are not of one run"),
    (lambda o: setattr(o["args"], "virtual_pipeline_model_parallel_size", 0), CheckpointError,
     "virtual_pipeline_model_parallel_size 0, not a positive whole number"),
    (lambda o: setattr(o["args"], "expert_tensor_parallel_size", 1), UnsupportedLayoutError,
     "expert_tensor_parallel_size 1 differs"),
    (lambda o: setattr(o["args"], "num_layers", 3), CheckpointError, "hold 2 layers"),
    (lambda o: o.pop("args"), CheckpointError, "no run args"),
    (lambda o: o.__setitem__("model", list(o["model"].values())), CheckpointError,
     "`model` is list, not a dict: not a Megatron-LM rank file"),
    (lambda o: o.__setitem__("model0", o.pop("model")), CheckpointError,
     r"holds model0 where the run's args give no virtual pipeline stages \(model\)"),
    (lambda o: o["model"].__setitem__("decoder.layers.0.mlp.linear_fc2.bias", torch.zeros(32)),
     UnsupportedLayoutError, "does not know how tensor parallelism splits it"),
    (lambda o: o.__setitem__("model", {k.replace("decoder.", "language_model.encoder."): v
                                       for k, v in o["model"].items()}),
     UnsupportedLayoutError, r"older than megatron-core's GPTModel .*tools/checkpoint/convert.py --saver mcore"),
    (lambda o: o["model"].__setitem__("decoder.layers.0.mlp.linear_fc2.weight", torch.zeros(32, 4)),
     CheckpointError, "the rank files hold 2 shards .2 different., the run's layout 4"),  # dense: on EP rank 0 only
    (lambda o: setattr(o["args"], "num_attention_heads", 8), ConfigError, "recorded num_attention_heads 8"),
    (lambda o: setattr(o["args"], "rotary_base", 500000), ConfigError, "recorded rotary_base 500000"),
])
def test_refusals(tmp_path: Path, edit, error, message) -> None:
    case = "legacy_mixtral_ep2_tp2"
    folder = _copy(case, tmp_path)
    for rank in ("mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"):
        _rewrite(_rank_file(folder, rank), edit)
    with pytest.raises(error, match=message):
        streammerge.merge(folder, tmp_path / "out", model_name=str(_config(case)))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_refuses_shards_that_differ_in_shape(tmp_path: Path) -> None:
    case = "legacy_llama_tp2_pp2"
    folder = _copy(case, tmp_path)
    key = "decoder.layers.1.self_attention.linear_proj.weight"
    _rewrite(_rank_file(folder, "mp_rank_01_000"), lambda o: o["model"].__setitem__(key, torch.zeros(32, 8)))
    with pytest.raises(CheckpointError, match=r"mp_rank_01_000/model_optim_rng.pt: 'decoder.layers.self_attention."
                                              r"linear_proj.weight' is float32 \[32, 8\], where .* holds float32 "
                                              r"\[32, 16\]"):
        streammerge.merge(folder, tmp_path / "out", model_name=str(_config(case)))


def test_refuses_missing_and_extra_rank_folders(tmp_path: Path) -> None:
    case = "legacy_llama_tp2_pp2"
    folder = _copy(case, tmp_path)
    step = folder / "iter_0000001"
    shutil.move(step / "mp_rank_01_001", tmp_path / "aside")
    with pytest.raises(CheckpointError, match=r"mp_rank_01_001/model_optim_rng.pt is missing \(the run's args give "
                                              r"TP 2, PP 2, EP 1: 4 rank files\)"):
        streammerge.merge(folder, tmp_path / "out", model_name=str(_config(case)))
    shutil.move(tmp_path / "aside", step / "mp_rank_01_001")
    shutil.copytree(step / "mp_rank_01_001", step / "mp_rank_02_001")
    with pytest.raises(CheckpointError, match="mp_rank_02_001/ is not a rank of this run"):
        streammerge.merge(folder, tmp_path / "out", model_name=str(_config(case)))


def test_refuses_without_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give it with --model-name"):
        streammerge.merge(FIX / "legacy_qwen3_pp2", tmp_path / "out")


def test_a_config_that_does_not_describe_it_is_refused(tmp_path: Path) -> None:
    """The mixtral config given for the llama checkpoint: the table names what disagrees."""
    with pytest.raises((ConfigError, UnsupportedLayoutError)):
        streammerge.merge(FIX / "legacy_llama_tp2_pp2", tmp_path / "out",
                          model_name=str(_config("legacy_mixtral_ep2_tp2")))


# ---------------------------------------------------------------- the placement, on any layout

def _assembled(t) -> bytes:
    """A global tensor's bytes from its pieces, each read from its file at its offset with its strides (numpy's, not the
    writer's); every element must lie in a piece."""
    size = t.dtype.itemsize
    data = np.zeros((*t.shape, size), np.uint8)
    covered = np.zeros(t.shape, bool)
    for p in t.pieces:
        raw = np.fromfile(p.file, np.uint8)
        view = np.lib.stride_tricks.as_strided(raw[p.offset:], (*p.shape, size), (*(s * size for s in p.stride), 1),
                                               writeable=False)
        box = tuple(slice(s, s + n) for s, n in zip(p.start, p.shape))
        data[box] = view
        covered[box] = True
    assert covered.all(), f"{t.name}: elements no piece holds"
    return data.tobytes()


def _cut(g: torch.Tensor, split, tp: int, t: int) -> torch.Tensor:
    """Rank t's shard of a global tensor, cut with torch as Megatron's parallel layers hold it."""
    if split is None:
        return g.clone()
    d, gated = split
    if gated:
        gate, up = g.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[t], up.chunk(tp, dim=0)[t]], dim=0).clone()
    return g.chunk(tp, dim=d)[t].clone()


@settings(max_examples=30, deadline=None)
@given(tp=st.integers(1, 3), pp=st.integers(1, 3), vpp=st.integers(1, 2), ep=st.integers(1, 2),
       per_rank=st.integers(1, 2), rows=st.integers(1, 3), hidden=st.integers(1, 3), data=st.data())
def test_placements_equal_torch_cat(tmp_path_factory, tp, pp, vpp, ep, per_rank, rows, hidden, data) -> None:
    """Rank files written for any TP x PP x VPP x EP (uneven stages included, a stage without layers too; PP and EP
    together give mp_rank_TT_PPP_EEE; with VPP each file holds model0, model1, and chunk v of every pipeline rank
    comes before chunk v + 1): the source's global tensors, assembled from its pieces, and the oracle's boxes equal
    the global tensors the shards were cut from."""
    folder = tmp_path_factory.mktemp("layout")
    stages = data.draw(st.lists(st.integers(0, 2), min_size=pp * vpp, max_size=pp * vpp).filter(sum))
    layers, experts = sum(stages), ep * per_rank
    n = rows * tp  # every split dim: a multiple of TP
    g = {  # global tensors in torch_dist's layout
        "embedding.word_embeddings.weight": (torch.randn(n, hidden), (0, False)),
        "decoder.final_layernorm.weight": (torch.randn(hidden), None),
        "decoder.layers.self_attention.linear_qkv.weight": (torch.randn(layers, n, hidden), (0, False)),
        "decoder.layers.self_attention.linear_proj.weight": (torch.randn(layers, hidden, n), (1, False)),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (torch.randn(layers, hidden), None),
        "decoder.layers.mlp.router.weight": (torch.randn(layers, experts, hidden), None),
        "decoder.layers.mlp.experts.experts.linear_fc1.weight": (torch.randn(layers, experts, 2 * n, hidden),
                                                                 (0, True)),
        "decoder.layers.mlp.experts.experts.linear_fc2.weight": (torch.randn(layers, experts, hidden, n), (1, False)),
    }
    local = {"decoder.layers.self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight"}
    args = argparse.Namespace(num_layers=layers, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
                              expert_model_parallel_size=ep, num_experts=experts,
                              untie_embeddings_and_output_weights=True)
    first = [sum(stages[:s]) for s in range(pp * vpp)]  # virtual stage s = v * pp + p
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                saved: dict = {"args": args, "iteration": 1}
                for v in range(vpp):
                    s = v * pp + p
                    model = saved["model" if vpp == 1 else f"model{v}"] = {}
                    for key, (m, split) in g.items():
                        if not key.startswith("decoder.layers."):
                            if s == (0 if key.startswith("embedding") else pp * vpp - 1):
                                model[key] = _cut(m, split, tp, t)
                            continue
                        rest = key.removeprefix("decoder.layers.")
                        for j in range(stages[s]):
                            layer = m[first[s] + j]
                            if rest.startswith("mlp.experts.experts."):
                                for k in range(per_rank):
                                    name = f"decoder.layers.{j}.mlp.experts.local_experts.{k}." + \
                                           rest.removeprefix("mlp.experts.experts.")
                                    model[name] = _cut(layer[e * per_rank + k], split, tp, t)
                            else:
                                model[f"decoder.layers.{j}.{local.get(key, rest)}"] = _cut(layer, split, tp, t)
                path = folder / "iter_0000001" / megatron_legacy.rank_dir(t, p, e, pp, ep) / FILE
                path.parent.mkdir(parents=True)
                torch.save(saved, path)
    src = open_checkpoint(folder / "iter_0000001")
    _, sizes, placements, tensors = src.read()
    assert set(tensors) == set(g)
    reader = LegacyReader(placements, sizes, src.inert)
    for key, (m, _) in g.items():
        assert tensors[key].shape == tuple(m.shape), key
        assert _assembled(tensors[key]) == _bits(m), key
        lead = 2 if "experts" in key or "router" in key else 1 if key.startswith("decoder.layers.") else 0
        box = tuple((i, i + 1) for i in (data.draw(st.integers(0, s - 1)) for s in m.shape[:lead]))
        rest = []
        for s in m.shape[lead:]:
            lo = data.draw(st.integers(0, s - 1))
            rest.append((lo, data.draw(st.integers(lo + 1, s))))
        want = m[tuple(slice(lo, hi) for lo, hi in (*box, *rest))]
        assert torch.equal(reader.read(key, (*box, *rest)), want), key
    reader.close()


# ---------------------------------------------------------------- against torch, on mutated files

# refusals of this reader's own where torch.load reads every file: the layout (which the args and the shards say,
# and torch does not check), and the torch.save file reader's stated ones (test_torchfile's CHOICES)
LAYOUT = ("no run args", "is missing", "is not a rank of this run", "the rank files hold", "does not know how tensor "
          "parallelism splits it", "virtual pipeline stages", "not a positive whole number", "stage ", "is float",
          "no `model` dict", "not a Megatron-LM rank file", "has no stored data", "an object of",
          "differs from tensor_model_parallel_size", "whose key is no name",
          "which tensor parallelism does not split so", "older than megatron-core")


def _our_globals(step: Path) -> tuple[dict[str, tuple], MegatronLegacySource]:
    """Each global tensor as the source places it: its bytes read where its pieces say, with their strides."""
    src = MegatronLegacySource(step)
    return {key: (t.shape, t.dtype.name, _assembled(t)) for key, t in src.read()[3].items()}, src


def _torch_globals(src: MegatronLegacySource) -> dict[str, tuple]:
    """The same tensors as torch.load gives the shards, concatenated by torch (LegacyReader)."""
    _, sizes, placements, _ = src.read()
    reader = LegacyReader(placements, sizes, src.inert)
    try:
        out = {}
        for key in {pl.key for pl in placements}:
            entry = reader.entry(key)
            m = reader.read(key, tuple((0, n) for n in entry.size))
            out[key] = (tuple(m.shape), str(m.dtype).removeprefix("torch."), _bits(m))
        return out
    finally:
        reader.close()


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=MUTATIONS, where=st.sampled_from([("legacy_llama_tp2_pp2", "mp_rank_00_000"),
                                                  ("legacy_llama_tp2_pp2", "mp_rank_01_001"),
                                                  ("legacy_qwen2_tp2_vpp2_pp2", "mp_rank_01_001")]))
def test_differential_fuzz(tmp_path_factory: pytest.TempPathFactory, mutation: tuple, where: tuple[str, str]) -> None:
    """A real rank file, mutated: the source's global tensors are exactly what torch.load of the shards gives when
    torch concatenates them, or the source refuses in one line where torch refuses too (or for a stated reason)."""
    case, rank = where
    folder = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(FIX / case, folder)
    step = folder / "iter_0000001"
    mutate(step / rank / FILE, mutation)
    try:
        ours, src = _our_globals(step)
    except StreammergeError as e:
        assert "\n" not in str(e)
        clean = MegatronLegacySource(FIX / case / "iter_0000001")
        clean.read()
        torch_reads = TorchFileOracle({"file": (step / rank / FILE, ())}, clean.inert)  # weights_only, stand-ins
        try:
            torch_reads.load_all()
        except CheckpointError:  # torch refuses it too
            return
        finally:
            torch_reads.close()
        assert any(s in str(e) for s in (*STRICTER, *CHOICES, *LAYOUT)), f"refused what torch reads: {e}"
        return
    try:
        want = _torch_globals(src)
    except CheckpointError as e:
        # torch refuses what the source read: a call of what a call returned (a mutated pickle can make one of a
        # global the source read as an inert record), outside the model's tensors
        assert "reduce for unrecognized function" in str(e) or "Unsupported" in str(e), e
        return
    assert ours == want
