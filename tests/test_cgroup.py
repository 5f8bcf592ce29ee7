"""A ~2 GB merge completes inside a 512 MB memory cgroup, and its output is right.

Page cache counts against a cgroup's limit, so this proves more than a small RSS: the writer must
drop what it has read and flush what it has written. Needs root and a memory controller (cgroup v1
at /sys/fs/cgroup/memory, or v2 with the memory controller); skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from make_checkpoint import check_merge, make_checkpoint, param_specs  # noqa: E402

LIMIT = 512 * 2**20
PRESET = "qwen2.5-0.5b"  # 1.98 GB of float32 rank files


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
            pytest.skip("creating a memory cgroup needs root")
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
            pytest.skip("cgroup v1 memory controller is mounted but no cgroup can be created here")
        v2 = Path("/sys/fs/cgroup")
        if "memory" in (v2 / "cgroup.controllers").read_text().split() if (v2 / "cgroup.controllers").exists() else False:
            try:
                if "memory" not in (v2 / "cgroup.subtree_control").read_text().split():
                    (v2 / "cgroup.subtree_control").write_text("+memory")
                (v2 / name).mkdir()
                return v2 / name, 2
            except OSError as e:
                pytest.skip(f"cgroup v2: cannot create a child with the memory controller ({e.strerror})")
        pytest.skip("no memory cgroup controller (neither v1 /sys/fs/cgroup/memory nor v2 'memory')")

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


def _evict(paths) -> None:
    """Drop files from the page cache so the merge's reads are charged to the test cgroup."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_2gb_merge_fits_in_512mb_cgroup(tmp_path):
    cg = MemoryCgroup(LIMIT)
    try:
        actor = make_checkpoint(tmp_path / "ckpt", preset=PRESET, world_size=8)
        rank_files = sorted(actor.glob("model_world_size_*.pt"))
        size = sum(p.stat().st_size for p in rank_files)
        assert size > 1.9e9
        _evict(rank_files)
        out = tmp_path / "out"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        r = cg.run([sys.executable, "-m", "streammerge", str(actor), str(out), "--dtype", "keep",
                    "--no-optimizer", "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
                   timeout=600)
        peak, kills = cg.peak(), cg.oom_kills()
        print(f"\n{size / 1e9:.2f} GB merge in a {LIMIT >> 20} MiB cgroup v{cg.version}: peak usage "
              f"{peak / 2**20:.0f} MiB (RSS + page cache), {kills} OOM kills; {r.stdout.strip()}")
        assert r.returncode == 0, f"merge failed in the cgroup (exit {r.returncode}, OOM kills {kills}): {r.stderr[-2000:]}"
        assert kills == 0
        assert 0 < peak <= LIMIT
        written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        assert written > 1.9e9
        manifest = json.loads((out / ".streammerge" / "manifest.json").read_text())
        assert manifest["complete"]
        # every tensor, bit for bit, against values recomputed from the maker's formula
        assert check_merge(out, PRESET) == len(param_specs(PRESET))
    finally:
        cg.remove()
