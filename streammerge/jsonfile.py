"""JSON from files a checkpoint or an earlier run left: malformed input is a ValueError, whatever the malformation."""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes, **kwargs: Any) -> Any:
    """json.loads, with JSON nested past Python's recursion limit raised as ValueError like any other bad JSON
    (callers turn ValueError into a one-line error naming the file)."""
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise ValueError("JSON nested past Python's recursion limit") from None
