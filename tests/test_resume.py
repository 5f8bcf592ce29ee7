"""Interrupted merges: kill -9 at random points, Ctrl-C, SIGTERM, and the folder states they leave.

After any interruption, re-running the same command finishes the job, reuses the files already
finished, and gives a folder byte-identical to an uninterrupted run; at no moment does a folder
look complete (an index) without being complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ckpt_tools import REPO, copy_actor, snapshot, tree_bytes

import streammerge
from streammerge.write.manifest import MANIFEST, STATE_DIR, crc32_file
from streammerge.write.writer import TMP_SUFFIX, tmp_path

OPTIONS = dict(max_shard_size="500KB", buffer_size="64KiB", workers=2)
CLI_OPTIONS = ["--max-shard-size", "500KB", "--buffer-size", "64KiB", "--workers", "2", "--no-progress"]
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def big(make_ckpt, tmp_path_factory) -> Path:
    """A real FSDP2 checkpoint with ~20 MB of rank files: ~20 output files, slow enough to kill mid-write."""
    actor = make_ckpt(world_size=4, hidden_size=256, num_layers=4, vocab_size=4012, optimizer=False, reference=False)
    return copy_actor(actor, tmp_path_factory.mktemp("big") / "actor")


@pytest.fixture(scope="module")
def reference(big, tmp_path_factory) -> tuple[Path, dict[str, bytes], float]:
    """An uninterrupted run, and how long its writing took."""
    out = tmp_path_factory.mktemp("ref") / "out"
    t0 = time.perf_counter()
    streammerge.merge(big, out, **OPTIONS)
    return out, tree_bytes(out), time.perf_counter() - t0


def start(ckpt: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "streammerge", str(ckpt), str(out), *CLI_OPTIONS, *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60) -> bool:
    """Poll until predicate() holds (True) or the process ended first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise TimeoutError("the merge neither started writing nor finished")


def manifest_of(out: Path) -> dict | None:
    try:
        return json.loads((out / STATE_DIR / MANIFEST).read_text())
    except (FileNotFoundError, ValueError):
        return None


def check_invariants(out: Path) -> None:
    """What must hold after any interruption: the manifest never lies, an index means complete."""
    m = manifest_of(out)
    if m is None:
        assert not (out / INDEX).exists()
        return
    for rel, entry in m["files"].items():
        assert (out / rel).stat().st_size == entry["size"], rel
        assert crc32_file(out / rel) == entry["crc32"], rel  # every file the manifest lists has its checksum
    if (out / INDEX).exists():
        assert m["complete"]
        report = streammerge.verify(out)
        assert report.ok, report.summary()


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume(big, reference, tmp_path):
    ref_out, ref_bytes, _ = reference
    seed = int(os.environ.get("STREAMMERGE_TEST_SEED", random.randrange(2**32)))
    print(f"kill -9 test seed: {seed} (rerun with STREAMMERGE_TEST_SEED={seed})")
    rng = random.Random(seed)
    out = tmp_path / "out"
    total = len(manifest_of(ref_out)["files"])
    killed = []
    for attempt in range(3):
        proc = start(big, out)
        if attempt == 0:  # anywhere, startup included
            time.sleep(rng.uniform(0, 3.0))
            started = True
        else:  # after a random number of finished files, a random moment into the next one
            target = rng.randint(len((manifest_of(out) or {"files": {}})["files"]), total)
            started = wait_for(lambda target=target: len((manifest_of(out) or {"files": {}})["files"]) >= target, proc)
            time.sleep(rng.uniform(0, 0.03))
        if started and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            killed.append(len((manifest_of(out) or {"files": {}})["files"]))
        else:
            proc.communicate(timeout=60)
        check_invariants(out)
    print(f"killed with {killed} of {total} files finished")
    assert killed, "every run finished before its kill; the checkpoint is too small to test this"
    result = streammerge.merge(big, out, **OPTIONS)  # the same merge: resumes
    assert tree_bytes(out) == ref_bytes, "resumed output differs from an uninterrupted run"
    assert {k: (v["size"], v["crc32"]) for k, v in manifest_of(out)["files"].items()} == \
        {k: (v["size"], v["crc32"]) for k, v in manifest_of(ref_out)["files"].items()}
    assert not [p for p in out.rglob("*") if p.name.endswith(TMP_SUFFIX)]
    assert streammerge.verify(out, big).ok
    print(f"{killed} kills; the final run reused {len(result.reused)} of {len(result.files)} files")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_cleanly_and_resumes(big, reference, tmp_path, sig):
    _, ref_bytes, _ = reference
    out = tmp_path / "out"
    for _ in range(6):  # the signal must land while files are being written (one worker: slower)
        proc = start(big, out, "--workers", "1")
        if wait_for(lambda: bool((manifest_of(out) or {}).get("files")), proc):
            proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        if proc.returncode != 0:
            break
        shutil.rmtree(out)  # it finished before the signal landed: try again
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    leftovers = [p for p in out.rglob("*") if p.name.endswith(TMP_SUFFIX) or p.name == "manifest.tmp"]
    assert not leftovers, leftovers
    assert not (out / INDEX).exists()
    check_invariants(out)
    finished = set(manifest_of(out)["files"])
    result = streammerge.merge(big, out, **OPTIONS)
    assert finished <= set(result.reused)
    assert tree_bytes(out) == ref_bytes


# ---------------------------------------------------------------- the states a killed run can leave


@pytest.fixture()
def done(big, reference, tmp_path) -> Path:
    """A finished output folder (a copy of the reference run)."""
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    return out


def test_file_not_in_the_manifest_and_temp_files_are_rewritten(big, reference, done):
    m = manifest_of(done)
    victim = next(rel for rel in m["files"] if rel.endswith(".safetensors"))
    del m["files"][victim]  # killed between the rename and the manifest update...
    m["complete"] = False
    (done / STATE_DIR / MANIFEST).write_text(json.dumps(m))
    data = bytearray((done / victim).read_bytes())
    data[-1] ^= 0xFF  # ... and whatever is in that file is not trusted
    (done / victim).write_bytes(bytes(data))
    other = next(rel for rel in m["files"] if rel.endswith(".safetensors") and rel != victim)
    tmp_path(done / other).write_bytes(b"half a file from a killed run")
    tmp_path(done / INDEX).write_bytes(b"{")
    result = streammerge.merge(big, done, **OPTIONS)
    assert victim not in result.reused and other in result.reused
    assert tree_bytes(done) == reference[1]
    assert not [p for p in done.rglob("*") if p.name.endswith(TMP_SUFFIX)]


def test_changed_file_is_rehashed_and_rewritten(big, reference, done):
    names = sorted(rel for rel in manifest_of(done)["files"] if rel.endswith(".safetensors"))
    changed, touched = names[0], names[1]
    data = bytearray((done / changed).read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, other bytes
    (done / changed).write_bytes(bytes(data))
    os.utime(done / touched, ns=(1, 1))  # other mtime, same bytes (e.g. copied without -p)
    result = streammerge.merge(big, done, **OPTIONS)
    assert changed not in result.reused
    assert touched in result.reused
    assert tree_bytes(done) == reference[1]


def test_killed_before_the_first_manifest(big, reference, tmp_path):
    """Only our state folder and a half-written manifest: not a foreign folder, the merge starts."""
    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    (out / STATE_DIR / "manifest.tmp").write_text('{"version": 1, "fi')
    streammerge.merge(big, out, **OPTIONS)
    assert tree_bytes(out) == reference[1]
    assert not (out / STATE_DIR / "manifest.tmp").exists()


def test_index_only_exists_when_every_file_does(big, reference, done):
    """Resuming a finished folder with a damaged file: the old index is gone until everything is rewritten."""
    victim = sorted(rel for rel in manifest_of(done)["files"] if rel.endswith(".safetensors"))[3]
    (done / victim).unlink()
    seen = []

    def on_file_done(f, path):
        seen.append((f.filename, (done / INDEX).exists()))

    streammerge.merge(big, done, on_file_done=on_file_done, **OPTIONS)
    assert seen[-1] == (INDEX, True)
    assert all(not index_there for name, index_there in seen[:-1]), seen
    assert tree_bytes(done) == reference[1]


def test_rerun_of_a_finished_merge_rewrites_nothing_big(big, reference, done):
    """Nothing to redo: no data file is rewritten, and the index never goes away (even if interrupted)."""
    before = snapshot(done)
    index_there = []
    result = streammerge.merge(big, done, on_file_done=lambda f, p: index_there.append((done / INDEX).exists()),
                               **OPTIONS)
    assert index_there and all(index_there)
    assert result.bytes_written == 0
    assert len(result.reused) == sum(1 for rel in before if rel.endswith(".safetensors"))
    assert tree_bytes(done) == reference[1]


def test_a_checkpoint_saved_again_is_not_resumed(big, tmp_path):
    """The same step saved again at the same path (a restarted run) has the same layout, so the same plan: the files
    an earlier merge finished hold the old weights. The rerun must not reuse them, finished or half done."""
    from streammerge.errors import OutputError

    ckpt = copy_actor(big, tmp_path / "actor")
    out = tmp_path / "out"
    streammerge.merge(ckpt, out, **OPTIONS)
    assert streammerge.merge(ckpt, out, **OPTIONS).bytes_written == 0  # unchanged: nothing to redo
    rank0 = ckpt / "model_world_size_4_rank_0.pt"
    data = bytearray(rank0.read_bytes())
    data[-4096] ^= 0x01  # same size and layout, other bytes (a tensor's or the zip's: the merge need not tell which)
    rank0.write_bytes(bytes(data))
    victim = sorted(rel for rel in manifest_of(out)["files"] if rel.endswith(".safetensors"))[0]
    for interrupted in (False, True):
        if interrupted:
            (out / victim).unlink()
        with pytest.raises(OutputError, match=r"as it was before .*model_world_size_4_rank_0\.pt changed"):
            streammerge.merge(ckpt, out, **OPTIONS)


def test_a_checkpoint_saved_again_while_it_is_merged_fails(big, tmp_path):
    """torch.save rewrites a rank file in place: the files written before it hold the old bytes, those after the new
    ones. The merge must fail before the index says the folder is complete, and a rerun must not resume it."""
    from streammerge.errors import CheckpointError, OutputError

    ckpt = copy_actor(big, tmp_path / "actor")
    out = tmp_path / "out"
    rank0 = ckpt / "model_world_size_4_rank_0.pt"
    saved = []

    def save_again(f, path) -> None:
        if not saved:
            data = bytearray(rank0.read_bytes())
            data[-4096] ^= 0x01
            with open(rank0, "r+b") as fh:  # in place, as torch.save does
                fh.write(bytes(data))
            saved.append(f.filename)

    with pytest.raises(CheckpointError, match=r"model_world_size_4_rank_0\.pt changed while it was merged"):
        streammerge.merge(ckpt, out, on_file_done=save_again, **OPTIONS)
    assert saved and not (out / INDEX).exists()
    with pytest.raises(OutputError, match="as it was before"):
        streammerge.merge(ckpt, out, **OPTIONS)
