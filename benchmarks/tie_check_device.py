"""What the tied-embedding byte check costs at scale: keep-dtype merges of a DCP checkpoint with a tied lm_head
stored twice, this code against an older one without the check, beside `cat` of the files into one file + sync.

    python benchmarks/tie_check_device.py --preset qwen2.5-3b --old OLD_CODE_DIR --rounds 5 --deadline 540

The checkpoint: `make_dcp_checkpoint` (float32 FSDP2 Shard(0) DTensors saved by `dcp.save` on --world-size gloo
processes; `get_model_state_dict` returns the tied lm_head.weight too, so DCP stores it apart). Per round, cold
cache before every run, the order of the two merges alternating: `cat` + sync, then this code and --old's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from device_bench import ROOT, Bench, common_args, elapsed, sm

from streammerge.testing.presets import make_dcp_checkpoint


class TieCheck(Bench):
    def main(self) -> None:
        self.setup()
        a, est = self.a, self.a.est
        t = time.perf_counter()
        ckpt = make_dcp_checkpoint(self.work / "dcp", preset=a.preset, world_size=a.world_size, layers=a.layers)
        files = sorted(p for p in ckpt.iterdir() if p.is_file())
        self.result["dcp_checkpoint"] = {"preset": a.preset, "world_size": a.world_size, "make_s":
                                         round(time.perf_counter() - t, 1),
                                         "bytes": sum(f.stat().st_size for f in files)}
        print(f"[{elapsed():6.1f} s] made {self.result['dcp_checkpoint']}", flush=True)
        old_env = {"PYTHONPATH": f"{Path(a.old).resolve()}:{self.env.get('PYTHONPATH', '')}"}
        for r in range(1, a.rounds + 1):
            if not self.time_left(3 * est):
                self.result["skipped"].append(f"round {r} (needs ~{3 * est:.0f} s)")
                break
            self.cat_into(f"cat_run{r}", files, est)
            ways = [("new", None), ("old", old_env)]
            for name, env in ways if r % 2 else ways[::-1]:
                out = self.work / "out"
                self.run(f"{name}_run{r}", sm(ckpt, out, "keep"), files, est, cwd=ROOT if env is None else Path(a.old),
                         env=env)
                for p in sorted(out.rglob("*"), reverse=True):
                    p.unlink() if p.is_file() else p.rmdir()
                out.rmdir()
        self.summarize_ties()

    def summarize_ties(self) -> None:
        runs = self.result["runs"]
        ratios: dict = {}
        for name in ("new", "old"):
            each = [round(runs[f"{name}_run{r}"]["wall_s"] / runs[f"cat_run{r}"]["wall_s"], 3)
                    for r in range(1, self.a.rounds + 1) if f"{name}_run{r}" in runs and f"cat_run{r}" in runs]
            if each:
                ratios[name] = {"each": each, "median": statistics.median(each)}
        self.result["ratios"] = ratios
        self.save()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-3b")
    p.add_argument("--old", required=True, help="folder holding an older streammerge package (without the check)")
    p.add_argument("--rounds", type=int, default=5)
    common_args(p, est=25.0, results="tie_check_device.json")
    a = p.parse_args(argv)
    b = TieCheck(a)
    b.main()
    print(json.dumps(b.result.get("ratios"), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
