"""The output folder as a transaction: safe to start, resumable when stopped, never half-visible.

`OutputFolder` owns what a merge does to OUT beside writing tensor bytes: it refuses folders it could
damage (someone's files, the checkpoint itself, another merge's output), takes a lock so that two
merges never write one folder, keeps the manifest of finished files (resume, verify, push), removes
the temp files a killed run left, writes the small files, and makes the index appear last, only
once every file it names is in place. Under torchrun every rank holds one; part 0 does the folder's
setup and its end, and `sync` (a barrier) orders them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..checksum import crc32
from ..errors import OutputError
from .manifest import STATE_DIR, Manifest
from .writer import TMP_SUFFIX, OutputFile, output_error, tmp_path

LOCK_FILE = "lock"
MODEL_CARD = "README.md"

Sync = Callable[[], None]


class OutputFolder:
    """One merge's output folder. Use as a context manager; call `finish` once every data file is written."""

    def __init__(self, out: Path, *, fingerprint: str, source: Path, options: dict[str, Any],
                 data_files: Sequence[str], small_files: Sequence[str], index_files: Sequence[str],
                 all_data_files: Sequence[str] | None = None, part: int = 0, sync: Sync | None = None,
                 inputs: dict[str, list[int]] | None = None):
        self.out, self.fingerprint, self.source = out, fingerprint, source
        self.inputs = inputs or {}
        self.part, self.sync = part, sync
        self.data_files = list(data_files)  # this part's share
        self.small_files = list(small_files)  # part 0 writes these at the end
        self.index_files = list(index_files)  # written last, once everything else is there
        self.planned = {*(all_data_files if all_data_files is not None else data_files), *small_files, *index_files}
        self.manifest = Manifest(out, fingerprint, str(source), options, part=part, inputs=self.inputs)
        self.prior: dict[str, OutputFile | None] = {}
        self.removed: list[str] = []  # files of an earlier run this merge no longer writes
        self._lock_fd: int | None = None

    # ------------------------------------------------------------ start

    def __enter__(self) -> OutputFolder:
        if self.sync is not None and self.part != 0:
            self.sync()  # part 0 checks and sets up the folder first
        previous = self._check()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{self.out}: cannot create the output folder ({e.strerror or e})") from None
        if self.part == 0:
            self._lock()
        try:
            self.manifest.adopt(previous)
            self.prior = {rel: self.manifest.finished(self.out, rel) for rel in self.data_files}
            if self.part == 0 and None in self.prior.values():
                self._unpublish_indexes()  # an index means "complete": none until every file is back
            self.manifest.save()
            self._remove_temp_files(sweep=self.part == 0)  # left by a killed run (before the other parts start)
            if self.sync is not None and self.part == 0:
                self.sync()
        except BaseException:
            self._unlock()
            raise
        return self

    def _check(self) -> dict | None:
        """Refuse folders we could damage; return the manifest of a previous run of this same merge."""
        src, out = self.source.resolve(), self.out
        if out == src or src in out.parents:
            raise OutputError(f"{out}: the output folder is inside the checkpoint {src}; choose a folder outside it")
        if not out.exists():
            return None
        if not out.is_dir():
            raise OutputError(f"{out}: exists and is not a folder")
        previous = Manifest.read(out)
        if previous is None:
            # a run killed before its first manifest leaves only our state folder and temp files
            if any(p.name != STATE_DIR and not p.name.endswith(TMP_SUFFIX) for p in out.iterdir()):
                raise OutputError(f"{out}: folder is not empty and is not a streammerge output; "
                                  "choose an empty or new folder (nothing was changed)")
            return None
        if previous.get("fingerprint") != self.fingerprint:
            raise OutputError(f"{out}: holds a different merge (other checkpoint or options, or a streammerge "
                              "version that planned differently); choose a new folder, or delete this one to "
                              "start over")
        changed = Manifest.changed(previous.get("inputs") or {}, self.inputs)
        if changed:
            raise OutputError(f"{out}: holds a merge of the checkpoint as it was before {changed[0]} changed (its size "
                              "or modification time differs: saved again?); choose a new folder, or delete this one "
                              "to merge it again")
        return previous

    def _lock(self) -> None:
        """An exclusive lock on OUT/.streammerge/lock for the whole merge; says who holds it if taken."""
        import fcntl

        path = self.out / STATE_DIR / LOCK_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise output_error(e, path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"{self.out}: another streammerge is writing this folder ({holder}); wait for it "
                                  "to finish, or choose another folder") from None
            raise output_error(e, path) from None
        info = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _unpublish_indexes(self) -> None:
        for rel in self.index_files:
            if self.manifest.data["files"].pop(rel, None) is not None:
                (self.out / rel).unlink(missing_ok=True)

    # ------------------------------------------------------------ during

    def finished(self, rel: str) -> OutputFile | None:
        """The data file as an earlier run of this merge finished it, if it is still there unchanged."""
        return self.prior.get(rel)

    def add(self, f: OutputFile) -> None:
        self.manifest.add(f)

    # ------------------------------------------------------------ end

    def finish(self, contents: Callable[[str], bytes], done: Callable[[OutputFile], None]) -> None:
        """Every part has written its files: part 0 writes the small files, then the indexes, then marks complete."""
        if self.sync is not None:
            self.sync()
        if self.part != 0:
            return
        self.manifest.gather_parts()
        self._remove_unplanned()
        for rel in self.small_files:
            f = self.write_small(rel, contents(rel), rename=False)
            self.manifest.add(f, stat=False)  # listed before it appears: a run killed in between leaves none unlisted
            try:
                os.replace(tmp_path(self.out / rel), self.out / rel)
            except OSError as e:
                raise output_error(e, self.out / rel) from None
            self.manifest.add(f)
            done(f)
        staged = [self.write_small(rel, contents(rel), rename=False) for rel in self.index_files]
        # the manifest lists only files that are in place, and an index appears only in a complete folder
        self.manifest.complete()
        for f in staged:
            os.replace(tmp_path(self.out / f.filename), self.out / f.filename)
            self.manifest.add(f)
            done(f)

    def _remove_unplanned(self) -> None:
        """Files an earlier run of this merge wrote that this one does not (a chat template since removed from the
        checkpoint's huggingface/ folder): left in place, transformers would load them with the new ones. A model
        card a push generated stays: it is the push's, and no loader reads it."""
        for rel in sorted(set(self.manifest.data["files"]) - self.planned - {MODEL_CARD}):
            path = self.out / rel
            try:
                path.unlink(missing_ok=True)  # its temp copy, if a killed run left one, went with the others at start
            except OSError as e:
                raise output_error(e, path) from None
            del self.manifest.data["files"][rel]
            self.removed.append(rel)
        if self.removed:
            self.manifest.save()

    def write_small(self, rel: str, data: bytes, *, rename: bool = True) -> OutputFile:
        """A small file written whole, fsynced, under a temp name until it is complete."""
        path = self.out / rel
        tmp = tmp_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if rename:
                os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise output_error(e, path) from None
        return OutputFile(rel, len(data), crc32(data), hashlib.sha256(data).hexdigest())

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None:  # Ctrl-C, a full disk...: leave finished files and the manifest, no temp files
                self._remove_temp_files()
        finally:
            self._unlock()

    def _remove_temp_files(self, sweep: bool = False) -> None:
        """Remove the temp files this merge may have left (only our own names; never a user's file); `sweep`: every
        file with our temp suffix, also of a file this run no longer writes."""
        if sweep:
            ours = list(self.out.rglob("*" + TMP_SUFFIX))
        else:
            rels = self.data_files + (self.small_files + self.index_files if self.part == 0 else [])
            ours = [tmp_path(self.out / rel) for rel in rels]
        for path in ours:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        if self.part == 0:  # torchrun ranks > 0 keep their own part manifests; manifest.tmp is rank 0's
            with contextlib.suppress(OSError):
                (self.out / STATE_DIR / "manifest.tmp").unlink(missing_ok=True)


def index_bytes(index: dict) -> bytes:
    return (json.dumps(index, indent=2) + "\n").encode()
