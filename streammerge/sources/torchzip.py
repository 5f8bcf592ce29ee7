"""The zip directory of a torch checkpoint, read without torch: record names, sizes and byte offsets.

`torch.save` writes an uncompressed zip: `<archive>/data.pkl`, then one record per storage
(`<archive>/data/<key>`), each 64-byte aligned, and the central directory at the end. Reading that
directory is all the planner needs to know where every storage's bytes lie; `zipfile` would do it
too, but at ~6 µs per entry, and checkpoints with 50,000 tensors per rank file are common.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, UnsupportedLayoutError

_EOCD = struct.Struct("<IHHHHIIH")  # signature .. comment length
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes, the name follows
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # 30 bytes
CENTRAL_SIZE, LOCAL_SIZE = _CENTRAL.size, _LOCAL.size
_MAX32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Directory:
    """One zip file's central directory, in file order (as torch wrote it)."""

    path: Path
    size: int  # the file's size
    prefix: str  # the archive folder every record name starts with, "" if none
    names: tuple[str, ...]  # record names without the prefix: "data.pkl", "data/0", ...
    header_offsets: tuple[int, ...]  # where each record's local header starts
    sizes: tuple[int, ...]
    crcs: tuple[int, ...]
    central_offset: int  # where the central directory starts (the end of the last record)
    central_bytes: bytes  # the raw central directory, for comparing rank files
    entry_starts: tuple[int, ...]  # where each entry starts in central_bytes

    def has(self, name: str) -> bool:
        try:
            self.index(name)
            return True
        except CheckpointError:
            return False

    def index(self, name: str) -> int:
        try:
            return self._positions[name]
        except AttributeError:
            object.__setattr__(self, "_positions", {n: i for i, n in enumerate(self.names)})
            return self._positions[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: the zip holds no record {name!r}") from None


def _bad(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: truncated or corrupted rank file ({why}); copy it again from the node that saved it")


def read_central(path: str | Path) -> tuple[int, int, int, bytes]:
    """(file size, entry count, central directory offset, its bytes): the end records, then one read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            tail_len = min(size, _EOCD.size + 0xFFFF + _ZIP64_LOCATOR.size)
            f.seek(size - tail_len)
            tail = f.read(tail_len)
            at = tail.rfind(b"PK\x05\x06")
            if at < 0 or len(tail) - at < _EOCD.size:
                raise _bad(path, f"{size} bytes, no zip end record")
            _, _, _, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
            if count == 0xFFFF or cd_size == _MAX32 or cd_offset == _MAX32:
                loc = at - _ZIP64_LOCATOR.size
                if loc < 0 or tail[loc:loc + 4] != b"PK\x06\x07":
                    raise _bad(path, "zip64 locator missing")
                eocd64_at = _ZIP64_LOCATOR.unpack_from(tail, loc)[2]
                f.seek(eocd64_at)
                rec = f.read(_ZIP64_EOCD.size)
                if len(rec) < _ZIP64_EOCD.size or rec[:4] != b"PK\x06\x06":
                    raise _bad(path, "zip64 end record missing")
                _, _, _, _, _, _, _, count, cd_size, cd_offset = _ZIP64_EOCD.unpack(rec)
            if cd_offset + cd_size > size:
                raise _bad(path, f"central directory past the end of the {size}-byte file")
            f.seek(cd_offset)
            cd = f.read(cd_size)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(cd) != cd_size:
        raise _bad(path, "central directory cut short")
    return size, count, cd_offset, cd


def read_directory(path: str | Path) -> Directory:
    """Parse the end records and the central directory (one read at the end of the file)."""
    path = Path(path)
    size, count, cd_offset, cd = read_central(path)
    names, offsets, sizes, crcs, starts = [], [], [], [], []
    pos = 0
    unpack = _CENTRAL.unpack_from
    for _ in range(count):
        if pos + CENTRAL_SIZE > len(cd):
            raise _bad(path, "central directory cut short")
        (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, _, _, _, lho) = unpack(cd, pos)
        if sig != 0x02014B50:
            raise _bad(path, "bad central directory entry")
        if method != 0 or flags & 1:
            raise UnsupportedLayoutError(f"{path}: compressed or encrypted zip entries are not supported; "
                                         "re-save the file with torch.save")
        name = cd[pos + CENTRAL_SIZE:pos + CENTRAL_SIZE + nlen].decode("utf-8", "replace")
        if usize == _MAX32 or lho == _MAX32 or csize == _MAX32:
            usize, lho = _zip64_fields(cd[pos + CENTRAL_SIZE + nlen:pos + CENTRAL_SIZE + nlen + elen], usize, csize, lho)
        starts.append(pos)
        names.append(name)
        offsets.append(lho)
        sizes.append(usize)
        crcs.append(crc)
        pos += CENTRAL_SIZE + nlen + elen + clen
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise CheckpointError(f"{path}: two zip records named {twice!r} (torch would read one, a copy tool another); "
                              "re-save the file with torch.save")
    prefix = _prefix(path, names)
    cut = len(prefix)
    return Directory(path=path, size=size, prefix=prefix, names=tuple(n[cut:] for n in names),
                     header_offsets=tuple(offsets), sizes=tuple(sizes), crcs=tuple(crcs),
                     central_offset=cd_offset, central_bytes=cd, entry_starts=tuple(starts))


def _zip64_fields(extra: bytes, usize: int, csize: int, lho: int) -> tuple[int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            vals = list(struct.unpack_from(f"<{n // 8}Q", extra, pos + 4))
            if usize == _MAX32 and vals:
                usize = vals.pop(0)
            if csize == _MAX32 and vals:
                vals.pop(0)
            if lho == _MAX32 and vals:
                lho = vals.pop(0)
            break
        pos += 4 + n
    return usize, lho


def _prefix(path: Path, names: list[str]) -> str:
    pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pickles:
        raise CheckpointError(f"{path}: not a torch checkpoint (a zip file without data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    if any(not n.startswith(prefix) for n in names):
        raise CheckpointError(f"{path}: zip records outside the archive folder {prefix!r}")
    return prefix


def data_offsets(d: Directory, indices: list[int] | range | None = None) -> dict[int, int]:
    """Where each record's bytes start: after its local header, whose extra field torch uses as padding."""
    picked = range(len(d.names)) if indices is None else indices
    out: dict[int, int] = {}
    try:
        fd = os.open(d.path, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError(f"{d.path}: cannot read ({e.strerror or e})") from None
    try:
        for i in picked:
            lho = d.header_offsets[i]
            head = os.pread(fd, LOCAL_SIZE, lho)
            if len(head) < LOCAL_SIZE:
                raise _bad(d.path, f"record {d.names[i]} cut short")
            sig, *_, nlen, elen = _LOCAL.unpack(head)
            if sig != 0x04034B50:
                raise _bad(d.path, f"bad local header for {d.names[i]}")
            start = lho + LOCAL_SIZE + nlen + elen
            if start + d.sizes[i] > d.size:
                raise _bad(d.path, f"record {d.names[i]} runs past the end of the file")
            out[i] = start
    finally:
        os.close(fd)
    return out


def storage_offsets(d: Directory, keys: object) -> dict[str, int]:
    """Where the bytes of each storage `data/<key>` start (local headers read in file order)."""
    records = {key: d.index(f"data/{key}") for key in keys}
    at = data_offsets(d, sorted(records.values()))
    return {key: at[i] for key, i in records.items()}


def check_byteorder(d: Directory) -> None:
    """Refuse a file saved big-endian: its tensor bytes would need swapping, which the byte-copying writer never does.

    A file without the record is little-endian, as torch.load assumes by default.
    """
    if "version" not in d.names and ".data/version" not in d.names:
        raise CheckpointError(f"{d.path}: the zip has no version record (torch.load refuses it); "
                              "copy the file again from the node that saved it")
    if "byteorder" not in d.names:
        return
    order = read_record(d, "byteorder")
    if order == b"little":
        return
    if order == b"big":
        raise UnsupportedLayoutError(f"{d.path}: saved on a big-endian machine (its byteorder record says 'big'); "
                                     "load and re-save it with torch.save on a little-endian machine")
    raise CheckpointError(f"{d.path}: unknown byteorder record {order[:20]!r} (torch.load refuses it too)")


def read_record(d: Directory, name: str, *, check_crc: bool = True) -> bytes:
    """One record's bytes (data.pkl), CRC-checked unless it was saved without CRCs (crc 0)."""
    i = d.index(name)
    start = data_offsets(d, [i])[i]
    with open(d.path, "rb") as f:
        f.seek(start)
        data = f.read(d.sizes[i])
    if len(data) != d.sizes[i]:
        raise _bad(d.path, f"record {name} cut short")
    if check_crc and d.crcs[i] != 0 and zlib.crc32(data) != d.crcs[i]:
        raise _bad(d.path, f"CRC mismatch in {name}")
    return data
