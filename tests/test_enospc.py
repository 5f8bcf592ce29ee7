"""A disk that fills up, or a file-size limit: a clear message, no index, no temp files, then resume.

ENOSPC comes from a real 2 MB tmpfs (needs root and mount); EFBIG from RLIMIT_FSIZE in a subprocess,
which works for any user. A case is skipped, with the reason, only when its mechanism is unavailable.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ckpt_tools import REPO, copy_actor, snapshot, tree_bytes

import streammerge
from streammerge.cli import main
from streammerge.write.manifest import MANIFEST, STATE_DIR, crc32_file
from streammerge.write.writer import TMP_SUFFIX

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def ckpt(make_ckpt, tmp_path_factory) -> Path:
    """~2.6 MB of float32 output: does not fit a 2 MB file system."""
    actor = make_ckpt(world_size=2, hidden_size=128, vocab_size=2006, optimizer=False, reference=False)
    return copy_actor(actor, tmp_path_factory.mktemp("ck") / "actor")


def cli(args: list, preexec=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "streammerge", *map(str, args), "--no-progress"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, preexec_fn=preexec)


def assert_stopped_cleanly(out: Path, stderr: str, words: list[str]) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streammerge: error: "), stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "rerun the same command to resume" in lines[0]
    assert not (out / INDEX).exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(TMP_SUFFIX) or p.name == "manifest.tmp"]
    manifest = json.loads((out / STATE_DIR / MANIFEST).read_text())
    assert not manifest["complete"]
    for rel, entry in manifest["files"].items():  # what it lists is complete and intact
        assert crc32_file(out / rel) == entry["crc32"]


@pytest.fixture()
def tmpfs(tmp_path):
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("ENOSPC on tmpfs: no mount command on this machine (the RLIMIT_FSIZE test still runs)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"ENOSPC on tmpfs: cannot mount here ({r.stderr.strip() or 'not root'}); "
                    "the RLIMIT_FSIZE test still runs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_stops_with_a_clear_message_then_resumes(ckpt, tmpfs, tmp_path, capsys):
    reference = tmp_path / "ref"
    streammerge.merge(ckpt, reference, max_shard_size="600KB", dtype="keep")
    source_before = snapshot(ckpt)
    out = tmpfs / "out"
    assert main([str(ckpt), str(out), "--max-shard-size", "600KB", "--dtype", "keep"]) == 2
    assert_stopped_cleanly(out, capsys.readouterr().err, ["no space left on device", str(out)])
    assert snapshot(ckpt) == source_before
    # the user frees space and reruns the same command
    subprocess.run(["mount", "-o", "remount,size=16m", str(tmpfs)], check=True)
    assert main([str(ckpt), str(out), "--max-shard-size", "600KB", "--dtype", "keep"]) == 0
    assert "reused" in capsys.readouterr().out
    assert tree_bytes(out) == tree_bytes(reference)


def _limit_file_size(limit: int):
    def preexec() -> None:  # Python ignores SIGXFSZ, so writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_file_size_limit_stops_with_a_clear_message(ckpt, tmp_path):
    out = tmp_path / "out"
    r = cli([ckpt, out, "--max-shard-size", "5GB", "--dtype", "keep"], preexec=_limit_file_size(1_000_000))
    assert r.returncode == 2, r.stdout + r.stderr
    assert_stopped_cleanly(out, r.stderr, ["model.safetensors", "file-size limit", "raise the limit"])
    assert not (out / "model.safetensors").exists()
    # limit lifted: the same command finishes
    assert main([str(ckpt), str(out), "--max-shard-size", "5GB", "--dtype", "keep"]) == 0
    assert streammerge.verify(out, ckpt).ok


def test_a_full_disk_during_a_torch_format_optimizer_export_says_so_then_resumes(verl_fixtures, tmpfs, monkeypatch):
    """optimizer.pt's skeleton is written by torch.save, whose zip writer reports a write that failed as a
    RuntimeError about file positions: a full disk there must still say so, with the fix (exit 2), not stop as an
    internal error (exit 3), and the rerun must finish the folder."""
    from streammerge.cli import exit_code

    monkeypatch.setenv("STREAMMERGE_ARCH_CHECK", "0")  # not what is tested here, and seconds per merge
    ckpt, options = verl_fixtures / "fsdp2_qwen2_tied_ws4", dict(dtype="keep", optimizer_format="torch")
    out, filler = tmpfs / "out", tmpfs / "filler"

    def fill_the_disk(f, path) -> None:  # the weights are written: nothing is left for optimizer.pt
        if f.filename == "model.safetensors":
            free = os.statvfs(tmpfs)
            with open(filler, "wb") as fh:
                os.posix_fallocate(fh.fileno(), 0, (free.f_bavail - 1) * free.f_frsize)  # a page for the zip's start

    with pytest.raises(Exception) as failed:
        streammerge.merge(ckpt, out, on_file_done=fill_the_disk, **options)
    message = f"streammerge: error: {failed.value}"
    assert exit_code(failed.value) == 2, message
    assert_stopped_cleanly(out, message, ["no space left on device", "optimizer.pt", "free space"])
    filler.unlink()
    result = streammerge.merge(ckpt, out, **options)
    assert "model.safetensors" in result.reused and (out / "optimizer" / "optimizer.pt").is_file()


def test_a_disk_full_before_the_merge_starts_says_so_in_one_line(verl_fixtures, tmpfs, capsys, monkeypatch):
    """The first byte a merge writes is who holds the output folder's lock: a disk already full there must say so,
    naming the folder and the fix, not print a bare errno."""
    monkeypatch.setenv("STREAMMERGE_ARCH_CHECK", "0")  # not what is tested here
    free = os.statvfs(tmpfs)
    with open(tmpfs / "filler", "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, free.f_bavail * free.f_frsize)
    out = tmpfs / "out"
    assert main([str(verl_fixtures / "fsdp2_qwen2_tied_ws4"), str(out), "--no-optimizer"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"{out / STATE_DIR}: no space left on device" in err and "free space and rerun" in err, err
