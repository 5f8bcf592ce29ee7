"""The output folder as a transaction: safe to start, resumable when stopped, never half-visible.

`OutputFolder` owns what a merge does to OUT beside writing tensor bytes: it refuses folders it could
damage (someone's files, the checkpoint itself, another merge's output) or that hold a file a loader
would read beside ours, takes a lock so that two merges never write one folder, keeps the manifest of
finished files (resume, verify, push), removes the temp files a killed run left, writes the small
files, and makes the folder loadable last: `config.json` (and an adapter's `adapter_config.json`) and
then the index appear only once every other file is in place, and go first when a rerun changes
anything. A folder that loads is one merge's, whole; the manifest says complete before that and is not
written again while it loads (a kill leaves no `manifest.tmp` in a complete folder). Under torchrun every
rank holds one; part 0 does the folder's setup and its end, and `sync` (a barrier) orders them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..checksum import crc32
from ..errors import OutputError
from ..paths import walk
from .manifest import MANIFEST, STATE_DIR, Manifest
from .writer import TMP_SUFFIX, OutputFile, output_error, tmp_path

LOCK_FILE = "lock"
MODEL_CARD = "README.md"
# What makes a folder load (transformers: config.json; peft: adapter_config.json), written after the other small
# files and before the indexes, removed first when a rerun changes the folder.
LOADS_AS_MODEL = ("config.json", "adapter_config.json")
# files transformers, a tokenizer or peft may read from a model folder (weights, configs, vocabularies, templates, code;
# .spm: Marian's sentencepiece models), and any tokenizer* file (mistral-common's tokenizer.model.v3)
LOADED_SUFFIXES = {".json", ".jinja", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".py", ".tiktoken",
                   ".msgpack", ".h5", ".gguf", ".ckpt", ".spm"}


def foreign_loaded_files(out: Path, ours: set[str]) -> list[str]:
    """Files of ``out`` (relative, sorted) a loader may read that are not in ``ours``: hidden files and folders, our
    temp files and a push's model card are no loader's."""
    found = []
    for path in walk(out):
        rel = path.relative_to(out)
        if ((path.suffix in LOADED_SUFFIXES or path.name.startswith("tokenizer")) and rel.as_posix() not in ours
                and rel.as_posix() != MODEL_CARD and not path.name.endswith(TMP_SUFFIX)
                and not any(part.startswith(".") for part in rel.parts) and path.is_file()):
            found.append(rel.as_posix())
    return sorted(found)

Sync = Callable[[], None]


def open_lock(path: Path) -> int:
    """A read-write fd on the lock file `path` (created if missing), to flock. Lock files lie in folders others
    write too (a run folder is the trainer's): a link there is refused, not followed to create or open a file
    elsewhere, and so is anything but a regular file (a pipe, a device, a folder)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{path}: a link, where streammerge keeps its lock file (it follows no link there); "
                              "remove the link and rerun") from None
        if e.errno != errno.EISDIR:
            raise output_error(e, path) from None
    else:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
    raise OutputError(f"{path}: not a file (a pipe, a device or a folder), where streammerge keeps its lock file; "
                      "remove it and rerun")


def check_out_dir(out: Path, source: Path) -> dict | None:
    """The refusals of an output folder that need no plan: inside the checkpoint, not a folder, holding files but no
    streammerge manifest. Returns OUT's manifest (None where it has none), which `OutputFolder` compares with the
    plan. A merge calls this before planning too: planning takes seconds (naming optimizer state imports torch)."""
    src = source.resolve()
    if out == src or src in out.parents:
        raise OutputError(f"{out}: the output folder is inside the checkpoint {src}; choose a folder outside it")
    if not out.exists():
        return None
    if not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    previous = Manifest.read(out)
    # a run killed before its first manifest leaves only our state folder and temp files
    if previous is None and any(p.name != STATE_DIR and not p.name.endswith(TMP_SUFFIX) for p in out.iterdir()):
        raise OutputError(f"{out}: folder is not empty and is not a streammerge output; "
                          "choose an empty or new folder (nothing was changed)")
    return previous


class OutputFolder:
    """One merge's output folder. Use as a context manager; call `finish` once every data file is written."""

    def __init__(self, out: Path, *, fingerprint: str, source: Path, options: dict[str, Any],
                 data_files: Sequence[str], small_files: Sequence[str], index_files: Sequence[str],
                 all_data_files: Sequence[str] | None = None, part: int = 0, sync: Sync | None = None,
                 inputs: dict[str, list[int]] | None = None, drop_card: bool = False):
        self.out, self.fingerprint, self.source = out, fingerprint, source
        self.drop_card = drop_card  # a push without a card: an earlier push's card, as it wrote it, goes too
        self.inputs = inputs or {}
        self.part, self.sync = part, sync
        self.data_files = list(data_files)  # this part's share
        self.small_files = list(small_files)  # part 0 writes these at the end
        self.index_files = list(index_files)  # written last, once everything else is there
        self.all_data_files = list(all_data_files if all_data_files is not None else data_files)  # every part's
        self.planned = {*self.all_data_files, *small_files, *index_files}
        self.manifest = Manifest(out, fingerprint, str(source), options, part=part, inputs=self.inputs)
        self.prior: dict[str, OutputFile | None] = {}
        self.removed: list[str] = []  # files of an earlier run this merge no longer writes
        self.kept: list[str] = []  # small files an earlier run wrote as this one would: left as they were
        self._lock_fd: int | None = None
        self._fresh = self._new = False  # set on entering: no earlier run's files here / the folder made by this run

    # ------------------------------------------------------------ start

    def __enter__(self) -> OutputFolder:
        if self.sync is not None and self.part != 0:
            self.sync()  # part 0 checks and sets up the folder first
        previous = self._check()
        new = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{self.out}: cannot create the output folder ({e.strerror or e})") from None
        if self.part == 0:
            self._lock()
        try:
            if self.part == 0:
                # again, holding the lock: a merge with other options that finished here since the first look would
                # otherwise be taken down and replaced, and both would exit 0
                previous = self._check()
            self._fresh = previous is None  # what abandon() may take away: a folder this run started
            self._new = new and self._fresh
            self.manifest.adopt(previous)
            self.prior = {rel: self.manifest.finished(self.out, rel) for rel in self.data_files}
            if self.part != 0:
                self.manifest.save()
            elif None in self.prior.values() or any(self.manifest.finished(self.out, rel) is None
                                                    for rel in self.all_data_files if rel not in self.prior):
                self._unpublish()  # a folder that loads is complete: it does not load until every file is back
            elif not self.manifest.data["complete"] or self.manifest.refreshed:
                self.manifest.save()  # else it loads as it is, and nothing is written while it does (but files
                # checked by checksum, copied without their mtimes, are recorded so, not read again every run)
            self._remove_temp_files(sweep=self.part == 0)  # left by a killed run (before the other parts start)
            if self.sync is not None and self.part == 0:
                self.sync()
        except BaseException:
            self._unlock()
            raise
        return self

    def _check(self) -> dict | None:
        """Refuse folders we could damage; return the manifest of a previous run of this same merge."""
        out = self.out
        previous = check_out_dir(out, self.source)
        if out.exists():
            self._check_links(previous)
        if previous is None:
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
        foreign = self.foreign_files(previous)
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise OutputError(f"{out / foreign[0]}: not written by this merge{more}, and transformers, a tokenizer or "
                              "peft may read it with the merged files (a folder that loads someone else's file beside "
                              "ours is not the trained model); move it away, or merge into a new folder (nothing was "
                              "changed)")
        return previous

    def _check_links(self, previous: dict | None) -> None:
        """Refuse a folder where what the merge writes or removes lies in a subfolder that links out of it (an
        `optimizer/` or `.streammerge/` that is a link to another folder): the merge would change files there."""
        root = self.out.resolve()
        listed = set((previous or {}).get("files") or {})
        for folder in sorted({(self.out / rel).parent for rel in self.planned | listed | {f"{STATE_DIR}/{MANIFEST}"}}):
            target = folder.resolve()
            if target != root and root not in target.parents:
                raise OutputError(f"{folder}: links out of the output folder (to {target}), and the merge writes and "
                                  "removes files in it; replace the link with a folder, or merge into a new folder "
                                  "(nothing was changed)")

    def foreign_files(self, previous: dict) -> list[str]:
        """Files a loader may read that neither this merge writes nor an earlier run of it listed: a model.safetensors
        beside our shards, someone's adapter_config.json or tokenizer file."""
        return foreign_loaded_files(self.out, self.planned | set(previous.get("files") or {}))

    def _lock(self) -> None:
        """An exclusive lock on OUT/.streammerge/lock for the whole merge; says who holds it if taken."""
        import fcntl

        path = self.out / STATE_DIR / LOCK_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise output_error(e, path) from None
        fd = open_lock(path)
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
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        except OSError as e:  # a disk already full
            os.close(fd)
            raise output_error(e, path) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _loaders(self) -> list[str]:
        """The files that make the folder load, in the order they appear: config.json (an adapter's config), then
        the indexes."""
        return [rel for rel in self.small_files if Path(rel).name in LOADS_AS_MODEL] + self.index_files

    def _unpublish(self) -> None:
        """Take the folder down before it changes: the indexes, then config.json (the adapter's config) leave the
        folder, then the manifest stops saying complete. A kill in between leaves a folder that does not load,
        never one that loads a mix of two runs."""
        files = self.manifest.data["files"]
        loaders = self._loaders()[::-1]  # the order they appear, reversed
        for rel in loaders:
            path = self.out / rel
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise output_error(e, path) from None
        for rel in loaders:
            files.pop(rel, None)
        self.manifest.data["complete"] = False
        self.manifest.save()

    # ------------------------------------------------------------ during

    def finished(self, rel: str) -> OutputFile | None:
        """The data file as an earlier run of this merge finished it, if it is still there unchanged."""
        return self.prior.get(rel)

    def add(self, f: OutputFile) -> None:
        self.manifest.add(f)

    def abandon(self) -> None:
        """Undo a merge refused after it began writing (transformers found config.json is not these weights): a
        rerun with the right config is another merge, which a folder holding this one's files would refuse. Only a
        folder this run started, in one process; a resumed or shared one keeps its files."""
        if not self._fresh or self.sync is not None:
            return
        state = self.out / STATE_DIR
        rels = [*self.data_files, *(f"{STATE_DIR}/{name}" for name in (MANIFEST, "manifest.tmp", LOCK_FILE))]
        for rel in rels:
            with contextlib.suppress(OSError):
                (self.out / rel).unlink(missing_ok=True)
                tmp_path(self.out / rel).unlink(missing_ok=True)
        folders = sorted({(self.out / rel).parent for rel in self.data_files} | {state}, key=lambda f: -len(f.parts))
        for folder in [*folders, *([self.out] if self._new else [])]:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only where nothing else is left

    # ------------------------------------------------------------ end

    def finish(self, contents: Callable[[str], bytes], done: Callable[[OutputFile], None]) -> None:
        """Every part has written its files: part 0 writes the small files, then config.json, then the indexes.

        A rerun whose small files are all as an earlier run left them in a complete folder changes nothing (not even
        the manifest). Otherwise the folder is taken down first (`_unpublish`); the manifest lists each small file
        before it appears (a run killed in between leaves none unlisted), and says complete, listing config.json and
        the indexes, before they appear, so that nothing is written after the folder loads."""
        if self.sync is not None:
            self.sync()
        if self.part != 0:
            return
        # the parts' manifests go only once this one, saved, lists their files: a failure before (a full disk writing
        # the small files) must not leave their finished files listed nowhere, for the rerun to write them again
        self.manifest.gather_parts()
        if self.sync is not None:
            self._check_parts()
        loaders = self._loaders()
        others = [rel for rel in self.small_files if rel not in loaders]
        data = {rel: contents(rel) for rel in others + loaders}  # small: all made before the folder changes
        kept = {rel: f for rel in data if (f := self._as_written(rel, data[rel])) is not None}
        stale = self._unplanned()
        if self.manifest.data["complete"] and not stale and len(kept) == len(data):
            self.manifest.remove_parts()  # a complete manifest lists every file: it is not written again
            self.kept = list(data)
            for rel in data:
                done(kept[rel])
            return
        if self.manifest.data["complete"]:
            self._unpublish()
        else:
            self.manifest.save()
        self.manifest.remove_parts()
        self._remove_unplanned()
        for rel in others:
            f = self.write_small(rel, data[rel], rename=False)
            self.manifest.add(f, stat=False)  # listed before it appears: a run killed in between leaves none unlisted
            self._rename(rel)
            self.manifest.add(f)
            done(f)
        staged = [self.write_small(rel, data[rel], rename=False) for rel in loaders]
        for f in staged:
            self.manifest.add(f, stat=False, save=False)
        self.manifest.complete()  # the last write of the manifest: from here on the folder loads
        for f in staged:
            self._rename(f.filename)
            done(f)

    def _check_parts(self) -> None:
        """Before anything says complete: every other writer's files are here as it wrote them. Hosts that write to
        folders of their own (no shared file system) would leave an index naming files this folder lacks."""
        mine = set(self.data_files)
        missing = [rel for rel in self.all_data_files
                   if rel not in mine and self.manifest.finished(self.out, rel) is None]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise OutputError(f"{self.out / missing[0]}{more}: another host's writer finished it, but it is not in "
                              "this folder as that writer listed it: the output folder must be on a file system every "
                              "host shares (on clusters without one, merge in one process); nothing was published")

    def _as_written(self, rel: str, data: bytes) -> OutputFile | None:
        """The small file as an earlier run of this merge wrote it, if it holds `data`."""
        entry = self.manifest.data["files"].get(rel)
        if entry is None or entry.get("size") != len(data) or entry.get("crc32") != crc32(data):
            return None
        if self.manifest.finished(self.out, rel) is None:
            return None
        return OutputFile(rel, len(data), entry["crc32"], hashlib.sha256(data).hexdigest())

    def _rename(self, rel: str) -> None:
        try:
            os.replace(tmp_path(self.out / rel), self.out / rel)
        except OSError as e:
            raise output_error(e, self.out / rel) from None

    def _unplanned(self) -> set[str]:
        """Files an earlier run of this merge wrote that this one does not. A model card a push generated stays: it
        is the push's, and no loader reads it; except under a push without a card (whose commit deletes the Hub's
        copy), where it goes too, unless edited since it was written."""
        card = self.drop_card and self.manifest.finished(self.out, MODEL_CARD) is not None
        return set(self.manifest.data["files"]) - self.planned - (set() if card else {MODEL_CARD})

    def _remove_unplanned(self) -> None:
        """Files an earlier run of this merge wrote that this one does not (a chat template since removed from the
        checkpoint's huggingface/ folder): left in place, transformers would load them with the new ones."""
        for rel in sorted(self._unplanned()):
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
