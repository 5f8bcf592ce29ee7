"""A veRL rank file: its tensor metadata (names, shapes, placements, byte offsets), read safely,
and the pieces of the full tensors that its DTensor placements give.

`torch.load(weights_only=True)` runs only torch's allowlisted pickle opcodes, so a hostile file cannot
run code. Loading onto the meta device reads the pickle and the zip directory only: no tensor data is
read, whatever the file size, and every storage carries its byte offset inside the file
(`_checkpoint_offset`), which is all the writer needs to stream bytes later.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import dtypes
from ..dtypes import DType
from ..errors import CheckpointError, UnsafePickleError, UnsupportedLayoutError
from .base import Piece, ReadStats
from .picklescan import torch_load
from .torchpickle import check_storages, named_storages
from .torchzip import Directory, check_torch_records, data_offsets, read_directory, read_record

UNSAFE_FLAG = "--trust-pickle"


@dataclass(frozen=True, slots=True)  # one per tensor per rank: keep it small
class TensorRecord:
    """Where one tensor's local bytes lie in one rank file, and how they map onto the full tensor."""

    name: str
    dtype: DType
    shape: tuple[int, ...]  # full (global) shape
    local_shape: tuple[int, ...]
    local_stride: tuple[int, ...]
    offset: int  # byte offset in the file of the local tensor's first element
    placements: tuple[str, ...] | None  # None: a plain tensor (a full copy)
    mesh_shape: tuple[int, ...] | None = None  # None: unknown, inferred from all ranks' coordinates
    coordinate: tuple[int, ...] | None = None


@dataclass(frozen=True)
class RankFile:
    path: Path
    rank: int
    size: int
    mtime_ns: int
    tensors: dict[str, TensorRecord]
    other: dict[str, Any]  # non-tensor entries (rare in model files; kept for error messages)


def torch_load_meta(path: Path, *, trust_pickle: bool = False) -> Any:
    """torch.load onto the meta device, weights-only unless the user explicitly trusts the file."""
    if trust_pickle:
        warnings.warn(
            f"loading {path} with weights_only=False: any code pickled in this file will run",
            stacklevel=2,
        )
    d = check_zip(path)
    if d.has(".storage_alignment") and int(read_record(d, ".storage_alignment", check_crc=False)) <= 0:
        # torch's meta-device reading divides by it (the process dies of SIGFPE); its CPU reading ignores it
        raise CheckpointError(f"{path}: record .storage_alignment holds no positive number; re-save the file with "
                              "torch.save")
    import torch
    import torch.distributed.tensor  # noqa: F401  (registers DTensor & placements with the weights-only unpickler)

    try:
        with warnings.catch_warnings(), _quiet("torch.distributed.device_mesh"):
            warnings.simplefilter("ignore")
            obj = torch_load(path, map_location="meta", weights_only=not trust_pickle, mmap=False)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        # torch's own hint (allowlist the global) is the opposite of what a stranger's file deserves
        detail = detail.split(" Please use")[0].replace("WeightsUnpickler error: ", "").rstrip(".")
        if "Unsupported operand" in detail:  # an opcode, not a global: no code asked for, torch.save never wrote it
            raise CheckpointError(f"{path}: its pickle uses an opcode torch.save never writes ({detail.strip()[:60]}), "
                                  "which torch.load(weights_only=True) refuses; re-save the file with torch.save"
                                  ) from None
        raise UnsafePickleError(
            f"{path}: refused to load: the pickle asks for something outside torch's weights-only "
            f"allowlist ({detail.strip()[:200]}). Unpickling it could run arbitrary code. Only if you "
            f"created this file yourself and trust it, rerun with {UNSAFE_FLAG}."
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__  # one line
        raise CheckpointError(f"{path}: truncated or corrupted rank file ({msg[:200]})") from None
    except Exception as e:  # a damaged pickle can fail anywhere inside the unpickler
        line = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: corrupted rank file ({type(e).__name__}: {line[:200]})") from None
    _check_storages(path)
    return obj


def _check_storages(path: Path) -> None:
    """On the meta device torch.load reads no record, so the checks its reading of the data makes are made here:
    every storage's record is there and holds exactly its bytes. It also places each storage (`_checkpoint_offset`)
    right after the one its pickle names before it, where torch.save writes it, not where its record is: the
    records must lie in that order, or one storage's bytes would be taken for another's of the same size."""
    d = read_directory(path)
    storages = named_storages(read_record(d, "data.pkl"))
    if storages is None:
        raise CheckpointError(f"{path}: its pickle names its storages in a way this reader cannot follow; "
                              "re-save it with torch.save")
    check_storages(d, storages)
    version = read_record(d, ".format_version", check_crc=False) if d.has(".format_version") else b""
    if version < b"1":  # torch finds each record by name in files older than the layout it computes
        return
    keys = list(storages)
    place = {k: d.header_offsets[d.index(f"data/{k}")] for k in keys}
    if sorted(keys, key=place.__getitem__) != keys:
        raise CheckpointError(f"{path}: its storage records are not in the order its pickle names them (a rank file "
                              "re-packed or edited by another zip tool), so torch.load's meta-device reading would "
                              "take one storage's bytes for another's; re-save it with torch.save")


def check_zip(path: Path) -> Directory:
    """Name truncation and corruption before torch reads a rank file; returns its zip directory.

    torch.save writes a zip whose directory sits at the end, so a cut-short copy loses it first;
    torch.load checks no CRCs, so the pickle's CRC is checked here (tensor data is checked by verify).
    Compressed entries, a missing data.pkl and a bad CRC are refused by zipdir with the same messages.
    """
    d = read_directory(path)
    read_record(d, "data.pkl")
    check_torch_records(d)
    data_offsets(d)  # every record's local header
    return d


class _quiet:
    """Silence a logger: unpickling a DeviceMesh outside a process group logs a harmless warning."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


def _placement_name(p: Any) -> str:
    from torch.distributed.tensor import Partial, Replicate, Shard

    if type(p) is Shard:
        return f"Shard({operator.index(p.dim)})"  # torch takes Shard(True) as Shard(1)
    if type(p) is Replicate:
        return "Replicate()"
    if isinstance(p, Partial):
        raise UnsupportedLayoutError(f"Partial placement ({p}) holds unreduced values that cannot be merged")
    raise UnsupportedLayoutError(f"placement {p!r} is not supported (only Shard(d) and Replicate())")


def _layout_shape(layout: Any) -> tuple[int, ...] | None:
    """Mesh shape from a pickled _MeshLayout: torch 2.11 keeps `shape`, 2.13 keeps one `axes` entry per dim."""
    state = getattr(layout, "__dict__", {})
    if isinstance(state.get("shape"), tuple):
        return _whole("mesh shape", state["shape"])
    axes = state.get("axes")
    if isinstance(axes, tuple):
        sizes = []
        for axis in axes:
            shape = getattr(axis, "__dict__", {}).get("shape")
            if not isinstance(shape, tuple):
                return None
            sizes.append(math.prod(_whole("mesh shape", shape)))
        return tuple(sizes)
    return None


def _mesh_layout(dt: Any, rank: int, world_size: int) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """Mesh shape and this rank's coordinate, read from pickled attributes only.

    DeviceMesh methods break on meshes pickled by another torch version, so only plain attributes
    are read. Either may come back None: the planner then infers the mesh shape from the
    coordinates of all ranks, and a 1-D mesh needs nothing at all.
    """
    ndim = len(dt.placements)
    state: dict[str, Any] = getattr(dt.device_mesh, "__dict__", {})
    shape = _layout_shape(state["_layout"]) if "_layout" in state else None
    coord = state.get("_coordinate_on_dim")
    m: Any = state.get("mesh")  # a torch tensor when _is_torch_tensor says so
    if shape is None and _is_torch_tensor(m) and m.device.type != "meta":
        shape = tuple(m.shape)
        hits = (m == rank).nonzero()
        coord = tuple(int(c) for c in hits[0]) if len(hits) else coord
    if shape is None and ndim == 1:
        shape = (world_size,)
    if shape is not None and len(shape) != ndim:
        raise UnsupportedLayoutError(f"device mesh has {len(shape)} dims but {ndim} placements")
    if coord is None and shape is not None:
        coord = row_major_coordinate(rank, shape)
    if coord is None:
        raise UnsupportedLayoutError(f"cannot read the {ndim}-D device mesh layout of this torch version")
    return shape, _whole("coordinate", coord)


def _whole(what: str, values: Any) -> tuple[int, ...]:
    """Mesh sizes and coordinates as the ints they must be (a file may hold anything there)."""
    try:
        out = tuple(operator.index(v) for v in values)
    except TypeError:
        out = None
    if out is None or any(v < 0 for v in out):
        raise UnsupportedLayoutError(f"device mesh {what} {str(values)[:60]} is not whole numbers")
    return out


def _is_torch_tensor(obj: Any) -> bool:
    """isinstance(obj, torch.Tensor), without importing torch: a tensor exists only once torch is imported."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def storage_records(path: Path) -> dict[int, int]:
    """Where each storage record's data starts (from its local header, as torch's reader finds it) -> its size."""
    d = read_directory(path)
    picked = [i for i, n in enumerate(d.names) if n.startswith("data/")]
    return {start: d.sizes[i] for i, start in data_offsets(d, picked).items()}


def tensor_record(name: str, t: Any, rank: int, world_size: int, path: Path,
                  records: dict[int, int] | None = None) -> TensorRecord:
    """Where one tensor of a rank file (plain or DTensor, loaded on the meta device) lies in the file and in the full
    tensor, checked as torch's reader of real tensors would check it."""
    import torch
    from torch.distributed.tensor import DTensor

    if any(n < 0 for n in (*t.shape, *t.stride())):  # torch.load refuses them; the meta device takes them
        raise CheckpointError(f"{path}: tensor {name!r} has a negative size or stride {list(t.shape)} (torch.load "
                              "refuses it)")
    if isinstance(t, DTensor):
        local = t._local_tensor
        try:
            placements = tuple(_placement_name(p) for p in t.placements)
        except UnsupportedLayoutError as e:
            raise UnsupportedLayoutError(f"{path}: tensor {name!r}: {e}") from None
        try:
            mesh_shape, coord = _mesh_layout(t, rank, world_size)
        except UnsupportedLayoutError as e:
            raise UnsupportedLayoutError(f"{path}: tensor {name!r}: {e}") from None
        shape = tuple(t.shape)
        order = getattr(getattr(t, "_spec", None), "__dict__", {}).get("shard_order")
        if order and any(list(e[1]) != sorted(e[1]) for e in order):
            raise UnsupportedLayoutError(f"{path}: tensor {name!r}: a non-default shard order {order} is not supported")
    else:
        local, placements, mesh_shape, coord = t, None, None, None
        shape = tuple(t.shape)
    if local.is_neg() or local.is_conj():
        bit, fix = ("negative", "resolve_neg") if local.is_neg() else ("conjugate", "resolve_conj")
        raise UnsupportedLayoutError(f"{path}: tensor {name!r} was saved with torch's {bit} bit set (a lazy view whose "
                                     f"stored bytes are not its values); save it after .{fix}()")
    if local.layout != torch.strided:
        raise UnsupportedLayoutError(f"{path}: tensor {name!r} has layout {local.layout}; "
                                     "only dense tensors are supported")
    storage = local.untyped_storage()
    base = getattr(storage, "_checkpoint_offset", None)
    if base is None:
        raise CheckpointError(f"{path}: tensor {name!r} has no stored data (a tensor saved from the meta device holds "
                              "no values)")
    # on the meta device torch predicts where records lie in its own layout; the bytes must be where its
    # reader of real tensors finds them: at a record's data, the record exactly the storage's size
    if records is None:
        records = storage_records(path)
    if records.get(int(base)) != storage.nbytes():
        raise CheckpointError(f"{path}: tensor {name!r}: its storage is not where torch.save would have put it "
                              "(a rank file re-packed or edited by another zip tool); re-save it with torch.save")
    if local.numel() and (local.storage_offset() + sum((s - 1) * st for s, st in zip(local.shape, local.stride()))
                          + 1) * local.element_size() > storage.nbytes():
        raise CheckpointError(f"{path}: tensor {name!r} reaches outside its storage (torch.load refuses it)")
    try:
        dtype = dtypes.of(local.dtype)
    except ValueError:
        raise UnsupportedLayoutError(f"{path}: tensor {name!r} has dtype {local.dtype}, which streammerge does "
                                     "not support") from None
    return TensorRecord(
        name=name,
        dtype=dtype,
        shape=shape,
        local_shape=tuple(local.shape),
        local_stride=tuple(local.stride()),
        offset=int(base) + int(local.storage_offset()) * local.element_size(),
        placements=placements,
        mesh_shape=mesh_shape,
        coordinate=coord,
    )


def load_rank_file(path: Path, rank: int, world_size: int, *, trust_pickle: bool = False,
                   stats: ReadStats | None = None) -> RankFile:
    """Read one rank file's tensor records without reading tensor data."""
    st = os.stat(path)
    declined: list[str] = []
    if not trust_pickle:  # read_state checks the zip as check_zip does; on failure torch_load_meta reports it
        fast = _fast_records(path, rank, world_size, declined)
        if fast is not None:
            if stats is not None:
                stats.decoded += 1
            return RankFile(path=Path(path), rank=rank, size=st.st_size, mtime_ns=st.st_mtime_ns,
                            tensors=_checked(fast[0], path, st.st_size), other=fast[1])
    if stats is not None:
        stats.torch_loaded += 1
        why = f" ({declined[0][:80]})" if declined else ""
        stats.fell_back("--trust-pickle" if trust_pickle
                        else f"our decoder declined the pickle{why}: torch.load decides")
    obj = torch_load_meta(path, trust_pickle=trust_pickle)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    tensors: dict[str, TensorRecord] = {}
    other: dict = {}  # non-tensor entries, under any key _KEYS allows
    records = storage_records(path)
    for name, value in obj.items():
        _check_key(name, path)
        if not isinstance(name, str) or not _is_torch_tensor(value):
            if holds_tensor(value):
                what = (f"entry {name!r} holds tensors inside a {type(value).__name__}" if isinstance(name, str)
                        else f"a tensor lies under the {type(name).__name__} key {name!r}")
                raise CheckpointError(f"{path}: {what}; a model rank file maps each name to one tensor, and "
                                      "streammerge does not guess names for others")
            other[name] = value
            if stats is not None:
                stats.left_out[repr(name)[:40]] += 1
        else:
            try:
                rec = tensor_record(name, value, rank, world_size, path, records)
            except (AttributeError, TypeError, ValueError, IndexError, KeyError) as e:  # a tensor torch half-built
                raise CheckpointError(f"{path}: tensor {name!r} is malformed ({type(e).__name__}: "
                                      f"{(str(e).splitlines() or [''])[0][:150]})") from None
            nbytes = span_bytes(rec)
            if rec.offset + nbytes > st.st_size:
                raise CheckpointError(
                    f"{path}: truncated: tensor {name!r} needs bytes up to {rec.offset + nbytes}, "
                    f"file has {st.st_size}"
                )
            tensors[name] = rec
    return RankFile(path=Path(path), rank=rank, size=st.st_size, mtime_ns=st.st_mtime_ns, tensors=tensors, other=other)


_KEYS = (str, int, float, bytes, type(None))  # the keys a state dict may hold: hashed without recursion


def _check_key(name: Any, path: Path) -> None:
    """Refuse a key of another type before anything hashes it again: a tuple may nest deeper than this thread's
    stack can hash (the unpickler's thread had a stack for it)."""
    if not isinstance(name, _KEYS):
        raise CheckpointError(f"{path}: an entry under a {type(name).__name__} key; a model rank file maps names "
                              "to tensors, and streammerge reads no other keys")


def holds_tensor(value: Any) -> bool:
    """Whether a tensor lies anywhere inside lists, tuples, sets and dicts (keys too), however deep."""
    seen, todo = set(), [value]
    while todo:
        v = todo.pop()
        if _is_torch_tensor(v):
            return True
        if isinstance(v, (list, tuple, set, frozenset, dict)) and id(v) not in seen:
            seen.add(id(v))
            todo.extend(v.items() if isinstance(v, dict) else v)
    return False


def span_bytes(rec: TensorRecord) -> int:
    """Bytes from the first to one past the last element of a (possibly strided) local tensor."""
    if any(s == 0 for s in rec.local_shape):
        return 0
    last = sum((s - 1) * st for s, st in zip(rec.local_shape, rec.local_stride))
    return (last + 1) * rec.dtype.itemsize


def _checked(tensors: dict[str, TensorRecord], path: Path, size: int) -> dict[str, TensorRecord]:
    for name, rec in tensors.items():
        nbytes = span_bytes(rec)
        if rec.offset + nbytes > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} needs bytes up to {rec.offset + nbytes}, "
                                  f"file has {size}")
    return tensors


def _fast_records(path: Path, rank: int, world_size: int,
                  declined: list[str] | None = None) -> tuple[dict[str, TensorRecord], dict] | None:
    """The records through metapickle's allowlisted C unpickler; None when torch.load must decide."""
    from . import torchpickle as mp

    got = mp.read_state(path, declined)
    if got is None:
        return None
    return records_from_state(got.obj, got.offsets, path, rank, world_size)


def records_from_state(obj: Any, offsets: dict[str, int], path: Path, rank: int,
                       world_size: int) -> tuple[dict[str, TensorRecord], dict] | None:
    """TensorRecords from a state dict metapickle decoded, given each storage's byte offset."""
    from . import torchpickle as mp

    if not isinstance(obj, dict):
        return None
    tensors: dict[str, TensorRecord] = {}
    other: dict = {}
    shared: dict[tuple, tuple] = {}
    layouts: dict[tuple[int, int], tuple] = {}  # ids stay valid: `obj` keeps every object alive
    for name, v in obj.items():
        if not isinstance(name, str):
            _check_key(name, path)
            return None
        if isinstance(v, mp.Local):
            local, placements, mesh_shape, coord, shape, dtype = v, None, None, None, v.shape, v.dtype
        elif isinstance(v, mp.Wrapper):
            wrapped, spec = v.state.get("_local_tensor"), v.state.get("_spec")
            if not isinstance(wrapped, mp.Local) or not isinstance(spec, mp.DTensorSpec):
                return None
            local = wrapped
            try:
                placements = tuple(mp.placement_name(p) for p in spec.placements)
                key = (id(spec.mesh), len(placements))  # one mesh object per file, shared by every DTensor
                if key not in layouts:
                    layouts[key] = _mesh_layout(mp.MeshView(spec), rank, world_size)
                mesh_shape, coord = layouts[key]
                order = [getattr(e, "args", e) for e in spec.__dict__.get("shard_order") or ()]
                if order and any(list(e[1]) != sorted(e[1]) for e in order):
                    raise UnsupportedLayoutError(f"a non-default shard order {order} is not supported")
            except UnsupportedLayoutError as e:
                raise UnsupportedLayoutError(f"{path}: tensor {name!r}: {e}") from None
            except (mp.NotPlain, AttributeError, IndexError, TypeError, KeyError):
                return None
            shape, dtype = v.shape, v.dtype
            if local.dtype != dtype:
                return None
        else:  # nested state (optimizer files) and other objects: torch.load gives callers real tensors
            return None
        if local.storage.key not in offsets:
            return None
        same = shared.setdefault  # one tuple object per distinct value: 50,000 records share a few dozen
        tensors[name] = TensorRecord(
            name=name, dtype=dtype, shape=same(shape, shape),
            local_shape=same(local.shape, local.shape), local_stride=same(local.stride, local.stride),
            offset=offsets[local.storage.key] + local.offset * dtype.itemsize,
            placements=placements if placements is None else same(placements, placements),
            mesh_shape=mesh_shape if mesh_shape is None else same(mesh_shape, mesh_shape),
            coordinate=coord if coord is None else same(coord, coord))
    return tensors, other



# ---------------------------------------------------------------- placements -> pieces

def chunk_bounds(length: int, parts: int, index: int) -> tuple[int, int]:
    """The [lo, hi) range torch.chunk gives piece `index` of `parts` (uneven; trailing pieces may be empty)."""
    size = -(-length // parts) if length else 0
    return min(index * size, length), min((index + 1) * size, length)


def region_of(record: TensorRecord, mesh_shape: tuple[int, ...] | None = None) -> tuple[tuple[int, int], ...]:
    """The box of the full tensor a rank's local tensor holds, from placements and mesh coordinate."""
    box = [(0, s) for s in record.shape]
    if record.placements is None:
        return tuple(box)
    mesh = mesh_shape or record.mesh_shape
    # a sharded record always carries a coordinate (_mesh_layout raises without one); tensor_pieces passes the mesh
    assert mesh is not None and record.coordinate is not None, record.name
    for placement, size, coord in zip(record.placements, mesh, record.coordinate):
        if placement.startswith("Shard("):
            d = int(placement[6:-1])
            if d < 0:
                d += len(box)
            if not 0 <= d < len(box):
                raise UnsupportedLayoutError(f"{record.name}: {placement} on a {len(box)}-D tensor")
            lo, hi = box[d]
            a, b = chunk_bounds(hi - lo, size, coord)
            box[d] = (lo + a, lo + b)
    return tuple(box)


def layout_name(placements: tuple[str, ...] | None) -> str:
    """"Shard(0)", "(Replicate(), Shard(0))" or "plain", as inspect shows them."""
    if placements is None:
        return "plain"
    return placements[0] if len(placements) == 1 else "(" + ", ".join(placements) + ")"


def tensor_pieces(name: str, records: Sequence[TensorRecord], files: Sequence[RankFile],
                  shared: dict | None = None) -> tuple[TensorRecord, tuple[Piece, ...]]:
    """Check every rank agrees on one tensor and return the pieces that tile it exactly once.

    `shared` (one dict for a whole plan) makes equal file names and start tuples one object each:
    a plan holds one Piece per tensor per rank, millions for large world sizes.
    """
    same = (shared if shared is not None else {}).setdefault
    first = records[0]
    for rec, rf in zip(records, files):
        attrs = ("shape", "dtype", "placements", "mesh_shape") if first.mesh_shape else ("shape", "dtype", "placements")
        for attr in attrs:
            if getattr(rec, attr) != getattr(first, attr):
                raise CheckpointError(
                    f"{rf.path}: tensor {name!r} has {attr} {getattr(rec, attr)} but rank {files[0].rank} "
                    f"has {getattr(first, attr)} (rank files from different runs?)"
                )
    if first.placements is None:  # plain tensor: every rank holds a full copy; take one
        if first.local_shape != first.shape:
            raise CheckpointError(f"{files[0].path}: plain tensor {name!r} has shape {first.local_shape}, "
                                  f"expected {first.shape}")
        return first, (Piece(files[0].rank, str(files[0].path), first.offset, first.shape, first.local_stride,
                             (0,) * len(first.shape)),)
    mesh_shape = first.mesh_shape or tuple(max(c) + 1 for c in zip(*(r.coordinate for r in records)))
    _check_coordinates(records, files)
    seen: dict[tuple, Piece] = {}
    for rec, rf in zip(records, files):
        box = region_of(rec, mesh_shape)
        want = tuple(hi - lo for lo, hi in box)
        if rec.local_shape != want:
            raise CheckpointError(
                f"{rf.path}: tensor {name!r}: local shape {list(rec.local_shape)} does not match the "
                f"{list(want)} piece that {', '.join(first.placements)} gives rank {rf.rank}"
            )
        if 0 in want or box in seen:  # empty piece, or a replica of a piece we already have
            continue
        start = tuple(lo for lo, _ in box)
        path = str(rf.path)
        seen[box] = Piece(rf.rank, same(path, path), rec.offset, rec.local_shape, rec.local_stride, same(start, start))
    covered = sum(math.prod(p.shape) for p in seen.values())
    if covered != math.prod(first.shape):
        raise CheckpointError(
            f"{files[0].path.parent}: tensor {name!r}: the rank pieces cover {covered} of "
            f"{math.prod(first.shape)} elements (a mesh coordinate is missing)"
        )
    return first, tuple(seen.values())


def _check_coordinates(records: Sequence[TensorRecord], files: Sequence[RankFile]) -> None:
    """No mesh coordinate twice: a copy of another rank's file can still cover every element (HSDP's replicas), so
    coverage alone does not catch it. A renamed file is fine: each piece goes where its own coordinate puts it."""
    by_coord: dict[tuple[int, ...] | None, RankFile] = {}
    for rec, rf in zip(records, files):
        if rec.coordinate in by_coord:
            raise CheckpointError(f"{rf.path}: holds the same mesh coordinate {rec.coordinate} as "
                                  f"{by_coord[rec.coordinate].path.name} (a copy of another rank's file, or from "
                                  "another run?)")
        by_coord[rec.coordinate] = rf


def row_major_coordinate(rank: int, mesh_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Where init_device_mesh puts a rank (mesh = arange(world).view(mesh_shape)); also a flat index's place."""
    coord = []
    for s in reversed(mesh_shape):
        coord.append(rank % s)
        rank //= s
    return tuple(reversed(coord))
