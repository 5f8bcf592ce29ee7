"""Watch: a sidecar that merges (and pushes) each new checkpoint of a training run as it lands.

It follows the run's ``latest_checkpointed_iteration.txt`` (veRL, Megatron-LM) or DeepSpeed's ``latest`` tag
(``global_stepN``), or, where there is none, the
HF Trainer's ``checkpoint-N`` folders whose ``trainer_state.json`` is written (the Trainer's last file of a save),
Lightning's sharded ``*.ckpt`` folders once their ``meta.pt`` is (Lightning's last), and Lightning's single-file
``*.ckpt`` saves once the file is a whole zip (its directory, written last, is there). A
step is taken once every rank file is present and no file of its checkpoint folder changed size or mtime between
two looks, so a checkpoint still being written (or copied in from other nodes) is never merged half-way. Each
finished step is recorded in a small state file (``RUN_DIR/.streammerge-watch.json`` by default), written
atomically after each push, so a restarted watcher never pushes a step twice.

Meant for a login node: one process, no GPU, bounded memory (the merge streams).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
import zipfile
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import jsonfile
from ..errors import CheckpointError, ConfigError, StreammergeError
from ..options import MergeOptions
from ..paths import NotAFile, read_small, user_path
from ..pipeline import merge
from ..sources import LATEST_FILE, Source, open_checkpoint, read_tracker, step_number
from ..sources.dcp import LIGHTNING_STEP, is_lightning, lightning_step
from ..sources.deepspeed import tagged_step
from ..write.transaction import open_lock
from .publish import PushResult, check_push_counts, default_out_dir, merge_and_push
from .repo import check_target
from .retry import PushError

logger = logging.getLogger(__name__)

STATE_FILE = ".streammerge-watch.json"
STEP_BRANCH = "step-{step}"
MAX_SETTLE = 5.0  # with once=True, the two looks at a checkpoint are min(interval, this) apart
# merge_and_push options that merge() does not take
PUSH_OPTIONS = frozenset({"token", "endpoint", "model_card", "commit_message", "max_files_per_commit",
                          "upload_workers", "retry", "delete_stale"})

Snapshot = dict[str, tuple[int, int]]


# veRL's, DeepSpeed's (no underscore), Megatron-LM's, the HF Trainer's
STEP_DIR = re.compile(r"global_step_?(\d+)|iter_(\d{7,})|checkpoint-(\d+)")
# what the HF Trainer writes last into checkpoint-N (after the model, optimizer, scheduler and RNG states)
TRAINER_STATE = "trainer_state.json"


def step_dirs(run_dir: Path) -> Iterator[tuple[int, Path]]:
    """``(N, run_dir/global_step_N)`` (Megatron-LM: ``iter_NNNNNNN``, the HF Trainer: ``checkpoint-N``, Lightning:
    a sharded ``*.ckpt/`` folder with its meta.pt, of the step meta.pt or the name gives, or a single-file ``*.ckpt``
    whose name gives it) in step order. Lightning's ``last.ckpt`` is the step another save holds too: that one is
    taken."""
    found: dict[int, Path] = {}
    for p in sorted(run_dir.iterdir()):
        m = STEP_DIR.fullmatch(p.name)
        if m and p.is_dir():
            found[int(next(g for g in m.groups() if g is not None))] = p
        elif p.suffix == ".ckpt" and p.is_file():  # one torch.save of the whole checkpoint (DDP, one device)
            named = LIGHTNING_STEP.match(p.name)
            if named:
                found.setdefault(int(named.group(1)), p)
        elif p.suffix == ".ckpt" and p.is_dir() and is_lightning(p):
            named = LIGHTNING_STEP.match(p.name)
            step = lightning_step(p)
            step = int(named.group(1)) if step is None and named else step
            if step is not None and (step not in found or found[step].name == "last.ckpt"):
                found[step] = p
    return iter(sorted(found.items()))


def tracker(run_dir: Path) -> str | None:
    """The text of the trainer's tracker: veRL's and Megatron-LM's latest_checkpointed_iteration.txt, or the step of
    DeepSpeed's `latest` tag (global_stepN); None where there is none."""
    text = read_tracker(run_dir)
    if text is None:
        step = tagged_step(run_dir)
        text = None if step is None else str(step)
    return text


def latest_step(run_dir: Path) -> int | None:
    """The step named by the trainer's tracker file, None while there is none (or it is mid-write); where the run
    folder has no tracker (the HF Trainer's, Lightning's), its newest step whose save finished."""
    text = tracker(run_dir)
    return step_number(text) if text is not None else newest_finished(dict(step_dirs(run_dir)))


def finished(path: Path) -> bool:
    """A step folder of a run without a tracker whose save finished: the HF Trainer's checkpoint-N holds
    trainer_state.json, Lightning's .ckpt folder its meta.pt (rank 0 writes either once the rest is saved); a
    single-file .ckpt is a whole zip (torch.save writes its directory last)."""
    if path.is_file():
        return zipfile.is_zipfile(path)
    return (path / TRAINER_STATE).is_file() if path.name.startswith("checkpoint-") else is_lightning(path)


def newest_finished(dirs: Mapping[int, Path]) -> int | None:
    """The newest finished step of a run folder without a tracker (its `step_dirs`), or None."""
    return max((n for n, p in dirs.items() if finished(p)), default=None)


def snapshot(folder: Path) -> Snapshot:
    """Size and mtime of every file under ``folder`` (or of the one file it is): equal twice in a row means nobody is
    writing."""
    if folder.is_file():
        st = folder.stat()
        return {"": (st.st_size, st.st_mtime_ns)}
    out: Snapshot = {}
    for p in folder.rglob("*"):
        try:
            st = p.stat()
        except FileNotFoundError:  # renamed away between listing and stat: a writer is busy
            out[p.as_posix()] = (-1, -1)
            continue
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


class Watcher:
    """Merges, and with ``push`` pushes, every complete checkpoint of ``run_dir`` once.

    Args:
        run_dir: the trainer's checkpoint folder (holds ``global_step_N/`` or ``iter_NNNNNNN/`` and the tracker
            file, or the HF Trainer's ``checkpoint-N/``, or Lightning's sharded ``*.ckpt/``).
        push: push each merged step to ``repo_id`` (else only merge); default: push where a ``repo_id`` is given, as
            the CLI's ``watch --push --repo-id`` (``watch`` alone only merges).
        revision: branch for every push (default ``main``); ``revision_per_step`` pushes step N to
            branch ``step-N`` instead.
        only_latest: only the step the tracker names; older unpushed steps are skipped.
        out_root: merged folders go to ``out_root/global_step_N``; default: beside each actor folder
            (see :func:`streammerge.hub.publish.default_out_dir`).
        state_file: where pushed steps are recorded (default ``run_dir/.streammerge-watch.json``).
        options: the merge's :class:`MergeOptions`; keyword ``options`` are merge options applied over
            it (dtype, max_shard_size, optimizer, model_name, ...) or push options for
            :func:`streammerge.hub.publish.merge_and_push` (token, endpoint, commit_message, ...).
    """

    def __init__(self, run_dir: str | os.PathLike, *, push: bool | None = None, repo_id: str | None = None,
                 organization: str | None = None, private: bool | None = None, revision: str | None = None,
                 revision_per_step: bool = False, only_latest: bool = False, out_root: str | os.PathLike | None = None,
                 state_file: str | os.PathLike | None = None, options: MergeOptions | None = None, **kwargs: Any):
        self.run_dir = user_path(run_dir).resolve()
        push = bool(repo_id) if push is None else push
        if not self.run_dir.is_dir():
            raise CheckpointError(f"{self.run_dir}: no such run folder")
        if push and not repo_id:  # each step has its own output folder: none of them names the model
            raise ConfigError("watch --push needs --repo-id NAME (every step is pushed to that repo)")
        if revision and revision_per_step:
            raise ValueError("give either a revision (--revision) or revision_per_step (--revision-per-step), not both")
        if push:
            assert repo_id
            check_target(repo_id, organization, revision)  # a bad setting is refused now, not at every look
        self.push = push
        self.repo_id = repo_id
        self.organization = organization
        self.private = private
        self.revision = revision
        self.revision_per_step = revision_per_step
        self.only_latest = only_latest
        self.out_root = user_path(out_root).resolve() if out_root else None
        self.state_file = user_path(state_file) if state_file else self.run_dir / STATE_FILE
        self.push_options = {k: v for k, v in kwargs.items() if k in PUSH_OPTIONS}
        check_push_counts(**{k: v for k, v in self.push_options.items()
                             if k in ("max_files_per_commit", "upload_workers")})
        self.options = MergeOptions.create(options, **{k: v for k, v in kwargs.items() if k not in PUSH_OPTIONS})
        self._seen: dict[int, Snapshot] = {}
        self._told: set[str] = set()  # trackers already warned about: each is said once, not at every look
        # steps the last look could not open: their files then, and why (refused twice on the same files: stuck)
        self._refused: dict[int, tuple[Snapshot | None, str]] = {}
        self._stuck: dict[int, str] = {}

    # ---- state -----------------------------------------------------------------------------
    @property
    def target(self) -> str:
        """The key steps are recorded under: the repo (with its organization) and the branch they go to (none for
        main), or "merge-only". A step pushed to one branch is not pushed to another."""
        if not self.push:
            return "merge-only"
        assert self.repo_id is not None
        repo = f"{self.organization}/{self.repo_id}" if self.organization and "/" not in self.repo_id else self.repo_id
        if self.revision_per_step:
            return f"{repo}@<a branch per step>"
        return repo if self.revision in (None, "main") else f"{repo}@{self.revision}"

    def _read_state(self) -> dict:
        try:
            data = read_small(self.state_file)
        except NotAFile as e:
            raise StreammergeError(f"{e}, where the watcher keeps its state; remove it (the watcher then looks at "
                                   "every step again)") from None
        if data is None:
            return {"version": 1, "targets": {}}
        try:
            state = jsonfile.loads(data.decode())
        except ValueError:
            state = None
        if not (isinstance(state, dict) and isinstance(state.setdefault("targets", {}), dict)
                and all(isinstance(v, dict) for v in state["targets"].values())):
            raise StreammergeError(f"{self.state_file}: unreadable watch state; fix or delete it "
                                   "(deleting it makes the watcher look at every step again)")
        return state

    def done_steps(self) -> dict[int, dict]:
        """Steps already merged/pushed for this target, with what was recorded for each."""
        entries = self._read_state()["targets"].get(self.target, {})
        return {int(k): v for k, v in entries.items()}

    def _record(self, step: int, entry: dict) -> None:
        with self._state_locked():
            state = self._read_state()  # re-read: another watcher of the same run may have recorded too
            state["targets"].setdefault(self.target, {})[str(step)] = entry
            tmp = self.state_file.with_name(self.state_file.name + ".tmp")
            tmp.unlink(missing_ok=True)  # a link there (the run folder is the trainer's) would be written through
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644), "w") as fh:
                fh.write(json.dumps(state, indent=1, sort_keys=True))
            os.replace(tmp, self.state_file)

    @contextlib.contextmanager
    def _state_locked(self) -> Iterator[None]:
        """Watchers of one run (a branch each, or main and a branch per step) record in one state file: each
        read-modify-write holds this lock, or one would write back the state it read before the other's record (that
        step pushed again), rename the other's temp file away (the watcher dies) or mix both in it."""
        import fcntl

        fd = open_lock(self.state_file.with_name(self.state_file.name + ".lock"))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    # ---- one look --------------------------------------------------------------------------
    def candidates(self) -> list[tuple[int, Path]]:
        """Steps to process, oldest first: not done yet, and not newer than the tracker's step (where there is no
        tracker, the newest finished step: the HF Trainer's checkpoint-N, Lightning's .ckpt folders)."""
        text = tracker(self.run_dir)
        dirs = dict(step_dirs(self.run_dir))  # listed once a look: Lightning's folders each read their meta.pt
        latest = step_number(text) if text is not None else newest_finished(dirs)
        if latest is None:
            if text:  # empty: mid-write, no word
                self._tell(text, f"{self.run_dir / LATEST_FILE} holds {text[:40]!r}, not a step number: watch "
                                 "follows numbered steps (global_step_N/, iter_NNNNNNN/) only (Megatron-LM writes "
                                 "'release' for a converted checkpoint); waiting")
            return []
        if latest not in dirs:
            self._tell(f"step {latest}", f"{self.run_dir / LATEST_FILE} names step {latest}, but {self.run_dir} has "
                       f"neither global_step_{latest}/ nor iter_{latest:07d}/; waiting for it")
        done = self.done_steps()
        if self.only_latest:
            path = dirs.get(latest)
            return [(latest, path)] if latest not in done and path is not None else []
        steps = [(n, p) for n, p in sorted(dirs.items()) if n <= latest and n not in done]
        if text is None:  # the HF Trainer's, Lightning's: a step folder whose save did not finish is not one yet
            steps = [(n, p) for n, p in steps if finished(p)]
        return steps

    def _tell(self, key: str, message: str) -> None:
        if key not in self._told:
            self._told.add(key)
            logger.warning("%s", message)

    def ready(self, step: int, path: Path) -> Source | None:
        """The checkpoint when it is complete and did not change since the last look, else None."""
        try:
            ck = open_checkpoint(path)
            missing = getattr(ck, "missing_optim_ranks", ())
            now = snapshot(ck.path)
        except (CheckpointError, OSError) as e:  # OSError: the trainer removed it while we looked (max_ckpt_to_keep)
            self._seen.pop(step, None)
            self._note_refused(step, path, e)
            return None
        self._refused.pop(step, None)
        self._stuck.pop(step, None)
        if missing and self.options.optimizer:
            logger.info("step %d: waiting for optimizer rank files %s", step, list(missing))
            self._seen.pop(step, None)
            return None
        before, self._seen[step] = self._seen.get(step), now
        if before != now:
            if before is not None:
                logger.info("step %d: files still changing; looking again later", step)
            return None
        # the merge must end with the files as these looks found them: one saved again since then is not merged
        ck.seen = {(ck.path / rel).as_posix(): list(st) for rel, st in now.items()}
        return ck

    def _note_refused(self, step: int, path: Path, e: Exception) -> None:
        """A step being saved is refused until it is complete; one refused twice for the same reason while its files
        stay as they were is not being saved: it needs the user (rank files never copied, a damaged file)."""
        try:
            files = snapshot(path) if isinstance(e, CheckpointError) and path.exists() else None
        except OSError:
            files = None
        before, self._refused[step] = self._refused.get(step), (files, str(e))
        if files is not None and before == (files, str(e)):
            self._stuck[step] = str(e)
            self._tell(f"stuck {step} {e}", f"step {step}: cannot be merged as saved (its files did not change "
                                             f"between two looks): {e}")
        else:
            self._stuck.pop(step, None)
            logger.info("step %d: not complete yet, or removed (%s)", step, e)

    def poll(self) -> list[PushResult]:
        """Look once; merge (and push) each step that is ready. Failures are logged and retried later."""
        results = []
        for step, path in self.candidates():
            ck = self.ready(step, path)
            if ck is not None:
                results.append(self.process(step, ck))
        return results

    def superseded(self, step: int) -> int | None:
        """A newer step already pushed to the one branch every step goes to: pushing this one after it would
        leave the branch holding older weights than the newest checkpoint's."""
        if not self.push or self.revision_per_step:
            return None
        newer = [s for s, entry in self.done_steps().items() if s > step and "superseded_by" not in entry]
        return max(newer) if newer else None

    def process(self, step: int, ck: Source) -> PushResult:
        """Merge and push one step, and record it when that worked."""
        out = self.out_root / f"global_step_{step}" if self.out_root else default_out_dir(ck)
        newer = self.superseded(step)
        if newer is not None:
            note = f"step {step}: not pushed, step {newer} is already on {self.revision or 'main'}"
            logger.warning("%s", note)
            self._seen.pop(step, None)
            self._record(step, {"superseded_by": newer, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            return PushResult(ok=False, step=step, out_dir=out, error=note, error_kind="superseded")
        try:
            if self.push:
                assert self.repo_id is not None
                revision = STEP_BRANCH.format(step=step) if self.revision_per_step else self.revision
                logger.info("step %d: merging into %s and pushing to %s%s", step, out, self.target,
                            f" (branch {revision})" if revision else "")
                result = merge_and_push(ck, out, self.repo_id, organization=self.organization, private=self.private,
                                        revision=revision, options=self.options, **self.push_options)
            else:
                logger.info("step %d: merging into %s", step, out)
                t0 = time.perf_counter()
                merged = merge(ck, out, self.options)
                result = PushResult(ok=True, out_dir=merged.out_dir, step=step, merge=merged,
                                    seconds=time.perf_counter() - t0, note=merged.summary())
        except Exception as e:  # a sidecar outlives one bad step: log, look again later
            kind = e.kind if isinstance(e, PushError) else type(e).__name__
            expected = isinstance(e, (PushError, StreammergeError, OSError, ValueError))
            logger.error("step %d: failed (%s), will try again at the next look: %s", step, kind, e,
                         exc_info=not expected)
            return PushResult(ok=False, step=step, out_dir=out, error=str(e), error_kind=kind)
        result.step = step
        self._seen.pop(step, None)
        for w in result.merge.warnings if result.merge is not None else ():  # as the merge command says them
            logger.warning("step %d: warning: %s", step, w)
        self._record(step, {"revision": result.revision, "commit": result.commit_oid, "out_dir": str(result.out_dir),
                            "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        logger.info("step %d: %s", step, result.summary())
        return result

    # ---- the loop --------------------------------------------------------------------------
    def run(self, *, interval: float = 60.0, once: bool = False,
            stop: threading.Event | None = None) -> list[PushResult]:
        """Poll every ``interval`` seconds until ``stop`` is set (or, with ``once``, process what is there).

        ``once`` looks twice, ``min(interval, 5 s)`` apart, to see which checkpoints are complete,
        processes them and returns.
        """
        if not 0 < interval < 10**9:  # 0 s or less would look without pause; inf overflows the wait's timer
            raise ValueError(f"interval {interval!r} (--interval): give the seconds between looks, more than 0")
        stop = stop or threading.Event()
        results: list[PushResult] = []
        if once:
            results += self.poll()  # steps this watcher already looked at may be ready now
            if not (self._seen.keys() | self._refused.keys()) - {r.step for r in results}:
                return results
            time.sleep(min(interval, MAX_SETTLE))
            results += self.poll()
            # what is there cannot be merged as it is: a failed step, not one to look at again later
            done = {r.step for r in results}
            return results + [PushResult(ok=False, step=step, error=why, error_kind="CheckpointError")
                              for step, why in sorted(self._stuck.items()) if step not in done]
        logger.info("watching %s every %g s (state in %s)", self.run_dir, interval, self.state_file)
        while not stop.is_set():
            results += self.poll()
            stop.wait(interval)
        return results


def watch(run_dir: str | os.PathLike, *, interval: float = 60.0, once: bool = False,
          stop: threading.Event | None = None, **options: Any) -> list[PushResult]:
    """Run a :class:`Watcher` (``options`` are its arguments); see :meth:`Watcher.run`."""
    return Watcher(run_dir, **options).run(interval=interval, once=once, stop=stop)


__all__ = ["STATE_FILE", "Watcher", "latest_step", "snapshot", "step_dirs", "watch"]
