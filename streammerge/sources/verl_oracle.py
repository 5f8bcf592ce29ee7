"""verify's reference reader for veRL rank files: torch itself, sharing no code with the merge's readers.

Each rank file is opened with `torch.load(mmap=True, weights_only=True)` (torch's zip reader and
its weights-only unpickler; tensor bytes are memory-mapped, not read), and each DTensor's place in
the full tensor comes from torch's own placement logic (`_compute_local_shape_and_global_offset`),
given the mesh shape and this rank's coordinate. Where a DeviceMesh pickled by another torch version
cannot say its shape, the shape is the factorisation of the world size under which torch's logic
gives every rank exactly the local shape it holds.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import math
import mmap
import os
import struct
import threading
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..checksum import crc32
from ..errors import CheckpointError
from .base import Oracle, bytes_rows
from .picklescan import torch_load
from .rankfile import row_major_coordinate

Box = tuple[tuple[int, int], ...]
_STREAM_CHUNK = 8 * 2**20
_DATA_DESCRIPTOR, _UTF8_NAME = 0x8, 0x800  # zip flag bits torch.save sets


class VerlOracle(Oracle):
    """Tensors of veRL rank files (model and optimizer files), as torch loads them.

    Safe to share between threads (verify compares tensors in parallel). Tensor bytes are mapped, so
    `release` unmaps the pages of a compared tensor again: the resident set stays at the tensors in use.
    """

    thread_safe = True

    def __init__(self, files: Sequence[Path], world_size: int):
        self.files, self.world_size = list(files), world_size
        self._loaded: dict[Path, dict[str, Any]] = {}
        self._placed: dict[str, list[tuple[Any, tuple[int, ...], Path]]] = {}
        # each placed piece's replicas (HSDP, plain copies): (local tensor, its file), compared with the piece read
        self._copies: dict[str, list[list[tuple[Any, Path]]]] = {}
        self._diverged: dict[tuple[str, Path], str] = {}  # (tensor, replica's file) -> its first disagreement
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._as_read: _CrcAsRead | None = None
        self._zip_reader: collections.Counter[str] = collections.Counter()  # records not streamed, by why

    def release(self, t: Any) -> None:
        """Drop the mapped pages of the pieces a compared tensor read (they are re-read from the file if needed)."""
        names = [s.name for s in [t.source] + ([t.fold.a, t.fold.b] if getattr(t, "fold", None) else [])]
        for name in names:
            with self._lock:
                pieces = self._placed.get(name, [])
                copies = self._copies.get(name, [])
            for local, _, _ in pieces:
                _unmap_pages(local)
            for local, _ in (c for group in copies for c in group):
                _unmap_pages(local)

    def prefetch(self) -> None:
        """Queue what torch.load(mmap=True) reads: the small records (data.pkl, ...) and the local zip header of
        each tensor record, read to find where its data starts. They are scattered through the file."""
        if not hasattr(os, "posix_fadvise"):
            return
        for path in self.files:
            try:
                with zipfile.ZipFile(path) as z:
                    infos = z.infolist()
                fd = os.open(path, os.O_RDONLY)
            except (OSError, zipfile.BadZipFile):
                continue  # torch.load says what is wrong with it
            try:
                for info in infos:
                    header = 30 + len(info.filename.encode()) + len(info.extra) + _PAGE  # local extra may differ
                    tensor = "/data/" in info.filename
                    os.posix_fadvise(fd, info.header_offset, header + (0 if tensor else info.compress_size),
                                     os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # advice only: the reads happen anyway
            finally:
                os.close(fd)

    def crc_as_read(self) -> bool:
        """Check each tensor record's CRC-32 from the bytes the comparison reads through torch, not in a stream
        of its own; `check_integrity` then reads only the records no comparison read front to back. Call before
        anything is loaded. For machines whose page cache cannot hold the rank files: there a stream's pages
        are evicted before the comparison reads them, and every byte is read from disk twice."""
        self._as_read = _CrcAsRead()
        return True

    def load_all(self) -> None:
        """torch.load every rank file, several at once: each waits on its own small reads, not on the others'."""
        from concurrent.futures import ThreadPoolExecutor

        from ..pipeline import cpu_count

        with ThreadPoolExecutor(max(1, min(8, cpu_count(), len(self.files))),
                                thread_name_prefix="streammerge-load") as pool:
            list(pool.map(self._state, self.files))

    def _state(self, path: Path) -> dict[str, Any]:
        with self._lock:
            loaded = self._loaded.get(path)
        if loaded is None:
            loaded = self._load(path)
            with self._lock:
                loaded = self._loaded.setdefault(path, loaded)
        return loaded

    def _load(self, path: Path) -> dict[str, Any]:
        import torch
        import torch.distributed.tensor  # noqa: F401  (lets weights_only loads rebuild DTensors)

        try:
            with _quiet_mesh_log():
                obj = torch_load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch refuses it: the merge's reader must not have accepted it either
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: torch.load(weights_only=True) refuses it ({why})") from None
        try:
            flat = dict(_flat(obj))
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if self._as_read is not None:
            self._as_read.add_file(path, flat.values())
        return flat

    def _files_for(self, name: str) -> list[Path]:
        optim = name.startswith("state.")
        return [p for p in self.files if p.name.startswith("optim_" if optim else "model_")]

    def shape(self, name: str) -> tuple[tuple[int, ...], str] | None:
        # the first file holding it: FSDP1 with use_orig_params has a parameter's state only on its ranks
        v = next((self._state(p)[name] for p in self._files_for(name) if name in self._state(p)), None)
        if v is None or not hasattr(v, "shape"):
            return None
        return tuple(v.shape), str(v.dtype).removeprefix("torch.")

    def _pieces(self, name: str) -> list[tuple[Any, tuple[int, ...], Path]]:
        """(local tensor, its offset in the full tensor, its file) for every distinct piece of `name`."""
        with self._lock:
            return self._pieces_locked(name)

    def _pieces_locked(self, name: str) -> list[tuple[Any, tuple[int, ...], Path]]:
        if name in self._placed:
            return self._placed[name]
        from torch.distributed.tensor import DTensor

        files = self._files_for(name)
        got = [self._state(p).get(name) for p in files]
        plain = next(((v, p) for v, p in zip(got, files) if v is not None and not isinstance(v, DTensor)), None)
        if plain is not None:  # a full copy on every rank holding it (FSDP1 use_orig_params: not all do); read one
            self._placed[name] = [(plain[0], (0,) * plain[0].dim(), plain[1])]
            # the others are its replicas (only tensors whose full shape torch sees here are read: not flat pieces)
            self._copies[name] = [[(v, p) for v, p in zip(got, files) if v is not None and v is not plain[0]
                                   and not isinstance(v, DTensor) and (v.shape, v.dtype) == (plain[0].shape,
                                                                                              plain[0].dtype)]]
            return self._placed[name]
        if any(v is None for v in got):
            raise CheckpointError(f"{files[got.index(None)]}: torch.load finds no tensor {name!r}")
        values: list[Any] = got
        first = values[0]
        shape = tuple(first.shape)
        mesh_shape = _mesh_shape(first, values)
        pieces: list[tuple[Any, tuple[int, ...], Path]] = []
        copies: list[list[tuple[Any, Path]]] = []
        seen: dict[tuple[int, ...], int] = {}
        for rank, v in enumerate(values):
            local = v._local_tensor
            coordinate = _coordinate(v, rank, mesh_shape)
            want, offset = _torch_placement(shape, mesh_shape, coordinate, v.placements)
            if tuple(local.shape) != want:
                raise CheckpointError(f"{files[rank]}: tensor {name!r}: torch's placement logic gives rank {rank} "
                                      f"a {list(want)} piece, the file holds {list(local.shape)}")
            if not local.numel():
                continue
            if offset in seen:  # a replica (HSDP): the merge reads the first; verify compares the others with it
                copies[seen[offset]].append((local, files[rank]))
            else:
                seen[offset] = len(pieces)
                pieces.append((local, offset, files[rank]))
                copies.append([])
        self._placed[name] = pieces
        self._copies[name] = copies
        return pieces

    def read(self, name: str, box: Box) -> Any:
        import torch

        pieces = self._pieces(name)
        with self._lock:
            copies = self._copies.get(name, [])
        out = torch.empty(tuple(hi - lo for lo, hi in box), dtype=pieces[0][0].dtype if pieces else torch.float32)
        filled = 0
        for i, (local, offset, path) in enumerate(pieces):
            lo = [max(b[0], o) for b, o in zip(box, offset)]
            hi = [min(b[1], o + n) for b, o, n in zip(box, offset, local.shape)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            where = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))
            src = local[where]
            dst = out[tuple(slice(a - b0, b - b0) for a, b, (b0, _) in zip(lo, hi, box))]
            dst.copy_(src)
            if self._as_read is not None:
                self._as_read.window(path, local, src)
            _unmap_span(src)  # read once: keep the resident set at a window, not the whole mapped tensor
            for copy, copy_path in copies[i] if i < len(copies) else ():
                self._compare_replica(name, copy[where], copy, copy_path, dst, path, lo)
            filled += math.prod(b - a for a, b in zip(lo, hi))
        if filled != out.numel():
            raise CheckpointError(f"{name!r}: the rank files' pieces cover {filled} of the {out.numel()} elements "
                                  f"of the box {list(box)}")
        return out

    def _compare_replica(self, name: str, src: Any, local: Any, path: Path, want: Any, read_from: Path,
                         lo: Sequence[int]) -> None:
        """One window of a replica against the same window of the piece the merge reads, bit for bit."""
        import torch

        if self._as_read is not None:
            self._as_read.window(path, local, src)
        a, b = bytes_rows(src), bytes_rows(want)
        _unmap_span(src)
        if torch.equal(a, b) or (name, path) in self._diverged:
            return
        differs = (a != b).any(dim=1)
        first = int(differs.nonzero()[0]) if differs.any() else 0
        index = [int(i) + o for i, o in zip(row_major_coordinate(first, tuple(src.shape)), lo)]
        with self._lock:
            self._diverged.setdefault((name, path), (
                f"{path}: tensor {name!r}: {int(differs.sum())} of {differs.numel()} elements in one window differ "
                f"from its replica in {read_from.name} (first at index {index}): replicas of one shard hold the same "
                f"values, so one of these files diverged or comes from another save (the merge copies "
                f"{read_from.name}'s); copy the rank files of one save again"))

    def disagreements(self) -> list[str]:
        """The replicas `read` found to differ, and the plain optimizer tensors it never reads (FSDP1's flat shards,
        whose output tensors are compared through the merge's reader) against their HSDP replicas."""
        self._compare_plain_replicas()
        with self._lock:
            return [self._diverged[k] for k in sorted(self._diverged, key=lambda k: (str(k[1]), k[0]))]

    def _replica_groups(self) -> list[list[int]]:
        """Ranks holding the same shard (coordinates equal on the mesh dims the model's DTensors are Shard on), from
        the model files; [] unless some shard has more than one copy (HSDP)."""
        from torch.distributed.tensor import DTensor, Shard

        model = [p for p in self.files if p.name.startswith("model_")]
        if len(model) < 2:
            return []
        first = self._state(model[0])
        name = next((n for n, v in first.items() if isinstance(v, DTensor)), None)
        if name is None:
            return []
        got = [self._state(p).get(name) for p in model]
        values = [v for v in got if isinstance(v, DTensor)]
        if len(values) != len(got):
            return []
        mesh_shape = _mesh_shape(values[0], values)
        dims = [d for d, pl in enumerate(values[0].placements) if isinstance(pl, Shard)]
        groups: dict[tuple[int, ...], list[int]] = {}
        for rank, v in enumerate(values):
            coordinate = _coordinate(v, rank, mesh_shape)
            groups.setdefault(tuple(coordinate[d] for d in dims), []).append(rank)
        return [g for g in groups.values() if len(g) > 1]

    def _compare_plain_replicas(self) -> None:
        from torch.distributed.tensor import DTensor

        optim = [p for p in self.files if p.name.startswith("optim_")]
        if not optim:
            return
        groups = [[optim[r] for r in g if r < len(optim)] for g in self._replica_groups()]
        window = _STREAM_CHUNK
        for group in groups:
            first = self._state(group[0])
            for path in group[1:]:
                other = self._state(path)
                for name, v in first.items():
                    copy = other.get(name)
                    if (isinstance(v, DTensor) or not hasattr(v, "shape") or copy is None or isinstance(copy, DTensor)
                            or (copy.shape, copy.dtype) != (v.shape, v.dtype) or not v.is_contiguous()
                            or not copy.is_contiguous() or v.dim() > 1 or (name, path) in self._diverged):
                        continue  # DTensors and full copies are compared as read; other shapes the merge refuses
                    a, b = v.reshape(-1), copy.reshape(-1)
                    step = max(1, window // max(1, v.element_size()))
                    for lo in range(0, a.numel(), step):
                        want, src = a[lo:lo + step], b[lo:lo + step]
                        if self._as_read is not None:  # read in order: the record's CRC-32 need not be streamed
                            self._as_read.window(group[0], v, want)
                        self._compare_replica(name, src, copy, path, want, group[0], [lo] if v.dim() else [])
                        _unmap_span(want)
                        if (name, path) in self._diverged:
                            break

    def locate(self, name: str, index: tuple[int, ...]) -> str:
        for local, offset, path in self._pieces(name):
            if all(o <= i < o + n for i, o, n in zip(index, offset, local.shape)):
                return f"rank {self.files.index(path) % self.world_size}'s file {path.name}"
        return "the checkpoint"

    def check_integrity(self, paths: Sequence[Path]) -> list[str]:
        """Every zip record's CRC32 (torch.load checks none): the central directory from the standard library's
        zip reader, plain stored records streamed by `_stream_crc`, any other kind by the zip reader itself."""
        as_read = self._as_read
        problems = [p for path in paths for p in as_read.problems.get(Path(path), [])] if as_read else []
        view = memoryview(bytearray(_STREAM_CHUNK))  # one buffer per call: verify runs these side by side
        for path in paths:
            record = "?"
            try:
                with zipfile.ZipFile(path) as z:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        for info in z.infolist():
                            record = info.filename
                            if info.CRC == 0:  # saved without CRCs (torch.serialization.set_crc32_options(False))
                                continue
                            if as_read is not None:  # one thread: verify streams nothing beside the comparison
                                if (Path(path), info.filename) in as_read.checked:
                                    self.crc_from_reads += 1
                                    continue
                                self.crc_streamed += 1
                            if self._closed.is_set():
                                break
                            why = _not_plain(info)
                            if why is None:
                                _stream_crc(fd, info, view, self._closed)
                                continue
                            with self._lock:
                                self._zip_reader[why] += 1
                            with z.open(info) as fh:
                                while not self._closed.is_set() and fh.read(4 * 2**20):
                                    pass
                    finally:
                        os.close(fd)
            except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError, RuntimeError, NotImplementedError,
                    zlib.error) as e:  # the last four: flag bits or compression a damaged directory claims
                problems.append(f"{path}: zip record {record} fails its CRC32 check ({e}): the rank file is "
                                "corrupted (changed after torch.save wrote it); "
                                "copy it again from the node that saved it")
        return problems

    def crc_by_slow_reader(self) -> dict[str, int]:
        with self._lock:
            return dict(self._zip_reader)

    def close(self) -> None:
        """Also ends the checksum streams early (a verify that stopped on an error)."""
        self._closed.set()
        self._loaded.clear()
        self._placed.clear()
        self._copies.clear()


class _CrcAsRead:
    """Running CRC-32s of tensor records, fed by the windows the comparison reads in order.

    torch.load(mmap=True) maps each whole file; where /proc/self/maps says the mapping starts, a storage's address
    gives its offset in the file, which must be the data start of a record of the storage's size. A record read
    out of order, or by two tensors, is left to the stream of `check_integrity`. Each mapping is marked
    sequential (MADV_SEQUENTIAL): faults read ahead rather than around, and pages already compared are not
    kept for their second touch (readahead, then the comparison) over pages read ahead and not used yet.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[Path, dict[int, tuple[int, int, str]]] = {}  # storage address -> (size, crc, name)
        self._running: dict[tuple[Path, int], tuple[int, int] | None] = {}  # -> (bytes done, crc); None: given up
        self._busy: set[tuple[Path, int]] = set()
        self.checked: set[tuple[Path, str]] = set()  # (file, record name) checked from what was read
        self.problems: dict[Path, list[str]] = {}

    def add_file(self, path: Path, values: Any) -> None:
        storages = {}
        for v in values:
            local = getattr(v, "_local_tensor", v)
            if hasattr(local, "untyped_storage") and local.device.type == "cpu":
                s = local.untyped_storage()
                if s.nbytes():
                    storages[s.data_ptr()] = s.nbytes()
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                records = {start: (size, crc, name) for start, size, crc, name in zip_records(path, fd)}
            finally:
                os.close(fd)
        except OSError:
            return
        base = _mapped_at(path, min(storages)) if storages else None
        if base is not None and all(records.get(ptr - base, (None,))[0] == n for ptr, n in storages.items()):
            with self._lock:
                self._records[path] = {ptr: records[ptr - base] for ptr in storages}
            if _libc is not None and hasattr(_libc, "madvise"):
                _libc.madvise(ctypes.c_void_p(base), ctypes.c_size_t(os.path.getsize(path) // _PAGE * _PAGE),
                              _MADV_SEQUENTIAL)

    def window(self, path: Path, local: Any, src: Any) -> None:
        """`src`, a view of `local` read by the comparison: continue its record's CRC, or give the record up."""
        import torch

        storage = local.untyped_storage()
        record = self._records.get(path, {}).get(storage.data_ptr())
        if record is None or src.numel() == 0:
            return
        key = (path, storage.data_ptr())
        at = src.data_ptr() - storage.data_ptr()
        with self._lock:
            state = self._running.get(key, (0, 0))
            if state is None or key in self._busy or at < state[0] or not src.is_contiguous():
                self._running[key] = None
                return
            self._busy.add(key)
        done, crc = state
        if at > done:
            crc = crc32(_storage_bytes(storage, done, at), crc)
        crc = crc32(src.reshape(-1).view(torch.uint8).numpy(), crc)
        done = at + src.numel() * src.element_size()
        size, want, name = record
        end = (local.storage_offset() + local.numel()) * local.element_size()
        if done == end and local.is_contiguous():
            crc = crc32(_storage_bytes(storage, done, size), crc)
            done = size
        with self._lock:
            self._busy.discard(key)
            if self._running.get(key, (0, 0)) is None:
                return
            self._running[key] = (done, crc)
            if done == size:
                self.checked.add((path, name))
                if want != 0 and crc != want:  # 0: saved without CRCs
                    self.problems.setdefault(path, []).append(
                        f"{path}: zip record {name} fails its CRC32 check (over the bytes torch.load mapped): the "
                        "rank file is corrupted (changed after torch.save wrote it); copy it again from the node that "
                        "saved it")


def _mapped_at(path: Path, address: int) -> int | None:
    """The address byte 0 of `path` would have in this process's mapping of it that holds `address`."""
    try:
        target = os.stat(path)
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= address < hi and len(fields) == 6 and int(fields[4]) == target.st_ino:
                    return lo - int(fields[2], 16)
    except (OSError, ValueError):
        pass
    return None


def _storage_bytes(storage: Any, lo: int, hi: int) -> Any:
    """Bytes [lo, hi) of a storage, as an array; its mapped pages are let go again."""
    import torch

    view = torch.empty(0, dtype=torch.uint8).set_(storage, lo, (hi - lo,), (1,))
    data = view.numpy().copy()
    _unmap_span(view)
    return data


def _not_plain(info: zipfile.ZipInfo) -> str | None:
    """Why `_stream_crc` cannot read a record (None: a plain stored record, as torch.save writes them)."""
    if info.compress_type != zipfile.ZIP_STORED:
        return f"compressed (method {info.compress_type})"
    if info.flag_bits & ~(_DATA_DESCRIPTOR | _UTF8_NAME):
        return f"flag bits {info.flag_bits:#06x}"
    if info.compress_size != info.file_size:
        return "stored sizes that differ"
    return None


def _stream_crc(fd: int, info: zipfile.ZipInfo, view: memoryview, closed: threading.Event) -> None:
    """CRC-32 of a plain stored record (`_not_plain` says which), read with os.preadv into one reused buffer;
    raises BadZipFile on a mismatch or a local header that disagrees with the directory, EOFError on a short file.
    Hand-written instead of zipfile's reader because that allocates a new buffer per read and runs Python between
    reads while holding the GIL, which verify's import of torch on another thread waits for: the streams run during
    that import."""
    local = _local_header(fd, info)
    if local is None:
        raise zipfile.BadZipFile(f"bad local header of {info.filename!r}")
    flags, name_len, pos = local
    name = os.pread(fd, name_len, info.header_offset + 30).decode("utf-8" if flags & _UTF8_NAME else "cp437")
    if name != info.orig_filename:  # as zipfile's open() checks
        raise zipfile.BadZipFile(f"file name in directory {info.filename!r} and local header {name!r} differ")
    end, crc = pos + info.file_size, 0
    while pos < end:
        if closed.is_set():
            return
        n = os.preadv(fd, [view[:min(len(view), end - pos)]], pos)
        if n == 0:
            raise EOFError(f"the file ends inside record {info.filename!r}")
        crc = crc32(view[:n], crc)
        pos += n
    if crc != info.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")


def zip_records(path: str | Path, fd: int) -> list[tuple[int, int, int, str]]:
    """(data start, size, crc32, name) of each stored zip entry, from the central directory and local headers."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except zipfile.BadZipFile:
        return []
    out = []
    for info in infos:
        local = _local_header(fd, info)
        if local is not None:
            out.append((local[2], info.file_size, info.CRC, info.filename))
    return sorted(out)


def _local_header(fd: int, info: zipfile.ZipInfo) -> tuple[int, int, int] | None:
    """(flag bits, name length, data start) from a record's local header; None where no local header is there."""
    local = os.pread(fd, 30, info.header_offset)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        return None
    flags, = struct.unpack("<H", local[6:8])
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return flags, name_len, info.header_offset + 30 + name_len + extra_len


_quiet_lock = threading.Lock()
_quiet_users = 0
_quiet_level = logging.NOTSET


@contextlib.contextmanager
def _quiet_mesh_log() -> Iterator[None]:
    """Silence torch's warning about meshes unpickled without process groups while any thread loads."""
    global _quiet_users, _quiet_level
    log = logging.getLogger("torch.distributed.device_mesh")
    with _quiet_lock:
        if _quiet_users == 0:
            _quiet_level = log.level
            log.setLevel(logging.ERROR)
        _quiet_users += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_users -= 1
            if _quiet_users == 0:
                log.setLevel(_quiet_level)


_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None  # libc's symbols, no ldconfig child
_MADV_DONTNEED = 4
_MADV_SEQUENTIAL = 2
_PAGE = mmap.PAGESIZE


def _unmap_pages(local: Any) -> None:
    """madvise(DONTNEED) over a memory-mapped tensor's storage: a private, read-only file mapping
    faults the pages back from the file when touched again, so this only bounds the resident set."""
    if _libc is None or not hasattr(_libc, "madvise"):
        return
    try:
        storage = local.untyped_storage()
        start, n = storage.data_ptr(), storage.nbytes()
    except Exception:  # not a plain CPU storage
        return
    if n <= 0 or start == 0:
        return
    lo = start // _PAGE * _PAGE
    hi = -(-(start + n) // _PAGE) * _PAGE
    _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _unmap_span(view: Any) -> None:
    """madvise(DONTNEED) over the pages a strided view of a mapped tensor spans."""
    if _libc is None or not hasattr(_libc, "madvise") or view.numel() == 0:
        return
    start = view.data_ptr()
    span = (sum((n - 1) * st for n, st in zip(view.shape, view.stride())) + 1) * view.element_size()
    lo = start // _PAGE * _PAGE
    hi = -(-(start + span) // _PAGE) * _PAGE
    _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


_NAMES = (str, int)  # keys that make names; the merge reads nothing under another (str() of a deep tuple recurses)


def _flat(obj: Any, prefix: str = "", seen: set[int] | None = None) -> Any:
    """A model state dict as is; an optimizer's nested state as `state.<int>.<key>` (as the optimizer plan names it).

    Each dict is walked once (a pickle can share one dict many times over, whose walk would never end).
    """
    seen = seen if seen is not None else set()
    if id(obj) in seen or prefix.count(".") > 64:
        raise CheckpointError(f"state {prefix.rstrip('.')!r} holds a dict already seen, or nests too deep")
    seen.add(id(obj))
    if isinstance(obj, dict) and "state" in obj and "param_groups" in obj and not prefix:
        for pid, entry in obj["state"].items():
            if isinstance(pid, _NAMES):
                yield from _flat(entry, f"state.{pid}.", seen)
        return
    for k, v in (obj.items() if isinstance(obj, dict) else ()):
        if not isinstance(k, _NAMES):
            continue
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.", seen)
        else:
            yield f"{prefix}{k}", v


def _coordinate(v: Any, rank: int, mesh_shape: tuple[int, ...]) -> Sequence[int]:
    """Where a rank's DTensor sits in the mesh: the coordinate it pickled (a renamed file keeps its place), else the
    one its rank number gives."""
    return _saved_coordinate(v) or row_major_coordinate(rank, mesh_shape)


def _saved_coordinate(v: Any) -> list[int] | None:
    """The mesh coordinate the saving rank pickled with its DTensor (None where the mesh does not say)."""
    try:
        coordinate = v.device_mesh.get_coordinate()
    except Exception:  # a mesh pickled by another torch version
        return None
    return None if coordinate is None else [int(c) for c in coordinate]


def _torch_placement(shape: tuple[int, ...], mesh_shape: tuple[int, ...], coord: Sequence[int],
                     placements: Sequence[Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    local, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), list(placements))
    return tuple(int(s) for s in local), tuple(int(o) for o in offset)


def _mesh_shape(first: Any, values: Sequence[Any]) -> tuple[int, ...]:
    """The mesh's shape as torch reports it, else the one factorisation torch's placement logic agrees with."""
    world, ndim = len(values), len(first.placements)
    try:
        shape = tuple(int(s) for s in first.device_mesh.shape)
        if math.prod(shape) == world and len(shape) == ndim:
            return shape
    except Exception:  # a mesh pickled by another torch version
        pass
    shape_of = tuple(first.shape)
    fits = []
    for cand in _factorisations(world, ndim):
        if all(_torch_placement(shape_of, cand, row_major_coordinate(r, cand), v.placements)[0]
               == tuple(v._local_tensor.shape) for r, v in enumerate(values)):
            fits.append(cand)
    if len(fits) != 1:
        raise CheckpointError(f"cannot tell the {ndim}-D device mesh of {world} ranks from the rank files "
                              f"(candidates {fits})")
    return fits[0]


def _factorisations(n: int, k: int) -> list[tuple[int, ...]]:
    if k == 1:
        return [(n,)]
    out = []
    for d in range(1, n + 1):
        if n % d == 0:
            out += [(d, *rest) for rest in _factorisations(n // d, k - 1)]
    return out

