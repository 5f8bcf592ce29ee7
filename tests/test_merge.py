"""Merges of real FSDP2 checkpoints made here (gloo, CPU processes), against their gathered oracle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.tensor  # noqa: F401  (lets torch.load(weights_only=True) rebuild DTensors)
from safetensors.torch import load_file

import streammerge
from streammerge.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "ws2": dict(),
    "ws4-shard1": dict(world_size=4, shard_placement="first_divisible"),
    "hsdp-2x2": dict(world_size=4, mesh=(2, 2)),
    "qwen2-tied-ws4": dict(arch="qwen2", world_size=4, tie_word_embeddings=True),
    "empty-pieces": dict(world_size=4, vocab_size=9),
    "buffers": dict(world_size=2, extra_buffers=True),
    "ws1-dtensor": dict(world_size=1),
    "ws1-plain": dict(world_size=1, plain_tensors=True),
    "ws3-uneven": dict(world_size=3, hidden_size=40),
}


def _merged(out: Path) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(f))
    return got


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_gathered_state(case: str, make_ckpt, tmp_path: Path, monkeypatch) -> None:
    actor = make_ckpt(**CASES[case])
    if CASES[case].get("extra_buffers"):  # buffers the transformers class lacks: the architecture check refuses them
        monkeypatch.setenv("STREAMMERGE_ARCH_CHECK", "0")
    result = streammerge.merge(actor, tmp_path / "out", dtype="keep", optimizer=False, max_shard_size="40KB")
    ref = load_file(actor / "reference" / "model.safetensors")
    got = _merged(tmp_path / "out")
    dropped = result.plans[0].dropped
    assert set(got) | set(dropped) == (set(ref) - {"model.loss_scale", "model.layers.0.token_counts"}
                                       | (set(got) & set(ref)))
    for key, tensor in got.items():
        assert tensor.dtype == ref[key].dtype and torch.equal(tensor, ref[key]), key
    assert bool(dropped) == CASES[case].get("tie_word_embeddings", False)


def test_buffers_are_one_copy_not_concatenated(make_ckpt, tmp_path: Path, monkeypatch) -> None:
    actor = make_ckpt(world_size=2, extra_buffers=True)
    # transformers' LlamaForCausalLM has no place for these buffers: loading would drop them, so the merge refuses
    with pytest.raises(streammerge.ConfigError, match=r"2 not in the model \(model\.loss_scale, "
                                                      r"model\.layers\.0\.token_counts\)"):
        streammerge.merge(actor, tmp_path / "refused", dtype="bfloat16", optimizer=False)
    monkeypatch.setenv("STREAMMERGE_ARCH_CHECK", "0")  # what the writer does with them, once asked to write them
    streammerge.merge(actor, tmp_path / "out", dtype="bfloat16", optimizer=False)
    got = _merged(tmp_path / "out")
    rank0 = torch.load(actor / "model_world_size_2_rank_0.pt", weights_only=True, map_location="cpu")
    for name in ("model.loss_scale", "model.layers.0.token_counts"):
        src = rank0[name]
        assert not hasattr(src, "placements")
        assert got[name].shape == src.shape
        want = src.to(torch.bfloat16) if src.is_floating_point() else src
        assert torch.equal(got[name], want), name
    assert got["model.loss_scale"].dim() == 0 and got["model.layers.0.token_counts"].dtype == torch.int64


def test_run_folder_and_step_folder_resolve_to_the_actor(make_ckpt) -> None:
    actor = make_ckpt()
    run_dir = actor.parent.parent
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text() == "2"
    for path in (actor, actor.parent, run_dir):
        ck = streammerge.open_checkpoint(path)
        assert ck.path == actor.resolve() and ck.world_size == 2 and ck.step == 2 and ck.has_optimizer()


def test_a_step_folder_with_only_a_critic_names_it(make_ckpt, tmp_path: Path) -> None:
    step = tmp_path / "run" / "global_step_2"
    shutil.copytree(make_ckpt(), step / "critic")
    with pytest.raises(CheckpointError, match=r"no actor/ here, only critic/ .*give .*global_step_2/critic"):
        streammerge.open_checkpoint(step)
    assert streammerge.open_checkpoint(step / "critic").path == (step / "critic").resolve()


def test_auto_dtype_follows_config_and_rewrites_it(make_ckpt, tmp_path: Path) -> None:
    actor = make_ckpt()
    assert json.loads((actor / "huggingface" / "config.json").read_text())["dtype"] == "bfloat16"
    streammerge.merge(actor, tmp_path / "out", optimizer=False)
    got = _merged(tmp_path / "out")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tok("hello world")["input_ids"]) > 0


def test_keep_names_the_saved_dtype_in_the_config(make_ckpt, tmp_path: Path) -> None:
    """float32 rank files under a config that says bfloat16 (the usual veRL run): with --dtype keep the config must
    say float32, or transformers (dtype "auto") loads the weights rounded to bfloat16, not as trained."""
    from transformers import AutoModelForCausalLM

    actor = make_ckpt()
    assert json.loads((actor / "huggingface" / "config.json").read_text())["dtype"] == "bfloat16"
    streammerge.merge(actor, tmp_path / "out", dtype="keep", optimizer=False)
    got = _merged(tmp_path / "out")
    assert {t.dtype for t in got.values() if t.is_floating_point()} == {torch.float32}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(loaded[k], t) for k, t in got.items() if k in loaded)


@pytest.mark.slow
def test_demo_command_runs_the_whole_path(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "streammerge", "demo", str(tmp_path / "demo")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "weights equal the gathered training state" in run.stdout and ": True" in run.stdout
    assert (tmp_path / "demo" / "model" / "model.safetensors.index.json").is_file()
    again = subprocess.run([sys.executable, "-m", "streammerge", "demo", str(tmp_path / "demo")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and not again.stdout and "not empty (it holds 'checkpoint', ...)" in again.stderr


def test_the_demo_writes_only_into_a_folder_of_its_own(tmp_path: Path, capsys) -> None:
    """`demo DIR` wrote its checkpoint/ and model/ into any folder: a merge output (which then failed verify), the
    current folder for DIR ''. A folder holding anything, or a file, is refused in one line, untouched."""
    from streammerge.cli import main

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (tmp_path / "a_file").write_text("x")
    for target, words in ((merged, "not empty (it holds 'config.json')"), (tmp_path / "a_file", "not a folder")):
        assert main(["demo", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert sorted(p.name for p in merged.iterdir()) == ["config.json"]


def _imported(stderr: str) -> set[str]:
    """Module names from `python -X importtime` output."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_merge_never_imports_torch(make_ckpt, tmp_path: Path) -> None:
    """The CLI and the library merge a real FSDP2 checkpoint (Shard(0) and Shard(1) pieces) without
    importing torch, and the bfloat16 files are byte for byte what torch's `.to()` and save_file give."""
    from safetensors.torch import save_file

    actor = make_ckpt(world_size=4, shard_placement="first_divisible")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "streammerge", str(actor), str(out),
                          "--dtype", "bfloat16", "--no-optimizer", "--no-progress", "--max-shard-size", "100KB"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    modules = _imported(run.stderr)
    assert "streammerge.write" in modules and "numpy" in modules and "safetensors" in modules  # the parse works
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "transformers", "huggingface_hub"))
    assert not heavy, heavy

    ref = load_file(actor / "reference" / "model.safetensors")
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 1
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == set(ref) and all(ref[k].dtype == torch.float32 for k in ref)
    for f in files:
        keys = [k for k, v in weight_map.items() if v == f.name]
        save_file({k: ref[k].to(torch.bfloat16) for k in keys}, tmp_path / "want.safetensors",
                  metadata={"format": "pt"})
        assert f.read_bytes() == (tmp_path / "want.safetensors").read_bytes(), f.name

    code = ("import sys, streammerge; r = streammerge.merge(sys.argv[1], sys.argv[2], dtype='bfloat16', "
            "optimizer=False, max_shard_size='100KB'); print(len(r.files)); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    lib = subprocess.run([sys.executable, "-c", code, str(actor), str(tmp_path / "lib")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert lib.returncode == 0, lib.stderr[-3000:]
    assert lib.stdout.split("\n")[1] == "[]", lib.stdout
    for f in files:
        assert (tmp_path / "lib" / f.name).read_bytes() == f.read_bytes()


def test_a_tied_output_embedding_saved_first_is_the_one_dropped(verl_fixtures, tmp_path: Path) -> None:
    """lm_head.weight and embed_tokens.weight as one storage, lm_head first in the state dict, under a config that
    ties them: the alias pass dropped embed_tokens (an alias of lm_head), the tie pass dropped lm_head (tied to
    embed_tokens), and dropping both was undone, so both were written; save_pretrained writes embed_tokens only."""
    src = verl_fixtures / "fsdp2_qwen2_tied_ws4"
    ref = load_file(src / "reference" / "model.safetensors")
    actor = tmp_path / "actor"
    actor.mkdir()
    shutil.copytree(src / "huggingface", actor / "huggingface")
    emb = ref["model.embed_tokens.weight"].clone()
    sd = {"lm_head.weight": emb, **{k: v for k, v in ref.items() if k != "lm_head.weight"}}
    sd["model.embed_tokens.weight"] = emb
    torch.save(sd, actor / "model_world_size_1_rank_0.pt")
    out = tmp_path / "out"
    result = streammerge.merge(actor, out, optimizer=False)
    assert result.plan.weights.dropped == {"lm_head.weight": "model.embed_tokens.weight"}
    merged = _merged(out)
    assert set(merged) == set(ref) - {"lm_head.weight"}
    assert torch.equal(merged["model.embed_tokens.weight"], emb)
