#!/usr/bin/env python3
"""Generate tiny, real Megatron-Core ``torch_dist`` checkpoints with exact HF ground truth.

NOT run in CI.  Needs megatron-core 0.19.2 (which declares Python >= 3.12 but imports and runs
on 3.11), torch (CPU is enough) and transformers::

    python -m venv --system-site-packages /tmp/mcore && . /tmp/mcore/bin/activate
    pip install --no-deps --ignore-requires-python megatron-core==0.19.2
    pip install numpy packaging psutil          # usually already present
    python tests/data/make_megatron.py --out tests/data/megatron            # every case
    python tests/data/make_megatron.py --out tests/data/megatron --case qwen2_tp2
    python tests/data/make_megatron.py --out tests/data/megatron --verify-only
    # a legacy case needs its "ref" case first, e.g. the VPP pair:
    python tests/data/make_megatron.py --out tests/data/megatron --case qwen2_mlm_vpp2_pp2
    python tests/data/make_megatron.py --out tests/data/megatron --case legacy_qwen2_tp2_vpp2_pp2

For each case this script

1. builds a tiny Hugging Face model with transformers (fixed seed, every parameter re-drawn so
   that norms and biases are not all ones / zeros) and writes ``huggingface/`` (config.json and
   a tiny offline WordLevel tokenizer) and ``reference/model.safetensors`` (exactly the file
   ``save_pretrained`` writes: the ground truth);
2. converts those weights by hand into the parameters of a Megatron-Core ``GPTModel`` built
   with the local (non Transformer-Engine) layer spec, and proves the mapping in a 1-process
   gloo group: the Megatron forward must equal the HF forward (allclose);
3. saves that model with ``megatron.core.dist_checkpointing`` to a staging folder, starts the
   target layout (TP/PP/EP/DP) as N gloo processes on CPU, loads the staging checkpoint into
   the sharded model (Megatron reshards it itself), re-checks the forward in the parallel
   layout where the collectives work on gloo, and saves the final ``torch_dist`` checkpoint
   (optionally with the distributed optimizer state, laid out like Megatron-LM or veRL);
4. reads the result back with torch's own DCP reader only (no Megatron), maps it to HF names
   with :func:`mcore_to_hf` and compares every tensor with the reference, bit for bit.

The "legacy" cases (Megatron-LM ``--ckpt-format torch``: ``iter_0000001/mp_rank_*/
model_optim_rng.pt``, one ``torch.save`` per model-parallel rank) re-use the HF model of a
torch_dist case (``ref``): step 1 must reproduce that case's ``reference/model.safetensors``
byte for byte (else the script stops), steps 2-3 are the same, the save is Megatron-LM's legacy
``save_checkpoint`` path (:func:`_save_legacy`), and step 4 is :func:`verify_legacy` (torch.load
of every rank file, TP/PP/EP shards re-assembled by hand, compared with the ref's reference).

Virtual pipeline parallelism (``vpp`` in a case: the interleaved schedule) builds one GPTModel
chunk per virtual stage on every PP rank (``vp_stage=v``, ``pre_process`` / ``post_process`` from
``is_pipeline_first_stage`` / ``is_pipeline_last_stage(ignore_virtual=False, vp_stage=v)``), loads
the staging checkpoint into all chunks in one ``dist_checkpointing.load`` (``{"model0": ...,
"model1": ...}``), runs the forward through the virtual stages in order (v=0,p=0), (0,1), ...,
(1,0), (1,1), and saves each chunk under ``model0``, ``model1``, ... (Megatron-LM's
``generate_state_dict`` with several chunks).  The verification places chunk v of PP rank p at
global layer ``v*L/vpp + p*L/(pp*vpp)`` (:func:`layer_offset`, Megatron's
``get_transformer_layer_offset`` written out) and checks which file / chunk holds which layer.

Megatron on CPU needs a few shims (see :func:`setup_megatron`): one MoE module imports
triton at import time (stubbed), ``torch.cuda.synchronize`` / ``current_device`` are replaced
with CPU no-ops, ``Tensor.cuda()`` returns the tensor itself (tied embeddings with PP > 1), and
the CUDA RNG tracker's ``fork`` becomes a null context (dropout is 0).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import types
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
# arch: llama | qwen2 | qwen3 | qwen3_moe | mixtral
# layout: "plain"  -> <case>/ holds the dist checkpoint itself (dist_checkpointing.save of
#                     model.sharded_state_dict(), Megatron's default save strategy)
#         "mlm"    -> Megatron-LM training layout: <case>/iter_0000001/ + tracker file,
#                     {"model", "optimizer", "args", "iteration", ...} with the distributed
#                     optimizer in Megatron-LM's default 'dp_reshardable' form, fully parallel save.
#                     "optim": False -> no optimizer / opt_param_scheduler (like --no-save-optim;
#                     default True for this layout)
#         "verl_v1" -> veRL <= 0.8 MegatronCheckpointManager (use_dist_checkpointing=True):
#                     <case>/global_step_1/actor/{dist_ckpt/,huggingface/,transformer_config.json}
#                     one DCP with {"model", "optimizer", "lr_scheduler", "rng_state"}, optimizer
#                     'dp_reshardable' (veRL's default), fully parallel save over DP
#         "verl_v2" -> veRL >= 0.9 (layout schema v2): actor/{model,optimizer,extra}/dist_ckpt/,
#                     transformer_config.json, ckpt_contents.json; optimizer 'fully_reshardable'
#                     (actor.megatron.dist_ckpt_optim_fully_reshardable=True)
#         "legacy" -> Megatron-LM legacy format (--ckpt-format torch): <case>/iter_0000001/
#                     mp_rank_*/model_optim_rng.pt (one torch.save per model-parallel rank) +
#                     tracker file.  A legacy case re-uses the HF model of the torch_dist case
#                     named by "ref" (same arch/layers/vocab/pad_to/tied/dtype/seed): its ground
#                     truth is <ref>/reference/model.safetensors and <ref>/huggingface/, and the
#                     generator checks that the reference it computes is byte-identical to it.
#                     "optim": also save Megatron's non-distributed optimizer (FP32Optimizer
#                     for fp32) + scheduler; without it the files are like --no-save-optim.
# vpp: virtual pipeline parallel size (interleaved schedule; optional, PP > 1, no optimizer):
#      one GPTModel chunk per virtual stage (vp_stage=v), saved as "model0", "model1", ...
#      instead of "model" (Megatron-LM generate_state_dict with len(model) > 1); chunk v on PP
#      rank p holds the layers from get_transformer_layer_offset = v*L/vpp + p*L/(pp*vpp).
CASES = {
    "llama_tp2_pp2": dict(arch="llama", tp=2, pp=2, ep=1, dp=1, layers=4, vocab=128, pad_to=128,
                          tied=False, dtype="float32", layout="plain", seed=1),
    "qwen2_tp2": dict(arch="qwen2", tp=2, pp=1, ep=1, dp=1, layers=2, vocab=131, pad_to=256,
                      tied=True, dtype="float32", layout="plain", seed=2),
    "qwen3_pp2": dict(arch="qwen3", tp=1, pp=2, ep=1, dp=1, layers=2, vocab=128, pad_to=128,
                      tied=True, dtype="float32", layout="plain", seed=3),
    "qwen3moe_ep2": dict(arch="qwen3_moe", tp=1, pp=1, ep=2, dp=2, layers=2, vocab=128,
                         pad_to=128, tied=False, dtype="float32", layout="plain", seed=4),
    "mixtral_ep2_tp2": dict(arch="mixtral", tp=2, pp=1, ep=2, dp=2, layers=2, vocab=128,
                            pad_to=128, tied=False, dtype="float32", layout="plain", seed=5),
    "llama_mlm_optim_pp2_dp2": dict(arch="llama", tp=1, pp=2, ep=1, dp=2, layers=2, vocab=128,
                                    pad_to=128, tied=False, dtype="bfloat16", layout="mlm",
                                    seed=6),
    "verl_v1_qwen2_tp2_dp2": dict(arch="qwen2", tp=2, pp=1, ep=1, dp=2, layers=2, vocab=128,
                                  pad_to=128, tied=True, dtype="bfloat16", layout="verl_v1",
                                  seed=7),
    "verl_v2_qwen3_tp2_dp2": dict(arch="qwen3", tp=2, pp=1, ep=1, dp=2, layers=2, vocab=128,
                                  pad_to=128, tied=False, dtype="bfloat16", layout="verl_v2",
                                  seed=8),
    "legacy_llama_tp2_pp2": dict(arch="llama", tp=2, pp=2, ep=1, dp=1, layers=4, vocab=128,
                                 pad_to=128, tied=False, dtype="float32", layout="legacy",
                                 seed=1, ref="llama_tp2_pp2", optim=False),
    "legacy_qwen2_tp2_optim": dict(arch="qwen2", tp=2, pp=1, ep=1, dp=1, layers=2, vocab=131,
                                   pad_to=256, tied=True, dtype="float32", layout="legacy",
                                   seed=2, ref="qwen2_tp2", optim=True),
    "legacy_qwen3_pp2": dict(arch="qwen3", tp=1, pp=2, ep=1, dp=1, layers=2, vocab=128,
                             pad_to=128, tied=True, dtype="float32", layout="legacy", seed=3,
                             ref="qwen3_pp2", optim=False),
    "legacy_mixtral_ep2_tp2": dict(arch="mixtral", tp=2, pp=1, ep=2, dp=2, layers=2, vocab=128,
                                   pad_to=128, tied=False, dtype="float32", layout="legacy",
                                   seed=5, ref="mixtral_ep2_tp2", optim=False),
    # VPP (interleaved): Megatron-LM torch_dist run folder with model0/model1, no optimizer ...
    "qwen2_mlm_vpp2_pp2": dict(arch="qwen2", tp=1, pp=2, vpp=2, ep=1, dp=1, layers=4, vocab=128,
                               pad_to=128, tied=True, dtype="float32", layout="mlm", seed=9,
                               optim=False),
    # ... and the same HF model in the legacy torch format, TP=2 (generate the one above first)
    "legacy_qwen2_tp2_vpp2_pp2": dict(arch="qwen2", tp=2, pp=2, vpp=2, ep=1, dp=1, layers=4,
                                      vocab=128, pad_to=128, tied=True, dtype="float32",
                                      layout="legacy", seed=9, ref="qwen2_mlm_vpp2_pp2",
                                      optim=False),
}
# the HF model of a legacy case must be the one of its "ref" case
_SAME_MODEL = ("arch", "layers", "vocab", "pad_to", "tied", "dtype", "seed")
for _n, _c in CASES.items():
    if "ref" in _c:
        assert all(_c[k] == CASES[_c["ref"]][k] for k in _SAME_MODEL), _n
    if _c.get("vpp"):   # VPP: PP > 1, layers split evenly over pp * vpp chunks, no optimizer
        assert _c["pp"] > 1 and _c["layers"] % (_c["pp"] * _c["vpp"]) == 0, _n
        assert _c["layout"] in ("mlm", "legacy") and _c.get("optim") is False, _n


def has_optimizer(c):
    # "mlm" / veRL layouts save the optimizer unless the case says optim=False
    return c.get("optim", c["layout"] in ("mlm", "verl_v1", "verl_v2"))


def vpp_size(c):
    return c.get("vpp") or 1


def layer_offset(c, pp_rank, vp_stage=0):
    """Global index of local layer 0 of model chunk vp_stage on PP rank pp_rank: Megatron's
    get_transformer_layer_offset (megatron/core/transformer/transformer_layer.py) for an even
    split without VPP (pp_rank * L/pp) and with VPP (vp_stage * L/vpp + pp_rank * L/(pp*vpp)).
    Written out here (not taken from Megatron, not a running count of the layers seen) so the
    verification checks the placement independently."""
    L, P = c["layers"], c["pp"]
    if not c.get("vpp"):
        assert vp_stage == 0
        return pp_rank * (L // P)
    V = c["vpp"]
    return vp_stage * (L // V) + pp_rank * (L // (P * V))

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 32, 4, 2, 8, 64
N_EXPERTS, TOPK, MOE_FFN = 4, 2, 16
EPS = 1e-6
SEQ = 8


def world_size(c):
    # Megatron: world = TP * PP * DP  (EP is carved out of DP x TP for the expert layers)
    return c["tp"] * c["pp"] * c["dp"]


# --------------------------------------------------------------------------------------------
# Hugging Face side
# --------------------------------------------------------------------------------------------
def hf_config(c):
    import transformers as tf

    common = dict(vocab_size=c["vocab"], hidden_size=HIDDEN, num_hidden_layers=c["layers"],
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  max_position_embeddings=64, rms_norm_eps=EPS,
                  tie_word_embeddings=c["tied"], bos_token_id=1, eos_token_id=2, pad_token_id=3)
    a = c["arch"]
    if a == "llama":
        return tf.LlamaConfig(intermediate_size=FFN, head_dim=HEAD_DIM, attention_bias=False,
                              mlp_bias=False, **common)
    if a == "qwen2":
        cfg = tf.Qwen2Config(intermediate_size=FFN, **common)
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 1000000.0}
        return cfg
    if a == "qwen3":
        cfg = tf.Qwen3Config(intermediate_size=FFN, head_dim=HEAD_DIM, attention_bias=False,
                             **common)
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 1000000.0}
        return cfg
    if a == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(intermediate_size=FFN, moe_intermediate_size=MOE_FFN,
                                num_experts=N_EXPERTS, num_experts_per_tok=TOPK,
                                norm_topk_prob=True, head_dim=HEAD_DIM, attention_bias=False,
                                decoder_sparse_step=1, mlp_only_layers=[],
                                router_aux_loss_coef=0.0, **common)
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 1000000.0}
        return cfg
    if a == "mixtral":
        return tf.MixtralConfig(intermediate_size=MOE_FFN, num_local_experts=N_EXPERTS,
                                num_experts_per_tok=TOPK, head_dim=HEAD_DIM,
                                router_aux_loss_coef=0.0, **common)
    raise ValueError(a)


def hf_model_class(c):
    import transformers as tf

    return {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
            "qwen3": tf.Qwen3ForCausalLM, "qwen3_moe": tf.Qwen3MoeForCausalLM,
            "mixtral": tf.MixtralForCausalLM}[c["arch"]]


def build_hf(c):
    torch.manual_seed(c["seed"])
    cfg = hf_config(c)
    model = hf_model_class(c)(cfg).float().eval()
    g = torch.Generator().manual_seed(1000 + c["seed"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:                      # RMSNorm weights: around 1, all distinct
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:                                   # linear / fused expert weights
                fan_in = p.shape[-1]
                scale = 3.0 if name.endswith("gate.weight") else 1.0   # decisive routing
                p.copy_(scale * torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    if c["tied"]:
        model.tie_weights()
    return model


def make_tokenizer(vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def input_ids(c):
    g = torch.Generator().manual_seed(77)
    return torch.randint(4, c["vocab"], (1, SEQ), generator=g)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# --------------------------------------------------------------------------------------------
# Mapping HF <-> Megatron-Core (local spec)
# --------------------------------------------------------------------------------------------
def _qkv_interleave(q, k, v):
    """HF q [nq*d, ...], k/v [ng*d, ...] -> Megatron linear_qkv rows, grouped per query group:
    [q heads of group 0 (nq/ng * d rows), k of group 0 (d), v of group 0 (d), q of group 1, ...]"""
    d, ng, nq = HEAD_DIM, KV_HEADS, HEADS
    rest = q.shape[1:]
    q = q.reshape(ng, nq // ng * d, *rest)
    k = k.reshape(ng, d, *rest)
    v = v.reshape(ng, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest).contiguous()


def _qkv_split(w):
    d, ng, nq = HEAD_DIM, KV_HEADS, HEADS
    rest = w.shape[1:]
    w = w.reshape(ng, nq // ng + 2, d, *rest)
    q = w[:, : nq // ng].reshape(nq * d, *rest)
    k = w[:, nq // ng].reshape(ng * d, *rest)
    v = w[:, nq // ng + 1].reshape(ng * d, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def hf_expert_names(c, i, e):
    """(gate, up, down) HF names of expert e in layer i, as save_pretrained writes them."""
    if c["arch"] == "mixtral":    # w1 = gate, w3 = up, w2 = down
        p = f"model.layers.{i}.block_sparse_moe.experts.{e}."
        return p + "w1.weight", p + "w3.weight", p + "w2.weight"
    p = f"model.layers.{i}.mlp.experts.{e}."
    return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"


def hf_router_name(c, i):
    if c["arch"] == "mixtral":
        return f"model.layers.{i}.block_sparse_moe.gate.weight"
    return f"model.layers.{i}.mlp.gate.weight"


def hf_to_mcore(c, hf):
    """HF state dict (save_pretrained names) -> Megatron GPTModel.state_dict() names (TP=PP=1).
    The embedding (and untied output layer) is padded with extra rows up to c['pad_to']."""
    out = {}
    moe = c["arch"] in ("qwen3_moe", "mixtral")

    def pad(w):
        if c["pad_to"] == w.shape[0]:
            return w
        g = torch.Generator().manual_seed(4242)
        extra = torch.randn(c["pad_to"] - w.shape[0], w.shape[1], generator=g).to(w.dtype)
        return torch.cat([w, extra], 0)      # padding rows: arbitrary values, must be dropped

    out["embedding.word_embeddings.weight"] = pad(hf["model.embed_tokens.weight"])
    for i in range(c["layers"]):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
        a = h + "self_attn."
        out[m + "self_attention.linear_qkv.weight"] = _qkv_interleave(
            hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"])
        if c["arch"] == "qwen2":
            out[m + "self_attention.linear_qkv.bias"] = _qkv_interleave(
                hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"])
        if c["arch"] in ("qwen3", "qwen3_moe"):
            out[m + "self_attention.q_layernorm.weight"] = hf[a + "q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = hf[a + "k_norm.weight"]
        out[m + "self_attention.linear_proj.weight"] = hf[a + "o_proj.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"]
        if moe:
            out[m + "mlp.router.weight"] = hf[hf_router_name(c, i)]
            for e in range(N_EXPERTS):
                gn, un, dn = hf_expert_names(c, i, e)
                x = m + f"mlp.experts.local_experts.{e}."
                out[x + "linear_fc1.weight"] = torch.cat([hf[gn], hf[un]], 0)
                out[x + "linear_fc2.weight"] = hf[dn]
        else:
            out[m + "mlp.linear_fc1.weight"] = torch.cat(
                [hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]], 0)
            out[m + "mlp.linear_fc2.weight"] = hf[h + "mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not c["tied"]:
        out["output_layer.weight"] = pad(hf["lm_head.weight"])
    return {k: v.contiguous() for k, v in out.items()}


def mcore_to_hf(c, dcp, prefix=""):
    """Global DCP tensors (torch_dist keys, layers stacked on dim 0) -> HF save_pretrained dict.

    This is the reader's job, written independently of hf_to_mcore (which it inverts)."""
    g = lambda k: dcp[prefix + k]  # noqa: E731
    hf = {}
    V = c["vocab"]
    hf["model.embed_tokens.weight"] = g("embedding.word_embeddings.weight")[:V]
    hf["model.norm.weight"] = g("decoder.final_layernorm.weight")
    if not c["tied"]:
        hf["lm_head.weight"] = g("output_layer.weight")[:V]
    moe = c["arch"] in ("qwen3_moe", "mixtral")
    L = "decoder.layers."
    for i in range(c["layers"]):
        h = f"model.layers.{i}."
        hf[h + "input_layernorm.weight"] = g(L + "self_attention.linear_qkv.layer_norm_weight")[i]
        q, k, v = _qkv_split(g(L + "self_attention.linear_qkv.weight")[i])
        hf[h + "self_attn.q_proj.weight"], hf[h + "self_attn.k_proj.weight"] = q, k
        hf[h + "self_attn.v_proj.weight"] = v
        if c["arch"] == "qwen2":
            q, k, v = _qkv_split(g(L + "self_attention.linear_qkv.bias")[i])
            hf[h + "self_attn.q_proj.bias"], hf[h + "self_attn.k_proj.bias"] = q, k
            hf[h + "self_attn.v_proj.bias"] = v
        if c["arch"] in ("qwen3", "qwen3_moe"):
            hf[h + "self_attn.q_norm.weight"] = g(L + "self_attention.q_layernorm.weight")[i]
            hf[h + "self_attn.k_norm.weight"] = g(L + "self_attention.k_layernorm.weight")[i]
        hf[h + "self_attn.o_proj.weight"] = g(L + "self_attention.linear_proj.weight")[i]
        # pre_mlp_layernorm is saved under the TE-style name, for MoE layers too
        hf[h + "post_attention_layernorm.weight"] = g(L + "mlp.linear_fc1.layer_norm_weight")[i]
        if moe:
            hf[hf_router_name(c, i)] = g(L + "mlp.router.weight")[i]
            fc1 = g(L + "mlp.experts.experts.linear_fc1.weight")[i]   # [E, 2*F, H]
            fc2 = g(L + "mlp.experts.experts.linear_fc2.weight")[i]   # [E, H, F]
            for e in range(N_EXPERTS):
                gn, un, dn = hf_expert_names(c, i, e)
                hf[gn], hf[un] = fc1[e].chunk(2, 0)
                hf[dn] = fc2[e]
        else:
            hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"] = \
                g(L + "mlp.linear_fc1.weight")[i].chunk(2, 0)
            hf[h + "mlp.down_proj.weight"] = g(L + "mlp.linear_fc2.weight")[i]
    return {k: v.contiguous() for k, v in hf.items()}


# --------------------------------------------------------------------------------------------
# Megatron side (runs in spawned gloo workers)
# --------------------------------------------------------------------------------------------
def setup_megatron():
    """CPU shims; must run before megatron.core is imported."""
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name not in sys.modules:     # this one module imports triton at import time
        stub = types.ModuleType(name)
        stub.GLOBAL_BLOCK_SIZE = 1024

        def _no_triton(*a, **k):
            raise RuntimeError("paged stash needs triton (stubbed out on CPU)")

        stub.paged_stash_copy_kernel = stub.paged_stash_pop_kernel = _no_triton
        stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
        sys.modules[name] = stub
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *a, **k: self      # tied embeddings + PP call .cuda()
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()


def _setup_megatron_optimizer_on_cpu():
    """Extra shims for DDP + DistributedOptimizer, which create tensors on device='cuda' and
    check ``param.type()`` against 'torch.cuda.*Tensor' names."""
    def _cpu(device):
        if device is None:
            return None
        return "cpu" if str(device).startswith("cuda") else device

    for fname in ("tensor", "zeros", "empty", "ones", "full", "arange", "zeros_like",
                  "empty_like"):
        orig = getattr(torch, fname)

        def wrapped(*a, _orig=orig, **k):
            if "device" in k:
                k["device"] = _cpu(k["device"])
            return _orig(*a, **k)

        setattr(torch, fname, wrapped)
    orig_type = torch.Tensor.type

    def _type(self, *a, **k):
        if a or k:
            return orig_type(self, *a, **k)
        t = orig_type(self)
        return t.replace("torch.", "torch.cuda.", 1) if not self.is_cuda else t

    torch.Tensor.type = _type


def mcore_config(c, dtype):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    kw = dict(
        num_layers=c["layers"], hidden_size=HIDDEN, num_attention_heads=HEADS,
        num_query_groups=KV_HEADS, kv_channels=HEAD_DIM, ffn_hidden_size=FFN,
        normalization="RMSNorm", layernorm_epsilon=EPS, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=c["arch"] == "qwen2",
        qk_layernorm=c["arch"] in ("qwen3", "qwen3_moe"),
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        tensor_model_parallel_size=c["tp"], pipeline_model_parallel_size=c["pp"],
        virtual_pipeline_model_parallel_size=c.get("vpp"),
        expert_model_parallel_size=c["ep"], sequence_parallel=False,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
    )
    if c["arch"] in ("qwen3_moe", "mixtral"):
        kw.update(num_moe_experts=N_EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=MOE_FFN,
                  moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
                  moe_aux_loss_coeff=0.0, moe_grouped_gemm=False)
    return TransformerConfig(**kw)


def build_mcore(c, dtype):
    """(config, GPTModel) for this rank; with VPP (c["vpp"]) the model is a list of chunks,
    one GPTModel per virtual stage v (vp_stage=v), as Megatron-LM's get_model builds them."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    cfg = mcore_config(c, dtype)
    moe = c["arch"] in ("qwen3_moe", "mixtral")
    spec = get_gpt_layer_local_spec(num_experts=N_EXPERTS if moe else None, moe_grouped_gemm=False,
                                    qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm")
    rope_base = hf_config(c).rope_parameters["rope_theta"]
    if c.get("vpp"):
        chunks = []
        for v in range(c["vpp"]):
            chunks.append(GPTModel(
                cfg, spec, vocab_size=c["pad_to"], max_sequence_length=64,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v),
                position_embedding_type="rope", rotary_base=rope_base,
                share_embeddings_and_output_weights=c["tied"], vp_stage=v))
        return cfg, chunks
    model = GPTModel(cfg, spec, vocab_size=c["pad_to"], max_sequence_length=64,
                     pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(),
                     position_embedding_type="rope", rotary_base=rope_base,
                     share_embeddings_and_output_weights=c["tied"])
    return cfg, model


def _causal_mask():
    return torch.triu(torch.ones(SEQ, SEQ), 1).bool()[None, None]   # True = masked out


def mcore_logits(c, model, ids):
    """Forward through every PP stage (activations passed with gloo send/recv), logits gathered
    over TP.  Returns full logits [b, s, padded_vocab] on the last stage, None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pos = torch.arange(SEQ)[None]
    pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), c["pp"]
    ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    with torch.no_grad():
        if pp_rank > 0:
            x = torch.empty(SEQ, 1, HIDDEN, dtype=next(model.parameters()).dtype)
            dist.recv(x, src=ranks[pp_rank - 1])
            model.set_input_tensor(x)
        out = model(ids, pos, attention_mask=_causal_mask())
        if pp_rank < pp_size - 1:
            dist.send(out.contiguous(), dst=ranks[pp_rank + 1])
            return None
    tp_group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(out) for _ in range(c["tp"])]
    dist.all_gather(parts, out.contiguous(), group=tp_group)
    return torch.cat(parts, -1).float()


def mcore_logits_vpp(c, chunks, ids):
    """Forward through the interleaved virtual stages (v=0,p=0), (0,1), ..., (1,0), (1,1), ...:
    each rank runs its chunk v when virtual stage (v, p) comes, receiving the activation from
    the previous virtual stage's PP rank and sending its output to the next one (gloo
    send/recv); logits gathered over TP.  Full logits on the last virtual stage, else None."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pos = torch.arange(SEQ)[None]
    P, V = c["pp"], c["vpp"]
    p_me = ps.get_pipeline_model_parallel_rank()
    ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    order = [(v, p) for v in range(V) for p in range(P)]
    out = None
    with torch.no_grad():
        for k, (v, p) in enumerate(order):
            if p != p_me:
                continue
            model = chunks[v]
            if k > 0:
                x = torch.empty(SEQ, 1, HIDDEN, dtype=next(model.parameters()).dtype)
                dist.recv(x, src=ranks[order[k - 1][1]])
                model.set_input_tensor(x)
            out = model(ids, pos, attention_mask=_causal_mask())
            if k < len(order) - 1:
                dist.send(out.contiguous(), dst=ranks[order[k + 1][1]])
                out = None
    if out is None:
        return None
    tp_group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(out) for _ in range(c["tp"])]
    dist.all_gather(parts, out.contiguous(), group=tp_group)
    return torch.cat(parts, -1).float()


def _init_dist(rank, ws, port, c):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ws)
    if ws == 1:
        ps.initialize_model_parallel(1, 1)
    else:
        ps.initialize_model_parallel(tensor_model_parallel_size=c["tp"],
                                     pipeline_model_parallel_size=c["pp"],
                                     virtual_pipeline_model_parallel_size=c.get("vpp"),
                                     expert_model_parallel_size=c["ep"])


def _stage_worker(rank, ws, port, c, work):
    """1 process: load the hand-converted weights, prove forward equality, save staging ckpt."""
    setup_megatron()
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    _init_dist(rank, ws, port, {**c, "tp": 1, "pp": 1, "ep": 1, "vpp": None})
    c1 = {**c, "tp": 1, "pp": 1, "ep": 1, "vpp": None}
    _, model = build_mcore(c1, torch.float32)
    sd = torch.load(os.path.join(work, "mcore_tp1.pt"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)
    model.eval()
    ref = torch.load(os.path.join(work, "hf_logits.pt"))
    got = mcore_logits(c1, model, torch.load(os.path.join(work, "ids.pt")))[..., : c["vocab"]]
    err = (got - ref).abs().max().item()
    print(f"[{c['name']}] TP1 Megatron vs HF forward: max|diff| = {err:.3g}", flush=True)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), err
    if c["dtype"] == "bfloat16":
        model.to(torch.bfloat16)
    stage = os.path.join(work, "staging")
    os.makedirs(stage, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), stage)
    dist.destroy_process_group()


def _fill_grads_and_step(model_chunks, optimizer):
    """Give every parameter a deterministic gradient and take one Adam step with lr=0:
    the optimizer gets real exp_avg / exp_avg_sq / fp32 master params while the weights stay
    exactly equal to the reference."""
    for m in model_chunks:
        for name, p in m.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            grad = 0.01 * torch.randn(p.shape, generator=g)
            if hasattr(p, "main_grad"):
                p.main_grad.copy_(grad.to(p.main_grad.dtype))
            else:
                p.grad = grad.to(p.dtype)
    ok, _, _ = optimizer.step()
    assert ok


def _parallel_worker(rank, ws, port, c, work, out_dir):
    setup_megatron()
    import argparse as ap

    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    _init_dist(rank, ws, port, c)
    dtype = torch.bfloat16 if c["dtype"] == "bfloat16" else torch.float32
    cfg, built = build_mcore(c, dtype)
    vpp = c.get("vpp")
    models = built if vpp else [built]      # VPP: one GPTModel chunk per virtual stage
    model = models[0]
    for m in models:
        m.eval()
    stage = os.path.join(work, "staging")

    chunks, optimizer, sched = [model], None, None
    distopt = c["layout"] != "legacy"     # legacy case: Megatron's non-distributed optimizer
    if has_optimizer(c):
        _setup_megatron_optimizer_on_cpu()
        from megatron.core.distributed import DistributedDataParallel as DDP
        from megatron.core.distributed import DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.transformer.module import Float16Module

        inner = Float16Module(cfg, model) if dtype == torch.bfloat16 else model
        ddp_cfg = DistributedDataParallelConfig(use_distributed_optimizer=distopt,
                                                grad_reduce_in_fp32=True,
                                                overlap_grad_reduce=False,
                                                overlap_param_gather=False)
        wrapped = DDP(cfg, ddp_cfg, inner)
        chunks = [wrapped]

    # weights: Megatron reshards the 1-process staging checkpoint into this layout
    # (Megatron-LM and veRL take sharded_state_dict() of the unwrapped GPTModel, not of DDP)
    if vpp:     # one load for all chunks, {"model0": ..., "model1": ...} as Megatron-LM does:
        # each chunk's sharded_state_dict maps its local layers to their global offsets, and the
        # sharding validation needs every layer covered in a single load
        sds = dist_checkpointing.load({f"model{v}": m.sharded_state_dict()
                                       for v, m in enumerate(models)}, stage)
        for v, m in enumerate(models):
            m.load_state_dict(sds[f"model{v}"], strict=False)
    else:
        sd = dist_checkpointing.load(model.sharded_state_dict(), stage)
        model.load_state_dict(sd, strict=False)

    # forward in the parallel layout (gloo collectives) must still equal HF
    ref = torch.load(os.path.join(work, "hf_logits.pt"))
    try:
        ids = torch.load(os.path.join(work, "ids.pt"))
        got = mcore_logits_vpp(c, models, ids) if vpp else mcore_logits(c, model, ids)
        if got is not None:
            got = got[..., : c["vocab"]]
            err = (got - ref).abs().max().item()
            rel = err / ref.abs().max().item()
            print(f"[{c['name']}] rank {rank} parallel forward ({c['dtype']}) vs HF fp32: "
                  f"max|diff| = {err:.3g} (relative {rel:.2g})", flush=True)
            if dtype == torch.float32:
                assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), err
            else:   # bf16 weights computed in bf16: only a sanity bound
                assert rel < 0.05, rel
    except (RuntimeError, NotImplementedError) as exc:   # e.g. a collective gloo lacks
        print(f"[{c['name']}] rank {rank} parallel forward skipped: {exc!r}"[:300], flush=True)

    if has_optimizer(c):
        ocfg = OptimizerConfig(optimizer="adam", lr=0.0, min_lr=0.0, weight_decay=0.01,
                               adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=0.0,
                               bf16=dtype == torch.bfloat16, params_dtype=dtype,
                               use_distributed_optimizer=distopt)
        optimizer = get_megatron_optimizer(ocfg, chunks)
        sched = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=0.0, min_lr=0.0,
                                        lr_warmup_steps=0, lr_decay_steps=10,
                                        lr_decay_style="constant", start_wd=0.01, end_wd=0.01,
                                        wd_incr_steps=10, wd_incr_style="constant")
        _fill_grads_and_step(chunks, optimizer)
        sched.step(increment=1)

    dp_cp_group = ps.get_data_parallel_group(with_context_parallel=True)
    rng_obj = ShardedObject("rng_state", rng_state(rank, {}), (c["pp"], c["tp"]),
                            (ps.get_pipeline_model_parallel_rank(),
                             ps.get_tensor_model_parallel_rank()),
                            replica_id=ps.get_data_parallel_rank(with_context_parallel=True))
    if c["layout"] == "plain":
        ckpt = out_dir
        os.makedirs(ckpt, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    elif c["layout"] == "mlm":
        # like Megatron-LM megatron/training/checkpointing.py save_checkpoint (torch_dist)
        ckpt = os.path.join(out_dir, "iter_0000001")
        os.makedirs(ckpt, exist_ok=True)
        meta = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
                "chained_optim_avoid_prefix": True, "dp_cp_group": dp_cp_group}
        args = ap.Namespace(
            num_layers=c["layers"], hidden_size=HIDDEN, ffn_hidden_size=FFN,
            num_attention_heads=HEADS, group_query_attention=True, num_query_groups=KV_HEADS,
            kv_channels=HEAD_DIM, max_position_embeddings=64, position_embedding_type="rope",
            # = 10000 and False for the llama case; Megatron-LM's --rotary-base is type=int
            rotary_base=int(hf_config(c).rope_parameters["rope_theta"]), normalization="RMSNorm",
            norm_epsilon=EPS, swiglu=True,
            untie_embeddings_and_output_weights=not c["tied"], add_bias_linear=False,
            add_qkv_bias=c["arch"] == "qwen2", padded_vocab_size=c["pad_to"],
            make_vocab_size_divisible_by=128,
            tensor_model_parallel_size=c["tp"], pipeline_model_parallel_size=c["pp"],
            expert_model_parallel_size=c["ep"], data_parallel_size=c["dp"],
            bf16=dtype == torch.bfloat16, fp16=False, params_dtype=dtype,
            ckpt_format="torch_dist", use_distributed_optimizer=True,
            tokenizer_type="HuggingFaceTokenizer", iteration=1, consumed_train_samples=8)
        if vpp:     # Megatron-LM's validated args (None without VPP: not recorded here then)
            args.num_layers_per_virtual_pipeline_stage = c["layers"] // (c["pp"] * vpp)
            args.virtual_pipeline_model_parallel_size = vpp
        if not has_optimizer(c):
            args.no_save_optim = True
        state = {"args": args, "checkpoint_version": 3.0, "iteration": 1}
        if vpp:     # generate_state_dict: len(model) > 1 -> "model0", "model1", ...
            for v, m in enumerate(models):
                state[f"model{v}"] = m.sharded_state_dict(metadata=meta)
        else:
            state["model"] = model.sharded_state_dict(metadata=meta)     # unwrap_model(model)
        if has_optimizer(c):    # else like --no-save-optim: no optimizer, no scheduler
            state["optimizer"] = optimizer.sharded_state_dict(state, metadata=meta)
            state["opt_param_scheduler"] = sched.state_dict()
        state["rng_state"] = rng_obj
        state["num_floating_point_operations_so_far"] = 123456789
        strategy = FullyParallelSaveStrategyWrapper(TorchDistSaveShardedStrategy(), dp_cp_group)
        content = {k: v for k, v in meta.items() if k != "dp_cp_group"}
        dist.barrier()
        dist_checkpointing.save(state, ckpt, strategy, validate_access_integrity=True,
                                content_metadata=content)
        if rank == 0:
            with open(os.path.join(out_dir, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("1")
    elif c["layout"] == "legacy":
        _save_legacy(c, models, optimizer, sched, out_dir, dtype)
    elif c["layout"] in ("verl_v1", "verl_v2"):
        # like veRL's MegatronCheckpointManager.save_checkpoint with use_dist_checkpointing=True:
        # v1 = veRL <= 0.8 (one dist_ckpt/ with model+optimizer+lr_scheduler+rng_state),
        # v2 = veRL >= 0.9 (model/dist_ckpt, optimizer/dist_ckpt, extra/dist_ckpt + manifest).
        actor = os.path.join(out_dir, "global_step_1", "actor")
        if c["layout"] == "verl_v1":
            meta = {"distrib_optim_sharding_type": "dp_reshardable"}      # veRL default
        else:   # actor.megatron.dist_ckpt_optim_fully_reshardable=True (mem_efficient False)
            meta = {"distrib_optim_sharding_type": "fully_reshardable",
                    "distrib_optim_fully_reshardable_mem_efficient": False}
        meta.update(singleton_local_shards=False, chained_optim_avoid_prefix=True)
        model_meta = {**meta, "dp_cp_group": dp_cp_group}
        model_sd = {"model": chunks[0].module.sharded_state_dict(metadata=model_meta)}
        optim_sd = {"optimizer": optimizer.sharded_state_dict(model_sd, is_loading=False,
                                                              metadata=meta),
                    "lr_scheduler": sched.state_dict()}
        extra_sd = {"rng_state": rng_obj}

        def save(state, path):
            os.makedirs(path, exist_ok=True)
            dist.barrier()
            strategy = FullyParallelSaveStrategyWrapper(
                TorchDistSaveShardedStrategy(backend="torch_dist", version=1), dp_cp_group)
            dist_checkpointing.save(state, path, sharded_strategy=strategy,
                                    validate_access_integrity=True, content_metadata=dict(meta))

        if c["layout"] == "verl_v1":
            save({**model_sd, **optim_sd, **extra_sd}, os.path.join(actor, "dist_ckpt"))
        else:
            save(model_sd, os.path.join(actor, "model", "dist_ckpt"))
            save(optim_sd, os.path.join(actor, "optimizer", "dist_ckpt"))
            save(extra_sd, os.path.join(actor, "extra", "dist_ckpt"))
        if rank == 0:
            _write_transformer_config(cfg, os.path.join(actor, "transformer_config.json"))
            if c["layout"] == "verl_v2":
                _write_verl_manifest(c, ws, os.path.join(actor, "ckpt_contents.json"))
    dist.barrier()
    dist.destroy_process_group()


def legacy_rank_dir(c, tp, pp, ep):
    """Megatron-LM get_checkpoint_name: mp_rank_{tp:02d}[_{pp:03d} if PP>1][_{ep:03d} if EP>1]"""
    d = f"mp_rank_{tp:02d}" if c["pp"] == 1 else f"mp_rank_{tp:02d}_{pp:03d}"
    return d + f"_{ep:03d}" if c["ep"] > 1 else d


def _legacy_args(c, dtype):
    """A representative subset of Megatron-LM's args Namespace for --ckpt-format torch (the real
    one has hundreds of fields); values are those of the model (they agree with the HF config)."""
    import argparse as ap

    moe = c["arch"] in ("qwen3_moe", "mixtral")
    a = ap.Namespace(
        num_layers=c["layers"], hidden_size=HIDDEN, ffn_hidden_size=MOE_FFN if moe else FFN,
        num_attention_heads=HEADS, group_query_attention=True, num_query_groups=KV_HEADS,
        kv_channels=HEAD_DIM, max_position_embeddings=64, position_embedding_type="rope",
        # Megatron-LM's --rotary-base is type=int
        rotary_base=int(hf_config(c).rope_parameters["rope_theta"]),
        normalization="RMSNorm", norm_epsilon=EPS, swiglu=True,
        untie_embeddings_and_output_weights=not c["tied"], add_bias_linear=False,
        add_qkv_bias=c["arch"] == "qwen2", qk_layernorm=c["arch"] in ("qwen3", "qwen3_moe"),
        num_experts=N_EXPERTS if moe else None,
        padded_vocab_size=c["pad_to"], make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=c["tp"], pipeline_model_parallel_size=c["pp"],
        virtual_pipeline_model_parallel_size=c.get("vpp"),
        expert_model_parallel_size=c["ep"], data_parallel_size=c["dp"],
        bf16=dtype == torch.bfloat16, fp16=False, params_dtype=dtype,
        transformer_impl="local", ckpt_format="torch",
        use_distributed_optimizer=False, no_save_optim=None if c.get("optim") else True,
        no_save_rng=None, tokenizer_type="HuggingFaceTokenizer", iteration=1,
        consumed_train_samples=8)
    if moe:
        a.moe_router_topk = TOPK
        a.moe_ffn_hidden_size = MOE_FFN
        a.expert_tensor_parallel_size = c["tp"]     # Megatron-LM default: = TP
        a.moe_grouped_gemm = False
        a.moe_token_dispatcher_type = "allgather"
        a.moe_router_load_balancing_type = "none"
    if c.get("vpp"):    # as given by --num-layers-per-virtual-pipeline-stage
        a.num_layers_per_virtual_pipeline_stage = c["layers"] // (c["pp"] * c["vpp"])
    return a


def _save_legacy(c, models, optimizer, sched, out_dir, dtype):
    """Like Megatron-LM megatron/training/checkpointing.py save_checkpoint with
    --ckpt-format torch: generate_state_dict() with model.state_dict_for_save_checkpoint() and
    optimizer.state_dict(), torch.save to iter_0000001/<rank dir>/model_optim_rng.pt by the
    ranks with data-parallel rank 0 or expert-data-parallel rank 0 (one writer per file).
    With VPP (several model chunks) each chunk goes under "model0", "model1", ... instead of
    "model" (its layers numbered from 0 within the chunk)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    rank = dist.get_rank()
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    ep = ps.get_expert_model_parallel_rank()
    writes = ps.get_data_parallel_rank() == 0 or ps.get_expert_data_parallel_rank() == 0
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (rank, tp, pp, ep, writes))
    writer = {}
    for r, t, p, e, w in everyone:
        if w:
            writer.setdefault((t, p, e), r)
    # every (tp, pp, ep) file must have a writer
    assert len(writer) == c["tp"] * c["pp"] * c["ep"], (writer, everyone)

    # rng: get_rng_state() for ckpt_format 'torch' = [rng_state] (no data_parallel_random_init)
    rng = rng_state(rank, tensor_parallel.get_cuda_rng_tracker().get_states())
    state = {"args": _legacy_args(c, dtype), "checkpoint_version": 3.0, "iteration": 1}
    for key, m in zip(legacy_model_keys(c), models):      # unwrap_model(model)[i]
        state[key] = m.state_dict_for_save_checkpoint()
    model = models[0]
    if c.get("optim"):
        state["optimizer"] = optimizer.state_dict()
        state["opt_param_scheduler"] = sched.state_dict()
    state["rng_state"] = rng
    state["num_floating_point_operations_so_far"] = 123456789
    if writer[(tp, pp, ep)] == rank:
        path = os.path.join(out_dir, "iter_0000001", legacy_rank_dir(c, tp, pp, ep),
                            "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state, path)
        print(f"[{c['name']}] rank {rank} wrote {os.path.relpath(path, out_dir)}", flush=True)
    if c.get("optim") and rank == 0:
        # the optimizer's positional state index -> parameter name (not in the checkpoint;
        # printed for the README)
        names = {id(p): n for n, p in model.named_parameters()}
        i = 0
        for g, grp in enumerate(optimizer.param_groups):
            for p in grp["params"]:
                print(f"[{c['name']}] optimizer state {i}: group {g} {names[id(p)]} "
                      f"{tuple(p.shape)}", flush=True)
                i += 1
    dist.barrier()
    if rank == 0:
        with open(os.path.join(out_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("1")


def _write_transformer_config(cfg, path):
    """TransformerConfig as JSON, the way veRL writes transformer_config.json (dtypes as str,
    callables dropped)."""
    import dataclasses

    d = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name.startswith("_") or callable(v):
            continue
        if isinstance(v, torch.dtype):
            v = str(v)
        try:
            json.dumps(v)
        except TypeError:
            v = str(v)
        d[f.name] = v
    with open(path, "w") as f:
        json.dump(d, f, indent=2)


def _write_verl_manifest(c, ws, path):
    """ckpt_contents.json of veRL >= 0.9 (schema v2) for save_contents=[model, optimizer, extra],
    use_dist_checkpointing=True, no bridge, no PEFT."""
    mf = {
        "schema_version": 2, "framework": "megatron", "role": "actor",
        "arch": hf_model_class(c).__name__, "global_step": 1, "world_size": ws,
        "backend": {"has_bridge": False, "use_dist_checkpointing": True, "peft": False},
        "save_contents": ["model", "optimizer", "extra"],
        "contents": {
            "model": {"path": "model/dist_ckpt", "format": "megatron_dist_checkpoint",
                      "backend": "dist_checkpointing"},
            "optimizer": {"path": "optimizer/dist_ckpt", "format": "megatron_dist_checkpoint"},
            "lr_scheduler": {"path": "optimizer/dist_ckpt", "format": "megatron_dist_checkpoint",
                             "key": "lr_scheduler"},
            "rng_state": {"path": "extra/dist_ckpt", "format": "megatron_dist_checkpoint",
                          "key": "rng_state"},
            "transformer_config": {"path": "transformer_config.json", "format": "json"},
        },
        "directories": {
            "model/dist_ckpt": "Megatron dist_checkpointing shards for model weights.",
            "optimizer/dist_ckpt": "Megatron dist_checkpointing shards for the optimizer state "
                                   "(includes lr_scheduler when present).",
            "extra/dist_ckpt": "Megatron dist_checkpointing shards for extra state (rng_state).",
        },
        "saved_any_dist_ckpt": True,
    }
    with open(path, "w") as f:
        json.dump(mf, f, indent=2, sort_keys=True)


def rng_state(rank, tracker_states):
    """Megatron-LM's saved RNG state of a rank ([one dict], as get_rng_state gives it without
    data_parallel_random_init; no 'cuda_rng_state' on CPU), every generator seeded with the rank."""
    import random

    import numpy as np

    random.seed(rank)
    np.random.seed(rank)
    torch.manual_seed(rank)
    return [{"random_rng_state": random.getstate(),
             "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": tracker_states}]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, n, *args):
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(n, free_port(), *args), nprocs=n, join=True)


# --------------------------------------------------------------------------------------------
# Torch-only reading (what the reader has to do) and verification
# --------------------------------------------------------------------------------------------
def load_dcp(path):
    """Every entry of a DCP folder as global tensors / objects, with torch only (no Megatron)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(path),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return sd


def dcp_dir(case_dir, c):
    if c["layout"] == "mlm":
        return os.path.join(case_dir, "iter_0000001")
    if c["layout"] == "verl_v1":
        return os.path.join(case_dir, "global_step_1", "actor", "dist_ckpt")
    if c["layout"] == "verl_v2":
        return os.path.join(case_dir, "global_step_1", "actor", "model", "dist_ckpt")
    return case_dir


def verify(case_dir, c):
    from safetensors.torch import load_file

    if c["layout"] == "legacy":
        return verify_legacy(case_dir, c)
    ref = load_file(os.path.join(case_dir, "reference", "model.safetensors"))
    dcp = load_dcp(dcp_dir(case_dir, c))
    # no "model." prefix even when the saved dict nests the model under "model": DCP keys are
    # the ShardedTensor keys, not the nesting path
    got = mcore_to_hf(c, dcp)
    assert set(got) == set(ref), (sorted(set(got) ^ set(ref)))
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, (k, got[k].dtype, v.dtype)
        assert got[k].contiguous().view(-1).view(torch.uint8).equal(        # same bytes
            v.contiguous().view(-1).view(torch.uint8)), k
    print(f"[{c['name']}] verified: {len(ref)} HF tensors bit-identical to reference", flush=True)
    if c.get("vpp"):
        _verify_vpp_dcp(c, dcp_dir(case_dir, c), dcp)
    if c["layout"] == "verl_v2":
        # fully_reshardable optimizer state is in model space: the same mapping applies to
        # optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>; with lr=0 the fp32 master
        # copy equals the bf16 weights upcast
        opt = load_dcp(os.path.join(case_dir, "global_step_1", "actor", "optimizer", "dist_ckpt"))
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            sub = {k[len(f"optimizer.state.{kind}."):]: v for k, v in opt.items()
                   if k.startswith(f"optimizer.state.{kind}.")}
            mapped = mcore_to_hf(c, sub)
            assert set(mapped) == set(ref)
            if kind == "param":
                for k, v in ref.items():
                    assert torch.equal(mapped[k], v.float()), k
            else:
                assert all(t.dtype == torch.float32 and t.abs().sum() > 0
                           for t in mapped.values())
        print(f"[{c['name']}] optimizer.state.param.* == reference upcast to fp32 (same mapping)",
              flush=True)


def _verify_vpp_dcp(c, path, dcp):
    """VPP torch_dist (Megatron-LM layout) facts, torch only: the common state records the
    VPP args and no model/optimizer entries; each layer's chunks were written by the PP rank
    that Megatron's offset formula gives it (with TP = DP = 1, global rank = PP rank); tied:
    no output_layer.weight key; no optimizer key without an optimizer."""
    from torch.distributed.checkpoint import FileSystemReader

    assert c["layout"] == "mlm" and c["tp"] == 1 and c["dp"] == 1 and c["ep"] == 1, c["name"]
    common = dcp["common_state/shard_0_1"]
    assert isinstance(common, list) and len(common) == 1
    common = common[0]
    want = ["args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far",
            "content_metadata"]
    if has_optimizer(c):
        want[3:3] = ["optimizer", "opt_param_scheduler"]
    assert sorted(common) == sorted(want), sorted(common)
    a = common["args"]
    assert (a.pipeline_model_parallel_size, a.virtual_pipeline_model_parallel_size,
            a.ckpt_format) == (c["pp"], c["vpp"], "torch_dist"), a
    if not has_optimizer(c):
        assert a.no_save_optim is True
        assert not [k for k in dcp if k.startswith("optimizer")], "optimizer keys present"
    if c["tied"]:
        assert "output_layer.weight" not in dcp
    # which file holds which layer: from .metadata storage_data, not from the tensors
    md = FileSystemReader(path).read_metadata()
    L, P, V = c["layers"], c["pp"], c["vpp"]
    n = L // (P * V)
    owner = {i: p for p in range(P) for v in range(V)
             for i in range(layer_offset(c, p, v), layer_offset(c, p, v) + n)}
    assert sorted(owner) == list(range(L))
    seen = {}
    for idx, info in md.storage_data.items():
        key = idx.fqn
        if key.startswith("decoder.layers.") and idx.offset is not None:
            i = idx.offset[0]
            seen.setdefault(i, set()).add(info.relative_path)
        elif key.startswith("decoder.layers.") and "/shard_" in key:   # _extra_state bytes
            i = int(key.split("/shard_")[1].split("_")[0].split(".")[0])
            seen.setdefault(i, set()).add(info.relative_path)
    assert seen == {i: {f"__{owner[i]}_0.distcp"} for i in range(L)}, seen
    for k in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight"):
        files = {info.relative_path for idx, info in md.storage_data.items() if idx.fqn == k}
        assert files == {"__0_0.distcp" if k.startswith("embedding") else f"__{P - 1}_0.distcp"}
    print(f"[{c['name']}] VPP: args.virtual_pipeline_model_parallel_size={V}; layer -> writing "
          f"rank (= PP rank): " + ", ".join(f"{i}->{owner[i]}" for i in range(L))
          + f"; common_state keys {sorted(common)}", flush=True)


# --------------------------------------------------------------------------------------------
# Legacy (--ckpt-format torch) reading and verification, torch only
# --------------------------------------------------------------------------------------------
LEGACY_KEYS = ["args", "checkpoint_version", "iteration", "model", "rng_state",
               "num_floating_point_operations_so_far"]
LEGACY_OPTIM_KEYS = ["args", "checkpoint_version", "iteration", "model", "optimizer",
                     "opt_param_scheduler", "rng_state", "num_floating_point_operations_so_far"]


def legacy_model_keys(c):
    """["model"], or with VPP ["model0", "model1", ...] (one per virtual stage)."""
    return [f"model{v}" for v in range(c["vpp"])] if c.get("vpp") else ["model"]


def legacy_keys(c):
    """The top-level keys of a rank file, in order (model -> model0, model1, ... with VPP)."""
    keys = LEGACY_OPTIM_KEYS if c.get("optim") else LEGACY_KEYS
    i = keys.index("model")
    return keys[:i] + legacy_model_keys(c) + keys[i + 1:]

# local (per-stage, TP-local) state_dict_for_save_checkpoint() names -> how TP shards combine and
# the global (DCP-style, layers stacked) name that mcore_to_hf reads
_LAYER_PARTS = {          # suffix after "decoder.layers.{local}."
    "input_layernorm.weight": ("repl", "self_attention.linear_qkv.layer_norm_weight"),
    "pre_mlp_layernorm.weight": ("repl", "mlp.linear_fc1.layer_norm_weight"),
    "self_attention.linear_qkv.weight": ("col", "self_attention.linear_qkv.weight"),
    "self_attention.linear_qkv.bias": ("col", "self_attention.linear_qkv.bias"),
    "self_attention.q_layernorm.weight": ("repl", "self_attention.q_layernorm.weight"),
    "self_attention.k_layernorm.weight": ("repl", "self_attention.k_layernorm.weight"),
    "self_attention.linear_proj.weight": ("row", "self_attention.linear_proj.weight"),
    "mlp.linear_fc1.weight": ("gated", "mlp.linear_fc1.weight"),
    "mlp.linear_fc2.weight": ("row", "mlp.linear_fc2.weight"),
    "mlp.router.weight": ("repl", "mlp.router.weight"),
}
_EXPERT_PARTS = {         # suffix after "decoder.layers.{local}.mlp.experts.local_experts.{k}."
    "linear_fc1.weight": ("gated", "mlp.experts.experts.linear_fc1.weight"),
    "linear_fc2.weight": ("row", "mlp.experts.experts.linear_fc2.weight"),
}
_TOP_PARTS = {
    "embedding.word_embeddings.weight": ("col", "embedding.word_embeddings.weight"),
    "output_layer.weight": ("col", "output_layer.weight"),
    "decoder.final_layernorm.weight": ("repl", "decoder.final_layernorm.weight"),
}


def _same_bytes(a, b):
    def raw(t):
        return t.contiguous().view(-1).view(torch.uint8)

    return a.dtype == b.dtype and a.shape == b.shape and raw(a).equal(raw(b))


def load_legacy(case_dir, c):
    """{(tp, pp, ep): dict} of every mp_rank_*/model_optim_rng.pt, with torch only."""
    with open(os.path.join(case_dir, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "1"
    it = os.path.join(case_dir, "iter_0000001")
    want = {legacy_rank_dir(c, t, p, e): (t, p, e) for t in range(c["tp"])
            for p in range(c["pp"]) for e in range(c["ep"])}
    assert sorted(os.listdir(it)) == sorted(want), (sorted(os.listdir(it)), sorted(want))
    files = {}
    for d, tpe in want.items():
        assert os.listdir(os.path.join(it, d)) == ["model_optim_rng.pt"], d
        files[tpe] = torch.load(os.path.join(it, d, "model_optim_rng.pt"), map_location="cpu",
                                weights_only=False)
    return files


def legacy_to_global(c, files):
    """Per-rank local state dicts -> global tensors under the torch_dist key names (layers
    stacked on dim 0, experts on dim 1), i.e. what mcore_to_hf reads.  Also returns facts:
    the _extra_state entries, the replica counts and, per (pp, virtual stage) model chunk, which
    global layers and which top-level tensors (embedding, final norm, output layer) it holds.
    With VPP each file holds model0, model1, ...: chunk v of PP rank p starts at global layer
    layer_offset(c, p, v) (Megatron's formula), its local layers numbered from 0."""
    import re

    T, P, E = c["tp"], c["pp"], c["ep"]
    per_chunk, per_ep = c["layers"] // (P * vpp_size(c)), N_EXPERTS // E
    slots, extra, unknown = {}, {}, []
    where = {"layers": {}, "top": {}}   # (pp, v) -> global layers / top-level keys

    def put(gkey, idx, kind, tp, t):
        s = slots.setdefault((gkey, idx), {"kind": kind, "parts": {}, "copies": 0})
        assert s["kind"] == kind
        k = 0 if kind == "repl" else tp
        s["copies"] += 1
        if k in s["parts"]:     # a replica (norms over TP, dense weights over EP files)
            assert _same_bytes(s["parts"][k], t), f"replicas differ: {gkey}{idx} tp {tp}"
        else:
            s["parts"][k] = t

    layer_re = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
    expert_re = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(.+)")
    for (tp, pp, ep), sd in files.items():
        for v, mkey in enumerate(legacy_model_keys(c)):     # VPP: model0, model1, ...
            base = layer_offset(c, pp, v)                   # global index of local layer 0
            for key, t in sd[mkey].items():
                if key.endswith("_extra_state"):
                    extra[(tp, pp, ep, mkey, key)] = t
                    continue
                m = layer_re.fullmatch(key)
                if m is None:
                    if key not in _TOP_PARTS:
                        unknown.append(key)
                        continue
                    where["top"].setdefault((pp, v), set()).add(key)
                    kind, gkey = _TOP_PARTS[key]
                    put(gkey, (), kind, tp, t)
                    continue
                assert int(m.group(1)) < per_chunk, (mkey, key)   # local numbering from 0
                i = base + int(m.group(1))                        # global layer
                where["layers"].setdefault((pp, v), set()).add(i)
                x = expert_re.fullmatch(m.group(2))
                if x is not None:
                    e = ep * per_ep + int(x.group(1))               # global expert
                    if x.group(2) not in _EXPERT_PARTS:
                        unknown.append(key)
                        continue
                    kind, gkey = _EXPERT_PARTS[x.group(2)]
                    put("decoder.layers." + gkey, (i, e), kind, tp, t)
                elif m.group(2) in _LAYER_PARTS:
                    kind, gkey = _LAYER_PARTS[m.group(2)]
                    put("decoder.layers." + gkey, (i,), kind, tp, t)
                else:
                    unknown.append(key)
    assert not unknown, f"unmapped legacy keys: {unknown}"

    pieces = {}
    for (gkey, idx), s in slots.items():
        parts = s["parts"]
        if s["kind"] == "repl":
            full = parts[0]
        else:
            assert sorted(parts) == list(range(T)), (gkey, idx, sorted(parts))
            ps_ = [parts[r] for r in range(T)]
            if s["kind"] == "col":
                full = torch.cat(ps_, 0)
            elif s["kind"] == "row":
                full = torch.cat(ps_, 1)
            else:   # gated fc1: each TP rank holds [gate_shard; up_shard]
                halves = [p.chunk(2, 0) for p in ps_]
                full = torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
        pieces.setdefault(gkey, {})[idx] = full
    glob = {}
    for gkey, by_idx in pieces.items():
        if () in by_idx:
            glob[gkey] = by_idx[()]
        elif len(next(iter(by_idx))) == 1:
            assert sorted(by_idx) == [(i,) for i in range(c["layers"])], gkey
            glob[gkey] = torch.stack([by_idx[(i,)] for i in range(c["layers"])])
        else:
            want = [(i, e) for i in range(c["layers"]) for e in range(N_EXPERTS)]
            assert sorted(by_idx) == want, gkey
            glob[gkey] = torch.stack([torch.stack([by_idx[(i, e)] for e in range(N_EXPERTS)])
                                      for i in range(c["layers"])])
    copies = {f"{g}{list(i) if i else ''}": s["copies"] for (g, i), s in slots.items()
              if s["kind"] == "repl"}
    return glob, extra, copies, where


def _expected_adam(name, shape, beta1=0.9, beta2=0.95):
    """exp_avg / exp_avg_sq after one torch AdamW step from zero state with the gradient that
    _fill_grads_and_step gives the DDP parameter 'module.<name>'."""
    g = torch.Generator().manual_seed(zlib.crc32(("module." + name).encode()))
    grad = 0.01 * torch.randn(shape, generator=g)
    m = torch.zeros(shape).lerp_(grad, 1 - beta1)
    v = torch.zeros(shape).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return m, v


def verify_legacy(case_dir, c):
    from safetensors.torch import load_file

    ref_dir = os.path.join(os.path.dirname(os.path.abspath(case_dir)), c["ref"])
    ref = load_file(os.path.join(ref_dir, "reference", "model.safetensors"))
    files = load_legacy(case_dir, c)
    keys = legacy_keys(c)       # "model", or "model0", "model1", ... with VPP
    for tpe, sd in files.items():
        assert list(sd) == keys, (tpe, list(sd))
        assert sd["checkpoint_version"] == 3.0 and sd["iteration"] == 1, tpe
        a = sd["args"]
        assert (a.ckpt_format, a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                a.expert_model_parallel_size) == ("torch", c["tp"], c["pp"], c["ep"]), tpe
        assert a.virtual_pipeline_model_parallel_size == c.get("vpp"), tpe
        assert a.padded_vocab_size == c["pad_to"], tpe
        for mkey in legacy_model_keys(c):
            for t in sd[mkey].values():         # no tensor drags a larger storage along
                if isinstance(t, torch.Tensor):
                    assert t.untyped_storage().nbytes() == t.nbytes, tpe
    glob, extra, copies, where = legacy_to_global(c, files)
    assert all(v is None for v in extra.values()), {k: type(v) for k, v in extra.items()}
    # placement: chunk v of PP rank p holds exactly the layers Megatron's offset formula gives;
    # the embedding is only in the first virtual stage (p 0, v 0), the final norm (and the
    # output layer, untied or tied with PP > 1) only in the last one (p P-1, v V-1)
    P, V = c["pp"], vpp_size(c)
    n = c["layers"] // (P * V)
    for p in range(P):
        for v in range(V):
            o = layer_offset(c, p, v)
            assert where["layers"].get((p, v)) == set(range(o, o + n)), (p, v, where)
    first, last = (0, 0), (P - 1, V - 1)
    top_want = {first: {"embedding.word_embeddings.weight"}}
    top_want.setdefault(last, set()).add("decoder.final_layernorm.weight")
    if not c["tied"] or P > 1:
        top_want[last].add("output_layer.weight")
    assert where["top"] == top_want, (where["top"], top_want)
    placement = "; ".join(
        f"pp {p} {legacy_model_keys(c)[v]}: layers {sorted(where['layers'][(p, v)])}"
        + (f" + {', '.join(sorted(where['top'][(p, v)]))}" if (p, v) in where["top"] else "")
        for p in range(P) for v in range(V))
    print(f"[{c['name']}] placement (the same in every TP/EP file of a PP rank): {placement}",
          flush=True)
    if c["tied"]:
        # with PP > 1 the last (virtual) stage holds a copy of the embedding as
        # output_layer.weight
        out = glob.pop("output_layer.weight", None)
        assert (out is not None) == (P > 1)
        if out is not None:
            assert _same_bytes(out, glob["embedding.word_embeddings.weight"])
            print(f"[{c['name']}] tied: last stage's output_layer.weight == "
                  f"embedding.word_embeddings.weight (bit-identical)", flush=True)
    got = mcore_to_hf(c, glob)
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    for k, v in ref.items():
        assert _same_bytes(got[k], v), k
    used = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"}
    unused = [k for k in glob if k not in used and not k.startswith("decoder.layers.")
              and not (k == "output_layer.weight" and not c["tied"])]
    assert not unused, unused
    print(f"[{c['name']}] verified: {len(files)} rank files, {len(ref)} HF tensors "
          f"bit-identical to {c['ref']}/reference; {len(extra)} _extra_state entries (all None); "
          f"{len(copies)} replicated tensors (norms/router) each identical in all "
          f"{min(copies.values())}..{max(copies.values())} files holding it", flush=True)
    if c.get("optim"):
        for (tp, _pp, _ep), sd in files.items():
            opt = sd["optimizer"]
            assert list(opt) == ["state", "param_groups"], list(opt)
            pos = [i for g in opt["param_groups"] for i in g["params"]]
            assert pos == list(range(len(pos))) and sorted(opt["state"]) == pos
            params = {k: v for k, v in sd["model"].items() if not k.endswith("_extra_state")}
            assert len(pos) == len(params)
            mapping = {}
            for i in pos:
                st = opt["state"][i]
                assert sorted(st) == ["exp_avg", "exp_avg_sq", "step"], sorted(st)
                hits = []
                for name, w in params.items():
                    if w.shape != st["exp_avg"].shape:
                        continue
                    m, v = _expected_adam(name, w.shape)
                    if torch.equal(st["exp_avg"], m) and torch.equal(st["exp_avg_sq"], v):
                        hits.append(name)
                assert len(hits) == 1, (i, hits)
                mapping[i] = hits[0]
                assert float(st["step"]) == 1.0
            assert sorted(mapping.values()) == sorted(params)
            print(f"[{c['name']}] tp{tp}: optimizer state {len(pos)} positions = the "
                  f"{len(params)} params, each matched to its name by its own Adam moments "
                  f"(bit-exact): "
                  + ", ".join(f"{i}={n}" for i, n in mapping.items()), flush=True)


# --------------------------------------------------------------------------------------------
def _check_same_reference(c, out_root, hf_tmp):
    """A legacy case writes no reference of its own: the HF model it was made from must be
    byte-identical to its torch_dist "ref" case's reference/model.safetensors (and have the
    same config.json, up to the transformers version that wrote it)."""
    ref_dir = os.path.join(out_root, c["ref"])
    ref_st = os.path.join(ref_dir, "reference", "model.safetensors")
    if not os.path.isfile(ref_st):
        raise SystemExit(f"[{c['name']}] needs {ref_st}: generate case {c['ref']!r} first")
    with open(ref_st, "rb") as f1, open(os.path.join(hf_tmp, "model.safetensors"), "rb") as f2:
        a, b = f1.read(), f2.read()
    if a != b:
        raise SystemExit(f"[{c['name']}] FATAL: the HF model built here is NOT byte-identical "
                         f"to {ref_st} ({len(b)} vs {len(a)} bytes); refusing to write a "
                         f"legacy checkpoint with a different ground truth")
    with open(os.path.join(ref_dir, "huggingface", "config.json")) as f1, \
            open(os.path.join(hf_tmp, "config.json")) as f2:
        c1, c2 = json.load(f1), json.load(f2)
    c1.pop("transformers_version", None)
    c2.pop("transformers_version", None)
    if c1 != c2:
        raise SystemExit(f"[{c['name']}] FATAL: config.json differs from {ref_dir}/huggingface: "
                         f"{sorted(k for k in set(c1) | set(c2) if c1.get(k) != c2.get(k))}")
    print(f"[{c['name']}] HF model == {c['ref']}/reference/model.safetensors byte for byte "
          f"({len(a)} bytes); config.json equal", flush=True)


def generate(name, out_root, keep_work=False):
    c = {**CASES[name], "name": name}
    case_dir = os.path.join(out_root, name)
    if c["layout"] != "legacy":     # a legacy case is cleared only once its reference checks
        shutil.rmtree(case_dir, ignore_errors=True)
        os.makedirs(case_dir)
    work = tempfile.mkdtemp(prefix=f"mcore-{name}-")

    model = build_hf(c)
    ids = input_ids(c)
    torch.save(hf_logits(model, ids), os.path.join(work, "hf_logits.pt"))
    torch.save(ids, os.path.join(work, "ids.pt"))
    tok = make_tokenizer(c["vocab"])

    hf_tmp = os.path.join(work, "hf")
    if c["dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(hf_tmp)
    if c["layout"] == "legacy":
        _check_same_reference(c, out_root, hf_tmp)
        shutil.rmtree(case_dir, ignore_errors=True)
        os.makedirs(case_dir)
    # veRL v1 writes config + tokenizer (no weights) to actor/huggingface/; veRL v2 with
    # use_dist_checkpointing and no bridge writes no HF folder at all, so for it (and for the
    # plain / Megatron-LM cases) the config lives in <case>/huggingface/, outside the tree.
    if c["layout"] != "legacy":     # a legacy case uses its ref case's config and reference
        hf_dir = (os.path.join(case_dir, "global_step_1", "actor", "huggingface")
                  if c["layout"] == "verl_v1" else os.path.join(case_dir, "huggingface"))
        os.makedirs(hf_dir, exist_ok=True)
        shutil.copy(os.path.join(hf_tmp, "config.json"), hf_dir)
        tok.save_pretrained(hf_dir)
        os.makedirs(os.path.join(case_dir, "reference"))
        shutil.copy(os.path.join(hf_tmp, "model.safetensors"),
                    os.path.join(case_dir, "reference", "model.safetensors"))

    from safetensors.torch import load_file

    hf_sd = {k: v.float() for k, v in load_file(os.path.join(hf_tmp, "model.safetensors")).items()}
    if c["dtype"] == "bfloat16":
        # the forward check runs in fp32 on the bf16-rounded weights: recompute the HF logits
        m32 = build_hf(c)
        m32.load_state_dict(hf_sd, strict=False)
        if c["tied"]:
            m32.tie_weights()
        torch.save(hf_logits(m32, ids), os.path.join(work, "hf_logits.pt"))
    torch.save(hf_to_mcore(c, hf_sd), os.path.join(work, "mcore_tp1.pt"))

    _spawn(_stage_worker, 1, c, work)
    out_dir = case_dir
    _spawn(_parallel_worker, world_size(c), c, work, out_dir)

    if c["layout"].startswith("verl"):
        # trainer-level files next to the actor folder (ray_trainer._save_checkpoint)
        torch.save({"_snapshot": {"_num_yielded": 1}, "_iterator_finished": False},
                   os.path.join(case_dir, "global_step_1", "data.pt"))
        with open(os.path.join(case_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("1")
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    verify(case_dir, c)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "megatron"))
    ap.add_argument("--case", action="append", choices=sorted(CASES))
    ap.add_argument("--verify-only", action="store_true")
    ap.add_argument("--keep-work", action="store_true")
    a = ap.parse_args()
    for name in a.case or list(CASES):
        if a.verify_only:
            verify(os.path.join(a.out, name), {**CASES[name], "name": name})
        else:
            generate(name, a.out, a.keep_work)


if __name__ == "__main__":
    main()
