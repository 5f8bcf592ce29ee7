"""Load every rank file of a checkpoint: decode rank 0, then prove each other rank is the same file up to its rank.

veRL writes all rank files with the same code from the same module, so they are alike: their pickles
are byte-identical after the first DTensor (whose device mesh, pickled once, holds the rank), and
their zip directories differ only in CRCs, the archive name and a shift of the offsets. Decoding a
pickle costs ~40 µs per tensor, most of an hour for 1024 files of 50,000 tensors. So rank 0 is
decoded; every other rank is checked with byte compares (memcmp, numpy) and only its differing head
is decoded. A rank that does not match (uneven shards, another torch, an edited file) is decoded in
full, so the result is the same either way, only slower.

Tokens that differ by rank (the device a GPU rank saved from, a cached hash) are cut out before the
compare, only where rank 0's opcodes start (never inside a name or an operand), and compared by place
and kind; the keys are found by walking rank 0's opcodes, never by searching for names. The local zip
header of every storage record of every matched rank is read (vectorised), so the bytes read are the
ones torch's reader would take.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import re
import struct
from array import array
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from . import torchpickle as mp
from . import torchzip as zipdir
from .base import Piece, ReadStats, SourceTensor, no_readahead
from .picklescan import scan
from .rankfile import (
    RankFile,
    TensorRecord,
    _checked,
    _mesh_layout,
    layout_name,
    load_rank_file,
    records_from_state,
    span_bytes,
    tensor_pieces,
)

HEAD_MAX = 1 << 20  # a differing head longer than this is decoded in full anyway
_RANK_KEYS = frozenset({"_rank", "_coordinate_on_dim", "_hash"})  # differ by rank, or a cached hash


@dataclass(frozen=True, eq=False)
class RankEntry:
    """One rank file: where its tensors are, as offsets shared with alike files plus a shift."""

    rank: int
    path: Path
    size: int
    mtime_ns: int
    coordinates: tuple[tuple[int, ...] | None, ...]  # one per mesh slot (see RankSet.slots)
    base: array  # per tensor (in the template's order): byte offset in a file laid out like this one
    shift: int
    overrides: dict[str, TensorRecord] = field(default_factory=dict)  # records that differ in more than that
    decoded: bool = False  # decoded in full (did not match the template)


@dataclass(eq=False)
class RankSet:
    """All rank files of a checkpoint, read as rank 0's records plus what differs per rank."""

    template: RankFile
    names: tuple[str, ...]
    entries: tuple[RankEntry, ...]
    slots: tuple[int, ...]  # per tensor: which device mesh it lives on (-1: a plain tensor)

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.names)}
        self.path_names = [str(e.path) for e in self.entries]
        self.keyed = [k for k, e in enumerate(self.entries) if e.decoded]  # own offsets: part of alias keys
        h = hashlib.sha256()
        bases: dict[int, str] = {}
        for e in self.entries:
            if id(e.base) not in bases:
                bases[id(e.base)] = hashlib.sha256(e.base.tobytes()).hexdigest()
            h.update(repr((e.rank, str(e.path), e.size, e.coordinates, e.shift, bases[id(e.base)],
                           sorted(e.overrides.items()))).encode())
        self.digest = h.hexdigest()[:16]

    @property
    def world_size(self) -> int:
        return len(self.entries)

    @property
    def decoded(self) -> int:
        """How many rank files were decoded in full (the template counts)."""
        return sum(e.decoded for e in self.entries)

    def offset(self, k: int, i: int) -> int:
        e = self.entries[k]
        return e.base[i] + e.shift

    def record(self, k: int, name: str) -> TensorRecord:
        e = self.entries[k]
        rec = e.overrides.get(name)
        if rec is not None:
            return rec
        i = self.index[name]
        slot = self.slots[i]
        return replace(self.template.tensors[name], offset=e.base[i] + e.shift,
                       coordinate=None if slot < 0 else e.coordinates[slot])

MATCH_MIN_RECORDS = 100_000  # below this many tensor records in all, decoding every rank is fast enough


class Fallback(Exception):
    """This rank file cannot be proven alike by byte compares: it is decoded in full (the reason is recorded)."""


class SmallCheckpoint(Fallback):
    """Few records in all: decoding every rank is the plan, not a fallback."""


def load_ranks(paths: Sequence[Path], world_size: int, *, trust_pickle: bool = False, threads: int = 2,
               stats: ReadStats | None = None, match_min_records: int = MATCH_MIN_RECORDS) -> RankSet:
    """Read every rank file's records; at scale, a rank alike rank 0 costs byte compares, not a decode."""
    paths = [Path(p) for p in paths]
    stats = stats if stats is not None else ReadStats()
    stats.files += len(paths)
    matcher = None
    if not trust_pickle and len(paths) > 1:
        try:
            matcher = _Matcher.create(paths[0], world_size, match_min_records)
        except SmallCheckpoint:
            pass
        except Fallback as e:
            stats.fell_back(str(e))
    if matcher is not None:
        template, slots = matcher.template, matcher.slots
    else:
        template = load_rank_file(paths[0], 0, world_size, trust_pickle=trust_pickle, stats=stats)
        slots = _slots_by_coordinate(template)
    stats.decoded += matcher is not None
    names = tuple(template.tensors)
    first = _decoded_entry(template, template, names, slots)

    def one(k: int) -> RankEntry:
        if matcher is not None:
            try:
                got = matcher.match(k, paths[k])
                stats.matched += 1
                return got
            except Fallback as e:
                stats.fell_back(str(e))
        rf = load_rank_file(paths[k], k, world_size, trust_pickle=trust_pickle, stats=stats)
        return _decoded_entry(rf, template, names, slots)

    if threads > 1 and len(paths) > 2:
        with ThreadPoolExecutor(threads) as pool:
            rest = list(pool.map(one, range(1, len(paths))))
    else:
        rest = [one(k) for k in range(1, len(paths))]
    return RankSet(template, names, (first, *rest), slots)


def _slots_by_coordinate(rf: RankFile) -> tuple[int, ...]:
    """Mesh slots when mesh identity is unknown: one per distinct mesh layout and coordinate in rank 0."""
    seen: dict[tuple, int] = {}
    return tuple(-1 if t.placements is None
                 else seen.setdefault((t.mesh_shape, t.coordinate, len(t.placements)), len(seen))
                 for t in rf.tensors.values())


def _slot_coordinates(records: Sequence[TensorRecord], slots: Sequence[int]) -> tuple[tuple[int, ...] | None, ...]:
    out: list[tuple[int, ...] | None] = [None] * (max(slots, default=-1) + 1)
    for rec, slot in zip(records, slots):
        if slot >= 0 and out[slot] is None:
            out[slot] = rec.coordinate
    return tuple(out)


def _decoded_entry(rf: RankFile, template: RankFile, names: tuple[str, ...], slots: Sequence[int]) -> RankEntry:
    """An entry for a fully decoded rank file: its own offsets, and whatever differs from the template."""
    if set(rf.tensors) != set(names):
        missing = sorted(set(names) - set(rf.tensors))[:3]
        extra = sorted(set(rf.tensors) - set(names))[:3]
        what = f"lacks {missing}" if missing else f"has extra {extra}"
        raise CheckpointError(f"{rf.path}: tensor names differ from rank {template.rank}'s: it {what}")
    records = [rf.tensors[n] for n in names]
    coords = _slot_coordinates(records, slots)
    overrides = {}
    for n, rec, slot in zip(names, records, slots):
        derived = replace(template.tensors[n], offset=rec.offset, coordinate=None if slot < 0 else coords[slot])
        if rec != derived:
            overrides[n] = rec
    return RankEntry(rf.rank, rf.path, rf.size, rf.mtime_ns, coords, array("q", (r.offset for r in records)), 0,
                     overrides, decoded=True)


@dataclass(eq=False)
class _Group:
    """Rank files whose archive name has one length: laid out alike, up to a shift."""

    ref: zipdir.Directory  # the first such file, read exactly
    base: array  # per tensor: byte offset in ref
    keys: dict[str, int]  # storage key -> byte offset in ref

    def __post_init__(self) -> None:
        self.cd = np.frombuffer(self.ref.central_bytes, np.uint8)
        self.starts = np.asarray(self.ref.entry_starts, np.int64)
        self.lho = np.asarray(self.ref.header_offsets, np.int64)
        self.first_storage = next((i for i, n in enumerate(self.ref.names) if n.startswith("data/")),
                                  len(self.ref.names))
        records = [i for i, n in enumerate(self.ref.names) if n.startswith("data/")]
        starts = zipdir.data_offsets(self.ref, records)  # the local headers, read exactly
        self.records = np.asarray(records, np.int64)
        self.data_starts = np.asarray([starts[i] for i in records], np.int64)
        # the small records torch's reader parses: each rank's must hold what this file's holds
        self.small = [(self.ref.index(n), zipdir.read_record(self.ref, n, check_crc=False)) for n in _SMALL
                      if self.ref.has(n)]
        self.serialization_id = self.ref.index(_SERIAL) if self.ref.has(_SERIAL) else None


class _Shifted(dict):
    """Storage offsets of a shifted file, computed only for the storages asked for."""

    def __init__(self, keys: dict[str, int], shift: int):
        super().__init__()
        self.keys_, self.shift = keys, shift

    def __contains__(self, key: object) -> bool:
        return key in self.keys_

    def __getitem__(self, key: str) -> int:
        return self.keys_[key] + self.shift


class _Matcher:
    """Rank 0's pickle and zip directory, and the byte compares that prove another rank alike."""

    def __init__(self, template: RankFile, world_size: int, pickle_bytes: bytes, starts: list[int],
                 slots: tuple[int, ...], meshes: list[tuple[int, Any]], storage: list[tuple[str, int]],
                 pattern: re.Pattern | None):
        self.template, self.world_size, self.slots, self.storage = template, world_size, slots, storage
        self.pickle, self.starts = pickle_bytes, starts
        self.meshes = meshes  # per slot: (memo index of the mesh in rank 0's pickle, its decoded spec)
        self.names = tuple(template.tensors)
        self.pattern = pattern  # tokens that differ by rank and mean nothing to us (see _variable_tokens)
        self.canon = self._canon(pickle_bytes)
        # each key's start with the tokens before it removed (a key is never a token: checked in create)
        self.canon_starts = [k - self.canon.removed_before(k) for k in starts]
        self.tail = np.frombuffer(self.canon.rest, np.uint8)[self.canon_starts[1]:]  # records 1.. of rank 0
        self.tail_tokens = self.canon.tail_tokens(len(self.tail))
        self._heads: dict[int, tuple[dict, dict] | None] = {}
        self.groups: dict[int, _Group] = {}  # by archive-name length
        self.mesh_refs: dict[int, int] = {}  # set by create (see _mesh_references)

    @classmethod
    def create(cls, path: Path, world_size: int, min_records: int = 0) -> _Matcher:
        """Decode rank 0; Fallback when it is not a plain state dict of tensors (then every rank is decoded
        by load_rank_file, which also explains what is wrong with a bad file)."""
        state = mp.read_state(path)
        if state is None or not isinstance(state.obj, dict):
            raise Fallback("rank 0 needs torch.load")
        d, data, obj, keys = state.directory, state.pickle, state.obj, state.offsets
        got = records_from_state(obj, keys, path, 0, world_size)
        if got is not None and len(got[0]) * world_size < min_records:
            raise SmallCheckpoint()
        if got is None or got[1] or len(got[0]) < 2:
            raise Fallback("rank 0 holds other objects than tensors, or fewer than 2")
        tensors = _checked(got[0], path, d.size)
        starts = scan(data, key_limit=HEAD_MAX + 1)  # keys by walking opcodes: a name may equal any other string
        if starts is None or len(starts) < 2 or len(starts) > len(tensors):
            raise Fallback("rank 0's pickle is not a plain dict of records")
        slots, storage, firsts = _mesh_slots(obj)
        # memo indices: from a decode of the records up to the last mesh's first use (the whole
        # file's memo would hold an entry per pickled object, millions)
        cut = max(firsts, default=0) + 1
        prefix = _decode_head(data[:starts[cut]]) if cut < len(starts) else None
        if prefix is None:
            raise Fallback("rank 0's device meshes are not all defined before its last record")
        values, head_values = list(obj.values()), list(prefix[0].values())
        full_meshes = [_mesh_of(values[r]) for r in firsts]
        head_meshes = [_mesh_of(head_values[r]) for r in firsts]
        index = {id(v): i for i, v in prefix[1].items()}
        if any(id(m) not in index for m in head_meshes):
            raise Fallback("rank 0's device mesh is not a memoised object")
        if any(type(m) is not mp.DeviceMesh for m in (*full_meshes, *head_meshes)):
            raise Fallback("rank 0's DTensor spec holds something other than a device mesh as its mesh")
        mesh_list = [(index[id(hm)], values[r].state["_spec"]) for hm, r in zip(head_meshes, firsts)]
        st = os.stat(path)
        template = RankFile(path, 0, st.st_size, st.st_mtime_ns, tensors, {})
        cached = any(isinstance(v, mp.Wrapper) and v.state["_spec"].__dict__.get("_hash") is not None
                     for v in obj.values())
        pattern = _variable_tokens(data, prefix[1], cached)
        # a token counts only where opcodes start (never inside a name or an operand), and is never a key
        matches = pattern.finditer(data) if pattern else ()
        bounds = sorted({p for m in matches for p in (m.start(), *m.span(m.lastgroup or 0))})
        if bounds and (scan(data, bounds, key_limit=0) is None or set(bounds) & set(starts)):
            raise Fallback("rank 0's pickle holds bytes like a device or hash token inside its data")
        m = cls(template, world_size, data, starts, slots, mesh_list, storage, pattern)
        m.mesh_refs = _mesh_references(obj, full_meshes, head_meshes, index)
        m.groups[len(d.prefix)] = _Group(d, array("q", (t.offset for t in tensors.values())), keys)
        return m

    # ------------------------------------------------------------ zip directory

    def _group(self, path: Path, prefix_len: int) -> _Group:
        g = self.groups.get(prefix_len)
        if g is None:  # first file with this archive-name length: read its offsets exactly
            d = zipdir.read_directory(path)
            keys = zipdir.storage_offsets(d, {key for key, _ in self.storage})  # raises if one is missing
            base = array("q", (keys[key] + off for key, off in self.storage))
            for t, o in zip(self.template.tensors.values(), base):
                if o + span_bytes(t) > d.size:
                    raise CheckpointError(f"{path}: truncated: tensor {t.name!r} needs bytes up to "
                                          f"{o + span_bytes(t)}, file has {d.size}")
            zipdir.check_torch_records(d)
            first = next(iter(self.groups.values())).ref  # rank 0's, its sizes checked against its storages
            if any(d.sizes[d.index(n)] != first.sizes[first.index(n)] for n in first.names if n.startswith("data/")):
                raise CheckpointError(f"{path}: zip records differ in size from rank 0's")
            g = self.groups.setdefault(prefix_len, _Group(d, base, keys))
        return g

    @staticmethod
    def _shift(g: _Group, size: int, cd: bytes, prefix: bytes) -> int:
        """The offset shift of a central directory alike the group's; Fallback when it differs in anything else."""
        if len(cd) != len(g.cd):
            raise Fallback("zip directory of another length")
        a, b, starts = np.frombuffer(cd, np.uint8), g.cd, g.starts
        diff = np.flatnonzero(a != b)
        if diff.size:
            entry = np.searchsorted(starts, diff, side="right") - 1
            fld = diff - starts[entry]
            ok = ((fld >= 16) & (fld < 20)) | ((fld >= 42) & (fld < 46)) \
                | ((fld >= zipdir.CENTRAL_SIZE) & (fld < zipdir.CENTRAL_SIZE + len(prefix))) \
                | ((entry == 0) & (fld >= 20) & (fld < 28))
            if not ok.all():
                raise Fallback("zip directory differs beyond CRCs, sizes of data.pkl and offsets")
        names = a[(starts[:, None] + zipdir.CENTRAL_SIZE + np.arange(len(prefix))[None, :])]
        if not (names == np.frombuffer(prefix, np.uint8)[None, :]).all():
            raise Fallback("zip record names differ")
        lho = a[starts[:, None] + 42 + np.arange(4)[None, :]].copy().view("<u4").ravel().astype(np.int64)
        if (lho == 0xFFFFFFFF).any() or (g.lho >= 0xFFFFFFFF).any():
            raise Fallback("zip64 offsets")  # they live in extra fields: decode such files in full
        d = lho[g.first_storage:] - g.lho[g.first_storage:]  # the small records before may move by a byte
        if d.size == 0 or (d != d[0]).any() or d[0] % 64 or size != g.ref.size + int(d[0]):
            raise Fallback("storage records are not shifted alike")
        return int(d[0])

    # ------------------------------------------------------------ pickle

    def _template_head(self, j: int) -> tuple[dict, dict] | None:
        if j not in self._heads:
            self._heads[j] = _decode_head(self.pickle[:self.starts[j]])
        return self._heads[j]

    def _canon(self, data: bytes) -> _Canon:
        return _Canon.of(data, self.pattern)

    def _head_records(self, canon: _Canon) -> int | None:
        """How many leading records differ from rank 0's: the rest are compared aligned from the end, so
        a head that grew by a byte (a rank >= 256 in the mesh) shifts nothing after it. Tokens compare by
        kind and place only; everything else byte for byte."""
        n = len(self.tail)
        if len(canon.rest) <= n:
            return None
        diff = np.flatnonzero(np.frombuffer(canon.rest, np.uint8)[len(canon.rest) - n:] != self.tail)
        last = int(diff[-1]) if diff.size else -1
        last = max(last, min(_last_token_difference(canon.tail_tokens(n), self.tail_tokens), n - 1))
        if last < 0:
            return 1
        j = bisect.bisect_right(self.canon_starts, self.canon_starts[1] + last)
        return j if j < len(self.starts) and self.starts[j] <= HEAD_MAX else None

    def _unreferenced(self, j: int, indices: set[int]) -> bool:
        """No record from j on uses these memo entries (mesh internals, e.g. the coordinate tuple) other
        than through the mesh: such a record would mean something else in the other file."""
        return all(self.mesh_refs.get(i, -1) < j for i in indices)

    def match(self, k: int, path: Path) -> RankEntry:
        """Rank k's entry from byte compares and a decode of its differing head; Fallback: decode it in full."""
        st = os.stat(path)
        try:
            size, _, _, cd = zipdir.read_central(path)
        except CheckpointError:
            raise Fallback("unreadable zip directory") from None  # the full decode reports what is wrong
        if len(cd) < zipdir.CENTRAL_SIZE:
            raise Fallback("empty zip directory")
        nlen = int.from_bytes(cd[28:30], "little")
        first = cd[zipdir.CENTRAL_SIZE:zipdir.CENTRAL_SIZE + nlen]
        if not first.endswith(b"data.pkl"):
            raise Fallback("first zip record is not data.pkl")
        prefix = first[:-len(b"data.pkl")]
        try:
            g = self._group(path, len(prefix))
        except CheckpointError:
            raise Fallback("storage records missing or cut short") from None
        shift = 0 if g.ref.path == path else self._shift(g, size, cd, prefix)
        if g.ref.path != path:
            _check_local_headers(path, g, shift, cd)
        pkl_size = int.from_bytes(cd[24:28], "little")
        pkl_at = int.from_bytes(cd[42:46], "little")  # torch's reader finds data.pkl where the directory says
        with open(path, "rb") as f:
            no_readahead(f.fileno())
            f.seek(pkl_at)
            local = f.read(zipdir.LOCAL_SIZE)
            if len(local) < zipdir.LOCAL_SIZE or local[:4] != b"PK\x03\x04":
                raise Fallback("no local header for data.pkl")
            f.seek(pkl_at + zipdir.LOCAL_SIZE + int.from_bytes(local[26:28], "little")
                   + int.from_bytes(local[28:30], "little"))
            data = f.read(pkl_size)
        if len(data) != pkl_size:
            raise Fallback("data.pkl cut short")
        canon = self._canon(data)
        j = self._head_records(canon)
        if j is None:
            raise Fallback("pickle differs from rank 0's beyond its first records")
        at = len(canon.rest) - (len(self.canon.rest) - self.canon_starts[j])  # record j's key, tokens removed
        cut = at + canon.removed_before_rest(at)
        if not 0 < cut <= len(data) or data[cut:cut + 1] != self.pickle[self.starts[j]:self.starts[j] + 1]:
            raise Fallback("pickle head does not end where the compared tail begins")
        mine = _decode_head(data[:cut])
        ours = self._template_head(j)
        if mine is None or ours is None or list(mine[0]) != list(self.names[:j]):
            raise Fallback("pickle head does not decode to rank 0's first records")
        differ = _memo_differences(mine[1], ours[1])
        if differ is None or not self._unreferenced(j, {i for i in differ if type(ours[1][i]) is not mp.DeviceMesh}):
            raise Fallback("pickle head differs from rank 0's outside the device mesh")
        got = records_from_state(mine[0], _Shifted(g.keys, shift), path, k, self.world_size)
        if got is None or got[1]:
            raise Fallback("pickle head holds other objects than tensors")
        found: list[tuple[int, ...] | None] = []
        for slot, (index, spec) in enumerate(self.meshes):
            if index in mine[1]:  # defined in the head: this rank's own mesh
                if type(mine[1][index]) is not mp.DeviceMesh:
                    raise Fallback("device mesh memo entry is not a mesh")
                view = mp.MeshView(spec)
                view.device_mesh = mine[1][index]
                found.append(_mesh_layout(view, k, self.world_size)[1])
            else:  # byte-identical to rank 0's
                found.append(next(t.coordinate for t, sl in zip(self.template.tensors.values(), self.slots)
                                  if sl == slot))
        coords = tuple(found)
        overrides = {}
        for i, (name, rec) in enumerate(got[0].items()):
            t, slot = self.template.tensors[name], self.slots[i]
            if rec != replace(t, offset=g.base[i] + shift, coordinate=None if slot < 0 else coords[slot]):
                overrides[name] = rec
        return RankEntry(k, path, st.st_size, st.st_mtime_ns, coords, g.base, shift, overrides)


_SIG_AND_LENGTHS = np.array([0, 1, 2, 3, 26, 27, 28, 29], np.int64)


def _check_local_headers(path: Path, g: _Group, shift: int, cd: bytes) -> None:
    """Every storage record's data is where its local header says (the reader reads there), and the small
    records torch parses (version, alignment, byteorder) hold what rank 0's hold: a central directory
    alike rank 0's says nothing about either."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mm.madvise(mmap.MADV_RANDOM)  # a few bytes per record (see no_readahead)
    raw = np.frombuffer(mm, np.uint8)
    lho = g.lho[g.records] + shift
    if lho.size:
        if int(lho.max()) + zipdir.LOCAL_SIZE > raw.size:
            raise Fallback("local headers past the end of the file")
        head = raw[lho[:, None] + _SIG_AND_LENGTHS[None, :]].view("<u4")  # signature; name and extra lengths
        lengths = (head[:, 1] & 0xFFFF).astype(np.int64) + (head[:, 1] >> 16)
        if (head[:, 0] != 0x04034B50).any() or (lho + zipdir.LOCAL_SIZE + lengths != g.data_starts + shift).any():
            raise Fallback("local headers differ from rank 0's")
    for i, content in g.small:
        if _record_bytes(raw, cd, int(g.starts[i]), len(content)) != content:
            raise Fallback(f"zip record {g.ref.names[i]} differs from rank 0's")
    if g.serialization_id is not None:
        i = g.serialization_id
        data = _record_bytes(raw, cd, int(g.starts[i]), g.ref.sizes[i])
        try:
            if data is None:
                raise UnicodeDecodeError("utf-8", b"", 0, 0, "no record")
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise Fallback("serialization id is not text") from None


_SMALL = ("version", ".data/version", ".format_version", ".storage_alignment", "byteorder")
_SERIAL = ".data/serialization_id"


def _record_bytes(raw: np.ndarray, cd: bytes, entry: int, size: int) -> bytes | None:
    """A record's bytes, found through its local header as torch's reader finds them; None if there is none."""
    lho = int.from_bytes(cd[entry + 42:entry + 46], "little")
    local = raw[lho:lho + zipdir.LOCAL_SIZE].tobytes()
    if len(local) < zipdir.LOCAL_SIZE or local[:4] != b"PK\x03\x04":
        return None
    start = lho + zipdir.LOCAL_SIZE + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    data = raw[start:start + size].tobytes()
    return data if len(data) == size else None


def _mesh_of(value: Any) -> Any:
    return value.state["_spec"].mesh


def _mesh_slots(obj: dict) -> tuple[tuple[int, ...], list[tuple[str, int]], list[int]]:
    """Per tensor its mesh slot (-1: plain) and (storage key, byte offset); per slot its first record."""
    slot_of: dict[int, int] = {}
    slots: list[int] = []
    storage: list[tuple[str, int]] = []
    firsts: list[int] = []
    for r, v in enumerate(obj.values()):
        local = v.state["_local_tensor"] if isinstance(v, mp.Wrapper) else v
        storage.append((local.storage.key, local.offset * local.dtype.itemsize))
        if isinstance(v, mp.Wrapper):
            key = id(_mesh_of(v))
            if key not in slot_of:
                slot_of[key] = len(firsts)
                firsts.append(r)
            slots.append(slot_of[key])
        else:
            slots.append(-1)
    return tuple(slots), storage, firsts


def _mesh_references(obj: dict, meshes: list, head_meshes: list, index: dict[int, int]) -> dict[int, int]:
    """For each memo entry a mesh holds: the last record that uses it directly (not through the mesh).

    `meshes` come from the whole decode, `head_meshes` (the same, decoded again with their memo
    `index`) say which memo entry each of their parts is.
    """
    owned: dict[int, int] = {}
    stack = [(m.__dict__, h.__dict__) for m, h in zip(meshes, head_meshes)]
    while stack:
        v, w = stack.pop()
        if id(v) in owned:
            continue
        owned[id(v)] = index.get(id(w), -1)
        if isinstance(v, dict) and isinstance(w, dict):
            stack.extend((x, w.get(k)) for k, x in v.items())
        elif isinstance(v, (tuple, list)) and isinstance(w, (tuple, list)) and len(v) == len(w):
            stack.extend(zip(v, w))
        elif hasattr(v, "__dict__") and hasattr(w, "__dict__") and not isinstance(v, type):
            stack.append((v.__dict__, w.__dict__))
    last: dict[int, int] = {}
    for r, value in enumerate(obj.values()):
        stack, seen = [value], set()
        while stack:
            v = stack.pop()
            if id(v) in seen or type(v) is mp.DeviceMesh:
                continue
            seen.add(id(v))
            if id(v) in owned and owned[id(v)] >= 0:
                last[owned[id(v)]] = r
            if isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, (tuple, list)):
                stack.extend(v)
            elif isinstance(v, mp.Wrapper):
                stack.append(v.state)
            elif isinstance(v, mp.Local):
                stack.extend((v.shape, v.stride))
            elif hasattr(v, "__dict__") and not isinstance(v, type):
                stack.append(v.__dict__)
    return last


_INT = (rb"(?:N|K.|M..|J....|\x8a\x01.|\x8a\x02.{2}|\x8a\x03.{3}|\x8a\x04.{4}|\x8a\x05.{5}|\x8a\x06.{6}"
        rb"|\x8a\x07.{7}|\x8a\x08.{8}|\x8a\x09.{9})")
_PUT = rb"(?:q.|r....)"


def _variable_tokens(data: bytes, memo: dict, cached: bool) -> re.Pattern | None:
    """One pattern for what differs by rank in every record and means nothing to a merge: the device a GPU
    rank saved from ('cuda:3', torch.device('cuda', 3)) and DTensorSpec's cached `_hash`. Each alternative's
    named group is the token (removed before comparing); the bytes around it stay and are compared."""
    out = []
    kinds = sorted({m.group(1) for m in re.finditer(rb"X[\x03-\x20]\x00\x00\x00([a-z]{2,16}):[0-9]", data)
                    if m.group(1).decode() in _DEVICE_TYPES})
    for kind in kinds:
        k = re.escape(kind)
        for digits in range(1, 6):  # the length field says how many digits: one alternative per length
            out.append(rb"X" + re.escape(struct.pack("<I", len(kind) + 1 + digits)) + k + rb":[0-9]{%d}" % digits)
        out.append(rb"X" + re.escape(struct.pack("<I", len(kind))) + k + _PUT + rb"(?P<v>K.|M..)\x86")
    if cached:
        out.append(rb"X\x05\x00\x00\x00_hash" + _PUT + rb"(?P<v>" + _INT + rb")")
        for i in (i for i, v in memo.items() if v == "_hash"):
            get = b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)
            out.append(re.escape(get) + rb"(?P<v>" + _INT + rb")")
    if not out:
        return None
    named = []
    for t, alt in enumerate(out):  # each alternative's token group gets its own name: t<kind>
        named.append(alt.replace(rb"(?P<v>", rb"(?P<t%d>" % t) if b"(?P<v>" in alt else rb"(?P<t%d>" % t + alt + b")")
    return re.compile(b"|".join(named), re.DOTALL)


@dataclass(frozen=True)
class _Canon:
    """A pickle with its tokens cut out, and where each was: compared with another rank's, token places
    and kinds must agree, token values may differ."""

    rest: bytes
    raw: np.ndarray  # where each token starts in the pickle
    at: np.ndarray  # where it was cut out of `rest`
    kind: np.ndarray  # which alternative of the pattern it is
    size: np.ndarray  # its length

    @classmethod
    def of(cls, data: bytes, pattern: re.Pattern | None) -> _Canon:
        pieces, raw, at, kind, size = [], [], [], [], []
        pos = kept = 0
        for m in pattern.finditer(data) if pattern is not None else ():
            group = m.lastgroup or "t0"  # every alternative ends in its named token group
            a, b = m.span(group)
            pieces.append(data[pos:a])
            kept += a - pos
            raw.append(a)
            at.append(kept)
            kind.append(int(group[1:]))
            size.append(b - a)
            pos = b
        pieces.append(data[pos:])
        arr = [np.asarray(x, np.int64) for x in (raw, at, kind, size)]
        return cls(b"".join(pieces), *arr)

    def removed_before(self, raw: int) -> int:
        """Bytes of tokens that start before this pickle position."""
        return int(self._sums[np.searchsorted(self.raw, raw, "left")])

    def removed_before_rest(self, at: int) -> int:
        """Bytes of tokens cut out at or before this position of `rest`."""
        return int(self._sums[np.searchsorted(self.at, at, "right")])

    @property
    def _sums(self) -> np.ndarray:
        sums = self.__dict__.get("_cumulative")
        if sums is None:
            sums = np.concatenate(([0], np.cumsum(self.size)))
            object.__setattr__(self, "_cumulative", sums)
        return sums

    def tail_tokens(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(place, kind) of the tokens in the last n bytes of `rest`, places counted from where those begin."""
        first = np.searchsorted(self.at, len(self.rest) - n, "left")
        return self.at[first:] - (len(self.rest) - n), self.kind[first:]


def _last_token_difference(mine: tuple[np.ndarray, np.ndarray], ours: tuple[np.ndarray, np.ndarray]) -> int:
    """The last place where two tails' tokens differ in place or kind (aligned from the end), -1 if nowhere."""
    (pa, ka), (pb, kb) = mine, ours
    m = min(len(pa), len(pb))
    neq = (pa[len(pa) - m:] != pb[len(pb) - m:]) | (ka[len(ka) - m:] != kb[len(kb) - m:])
    idx = np.flatnonzero(neq)
    if idx.size:
        i = int(idx[-1])
        return int(max(pa[len(pa) - m + i], pb[len(pb) - m + i]))
    if len(pa) != len(pb):
        longer = pa if len(pa) > len(pb) else pb
        return int(longer[len(longer) - m - 1])
    return -1


def _decode_head(data: bytes) -> tuple[dict, dict] | None:
    """Decode the first records of a state-dict pickle: close the open SETITEMS batch and stop."""
    try:
        got = mp.decode(data + b"u.", memo=True)
    except RecursionError:
        return None
    return got if got is not None and isinstance(got[0], dict) else None


_MESH_LAYOUT_KEYS = ("_layout", "_mesh_dim_names", "_device_type", "mesh")  # what a mesh means to a merge


def _mesh_owned(memo: dict) -> set[int]:
    """ids of everything a DeviceMesh holds (group names, its rank, coordinate...): rank-specific."""
    owned: set[int] = set()
    states = [v.__dict__ for v in memo.values() if type(v) is mp.DeviceMesh]
    stack = list(states)
    for v in memo.values():  # the state dict each mesh was built from (BUILD copied its items); names only, as
        # hashing another key again could recurse past this thread's stack (a tuple nested deep)
        if isinstance(v, dict) and any(all(isinstance(k, str) and k in s and s[k] is x for k, x in v.items())
                                       for s in states):
            stack.append(v)
    while stack:
        v = stack.pop()
        if id(v) in owned:
            continue
        owned.add(id(v))
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (tuple, list)):
            stack.extend(v)
        elif hasattr(v, "__dict__") and not isinstance(v, type):
            stack.append(v.__dict__)
    return owned


def _memo_differences(a: dict, b: dict) -> set[int] | None:
    """Memo indices whose objects differ between two heads; None if any differs outside a device mesh."""
    if a.keys() != b.keys():
        return None
    own_a, own_b = _mesh_owned(a), _mesh_owned(b)
    index_a = {id(v): i for i, v in a.items()}
    index_b = {id(v): i for i, v in b.items()}
    differ = set()
    for i in a:
        if not _same(a[i], b[i], 0, (index_a, index_b)):
            if id(a[i]) not in own_a or id(b[i]) not in own_b:
                return None
            differ.add(i)
    return differ


_DEVICE_TYPES = frozenset({"cuda", "npu", "xpu", "hpu", "mtia", "musa", "mps", "privateuseone", "cpu", "meta"})


def _device_type(x: Any) -> str | None:
    """'cuda' for 'cuda:3' or ('cuda', 3): the device a rank saved from, which says nothing about layout."""
    if type(x) is str and ":" in x:
        kind, _, index = x.partition(":")
        return kind if kind in _DEVICE_TYPES and index.isdigit() else None
    if type(x) in (tuple, mp.Device) and len(x) == 2 and type(x[0]) is str and type(x[1]) is int \
            and x[0] in _DEVICE_TYPES:
        return x[0]
    return None


def _same(x: Any, y: Any, depth: int = 0, memos: tuple[dict, dict] | None = None) -> bool:
    """Equal as a merge reads them. With `memos`, objects below the top that both memos hold are
    compared by memo index only (each memo entry is compared once, on its own)."""
    if type(x) is not type(y) or depth > 50:
        return False
    if memos is not None and depth > 0:
        i, j = memos[0].get(id(x)), memos[1].get(id(y))
        if i is not None or j is not None:
            return i == j
    kind = _device_type(x)
    if kind is not None:
        return kind == _device_type(y)
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(_same(p, q, depth + 1, memos) for p, q in zip(x, y))
    if isinstance(x, dict):
        keys = x.keys() - _RANK_KEYS
        return keys == y.keys() - _RANK_KEYS and all(_same(x[key], y[key], depth + 1, memos) for key in keys)
    if isinstance(x, mp.Storage):
        return (x.key, x.dtype, x.numel) == (y.key, y.dtype, y.numel)
    if isinstance(x, mp.DeviceMesh):
        return all(_same(x.__dict__.get(k), y.__dict__.get(k), depth + 1, memos) for k in _MESH_LAYOUT_KEYS)
    if isinstance(x, mp.Local):
        return _same((x.storage, x.offset, x.shape, x.stride), (y.storage, y.offset, y.shape, y.stride),
                     depth + 1, memos)
    if isinstance(x, mp.Wrapper):
        return _same((x.cls, x.dtype, x.shape, x.stride, x.state), (y.cls, y.dtype, y.shape, y.stride, y.state),
                     depth + 1, memos)
    if hasattr(x, "__dict__") and not isinstance(x, type):
        return _same(x.__dict__, y.__dict__, depth + 1, memos)
    return x == y


# ---------------------------------------------------------------- the rank set's tensors as pieces

@dataclass(frozen=True)
class PieceParts:
    """Which rank entries hold which box of a tensor (shared by tensors of one shape and placements)."""

    boxes: tuple[tuple[int, tuple[int, ...]], ...]  # (entry index, start of its box)

    @property
    def digest(self) -> str:
        d = self.__dict__.get("_digest")
        if d is None:
            d = hashlib.sha256(repr(self.boxes).encode()).hexdigest()[:16]
            object.__setattr__(self, "_digest", d)
        return d


class ShardedPieces(Sequence[Piece]):
    """One tensor's pieces across a RankSet, built when iterated.

    A plan holds one of these per tensor instead of one Piece per tensor per rank (51 million for
    1024 ranks x 50,000 tensors): which ranks contribute which box is shared by every tensor of the
    same shape and placements, and each rank's offset is its base offset plus a shift.
    """

    __slots__ = ("ranks", "tensor_index", "parts", "shape", "stride")

    def __init__(self, ranks: RankSet, index: int, parts: PieceParts, shape: tuple[int, ...],
                 stride: tuple[int, ...]):
        self.ranks, self.parts, self.shape, self.stride = ranks, parts, shape, stride
        self.tensor_index = index  # the tensor's position in the rank set (not Sequence.index)

    def __len__(self) -> int:
        return len(self.parts.boxes)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return tuple(self)[k]
        e, start = self.parts.boxes[k]
        entry = self.ranks.entries[e]
        return Piece(entry.rank, self.ranks.path_names[e], entry.base[self.tensor_index] + entry.shift, self.shape,
                     self.stride, start)

    def __iter__(self) -> Iterator[Piece]:
        entries, names, i = self.ranks.entries, self.ranks.path_names, self.tensor_index
        for e, start in self.parts.boxes:
            entry = entries[e]
            yield Piece(entry.rank, names[e], entry.base[i] + entry.shift, self.shape, self.stride, start)

    def key(self) -> str:
        """Where the bytes are, without listing every rank: the rank set's digest covers each file's
        shift and base offsets, and the offsets in the fully decoded ranks (rank 0 among them) tell
        tensors apart; a matched rank's offsets follow rank 0's (equal keys: one storage, as tied weights)."""
        ranks = self.ranks
        own = tuple(ranks.offset(e, self.tensor_index) for e in ranks.keyed)
        return f"sharded({ranks.digest},{self.parts.digest},{self.shape},{self.stride},{own})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ShardedPieces):
            return self.key() == other.key()
        return isinstance(other, tuple) and tuple(self) == other

    def __hash__(self) -> int:
        return hash(self.key())

    def __repr__(self) -> str:
        return f"ShardedPieces({len(self)} pieces of {self.shape})"


def source_tensors(ranks: RankSet) -> dict[str, SourceTensor]:
    """One SourceTensor per tensor name, in the state-dict order of rank 0.

    Tensors whose records differ between ranks beyond offset and mesh coordinate (uneven shards,
    ranks decoded in full) get their pieces listed; all others share PieceParts by shape and placements.
    """
    files = [RankFile(e.path, e.rank, e.size, e.mtime_ns, {}, {}) for e in ranks.entries]  # for messages
    listed = set().union(*(e.overrides for e in ranks.entries))
    parts: dict[tuple, PieceParts] = {}
    shared: dict = {}
    out = {}
    for i, name in enumerate(ranks.names):
        t = ranks.template.tensors[name]
        pieces: Sequence[Piece]
        if name in listed:
            first, pieces = tensor_pieces(name, [ranks.record(k, name) for k in range(ranks.world_size)], files, shared)
        else:
            slot = ranks.slots[i]
            first, key = t, (t.shape, t.local_shape, t.placements, t.mesh_shape, slot)
            lay = parts.get(key)
            if lay is None:  # entry index in place of the offset: the boxes hold for every tensor of this key
                records = [replace(t, offset=k, coordinate=None if slot < 0 else e.coordinates[slot])
                           for k, e in enumerate(ranks.entries)]
                _, ps = tensor_pieces(name, records, files)
                rank_to_entry = {e.rank: k for k, e in enumerate(ranks.entries)}
                lay = parts[key] = PieceParts(tuple((rank_to_entry[p.rank], p.start) for p in ps))
            pieces = ShardedPieces(ranks, i, lay, t.local_shape, t.local_stride)
        out[name] = SourceTensor(name, first.shape, first.dtype, pieces, layout_name(first.placements))
    return out
