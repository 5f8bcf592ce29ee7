"""PyTorch Lightning sharded checkpoints of FSDP training, as real runs write them.

`tests/data/lightning/<case>/run/checkpoints/epoch=0-step=3.ckpt/` is what Lightning's ModelCheckpoint wrote (made by
`tests/data/make_lightning.py` with lightning and transformers themselves, 2 ranks): a torch DCP folder of the
LightningModule's state dict (`state_dict` under ModelParallelStrategy, `model` under FSDPStrategy) and of
`optimizer_0`, with Lightning's `meta.pt` beside it. The LightningModule holds the transformers model as `self.model`,
so its names are `model.` + transformers'. The oracle in `reference/` was gathered by torch in the training processes
when training ended, right after that save.
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
from fixture_paths import LIGHTNING_CASES, LIGHTNING_CKPT, LIGHTNING_DATA
from safetensors.torch import load_file
from test_accelerate import assert_trained_logits
from test_optimizer import assert_same_optimizer
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import streammerge
from streammerge.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
CKPT = LIGHTNING_CKPT
ATTRIBUTE = "model."  # the LightningModule's attribute holding the transformers model


def _info(case: str) -> dict:
    return json.loads((LIGHTNING_DATA / case / "reference" / "INFO.json").read_text())


def _container(case: str) -> str:
    return "model" if _info(case)["strategy"]["class"] == "FSDPStrategy" else "state_dict"


def _tied(case: str) -> bool:
    return json.loads((LIGHTNING_DATA / case / "huggingface" / "config.json").read_text())["tie_word_embeddings"]


def test_the_fixture_is_what_lightning_writes() -> None:
    """A DCP folder named as a checkpoint file, with Lightning's meta.pt, of the LightningModule's state dict and of
    `optimizer_0`; runs of both strategies among them; no config.json (Lightning saves none)."""
    assert LIGHTNING_CASES
    size = sum(p.stat().st_size for p in LIGHTNING_DATA.rglob("*") if p.is_file())
    assert size < 2.2 * 10**6, f"tests/data/lightning holds {size} bytes"
    strategies = set()
    for case in LIGHTNING_CASES:
        ckpt = LIGHTNING_DATA / case / CKPT
        info = _info(case)
        strategies.add(info["strategy"]["class"])
        assert info["world_size"] == 2 and info["versions"]["lightning"].startswith("2.")
        assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
        keys = list(FileSystemReader(ckpt).read_metadata().state_dict_metadata)
        assert {k.split(".", 1)[0] for k in keys} == {_container(case), "optimizer_0"}
        assert all(k.startswith(f"{_container(case)}.{ATTRIBUTE}") for k in keys if not k.startswith("optimizer_0."))
        assert not list((LIGHTNING_DATA / case / "run").rglob("config.json"))
    assert strategies == {"ModelParallelStrategy", "FSDPStrategy"}


@pytest.mark.parametrize("case", LIGHTNING_CASES)
def test_the_oracle_is_the_checkpoint_as_torch_reads_it(case: str, tmp_path: Path) -> None:
    """torch's DCP reader finds in the folder the LightningModule's state and the optimizer's, equal to what torch
    gathered in training: what the oracle says is in the checkpoint is there."""
    dcp_to_torch_save(LIGHTNING_DATA / case / CKPT, tmp_path / "all.pt")
    saved = torch.load(tmp_path / "all.pt", weights_only=True)
    ref = load_file(LIGHTNING_DATA / case / "reference" / "model.safetensors")
    model = saved[_container(case)]
    assert set(model) == set(ref) and all(torch.equal(model[k], v) for k, v in ref.items())
    assert_same_optimizer(saved["optimizer_0"], _reference_optimizer(case), ordered=False)


def _reference_optimizer(case: str) -> dict:
    return torch.load(LIGHTNING_DATA / case / "reference" / "optimizer.pt", weights_only=True)


def _optimizer_without_attribute(case: str) -> dict:
    """The gathered optimizer state, named by the transformers model's parameters."""
    want = _reference_optimizer(case)
    return {"state": {k.removeprefix(ATTRIBUTE): v for k, v in want["state"].items()},
            "param_groups": [{**g, "params": [p.removeprefix(ATTRIBUTE) for p in g["params"]]}
                             for g in want["param_groups"]]}


@pytest.fixture(scope="module", params=LIGHTNING_CASES)
def merged(request, tmp_path_factory) -> tuple[str, Path, Path, str]:
    """`streammerge epoch=0-step=3.ckpt OUT --model-name huggingface/`: (case, ckpt, out, stderr)."""
    case = request.param
    ckpt = LIGHTNING_DATA / case / CKPT
    out = tmp_path_factory.mktemp(case) / "out"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        rc = main([str(ckpt), str(out), "--model-name", str(LIGHTNING_DATA / case / "huggingface")])
    assert rc == 0, stderr.getvalue()
    return case, ckpt, out, stderr.getvalue()


def test_weights_are_the_trained_ones_under_transformers_names(merged) -> None:
    """Every tensor bit for bit as torch gathered it, named as transformers names it: without the LightningModule's
    `model.` (transformers 5 would load the longer names too; vLLM and other loaders of the folder would not), and the
    tied lm_head.weight left out as save_pretrained leaves it out. The merge was refused ("cannot tell which tensors
    are the model", suggesting the optimizer's keys) or kept the longer names."""
    case, _, out, stderr = merged
    _assert_trained_weights(case, out)
    assert "warning" not in stderr.lower(), stderr


def _assert_trained_weights(case: str, out: Path) -> None:
    """OUT's weights are torch's gathered ones, dtype and bits, under transformers' names; the tied lm_head.weight
    (the embedding) left out."""
    ref = {k.removeprefix(ATTRIBUTE): v for k, v in
           load_file(LIGHTNING_DATA / case / "reference" / "model.safetensors").items()}
    if _tied(case):
        assert torch.equal(ref["lm_head.weight"], ref["model.embed_tokens.weight"])
    got = load_file(out / "model.safetensors")
    assert set(got) == set(ref) - ({"lm_head.weight"} if _tied(case) else set())
    assert all(got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]) for k in got)


def test_transformers_loads_the_trained_model(merged) -> None:
    case, _, out, _ = merged
    assert_trained_logits(out, LIGHTNING_DATA / case / "reference" / "logits.safetensors")


def test_the_optimizer_export_is_torchs_gathered_state_under_the_models_names(merged) -> None:
    """`optimizer_0` (Lightning's name for the first optimizer) is exported, equal to what torch gathered, named by
    the transformers model's parameters, which set_optimizer_state_dict on the loaded model pairs it with. It was left
    out without a word. The step comes from the checkpoint's name."""
    case, _, out, _ = merged
    assert_same_optimizer(streammerge.load_optimizer_state_dict(out), _optimizer_without_attribute(case))
    index = json.loads((out / "optimizer" / "optimizer.safetensors.index.json").read_text())
    assert index["metadata"]["step"] == "3"


def test_verify_passes(merged) -> None:
    case, ckpt, out, _ = merged
    report = streammerge.verify(out, ckpt)
    assert report.ok and not [n for n in report.notes if "own reader" in n], report.notes
    # and the tied lm_head.weight, left out of the folder, against the embedding it is
    assert report.tensors_checked == sum(len(load_file(p)) for p in out.rglob("*.safetensors")) + _tied(case)


def test_inspect_says_what_was_taken(capsys) -> None:
    case = LIGHTNING_CASES[0]
    assert main(["inspect", str(LIGHTNING_DATA / case / CKPT), "--model-name",
                 str(LIGHTNING_DATA / case / "huggingface")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("step 3" in line for line in lines if line.startswith("format"))
    model = next(line for line in lines if line.startswith("model "))
    assert f"the LightningModule's attribute '{ATTRIBUTE}'" in model, model
    assert "optimizer   optimizer_0.state.*" in lines


def _resaved(case: str, tmp_path: Path, change) -> Path:
    """The case's checkpoint as torch reads it, changed by `change(state)` and written again by dcp.save, with
    Lightning's meta.pt beside it."""
    import torch.distributed.checkpoint as dcp

    ckpt = LIGHTNING_DATA / case / CKPT
    dcp_to_torch_save(ckpt, tmp_path / "all.pt")
    state = torch.load(tmp_path / "all.pt", weights_only=True)
    change(state)
    folder = tmp_path / "epoch=0-step=3.ckpt"
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    shutil.copy(ckpt / "meta.pt", folder / "meta.pt")
    return folder


@pytest.mark.parametrize("key_prefix", [None, "model."], ids=["names-as-saved", "key-prefix"])
def test_two_optimizers_are_not_exported_and_the_warning_says_why(tmp_path: Path, key_prefix: str | None) -> None:
    """configure_optimizers returned two (optimizer_0, optimizer_1): the export is one optimizer's state, so none is
    exported, with a warning; the weights are merged all the same. With `--key-prefix <container>.model.` (a module
    inside the LightningModule) the warning was missing: the optimizers were left out without a word."""
    case = LIGHTNING_CASES[0]

    def second(state: dict) -> None:
        state["optimizer_1"] = state["optimizer_0"]

    folder = _resaved(case, tmp_path, second)
    prefix = None if key_prefix is None else f"{_container(case)}.{key_prefix}"
    result = streammerge.merge(folder, tmp_path / "out", model_name=str(LIGHTNING_DATA / case / "huggingface"),
                               key_prefix=prefix)
    assert not (tmp_path / "out" / "optimizer").exists()
    assert [w for w in result.warnings if w.startswith("optimizer not exported: the checkpoint holds 2 optimizers "
                                                       "(optimizer_0, optimizer_1: configure_optimizers")], \
        result.warnings
    _assert_trained_weights(case, tmp_path / "out")


def test_a_module_holding_more_than_the_model_is_refused_and_key_prefix_picks_the_model(tmp_path: Path,
                                                                                        capsys) -> None:
    """A LightningModule with a parameter beside the transformers model (a value head): no attribute is the model
    alone, so the names stay the module's, and the architecture check refuses them: one line, nothing written, naming
    the `--key-prefix <container>.model.` that takes the transformers model, and its optimizer state too."""
    case = LIGHTNING_CASES[0]

    def head(state: dict) -> None:
        state[_container(case)]["value_head.weight"] = torch.zeros(1, 16)

    folder = _resaved(case, tmp_path, head)
    base = str(LIGHTNING_DATA / case / "huggingface")
    rc = main([str(folder), str(tmp_path / "refused"), "--model-name", base])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and "value_head.weight" in lines[0], lines
    assert lines[0].endswith(f"--key-prefix {_container(case)}.{ATTRIBUTE} takes that attribute alone"), lines[0]
    assert not (tmp_path / "refused" / "model.safetensors").exists()
    out = tmp_path / "out"
    assert main([str(folder), str(out), "--model-name", base, "--key-prefix", f"{_container(case)}.{ATTRIBUTE}"]) == 0
    _assert_trained_weights(case, out)
    assert_same_optimizer(streammerge.load_optimizer_state_dict(out), _optimizer_without_attribute(case))


def test_the_key_prefix_hint_names_the_model_not_the_optimizer(tmp_path: Path, capsys) -> None:
    """A saved dict whose model container has no name streammerge knows: the one-line error suggests it, not
    Lightning's `optimizer_0` (which sorts first, and which it suggested)."""
    case = next(c for c in LIGHTNING_CASES if _container(c) == "state_dict")

    def rename(state: dict) -> None:
        state["weights"] = state.pop("state_dict")

    folder = _resaved(case, tmp_path, rename)
    (folder / "meta.pt").unlink()
    rc = main([str(folder), str(tmp_path / "out"), "--model-name", str(LIGHTNING_DATA / case / "huggingface")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].endswith("e.g. --key-prefix weights."), lines


def test_the_step_of_last_ckpt_comes_from_lightnings_meta_pt(tmp_path: Path, capsys) -> None:
    """ModelCheckpoint(save_last=True) names a save `last.ckpt`: the step is `global_step` in Lightning's meta.pt,
    read without running anything from it (a meta.pt that is no plain pickle leaves the step unknown)."""
    case = LIGHTNING_CASES[0]
    last = tmp_path / "checkpoints" / "last.ckpt"
    shutil.copytree(LIGHTNING_DATA / case / CKPT, last)
    base = str(LIGHTNING_DATA / case / "huggingface")
    assert main(["inspect", str(last), "--model-name", base]) == 0
    assert "step 3" in next(line for line in capsys.readouterr().out.splitlines() if line.startswith("format"))
    (last / "meta.pt").write_bytes(b"not a zip")
    assert main(["inspect", str(last), "--model-name", base]) == 0
    assert "step ?" in next(line for line in capsys.readouterr().out.splitlines() if line.startswith("format"))


def test_a_lightning_module_holding_a_peft_model_folds_as_peft_merges(tmp_path: Path) -> None:
    """`self.model = get_peft_model(...)`: the attribute is left out as for any model, and the peft names below it
    fold as peft's merge_and_unload does, bit for bit, with the adapter's optimizer exported under the peft model's
    names. Lightning's layout saved by dcp.save in one process (Lightning's own sharded runs are the cases above),
    with a fixture's meta.pt beside it; the run records no LoraConfig, so r and alpha are given."""
    import torch.distributed.checkpoint as dcp
    from peft import LoraConfig, get_peft_model
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    case = next(c for c in LIGHTNING_CASES if _container(c) == "state_dict")
    base = LIGHTNING_DATA / case / "huggingface"
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    module = torch.nn.Module()
    module.model = peft_model
    optim = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.arange(8)[None]
    for _ in range(2):  # lora_B leaves zero: the fold changes the weights
        module.model(input_ids=batch, labels=batch).loss.backward()
        optim.step()
    folder = tmp_path / "epoch=0-step=2.ckpt"
    dcp.save({"state_dict": module.state_dict(), "optimizer_0": get_optimizer_state_dict(module, optim)},
             checkpoint_id=folder, no_dist=True)
    shutil.copy(LIGHTNING_DATA / case / CKPT / "meta.pt", folder / "meta.pt")
    want_optim = get_optimizer_state_dict(peft_model, optim)
    want = peft_model.merge_and_unload().state_dict()
    out = tmp_path / "out"
    assert main([str(folder), str(out), "--model-name", str(base), "--lora-rank", "4", "--lora-alpha", "8"]) == 0
    got = load_file(out / "model.safetensors")
    assert set(got) == set(want) - ({"lm_head.weight"} if _tied(case) else set())
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert (out / "lora_adapter" / "adapter_config.json").is_file()
    assert_same_optimizer(streammerge.load_optimizer_state_dict(out), want_optim)
    assert streammerge.verify(out, folder).ok
