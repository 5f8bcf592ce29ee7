"""Paths a user typed: `~` expanded where it can be; small files read without waiting on a pipe."""

from __future__ import annotations

import os
import stat
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
