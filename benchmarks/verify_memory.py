"""`streammerge verify OUT CKPT` when the page cache cannot hold the rank files, against `cat` of both folders.

    python benchmarks/verify_memory.py --workdir /tmp/vmem [--preset qwen2.5-0.5b] [--limit 1GiB] [--rounds 3]

Makes a synthetic veRL checkpoint (float32, world size 8) and its bfloat16 merge once, then, per round and
with the page cache dropped (fadvise) before every run: `cat` of both folders > /dev/null, and verify in a
memory cgroup of --limit with its CRC-32s taken from the comparison's reads ("compare", what "auto" picks
there) and from streams beside it ("streams"), and verify without a limit both ways. Each verify reports the
bytes its process read from disk (/proc/self/io read_bytes). Needs root for the cgroup. Results: --results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import bench_merge  # noqa: E402

from streammerge.options import parse_size  # noqa: E402
from streammerge.testing.memcg import MemoryCgroup  # noqa: E402
from streammerge.testing.presets import make_checkpoint  # noqa: E402

VERIFY = ("import streammerge, sys; r = streammerge.verify(sys.argv[1], sys.argv[2], checksums=sys.argv[3]); "
          "print(next(int(l.split()[1]) for l in open('/proc/self/io') if l.startswith('read_bytes:'))); "
          "sys.exit(not r.ok)")


def run_verify(out: Path, actor: Path, checksums: str, limit: int | None) -> dict:
    cmd = [sys.executable, "-c", VERIFY, str(out), str(actor), checksums]
    t = time.perf_counter()
    if limit:
        cg = MemoryCgroup(limit)
        try:
            p = cg.run(cmd, capture_output=True, text=True, cwd=ROOT)
        finally:
            cg.remove()
    else:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"verify failed ({checksums}, limit {limit}): {p.stderr[-2000:]}")
    return {"wall_s": round(wall, 2), "disk_read_gb": round(int(p.stdout.split()[-1]) / 1e9, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vmem"))
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--limit", default="1GiB")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--results", type=Path, default=HERE / "results" / "verify_memory.json")
    a = p.parse_args(argv)
    limit = parse_size(a.limit)
    actor = a.workdir / "ckpt" / "global_step_1" / "actor"
    if not actor.is_dir():
        actor = make_checkpoint(a.workdir / "ckpt", preset=a.preset, world_size=8)
    out = a.workdir / "out"
    if not (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "streammerge", str(actor), str(out), "--dtype", "bfloat16",
                        "--no-optimizer", "--no-progress"], cwd=ROOT, check=True)
    files = sorted(f for d in (actor, out) for f in d.rglob("*") if f.is_file())
    subprocess.run([sys.executable, "-c", "import torch, numpy, safetensors, streammerge.verify"], check=True)
    runs: dict[str, list[dict]] = {}
    for _ in range(a.rounds):
        bench_merge.drop_cache(files, "fadvise")
        t = time.perf_counter()
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        runs.setdefault("cat_both_folders", []).append({"wall_s": round(time.perf_counter() - t, 2)})
        for name, checksums, lim in (("compare_limited", "compare", limit), ("streams_limited", "streams", limit),
                                     ("compare", "compare", None), ("streams", "streams", None)):
            bench_merge.drop_cache(files, "fadvise")
            runs.setdefault(f"verify_{name}", []).append(run_verify(out, actor, checksums, lim))
        print(json.dumps({k: v[-1] for k, v in runs.items()}), flush=True)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "preset": a.preset, "limit": a.limit,
              "files_gb": round(sum(f.stat().st_size for f in files) / 1e9, 2), "runs": runs}
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
