"""A real Megatron-Core `torch_dist` checkpoint of a preset's shapes, in Megatron-LM's layout, for bench_megatron.py.

NOT run in CI. Runs under a Python with megatron-core 0.19.2 (CPU torch is enough, and transformers), e.g. the venv
of tests/data/make_megatron.py (`python -m venv --system-site-packages /tmp/mcore`, then
`pip install --no-deps --ignore-requires-python megatron-core==0.19.2`):

    /tmp/mcore/bin/python benchmarks/make_megatron_checkpoint.py RUN_DIR --preset qwen2.5-0.5b --tp 2 --pp 2 \
        --truth TRUTH/model.safetensors

The route is tests/data/make_megatron.py's, at the preset's sizes:

1. a transformers model of the preset's shapes (`streammerge.testing.presets.hf_config`), random init with a fixed
   seed, in bfloat16 (as a `--bf16` run keeps its weights); the norms and q/k/v biases re-drawn so that they are not
   all ones / zeros (a misplaced norm or bias would then go unseen). Its weights are written to --truth (the tied
   lm_head left out, as save_pretrained writes them): the ground truth every merge is compared with, bit for bit.
   Its config goes to RUN_DIR/huggingface/config.json (bfloat16), where streammerge and the converters find it;
2. those weights in Megatron-Core's names by hand (QKV rows interleaved per query group, fc1 = [gate; up], the
   vocab padded with random rows to a multiple of 128·TP), loaded into a TP1·PP1 GPTModel with megatron-core's
   local (non Transformer-Engine) layer spec (RMSNorm, SwiGLU, rope, qkv bias, tied embeddings) in one gloo
   process, and saved with `dist_checkpointing.save` to a staging folder;
3. TP·PP gloo processes on CPU build the sharded model, `dist_checkpointing.load` the staging checkpoint into it
   (Megatron reshards it itself) and save it as Megatron-LM's `save_checkpoint` does for `--ckpt-format torch_dist`
   with `--no-save-optim`: RUN_DIR/iter_0000001/ + latest_checkpointed_iteration.txt, the state {"args",
   "checkpoint_version", "iteration", "model": model.sharded_state_dict(...), "rng_state",
   "num_floating_point_operations_so_far"}, a fully parallel save.

Megatron on CPU needs tests/data/make_megatron.py's shims (`setup_megatron`, imported from there): one MoE module
imports triton at import time (stubbed), `torch.cuda.synchronize` / `current_device` become CPU no-ops,
`Tensor.cuda()` returns the tensor (tied embeddings with PP > 1) and the CUDA RNG tracker's `fork` a null context. The
models are built with `use_cpu_initialization=True, perform_initialization=False`: their weights are all loaded, so
nothing is drawn.

`setup_megatron`, `build_model` and `free_port` are also what bench_megatron.py's mcore-load contender builds its
model with.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests" / "data"))
from make_megatron import free_port, rng_state, setup_megatron  # noqa: E402  the fixtures' CPU shims and helpers

# ---------------------------------------------------------------- megatron-core on CPU


def rope_theta(cfg: dict) -> float:
    """config.json's rope base: transformers 5 writes it in rope_parameters, 4 at the top level."""
    return float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def shapes(cfg: dict) -> tuple[int, int, int, int]:
    """(hidden, heads, query groups, head dim) of a Hugging Face config."""
    heads = cfg["num_attention_heads"]
    return (cfg["hidden_size"], heads, cfg.get("num_key_value_heads") or heads,
            cfg.get("head_dim") or cfg["hidden_size"] // heads)


def build_model(cfg: dict, tp: int, pp: int, padded_vocab: int, dtype: torch.dtype):
    """This rank's GPTModel (local layer spec) for a Llama / Qwen2 config.json, TP·PP as parallel_state has it."""
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    hidden, heads, groups, d = shapes(cfg)
    tc = TransformerConfig(
        num_layers=cfg["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=groups, kv_channels=d, ffn_hidden_size=cfg["intermediate_size"],
        normalization="RMSNorm", layernorm_epsilon=cfg["rms_norm_eps"], gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=bool(cfg.get("attention_bias", cfg["model_type"] == "qwen2")),
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, perform_initialization=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=False,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    model = GPTModel(tc, spec, vocab_size=padded_vocab, max_sequence_length=cfg["max_position_embeddings"],
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                     position_embedding_type="rope", rotary_base=rope_theta(cfg),
                     share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings")))
    # the local spec's norms are float32 whatever params_dtype says; Megatron-LM's --bf16 wraps the model in
    # Float16Module, which casts every parameter (module.bfloat16()): so here too
    return model.to(dtype) if dtype != torch.float32 else model


def init_dist(rank: int, world: int, port: int, tp: int, pp: int) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


# ---------------------------------------------------------------- Hugging Face -> Megatron-Core names

def hf_to_mcore(cfg: dict, hf: dict[str, torch.Tensor], padded_vocab: int) -> dict[str, torch.Tensor]:
    """HF state dict -> a TP1·PP1 local-spec GPTModel's state_dict names; the embedding (and an untied lm_head)
    padded with random rows up to padded_vocab (arbitrary values, which a converter must drop)."""
    hidden, heads, groups, d = shapes(cfg)
    per = heads // groups

    def qkv(i: int, part: str) -> torch.Tensor:
        q, k, v = (hf[f"model.layers.{i}.self_attn.{n}_proj.{part}"] for n in "qkv")
        rest = q.shape[1:]
        return torch.cat([q.reshape(groups, per * d, *rest), k.reshape(groups, d, *rest),
                          v.reshape(groups, d, *rest)], 1).reshape(-1, *rest)

    def pad(w: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(4242)
        return torch.cat([w, torch.randn(padded_vocab - w.shape[0], w.shape[1], generator=g).to(w.dtype)])

    out = {"embedding.word_embeddings.weight": pad(hf["model.embed_tokens.weight"])}
    for i in range(cfg["num_hidden_layers"]):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = qkv(i, "weight")
        if h + "self_attn.q_proj.bias" in hf:
            out[m + "self_attention.linear_qkv.bias"] = qkv(i, "bias")
        out[m + "self_attention.linear_proj.weight"] = hf[h + "self_attn.o_proj.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = hf[h + "mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not cfg.get("tie_word_embeddings"):
        out["output_layer.weight"] = pad(hf["lm_head.weight"])
    return {k: v.contiguous() for k, v in out.items()}


def hf_model(preset: str, seed: int = 0):
    """(config, bfloat16 state dict without a tied lm_head) of a random transformers model of the preset."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from streammerge.testing.presets import hf_config

    settings = hf_config(preset)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # around 1, all distinct
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or not config.tie_word_embeddings}
    return config, sd


# ---------------------------------------------------------------- the TP·PP save (spawned gloo processes)

def megatron_lm_args(cfg: dict, tp: int, pp: int, padded_vocab: int, dtype: torch.dtype) -> argparse.Namespace:
    """The part of Megatron-LM's args that describes the model (the real Namespace has hundreds of fields)."""
    hidden, heads, groups, d = shapes(cfg)
    return argparse.Namespace(
        num_layers=cfg["num_hidden_layers"], hidden_size=hidden, ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads, group_query_attention=groups != heads, num_query_groups=groups, kv_channels=d,
        max_position_embeddings=cfg["max_position_embeddings"], position_embedding_type="rope",
        rotary_base=int(rope_theta(cfg)), normalization="RMSNorm", norm_epsilon=cfg["rms_norm_eps"], swiglu=True,
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings"), add_bias_linear=False,
        add_qkv_bias=bool(cfg.get("attention_bias", cfg["model_type"] == "qwen2")), padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=1, data_parallel_size=1, bf16=dtype == torch.bfloat16, fp16=False,
        params_dtype=dtype, transformer_impl="local", ckpt_format="torch_dist", use_distributed_optimizer=False,
        no_save_optim=True, tokenizer_type="HuggingFaceTokenizer", iteration=1, consumed_train_samples=8)


def _stage(cfg: dict, mcore_sd: dict[str, torch.Tensor], padded_vocab: int, stage: Path) -> None:
    """In this process, a 1-process gloo group: the TP1·PP1 model loaded with mcore_sd, saved to stage."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    init_dist(0, 1, free_port(), 1, 1)
    model = build_model(cfg, 1, 1, padded_vocab, torch.bfloat16)
    missing, unexpected = model.load_state_dict(mcore_sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)
    stage.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(stage))
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, cfg: dict, tp: int, pp: int, padded_vocab: int, stage: str,
            run: str) -> None:
    setup_megatron()
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    init_dist(rank, world, port, tp, pp)
    model = build_model(cfg, tp, pp, padded_vocab, torch.bfloat16)
    sd = dist_checkpointing.load(model.sharded_state_dict(), stage)  # resharded by Megatron
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)
    del sd
    # like Megatron-LM's save_checkpoint (megatron/training/checkpointing.py) for torch_dist, --no-save-optim
    dp_cp_group = ps.get_data_parallel_group(with_context_parallel=True)
    meta = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True, "dp_cp_group": dp_cp_group}
    rng = rng_state(rank, {})
    state = {"args": megatron_lm_args(cfg, tp, pp, padded_vocab, torch.bfloat16), "checkpoint_version": 3.0,
             "iteration": 1, "model": model.sharded_state_dict(metadata=meta),
             "rng_state": ShardedObject("rng_state", rng, (pp, tp), (ps.get_pipeline_model_parallel_rank(),
                                                                     ps.get_tensor_model_parallel_rank()),
                                        replica_id=ps.get_data_parallel_rank(with_context_parallel=True)),
             "num_floating_point_operations_so_far": 0}
    ckpt = os.path.join(run, "iter_0000001")
    os.makedirs(ckpt, exist_ok=True)
    strategy = FullyParallelSaveStrategyWrapper(TorchDistSaveShardedStrategy(), dp_cp_group)
    dist.barrier()
    dist_checkpointing.save(state, ckpt, strategy, validate_access_integrity=True,
                            content_metadata={k: v for k, v in meta.items() if k != "dp_cp_group"})
    if rank == 0:
        Path(run, "latest_checkpointed_iteration.txt").write_text("1")
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- main

def make(preset: str, tp: int, pp: int, run: Path, truth: Path) -> dict:
    """RUN/iter_0000001 (TP·PP), RUN/huggingface/config.json and the ground truth; returns the phases' seconds."""
    import gc

    import torch.multiprocessing as mp
    from safetensors.torch import save_file

    setup_megatron()
    times: dict[str, float] = {}
    t = time.perf_counter()
    config, hf = hf_model(preset)
    truth.parent.mkdir(parents=True, exist_ok=True)
    save_file(hf, str(truth), metadata={"format": "pt"})
    (run / "huggingface").mkdir(parents=True, exist_ok=True)
    config.save_pretrained(run / "huggingface")
    cfg = json.loads((run / "huggingface" / "config.json").read_text())
    padded_vocab = -(-cfg["vocab_size"] // (128 * tp)) * 128 * tp
    mcore_sd = hf_to_mcore(cfg, hf, padded_vocab)
    del hf
    times["hf_model_s"] = time.perf_counter() - t
    t = time.perf_counter()
    stage = run.parent / f"{run.name}-staging"
    shutil.rmtree(stage, ignore_errors=True)
    _stage(cfg, mcore_sd, padded_vocab, stage)
    del mcore_sd
    gc.collect()
    times["staging_s"] = time.perf_counter() - t
    t = time.perf_counter()
    world = tp * pp
    mp.spawn(_worker, args=(world, free_port(), cfg, tp, pp, padded_vocab, str(stage), str(run)), nprocs=world,
             join=True)
    times["parallel_save_s"] = time.perf_counter() - t
    shutil.rmtree(stage, ignore_errors=True)
    return times


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))  # this checkout's streammerge.testing.presets
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run folder to write (iter_0000001/, latest_checkpointed_iteration.txt, "
                               "huggingface/)")
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--truth", required=True, help="where the ground-truth model.safetensors goes")
    a = p.parse_args(argv)
    t = time.perf_counter()
    times = make(a.preset, a.tp, a.pp, Path(a.run), Path(a.truth))
    times["total_s"] = time.perf_counter() - t
    print(json.dumps({k: round(v, 1) for k, v in times.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
