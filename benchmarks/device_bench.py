"""Disk-speed benchmark for many-core machines (issue 15): streammerge against `cat`, cold cache, one run.

    python benchmarks/device_bench.py --workdir /tmp/dbench --deadline 540
    python benchmarks/device_bench.py --workdir /tmp/dbench --keep-preset qwen2.5-0.5b \
        --bf16-preset qwen2.5-0.5b --layers 4 --deadline 120            # smoke run

Two synthetic veRL checkpoints (float32, --world-size ranks, benchmarks/make_checkpoint.py):
  keep  (--keep-preset, default qwen2.5-3b): `cat` of the rank files into one file + sync, then
        `streammerge --dtype keep` at default settings (the target: <= 1.0x that cat)
  bf16  (--bf16-preset, default qwen2.5-7b): `cat` into one file + sync, `cat` > /dev/null (read only),
        `streammerge --dtype bfloat16` at default settings (target: <= 0.8x the cat into one file),
        `cat` of both folders > /dev/null against `streammerge verify OUT CKPT` (target: <= 1.2x),
        `torchrun --nproc-per-node 4` with each rank's peak RSS (and the same launch of no-op workers:
        torchrun's own cost), and a --workers sweep.
Before every run: sync and drop the page cache (as root: /proc/sys/vm/drop_caches; else fadvise); then,
for Python runs, an untimed `import torch, streammerge...` so libraries are cached but the data is cold.
Each step is skipped when the --deadline (seconds from start) would be passed; the JSON is rewritten after
every step, so a run cut short still leaves what it measured. Results: --results (JSON) and a plot if cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import bench_merge  # noqa: E402
import io_matrix  # noqa: E402

from streammerge.testing.presets import make_checkpoint  # noqa: E402

T0 = time.perf_counter()
SWITCH = ("import runpy, sys; sys.setswitchinterval({}); sys.argv[0] = 'streammerge'; "
          "runpy.run_module('streammerge', run_name='__main__')")
WARM = ("import torch, torch.distributed.tensor, torch.distributed.run, safetensors, numpy, streammerge.cli, "
        "streammerge.verify")


def elapsed() -> float:
    return time.perf_counter() - T0


def measure(cmd: list[str], env: dict, cwd: Path = ROOT) -> dict:
    """bench_merge's measurement (wall time, sampled tree RSS, per-process VmHWM), the CPU seconds of the
    waited-for process tree (getrusage), plus what the merge itself reported: its peak RSS line and any
    recorded fallback of a fast path."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = bench_merge.measure(cmd, env, cwd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = r["stdout"] + r["stderr"]
    return {"wall_s": round(r["wall_s"], 2), "user_s": round(after.ru_utime - before.ru_utime, 2),
            "sys_s": round(after.ru_stime - before.ru_stime, 2), "peak_rss_mb": round(r["peak_rss_mb"], 1),
            "max_process_rss_mb": round(r["max_process_rss_mb"], 1),
            "reported_peak_rss_mib": [int(x) for x in re.findall(r"peak RSS (\d+) MiB", text)],
            "returncode": r["returncode"], "fell_back": re.findall(r"write fell back: ([^\n]*)", text),
            "stdout": r["stdout"][-1500:], "stderr": r["stderr"][-1500:]}


def can_drop_caches() -> str:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return "drop_caches"
    except OSError as e:
        return f"fadvise (drop_caches: {e.strerror or e})"


def probe_direct(folder: Path) -> str:
    import mmap

    path = folder / "direct-probe"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError as e:
        return f"open refused: {e.strerror}"
    try:
        buf = mmap.mmap(-1, 1 << 20)
        os.pwrite(fd, buf, 0)
        return "ok"
    except OSError as e:
        return f"write refused: {e.strerror}"
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def rank_files(actor: Path) -> list[Path]:
    return sorted(actor.glob("model_world_size_*_rank_*.pt"))


def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def sm(actor: Path, out: Path, dtype: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "streammerge", str(actor), str(out), "--dtype", dtype, "--no-optimizer",
            "--no-progress", *extra]


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.work = Path(a.workdir)
        self.env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "PYTHONUNBUFFERED": "1"}
        mem = round(psutil.virtual_memory().total / 1e9, 1)
        self.result: dict = {"machine": {"cpus": os.cpu_count(), "mem_gb": mem, "python": sys.version.split()[0],
                                           "kernel": platform.release()},
                             "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "runs": {},
                             "skipped": [], "args": vars(a)}

    def save(self) -> None:
        text = json.dumps(self.result, indent=1)
        for p in [Path(self.a.results)] + ([Path(os.environ["OUT"]) / "device.json"] if os.environ.get("OUT") else []):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)

    def time_left(self, need: float) -> bool:
        return elapsed() + need < self.a.deadline

    def run(self, key: str, cmd: list[str], cold: list[Path], need: float, cwd: Path = ROOT,
            env: dict | None = None) -> dict | None:
        if not self.time_left(need):
            self.result["skipped"].append(f"{key} (needs ~{need:.0f} s, {self.a.deadline - elapsed():.0f} s left)")
            self.save()
            return None
        bench_merge.drop_cache(cold, self.policy)
        if sys.executable in cmd[:12]:  # Python's libraries cached, as on a machine that uses them (not timed)
            subprocess.run([sys.executable, "-c", WARM], env={**self.env, **(env or {})}, cwd=cwd, check=False)
        before = io_matrix.diskstats(self.disk)
        r = measure(cmd, {**self.env, **(env or {})}, cwd)
        after = io_matrix.diskstats(self.disk)
        r["disk_read_gb"], r["disk_written_gb"] = ((b - a) * 512 / 1e9 for a, b in zip(before[:2], after[:2]))
        r["cmd"] = " ".join(cmd[:3] + ["..."] if len(cmd) > 12 else cmd)
        self.result["runs"][key] = r
        print(f"[{elapsed():6.1f} s] {key}: {r['wall_s']} s, rc {r['returncode']}, peak RSS {r['peak_rss_mb']} MB",
              flush=True)
        if r["returncode"] != 0:
            print(r["stderr"][-800:], flush=True)
        self.save()
        return r

    def cat_into(self, key: str, files: list[Path], need: float) -> dict | None:
        dest = self.work / "cat.bin"
        cmd = ["sh", "-c", 'out="$1"; shift; cat "$@" > "$out" && sync "$out"', "sh", str(dest), *map(str, files)]
        r = self.run(key, cmd, files, need)
        dest.unlink(missing_ok=True)
        return r

    def cat_null(self, key: str, files: list[Path], need: float) -> dict | None:
        return self.run(key, ["sh", "-c", 'cat "$@" > /dev/null', "sh", *map(str, files)], files, need)

    def make(self, name: str, preset: str) -> Path | None:
        if not self.time_left(self.a.make_budget):
            self.result["skipped"].append(f"making {preset}")
            return None
        t = time.perf_counter()
        actor = make_checkpoint(self.work / name, preset=preset, world_size=self.a.world_size, layers=self.a.layers)
        files = rank_files(actor)
        self.result[f"{name}_checkpoint"] = {"preset": preset, "layers": self.a.layers, "world_size": self.a.world_size,
                                             "bytes": sum(f.stat().st_size for f in files),
                                             "make_s": round(time.perf_counter() - t, 1)}
        print(f"[{elapsed():6.1f} s] made {preset}: {self.result[f'{name}_checkpoint']}", flush=True)
        self.save()
        return actor

    def setup(self) -> None:
        """The work folder, how the page cache is dropped, and the disk under it (recorded in the result)."""
        self.work.mkdir(parents=True, exist_ok=True)
        self.policy = can_drop_caches()
        self.result["cache"] = self.policy
        self.result["o_direct"] = probe_direct(self.work)
        part = max((p for p in psutil.disk_partitions(all=True) if str(self.work).startswith(p.mountpoint)),
                   key=lambda p: len(p.mountpoint), default=None)
        self.disk = io_matrix.disk_of(self.work)
        self.result["disk"] = {"fstype": part.fstype if part else "?", "device": part.device if part else "?",
                               "free_gb": round(shutil.disk_usage(self.work).free / 1e9, 1),
                               "queue": io_matrix.queue_settings(self.disk)}
        self.save()

    def main(self) -> None:
        self.setup()
        est = self.a.est  # seconds a merge-sized step is expected to take (the deadline checks use it)
        same = self.a.keep_preset == self.a.bf16_preset  # one checkpoint serves both cases
        actor = None
        if self.a.keep_preset:
            actor = self.make("keep", self.a.keep_preset)
            if actor is not None:
                files = rank_files(actor)
                self.cat_into("keep/cat_into_file", files, est / 2)
                out = self.work / "keep-out"
                self.run("keep/streammerge_default", sm(actor, out, "keep"), files, est / 2)
                shutil.rmtree(out, ignore_errors=True)
                self.keep_extras(actor, files, est / 2)
                if not same:
                    shutil.rmtree(self.work / "keep", ignore_errors=True)
        if not same or actor is None:
            actor = self.make("bf16", self.a.bf16_preset)
        if actor is None:
            return
        files = rank_files(actor)
        out = self.work / "bf16-out"
        if self.a.only_sweep:
            self.sweep(actor, out, files, est)
            return
        if not same:
            self.cat_into("bf16/cat_into_file", files, est)
        else:
            self.result["runs"]["bf16/cat_into_file"] = self.result["runs"].get("keep/cat_into_file")
        if not self.a.no_read_only:
            self.cat_null("bf16/cat_read_only", files, est)
        out = self.work / "bf16-out"
        self.run("bf16/streammerge_default", sm(actor, out, "bfloat16"), files, est)
        if out.exists():
            both = files + folder_files(out)
            self.cat_null("bf16/cat_both_folders", both, est)
            self.run("bf16/verify", [sys.executable, "-m", "streammerge", "verify", str(out), str(actor)], both,
                     1.5 * est)
            if self.a.old:
                self.run("bf16/verify_old", [sys.executable, "-m", "streammerge", "verify", str(out), str(actor)],
                         both, 1.5 * est, cwd=Path(self.a.old), env={"PYTHONPATH": self.a.old})
            if self.a.profile == "bf16":
                self.profiled("bf16/verify", [sys.executable, "-m", "streammerge", "verify", str(out), str(actor)],
                              files, 2 * est)
            shutil.rmtree(out, ignore_errors=True)
        if self.a.direct:  # what O_DIRECT writes (opt-in) are worth against the default's buffered ones
            self.env["STREAMMERGE_DIRECT_WRITES"] = "1"
            for dtype in ["keep", "bfloat16"]:
                self.run(f"{'bf16' if dtype != 'keep' else 'keep'}/o_direct_writes", sm(actor, out, dtype), files, est)
                shutil.rmtree(out, ignore_errors=True)
            self.env.pop("STREAMMERGE_DIRECT_WRITES")
        self.sweep(actor, out, files, est)
        tr = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "streammerge",
              str(actor), str(out), "--dtype", "bfloat16", "--no-optimizer", "--no-progress"]
        if not self.a.no_torchrun:
            self.run("bf16/torchrun_4", tr, files, 1.5 * est)
            shutil.rmtree(out, ignore_errors=True)
            # torchrun's own cost, the same launch with workers that do nothing: no rank can remove it
            self.run("bf16/torchrun_4_noop", [*tr[:5], "--no-python", "true"], [], est / 4)
        if self.a.old and not self.a.no_torchrun:
            self.run("bf16/torchrun_4_old", tr, files, 1.5 * est, cwd=Path(self.a.old), env={"PYTHONPATH": self.a.old})
            shutil.rmtree(out, ignore_errors=True)
        if self.a.switch_interval:  # the GIL hypothesis: a thread that waits for the GIL gets it sooner
            wrapped = [sys.executable, "-c", SWITCH.format(self.a.switch_interval)] + sm(actor, out, "bfloat16")[3:]
            for w in (8, 32):
                self.run(f"bf16/workers_{w}_switch_{self.a.switch_interval:g}", wrapped + ["--workers", str(w)],
                         files, est)
                shutil.rmtree(out, ignore_errors=True)
        if self.a.profile == "bf16":
            for w in (8, 2):
                self.profiled(f"bf16/workers_{w}", sm(actor, out, "bfloat16", "--workers", str(w)), files, est)
                shutil.rmtree(out, ignore_errors=True)
        if self.a.second_round and not self.a.keep_sweep:  # run again what the targets compare, for the spread
            self.cat_into("bf16/cat_into_file_run2", files, est)
            self.run("bf16/streammerge_default_run2", sm(actor, out, "bfloat16"), files, est)
            both = files + folder_files(out)
            self.cat_null("bf16/cat_both_folders_run2", both, est)
            self.run("bf16/verify_run2", [sys.executable, "-m", "streammerge", "verify", str(out), str(actor)], both,
                     1.5 * est)
            shutil.rmtree(out, ignore_errors=True)
            self.run("keep/streammerge_default_run2", sm(actor, out, "keep"), files, est)
            shutil.rmtree(out, ignore_errors=True)

    def keep_extras(self, actor: Path, files: list[Path], est: float) -> None:
        """More on the keep case's checkpoint: keep-dtype --workers N interleaved with `cat`, and verify of a
        bfloat16 merge against `cat` of both folders (keys "keep_ckpt/...")."""
        out = self.work / "keep-out"
        sweep = [int(x) for x in self.a.keep_sweep.split(",") if x]
        for tag in (("", "_run2") if self.a.second_round else ("",)) if sweep else ():
            if tag:
                self.cat_into(f"keep/cat_into_file{tag}", files, est)
                self.run(f"keep/streammerge_default{tag}", sm(actor, out, "keep"), files, est)
                shutil.rmtree(out, ignore_errors=True)
            for w in sweep:
                self.run(f"keep/workers_{w}{tag}", sm(actor, out, "keep", "--workers", str(w)), files, est)
                shutil.rmtree(out, ignore_errors=True)
        if not self.a.keep_verify:
            return
        self.run("keep_ckpt/streammerge_bf16", sm(actor, out, "bfloat16"), files, est)
        if not out.exists():
            return
        both = files + folder_files(out)
        verify = [sys.executable, "-m", "streammerge", "verify", str(out), str(actor)]
        for tag in ("", "_run2"):
            self.cat_null(f"keep_ckpt/cat_both_folders{tag}", both, est)
            self.run(f"keep_ckpt/verify{tag}", verify, both, 1.5 * est)
            if self.a.old and not tag:
                self.run("keep_ckpt/verify_old", verify, both, 1.5 * est, cwd=Path(self.a.old),
                         env={"PYTHONPATH": self.a.old})
        if self.a.profile == "keep":
            self.profiled("keep_ckpt/verify", verify, files, 2 * est)
        shutil.rmtree(out, ignore_errors=True)

    def profiled(self, key: str, cmd: list[str], files: list[Path], need: float) -> None:
        """Run under py-spy (a static binary carried in .tools/, if there): every thread's stacks, idle ones too,
        100 times a second, as a speedscope file in $OUT (samples in time order per thread)."""
        spy = ROOT / ".tools" / "py-spy"
        if not spy.exists() or not self.time_left(need):
            self.result["skipped"].append(f"{key} under py-spy")
            return
        dest = Path(os.environ.get("OUT", self.work)) / (key.replace("/", "_") + ".speedscope.json")
        out_files = folder_files(Path(cmd[cmd.index("verify") + 1])) if "verify" in cmd else []
        self.run(key + "_pyspy", [str(spy), "record", "--nonblocking", "--idle", "--threads", "-r", "100", "-f",
                                  "speedscope", "-o", str(dest), "--", *cmd], files + out_files, need)

    def sweep(self, actor: Path, out: Path, files: list[Path], est: float) -> None:
        for w in [int(x) for x in self.a.sweep.split(",") if x]:
            key = f"bf16/workers_{w}"
            done = sum(k == key or k.startswith(key + "_run") for k in self.result["runs"])
            key += f"_run{done + 1}" if done else ""
            self.run(key, sm(actor, out, "bfloat16", "--workers", str(w)), files, est)
            shutil.rmtree(out, ignore_errors=True)

    def run_all(self, *then: Callable[[], None]) -> None:
        """main(); then, however it ended, the summary, `then` and the work folder removed (the JSON is kept)."""
        try:
            self.main()
        finally:
            self.summarize()
            for step in then:
                step()
            shutil.rmtree(self.work, ignore_errors=True)

    def summarize(self) -> None:
        runs = self.result["runs"]

        def ratio(a: str, b: str) -> float | None:
            if a in runs and b in runs and runs[a]["returncode"] == 0 and runs[b]["returncode"] == 0:
                return round(runs[a]["wall_s"] / runs[b]["wall_s"], 3)
            return None

        self.result["ratios"] = {
            "keep_default_vs_cat_into_file (target <= 1.0)": ratio("keep/streammerge_default", "keep/cat_into_file"),
            "bf16_default_vs_cat_into_file (target <= 0.8)": ratio("bf16/streammerge_default", "bf16/cat_into_file"),
            "verify_vs_cat_both_folders (target <= 1.2)": ratio("bf16/verify", "bf16/cat_both_folders"),
            "keep_ckpt_verify_vs_cat_both_folders (target <= 1.2)": ratio("keep_ckpt/verify",
                                                                         "keep_ckpt/cat_both_folders"),
            "torchrun_4_vs_default (target <= 1.0)": ratio("bf16/torchrun_4", "bf16/streammerge_default"),
        }
        if "bf16/torchrun_4_noop" in runs and ratio("bf16/torchrun_4", "bf16/streammerge_default") is not None:
            rest = runs["bf16/torchrun_4"]["wall_s"] - runs["bf16/torchrun_4_noop"]["wall_s"]
            self.result["ratios"]["torchrun_4_less_its_noop_launch_vs_default"] = round(
                rest / runs["bf16/streammerge_default"]["wall_s"], 3)
        sweep = {k.removeprefix("bf16/workers_"): v["wall_s"] for k, v in runs.items()
                 if k.startswith("bf16/workers_")}
        self.result["workers_sweep_s"] = sweep
        self.save()


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    sweep = result.get("workers_sweep_s") or {}
    if not sweep:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    points = sorted((int(k.split("_")[0]), v) for k, v in sweep.items())
    ax.plot([w for w, _ in points], [s for _, s in points], "o", label="streammerge --workers N (each run)")
    runs = result["runs"]
    for key, style in [("bf16/cat_into_file", "--"), ("bf16/streammerge_default", ":")]:
        if key in runs:
            ax.axhline(runs[key]["wall_s"], ls=style, color="gray")
            ax.text(2, runs[key]["wall_s"], key.split("/")[1], va="bottom", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("--workers")
    ax.set_ylabel("wall s (cold cache)")
    made = result.get("bf16_checkpoint") or result.get("keep_checkpoint") or {}
    ax.set_title(f"{made.get('preset', '?')} float32 -> bfloat16, {result['machine']['cpus']} CPUs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def common_args(p: argparse.ArgumentParser, *, est: float, results: str) -> None:
    """What `Bench` reads: where to work, the checkpoint's shape, the time limits, the JSON's path."""
    p.add_argument("--workdir", default="/tmp/dbench")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--deadline", type=float, default=540.0, help="seconds from start; later steps are skipped")
    p.add_argument("--est", type=float, default=est, help="expected seconds of one merge-sized step")
    p.add_argument("--make-budget", type=float, default=90.0)
    p.add_argument("--results", default=str(HERE / "results" / results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep-preset", default="qwen2.5-3b", help="'' to skip the keep-dtype case")
    p.add_argument("--bf16-preset", default="qwen2.5-7b")
    p.add_argument("--sweep", default="2,32,8,16,4")
    p.add_argument("--only-sweep", action="store_true", help="make the bf16 checkpoint and run the sweep only")
    p.add_argument("--direct", action="store_true", help="also run keep and bfloat16 with O_DIRECT writes")
    p.add_argument("--switch-interval", type=float, default=0.0,
                   help="also run --workers 8 and 32 with this sys.setswitchinterval (seconds)")
    p.add_argument("--profile", choices=["", "keep", "bf16"], default="",
                   help="also run verify (and, for bf16, --workers 8/2) of that case under .tools/py-spy")
    p.add_argument("--keep-sweep", default="", help="keep-dtype --workers values (twice with --second-round)")
    p.add_argument("--keep-verify", action="store_true", help="verify a bfloat16 merge of the keep checkpoint")
    p.add_argument("--no-read-only", action="store_true", help="skip cat > /dev/null of the bf16 checkpoint")
    p.add_argument("--no-torchrun", action="store_true")
    p.add_argument("--old", default="", help="folder of an older streammerge package: verify, torchrun with it too")
    p.add_argument("--second-round", action="store_true", help="run the compared steps a second time")
    common_args(p, est=45.0, results="device.json")
    a = p.parse_args(argv)
    b = Bench(a)
    b.run_all(lambda: plot(b.result, Path(os.environ.get("OUT", Path(a.results).parent)) / "device.png"))
    print(json.dumps(b.result["ratios"], indent=1))
    print(json.dumps(b.result.get("workers_sweep_s"), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
