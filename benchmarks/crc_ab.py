"""python-isal's CRC-32 against zlib's, in the commands that checksum every byte: interleaved A/B on one checkpoint.

    python benchmarks/crc_ab.py CKPT_DIR --rounds 5 --results benchmarks/results/crc_ab_2core.json

Each round, cold cache before every run, both ways alternated: the merge with `--dtype keep` and `--dtype bfloat16`,
then `verify OUT CKPT` of the bfloat16 output; then the keep merge from a warm page cache into --warm-out (a tmpfs,
so that neither disk bounds it). Each run's CPU seconds (user, system) come from getrusage of the waited-for
children. "zlib" runs the same code with isal made unimportable (`sys.modules['isal'] = None`, as on a platform
without its wheel), so `streammerge.checksum` falls back to zlib.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import bench_merge
from device_bench import ROOT, measure


def cli(args: list[str], zlib: bool) -> list[str]:
    block = "sys.modules['isal'] = None; " if zlib else ""
    return [sys.executable, "-c", f"import sys; {block}from streammerge.cli import run; sys.argv[1:] = {args!r}; run()"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/crc-ab"))
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--warm-out", type=Path, default=Path("/dev/shm/crc-ab"))
    a = p.parse_args(argv)
    files = sorted(a.checkpoint.glob("*.pt"))
    a.workdir.mkdir(parents=True, exist_ok=True)
    policy = bench_merge.cache_policy()
    runs: dict[str, list[float]] = {}
    detail = []
    for r in range(1, a.rounds + 1):
        for step in ("keep", "bfloat16", "verify", "keep_warm"):
            for way in (("isal", "zlib") if r % 2 else ("zlib", "isal")):
                out = a.workdir / f"out-{way}-{step if step != 'verify' else 'bfloat16'}"
                if step == "keep_warm":
                    out = a.warm_out
                    shutil.rmtree(out, ignore_errors=True)
                    args, cold = [str(a.checkpoint), str(out), "--dtype", "keep", "--no-progress"], []
                    for f in files:  # into the page cache: the merge's drop-behind evicts what it read
                        with open(f, "rb") as fh:
                            while fh.read(2**24):
                                pass
                elif step == "verify":
                    args, cold = ["verify", str(out), str(a.checkpoint)], files + sorted(out.glob("*.safetensors"))
                else:
                    shutil.rmtree(out, ignore_errors=True)
                    args, cold = [str(a.checkpoint), str(out), "--dtype", step, "--no-progress"], files
                if cold:
                    bench_merge.drop_cache(cold, policy)
                m = measure(cli(args, way == "zlib"), {"PYTHONPATH": str(ROOT)})
                if m["returncode"] != 0:
                    raise SystemExit(f"{step} {way}: rc {m['returncode']}: {m['stderr'][-500:]}")
                for key in ("wall_s", "user_s", "sys_s"):
                    runs.setdefault(f"{step}/{way}/{key}", []).append(m[key])
                detail.append({"round": r, "step": step, "way": way,
                               **{k: m[k] for k in ("wall_s", "user_s", "sys_s", "peak_rss_mb", "fell_back")}})
                print(f"round {r} {step:9} {way}: {m['wall_s']:.2f} s, user {m['user_s']} s, sys {m['sys_s']} s",
                      flush=True)
    disk = bench_merge.disk(a.workdir)
    shutil.rmtree(a.workdir, ignore_errors=True)
    shutil.rmtree(a.warm_out, ignore_errors=True)
    summary = {k: {"each": v, "median": statistics.median(v)} for k, v in runs.items()}
    result = {"machine": bench_merge.machine(), "disk": disk,
              "checkpoint": str(a.checkpoint), "checkpoint_bytes": sum(f.stat().st_size for f in files),
              "cache": policy, "summary": summary, "runs": detail}
    print(json.dumps(summary, indent=1))
    if a.results:
        a.results.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
