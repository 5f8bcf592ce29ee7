"""The written config.json describes the written tensors: transformers builds the model from it and finds
exactly our names and shapes (architecture.py), or the merge is refused before a byte is written.

Real transformers models, tiny (hidden 32, 2 layers), saved with torch DCP in one process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
from safetensors.torch import load_file

import streammerge
from streammerge import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMMERGE_CACHE", str(tmp_path / "cache"))


def _model(cls=transformers.Qwen2ForCausalLM, **kw):
    config = transformers.Qwen2Config(**{**TINY, **kw}) if "Qwen2" in cls.__name__ else \
        transformers.LlamaConfig(**{**TINY, **kw})
    torch.manual_seed(0)
    return cls(config)


def _save(folder: Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    dcp.save({"model": {k: v.detach().clone() for k, v in state.items()}}, checkpoint_id=str(folder), no_dist=True)
    (folder / "huggingface").mkdir()
    (folder / "huggingface" / "config.json").write_text(json.dumps(config))
    return folder


def _config(model, **changes) -> dict:
    return {**model.config.to_dict(), **changes}


def _refused(folder: Path, out: Path, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as e:
        streammerge.merge(folder, out)
    assert "\n" not in str(e.value)
    assert not list(out.glob("*.safetensors")) if out.exists() else True  # refused before writing


# ---------------------------------------------------------------- a config that is not these weights

@pytest.mark.parametrize("change, first", [
    # head counts: every width check_config_fits knows still agrees, the k/v projections do not
    ({"num_key_value_heads": 4}, r"shapes differ: model\.layers\.0\.self_attn\.k_proj\.weight is \[16, 32\] in the "
                                 r"checkpoint, \[32, 32\] in the model"),
    # Qwen2 has attention biases; a config that loads it as Llama drops them
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
     r"6 not in the model \(model\.layers\.0\.self_attn\.q_proj\.bias, model\.layers\.0\.self_attn\.k_proj\.bias"),
])
def test_a_config_of_another_architecture_is_refused(tmp_path, change, first):
    model = _model()
    folder = _save(tmp_path / "ckpt", model.state_dict(), _config(model, **change))
    _refused(folder, tmp_path / "out", r"config\.json: transformers \S+ builds \w+ from this config\.json, which is "
                                       r"not these weights: " + first)


def test_mlp_bias_the_weights_do_not_have_is_refused(tmp_path):
    model = _model(transformers.LlamaForCausalLM)
    folder = _save(tmp_path / "ckpt", model.state_dict(), _config(model, mlp_bias=True))
    _refused(folder, tmp_path / "out", r"6 missing from the checkpoint \(model\.layers\.0\.mlp\.gate_proj\.bias, ")


def test_a_frozen_embedding_left_out_of_the_checkpoint_is_refused(tmp_path):
    """A trainer that saves only trainable parameters: transformers would initialise the embedding at random."""
    model = _model()
    state = {k: v for k, v in model.state_dict().items() if k != "model.embed_tokens.weight"}
    folder = _save(tmp_path / "ckpt", state, _config(model))
    _refused(folder, tmp_path / "out", r"1 missing from the checkpoint \(model\.embed_tokens\.weight\)")


def test_the_right_config_merges_and_says_it_was_checked(tmp_path):
    model = _model()
    folder = _save(tmp_path / "ckpt", model.state_dict(), _config(model))
    log = logging.getLogger("transformers")
    before = log.level
    log.setLevel(logging.INFO)  # a training process's own setting: the in-process check leaves it as it was
    try:
        result = streammerge.merge(folder, tmp_path / "out")
        assert log.level == logging.INFO
    finally:
        log.setLevel(before)
    assert any(n.startswith("architecture: Qwen2ForCausalLM built from config.json") for n in result.plan.weights.notes)
    assert "(asked in this process)" in result.summary()


# ---------------------------------------------------------------- wrapper segments in DCP keys

def test_wrapper_segments_are_removed_and_the_result_loads(tmp_path):
    """`model.state_dict()` of a compiled model with activation checkpointing, saved by dcp.save."""
    model = _model()
    wrapped = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^model\.layers\.(\d+)\.", r"model.layers.\1._checkpoint_wrapped_module.", k)
        wrapped["_orig_mod." + k] = v
    folder = _save(tmp_path / "ckpt", wrapped, _config(model))
    out = tmp_path / "out"
    streammerge.merge(folder, out)
    loaded, info = transformers.Qwen2ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_two_keys_that_unwrap_to_one_name_are_refused(tmp_path):
    model = _model()
    state = dict(model.state_dict())
    state["_orig_mod.model.norm.weight"] = state["model.norm.weight"] + 1
    folder = _save(tmp_path / "ckpt", state, _config(model))
    with pytest.raises(CheckpointError, match=r"keys 'model\.(_orig_mod\.)?model\.norm\.weight' and "
                                              r"'model\.(_orig_mod\.)?model\.norm\.weight' are both "
                                              r"'model\.norm\.weight' once the wrapper segments"):
        streammerge.merge(folder, tmp_path / "out")


# ---------------------------------------------------------------- veRL's critic

@pytest.mark.usefixtures("hub_env")
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_a_critic_saved_with_its_base_config_gets_its_value_head_class(tmp_path, hub):
    """veRL's critic is <Type>ForTokenClassification with one label, but the config it saves still names the causal
    LM: that config would load the critic with its value head dropped and a random lm_head."""
    critic = _model(transformers.Qwen2ForTokenClassification, num_labels=1)
    config = _config(critic, architectures=["Qwen2ForCausalLM"])
    folder = _save(tmp_path / "ckpt", critic.state_dict(), config)
    out = tmp_path / "out"
    result = streammerge.merge(folder, out)
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["Qwen2ForTokenClassification"] and len(written["id2label"]) == 1
    assert any("value head" in w for w in result.warnings)
    loaded, info = transformers.AutoModelForTokenClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(loaded.score.weight, critic.score.weight)
    assert torch.equal(load_file(out / "model.safetensors")["score.weight"], critic.score.weight)
    # the card pushed with it loads it by its own class (AutoModelForCausalLM would load another model)
    from hubserver import WRITE_TOKEN

    streammerge.merge_and_push(folder, tmp_path / "pushed", "alice/critic", token=WRITE_TOKEN, endpoint=hub.endpoint)
    card = hub.file_bytes("alice/critic", "README.md", "main").decode()
    assert 'model = Qwen2ForTokenClassification.from_pretrained("alice/critic"' in card, card
    assert "AutoModelForCausalLM" not in card
    # verify expects the corrected config, and nothing else in its place
    assert streammerge.verify(out, folder).ok
    written["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}
    (out / "config.json").write_text(json.dumps(written))
    assert not streammerge.verify(out, folder).ok


# ---------------------------------------------------------------- the child process (the CLI's path)

def test_the_cli_asks_a_child_process_and_refuses_in_one_line(tmp_path):
    """No transformers in the merge process: the check runs in a detached child whose memory is not the merge's."""
    model = _model()
    folder = _save(tmp_path / "ckpt", model.state_dict(), _config(model, num_key_value_heads=4))
    env = dict(os.environ, PYTHONPATH=str(REPO), STREAMMERGE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "streammerge", str(folder), str(tmp_path / "out"), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "k_proj.weight is [16, 32] in the checkpoint, [32, 32] in the model" in lines[0], lines[0]
    # the weights were written while the child imported transformers; the folder was never completed
    out = tmp_path / "out"
    assert not (out / "config.json").exists() and not list(out.glob("*.index.json"))
    # the answer is cached: the same config again asks no child (and the right config merges)
    cached = list((tmp_path / "cache" / "architecture").glob("*.json"))
    assert len(cached) == 1
    # the right config: the merge completes once the child agrees, and its summary says what was checked
    good = _save(tmp_path / "good", model.state_dict(), _config(model))
    for _ in range(2):  # the second run takes the cached answer
        shutil.rmtree(tmp_path / "out2", ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "streammerge", str(good), str(tmp_path / "out2"), "--no-progress"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "architecture: Qwen2ForCausalLM built from config.json by transformers" in proc.stdout, proc.stdout
        assert (tmp_path / "out2" / "config.json").is_file()
    assert len(list((tmp_path / "cache" / "architecture").glob("*.json"))) == 2
    # the same config with other names (a frozen embedding left out): the cache has none for them, so a child asks
    state = {k: v for k, v in model.state_dict().items() if k != "model.embed_tokens.weight"}
    partial = _save(tmp_path / "partial", state, _config(model))
    proc = subprocess.run([sys.executable, "-m", "streammerge", str(partial), str(tmp_path / "out3"), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "1 missing from the checkpoint (model.embed_tokens.weight)" in proc.stderr, \
        proc.stderr


def test_a_config_with_auto_map_is_not_checked_and_the_summary_says_so(tmp_path):
    model = _model()
    folder = _save(tmp_path / "ckpt", model.state_dict(), _config(model, auto_map={"AutoModel": "modeling_x.X"}))
    result = streammerge.merge(folder, tmp_path / "out")
    assert "architecture check skipped: config.json has auto_map" in result.summary()


def test_transformers_4_renames_old_spellings_as_its_loader_does():
    """transformers 4.52+ (no conversion_mapping module) renames a VL model's old keys with the class's own table;
    the table here is Qwen2.5-VL's from that release."""
    from streammerge.architecture import _compare, loads_as_v4

    table = {"^visual": "model.visual", r"^model(?!\.(language_model|visual))": "model.language_model"}
    own = {"model.visual.patch_embed.proj.weight": [32, 3], "model.language_model.embed_tokens.weight": [64, 32],
           "lm_head.weight": [64, 32]}
    old = {"visual.patch_embed.proj.weight": (32, 3), "model.embed_tokens.weight": (64, 32), "lm_head.weight": (64, 32)}
    model = {"forms": [own], "optional": [], "ignore_missing": [], "ignore_unexpected": [],
             "loads_as": loads_as_v4(table, sorted(old))}
    assert model["loads_as"] == {"visual.patch_embed.proj.weight": ["model.visual.patch_embed.proj.weight", False],
                                 "model.embed_tokens.weight": ["model.language_model.embed_tokens.weight", False]}
    assert _compare(model, old) == ""
    assert "shapes differ" in _compare(model, {**old, "model.embed_tokens.weight": (65, 32)})


def test_moe_experts_saved_one_by_one_are_checked_as_transformers_fuses_them(tmp_path):
    """Per-expert names (transformers 4's, a Megatron conversion's) load fused into one tensor per layer: the experts'
    sizes must add up to the fused tensor of the config's model, which no per-name shape compare can see."""
    from transformers.core_model_loading import revert_weight_conversion

    tiny = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=64, num_experts=4, num_experts_per_tok=2,
                max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**tiny))
    saved = revert_weight_conversion(model, dict(model.state_dict()))
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in saved
    config = _config(model)
    _refused(_save(tmp_path / "wide", saved, {**config, "moe_intermediate_size": 32}), tmp_path / "out1",
             r"the checkpoint tensors fused into model\.layers\.\d\.mlp\.experts\.\w+ hold \d+ elements, the model's "
             r"\[4, \d+, \d+\] holds \d+")
    out = tmp_path / "out2"
    streammerge.merge(_save(tmp_path / "right", saved, config), out)
    loaded, info = transformers.Qwen3MoeForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
