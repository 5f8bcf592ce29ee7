"""The I/O priority a merge gives up while the architecture check's child imports transformers, and takes back."""

import platform
import threading

import pytest

from streammerge import ioprio

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"),
                                reason="ioprio_set is Linux's, called by number on these architectures")


def _thread(prio: int | None = None) -> tuple[threading.Thread, threading.Event, dict]:
    """A thread that sets `prio` on itself (if given), then reports its priority when the event is set."""
    seen: dict = {}
    ready, go = threading.Event(), threading.Event()

    def body() -> None:
        if prio is not None:
            assert ioprio.put(0, prio) is None
        seen["start"] = ioprio.get(0)
        ready.set()
        go.wait()
        seen["end"] = ioprio.get(0)

    t = threading.Thread(target=body)
    t.start()
    ready.wait()
    return t, go, seen


def test_every_thread_steps_aside_and_each_gets_its_own_priority_back():
    before = ioprio.get(0)
    assert before != ioprio.IDLE
    best_effort_7 = (ioprio.CLASS_BE << ioprio.CLASS_SHIFT) | 7
    own, own_go, own_seen = _thread(best_effort_7)  # a thread with a priority of its own
    y = ioprio.Yield()
    try:
        assert y.start() is None
        assert {ioprio.get(tid) for tid in ioprio._threads()} == {ioprio.IDLE}
        late, late_go, late_seen = _thread()  # started meanwhile: inherits the idle class
        assert late_seen["start"] == ioprio.IDLE
    finally:
        y.end()
    for t, go in ((own, own_go), (late, late_go)):
        go.set()
        t.join()
    assert own_seen["end"] == best_effort_7
    assert late_seen["end"] == before  # the main thread's
    assert ioprio.get(0) == before
    assert ioprio.IDLE not in {ioprio.get(tid) for tid in ioprio._threads()}
    y.end()  # a second end changes nothing
    assert ioprio.get(0) == before
