"""Megatron-LM's legacy torch format (mp_rank_*/model_optim_rng.pt): streammerge against the usual converter's way,
torch.load of every rank file and the shards put together in memory, in one run.

    python benchmarks/bench_megatron_legacy.py --preset qwen2.5-0.5b --tp 2 --pp 2 --repeat 3

Makes the checkpoint once (under --workdir): a transformers model of the preset's shapes (random init, bfloat16, as a
`--bf16` run keeps its weights), turned into Megatron-Core's layout (QKV rows interleaved per query group, fc1 =
[gate; up], the vocab padded to a multiple of 128·TP) and cut as Megatron-LM's legacy save cuts it: one torch.save
per (TP, PP) rank, `iter_0000001/mp_rank_TT_PPP/model_optim_rng.pt`, each {"args": the run's Namespace,
"checkpoint_version": 3.0, "iteration": 1, "model": the rank's local state dict (layers numbered per stage; a tied
model's last stage holding its copy of the embedding as output_layer.weight)} (the layout of
tests/data/megatron/legacy_*). Then runs every contender --repeat times, interleaved, each in its own subprocess,
with the page cache dropped before each run:

    load+cat+save_file   what Megatron checkpoint converters do (Megatron-LM's tools/checkpoint loaders, transformers'
                         megatron conversion script): torch.load every rank file, torch.cat the TP shards, split the
                         fused QKV and fc1 into Hugging Face tensors, safetensors' save_file (the same ~5 GB shards)
    mmap+cat+save_file   the same with torch.load(mmap=True)
    streammerge          python -m streammerge CKPT OUT --model-name CONFIG_DIR --dtype keep

Wall time is the whole subprocess; peak RSS the largest sum over the process tree (bench_merge.measure). The outputs
are checked: streammerge's weights equal the converter's, and the Hugging Face model's the checkpoint was made from,
bit for bit. Results: benchmarks/results/megatron_legacy.json.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # this checkout, not an installed streammerge

from bench_merge import bench_env, cache_policy, contender_parser, report, run_contenders, same_weights  # noqa: E402

CONTENDERS = ["load+cat+save_file", "mmap+cat+save_file", "streammerge"]
# a converter of Megatron-LM's legacy files to Hugging Face names (Llama/Qwen2 family): argv is STEP CONFIG OUT MMAP
NAIVE = """
import glob, json, os, sys, torch
from safetensors.torch import save_file
step, config_dir, out, mmap = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
cfg = json.load(open(os.path.join(config_dir, "config.json")))
files = sorted(glob.glob(os.path.join(step, "mp_rank_*", "model_optim_rng.pt")))
ranks = [torch.load(f, map_location="cpu", weights_only=False, mmap=mmap) for f in files]
args = ranks[0]["args"]
tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
by = {}
for f, r in zip(files, ranks):
    parts = os.path.basename(os.path.dirname(f)).split("_")[2:]
    by[int(parts[0]), int(parts[1]) if pp > 1 else 0] = r["model"]
heads, groups, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
d = hidden // heads
per = heads // groups
sd, offset = {}, 0
for p in range(pp):
    shards = [by[t, p] for t in range(tp)]
    n = 1 + max(int(k.split(".")[2]) for k in shards[0] if k.startswith("decoder.layers."))
    for j in range(n):
        L, i = f"decoder.layers.{j}.", f"model.layers.{offset + j}."
        qkv = torch.cat([s[L + "self_attention.linear_qkv.weight"] for s in shards]).view(groups, per + 2, d, hidden)
        sd[i + "self_attn.q_proj.weight"] = qkv[:, :per].reshape(-1, hidden).clone()
        sd[i + "self_attn.k_proj.weight"] = qkv[:, per].reshape(-1, hidden).clone()
        sd[i + "self_attn.v_proj.weight"] = qkv[:, per + 1].reshape(-1, hidden).clone()
        if L + "self_attention.linear_qkv.bias" in shards[0]:
            b = torch.cat([s[L + "self_attention.linear_qkv.bias"] for s in shards]).view(groups, per + 2, d)
            sd[i + "self_attn.q_proj.bias"] = b[:, :per].reshape(-1).clone()
            sd[i + "self_attn.k_proj.bias"] = b[:, per].reshape(-1).clone()
            sd[i + "self_attn.v_proj.bias"] = b[:, per + 1].reshape(-1).clone()
        sd[i + "self_attn.o_proj.weight"] = torch.cat([s[L + "self_attention.linear_proj.weight"] for s in shards], 1)
        halves = [s[L + "mlp.linear_fc1.weight"].chunk(2) for s in shards]
        sd[i + "mlp.gate_proj.weight"] = torch.cat([h[0] for h in halves])
        sd[i + "mlp.up_proj.weight"] = torch.cat([h[1] for h in halves])
        sd[i + "mlp.down_proj.weight"] = torch.cat([s[L + "mlp.linear_fc2.weight"] for s in shards], 1)
        sd[i + "input_layernorm.weight"] = shards[0][L + "input_layernorm.weight"].clone()
        sd[i + "post_attention_layernorm.weight"] = shards[0][L + "pre_mlp_layernorm.weight"].clone()
    offset += n
    if p == 0:
        emb = torch.cat([s["embedding.word_embeddings.weight"] for s in shards])
        sd["model.embed_tokens.weight"] = emb[:cfg["vocab_size"]].clone()
    if p == pp - 1:
        sd["model.norm.weight"] = shards[0]["decoder.final_layernorm.weight"].clone()
        if not cfg.get("tie_word_embeddings", True):
            sd["lm_head.weight"] = torch.cat([s["output_layer.weight"] for s in shards])[:cfg["vocab_size"]].clone()
os.makedirs(out, exist_ok=True)
save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
"""


def make(preset: str, tp: int, pp: int, step: Path, config_dir: Path, truth: Path) -> None:
    """The checkpoint as Megatron-LM's legacy save cuts it, from a transformers model of the preset's shapes."""
    import argparse as ap

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from streammerge.testing.presets import hf_config

    settings = hf_config(preset)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or not config.tie_word_embeddings}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(truth))
    config.save_pretrained(config_dir)
    heads, groups, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    d, layers = hidden // heads, config.num_hidden_layers
    pad = -config.vocab_size % (128 * tp)

    def qkv(i: int, part: str) -> torch.Tensor:
        q, k, v = (sd[f"model.layers.{i}.self_attn.{n}_proj.{part}"] for n in "qkv")
        rest = q.shape[1:]
        return torch.cat([q.view(groups, -1, d, *rest), k.view(groups, 1, d, *rest), v.view(groups, 1, d, *rest)],
                         1).reshape(-1, *rest)

    def cut(t: torch.Tensor, dim: int, r: int, gated: bool = False) -> torch.Tensor:
        if gated:
            gate, up = t.chunk(2)
            return torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]).clone()
        return t.chunk(tp, dim)[r].clone()

    emb = torch.cat([sd["model.embed_tokens.weight"], torch.zeros(pad, hidden, dtype=torch.bfloat16)])
    head = emb if config.tie_word_embeddings else torch.cat(
        [sd["lm_head.weight"], torch.zeros(pad, hidden, dtype=torch.bfloat16)])
    per_stage = [layers // pp + (1 if p < layers % pp else 0) for p in range(pp)]
    args = ap.Namespace(num_layers=layers, hidden_size=hidden, ffn_hidden_size=config.intermediate_size,
                        num_attention_heads=heads, group_query_attention=True, num_query_groups=groups,
                        kv_channels=d, position_embedding_type="rope", normalization="RMSNorm",
                        norm_epsilon=config.rms_norm_eps, swiglu=True, add_qkv_bias=config.model_type == "qwen2",
                        untie_embeddings_and_output_weights=not config.tie_word_embeddings,
                        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                        expert_model_parallel_size=1, virtual_pipeline_model_parallel_size=None, bf16=True,
                        params_dtype=torch.bfloat16, ckpt_format="torch", transformer_impl="local")
    for p in range(pp):
        first = sum(per_stage[:p])
        for r in range(tp):
            m: dict[str, torch.Tensor] = {}
            if p == 0:
                m["embedding.word_embeddings.weight"] = cut(emb, 0, r)
            for j in range(per_stage[p]):
                i, L = first + j, f"decoder.layers.{j}."
                h = f"model.layers.{first + j}."
                m[L + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"].clone()
                m[L + "self_attention.linear_qkv.weight"] = cut(qkv(i, "weight"), 0, r)
                if args.add_qkv_bias:
                    m[L + "self_attention.linear_qkv.bias"] = cut(qkv(i, "bias"), 0, r)
                m[L + "self_attention.linear_proj.weight"] = cut(sd[h + "self_attn.o_proj.weight"], 1, r)
                m[L + "pre_mlp_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"].clone()
                fc1 = torch.cat([sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"]])
                m[L + "mlp.linear_fc1.weight"] = cut(fc1, 0, r, gated=True)
                m[L + "mlp.linear_fc2.weight"] = cut(sd[h + "mlp.down_proj.weight"], 1, r)
            if p == pp - 1:
                m["decoder.final_layernorm.weight"] = sd["model.norm.weight"].clone()
                if pp > 1 or not config.tie_word_embeddings:
                    m["output_layer.weight"] = cut(head, 0, r)
            path = step / (f"mp_rank_{r:02d}" + (f"_{p:03d}" if pp > 1 else "")) / "model_optim_rng.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 1, "model": m}, path)
    (step.parent / "latest_checkpointed_iteration.txt").write_text("1")


def command(name: str, step: Path, config_dir: Path, out: Path) -> list[str]:
    if name in ("load+cat+save_file", "mmap+cat+save_file"):
        return [sys.executable, "-c", NAIVE, str(step), str(config_dir), str(out / "m"),
                "1" if name.startswith("mmap") else "0"]
    if name == "streammerge":
        return [sys.executable, "-m", "streammerge", str(step), str(out / "m"), "--model-name", str(config_dir),
                "--dtype", "keep", "--no-progress"]
    raise KeyError(name)


def main(argv: list[str] | None = None) -> int:
    p = contender_parser(__doc__, "bench_megatron_legacy", CONTENDERS)
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    a = p.parse_args(argv)
    contenders = a.contenders
    env = bench_env()
    work = Path(a.workdir)
    tag = f"{a.preset}-tp{a.tp}-pp{a.pp}"
    step, config_dir, truth = work / tag / "iter_0000001", work / f"{tag}-config", work / f"{tag}-truth"
    if not (config_dir / "config.json").is_file() or not (truth / "model.safetensors").is_file():
        shutil.rmtree(work / tag, ignore_errors=True)
        truth.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", f"import bench_megatron_legacy as b, pathlib as p; b.make({a.preset!r}, "
                        f"{a.tp}, {a.pp}, p.Path({str(step)!r}), p.Path({str(config_dir)!r}), "
                        f"p.Path({str(truth / 'model.safetensors')!r}))"], cwd=HERE, env=env, check=True)
    files = sorted(step.glob("mp_rank_*/model_optim_rng.pt"))
    size = sum(f.stat().st_size for f in files)
    policy = cache_policy()
    runs, kept = run_contenders(contenders, a.repeat, lambda c, out: command(c, step, config_dir, out), files, env,
                                work, policy)
    checks = {f"{c}'s weights == the Hugging Face model's, bit for bit": same_weights(truth, kept[c]) and
              same_weights(kept[c], truth) for c in kept}
    for c in kept:
        shutil.rmtree(kept[c].parent, ignore_errors=True)
    if not a.keep:
        for d in (work / tag, config_dir, truth):
            shutil.rmtree(d, ignore_errors=True)
    report("bench_megatron_legacy", a, argv, work, policy, runs, contenders[0], checks,
           f"{a.preset}, Megatron-LM legacy TP{a.tp}·PP{a.pp}, {len(files)} rank files of {size / 1e9:.2f} GB "
           f"(bfloat16); cache {policy}",
           {"preset": a.preset, "tp": a.tp, "pp": a.pp, "rank_files": len(files), "checkpoint_bytes": size})
    return 0


if __name__ == "__main__":
    sys.exit(main())
