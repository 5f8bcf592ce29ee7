"""Interrupted merges: kill -9 at random points, Ctrl-C, SIGTERM, and the folder states they leave.

After any interruption, re-running the same command finishes the job, reuses the files already
finished, and gives a folder byte-identical to an uninterrupted run; at no moment does a folder
look complete (an index) without being complete.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ckpt_tools import REPO, copy_actor, snapshot, tree_bytes

import streammerge
from streammerge.cli import INTERRUPTED
from streammerge.write.manifest import MANIFEST, STATE_DIR, crc32_file
from streammerge.write.writer import TMP_SUFFIX, tmp_path

TMP_PATH = tmp_path  # where tests take pytest's tmp_path fixture

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
        if not (out / rel).exists() and not rel.endswith(".safetensors"):
            continue  # a small file is listed just before its rename (the transaction's order): killed in between
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


# A Ctrl-C that lands while the modules load, or while the arguments are read: raised there by a dependency that
# stands in for the real one on PYTHONPATH (numpy, which the command line imports first; argparse's parse_args).
CTRL_C_AT = {
    "loading": {"numpy/__init__.py": "raise KeyboardInterrupt\n"},
    "parsing": {"sitecustomize.py": "import argparse\n"
                                    "def parse_args(self, *a, **k):\n    raise KeyboardInterrupt\n"
                                    "argparse.ArgumentParser.parse_args = parse_args\n"},
}


@pytest.mark.parametrize("entry", ["script", "-m"])
@pytest.mark.parametrize("moment", list(CTRL_C_AT))
def test_interrupt_while_starting_is_one_line(big, tmp_path, moment, entry):
    """Ctrl-C just after pressing Enter ends as one later does: one line and exit 130, no traceback, nothing written."""
    for name, text in CTRL_C_AT[moment].items():
        (tmp_path / "inject" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "inject" / name).write_text(text)
    if entry == "script":  # what the installed `streammerge` script runs
        (script,) = importlib.metadata.entry_points(group="console_scripts", name="streammerge")
        launch = ["-c", f"import sys; from {script.module} import {script.attr}; sys.exit({script.attr}())"]
    else:
        launch = ["-m", "streammerge"]
    before = snapshot(big)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "inject"), str(REPO)])}
    proc = subprocess.run([sys.executable, *launch, str(big), str(tmp_path / "out"), *CLI_OPTIONS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("streammerge: interrupted"), line
    assert not (tmp_path / "out").exists()
    assert snapshot(big) == before


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


def test_a_ctrl_c_after_the_summary_leaves_the_finished_merge_at_exit_code_0(big, tmp_path):
    """The interpreter's teardown follows the summary: a Ctrl-C there said "interrupted ... rerun the same command to
    resume" and exited 130 (or died of SIGINT) for a folder that was complete."""
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "streammerge", str(big), str(out), *CLI_OPTIONS], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        summary = proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert summary.startswith("wrote ") and proc.returncode == 0 and "interrupted" not in stderr, \
            (summary, proc.returncode, stderr)
        assert (out / INDEX).is_file()


def test_a_second_ctrl_c_while_it_stops_still_ends_with_one_line_and_130(big, tmp_path):
    """The second one landed in the interpreter's teardown: the process died of SIGINT (no exit code 130)."""
    stopped = 0
    for attempt in range(4):
        out = tmp_path / f"out{attempt}"
        proc = start(big, out, "--workers", "1")
        if wait_for(lambda out=out: bool((manifest_of(out) or {}).get("files")), proc):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.002 * attempt)
            proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        if proc.returncode != 0:  # else it finished before the first one landed
            assert proc.returncode == 130 and stderr.splitlines() == [INTERRUPTED], (proc.returncode, stderr)
            stopped += 1
        check_invariants(out)
    assert stopped, "every run finished before its Ctrl-C; the checkpoint is too small to test this"


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
    """Nothing to redo: no file is rewritten (not even config.json, the index or the manifest), every file is still
    reported (a push uploads what it lacks), and the index never goes away (even if interrupted)."""
    before = snapshot(done)
    index_there = []
    result = streammerge.merge(big, done, on_file_done=lambda f, p: index_there.append((done / INDEX).exists()),
                               **OPTIONS)
    assert index_there and all(index_there)
    assert result.bytes_written == 0
    assert sorted(result.reused) == sorted(f.filename for f in result.files) == \
        sorted(rel for rel in before if not rel.startswith(STATE_DIR))
    assert {rel: v for rel, v in snapshot(done).items() if rel != f"{STATE_DIR}/lock"} == \
        {rel: v for rel, v in before.items() if rel != f"{STATE_DIR}/lock"}
    assert tree_bytes(done) == reference[1]


def test_a_file_with_another_mtime_is_checked_once_and_the_folder_stays_up(big, reference, done):
    """A finished folder copied without its mtimes: a rerun checks each file by crc32 and records its new mtime (the
    next run does not read it again), and the folder loads all the while."""
    victim = sorted(rel for rel in manifest_of(done)["files"] if rel.endswith(".safetensors"))[2]
    os.utime(done / victim, ns=(1, 1))
    index_there = []
    result = streammerge.merge(big, done, on_file_done=lambda f, p: index_there.append((done / INDEX).exists()),
                               **OPTIONS)
    assert all(index_there) and victim in result.reused and result.bytes_written == 0
    assert manifest_of(done)["files"][victim]["mtime_ns"] == 1
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


# ---------------------------------------------------------------- a rerun into a folder that changed since


@pytest.mark.parametrize("name", ["model.safetensors", "adapter_config.json", "tokenizer.model", "chat_template.jinja",
                                  "optimizer/optimizer.pt", "tokenizer.model.v3", "source.spm"])
def test_a_rerun_refuses_a_file_a_loader_reads_that_the_merge_did_not_write(big, done, name):
    """Someone added a file to a finished folder that transformers, a tokenizer or peft reads with ours (a
    model.safetensors is loaded instead of the shards, an adapter_config.json makes it a peft adapter): a rerun
    would exit 0 on a folder that does not load as the trained model. Refused, naming the file; nothing changes."""
    from streammerge.errors import OutputError

    (done / name).parent.mkdir(exist_ok=True)
    (done / name).write_bytes(b"someone else's file")
    before = snapshot(done)
    with pytest.raises(OutputError, match=rf"{re.escape(str(done / name))}: not written by this merge, and "
                                          r"transformers, a tokenizer or peft may read it"):
        streammerge.merge(big, done, **OPTIONS)
    assert snapshot(done) == before


def test_a_rerun_leaves_files_no_loader_reads(big, reference, done):
    """A push's model card, hidden files (.gitattributes, .cache/) and notes are nobody's weights or config."""
    for name, data in (("README.md", b"# card"), (".gitattributes", b"*.safetensors filter=lfs"),
                       (".cache/huggingface/x.lock", b""), ("notes.md", b"eval: fine")):
        (done / name).parent.mkdir(parents=True, exist_ok=True)
        (done / name).write_bytes(data)
    streammerge.merge(big, done, **OPTIONS)
    assert (done / "notes.md").read_bytes() == b"eval: fine"
    assert streammerge.verify(done, big).ok


def _inotify_events(folders: list[Path]):
    """A real inotify watch on `folders`: returns read() -> [(folder, event mask, name)] in the kernel's order."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK)
    assert fd >= 0
    masks = 0x2 | 0x8 | 0x80 | 0x100 | 0x200  # IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE, IN_DELETE
    watches = {libc.inotify_add_watch(fd, str(f).encode(), masks): f for f in folders}

    def read() -> list[tuple[Path, int, str]]:
        events, buf = [], b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            buf += chunk
        while buf:
            wd, mask, _, size = struct.unpack_from("iIII", buf)
            name = buf[16:16 + size].rstrip(b"\0").decode()
            events.append((watches.get(wd), mask, name))
            buf = buf[16 + size:]
        return events

    return read, fd


def test_the_manifest_is_not_written_once_the_folder_loads(big, reference, tmp_path):
    """The flaky kill -9 test (seed 213855966): a merge killed while it wrote the manifest after the index appeared
    left .streammerge/manifest.tmp in a complete folder, which verify fails. Watched with inotify: the manifest's
    last write comes before config.json and the index appear, and a rerun of the finished folder writes no manifest
    at all (it loads all along)."""
    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    read, fd = _inotify_events([out, out / STATE_DIR])
    try:
        streammerge.merge(big, out, **OPTIONS)
        events = read()
        appeared = [i for i, (f, mask, name) in enumerate(events) if f == out and mask & 0x80 and name in
                    (INDEX, "config.json")]
        manifest = [i for i, (f, _, name) in enumerate(events) if f == out / STATE_DIR and name.startswith("manifest")]
        assert appeared and manifest and max(manifest) < min(appeared), (appeared, manifest)
        assert [events[i][2] for i in appeared] == ["config.json", INDEX]  # config.json, then the index, last

        streammerge.merge(big, out, **OPTIONS)
        events = read()
        assert not [e for e in events if e[0] == out / STATE_DIR and e[2].startswith("manifest")], events
        assert not [e for e in events if e[0] == out], events  # nothing at all changed in the folder
    finally:
        os.close(fd)
    assert tree_bytes(out) == reference[1]


@pytest.mark.slow
@pytest.mark.parametrize("shard_size", ["500KB", "5GB"], ids=["sharded", "one-file"])
def test_a_rerun_that_changes_the_small_files_takes_the_folder_down_first(big, tmp_path, shard_size):
    """The checkpoint's huggingface/ changed (a fixed rope_theta, a new tokenizer) but not the weights: a rerun into
    the finished folder rewrites the small files. Killed (SIGKILL) while it writes them, the folder must not load
    new config.json with the old tokenizer (or old with new): the index and config.json go first, and come back
    last. With one model.safetensors (no index) config.json alone makes the folder load."""
    options = dict(OPTIONS, max_shard_size=shard_size)
    ckpt = copy_actor(big, tmp_path / "actor")
    out = tmp_path / "out"
    streammerge.merge(ckpt, out, **options)
    assert (out / INDEX).exists() == (shard_size == "500KB")
    old = tree_bytes(out)
    hf = ckpt / "huggingface"
    config = json.loads((hf / "config.json").read_text())
    config["rope_theta"] = float(config.get("rope_theta") or 10000.0) * 2
    (hf / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = json.loads((hf / "tokenizer.json").read_text())
    tokenizer["added_note"] = "x" * 150_000_000  # big enough to be caught while it is written and fsynced
    (hf / "tokenizer.json").write_text(json.dumps(tokenizer))
    new_tokenizer = (hf / "tokenizer.json").read_bytes()

    proc = start(ckpt, out, "--max-shard-size", shard_size)
    staged = TMP_PATH(out / "tokenizer.json")
    assert wait_for(lambda: staged.exists(), proc, timeout=120), proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    loads = (out / "config.json").exists() and ((out / INDEX).exists() or (out / "model.safetensors").exists())
    if loads:  # one run's small files, whole
        now = {rel: (out / rel).read_bytes() for rel in ("config.json", "tokenizer.json")}
        assert now == {rel: old[rel] for rel in now}, "the folder loads a mix of two runs' small files"
    assert not (out / INDEX).exists() and not (out / "config.json").exists()
    assert (out / "tokenizer.json").read_bytes() == old["tokenizer.json"]  # killed before its rename
    check_invariants(out)

    streammerge.merge(ckpt, out, **options)
    assert (out / "tokenizer.json").read_bytes() == new_tokenizer
    assert json.loads((out / "config.json").read_text())["rope_theta"] == config["rope_theta"]
    assert streammerge.verify(out, ckpt).ok


def _two_parts(ckpt: Path, outs: list[Path], on_file_done=None) -> list[BaseException]:
    """torchrun's two writers, played by two threads with a barrier as `sync` (what distributed.py passes): part n
    merges into outs[n]; returns what they raised."""
    import threading

    barrier = threading.Barrier(2, timeout=120)
    errors: list[BaseException] = []

    def part(n: int) -> None:
        try:
            streammerge.merge(ckpt, outs[n], num_parts=2, part=n, sync=barrier.wait,
                              on_file_done=(lambda f, path: on_file_done(n, f)) if on_file_done else None, **OPTIONS)
        except BaseException as e:  # noqa: BLE001  (the test looks at it)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=part, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_a_part_that_failed_writing_the_small_files_keeps_the_other_parts_files(big, reference, tmp_path):
    """Part 1 writes its share and lists it in its part manifest; part 0 folds that in, then fails writing the small
    files (here: the checkpoint's tokenizer file went away; a full disk does the same). The rerun must reuse part 1's
    finished files, not write them again."""
    ckpt = copy_actor(big, tmp_path / "actor")
    out = tmp_path / "out"
    small = next(p for p in sorted((ckpt / "huggingface").iterdir()) if p.name != "config.json")
    saved = small.read_bytes()
    mine = len(streammerge.plan(ckpt, **OPTIONS).weights.split(2, 0))
    written: list[str] = []

    def gone(n: int, f) -> None:  # part 0's last data file: the small file vanishes before the end
        if n == 0:
            written.append(f.filename)
            if len(written) == mine:
                small.unlink()

    errors = _two_parts(ckpt, [out, out], gone)
    assert len(errors) == 1 and isinstance(errors[0], OSError) and small.name in str(errors[0]), errors
    assert not (out / INDEX).exists()
    small.write_bytes(saved)
    result = streammerge.merge(ckpt, out, **OPTIONS)
    rewritten = sorted(f.filename for f in result.files if f.filename not in result.reused and
                       f.filename.endswith(".safetensors"))
    assert rewritten == [], f"{len(rewritten)} finished files of part 1 written again: {rewritten[:3]}"
    assert tree_bytes(out) == reference[1]


def test_a_writer_whose_output_folder_host_0_cannot_see_fails_the_merge(big, tmp_path):
    """Hosts without a shared file system (each its own local OUT): host 0 must not write an index naming files that
    are not in its folder, and no writer may report success."""
    from streammerge.errors import OutputError

    outs = [tmp_path / "host0" / "out", tmp_path / "host1" / "out"]
    errors = _two_parts(big, outs)
    assert not (outs[0] / INDEX).exists() and not (outs[0] / "config.json").exists()
    assert len(errors) == 1 and isinstance(errors[0], OutputError), errors
    message = str(errors[0])
    assert "another host" in message and ".safetensors" in message, message
    assert "file system every host shares" in message, message


@pytest.mark.parametrize("second", [[], ["--dtype", "float32"]], ids=["same-merge", "other-options"])
def test_a_second_merge_into_a_folder_being_written_is_refused_and_changes_nothing(big, reference, tmp_path, second):
    """Two merges into one OUT at the same time: the second stops with one line (exit 2) and touches nothing, and the
    first finishes as if alone."""
    _, ref_bytes, _ = reference
    out = tmp_path / "out"
    first = start(big, out, "--buffer-size", "16KiB", "--workers", "1")  # slow enough to still run
    assert wait_for(lambda: len((manifest_of(out) or {"files": {}})["files"]) >= 2, first)
    other = start(big, out, *second)
    _, err = other.communicate(timeout=60)
    running = first.poll() is None
    _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert other.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert ("another streammerge is writing this folder" if running and not second else "") in err
    assert tree_bytes(out) == ref_bytes
    check_invariants(out)


def test_a_merge_that_finished_between_a_second_merges_look_and_its_lock_is_not_replaced(verl_fixtures, tmp_path,
                                                                                           monkeypatch):
    """Two merges with different options started at once into a new OUT: the second looks at OUT (nothing there),
    and the first takes the lock, finishes and releases it before the second takes it. The second must then refuse
    the folder, as it refuses any folder holding a different merge, not take it down and replace it (both exiting 0,
    the first one's user holding a folder that is no longer what it merged)."""
    from streammerge.errors import OutputError
    from streammerge.write.transaction import OutputFolder

    monkeypatch.setenv("STREAMMERGE_ARCH_CHECK", "0")  # not what is tested here, and seconds per merge
    ckpt, out = verl_fixtures / "fsdp2_qwen2_tied_ws4", tmp_path / "out"
    lock = OutputFolder._lock
    first: list[dict[str, bytes]] = []  # the folder as the first merge left it

    def first_merge_finishes_before(folder: OutputFolder) -> None:
        if not first:  # the second merge has looked at OUT: the first runs from start to end now
            monkeypatch.setattr(OutputFolder, "_lock", lock)
            streammerge.merge(ckpt, out, dtype="keep", optimizer=False)
            first.append(tree_bytes(out))
        lock(folder)

    monkeypatch.setattr(OutputFolder, "_lock", first_merge_finishes_before)
    with pytest.raises(OutputError, match="holds a different merge"):
        streammerge.merge(ckpt, out, dtype="float16", optimizer=False)
    assert first and tree_bytes(out) == first[0]
