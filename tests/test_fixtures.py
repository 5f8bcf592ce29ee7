"""Real GPU-made veRL fixtures (tests/data/verl; extras in ../shared): merged tensors equal the oracle bit for bit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixture_paths import REPO, SHARED_CASES, VERL_CASES
from fixture_paths import VERL_DATA as FIXTURES
from safetensors.torch import load_file, save_file

import streammerge

NAMES = VERL_CASES


def _merged(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.fixture(scope="module", params=NAMES)
def merged_keep(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "out"
    result = streammerge.merge(FIXTURES / request.param, out, dtype="keep", optimizer=False, max_shard_size="20KB")
    return request.param, out, result


def test_every_tensor_equals_reference_bit_for_bit(merged_keep) -> None:
    name, out, result = merged_keep
    ref = load_file(FIXTURES / name / "reference" / "model.safetensors")
    got = _merged(out)
    dropped = result.plans[0].dropped
    assert set(got) | set(dropped) == set(ref)
    for key, tensor in got.items():
        assert tensor.dtype == ref[key].dtype and torch.equal(tensor, ref[key]), key
    for tied, kept in dropped.items():  # a tied key is dropped only when the oracle holds the same values
        assert torch.equal(ref[tied], ref[kept])
    assert ("qwen2_tied" in name) == bool(dropped)


def test_files_are_byte_identical_to_save_file(merged_keep, tmp_path: Path) -> None:
    name, out, _ = merged_keep
    ref = load_file(FIXTURES / name / "reference" / "model.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    written = [t for k, t in ref.items() if k in index["weight_map"]]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written)
    by_file: dict[str, list[str]] = {}
    for key, fname in index["weight_map"].items():
        by_file.setdefault(fname, []).append(key)
    assert len(by_file) > 1
    for fname, keys in by_file.items():
        save_file({k: ref[k] for k in keys}, tmp_path / "ref.safetensors", metadata={"format": "pt"})
        assert (out / fname).read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), fname


def test_model_folder_is_carried(merged_keep) -> None:
    name, out, _ = merged_keep
    src = FIXTURES / name / "huggingface"
    for f in src.iterdir():
        assert (out / f.name).is_file(), f.name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"
    assert not list(out.glob(".*streammerge-tmp"))


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_merge_equals_torch_cast(name: str, tmp_path: Path) -> None:
    streammerge.merge(FIXTURES / name, tmp_path / "out", dtype="bfloat16", optimizer=False)
    ref = load_file(FIXTURES / name / "reference" / "model.safetensors")
    got = _merged(tmp_path / "out")
    for key, tensor in got.items():
        assert torch.equal(tensor, ref[key].to(torch.bfloat16)), key
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("name", ["fsdp2_qwen2_tied_ws4", "fsdp2_llama_shard1_ws4", "fsdp1_origparams_llama_ws4"])
def test_from_pretrained_gives_reference_logits(name: str, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "out"
    streammerge.merge(FIXTURES / name, out, dtype="keep", optimizer=False)
    merged = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).eval()
    config = AutoConfig.from_pretrained(FIXTURES / name / "huggingface", trust_remote_code=False)
    oracle = AutoModelForCausalLM.from_config(config, trust_remote_code=False).eval()
    reference = load_file(FIXTURES / name / "reference" / "model.safetensors")
    missing, unexpected = oracle.load_state_dict(reference, strict=False)
    assert not unexpected and not missing
    ids = torch.randint(0, merged.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, oracle(ids).logits)


def test_a_tied_run_under_an_untied_config_keeps_its_lm_head(tmp_path: Path) -> None:
    """The rank files share lm_head's storage with the embedding, but the config given does not tie them:
    transformers then expects lm_head.weight in the file, so it must be written (equal to the trained one)."""
    import shutil

    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "fsdp2_qwen2_tied_ws4", ckpt)
    config = json.loads((ckpt / "huggingface" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    (ckpt / "huggingface" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    out = tmp_path / "out"
    result = streammerge.merge(ckpt, out, dtype="keep", optimizer=False)
    assert not result.plans[0].dropped
    ref = load_file(ckpt / "reference" / "model.safetensors")
    got = _merged(out)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and torch.equal(model.lm_head.weight, ref["lm_head.weight"])
    assert streammerge.verify(out, ckpt).ok


def test_hidden_files_and_bytecode_of_the_model_folder_are_not_carried(tmp_path: Path) -> None:
    """huggingface/.env (an API key), .git/, .cache/ and __pycache__ are not the model: never copied, never pushed."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "fsdp2_llama_shard1_ws4", ckpt)
    hf = ckpt / "huggingface"
    extra = {".env": "WANDB_API_KEY=secret", ".git/config": "[core]", ".cache/huggingface/x.lock": "",
             "__pycache__/m.cpython-311.pyc": "", "notes/readme.txt": "kept"}
    for rel, text in extra.items():
        (hf / rel).parent.mkdir(parents=True, exist_ok=True)
        (hf / rel).write_text(text)
    out = tmp_path / "out"
    streammerge.merge(ckpt, out, optimizer=False)
    carried = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert "notes/readme.txt" in carried and "config.json" in carried
    assert not {rel for rel in extra if rel in carried} - {"notes/readme.txt"}


def test_cli_inspect_and_merge(tmp_path: Path) -> None:
    name = "fsdp2_hsdp_llama_2x2"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # --no-optimizer: naming the optimizer state would import torch and transformers, for nothing checked here
    show = subprocess.run([sys.executable, "-m", "streammerge", "inspect", str(FIXTURES / name), "--no-optimizer"],
                          capture_output=True, text=True, env=env, check=True)
    assert "(Replicate(), Shard(0))" in show.stdout and "model.safetensors" in show.stdout
    assert not (tmp_path / "out").exists()
    run = subprocess.run([sys.executable, "-m", "streammerge", str(FIXTURES / name), str(tmp_path / "out"),
                          "--dtype", "bfloat16", "--max-shard-size", "10KB", "--no-optimizer"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    summary = r"wrote \d+ data files \(\d+\.\d\d kB\) .* \(\d+\.\d\d [kMG]B/s\), peak RSS"
    assert re.search(summary, run.stdout), run.stdout
    assert " 0 MB/s" not in run.stdout and " 0 B/s" not in run.stdout
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_plan_reads_no_tensor_data() -> None:
    """Planning reads metadata only: the pieces carry byte offsets, not bytes."""
    p = streammerge.plan(FIXTURES / NAMES[0], dtype="keep").weights
    assert p.total_bytes > 0
    for t in p.tensors.values():
        assert all(isinstance(piece.offset, int) for piece in t.pieces)
    assert "checkpoint" in p.describe()


def test_every_case_is_in_the_project() -> None:
    """A fresh clone has every GPU-made case, small: no test depends on files outside the project."""
    assert set(NAMES) >= {"fsdp2_qwen2_tied_ws4", "fsdp2_llama_shard1_ws4", "fsdp1_llama_ws4", "fsdp2_hsdp_llama_2x2",
                          "fsdp1_origparams_llama_ws4", "fsdp1_hsdp_llama_2x2"}
    size = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert size < 5 * 10**6, f"tests/data/verl holds {size} bytes"


@pytest.mark.slow
@pytest.mark.parametrize("name", SHARED_CASES or ["(none)"])
def test_shared_extra_fixtures_equal_reference(name: str, shared_verl_fixtures: Path, tmp_path: Path) -> None:
    """The larger NCCL-made checkpoints outside the project, when present: weights and optimizer, every bit."""
    from test_optimizer import assert_same_optimizer

    ckpt = shared_verl_fixtures / name
    out = tmp_path / "out"
    result = streammerge.merge(ckpt, out, dtype="keep", max_shard_size="300KB")
    assert result.warnings == []
    ref = load_file(ckpt / "reference" / "model.safetensors")
    got = _merged(out)
    assert set(got) | set(result.plans[0].dropped) == set(ref)
    for key, tensor in got.items():
        assert tensor.dtype == ref[key].dtype and torch.equal(tensor, ref[key]), key
    assert_same_optimizer(streammerge.load_optimizer_state_dict(out),
                          torch.load(ckpt / "reference" / "optimizer.pt", weights_only=True))
    assert streammerge.verify(out, ckpt).ok
