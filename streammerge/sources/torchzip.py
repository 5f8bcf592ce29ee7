"""The zip directory of a torch checkpoint, read without torch: record names, sizes and byte offsets.

`torch.save` writes an uncompressed zip: `<archive>/data.pkl`, then one record per storage
(`<archive>/data/<key>`), each 64-byte aligned, and the central directory at the end. Reading that
directory is all the planner needs to know where every storage's bytes lie; `zipfile` would do it
too, but at ~6 µs per entry, and checkpoints with 50,000 tensors per rank file are common.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..checksum import crc32
from ..errors import CheckpointError, UnsupportedLayoutError
from .base import no_readahead

_EOCD = struct.Struct("<IHHHHIIH")  # signature .. comment length
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes, the name follows
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # 30 bytes
CENTRAL_SIZE, LOCAL_SIZE = _CENTRAL.size, _LOCAL.size
_MAX32 = 0xFFFFFFFF
_MAX_VERSION = 10  # the newest file format version torch's reader reads (kMaxSupportedFileFormatVersion)
REFUSED_FLAGS = 0x2061  # zip entries encrypted, patched or masked: torch's zip reader refuses them


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

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def index(self, name: str) -> int:
        try:
            return self._positions[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: the zip holds no record {name!r}") from None


def _bad(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {_corrupted(why)}")


def _corrupted(why: str) -> str:
    return f"truncated or corrupted rank file ({why}); copy it again from the node that saved it"


def on_one_disk(disk: int, cd_disk: int, count: int, on_disk: int) -> bool:
    """An end record's disk fields as torch's zip reader (miniz) takes them: every entry on one disk, numbered 0
    (or 1, as some writers number it)."""
    return count == on_disk and ((disk | cd_disk) == 0 or (disk, cd_disk) == (1, 1))


def read_central(path: str | Path) -> tuple[int, int, int, bytes]:
    """(file size, entry count, central directory offset, its bytes): the end records, then one read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(no_readahead(f.fileno())).st_size
            tail_len = min(size, _EOCD.size + 0xFFFF + _ZIP64_LOCATOR.size)
            f.seek(size - tail_len)
            tail = f.read(tail_len)
            at = tail.rfind(b"PK\x05\x06")
            if at < 0 or len(tail) - at < _EOCD.size:
                raise _bad(path, f"{size} bytes, no zip end record")
            _, disk, cd_disk, on_disk, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
            loc = at - _ZIP64_LOCATOR.size
            # a zip64 end record, where there is one, is what torch's zip reader (miniz) goes by; its checks here
            if loc >= 0 and tail[loc:loc + 4] == b"PK\x06\x07":
                _, _, eocd64_at, disks = _ZIP64_LOCATOR.unpack_from(tail, loc)
                if eocd64_at > size:
                    raise _bad(path, "zip64 end record missing")
                f.seek(eocd64_at)
                rec = f.read(_ZIP64_EOCD.size)
                if len(rec) < _ZIP64_EOCD.size:
                    raise _bad(path, "zip64 end record missing")
                if rec[:4] == b"PK\x06\x06":  # else the 32-bit end record holds (as in miniz)
                    _, rec_size, _, _, disk, cd_disk, on_disk, count, cd_size, cd_offset = _ZIP64_EOCD.unpack(rec)
                    if rec_size < _ZIP64_EOCD.size - 12 or disks != 1 or max(count, on_disk, cd_size) > _MAX32:
                        raise _bad(path, "bad zip64 end record")
                elif count == 0xFFFF or cd_size == _MAX32 or cd_offset == _MAX32:
                    raise _bad(path, "zip64 end record missing")
            elif count == 0xFFFF or cd_size == _MAX32 or cd_offset == _MAX32:
                raise _bad(path, "zip64 locator missing")
            if not on_one_disk(disk, cd_disk, count, on_disk):
                raise _bad(path, "a zip split over several disks")
            if cd_size < count * CENTRAL_SIZE:
                raise _bad(path, "central directory too small for its entries")
            if cd_offset + cd_size > size:
                raise _bad(path, f"central directory past the end of the {size}-byte file")
            f.seek(0)
            if f.read(4) != b"PK\x03\x04":  # torch.load reads such a file as a legacy (pre-zip) torch.save file
                raise _bad(path, "a zip that does not start at the file's first byte, which torch.load would "
                                 "read as another format")
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
        (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, disk, _, attr, lho) = unpack(cd, pos)
        if sig != 0x02014B50 or disk != 0:
            raise _bad(path, "bad central directory entry")
        if method != 0 or flags & REFUSED_FLAGS:
            raise UnsupportedLayoutError(f"{path}: compressed or encrypted zip entries are not supported; "
                                         "re-save the file with torch.save")
        try:
            name = cd[pos + CENTRAL_SIZE:pos + CENTRAL_SIZE + nlen].decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(path, "a zip record name is not UTF-8") from None
        if usize == _MAX32 or lho == _MAX32 or csize == _MAX32:
            usize, csize, lho = zip64_fields(cd[pos + CENTRAL_SIZE + nlen:pos + CENTRAL_SIZE + nlen + elen],
                                              usize, csize, lho)
        if attr & 0x10 or name.endswith("/"):  # torch's zip reader reads a directory entry as no bytes
            raise _bad(path, f"record {name!r} is marked as a folder")
        if csize != usize:  # a stored record is its own bytes: torch's zip reader refuses anything else
            raise _bad(path, f"record {name!r} has a stored size {csize} and a size {usize}")
        if lho + LOCAL_SIZE + csize > size:
            raise _bad(path, f"record {name!r} runs past the end of the file")
        starts.append(pos)
        names.append(name)
        offsets.append(lho)
        sizes.append(usize)
        crcs.append(crc)
        pos += CENTRAL_SIZE + nlen + elen + clen
        if pos > len(cd):
            raise _bad(path, "central directory entry runs past the directory")
    prefix = _prefix(path, names)
    cut = len(prefix)
    problem = names_problem(names, cut)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    return Directory(path=path, size=size, prefix=prefix, names=tuple(n[cut:] for n in names),
                     header_offsets=tuple(offsets), sizes=tuple(sizes), crcs=tuple(crcs),
                     central_offset=cd_offset, central_bytes=cd, entry_starts=tuple(starts))


def names_problem(names: list[str], cut: int) -> str | None:
    """Why torch's zip reader (miniz), which finds records ignoring case, could read another record than the one
    named, or None: two names alike but for case, or a record torch.save names in lower case written otherwise.
    `cut` is the length of the archive folder every name starts with."""
    folded: dict[str, str] = {}
    for n in names:
        other = folded.get(n.lower())
        if other is None:
            folded[n.lower()] = n
        elif other == n:
            return f"two zip records named {n!r} (torch would read one, a copy tool another); re-save the file with " \
                   "torch.save"
        else:
            return (f"two zip records named {other!r} and {n!r}, which torch's zip reader does not tell apart (it "
                    "ignores case); re-save the file with torch.save")
    for n in names:
        own = n[cut:]
        if own != own.lower() and (own.lower() in _TORCH_RECORDS or own.lower().startswith(("data/", ".data/"))):
            return (f"zip record {n!r} is named as torch.save never names it (torch's zip reader would find it under "
                    "its lower-case name); re-save the file with torch.save")
    return None


def zip64_fields(extra: bytes, usize: int, csize: int, lho: int) -> tuple[int, int, int]:
    """A central directory entry's sizes and local header offset, with those saturated at 0xFFFFFFFF taken
    from its zip64 extra field (in that order, only the saturated ones present)."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            vals = list(struct.unpack_from(f"<{n // 8}Q", extra, pos + 4))
            if usize == _MAX32 and vals:
                usize = vals.pop(0)
            if csize == _MAX32 and vals:
                csize = vals.pop(0)
            if lho == _MAX32 and vals:
                lho = vals.pop(0)
            break
        pos += 4 + n
    return usize, csize, lho


def _prefix(path: Path, names: list[str]) -> str:
    """The archive folder: the first record's, as torch's reader takes it."""
    if not names or "/" not in names[0]:
        raise CheckpointError(f"{path}: not a torch checkpoint (its first zip record is in no archive folder)")
    prefix = names[0][:names[0].index("/") + 1]
    if prefix + "data.pkl" not in names:
        raise CheckpointError(f"{path}: not a torch checkpoint (a zip file without data.pkl)")
    if any(not n.startswith(prefix) for n in names):
        raise CheckpointError(f"{path}: zip records outside the archive folder {prefix!r}")
    return prefix


def data_offsets(d: Directory, indices: list[int] | range | None = None) -> dict[int, int]:
    """Where each record's bytes start: after its local header, whose extra field torch uses as padding."""
    picked = range(len(d.names)) if indices is None else indices
    out: dict[int, int] = {}
    try:
        fd = no_readahead(os.open(d.path, os.O_RDONLY))
    except OSError as e:
        raise CheckpointError(f"{d.path}: cannot read ({e.strerror or e})") from None
    try:
        for i in picked:
            lho = d.header_offsets[i]
            head = os.pread(fd, LOCAL_SIZE, lho)
            if len(head) < LOCAL_SIZE:
                raise _bad(d.path, f"record {d.names[i]!r} cut short")
            sig, *_, nlen, elen = _LOCAL.unpack(head)
            if sig != 0x04034B50:
                raise _bad(d.path, f"bad local header for {d.names[i]!r}")
            start = lho + LOCAL_SIZE + nlen + elen
            if start + d.sizes[i] > d.central_offset:
                raise _bad(d.path, f"record {d.names[i]!r} runs past the end of the file's records")
            out[i] = start
    finally:
        os.close(fd)
    return out


def storage_offsets(d: Directory, keys: Iterable[str]) -> dict[str, int]:
    """Where the bytes of each storage `data/<key>` start (local headers read in file order)."""
    records = {key: d.index(f"data/{key}") for key in keys}
    at = data_offsets(d, sorted(records.values()))
    return {key: at[i] for key, i in records.items()}


_TORCH_RECORDS = {"byteorder", "version", "data.pkl", ".storage_alignment"}


def check_torch_records(d: Directory) -> None:
    """The small records torch's reader parses (see `torch_records_problem`), read CRC-checked where it matters."""
    def read(name: str) -> bytes | None:
        return read_record(d, name, check_crc=name == "byteorder") if d.has(name) else None
    problem = torch_records_problem(read)
    if problem is not None:
        raise problem[0](f"{d.path}: {problem[1]}")


def torch_records_problem(read: Callable[[str], bytes | None]) -> tuple[type[CheckpointError], str] | None:
    """Why torch.load would refuse a torch zip, from the small records its reader parses: a version and an
    alignment that are numbers, a serialization id that is text, and a byteorder; None if they are fine.
    `read` gives a record's bytes by name (without the archive folder), None where there is none.

    A file saved big-endian is refused: its tensor bytes would need swapping, which the byte-copying writer
    never does. A file without the byteorder record is little-endian, as torch.load assumes by default.
    """
    if read("constants.pkl") is not None:
        return CheckpointError, ("a TorchScript archive (it holds constants.pkl), which torch.load(weights_only=True) "
                                 "refuses; save the state dict with torch.save")
    version_name = ".data/version"  # torch's reader asks in this order
    version = read(version_name)
    if version is None:
        version_name, version = "version", read("version")
    if version is None:
        return CheckpointError, ("the zip has no version record (torch.load refuses it); copy the file again from "
                                 "the node that saved it")
    for name, text in ((version_name, version), (".storage_alignment", read(".storage_alignment"))):  # numbers
        if text is None:
            continue
        try:
            number = _leading_number(text) if name == version_name else int(text)
        except ValueError:
            return CheckpointError, _corrupted(f"record {name} holds {text[:20]!r}, not a number")
        if name == version_name and not 1 <= number <= _MAX_VERSION:
            return CheckpointError, (f"file format version {number}, outside the 1-{_MAX_VERSION} torch.load reads; "
                                     "re-save the file with torch.save")
    try:
        (read(".data/serialization_id") or b"").decode("utf-8")
    except UnicodeDecodeError:
        return CheckpointError, _corrupted("record .data/serialization_id is not text")
    order = read("byteorder")
    if order is None or order == b"little":
        return None
    if order == b"big":
        return UnsupportedLayoutError, ("saved on a big-endian machine (its byteorder record says 'big'); load and "
                                        "re-save it with torch.save on a little-endian machine")
    return CheckpointError, f"unknown byteorder record {order[:20]!r} (torch.load refuses it too)"


def _leading_number(text: bytes) -> int:
    """The version as torch's C++ reader parses it (strtoull): the digits after blanks and a sign, whatever follows
    them ("3.0" is 3); a minus sign wraps to a huge number, which is out of range."""
    m = re.match(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)", text)
    if m is None:
        raise ValueError(text)
    number = int(m.group(2))
    return -number if m.group(1) == b"-" and number else number


def read_record(d: Directory, name: str, *, check_crc: bool = True) -> bytes:
    """One record's bytes (data.pkl), CRC-checked unless it was saved without CRCs (crc 0)."""
    i = d.index(name)
    start = data_offsets(d, [i])[i]
    with open(d.path, "rb") as f:
        no_readahead(f.fileno())
        f.seek(start)
        data = f.read(d.sizes[i])
    if len(data) != d.sizes[i]:
        raise _bad(d.path, f"record {name} cut short")
    if check_crc and d.crcs[i] != 0 and crc32(data) != d.crcs[i]:
        raise _bad(d.path, f"CRC mismatch in {name}")
    return data
