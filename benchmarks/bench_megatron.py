"""Megatron-Core `torch_dist` checkpoints: streammerge against the usual Megatron -> Hugging Face converters' way of
loading the checkpoint into a model, and against torch's own DCP tools, in one run.

    python benchmarks/bench_megatron.py --preset qwen2.5-0.5b --tp 2 --pp 2 --repeat 3

NOT run in CI: the checkpoint maker and the mcore-load contender need a Python with megatron-core 0.19.2 (CPU torch
and transformers are enough), given by --mcore-python (default /tmp/mcore/bin/python: the venv of
tests/data/make_megatron.py, `python -m venv --system-site-packages /tmp/mcore` and
`pip install --no-deps --ignore-requires-python megatron-core==0.19.2`). streammerge and the torch contender run
under this Python.

Makes the checkpoint once (under --workdir; kept for the next run with --keep) with
benchmarks/make_megatron_checkpoint.py: a transformers model of the preset's shapes (random init, fixed seed,
bfloat16 as a `--bf16` run keeps its weights), loaded into a megatron-core GPTModel (local layer spec: RMSNorm,
SwiGLU, rope, qkv bias, tied embeddings, the vocab padded to a multiple of 128·TP) and saved by megatron-core's
`dist_checkpointing.save` as Megatron-LM saves `--ckpt-format torch_dist` with `--no-save-optim`, on TP·PP gloo
processes on CPU (default TP2·PP2, 4 processes): RUN/iter_0000001/ + latest_checkpointed_iteration.txt, with
RUN/huggingface/config.json (bfloat16) beside it; the transformers model's weights are kept as the ground truth.
Then runs every contender --repeat times, interleaved, each in its own subprocess, with the page cache dropped
before each run (and the common imports warmed, bench_merge.run_contenders; each contender's own heavy imports
too: megatron.core for mcore-load, torch.distributed.checkpoint for the torch one):

    mcore-load+save_file         the load-into-a-model approach of mbridge (veRL's default), NVIDIA's
                                 Megatron-Bridge and veRL's model merger, with megatron-core's local layer spec (the
                                 tools themselves hard-code Transformer Engine specs, which cannot be installed on
                                 a CPU-only machine, so they are not run here): under --mcore-python, a 1-process
                                 gloo group, the TP1·PP1 GPTModel built from config.json in bfloat16 (the padded
                                 vocab from the checkpoint's args, as Megatron-LM's loader reads it; built on CPU
                                 with no random init, as veRL's merger builds it with use_cpu_initialization),
                                 `dist_checkpointing.load({"model": model.sharded_state_dict()}, CKPT)` (Megatron
                                 reshards TP2·PP2 to one process), `model.load_state_dict`, the model's state dict
                                 mapped to Hugging Face names (the fused QKV split per query group, fc1 = [gate; up]
                                 split, the vocab padding dropped, the tied lm_head left out), safetensors'
                                 save_file into one model.safetensors
    dcp_to_torch_save+save_file  torch alone: torch.distributed.checkpoint.format_utils.dcp_to_torch_save(CKPT,
                                 tmp.pt), torch.load(tmp.pt, mmap=True) (weights_only=False: Megatron-LM's common
                                 state holds its args Namespace and the rng states), the same mapping from the
                                 stacked `decoder.layers.*` tensors, save_file into one model.safetensors, tmp.pt
                                 removed
    streammerge                  python -m streammerge CKPT OUT --dtype keep (config.json from huggingface/ beside
                                 the checkpoint)

CKPT is RUN/iter_0000001 for all three. Wall time is the whole subprocess (interpreter start and imports
included); peak RSS the largest sum over the process tree (bench_merge.measure). Every contender's output is
checked against the ground truth: the same tensor names, dtypes, shapes and bytes. Results:
benchmarks/results/megatron.json (with the generation's time when this run made the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # this checkout, not an installed streammerge

from bench_merge import bench_env, cache_policy, contender_parser, report, run_contenders, same_weights  # noqa: E402

CONTENDERS = ["mcore-load+save_file", "dcp_to_torch_save+save_file", "streammerge"]

# Megatron-Core torch_dist -> Hugging Face names through a megatron-core model (Llama/Qwen2 family):
# argv is BENCH_DIR CKPT CONFIG_DIR OUT
MCORE_LOAD = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from make_megatron_checkpoint import build_model, free_port, init_dist, setup_megatron, shapes
setup_megatron()
import torch
from megatron.core import dist_checkpointing
from safetensors.torch import save_file
ckpt, config_dir, out = sys.argv[2], sys.argv[3], sys.argv[4]
cfg = json.load(open(os.path.join(config_dir, "config.json")))
init_dist(0, 1, free_port(), 1, 1)
padded = dist_checkpointing.load_common_state_dict(ckpt)["args"].padded_vocab_size
model = build_model(cfg, 1, 1, padded, torch.bfloat16)
state = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)
missing, unexpected = model.load_state_dict(state["model"], strict=False)
assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected, (missing, unexpected)
del state
m = model.state_dict()
hidden, heads, groups, d = shapes(cfg)
per, V = heads // groups, cfg["vocab_size"]
def own(t):  # save_file refuses tensors that share memory: copy the views of a fused tensor
    return t if t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes else t.clone(
        memory_format=torch.contiguous_format)
sd = {"model.embed_tokens.weight": own(m["embedding.word_embeddings.weight"][:V])}
for i in range(cfg["num_hidden_layers"]):
    L, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    qkv = m[L + "self_attention.linear_qkv.weight"].view(groups, per + 2, d, hidden)
    sd[h + "self_attn.q_proj.weight"] = own(qkv[:, :per].reshape(-1, hidden))
    sd[h + "self_attn.k_proj.weight"] = own(qkv[:, per].reshape(-1, hidden))
    sd[h + "self_attn.v_proj.weight"] = own(qkv[:, per + 1].reshape(-1, hidden))
    if L + "self_attention.linear_qkv.bias" in m:
        b = m[L + "self_attention.linear_qkv.bias"].view(groups, per + 2, d)
        sd[h + "self_attn.q_proj.bias"] = own(b[:, :per].reshape(-1))
        sd[h + "self_attn.k_proj.bias"] = own(b[:, per].reshape(-1))
        sd[h + "self_attn.v_proj.bias"] = own(b[:, per + 1].reshape(-1))
    sd[h + "self_attn.o_proj.weight"] = own(m[L + "self_attention.linear_proj.weight"])
    gate, up = m[L + "mlp.linear_fc1.weight"].chunk(2)
    sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"] = own(gate), own(up)
    sd[h + "mlp.down_proj.weight"] = own(m[L + "mlp.linear_fc2.weight"])
    sd[h + "input_layernorm.weight"] = own(m[L + "input_layernorm.weight"])
    sd[h + "post_attention_layernorm.weight"] = own(m[L + "pre_mlp_layernorm.weight"])
sd["model.norm.weight"] = own(m["decoder.final_layernorm.weight"])
if not cfg.get("tie_word_embeddings"):
    sd["lm_head.weight"] = own(m["output_layer.weight"][:V])
os.makedirs(out, exist_ok=True)
save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
"""

# the same with torch alone: argv is CKPT CONFIG_DIR OUT
TORCH_DCP = """
import json, os, sys, warnings
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
ckpt, config_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = json.load(open(os.path.join(config_dir, "config.json")))
os.makedirs(out, exist_ok=True)
tmp = os.path.join(out, "consolidated.pt")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    dcp_to_torch_save(ckpt, tmp)
m = torch.load(tmp, map_location="cpu", mmap=True, weights_only=False)  # the common state holds an args Namespace
hidden, heads, groups = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
d = cfg.get("head_dim") or hidden // heads
per, V, L = heads // groups, cfg["vocab_size"], "decoder.layers."
def own(t):  # save_file refuses tensors that share memory: every layer is a view of a stacked tensor
    return t if t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes else t.clone(
        memory_format=torch.contiguous_format)
sd = {"model.embed_tokens.weight": own(m["embedding.word_embeddings.weight"][:V])}
qkv = m[L + "self_attention.linear_qkv.weight"]
bias = m.get(L + "self_attention.linear_qkv.bias")
for i in range(cfg["num_hidden_layers"]):
    h = f"model.layers.{i}."
    w = qkv[i].view(groups, per + 2, d, hidden)
    sd[h + "self_attn.q_proj.weight"] = own(w[:, :per].reshape(-1, hidden))
    sd[h + "self_attn.k_proj.weight"] = own(w[:, per].reshape(-1, hidden))
    sd[h + "self_attn.v_proj.weight"] = own(w[:, per + 1].reshape(-1, hidden))
    if bias is not None:
        b = bias[i].view(groups, per + 2, d)
        sd[h + "self_attn.q_proj.bias"] = own(b[:, :per].reshape(-1))
        sd[h + "self_attn.k_proj.bias"] = own(b[:, per].reshape(-1))
        sd[h + "self_attn.v_proj.bias"] = own(b[:, per + 1].reshape(-1))
    sd[h + "self_attn.o_proj.weight"] = own(m[L + "self_attention.linear_proj.weight"][i])
    gate, up = m[L + "mlp.linear_fc1.weight"][i].chunk(2)
    sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"] = own(gate), own(up)
    sd[h + "mlp.down_proj.weight"] = own(m[L + "mlp.linear_fc2.weight"][i])
    # the local spec saves its norms under Transformer Engine's names
    sd[h + "input_layernorm.weight"] = own(m[L + "self_attention.linear_qkv.layer_norm_weight"][i])
    sd[h + "post_attention_layernorm.weight"] = own(m[L + "mlp.linear_fc1.layer_norm_weight"][i])
sd["model.norm.weight"] = own(m["decoder.final_layernorm.weight"])
if not cfg.get("tie_word_embeddings"):
    sd["lm_head.weight"] = own(m["output_layer.weight"][:V])
save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
del sd, m, qkv, bias
os.remove(tmp)
"""

# each contender's own imports, warmed after the page cache is dropped (bench_merge's WARM covers torch,
# transformers, safetensors and streammerge)
WARM_MCORE = ("import sys; sys.path.insert(0, sys.argv[1]); from make_megatron_checkpoint import setup_megatron; "
              "setup_megatron(); import megatron.core.dist_checkpointing, megatron.core.models.gpt, "
              "megatron.core.models.gpt.gpt_layer_specs")
WARM_TORCH = "import torch.distributed.checkpoint.format_utils"


def command(name: str, step: Path, config_dir: Path, out: Path, mcore_python: str, env: dict) -> list[str]:
    """The contender's command line; first its own imports are warmed (after run_contenders dropped the cache)."""
    if name == "mcore-load+save_file":
        subprocess.run([mcore_python, "-c", WARM_MCORE, str(HERE)], cwd=ROOT, env=env, capture_output=True)
        return [mcore_python, "-c", MCORE_LOAD, str(HERE), str(step), str(config_dir), str(out / "m")]
    if name == "dcp_to_torch_save+save_file":
        subprocess.run([sys.executable, "-c", WARM_TORCH], cwd=ROOT, env=env, capture_output=True)
        return [sys.executable, "-c", TORCH_DCP, str(step), str(config_dir), str(out / "m")]
    if name == "streammerge":
        return [sys.executable, "-m", "streammerge", str(step), str(out / "m"), "--dtype", "keep", "--no-progress"]
    raise KeyError(name)


def mcore_version(mcore_python: str, env: dict) -> str:
    r = subprocess.run([mcore_python, "-c", "from importlib.metadata import version; print(version('megatron-core'))"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else f"? ({(r.stderr.strip().splitlines() or [''])[-1][:200]})"


def main(argv: list[str] | None = None) -> int:
    p = contender_parser(__doc__, "bench_megatron", CONTENDERS)
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--mcore-python", default="/tmp/mcore/bin/python",
                   help="a Python with megatron-core 0.19.2, for the checkpoint maker and the mcore-load contender")
    a: argparse.Namespace = p.parse_args(argv)
    contenders = a.contenders
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contenders {sorted(unknown)}")
    env = bench_env()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{a.preset}-tp{a.tp}-pp{a.pp}"
    run, truth, marker = work / tag, work / f"{tag}-truth", work / f"{tag}.complete"
    step, config_dir = run / "iter_0000001", run / "huggingface"
    generation = None
    if not marker.is_file():
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(truth, ignore_errors=True)
        t = time.perf_counter()
        r = subprocess.run([a.mcore_python, str(HERE / "make_megatron_checkpoint.py"), str(run), "--preset", a.preset,
                            "--tp", str(a.tp), "--pp", str(a.pp), "--truth", str(truth / "model.safetensors")],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=True)
        generation = {"wall_s": round(time.perf_counter() - t, 1), "processes": a.tp * a.pp,
                      **json.loads(r.stdout.strip().splitlines()[-1])}
        marker.write_text(json.dumps(generation) + "\n")
        print(f"checkpoint made in {generation['wall_s']:.0f} s ({generation})", file=sys.stderr)
    files = sorted(f for f in step.iterdir() if f.is_file())
    size = sum(f.stat().st_size for f in files)
    policy = cache_policy()
    runs, kept = run_contenders(contenders, a.repeat,
                                lambda c, out: command(c, step, config_dir, out, a.mcore_python, env), files, env,
                                work, policy)
    checks = {f"{c}'s weights == the Hugging Face model's (names, dtypes, shapes, bytes)":
              same_weights(truth, kept[c]) and same_weights(kept[c], truth) for c in kept}
    for c in kept:
        shutil.rmtree(kept[c].parent, ignore_errors=True)
    if not a.keep:
        for d in (run, truth):
            shutil.rmtree(d, ignore_errors=True)
        marker.unlink(missing_ok=True)
    facts = {"preset": a.preset, "tp": a.tp, "pp": a.pp, "files": len(files), "checkpoint_bytes": size,
             "megatron_core": mcore_version(a.mcore_python, env), "layer_spec": "local (no Transformer Engine)",
             "generation": generation if generation is not None else "reused from an earlier run (--keep)",
             "output": "one model.safetensors (each contender)"}
    report("bench_megatron", a, argv, work, policy, runs, contenders[0], checks,
           f"{a.preset}, Megatron-Core torch_dist (Megatron-LM layout) TP{a.tp}·PP{a.pp}, {len(files)} files of "
           f"{size / 1e9:.2f} GB (bfloat16, no optimizer); cache {policy}", facts)
    print("  all runs (wall s):")
    for c, rs in runs.items():
        print(f"    {c:<30}" + "  ".join(f"{r['wall_s']:.2f}" + ("" if r["returncode"] == 0 else " (failed)")
                                          for r in rs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
