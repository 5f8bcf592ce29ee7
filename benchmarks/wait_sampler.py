"""Where a process waits: samples each of its threads' state and kernel stack (/proc/PID/task/*/stack, root) until
it exits, and prints a JSON histogram of the sleeping samples by state and innermost kernel frames.

Usage: python benchmarks/wait_sampler.py PID [--interval 0.005] [--frames 8]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pid", type=int)
    ap.add_argument("--interval", type=float, default=0.005)
    ap.add_argument("--frames", type=int, default=8)
    a = ap.parse_args()
    counts: collections.Counter[str] = collections.Counter()
    samples = 0
    t0 = time.perf_counter()
    while os.path.exists(f"/proc/{a.pid}"):
        try:
            tids = os.listdir(f"/proc/{a.pid}/task")
        except OSError:
            break
        for tid in tids:
            base = f"/proc/{a.pid}/task/{tid}"
            try:
                state = open(f"{base}/stat").read().rsplit(")", 1)[1].split()[0]
                if state == "R":
                    counts["R"] += 1
                    continue
                frames = [ln.split()[1].split("+")[0] for ln in open(f"{base}/stack").read().splitlines() if ln.strip()]
            except (OSError, IndexError):
                continue
            frames = [f for f in frames if not f.startswith(("__schedule", "schedule", "__switch_to"))]
            counts[f"{state} " + " < ".join(frames[: a.frames])] += 1
        samples += 1
        time.sleep(a.interval)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "rounds": samples,
                      "interval_s": a.interval, "top": counts.most_common(25)}))


if __name__ == "__main__":
    main()
