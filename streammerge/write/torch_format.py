"""Torch format: one `optimizer.pt` that `torch.load(weights_only=True)` reads, written in bounded memory.

torch.save needs every tensor in memory. Instead we use torch's own two-pass route: under
`torch.serialization.skip_data(materialize_fake_tensors=True)`, torch.save of FakeTensors writes the
pickle and every storage record at its final place, leaving the data regions empty (sparse). The
record offsets are then read back from the file itself (torch.load onto the meta device), each
record is filled window by window straight from the rank files, and the zip CRC-32 of each record,
which torch leaves at 0 when it skips data, is patched in. The result has torch.save's layout (same
records in the same places, 64-byte aligned, one record per tensor; the pickle differs only in memo
references), and its CRCs are right, so zip tools accept it too.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch

from ..checksum import crc32
from ..errors import VerifyError
from ..optimizer.export import flatten, nest
from ..sources.base import row_major
from ..sources.picklescan import torch_load
from .writer import OutputFile, _drop_cache, fill_window, output_error, tmp_path, windows

if TYPE_CHECKING:
    from ..plan import FilePlan, Plan
    from .writer import FileWriter

_LOCAL_SIG = b"PK\x03\x04"
_CENTRAL_SIG = b"PK\x01\x02"
_DESCRIPTOR_SIG = b"PK\x07\x08"


def write_torch_file(plan: Plan, fp: FilePlan, path: Path, writer: FileWriter) -> OutputFile:
    """Write the plan's tensors as a torch.save zip of the nested optimizer state, atomically."""
    import json

    groups = json.loads(plan.index_metadata["param_groups"])
    values = json.loads(plan.index_metadata.get("state_values", "{}"))
    names = set(fp.names)
    tensors = [t for t in plan.tensors.values() if t.name in names]  # plan order: state follows the param order
    tmp = tmp_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _save_skeleton(tmp, {t.name: t for t in tensors}, values, groups)
        offsets = record_offsets(tmp, {t.name: t for t in tensors})
        crcs = _fill(tmp, offsets, plan, writer)
        _patch_crcs(tmp, crcs)
        digest = _hash_and_check(tmp, crcs, writer)
        _check_structure(tmp, plan, fp)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise output_error(e, path, fp.size) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    rel = f"{plan.subdir}/{fp.filename}" if plan.subdir else fp.filename
    return OutputFile(rel, path.stat().st_size, digest)


def _save_skeleton(tmp: Path, tensors: dict, values: dict, groups: list) -> None:
    """torch.save of FakeTensors with skip_data: the pickle and the records' places, no tensor bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fakes = {name: torch.empty(t.shape, dtype=t.dtype.torch()) for name, t in tensors.items()}
    obj = nest({**fakes, **values}, groups)
    with open(tmp, "wb") as fh, torch.serialization.skip_data(materialize_fake_tensors=True):
        sink = _Sink(fh)
        try:
            torch.save(obj, sink)  # a file object gives the records torch's usual "archive/" prefix
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None


class _Sink:
    """The file torch.save writes to. torch's zip writer turns a write or seek that failed (a full disk, a quota)
    into a RuntimeError about file positions that no longer says why; the OSError is kept here to raise instead.
    torch only calls methods of it."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._fh, name)

        def call(*args: Any) -> Any:
            try:
                return method(*args)
            except OSError as e:
                self.error = e
                raise
        return call


def record_offsets(tmp: Path, tensors: dict) -> list[tuple[int, object]]:
    """(byte offset in the file, TensorPlan) for every record, in file order."""
    loaded = flatten(torch_load(tmp, map_location="meta", weights_only=True))
    out = []
    for name, t in tensors.items():
        meta = loaded.get(name)
        if not isinstance(meta, torch.Tensor) or tuple(meta.shape) != t.shape or meta.dtype != t.dtype:
            raise VerifyError(f"{tmp}: torch.save laid out {name!r} differently from the plan")
        offset = meta.untyped_storage()._checkpoint_offset
        if offset is None:
            raise VerifyError(f"{tmp}: torch.save did not record where {name!r} is")
        out.append((offset, t))
    out.sort(key=lambda x: x[0])
    return out


def _fill(tmp: Path, offsets, plan: Plan, writer: FileWriter) -> dict[int, tuple[int, int]]:
    """Copy every tensor into its record; returns {record data offset: (nbytes, crc32)}."""
    budget = writer.window_bytes
    out = np.empty(budget, dtype=np.uint8)
    scratch = np.empty(budget, dtype=np.uint8)
    crcs: dict[int, tuple[int, int]] = {}
    fd = os.open(tmp, os.O_RDWR)
    try:
        for start, t in offsets:
            crc = 0
            strides = row_major(t.geometry)
            for box in windows(t.geometry, t.dtype.itemsize, budget):
                n = fill_window(t, box, out, scratch, writer.sources)
                view = memoryview(out.data)[:n]
                at = start + sum(lo * st for (lo, _), st in zip(box, strides)) * t.dtype.itemsize
                done = 0
                while done < n:
                    done += os.pwrite(fd, view[done:], at + done)
                crc = crc32(view, crc)
                if writer.drop_cache:
                    _drop_cache(fd, at, n, written=True)
                if writer.progress:
                    writer.progress(n)
            crcs[start] = (t.nbytes, crc)
        os.fsync(fd)
    finally:
        os.close(fd)
    return crcs


def _patch_crcs(tmp: Path, crcs: dict[int, tuple[int, int]]) -> None:
    """Write each record's CRC-32 where zip readers look for it: the central directory entry, and the
    data descriptor after the data (torch writes records with descriptors, local header CRC 0) or else
    the local header."""
    with zipfile.ZipFile(tmp) as zf:
        infos = zf.infolist()
        central = zf.start_dir
    with open(tmp, "r+b") as fh:
        fh.seek(central)
        for info in infos:
            entry = fh.tell()
            head = fh.read(46)
            if head[:4] != _CENTRAL_SIG:
                raise VerifyError(f"{tmp}: unexpected zip central directory layout")
            name_len, extra_len, comment_len = struct.unpack("<HHH", head[28:34])
            fh.seek(info.header_offset)
            local = fh.read(30)
            if local[:4] != _LOCAL_SIG:
                raise VerifyError(f"{tmp}: unexpected zip local header at {info.header_offset}")
            data_at = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30]))
            if data_at in crcs:
                nbytes, crc = crcs[data_at]
                if info.file_size != nbytes or info.compress_type != zipfile.ZIP_STORED:
                    raise VerifyError(f"{tmp}: record {info.filename} is not laid out as expected")
                packed = struct.pack("<I", crc)
                if info.flag_bits & 0x08:
                    fh.seek(data_at + nbytes)
                    fh.seek(data_at + nbytes + (4 if fh.read(4) == _DESCRIPTOR_SIG else 0))
                else:
                    fh.seek(info.header_offset + 14)
                fh.write(packed)
                fh.seek(entry + 16)
                fh.write(packed)
            fh.seek(entry + 46 + name_len + extra_len + comment_len)
        fh.flush()
        os.fsync(fh.fileno())


def _hash_and_check(tmp: Path, crcs: dict[int, tuple[int, int]], writer: FileWriter) -> int:
    """Read the finished file once: its CRC-32 (for the manifest) and each record's CRC (what landed on disk)."""
    whole = 0
    spans = sorted((start, start + n, crc) for start, (n, crc) in crcs.items())
    got = {start: 0 for start, _, _ in spans}
    chunk = max(1 << 20, writer.window_bytes)
    buf = bytearray(chunk)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        pos, i = 0, 0
        while True:
            n = os.readv(fd, [buf])
            if n == 0:
                break
            view = memoryview(buf)[:n]
            whole = crc32(view, whole)
            while i < len(spans) and spans[i][1] <= pos:
                i += 1
            j = i
            while j < len(spans) and spans[j][0] < pos + n:
                a, b = max(spans[j][0], pos), min(spans[j][1], pos + n)
                got[spans[j][0]] = crc32(view[a - pos:b - pos], got[spans[j][0]])
                j += 1
            if writer.drop_cache:
                _drop_cache(fd, pos, n, written=False)
            pos += n
    finally:
        os.close(fd)
    bad = [start for start, _, crc in spans if got[start] != crc]
    if bad:
        raise VerifyError(f"{tmp}: {len(bad)} records read back with other bytes than were written (disk error?)")
    return whole


def _check_structure(tmp: Path, plan: Plan, fp: FilePlan) -> None:
    """Re-open with torch.load(weights_only=True) onto meta: every planned tensor is there, as planned."""
    loaded = flatten(torch.load(tmp, map_location="meta", weights_only=True))
    names = {k for k, v in loaded.items() if k.startswith("state.") and isinstance(v, torch.Tensor)}
    if names != set(fp.names):
        raise VerifyError(f"{tmp}: tensors {sorted(names ^ set(fp.names))[:3]} differ from the plan")
    for name in fp.names:
        t, v = plan.tensors[name], loaded[name]
        if tuple(v.shape) != t.shape or v.dtype != t.dtype or math.prod(v.shape) * v.element_size() != t.nbytes:
            raise VerifyError(f"{tmp}: {name!r} reads back as {v.dtype} {list(v.shape)}")
