"""The watch sidecar: follows a training run, merges and pushes each complete checkpoint once.

Checkpoints are real (synthetic FSDP2 runs from ``make_ckpt``), copied into a run folder the way
the trainer lays them out; the Hub is the test server, driven by the real huggingface_hub client.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hubserver import WRITE_TOKEN, HubServer

import streammerge
from streammerge.errors import ConfigError
from streammerge.hub.retry import RetryPolicy
from streammerge.hub.watch import STATE_FILE, Watcher, watch

pytestmark = [pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
              pytest.mark.usefixtures("hub_env")]

ROOT = Path(__file__).resolve().parents[1]
FAST = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2)
SHARD = "200KB"
TRACKER = "latest_checkpointed_iteration.txt"




@pytest.fixture
def actors(make_ckpt) -> list[Path]:
    """Two real checkpoints with different weights, to play two steps of one run."""
    return [make_ckpt(), make_ckpt(seed=1)]


def add_step(run: Path, step: int, actor: Path, *, tracker: bool = True) -> Path:
    dest = run / f"global_step_{step}" / "actor"
    shutil.copytree(actor, dest)
    if tracker:  # the trainer writes the tracker after every rank has saved
        (run / TRACKER).write_text(str(step))
    return dest


def push_options(hub: HubServer) -> dict:
    return {"push": True, "repo_id": "tiny", "token": WRITE_TOKEN, "endpoint": hub.endpoint, "retry": FAST,
            "optimizer": False, "max_shard_size": SHARD}


def remote_files(hub: HubServer, repo_id: str, revision: str = "main") -> dict[str, bytes]:
    return {p: hub.file_bytes(repo_id, p, revision) for p in hub.files(repo_id, revision) if p != ".gitattributes"}


def local_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".streammerge" not in p.relative_to(out).parts}


def wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"watch exited early:\n{proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out:\n{proc.communicate()[1]}")
        time.sleep(0.05)


PER_STEP = "tiny@<a branch per step>"  # the watch state's key for a repo pushed a branch per step


@pytest.mark.slow
def test_watch_cli_pushes_each_complete_step_to_its_branch_and_not_again_after_restart(hub, actors, tmp_path):
    run = tmp_path / "run"
    add_step(run, 1, actors[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_TOKEN": WRITE_TOKEN, "HF_ENDPOINT": hub.endpoint,
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    args = [sys.executable, "-m", "streammerge", "watch", str(run), "--push", "--repo-id", "tiny",
            "--revision-per-step", "--max-shard-size", SHARD, "--interval", "0.4"]
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def recorded(step: int) -> bool:  # pushed, and written down as pushed
            state = run / STATE_FILE
            return state.is_file() and str(step) in json.loads(state.read_text())["targets"].get(PER_STEP, {})

        wait_for(lambda: recorded(1), 60, proc)

        # Step 2 arrives the hard way: the tracker already names it while rank 1's model file is
        # missing, then that file grows in small writes for longer than two looks. Nothing may be
        # pushed (or even merged) before it is whole.
        name = "model_world_size_2_rank_1.pt"
        actor2 = run / "global_step_2" / "actor"
        shutil.copytree(actors[1], actor2, ignore=shutil.ignore_patterns(name))
        (run / TRACKER).write_text("2")
        time.sleep(1.2)
        data = (actors[1] / name).read_bytes()
        with open(actor2 / name, "wb") as f:
            for i in range(24):
                f.write(data[i * len(data) // 24:(i + 1) * len(data) // 24])
                f.flush()
                time.sleep(0.05)
        assert "step-2" not in hub.repo("alice/tiny").branches
        assert not (actor2.parent / "actor-hf").exists()
        wait_for(lambda: recorded(2), 60, proc)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "step 2: not complete yet" in err and "step 2: files still changing" in err

    for step, actor in ((1, actors[0]), (2, actors[1])):
        out = run / f"global_step_{step}" / "actor-hf"
        assert remote_files(hub, "alice/tiny", f"step-{step}") == local_files(out)
        check = streammerge.merge(actor, tmp_path / f"check{step}", max_shard_size=SHARD)
        assert any(f.filename.startswith("optimizer/") for f in check.files)
        for f in check.files:  # the data; the optimizer index also names the step, which differs here
            if f.filename.endswith(".safetensors"):
                assert (out / f.filename).read_bytes() == (check.out_dir / f.filename).read_bytes()
    assert set(hub.files("alice/tiny", "main")) == {".gitattributes"}
    state = json.loads((run / STATE_FILE).read_text())
    assert set(state["targets"][PER_STEP]) == {"1", "2"}
    assert state["targets"][PER_STEP]["2"]["revision"] == "step-2"

    # A restarted watcher finds both steps recorded: it neither merges nor talks to the Hub.
    n_log = len(hub.log)
    proc = subprocess.run([*args, "--once"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(hub.log) == n_log and len(hub.commit_log("alice/tiny", "step-2")) == 2

    # A watcher of the same run that pushes to main: the steps on their own branches are not on main yet.
    proc = subprocess.run([a for a in args if a != "--revision-per-step"] + ["--once", "--only-latest"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert remote_files(hub, "alice/tiny", "main") == local_files(run / "global_step_2" / "actor-hf")
    assert WRITE_TOKEN not in proc.stderr + err


def test_only_latest_skips_older_steps_and_once_twice_pushes_each_step_once(hub, actors, tmp_path):
    run = tmp_path / "run"
    add_step(run, 1, actors[0])
    add_step(run, 2, actors[1])
    add_step(run, 3, actors[0], tracker=False)  # still being written: the tracker says 2

    results = watch(run, once=True, interval=0.1, only_latest=True, **push_options(hub))
    assert [(r.step, r.ok) for r in results] == [(2, True)]
    assert remote_files(hub, "alice/tiny") == local_files(run / "global_step_2" / "actor-hf")
    assert not (run / "global_step_1" / "actor-hf").exists()
    assert not (run / "global_step_3" / "actor-hf").exists()

    n_log = len(hub.log)
    assert watch(run, once=True, interval=0.1, only_latest=True, **push_options(hub)) == []
    assert len(hub.log) == n_log

    (run / TRACKER).write_text("3")
    results = watch(run, once=True, interval=0.1, only_latest=True, **push_options(hub))
    assert [(r.step, r.ok) for r in results] == [(3, True)]
    commits = hub.commit_log("alice/tiny")
    assert [c.summary for c in commits[1:]] == ["Upload model from step 2 with streammerge",
                                                "Upload model from step 3 with streammerge"]
    assert remote_files(hub, "alice/tiny") == local_files(run / "global_step_3" / "actor-hf")
    assert set(Watcher(run, only_latest=True, **push_options(hub)).done_steps()) == {2, 3}


def test_a_failed_push_is_not_recorded_and_is_retried_at_the_next_look(hub, actors, tmp_path):
    run = tmp_path / "run"
    add_step(run, 4, actors[0])
    out_root = tmp_path / "merged"
    hub.fail_next(r"/commit/", status=500, n=FAST.attempts)
    watcher = Watcher(run, out_root=out_root, state_file=tmp_path / "state.json", **push_options(hub))

    failed = watcher.run(once=True, interval=0.1)
    assert [(r.step, r.ok, r.error_kind) for r in failed] == [(4, False, "failed")]
    assert watcher.done_steps() == {}

    retried = watcher.run(once=True, interval=0.1)
    assert [(r.step, r.ok) for r in retried] == [(4, True)]
    assert remote_files(hub, "alice/tiny") == local_files(out_root / "global_step_4")
    assert watcher.done_steps()[4]["commit"] == hub.repo("alice/tiny").branches["main"]
    assert not (run / STATE_FILE).exists()

    # Without --push the sidecar only merges, under its own record.
    merged = Watcher(run, push=False, optimizer=False, max_shard_size=SHARD, out_root=tmp_path / "local")
    only = merged.run(once=True, interval=0.1)
    assert [(r.step, r.ok) for r in only] == [(4, True)]
    assert only[0].summary() == only[0].merge.summary()  # the log line says "step 4: " once, before it
    assert local_files(tmp_path / "local" / "global_step_4") == \
        {k: v for k, v in local_files(out_root / "global_step_4").items() if k != "README.md"}
    assert set(merged.done_steps()) == {4}


def test_the_library_pushes_where_a_repo_is_named_as_the_cli_does_with_push(tmp_path):
    """Watcher(run) merges only, as `streammerge watch RUN` does; given a repo it pushes there; push=True without one
    is refused, as `watch --push` without --repo-id is."""
    assert Watcher(tmp_path).push is False
    assert Watcher(tmp_path, repo_id="me/x").push is True
    assert Watcher(tmp_path, repo_id="me/x", push=False).push is False
    with pytest.raises(ConfigError, match="needs --repo-id"):
        Watcher(tmp_path, push=True)


@pytest.mark.slow
def test_an_older_step_is_never_pushed_over_a_newer_one(hub, actors, tmp_path):
    """Steps 2 and 4 are ready; step 2's commit fails through every retry and step 4 is pushed to main. At the next
    look step 2 must not be committed on top: main would hold older weights than the newest checkpoint's."""
    run = tmp_path / "run"
    add_step(run, 2, actors[0])
    add_step(run, 4, actors[1])
    watcher = Watcher(run, out_root=tmp_path / "merged", state_file=tmp_path / "state.json", **push_options(hub))
    hub.fail_next(r"/commit/", status=503, n=FAST.attempts)  # the outage hits step 2's commit only
    first = watcher.run(once=True, interval=0.1)
    assert [(r.step, r.ok) for r in first] == [(2, False), (4, True)]
    head = hub.repo("alice/tiny").branches["main"]
    second = watcher.run(once=True, interval=0.1)
    assert [(r.step, r.ok, r.error_kind) for r in second] == [(2, False, "superseded")]
    assert hub.repo("alice/tiny").branches["main"] == head
    assert remote_files(hub, "alice/tiny") == local_files(tmp_path / "merged" / "global_step_4")
    assert watcher.done_steps()[2] == {**watcher.done_steps()[2], "superseded_by": 4}
    assert watcher.run(once=True, interval=0.1) == []  # recorded: not looked at again


def test_a_rotating_trainer_never_stops_the_watcher(actors, tmp_path):
    """veRL's max_ckpt_to_keep removes the previous step while the watcher may be looking at it: the look must treat
    the vanished folder as not ready, not die. A trainer thread saves and rotates steps quickly; the watcher looks
    every few milliseconds."""
    import threading

    run = tmp_path / "run"
    run.mkdir()
    stop = threading.Event()

    def trainer() -> None:
        n = 0
        while not stop.is_set():  # veRL's order: remove the previous actor/, save the next, write the tracker
            n += 1
            shutil.rmtree(run / f"global_step_{n - 1}" / "actor", ignore_errors=True)
            shutil.copytree(actors[0], run / f"global_step_{n}" / "actor",
                            ignore=shutil.ignore_patterns("optim_*", "reference"))
            (run / TRACKER).write_text(str(n))
            time.sleep(0.03)

    thread = threading.Thread(target=trainer, daemon=True)
    thread.start()
    watcher = Watcher(run, push=False, optimizer=False, max_shard_size=SHARD, out_root=tmp_path / "out",
                      state_file=tmp_path / "state.json")
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            watcher.poll()  # raises if a look trips over the rotation
            time.sleep(0.005)
    finally:
        stop.set()
        thread.join()


def test_two_watchers_of_one_run_record_every_step_either_pushed(tmp_path):
    """Two watchers of one run (one pushing to main, one a branch per step) record in one state file at the same
    time. A record written over the other's, or a temp file renamed away under the other, loses steps (pushed again
    after a restart), kills a watcher or leaves a state file no watcher reads. Threads here: each opens the lock file
    itself, so flock sees them as it sees two processes."""
    import threading

    run = tmp_path / "run"
    run.mkdir()
    watchers = [Watcher(run, push=False), Watcher(run, push=True, repo_id="tiny", revision_per_step=True)]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def record(w: Watcher) -> None:
        start.wait()
        try:
            for step in range(100):
                w._record(step, {"at": "now"})
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=record, args=(w,)) for w in watchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [sorted(w.done_steps()) for w in watchers] == [list(range(100))] * 2


def test_a_rank_file_saved_again_after_the_looks_is_not_merged_as_a_mix(actors, tmp_path):
    """The watcher judged step 1 complete (two equal looks); then the trainer saves step 1 again in place (a restarted
    run), rank 0 first, before the merge starts. The merge must not take rank 0's new bytes with rank 1's old ones and
    record the step: the checkpoint is no longer the one the looks found complete."""
    import torch
    from safetensors.torch import load_file

    run = tmp_path / "run"
    actor = add_step(run, 1, actors[0])
    rank0 = next(actor.glob("model_world_size_*_rank_0.pt"))

    class Racing(Watcher):
        def process(self, step, ck):  # the trainer's save lands right after the look that found the step ready
            shutil.copyfile(actors[1] / rank0.name, rank0)
            return super().process(step, ck)

    watcher = Racing(run, push=False, optimizer=False, max_shard_size=SHARD, out_root=tmp_path / "out")
    results = watcher.run(once=True, interval=0.1)
    out = tmp_path / "out" / "global_step_1"
    if results and results[0].ok:  # the old code: a folder that loads, recorded as step 1
        merged = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
        saves = [{k: v for f in streammerge.merge(a, tmp_path / f"ref{i}", optimizer=False,
                                                  max_shard_size=SHARD).out_dir.glob("*.safetensors")
                  for k, v in load_file(f).items()} for i, a in enumerate(actors)]
        same = [all(torch.equal(merged[k], s[k]) for k in s) for s in saves]
        pytest.fail(f"step 1 merged and recorded after its rank 0 was saved again (equal to save 0: {same[0]}, "
                    f"to save 1: {same[1]})")
    assert [(r.step, r.ok) for r in results] == [(1, False)]
    assert "changed" in (results[0].error or "") and rank0.name in (results[0].error or "")
    assert watcher.done_steps() == {} and not (out / "model.safetensors.index.json").exists()


def test_a_megatron_lm_run_is_watched_by_its_iter_folders(tmp_path):
    """Megatron-LM names its step folders iter_NNNNNNN (its tracker is the same file): the watcher must merge them,
    not idle silently forever."""
    from safetensors.torch import load_file

    fixture = ROOT / "tests" / "data" / "megatron" / "llama_mlm_optim_pp2_dp2"
    run = tmp_path / "run"
    shutil.copytree(fixture, run, ignore=shutil.ignore_patterns("reference"))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for only_latest in (False, True):
        out = tmp_path / f"out-{only_latest}"
        (tmp_path / f"state-{only_latest}.json.tmp").symlink_to(victim)  # the state is written anew, not through it
        results = Watcher(run, push=False, optimizer=False, only_latest=only_latest, out_root=out,
                          state_file=tmp_path / f"state-{only_latest}.json").run(once=True, interval=0.1)
        assert [(r.step, r.ok) for r in results] == [(1, True)], [r.error for r in results]
        got = load_file(out / "global_step_1" / "model.safetensors")
        ref = load_file(next(fixture.rglob("reference/model.safetensors")))
        assert set(got) == set(ref) and all(got[k].equal(ref[k]) for k in ref)
        assert victim.read_text() == "precious" and (tmp_path / f"state-{only_latest}.json").is_file()


def test_a_megatron_lm_legacy_run_is_watched(tmp_path):
    """Megatron-LM's legacy torch format has the same tracker and iter_NNNNNNN folders, with mp_rank_*/ files inside."""
    from test_megatron import assert_equals_reference

    data = ROOT / "tests" / "data" / "megatron"
    run = tmp_path / "run"
    shutil.copytree(data / "legacy_qwen3_pp2", run)
    results = Watcher(run, push=False, optimizer=False, out_root=tmp_path / "out", state_file=tmp_path / "state.json",
                      model_name=str(data / "qwen3_pp2" / "huggingface")).run(once=True, interval=0.1)
    assert [(r.step, r.ok) for r in results] == [(1, True)], [r.error for r in results]
    assert_equals_reference(tmp_path / "out" / "global_step_1", data / "qwen3_pp2" / "reference" / "model.safetensors")


def test_a_tracker_watch_cannot_follow_is_said_once(actors, tmp_path, caplog):
    """Megatron-LM's tracker holds "release" for a converted checkpoint, and a tracker may name a step whose folder
    is not there: the watcher waits either way, but says why once, not silently and not at every look."""
    import logging

    run = tmp_path / "run"
    run.mkdir()
    watcher = Watcher(run, push=False, optimizer=False, max_shard_size=SHARD, out_root=tmp_path / "out",
                      state_file=tmp_path / "state.json")
    for text, words in (("release", "holds 'release', not a step number"),
                        ("7", "names step 7, but"), ("", None)):
        (run / TRACKER).write_text(text)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="streammerge.hub.watch"):
            assert watcher.poll() == [] and watcher.poll() == []
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert said == ([] if words is None else [m for m in said if words in m]) and len(said) == (words is not None)
    add_step(run, 7, actors[0])
    assert [(r.step, r.ok) for r in watcher.run(once=True, interval=0.1)] == [(7, True)]


def test_a_link_or_a_pipe_as_the_state_lock_is_refused(actors, tmp_path):
    """The state's lock file lies in the run folder, which is the trainer's: a link planted there is not followed
    (the watcher would create or open a file elsewhere), and a pipe is no lock file; one line each, then a rerun
    records the step once the lock file is the watcher's own."""
    from streammerge.errors import OutputError

    run = tmp_path / "run"
    add_step(run, 1, actors[0])
    lock = run / (STATE_FILE + ".lock")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    watcher = Watcher(run, push=False, optimizer=False, max_shard_size=SHARD, out_root=tmp_path / "out")
    for plant, words in ((lambda: lock.symlink_to(elsewhere / "created"), r"\.lock: a link"),
                         (lambda: os.mkfifo(lock), r"\.lock: not a file \(a pipe")):
        plant()
        with pytest.raises(OutputError, match=words):
            watcher.run(once=True, interval=0.1)
        assert list(elsewhere.iterdir()) == [] and watcher.done_steps() == {}
        lock.unlink()
    state = run / STATE_FILE  # the state itself as a pipe: named, never opened to read (that waits for a writer)
    os.mkfifo(state)
    looked: list = []
    look = threading.Thread(target=lambda: looked.append(_raised(watcher.done_steps)), daemon=True)
    look.start()
    look.join(30)
    assert looked and re.search(r"\.streammerge-watch\.json: not a file \(a pipe", str(looked[0])), looked
    state.unlink()
    assert [(r.step, r.ok) for r in watcher.run(once=True, interval=0.1)] == [(1, True)]
    assert list(watcher.done_steps()) == [1] and lock.is_file() and not lock.is_symlink()


def _raised(call) -> BaseException | None:
    try:
        call()
    except BaseException as e:  # noqa: BLE001 - the test looks at what it was
        return e
    return None


def test_a_step_that_cannot_be_merged_as_saved_fails_watch_once_and_is_said_once_in_the_loop(actors, tmp_path,
                                                                                              caplog):
    """A rank file never copied: `watch --once` exited 0 with nothing merged, and the loop logged "not complete yet"
    at every look for ever. Refused twice on files that did not change, the step is stuck: --once fails (exit 4),
    the loop says it once as a warning, and merges it once the file is there."""
    import logging

    from streammerge.cli import main

    run = tmp_path / "run"
    actor = add_step(run, 1, actors[0])
    rank_file = next(actor.glob("model_world_size_*_rank_1.pt"))
    kept = tmp_path / rank_file.name
    rank_file.rename(kept)
    with caplog.at_level(logging.INFO, logger="streammerge.hub.watch"):
        code = main(["watch", str(run), "--once", "--interval", "0.1", "--no-optimizer", "--out-root",
                     str(tmp_path / "o")])
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert code == 4 and len(said) == 1, said
    assert said[0].startswith("step 1: cannot be merged as saved (its files did not change between two looks): ") and \
        "missing model rank files for rank(s) 1" in said[0], said[0]
    assert not (tmp_path / "o").exists()

    watcher = Watcher(run, push=False, optimizer=False, max_shard_size=SHARD, out_root=tmp_path / "out",
                      state_file=tmp_path / "state.json")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="streammerge.hub.watch"):
        assert [watcher.poll() for _ in range(4)] == [[]] * 4
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    kept.rename(rank_file)
    assert watcher.poll() == []  # a change: looked at again, merged once two looks agree
    assert [(r.step, r.ok) for r in watcher.poll()] == [(1, True)]


def test_watch_says_the_merges_warnings(tmp_path, caplog):
    """The merge command prints its warnings (here: Megatron's optimizer state cannot be exported); watch merged and
    pushed without saying them."""
    import logging

    fixture = ROOT / "tests" / "data" / "megatron" / "llama_mlm_optim_pp2_dp2"
    run = tmp_path / "run"
    shutil.copytree(fixture, run, ignore=shutil.ignore_patterns("reference"))
    assert streammerge.merge(run, tmp_path / "merged").warnings  # what the merge command would print
    with caplog.at_level(logging.INFO, logger="streammerge.hub.watch"):
        results = Watcher(run, push=False, out_root=tmp_path / "out", state_file=tmp_path / "s.json").run(
            once=True, interval=0.1)
    assert [(r.step, r.ok) for r in results] == [(1, True)]
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("step 1: warning: optimizer not exported: ") for m in said), said


def _watch_first_step(run: Path, case: Path, tmp_path: Path, prefix: str = "") -> tuple[Watcher, list, bool]:
    """A merge-only watcher of `run`: its first look merges step 3 alone, whose weights are the case's reference
    (named there with `prefix`, a LightningModule's attribute). Returns the watcher, that look's results, and whether
    the merged file holds every weight of the reference (a tied one is left out of it)."""
    from safetensors.torch import load_file

    watcher = Watcher(run, push=False, model_name=str(case / "huggingface"), out_root=tmp_path / "out",
                      state_file=tmp_path / "state.json")
    results = watcher.run(once=True, interval=0.1)
    assert [(r.step, r.ok, r.out_dir.name) for r in results] == [(3, True, "global_step_3")], [r.error for r in results]
    got = load_file(tmp_path / "out" / "global_step_3" / "model.safetensors")
    ref = load_file(case / "reference" / "model.safetensors")
    assert got and all(got[k].equal(ref[prefix + k]) for k in got)
    return watcher, results, set(got) == {k.removeprefix(prefix) for k in ref}


def test_an_hf_trainer_run_is_watched_by_its_finished_checkpoint_folders(tmp_path):
    """The HF Trainer writes no tracker: its output_dir holds checkpoint-N/ folders, trainer_state.json the last file
    of each save. The watcher merges each finished one (it waited with nothing to follow), and not one whose save has
    not written trainer_state.json yet."""
    case = ROOT / "tests" / "data" / "accelerate" / "llama_fp32"
    run = tmp_path / "output_dir"
    shutil.copytree(case / "run", run)
    shutil.copytree(run / "checkpoint-3", run / "checkpoint-6", ignore=shutil.ignore_patterns("trainer_state.json"))
    watcher, _, every_weight = _watch_first_step(run, case, tmp_path)
    assert every_weight
    assert (tmp_path / "out" / "global_step_3" / "optimizer").is_dir()
    shutil.copy(run / "checkpoint-3" / "trainer_state.json", run / "checkpoint-6" / "trainer_state.json")
    results = watcher.run(once=True, interval=0.1)
    assert [(r.step, r.ok) for r in results] == [(6, True)], [r.error for r in results]
    assert set(watcher.done_steps()) == {3, 6}


def test_a_lightning_run_is_watched_by_its_sharded_ckpt_folders(tmp_path):
    """Lightning's ModelCheckpoint folder has no tracker either: each sharded save is a *.ckpt folder, finished once
    rank 0 wrote meta.pt into it, its step meta.pt's global_step. last.ckpt, a copy of the newest, is not merged a
    second time, and a folder whose meta.pt is not there yet is not merged."""
    import torch

    case = ROOT / "tests" / "data" / "lightning" / "qwen2_fsdp2_tied_bf16"
    run = tmp_path / "checkpoints"
    shutil.copytree(case / "run" / "checkpoints", run)
    shutil.copytree(run / "epoch=0-step=3.ckpt", run / "last.ckpt")
    watcher, results, _ = _watch_first_step(run, case, tmp_path, prefix="model.")
    assert "epoch=0-step=3.ckpt" in results[0].merge.plan.source.path.name
    later = run / "epoch=1-step=6.ckpt"
    shutil.copytree(run / "epoch=0-step=3.ckpt", later, ignore=shutil.ignore_patterns("meta.pt"))
    assert watcher.run(once=True, interval=0.1) == []
    torch.save({"epoch": 1, "global_step": 6, "pytorch-lightning_version": "2.6.6"}, later / "meta.pt")
    results = watcher.run(once=True, interval=0.1)
    assert [(r.step, r.ok) for r in results] == [(6, True)], [r.error for r in results]


def test_a_lightning_run_of_single_file_saves_is_watched(tmp_path):
    """Under DDP, Lightning's ModelCheckpoint writes each save as one file, epoch=E-step=N.ckpt (not atomically: the
    bytes go straight into it). One whose zip is not whole yet (cut short here) is not merged; once it is, it is.
    last.ckpt, a copy of the newest, is not merged a second time. Before, the watcher saw no step at all."""
    case = ROOT / "tests" / "data" / "lightning" / "llama_ddp_fp32"
    run = tmp_path / "checkpoints"
    shutil.copytree(case / "run" / "checkpoints", run)
    shutil.copy(run / "epoch=0-step=3.ckpt", run / "last.ckpt")
    watcher, results, every_weight = _watch_first_step(run, case, tmp_path, prefix="model.")
    assert every_weight and results[0].merge.plan.source.path.name == "epoch=0-step=3.ckpt"
    whole = (run / "epoch=0-step=3.ckpt").read_bytes()
    later = run / "epoch=1-step=6.ckpt"
    later.write_bytes(whole[:len(whole) // 2])  # being written
    assert watcher.run(once=True, interval=0.1) == []
    later.write_bytes(whole)
    results = watcher.run(once=True, interval=0.1)
    assert [(r.step, r.ok) for r in results] == [(6, True)], [r.error for r in results]
    assert set(watcher.done_steps()) == {3, 6}


def test_a_deepspeed_run_is_watched_by_its_latest_tag(tmp_path):
    """DeepSpeed's save folder names its newest complete step in `latest` (global_stepN, written once the ranks have
    saved): a step folder it does not name yet is not merged; once it does, it is. Before, the watcher waited for ever
    (it followed latest_checkpointed_iteration.txt alone, and global_stepN without the underscore was no step)."""
    case = ROOT / "tests" / "data" / "deepspeed" / "llama_zero1_bf16"
    run = tmp_path / "ckpts"
    shutil.copytree(case / "run", run)
    shutil.copytree(run / "global_step3", run / "global_step6")
    watcher, _, every_weight = _watch_first_step(run, case, tmp_path)
    assert every_weight
    (run / "latest").write_text("global_step6")
    results = watcher.run(once=True, interval=0.1)
    assert [(r.step, r.ok) for r in results] == [(6, True)], [r.error for r in results]
    assert set(watcher.done_steps()) == {3, 6}
