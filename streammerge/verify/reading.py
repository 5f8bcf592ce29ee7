"""What verify starts before the folder's checks, so that the disk is busy from the first moment: the merge planned
again, torch's own reader of the checkpoint (the oracle), and either the rank files' CRC-32 streams or a readahead
of the comparison's first bytes (which one: `checksums`, "auto" by the memory free)."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..options import MergeOptions
from ..plan import Piece, TensorPlan
from ..sources import Source
from ..sources.base import Oracle, open_checkpoint_file
from ..write.writer import piece_span
from .flags import check_flags_the_merge_ran_without, folder_options, recorded_options, with_flags
from .report import VerifyReport

if TYPE_CHECKING:
    from ..pipeline import MergePlan


@dataclass
class Reading:
    """What verify starts before anything else, so the disk is busy from the first moment: the plan, the oracle,
    and either the rank files' CRC streams or the readahead of the comparison's first bytes."""

    options: MergeOptions
    manifest: dict | None
    oracle: Oracle | None
    paths: list[Path]
    plan: MergePlan | None = None
    crc_pool: ThreadPoolExecutor | None = None
    integrity: list[Future[list[str]]] = field(default_factory=list)
    readahead: _Readahead | None = None

    def close(self) -> None:
        if self.readahead is not None:
            self.readahead.close()
        if self.oracle is not None:
            self.oracle.close()  # first: a verify stopped by an error need not wait for the streams to end
        if self.crc_pool is not None:
            self.crc_pool.shutdown(wait=True, cancel_futures=True)


def start_reading(out: Path, ck: Source, manifest: dict | None, report: VerifyReport, *, trust_pickle: bool,
                  workers: int, checksums: str, then: Callable[[], None], lora: dict | None = None) -> Reading:
    """Plan, make the oracle, start the CRC streams or the readahead, and call `then` (torch's import) as soon as
    the disk has work queued. Not before: where Python keeps no compiled bytecode, compiling torch's modules holds
    the GIL for seconds, and no other thread can start anything meanwhile."""
    from ..pipeline import plan_merge

    folder = None
    if manifest is None:
        folder, note = folder_options(out)
        report.notes.append(f"no manifest: {note}")
    options = recorded_options((manifest or {}).get("options"), trust_pickle=trust_pickle, folder=folder)
    options = with_flags(options, lora or {}, manifest, report)
    reading = Reading(options, manifest, None if ck.oracle_after_plan else ck.oracle(options), list(ck.files()))
    as_read = False  # the CRC-32s come from the comparison's reads (see _streams)
    try:
        oracle, paths = reading.oracle, reading.paths
        if oracle is not None and getattr(oracle, "thread_safe", False):
            # The small reads the planner and torch.load make go first: behind the streams or the readahead each
            # would wait its turn.
            oracle.prefetch()
            if _streams(checksums, paths, report, oracle):
                # The CRC streams need neither the plan nor torch, so they start first.
                reading.crc_pool = ThreadPoolExecutor(max(1, min(len(paths), workers)),
                                                      thread_name_prefix="streammerge-crc")
                reading.integrity = [reading.crc_pool.submit(oracle.check_integrity, [path]) for path in paths]
            else:
                as_read = True
        if not as_read:
            then()
        reading.plan = plan_merge(ck, options, check_architecture=False)
        if lora and manifest is not None:
            check_flags_the_merge_ran_without(ck, options, lora, reading.plan, report)
        if as_read:  # the first tensors' bytes are on their way while torch is imported and each file loaded
            reading.readahead = _Readahead([t for p in reading.plan.plans for t in p.tensors.values()])
            then()
        return reading
    except BaseException:
        reading.close()
        raise


def _streams(checksums: str, paths: list[Path], report: VerifyReport, oracle: Oracle) -> bool:
    """Whether the CRC-32 streams run beside the comparison: with "auto", when the rank files fit in half the
    page cache this process may fill (else a stream's pages are evicted before the comparison reads them
    again, and every byte comes from disk twice). Otherwise the oracle checks them from what it reads."""
    from ..pipeline import memory_room

    if checksums == "streams":
        return True
    if checksums == "auto":
        total = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
        room = memory_room()
        if total <= room // 2:
            return True
        report.notes.append(f"the rank files ({total / 1e9:.2f} GB) do not fit in half the page cache this process "
                            f"may use ({room / 1e9:.2f} GB): their CRC-32s come from what the comparison reads")
    return not oracle.crc_as_read()


class _Readahead:
    """Without CRC streams nothing reads ahead of the comparison, whose mapped reads fault pages in a few at a time:
    so a thread asks the kernel (posix_fadvise WILLNEED) for the rank-file bytes of the tensors after the one being
    compared, up to an eighth of the memory free for page cache. Advice only: the pieces' places come from the
    merge's own reader, and a wrong one costs time, never a wrong result."""

    refused: str | None = None  # why nothing is read ahead (then the comparison's own faults read)

    def __init__(self, order: list[TensorPlan]):
        from ..pipeline import memory_room

        self.budget = max(64 * 2**20, memory_room() // 8)
        self._order = order
        self._index = {id(t): i for i, t in enumerate(order)}
        self._starts = [0, *itertools.accumulate(sum(_span(p, t) for p in t.pieces) for t in order)]
        self._next = 0  # the first tensor not asked for yet
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="streammerge-readahead")
        self._fds: dict[str, int] = {}
        self._steps: dict[str, int] = {}
        self._ask(0)

    def reached(self, t: TensorPlan) -> None:
        """The comparison of `t` starts: ask for the tensors within the budget after it."""
        if id(t) in self._index and self.refused is None:
            self._ask(self._index[id(t)])

    def _ask(self, i: int) -> None:
        with self._lock:
            first = self._next
            while self._next < len(self._order) and self._starts[self._next] < self._starts[i] + self.budget:
                self._next += 1
            ahead = self._order[first:self._next]
        if ahead:
            self._pool.submit(self._advise, ahead)

    def _advise(self, tensors: list[TensorPlan]) -> None:
        for t in tensors:
            for p in t.pieces:
                try:
                    if p.file not in self._fds:
                        self._fds[p.file] = open_checkpoint_file(p.file)
                        self._steps[p.file] = _willneed_step(self._fds[p.file])
                    fd, step, end = self._fds[p.file], self._steps[p.file], p.offset + _span(p, t)
                    for pos in range(p.offset, end, step):
                        os.posix_fadvise(fd, pos, min(step, end - pos), os.POSIX_FADV_WILLNEED)
                except AttributeError:
                    self.refused = "this platform has no posix_fadvise"
                    return
                except OSError as e:
                    self.refused = f"posix_fadvise(WILLNEED) on {Path(p.file).name} failed ({e.strerror or e})"
                    return

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for fd in self._fds.values():
            os.close(fd)


def _willneed_step(fd: int) -> int:
    """The most one WILLNEED reads: Linux cuts the advice to the device's readahead or largest request size."""
    st = os.fstat(fd)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    for queue in (dev / "queue", dev / ".." / "queue"):  # a disk's, or the disk of a partition
        try:
            kib = max(int((queue / name).read_text()) for name in ("read_ahead_kb", "max_sectors_kb"))
            return min(8 * 2**20, max(128 * 2**10, kib * 2**10))
        except (OSError, ValueError):
            continue
    return 128 * 2**10


def _span(p: Piece, t: TensorPlan) -> int:
    """Bytes from a piece's first element to its last, as stored (none for an empty piece)."""
    return piece_span(p, p.shape, t.source_dtype.itemsize) if all(p.shape) else 0
