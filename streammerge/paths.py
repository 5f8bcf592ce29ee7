"""Paths a user typed: `~` expanded where it can be; small files read without waiting on a pipe; every file of a
folder, links to folders followed."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path


class NotAFile(ValueError):
    """A pipe, a device or a folder where a small file was expected."""


def read_small(path: Path) -> bytes | None:
    """The bytes of the regular file `path`, None where there is none. Anything else there raises NotAFile, never
    read: opening or reading a pipe waits for a writer (for ever, where none comes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise NotAFile(f"{path}: not a file (a pipe, a device or a folder)") from None
    with open(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotAFile(f"{path}: not a file (a pipe, a device or a folder)")
        return fh.read()


def user_path(path: str | os.PathLike[str]) -> Path:
    """`path` with `~` or `~user` expanded; as typed where that user has no home here (a path from the training
    machine), so the caller's own "no such folder" error names it instead of pathlib's RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def walk(root: Path) -> Iterator[Path]:
    """Every entry under `root` (files, folders, links), as seen from `root`, folders that are links entered too (but
    not one inside itself). Path.rglob (before Python 3.13) does not enter them, so a file a loader reads through a
    linked folder (optimizer/, lora_adapter/) would be left out of a check or an upload."""

    def visit(folder: Path, above: frozenset[tuple[int, int]]) -> Iterator[Path]:
        try:
            st = os.stat(folder)
            names = sorted(os.listdir(folder))
        except OSError:
            return
        if (st.st_dev, st.st_ino) in above:  # a link back up the tree
            return
        above = above | {(st.st_dev, st.st_ino)}
        for name in names:
            path = folder / name
            yield path
            if path.is_dir():
                yield from visit(path, above)

    yield from visit(root, frozenset())
