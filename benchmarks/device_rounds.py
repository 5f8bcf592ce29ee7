"""Issue 15's remaining targets, measured in interleaved rounds on one checkpoint (device machine, one call).

    python benchmarks/device_rounds.py --preset qwen2.5-3b --rounds 3 --old OLD_CODE_DIR --deadline 540
    python benchmarks/device_rounds.py --timelines --no-import-test --rounds 1 --steps keep

On one synthetic veRL checkpoint (float32, world size 8), cold cache before every run (device_bench's `Bench`):
  - `import torch` alone and beside the three ways of streaming the rank files (import_contention.py);
  - per round: `cat` of both folders > /dev/null, then `streammerge verify --checksums streams` and `compare`
    (and the streams of --old's code); `cat` of the rank files into one file + sync, then `--dtype keep`;
  - once: torchrun with 4 ranks against the one-process bfloat16 merge, and the same launch of no-op workers;
  - once, with a bytecode cache (PYTHONPYCACHEPREFIX, written by the untimed warm-up, as pip's install-time
    compile gives): verify both ways and torchrun. Where Python's modules have no cached bytecode, every run
    compiles torch's from source before it can compare anything.
With --timelines, first: verify_timeline.py, `streammerge verify` processes both ways and with the bytecode cache, and
this code's verify() in-process (the disk's read rate over time, the report-to-exit teardown, the in-process phases;
their JSON goes into the results). --steps picks the parts of each round.
The JSON (--results, and $OUT/device.json) is rewritten after every step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

from device_bench import HERE, ROOT, Bench, common_args, elapsed, folder_files, rank_files, sm


def python_facts() -> dict:
    """Whether this Python can keep bytecode for torch's modules (else each import compiles them again)."""
    code = ("import json, os, sys, torch; d = os.path.dirname(torch.__file__); "
            "print(json.dumps({'dont_write_bytecode': sys.flags.dont_write_bytecode, "
            "'torch_dir_writable': os.access(d, os.W_OK), "
            "'torch_pycache': os.path.isdir(os.path.join(d, '__pycache__')), 'torch': torch.__version__}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False).stdout
    facts = json.loads(out) if out.strip() else {}
    facts["env"] = {k: v for k, v in os.environ.items() if k.startswith("PYTHON")}
    facts["purelib"] = sysconfig.get_paths()["purelib"]
    return facts


class Rounds(Bench):
    def main(self) -> None:
        self.setup()
        self.result["python"] = python_facts()
        a, est = self.a, self.a.est
        actor = self.make("ckpt", a.preset)
        if actor is None:
            return
        files = rank_files(actor)
        out = self.work / "bf16-out"
        self.run("bf16/streammerge_default", sm(actor, out, "bfloat16"), files, est)
        both = files + folder_files(out)
        if a.timelines:
            self.timelines(out, actor, both, est)
        script = str(HERE / "import_contention.py")
        for mode in ("none", "zip", "pread", "willneed") if a.import_test else ():
            r = self.run(f"import/{mode}", [sys.executable, script, "--mode", mode, *map(str, files)], files, est)
            if r and r["returncode"] == 0:
                r["measured"] = json.loads(r["stdout"].strip().splitlines()[-1])
                self.save()
        pyc = {"PYTHONPYCACHEPREFIX": str(self.work / "pyc"), "PYTHONDONTWRITEBYTECODE": ""}
        tr = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "streammerge",
              str(actor), str(self.work / "tr-out"), "--dtype", "bfloat16", "--no-optimizer", "--no-progress"]
        steps = a.steps.split(",")
        for r in range(1, a.rounds + 1):
            if "verify" in steps and self.fits(f"round {r}'s verify", (2.5 + 1.5 * bool(a.old)) * est):
                self.cat_null(f"verify/cat_both_folders_run{r}", both, est)
                for mode in ("streams", "compare"):
                    self.run(f"verify/{mode}_run{r}", self.verify(out, actor, mode), both, 1.5 * est)
                if a.old:
                    self.run(f"verify/old_streams_run{r}", self.verify(out, actor, None), both, 1.5 * est,
                             cwd=Path(a.old).resolve(), env={"PYTHONPATH": str(Path(a.old).resolve())})
            if r == 1 and "once" in steps:
                for mode in ("streams", "compare"):
                    self.run(f"verify_pyc/{mode}", self.verify(out, actor, mode), both, 1.5 * est, env=pyc)
                self.torchrun("", tr, files, est, {})
                self.torchrun("_pyc", tr, files, est, pyc)
            if "keep" in steps and self.fits(f"round {r}'s keep", 2 * est):
                self.cat_into(f"keep/cat_into_file_run{r}", files, est)
                self.run(f"keep/streammerge_default_run{r}", sm(actor, self.work / "keep-out", "keep"), files, est)
                shutil.rmtree(self.work / "keep-out", ignore_errors=True)
            if "keep_cache" in steps:  # no flush- or drop-behind: the page cache takes it all, as it does for cat
                self.run(f"keep/keep_cache_run{r}", sm(actor, self.work / "keep-out", "keep", "--keep-cache"), files,
                         est)
                shutil.rmtree(self.work / "keep-out", ignore_errors=True)

    def fits(self, what: str, need: float) -> bool:
        """Whether a baseline and the run it is the baseline of both fit before the deadline (else neither runs)."""
        if self.time_left(need):
            return True
        self.result["skipped"].append(f"{what} (needs ~{need:.0f} s with its baseline)")
        return False

    def timelines(self, out: Path, actor: Path, both: list[Path], est: float) -> None:
        """verify_timeline.py: `streammerge verify` processes both ways (this code, --old's, alternated), this code's
        verify() in-process (its phases), then processes with a bytecode cache; a `cat` of both folders first and
        after every fourth run."""
        pyc = {"PYTHONPYCACHEPREFIX": str(self.work / "pyc"), "PYTHONDONTWRITEBYTECODE": ""}
        # `python -m` puts its working folder first on sys.path: --old's code runs from its own folder
        old = [("_old", {"PYTHONPATH": str(Path(self.a.old).resolve())}, True)] if self.a.old else []
        runs = [(mode, tag, env, cli) for mode in ("streams", "compare")
                for tag, env, cli in [("", {}, True), *old, ("_inproc", {}, False)]]
        runs += [(mode, "_pyc", pyc, True) for mode in ("streams", "compare")]
        for i, (mode, tag, env, cli) in enumerate(runs):
            cwd = Path(env["PYTHONPATH"]) if "PYTHONPATH" in env else ROOT
            if i % 4 == 0:
                self.cat_null(f"timeline/cat_both_folders_{i // 4 + 1}", both, est)
            key, path = f"timeline/{mode}{tag}", self.work / f"timeline_{mode}{tag}.json"
            r = self.run(key, [sys.executable, str(HERE / "verify_timeline.py"), str(out), str(actor), "--checksums",
                               mode, "--json", str(path), *(["--cli"] if cli else [])], both, 1.5 * est, cwd=cwd,
                         env=env)
            if r is not None and path.exists():
                r["timeline"] = json.loads(path.read_text())
                self.save()

    @staticmethod
    def verify(out: Path, actor: Path, checksums: str | None) -> list[str]:
        cmd = [sys.executable, "-m", "streammerge", "verify", str(out), str(actor)]
        return cmd + (["--checksums", checksums] if checksums else [])

    def torchrun(self, tag: str, tr: list[str], files: list[Path], est: float, env: dict) -> None:
        self.run(f"torchrun/torchrun_4{tag}", tr, files, 1.5 * est, env=env)
        shutil.rmtree(self.work / "tr-out", ignore_errors=True)
        self.run(f"torchrun/torchrun_4_noop{tag}", [*tr[:5], "--no-python", "true"], [], est / 4, env=env)

    def summarize(self) -> None:
        runs = {k: v for k, v in self.result["runs"].items() if v and v["returncode"] == 0}
        wall = {k: v["wall_s"] for k, v in runs.items()}
        ratios: dict[str, list[float]] = {}
        for k, w in wall.items():
            group, name = k.split("/")
            base = None
            if group == "verify" and not name.startswith("cat"):
                base = f"verify/cat_both_folders_{name.rsplit('_', 1)[1]}"
            elif group == "verify_pyc":
                base = "verify/cat_both_folders_run1"
            elif group == "keep" and not name.startswith("cat"):
                base = f"keep/cat_into_file_{name.rsplit('_', 1)[1]}"
            elif k == "torchrun/torchrun_4" or k == "torchrun/torchrun_4_pyc":
                base = "bf16/streammerge_default"
            if base in wall:
                key = k.rsplit("_run", 1)[0]
                ratios.setdefault(key, []).append(round(w / wall[base], 3))
        self.result["ratios"] = {k: {"each": v, "median": statistics.median(v)} for k, v in ratios.items()}
        self.save()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-3b")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--old", default="", help="folder of an older streammerge package: its verify runs each round too")
    p.add_argument("--steps", default="verify,once,keep", help="what each round runs (once: in the first only)")
    p.add_argument("--timelines", action="store_true", help="verify_timeline.py runs first")
    p.add_argument("--no-import-test", dest="import_test", action="store_false")
    common_args(p, est=20.0, results="device_rounds.json")
    a = p.parse_args(argv)
    b = Rounds(a)
    b.run_all()
    print(f"[{elapsed():6.1f} s] done")
    print(json.dumps(b.result["ratios"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
