"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3), as real runs write them.

`tests/data/deepspeed/<case>/run/` is what `engine.save_checkpoint` wrote (made by `tests/data/make_deepspeed.py` with
deepspeed and transformers themselves, 2 ranks on CPU): `latest` naming `global_step3/`, which holds the model states
and each rank's optimizer partition. The oracle in `reference/` was gathered by DeepSpeed in the training processes
right after the save (`safe_get_full_fp32_param`, `safe_get_full_optimizer_state`), and the generator checked that
DeepSpeed's own zero_to_fp32 gives the same weights.
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
from fixture_paths import DEEPSPEED_CASES, DEEPSPEED_DATA, DEEPSPEED_LORA_CASES
from safetensors.torch import load_file
from test_accelerate import assert_trained_logits
from test_optimizer import assert_same_optimizer

import streammerge
from streammerge.cli import main
from streammerge.sources.deepspeed_oracle import _STAND_INS

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
STEP = Path("global_step3")


def _info(case: str) -> dict:
    return json.loads((DEEPSPEED_DATA / case / "reference" / "INFO.json").read_text())


def _run(case: str) -> Path:
    return DEEPSPEED_DATA / case / "run"


def _base(case: str) -> str:
    return str(DEEPSPEED_DATA / case / "huggingface")


def _load(path: Path) -> dict:
    with torch.serialization.safe_globals(_STAND_INS):
        return torch.load(path, weights_only=True)


def _optim_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*zero_pp_rank_*_optim_states.pt"))


def test_the_fixture_is_what_deepspeed_writes() -> None:
    """Each ZeRO stage among the cases, the bf16 optimizer's files (bf16_zero_pp_rank_*) among them; 2 ranks; the
    saved stage and partition count as the files' names say; DeepSpeed's zero_to_fp32 agreed with the oracle."""
    assert {_info(c)["deepspeed_config"]["zero_optimization"]["stage"] for c in DEEPSPEED_CASES} == {1, 2, 3}
    assert {_info(c)["deepspeed_config"]["zero_optimization"]["stage"] for c in DEEPSPEED_LORA_CASES} == {2, 3}
    size = sum(p.stat().st_size for p in DEEPSPEED_DATA.rglob("*") if p.is_file())
    assert size < 1.5 * 10**6, f"tests/data/deepspeed holds {size} bytes"
    prefixes = set()
    for case in DEEPSPEED_CASES + DEEPSPEED_LORA_CASES:
        info = _info(case)
        assert info["world_size"] in (2, 3) and info["versions"]["deepspeed"].startswith("0.")
        assert "gives every tensor" in info["zero_to_fp32"]
        assert (_run(case) / "latest").read_text().strip() == STEP.name
        files = _optim_files(_run(case) / STEP)
        assert len(files) == info["world_size"]
        prefixes.add(files[0].name.startswith("bf16_"))
        osd = _load(files[0])["optimizer_state_dict"]
        assert int(osd["zero_stage"]) == info["deepspeed_config"]["zero_optimization"]["stage"]
    assert prefixes == {True, False}


@pytest.fixture(scope="module", params=DEEPSPEED_CASES)
def merged(request, tmp_path_factory) -> tuple[str, Path, str]:
    """`streammerge run/ OUT --model-name huggingface/`: (case, out, stderr)."""
    case = request.param
    out = tmp_path_factory.mktemp(case) / "out"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        rc = main([str(_run(case)), str(out), "--model-name", _base(case)])
    assert rc == 0, stderr.getvalue()
    return case, out, stderr.getvalue()


def _assert_trained_weights(case: str, out: Path) -> None:
    """OUT's weights are DeepSpeed's gathered float32 master weights, bit for bit, under the model's names (a tied
    lm_head.weight left out, as save_pretrained leaves it out)."""
    ref = load_file(DEEPSPEED_DATA / case / "reference" / "model.safetensors")
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(f))
    assert set(got) == set(ref)
    assert all(got[k].dtype == ref[k].dtype == torch.float32 and torch.equal(got[k], ref[k]) for k in got)


def test_weights_are_the_float32_master_weights(merged) -> None:
    """The merge was refused ("a DeepSpeed checkpoint, which streammerge does not read")."""
    case, out, stderr = merged
    _assert_trained_weights(case, out)
    assert "warning" not in stderr.lower(), stderr


def test_transformers_loads_the_trained_model(merged) -> None:
    case, out, _ = merged
    assert_trained_logits(out, DEEPSPEED_DATA / case / "reference" / "logits.safetensors")


def test_the_optimizer_export_is_deepspeeds_gathered_state(merged) -> None:
    """exp_avg and exp_avg_sq of every parameter as DeepSpeed gathers them, each group's step, the groups' settings
    and parameter names; the step of the save in the index."""
    case, out, _ = merged
    want = torch.load(DEEPSPEED_DATA / case / "reference" / "optimizer.pt", weights_only=True)
    assert_same_optimizer(streammerge.load_optimizer_state_dict(out), want)
    index = json.loads((out / "optimizer" / "optimizer.safetensors.index.json").read_text())
    assert index["metadata"]["step"] == "3"


def test_verify_compares_every_tensor_through_torchs_loader(merged) -> None:
    """verify reads the checkpoint with torch.load (DeepSpeed's classes as inert stand-ins), not through the merge's
    reader, for the weights and the optimizer state alike."""
    case, out, _ = merged
    report = streammerge.verify(out, _run(case))
    assert report.ok, report.failures
    assert not [n for n in report.notes if "own reader" in n], report.notes
    assert report.tensors_checked == sum(len(load_file(p)) for p in out.rglob("*.safetensors"))


def test_verify_finds_a_changed_element_of_a_partition(merged, tmp_path: Path) -> None:
    """One float32 element of rank 1's partition changed after the merge: verify fails, naming a tensor that
    differs."""
    case, out, _ = merged
    run = tmp_path / "run"
    shutil.copytree(_run(case), run)
    path = _optim_files(run / STEP)[1]
    key = "single_partition_of_fp32_groups" if _info(case)["deepspeed_config"]["zero_optimization"]["stage"] <= 2 \
        else "fp32_flat_groups"
    state = _load(path)
    flat = state["optimizer_state_dict"][key][0]
    data = path.read_bytes()
    raw = flat[:4].detach().numpy().tobytes()
    assert data.count(raw) == 1
    at = data.index(raw) + 4 * 2  # its third element
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1:])
    report = streammerge.verify(out, run)
    assert not report.ok and any("differ" in p and ("'model." in p or "'lm_head" in p) for p in report.failures), \
        report.failures


def test_the_run_folder_and_the_step_folder_merge_alike(tmp_path: Path) -> None:
    """`latest` names the step folder; the step folder itself merges the same, and the step comes from its name."""
    case = DEEPSPEED_CASES[0]
    out = tmp_path / "out"
    assert main([str(_run(case) / STEP), str(out), "--model-name", _base(case)]) == 0
    _assert_trained_weights(case, out)
    index = json.loads((out / "optimizer" / "optimizer.safetensors.index.json").read_text())
    assert index["metadata"]["step"] == "3"


def test_the_hf_trainers_checkpoint_folder_gives_its_config(tmp_path: Path, capsys) -> None:
    """The HF Trainer with DeepSpeed saves config.json and the tokenizer into checkpoint-N/, beside `latest`,
    global_stepN/, its trainer_state.json and DeepSpeed's scripts: the merge takes the config and tokenizer alone, as
    --model-name takes a folder, with no --model-name given (inspect says so); verify reads the same."""
    case = next(c for c in DEEPSPEED_CASES if "zero3" in c)
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(_run(case), ckpt)
    for f in Path(_base(case)).iterdir():
        shutil.copy(f, ckpt / f.name)
    (ckpt / "trainer_state.json").write_text('{"global_step": 3}')
    out = tmp_path / "out"
    assert main([str(ckpt), str(out)]) == 0
    _assert_trained_weights(case, out)
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"])
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert main(["inspect", str(ckpt)]) == 0
    assert f"config      {ckpt} (the folder around the checkpoint" in capsys.readouterr().out
    assert streammerge.verify(out, ckpt).ok


def _mutated(case: str, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(_run(case), run)
    return run


def _refused(run: Path, case: str, tmp_path: Path, capsys, *words: str) -> str:
    capsys.readouterr()
    rc = main([str(run), str(tmp_path / "out"), "--model-name", _base(case)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert not (tmp_path / "out" / "model.safetensors").exists()
    return lines[0]


def test_a_missing_rank_is_refused(tmp_path: Path, capsys) -> None:
    case = DEEPSPEED_CASES[0]
    run = _mutated(case, tmp_path)
    _optim_files(run / STEP)[1].unlink()
    _refused(run, case, tmp_path, capsys, "1 optimizer partitions", "saved by 2 ranks")


def test_a_stale_rank_from_a_larger_run_is_refused(tmp_path: Path, capsys) -> None:
    """A rank 2 file left from an earlier save with more ranks: not one save's ranks."""
    case = DEEPSPEED_CASES[0]
    run = _mutated(case, tmp_path)
    first = _optim_files(run / STEP)[0]
    shutil.copy(first, first.with_name(first.name.replace("rank_0_", "rank_2_")))
    _refused(run, case, tmp_path, capsys, "3 optimizer partitions", "saved by 2 ranks")


def test_a_pickle_naming_other_code_is_refused_and_nothing_runs(tmp_path: Path, capsys) -> None:
    """A partition whose pickle names a function beyond DeepSpeed's three classes (here one that would write a file
    if called): refused in one line, and the function never ran."""
    case = DEEPSPEED_CASES[0]
    run = _mutated(case, tmp_path)
    path = _optim_files(run / STEP)[0]
    state = _load(path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    osd = state["optimizer_state_dict"]  # DeepSpeed's objects (loaded as stand-ins) as plain values, and the payload
    osd.update(zero_stage=int(osd["zero_stage"]), loss_scaler=Payload())
    osd.pop("param_slice_mappings", None)
    torch.save(state, path)
    with pytest.raises(Exception, match="getattr"):  # torch's weights-only loader refuses it too
        _load(path)
    _refused(run, case, tmp_path, capsys, "not a DeepSpeed optimizer partition", "nothing in it was run")
    assert not marker.exists()


def test_a_truncated_partition_is_refused_as_torch_refuses_it(tmp_path: Path, capsys) -> None:
    case = DEEPSPEED_CASES[-1]
    run = _mutated(case, tmp_path)
    path = _optim_files(run / STEP)[1]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(Exception):  # noqa: B017  (torch's own refusal, whatever its kind)
        _load(path)
    _refused(run, case, tmp_path, capsys, path.name)


@pytest.mark.parametrize("stage", ["zero1", "zero3"])
def test_model_states_that_do_not_fit_the_partitions_are_refused(stage: str, tmp_path: Path, capsys) -> None:
    """The model states of another save (here: one parameter fewer than the partitions hold): refused in one line,
    where a walk of the partitions by these shapes would give every later parameter another one's elements."""
    case = next(c for c in DEEPSPEED_CASES if stage in c)
    run = _mutated(case, tmp_path)
    path = next(p for p in sorted((run / STEP).glob("*model_states.pt")))
    state = torch.load(path, weights_only=True)
    first = state["param_shapes"][0]
    first.pop(next(iter(first)))
    torch.save(state, path)
    _refused(run, case, tmp_path, capsys, "a partition of another save?")


# ---------------------------------------------------------------- LoRA: a peft model trained under ZeRO

LORA_FLAGS = ["--lora-rank", "4", "--lora-alpha", "8"]  # DeepSpeed records no LoraConfig (the HF Trainer saves one)


@pytest.fixture(scope="module", params=DEEPSPEED_LORA_CASES)
def lora_merged(request, tmp_path_factory) -> tuple[str, Path]:
    case = request.param
    out = tmp_path_factory.mktemp(case) / "out"
    assert main([str(_run(case)), str(out), "--model-name", _base(case), *LORA_FLAGS]) == 0
    return case, out


def test_a_lora_run_folds_as_peft_merges(lora_merged) -> None:
    """The frozen base (stages 1 and 2: whole in the model states; stage 3: a chunk per rank) with the trained
    adapter (float32 master weights) folded: peft's merge_and_unload() of the gathered state, bit for bit. It was
    refused ("frozen parameters ... does not merge from DeepSpeed checkpoints yet")."""
    case, out = lora_merged
    want = load_file(DEEPSPEED_DATA / case / "reference" / "merged.safetensors")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in got)
    assert_trained_logits(out, DEEPSPEED_DATA / case / "reference" / "logits.safetensors")


def test_a_lora_runs_adapter_and_optimizer_are_exported(lora_merged) -> None:
    """The adapter folder holds the trained factors (peft's names, as peft loads them); the optimizer export holds the
    adapter's state under the peft model's parameter names, as DeepSpeed gathers it; verify passes."""
    case, out = lora_merged
    ref = load_file(DEEPSPEED_DATA / case / "reference" / "model.safetensors")
    adapter = load_file(out / "lora_adapter" / "adapter_model.safetensors")
    factors = {k: v for k, v in ref.items() if ".lora_" in k}
    assert {k.replace(".default", "") for k in factors} == set(adapter)
    assert all(torch.equal(adapter[k.replace(".default", "")], v) for k, v in factors.items())
    want = torch.load(DEEPSPEED_DATA / case / "reference" / "optimizer.pt", weights_only=True)
    assert_same_optimizer(streammerge.load_optimizer_state_dict(out), want)
    report = streammerge.verify(out, _run(case))
    assert report.ok, report.failures
    assert not [n for n in report.notes if "own reader" in n], report.notes


def test_the_hf_trainers_lora_checkpoint_tells_its_lora_settings(tmp_path: Path) -> None:
    """The HF Trainer saves peft's adapter_config.json into checkpoint-N/ beside the ZeRO files: r and alpha come
    from it, with no --lora-rank or --lora-alpha."""
    from peft import LoraConfig

    case = DEEPSPEED_LORA_CASES[-1]
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(_run(case), ckpt)
    LoraConfig(**{k: v for k, v in _info(case)["lora"].items() if k != "peft"}).save_pretrained(ckpt)
    out = tmp_path / "out"
    assert main([str(ckpt), str(out), "--model-name", _base(case)]) == 0
    want = load_file(DEEPSPEED_DATA / case / "reference" / "merged.safetensors")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
