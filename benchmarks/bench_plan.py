"""Planning at scale: how long `streammerge.plan` takes, and how much memory, on a metadata-heavy checkpoint.

    python benchmarks/bench_plan.py --ranks 1024 --tensors 50000 --workdir /work/bench-tmp/bench_plan_1024 --keep

Makes (or reuses) a synthetic veRL checkpoint of RANKS rank files holding TENSORS tiny DTensors each (real
`torch.save` of `DTensor.from_local` on torch's fake process group, saved straight to
`model_world_size_W_rank_R.pt` as veRL does; names shaped like a mixture-of-experts model's). `--make fast`
(default) builds the state dict once per worker process and saves it once per rank, setting the local shards'
values and the DeviceMesh's `_rank`/`_coordinate_on_dim`; every run checks that such files equal the honest
path's (one fresh process per rank) record for record, on a small checkpoint (--check-small) and on a few
ranks of the benchmark checkpoint (--check-ranks), and refuses to time anything if they do not. Then, each in
a fresh subprocess, it times
  - the old per-record paths, on the first --sample-ranks rank files only: torch.load onto the meta device,
    and streammerge's per-rank metapickle reader (skipped if gone)
  - plan: `streammerge.pipeline.plan(CKPT, dtype="keep")` end to end, wall time and peak RSS of the process
    (--skip-plan to leave it out), and the RSS of just importing streammerge.pipeline
and writes RESULTS/plan.json. Figures for the --target-* size that were not measured are labeled extrapolated.
A checkpoint made with --keep is reused by later runs with the same --workdir, --ranks and --tensors (and
never deleted by them); an interrupted fast make resumes."""

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

from bench_merge import cache_policy, disk, drop_cache, machine, measure  # noqa: E402


def tensor_names(n: int) -> list[str]:
    """Names like DeepSeek-style MoE layers: 61 layers of experts (w1, w2, w3) plus attention."""
    names, layer = [], 0
    while len(names) < n:
        p = f"model.layers.{layer}."
        names += [p + s for s in ("self_attn.q_a_proj.weight", "self_attn.kv_a_proj_with_mqa.weight",
                                   "self_attn.o_proj.weight", "input_layernorm.weight",
                                   "post_attention_layernorm.weight")]
        for e in range(256):
            names += [f"{p}mlp.experts.{e}.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")]
        layer += 1
    return names[:n]


def _state_dict(world: int, n: int, rows: int, rank: int):
    """The rank's state dict as FSDP2 holds it: TENSORS DTensors Shard(0) on a 1-D ("fsdp",) mesh.

    Needs the (fake) default process group initialized. Returns (state_dict, mesh, local tensors)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    sd, locals_ = {}, []
    for name in tensor_names(n):
        local = torch.full((rows, 4), float(rank))
        locals_.append(local)
        sd[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                      shape=torch.Size((rows * world, 4)), stride=(4, 1))
    return sd, mesh, locals_


def rank_file(actor: Path, world: int, rank: int) -> Path:
    return Path(actor) / f"model_world_size_{world}_rank_{rank}.pt"


def _write_rank(args: tuple) -> None:
    """The honest path: one fresh process per rank, the fake process group at that rank, torch.save straight
    to the final name as veRL does (torch names the zip's archive folder after the file)."""
    out, world, n, rank, rows = args
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        sd, _, _ = _state_dict(world, n, rows, rank)
        torch.save(sd, rank_file(Path(out), world, rank))
    finally:
        dist.destroy_process_group()


# The fast path: each worker process builds the state dict once (fake process group at rank 0), then for every
# rank it writes sets what differs between ranks and calls the real torch.save under the real file name. What
# differs: the local shards' values (filled with the rank) and, in the pickled DeviceMesh (its __getstate__ is
# its __dict__ minus the process-group registry), `_rank` and `_coordinate_on_dim`. `check_identical` compares
# the result with the honest path's record by record on every benchmark run.
_FAST: dict = {}


def _fast_init(world: int, n: int, rows: int) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    sd, mesh, locals_ = _state_dict(world, n, rows, 0)
    _FAST.update(sd=sd, mesh=mesh, locals=locals_, world=world)


def _fast_write(args: tuple) -> int:
    out, done, rank = args
    import torch

    mesh, world = _FAST["mesh"], _FAST["world"]
    mesh._rank = rank
    mesh._coordinate_on_dim = mesh._compute_coordinate_on_dim()
    for t in _FAST["locals"]:
        t.fill_(float(rank))
    torch.save(_FAST["sd"], rank_file(Path(out), world, rank))
    (Path(done) / str(rank)).touch()  # resumable: a rank file counts only once its save has returned
    return rank


def _write_ranks_honest(actor: Path, world: int, n: int, ranks: list[int], jobs: int, rows: int = 1) -> None:
    tasks = [(str(actor), world, n, r, rows) for r in ranks]
    with mp.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:  # a fresh process for every rank
        for i, _ in enumerate(pool.imap_unordered(_write_rank, tasks), 1):
            print(f"\r  made {i}/{len(ranks)} rank files (honest)", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def _write_ranks_fast(actor: Path, done: Path, world: int, n: int, ranks: list[int], jobs: int,
                      rows: int = 1) -> None:
    done.mkdir(parents=True, exist_ok=True)
    todo = [r for r in ranks if not (done / str(r)).exists()]
    if not todo:
        return
    # One rank per task: the workers share the ranks out as they go, and the progress line stays exact.
    with mp.get_context("spawn").Pool(min(jobs, len(todo)), initializer=_fast_init,
                                      initargs=(world, n, rows)) as pool:
        t0 = time.perf_counter()
        for i, _ in enumerate(pool.imap_unordered(_fast_write, [(str(actor), str(done), r) for r in todo]), 1):
            el = time.perf_counter() - t0
            print(f"\r  made {len(ranks) - len(todo) + i}/{len(ranks)} rank files (fast) "
                  f"{el:.0f} s, ~{el / i * (len(todo) - i):.0f} s to go", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def make(out: Path, ranks: int, tensors: int, jobs: int, method: str = "fast") -> tuple[Path, dict]:
    """The checkpoint in out/actor, reused when complete. Returns (actor, how it was made)."""
    actor = out / "actor"
    marker = actor / f"COMPLETE-{ranks}x{tensors}"
    if marker.exists():
        txt = marker.read_text().strip()
        return actor, dict(json.loads(txt) if txt.startswith("{") else {}, reused=True)
    done = out / "made"  # ranks whose file is complete (fast path, so an interrupted run resumes)
    if method != "fast" or not done.is_dir():
        shutil.rmtree(out, ignore_errors=True)
    (actor / "huggingface").mkdir(parents=True, exist_ok=True)
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": ranks}))
    config = {"model_type": "llama", "tie_word_embeddings": False}
    (actor / "huggingface" / "config.json").write_text(json.dumps(config))
    t0 = time.perf_counter()
    if method == "fast":
        resumed = sum(1 for _ in done.iterdir()) if done.is_dir() else 0
        _write_ranks_fast(actor, done, ranks, tensors, list(range(ranks)), jobs)
    else:
        resumed = 0
        _write_ranks_honest(actor, ranks, tensors, list(range(ranks)), jobs)
    info = {"method": method, "jobs": jobs, "make_s": round(time.perf_counter() - t0, 1),
            "resumed_ranks": resumed}
    marker.write_text(json.dumps(info))
    shutil.rmtree(done, ignore_errors=True)
    return actor, dict(info, reused=False)


# ---------------------------------------------------------------- byte identity, fast path against honest path

def _records(path: Path) -> tuple[list[str], dict[str, bytes]]:
    import zipfile

    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        return names, {n: z.read(n) for n in names if not n.endswith("/.data/serialization_id")}


def compare_files(fast: Path, honest: Path) -> dict:
    """data.pkl and every data/<key> record (every record but the random .data/serialization_id) equal."""
    fn, fr = _records(fast)
    hn, hr = _records(honest)
    diff = sorted(set(fr) ^ set(hr)) + sorted(n for n in set(fr) & set(hr) if fr[n] != hr[n])
    return {"identical": fn == hn and not diff and fast.stat().st_size == honest.stat().st_size,
            "records": len(fr), "data_records": sum(1 for n in fr if "/data/" in n),
            "same_names_in_order": fn == hn, "differing": diff[:5], "archive": fn[0].split("/", 1)[0]}


def check_identical(actor: Path, world: int, tensors: int, ranks: list[int], scratch: Path, jobs: int) -> dict:
    """Write RANKS honestly (a fresh process each) into scratch and compare with the fast-made files in actor."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    t0 = time.perf_counter()
    _write_ranks_honest(scratch, world, tensors, ranks, jobs)
    honest_s = time.perf_counter() - t0
    per = {r: compare_files(rank_file(actor, world, r), rank_file(scratch, world, r)) for r in ranks}
    shutil.rmtree(scratch, ignore_errors=True)
    return {"ranks": ranks, "tensors_per_rank": tensors, "world_size": world,
            "identical": all(v["identical"] for v in per.values()),
            "records_compared": sum(v["records"] for v in per.values()),
            "archive_example": per[ranks[0]]["archive"],
            "honest_s_per_rank": round(honest_s / len(ranks) * min(jobs, len(ranks)), 1),
            "mismatches": {r: v for r, v in per.items() if not v["identical"]}}


def check_small(work: Path, spec: str, jobs: int) -> dict:
    """A small checkpoint made both ways, every rank compared."""
    world, tensors = (int(x) for x in spec.lower().split("x"))
    out = work / f"check-{world}x{tensors}"
    shutil.rmtree(out, ignore_errors=True)
    actor = out / "fast"
    actor.mkdir(parents=True)
    _write_ranks_fast(actor, out / "made", world, tensors, list(range(world)), jobs)
    res = check_identical(actor, world, tensors, list(range(world)), out / "honest", jobs)
    shutil.rmtree(out, ignore_errors=True)
    return res


LOAD_TORCH = """
import sys, time, warnings, logging, gc
gc.disable()  # as streammerge.plan does while loading
warnings.simplefilter("ignore"); logging.disable(logging.WARNING)
from pathlib import Path
from streammerge.sources.rankfile import torch_load_meta
import torch
paths = sys.argv[1:]
t = time.perf_counter(); n = 0
for p in paths:
    obj = torch_load_meta(Path(p))
    n += sum(1 for v in obj.values() if isinstance(v, torch.Tensor))
print(time.perf_counter() - t, n)
"""

LOAD_FAST = """
import sys, time, gc
gc.disable()  # as streammerge.plan does while loading
from pathlib import Path
from streammerge.sources.rankfile import _fast_records
world, paths = int(sys.argv[1]), sys.argv[2:]
t = time.perf_counter(); n = 0
for p in paths:
    rank = int(Path(p).stem.rsplit("_", 1)[1])
    got = _fast_records(Path(p), rank, world)
    assert got is not None, p
    n += len(got[0])
print(time.perf_counter() - t, n)
"""

PLAN = """
import sys, time
from streammerge.pipeline import plan
t = time.perf_counter()
p = plan(sys.argv[1], dtype="keep")
secs = time.perf_counter() - t
p = getattr(p, "weights", p)  # a MergePlan holds the weights' plan first
pieces = [t.source.pieces for t in p.tensors.values()]
ranks = next((ps.ranks for ps in pieces if hasattr(ps, "ranks")), None)
print(secs, sum(len(ps) for ps in pieces), ranks.decoded if ranks is not None else -1)
"""


def run_py(code: str, args: list[str], env: dict) -> tuple[float, int, float, float]:
    """(seconds timed inside, count, peak RSS MB of the process, wall s of the process) in a fresh subprocess."""
    r = measure([sys.executable, "-c", code, *args], env)
    if r["returncode"] != 0:
        raise RuntimeError(f"failed: {r['stderr'][-2000:]}")
    secs, count, *more = r["stdout"].split()
    run_py.extra = [int(x) for x in more]  # PLAN also prints how many rank files were decoded in full
    return float(secs), int(count), r["peak_rss_mb"], r["wall_s"]


def _ranks(spec: str, world: int) -> list[int]:
    """'0,1,255,256,-1' -> ranks (negative from the end), deduplicated, within the world."""
    out: list[int] = []
    for x in spec.split(","):
        if x.strip():
            r = int(x)
            r = world + r if r < 0 else r
            if 0 <= r < world and r not in out:
                out.append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--tensors", type=int, default=50000)
    p.add_argument("--sample-ranks", type=int, default=2, help="ranks timed with torch.load (slow) and metapickle")
    p.add_argument("--workdir", default="/work/bench-tmp/bench_plan")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes making the checkpoint")
    p.add_argument("--make", choices=("fast", "honest"), default="fast",
                   help="fast: each worker builds the state dict once and torch.saves it for many ranks (checked "
                        "byte for byte against honest); honest: one fresh process per rank")
    p.add_argument("--check-small", default="8x200", metavar="RANKSxTENSORS",
                   help="small checkpoint made both ways and compared rank by rank ('' to skip)")
    p.add_argument("--check-ranks", default="0,1,255,256,-1",
                   help="ranks of the benchmark checkpoint re-made honestly and compared ('' to skip)")
    p.add_argument("--make-only", action="store_true", help="make (and check) the checkpoint, time nothing")
    p.add_argument("--skip-plan", action="store_true",
                   help="time only the per-record paths and the import baseline, not streammerge.plan end to end")
    p.add_argument("--keep", action="store_true",
                   help="keep a checkpoint this run made (one reused from an earlier run is always kept)")
    p.add_argument("--target-ranks", type=int, default=1024)
    p.add_argument("--target-tensors", type=int, default=50000)
    a = p.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    work = Path(a.workdir) / f"ckpt-{a.ranks}x{a.tensors}"
    actor, made = make(work, a.ranks, a.tensors, a.jobs, a.make)
    print(f"checkpoint: {actor} ({'reused' if made['reused'] else 'made'}: {made})", file=sys.stderr)
    files = sorted(actor.glob("model_world_size_*.pt"), key=lambda f: int(f.stem.rsplit("_", 1)[1]))
    records = a.ranks * a.tensors
    res: dict = {"machine": machine(), "disk": disk(Path(a.workdir)), "ranks": a.ranks, "tensors_per_rank": a.tensors,
                 "records": records, "bytes_of_rank_files": sum(f.stat().st_size for f in files),
                 "make": made, "cache": "warm (files just written or read; planning reads only the pickles)"}

    identity: dict = {}
    if a.check_small:
        identity["small"] = check_small(Path(a.workdir), a.check_small, a.jobs)
    if a.check_ranks and made.get("method", "fast") == "fast":
        identity["benchmark_checkpoint"] = check_identical(
            actor, a.ranks, a.tensors, _ranks(a.check_ranks, a.ranks), work / "check-honest", a.jobs)
    identity["note"] = ("fast-made rank files against the honest path (a fresh process per rank): same record "
                        "names in the same order, same file size, data.pkl and every data/<key> record equal "
                        "byte for byte (.data/serialization_id, random per save, ignored)")
    res["identity_check"] = identity
    print(json.dumps(identity, indent=1), file=sys.stderr)
    if not all(v["identical"] for k, v in identity.items() if isinstance(v, dict)):
        raise SystemExit("fast-made rank files differ from the honest path's: not benchmarking on them")
    if a.make_only:
        return 0

    os.sync()
    sample = [str(f) for f in files[:a.sample_ranks]]
    target = a.target_ranks * a.target_tensors
    old: dict = {"ranks_timed": len(sample), "note": "the old per-record paths, timed on the first "
                 f"{len(sample)} rank files only, each in a fresh subprocess (not the planner under test)"}
    secs, n, rss, _ = run_py(LOAD_TORCH, sample, env)
    old["torch_load_us_per_record"] = round(secs / n * 1e6, 2)
    try:
        secs, n, rss, _ = run_py(LOAD_FAST, [str(a.ranks), *sample], env)
        old["metapickle_us_per_record"] = round(secs / n * 1e6, 2)
    except RuntimeError as e:  # the per-rank metapickle reader may be gone once the planner is rewritten
        old["metapickle_us_per_record"] = None
        old["metapickle_error"] = str(e)[-300:]
    res["old_per_record_paths"] = old
    base = measure([sys.executable, "-c", "import streammerge.pipeline"], env)["peak_rss_mb"]
    res["import_baseline_rss_mb"] = round(base, 1)
    extra = {"records": target, "note": "linear extrapolation from the per-record figures above (not measured)",
             "torch_load_hours": round(old["torch_load_us_per_record"] * target / 1e6 / 3600, 2)}
    if a.skip_plan:
        res["plan"] = None
        res["plan_note"] = "skipped (--skip-plan)"
    else:
        files = sorted(actor.glob("model_world_size_*.pt"))
        drop_cache(files, cache_policy())  # planning reads every rank's pickle and zip directory: from disk
        res["cache"] = f"cold for the plan ({cache_policy()} first); warm for the per-record samples"
        secs, pieces, rss, wall = run_py(PLAN, [str(actor)], env)
        res["plan"] = {
            "what": 'streammerge.pipeline.plan(CKPT, dtype="keep") end to end, in a fresh subprocess',
            "plan_s": round(secs, 2), "process_wall_s": round(wall, 2), "peak_rss_mb": round(rss, 1),
            "pieces": pieces, "us_per_record": round(secs / records * 1e6, 3),
            "rank_files_decoded_in_full": run_py.extra[0] if run_py.extra else None,
            "rank_files_matched_against_rank_0": a.ranks - run_py.extra[0] if run_py.extra else None,
            "kb_per_record_over_import": round((rss - base) * 1024 / records, 4)}
        if records != target:
            extra["plan_minutes"] = round(res["plan"]["us_per_record"] * target / 1e6 / 60, 1)
            extra["plan_rss_gb"] = round((res["plan"]["kb_per_record_over_import"] * target / 1024 + base) / 1024, 1)
    res["extrapolated"] = extra
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("machine", "disk")}, indent=1))
    if not a.keep and not made["reused"]:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
