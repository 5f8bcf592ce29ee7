"""LoRA benchmark: folding the adapter in against a plain merge of the same checkpoint, and against peft.

    python benchmarks/bench_lora.py --preset qwen2.5-0.5b --world-size 4 --rank 16

Makes a veRL-style FSDP2 LoRA checkpoint with the shapes of a public model (the peft names of
`get_peft_model(model, LoraConfig(r, alpha, target_modules="all-linear"))`: every Linear of the
decoder layers as `base_layer` + `lora_A.default` + `lora_B.default`, Shard(0) DTensors, float32,
non-zero B), written directly as rank files (streammerge.testing.presets' values for the base,
small deterministic values for A and B). Then, each in its own subprocess, interleaved, --repeat times,
with the rank files dropped from the page cache before every run (as bench_merge.py does):

    plain     streammerge --lora adapter: the base weights copied as saved, plus the adapter folder
    fold      streammerge --lora fold: every targeted weight computed as W + scale * B @ A
    both      streammerge (default --lora both): the fold plus the adapter folder
    peft      benchmarks/peft_merge.py: load every rank, concatenate, get_peft_model, merge_and_unload,
              save_pretrained

all in float32 (--dtype keep). Wall time (interpreter start included; imports warmed as in
bench_merge.py), peak RSS of the process tree. The fold's output is compared with peft's tensor by
tensor (bit for bit, else the largest difference). Results: benchmarks/results/lora.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_merge import WARM, cache_policy, disk, drop_cache, machine, measure  # noqa: E402

PREFIX = "base_model.model."
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peft_layout(preset: str, r: int, layers: int | None) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(peft name, shape, kind, seed) in the peft model's state_dict order; kind: base, A, B."""
    from streammerge.testing.presets import param_specs

    out: list[tuple[str, tuple[int, ...], str, int]] = []
    pending: list[tuple[str, tuple[int, ...], str, int]] = []
    current = None
    for spec in param_specs(preset, layers):
        module, leaf = spec.name.rsplit(".", 1)
        if module != current and pending:
            out += pending
            pending = []
        current = module
        if module.rsplit(".", 1)[-1] in TARGETS:
            out.append((f"{PREFIX}{module}.base_layer.{leaf}", spec.shape, "base", spec.seed))
            if leaf == "weight":
                pending = [(f"{PREFIX}{module}.lora_A.default.weight", (r, spec.shape[1]), "A", 5000 + spec.seed),
                           (f"{PREFIX}{module}.lora_B.default.weight", (spec.shape[0], r), "B", 9000 + spec.seed)]
        else:
            out.append((PREFIX + spec.name, spec.shape, "base", spec.seed))
    return out + pending


def make_lora_checkpoint(root: Path, preset: str, world_size: int, r: int, alpha: float,
                         layers: int | None) -> Path:
    import torch
    from torch.distributed.tensor import DTensor, Shard

    from streammerge.testing.presets import PRESETS, Spec, chunk_rows, fill, hf_config
    from streammerge.testing.rankfiles import device_mesh

    actor = root / "global_step_1" / "actor"
    (actor / "huggingface").mkdir(parents=True, exist_ok=True)
    (actor / "huggingface" / "config.json").write_text(json.dumps(hf_config(preset, layers), indent=2))
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world_size}))
    (actor / "lora_train_meta.json").write_text(json.dumps({"r": r, "lora_alpha": alpha, "task_type": "CAUSAL_LM"}))
    layout = peft_layout(preset, r, layers)
    tie = PRESETS[preset][6]
    for rank in range(world_size):
        mesh = device_mesh((world_size,), rank, ("fsdp",))
        state = {}
        for name, shape, kind, seed in layout:
            lo, hi = chunk_rows(shape[0], world_size, rank)
            local = torch.empty((hi - lo,) + shape[1:], dtype=torch.float32)
            row = 1
            for s in shape[1:]:
                row *= s
            fill(Spec(name, shape, seed), lo * row, local)
            if kind != "base":
                local.mul_(0.05)  # adapter-sized values: the fold changes W by a few percent
            state[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                                             stride=torch.empty(shape, device="meta").stride())
        if tie:
            state[PREFIX + "lm_head.weight"] = state[PREFIX + "model.embed_tokens.weight"]
        torch.save(state, actor / f"model_world_size_{world_size}_rank_{rank}.pt")
        del state
    (root / "latest_checkpointed_iteration.txt").write_text("1")
    return actor


def compare(ours: Path, peft: Path) -> dict:
    """Tensor by tensor: how many differ from peft's merge, and the largest difference."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
        out = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                out.update({k: (f, k) for k in st.keys()})
        return out

    a, b = tensors(ours), tensors(peft)
    differ, max_diff = 0, 0.0
    for name in sorted(set(a) & set(b)):
        with safe_open(str(a[name][0]), "pt") as sa, safe_open(str(b[name][0]), "pt") as sb:
            x, y = sa.get_tensor(name), sb.get_tensor(name)
        if not torch.equal(x, y):
            differ += 1
            max_diff = max(max_diff, (x.float() - y.float()).abs().max().item())
    return {"tensors_compared": len(set(a) & set(b)), "only_ours": sorted(set(a) - set(b))[:5],
            "only_peft": sorted(set(b) - set(a))[:5], "tensors_differing": differ, "max_abs_diff": max_diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a quick run)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default="/work/bench-tmp/lora")
    p.add_argument("--out", default=str(HERE / "results" / "lora.json"))
    p.add_argument("--no-peft", action="store_true")
    a = p.parse_args(argv)

    work = Path(a.workdir)
    ck_root = work / f"{a.preset}-ws{a.world_size}-r{a.rank}{f'-l{a.layers}' if a.layers else ''}"
    actor = ck_root / "global_step_1" / "actor"
    if not (actor / f"model_world_size_{a.world_size}_rank_{a.world_size - 1}.pt").is_file():
        shutil.rmtree(ck_root, ignore_errors=True)
        t0 = time.perf_counter()
        make_lora_checkpoint(ck_root, a.preset, a.world_size, a.rank, a.alpha, a.layers)
        print(f"made {actor} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    files = sorted(actor.glob("model_world_size_*.pt"))
    ck_bytes = sum(f.stat().st_size for f in files)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    policy = cache_policy()
    sm = [sys.executable, "-m", "streammerge", "merge", str(actor)]
    contenders = {
        "plain": lambda out: [*sm, out, "--lora", "adapter", "--dtype", "keep", "--no-optimizer"],
        "fold": lambda out: [*sm, out, "--lora", "fold", "--dtype", "keep", "--no-optimizer"],
        "both": lambda out: [*sm, out, "--lora", "both", "--dtype", "keep", "--no-optimizer"],
    }
    if not a.no_peft:
        contenders["peft"] = lambda out: [sys.executable, str(HERE / "peft_merge.py"), str(actor), out,
                                          str(a.rank), str(a.alpha)]
    runs: dict[str, list[dict]] = {k: [] for k in contenders}
    kept: dict[str, Path] = {}
    for i in range(a.repeat):
        for name, cmd in contenders.items():
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            measure([sys.executable, "-c", WARM], env)  # libraries in the page cache, as on a machine that uses them
            drop_cache(files, policy)
            r = measure(cmd(str(out)), env)
            if r["returncode"] != 0:
                raise SystemExit(f"{name} failed: {r['stderr']}")
            runs[name].append({"wall_s": round(r["wall_s"], 3), "peak_rss_mb": round(r["peak_rss_mb"], 1)})
            print(f"run {i} {name}: {r['wall_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MiB", file=sys.stderr)
            kept[name] = out
    summary = {k: {"wall_s": statistics.median(x["wall_s"] for x in v),
                   "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in v),
                   "mb_per_s": round(ck_bytes / 1e6 / statistics.median(x["wall_s"] for x in v), 1)}
               for k, v in runs.items()}
    ratios = {"fold_over_plain": round(summary["fold"]["wall_s"] / summary["plain"]["wall_s"], 3),
              "both_over_plain": round(summary["both"]["wall_s"] / summary["plain"]["wall_s"], 3)}
    if "peft" in summary:
        ratios["peft_over_fold"] = round(summary["peft"]["wall_s"] / summary["fold"]["wall_s"], 3)
    result = {
        "benchmark": "bench_lora", "machine": machine(), "disk": disk(work), "cache_policy": policy,
        "checkpoint": {"preset": a.preset, "world_size": a.world_size, "r": a.rank, "lora_alpha": a.alpha,
                       "layers": a.layers, "dtype": "float32", "rank_file_bytes": ck_bytes,
                       "targets": "all-linear (q, k, v, o, gate, up, down)"},
        "runs": runs, "median": summary, "ratios": ratios,
        "fold_vs_peft": compare(kept["fold"], kept["peft"]) if "peft" in kept else None,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"median": summary, "ratios": ratios, "fold_vs_peft": result["fold_vs_peft"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
