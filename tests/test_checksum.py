"""The CRC-32 every merge and verify computes: python-isal's, checked against zlib's, and zlib's where isal is
missing, which the merge summary and verify's notes then say."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import zlib

import numpy as np
from ckpt_tools import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge import checksum
from streammerge.write.manifest import MANIFEST, STATE_DIR

ISAL_PLATFORM = platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64")  # as pyproject.toml's marker


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=70_000), start=st.integers(0, 2**32 - 1), cut=st.integers(0, 64))
def test_crc32_is_zlibs(data, start, cut):
    if ISAL_PLATFORM:  # the dependency is declared there: the fast one is under test
        assert checksum.FELL_BACK is None
    view = memoryview(data)[cut:]
    assert checksum.crc32(view, start) == zlib.crc32(view, start)
    assert checksum.crc32(data) == zlib.crc32(data)
    as_array = np.frombuffer(data, dtype=np.uint8)
    assert checksum.crc32(as_array, start) == zlib.crc32(as_array, start)


def test_large_buffers_in_pieces_equal_one_pass():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(3 << 20) + 17, dtype=np.uint8)
    crc = 0
    for lo in range(0, len(data), 1 << 20):
        crc = checksum.crc32(data[lo:lo + (1 << 20)], crc)
    assert crc == zlib.crc32(data) == checksum.crc32(data)


def _cli(*args, block_isal: bool) -> subprocess.CompletedProcess:
    code = ("import sys\n"
            + ("sys.modules['isal'] = None  # as on a platform without an isal wheel\n" if block_isal else "")
            + f"from streammerge.cli import main\nsys.exit(main({[str(a) for a in args]!r}))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_without_isal_the_merge_says_so_and_writes_the_same(make_ckpt, tmp_path):
    ckpt = make_ckpt()
    fast, slow = (_cli(ckpt, tmp_path / name, "--dtype", "keep", "--no-progress", block_isal=name == "slow")
                  for name in ("fast", "slow"))
    assert fast.returncode == 0 and slow.returncode == 0, fast.stderr + slow.stderr
    assert "CRC-32 (isal does not import" in slow.stdout, slow.stdout
    assert ("CRC-32" in fast.stdout) == (not ISAL_PLATFORM), fast.stdout
    files = {k: json.loads((tmp_path / k / STATE_DIR / MANIFEST).read_text())["files"] for k in ("fast", "slow")}
    assert files["fast"].keys() == files["slow"].keys() and len(files["fast"]) > 2
    for rel, entry in files["fast"].items():
        assert entry["crc32"] == files["slow"][rel]["crc32"] == zlib.crc32((tmp_path / "fast" / rel).read_bytes())
    for against in ([ckpt], []):  # the manifest's CRCs are computed with or without the checkpoint
        checked = _cli("verify", tmp_path / "slow", *against, block_isal=True)
        assert checked.returncode == 0 and "note: CRC-32s: isal does not import" in checked.stdout, checked.stdout
