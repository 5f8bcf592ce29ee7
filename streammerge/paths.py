"""Paths a user typed: `~` expanded where it can be."""

from __future__ import annotations

import os
from pathlib import Path


def user_path(path: str | os.PathLike[str]) -> Path:
    """`path` with `~` or `~user` expanded; as typed where that user has no home here (a path from the training
    machine), so the caller's own "no such folder" error names it instead of pathlib's RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)
