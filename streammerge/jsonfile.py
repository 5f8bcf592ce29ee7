"""JSON from files a checkpoint or an earlier run left: malformed input is a ValueError, whatever the malformation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CheckpointError


def loads(text: str | bytes, **kwargs: Any) -> Any:
    """json.loads, with JSON nested past Python's recursion limit raised as ValueError like any other bad JSON
    (callers turn ValueError into a one-line error naming the file)."""
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise ValueError("JSON nested past Python's recursion limit") from None


def read_object(path: Path, **kwargs: Any) -> dict:
    """The JSON object in `path`, or a one-line CheckpointError naming the file."""
    try:
        value = loads(path.read_text(), **kwargs)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
