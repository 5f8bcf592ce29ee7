"""accelerate / HF Trainer checkpoints of FSDP2 with `SHARDED_STATE_DICT`, as real runs write them.

`tests/data/accelerate/<case>/run/checkpoint-3/` is what `Trainer._save_checkpoint` wrote (made on a GPU by
`tests/data/make_accelerate.py` with accelerate and transformers themselves, 2 ranks): `pytorch_model_fsdp_0/` (a DCP
of `{"model": state dict}`), `optimizer_0/` (a DCP of `{"optimizer": ...}`), scheduler, RNG and trainer state, and no
config.json: the user names the model folder the run started from (`huggingface/`) with `--model-name`.
The oracle in `reference/` was gathered by torch inside the training processes when the checkpoint was saved.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  (imported: the merge asks transformers in this process, not in a child)
from fixture_paths import ACCELERATE_CASES, ACCELERATE_DATA
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_optimizer import assert_same_optimizer
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import streammerge
from streammerge.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
CHECKPOINT = Path("run") / "checkpoint-3"
# what a user types: the checkpoint-N folder Trainer wrote, or the DCP folder inside it
ENTRIES = {"checkpoint": CHECKPOINT, "dcp": CHECKPOINT / "pytorch_model_fsdp_0"}


def _info(case: str) -> dict:
    return json.loads((ACCELERATE_DATA / case / "reference" / "INFO.json").read_text())


@pytest.fixture(scope="module", params=[(c, e) for c in ACCELERATE_CASES for e in ENTRIES],
                ids=[f"{c}-{e}" for c in ACCELERATE_CASES for e in ENTRIES])
def merged(request, tmp_path_factory) -> tuple[str, Path, Path, str]:
    """`streammerge CKPT OUT --model-name huggingface/` of each case, from either folder: (case, ckpt, out, stderr)."""
    case, entry = request.param
    ckpt = ACCELERATE_DATA / case / ENTRIES[entry]
    out = tmp_path_factory.mktemp(f"{case}-{entry}") / "out"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        rc = main([str(ckpt), str(out), "--model-name", str(ACCELERATE_DATA / case / "huggingface")])
    assert rc == 0, stderr.getvalue()
    return case, ckpt, out, stderr.getvalue()


def test_the_fixture_is_what_accelerate_writes() -> None:
    """The layout the tests rely on, from accelerate's own save (not a hand-made one): two DCP folders, one per
    saved dict, and no config.json (Trainer writes none with SHARDED_STATE_DICT)."""
    assert ACCELERATE_CASES
    size = sum(p.stat().st_size for p in ACCELERATE_DATA.rglob("*") if p.is_file())
    assert size < 2 * 10**6, f"tests/data/accelerate holds {size} bytes"
    for case in ACCELERATE_CASES:
        ckpt = ACCELERATE_DATA / case / CHECKPOINT
        info = _info(case)
        plugin = info["fsdp_plugin"]
        assert plugin["fsdp_version"] == 2 and plugin["state_dict_type"] == "StateDictType.SHARDED_STATE_DICT"
        assert info["distributed_type"] == "DistributedType.FSDP" and info["world_size"] == 2
        assert all((ckpt / d / ".metadata").is_file() for d in ("pytorch_model_fsdp_0", "optimizer_0"))
        assert not (ckpt / "config.json").exists()
        assert sorted(p.name for p in (ckpt / "pytorch_model_fsdp_0").iterdir()) == [".metadata", "__0_0.distcp",
                                                                                       "__1_0.distcp"]


@pytest.mark.parametrize("case", ACCELERATE_CASES)
def test_the_oracle_is_the_checkpoint_as_torch_reads_it(case: str, tmp_path: Path) -> None:
    """torch's own DCP reader (dcp_to_torch_save) finds `{"model": ...}` and `{"optimizer": ...}` in the two folders,
    equal to the state torch gathered when Trainer saved them: what the oracle says is in the checkpoint is there."""
    ckpt = ACCELERATE_DATA / case / CHECKPOINT
    dcp_to_torch_save(ckpt / "pytorch_model_fsdp_0", tmp_path / "model.pt")
    dcp_to_torch_save(ckpt / "optimizer_0", tmp_path / "optimizer.pt")
    model = torch.load(tmp_path / "model.pt", weights_only=True)
    optim = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert set(model) == {"model"} and set(optim) == {"optimizer"}
    ref = load_file(ACCELERATE_DATA / case / "reference" / "model.safetensors")
    assert set(model["model"]) == set(ref) and all(torch.equal(model["model"][k], v) for k, v in ref.items())
    assert_same_optimizer(optim["optimizer"], torch.load(ACCELERATE_DATA / case / "reference" / "optimizer.pt",
                                                         weights_only=True))


def test_weights_equal_torchs_gathered_state_bit_for_bit(merged) -> None:
    case, _, out, _ = merged
    ref = load_file(ACCELERATE_DATA / case / "reference" / "model.safetensors")
    got = load_file(out / "model.safetensors")
    tied = json.loads((ACCELERATE_DATA / case / "huggingface" / "config.json").read_text())["tie_word_embeddings"]
    assert set(ref) - set(got) == ({"lm_head.weight"} if tied else set()) and set(got) <= set(ref)
    if tied:  # left out as save_pretrained leaves it out: it is the embedding
        assert torch.equal(ref["lm_head.weight"], ref["model.embed_tokens.weight"])
    differ = [k for k in got if got[k].dtype != ref[k].dtype or not torch.equal(got[k], ref[k])]
    assert not differ, f"{len(differ)} tensors differ from torch's gathered state, e.g. {differ[0]}"


def test_transformers_loads_the_trained_model(merged) -> None:
    """The folder loads with nothing missing and computes the trained model's logits (the oracle's: a float32 model
    built from the run's config and loaded with torch's gathered state)."""
    from transformers import AutoModelForCausalLM

    case, _, out, _ = merged
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    ref = load_file(ACCELERATE_DATA / case / "reference" / "logits.safetensors")
    with torch.no_grad():
        logits = model.eval()(input_ids=ref["input_ids"]).logits
    # the oracle's logits come from torch 2.11 on the GPU machine's CPU: other kernels, not bit-equal (5e-8 apart)
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-6)


def test_config_and_tokenizer_come_from_model_name(merged) -> None:
    """Trainer's checkpoint-N holds no config.json nor tokenizer: OUT has --model-name's, the config naming the
    dtype written (float32, as saved)."""
    case, _, out, _ = merged
    base = ACCELERATE_DATA / case / "huggingface"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    written, given = (json.loads((d / "config.json").read_text()) for d in (out, base))
    assert written == given and written["dtype"] == "float32"


def test_verify_passes(merged) -> None:
    _, ckpt, out, _ = merged
    assert main(["verify", str(out), str(ckpt)]) == 0


def test_the_optimizer_export_equals_torchs_gathered_state(merged) -> None:
    """accelerate saves the optimizer as a DCP of its own, beside the model's (`optimizer_0/`): it is exported
    (the merge used to finish without it and without a word), equal to what torch gathered in training, and
    the merge has nothing to warn of."""
    case, _, out, stderr = merged
    want = torch.load(ACCELERATE_DATA / case / "reference" / "optimizer.pt", weights_only=True)
    assert_same_optimizer(streammerge.load_optimizer_state_dict(out), want)
    assert "warning" not in stderr.lower(), stderr


def _copy_case(case: str, tmp_path: Path) -> Path:
    shutil.copytree(ACCELERATE_DATA / case, tmp_path / case)
    return tmp_path / case


def test_verify_reads_the_optimizer_folder_too(tmp_path: Path) -> None:
    """verify compares the optimizer export with `optimizer_0/` as torch reads it (not through the merge's own
    reader, its fallback for tensors torch's reader does not name); one changed value fails it."""
    case = ACCELERATE_CASES[0]
    work = _copy_case(case, tmp_path)
    out = tmp_path / "out"
    assert main([str(work / CHECKPOINT), str(out), "--model-name", str(work / "huggingface")]) == 0
    report = streammerge.verify(out, work / CHECKPOINT)
    assert report.ok and not [n for n in report.notes if "own reader" in n], report.notes
    assert report.tensors_checked == len(load_file(out / "model.safetensors")) + sum(
        len(load_file(p)) for p in (out / "optimizer").glob("*.safetensors"))
    shard = sorted((out / "optimizer").glob("*.safetensors"))[0]
    with safe_open(shard, framework="pt") as f:
        name = next(k for k in f.keys() if k.endswith("exp_avg_sq"))
    state = load_file(shard)
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1.0
    meta = safe_open(shard, framework="pt").metadata()
    save_file(state, shard, metadata=meta)
    assert main(["verify", str(out), str(work / CHECKPOINT)]) == 1


def test_an_unreadable_optimizer_folder_leaves_the_weights_merged_and_says_so(tmp_path: Path) -> None:
    """An `optimizer_0/` whose save did not finish (no .metadata) costs the optimizer export only, with the
    reason; the weights are the trained ones."""
    case = ACCELERATE_CASES[0]
    work = _copy_case(case, tmp_path)
    (work / CHECKPOINT / "optimizer_0" / ".metadata").unlink()
    result = streammerge.merge(work / CHECKPOINT, tmp_path / "out", model_name=str(work / "huggingface"))
    assert not (tmp_path / "out" / "optimizer").exists()
    said = [w for w in result.warnings if w.startswith("optimizer not exported")]
    assert len(said) == 1 and "optimizer_0" in said[0], result.warnings
    ref = load_file(ACCELERATE_DATA / case / "reference" / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(got[k], ref[k]) for k in got)


def test_no_optimizer_means_no_warning(tmp_path: Path) -> None:
    """--no-optimizer: the user asked for no optimizer, so optimizer_0/ left out is nothing to warn of."""
    case = ACCELERATE_CASES[0]
    result = streammerge.merge(ACCELERATE_DATA / case / CHECKPOINT, tmp_path / "out", optimizer=False,
                               model_name=str(ACCELERATE_DATA / case / "huggingface"))
    assert not result.warnings, result.warnings


def test_inspect_names_the_optimizer_folder(capsys) -> None:
    case = ACCELERATE_CASES[0]
    ckpt = ACCELERATE_DATA / case / CHECKPOINT
    assert main(["inspect", str(ckpt), "--model-name", str(ACCELERATE_DATA / case / "huggingface")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("optimizer ")]
    assert lines == [f"optimizer   {ckpt / 'optimizer_0'}, beside this folder"]
