"""Peak RSS does not grow with the checkpoint size (benchmarks measure the numbers; this checks the bound loosely)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The peak is VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child spawned (vfork) by this
# large test process would report this process's peak as its own.
HWM = "next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))"
MERGE_AND_REPORT = f"""
import json, sys
import streammerge
r = streammerge.merge(sys.argv[1], sys.argv[2], dtype=sys.argv[3], buffer_size="16MiB", workers=2, weights_only=True)
print(json.dumps({{"peak": {HWM}, "bytes": r.bytes_written}}))
"""
BASELINE = f"""
import json
import streammerge, streammerge.write.writer, safetensors.torch
print(json.dumps({{"peak": {HWM}}}))
"""


def _checkpoint(root: Path, mb: int) -> Path:
    """A world-size-1 checkpoint of plain float32 tensors, `mb` MB in all (the writer path, not the planner)."""
    actor = root / "actor"
    actor.mkdir(parents=True)
    rows = mb * 10**6 // 4 // 4096 // 8
    torch.save({f"layers.{i}.weight": torch.full((rows, 4096), float(i)) for i in range(8)},
               actor / "model_world_size_1_rank_0.pt")
    return actor


def _run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_flat_in_checkpoint_size(tmp_path: Path) -> None:
    small = _checkpoint(tmp_path / "small", 40)
    large = _checkpoint(tmp_path / "large", 480)
    base = _run(BASELINE)["peak"]
    for dtype in ("keep", "bfloat16"):
        s = _run(MERGE_AND_REPORT, str(small), str(tmp_path / f"out-s-{dtype}"), dtype)
        big = _run(MERGE_AND_REPORT, str(large), str(tmp_path / f"out-l-{dtype}"), dtype)
        assert big["bytes"] >= 10 * s["bytes"] // 2
        growth = big["peak"] - s["peak"]
        # 12x more data; the merge may grow by a few MiB of bookkeeping at most, never by the data
        assert growth < 24 * 2**20, (dtype, s, big)
        assert big["peak"] - base < 96 * 2**20, (dtype, base, big)


def test_summary_reports_the_merge_own_peak_not_its_launcher(tmp_path: Path) -> None:
    """A trainer that runs the CLI at its last step is large; the merge's summary must not report its peak."""
    ckpt = _checkpoint(tmp_path / "ckpt", 8)
    launcher = torch.ones(2**28)  # 1 GiB, touched, in this (the launching) process
    out = subprocess.run([sys.executable, "-m", "streammerge", str(ckpt), str(tmp_path / "out"), "--no-progress",
                          "--weights-only"], capture_output=True, text=True, cwd=REPO, check=True)
    del launcher
    peak = int(re.search(r"peak RSS (\d+) MiB", out.stdout + out.stderr).group(1))
    assert peak < 512, out.stdout


def _peak_growth(run: Callable[[], object]) -> int:
    """How far this process's peak RSS rises above its RSS now while `run` runs (the kernel's VmHWM, reset first)."""
    def hwm() -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))

    Path("/proc/self/clear_refs").write_text("5")
    start = hwm()
    run()
    return hwm() - start


def test_verify_reads_a_large_stored_tensor_window_by_window(tmp_path: Path) -> None:
    """verify's DCP and Megatron readers read each window's rows of a stored tensor, never the whole tensor: a
    one-process `dcp.save` stores each tensor whole as one chunk, which was loaded for every 4 MiB window (a 1.24 GB
    embedding: GBs of RSS, hours of reads), and a Megatron embedding, fused gate_up or QKV was read whole to be cut."""
    import torch.distributed.checkpoint as dcp

    from streammerge.sources.dcp_oracle import DcpOracle, MegatronOracle
    from streammerge.sources.megatron import Arch, Take

    w = torch.arange(2 * 2048.0)[:, None].expand(-1, 4096).reshape(2, 2048, 4096).contiguous()  # 64 MiB
    dcp.save({"w": w, "small": torch.ones(2, 8)}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    del w
    stored = DcpOracle(tmp_path / "ckpt")
    stored.read("small", ((0, 2), (0, 8)))  # what reading imports and sets up once
    # layer 1 as a fused gate_up (its up half), and as a fused QKV of 8 query groups (2 q, k, v heads of 64 rows)
    megatron = MegatronOracle({"up": (stored, Take("up", "w", (1,), "up")), "q": (stored, Take("q", "w", (1,), "q"))},
                              Arch("llama", 2, 4096, 16, 8, 64, 64, 1024, 0, 0, False))
    megatron.shape("q")

    def read_all(oracle: DcpOracle | MegatronOracle, name: str, lead: tuple, rows: torch.Tensor) -> None:
        for lo in range(0, len(rows), 64):
            got = oracle.read(name, lead + ((lo, lo + 64), (0, 4096))).reshape(64, 4096)
            assert got.eq(2048.0 + rows[lo:lo + 64, None]).all()

    q_rows = torch.arange(1024)
    growth = {"dcp": _peak_growth(lambda: read_all(stored, "w", ((1, 2),), torch.arange(2048))),
              "up": _peak_growth(lambda: read_all(megatron, "up", (), torch.arange(1024, 2048))),
              "q": _peak_growth(lambda: read_all(megatron, "q", (), q_rows // 128 * 256 + q_rows % 128))}
    assert max(growth.values()) < 16 * 2**20, growth
