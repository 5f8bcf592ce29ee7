"""Read a py-spy profile (speedscope JSON, as `device_bench.py --profile` records it): per thread, where it spent
its time and, second by second, what it was doing.

    python benchmarks/profile_timeline.py benchmarks/results/verify_3b.speedscope.json --timeline

py-spy samples every thread (idle ones too, with --idle) at a fixed rate, so a thread's n-th sample is about
n / rate seconds after the thread started: enough to see which phase waits on which.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", type=Path)
    p.add_argument("--rate", type=float, default=100.0, help="samples per second py-spy took (-r)")
    p.add_argument("--top", type=int, default=4, help="stacks shown per thread")
    p.add_argument("--depth", type=int, default=6, help="innermost frames shown per stack")
    p.add_argument("--timeline", action="store_true", help="the commonest functions of each second, per thread")
    a = p.parse_args(argv)
    data = json.loads(a.profile.read_text())
    frames = data["shared"]["frames"]
    for prof in data["profiles"]:
        samples = prof["samples"]
        if len(samples) < a.rate / 10:
            continue
        stacks = collections.Counter(" < ".join(frames[i]["name"] for i in reversed(s[-a.depth:])) for s in samples)
        print(f"== {prof['name']}: {len(samples) / a.rate:.1f} s")
        for stack, n in stacks.most_common(a.top):
            print(f"   {n / a.rate:6.2f} s  {stack[:200]}")
        if a.timeline:
            step = int(a.rate)
            for start in range(0, len(samples), step):
                leaves = collections.Counter(frames[s[-1]]["name"] if s else "-" for s in samples[start:start + step])
                print(f"   t={start / a.rate:5.1f} s  " + ", ".join(f"{k} {v}%" for k, v in leaves.most_common(3)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
