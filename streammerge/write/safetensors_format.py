"""Safetensors headers exactly as the Rust writer (`safetensors.torch.save_file`) makes them.

The safetensors package has no streaming writer, so we lay files out ourselves from metadata alone:
tensors sorted by dtype (the Rust `Dtype` enum order, largest first) then by name, a compact JSON
header with `__metadata__` first, padded with spaces to a multiple of 8 bytes. Tests compare our
bytes with `save_file`'s for every dtype.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .. import dtypes, jsonfile
from ..dtypes import DType

# our dtype -> safetensors dtype code
DTYPE_CODES: dict[DType, str] = {d: d.code for d in dtypes.SAFETENSORS if d.code}
# Rank of each code in the Rust `Dtype` enum (ascending); files list the highest rank first.
_ENUM_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
               "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
_RANK = {code: i for i, code in enumerate(_ENUM_ORDER)}
CODE_DTYPES = dict(dtypes.BY_CODE)


@dataclass(frozen=True)
class Entry:
    """One tensor's place in a safetensors file; offsets are relative to the data start."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Layout:
    header: bytes  # the 8-byte length prefix plus the padded JSON header
    entries: tuple[Entry, ...]  # in file order

    @property
    def data_start(self) -> int:
        return len(self.header)

    @property
    def size(self) -> int:
        return self.data_start + (self.entries[-1].end if self.entries else 0)


def dtype_code(dtype: DType | str) -> str:
    """"BF16" for bfloat16 (ours, a torch.dtype or a name)."""
    code = dtypes.of(dtype).code
    if code is None:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
    return code


def layout(tensors: Iterable[tuple[str, DType, tuple[int, ...]]], metadata: Mapping[str, str] | None) -> Layout:
    """Order tensors and compute the header the Rust writer would produce for them (dtypes: ours or torch's)."""
    items = [(name, dtype_code(dt), tuple(int(s) for s in shape), dtypes.of(dt).itemsize)
             for name, dt, shape in tensors]
    items.sort(key=lambda it: (-_RANK[it[1]], it[0]))
    entries, offset = [], 0
    for name, code, shape, itemsize in items:
        n = itemsize
        for s in shape:
            n *= s
        entries.append(Entry(name, code, shape, offset, offset + n))
        offset += n
    head: dict = {}
    if metadata is not None:
        head["__metadata__"] = dict(metadata)
    for e in entries:
        head[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    return Layout(header=struct.pack("<Q", len(text)) + text, entries=tuple(entries))


def read_header(path: str) -> tuple[dict, int]:
    """Parse a safetensors header (for verify and resume); returns (header dict, data start)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"header length {n} is implausible")
        text = f.read(n)
        if len(text) != n:
            raise ValueError("file ends inside the header")
    return jsonfile.loads(text), 8 + n
