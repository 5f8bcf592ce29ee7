"""Write: execute a plan, one output file at a time, in bounded memory.

Each file is created at its final size under a temporary name, its header written from the plan,
and every tensor filled window by window: worker threads read the pieces of a window straight from
the rank files (positioned reads; casts chunk by chunk with numpy, bit for bit what `tensor.to(dtype)`
gives, see cast.py; torch only for float8) and write it in place, while this thread hashes the
windows in file order. Memory is the window buffers and nothing else; page cache is dropped behind
us so a memory cgroup stays bounded too. The file is re-opened with the Rust reader
(`safetensors.safe_open`) before it is renamed into place. torch is imported only for a float8 cast.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import itertools
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..dtypes import DType
from ..errors import OutputError, VerifyError
from ..options import DEFAULT_BUFFER_SIZE
from ..plan import FilePlan, Plan, TensorPlan
from .cast import cast_into, numpy_can_cast

FOLD_COPIES = 3  # a fold window holds float32 copies of W's window, B's rows and the result
TMP_SUFFIX = ".streammerge-tmp"

Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class OutputFile:
    """A finished, verified output file (what the manifest and the Hub upload need)."""

    filename: str  # relative to the output folder, e.g. "optimizer/optimizer.safetensors"
    size: int
    sha256: str


def tmp_path(path: Path) -> Path:
    return path.with_name("." + path.name + TMP_SUFFIX)


# ---------------------------------------------------------------- page cache control

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if os.name == "posix" else None
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


def _row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def _is_contiguous(sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    expected = 1
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


# ---------------------------------------------------------------- reading sources

class Sources:
    """Read-only file descriptors of the rank files, opened once and shared by the worker threads."""

    def __init__(self, drop_cache: bool = True):
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.drop_cache = drop_cache

    def fd(self, path: str) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def read_into(self, path: str, offset: int, view: memoryview) -> None:
        fd = self.fd(path)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise OutputError(f"{path}: unexpected end of file at byte {offset + done} (file truncated while merging?)")
            done += n
        if self.drop_cache:
            _drop_cache(fd, offset, len(view), written=False)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def fill_window(t: TensorPlan, box: Box, out: np.ndarray, scratch: np.ndarray, sources: Sources) -> int:
    """Assemble one window of tensor `t` into `out` (uint8); returns its byte length."""
    wshape = tuple(hi - lo for lo, hi in box)  # box is in t.geometry coordinates
    n_out = math.prod(wshape) * t.dtype.itemsize
    out_mv = memoryview(out)
    wstrides = _row_major(wshape)
    src_isz = t.source_dtype.itemsize
    for p in t.pieces:
        lo = [max(b[0], s) for b, s in zip(box, p.start)]
        hi = [min(b[1], s + n) for b, s, n in zip(box, p.start, p.shape)]
        if any(a >= b for a, b in zip(lo, hi)):
            continue
        sizes = tuple(b - a for a, b in zip(lo, hi))
        local = [a - s for a, s in zip(lo, p.start)]
        src_off = p.offset + sum(i * st for i, st in zip(local, p.stride)) * src_isz
        dst = [a - b[0] for a, b in zip(lo, box)]
        dst_flat = sum(i * st for i, st in zip(dst, wstrides))
        if (t.dtype == t.source_dtype and _is_contiguous(sizes, p.stride)
                and _is_contiguous(sizes, wstrides)):
            start = dst_flat * src_isz
            sources.read_into(p.file, src_off, out_mv[start:start + math.prod(sizes) * src_isz])
            continue
        window = out[:n_out].view(t.dtype.numpy).reshape(wshape)
        for off, part in _fitting_parts(sizes, p.stride, src_isz, scratch.size):
            part_src = src_off + sum(i * st for i, st in zip(off, p.stride)) * src_isz
            span = (sum((n - 1) * st for n, st in zip(part, p.stride)) + 1) * src_isz
            sources.read_into(p.file, part_src, memoryview(scratch)[:span])
            region = tuple(slice(a + o, a + o + n) for a, o, n in zip(dst, off, part)) + (...,)  # 0-d: a view
            if numpy_can_cast(t.source_dtype, t.dtype):
                src = np.lib.stride_tricks.as_strided(scratch[:span].view(t.source_dtype.numpy), part,
                                                      tuple(st * src_isz for st in p.stride))
                cast_into(window[region], src, t.source_dtype, t.dtype)
            else:
                _torch_copy(out[:n_out], wshape, region, scratch[:span], part, p.stride, t.source_dtype, t.dtype)
    return n_out


def _torch_copy(out: np.ndarray, wshape: tuple[int, ...], region: tuple[slice, ...], scratch: np.ndarray,
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

class FileWriter:
    """Writes the files of a plan with a shared pool of threads and a fixed set of buffers."""

    def __init__(self, *, workers: int = 2, buffer_size: int = DEFAULT_BUFFER_SIZE, drop_cache: bool = True,
                 progress: Callable[[int], None] | None = None):
        self.workers = max(1, workers)
        self.depth = max(2, 2 * self.workers)
        # each in-flight window needs its output bytes and, for casts and strided pieces, a scratch copy
        self.window_bytes = max(4096, buffer_size // (2 * self.depth)) // 64 * 64
        self.flush_bytes = max(8 * 2**20, 2 * self.window_bytes)
        self.drop_cache = drop_cache
        self.progress = progress
        self.sources = Sources(drop_cache)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="streammerge")
        self._buffers = [(np.empty(self.window_bytes, dtype=np.uint8), np.empty(self.window_bytes, dtype=np.uint8))
                         for _ in range(self.depth)]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.sources.close()

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _jobs(self, plan: Plan, fp: FilePlan) -> Iterator[tuple[TensorPlan, Box, int]]:
        data_start = fp.layout.data_start
        for e in fp.layout.entries:
            t = plan.tensors[e.name]
            itemsize = max(t.dtype.itemsize, t.source_dtype.itemsize)
            if t.fold is not None:  # float32 copies of the W window and the matching rows of B and A
                itemsize = max(itemsize, 4 * FOLD_COPIES)
            budget = self.window_bytes * t.dtype.itemsize // itemsize
            strides = _row_major(t.geometry)
            for box in windows(t.geometry, t.dtype.itemsize, budget):
                flat = sum(lo * st for (lo, _), st in zip(box, strides))
                yield t, box, data_start + e.begin + flat * t.dtype.itemsize

    def write(self, plan: Plan, fp: FilePlan, path: Path) -> OutputFile:
        """Write one file atomically: temp name, fill, verify with the Rust reader, rename."""
        tmp = tmp_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise output_error(e, path) from None
        try:
            digest = self._fill(plan, fp, fd, tmp)
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
        os.replace(tmp, path)
        return OutputFile(plan.rel(fp.filename), fp.size, digest)

    def _fill(self, plan: Plan, fp: FilePlan, fd: int, tmp: Path) -> str:
        try:
            os.posix_fallocate(fd, 0, fp.size)  # reserves the space: a full disk fails now, not halfway
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                raise
            os.ftruncate(fd, fp.size)
        header = fp.layout.header
        os.pwrite(fd, header, 0)
        sha = hashlib.sha256(header)
        inflight: deque[tuple[Future, int]] = deque()
        free = list(range(self.depth))
        behind = WriteBehind(fd, 0, chunk=self.flush_bytes, limit=4 * self.flush_bytes, enabled=self.drop_cache)

        def finish_oldest() -> None:
            fut, slot = inflight.popleft()
            n, offset = fut.result()
            sha.update(memoryview(self._buffers[slot][0])[:n])
            free.append(slot)
            behind.advance(offset + n)
            if self.progress:
                self.progress(n)

        try:
            for t, box, offset in self._jobs(plan, fp):
                if not free:
                    finish_oldest()
                slot = free.pop()
                inflight.append((self._pool.submit(self._job, t, box, offset, fd, slot), slot))
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
        return sha.hexdigest()

    def _job(self, t: TensorPlan, box: Box, offset: int, fd: int, slot: int) -> tuple[int, int]:
        out, scratch = self._buffers[slot]
        if t.fold is not None:
            from .compute import fill_fold_window

            n = fill_fold_window(t, box, out, scratch, self.sources)
        else:
            n = fill_window(t, box, out, scratch, self.sources)
        view = memoryview(out)[:n]
        done = 0
        while done < n:
            done += os.pwrite(fd, view[done:], offset + done)
        return n, offset


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
    cause = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
             errno.EPERM: "permission denied"}.get(e.errno, f"write failed ({e.strerror or e})")
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
