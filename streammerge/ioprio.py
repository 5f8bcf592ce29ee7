"""Linux I/O priorities, for the one time a merge might let another process at the disk first.

A model's first merge on a machine asks transformers, in a child process, which tensors config.json describes
(architecture.py). From a cold page cache that child's import reads hundreds of MB of libraries in small
synchronous reads, queued behind the reads the merge keeps ahead of itself; where the merge is shorter than the
child, the merge then waits for it. With STREAMMERGE_ARCH_IO=idle every thread of the process stands in the idle
I/O class while the child imports, which an I/O scheduler that knows priorities (mq-deadline, bfq) serves only when
nothing else waits; one that knows none (`none`, common on NVMe) ignores it. It is opt-in: where it was measured
(benchmarks/README.md, "What the architecture check costs") the child waited as long either way (its reads probably
wait in the disk's own queue, which priorities do not reach).

Python has no ioprio_set, and psutil's `ionice` sets one task, not every thread of a process: a system call
through ctypes, on the architectures whose call numbers are below.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

CLASS_SHIFT = 13
CLASS_RT, CLASS_BE, CLASS_IDLE = 1, 2, 3
IDLE = CLASS_IDLE << CLASS_SHIFT
_WHO_PROCESS = 1  # with a thread id: that thread alone
_CALLS = {"x86_64": (251, 252), "aarch64": (30, 31)}  # (ioprio_set, ioprio_get)


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.machine() not in _CALLS:
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def get(tid: int) -> int | None:
    """The I/O priority of thread `tid` (0: none set, it follows the CPU nice value), or None where unknown."""
    if _LIBC is None:
        return None
    value = _LIBC.syscall(_CALLS[platform.machine()][1], _WHO_PROCESS, tid)
    return None if value < 0 else int(value)


def put(tid: int, value: int) -> str | None:
    """Set thread `tid`'s I/O priority: None, or why it could not be set."""
    if _LIBC is None:
        return "no ioprio_set on this platform"
    if _LIBC.syscall(_CALLS[platform.machine()][0], _WHO_PROCESS, tid, value) < 0:
        return os.strerror(ctypes.get_errno())
    return None


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [threading.get_native_id()]


class Yield:
    """Every thread of this process in the idle I/O class from `start()` to `end()`, then each back where it was.

    Threads started meanwhile inherit the idle class from the thread that started them; `end()` gives them the
    priority this process's main thread had."""

    def __init__(self) -> None:
        self._saved: dict[int, int] = {}
        self._lock = threading.Lock()
        self.active = False

    def start(self) -> str | None:
        """None, or why this process could not step aside (the merge then goes on at its own priority)."""
        if _LIBC is None:
            return "no ioprio_set on this platform"
        with self._lock:
            for tid in _threads():
                was = get(tid)
                if was is None:
                    continue
                why = put(tid, IDLE)
                if why is None:
                    self._saved[tid] = was
                    self.active = True
                elif tid == os.getpid():
                    self._end()
                    return why
            return None if self.active else "ioprio_get failed"

    def end(self) -> None:
        with self._lock:
            self._end()

    def _end(self) -> None:
        if not self.active:
            return
        main = self._saved.get(os.getpid(), 0)
        for tid in _threads():
            was = self._saved.get(tid)
            if was is not None or get(tid) == IDLE:
                put(tid, main if was is None else was)
        self._saved.clear()
        self.active = False
