"""What real users bring: checkpoints with remote code, configs of another model, and what they see at the end.

Remote code: a checkpoint (or a --model-name folder) whose config needs its own `.py` must never
make streammerge prompt or run that code, on a terminal (a pty answering "y") or without one.
Config checks: a config that does not describe the weights is refused before anything is written
or pushed, and transformers itself (building the model a config describes) shows the rule never
refuses a correct pair. Then the summary line, the progress bar and the reprs a user reads.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixture_paths import REPO, VERL_DATA
from hubserver import WRITE_TOKEN

import streammerge
from streammerge.errors import ConfigError
from streammerge.hub.publish import merge_and_push
from streammerge.hub.retry import RetryPolicy
from streammerge.model_folder import check_config_fits

FAST = RetryPolicy(attempts=5, base_delay=0.05, max_delay=0.5)
PROMPTS = ("custom code", "[y/N]", "trust_remote_code")


# ---------------------------------------------------------------- helpers

def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **extra}


def run_in_pty(args: list, timeout: float = 300) -> tuple[int, str]:
    """Run the CLI with a terminal for stdin, stdout and stderr, and "y" typed ahead for any prompt."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "streammerge", *map(str, args)], stdin=slave, stdout=slave,
                            stderr=slave, env=env(), cwd=REPO)
    os.close(slave)
    os.write(master, b"y\n" * 4)  # a user answering yes to whatever is asked
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child has closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError(f"{args} still running after {timeout} s: {out.decode(errors='replace')[-2000:]}")
        proc.wait(timeout=30)
    finally:
        os.close(master)
    return proc.returncode, out.decode(errors="replace").replace("\r\n", "\n")


def remote_code_folder(folder: Path, config: dict, marker: Path, model_type: str = "evil_llama") -> Path:
    """A model folder whose config names code shipped beside it; importing that code creates `marker`."""
    folder.mkdir(parents=True, exist_ok=True)
    code = f"open({str(marker)!r}, 'w').write('the checkpoint ran code')\n"
    (folder / "configuration_evil.py").write_text(code + "from transformers import PretrainedConfig\n"
                                                  "class EvilConfig(PretrainedConfig):\n"
                                                  f"    model_type = {model_type!r}\n")
    (folder / "modeling_evil.py").write_text(code + "from transformers import PreTrainedModel\n"
                                             "class EvilForCausalLM(PreTrainedModel):\n    pass\n")
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type, "auto_map": auto_map,
                                                    "architectures": ["EvilForCausalLM"]}))
    return folder


@pytest.fixture(scope="module")
def evil(make_ckpt, tmp_path_factory):
    """A real checkpoint (with optimizer files) whose huggingface/ holds remote code, and a --model-name twin."""
    root = tmp_path_factory.mktemp("evil")
    marker = root / "code-ran"
    actor = root / "global_step_2" / "actor"
    shutil.copytree(make_ckpt(), actor)
    config = json.loads((actor / "huggingface" / "config.json").read_text())
    remote_code_folder(actor / "huggingface", config, marker)
    bare = root / "bare" / "global_step_2" / "actor"
    shutil.copytree(make_ckpt(), bare, ignore=shutil.ignore_patterns("huggingface"))
    name = remote_code_folder(root / "evil-model", config, marker)
    shutil.copy(actor / "huggingface" / "tokenizer.json", name / "tokenizer.json")
    return actor, bare, name, marker


SKIPPED = re.compile(r"warning: optimizer not exported: \S*config\.json: model_type 'evil_llama' is not "
                     r"built into transformers \(its auto_map names code shipped with the checkpoint, which "
                     r"streammerge never runs\)\n")


# ---------------------------------------------------------------- 1. code from the checkpoint never runs

@pytest.mark.slow
def test_merge_on_a_terminal_answering_yes_never_runs_checkpoint_code(evil, tmp_path):
    actor, _, _, marker = evil
    code, out = run_in_pty([actor, tmp_path / "out", "--max-shard-size", "100KB"])
    assert code == 0, out
    assert not marker.exists()
    assert not any(p in out for p in PROMPTS), out
    assert SKIPPED.search(out), out  # one line that says why the optimizer was skipped
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "out" / "optimizer").exists()
    assert (tmp_path / "out" / "modeling_evil.py").is_file()  # carried as a file, for users who choose to trust it

    code, out = run_in_pty(["verify", tmp_path / "out", actor])
    assert code == 0 and "OK" in out, out
    assert not marker.exists() and not any(p in out for p in PROMPTS), out


def test_inspect_on_a_terminal_answering_yes_never_runs_checkpoint_code(evil):
    actor, _, _, marker = evil
    code, out = run_in_pty(["inspect", actor])
    assert code == 0 and "model.layers.0.self_attn.q_proj.weight" in out, out
    assert not marker.exists() and not any(p in out for p in PROMPTS), out
    assert SKIPPED.search(out), out


@pytest.mark.slow
def test_model_name_with_remote_code_never_runs_it(evil, tmp_path):
    _, bare, name, marker = evil
    code, out = run_in_pty([bare, tmp_path / "out", "--model-name", name])
    assert code == 0, out
    assert not marker.exists() and not any(p in out for p in PROMPTS), out
    assert SKIPPED.search(out), out
    code, out = run_in_pty(["inspect", bare, "--model-name", name])
    assert code == 0 and not marker.exists() and not any(p in out for p in PROMPTS), out


def test_without_a_terminal_nothing_waits_for_an_answer(evil, tmp_path):
    """transformers' prompt waits 15 s for an answer when nobody can give one: here nothing asks."""
    actor, _, _, marker = evil
    proc = subprocess.run([sys.executable, "-m", "streammerge", str(actor), str(tmp_path / "out")], env=env(),
                          cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists() and not any(p in proc.stdout + proc.stderr for p in PROMPTS)
    assert SKIPPED.search(proc.stderr), proc.stderr


def test_push_of_a_checkpoint_with_remote_code_never_runs_it(evil, hub, hub_env, tmp_path):
    actor, _, _, marker = evil
    result = merge_and_push(actor, tmp_path / "out", "tiny", token=WRITE_TOKEN, endpoint=hub.endpoint, retry=FAST)
    assert not marker.exists()
    assert len(result.merge.warnings) == 1 and "never runs" in result.merge.warnings[0]
    assert "modeling_evil.py" in hub.files("alice/tiny")


def test_known_model_type_with_auto_map_uses_transformers_own_class(evil, tmp_path):
    """model_type llama with an auto_map: the optimizer is named with transformers' Llama, the .py never imported."""
    actor, _, _, marker = evil
    ck = tmp_path / "actor"
    shutil.copytree(actor, ck)
    config = json.loads((ck / "huggingface" / "config.json").read_text())
    remote_code_folder(ck / "huggingface", {**config, "architectures": ["LlamaForCausalLM"]}, marker, "llama")
    result = streammerge.merge(ck, tmp_path / "out")
    assert result.warnings == [] and not marker.exists()
    assert (tmp_path / "out" / "optimizer" / "optimizer.safetensors.index.json").is_file()


def test_config_naming_a_hub_attention_kernel_fetches_nothing(make_ckpt, tmp_path):
    """transformers fetches and imports `kernels-community/...` attention from the Hub: naming builds with eager."""
    ck = tmp_path / "actor"
    shutil.copytree(make_ckpt(), ck)
    config = json.loads((ck / "huggingface" / "config.json").read_text())
    kernel = {"attn_implementation": "kernels-community/flash-attn3"}
    (ck / "huggingface" / "config.json").write_text(json.dumps({**config, **kernel}))
    result = streammerge.merge(ck, tmp_path / "out")
    assert result.warnings == []
    assert (tmp_path / "out" / "optimizer" / "optimizer.safetensors.index.json").is_file()


def test_no_transformers_entry_point_can_run_checkpoint_code():
    """Every call into transformers in the package: from_config/from_pretrained only with trust_remote_code=False,
    and never AutoConfig/AutoTokenizer/pipeline (which read a folder's auto_map)."""
    calls = []
    for path in sorted((REPO / "streammerge").rglob("*.py")):
        text = path.read_text()
        if path.name == "card.py":  # the model card's usage example is text, not a call
            text = re.sub(r'"""[\s\S]*?"""', "", text)
        for m in re.finditer(r"\.(from_pretrained|from_config)\(([^()]|\([^()]*\))*\)", text):
            calls.append((path.name, m.group(0)))
        reads_auto_map = r"\bAuto(Config|Tokenizer|Processor)\b|\bpipeline\(|get_class_from_dynamic_module"
        assert not re.search(reads_auto_map, text), path
    assert calls, "expected the meta-model builders in optimizer/naming.py"
    for where, call in calls:
        assert "trust_remote_code=False" in call, (where, call)


# ---------------------------------------------------------------- 2. a config of another model is refused

@pytest.fixture
def wide_model(make_ckpt, tmp_path) -> Path:
    """A model folder for a 2048-wide model (the checkpoint is 64 wide)."""
    folder = tmp_path / "wide-model"
    shutil.copytree(make_ckpt() / "huggingface", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 2048}))
    return folder


WIDE = r"config\.json: config\.json does not describe these weights: model\.embed_tokens\.weight is 64 wide but " \
       r"the config's hidden_size is 2048 \(a config of another model\? give the right one with --model-name\)"


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("streammerge: error: "), stderr
    return lines[0]


def test_model_name_of_another_size_is_refused_before_anything_is_written(make_ckpt, wide_model, tmp_path):
    with pytest.raises(ConfigError, match=WIDE):
        streammerge.merge(make_ckpt(), tmp_path / "out", model_name=str(wide_model))
    with pytest.raises(ConfigError, match=WIDE):
        streammerge.plan(make_ckpt(), model_name=str(wide_model))
    proc = subprocess.run([sys.executable, "-m", "streammerge", str(make_ckpt()), str(tmp_path / "out"),
                           "--model-name", str(wide_model)], env=env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and re.search(WIDE, _one_error_line(proc.stderr))
    assert not (tmp_path / "out").exists()


def test_checkpoint_config_of_another_size_is_refused(make_ckpt, tmp_path):
    ck = tmp_path / "actor"
    shutil.copytree(make_ckpt(), ck)
    config = json.loads((ck / "huggingface" / "config.json").read_text())
    (ck / "huggingface" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    proc = subprocess.run([sys.executable, "-m", "streammerge", str(ck), str(tmp_path / "out")], env=env(), cwd=REPO,
                          capture_output=True, text=True)
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2 and str(ck / "huggingface" / "config.json") in line
    assert "the weights have 2 decoder layers but the config's num_hidden_layers is 4" in line
    assert not (tmp_path / "out").exists()


def test_model_name_whose_config_differs_from_the_checkpoints_own_is_warned_about(make_ckpt, tmp_path):
    """--model-name's config.json is written, but the checkpoint was saved with its own (huggingface/): values that
    differ (another rope_theta, a longer context) would load the trained weights as another model than they were
    trained as. A warning names them; a copy that differs only in what a writer adds says nothing."""
    same = tmp_path / "same"
    shutil.copytree(make_ckpt() / "huggingface", same)
    config = json.loads((same / "config.json").read_text())
    (same / "config.json").write_text(json.dumps({**config, "transformers_version": "4.0.0"}, indent=4))
    result = streammerge.merge(make_ckpt(), tmp_path / "out-same", model_name=str(same))
    assert not [w for w in result.warnings if "--model-name" in w], result.warnings

    other = tmp_path / "other"
    shutil.copytree(same, other)
    (other / "config.json").write_text(json.dumps({**config, "rope_theta": 1e6, "max_position_embeddings": 65536}))
    proc = subprocess.run([sys.executable, "-m", "streammerge", str(make_ckpt()), str(tmp_path / "out"),
                           "--model-name", str(other)], env=env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    warned = [ln for ln in proc.stderr.splitlines() if "--model-name" in ln]
    own = make_ckpt() / "huggingface" / "config.json"
    assert len(warned) == 1 and f"its config.json differs from the one saved with the checkpoint ({own}) in " \
        f"max_position_embeddings (65536, {config['max_position_embeddings']}), rope_theta (1000000.0, " in warned[0], \
        proc.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_theta"] == 1e6


def test_push_with_a_config_of_another_size_creates_nothing_on_the_hub(make_ckpt, wide_model, hub, hub_env, tmp_path):
    run = subprocess.run([sys.executable, "-m", "streammerge", str(make_ckpt()), str(tmp_path / "out"), "--push",
                          "--repo-id", "tiny", "--model-name", str(wide_model)], cwd=REPO, capture_output=True,
                         text=True, env=env(HF_TOKEN=WRITE_TOKEN, HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1",
                                            HF_HUB_OFFLINE="0"))
    assert run.returncode == 2 and re.search(WIDE, _one_error_line(run.stderr))
    assert not hub.repos and not hub.requests("POST", r"^/api/repos/create$")
    assert not (tmp_path / "out").exists()

    failed = streammerge.upload_checkpoint_to_hf(make_ckpt(), repo_id="tiny", model_name=str(wide_model),
                                                 out_dir=tmp_path / "out2", token=WRITE_TOKEN, endpoint=hub.endpoint,
                                                 retry=FAST, raise_on_error=False)
    assert not failed.ok and failed.error_kind == "ConfigError" and re.search(WIDE, failed.error)
    assert not hub.repos and not (tmp_path / "out2").exists()


def _reference_pairs() -> list[tuple[str, dict, dict]]:
    """(case, config.json, reference shapes) of every GPU-made and Megatron-made fixture in the project."""
    from safetensors import safe_open

    pairs = []
    for ref in sorted((REPO / "tests" / "data").glob("*/*/reference/model.safetensors")):
        case = ref.parents[1]
        config = next(case.rglob("huggingface/config.json"))
        with safe_open(str(ref), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        pairs.append((f"{case.parent.name}/{case.name}", json.loads(config.read_text()), shapes))
    return pairs


def test_real_fixtures_fit_their_configs_and_a_wider_config_does_not():
    pairs = _reference_pairs()
    assert len(pairs) >= 14  # tied Qwen2, Llama, HSDP, FSDP1 (three kinds), Megatron TP/PP/EP, Qwen3-MoE, Mixtral
    for case, config, shapes in pairs:
        check_config_fits(config, shapes, case)
        wider = {**config, "hidden_size": config["hidden_size"] * 2}
        with pytest.raises(ConfigError, match="hidden_size"):
            check_config_fits(wider, shapes, case)


SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 131, "moe_intermediate_size": 32, "num_experts": 4,
         "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
         "n_shared_experts": 1, "shared_expert_intermediate_size": 48, "kv_lora_rank": 16, "q_lora_rank": 24,
         "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "first_k_dense_replace": 1,
         "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
         "n_embd": 64, "n_layer": 3, "n_head": 4, "word_embed_proj_dim": 32, "ffn_dim": 96}
TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next", "phi", "olmo",
         "olmo2", "olmoe", "deepseek_v2", "deepseek_v3", "granite", "granitemoe", "gpt_neox", "stablelm", "glm4_moe",
         "gpt_oss", "seed_oss", "exaone4", "apertus", "arcee", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gpt2",
         "starcoder2", "falcon", "opt", "bloom", "cohere", "minimax", "jamba", "gemma3", "llava", "llava_onevision",
         "mistral3", "internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _shrunk(d: dict) -> dict:
    return {k: _shrunk(v) if isinstance(v, dict) and k.endswith("_config") else SMALL.get(k, v) if v is not None else v
            for k, v in d.items() if k != "layer_types"}


@pytest.mark.slow
def test_transformers_own_models_always_fit_their_configs():
    """transformers builds the model a config describes (meta device): its weights must never be refused, whether
    config.json is written whole (transformers 5) or as the diff from the class defaults (transformers 4), and
    a config twice as wide, twice as deep or with twice the vocabulary must be."""
    import logging
    import warnings

    import torch
    import transformers
    from transformers import CONFIG_MAPPING

    logging.getLogger("transformers").setLevel(logging.ERROR)
    built = []
    for model_type in TYPES:
        config = CONFIG_MAPPING[model_type].from_dict(_shrunk(CONFIG_MAPPING[model_type]().to_dict()))
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = transformers.AutoModelForCausalLM.from_config(config)
            except ValueError:  # vision-language models
                model = transformers.AutoModelForImageTextToText.from_config(config)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        whole = json.loads(config.to_json_string(use_diff=False))
        for written in (whole, json.loads(config.to_json_string(use_diff=True))):
            check_config_fits(written, shapes, model_type)
        text = whole["text_config"] if isinstance(whole.get("text_config"), dict) else whole
        for key in ("hidden_size", "n_embd", "num_hidden_layers", "n_layer", "vocab_size"):
            if key in text:
                other = {**text, key: text[key] * 2}
                with pytest.raises(ConfigError):
                    check_config_fits({**whole, "text_config": other} if text is not whole else other, shapes,
                                      f"{model_type} with {key} doubled")
        built.append(model_type)
    assert len(built) == len(TYPES)


def _llama_shapes(layers: int = 2, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}embed_tokens.weight": (131, 64), f"{prefix}norm.weight": (64,), "lm_head.weight": (131, 64)}
    for i in range(layers):
        shapes |= {f"{prefix}layers.{i}.self_attn.q_proj.weight": (64, 64),
                   f"{prefix}layers.{i}.mlp.up_proj.weight": (96, 64),
                   f"{prefix}layers.{i}.mlp.down_proj.weight": (64, 96)}
    return shapes


LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "vocab_size": 131}


@pytest.mark.parametrize("case", ["mtp-layer", "vision-tower", "auto-map", "keys-left-to-defaults", "padded-vocab",
                                  "projected-embedding", "no-decoder-names"])
def test_correct_pairs_the_names_give_no_rule_for_are_not_refused(case):
    shapes, config = _llama_shapes(), dict(LLAMA)
    if case == "mtp-layer":  # DeepSeek-V3 style: one multi-token-prediction layer saved after the decoder
        shapes |= {"model.layers.2.self_attn.q_proj.weight": (64, 64)}
        config |= {"num_nextn_predict_layers": 1}
    elif case == "vision-tower":  # a deeper, narrower vision encoder beside the text decoder
        shapes = _llama_shapes(prefix="model.language_model.") | {
            f"model.vision_tower.encoder.layers.{i}.self_attn.q_proj.weight": (32, 32) for i in range(5)}
        config = {"model_type": "llava", "text_config": dict(LLAMA)}
    elif case == "auto-map":  # its own code decides what the keys mean
        config |= {"hidden_size": 2048, "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}
    elif case == "keys-left-to-defaults":
        config = {"model_type": "llama"}
    elif case == "padded-vocab":
        shapes |= {"model.embed_tokens.weight": (256, 64), "lm_head.weight": (256, 64)}
        config |= {"padded_vocab_size": 256}
    elif case == "projected-embedding":  # OPT-350m: 32-wide embedding projected to the 64-wide decoder
        shapes |= {"model.embed_tokens.weight": (131, 32)}
        config |= {"word_embed_proj_dim": 32}
    elif case == "no-decoder-names":
        shapes = {"backbone.embeddings.weight": (131, 64), "backbone.layers.0.mixer.in_proj.weight": (256, 64)}
        config |= {"num_hidden_layers": 9}
    check_config_fits(config, shapes, case)


@pytest.mark.parametrize("change, words", [
    ({"num_hidden_layers": 3}, "2 decoder layers but the config's num_hidden_layers is 3"),
    ({"num_nextn_predict_layers": 1, "num_hidden_layers": 3}, "2 decoder layers"),  # MTP adds, never removes
    ({"vocab_size": 151936}, "131 rows but the config's vocab_size is 151936"),
    ({"intermediate_size": 128}, "down_proj.weight is 96 wide but the config's intermediate_size is 128"),
])
def test_contradictions_are_refused(change, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        check_config_fits({**LLAMA, **change}, _llama_shapes(), "x/config.json")


# ---------------------------------------------------------------- 3. what a user reads at the end

def _data_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.safetensors"))


def test_summary_of_a_tiny_merge_a_resume_and_a_finished_folder(tmp_path):
    ck, out = VERL_DATA / "fsdp2_llama_shard1_ws4", tmp_path / "out"
    first = streammerge.merge(ck, out, max_shard_size="20KB").summary()
    data = _data_files(out)
    small = [p for p in out.rglob("*") if p.is_file() and p not in data and ".streammerge" not in p.parts]
    total = sum(p.stat().st_size for p in data)
    assert first.startswith(f"wrote {len(data)} data files ({total / 1000:.2f} kB) and {len(small)} small files "
                            f"(config, tokenizer, indexes) to {out} in "), first
    assert re.search(r" s \(\d+\.\d\d [kMG]B/s\), peak RSS \d+ MiB; read 4 files", first), first  # never "0 MB/s"

    data[1].unlink()
    again = streammerge.merge(ck, out, max_shard_size="20KB").summary()
    size = data[1].stat().st_size
    assert again.startswith(f"wrote 1 data file ({size / 1000:.2f} kB) and {len(small)} small files (config, "
                            f"tokenizer, indexes) to {out} and reused {len(data) - 1} data files "
                            f"({(total - size) / 1000:.2f} kB) finished by an earlier run, in "), again

    done = streammerge.merge(ck, out, max_shard_size="20KB").summary()
    assert done.startswith(f"nothing left to merge in {out}: reused {len(data)} data files ({total / 1000:.2f} kB) "
                           f"finished by an earlier run and {len(small)} small files (config, tokenizer, indexes) as "
                           "it left them in "), done
    assert "/s)" not in done and " 0 B" not in done


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_progress_bar_ends_at_100_percent_also_when_resuming(fmt, tmp_path):
    ck, out = VERL_DATA / "fsdp1_origparams_llama_ws4", tmp_path / "out"

    def last_bar() -> str:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            streammerge.merge(ck, out, max_shard_size="20KB", optimizer_format=fmt, progress=True)
        return err.getvalue().strip().split("\r")[-1]

    bar = last_bar()
    assert re.match(r"merge: 100%\|#+\| (\S+)/\1 ", bar), bar
    _data_files(out)[0].unlink()
    bar = last_bar()
    assert re.match(r"merge: 100%\|#+\| (\S+)/\1 ", bar), bar


def test_reprs_are_short(tmp_path):
    ck = VERL_DATA / "fsdp2_qwen2_tied_ws4"
    result = streammerge.merge(ck, tmp_path / "out", max_shard_size="2KB")
    assert len(result.files) > 40
    report = streammerge.verify(tmp_path / "out", ck)
    for obj in (result, result.plan, result.plan.weights, result.plans[1], report,
                streammerge.plan(ck, max_shard_size="2KB")):
        text = repr(obj)
        assert len(text) < 300 and "\n" not in text, text
    assert repr(report).startswith("VerifyReport(") and "ok=True" in repr(report)


def test_version_flag():
    proc = subprocess.run([sys.executable, "-m", "streammerge", "--version"], env=env(), cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"streammerge {streammerge.__version__}"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{streammerge.__version__}"' in pyproject


def test_demo_output_folder_is_ignored_by_git():
    """`streammerge demo` writes ./streammerge-demo by default: that folder must not show up as a change."""
    from streammerge.cli import build_parser

    default = build_parser("demo").parse_args([]).out_dir
    assert f"/{default}/" in (REPO / ".gitignore").read_text().splitlines()

