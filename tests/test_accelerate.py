"""accelerate / HF Trainer checkpoints of FSDP1 and FSDP2 with `SHARDED_STATE_DICT`, as real runs write them.

`tests/data/accelerate/<case>/run/checkpoint-3/` is what `Trainer._save_checkpoint` wrote (made on a GPU by
`tests/data/make_accelerate.py` with accelerate and transformers themselves, 2 ranks): `pytorch_model_fsdp_0/` (a DCP
of `{"model": state dict}`), `optimizer_0/` (a DCP of `{"optimizer": ...}`), scheduler, RNG and trainer state, and no
config.json: the user names the model folder the run started from (`huggingface/`) with `--model-name`.
The oracle in `reference/` was gathered by torch inside the training processes when the checkpoint was saved.
The LoRA cases trained a peft model: their oracle is also peft's merge of it, and the user gives the base model.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  (imported: the merge asks transformers in this process, not in a child)
from fixture_paths import ACCELERATE_CASES, ACCELERATE_DATA, ACCELERATE_LORA_CASES
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_optimizer import assert_same_optimizer
from torch.distributed.checkpoint import FileSystemReader
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
    return _merge(case, entry, tmp_path_factory, "--model-name", str(ACCELERATE_DATA / case / "huggingface"))


def _merge(case: str, entry: str, tmp_path_factory, *args: str) -> tuple[str, Path, Path, str]:
    """`streammerge CKPT OUT ARGS` from the checkpoint-N or DCP folder, exit code 0."""
    ckpt = ACCELERATE_DATA / case / ENTRIES[entry]
    out = tmp_path_factory.mktemp(f"{case}-{entry}") / "out"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        rc = main([str(ckpt), str(out), *args])
    assert rc == 0, stderr.getvalue()
    return case, ckpt, out, stderr.getvalue()


def test_the_fixture_is_what_accelerate_writes() -> None:
    """The layout the tests rely on, from accelerate's own save (not a hand-made one): two DCP folders, one per
    saved dict, and no config.json (Trainer writes none with SHARDED_STATE_DICT)."""
    assert ACCELERATE_CASES and ACCELERATE_LORA_CASES
    size = sum(p.stat().st_size for p in ACCELERATE_DATA.rglob("*") if p.is_file())
    assert size < 6 * 10**6, f"tests/data/accelerate holds {size} bytes"
    versions = set()
    for case in ACCELERATE_CASES + ACCELERATE_LORA_CASES:
        ckpt = ACCELERATE_DATA / case / CHECKPOINT
        info = _info(case)
        plugin = info["fsdp_plugin"]
        versions.add(plugin["fsdp_version"])
        assert plugin["fsdp_version"] == (1 if "fsdp1" in case else 2)
        assert plugin["state_dict_type"] == "StateDictType.SHARDED_STATE_DICT"
        assert bool(info.get("lora")) == (case in ACCELERATE_LORA_CASES)
        assert info["distributed_type"] == "DistributedType.FSDP" and info["world_size"] == 2
        assert all((ckpt / d / ".metadata").is_file() for d in ("pytorch_model_fsdp_0", "optimizer_0"))
        assert not (ckpt / "config.json").exists()
        assert sorted(p.name for p in (ckpt / "pytorch_model_fsdp_0").iterdir()) == [".metadata", "__0_0.distcp",
                                                                                       "__1_0.distcp"]
    assert versions == {1, 2}  # FSDP1 (accelerate's default fsdp_version) and FSDP2
    # FSDP1 both ways: flat parameters in training (use_orig_params=False) and the original ones
    assert {_info(c)["fsdp_config"]["use_orig_params"] for c in ACCELERATE_CASES if "fsdp1" in c} == {True, False}


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
    # torch's reader gives the state in the DCP's key order, not the param groups' (under FSDP1)
    assert_same_optimizer(optim["optimizer"], torch.load(ACCELERATE_DATA / case / "reference" / "optimizer.pt",
                                                         weights_only=True), ordered=False)


def test_weights_equal_torchs_gathered_state_bit_for_bit(merged) -> None:
    case, _, out, _ = merged
    ref = load_file(ACCELERATE_DATA / case / "reference" / "model.safetensors")
    if _tied(case):  # left out as save_pretrained leaves it out: it is the embedding
        assert torch.equal(ref["lm_head.weight"], ref["model.embed_tokens.weight"])
    _assert_bits(case, out, ref, "torch's gathered state")


def _tied(case: str) -> bool:
    return json.loads((ACCELERATE_DATA / case / "huggingface" / "config.json").read_text())["tie_word_embeddings"]


def _assert_bits(case: str, out: Path, want: dict, oracle: str) -> None:
    """OUT's weights are `want`'s, dtype and bits, but for a tied lm_head.weight (the embedding)."""
    got = load_file(out / "model.safetensors")
    assert set(got) == set(want) - ({"lm_head.weight"} if _tied(case) else set())
    differ = [k for k in got if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} tensors differ from {oracle}, e.g. {differ[0]}"


def test_transformers_loads_the_trained_model(merged) -> None:
    """The folder loads with nothing missing and computes the trained model's logits (the oracle's: a float32 model
    built from the run's config and loaded with torch's gathered state)."""
    case, _, out, _ = merged
    assert _assert_trained_logits(case, out).dtype == torch.float32


def _assert_trained_logits(case: str, out: Path):
    return assert_trained_logits(out, ACCELERATE_DATA / case / "reference" / "logits.safetensors")


def assert_trained_logits(out: Path, oracle: Path, **load):
    """OUT loads (with from_pretrained's `load` arguments) with nothing missing or left over and gives the oracle's
    logits (input_ids and logits in the `oracle` file); returns the model."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, **load)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref = load_file(oracle)
    with torch.no_grad():
        logits = model.eval()(input_ids=ref["input_ids"]).logits
    # an oracle's logits may come from torch 2.11 on the GPU machine's CPU: other kernels, not bit-equal (5e-8 apart)
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-6)
    return model


def test_config_and_tokenizer_come_from_model_name(merged) -> None:
    """Trainer's checkpoint-N holds no config.json nor tokenizer: OUT has --model-name's, the config naming the
    dtype written (float32, as saved)."""
    _assert_config_and_tokenizer_of(merged[0], merged[2])


def _assert_config_and_tokenizer_of(case: str, out: Path) -> None:
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
    _assert_weights_without_optimizer(result, tmp_path / "out", "optimizer_0",
                                      ACCELERATE_DATA / case / "reference" / "model.safetensors")


def _assert_weights_without_optimizer(result, out: Path, reason: str, oracle: Path) -> None:
    """No optimizer export, one warning saying why (naming `reason`), and the weights bit for bit as the oracle's."""
    assert not (out / "optimizer").exists()
    said = [w for w in result.warnings if w.startswith("optimizer not exported")]
    assert len(said) == 1 and reason in said[0], result.warnings
    want = load_file(oracle)
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in got)


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


# ---- a peft LoRA model trained by the Trainer (adapter_only=True: get_peft_model_state_dict, keys without the
# adapter's name, no LoraConfig recorded); the user gives the base model and lora_alpha


def _saved_keys(case: str) -> list[str]:
    """The model DCP's keys, as torch's own reader lists them."""
    return list(FileSystemReader(ACCELERATE_DATA / case / CHECKPOINT / "pytorch_model_fsdp_0").read_metadata()
                .state_dict_metadata)


LORA_SAVED = [c for c in ACCELERATE_LORA_CASES if _saved_keys(c)]
LORA_EMPTY = [c for c in ACCELERATE_LORA_CASES if not _saved_keys(c)]


def test_the_lora_fixtures_are_what_the_trainer_saves() -> None:
    """FSDP2, and FSDP1 with peft 0.22, save the adapter's factors only, named as get_peft_model_state_dict names
    them; FSDP1 with peft 0.21 saved no tensor at all. The base in huggingface/ is the run's frozen base, as torch
    gathered it when the checkpoint was saved."""
    assert LORA_SAVED and LORA_EMPTY

    def run(c: str) -> tuple[int, str]:
        return _info(c)["fsdp_plugin"]["fsdp_version"], _info(c)["versions"]["peft"][:5]

    assert {run(c) for c in LORA_SAVED} == {(2, "0.21."), (1, "0.22.")}
    assert {run(c) for c in LORA_EMPTY} == {(1, "0.21.")}
    for case in LORA_SAVED:
        keys = _saved_keys(case)
        assert all(re.fullmatch(r"model\.base_model\.model\..+\.lora_[AB]\.weight", k) for k in keys), keys[:3]
    for case in ACCELERATE_LORA_CASES:
        ref = load_file(ACCELERATE_DATA / case / "reference" / "model.safetensors")
        base = load_file(ACCELERATE_DATA / case / "huggingface" / "model.safetensors")
        for name, w in base.items():
            k = "base_model.model." + name
            module, leaf = k.rsplit(".", 1)
            layer = f"{module}.base_layer.{leaf}"  # a LoRA-wrapped module's own weight and bias
            assert torch.equal(ref[layer if layer in ref else k], w), name
        assert any(k.endswith("lora_B.default.weight") and ref[k].abs().max() > 0 for k in ref)  # trained


@pytest.mark.parametrize("case", LORA_SAVED)
def test_the_lora_oracle_is_the_checkpoint_as_torch_reads_it(case: str, tmp_path: Path) -> None:
    """torch's DCP reader finds in pytorch_model_fsdp_0 each trained factor of the gathered peft state (named without
    the adapter), and in optimizer_0 the gathered optimizer state."""
    ckpt = ACCELERATE_DATA / case / CHECKPOINT
    dcp_to_torch_save(ckpt / "pytorch_model_fsdp_0", tmp_path / "model.pt")
    dcp_to_torch_save(ckpt / "optimizer_0", tmp_path / "optimizer.pt")
    model = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    ref = load_file(ACCELERATE_DATA / case / "reference" / "model.safetensors")
    factors = {k.replace(".default.", "."): v for k, v in ref.items() if ".lora_" in k}
    assert set(model) == set(factors) and all(torch.equal(model[k], v) for k, v in factors.items())
    assert_same_optimizer(torch.load(tmp_path / "optimizer.pt", weights_only=True)["optimizer"],
                          torch.load(ACCELERATE_DATA / case / "reference" / "optimizer.pt", weights_only=True),
                          ordered=False)


@pytest.fixture(scope="module", params=[(c, e) for c in LORA_SAVED for e in ENTRIES],
                ids=[f"{c}-{e}" for c in LORA_SAVED for e in ENTRIES])
def lora_merged(request, tmp_path_factory) -> tuple[str, Path, Path, str]:
    """`streammerge CKPT OUT --base-model BASE --lora-alpha A`: (case, ckpt, out, stderr)."""
    case, entry = request.param
    return _merge(case, entry, tmp_path_factory, "--base-model", str(ACCELERATE_DATA / case / "huggingface"),
                  "--lora-alpha", str(_info(case)["lora"]["lora_alpha"]))


def test_the_lora_fold_is_peft_merge_and_unload_bit_for_bit(lora_merged) -> None:
    """The oracle: peft's merge_and_unload() of the peft model loaded with torch's gathered state."""
    case, _, out, _ = lora_merged
    _assert_bits(case, out, load_file(ACCELERATE_DATA / case / "reference" / "merged.safetensors"), "peft's merge")


def test_the_base_model_gives_config_and_tokenizer(lora_merged) -> None:
    """--base-model alone: the checkpoint has no config.json, so the base model's config and tokenizer are written,
    as peft's own merge keeps them (--model-name was needed too, or the merge was refused)."""
    case, _, out, _ = lora_merged
    _assert_config_and_tokenizer_of(case, out)
    recorded = json.loads((out / ".streammerge" / "manifest.json").read_text())["options"]
    assert recorded["model_name"] == recorded["base_model"] == str(ACCELERATE_DATA / case / "huggingface")


def test_the_folded_model_gives_the_trained_logits(lora_merged) -> None:
    case, _, out, _ = lora_merged
    _assert_trained_logits(case, out)


def test_the_exported_adapter_loads_in_peft_as_the_trained_one(lora_merged) -> None:
    """PeftModel.from_pretrained(the base, OUT/lora_adapter) with the run's r, alpha and target modules, merging to
    peft's merge of the trained model bit for bit."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    case, _, out, _ = lora_merged
    cfg = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    run = _info(case)["lora"]
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (
        run["r"], run["lora_alpha"], sorted(run["target_modules"]))
    base = AutoModelForCausalLM.from_pretrained(ACCELERATE_DATA / case / "huggingface")
    merged = PeftModel.from_pretrained(base, out / "lora_adapter").merge_and_unload().state_dict()
    want = load_file(ACCELERATE_DATA / case / "reference" / "merged.safetensors")
    assert set(merged) == set(want) and all(torch.equal(merged[k], want[k]) for k in want)


def test_verify_passes_on_the_folded_model(lora_merged) -> None:
    _, ckpt, out, _ = lora_merged
    assert streammerge.verify(out, ckpt).ok


@pytest.mark.parametrize("case", LORA_EMPTY)
def test_a_checkpoint_that_saved_no_weights_is_refused_in_one_line(case: str, tmp_path: Path, capsys) -> None:
    """Under FSDP1 peft 0.21 saved an empty pytorch_model_fsdp_0 (torch's reader finds no key) though the adapter
    was trained: the one line says the adapter is not in the checkpoint (it said "a save with
    flatten_state_dict=False"), and nothing is written."""
    base = ACCELERATE_DATA / case / "huggingface"
    rc = main([str(ACCELERATE_DATA / case / CHECKPOINT), str(tmp_path / "out"), "--model-name", str(base),
               "--base-model", str(base), "--lora-alpha", "8"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert "LoRA adapter is in no file of this checkpoint" in lines[0] and "optimizer_0" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_the_adapters_optimizer_is_exported_as_torch_gathered_it(lora_merged) -> None:
    """optimizer_0/ names the peft model's parameters (`q_proj.lora_A.default.weight`), which the adapter state dict
    saved without the adapter's name: the export keeps the optimizer's names, equal to what torch gathered in
    training (it was left out, with a warning), and verify compares it with optimizer_0/ as torch reads it."""
    case, ckpt, out, stderr = lora_merged
    want = torch.load(ACCELERATE_DATA / case / "reference" / "optimizer.pt", weights_only=True)
    assert_same_optimizer(streammerge.load_optimizer_state_dict(out), want)
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in want["state"])
    assert "warning" not in stderr.lower(), stderr
    report = streammerge.verify(out, ckpt)
    assert report.ok and not [n for n in report.notes if "own reader" in n], report.notes
    assert report.tensors_checked == sum(len(load_file(p)) for p in out.rglob("*.safetensors"))


def test_an_optimizer_naming_two_adapters_for_unnamed_factors_is_left_out_with_the_reason(tmp_path: Path) -> None:
    """Factors saved without the adapter's name, an optimizer naming two adapters: which one the factors are cannot
    be told, so the optimizer is not exported (the weights are), and the warning says why."""
    import torch.distributed.checkpoint as dcp

    case = LORA_SAVED[0]
    work = _copy_case(case, tmp_path)
    folder = work / CHECKPOINT / "optimizer_0"
    dcp_to_torch_save(folder, tmp_path / "optimizer.pt")
    optim = torch.load(tmp_path / "optimizer.pt", weights_only=True)["optimizer"]
    first = next(iter(optim["state"]))
    other = first.replace(".default.", ".other.")
    optim["state"][other] = optim["state"].pop(first)
    optim["param_groups"][0]["params"] = [other if p == first else p for p in optim["param_groups"][0]["params"]]
    shutil.rmtree(folder)
    dcp.save({"optimizer": optim}, checkpoint_id=folder, no_dist=True)
    base = work / "huggingface"
    result = streammerge.merge(work / CHECKPOINT, tmp_path / "out", model_name=str(base), base_model=str(base),
                               lora_alpha=8)
    _assert_weights_without_optimizer(result, tmp_path / "out", "adapters default, other",
                                      ACCELERATE_DATA / case / "reference" / "merged.safetensors")
