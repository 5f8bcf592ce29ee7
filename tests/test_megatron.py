"""Megatron-Core torch_dist checkpoints -> Hugging Face models, against the HF models they were made from.

The fixtures (tests/data/megatron, see its README) are real megatron-core 0.19.2 saves on gloo CPU
processes (TP, PP, EP, DP; Megatron-LM's and veRL's layouts; distributed optimizers), each with the
`save_pretrained` file of the HF model it was converted from: every merged tensor must equal it bit
for bit, transformers must load the output with no missing key, and verify must agree through torch.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import streammerge
from streammerge import dtypes
from streammerge.errors import CheckpointError, ConfigError, StreammergeError, UnsupportedLayoutError
from streammerge.sources import open_checkpoint
from streammerge.sources.base import Piece, SourceTensor
from streammerge.sources.megatron import Arch, MegatronSource, Take, torch_view, view

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "data" / "megatron"
# case -> (what a user types, --model-name or None)
CASES = {
    "llama_tp2_pp2": ("llama_tp2_pp2", None),
    "qwen2_tp2": ("qwen2_tp2", None),  # padded vocab, tied, qkv bias
    "qwen3_pp2": ("qwen3_pp2", None),
    "qwen3moe_ep2": ("qwen3moe_ep2", None),
    "mixtral_ep2_tp2": ("mixtral_ep2_tp2", None),
    "llama_mlm_optim_pp2_dp2": ("llama_mlm_optim_pp2_dp2", None),  # Megatron-LM run folder -> iter_0000001
    "verl_v1_qwen2_tp2_dp2": ("verl_v1_qwen2_tp2_dp2", None),  # veRL run folder -> global_step_1/actor/dist_ckpt
    "verl_v2_qwen3_tp2_dp2": ("verl_v2_qwen3_tp2_dp2", "verl_v2_qwen3_tp2_dp2/huggingface"),  # .../model/dist_ckpt
    # virtual pipeline stages: Megatron-LM saves model0 and model1, whose tensors share the torch_dist keys
    "qwen2_mlm_vpp2_pp2": ("qwen2_mlm_vpp2_pp2", None),
}


def _reference(case: str) -> Path:
    return next((FIX / case).rglob("reference/model.safetensors"))


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_equals_reference(out: Path, reference: Path) -> None:
    """The merged model.safetensors holds exactly the tensors of the HF model's own save_pretrained file `reference`:
    the same names, dtypes, shapes and bytes."""
    ref, got = load_file(reference), load_file(out / "model.safetensors")
    assert set(got) == set(ref)
    for name, want in ref.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert _bits(got[name]) == _bits(want), f"{out}: {name} differs from the HF model"


def assert_loads_as_reference(out: Path, reference: Path, tmp_path: Path) -> None:
    """transformers loads the output with no missing, unexpected or mismatched key, and as the HF model loaded from
    its own file `reference` (transformers 5 fuses MoE experts in memory: both go through the same conversion)."""
    from transformers import AutoModelForCausalLM

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    shutil.copy(out / "config.json", ref_dir / "config.json")
    shutil.copy(reference, ref_dir / "model.safetensors")
    dtype = load_file(reference)["model.norm.weight"].dtype
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=dtype)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    want = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=dtype).state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    assert all(_bits(got[k]) == _bits(want[k]) for k in want)


def _merge(case: str, out: Path, **kwargs) -> streammerge.MergeResult:
    typed, model = CASES[case]
    return streammerge.merge(FIX / typed, out, model_name=str(FIX / model) if model else None, **kwargs)


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict[str, tuple[Path, streammerge.MergeResult]]:
    """Every case merged once (dtype auto: the config's, which is the saved dtype in every fixture)."""
    base = tmp_path_factory.mktemp("megatron")
    return {case: (base / case, _merge(case, base / case)) for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_every_tensor_equals_the_hf_model(case: str, merged) -> None:
    out, result = merged[case]
    assert result.plan.source.format == "Megatron torch_dist"
    assert_equals_reference(out, _reference(case))


@pytest.mark.parametrize("case", CASES)
def test_transformers_loads_it_as_the_hf_model(case: str, merged, tmp_path: Path) -> None:
    assert_loads_as_reference(merged[case][0], _reference(case), tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_verify_through_torch(case: str, merged) -> None:
    out, result = merged[case]
    report = streammerge.verify(out, FIX / CASES[case][0], chunk_size=4096)
    assert report.ok, report.summary()
    assert report.tensors_checked == sum(len(p.tensors) for p in result.plans)


def test_the_layouts_users_type() -> None:
    """DCP folder, veRL actor/ and step folders, Megatron-LM's iteration folder: the same checkpoint."""
    v1 = FIX / "verl_v1_qwen2_tp2_dp2"
    for typed in (v1, v1 / "global_step_1", v1 / "global_step_1" / "actor", v1 / "global_step_1/actor/dist_ckpt"):
        src = open_checkpoint(typed)
        assert isinstance(src, MegatronSource) and src.path.name == "dist_ckpt" and src.step == 1
        assert src.hf_dir == v1 / "global_step_1" / "actor" / "huggingface"
    v2 = open_checkpoint(FIX / "verl_v2_qwen3_tp2_dp2" / "global_step_1" / "actor")
    assert v2.path.parts[-2:] == ("model", "dist_ckpt") and v2.hf_dir is None
    mlm = open_checkpoint(FIX / "llama_mlm_optim_pp2_dp2")
    assert mlm.path.name == "iter_0000001" and mlm.step == 1


def test_fully_reshardable_optimizer_is_mapped_exactly(merged) -> None:
    """veRL >= 0.9's optimizer/dist_ckpt: Megatron's fp32 master params equal the HF model upcast, bit for bit;
    exp_avg and exp_avg_sq of every parameter go through the same table."""
    out, result = merged["verl_v2_qwen3_tp2_dp2"]
    assert not result.warnings, result.warnings
    opt = load_file(out / "optimizer" / "optimizer.safetensors")
    ref = load_file(_reference("verl_v2_qwen3_tp2_dp2"))
    assert set(opt) == {f"state.{k}.{kind}" for k in ref for kind in ("exp_avg", "exp_avg_sq", "param")}
    assert all(torch.equal(opt[f"state.{k}.param"], v.float()) for k, v in ref.items())
    assert all(opt[f"state.{k}.exp_avg"].abs().sum() > 0 for k in ref)
    meta = json.loads((out / "optimizer" / "optimizer.safetensors.index.json").read_text())["metadata"]
    groups = json.loads(meta["megatron_param_groups"])
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] and groups[0]["step"] == 1.0
    with pytest.raises(StreammergeError, match="no param_groups"):  # not a torch optimizer state dict
        streammerge.load_optimizer_state_dict(out)


@pytest.mark.parametrize("case", ["llama_mlm_optim_pp2_dp2", "verl_v1_qwen2_tp2_dp2"])
def test_dp_reshardable_optimizer_is_skipped_with_the_reason(case: str, merged) -> None:
    out, result = merged[case]
    assert not (out / "optimizer").exists()
    assert len(result.warnings) == 1 and "dp_reshardable" in result.warnings[0]
    assert "fully_reshardable" in result.warnings[0]  # and how to save one that can be exported


# ---------------------------------------------------------------- refusals

def _copy(case: str, tmp_path: Path) -> Path:
    dst = tmp_path / case
    shutil.copytree(FIX / case, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "huggingface" / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _rename_key(folder: Path, old: str, new: str) -> None:
    md = pickle.loads((folder / ".metadata").read_bytes())
    md.state_dict_metadata = {new if k == old else k: v for k, v in md.state_dict_metadata.items()}
    for idx in md.storage_data:
        if idx.fqn == old:
            object.__setattr__(idx, "fqn", new)
    md.storage_data = dict(md.storage_data.items())
    (folder / ".metadata").write_bytes(pickle.dumps(md))


@pytest.mark.parametrize("case", ["qwen3moe_ep2", "mixtral_ep2_tp2"])
def test_transformer_engines_moe_norm_is_the_post_attention_norm(tmp_path: Path, case: str) -> None:
    """megatron-core's Transformer Engine spec cannot fuse the pre-MLP norm of an MoE layer into a linear (the router
    comes first), so it is a TENorm of its own: `decoder.layers.pre_mlp_layernorm.weight`, where the local spec's
    keys map call it `mlp.linear_fc1.layer_norm_weight`. Either is the model's post_attention_layernorm; both at once
    is one norm too many, refused."""
    folder = _copy(case, tmp_path)
    fused, own = "decoder.layers.mlp.linear_fc1.layer_norm_weight", "decoder.layers.pre_mlp_layernorm.weight"
    _rename_key(folder, fused, own)
    out = tmp_path / "out"
    streammerge.merge(folder, out)
    assert_equals_reference(out, _reference(case))
    assert streammerge.verify(out, folder).ok

    both = tmp_path / "both"
    _resave(FIX / case, both, lambda sd: sd.__setitem__(own, sd[fused].clone()))
    with pytest.raises(UnsupportedLayoutError, match=f"Megatron key '{fused}' has no Hugging Face"):
        streammerge.plan(both)


def test_refuses_without_a_config(tmp_path: Path) -> None:
    folder = _copy("qwen3_pp2", tmp_path)
    shutil.rmtree(folder / "huggingface")
    with pytest.raises(ConfigError, match="needs the model's config.json .* --model-name"):
        streammerge.plan(folder)


@pytest.mark.parametrize("changes, error, message", [
    ({"model_type": "gemma"}, UnsupportedLayoutError, "model_type 'gemma'"),
    ({"num_key_value_heads": 4}, ConfigError, "linear_qkv.weight is .* the config gives"),
    ({"num_hidden_layers": 3}, ConfigError, "does not describe this checkpoint"),
    ({"vocab_size": 300}, ConfigError, "fewer than the config's vocab_size 300"),
    ({"tie_word_embeddings": True}, ConfigError, "ties the embeddings, but the checkpoint has its own output_layer"),
    # head numbers of another type: named, never taken for something else (a float, a string repeated)
    ({"num_key_value_heads": "2"}, ConfigError, "config.json's num_key_value_heads is \"2\", not a positive whole"),
    ({"head_dim": 8.0}, ConfigError, "config.json's head_dim is 8.0, not a positive whole number"),
    ({"num_hidden_layers": "2"}, ConfigError, "config.json's num_hidden_layers is \"2\""),
])
def test_refuses_a_config_that_does_not_describe_it(tmp_path: Path, changes, error, message) -> None:
    folder = _copy("llama_tp2_pp2", tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(error, match=message):
        streammerge.plan(folder)


@pytest.mark.parametrize("case", ["verl_v1_qwen2_tp2_dp2", "verl_v2_qwen3_tp2_dp2"])
def test_refuses_a_head_layout_the_run_did_not_record(case: str, tmp_path: Path) -> None:
    """8 heads of 4 dims and 4 KV heads give every tensor the shapes of the run's 4 heads of 8 and 2 query groups,
    and would split the fused QKV rows wrongly: veRL's transformer_config.json says which layout the run had."""
    run = _copy(case, tmp_path)
    actor = run / "global_step_1" / "actor"
    hf = actor if (actor / "huggingface").is_dir() else run  # veRL v2 saves no config: it is given by --model-name
    recorded = json.loads((actor / "transformer_config.json").read_text())
    assert (recorded["num_attention_heads"], recorded["num_query_groups"], recorded["kv_channels"]) == (4, 2, 8)
    streammerge.plan(actor, model_name=str(hf / "huggingface"))  # the run's own config
    _edit_config(hf, num_attention_heads=8, num_key_value_heads=4, head_dim=4)
    with pytest.raises(ConfigError, match="gives num_attention_heads 8, but the run recorded num_attention_heads 4 in "
                                          ".*transformer_config"):
        streammerge.plan(actor, model_name=str(hf / "huggingface"))


# ---------------------------------------------------------------- what the run recorded, against config.json

def _rope(theta: float, **scaling) -> dict:
    return {"rope_parameters": {"rope_theta": theta, "rope_type": "default", **scaling}}


@pytest.mark.parametrize("changes, error, message", [
    ({"rms_norm_eps": 1e-5}, ConfigError, "gives rms_norm_eps 1e-05, but the run recorded norm_epsilon 1e-06 in "),
    (_rope(500000.0), ConfigError, "gives rope theta 500000.0, but the run recorded rotary_base 10000 in "),
    # 8 heads of 4 and 4 KV heads: every tensor has the run's shapes (4 heads of 8, 2 groups)
    ({"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 4}, ConfigError,
     "gives num_attention_heads 8, but the run recorded num_attention_heads 4 in "),
    ({"hidden_act": "gelu"}, ConfigError, "gives hidden_act 'gelu', but the run trained a SwiGLU MLP"),
    (_rope(10000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
           original_max_position_embeddings=8192), ConfigError,
     "gives rope_type 'llama3', but the run recorded use_rope_scaling .not in the args: off. False in "),
])
def test_refuses_a_config_the_megatron_lm_args_contradict(tmp_path: Path, changes, error, message) -> None:
    """Megatron-LM keeps its args (an argparse.Namespace) in the common_state item: read without running the
    pickle, every setting that decides what the model computes must be config.json's."""
    run = _copy("llama_mlm_optim_pp2_dp2", tmp_path)
    streammerge.plan(run)  # the run's own config
    _edit_config(run, **changes)
    with pytest.raises(error, match=message + r".*iter_0000001/__0_0\.distcp \(common_state/shard_0_1\) "
                                              r"\(Megatron-LM args\)"):
        streammerge.plan(run)


@pytest.mark.parametrize("changes, error, message", [
    ({"layernorm_epsilon": 1e-5}, ConfigError,
     "gives rms_norm_eps 1e-06, but the run recorded layernorm_epsilon 1e-05"),
    ({"num_query_groups": None}, ConfigError,
     r"gives num_key_value_heads 2, but the run recorded num_attention_heads \(num_query_groups null\) 4"),
    ({"normalization": "LayerNorm"}, UnsupportedLayoutError, "recorded normalization 'LayerNorm' .*RMSNorm"),
    ({"layernorm_zero_centered_gamma": True}, UnsupportedLayoutError,
     "recorded layernorm_zero_centered_gamma True .*gamma - 1"),
    ({"gated_linear_unit": False}, UnsupportedLayoutError, "recorded gated_linear_unit False"),
    ({"rotary_interleaved": True}, UnsupportedLayoutError, "recorded rotary_interleaved True"),
    ({"add_qkv_bias": False}, ConfigError, "gives model_type 'qwen2', but the run recorded add_qkv_bias False"),
    ({"num_moe_experts": 4}, ConfigError, "gives model_type 'qwen2', but the run recorded num_moe_experts 4"),
    ({"window_size": [4, 0]}, UnsupportedLayoutError, r"recorded window_size \[4, 0\] \(sliding-window"),
])
def test_refuses_what_verls_transformer_config_contradicts(tmp_path: Path, changes, error, message) -> None:
    run = _copy("verl_v1_qwen2_tp2_dp2", tmp_path)
    path = run / "global_step_1" / "actor" / "transformer_config.json"
    recorded = json.loads(path.read_text())
    recorded.update(changes)
    path.write_text(json.dumps(recorded))
    with pytest.raises(error, match=message):
        streammerge.plan(run)


class _Boom:
    """Runs a command when unpickled by a reader that calls what a pickle names."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _args(**changes) -> argparse.Namespace:
    """Megatron-LM args of the fixtures' Llama (as make_megatron.py records them), with changes."""
    args = dict(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, group_query_attention=True,
                num_query_groups=2, kv_channels=8, position_embedding_type="rope", rotary_base=10000,
                rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=False, rope_scaling_factor=8.0,
                normalization="RMSNorm", norm_epsilon=1e-6, apply_layernorm_1p=False, swiglu=True,
                squared_relu=False, add_qkv_bias=False, qk_layernorm=False, num_experts=None, moe_router_topk=2,
                params_dtype=torch.float32, init_method=torch.nn.init.normal_)
    args.update(changes)
    return argparse.Namespace(**args)


def _common_pt(folder: Path, args: argparse.Namespace) -> None:
    """megatron-core's legacy common.pt (which Megatron reads before the common_state item)."""
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 1}, folder / "common.pt")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_args_are_read_without_running_the_pickle(tmp_path: Path, protocol: int) -> None:
    from streammerge.sources.megatron_run import global_name, inert_loads, namespace_fields

    marker = tmp_path / "ran"
    data = pickle.dumps({"args": _args(boom=_Boom(marker))}, protocol=protocol)
    args = namespace_fields(inert_loads(data)["args"])
    assert not marker.exists()
    assert args is not None and args["num_attention_heads"] == 4 and args["norm_epsilon"] == 1e-6
    assert global_name(args["params_dtype"]) == "torch.float32"
    assert global_name(args["init_method"]) == "torch.nn.init.normal_"
    assert namespace_fields(inert_loads(pickle.dumps({"args": {"a": 1}}, protocol=protocol))["args"]) is None

def test_legacy_common_pt_is_read_without_running_it(tmp_path: Path) -> None:
    folder = _copy("llama_tp2_pp2", tmp_path)
    marker = tmp_path / "ran"
    _common_pt(folder, _args(boom=_Boom(marker), later=[_Boom(marker)]))
    assert streammerge.plan(folder).weights.tensors  # torch dtypes, functions, a hostile object: records only
    assert not marker.exists()
    _common_pt(folder, _args(norm_epsilon=1e-5, boom=_Boom(marker)))
    with pytest.raises(ConfigError, match="recorded norm_epsilon 1e-05 in .*common.pt"):
        streammerge.plan(folder)
    assert not marker.exists()
    (folder / "common.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match="common.pt.*settings the run recorded"):
        streammerge.plan(folder)
    # a value nested 200,000 deep (as many bytes; the unpickler builds it without recursing): shown a few levels deep
    _common_pt(folder, _args(num_layers="SENTINEL"))
    with zipfile.ZipFile(folder / "common.pt") as z:
        records = {i.filename: z.read(i) for i in z.infolist()}
    with zipfile.ZipFile(folder / "common.pt", "w") as z:
        for name, data in records.items():
            z.writestr(name, data.replace(b"X\x08\x00\x00\x00SENTINEL", b")" + b"\x85" * 200_000))
    with pytest.raises(ConfigError, match=r"recorded num_layers \(\(\(.*\.\.\..* in .*common.pt .*not two numbers"):
        streammerge.plan(folder)


def test_common_pt_comes_before_the_common_state_item(tmp_path: Path) -> None:
    run = _copy("llama_mlm_optim_pp2_dp2", tmp_path)
    _common_pt(run / "iter_0000001", _args(num_layers=2, rotary_base=500000))
    with pytest.raises(ConfigError, match="rope theta 10000.0, but the run recorded rotary_base 500000 in .*common.pt"):
        streammerge.plan(run)


_LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192)


@pytest.mark.parametrize("args, config, error, message", [
    ({"use_rope_scaling": True}, _rope(10000.0, **_LLAMA3), None, None),  # Megatron's llama3 scaling is HF's
    ({"use_rope_scaling": True}, {"rope_parameters": None, "rope_theta": 10000.0, "rope_scaling": _LLAMA3}, None,
     None),  # as transformers 4 writes it
    ({"rotary_base": 500000}, {"rope_parameters": None, "rope_theta": 10000.0}, ConfigError,
     "gives rope theta 10000.0, but the run recorded rotary_base 500000"),
    ({"use_rope_scaling": True}, {}, ConfigError, "gives rope_type 'default', but the run recorded use_rope_scaling "
                                                  r"True \(llama3, factor 8.0\)"),
    ({"use_rope_scaling": True, "rope_scaling_factor": 32.0}, _rope(10000.0, **_LLAMA3), ConfigError,
     "gives rope scaling factor 8.0, but the run recorded use_rope_scaling True .*factor 32.0"),
    ({"use_rope_scaling": True}, _rope(10000.0, **{**_LLAMA3, "original_max_position_embeddings": 131072}),
     ConfigError, "rope scaling original_max_position_embeddings 131072, but the run recorded use_rope_scaling True"),
    ({}, _rope(10000.0, rope_type="linear", factor=2.0), ConfigError, "gives rope_type 'linear', but the run recorded"),
    ({"position_embedding_type": "yarn"}, {}, UnsupportedLayoutError, "recorded position_embedding_type 'yarn'"),
    ({"rotary_percent": 0.5}, {}, UnsupportedLayoutError, "recorded rotary_percent 0.5"),
    ({"rotary_seq_len_interpolation_factor": 4}, {}, UnsupportedLayoutError,
     "recorded rotary_seq_len_interpolation_factor 4"),
    ({"normalization": "LayerNorm"}, {}, UnsupportedLayoutError, "recorded normalization 'LayerNorm'"),
    ({"apply_layernorm_1p": True}, {}, UnsupportedLayoutError, "recorded apply_layernorm_1p True"),
    ({"swiglu": False}, {}, ConfigError, r"gives hidden_act 'silu', but the run recorded swiglu False \(gelu\)"),
    ({"group_query_attention": False}, {}, ConfigError, "gives num_key_value_heads 2, but the run recorded "
                                                        r"num_attention_heads \(no group_query_attention\) 4"),
    ({"kv_channels": 4}, {}, ConfigError, "gives head_dim 8, but the run recorded kv_channels 4"),
    ({"add_qkv_bias": True}, {}, UnsupportedLayoutError, "recorded add_qkv_bias True .*only Qwen2"),
    ({"num_experts": 4}, {}, ConfigError, "gives model_type 'llama', but the run recorded num_experts 4"),
])
def test_rope_norm_and_activation_the_args_record(tmp_path: Path, args, config, error, message) -> None:
    folder = _copy("llama_tp2_pp2", tmp_path)
    _plan_with_args(folder, _args(**args), config, error, message)


@pytest.mark.parametrize("case, args, config, error, message", [
    ("mixtral_ep2_tp2", {}, {}, None, None),
    ("mixtral_ep2_tp2", {"moe_router_topk": 1}, {}, ConfigError,
     "gives num_experts_per_tok 2, but the run recorded moe_router_topk 1"),
    ("mixtral_ep2_tp2", {"num_experts": 8}, {}, ConfigError,
     "gives num_local_experts 4, but the run recorded num_experts 8"),
    ("mixtral_ep2_tp2", {"moe_ffn_hidden_size": 32}, {}, ConfigError,
     "gives intermediate_size 16, but the run recorded moe_ffn_hidden_size 32"),
    ("mixtral_ep2_tp2", {"moe_router_pre_softmax": True}, {}, ConfigError, "recorded moe_router_pre_softmax True"),
    ("mixtral_ep2_tp2", {"moe_router_score_function": "sigmoid"}, {}, UnsupportedLayoutError,
     "recorded moe_router_score_function 'sigmoid'"),
    ("mixtral_ep2_tp2", {"moe_router_topk_scaling_factor": 2.5}, {}, UnsupportedLayoutError,
     "recorded moe_router_topk_scaling_factor 2.5"),
    ("qwen3moe_ep2", {}, {}, None, None),
    ("qwen3moe_ep2", {}, {"norm_topk_prob": False}, ConfigError,
     "gives norm_topk_prob False, but the run recorded moe_router_pre_softmax False"),
    ("qwen3moe_ep2", {"moe_router_pre_softmax": True}, {"norm_topk_prob": False}, None, None),
])
def test_moe_settings_the_args_record(tmp_path: Path, case, args, config, error, message) -> None:
    folder = _copy(case, tmp_path)
    cfg = json.loads((folder / "huggingface" / "config.json").read_text())
    base = dict(num_layers=cfg["num_hidden_layers"], rotary_base=int(cfg["rope_parameters"]["rope_theta"]),
                num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16, moe_router_pre_softmax=False,
                moe_router_score_function="softmax", moe_router_topk_scaling_factor=None,
                qk_layernorm=case == "qwen3moe_ep2")
    _plan_with_args(folder, _args(**{**base, **args}), config, error, message)


def _plan_with_args(folder: Path, args, config: dict, error, message) -> None:
    """Plan the checkpoint with these recorded args and config.json edits: it plans, or raises ``error``."""
    _common_pt(folder, args)
    _edit_config(folder, **config)
    if error is None:
        streammerge.plan(folder)
        return
    with pytest.raises(error, match=message):
        streammerge.plan(folder)


def test_defaults_are_transformers_own() -> None:
    """Where config.json leaves out eps, rope theta or the router's top-k, transformers' defaults are compared."""
    import transformers

    from streammerge.sources.megatron_run import DEFAULTS, rope_of

    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "qwen3_moe": "Qwen3MoeConfig",
               "mixtral": "MixtralConfig"}
    for model_type, cls in classes.items():
        cfg = getattr(transformers, cls)().to_dict()
        want = {"rms_norm_eps": cfg["rms_norm_eps"], "rope_theta": rope_of(cfg, model_type)[0]}
        want.update({k: cfg[k] for k in ("num_experts_per_tok", "norm_topk_prob") if k in DEFAULTS[model_type]})
        assert DEFAULTS[model_type] == want, model_type
        assert rope_of(cfg, model_type)[1] == {}


def test_refuses_qkv_bias_for_a_model_without_it(tmp_path: Path, monkeypatch) -> None:
    """Only Qwen2 has q/k/v biases alone (Llama's attention_bias adds one to o_proj): the merge itself refuses,
    not only transformers' check of the written config (which a user can turn off)."""
    monkeypatch.setenv("STREAMMERGE_ARCH_CHECK", "0")
    folder = _copy("qwen2_tp2", tmp_path)
    _edit_config(folder, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(UnsupportedLayoutError, match="q/k/v biases .*linear_qkv.bias.* a transformers llama model "
                                                     "does not have"):
        streammerge.merge(folder, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def _resave(src: Path, dst: Path, change) -> None:
    """The checkpoint read with torch's DCP reader and saved again by dcp.save (one process) after `change`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict = {}
    _load_state_dict(sd, storage_reader=dcp.FileSystemReader(src), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    change(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(dst), no_dist=True)
    shutil.copy(src / "metadata.json", dst / "metadata.json")
    shutil.copytree(src / "huggingface", dst / "huggingface")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8])
def test_refuses_fp8_weights(tmp_path: Path, dtype) -> None:
    """FP8 values mean nothing without their scales (kept elsewhere): never cast to the config's dtype as they are."""
    key = "decoder.layers.self_attention.linear_qkv.weight"

    def to_fp8(sd: dict) -> None:
        sd[key] = sd[key].to(dtype)

    folder = tmp_path / "fp8"
    _resave(FIX / "llama_tp2_pp2", folder, lambda sd: None)
    streammerge.plan(folder)  # the same checkpoint saved again in one process merges
    shutil.rmtree(folder)
    _resave(FIX / "llama_tp2_pp2", folder, to_fp8)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(UnsupportedLayoutError, match=f"{key} is stored as {name}, not a full-precision float"):
        streammerge.merge(folder, tmp_path / "out")


def test_refuses_a_megatron_checkpoint_without_metadata_json(tmp_path: Path) -> None:
    """metadata.json is Megatron's marker of a torch_dist save: without it, the stacked, fused keys are not taken
    for a plain DCP (written as they are) but refused in one line that says what is missing."""
    for case in ("llama_tp2_pp2", "mixtral_ep2_tp2"):
        folder = _copy(case, tmp_path)
        (folder / "metadata.json").unlink()
        with pytest.raises(CheckpointError, match="no metadata.json, but this is a Megatron-Core checkpoint .*"
                                                  "copy metadata.json from where it was saved"):
            streammerge.plan(folder)
    r = subprocess.run([sys.executable, "-m", "streammerge", str(folder), str(tmp_path / "out"), "--weights-only"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no metadata.json" in r.stderr, r.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_refuses_untied_config_without_output_layer(tmp_path: Path) -> None:
    folder = _copy("qwen2_tp2", tmp_path)
    _edit_config(folder, tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match="no 'output_layer.weight'"):
        streammerge.plan(folder)


def test_refuses_to_drop_an_unmapped_key(tmp_path: Path) -> None:
    folder = _copy("qwen3moe_ep2", tmp_path)
    _rename_key(folder, "decoder.layers.mlp.router.weight", "decoder.layers.mlp.router.expert_bias")
    with pytest.raises(UnsupportedLayoutError, match="'decoder.layers.mlp.router.expert_bias' has no Hugging Face"):
        streammerge.plan(folder)
    folder = _copy("llama_tp2_pp2", tmp_path / "b")
    _rename_key(folder, "common_state/shard_0_1", "mystery/shard_0_1")
    with pytest.raises(UnsupportedLayoutError, match="'mystery/shard_0_1' is not a tensor and not known"):
        streammerge.plan(folder)


def test_refuses_other_megatron_backends(tmp_path: Path) -> None:
    folder = _copy("qwen3_pp2", tmp_path)
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1}))
    with pytest.raises(UnsupportedLayoutError, match="backend 'zarr'; only torch_dist"):
        streammerge.plan(folder)


def test_verify_takes_the_model_name_the_merge_took(tmp_path: Path) -> None:
    """A Megatron-LM checkpoint has no huggingface/: the merge takes --model-name. Verify of its folder without a
    manifest asked for --model-name, which verify did not take: the README's own Megatron-LM example could never be
    verified from a copy."""
    folder = _copy("llama_tp2_pp2", tmp_path)
    config = tmp_path / "config"
    shutil.move(folder / "huggingface", config)
    out = tmp_path / "out"
    streammerge.merge(folder, out, model_name=str(config))
    shutil.rmtree(out / ".streammerge")
    with pytest.raises(ConfigError, match="give it with --model-name"):
        streammerge.verify(out, folder)
    report = streammerge.verify(out, folder, model_name=str(config))
    assert report.ok and report.tensors_checked > 0, report.summary()
    ref = load_file(FIX / "llama_tp2_pp2" / "reference" / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_verify_catches_a_changed_qkv_byte_through_torch(tmp_path: Path) -> None:
    folder = _copy("llama_tp2_pp2", tmp_path)
    out = tmp_path / "out"
    streammerge.merge(folder, out)
    src = open_checkpoint(folder)
    src.use_model(json.loads((folder / "huggingface/config.json").read_text()), folder / "huggingface")
    k = src.tensors(streammerge.MergeOptions())["model.layers.2.self_attn.k_proj.weight"]
    p = k.pieces[-1]
    with open(p.file, "r+b") as f:  # the exponent byte of the last element of group 1's k rows
        at = p.offset + ((p.shape[0] - 1) * p.stride[0] + (p.shape[1] - 1) * p.stride[1]) * 4 + 3
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))
    report = streammerge.verify(out, folder)
    assert any("model.layers.2.self_attn.k_proj.weight" in f and "torch.load" in f for f in report.failures), \
        report.summary()


def _swap_k_v(take: Take) -> Take:
    return Take(take.hf, take.key, take.index, {"k": "v", "v": "k"}.get(take.part, take.part))


def test_verify_catches_k_and_v_swapped(tmp_path: Path, monkeypatch) -> None:
    """A group's k and v rows of the fused QKV have one shape: a mapping that took one for the other, or an output
    whose k_proj and v_proj were exchanged, keeps every shape and loads; verify's own arithmetic (torch's reshape of
    the QKV rows, not the merge's offsets) tells them apart."""
    from streammerge.sources import megatron

    monkeypatch.setenv("STREAMMERGE_ARCH_CHECK", "0")  # not what is tested here, and seconds per merge
    folder = FIX / "llama_tp2_pp2"
    real = megatron.segments
    monkeypatch.setattr(megatron, "segments", lambda take, a, mshape: real(_swap_k_v(take), a, mshape))
    out = tmp_path / "mapped_wrong"
    streammerge.merge(folder, out)
    monkeypatch.setattr(megatron, "segments", real)
    report = streammerge.verify(out, folder)
    assert not report.ok
    failed = {n for f in report.failures if "torch.load" in f for n in load_file(_reference("llama_tp2_pp2")) if n in f}
    assert failed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(4) for p in "kv"}, report.failures

    out = tmp_path / "swapped"
    streammerge.merge(folder, out)
    path = out / "model.safetensors"
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    k, v = (header[f"model.layers.1.self_attn.{p}_proj.weight"]["data_offsets"] for p in "kv")
    data = bytearray(path.read_bytes())
    base = 8 + header_len
    kb, vb = bytes(data[base + k[0]:base + k[1]]), bytes(data[base + v[0]:base + v[1]])
    data[base + k[0]:base + k[1]], data[base + v[0]:base + v[1]] = vb, kb
    path.write_bytes(bytes(data))
    report = streammerge.verify(out, folder)
    assert any("model.layers.1.self_attn.k_proj.weight" in f and "torch.load" in f for f in report.failures), \
        report.summary()


def test_megatron_merge_never_imports_torch(tmp_path: Path) -> None:
    code = ("import sys, streammerge; r = streammerge.merge(sys.argv[1], sys.argv[2]); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(r.files))")
    r = subprocess.run([sys.executable, "-c", code, str(FIX / "mixtral_ep2_tp2"), str(tmp_path / "out")],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- the arithmetic, on any layout

def _stored(m: torch.Tensor, splits: list[list[int]], path: Path) -> SourceTensor:
    """`m` cut into chunks at the given per-dim boundaries (as TP/PP/EP saves cut it), each chunk written
    contiguously to a file: the pieces a DCP source would give."""
    import itertools

    pieces, offset = [], 0
    with open(path, "wb") as f:
        bounds = [sorted({0, n, *cuts}) for n, cuts in zip(m.shape, splits)]
        for box in itertools.product(*[list(zip(b, b[1:])) for b in bounds]):
            chunk = m[tuple(slice(lo, hi) for lo, hi in box)].contiguous()
            f.write(_bits(chunk))
            strides = tuple(chunk.stride())
            pieces.append(Piece(0, str(path), offset, tuple(chunk.shape), strides, tuple(lo for lo, _ in box)))
            offset += chunk.numel() * 4
    return SourceTensor("m", tuple(m.shape), dtypes.float32, tuple(pieces))


def _assemble(t: SourceTensor) -> torch.Tensor:
    out = torch.full(t.shape, float("nan"))
    for p in t.pieces:
        raw = Path(p.file).read_bytes()
        flat = torch.frombuffer(bytearray(raw), dtype=torch.float32)
        src = flat.as_strided(p.shape, p.stride, p.offset // 4)
        out[tuple(slice(s, s + n) for s, n in zip(p.start, p.shape))] = src
    return out


@settings(max_examples=60, deadline=None)
@given(groups=st.integers(1, 4), per_group=st.integers(1, 3), head_dim=st.integers(1, 4), hidden=st.integers(1, 5),
       layers=st.integers(1, 3), cut=st.data())
def test_views_equal_torch_reshapes(tmp_path_factory, groups, per_group, head_dim, hidden, layers, cut) -> None:
    """q/k/v rows per group, gate/up halves, the unpadded vocab: our pieces give what torch's view/reshape/
    chunk give, for any chunking of the stacked tensor (TP splits need not hold whole groups here)."""
    a = Arch("llama", layers, hidden, groups * per_group, groups, head_dim, 3, 2, 0, 0, False)
    rows = (a.heads + 2 * groups) * head_dim
    path = tmp_path_factory.mktemp("views") / "m.bin"
    qkv = torch.randn(layers, rows, hidden)
    row_cuts = cut.draw(st.lists(st.integers(1, max(1, rows - 1)), max_size=3))
    src = _stored(qkv, [list(range(1, layers)), row_cuts, []], path)
    for i in range(layers):
        for part in "qkv":
            take = Take("x", "k", (i,), part)
            assert torch.equal(_assemble(view(src, take, a)), torch_view(qkv[i], take, a)), (i, part)
    bias = torch.randn(layers, rows)
    src = _stored(bias, [[], row_cuts], path)
    for i in range(layers):
        for part in "qkv":
            take = Take("x", "k", (i,), part)
            assert torch.equal(_assemble(view(src, take, a)), torch_view(bias[i], take, a))
    fc1 = torch.randn(layers, 2, 6, hidden)  # (layer, expert, [gate; up], hidden)
    src = _stored(fc1, [[], [1], cut.draw(st.lists(st.integers(1, 5), max_size=2)), []], path)
    for i in range(layers):
        for e in range(2):
            for part in ("gate", "up", "all"):
                take = Take("x", "k", (i, e), part)
                assert torch.equal(_assemble(view(src, take, a)), torch_view(fc1[i, e], take, a))
    emb = torch.randn(5, hidden)  # padded vocab: 5 rows saved, 3 in the model
    src = _stored(emb, [cut.draw(st.lists(st.integers(1, 4), max_size=2)), []], path)
    assert torch.equal(_assemble(view(src, Take("x", "k", (), "vocab"), a)), emb[:3])


@pytest.mark.usefixtures("hub_env")
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_merge_and_push(hub, tmp_path: Path) -> None:
    """The Hub gets exactly the merged folder (weights, config, tokenizer, card naming the format)."""
    from hubserver import WRITE_TOKEN

    from streammerge.hub.publish import merge_and_push
    from streammerge.hub.retry import RetryPolicy

    out = tmp_path / "out"
    pushed = merge_and_push(FIX / "mixtral_ep2_tp2", out, "alice/mixtral", token=WRITE_TOKEN, endpoint=hub.endpoint,
                            retry=RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2))
    assert pushed.ok
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
             if p.is_file() and ".streammerge" not in p.relative_to(out).parts}
    remote = {p: hub.file_bytes("alice/mixtral", p) for p in hub.files("alice/mixtral") if p != ".gitattributes"}
    assert remote == local and "model.safetensors" in local
    assert "Megatron torch_dist" in local["README.md"].decode()
