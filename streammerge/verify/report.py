"""What verify found: every step adds its problems (failures) and what it did not check (notes) to one report.
Problems with the output are collected, never raised; `ok` is whether there are none."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class VerifyReport:
    """What verify checked and every problem it found; `ok` only when there are none."""

    out_dir: Path
    checkpoint: Path | None = None
    files_checked: set[str] = field(default_factory=set)  # relative paths
    tensors_checked: int = 0  # tensors compared with the checkpoint
    bytes_read: int = 0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why
    _counting: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def count(self, *, tensors: int = 0, read: int = 0) -> None:
        """Tensors compared and bytes read, from the comparing threads at once (a bare `+=` would lose some)."""
        with self._counting:
            self.tensors_checked += tensors
            self.bytes_read += read

    def __repr__(self) -> str:
        return (f"VerifyReport({str(self.out_dir)!r}, ok={self.ok}, files={len(self.files_checked)}, "
                f"tensors={self.tensors_checked}, failures={len(self.failures)})")

    def summary(self) -> str:
        against = f", {self.tensors_checked} tensors compared with {self.checkpoint}" if self.checkpoint else ""
        head = (f"verify {self.out_dir}: {'OK' if self.ok else f'{len(self.failures)} problem(s)'} "
                f"({len(self.files_checked)} files checked{against})")
        return "\n".join([head] + [f"  note: {m}" for m in self.notes] + [f"  FAIL {m}" for m in self.failures])
