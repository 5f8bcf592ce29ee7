"""Write: execute a plan, one output file at a time, in bounded memory.

Each file is created at its final size under a temporary name and cut into aligned windows of file
space (the header in the first): worker threads fill a window from the pieces of every tensor it
spans, read straight from the rank files (positioned reads of exact ranges, queued ahead of the
windows in flight; casts chunk by chunk with numpy, bit for bit what `tensor.to(dtype)` gives, see
cast.py; torch only for float8), and write it with one pwrite, while this thread takes the CRC-32 of
the windows in file order (and sha256, only when asked: a push needs it) and has what it hashed
flushed to disk behind it. Memory is the window buffers and nothing else; page cache is dropped
behind us (or never filled, with O_DIRECT, opt-in) so a memory cgroup stays bounded too.
The file is re-opened with the Rust reader (`safetensors.safe_open`) before it is renamed into place.
torch is imported only for a float8 cast.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import math
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType

import numpy as np

from ..checksum import FELL_BACK as CRC_FELL_BACK
from ..checksum import crc32
from ..dtypes import DType
from ..errors import OutputError, VerifyError
from ..options import DEFAULT_BUFFER_SIZE
from ..plan import FilePlan, Plan, TensorPlan
from ..sources.base import Piece, no_readahead, open_checkpoint_file, row_major
from .cast import cast_into, numpy_can_cast

WINDOW_MAX = 4 * 2**20  # bytes of output file per job: large sequential writes, still many in flight
ALIGN = 4096  # O_DIRECT needs file offsets, lengths and buffers aligned to the logical block size
FOLD_COPIES = 3  # a fold window holds float32 copies of W's window, B's rows and the result
TMP_SUFFIX = ".streammerge-tmp"

Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class OutputFile:
    """A finished, verified output file (what the manifest and the Hub upload need)."""

    filename: str  # relative to the output folder, e.g. "optimizer/optimizer.safetensors"
    size: int
    crc32: int | None = None  # of the whole file: resume and verify use it when the mtime changed
    sha256: str | None = None  # only where computed anyway (small files) or asked for (a push needs it)


def tmp_path(path: Path) -> Path:
    return path.with_name("." + path.name + TMP_SUFFIX)


# ---------------------------------------------------------------- page cache control

# the process's own symbols include libc's; find_library would run ldconfig (a child process) to find it
_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
_SYNC_RANGE_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER


def _drop_cache(fd: int, offset: int, length: int, *, written: bool) -> None:
    """Evict a range from the page cache (after flushing it, if we wrote it)."""
    if length <= 0 or not hasattr(os, "posix_fadvise"):
        return
    if written and _libc is not None and hasattr(_libc, "sync_file_range"):
        _libc.sync_file_range(fd, ctypes.c_longlong(offset), ctypes.c_longlong(length), _SYNC_RANGE_ALL)
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


class WriteBehind:
    """Flush what was written to disk and evict it from the page cache, off the hashing thread.

    The producer hands over file-ordered byte ranges as they are hashed; a thread starts writeback
    of each range (`sync_file_range(WRITE)`, asynchronous) and waits for the range before it, then
    drops it. Dirty pages count against a memory cgroup, and cgroup v1 does not throttle writers,
    so the producer waits when more than `limit` bytes are written but not yet flushed.
    """

    def __init__(self, fd: int, start: int, *, chunk: int, limit: int, enabled: bool = True):
        self.fd, self.chunk, self.limit, self.enabled = fd, chunk, max(limit, 2 * chunk), enabled
        self.issued = self.flushed = start
        self._ranges: deque[tuple[int, int] | None] = deque()
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="streammerge-flush", daemon=True)
        if enabled:
            self._thread.start()

    def advance(self, upto: int) -> None:
        """Bytes up to `upto` are written (and hashed); flush them once a chunk has gathered."""
        if not self.enabled or upto - self.issued < self.chunk:
            return
        with self._cond:
            self._ranges.append((self.issued, upto))
            self.issued = upto
            self._cond.notify_all()
            while self.issued - self.flushed > self.limit and self._error is None:
                self._cond.wait()

    def close(self, end: int) -> None:
        """Flush everything up to `end` and stop the thread."""
        if not self.enabled:
            return
        with self._cond:
            if end > self.issued:
                self._ranges.append((self.issued, end))
                self.issued = end
            self._ranges.append(None)
            self._cond.notify_all()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        previous: tuple[int, int] | None = None
        try:
            while True:
                with self._cond:
                    while not self._ranges:
                        self._cond.wait()
                    rng = self._ranges.popleft()
                if rng is not None:
                    _start_writeback(self.fd, rng[0], rng[1] - rng[0])
                if previous is not None:
                    _drop_cache(self.fd, previous[0], previous[1] - previous[0], written=True)
                    with self._cond:
                        self.flushed = previous[1]
                        self._cond.notify_all()
                if rng is None:
                    return
                previous = rng
        except BaseException as e:  # surfaced by close(); the producer must not wait forever
            with self._cond:
                self._error = e
                self._cond.notify_all()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    if length > 0 and _libc is not None and hasattr(_libc, "sync_file_range"):
        _libc.sync_file_range(fd, ctypes.c_longlong(offset), ctypes.c_longlong(length), 2)  # WRITE: async


# ---------------------------------------------------------------- windows of a tensor

def windows(shape: tuple[int, ...], itemsize: int, budget: int) -> Iterator[Box]:
    """Split a tensor into boxes that are contiguous in row-major order and at most `budget` bytes.

    Whole rows of the outermost dimension when they fit; otherwise single indices of the leading
    dimensions and a range of the first dimension whose slab fits.
    """
    if math.prod(shape) == 0:
        return
    if not shape:
        yield ()
        return
    suffix = [1] * (len(shape) + 1)
    for i in reversed(range(len(shape))):
        suffix[i] = suffix[i + 1] * shape[i]
    k = next(i for i in range(len(shape)) if suffix[i + 1] * itemsize <= budget or i == len(shape) - 1)
    step = max(1, budget // (suffix[k + 1] * itemsize))
    tail = tuple((0, s) for s in shape[k + 1:])
    for prefix in itertools.product(*(range(s) for s in shape[:k])):
        head = tuple((p, p + 1) for p in prefix)
        for a in range(0, shape[k], step):
            yield head + ((a, min(a + step, shape[k])),) + tail


def is_contiguous(sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether a box of `sizes` stored with `strides` (in elements) is one row-major run, so one read fills it."""
    expected = 1
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


# ---------------------------------------------------------------- reading sources

DROP_BLOCK = 2 * 2**20  # page-cache eviction unit for rank files: aligned, so whole large folios go at once


def _blocks(offset: int, length: int) -> Iterator[tuple[int, int]]:
    """(block index, bytes of [offset, offset + length) in it) for each DROP_BLOCK the range meets."""
    end = offset + length
    for b in range(offset // DROP_BLOCK, -(-end // DROP_BLOCK)):
        yield b, min(end, (b + 1) * DROP_BLOCK) - max(offset, b * DROP_BLOCK)


def piece_span(p: Piece, sizes: tuple[int, ...], itemsize: int) -> int:
    """Bytes from a box's first stored element to its last, for a box of `sizes` stored with p's strides."""
    return (sum((n - 1) * st for n, st in zip(sizes, p.stride)) + 1) * itemsize


DIRECT_MIN = 256 * 2**10  # smaller reads go through the page cache: a bounce copy is not worth it


class Sources:
    """Read-only file descriptors of the rank files, opened once and shared by the worker threads.

    Reads are exact: the kernel's read-ahead is off (POSIX_FADV_RANDOM) and the writer names the
    ranges it will read next (`prefetch`, POSIX_FADV_WILLNEED), so the disk has a deep queue of
    reads and reads nothing twice. Read-ahead guesses "after what was just read", which in output
    order is often a region already read and evicted. With `drop_cache`, a block of a rank file
    leaves the page cache once every byte the plan reads from it has been read (`expect`).

    With `direct`, large reads use O_DIRECT where the file system takes it: the whole request goes
    to the disk at once and nothing stays in the page cache. Offsets in a rank file are not aligned,
    so each thread reads aligned blocks into its own bounce buffer and copies the bytes asked for.
    """

    def __init__(self, drop_cache: bool = True, direct: bool = False, bounce: int = 2 * 2**20):
        self._fds: dict[str, int] = {}
        self._dfds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self.drop_cache = drop_cache
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.bounce = max(ALIGN, bounce // ALIGN * ALIGN)
        self.fell_back: dict[str, str] = {}
        self.exact = hasattr(os, "posix_fadvise")
        if not self.exact:
            self.fell_back["exact reads"] = "no posix_fadvise on this platform: the kernel's read-ahead decides"
        self._left: dict[tuple[str, int], int] = {}  # (file, block) -> bytes the plan has yet to read there

    def expect(self, ranges: Iterable[tuple[str, int, int]]) -> None:
        """Count the bytes the plan will read, per aligned block of each file, so that a block leaves the
        page cache once all of it is read and never earlier (a page dropped early is read twice)."""
        if not self.drop_cache:
            return
        with self._lock:
            for path, off, n in ranges:
                for b, k in _blocks(off, n):
                    self._left[(path, b)] = self._left.get((path, b), 0) + k

    def _consumed(self, path: str, fd: int, offset: int, length: int) -> list[int]:
        """Account for a finished read; evicts (and returns) the blocks it completed. A read nobody
        announced (a torch-format optimizer file's, a LoRA fold's lora_A and lora_B) is evicted at once."""
        done = []
        tracked = False
        with self._lock:
            for b, k in _blocks(offset, length):
                left = self._left.get((path, b))
                if left is None:
                    continue
                tracked = True
                if left > k:
                    self._left[(path, b)] = left - k
                else:
                    del self._left[(path, b)]
                    done.append(b)
        if not tracked:
            _drop_cache(fd, offset, length, written=False)
        for b in done:
            _drop_cache(fd, b * DROP_BLOCK, DROP_BLOCK, written=False)
        return done

    def fd(self, path: str) -> int:
        with self._lock:
            if path not in self._fds:
                # a CheckpointError, not an OSError: the writer reports those as failed writes of the output
                self._fds[path] = open_checkpoint_file(path)
                if self.exact:
                    no_readahead(self._fds[path])
            return self._fds[path]

    def _dfd(self, path: str) -> int | None:
        with self._lock:
            if path not in self._dfds:
                try:
                    self._dfds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
                except OSError as e:
                    self._no_direct(f"open: {e.strerror or e}")
                    return None
            return self._dfds[path]

    def _no_direct(self, why: str) -> None:
        self.direct = False
        self.fell_back.setdefault("O_DIRECT reads", why)

    def read_into(self, path: str, offset: int, view: memoryview) -> None:
        if self.direct and len(view) >= DIRECT_MIN:
            dfd = self._dfd(path)
            if dfd is not None:
                try:
                    self._read_direct(path, dfd, offset, view)
                    return
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._no_direct(f"read: {e.strerror or e}")
        fd = self.fd(path)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise OutputError(f"{path}: unexpected end of file at byte {offset + done} "
                                  "(file truncated while merging?)")
            done += n
        if self.drop_cache:
            self._consumed(path, fd, offset, len(view))

    def evict(self, ranges: Iterable[tuple[str, int, int]]) -> None:
        """Drop these ranges of the rank files from the page cache (read, and not needed again)."""
        for path, off, n in ranges:
            _drop_cache(self.fd(path), off, n, written=False)

    def prefetch(self, ranges: Iterable[tuple[str, int, int]]) -> None:
        """Start reading these ranges now, without waiting (adjacent ones as one request)."""
        if not self.exact:
            return
        run: tuple[str, int, int] | None = None
        for path, off, n in itertools.chain(ranges, [("", -1, 0)]):
            if run is not None and path == run[0] and off == run[1] + run[2]:
                run = (path, run[1], run[2] + n)
                continue
            if run is not None:
                try:
                    os.posix_fadvise(self.fd(run[0]), run[1], run[2], os.POSIX_FADV_WILLNEED)
                except OSError as e:  # a file system that takes no advice: reads still work, on demand
                    self.exact = False
                    self.fell_back["exact reads"] = f"posix_fadvise: {e.strerror or e}"
                    return
            run = (path, off, n)

    def _read_direct(self, path: str, fd: int, offset: int, view: memoryview) -> None:
        buf = getattr(self._local, "bounce", None)
        if buf is None:
            buf = self._local.bounce = mmap.mmap(-1, self.bounce)  # page-aligned
        bounce = memoryview(buf)
        done = 0
        while done < len(view):
            start = offset + done
            lo = start // ALIGN * ALIGN
            want = min(len(view) - done, self.bounce - (start - lo))
            hi = -(-(start + want) // ALIGN) * ALIGN
            n = os.preadv(fd, [bounce[:hi - lo]], lo)
            got = min(want, n - (start - lo))
            if got <= 0:
                raise OutputError(f"{path}: unexpected end of file at byte {start} (file truncated while merging?)")
            view[done:done + got] = bounce[start - lo:start - lo + got]
            done += got

    def close(self) -> None:
        with self._lock:
            if self.drop_cache and hasattr(os, "posix_fadvise"):  # unread gaps, another torchrun rank's share
                for fd in self._fds.values():
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            self._left.clear()
            for fd in list(self._fds.values()) + list(self._dfds.values()):
                os.close(fd)
            self._fds.clear()
            self._dfds.clear()


def piece_parts(t: TensorPlan, box: Box) -> Iterator[tuple[Piece, tuple[int, ...], int, list[int]]]:
    """The pieces of `t` that meet `box`: (piece, sizes of the overlap, its byte offset in the piece's file,
    its first index relative to the box)."""
    isz = t.source_dtype.itemsize
    for p in t.pieces:
        lo = [max(b[0], s) for b, s in zip(box, p.start)]
        hi = [min(b[1], s + n) for b, s, n in zip(box, p.start, p.shape)]
        if any(a >= b for a, b in zip(lo, hi)):
            continue
        local = [a - s for a, s in zip(lo, p.start)]
        src_off = p.offset + sum(i * st for i, st in zip(local, p.stride)) * isz
        yield p, tuple(b - a for a, b in zip(lo, hi)), src_off, [a - b[0] for a, b in zip(lo, box)]


def piece_ranges(tensors: Iterable[TensorPlan]) -> Iterator[tuple[str, int, int]]:
    """(file, offset, length) of every stored piece of these tensors: what writing them will read."""
    for t in tensors:
        for p in t.pieces:
            if math.prod(p.shape):
                yield p.file, p.offset, piece_span(p, p.shape, t.source_dtype.itemsize)


def source_ranges(segs: list[Segment]) -> Iterator[tuple[str, int, int]]:
    """(file, offset, length) of the stored bytes a window reads, for read-ahead."""
    for t, box, _, _ in segs:
        if t is None or box is None:
            continue
        isz = t.source_dtype.itemsize
        for p, sizes, src_off, _ in piece_parts(t, box):
            yield p.file, src_off, piece_span(p, sizes, isz)


def fill_window(t: TensorPlan, box: Box, out: np.ndarray, scratch: np.ndarray, sources: Sources) -> int:
    """Assemble one window of tensor `t` into `out` (uint8); returns its byte length."""
    wshape = tuple(hi - lo for lo, hi in box)  # box is in t.geometry coordinates
    n_out = math.prod(wshape) * t.dtype.itemsize
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12; ndarray is a buffer on 3.11 too
    out_mv = memoryview(out)  # type: ignore[arg-type]
    wstrides = row_major(wshape)
    src_isz = t.source_dtype.itemsize
    for p, sizes, src_off, dst in piece_parts(t, box):
        dst_flat = sum(i * st for i, st in zip(dst, wstrides))
        if (t.dtype == t.source_dtype and is_contiguous(sizes, p.stride)
                and is_contiguous(sizes, wstrides)):
            start = dst_flat * src_isz
            sources.read_into(p.file, src_off, out_mv[start:start + math.prod(sizes) * src_isz])
            continue
        window = out[:n_out].view(t.dtype.numpy).reshape(wshape)
        for off, part in _fitting_parts(sizes, p.stride, src_isz, scratch.size):
            part_src = src_off + sum(i * st for i, st in zip(off, p.stride)) * src_isz
            span = (sum((n - 1) * st for n, st in zip(part, p.stride)) + 1) * src_isz
            sources.read_into(p.file, part_src, memoryview(scratch)[:span])  # type: ignore[arg-type]  # as out_mv
            region = tuple(slice(a + o, a + o + n) for a, o, n in zip(dst, off, part)) + (...,)  # 0-d: a view
            if numpy_can_cast(t.source_dtype, t.dtype):
                src = np.lib.stride_tricks.as_strided(scratch[:span].view(t.source_dtype.numpy), part,
                                                      tuple(st * src_isz for st in p.stride))
                cast_into(window[region], src, t.source_dtype, t.dtype)
            else:
                _torch_copy(out[:n_out], wshape, region, scratch[:span], part, p.stride, t.source_dtype, t.dtype)
    return n_out


def _torch_copy(out: np.ndarray, wshape: tuple[int, ...], region: tuple[slice | EllipsisType, ...], scratch: np.ndarray,
                part: tuple[int, ...], stride: tuple[int, ...], src_dtype: DType, dst_dtype: DType) -> None:
    """The casts numpy cannot reproduce (float8): torch's copy_ over the same buffers (imports torch)."""
    import torch

    window = torch.from_numpy(out).view(dst_dtype.torch()).view(wshape)
    src = torch.from_numpy(scratch).view(src_dtype.torch()).as_strided(part, stride)
    window[region].copy_(src)


def _fitting_parts(sizes: tuple[int, ...], strides: tuple[int, ...], itemsize: int,
                   limit: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Split a strided box into (offset, sizes) parts whose storage span fits the scratch buffer.

    Row-major pieces always fit in one part; a piece stored in another order (e.g. column-major) is
    halved along its largest-stride dimension until each part fits.
    """
    span = (sum((n - 1) * st for n, st in zip(sizes, strides)) + 1) * itemsize
    if span <= limit or all(n == 1 for n in sizes):
        yield (0,) * len(sizes), sizes
        return
    d = max((i for i, n in enumerate(sizes) if n > 1), key=lambda i: strides[i])
    half = sizes[d] // 2
    for start, n in ((0, half), (half, sizes[d] - half)):
        for off, part in _fitting_parts(sizes[:d] + (n,) + sizes[d + 1:], strides, itemsize, limit):
            yield off[:d] + (off[d] + start,) + off[d + 1:], part


# ---------------------------------------------------------------- one output file



def window_size(buffer_size: int) -> int:
    """Bytes of output one job writes: at most WINDOW_MAX, at least one block, always a multiple of ALIGN."""
    return max(ALIGN, min(WINDOW_MAX, buffer_size // 4 // ALIGN * ALIGN))


def in_flight(buffer_size: int) -> int:
    """How many windows fit the buffer budget (each needs its output bytes and a scratch copy)."""
    return max(2, buffer_size // (2 * window_size(buffer_size)))


def flat_boxes(shape: tuple[int, ...], a: int, b: int) -> Iterator[Box]:
    """Elements [a, b) of a row-major tensor, in order, as boxes that are each contiguous in row-major order."""
    if a >= b:
        return
    if not shape:
        yield ()
        return
    inner = math.prod(shape[1:])
    i0, r0 = divmod(a, inner)
    i1, r1 = divmod(b, inner)
    if i0 == i1:
        for sub in flat_boxes(shape[1:], r0, r1):
            yield ((i0, i0 + 1),) + sub
        return
    if r0:
        for sub in flat_boxes(shape[1:], r0, inner):
            yield ((i0, i0 + 1),) + sub
        i0 += 1
    if i1 > i0:
        yield ((i0, i1),) + tuple((0, s) for s in shape[1:])
    if r1:
        for sub in flat_boxes(shape[1:], 0, r1):
            yield ((i1, i1 + 1),) + sub


# what one window holds: header bytes (tensor None, box None) or a box of a tensor, at `dst` in the window;
# `cut` = (skip, keep) when only some bytes of a single element fall in this window
Segment = tuple[TensorPlan | None, Box | None, int, tuple[int, int] | None]


class FileWriter:
    """Writes the files of a plan in fixed windows of output-file space, with a fixed set of buffers.

    The file is cut into aligned windows (the header lies in window 0); a job assembles one window
    from its tensors' pieces and writes it with one pwrite (O_DIRECT if asked and the file system
    takes it). The reads of the next `depth` windows are queued before their jobs start.
    How many windows are in flight comes from the buffer budget, how many threads work on them from
    `workers` (never more than windows in flight): disk queue depth and CPU work are set apart.
    """

    def __init__(self, *, workers: int = 2, buffer_size: int = DEFAULT_BUFFER_SIZE, drop_cache: bool = True,
                 progress: Callable[[int], None] | None = None, direct: bool | None = None, sha256: bool = False):
        self.window_bytes = window_size(buffer_size)
        self.depth = in_flight(buffer_size)
        self.workers = max(1, min(workers, self.depth))
        self.flush_bytes = max(8 * 2**20, 2 * self.window_bytes)
        self.drop_cache = drop_cache
        self.progress = progress
        self.sha256 = sha256  # the Hub needs it; merges that do not push skip it
        self.fell_back: dict[str, str] = {}  # fast path -> why it was not taken (observable, never silent)
        if direct is None:  # buffered writes with write-behind measured faster on the device (README): opt-in
            direct = os.environ.get("STREAMMERGE_DIRECT_WRITES") == "1"
        self.direct = direct and hasattr(os, "O_DIRECT")
        if direct and not self.direct:
            self.fell_back["O_DIRECT"] = "not available on this platform"
        # O_DIRECT reads measured no faster on the device (README) and skip a warm page cache: opt-in only
        reads = self.direct and os.environ.get("STREAMMERGE_DIRECT_READS") == "1"
        self.sources = Sources(drop_cache, direct=reads)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="streammerge")
        self._arena = mmap.mmap(-1, 2 * self.depth * self.window_bytes)  # page-aligned, as O_DIRECT wants
        arena = np.frombuffer(self._arena, dtype=np.uint8)
        w = self.window_bytes
        self._buffers = [(arena[2 * i * w:(2 * i + 1) * w], arena[(2 * i + 1) * w:(2 * i + 2) * w])
                         for i in range(self.depth)]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.sources.close()

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _windows(self, plan: Plan, fp: FilePlan) -> Iterator[tuple[int, int, list[Segment]]]:
        """(file offset, length, segments) of every window of the file, in file order."""
        w = self.window_bytes
        data_start = fp.layout.data_start
        spans: list[tuple[int, int, TensorPlan | None]] = [(0, data_start, None)]
        spans += [(data_start + e.begin, data_start + e.end, plan.tensors[e.name]) for e in fp.layout.entries]
        i = 0
        for w0 in range(0, fp.size, w):
            w1 = min(w0 + w, fp.size)
            segs: list[Segment] = []
            while i < len(spans) and spans[i][1] <= w0:
                i += 1
            j = i
            while j < len(spans) and spans[j][0] < w1:
                s0, s1, t = spans[j]
                a, b = max(s0, w0), min(s1, w1)
                if t is None:
                    segs.append((None, None, a - w0, None))
                else:
                    segs.extend(self._segments(t, a - s0, b - s0, a - w0))
                j += 1
            yield w0, w1 - w0, segs

    def _segments(self, t: TensorPlan, a: int, b: int, dst: int) -> Iterator[Segment]:
        """Bytes [a, b) of tensor t as boxes placed from `dst`; an element cut by a window edge comes alone."""
        isz = t.dtype.itemsize
        e0, e1 = -(-a // isz), b // isz
        if a % isz:
            elem = a // isz
            keep = min(b, (elem + 1) * isz) - a
            yield t, next(flat_boxes(t.geometry, elem, elem + 1)), dst, (a % isz, keep)
            dst += keep
        if e0 < e1:
            step = e1 - e0
            if t.fold is not None:  # float32 (or float64) copies of W's window, B's rows and the result
                step = max(1, self.window_bytes // (t.fold_dtype.itemsize * FOLD_COPIES))
            for lo in range(e0, e1, step):
                hi = min(e1, lo + step)
                for box in flat_boxes(t.geometry, lo, hi):
                    yield t, box, dst, None
                    dst += math.prod(hi_ - lo_ for lo_, hi_ in box) * isz
        if b % isz and b // isz >= e0:
            elem = b // isz
            yield t, next(flat_boxes(t.geometry, elem, elem + 1)), dst, (0, b % isz)

    def write(self, plan: Plan, fp: FilePlan, path: Path) -> OutputFile:
        """Write one file atomically: temp name, fill, verify with the Rust reader, rename."""
        tmp = tmp_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise output_error(e, path) from None
        try:
            crc, sha = self._fill(plan, fp, fd, tmp)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise output_error(e, path, fp.size) from None
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        check_with_rust_reader(tmp, plan, fp)
        try:
            os.replace(tmp, path)
        except OSError as e:  # the folder removed under us (a trainer rotating its step folders), say
            raise output_error(e, path) from None
        return OutputFile(plan.rel(fp.filename), fp.size, crc, sha)

    def _open_direct(self, tmp: Path) -> int | None:
        if not self.direct:
            return None
        try:
            return os.open(tmp, os.O_WRONLY | os.O_DIRECT)
        except OSError as e:
            self._no_direct(f"open: {e.strerror or e}")
            return None

    def _no_direct(self, why: str) -> None:
        self.direct = False
        self.fell_back.setdefault("O_DIRECT", why)

    @property
    def fallbacks(self) -> dict[str, str]:
        """Every fast path not taken, and why (writes and reads)."""
        return {**self.fell_back, **self.sources.fell_back, **({"CRC-32": CRC_FELL_BACK} if CRC_FELL_BACK else {})}

    def _fill(self, plan: Plan, fp: FilePlan, fd: int, tmp: Path) -> tuple[int, str | None]:
        try:
            os.posix_fallocate(fd, 0, fp.size)  # reserves the space: a full disk fails now, not halfway
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                raise
            os.ftruncate(fd, fp.size)
        header = fp.layout.header
        self.sources.expect(piece_ranges(plan.tensors[e.name] for e in fp.layout.entries))
        dfd = self._open_direct(tmp)
        crc = 0
        sha = hashlib.sha256() if self.sha256 else None
        inflight: deque[tuple[Future, int]] = deque()
        free = list(range(self.depth))
        behind = WriteBehind(fd, 0, chunk=self.flush_bytes, limit=4 * self.flush_bytes,
                             enabled=self.drop_cache and dfd is None)

        def finish_oldest() -> None:
            nonlocal crc
            fut, slot = inflight.popleft()
            n, offset = fut.result()
            view = self._buffers[slot][0].data[:n]
            crc = crc32(view, crc)
            if sha is not None:
                sha.update(view)
            free.append(slot)
            behind.advance(offset + n)
            if self.progress:
                self.progress(n)

        ahead: deque[tuple[int, int, list[Segment]]] = deque()
        upcoming = self._windows(plan, fp)

        def pull() -> None:
            w = next(upcoming, None)
            if w is not None:
                ahead.append(w)
                self.sources.prefetch(source_ranges(w[2]))

        try:
            for _ in range(self.depth + 1):  # reads queued for the windows after those in flight
                pull()
            while ahead:
                w0, n, segs = ahead.popleft()
                pull()
                if not free:
                    finish_oldest()
                slot = free.pop()
                inflight.append((self._pool.submit(self._job, segs, header, w0, n, fd, dfd, slot), slot))
            while inflight:
                finish_oldest()
        finally:
            for fut, _ in inflight:  # let running jobs end before their buffers or fd go away
                fut.cancel()
                try:
                    fut.result()
                except BaseException:
                    pass
            behind.close(fp.size)
            if dfd is not None:
                os.close(dfd)
        if os.fstat(fd).st_size != fp.size:  # an O_DIRECT tail is written whole blocks long
            os.ftruncate(fd, fp.size)
        return crc, sha.hexdigest() if sha is not None else None

    def _job(self, segs: list[Segment], header: bytes, w0: int, n: int, fd: int, dfd: int | None,
             slot: int) -> tuple[int, int]:
        out, scratch = self._buffers[slot]
        for t, box, dst, cut in segs:
            if t is None:
                part = header[w0 + dst:w0 + n]
                out[dst:dst + len(part)] = np.frombuffer(part, dtype=np.uint8)
            elif cut is not None:
                one = np.empty(16, dtype=np.uint8)
                self._fill_box(t, box, one, scratch)
                skip, keep = cut
                out[dst:dst + keep] = one[skip:skip + keep]
            else:
                self._fill_box(t, box, out[dst:], scratch)
        if dfd is not None and self.direct:
            padded = -(-n // ALIGN) * ALIGN
            out[n:padded] = 0
            try:
                _pwrite_all(dfd, out.data[:padded], w0)
                return n, w0
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._no_direct(f"write: {e.strerror or e}")
        _pwrite_all(fd, out.data[:n], w0)
        return n, w0

    def same_bytes(self, a: TensorPlan, b: TensorPlan) -> bool:
        """Whether two tensors of a plan would be written with the same bytes (a tied duplicate's check),
        window by window in two of the writer's buffers."""
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        (out_a, scratch_a), (out_b, scratch_b) = self._buffers[0], self._buffers[1]
        wide = max((t.fold_dtype.itemsize for t in (a, b) if t.fold), default=0)
        budget = self.window_bytes // (wide * FOLD_COPIES) if wide else self.window_bytes
        for box in windows(a.shape, a.dtype.itemsize, max(a.dtype.itemsize, budget)):
            n = self._fill_box(a, box, out_a, scratch_a)
            if self._fill_box(b, box, out_b, scratch_b) != n or not np.array_equal(out_a[:n], out_b[:n]):
                return False
        return True

    def _fill_box(self, t: TensorPlan, box: Box | None, out: np.ndarray, scratch: np.ndarray) -> int:
        assert box is not None
        if t.fold is not None:
            from .compute import fill_fold_window

            return fill_fold_window(t, box, out, scratch, self.sources)
        return fill_window(t, box, out, scratch, self.sources)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def output_error(e: OSError, path: Path, size: int | None = None) -> OutputError:
    """One line a user can act on for a failed write; finished files are kept and the merge resumes."""
    resume = "rerun the same command to resume (finished files are kept)"
    need = f" ({size / 1e6:,.1f} MB needed)" if size else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return OutputError(f"{path.parent}: {what} writing {path.name}{need}; free space and {resume}")
    if e.errno == errno.EFBIG:
        big = f"{size / 1e6:,.1f} MB" if size else "the file"
        return OutputError(f"{path}: {big} exceeds the file-size limit (ulimit -f) or this file system's largest "
                           f"file; raise the limit and {resume}, or use a smaller --max-shard-size with a new OUT_DIR")
    causes: dict[int | None, str] = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                                     errno.EPERM: "permission denied"}
    cause = causes.get(e.errno, f"write failed ({e.strerror or e})")
    return OutputError(f"{path}: {cause}; fix this and {resume}")


def check_with_rust_reader(path: Path, plan: Plan, fp: FilePlan) -> None:
    """Open the file with safetensors' Rust reader and compare its header with the plan.

    Opening validates the whole header (JSON, every dtype, offsets contiguous from 0 and sized
    by dtype and shape, the data covering the file exactly); the framework only matters for reading
    tensors, which we do not, so numpy's keeps torch unimported and takes bfloat16 and float8 headers.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = set(f.keys())
            if keys != set(fp.names):
                raise VerifyError(f"{path}: tensors {sorted(keys ^ set(fp.names))[:3]} differ from the plan")
            for e in fp.layout.entries:
                sl = f.get_slice(e.name)
                if tuple(sl.get_shape()) != e.shape or sl.get_dtype() != e.dtype:
                    raise VerifyError(f"{path}: tensor {e.name!r} reads back as {sl.get_dtype()} {sl.get_shape()}")
    except VerifyError:
        raise
    except Exception as e:  # the Rust reader's own errors (SafetensorError) are not importable as one type
        raise VerifyError(f"{path}: the safetensors reader rejects the file ({e})") from None
