"""The block device under a path and its counters, for the benchmarks: no imports beyond the standard library,
so a measured process loads nothing it would not load anyway."""

from __future__ import annotations

import os
from pathlib import Path


def disk_of(path: Path) -> str:
    """The whole block device behind `path` (e.g. vda), as /proc/diskstats names it."""
    dev = os.stat(path).st_dev
    sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    return sys_dev.parent.name if (sys_dev / "partition").exists() else sys_dev.name


def diskstats(name: str) -> tuple[int, int, int, int]:
    """(sectors read, sectors written, ms doing I/O, weighted ms in queue) of one device."""
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if f[2] == name:
            return int(f[5]), int(f[9]), int(f[12]), int(f[13])
    return 0, 0, 0, 0


def queue_settings(name: str) -> dict:
    q = Path(f"/sys/block/{name}/queue")
    out = {}
    for key in ("read_ahead_kb", "max_sectors_kb", "nr_requests", "scheduler", "rotational"):
        try:
            out[key] = (q / key).read_text().strip()
        except OSError:
            pass
    return out
