"""Where verify's time goes: one verify in this process, its phases stamped, the disk's read rate sampled.

    python benchmarks/verify_timeline.py OUT_DIR CKPT_DIR [--checksums compare] [--json PATH] [--cli]

The clock starts before streammerge is imported, as a `streammerge verify` process's would (less Python's own start).
Stamps (seconds from the start, wrapped from outside the package: nothing in streammerge changes): torch imported
(its import thread ends), the plan made, every rank file loaded, the first and last comparison, each CRC stream's
start and end. Every 0.1 s: the disk's bytes read (/proc/diskstats) and this process's CPU seconds, so one can see
whether the disk sits idle while something else is waited for. Run it on a cold cache, as device_rounds does.

With --cli the measured thing is a real `python -m streammerge verify` process instead (whatever streammerge
PYTHONPATH picks): no stamps inside it, but its start, the moment its report line reaches stdout and its exit,
with the disk's read rate and the child's CPU seconds sampled alike; the time from report to exit is the
interpreter's teardown.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent))  # last: a PYTHONPATH naming another streammerge (older code) comes first
sys.path.insert(0, str(HERE))

from block_device import disk_of, diskstats  # noqa: E402  (the standard library only: torch is not loaded early)

T0 = time.perf_counter()
marks: list[tuple[str, float]] = []
lock = threading.Lock()


def stamp(name: str) -> None:
    with lock:
        marks.append((name, round(time.perf_counter() - T0, 3)))


def wrap(owner: object, attr: str, label: str, *, every: bool = True) -> None:
    inner = getattr(owner, attr)

    def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
        if every or not any(m[0] == label + " start" for m in marks):
            stamp(label + " start")
        try:
            return inner(*args, **kwargs)
        finally:
            stamp(label + " end")

    setattr(owner, attr, wrapped)


def sample(disk: str, series: list[tuple[float, float, float]], stop: threading.Event, pid: int | None = None) -> None:
    tick = os.sysconf("SC_CLK_TCK")
    while not stop.is_set():
        read = diskstats(disk)[0] * 512 / 1e9
        if pid is None:
            cpu = sum(os.times()[:2])
        else:  # utime + stime of every thread of the child, from /proc (the name field may hold spaces)
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                cpu = series[-1][2] if series else 0.0
        series.append((round(time.perf_counter() - T0, 2), round(read, 3), round(cpu, 2)))
        stop.wait(0.1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("ckpt_dir", type=Path)
    p.add_argument("--checksums", default="auto")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--cli", action="store_true", help="time a `python -m streammerge verify` process instead")
    a = p.parse_args(argv)
    if a.cli:
        return cli(a)
    series: list[tuple[float, float, float]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(disk_of(a.ckpt_dir), series, stop), daemon=True)
    sampler.start()
    import streammerge.pipeline as pipeline
    from streammerge.sources.verl_oracle import VerlOracle

    compare = importlib.import_module("streammerge.verify.compare")  # where verify() compares each tensor
    verify = sys.modules["streammerge.verify"]  # the package's `verify` attribute is the function

    stamp("streammerge imported")
    original = pipeline.import_behind

    def import_behind(*modules: str) -> None:
        def run() -> None:
            for name in modules:
                importlib.import_module(name)
            stamp("torch imported")

        threading.Thread(target=run, name="streammerge-import", daemon=True).start()

    pipeline.import_behind = import_behind
    wrap(pipeline, "plan_merge", "plan")
    wrap(VerlOracle, "load_all", "load_all")
    wrap(VerlOracle, "check_integrity", "crc stream")
    wrap(compare, "_compare_with_oracle", "compare")
    report = verify.verify(a.out_dir, a.ckpt_dir, checksums=a.checksums)
    stamp("verify returned")
    pipeline.import_behind = original
    stop.set()
    sampler.join()
    compares = [t for name, t in marks if name.startswith("compare")]
    summary = {name: t for name, t in marks if not name.startswith(("compare", "crc stream"))}
    if compares:
        summary["first compare"], summary["last compare end"] = min(compares), max(compares)
    streams = [t for name, t in marks if name.startswith("crc stream")]
    if streams:
        summary["crc streams first start"], summary["crc streams last end"] = min(streams), max(streams)
    result = {"ok": report.ok, "checksums": a.checksums, "code": str(Path(pipeline.__file__).parent), "phases": summary,
              "wall_s": round(time.perf_counter() - T0, 2), "read_gb_cpu_s": relative(series)[::2],
              "notes": report.notes, "failures": report.failures[:5]}
    return finish(a, result)


def relative(series: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    base_read, base_cpu = series[0][1], series[0][2]
    return [(t, round(r - base_read, 2), round(c - base_cpu, 1)) for t, r, c in series]


def finish(a: argparse.Namespace, result: dict) -> int:
    if a.json:
        a.json.write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k != "read_gb_cpu_s"}))
    return 0 if result["ok"] else 1


def cli(a: argparse.Namespace) -> int:
    series: list[tuple[float, float, float]] = []
    stop = threading.Event()
    child = subprocess.Popen([sys.executable, "-m", "streammerge", "verify", str(a.out_dir), str(a.ckpt_dir),
                              "--checksums", a.checksums], stdout=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=sample, args=(disk_of(a.ckpt_dir), series, stop, child.pid), daemon=True)
    sampler.start()
    assert child.stdout is not None
    first = child.stdout.readline()
    printed = time.perf_counter() - T0
    rest = child.stdout.read()
    code = child.wait()
    wall = time.perf_counter() - T0
    stop.set()
    sampler.join()
    idle_first = next((t for t, r, _ in relative(series) if r > 0.05), None)
    result = {"ok": code == 0, "checksums": a.checksums, "cli": True, "report": (first + rest).strip()[:500],
              "phases": {"first disk read": idle_first, "report printed": round(printed, 3),
                         "exited": round(wall, 3), "teardown_s": round(wall - printed, 3)},
              "wall_s": round(wall, 2), "read_gb_cpu_s": relative(series)[::2]}
    return finish(a, result)


if __name__ == "__main__":
    sys.exit(main())
