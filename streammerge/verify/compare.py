"""Every output tensor against the checkpoint: which of the folder's files holds it, its dtype and shape, then its
bytes, one bounded window at a time in a pool of threads, against what torch's own reader gives (cast or folded by
torch); where there is no such reader, or it has no tensor of that shape, against the source pieces where the
merge's own reader locates them, checking their zip records' CRC-32s from the bytes read. Then the rank files'
CRC-32s and where the oracle's copies disagree. A mismatch names the first element that differs and its source."""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ..checksum import crc32
from ..dtypes import DType
from ..optimizer import OPTIMIZER_DIR, OPTIMIZER_PT
from ..plan import Piece, TensorPlan
from ..sources import Source
from ..sources.base import Oracle, bytes_rows, open_checkpoint_file, pread_into, row_major
from ..sources.verl_oracle import zip_records
from ..write.writer import is_contiguous, windows
from .folder import Entry, Header, check_header_bytes, check_torch_pickle, torch_file_header
from .loading import loaded_map
from .reading import Reading
from .report import VerifyReport
from .small_files import check_optimizer_groups, check_small_files

if TYPE_CHECKING:
    import numpy as np
    import torch  # only comparing tensors with the checkpoint imports torch


def check_against_checkpoint(out: Path, ck: Source, reading: Reading, headers: dict[str, Header],
                             report: VerifyReport, *, chunk: int, workers: int,
                             weight_maps: dict[str, dict]) -> None:
    oracle, readahead, merge_plan = reading.oracle, reading.readahead, reading.plan
    assert merge_plan is not None
    sources = _Sources(chunk)
    own_reader = 0
    tasks: list[Callable[[], None]] = []
    serial: threading.Lock | None = None  # for oracles not made for threads

    def compare(rel: str, header: Header, entry: Entry, name: str, t: TensorPlan, with_oracle: bool) -> None:
        if readahead is not None:
            readahead.reached(t)
        try:
            if with_oracle:
                assert oracle is not None
                with serial or contextlib.nullcontext():
                    _compare_with_oracle(rel, header, entry, t, oracle, report, chunk)
                    oracle.release(t)
            else:
                _compare_tensor(rel, header, entry, name, t, sources, report, chunk)
        except OSError as e:
            report.fail(f"{rel}: tensor {name!r}: cannot read its source ({e})")
        report.count(tensors=1)

    pool = None
    torch_threads = 0
    try:
        plans = merge_plan.plans
        same_merge = reading.manifest is None or merge_plan.fingerprint() == reading.manifest.get("fingerprint")
        if not same_merge:
            report.fail(f"{out}: was not made from {ck.path} with the options it records (its plan fingerprint "
                        "differs); tensors are compared one by one below")
        if ck.oracle_after_plan:
            oracle = reading.oracle = ck.oracle(reading.options)
        # an adapter's base model is found by planning it
        base = ck.lora_base.oracle(reading.options) if ck.lora_base is not None else None
        if oracle is not None and base is not None:
            from ..sources.hf import CombinedOracle

            oracle = reading.oracle = CombinedOracle(oracle, base)
        if oracle is None:
            report.notes.append(f"{ck.format}: no reader independent of the merge's own; tensors are compared with "
                                "the bytes the merge's reader locates")
        elif not getattr(oracle, "thread_safe", False):
            serial = threading.Lock()
        if oracle is not None:
            oracle.load_all()
        import torch

        torch_threads = torch.get_num_threads()  # set back when the comparing threads are done
        pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="streammerge-verify",
                                  initializer=_one_torch_thread)
        check_small_files(out, merge_plan, reading.manifest, report, same_merge=same_merge)
        own_layout = reading.manifest is None  # a folder another tool wrote: its own files, its own tie copies
        for p in plans:
            expected_files = {p.rel(fp.filename): fp for fp in p.files}
            mine = sorted(r for r in headers if (r.startswith(p.subdir + "/") if p.subdir else "/" not in r))
            if own_layout and p.subdir == OPTIMIZER_DIR:  # else the index is compared byte for byte
                check_optimizer_groups(out, p, report)
            if own_layout and not mine and p.subdir:
                pt = p.subdir == OPTIMIZER_DIR and (out / OPTIMIZER_DIR / OPTIMIZER_PT).is_file()
                report.notes.append(f"{OPTIMIZER_DIR}/{OPTIMIZER_PT}: without a manifest only its param groups are "
                                    "compared" if pt else f"{p.subdir}/: not in the folder (a merge would write it)")
                continue
            for rel, fp in expected_files.items():
                if rel not in headers and not (out / rel).is_file():
                    if not own_layout:
                        report.fail(f"{rel}: missing (the checkpoint's plan has it)")
                elif rel.endswith(".pt") and not own_layout:  # torch's format (--optimizer-format torch): its records
                    torch_file = torch_file_header(out / rel, rel, p, fp, report)
                    if torch_file is not None:
                        headers[rel] = torch_file
                        check_torch_pickle(out / rel, rel, p, fp, report)
                elif not rel.endswith(".safetensors"):
                    report.notes.append(f"{rel}: not a safetensors file; checked against the manifest's checksum only")
                elif not own_layout:  # the tensors are compared below; the header says where each one lies
                    check_header_bytes(out / rel, rel, fp.layout.header, report)
            loaded = loaded_map(out, headers, weight_maps) if own_layout and not p.subdir else None
            if loaded is not None:  # compared are the tensors transformers loads, where it finds them
                files = set(loaded.values())
                for rel in sorted(set(mine) - files):
                    report.notes.append(f"{rel}: not a file transformers loads from this folder; not compared")
                mine = [rel for rel in mine if rel in files]
                where = {name: rel for name, rel in loaded.items() if rel in headers}
            elif own_layout:
                where = {name: rel for rel in reversed(mine) for name in headers[rel].entries}
            else:
                where = {name: rel for rel, fp in expected_files.items() for name in fp.names}
            # a tie the config made (not shared storage) is checked as the trained output embedding: its source
            # against the input embedding written in its place, or against the copy a folder of another tool holds
            checks = [(name, t, name) for name, t in p.tensors.items()]
            copies = {name for name in p.tie_checks if own_layout and name in where}
            checks += [(name, t, name if name in copies else p.dropped[name]) for name, t in p.tie_checks.items()]
            for rel in mine:
                extra = sorted(set(headers[rel].entries) - set(p.tensors) - copies)
                for name in [n for n in extra if n in merge_plan.buffers and not p.subdir][:1]:
                    report.notes.append(f"{rel}: holds {name!r} (and any like it), a buffer older transformers saved, "
                                        "which transformers does not read (a merge leaves it out); not compared")
                for name in [n for n in extra if n not in merge_plan.buffers or p.subdir][:5]:
                    report.fail(f"{rel}: holds {name!r}, which the checkpoint does not have")
            for name, t, written in checks:
                rel = where.get(written, "")
                header = headers.get(rel) if rel else None
                if header is None:
                    if own_layout:  # its map holds only what its readable files hold: the tensor is in none
                        report.fail(f"{written!r}: in none of the folder's files (the checkpoint has it)")
                    continue  # else a missing or broken file: reported above
                entry = header.entries.get(written)
                if entry is None:
                    report.fail(f"{rel}: lacks tensor {written!r}")
                    continue
                if entry.dtype != t.dtype or entry.shape != t.shape:
                    report.fail(f"{rel}: tensor {name!r} is {_short(entry.dtype)} {list(entry.shape)}, "
                                f"the checkpoint gives {_short(t.dtype)} {list(t.shape)}")
                    continue
                if oracle is not None and _oracle_can_read(oracle, t, rel, report):
                    tasks.append(functools.partial(compare, rel, header, entry, name, t, True))
                elif t.fold is None:
                    own_reader += 1
                    tasks.append(functools.partial(compare, rel, header, entry, name, t, False))
                else:
                    report.fail(f"{rel}: tensor {name!r}: a LoRA fold that no independent reader can check")
                    report.tensors_checked += 1
        for done in [pool.submit(task) for task in tasks]:
            done.result()
        if readahead is not None and readahead.refused:
            report.notes.append(f"the comparison read the rank files without readahead: {readahead.refused}")
        if oracle is not None:
            # copies the comparison did not read are compared first: their CRC-32s can then come from those reads
            diverged = oracle.disagreements()
            problems = ([m for fut in reading.integrity for m in fut.result()] if reading.crc_pool
                        else oracle.check_integrity(reading.paths))
            if oracle.crc_from_reads:
                report.notes.append(f"{oracle.crc_from_reads} zip records' CRC-32s were computed from the bytes the "
                                    f"comparison read; {oracle.crc_streamed} were streamed")
            slow = oracle.crc_by_slow_reader()
            if slow:
                report.notes.append(f"{sum(slow.values())} zip records' CRC-32s were read through Python's zip reader, "
                                    "not streamed: " + ", ".join(f"{n} {why}" for why, n in sorted(slow.items())))
            for problem in problems + diverged:
                report.fail(problem)
            if own_reader:
                report.notes.append(f"{own_reader} tensors (e.g. FSDP1 flat optimizer state) were compared through "
                                    "the merge's own reader: torch's loader has no tensor of that shape to compare")
        else:
            sources.finish_crcs(report)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(torch_threads)
        sources.close()


def _one_torch_thread() -> None:
    """Each comparing thread runs torch's ops on itself alone: the threads already use every CPU, and intra-op
    threads started from each of them would outnumber the CPUs many times over."""
    import torch

    torch.set_num_threads(1)


def _short(dtype: DType) -> str:
    return dtype.name


def _oracle_can_read(oracle: Oracle, t: TensorPlan, rel: str, report: VerifyReport) -> bool:
    """Whether torch's own reader sees the tensors the plan reads, as the plan sees them; a disagreement fails."""
    if t.flat and not oracle.reads_flat:
        return False
    for s in [t.source] + ([t.fold.a, t.fold.b] if t.fold else []):
        seen = oracle.shape(s.name)
        if seen is None:
            if s is t.source and t.fold is None:
                return False
            report.fail(f"{rel}: tensor {t.name!r}: torch finds no {s.name!r} in the checkpoint")
            return False
        if seen != (s.shape, s.dtype.name):
            report.fail(f"{rel}: tensor {t.name!r}: streammerge's reader sees {s.name!r} as {s.dtype.name} "
                        f"{list(s.shape)}, torch.load as {seen[1]} {list(seen[0])}")
            return False
    return True


def _compare_with_oracle(rel: str, header: Header, entry: Entry, t: TensorPlan, oracle: Oracle,
                         report: VerifyReport, chunk: int) -> None:
    """Each window of the output tensor against what torch's own reader gives (cast, or folded, by torch)."""
    import numpy as np
    import torch

    isz = t.dtype.itemsize
    budget = max(isz, chunk // (4 if t.fold else 1))
    strides = row_major(t.shape)
    scratch = _Scratch.mine()
    with open(header.path, "rb", buffering=0) as out_file:
        for box in windows(t.shape, isz, budget):
            want = _expected(t, box, oracle, scratch).contiguous().reshape(-1).view(torch.uint8)
            first = sum(lo * st for (lo, _), st in zip(box, strides))
            got = scratch.buffer("got", want.numel())
            if not pread_into(out_file.fileno(), got, header.data_start + entry.begin + first * isz):
                report.fail(f"{rel}: tensor {t.name!r}: the file ends inside its data")
                return
            report.count(read=2 * len(got))
            if not np.array_equal(np.frombuffer(got, dtype=np.uint8), want.numpy()) and not (
                    t.fold is None and _only_nan_payloads(t, want, torch.frombuffer(got, dtype=torch.uint8))
                    and _is_merge_cast(t, oracle.read(t.source.name, box), np.frombuffer(got, dtype=np.uint8))):
                _report_window(rel, t, box, want, got, oracle, report)
                return


def _only_nan_payloads(t: TensorPlan, want: torch.Tensor, got: torch.Tensor) -> bool:
    """A cast where the only elements that differ are NaN in both: torch's `.to()` writes other NaN bits on some of
    its paths (a 0-d tensor, a vector's tail) than on others, and the merge's cast matches one of them (cast.py)."""
    import torch

    if t.source_dtype == t.dtype or not t.dtype.is_floating_point:
        return False
    try:
        w, g = want.view(t.dtype.torch()), got.view(t.dtype.torch())
        differ = (bytes_rows(w) != bytes_rows(g)).any(dim=1).reshape(w.shape)
        return bool((torch.isnan(w[differ]) & torch.isnan(g[differ])).all())
    except (RuntimeError, TypeError):  # a dtype isnan does not take
        return False


def _is_merge_cast(t: TensorPlan, src: torch.Tensor, got: np.ndarray) -> bool:
    """Whether `got` (the output window's bytes) is exactly what the merge's own cast (cast.py) writes for `src`,
    NaN bits included: torch's other NaN bits on its scalar paths excuse the merge's bits, not any NaN at all (a
    NaN whose sign or payload was changed afterwards is no longer the merge's output). Casts the merge leaves to
    torch (float8) take any NaN bits torch may write."""
    import numpy as np
    import torch

    from ..write.cast import cast_into, numpy_can_cast

    if not numpy_can_cast(t.source_dtype, t.dtype):
        return True
    source = src.contiguous().reshape(-1).view(torch.uint8).numpy().view(t.source_dtype.numpy)
    mine = np.empty(source.shape, t.dtype.numpy)
    cast_into(mine, source, t.source_dtype, t.dtype)
    return bool(np.array_equal(mine.view(np.uint8), np.asarray(got, dtype=np.uint8).reshape(-1)))


def _report_window(rel: str, t: TensorPlan, box: tuple[tuple[int, int], ...], want: torch.Tensor, got: memoryview,
                   oracle: Oracle, report: VerifyReport) -> None:
    """Name the first element that differs, and the file it comes from."""
    import numpy as np

    isz = t.dtype.itemsize
    rows = (np.frombuffer(want.numpy().tobytes(), np.uint8).reshape(-1, isz)
            != np.frombuffer(bytes(got), np.uint8).reshape(-1, isz))
    bad = rows.any(axis=1)
    shape = tuple(hi - lo for lo, hi in box)
    first = tuple(int(i) + lo for i, (lo, _) in zip(np.unravel_index(int(np.argmax(bad)), shape), box)) if shape else ()
    source = oracle.locate(t.source.name, first)
    report.fail(f"{rel}: tensor {t.name!r}: {int(bad.sum())} of {bad.size} elements in one window differ from "
                f"{source} as torch.load reads it{' and peft folds it' if t.fold else ''} "
                f"(first at index {list(first)})")


def _expected(t: TensorPlan, box: tuple[tuple[int, int], ...], oracle: Oracle, scratch: _Scratch) -> torch.Tensor:
    """The output window as torch computes it: `.to(dtype)` of the source, or peft's fold `W + (B @ A) * scale`
    (a Conv1D's: `W + (B @ A).T * scale`)."""
    src = oracle.read(t.source.name, box).contiguous()  # contiguous first: torch's strided cast writes other NaN bits
    if t.fold is None:
        if src.dtype == t.dtype.torch():
            return src
        return scratch.tensor("want", src.shape, t.dtype.torch()).copy_(src)  # what .to() does, into reused memory
    from ..write.compute import add_delta  # the fold's block shapes: BLAS rounds other shapes otherwise

    fold = t.fold
    rank, cols = fold.a.shape
    work = t.fold_dtype.torch()  # float32, or float64 where W or a factor is
    w = src.to(work).clone()
    a = oracle.read(fold.a.name, ((0, rank), (0, cols))).to(work)
    add_delta(w, lambda lo, hi: oracle.read(fold.b.name, ((lo, hi), (0, rank))).to(work), a, fold.scale,
              fold.b.shape[0], box, fold.transpose)
    return w.to(t.dtype.torch())


class _Scratch:
    """A comparing thread's buffers, reused window after window: fresh ones would be new pages each time, which the
    kernel zeroes and maps in one fault at a time."""

    _local = threading.local()

    def __init__(self) -> None:
        self._bufs: dict[str, bytearray] = {}

    @classmethod
    def mine(cls) -> _Scratch:
        scratch = getattr(cls._local, "scratch", None)
        if scratch is None:
            scratch = cls._local.scratch = cls()
        return scratch

    def buffer(self, slot: str, n: int) -> memoryview:
        buf = self._bufs.get(slot)
        if buf is None or len(buf) < n:
            buf = self._bufs[slot] = bytearray(n)  # a new one: views of the old may still be alive
        return memoryview(buf)[:n]

    def tensor(self, slot: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        import torch

        n = math.prod(shape)
        return torch.frombuffer(self.buffer(slot, max(1, n * dtype.itemsize)), dtype=torch.uint8)[:n * dtype.itemsize] \
            .view(dtype).view(tuple(shape))


class _Sources:
    """Positioned reads of rank files, and the zip CRC32 of every source record a piece reads."""

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.fds: dict[str, int] = {}
        self.records: dict[str, list[tuple[int, int, int, str]]] = {}  # file -> (start, size, crc, name)
        self.checked: set[tuple[str, int]] = set()
        self.needed: dict[tuple[str, int], str] = {}  # record -> a tensor read from it
        self._lock = threading.Lock()  # comparison threads share the descriptors

    def fd(self, path: str) -> int:
        with self._lock:
            if path not in self.fds:
                fd = open_checkpoint_file(path)
                self.records[path] = zip_records(path, fd)
                self.fds[path] = fd
            return self.fds[path]

    def read(self, path: str, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        if not pread_into(self.fd(path), memoryview(buf), offset):
            raise OSError(f"{path}: ends before byte {offset + length}")
        return buf

    def record_of(self, path: str, offset: int) -> tuple[int, int, int, str] | None:
        self.fd(path)
        recs = self.records[path]
        i = bisect.bisect_right(recs, (offset, math.inf)) - 1
        if i >= 0 and recs[i][0] <= offset < recs[i][0] + recs[i][1]:
            return recs[i]
        return None

    def crc(self, path: str, start: int, end: int, crc: int = 0) -> int:
        """Continue a CRC32 over bytes [start, end) of a file, a chunk at a time."""
        for pos in range(start, end, self.chunk):
            crc = crc32(self.read(path, pos, min(self.chunk, end - pos)), crc)
        return crc

    def finish_crcs(self, report: VerifyReport) -> None:
        """Records no single contiguous piece streamed through in order get a sequential pass of their own."""
        for path, start in sorted(set(self.needed) - self.checked):
            rec = next(r for r in self.records[path] if r[0] == start)
            self.check_crc(path, rec, self.crc(path, start, start + rec[1]), report)

    def check_crc(self, path: str, rec: tuple[int, int, int, str], crc: int, report: VerifyReport) -> None:
        self.checked.add((path, rec[0]))
        if rec[2] != 0 and crc != rec[2]:  # 0: saved without CRCs (torch.serialization.set_crc32_options)
            report.fail(f"{path}: zip record {rec[3]} (data of {self.needed.get((path, rec[0]), '?')!r}) fails its "
                        "CRC32 check: the rank file is corrupted (changed after torch.save wrote it); the output "
                        "copies what is there now")

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _storage_order(p: Piece) -> tuple[int, ...]:
    """Dims of a piece from largest stride to smallest: windows in this order read its bytes front to back."""
    return tuple(sorted(range(len(p.shape)), key=lambda d: (-p.stride[d], d)))


def _read_box(fd: int, base: int, shape: tuple[int, ...], lo: tuple[int, ...], sizes: tuple[int, ...],
              dtype: torch.dtype, limit: int) -> torch.Tensor | None:
    """A box of a row-major tensor stored at `base`: one read when its span is small, else one read per run."""
    import torch

    isz = dtype.itemsize
    strides = row_major(shape)
    first = sum(a * st for a, st in zip(lo, strides))
    span = (sum((n - 1) * st for n, st in zip(sizes, strides)) + 1) * isz
    box_bytes = math.prod(sizes) * isz
    if span <= max(limit, 2 * box_bytes):
        raw = bytearray(span)
        if not pread_into(fd, memoryview(raw), base + first * isz):
            return None
        flat = torch.frombuffer(raw, dtype=torch.uint8)
        box = flat.as_strided(sizes + (isz,), tuple(st * isz for st in strides) + (1,))
        return box.contiguous().view(-1).view(dtype).view(sizes)
    k = max((d for d in range(len(shape)) if sizes[d] != shape[d]), default=0)  # dims after k are whole
    run = sizes[k] * strides[k] * isz
    out = bytearray(box_bytes)
    view, pos = memoryview(out), 0
    for idx in itertools.product(*(range(a, a + n) for a, n in zip(lo[:k], sizes[:k]))):
        offset = sum(i * st for i, st in zip(idx, strides)) + lo[k] * strides[k]
        if not pread_into(fd, view[pos:pos + run], base + offset * isz):
            return None
        pos += run
    return torch.frombuffer(out, dtype=torch.uint8).view(dtype).view(sizes)


def _compare_tensor(rel: str, header: Header, entry: Entry, name: str, t: TensorPlan, sources: _Sources,
                    report: VerifyReport, chunk: int) -> None:
    """Compare an output tensor with its source pieces, one bounded window of each piece at a time.

    Windows follow each piece's storage order, so a strided piece is read front to back like a
    contiguous one; the output box is gathered with positioned reads (no mmap, bounded memory).
    """
    import torch

    src_isz, out_isz = t.source_dtype.itemsize, t.dtype.itemsize
    budget = max(1, chunk // max(src_isz, out_isz)) * src_isz
    base = header.data_start + entry.begin
    with open(header.path, "rb", buffering=0) as out_file:
        for p in t.pieces:
            order = _storage_order(p)
            inverse = tuple(order.index(d) for d in range(len(order)))
            pshape = tuple(p.shape[d] for d in order)
            pstride = tuple(p.stride[d] for d in order)
            rec = sources.record_of(p.file, p.offset)
            if rec is not None:
                sources.needed.setdefault((p.file, rec[0]), name)
            streaming = (rec is not None and (p.file, rec[0]) not in sources.checked and is_contiguous(pshape, pstride)
                         and p.offset + math.prod(p.shape) * src_isz <= rec[0] + rec[1])
            crc = 0
            if streaming:
                assert rec is not None  # streaming needs the piece's record
                crc = sources.crc(p.file, rec[0], p.offset)
            for pbox in windows(pshape, src_isz, budget):
                psizes = tuple(hi - lo for lo, hi in pbox)
                plo = tuple(lo for lo, _ in pbox)
                src_off = p.offset + sum(i * st for i, st in zip(plo, pstride)) * src_isz
                span = (sum((n - 1) * st for n, st in zip(psizes, pstride)) + 1) * src_isz
                raw = sources.read(p.file, src_off, span)
                if streaming:
                    crc = crc32(raw, crc)
                src = torch.frombuffer(raw, dtype=torch.uint8).view(t.source_dtype.torch())
                # contiguous before the cast: torch writes other NaN bits for strided tensors (see cast.py)
                source = src.as_strided(psizes, pstride).permute(inverse).contiguous()
                want = source.to(t.dtype.torch())
                sizes = tuple(psizes[inverse[d]] for d in range(len(order)))
                lo = tuple(s + plo[inverse[d]] for d, s in enumerate(p.start))
                got = _read_box(out_file.fileno(), base, t.geometry, lo, sizes, t.dtype.torch(), chunk)
                report.count(read=span + math.prod(sizes) * out_isz)
                if got is None:
                    report.fail(f"{rel}: tensor {name!r}: the file ends inside its data")
                    return
                want_bytes, got_bytes = want.reshape(-1).view(torch.uint8), got.reshape(-1).view(torch.uint8)
                if not torch.equal(want_bytes, got_bytes) and not (
                        _only_nan_payloads(t, want_bytes, got_bytes) and _is_merge_cast(t, source, got_bytes.numpy())):
                    _report_mismatch(rel, name, p, want, got, lo, t, report)
                    return
            if streaming:
                assert rec is not None
                crc = sources.crc(p.file, p.offset + math.prod(p.shape) * src_isz, rec[0] + rec[1], crc)
                sources.check_crc(p.file, rec, crc, report)


def _report_mismatch(rel: str, name: str, p: Piece, want: torch.Tensor, got: torch.Tensor, lo: tuple[int, ...],
                     t: TensorPlan, report: VerifyReport) -> None:
    differs = (bytes_rows(want) != bytes_rows(got)).any(dim=1)
    first = int(differs.nonzero()[0])
    index = []
    for n in reversed(want.shape):
        index.append(first % n)
        first //= n
    at = [a + i for a, i in zip(lo, reversed(index))]
    where = f"flat index {at[0]}" if t.flat else f"index {at}"
    report.fail(f"{rel}: tensor {name!r}: {int(differs.sum())} of {want.numel()} elements in one window differ "
                f"from rank {p.rank}'s file {Path(p.file).name} (first at {where})")
