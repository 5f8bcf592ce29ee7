"""LoRA checkpoints: real peft models trained with FSDP2 on gloo ranks, folded and exported, checked against peft.

Each trained checkpoint is made once for the module (streammerge.testing.lora): its oracle is the
gathered peft state dict, peft's own `merge_and_unload()` of it and the trained model's logits.
Refusals use real peft models of each unsupported kind, saved as DTensor rank files in-process.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed.tensor  # noqa: F401  (lets this file's torch.load(weights_only=True) rebuild DTensors)
from fixture_paths import VERL_LORA_CASES, VERL_LORA_DATA
from safetensors.torch import load_file, save_file

from streammerge.cli import main as cli_main
from streammerge.errors import CheckpointError, ConfigError
from streammerge.pipeline import merge, plan_merge
from streammerge.testing.lora import LoraSpec, lora_config, make_lora_checkpoint, model_config
from streammerge.verify import verify

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore:Use .content=<...>.:DeprecationWarning")


@pytest.fixture(scope="module")
def fp32_ws2(tmp_path_factory) -> Path:
    """2 ranks, float32, lora_train_meta.json: the everyday veRL LoRA checkpoint."""
    return make_lora_checkpoint(tmp_path_factory.mktemp("lora"), world_size=2, r=8, lora_alpha=16)


@pytest.fixture(scope="module")
def bf16_ws3_lora_only(tmp_path_factory) -> Path:
    """3 ranks (uneven shards), bf16 mixed precision, save_lora_only, lm_head in modules_to_save."""
    return make_lora_checkpoint(tmp_path_factory.mktemp("lora"), world_size=3, r=8, lora_alpha=32,
                                mixed_precision="bf16", save_lora_only=True, modules_to_save=("lm_head",))


@pytest.fixture(scope="module")
def no_meta_rslora(tmp_path_factory) -> Path:
    """2 ranks, rsLoRA, r 4, alpha 8, and no lora_train_meta.json (an older veRL)."""
    return make_lora_checkpoint(tmp_path_factory.mktemp("lora"), world_size=2, r=4, lora_alpha=8, use_rslora=True,
                                write_meta=False, seed=3)


def assert_equals_peft_merge(actor: Path, out: Path) -> None:
    """Every tensor bit for bit as peft's merge_and_unload, and transformers loads it with nothing missing."""
    from transformers import AutoModelForCausalLM

    merged = load_file(actor / "reference" / "merged.safetensors")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(merged)
    differ = [k for k in merged if not torch.equal(merged[k], got[k])]
    assert not differ, f"{len(differ)} tensors differ from peft's merge, e.g. {differ[0]}"
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    logits_ref = load_file(actor / "reference" / "logits.safetensors")
    with torch.no_grad():
        logits = model.eval()(input_ids=logits_ref["input_ids"]).logits
    # the folded model computes W' x, the trained one W x + s B (A x): same function, other rounding
    assert torch.allclose(logits, logits_ref["logits"], atol=1e-4, rtol=0)


def assert_adapter_reproduces_training(actor: Path, out: Path, base: Path) -> None:
    """PeftModel.from_pretrained(base, OUT/lora_adapter) gives the trained model's logits exactly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "lora_adapter").eval()
    ref = load_file(actor / "reference" / "logits.safetensors")
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    assert torch.equal(logits, ref["logits"])


def run(args: list, capsys) -> tuple[int, str]:
    """The CLI in this process: (exit code, stderr); stdout is kept in `run.out`."""
    rc = cli_main([str(a) for a in args])
    captured = capsys.readouterr()
    run.out = captured.out  # type: ignore[attr-defined]
    return rc, captured.err


# ---- trained checkpoints ------------------------------------------------------------------------

@pytest.mark.slow
def test_fold_and_adapter_equal_peft_two_ranks_fp32(fp32_ws2, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run(["merge", fp32_ws2, out], capsys)
    assert rc == 0, err
    assert_equals_peft_merge(fp32_ws2, out)
    assert_adapter_reproduces_training(fp32_ws2, out, fp32_ws2 / "reference" / "base")
    cfg = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["peft_type"]) == (8, 16, False, "LORA")
    report = verify(out, fp32_ws2)
    assert report.ok, report.failures
    assert report.tensors_checked > 0


def test_base_model_for_a_checkpoint_holding_its_base_is_refused(fp32_ws2, tmp_path, capsys):
    """--base-model was dropped when the checkpoint holds its base weights: the user took it for adapter-only."""
    base = fp32_ws2 / "reference" / "base"
    rc, err = run(["merge", fp32_ws2, tmp_path / "out", "--base-model", base], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"--base-model {base}: {fp32_ws2} holds its own base weights" in err and "save_lora_only" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_optimizer_state_is_named_by_the_adapter_parameters(fp32_ws2, tmp_path):
    merge(fp32_ws2, tmp_path / "out")
    index = json.loads((tmp_path / "out" / "optimizer" / "optimizer.safetensors.index.json").read_text())
    got = {}
    for f in set(index["weight_map"].values()):
        got.update(load_file(tmp_path / "out" / "optimizer" / f))
    ref = torch.load(fp32_ws2 / "reference" / "optimizer.pt", weights_only=True)["state"]
    assert ref and all(".lora_" in name for name in ref)
    want = {f"state.{p}.{k}": v for p, s in ref.items() for k, v in s.items()}
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v.reshape(got[k].shape)), k


@pytest.mark.parametrize("case", VERL_LORA_CASES)
def test_fsdp1_lora_made_on_a_gpu(case, tmp_path):
    """veRL's FSDP1 LoRA (each lora_A / lora_B its own FSDP unit): the fold is peft's merge_and_unload bit for bit,
    and the optimizer is exported by adapter name, equal to torch's gathered state, flat parameters
    (use_orig_params=False) or per-parameter pieces (True) alike; verify replays both."""
    actor = VERL_LORA_DATA / case
    out = tmp_path / "out"
    result = merge(actor, out)
    merged = load_file(actor / "reference" / "merged.safetensors")
    got = load_file(out / "model.safetensors")
    dropped = result.plans[0].dropped
    assert set(got) | set(dropped) == set(merged) and ("qwen2" in case) == bool(dropped)
    assert all(torch.equal(got[k], merged[k]) for k in got)
    ref = torch.load(actor / "reference" / "optimizer.pt", weights_only=True)
    want = {f"state.{p}.{k}": v for p, s in ref["state"].items() for k, v in s.items()}
    index = json.loads((out / "optimizer" / "optimizer.safetensors.index.json").read_text())
    exported = {}
    for f in set(index["weight_map"].values()):
        exported.update(load_file(out / "optimizer" / f))
    assert want and set(exported) == set(want)
    assert all(torch.equal(exported[k], v.reshape(exported[k].shape)) for k, v in want.items())
    assert json.loads(index["metadata"]["param_groups"])[0]["params"] == ref["param_groups"][0]["params"]
    report = verify(out, actor)
    assert report.ok, report.failures


def test_fsdp1_lora_flat_optimizer_of_another_wrapping_is_not_guessed(tmp_path):
    """One FlatParameter fewer than veRL's LoRA wrap makes: no export, a warning that counts what was expected."""
    actor = tmp_path / "actor"
    shutil.copytree(VERL_LORA_DATA / "fsdp1_lora_llama_ws4", actor)
    for path in actor.glob("optim_world_size_4_rank_*.pt"):
        osd = torch.load(path, weights_only=True, map_location="cpu")  # saved from the GPU
        last = osd["param_groups"][0]["params"].pop()
        osd["state"].pop(last, None)
        torch.save(osd, path)
    result = merge(actor, tmp_path / "out")
    assert not (tmp_path / "out" / "optimizer").exists()
    assert any("FSDP1 optimizer holds 30 entries (flat parameters); expected 31 flat parameters (the root, one per "
               "LlamaForCausalLM decoder layer and one per LoRA factor" in w for w in result.warnings), result.warnings


def test_fsdp1_lora_adapter_gives_the_trained_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    actor = VERL_LORA_DATA / "fsdp1_lora_llama_ws4"
    merge(actor, tmp_path / "out", lora="adapter", optimizer=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "out"),
                                      tmp_path / "out" / "lora_adapter").eval()
    ref = load_file(actor / "reference" / "logits.safetensors")
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    assert torch.allclose(logits, ref["logits"], atol=1e-5, rtol=0)  # the oracle's were computed on another CPU


@pytest.mark.slow
def test_fold_bits_do_not_depend_on_the_window_size(fp32_ws2, tmp_path):
    """Tiny buffers cut weights into windows of a few rows (BLAS would round a 1-row product otherwise)."""
    out = tmp_path / "out"
    merge(fp32_ws2, out, optimizer=False, lora="fold", buffer_size="24KiB", workers=2)
    merged = load_file(fp32_ws2 / "reference" / "merged.safetensors")
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[k], merged[k]) for k in merged)
    report = verify(out, fp32_ws2, chunk_size=4096)
    assert report.ok, report.failures


@pytest.mark.slow
def test_verify_fails_on_a_tampered_fold(fp32_ws2, tmp_path):
    out = tmp_path / "out"
    merge(fp32_ws2, out, optimizer=False, lora="fold")
    assert not (out / "lora_adapter").exists()
    name = "model.layers.1.self_attn.o_proj.weight"
    failures = _verify_tampered_fold(out, fp32_ws2, name, (3, 5))
    # not only the manifest's sha256: the recomputed fold names the tensor
    assert any(name in p and "peft folds it" in p for p in failures), failures


@pytest.mark.slow
def test_verify_without_a_manifest_fails_an_adapter_config_that_changes_the_adapter(fp32_ws2, tmp_path):
    """A folder whose .streammerge/ is gone: another writer's adapter_config.json keys are notes, but a value peft
    builds the adapter from (lora_alpha: four times the trained delta) fails."""
    out = tmp_path / "out"
    merge(fp32_ws2, out, optimizer=False, lora="both")
    shutil.rmtree(out / ".streammerge")
    assert verify(out, fp32_ws2).ok
    path = out / "lora_adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "peft_version": "0.0.1"}))  # another writer's key: a note
    assert verify(out, fp32_ws2).ok
    path.write_text(json.dumps({**config, "lora_alpha": config["lora_alpha"] * 4}))
    failures = verify(out, fp32_ws2).failures
    assert any(f.startswith("lora_adapter/adapter_config.json: differs") and "'lora_alpha'" in f for f in failures), \
        failures
    # keys that change which modules peft adapts (they passed as notes), and peft's own defaults (still equal)
    for key, value in (("exclude_modules", ["q_proj"]), ("layer_replication", [[0, 1]]), ("lora_bias", True)):
        path.write_text(json.dumps({**config, key: value}))
        failures = verify(out, fp32_ws2).failures
        assert any(f.startswith("lora_adapter/adapter_config.json: differs") and repr(key) in f for f in failures), \
            (key, failures)
    path.write_text(json.dumps({**config, "exclude_modules": None, "layer_replication": None, "lora_bias": False}))
    assert verify(out, fp32_ws2).ok


def _verify_tampered_fold(out: Path, ckpt: Path, name: str, index: tuple[int, int]) -> list[str]:
    """verify's failures after one element of the folded weight `name` in OUT's model.safetensors changed."""
    from safetensors.torch import save_file

    tensors = load_file(out / "model.safetensors")
    tensors[name][index] += 1e-3
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    report = verify(out, ckpt)
    assert not report.ok
    return report.failures


@pytest.mark.slow
def test_bf16_output_is_the_float32_fold_rounded_once(fp32_ws2, tmp_path):
    """--dtype bfloat16: the fold in float32 then one rounding, which peft's merge in bf16 is not (measured)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    merge(fp32_ws2, out, optimizer=False, dtype="bfloat16", lora="fold")
    got = load_file(out / "model.safetensors")
    merged = load_file(fp32_ws2 / "reference" / "merged.safetensors")
    assert all(torch.equal(got[k], merged[k].to(torch.bfloat16)) for k in merged)
    # peft merging a bf16 model rounds W, B @ A and their sum each to bf16
    base = AutoModelForCausalLM.from_pretrained(fp32_ws2 / "reference" / "base", dtype=torch.bfloat16)
    tmp = tmp_path / "both"
    merge(fp32_ws2, tmp, optimizer=False, lora="adapter")
    peft_bf16 = PeftModel.from_pretrained(base, tmp / "lora_adapter", torch_dtype=torch.bfloat16).merge_and_unload()
    sd = peft_bf16.state_dict()
    ours = max((got[k].float() - merged[k]).abs().max().item() for k in merged)
    theirs = max((sd[k].float() - merged[k]).abs().max().item() for k in merged)
    print(f"bf16 output vs float32 peft merge: max |diff| ours {ours:.3g}, peft merging in bf16 {theirs:.3g}")
    assert ours <= theirs


@pytest.mark.slow
def test_three_ranks_bf16_lora_only_with_base_folder_and_modules_to_save(bf16_ws3_lora_only, tmp_path, capsys):
    actor = bf16_ws3_lora_only
    base = actor / "reference" / "base"
    rc, err = run(["merge", actor, tmp_path / "none"], capsys)
    assert rc == 2 and "--base-model" in err and err.count("\n") == 1
    out = tmp_path / "out"
    rc, err = run(["merge", actor, out, "--base-model", base], capsys)
    assert rc == 0, err
    assert_equals_peft_merge(actor, out)
    assert_adapter_reproduces_training(actor, out, base)
    cfg = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head"] and cfg["lora_alpha"] == 32
    report = verify(out, actor)
    assert report.ok, report.failures
    # a copy without the manifest (as pulled from the Hub): verify needs the base the merge took, as the merge did
    pulled = tmp_path / "pulled"
    shutil.copytree(out, pulled, ignore=shutil.ignore_patterns(".streammerge"))
    rc, err = run(["verify", pulled, actor], capsys)
    assert rc != 0 and "--base-model" in err + run.out, (err, run.out)  # type: ignore[attr-defined]
    rc, err = run(["verify", pulled, actor, "--base-model", base], capsys)
    assert rc == 0, run.out  # type: ignore[attr-defined]
    other = tmp_path / "other-base"  # the same weights elsewhere: not the base this merge recorded
    shutil.copytree(base, other)
    failures = verify(out, actor, base_model=str(other)).failures
    ran = f"--base-model {other}: the merge ran with --base-model {base}"
    assert any(f.startswith(ran) for f in failures), failures
    # the base given is the one compared with: another base's weights fail the folded tensor they change
    weights = load_file(other / "model.safetensors")
    changed = next(k for k in sorted(weights) if k.endswith("q_proj.weight"))
    weights[changed] = weights[changed].clone()
    weights[changed].view(-1)[0] += 1
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    failures = verify(pulled, actor, base_model=str(other)).failures
    assert any(changed in f for f in failures), failures
    # the adapter alone needs no base
    rc, err = run(["merge", actor, tmp_path / "adapter", "--lora", "adapter", "--no-optimizer"], capsys)
    assert rc == 0, err
    assert_adapter_reproduces_training(actor, tmp_path / "adapter", base)
    # with no base there is no model: no top-level weights or config.json (transformers would build a random model)
    top = {p.name for p in (tmp_path / "adapter").iterdir() if p.is_file()}
    assert not top & {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"}
    assert "only the LoRA adapter is written" in err
    from transformers import AutoModelForCausalLM
    with pytest.raises((OSError, ValueError)):
        AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert verify(tmp_path / "adapter", actor).ok


@pytest.mark.slow
def test_a_base_model_folder_is_read_only_where_it_lies(tmp_path):
    """--base-model's index names its shard files (from the Hub: whatever its owner wrote); a name that leaves the
    folder would read weights elsewhere on this machine. A header that is no object is one line too."""
    from streammerge.sources.hf import HFSource

    other, base = tmp_path / "other", tmp_path / "base"
    other.mkdir()
    base.mkdir()
    save_file({"w": torch.ones(2)}, other / "model.safetensors", metadata={"format": "pt"})
    for name in ("../other/model.safetensors", str(other / "model.safetensors")):
        (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
        with pytest.raises(CheckpointError, match=f"names '{re.escape(name)}', which is no file in"):
            HFSource(base).tensors()
    (base / "model.safetensors.index.json").unlink()
    (base / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(CheckpointError, match="its header is a list, not an object"):
        HFSource(base).tensors()


def test_checkpoint_without_meta_needs_the_flags(no_meta_rslora, tmp_path, capsys):
    actor = no_meta_rslora
    rc, err = run(["merge", actor, tmp_path / "none"], capsys)
    assert rc == 2 and "--lora-alpha" in err and "lora_train_meta.json" in err
    rc, err = run(["merge", actor, tmp_path / "wrong", "--lora-rank", "8", "--lora-alpha", "8"], capsys)
    assert rc == 2 and "rank 8" in err
    out = tmp_path / "out"
    rc, err = run(["merge", actor, out, "--lora-rank", "4", "--lora-alpha", "8", "--lora-rslora", "--no-optimizer"],
                  capsys)
    assert rc == 0, err
    assert_equals_peft_merge(actor, out)
    assert_adapter_reproduces_training(actor, out, actor / "reference" / "base")
    assert json.loads((out / "lora_adapter" / "adapter_config.json").read_text())["use_rslora"] is True
    # without --lora-rslora the scale is alpha/r: the weights cannot tell, so the flag matters
    plain = tmp_path / "plain"
    merge(actor, plain, optimizer=False, lora="fold", lora_rank=4, lora_alpha=8)
    merged = load_file(actor / "reference" / "merged.safetensors")
    got = load_file(plain / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got[q], merged[q])


@pytest.mark.slow
def test_inspect_shows_r_alpha_and_scale(fp32_ws2, capsys):
    rc, err = run(["inspect", fp32_ws2], capsys)
    assert rc == 0, err
    assert "r 8, alpha 16, scale 2" in run.out and "+ LoRA" in run.out  # type: ignore[attr-defined]


@pytest.mark.slow
def test_push_sends_fold_adapter_and_a_card_naming_the_base(fp32_ws2, hub, hub_env, tmp_path):
    from hubserver import WRITE_TOKEN

    from streammerge.hub.publish import merge_and_push
    from streammerge.hub.retry import RetryPolicy

    base = fp32_ws2 / "reference" / "base"
    hub.create_repo("acme/tiny-base")
    hub.add_files("acme/tiny-base", {p.name: p.read_bytes() for p in base.iterdir()})
    actor = tmp_path / "lora_only"
    shutil.copytree(fp32_ws2, actor)
    for f in actor.glob("model_world_size_*.pt"):  # keep only the adapter: as save_lora_only writes it
        sd = torch.load(f, weights_only=True)
        torch.save({k: v for k, v in sd.items() if ".lora_" in k}, f)
    retry = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2)
    result = merge_and_push(actor, tmp_path / "out", "tiny-lora", base_model="acme/tiny-base", token=WRITE_TOKEN,
                            endpoint=hub.endpoint, retry=retry, optimizer=False)
    fetched = {e.path.rsplit("/", 1)[-1] for e in hub.requests("GET", r"^/acme/tiny-base/resolve/")}
    assert fetched == {"model.safetensors", "config.json"}  # weights and config only, no tokenizer or card
    files = set(hub.files("alice/tiny-lora"))
    assert {"model.safetensors", "lora_adapter/adapter_model.safetensors", "lora_adapter/adapter_config.json"} <= files
    card = hub.file_bytes("alice/tiny-lora", "README.md").decode()
    assert "LoRA fine-tune of `acme/tiny-base` (r=8, lora_alpha=16)" in card and "base_model: acme/tiny-base" in card
    assert_equals_peft_merge(fp32_ws2, result.out_dir)
    # a later push of the fold alone deletes the adapter folder it no longer brings
    merge_and_push(actor, tmp_path / "out2", "tiny-lora", base_model="acme/tiny-base", token=WRITE_TOKEN,
                   endpoint=hub.endpoint, retry=retry, optimizer=False, lora="fold")
    assert not any(f.startswith("lora_adapter/") for f in hub.files("alice/tiny-lora"))


@pytest.mark.parametrize("recorded, base", [
    ("/mnt/train/models/Qwen2.5-0.5B", None),  # a folder of the training machine: names nothing public
    ("/root/.cache/huggingface/hub/models--acme--tiny-base/snapshots/0123abc", "acme/tiny-base"),  # a cache snapshot
])
def test_a_base_recorded_as_a_path_is_pushed_as_a_model_id_or_not_at_all(fp32_ws2, hub, hub_env, tmp_path, recorded,
                                                                          base):
    """config.json's `_name_or_path` is where the run loaded the base from. The Hub refuses a card whose base_model is
    a path (the test server as well), so the card names the model id a cache snapshot stands for, or no base; the
    exported adapter_config.json names that id too, else the path as peft would."""
    from hubserver import WRITE_TOKEN

    from streammerge.hub.publish import merge_and_push
    from streammerge.hub.retry import RetryPolicy

    actor = tmp_path / "actor"
    shutil.copytree(fp32_ws2, actor)
    cfg = actor / "huggingface" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_name_or_path": recorded}))
    result = merge_and_push(actor, tmp_path / "out", "tiny-lora", token=WRITE_TOKEN, endpoint=hub.endpoint,
                            retry=RetryPolicy(attempts=1), optimizer=False)
    assert result.ok
    from huggingface_hub import ModelCard

    card = ModelCard(hub.file_bytes("alice/tiny-lora", "README.md").decode())
    assert card.data.to_dict().get("base_model") == base
    assert f"LoRA fine-tune of `{base or 'Qwen2.5-0.5B'}`" in card.text
    adapter = json.loads(hub.file_bytes("alice/tiny-lora", "lora_adapter/adapter_config.json"))
    assert adapter["base_model_name_or_path"] == (base or recorded)


# ---- refusals: real peft models of each kind streammerge does not fold ----------------------------

def _save_peft(tmp_path: Path, model, config=None) -> Path:
    """A peft model's state dict as 2 ranks of DTensor rank files (Shard(0)), with huggingface/ and meta."""
    from torch.distributed.tensor import Shard

    from streammerge.testing.rankfiles import write_rank_files

    actor = tmp_path / "actor"
    specs = {k: (v.detach().clone(), [Shard(0)]) for k, v in model.state_dict().items()}
    write_rank_files(actor, specs, (2,))
    (config or model_config(LoraSpec(""))).save_pretrained(actor / "huggingface")
    (actor / "lora_train_meta.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "task_type": "CAUSAL_LM"}))
    return actor


def _peft(**extra):
    from peft import get_peft_model
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

    spec = LoraSpec("", hidden_size=32, num_layers=1)
    torch.manual_seed(0)
    return get_peft_model(Qwen2ForCausalLM(model_config(spec)), lora_config(spec, **extra)), model_config(spec)


@pytest.mark.parametrize("extra, message", [
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "LoRA biases"),
    ({"rank_pattern": {"q_proj": 4}}, "several ranks"),
])
def test_refuses_what_it_cannot_fold_exactly(tmp_path, capsys, extra, message):
    model, config = _peft(**extra)
    actor = _save_peft(tmp_path, model, config)
    with pytest.raises(CheckpointError, match=message):
        plan_merge(actor)
    rc, err = run(["merge", actor, tmp_path / "out"], capsys)
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("edit, message", [
    ("int8_base", "its base weight is int8, which the fold"),
    ("complex_a", "its lora_A is complex64, which the fold"),
    ("vector_a", "are not both matrices; cannot fold"),
])
def test_refuses_factors_and_bases_it_cannot_fold_exactly(tmp_path, capsys, edit, message):
    """A quantized (integer) base would be truncated after the fold, a complex factor lose its imaginary part, and
    a lora_A that is no matrix has no rank: refused in one line (exit 2), nothing written."""
    model, config = _peft()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if k.endswith("q_proj.base_layer.weight"))
    a_key = key.replace("base_layer", "lora_A.default")
    if edit == "int8_base":
        state[key] = (state[key] * 100).round().to(torch.int8)
    elif edit == "complex_a":
        state[a_key] = torch.complex(state[a_key], state[a_key])
    else:
        state[a_key] = state[a_key].reshape(-1)
    actor = _save_peft(tmp_path, type("M", (), {"state_dict": lambda self: state})(), config)
    rc, err = run(["merge", actor, tmp_path / "out", "--lora", "fold"], capsys)
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_refuses_embedding_lora(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

    config = model_config(LoraSpec("", hidden_size=32, num_layers=1))
    model = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=8, lora_alpha=16,
                                                               target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(CheckpointError, match="LoRA on embeddings"):
        plan_merge(_save_peft(tmp_path, model, config))


def test_refuses_several_adapters(tmp_path):
    model, config = _peft()
    model.add_adapter("second", lora_config(LoraSpec("")))
    with pytest.raises(CheckpointError, match="several LoRA adapters"):
        plan_merge(_save_peft(tmp_path, model, config))


def test_refuses_a_lora_a_without_its_b(tmp_path):
    model, config = _peft()
    actor = tmp_path / "x"
    from torch.distributed.tensor import Shard

    from streammerge.testing.rankfiles import write_rank_files

    sd = {k: (v.detach().clone(), [Shard(0)]) for k, v in model.state_dict().items() if "q_proj.lora_B" not in k}
    write_rank_files(actor, sd, (2,))
    config.save_pretrained(actor / "huggingface")
    (actor / "lora_train_meta.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    with pytest.raises(CheckpointError, match="not its pair"):
        plan_merge(actor)


def test_missing_alpha_is_a_config_error_naming_the_flag(tmp_path):
    model, config = _peft()
    actor = _save_peft(tmp_path, model, config)
    (actor / "lora_train_meta.json").unlink()
    with pytest.raises(ConfigError, match="--lora-alpha") as e:
        plan_merge(actor)
    assert "--lora-rank" in str(e.value) and "--lora-rslora" in str(e.value)


@pytest.mark.parametrize("tuner, message", [
    ("vera", "not LoRA's A, B or base weight"),
    ("ia3", "not LoRA's A, B or base weight"),
    ("loha", "not LoRA's A, B or base weight"),
    ("adalora", "not LoRA's A, B or base weight"),
    ("trainable_tokens", "trainable tokens"),
])
def test_refuses_other_peft_tuners(tmp_path, capsys, tuner, message):
    """Other tuners' tensors are neither a LoRA pair nor the model's: written as they are, transformers would load
    a model with their modules newly initialised (VeRA's keys are not even under base_model.model.)."""
    import peft
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

    targets = ["q_proj", "v_proj"]
    configs = {
        "vera": lambda: peft.VeraConfig(r=4, target_modules=targets),
        "ia3": lambda: peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=targets),
        "adalora": lambda: peft.AdaLoraConfig(r=4, lora_alpha=8, target_modules=targets, total_step=10),
        "trainable_tokens": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"],
                                                    trainable_token_indices=[5, 6]),
    }
    config = model_config(LoraSpec("", hidden_size=32, num_layers=1))
    torch.manual_seed(0)
    model = peft.get_peft_model(Qwen2ForCausalLM(config), configs[tuner]())
    actor = _save_peft(tmp_path, model, config)
    rc, err = run(["merge", actor, tmp_path / "out"], capsys)
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_lora_on_the_lm_head_of_a_tied_model(tmp_path, capsys):
    """peft trains lm_head's own delta over the embedding it shares: the trained model has lm_head W + s B A and the
    embedding W, which a tied model cannot hold. The merge refuses; with the config untied, both are written and
    lm_head is peft's own fold (W + its get_delta_weight), bit for bit."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

    config = model_config(LoraSpec("", hidden_size=32, num_layers=1))
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "lm_head"])
    model = get_peft_model(Qwen2ForCausalLM(config), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # trained: B is no longer zero
    actor = _save_peft(tmp_path, model, config)
    rc, err = run(["merge", actor, tmp_path / "out"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert "tie_word_embeddings" in err and "lm_head.weight with its LoRA folded in differs" in err
    assert not (tmp_path / "out").exists()

    cfg = json.loads((actor / "huggingface" / "config.json").read_text())
    (actor / "huggingface" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    rc, err = run(["merge", actor, tmp_path / "out", "--dtype", "float32"], capsys)
    assert rc == 0, err
    got = load_file(tmp_path / "out" / "model.safetensors")
    head = model.base_model.model.lm_head
    with torch.no_grad():
        want = head.base_layer.weight + head.get_delta_weight("default")
    assert torch.equal(got["lm_head.weight"], want)
    assert torch.equal(got["model.embed_tokens.weight"], head.base_layer.weight)  # the embedding stayed W
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.arange(12).view(1, 12) % config.vocab_size
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-4, rtol=0)
    assert verify(tmp_path / "out", actor).ok


# ---- peft's adapter_config.json, read strictly ---------------------------------------------------------------

def _trained_peft(model_cls=None, config=None, **extra):
    """A real peft model with every lora_B (and the biases peft trains) moved off its initial value, as training
    leaves it; also its config and the untouched base model's state dict."""
    from peft import LoraConfig, get_peft_model
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

    config = config or model_config(LoraSpec("", hidden_size=32, num_layers=1))
    torch.manual_seed(0)
    base = (model_cls or Qwen2ForCausalLM)(config)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(1)
    settings = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0,
                "task_type": "CAUSAL_LM", **extra}
    model = get_peft_model(base, LoraConfig(**settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or (name.endswith(".bias") and p.requires_grad):
                p.add_(torch.randn_like(p) * 0.1)
    return model, config, base_sd


def _adapter_as_peft_saved(tmp_path: Path, actor: Path, capsys, *args: str, biases: bool = False) -> Path:
    """Merge `actor` into tmp_path/out; its exported adapter file must equal peft's save_pretrained one tensor for
    tensor (with trained biases among them, if `biases`)."""
    out = tmp_path / "out"
    rc, err = run(["merge", actor, out, *args, "--no-optimizer"], capsys)
    assert rc == 0, err
    want = load_file(tmp_path / "peft_saved" / "adapter_model.safetensors")
    got = load_file(out / "lora_adapter" / "adapter_model.safetensors")
    assert not biases or any(k.endswith(".bias") for k in want)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    return out


def _save_actor(tmp_path: Path, model, config, *, place: str | None = "lora_adapter", meta: dict | None = None,
                keep=lambda k: True, edit: dict | None = None) -> Path:
    """The peft model's state dict (keys kept by `keep`) as 2 DTensor ranks, huggingface/config.json, and peft's own
    adapter_config.json (save_pretrained's, with `edit` applied) in `place` (None: none), and meta if given."""
    from torch.distributed.tensor import Shard

    from streammerge.testing.rankfiles import write_rank_files

    actor = tmp_path / "actor"
    specs = {k: (v.detach().clone(), [Shard(0)]) for k, v in model.state_dict().items() if keep(k)}
    write_rank_files(actor, specs, (2,))
    config.save_pretrained(actor / "huggingface")
    if place is not None:
        saved = tmp_path / "peft_saved"
        model.save_pretrained(saved)
        cfg = {**json.loads((saved / "adapter_config.json").read_text()), **(edit or {})}
        (actor / place).mkdir(parents=True, exist_ok=True)
        (actor / place / "adapter_config.json").write_text(json.dumps(cfg))
    if meta is not None:
        (actor / "lora_train_meta.json").write_text(json.dumps(meta))
    return actor


META = {"r": 8, "lora_alpha": 16, "task_type": "CAUSAL_LM"}  # veRL's lora_train_meta.json beside peft's config


def _peft_merged(model) -> dict:
    """peft's merge_and_unload() of a copy (it unloads the model it is called on)."""
    import copy

    return {k: v.detach().clone() for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()}


def _assert_bits(out: Path, want: dict) -> None:
    got = load_file(out / "model.safetensors")
    assert set(got) == set(want)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} tensors differ from peft's merge, e.g. {differ[0]}"


@pytest.mark.parametrize("place", ["", "lora_adapter", "huggingface"])
def test_adapter_config_gives_r_alpha_and_rslora(tmp_path, capsys, place):
    """No lora_train_meta.json and no flags: peft's adapter_config.json (where veRL or save_pretrained put it) says
    r 8, lora_alpha 16 and use_rslora, and the fold is peft's merge bit for bit (rsLoRA: not alpha/r)."""
    model, config, _ = _trained_peft(use_rslora=True)
    actor = _save_actor(tmp_path, model, config, place=place)
    rc, err = run(["merge", actor, tmp_path / "out", "--dtype", "float32", "--no-optimizer"], capsys)
    assert rc == 0, err
    _assert_bits(tmp_path / "out", _peft_merged(model))
    cfg = json.loads((tmp_path / "out" / "lora_adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (8, 16, True)
    # huggingface/adapter_config.json is not carried beside config.json: transformers would load OUT as an adapter
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("where, field, value", [
    ("lora_adapter/adapter_config.json", "r", 8.0),
    ("lora_adapter/adapter_config.json", "r", "8"),
    ("lora_adapter/adapter_config.json", "r", True),
    ("lora_adapter/adapter_config.json", "r", 0),
    ("lora_adapter/adapter_config.json", "lora_alpha", "16"),
    ("lora_adapter/adapter_config.json", "lora_alpha", True),
    ("lora_adapter/adapter_config.json", "use_rslora", "false"),
    ("lora_adapter/adapter_config.json", "use_rslora", 0),
    ("lora_train_meta.json", "r", 8.0),
    ("lora_train_meta.json", "lora_alpha", False),
    ("lora_train_meta.json", "use_rslora", "true"),
])
def test_recorded_values_of_the_wrong_type_are_refused(tmp_path, capsys, where, field, value):
    model, config, _ = _trained_peft()
    meta = {"r": 8, "lora_alpha": 16}
    if where == "lora_train_meta.json":
        meta[field] = value
    actor = _save_actor(tmp_path, model, config, meta=meta,
                        edit={field: value} if where != "lora_train_meta.json" else None)
    rc, err = run(["merge", actor, tmp_path / "out"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{actor / where}: {field} is {json.dumps(value)}" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("flags, message", [
    (["--lora-alpha", "32"], "--lora-alpha 32.0 contradicts {cfg}: lora_alpha 16"),
    (["--lora-rank", "4"], "--lora-rank 4 contradicts {cfg}: r 8"),
    (["--lora-rslora"], "--lora-rslora true contradicts {cfg}: use_rslora false"),
])
def test_an_option_contradicting_the_adapter_config_is_refused(tmp_path, capsys, flags, message):
    model, config, _ = _trained_peft()
    actor = _save_actor(tmp_path, model, config)
    rc, err = run(["merge", actor, tmp_path / "out", *flags], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert message.format(cfg=actor / "lora_adapter" / "adapter_config.json") in err
    # options that agree with the file are fine
    rc, err = run(["merge", actor, tmp_path / "ok", "--lora-alpha", "16", "--lora-rank", "8", "--no-optimizer"],
                  capsys)
    assert rc == 0, err


def test_two_files_that_disagree_are_refused_naming_both(tmp_path, capsys):
    model, config, _ = _trained_peft()
    actor = _save_actor(tmp_path, model, config, meta={"r": 8, "lora_alpha": 32})
    rc, err = run(["merge", actor, tmp_path / "out"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{actor / 'lora_train_meta.json'}: lora_alpha is 32" in err
    assert f"{actor / 'lora_adapter' / 'adapter_config.json'}: lora_alpha is 16" in err


@pytest.mark.parametrize("extra, keep, message", [
    # DoRA's magnitude vectors left out of the rank files (an adapter-only save): the config still says DoRA
    ({"use_dora": True}, lambda k: "lora_magnitude_vector" not in k, "DoRA"),
    # one alpha for q_proj: every rank is 8, so nothing in the weights shows that q_proj's scale differs
    ({"alpha_pattern": {"q_proj": 64}}, None, "alpha_pattern"),
    ({"target_modules": ["q_proj"], "rank_pattern": {"q_proj": 4}, "r": 8, "lora_alpha": 16}, None, "rank_pattern"),
])
def test_adapter_config_refusals_of_what_the_fold_cannot_do(tmp_path, capsys, extra, keep, message):
    model, config, _ = _trained_peft(**extra)
    actor = _save_actor(tmp_path, model, config, keep=keep or (lambda k: True))
    rc, err = run(["merge", actor, tmp_path / "out"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert message in err and "adapter_config.json" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_the_exported_adapter_config_keeps_the_runs_dropout(tmp_path, capsys):
    """It said lora_dropout 0.0 whatever the run used: training on from the exported adapter changed its recipe."""
    model, config, _ = _trained_peft(lora_dropout=0.05)
    actor = _save_actor(tmp_path, model, config)
    rc, err = run(["merge", actor, tmp_path / "out", "--no-optimizer"], capsys)
    assert rc == 0, err
    cfg = json.loads((tmp_path / "out" / "lora_adapter" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft_saved" / "adapter_config.json").read_text())
    assert cfg["lora_dropout"] == peft_cfg["lora_dropout"] == 0.05
    actor2 = _save_actor(tmp_path / "2", model, config, edit={"lora_dropout": "0.05"})
    rc, err = run(["merge", actor2, tmp_path / "out2"], capsys)
    assert rc == 2 and err.count("\n") == 1 and 'lora_dropout is "0.05"; it must be a number from 0 to 1' in err, err


def test_a_rank_and_alpha_pattern_giving_every_module_r_and_alpha_merges_as_peft(tmp_path, capsys):
    """A pattern that names the common rank and alpha (a config written by a sweep) changes nothing: it was refused."""
    model, config, _ = _trained_peft(rank_pattern={"q_proj": 8, "v_proj": 8}, alpha_pattern={"q_proj": 16})
    actor = _save_actor(tmp_path, model, config)
    assert json.loads((actor / "lora_adapter" / "adapter_config.json").read_text())["rank_pattern"] == {
        "q_proj": 8, "v_proj": 8}
    rc, err = run(["merge", actor, tmp_path / "out", "--dtype", "float32", "--no-optimizer"], capsys)
    assert rc == 0, err
    _assert_bits(tmp_path / "out", _peft_merged(model))
    model2, _, _ = _trained_peft(rank_pattern={"q_proj": 8}, alpha_pattern={"q_proj": 32})  # q_proj scaled twice
    actor2 = _save_actor(tmp_path / "2", model2, config)
    rc, err = run(["merge", actor2, tmp_path / "out2"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert 'alpha_pattern is {"q_proj": 32}: a lora_alpha per module other than lora_alpha 16' in err, err


@pytest.mark.parametrize("edit, message", [
    ({"init_lora_weights": "some_new_method"}, "an initialisation streammerge does not know"),
    ({"layer_replication": [[0, 1], [0, 1]]}, "layers repeated over shared base weights"),
    ({"alora_invocation_tokens": [5, 6]}, "activated LoRA"),
    ({"peft_type": "IA3"}, "another peft method is not LoRA"),
    ({"lora_bias": True}, "LoRA biases"),
    # LoRA variants peft 0.21 has (each a LoraConfig field): the weights look like a LoRA's, the config says otherwise
    ({"velora_config": {"num_groups": 4}}, "VeLoRA is a LoRA variant streammerge does not fold or export exactly"),
    ({"monteclora_config": {"num_samples": 2}}, "MonteCLoRA is a LoRA variant"),
    ({"arrow_config": {"top_k": 2}}, "Arrow (per-token routing"),
    ({"use_qalora": True}, "QALoRA"),
])
def test_adapter_config_settings_that_change_the_function_are_refused(tmp_path, capsys, edit, message):
    model, config, _ = _trained_peft()
    actor = _save_actor(tmp_path, model, config, edit=edit)
    rc, err = run(["merge", actor, tmp_path / "out"], capsys)
    assert rc == 2 and err.count("\n") == 1 and message in err, err


def test_lora_on_moe_expert_parameters_is_refused_as_target_parameters(tmp_path, capsys):
    """peft's ParamWrapper (target_parameters) adapts a 3-D experts tensor: there is no base_layer.weight."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    model, config, _ = _trained_peft(Qwen2MoeForCausalLM, config, r=4, lora_alpha=8, target_modules=["q_proj"],
                                     target_parameters=["mlp.experts.gate_up_proj"])
    for place in (None, "lora_adapter"):  # from the tensors alone, and from the config
        shutil.rmtree(tmp_path / "actor", ignore_errors=True)
        actor = _save_actor(tmp_path, model, config, place=place, meta={"r": 4, "lora_alpha": 8})
        rc, err = run(["merge", actor, tmp_path / "out"], capsys)
        assert rc == 2 and err.count("\n") == 1 and "target_parameters" in err, err


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_fold_only_onto_the_residual_base_they_saved(tmp_path, capsys, init):
    """PiSSA and OLoRA replace W by W - s B0 A0 when the adapter is made: the checkpoint's base_layer.weight is that
    residual, and its fold is peft's merge bit for bit; an adapter exported for the original base, or folded onto it
    (an adapter-only checkpoint with --base-model), would be another model, so both are refused."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

    model, config, base_sd = _trained_peft(init_lora_weights=init)
    actor = _save_actor(tmp_path, model, config, meta=META)
    rc, err = run(["merge", actor, tmp_path / "both"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--lora fold" in err and init in err, err
    rc, err = run(["merge", actor, tmp_path / "fold", "--lora", "fold", "--dtype", "float32", "--no-optimizer"],
                  capsys)
    assert rc == 0, err

    base = Qwen2ForCausalLM(config)
    base.load_state_dict(base_sd)
    base.save_pretrained(tmp_path / "base")  # the original, untouched base model
    only = tmp_path / "only"
    only.mkdir()
    adapter_only = _save_actor(only, model, config, keep=lambda k: ".lora_" in k, meta=META)
    capsys.readouterr()
    rc, err = run(["merge", adapter_only, tmp_path / "onbase", "--lora", "fold", "--base-model", tmp_path / "base"],
                  capsys)
    assert rc == 2 and err.count("\n") == 1 and "residual" in err, err
    _assert_bits(tmp_path / "fold", _peft_merged(model))


# ---- GPT-2-style Conv1D: W kept as [in, out], peft folds (B @ A).T --------------------------------------------

CONV1D_TARGETS = ["c_attn", "c_proj", "c_fc"]  # attn.c_attn, the square attn.c_proj, mlp.c_fc and mlp.c_proj


def _gpt2(**extra):
    """A trained peft LoRA of a tiny GPT-2: mlp.c_fc is 64 -> 1024, so B @ A has several of the fold's row blocks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=64, n_inner=1024, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    config.architectures = ["GPT2LMHeadModel"]
    return _trained_peft(GPT2LMHeadModel, config, **{"target_modules": CONV1D_TARGETS, **extra})


def _merged_as_saved(model) -> dict:
    """peft's merge_and_unload() with each tied tensor once (the first name, as save_pretrained keeps it)."""
    seen, out = set(), {}
    for k, v in model.merge_and_unload().state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v.detach().clone()
    return out


def _merged_conv1d(model, base_sd: dict) -> dict:
    """peft's merge (as _merged_as_saved), checked to mean something: every Conv1D's B is trained, and its fold differs
    from W and, where it is square (it fits either way round), from the untransposed W + s B A."""
    layers = [(name.removeprefix("base_model.model.") + ".weight", m.lora_A["default"].weight.detach().clone(),
               m.lora_B["default"].weight.detach().clone(), m.scaling["default"], m.fan_in_fan_out)
              for name, m in model.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    want = _merged_as_saved(model)
    square = 0
    for key, a, b, scale, fan_in_fan_out in layers:
        assert fan_in_fan_out and b.abs().min() > 0
        assert not torch.equal(want[key], base_sd[key])
        if a.shape[1] == b.shape[0]:
            square += 1
            assert not torch.equal(want[key], base_sd[key] + (b @ a) * scale)
    assert square
    return want


@pytest.mark.parametrize("buffer, dtype", [("64MiB", "float32"), ("24KiB", "float32"), ("24KiB", "bfloat16")])
def test_gpt2_conv1d_fold_is_peft_merge_bit_for_bit(tmp_path, capsys, buffer, dtype):
    """c_attn [64, 192], the square attn.c_proj, mlp.c_fc [64, 1024] and mlp.c_proj [1024, 64] get peft's
    W + (B @ A).T * scale, bit for bit; with 24KiB buffers the windows cut W anywhere (single elements, parts of rows)
    and still give the same bits. In bfloat16: peft's float32 merge rounded once, as for Linear folds."""
    model, config, base_sd = _gpt2()
    actor = _save_actor(tmp_path, model, config, meta=META)
    want = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
            for k, v in _merged_conv1d(model, base_sd).items()}
    rc, err = run(["merge", actor, tmp_path / "out", "--lora", "fold", "--dtype", dtype, "--no-optimizer",
                   "--buffer-size", buffer, "--workers", "2"], capsys)
    assert rc == 0, err
    _assert_bits(tmp_path / "out", want)
    from transformers import AutoModelForCausalLM
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_imagegpt_square_conv1d_fold_is_peft_merge(tmp_path, capsys):
    """attn.c_proj of ImageGPT is a square Conv1D: lora_A and lora_B fit it untransposed too, so only the model type
    tells that peft folds (B @ A).T into it. No adapter_config.json here (nothing records fan_in_fan_out)."""
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    config = ImageGPTConfig(vocab_size=17, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    config.architectures = ["ImageGPTForCausalImageModeling"]
    model, config, base_sd = _trained_peft(ImageGPTForCausalImageModeling, config, target_modules=["attn.c_proj"],
                                           task_type=None)
    actor = _save_actor(tmp_path, model, config, place=None, meta={"r": 8, "lora_alpha": 16})
    rc, err = run(["inspect", actor], capsys)
    assert rc == 0 and "1 of them Conv1D" in run.out and "+ LoRA.T" in run.out, err  # type: ignore[attr-defined]
    want = _merged_conv1d(model, base_sd)
    rc, err = run(["merge", actor, tmp_path / "out", "--lora", "fold", "--dtype", "float32", "--no-optimizer",
                   "--buffer-size", "24KiB"], capsys)
    assert rc == 0, err
    _assert_bits(tmp_path / "out", want)


def test_gpt2_conv1d_adapter_export_loads_as_the_trained_model(tmp_path, capsys):
    """--lora adapter: lora_A and lora_B as peft saves them (untransposed), adapter_config.json with fan_in_fan_out
    true as peft writes it for Conv1D targets; PeftModel on the untrained base gives the trained logits exactly, and
    peft has no fan_in_fan_out to correct while loading it."""
    import warnings

    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    model, config, base_sd = _gpt2()
    actor = _save_actor(tmp_path, model, config, meta=META)
    out = _adapter_as_peft_saved(tmp_path, actor, capsys, "--lora", "adapter")
    cfg = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft_saved" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and peft_cfg["fan_in_fan_out"] is True
    assert sorted(cfg["target_modules"]) == sorted(peft_cfg["target_modules"])
    base = GPT2LMHeadModel(config)
    base.load_state_dict(base_sd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base, out / "lora_adapter").eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    ids = torch.arange(12).view(1, 12) % config.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_verify_recomputes_the_conv1d_fold_and_fails_on_one_element(tmp_path, capsys):
    model, config, _ = _gpt2()
    actor = _save_actor(tmp_path, model, config, meta=META)
    out = tmp_path / "out"
    rc, err = run(["merge", actor, out, "--dtype", "float32", "--no-optimizer"], capsys)
    assert rc == 0, err
    for chunk in (None, 4096):  # verify's own windows, small ones cutting W too
        report = verify(out, actor, **({"chunk_size": chunk} if chunk else {}))
        assert report.ok, report.failures
    rc, err = run(["verify", out, actor], capsys)
    assert rc == 0, err
    name = "transformer.h.0.mlp.c_fc.weight"
    failures = _verify_tampered_fold(out, actor, name, (40, 700))
    # not only the manifest's sha256: the recomputed fold names the tensor and the element
    assert any(name in f and "peft folds it" in f and "[40, 700]" in f for f in failures), failures
    rc, err = run(["verify", out, actor], capsys)
    assert rc != 0


def test_gpt_bigcode_c_attn_is_a_linear(tmp_path, capsys):
    """GPTBigCode names its layers as GPT-2 does, but they are nn.Linear: folded untransposed, exported without
    fan_in_fan_out."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    config = GPTBigCodeConfig(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    config.architectures = ["GPTBigCodeForCausalLM"]
    model, config, _ = _trained_peft(GPTBigCodeForCausalLM, config, target_modules=CONV1D_TARGETS)
    actor = _save_actor(tmp_path, model, config, meta=META)
    rc, err = run(["merge", actor, tmp_path / "out", "--dtype", "float32", "--no-optimizer"], capsys)
    assert rc == 0, err
    cfg = json.loads((tmp_path / "out" / "lora_adapter" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is False
    _assert_bits(tmp_path / "out", _merged_as_saved(model))


def _vision_gpt2():
    """A real VisionEncoderDecoderModel (ViT encoder, GPT-2 decoder) with LoRA on the decoder's square attn.c_proj (a
    Linear's shapes fit it too)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=8,
                  patch_size=4),
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["attn.c_proj"])
    model = get_peft_model(VisionEncoderDecoderModel(config), lora)
    return model, config


@pytest.mark.parametrize("case, message", [
    ("no config", "no config.json to tell whether they are GPT-2-style Conv1D layers"),
    ("linear shapes in a gpt2", "(a GPT-2-style Conv1D's (in, out)); cannot fold"),
    ("conv1d shapes in a gpt_bigcode", "(a Linear's (out, in)); cannot fold"),
    ("fan_in_fan_out on qwen2", "fan_in_fan_out is true, but model_type 'qwen2' is none of the GPT-2-style"),
    ("gpt2 inside another model", "c_proj of a model that holds a GPT-2-style part (config.json decoder: gpt2)"),
    ("custom code, square c_proj", "square layers named c_proj of a model with its own modeling code"),
    ("custom code, c_fc [in, out]", "(a Linear's (out, in)); cannot fold"),
])
def test_conv1d_that_cannot_be_told_or_contradicts_its_shapes_is_refused(tmp_path, capsys, case, message):
    """Where the kind of a layer cannot be told, or its shapes contradict it, a one-line error: a square layer folded
    the wrong way round would load as another model."""
    from transformers import GPT2Config, GPTBigCodeConfig, GPTBigCodeForCausalLM

    if case == "no config":
        model, config, _ = _gpt2()
        actor = _save_actor(tmp_path, model, config, meta=META)
        (actor / "huggingface" / "config.json").unlink()
    elif case == "linear shapes in a gpt2":  # a GPTBigCode checkpoint whose config.json says gpt2
        small = {"n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 64, "n_positions": 32}
        model, _, _ = _trained_peft(GPTBigCodeForCausalLM, GPTBigCodeConfig(**small), target_modules=["c_attn"])
        actor = _save_actor(tmp_path, model, GPT2Config(**small), meta=META)
    elif case == "conv1d shapes in a gpt_bigcode":
        model, config, _ = _gpt2(target_modules=["c_attn"])
        small = {k: getattr(config, k) for k in ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions")}
        actor = _save_actor(tmp_path, model, GPTBigCodeConfig(**small), place=None, meta=META)  # no fan_in_fan_out
    elif case.startswith("custom code"):  # JAIS-like: its own modeling code, GPT-2's Conv1D, veRL's meta file only
        model, config, _ = _gpt2(target_modules=["attn.c_proj" if "square" in case else "mlp.c_fc"])
        actor = _save_actor(tmp_path, model, config, place=None, meta=META)
        cfg = actor / "huggingface" / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_type": "jais", "architectures": [
            "JAISLMHeadModel"], "auto_map": {"AutoModelForCausalLM": "modeling_jais.JAISLMHeadModel"}}))
    elif case == "fan_in_fan_out on qwen2":
        model, config, _ = _trained_peft()
        actor = _save_actor(tmp_path, model, config, meta=META, edit={"fan_in_fan_out": True})
    else:
        model, config = _vision_gpt2()
        actor = _save_peft(tmp_path, model, config)
    capsys.readouterr()  # transformers' warnings about the tiny configs are not the merge's
    rc, err = run(["merge", actor, tmp_path / "out"], capsys)
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_are_in_the_fold_and_the_adapter(tmp_path, capsys, bias):
    """bias="all" / "lora_only" train the biases (Qwen2's q, k, v_proj have them): the fold keeps the trained ones, and
    the exported adapter holds them as peft's save_pretrained does, so PeftModel on the untrained base gives the
    trained model again."""
    from peft import PeftModel
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

    model, config, base_sd = _trained_peft(target_modules=["q_proj", "o_proj"], bias=bias)
    actor = _save_actor(tmp_path, model, config, meta=META)
    out = _adapter_as_peft_saved(tmp_path, actor, capsys, "--dtype", "float32", biases=True)
    assert json.loads((out / "lora_adapter" / "adapter_config.json").read_text())["bias"] == bias
    only = tmp_path / "only"
    only.mkdir()
    adapter_only = _save_actor(only, model, config, keep=lambda k: ".lora_" in k, meta=META)
    base = Qwen2ForCausalLM(config)
    base.load_state_dict(base_sd)
    base.save_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(base, out / "lora_adapter").eval()
    ids = torch.arange(12).view(1, 12) % config.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    _assert_bits(out, _peft_merged(model))

    # an adapter-only checkpoint without the trained biases: the base model's untrained ones are refused
    capsys.readouterr()
    rc, err = run(["merge", adapter_only, tmp_path / "onbase", "--base-model", tmp_path / "base"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "trained biases" in err and "_proj.bias" in err, err


def _base_folder(tmp_path: Path, config, base_sd: dict, model_cls=None) -> Path:
    """The untouched base model, saved as a model folder for --base-model."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

    base = (model_cls or Qwen2ForCausalLM)(config)
    base.load_state_dict(base_sd)
    base.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _assert_adapter_gives_trained_logits(out: Path, base: Path, model) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "lora_adapter").eval()
    ids = torch.arange(12).view(1, 12) % loaded.config.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


# ---- adapter-only checkpoints: what the adapter tensors alone do not say ---------------------------------------

def test_modules_to_save_missing_from_an_adapter_only_checkpoint_is_refused(tmp_path, capsys):
    """modules_to_save=["lm_head"]: the trained lm_head is a copy beside the adapter. An adapter-only save that left it
    out would fold onto (and export for) the base model's untrained lm_head: refused in one line, in every mode, naming
    it. With the copy saved, the fold is peft's merge and the adapter loads as the trained model."""
    model, config, base_sd = _trained_peft(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)  # trained, as it would be
    base = _base_folder(tmp_path, config, base_sd)
    without = _save_actor(tmp_path / "without", model, config, keep=lambda k: ".lora_" in k, meta=META)
    capsys.readouterr()  # save_pretrained's progress bars are not the merge's
    for args in (["--base-model", base], ["--base-model", base, "--lora", "fold"], ["--lora", "adapter"]):
        rc, err = run(["merge", without, tmp_path / "out", "--no-optimizer", *args], capsys)
        assert rc == 2 and err.count("\n") == 1, err
        assert "modules_to_save names 'lm_head'" in err and "no trained copy of lm_head" in err, err
        assert not (tmp_path / "out").exists()

    kept = _save_actor(tmp_path / "kept", model, config, keep=lambda k: ".lora_" in k or ".modules_to_save." in k,
                       meta=META)
    out = tmp_path / "ok"
    rc, err = run(["merge", kept, out, "--base-model", base, "--no-optimizer", "--dtype", "float32"], capsys)
    assert rc == 0, err
    _assert_bits(out, _peft_merged(model))
    _assert_adapter_gives_trained_logits(out, base, model)


def test_an_adapter_only_modules_to_save_copy_with_a_bias_is_not_taken_for_a_trained_bias(tmp_path, capsys):
    """bias "none", modules_to_save=["k_proj"] (Qwen2's k_proj has a bias): the copy's bias goes with its module into
    the adapter file, so the adapter-only checkpoint is exported, and loads as the trained model."""
    model, config, base_sd = _trained_peft(target_modules=["q_proj", "o_proj"], modules_to_save=["k_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.3)
    base = _base_folder(tmp_path, config, base_sd)
    actor = _save_actor(tmp_path / "ck", model, config, keep=lambda k: ".lora_" in k or ".modules_to_save." in k,
                        meta=META)
    capsys.readouterr()
    rc, err = run(["merge", actor, tmp_path / "out", "--base-model", base, "--no-optimizer", "--dtype", "float32"],
                  capsys)
    assert rc == 0, err
    _assert_bits(tmp_path / "out", _peft_merged(model))
    _assert_adapter_gives_trained_logits(tmp_path / "out", base, model)


@pytest.mark.parametrize("recorded", [False, True])
def test_adapter_only_checkpoint_with_trained_biases(tmp_path, capsys, recorded):
    """bias="all" trains every bias, and peft's adapter save keeps them beside lora_A and lora_B. The fold onto
    --base-model writes the trained ones (peft's merge bit for bit). Where no file records the bias setting ("none"
    would be assumed), an exported adapter would leave them out and load with the base's biases: refused; where
    adapter_config.json records it, the adapter holds them as peft's save_pretrained does."""
    model, config, base_sd = _trained_peft(target_modules=["q_proj", "o_proj"], bias="all")
    base = _base_folder(tmp_path, config, base_sd)
    merged = _peft_merged(model)
    actor = _save_actor(tmp_path / "ck", model, config, keep=lambda k: ".lora_" in k or k.endswith(".bias"),
                        place="lora_adapter" if recorded else None, meta=META)
    capsys.readouterr()
    # trained biases differ from the base's: writing the base's would be another model
    k_bias = "model.layers.0.self_attn.k_proj.bias"
    assert not torch.equal(merged[k_bias], base_sd[k_bias])
    fold = tmp_path / "fold"
    rc, err = run(["merge", actor, fold, "--base-model", base, "--lora", "fold", "--no-optimizer", "--dtype",
                   "float32"], capsys)
    assert rc == 0, err
    _assert_bits(fold, merged)
    for args in (["--base-model", base], ["--lora", "adapter"]):
        rc, err = run(["merge", actor, tmp_path / "out", "--no-optimizer", "--dtype", "float32", *args], capsys)
        if recorded:
            assert rc == 0, err
            want = load_file(tmp_path / "ck" / "peft_saved" / "adapter_model.safetensors")
            got = load_file(tmp_path / "out" / "lora_adapter" / "adapter_model.safetensors")
            assert any(k.endswith(".bias") for k in want)
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
            _assert_adapter_gives_trained_logits(tmp_path / "out", base, model)
            shutil.rmtree(tmp_path / "out")
        else:
            assert rc == 2 and err.count("\n") == 1, err
            assert "no file records peft's bias setting" in err and "trained biases" in err and "--lora fold" in err
            assert not (tmp_path / "out").exists()


# ---- tensors that do not fit together --------------------------------------------------------------------------

Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _save_state(tmp_path: Path, state: dict, config) -> Path:
    """A state dict (a real peft model's, edited) as 2 DTensor ranks with huggingface/ and veRL's meta."""
    from torch.distributed.tensor import Shard

    from streammerge.testing.rankfiles import write_rank_files

    actor = tmp_path / "actor"
    write_rank_files(actor, {k: (v.detach().clone(), [Shard(0)]) for k, v in state.items()}, (2,))
    config.save_pretrained(actor / "huggingface")
    (actor / "lora_train_meta.json").write_text(json.dumps(META))
    return actor


def test_a_plain_weight_beside_base_layer_weight_is_refused(tmp_path, capsys):
    """peft keeps a LoRA-wrapped module's weight as base_layer.weight: a plain `weight` beside it would also be
    q_proj.weight, and which of the two is the base cannot be told (the merge took one and dropped the other)."""
    model, config, _ = _trained_peft(target_modules=["q_proj", "o_proj"])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state[Q + ".weight"] = state[Q + ".base_layer.weight"] + 1
    actor = _save_state(tmp_path, state, config)
    for mode in ("fold", "adapter", "both"):
        rc, err = run(["merge", actor, tmp_path / "out", "--lora", mode, "--no-optimizer"], capsys)
        assert rc == 2 and err.count("\n") == 1, err
        assert f"'{Q}.weight' beside its base_layer.weight" in err and "model.layers.0.self_attn.q_proj.weight" in err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, message", [
    ("b_rank", "q_proj: lora_B [32, 4] has 4 columns but lora_A [8, 32] has 8 rows"),
    ("a_rank", "q_proj: lora_A has 4 rows but 2 other modules' have 8"),
    ("a_in", "q_proj: lora_A [8, 16] and lora_B [32, 8] do not fit the base weight [32, 32]"),
])
def test_factors_that_do_not_fit_are_refused_in_every_mode(tmp_path, capsys, edit, message):
    """A lora_B whose columns are not lora_A's rows, one module of another rank, or a lora_A of another width than the
    base: refused in one line naming the module, by fold, adapter export (an adapter-only checkpoint too, where no
    base can be compared) and verify (the folder an earlier merge made, its checkpoint since replaced)."""
    model, config, base_sd = _trained_peft(target_modules=["q_proj", "v_proj", "o_proj"])
    good = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = dict(good)
    a, b = Q + ".lora_A.default.weight", Q + ".lora_B.default.weight"
    if edit == "b_rank":
        state[b] = good[b][:, :4].clone()
    elif edit == "a_rank":
        state[a], state[b] = good[a][:4].clone(), good[b][:, :4].clone()
    else:
        state[a] = good[a][:, :16].clone()
    actor = _save_state(tmp_path, state, config)
    for mode in ("fold", "adapter", "both"):
        rc, err = run(["merge", actor, tmp_path / mode, "--lora", mode, "--no-optimizer"], capsys)
        assert rc == 2 and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / mode).exists()

    only = _save_state(tmp_path / "only", {k: v for k, v in state.items() if ".lora_" in k}, config)
    # an adapter of another width than the base is caught against --base-model only: without one there is nothing
    # to compare it with (README)
    with_base = ["--base-model", _base_folder(tmp_path, config, base_sd)] if edit == "a_in" else []
    capsys.readouterr()
    rc, err = run(["merge", only, tmp_path / "only_out", "--lora", "adapter", "--no-optimizer", *with_base], capsys)
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "only_out").exists()

    out = tmp_path / "out"  # a folder merged from the good checkpoint, verified against this one
    rc, err = run(["merge", _save_state(tmp_path / "good", good, config), out, "--no-optimizer"], capsys)
    assert rc == 0, err
    rc, err = run(["verify", out, actor], capsys)
    assert rc == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("variant", ["bdlora", "kasa"])
def test_bd_lora_and_kasa_are_refused_naming_the_variant(tmp_path, capsys, variant):
    """Real peft BD-LoRA (lora_A of q_proj and lora_B of o_proj stored as their diagonal blocks) and KaSA (B @
    diag(lora_diag) @ A over an SVD-truncated base): refused in one line naming the variant, whether the config
    records it or only the tensors show it, for full and adapter-only checkpoints (KaSA's lora_diag left out too)."""
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig

    if variant == "bdlora":
        extra = {"use_bdlora": BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["o_proj"], nblocks=2)}
        name, from_tensors = "BD-LoRA", "o_proj: lora_B [32, 4] has 4 columns but lora_A [8, 32] has 8 rows"
        adapter_only = lambda k: ".lora_" in k  # noqa: E731
    else:
        extra = {"kasa_config": KasaConfig()}
        name, from_tensors = "KaSA", "lora_diag.default': KaSA"
        adapter_only = lambda k: ".lora_A." in k or ".lora_B." in k  # noqa: E731 (lora_diag left out)
    model, config, _ = _trained_peft(target_modules=["q_proj", "o_proj"], **extra)
    cases = [(None, lambda k: True, from_tensors), (None, lambda k: ".lora_" in k, from_tensors),
             ("lora_adapter", lambda k: True, name), ("lora_adapter", adapter_only, f"{list(extra)[0]} is")]
    for i, (place, keep, message) in enumerate(cases):
        actor = _save_actor(tmp_path / str(i), model, config, place=place, keep=keep, meta=META)
        capsys.readouterr()
        for mode in ("fold", "adapter"):
            rc, err = run(["merge", actor, tmp_path / "out", "--lora", mode, "--no-optimizer"], capsys)
            assert rc == 2 and err.count("\n") == 1 and message in err and name in err, (i, mode, err)
            assert not (tmp_path / "out").exists()


def test_verify_takes_the_lora_settings_the_merge_took(tmp_path, capsys):
    """No file records r, alpha or rsLoRA: the merge took them from --lora-rank/--lora-alpha/--lora-rslora, and so
    does verify of a folder without a manifest (another tool's, or one whose .streammerge/ was removed); other values
    fail, naming the tensors. With a manifest, verify checks the settings it records, and a flag that differs fails."""
    model, config, _ = _trained_peft(target_modules=["q_proj", "o_proj"], use_rslora=True)
    actor = _save_actor(tmp_path, model, config, place=None)
    flags = ["--lora-rank", "8", "--lora-alpha", "16", "--lora-rslora"]
    out = tmp_path / "out"
    rc, err = run(["merge", actor, out, "--no-optimizer", "--dtype", "float32", *flags], capsys)
    assert rc == 0, err
    _assert_bits(out, _peft_merged(model))
    rc, err = run(["verify", out, actor, *flags], capsys)
    assert rc == 0, err
    rc, err = run(["verify", out, actor, "--lora-alpha", "32"], capsys)
    assert rc == 1 and "--lora-alpha 32.0: the merge ran with --lora-alpha 16.0" in run.out  # type: ignore[attr-defined]

    shutil.rmtree(out / ".streammerge")
    rc, err = run(["verify", out, actor], capsys)
    assert rc == 2 and err.count("\n") == 1 and "give --lora-alpha and --lora-rank" in err, err
    rc, err = run(["verify", out, actor, *flags], capsys)
    assert rc == 0, run.out  # type: ignore[attr-defined]
    rc, err = run(["verify", out, actor, *flags[:4]], capsys)  # without rsLoRA: scale alpha/r, another model
    assert rc == 1 and "model.layers.0.self_attn.q_proj.weight" in run.out  # type: ignore[attr-defined]
    assert verify(out, actor, lora_rank=8, lora_alpha=16, lora_rslora=True).ok


def test_verify_holds_a_flag_the_merge_ran_without_to_the_checkpoints_own_setting(tmp_path, capsys, make_ckpt):
    """lora_train_meta.json gave r 8 and alpha 16: verify --lora-alpha 99 said OK, with a note that the flag was not
    used (a flag that differs fails, as it does where the merge took the flag). On a checkpoint without LoRA a LoRA
    flag is refused as the merge refuses it (it noted "the checkpoint's files gave the setting", or advised merging
    again with --lora fold, which the merge refuses)."""
    model, config, _ = _trained_peft(target_modules=["q_proj", "o_proj"])
    actor = _save_actor(tmp_path, model, config, meta=META)
    out = tmp_path / "out"
    rc, err = run(["merge", actor, out, "--no-optimizer"], capsys)
    assert rc == 0, err
    rc, err = run(["verify", out, actor, "--lora-alpha", "99"], capsys)
    said = run.out  # type: ignore[attr-defined]
    assert rc == 1 and "--lora-alpha 99.0: the merge used 16.0 (from the checkpoint's files)" in said, said
    rc, err = run(["verify", out, actor, "--lora-alpha", "16", "--lora-rank", "8"], capsys)
    said = run.out  # type: ignore[attr-defined]
    assert rc == 0 and "--lora-rank 8: as the checkpoint's files give it" in said, said

    good_plain, plain_out = make_ckpt(), tmp_path / "plain_out"
    assert run(["merge", good_plain, plain_out, "--no-optimizer"], capsys)[0] == 0
    for flags, words in ((["--lora-rank", "4"], "--lora-rank: "), (["--lora", "fold"], "--lora fold: ")):
        rc, err = run(["verify", plain_out, good_plain, *flags], capsys)
        assert rc == 2 and err.count("\n") == 1 and words in err and "holds no LoRA adapter" in err, err


def test_verify_takes_the_lora_mode_the_merge_took(tmp_path, capsys):
    """--lora adapter keeps the base weights as saved: a folder without a manifest cannot tell them from a fold, and is
    checked as --lora both (the fold), which fails; verify --lora adapter checks it as made. With a manifest, a mode
    other than the recorded one fails."""
    model, config, _ = _trained_peft(target_modules=["q_proj", "o_proj"])
    actor = _save_actor(tmp_path, model, config, meta=META)
    out = tmp_path / "out"
    rc, err = run(["merge", actor, out, "--no-optimizer", "--dtype", "float32", "--lora", "adapter"], capsys)
    assert rc == 0, err
    rc, err = run(["verify", out, actor, "--lora", "adapter"], capsys)
    assert rc == 0, run.out  # type: ignore[attr-defined]
    rc, err = run(["verify", out, actor, "--lora", "fold"], capsys)
    assert rc == 1 and "--lora fold: the merge ran with --lora adapter" in run.out  # type: ignore[attr-defined]

    shutil.rmtree(out / ".streammerge")
    rc, err = run(["verify", out, actor], capsys)
    assert rc == 1 and "model.layers.0.self_attn.q_proj.weight" in run.out  # type: ignore[attr-defined]
    rc, err = run(["verify", out, actor, "--lora", "adapter"], capsys)
    assert rc == 0, run.out  # type: ignore[attr-defined]
    assert verify(out, actor, lora="adapter").ok
    with pytest.raises(ValueError, match="lora must be one of"):
        verify(out, actor, lora="merged")


def test_bf16_factors_fold_in_float32_rounded_once(tmp_path, capsys):
    """A run that keeps W, lora_A and lora_B in bfloat16: the fold is computed in float32 from them and rounded once,
    which is peft's merge of the model upcast to float32, cast to bf16, bit for bit. peft merging the bf16 model itself
    (on CPU: the delta in float32, rounded to bf16, then added in bf16) rounds twice: it differs in a fraction of the
    elements by an ulp or two, and is farther from the exact sum (measured here; the README quotes it)."""
    import copy

    from streammerge.testing.lora import model_config

    config = model_config(LoraSpec("", hidden_size=64, num_layers=1))
    model, config, _ = _trained_peft(config=config, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = model.to(torch.bfloat16)
    actor = _save_actor(tmp_path, model, config, meta=META)
    capsys.readouterr()
    rc, err = run(["merge", actor, tmp_path / "out", "--lora", "fold", "--no-optimizer", "--dtype", "bfloat16"], capsys)
    assert rc == 0, err
    got = load_file(tmp_path / "out" / "model.safetensors")
    exact = _peft_merged(copy.deepcopy(model).float())  # W + s·B·A in float32 from the bf16 values
    _assert_bits(tmp_path / "out", {k: v.to(torch.bfloat16) for k, v in exact.items()})
    peft_bf16 = _peft_merged(model)
    folded = [k for k in got if k.endswith("_proj.weight")]
    differ = sum(int((got[k] != peft_bf16[k]).sum()) for k in folded)
    total = sum(got[k].numel() for k in folded)
    ours = max((got[k].double() - exact[k].double()).abs().max().item() for k in folded)
    theirs = max((peft_bf16[k].double() - exact[k].double()).abs().max().item() for k in folded)
    apart = max((got[k].double() - peft_bf16[k].double()).abs().max().item() for k in folded)
    print(f"bf16 factors: {differ} of {total} folded elements differ from peft's bf16 merge (max {apart:.3g}); "
          f"largest distance from the float32 fold: ours {ours:.3g}, peft's bf16 merge {theirs:.3g}")
    assert 0 < differ < total // 2 and ours <= theirs


def test_float64_weights_fold_in_float64(tmp_path, capsys):
    """A run that keeps the model in float64: peft's merge adds the delta to W in float64. The fold read W as float32
    (every W lost 29 bits of mantissa, in the whole of each folded weight) and wrote that back as float64, exit 0."""
    model, config, _ = _trained_peft(target_modules=["q_proj", "down_proj"])
    model = model.to(torch.float64)
    actor = _save_actor(tmp_path, model, config, meta=META)
    rc, err = run(["merge", actor, tmp_path / "out", "--lora", "fold", "--no-optimizer", "--dtype", "keep"], capsys)
    assert rc == 0, err
    _assert_bits(tmp_path / "out", _peft_merged(model))
    assert verify(tmp_path / "out", actor).ok


def _edit_header(header: dict, case: str) -> tuple[dict, bytes]:
    """A safetensors header edited as a hand or another writer could: the data after it, padded where asked."""
    a, b = header["a"], header["b"]
    if case == "gap":  # b 8 bytes later, 8 bytes no tensor holds between them
        return {**header, "b": {**b, "data_offsets": [x + 8 for x in b["data_offsets"]]}}, b"\0" * 8
    if case == "overlap":  # b read from a's bytes
        return {**header, "b": {**a}}, b""
    if case == "trailing":
        return header, b"\0" * 8
    if case == "float_shape":  # 3.0 is a float to safetensors, 3 to int()
        return {**header, "a": {**a, "shape": [float(n) for n in a["shape"]]}}, b""
    if case == "string_offsets":
        return {**header, "a": {**a, "data_offsets": [str(n) for n in a["data_offsets"]]}}, b""
    if case == "metadata_not_strings":
        return {**header, "__metadata__": {"format": 1}}, b""
    return header, b""


@pytest.mark.parametrize("case", ["as_saved", "gap", "overlap", "trailing", "float_shape", "string_offsets",
                                  "metadata_not_strings"])
def test_a_base_file_safetensors_refuses_is_refused(tmp_path, case):
    """A --base-model safetensors file is read as safetensors' own loader reads it, or refused in one line."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from streammerge.sources.hf import HFSource

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}, str(path), metadata={"format": "pt"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, pad = _edit_header(json.loads(raw[8:8 + n]), case)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:] + pad)
    if case == "as_saved":
        t = HFSource(tmp_path).tensors()["b"]
        assert t.pieces[0].offset == 8 + len(text) + 24 and load_file(path)["b"].tolist() == [1.0] * 4
        return
    with pytest.raises(SafetensorError):
        load_file(path)
    with pytest.raises(CheckpointError, match="model.safetensors") as e:
        HFSource(tmp_path).tensors()
    assert "\n" not in str(e.value)


def _wrapped(model) -> tuple[list[str], list[str]]:
    """The modules peft gave a LoRA layer, and those it wrapped for modules_to_save, in a loaded PeftModel."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    modules = list(model.named_modules())
    return ([n for n, m in modules if isinstance(m, LoraLayer)],
            [n for n, m in modules if isinstance(m, ModulesToSaveWrapper)])


def _loads_as_trained(out: Path, model, base_cls, config, base_sd: dict) -> dict:
    """PeftModel.from_pretrained(untrained base, OUT/lora_adapter) wraps exactly the trained model's modules, and its
    merge_and_unload() equals the trained model's bit for bit. Returns the exported adapter_config.json."""
    from peft import PeftModel

    base = base_cls(config)
    base.load_state_dict(base_sd)
    loaded = PeftModel.from_pretrained(base, out / "lora_adapter")
    assert _wrapped(loaded) == _wrapped(model)
    got, want = loaded.merge_and_unload().state_dict(), model.merge_and_unload().state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    return json.loads((out / "lora_adapter" / "adapter_config.json").read_text())


def test_the_exported_adapter_of_an_all_linear_vision_language_lora_loads_in_peft(tmp_path, capsys):
    """Qwen2-VL's vision merger holds its Linear layers in an nn.Sequential (`merger.mlp.0`, `mlp.2`). The exported
    target_modules were the layers' last names, "0" and "2", which peft matches against every module named so (whole
    decoder and vision blocks): PeftModel.from_pretrained failed. Each name is now the shortest that matches only
    the adapted modules."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(vocab_size=263, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=261,
                         eos_token_id=262, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, in_channels=3, temporal_patch_size=2),
        architectures=["Qwen2VLForConditionalGeneration"])
    model, config, base_sd = _trained_peft(Qwen2VLForConditionalGeneration, config)
    actor = _save_actor(tmp_path, model, config, place=None, meta=META)
    rc, err = run(["merge", actor, tmp_path / "out", "--dtype", "float32", "--no-optimizer"], capsys)
    assert rc == 0, err
    cfg = _loads_as_trained(tmp_path / "out", model, Qwen2VLForConditionalGeneration, config, base_sd)
    assert "mlp.0" in cfg["target_modules"] and "0" not in cfg["target_modules"] and "q_proj" in cfg["target_modules"]


@pytest.mark.parametrize("recorded", [True, False], ids=["adapter_config", "meta_only"])
def test_a_modules_to_save_below_one_layer_is_exported_as_peft_wraps_it(tmp_path, capsys, recorded):
    """modules_to_save=["layers.0.mlp"]: peft wraps that one module. The exported config named its parameters' parents
    ("down_proj", "gate_proj", "up_proj"), so peft wrapped them in every layer and failed to load the adapter
    (KeyError). Now: the recorded value where a file records it, else names that match only the wrapped module."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

    config = model_config(LoraSpec("", hidden_size=32, num_layers=2))
    model, config, base_sd = _trained_peft(config=config, target_modules=["q_proj"], modules_to_save=["layers.0.mlp"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.1)  # trained, as it would be
    actor = _save_actor(tmp_path, model, config, **({} if recorded else {"place": None, "meta": META}))
    rc, err = run(["merge", actor, tmp_path / "out", "--dtype", "float32", "--no-optimizer"], capsys)
    assert rc == 0, err
    cfg = _loads_as_trained(tmp_path / "out", model, Qwen2ForCausalLM, config, base_sd)
    assert cfg["modules_to_save"] == (["layers.0.mlp"] if recorded else ["0.mlp"])


def test_an_adapter_whose_modules_transformers_renames_is_warned_of(tmp_path):
    """A transformers-4 Qwen2-MoE LoRA with every expert's Linear adapted (one module per expert): the fold loads as
    trained (transformers fuses the folded experts), but the exported adapter names per-expert modules that the
    fused model lacks, and peft loaded it with the experts' LoRA silently dropped. It is now warned of."""
    import transformers

    from streammerge.testing.rankfiles import write_rank_files

    cfg = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, num_experts=2, num_experts_per_tok=1,
                                      tie_word_embeddings=False, architectures=["Qwen2MoeForCausalLM"])
    torch.manual_seed(0)
    sd5 = transformers.Qwen2MoeForCausalLM(cfg).state_dict()
    sd4 = {}
    for k, v in sd5.items():
        pre, _, part = k.partition(".mlp.experts.")
        if part == "gate_up_proj":
            for e in range(cfg.num_experts):
                sd4[f"{pre}.mlp.experts.{e}.gate_proj.weight"] = v[e, :16].clone()
                sd4[f"{pre}.mlp.experts.{e}.up_proj.weight"] = v[e, 16:].clone()
        elif part == "down_proj":
            for e in range(cfg.num_experts):
                sd4[f"{pre}.mlp.experts.{e}.down_proj.weight"] = v[e].clone()
        else:
            sd4[k] = v
    g = torch.Generator().manual_seed(5)
    peft_sd = {}
    for k, v in sd4.items():
        if ".experts." in k:
            mod = "base_model.model." + k.removesuffix(".weight")
            peft_sd[mod + ".base_layer.weight"] = v
            peft_sd[mod + ".lora_A.default.weight"] = torch.randn(4, v.shape[1], generator=g)
            peft_sd[mod + ".lora_B.default.weight"] = torch.randn(v.shape[0], 4, generator=g)
        else:
            peft_sd["base_model.model." + k] = v
    actor = write_rank_files(tmp_path / "actor", peft_sd, (1,))
    cfg.save_pretrained(actor / "huggingface")
    (actor / "lora_train_meta.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM"}))
    result = merge(actor, tmp_path / "out", optimizer=False)
    assert any("model.layers.0.mlp.experts.0.down_proj.weight (and 5 more adapted weights): transformers fuses it "
               "into model.layers.0.mlp.experts.down_proj on load, and the exported adapter (lora_adapter/) names "
               "the checkpoint's modules" in w for w in result.warnings), result.warnings


def _trainer_fsdp_checkpoint(tmp_path: Path, model, config, base_sd: dict) -> tuple[Path, Path]:
    """What the HF Trainer saves for a peft model under FSDP SHARDED_STATE_DICT (accelerate's save_fsdp_model with
    adapter_only=True): a DCP of `{"model": get_peft_model_state_dict(model)}` in checkpoint-N/pytorch_model_fsdp_0,
    whose keys lost the adapter's name (`q_proj.lora_A.weight`) and which records no LoraConfig. Also the base
    model folder the run started from. Returns (checkpoint-N, base)."""
    import torch.distributed.checkpoint as dcp
    from peft import get_peft_model_state_dict
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

    base = Qwen2ForCausalLM(config)
    base.load_state_dict(base_sd)
    base.save_pretrained(tmp_path / "base")
    state = get_peft_model_state_dict(model)
    assert any(re.search(r"\.lora_[AB]\.weight$", k) for k in state), sorted(state)[:3]
    ckpt = tmp_path / "checkpoint-3"
    dcp.save({"model": state}, checkpoint_id=ckpt / "pytorch_model_fsdp_0")
    return ckpt, tmp_path / "base"


def test_an_adapter_state_dict_without_adapter_names_folds_as_peft_merges(tmp_path: Path, capsys) -> None:
    """The Trainer's FSDP checkpoint of a peft model (adapter state dict, no adapter names, no lora_alpha) with
    --base-model and --lora-alpha: the fold is peft's merge_and_unload bit for bit, and the exported adapter loads
    in peft as the trained model. It was refused, blamed on "another tuner"."""
    model, config, base_sd = _trained_peft()
    ckpt, base = _trainer_fsdp_checkpoint(tmp_path, model, config, base_sd)
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "out"
    rc, err = run(["merge", ckpt, out, "--model-name", base, "--base-model", base, "--lora-alpha", "16",
                   "--dtype", "float32"], capsys)
    assert rc == 0, err
    _assert_bits(out, _peft_merged(model))
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
    cfg = _loads_as_trained(out, model, Qwen2ForCausalLM, config, base_sd)
    assert (cfg["r"], cfg["lora_alpha"]) == (8, 16)
    assert verify(out, ckpt).ok


def test_an_adapter_state_dict_without_adapter_names_needs_lora_alpha(tmp_path: Path, capsys) -> None:
    """Nothing in such a checkpoint records lora_alpha, and the scale cannot be read from the weights: one line
    asking for it, nothing written."""
    model, config, base_sd = _trained_peft()
    ckpt, base = _trainer_fsdp_checkpoint(tmp_path, model, config, base_sd)
    capsys.readouterr()  # save_pretrained's progress bar
    rc, err = run(["merge", ckpt, tmp_path / "out", "--model-name", base, "--base-model", base], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "--lora-alpha" in lines[0], err
    assert not (tmp_path / "out").exists()


def test_an_adapter_state_dict_with_other_tensors_is_refused(tmp_path: Path, capsys) -> None:
    """modules_to_save copies lose their marks in an adapter state dict (`lm_head.weight`, like a trained bias's
    name): without the run's adapter_config.json which one a key is cannot be told, so the fold is refused."""
    model, config, base_sd = _trained_peft(modules_to_save=["lm_head"])
    ckpt, base = _trainer_fsdp_checkpoint(tmp_path, model, config, base_sd)
    capsys.readouterr()  # save_pretrained's progress bar
    rc, err = run(["merge", ckpt, tmp_path / "out", "--model-name", base, "--base-model", base, "--lora-alpha", "16"],
                  capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "modules_to_save" in lines[0] and "lm_head" in lines[0], err
    assert not (tmp_path / "out").exists()


def test_an_adapter_state_dict_with_lora_biases_is_refused(tmp_path: Path, capsys) -> None:
    """lora_bias=True's `lora_B.bias` without the adapter's name is refused as LoRA biases are elsewhere."""
    model, config, base_sd = _trained_peft(lora_bias=True)
    ckpt, base = _trainer_fsdp_checkpoint(tmp_path, model, config, base_sd)
    capsys.readouterr()  # save_pretrained's progress bar
    rc, err = run(["merge", ckpt, tmp_path / "out", "--model-name", base, "--base-model", base, "--lora-alpha", "16"],
                  capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "LoRA biases (lora_bias=True)" in lines[0], err
