"""Planning at scale: how long `streammerge.plan` takes, and how much memory, on a metadata-heavy checkpoint.

    python benchmarks/bench_plan.py --ranks 64 --tensors 50000

Makes a synthetic veRL checkpoint of RANKS rank files holding TENSORS tiny DTensors each (real
`torch.save` of `DTensor.from_local` on a fake process group; names shaped like a mixture-of-experts
model's), then, each in a fresh subprocess, times
  - load (torch.load): the old path, `torch.load(map_location="meta", weights_only=True)`, on a few ranks
  - load (metapickle): streammerge's allowlisted C unpickler, on the same ranks
  - plan: `streammerge.plan(CKPT)` end to end (every rank loaded and validated), with peak RSS
and writes benchmarks/results/plan.json. Per-record costs are reported so the figure for a larger
checkpoint (e.g. 1024 ranks x 50,000 tensors) can be extrapolated; such extrapolations are labeled.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_merge import disk, machine, measure  # noqa: E402


def tensor_names(n: int) -> list[str]:
    """Names like DeepSeek-style MoE layers: 61 layers of experts (w1, w2, w3) plus attention."""
    names, layer = [], 0
    while len(names) < n:
        p = f"model.layers.{layer}."
        names += [p + s for s in ("self_attn.q_a_proj.weight", "self_attn.kv_a_proj_with_mqa.weight",
                                   "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")]
        for e in range(256):
            names += [f"{p}mlp.experts.{e}.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")]
        layer += 1
    return names[:n]


def _write_rank(args: tuple) -> None:
    out, world, n, rank, rows = args
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
        sd = {}
        for name in tensor_names(n):
            local = torch.full((rows, 4), float(rank))
            sd[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                          shape=torch.Size((rows * world, 4)), stride=(4, 1))
        tmp = Path(out) / f".model_world_size_{world}_rank_{rank}.pt.tmp"
        torch.save(sd, tmp)
        os.replace(tmp, Path(out) / f"model_world_size_{world}_rank_{rank}.pt")
    finally:
        dist.destroy_process_group()


def make(out: Path, ranks: int, tensors: int, jobs: int) -> Path:
    actor = out / "actor"
    marker = actor / f"COMPLETE-{ranks}x{tensors}"
    if marker.exists():
        return actor
    shutil.rmtree(out, ignore_errors=True)
    (actor / "huggingface").mkdir(parents=True)
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": ranks}))
    (actor / "huggingface" / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    tasks = [(str(actor), ranks, tensors, r, 1) for r in range(ranks)]
    with mp.get_context("spawn").Pool(jobs) as pool:
        for i, _ in enumerate(pool.imap_unordered(_write_rank, tasks), 1):
            print(f"\r  made {i}/{ranks} rank files", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    marker.write_text("ok")
    return actor


LOAD_TORCH = """
import sys, time, warnings, logging, gc
gc.disable()  # as streammerge.plan does while loading
warnings.simplefilter("ignore"); logging.disable(logging.WARNING)
from pathlib import Path
from streammerge.load import torch_load_meta, _record
import torch
paths = sys.argv[1:]
t = time.perf_counter(); n = 0
for r, p in enumerate(paths):
    obj = torch_load_meta(Path(p))
    n += sum(1 for v in obj.values() if isinstance(v, torch.Tensor))
print(time.perf_counter() - t, n)
"""

LOAD_FAST = """
import sys, time, gc
gc.disable()  # as streammerge.plan does while loading
from pathlib import Path
from streammerge.load import _fast_records
paths = sys.argv[1:]
t = time.perf_counter(); n = 0
for r, p in enumerate(paths):
    got = _fast_records(Path(p), r, 1024)
    assert got is not None, p
    n += len(got[0])
print(time.perf_counter() - t, n)
"""

PLAN = """
import sys, time
from streammerge.pipeline import plan
t = time.perf_counter()
p = plan(sys.argv[1], dtype="keep")
print(time.perf_counter() - t, sum(len(t.pieces) for t in p.tensors.values()))
"""


def run_py(code: str, args: list[str], env: dict) -> tuple[float, int, float]:
    r = measure([sys.executable, "-c", code, *args], env)
    if r["returncode"] != 0:
        raise SystemExit(f"failed: {r['stderr'][-2000:]}")
    secs, count = r["stdout"].split()[:2]
    return float(secs), int(count), r["peak_rss_mb"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--tensors", type=int, default=50000)
    p.add_argument("--sample-ranks", type=int, default=2, help="ranks timed with torch.load (slow) and metapickle")
    p.add_argument("--workdir", default="/work/bench-tmp/bench_plan")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes making the checkpoint")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint for the next run")
    p.add_argument("--target-ranks", type=int, default=1024)
    p.add_argument("--target-tensors", type=int, default=50000)
    a = p.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    work = Path(a.workdir) / f"ckpt-{a.ranks}x{a.tensors}"
    t0 = time.perf_counter()
    reused = (work / "actor" / f"COMPLETE-{a.ranks}x{a.tensors}").exists()
    actor = make(work, a.ranks, a.tensors, a.jobs)
    made = None if reused else round(time.perf_counter() - t0, 1)
    files = sorted(actor.glob("model_world_size_*.pt"), key=lambda f: int(f.stem.rsplit("_", 1)[1]))
    sample = [str(f) for f in files[:a.sample_ranks]]
    records = a.ranks * a.tensors
    res: dict = {"machine": machine(), "disk": disk(Path(a.workdir)), "ranks": a.ranks, "tensors_per_rank": a.tensors,
                 "records": records, "bytes_of_rank_files": sum(f.stat().st_size for f in files),
                 "make_s": made, "cache": "warm (files just written or read; planning reads only the pickles)"}
    os.sync()
    secs, n, rss = run_py(LOAD_TORCH, sample, env)
    res["torch_load_us_per_record"] = round(secs / n * 1e6, 2)
    secs, n, rss = run_py(LOAD_FAST, sample, env)
    res["metapickle_us_per_record"] = round(secs / n * 1e6, 2)
    secs, pieces, rss = run_py(PLAN, [str(actor)], env)
    base = measure([sys.executable, "-c", "import streammerge.pipeline"], env)["peak_rss_mb"]
    res["plan_s"] = round(secs, 2)
    res["plan_peak_rss_mb"] = round(rss, 1)
    res["import_baseline_rss_mb"] = round(base, 1)
    res["plan_pieces"] = pieces
    res["plan_us_per_record"] = round(secs / records * 1e6, 2)
    res["plan_kb_per_record"] = round((rss - base) * 1024 / records, 3)  # growth over the import baseline
    target = a.target_ranks * a.target_tensors
    res["extrapolated"] = {
        "records": target, "note": "linear extrapolation from the per-record figures above (not measured)",
        "torch_load_hours": round(res["torch_load_us_per_record"] * target / 1e6 / 3600, 2),
        "plan_minutes": round(res["plan_us_per_record"] * target / 1e6 / 60, 1),
        "plan_rss_gb": round((res["plan_kb_per_record"] * target / 1024 + base) / 1024, 1),
    }
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("machine", "disk")}, indent=1))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
