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
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
from ckpt_tools import run_together
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


@pytest.mark.parametrize("change", [{"tie_word_embeddings": "true"}, {"num_attention_heads": 3}])
def test_a_config_transformers_cannot_read_is_refused(tmp_path, change):
    """transformers refuses this config.json (a string for a bool, heads that do not divide the width): a folder
    with it would not load, so it is a refusal, not a check left out."""
    model = _model(transformers.LlamaForCausalLM)
    folder = _save(tmp_path / "ckpt", model.state_dict(), _config(model, **change))
    with pytest.raises(Exception):  # noqa: B017  (transformers' own refusal, whatever its class)
        transformers.LlamaConfig.from_dict(_config(model, **change))
    _refused(folder, tmp_path / "out", r"config\.json: transformers cannot read it \(.+\); transformers would not load "
                                       r"the folder")


@pytest.mark.parametrize("form", ["transformers 5", "transformers 4"])
def test_a_config_holding_inf_and_nan_merges_as_transformers_reads_it(tmp_path, form):
    """Mamba2-style configs hold inf (time_step_limit = (0.0, inf)): transformers 5's save_pretrained writes it as
    {"__float__": "Infinity"}, 4.x as a bare Infinity, and from_pretrained reads both. The merge refused both ("cannot
    read it", "not valid JSON"). Now both merge, verify and resume, and config.json keeps the form it had."""
    import math

    config = transformers.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                                       state_size=8, n_groups=1, expand=2, time_step_limit=(0.0, math.inf))
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(config)
    model.config.init_floor = math.nan
    folder = _save(tmp_path / "ckpt", model.state_dict(), {})
    if form == "transformers 5":
        model.config.save_pretrained(folder / "huggingface")
        assert '"__float__": "Infinity"' in (folder / "huggingface" / "config.json").read_text()
    else:
        (folder / "huggingface" / "config.json").write_text(json.dumps(model.config.to_dict()))  # allow_nan: 4.x's way
    written = (folder / "huggingface" / "config.json").read_text()
    out = tmp_path / "out"
    streammerge.merge(folder, out, dtype="keep")
    text_before = (out / "config.json").read_text()
    again = streammerge.merge(folder, out, dtype="keep")
    assert again.reused and again.bytes_written == 0 and (out / "config.json").read_text() == text_before
    assert streammerge.verify(out, folder).ok
    text = (out / "config.json").read_text()
    assert ('"__float__"' in text) == (form == "transformers 5") and ("Infinity" in text and "NaN" in text)
    assert json.loads(text)["time_step_limit"] == json.loads(written)["time_step_limit"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.time_step_limit[1] == math.inf and math.isnan(loaded.config.init_floor)
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


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
    # the answer is remembered for the corrected config.json as transformers itself answers for it (verify finds it)
    from streammerge import architecture

    names = sorted(load_file(out / "model.safetensors"))
    remembered = architecture._cache_get({"config": written, "generation": None}, names)
    assert remembered is not None
    assert remembered["models"] == json.loads(json.dumps(architecture.describe(written, names)["models"]))
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
    cached = list((tmp_path / "cache" / "architecture").glob("*-*.json"))  # answers; beside them each config's
    assert len(cached) == 1                                                 # float32 rules (<key>.float32.json)
    # the right config: the merge completes once the child agrees, and its summary says what was checked
    good = _save(tmp_path / "good", model.state_dict(), _config(model))
    for _ in range(2):  # the second run takes the cached answer
        shutil.rmtree(tmp_path / "out2", ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "streammerge", str(good), str(tmp_path / "out2"), "--no-progress"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "architecture: Qwen2ForCausalLM built from config.json by transformers" in proc.stdout, proc.stdout
        assert (tmp_path / "out2" / "config.json").is_file()
    # cached under the config.json the merge wrote too (its dtype named): verify of the folder asks no child
    written = json.loads((tmp_path / "out2" / "config.json").read_text())
    assert written != json.loads((good / "huggingface" / "config.json").read_text())
    assert len(list((tmp_path / "cache" / "architecture").glob("*-*.json"))) == 3
    proc = subprocess.run([sys.executable, "-m", "streammerge", "verify", str(tmp_path / "out2")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "has exactly these tensor names and shapes (answer cached)" in proc.stdout, \
        proc.stdout + proc.stderr
    # the same config with other names (a frozen embedding left out): the cache has none for them, so a child asks
    state = {k: v for k, v in model.state_dict().items() if k != "model.embed_tokens.weight"}
    partial = _save(tmp_path / "partial", state, _config(model))
    proc = subprocess.run([sys.executable, "-m", "streammerge", str(partial), str(tmp_path / "out3"), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "1 missing from the checkpoint (model.embed_tokens.weight)" in proc.stderr, \
        proc.stderr



def test_the_child_imports_nothing_from_the_current_folder(tmp_path):
    """`python -c` puts the current folder first on sys.path: a json.py or transformers.py there (the user's, or in a
    checkpoint folder the merge is started from) must not run in the child that asks transformers."""
    from streammerge import architecture

    ran = tmp_path / "ran"
    for name in ("json", "transformers", "torch"):
        (tmp_path / f"{name}.py").write_text(f"open({str(ran)!r}, 'a').write({name!r})\n")
    proc = subprocess.run(architecture.child_command(), input=b"", cwd=tmp_path, capture_output=True, timeout=120)
    assert not ran.exists(), ran.read_text()
    assert "skip" in json.loads(proc.stdout.splitlines()[-1]), proc.stdout  # no config given: it says so, and ends


@pytest.mark.skipif(sys.platform != "linux", reason="I/O priorities are Linux's")
def test_while_the_child_imports_this_process_reads_in_the_idle_io_class_and_gets_its_priority_back(monkeypatch):
    """Opt-in (STREAMMERGE_ARCH_IO=idle): every thread here stands in the idle I/O class until the child answers, a
    thread started meanwhile (a writer's) too; then each has its own priority again, and the note says so."""
    from streammerge import architecture, ioprio

    monkeypatch.setenv(architecture.IO_ENV, "idle")
    before = {tid: ioprio.get(tid) for tid in ioprio._threads()}
    assert ioprio.IDLE not in before.values()
    model = _model()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check = architecture.ArchCheck(_config(model), "config.json")
    assert check.spawn() is None
    try:
        assert {ioprio.get(tid) for tid in ioprio._threads() if tid in before} == {ioprio.IDLE}
        seen = []
        late = threading.Thread(target=lambda: seen.append(ioprio.get(0)))
        late.start()
        late.join()
        assert seen == [ioprio.IDLE]
        fixed, note = check.check(shapes)  # waits for the answer: the priorities are back once it came
        assert {tid: ioprio.get(tid) for tid in ioprio._threads() if tid in before} == \
            {tid: p for tid, p in before.items() if tid in ioprio._threads()}
    finally:
        check.close()
    assert fixed is None and "asked a child process" in note
    assert note.endswith("it read the disk first (this process stood in the idle I/O class meanwhile))"), note

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


# ---------------------------------------------------------------- verify asks it of a finished folder

def _replace_config(out: Path, config: dict | bytes, name: str = "config.json") -> None:
    """Another config.json (or `name`), recorded in the manifest as written so: its checksum alone cannot tell."""
    from streammerge.checksum import crc32

    data = config if isinstance(config, bytes) else json.dumps(config, indent=2).encode()
    (out / name).write_bytes(data)
    manifest = out / ".streammerge" / "manifest.json"
    m = json.loads(manifest.read_text())
    entry = m["files"][name]
    entry.update(size=len(data), crc32=crc32(data), mtime_ns=(out / name).stat().st_mtime_ns)
    entry.pop("sha256", None)
    manifest.write_text(json.dumps(m))


@pytest.fixture
def merged_qwen2(tmp_path) -> tuple[Path, Path]:
    """A tiny Qwen2 (attention biases, 2 of 4 heads for keys and values) merged into one model.safetensors."""
    model = _model()
    folder = _save(tmp_path / "ckpt", model.state_dict(), _config(model))
    out = tmp_path / "out"
    streammerge.merge(folder, out)
    return folder, out


def test_verify_says_how_transformers_answered_for_a_merged_folder(merged_qwen2):
    folder, out = merged_qwen2
    # the merge remembered its answer for the config.json it wrote as transformers answers for that config
    from streammerge import architecture

    written, names = json.loads((out / "config.json").read_text()), sorted(load_file(out / "model.safetensors"))
    assert written != json.loads((folder / "huggingface" / "config.json").read_text())  # its dtype named
    remembered = architecture._cache_get({"config": written, "generation": None}, names)
    assert remembered is not None
    assert remembered["models"] == json.loads(json.dumps(architecture.describe(written, names)["models"]))
    for ckpt in (None, folder):
        report = streammerge.verify(out, ckpt)
        assert report.ok, report.summary()
        lines = [n for n in report.notes if n.startswith("architecture: ")]
        assert lines == [lines[0]] and lines[0].startswith("architecture: Qwen2ForCausalLM built from config.json by "
                                                           "transformers "), report.notes
        assert "  note: architecture: Qwen2ForCausalLM" in report.summary()


@pytest.mark.parametrize("change, first", [
    ({"num_key_value_heads": 4}, r"shapes differ: model\.layers\.0\.self_attn\.k_proj\.bias is \[16\] in the folder, "
                                 r"\[32\] in the model"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
     r"6 not in the model \(model\.layers\.0\.self_attn\.[kqv]_proj\.bias, "),
], ids=["head_counts", "llama_config_for_qwen2_weights"])
def test_verify_fails_a_config_json_replaced_by_another_models(merged_qwen2, monkeypatch, change, first):
    """The manifest agrees with the new config.json, every file is whole: only transformers' answer tells."""
    folder, out = merged_qwen2
    _replace_config(out, {**json.loads((out / "config.json").read_text()), **change})
    report = streammerge.verify(out)
    assert len(report.failures) == 1, report.summary()
    assert re.fullmatch(r"config\.json: transformers \S+ builds \w+ from this config\.json, which is not these "
                        r"weights: " + first + r".*; put the weights' own config\.json there \(rerun the merge.*\)",
                        report.failures[0]), report.failures[0]
    assert not any(n.startswith("architecture") for n in report.notes), report.notes
    # with the checkpoint too (the config is also not the one the merge writes): both say so
    failures = streammerge.verify(out, folder).failures
    assert [f for f in failures if "which is not these weights" in f] == report.failures, failures
    # STREAMMERGE_ARCH_CHECK=0: not asked, and the report says so
    monkeypatch.setenv("STREAMMERGE_ARCH_CHECK", "0")
    report = streammerge.verify(out)
    assert report.ok, report.summary()
    assert "architecture check skipped: STREAMMERGE_ARCH_CHECK=0" in report.notes


def test_verify_fails_a_config_json_transformers_cannot_read(merged_qwen2):
    folder, out = merged_qwen2
    _replace_config(out, {**json.loads((out / "config.json").read_text()), "tie_word_embeddings": "true"})
    report = streammerge.verify(out)
    assert len(report.failures) == 1 and report.failures[0].startswith(
        "config.json: transformers cannot read it (Validation error for field 'tie_word_embeddings'"), report.summary()


def test_verify_of_a_critic(tmp_path, monkeypatch):
    """A critic's folder with its value-head config passes as itself; with its base model's config (the merge corrects
    it; STREAMMERGE_ARCH_CHECK=0 writes it as saved) it fails, since the folder's config.json must already be right."""
    critic = _model(transformers.Qwen2ForTokenClassification, num_labels=1)
    right = _save(tmp_path / "right", critic.state_dict(), _config(critic))
    streammerge.merge(right, tmp_path / "out")
    report = streammerge.verify(tmp_path / "out")
    assert report.ok, report.summary()
    assert any(n.startswith("architecture: Qwen2ForTokenClassification built from config.json") for n in report.notes)

    base = _save(tmp_path / "base", critic.state_dict(), _config(critic, architectures=["Qwen2ForCausalLM"]))
    monkeypatch.setenv("STREAMMERGE_ARCH_CHECK", "0")
    streammerge.merge(base, tmp_path / "as_saved")
    monkeypatch.delenv("STREAMMERGE_ARCH_CHECK")
    assert json.loads((tmp_path / "as_saved" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    report = streammerge.verify(tmp_path / "as_saved")
    assert report.failures == [
        "config.json says architectures ['Qwen2ForCausalLM'] but the weights are Qwen2ForTokenClassification's (a "
        "value head, veRL's critic): transformers would load them as the class config.json names, without the value "
        "head; config.json needs architectures ['Qwen2ForTokenClassification'] and one label (rerun the merge to "
        "write it so)"], report.summary()


def test_verify_against_the_checkpoint_fails_a_critic_config_naming_another_token_classifier(tmp_path):
    """The merge names the class transformers' AutoModelForTokenClassification builds for the model type (or keeps
    the checkpoint's own critic config): a config.json naming another *ForTokenClassification class is not the
    merge's, whichever config the checkpoint has."""
    critic = _model(transformers.Qwen2ForTokenClassification, num_labels=1)
    for name, config in [("critic", _config(critic)), ("base", _config(critic, architectures=["Qwen2ForCausalLM"]))]:
        ckpt = _save(tmp_path / name, critic.state_dict(), config)
        out = tmp_path / f"out_{name}"
        streammerge.merge(ckpt, out)
        assert streammerge.verify(out, ckpt).ok
        data = (out / "config.json").read_bytes()
        assert b'"Qwen2ForTokenClassification"' in data
        _replace_config(out, data.replace(b'"Qwen2ForTokenClassification"', b'"LlamaForTokenClassification"'))
        failures = streammerge.verify(out, ckpt).failures
        assert any(f.startswith("config.json: differs from what the merge writes") for f in failures), failures


def test_verify_leaves_out_what_it_cannot_ask_with_a_note(merged_qwen2, tmp_path):
    """auto_map (the checkpoint's own code), weights that failed their own checks, a folder with no weights beside
    config.json or an adapter's: a note, never a failure of its own; no config.json: nothing."""
    from streammerge.architecture import start_folder

    _, good = merged_qwen2
    out = tmp_path / "auto_map"
    shutil.copytree(good, out)
    _replace_config(out, {**json.loads((out / "config.json").read_text()), "auto_map": {"AutoModel": "modeling_x.X"}})
    report = streammerge.verify(out)
    assert report.ok and any(n.startswith("architecture check skipped: config.json has auto_map") for n in report.notes)

    out = tmp_path / "truncated"
    shutil.copytree(good, out)
    os.truncate(out / "model.safetensors", (out / "model.safetensors").stat().st_size - 8)
    report = streammerge.verify(out)
    assert not any("config.json" in f for f in report.failures), report.summary()
    assert "architecture check skipped: the weights' files failed the checks above" in report.notes

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert start_folder(adapter) == (None, None)
    shutil.copyfile(good / "config.json", adapter / "config.json")
    assert start_folder(adapter) == (None, "architecture check skipped: no weights transformers would load: no "
                                           "model.safetensors or model.safetensors.index.json beside config.json")
    (adapter / "adapter_config.json").write_text("{}")
    shutil.copyfile(good / "model.safetensors", adapter / "adapter_model.safetensors")
    check, note = start_folder(adapter)
    assert check is None and note.startswith("architecture check skipped: a peft adapter folder (adapter_config.json)")

    weights_only = tmp_path / "weights_only"
    dcp.save({"model": dict(_model().state_dict())}, checkpoint_id=str(tmp_path / "bare"), no_dist=True)
    streammerge.merge(tmp_path / "bare", weights_only, weights_only=True)
    assert not (weights_only / "config.json").exists()
    report = streammerge.verify(weights_only)
    assert report.ok and not any("architecture" in n for n in report.notes), report.summary()


def test_the_verify_command_asks_a_child_process_and_exits_1_on_a_config_of_another_model(merged_qwen2, tmp_path):
    """No transformers in the verify process: a child answers while verify reads, once; then the cache does."""
    _, good = merged_qwen2
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    _replace_config(bad, {**json.loads((bad / "config.json").read_text()), "num_key_value_heads": 4})
    env = dict(os.environ, PYTHONPATH=str(REPO), STREAMMERGE_CACHE=str(tmp_path / "cli_cache"))

    def verify(*folders: Path) -> list[subprocess.CompletedProcess]:
        return run_together(*([sys.executable, "-m", "streammerge", "verify", str(f)] for f in folders), env=env)

    first, refused = verify(good, bad)  # two configs: a child each, side by side
    hows = []
    for proc in (first, *verify(good)):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        line = next(ln for ln in proc.stdout.splitlines() if "note: architecture: Qwen2ForCausalLM" in ln)
        hows.append(line.split("has exactly these tensor names and shapes (", 1)[1])
    assert refused.returncode == 1, refused.stdout + refused.stderr
    fails = [ln for ln in refused.stdout.splitlines() if ln.startswith("  FAIL ")]
    assert len(fails) == 1 and "k_proj.weight is [16, 32] in the folder, [32, 32] in the model" in fails[0], \
        refused.stdout
    assert hows[0].startswith("asked a child process: ") and hows[1] == "answer cached)", hows


def test_a_refusal_after_the_weights_were_written_takes_them_away_so_the_right_config_merges(tmp_path):
    """A child process answers seconds after a small model's files are written. The refusal left model.safetensors
    and the manifest, and the rerun its advice asks for (--model-name with the right config) was refused as
    "holds a different merge"."""
    model = _model()
    folder = _save(tmp_path / "ckpt", model.state_dict(), _config(model, num_key_value_heads=4))
    good = tmp_path / "good"
    good.mkdir()
    (good / "config.json").write_text(json.dumps(_config(model)))
    env = dict(os.environ, PYTHONPATH=str(REPO), STREAMMERGE_CACHE=str(tmp_path / "cli_cache"))
    out = tmp_path / "out"
    merge = [sys.executable, "-m", "streammerge", str(folder), str(out)]
    refused = subprocess.run(merge, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "which is not these weights" in refused.stderr, refused.stderr
    assert not out.exists()
    out.mkdir()  # a folder the user made stays, empty
    assert subprocess.run(merge, env=env, capture_output=True).returncode == 2
    assert out.is_dir() and not list(out.iterdir())
    fixed = subprocess.run([*merge, "--model-name", str(good)], env=env, capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stderr
    assert streammerge.verify(out, folder).ok


def test_a_base_models_quantization_config_is_left_out_for_full_precision_weights(tmp_path):
    """A bf16 fine-tune of an FP8 checkpoint keeps the base's quantization_config in its config.json: transformers on
    a GPU would swap in FP8 layers and initialise their scales at random (benchmarks/results/quant_config_gpu.json).
    The weights are the trained ones, unquantized: the config is written without it, with a warning. Weights stored
    quantized are refused instead."""
    model = _model(transformers.LlamaForCausalLM)
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    folder = _save(tmp_path / "ckpt", model.state_dict(), _config(model, quantization_config=fp8))
    result = streammerge.merge(folder, tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert any("quantization_config (fp8) is left out" in w for w in result.warnings), result.warnings
    assert streammerge.verify(tmp_path / "out", folder).ok
    state = {k: (v * 10).to(torch.int8) if k.endswith("q_proj.weight") else v for k, v in model.state_dict().items()}
    quantized = _save(tmp_path / "q", state, _config(model, quantization_config=fp8))
    with pytest.raises(streammerge.StreammergeError, match=r"the weights are stored quantized \(model\.layers\.0"):
        streammerge.merge(quantized, tmp_path / "out2")


def test_verify_takes_a_critics_config_only_for_a_critics_weights(merged_qwen2, monkeypatch):
    """The merge writes a critic's config (token classifier, one label) only for weights with that value head: for a
    causal LM's weights, a config.json naming the critic's class differs from what the merge writes, whether or not
    transformers is asked."""
    from streammerge.architecture import critic_config
    from streammerge.model_folder import config_bytes

    folder, out = merged_qwen2
    config = json.loads((out / "config.json").read_text())
    _replace_config(out, config_bytes(critic_config(config, "Qwen2ForTokenClassification"), None))  # as a merge would
    monkeypatch.setenv("STREAMMERGE_ARCH_CHECK", "0")
    report = streammerge.verify(out, folder)
    assert any(f.startswith("config.json: differs from what the merge writes") for f in report.failures), \
        report.summary()


def _vlm() -> transformers.PreTrainedModel:
    """A tiny Qwen2.5-VL: a vision tower beside a text decoder, each with a sub-config of its own."""
    text = {**TINY, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}}
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1, fullatt_block_indexes=[0], window_size=4)
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision))


def test_a_vlms_nested_quantization_config_is_left_out_too(tmp_path):
    """transformers reads a quantization_config from the text config too (get_text_config(decoder=True)): a VLM
    fine-tuned in bf16 from an FP8 base keeps it there, and the folder loaded as FP8 layers (on this CPU, dequantized).
    It is left out like the top level's, with a warning naming where it was."""
    model = _vlm()
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    config = _config(model, architectures=["Qwen2_5_VLForConditionalGeneration"])
    config["text_config"] = {**config["text_config"], "quantization_config": fp8}
    folder = _save(tmp_path / "ckpt", model.state_dict(), config)
    result = streammerge.merge(folder, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in written["text_config"]
    assert any("text_config.quantization_config (fp8) is left out" in w for w in result.warnings), result.warnings
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert getattr(loaded, "hf_quantizer", None) is None and not hasattr(loaded.config, "quantization_config")
    assert type(loaded).__name__ == "Qwen2_5_VLForConditionalGeneration"
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert streammerge.verify(tmp_path / "out", folder).ok


# ---------------------------------------------------------------- generation_config.json

@pytest.mark.parametrize("text, words", [
    ("{", r"generation_config\.json: not valid JSON \(.*\): transformers would load the model without it"),
    ("[1]", r"generation_config\.json: expected a JSON object, found list: transformers would load"),
])
def test_a_generation_config_that_is_not_a_json_object_is_refused(tmp_path, text, words):
    """transformers ignores a generation_config.json it cannot parse (the model generates with other settings, and
    nothing says so) and fails to load a folder whose file is no object: refused before anything is written."""
    model = _model()
    folder = _save(tmp_path / "ckpt", model.state_dict(), _config(model))
    (folder / "huggingface" / "generation_config.json").write_text(text)
    with pytest.raises(ConfigError, match=words) as e:
        streammerge.merge(folder, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_generation_config_transformers_refuses_is_refused_and_the_cache_knows_it(tmp_path):
    """A generation_config.json transformers' GenerationConfig refuses (max_new_tokens -5, four greedy sequences)
    makes from_pretrained fail: the child builds it as from_pretrained does, and the merge is refused in one line
    naming the file. Its answer is cached by config.json and generation_config.json together: the same config.json
    with a good generation config merges, and a bad one after it is still refused."""
    model = _model()
    folder = _save(tmp_path / "ckpt", model.state_dict(), _config(model))
    generation = folder / "huggingface" / "generation_config.json"
    generation.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    assert streammerge.merge(folder, tmp_path / "good").plan.arch_note.startswith("architecture: Qwen2ForCausalLM")
    for bad in ({"max_new_tokens": -5}, {"num_return_sequences": 4}):
        generation.write_text(json.dumps(bad))
        refused = rf"{re.escape(str(generation))}: transformers \S+ cannot read it \("
        with pytest.raises(ConfigError, match=refused) as e:
            streammerge.merge(folder, tmp_path / "out")
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError):  # what from_pretrained of the folder would have done
            transformers.GenerationConfig.from_dict(bad)
    assert not (tmp_path / "out" / "config.json").exists()

    env = dict(os.environ, PYTHONPATH=str(REPO), STREAMMERGE_CACHE=str(tmp_path / "cli-cache"))
    proc = subprocess.run([sys.executable, "-m", "streammerge", str(folder), str(tmp_path / "cli"), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)  # a real child process answers
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and str(generation) in lines[0], proc.stderr
    assert "Greedy methods" in lines[0] and "fix that file, or remove it" in lines[0]


def test_a_child_that_refuses_before_it_is_given_the_names_is_still_heard():
    """The child refuses a generation config (or a config transformers cannot read) without waiting for the weights'
    names, and exits: when the merge sends the names only after that (a checkpoint slower to plan than transformers
    to import), the write finds no reader. That is not a failed child: its answer, a refusal, stands (it was read
    as "the child process ... failed ([Errno 32] Broken pipe)", and the merge completed the folder)."""
    from streammerge import architecture

    check = architecture.ArchCheck(_config(_model()), "ck/config.json", {"max_new_tokens": -5})
    assert check.spawn() is None
    deadline = time.monotonic() + 240
    while check._pid is None and time.monotonic() < deadline:  # the detached child says its pid first
        time.sleep(0.05)
    while Path(f"/proc/{check._pid}").exists() and time.monotonic() < deadline:  # then answers and exits
        time.sleep(0.05)
    assert not Path(f"/proc/{check._pid}").exists()
    answer = check.result(["model.embed_tokens.weight"])
    assert answer.get("file") == "generation_config.json" and "cannot read it" in answer.get("refuse", ""), answer


def test_verify_fails_a_generation_config_json_transformers_cannot_read(merged_qwen2):
    folder, out = merged_qwen2
    (folder / "huggingface" / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    streammerge.merge(folder, out)
    assert streammerge.verify(out).ok
    for bad, words in ((b"{", "generation_config.json: not valid JSON"),
                       (b'{"max_new_tokens": -5}', "generation_config.json: transformers")):
        _replace_config(out, bad, "generation_config.json")
        report = streammerge.verify(out)
        assert [f for f in report.failures if words in f] == report.failures != [], report.summary()


def test_a_vlm_config_that_names_no_architectures_is_checked_as_the_class_that_loads_it(tmp_path):
    """A config.json without architectures loads through the Auto class that maps its model_type: a VLM's through
    AutoModelForImageTextToText, not AutoModelForCausalLM (which has no class for it, and made the check refuse a
    folder that loads). The check builds that class; the weights load exactly."""
    model = _vlm()
    config = _config(model)
    config.pop("architectures", None)
    folder = _save(tmp_path / "ckpt", model.state_dict(), config)
    result = streammerge.merge(folder, tmp_path / "out")
    assert result.plan.arch_note.startswith("architecture: Qwen2_5_VLForConditionalGeneration built from config.json")
    assert "architectures" not in json.loads((tmp_path / "out" / "config.json").read_text())
    loaded, info = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert streammerge.verify(tmp_path / "out", folder).ok

    clip = transformers.CLIPModel(transformers.CLIPConfig(  # no causal LM, image-text-to-text or seq2seq class
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4)))
    config = _config(clip)
    config.pop("architectures", None)
    folder = _save(tmp_path / "clip", clip.state_dict(), config)
    _refused(folder, tmp_path / "out-clip", r"it names no architectures, and none of transformers \S+'s "
                                            r"AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM "
                                            r"takes model type 'clip'")


# ---------------------------------------------------------------- buffers older transformers saved

def _with_old_buffers(kind: str) -> tuple[transformers.PreTrainedModel, dict[str, torch.Tensor]]:
    """A model's state dict as older transformers saved it: Llama's rotary inv_freq per layer, GPT-2's causal mask
    (attn.bias) and its fill value (attn.masked_bias)."""
    torch.manual_seed(0)
    if kind == "llama":
        model = _model(transformers.LlamaForCausalLM)
        state = dict(model.state_dict())
        for i in range(2):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = model.model.rotary_emb.inv_freq.clone()
        return model, state
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64,
                                                                 n_positions=16))
    state = dict(model.state_dict())
    for i in range(2):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16, dtype=torch.bool)).view(1, 1, 16, 16)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return model, state


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_buffers_older_transformers_saved_are_left_out_as_save_pretrained_does(tmp_path, kind):
    """These buffers were refused as "not in the model", with the advice to give the model's own config, which it
    was. transformers builds them from config.json (inv_freq is a non-persistent buffer) or ignores them (GPT-2's mask),
    so the model loads the same without them: they are left out, as save_pretrained leaves them out, with a warning,
    and the model transformers loads has every weight exactly."""
    model, state = _with_old_buffers(kind)
    folder = _save(tmp_path / "ckpt", state, _config(model, architectures=[type(model).__name__]))
    out = tmp_path / "out"
    result = streammerge.merge(folder, out)
    buffers = sorted(set(state) - set(model.state_dict()))
    assert any(w.startswith(f"{len(buffers)} buffers older transformers saved with the weights ({buffers[0]}")
               for w in result.warnings), result.warnings
    assert result.plan.arch_note.startswith(f"architecture: {type(model).__name__} built from config.json")
    tied = {"lm_head.weight"} if kind == "gpt2" else set()  # GPT-2 ties lm_head to wte
    assert sorted(load_file(out / "model.safetensors")) == sorted(set(model.state_dict()) - tied)
    loaded, info = type(model).from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert streammerge.verify(out, folder).ok
    other = tmp_path / "other"  # another tool's folder (veRL's merger: save_pretrained(state_dict=...)) keeps them
    other.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.clone() for k, v in state.items() if k not in tied}, other / "model.safetensors",
              metadata={"format": "pt"})
    shutil.copy(folder / "huggingface" / "config.json", other)
    report = streammerge.verify(other, folder)
    assert report.ok and any("a buffer older transformers saved, which transformers does not read" in n
                             for n in report.notes), report.summary()

    auto_map = _save(tmp_path / "custom", state, _config(model, auto_map={"AutoModelForCausalLM": "m.M"}))
    result = streammerge.merge(auto_map, tmp_path / "out-custom")  # its own code may keep them: written as saved
    assert set(buffers) <= set(load_file(tmp_path / "out-custom" / "model.safetensors"))
    assert not any("buffers older transformers saved" in w for w in result.warnings)


# ---------------------------------------------------------------- what transformers keeps in float32

def _deepseek() -> tuple[transformers.PreTrainedModel, dict[str, torch.Tensor]]:
    """A tiny DeepSeek-V3 (its router's gate.weight and e_score_correction_bias are `_keep_in_fp32_modules_strict`),
    trained in float32 with a config naming bfloat16, as veRL saves it: every value random, so rounding shows."""
    config = transformers.DeepseekV3Config(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, first_k_dense_replace=1,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config)
    state = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model, state


def test_what_transformers_keeps_in_float32_is_written_in_float32_as_save_pretrained_does(tmp_path):
    """--dtype bfloat16 (here `auto`, from the config) would round the router's float32 gate and score bias, which
    transformers keeps in float32 even in a bfloat16 model: they are written in float32, the rest in bfloat16, as
    transformers' own save of the model loaded in bfloat16 writes them; verify replays it, with a manifest or not."""
    model, state = _deepseek()
    folder = _save(tmp_path / "ckpt", state, _config(model))
    ref_dir = tmp_path / "ref"
    model.save_pretrained(tmp_path / "fp32")
    loaded = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    loaded.save_pretrained(ref_dir)
    ref = load_file(ref_dir / "model.safetensors")
    kept = sorted(k for k, v in ref.items() if v.dtype == torch.float32)
    assert kept == ["model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.gate.weight"]

    out = tmp_path / "out"
    result = streammerge.merge(folder, out)
    got = load_file(out / "model.safetensors")
    # (save_pretrained writes the experts one by one, the model's state dict holds them fused: other names, one rule)
    assert sorted(k for k, v in got.items() if v.dtype == torch.float32) == kept
    assert {v.dtype for k, v in got.items() if k not in kept} == {v.dtype for k, v in ref.items() if k not in kept} \
        == {torch.bfloat16}
    for name, value in got.items():
        assert torch.equal(value, state[name].to(value.dtype)), name  # the kept ones: the trained bits
    assert result.plan.float32 == tuple(kept)
    assert any(n.startswith("float32     2 tensors written in float32, not bfloat16")
               for n in result.plan.weights.notes)
    manifest = json.loads((out / ".streammerge" / "manifest.json").read_text())
    assert manifest["options"]["float32_names"] == kept
    again = transformers.DeepseekV3ForCausalLM.from_pretrained(out)
    for name, value in loaded.state_dict().items():
        mine = again.state_dict()[name]
        assert mine.dtype == value.dtype and torch.equal(mine, value), name

    assert streammerge.verify(out, folder).ok
    # the merge's record is replayed: a gate rounded after all is not what it wrote
    from safetensors.torch import save_file
    copy = tmp_path / "rounded"
    shutil.copytree(out, copy)
    save_file({**got, kept[1]: got[kept[1]].to(torch.bfloat16)}, copy / "model.safetensors", metadata={"format": "pt"})
    report = streammerge.verify(copy, folder)
    assert any(f"tensor {kept[1]!r} is bfloat16 [4, 32], the checkpoint gives float32" in f for f in report.failures), \
        report.failures
    # no manifest: the folder's float32 tensors are taken as kept so
    shutil.rmtree(out / ".streammerge")
    report = streammerge.verify(out, folder)
    assert report.ok and any("but for the 2 tensors it holds in float32" in n for n in report.notes), report.notes
    assert not [n for n in report.notes if "load upcast with rounded values" in n]
    # no manifest, the gate rounded: a merge given float32_names without it writes that folder, so it is noted
    shutil.rmtree(copy / ".streammerge")
    report = streammerge.verify(copy, folder)
    assert report.ok and [n for n in report.notes if n.startswith(
        f"1 tensors transformers keeps in float32 in a bfloat16 model are bfloat16 here ({kept[1]})")], report.notes


def test_a_tied_output_embedding_transformers_keeps_in_float32_is_the_input_embedding(tmp_path):
    """HY-V4 keeps lm_head in float32 (`_keep_in_fp32_modules_strict`), but with tie_word_embeddings its lm_head is
    the input embedding, in the input embedding's dtype. The merge kept lm_head in float32 and then refused it as
    differing from its bfloat16 twin. Now the folder is transformers' own save of the model loaded in bfloat16."""
    config = transformers.CONFIG_MAPPING["hy_v4"]()
    fields = {k: v[-2:] if k.endswith("_layer_types") and isinstance(v, list) else v
              for k, v in config.to_dict().items() if k != "layer_types"}
    fields.update(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=4, num_experts=4,
                  num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1, max_position_embeddings=64,
                  q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, index_topk=8,
                  index_head_dim=8, qk_head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=16,
                  tie_word_embeddings=True, dtype="bfloat16")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(type(config).from_dict(fields)).float()
    assert "lm_head" in model._keep_in_fp32_modules_strict and model.lm_head.weight is model.model.embed_tokens.weight
    model.load_state_dict({k: torch.randn(v.shape) for k, v in model.state_dict().items()})  # rounding shows
    state = model.state_dict()
    folder = _save(tmp_path / "ckpt", state, _config(model, architectures=[type(model).__name__]))
    model.save_pretrained(tmp_path / "fp32")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    loaded.save_pretrained(tmp_path / "ref")
    ref = load_file(tmp_path / "ref" / "model.safetensors")
    assert "lm_head.weight" not in ref and ref["model.embed_tokens.weight"].dtype == torch.bfloat16

    out = tmp_path / "out"
    streammerge.merge(folder, out)  # --dtype auto: bfloat16, as config.json names
    got = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in got
    # (save_pretrained writes the experts one by one, the model's state dict holds them fused: compare the rest)
    common = set(got) & set(ref)
    assert len(common) > len(got) // 2
    assert all(got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]) for k in common)
    again = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    mine = again.state_dict()
    assert all(mine[k].dtype == v.dtype and torch.equal(mine[k], v) for k, v in loaded.state_dict().items())
    assert streammerge.verify(out, folder).ok


def test_a_tie_flag_the_models_class_does_not_honour_is_refused_saying_so(tmp_path):
    """BigBirdPegasusForCausalLM's config ties the embeddings by default, but transformers 5 builds the class untied:
    the output embedding left out as tied would load randomly initialised. Refused (it was, as '1 missing from the
    checkpoint', which is not what went wrong), saying to untie the config; done so, the folder is the trained model."""
    config = transformers.BigBirdPegasusConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    assert config.tie_word_embeddings
    torch.manual_seed(0)
    model = transformers.BigBirdPegasusForCausalLM(config)
    embed = "model.decoder.embed_tokens.weight"
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    state = model.state_dict()
    state["lm_head.weight"] = state[embed].clone()  # equal values: nothing but the class says they are two tensors
    folder = _save(tmp_path / "ckpt", state, _config(model, architectures=[type(model).__name__]))
    _refused(folder, tmp_path / "out", rf"config\.json: ties the embeddings \(tie_word_embeddings\), but transformers "
                                       rf"\S+ builds BigBirdPegasusForCausalLM, which does not tie lm_head\.weight to "
                                       rf"{re.escape(embed)}: .*set tie_word_embeddings to false")
    (folder / "huggingface" / "config.json").write_text(json.dumps(_config(model, tie_word_embeddings=False)))
    streammerge.merge(folder, tmp_path / "out", dtype="keep")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(state) and all(torch.equal(got[k], v) for k, v in state.items())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert streammerge.verify(tmp_path / "out", folder).ok


def test_the_first_cli_merge_waits_for_transformers_float32_rules_and_inspect_says_so(tmp_path):
    """A child process answers; the plan waits for its early line only where transformers' code for the model names
    such modules. inspect never asks: it says a merge will, then (the answer cached) which tensors."""
    model, state = _deepseek()
    folder = _save(tmp_path / "ckpt", state, _config(model))
    env = dict(os.environ, PYTHONPATH=str(REPO), STREAMMERGE_CACHE=str(tmp_path / "cache"))
    inspect = [sys.executable, "-m", "streammerge", "inspect", str(folder)]
    before, merged = run_together(inspect, [sys.executable, "-m", "streammerge", str(folder), str(tmp_path / "out"),
                                            "--no-progress"], env=env)
    assert merged.returncode == 0, merged.stderr
    assert "(asked a child process" in merged.stdout and "2 tensors kept in float32, as transformers keeps them" \
        in merged.stdout, merged.stdout
    dtypes = {k: v.dtype for k, v in load_file(tmp_path / "out" / "model.safetensors").items()}
    assert sorted(k for k, d in dtypes.items() if d == torch.float32) == [
        "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.gate.weight"]
    assert before.returncode == 0 and "transformers may keep some of these in float32" in before.stdout, before.stdout
    after = subprocess.run(inspect, env=env, capture_output=True, text=True, timeout=300)
    assert "2 tensors written in float32, not bfloat16" in after.stdout, after.stdout
    assert re.search(r"model\.layers\.1\.mlp\.gate\.weight +\[4, 32\] +float32 ", after.stdout), after.stdout


def test_a_plan_made_without_the_float32_rules_is_warned_of_once_transformers_answers(tmp_path):
    model, state = _deepseek()
    folder = _save(tmp_path / "ckpt", state, _config(model))
    plan = streammerge.plan_merge(folder, check_architecture=False)  # no cached answer: nothing kept
    assert plan.float32 == ()
    plan.check_architecture()
    assert any(w.startswith("transformers keeps 2 of these tensors in float32 when it loads the model in bfloat16")
               for w in plan.warnings), plan.warnings


def test_in_process_the_model_is_built_once_for_the_float32_rules_and_the_check(tmp_path, monkeypatch):
    """transformers already imported (a merge at the end of training): the plan's float32 rules and the check's
    names come from one build of the model on the meta device (a DeepSeek-V3 of full size takes seconds to build)."""
    model, state = _deepseek()
    folder = _save(tmp_path / "ckpt", state, _config(model))
    cls = transformers.DeepseekV3ForCausalLM
    built = []
    original = cls.__init__

    def counting(self, *args, **kwargs):
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__init__", counting)
    result = streammerge.merge(folder, tmp_path / "out")
    assert result.plan.float32 and "asked in this process" in result.plan.arch_note, result.plan.arch_note
    assert len(built) == 1, built


def test_keep_dtype_of_a_half_model_with_its_float32_router_is_not_warned_of_as_several_dtypes(tmp_path, monkeypatch):
    """--dtype keep of a bfloat16 run whose router stayed float32, its config naming bfloat16, writes what transformers
    itself keeps: no warning that transformers loads the weights as one dtype. Another float32 tensor beside them, or a
    config naming float16, is still warned of."""
    model, state = _deepseek()
    router = {"model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.gate.weight"}
    mixed = {k: v if k in router else v.to(torch.bfloat16) for k, v in state.items()}
    folder = _save(tmp_path / "ckpt", mixed, _config(model))
    several = "the weights keep several floating dtypes"

    result = streammerge.merge(folder, tmp_path / "out", dtype="keep")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert {k for k, v in got.items() if v.dtype == torch.float32} == router
    for name, value in got.items():
        assert value.dtype == mixed[name].dtype and torch.equal(value, mixed[name]), name  # the trained bits, as saved
    assert not any(several in w for w in result.warnings), result.warnings
    cached = streammerge.plan_merge(folder, dtype="keep", check_architecture=False)  # the rules are cached now
    assert not any(several in w for w in cached.warnings), cached.warnings

    also = _save(tmp_path / "ckpt2", {**mixed, "lm_head.weight": state["lm_head.weight"]}, _config(model))
    result = streammerge.merge(also, tmp_path / "out2", dtype="keep")
    assert any(w.startswith(f"{several} (bfloat16, float32)") for w in result.warnings), result.warnings
    # config.json naming float16 would load the bfloat16 weights rounded to float16: warned
    f16 = _save(tmp_path / "ckpt3", mixed, _config(model, dtype="float16"))
    assert any(several in w for w in streammerge.plan_merge(f16, dtype="keep", check_architecture=False).warnings)
    monkeypatch.setenv("STREAMMERGE_CACHE", str(tmp_path / "other-cache"))  # rules unknown, nothing asked: warned
    unknown = streammerge.plan_merge(folder, dtype="keep", check_architecture=False)
    assert any(several in w for w in unknown.warnings), unknown.warnings


def test_float32_rules_match_names_as_transformers_does():
    """transformers 5 matches its patterns as regular expressions anywhere in the name (its own alternation is the
    oracle); transformers 4 matched whole dotted parts. Only half precision keeps anything."""
    from transformers.core_model_loading import build_glob_alternation

    from streammerge.architecture import kept_in_float32

    names = ["model.layers.1.mlp.gate.weight", "model.layers.1.mlp.shared_expert_gate.weight", "lm_head.weight",
             "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.0.mlp.gate_proj.weight",
             "model.gate.weight.extra", "model.layers.2.mlp.gateXweight", "x.experts.3.conv.norm.weight"]
    patterns = ["gate.weight", "e_score_correction_bias", "conv.*norm"]
    oracle, _, _ = build_glob_alternation(patterns)
    search = {"strict": patterns, "float16": [], "match": "search"}
    assert kept_in_float32(names, search, "bfloat16") == {n for n in names if oracle.search(n)}
    module = {**search, "match": "module"}
    # transformers 4: rf"((^|\.){module}($|\.))", the pattern's dots any character there too
    assert kept_in_float32(names, module, "float16") == {"model.layers.1.mlp.gate.weight",
                                                         "model.layers.1.mlp.gate.e_score_correction_bias",
                                                         "model.gate.weight.extra", "model.layers.2.mlp.gateXweight",
                                                         "x.experts.3.conv.norm.weight"}
    assert kept_in_float32(names, search, "float32") == set()
    assert kept_in_float32(names, {"strict": [], "float16": ["lm_head"], "match": "search"}, "bfloat16") == set()
    assert kept_in_float32(names, {"strict": [], "float16": ["lm_head"], "match": "search"}, "float16") == \
        {"lm_head.weight"}
    assert kept_in_float32(names, {"strict": ["("], "match": "search"}, "bfloat16") == set()


# ---------------------------------------------------------------- float32 rules matched as transformers renames on load

def _ergo(tmp_path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """A tiny Ergo saved with its original names (`tok_embeddings`, `post_ffn_residual.scale`, the router's
    `gate_kernel` and `router_bias`), which transformers renames on load (`embed_tokens`, `*_residual_gate`,
    `gate.linear`, `gate.e_score_correction_bias`) and keeps in float32 under those names; trained in float32, its
    config naming bfloat16. Returns the model's state (transformers' names) and the checkpoint."""
    from transformers.core_model_loading import revert_weight_conversion

    config = transformers.ErgoConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        first_dense_intermediate_size=64, num_dense_blocks=1, moe_intermediate_size=16, shared_intermediate_size=16,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=64, sliding_window=8, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config.architectures = ["ErgoForCausalLM"]
    torch.manual_seed(0)
    model = transformers.ErgoForCausalLM(config)
    state = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}  # every value random: rounding shows
    model.load_state_dict(state)
    original = revert_weight_conversion(model, {k: v.clone() for k, v in state.items()})
    assert "tok_embeddings.weight" in original and "model.embed_tokens.weight" not in original
    return state, _save(tmp_path / "ckpt", original, _config(model, dtype="bfloat16"))


ERGO_RENAMED_FLOAT32 = {"tok_embeddings.weight", "layers.1.feed_forward.gate_kernel",
                        "layers.1.feed_forward.router_bias"} | {
    f"layers.{i}.{part}_residual.scale" for i in (0, 1) for part in ("post_attention", "post_ffn")}


def _loads_as_transformers_keeps_it(out: Path, state: dict[str, torch.Tensor]) -> None:
    """transformers loads `out` (config.json: bfloat16) with the trained values: the float32 it keeps, bit-exact."""
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert set(loaded) == set(state)
    kept = {k for k, v in loaded.items() if v.dtype == torch.float32}
    assert "model.embed_tokens.weight" in kept and "model.layers.1.mlp.gate.linear.weight" in kept
    for name, value in loaded.items():
        assert torch.equal(value, state[name].to(value.dtype)), name


def test_what_transformers_keeps_in_float32_under_the_name_it_renames_to_is_written_in_float32(tmp_path):
    """transformers matches its float32 rules to the names as it loads them, after renaming a checkpoint's original
    spellings: Ergo's `tok_embeddings` (`embed_tokens` is kept in float32) were written bfloat16 and loaded rounded,
    without a word. Now the first merge (in this process) writes them in float32; a folder that holds them rounded is
    noted by verify."""
    state, folder = _ergo(tmp_path)
    out = tmp_path / "out"
    result = streammerge.merge(folder, out)
    got = load_file(out / "model.safetensors")
    wide = {k for k, v in got.items() if v.dtype == torch.float32}
    assert ERGO_RENAMED_FLOAT32 <= wide and set(result.plan.float32) == wide, sorted(wide)
    assert not [w for w in result.warnings if "float32" in w], result.warnings
    _loads_as_transformers_keeps_it(out, state)
    assert streammerge.verify(out, folder).ok

    # no manifest, the embeddings rounded: verify says transformers loads them upcast
    from safetensors.torch import save_file
    shutil.rmtree(out / ".streammerge")
    save_file({**got, "tok_embeddings.weight": got["tok_embeddings.weight"].to(torch.bfloat16)},
              out / "model.safetensors", metadata={"format": "pt"})
    report = streammerge.verify(out, folder)
    assert [n for n in report.notes if n.startswith(
        "1 tensors transformers keeps in float32 in a bfloat16 model are bfloat16 here (tok_embeddings.weight)")], \
        report.notes


def test_a_plan_made_without_the_renamed_names_warns_and_the_merge_again_writes_them_in_float32(tmp_path):
    """A plan made without transformers' answer for these names (here: no check; the float32 rules cached, as a merge
    of the config with other names leaves them) cannot tell the names transformers renames: the check's answer warns
    of those it keeps in float32, naming them, and the merge it advises (the answer cached) writes them in float32;
    inspect, which never asks, then shows them too."""
    from streammerge import architecture

    state, folder = _ergo(tmp_path)
    config = json.loads((folder / "huggingface" / "config.json").read_text())
    rules = architecture.describe(config, [])["fp32"]
    architecture._cache_float32({"config": config, "generation": None}, rules)
    plan = streammerge.plan_merge(folder, check_architecture=False)
    assert plan.float32 and not ERGO_RENAMED_FLOAT32 & set(plan.float32)  # the norms, kept by their written names
    plan.check_architecture()
    missed = [w for w in plan.warnings if w.startswith(
        f"transformers keeps {len(ERGO_RENAMED_FLOAT32)} of these tensors in float32 when it loads the model in "
        "bfloat16 (layers.0.post_attention_residual.scale, ...)")]
    assert missed and "merge again into a new folder" in missed[0], plan.warnings

    result = streammerge.merge(folder, tmp_path / "out")
    assert "answer cached" in result.plan.arch_note, result.plan.arch_note
    assert ERGO_RENAMED_FLOAT32 <= set(result.plan.float32)
    assert not [w for w in result.warnings if "float32" in w], result.warnings
    _loads_as_transformers_keeps_it(tmp_path / "out", state)
    again = streammerge.plan_merge(folder, check_architecture=False)  # inspect's plan: the cached answer's names
    assert again.float32 == result.plan.float32


def test_the_first_cli_merge_writes_what_transformers_keeps_in_float32_under_its_renamed_names(tmp_path):
    """The child process gives the plan the names as transformers loads them right after its float32 rules (the
    plan gives it the weights' names first): the first merge, not just a second one, writes them in float32."""
    state, folder = _ergo(tmp_path)
    code = Path(streammerge.__file__).resolve().parents[1]  # the streammerge this test imported
    env = dict(os.environ, PYTHONPATH=str(code), STREAMMERGE_CACHE=str(tmp_path / "cli-cache"))
    merged = subprocess.run([sys.executable, "-m", "streammerge", str(folder), str(tmp_path / "out"), "--no-progress"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr
    assert "(asked a child process" in merged.stdout and "warning" not in merged.stdout.lower() + \
        merged.stderr.lower(), merged.stdout + merged.stderr
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert ERGO_RENAMED_FLOAT32 <= {k for k, v in got.items() if v.dtype == torch.float32}
    _loads_as_transformers_keeps_it(tmp_path / "out", state)


def test_float32_rules_match_the_name_a_tensor_loads_as():
    from streammerge.architecture import kept_in_float32

    rules = {"strict": ["embed_tokens", r"gate\.e_score_correction_bias"], "float16": [], "match": "search"}
    loads_as = {"tok_embeddings.weight": ["model.embed_tokens.weight", False],
                "layers.1.gate.bias": ["model.layers.1.gate.e_score_correction_bias", False],
                "output.weight": ["lm_head.weight", False]}
    names = [*loads_as, "model.embed_tokens.weight", "norm.weight"]
    assert kept_in_float32(names, rules, "bfloat16") == {"model.embed_tokens.weight"}
    assert kept_in_float32(names, rules, "bfloat16", loads_as) == {
        "model.embed_tokens.weight", "tok_embeddings.weight", "layers.1.gate.bias"}
    assert kept_in_float32(names, rules, "float32", loads_as) == set()
    assert kept_in_float32(names, rules, "bfloat16", {"norm.weight": None, "output.weight": [3]}) == \
        {"model.embed_tokens.weight"}  # an answer transformers could not have given matches as written
