"""I/O settings side by side (issue 15): variants of one merge against `cat`, cold cache, interleaved rounds.

    python benchmarks/io_matrix.py --preset qwen2.5-1.5b --rounds 3 \\
        --variant "default=" --variant "prefetch8=STREAMMERGE_PREFETCH=8" --variant "w8=--workers 8"

A variant is `label=` followed by space-separated tokens: `NAME=VALUE` (upper case) sets an environment
variable, anything else is a streammerge argument. Every round runs `cat` of the rank files into one file
+ sync, `cat` > /dev/null, and each variant (keep and/or bfloat16, --dtypes), in a shuffled order, the
page cache dropped before each. `--command "label=SHELL"` adds a shell command to each round
(`{actor}`, `{out}` and `{python}` are replaced: torchrun, say); `--no-read-only` leaves `cat` > /dev/null out. For each
run the block device's counters (/proc/diskstats) give bytes read and written and the average number of requests
in flight. Medians per variant go to --results (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import bench_merge  # noqa: E402
from block_device import disk_of, diskstats, queue_settings  # noqa: E402

from streammerge.testing.presets import make_checkpoint  # noqa: E402


def parse_variant(spec: str) -> tuple[str, dict, list[str]]:
    label, _, rest = spec.partition("=")
    env, args = {}, []
    for tok in rest.split():
        name, eq, value = tok.partition("=")
        if eq and name.isupper():
            env[name] = value
        else:
            args.append(tok)
    return label, env, args


def summarize(result: dict) -> None:
    """Medians per job over the runs that succeeded (a `cat` that filled the disk is no baseline), and each
    against `cat` into one file."""
    ok = {k: [r["wall_s"] for r in v if r["rc"] == 0] for k, v in result["runs"].items()}
    failed = {k: len(v) - len(ok[k]) for k, v in result["runs"].items() if len(v) > len(ok[k])}
    med = {k: statistics.median(v) for k, v in ok.items() if v}
    base = med.get("cat_into_file")
    result["median_s"] = {k: round(v, 2) for k, v in med.items()}
    result["vs_cat_into_file"] = {k: round(v / base, 3) for k, v in med.items()} if base else {}
    if failed:
        result["failed_runs"] = failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/var/tmp/iomatrix")
    p.add_argument("--checkpoint", help="an existing veRL actor folder (else --preset is made)")
    p.add_argument("--preset", default="qwen2.5-1.5b")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--dtypes", default="keep,bfloat16")
    p.add_argument("--command", action="append", default=[], help="label=shell command ({actor}, {out})")
    p.add_argument("--no-read-only", dest="read_only", action="store_false")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--deadline", type=float, default=1e9, help="seconds from start; no round starts after it")
    p.add_argument("--est", type=float, default=30.0, help="expected seconds of one round (for the deadline)")
    p.add_argument("--results", default=str(HERE / "results" / "io_matrix.json"))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    actor = Path(a.checkpoint) if a.checkpoint else make_checkpoint(work / "ck", preset=a.preset,
                                                                    world_size=a.world_size)
    files = sorted(actor.glob("model_world_size_*_rank_*.pt"))
    dev = disk_of(work)
    policy = bench_merge.cache_policy()
    env0 = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    variants = [parse_variant(v) for v in a.variant or ["default="]]
    out = work / "out"
    cat_into = ["sh", "-c", 'o="$1"; shift; cat "$@" > "$o" && sync "$o"', "sh", str(work / "cat.bin"),
                *map(str, files)]
    cat_null = ["sh", "-c", 'cat "$@" > /dev/null', "sh", *map(str, files)]
    need, free = sum(f.stat().st_size for f in files), shutil.disk_usage(work).free
    jobs: list[tuple[str, list[str], dict]] = [("cat_into_file", cat_into, env0)] if free > 1.05 * need else []
    if not jobs:
        print(f"cat into one file left out: {free / 1e9:.1f} GB free for {need / 1e9:.1f} GB", flush=True)
    if a.read_only:
        jobs.append(("cat_read_only", cat_null, env0))
    for spec in a.command:
        label, _, shell = spec.partition("=")
        jobs.append((label, ["sh", "-c", shell.format(actor=actor, out=out, python=sys.executable)], env0))
    for dt in a.dtypes.split(","):
        for label, env, args in variants:
            cmd = [sys.executable, "-m", "streammerge", str(actor), str(out), "--dtype", dt, "--no-optimizer",
                   "--no-progress", *args]
            jobs.append((f"{dt}/{label}", cmd, {**env0, **env}))
    result: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "disk": dev,
                    "queue": queue_settings(dev), "cache": policy,
                    "checkpoint_bytes": sum(f.stat().st_size for f in files),
                    "variants": a.variant, "commands": a.command, "runs": {},
                    "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    rng = random.Random(0)
    for rnd in range(a.rounds):
        if time.perf_counter() - t0 + a.est > a.deadline:
            result["stopped"] = f"deadline after {rnd} rounds"
            break
        order = jobs[:]
        rng.shuffle(order)
        for key, cmd, env in order:
            bench_merge.drop_cache(files, policy)
            before = diskstats(dev)
            r = bench_merge.measure(cmd, env)
            after = diskstats(dev)
            d = [b - a_ for a_, b in zip(before, after)]
            run = {"wall_s": round(r["wall_s"], 3), "rss_mb": round(r["max_process_rss_mb"], 1),
                   "read_gb": round(d[0] * 512 / 1e9, 2), "written_gb": round(d[1] * 512 / 1e9, 2),
                   "busy": round(d[2] / 1000 / r["wall_s"], 2), "avg_queue": round(d[3] / 1000 / r["wall_s"], 1),
                   "rc": r["returncode"]}
            if r["returncode"]:
                run["stderr"] = r["stderr"][-500:]
            elif not key.startswith("cat_"):  # the summary lines: the architecture check's note, ranks' memory
                run["said"] = [ln for ln in (r["stdout"] + r["stderr"]).splitlines()
                               if "architecture" in ln or "MiB" in ln][-4:]
            result["runs"].setdefault(key, []).append(run)
            print(f"[{time.perf_counter() - t0:6.1f}] {key}: {run}", flush=True)
            if os.environ.get("OUT"):  # what a run cut off by the device's time limit still brings back
                (Path(os.environ["OUT"]) / Path(a.results).name).write_text(json.dumps(result, indent=1))
            shutil.rmtree(out, ignore_errors=True)
            (work / "cat.bin").unlink(missing_ok=True)
    summarize(result)
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)
    Path(a.results).write_text(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / Path(a.results).name).write_text(text)
    print(json.dumps(result["vs_cat_into_file"], indent=1))
    if not a.checkpoint:
        shutil.rmtree(work / "ck", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
