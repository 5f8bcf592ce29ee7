"""A throwaway memory cgroup to run a command under a memory limit (page cache included).

cgroup v1 (/sys/fs/cgroup/memory): the new group is nested under our own memory cgroup, so the
limits we already live under still apply; cgroup v2: a child of the root with the memory
controller. Needs root. Used by tests/test_cgroup.py and benchmarks/bench_merge.py --memory-limit.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


class Unavailable(Exception):
    """No memory cgroup can be created here (not root, no controller, no permission)."""


class MemoryCgroup:
    """A throwaway memory cgroup: v1 nested under our own cgroup (so its limits still apply), or v2."""

    def __init__(self, limit: int):
        self.path, self.version = self._create(f"streammerge-test-{os.getpid()}")
        if self.version == 1:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            memsw = self.path / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # no escape into swap either
                memsw.write_text(str(limit))
        else:
            (self.path / "memory.max").write_text(str(limit))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")

    @staticmethod
    def _create(name: str) -> tuple[Path, int]:
        if os.geteuid() != 0:
            raise Unavailable("creating a memory cgroup needs root")
        v1 = Path("/sys/fs/cgroup/memory")
        if (v1 / "memory.limit_in_bytes").exists():
            own = next((ln.split(":", 2)[2] for ln in Path("/proc/self/cgroup").read_text().splitlines()
                        if ln.split(":", 2)[1] == "memory"), "/")
            for parent in (v1 / own.lstrip("/"), v1):
                try:
                    (parent / name).mkdir()
                    return parent / name, 1
                except OSError:
                    continue
            raise Unavailable("cgroup v1 memory controller is mounted but no cgroup can be created here")
        v2 = Path("/sys/fs/cgroup")
        controllers = v2 / "cgroup.controllers"
        if controllers.exists() and "memory" in controllers.read_text().split():
            try:
                if "memory" not in (v2 / "cgroup.subtree_control").read_text().split():
                    (v2 / "cgroup.subtree_control").write_text("+memory")
                (v2 / name).mkdir()
                return v2 / name, 2
            except OSError as e:
                raise Unavailable(f"cgroup v2: cannot create a child with the memory controller ({e.strerror})") from e
        raise Unavailable("no memory cgroup controller (neither v1 /sys/fs/cgroup/memory nor v2 'memory')")

    def peak(self) -> int:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return int((self.path / name).read_text())

    def oom_kills(self) -> int:
        f = self.path / ("memory.oom_control" if self.version == 1 else "memory.events")
        for line in f.read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        """Run a command inside the cgroup (it joins before exec, so nothing runs outside)."""
        procs = self.path / "cgroup.procs"
        return subprocess.run(["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *cmd], **kw)

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
