"""Plan: DTensor placements -> per-tensor pieces -> output files, headers and offsets.

A plan is plain data computed from metadata alone (no tensor bytes are read): every output tensor
lists the pieces of rank files that make it up, and every output file carries its final header.
It can be printed (`streammerge inspect`), tested, and split across workers or torchrun ranks; the
writer only executes it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import dtypes
from .discover import Checkpoint
from .errors import CheckpointError, UnsupportedLayoutError
from .load import RankFile, TensorRecord
from .rankset import RankSet
from .safetensors_format import Layout, layout

MAX_SHARD_SIZE = "5GB"
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
WEIGHTS_INDEX = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}
DTYPE_NAMES = {"bfloat16": dtypes.bfloat16, "float16": dtypes.float16, "float32": dtypes.float32,
               "bf16": dtypes.bfloat16, "fp16": dtypes.float16, "fp32": dtypes.float32, "half": dtypes.float16,
               "float": dtypes.float32, "float64": dtypes.float64}


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as huggingface_hub does); '64MiB' is binary."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"cannot read size {size!r}: use e.g. 5GB, 500MB or 64MiB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2) or "B"])


@dataclass(frozen=True, slots=True)  # one per tensor per rank: keep it small
class Piece:
    """A box of the full tensor stored contiguously-or-strided in one rank file."""

    rank: int
    file: str
    offset: int  # byte offset in the rank file of the piece's first element
    shape: tuple[int, ...]  # piece (local) shape
    stride: tuple[int, ...]  # local strides, in elements
    start: tuple[int, ...]  # index of the piece's first element in the full tensor


class ShardedPieces(Sequence[Piece]):
    """One tensor's pieces across a RankSet, built when iterated.

    A plan holds one of these per tensor instead of one Piece per tensor per rank (51 million for
    1024 ranks x 50,000 tensors): which ranks contribute which box is shared by every tensor of the
    same shape and placements, and each rank's offset is its base offset plus a shift.
    """

    __slots__ = ("ranks", "index", "parts", "shape", "stride")

    def __init__(self, ranks: RankSet, index: int, parts: PieceParts, shape: tuple[int, ...],
                 stride: tuple[int, ...]):
        self.ranks, self.index, self.parts, self.shape, self.stride = ranks, index, parts, shape, stride

    def __len__(self) -> int:
        return len(self.parts.boxes)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return tuple(self)[k]
        e, start = self.parts.boxes[k]
        entry = self.ranks.entries[e]
        return Piece(entry.rank, self.ranks.path_names[e], entry.base[self.index] + entry.shift, self.shape,
                     self.stride, start)

    def __iter__(self) -> Iterator[Piece]:
        entries, names, i = self.ranks.entries, self.ranks.path_names, self.index
        for e, start in self.parts.boxes:
            entry = entries[e]
            yield Piece(entry.rank, names[e], entry.base[i] + entry.shift, self.shape, self.stride, start)

    def _key(self) -> tuple:
        return (id(self.ranks), self.parts.digest, self.shape, self.stride,
                tuple(self.ranks.offset(e, self.index) for e in self.ranks.keyed))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ShardedPieces):
            return self._key() == other._key()
        return isinstance(other, tuple) and tuple(self) == other

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:  # what Plan.fingerprint hashes: stable across runs, compact
        return (f"ShardedPieces({self.ranks.digest}, {self.parts.digest}, {self.shape}, {self.stride}, "
                f"{self.ranks.entries[0].base[self.index]})")


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


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    source_dtype: dtypes.DType
    dtype: dtypes.DType  # output dtype
    placements: str  # for display: "Shard(0)", "(Replicate(), Shard(0))", "plain"
    pieces: Sequence[Piece]  # a tuple, or ShardedPieces built on demand
    flat: bool = False  # pieces index the flattened tensor (FSDP1 flat parameters), not its shape

    @property
    def geometry(self) -> tuple[int, ...]:
        """The shape the pieces are boxes of."""
        return (self.numel,) if self.flat else self.shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class FilePlan:
    """One output file: its name, and its exact header and tensor offsets."""

    filename: str
    layout: Layout

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.layout.entries)


@dataclass
class Plan:
    """Everything the writer needs; nothing here holds tensor data."""

    checkpoint: Checkpoint | None
    tensors: dict[str, TensorPlan]
    files: tuple[FilePlan, ...]
    index_filename: str | None  # None when one file holds everything
    dropped: dict[str, str] = field(default_factory=dict)  # tied duplicate -> the key kept
    subdir: str = ""  # "" for weights, "optimizer" for the optimizer export
    index_metadata: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def weight_map(self) -> dict[str, str]:
        return {name: f.filename for f in self.files for name in f.names}

    def index_json(self) -> dict:
        meta = {"total_size": self.total_bytes, **self.index_metadata}
        return {"metadata": meta, "weight_map": dict(sorted(self.weight_map().items()))}

    def fingerprint(self) -> str:
        """Identifies the merge: same inputs and options give the same fingerprint (for resume)."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.filename.encode())
            h.update(f.layout.header)
        for t in self.tensors.values():
            h.update(repr((t.name, str(t.source_dtype), t.pieces)).encode())
        return h.hexdigest()

    def split(self, num_parts: int, part: int) -> tuple[FilePlan, ...]:
        """A deterministic share of the output files (for workers and torchrun ranks), balanced by bytes."""
        loads = [0] * num_parts
        owner: dict[str, int] = {}
        for f in sorted(self.files, key=lambda f: (-f.size, f.filename)):
            i = min(range(num_parts), key=lambda k: (loads[k], k))
            owner[f.filename] = i
            loads[i] += f.size
        return tuple(f for f in self.files if owner[f.filename] == part)

    def describe(self, max_rows: int | None = None) -> str:
        """Human-readable plan, as `streammerge inspect` prints it."""
        lines = []
        ck = self.checkpoint
        if ck is not None:
            lines.append(f"checkpoint  {ck.path}")
            lines.append(
                f"world size  {ck.world_size}   FSDP {ck.fsdp_version or '?'}   step {ck.step if ck.step is not None else '?'}"
                f"   optimizer files: {'yes' if ck.has_optimizer else 'no'}"
            )
        src = sum(p_bytes(t) for t in self.tensors.values())
        lines.append(f"tensors     {len(self.tensors)}   source {_fmt_bytes(src)}   output {_fmt_bytes(self.total_bytes)}")
        if self.dropped:
            lines.append("tied (not written, like save_pretrained): "
                         + ", ".join(f"{k} -> {v}" for k, v in self.dropped.items()))
        lines.append("")
        lines.append(f"{'tensor':<56} {'shape':<16} {'dtype':<18} {'placements':<26} {'pieces':>6} {'bytes':>10}")
        rows = list(self.tensors.values())
        shown = rows if max_rows is None else rows[:max_rows]
        for t in shown:
            dt = _short(t.source_dtype) + ("" if t.dtype == t.source_dtype else f"->{_short(t.dtype)}")
            lines.append(f"{t.name:<56} {str(list(t.shape)):<16} {dt:<18} {t.placements:<26} "
                         f"{len(t.pieces):>6} {_fmt_bytes(t.nbytes):>10}")
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more tensors")
        lines.append("")
        prefix = f"{self.subdir}/" if self.subdir else ""
        for f in self.files:
            lines.append(f"{prefix}{f.filename:<44} {len(f.layout.entries):>6} tensors {_fmt_bytes(f.size):>10}")
        if self.index_filename:
            lines.append(f"{prefix}{self.index_filename}")
        return "\n".join(lines)


def p_bytes(t: TensorPlan) -> int:
    return t.numel * t.source_dtype.itemsize


def _short(dt: dtypes.DType) -> str:
    return str(dt).replace("torch.", "")


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


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
    for placement, size, coord in zip(record.placements, mesh_shape or record.mesh_shape, record.coordinate):
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


def tensor_pieces(name: str, records: Sequence[TensorRecord], files: Sequence[RankFile],
                  shared: dict | None = None) -> tuple[TensorRecord, tuple[Piece, ...]]:
    """Check every rank agrees on one tensor and return the pieces that tile it exactly once.

    `shared` (one dict for a whole plan) makes equal file names and start tuples one object each:
    a plan holds one Piece per tensor per rank, millions for large world sizes.
    """
    same = (shared if shared is not None else {}).setdefault
    first = records[0]
    for rec, rf in zip(records, files):
        for attr in ("shape", "dtype", "placements", "mesh_shape") if first.mesh_shape else ("shape", "dtype", "placements"):
            if getattr(rec, attr) != getattr(first, attr):
                raise CheckpointError(
                    f"{rf.path}: tensor {name!r} has {attr} {getattr(rec, attr)} but rank {files[0].rank} "
                    f"has {getattr(first, attr)} (rank files from different runs?)"
                )
    if first.placements is None:  # plain tensor: every rank holds a full copy; take one
        if first.local_shape != first.shape:
            raise CheckpointError(f"{files[0].path}: plain tensor {name!r} has shape {first.local_shape}, expected {first.shape}")
        return first, (Piece(files[0].rank, str(files[0].path), first.offset, first.shape, first.local_stride, (0,) * len(first.shape)),)
    mesh_shape = first.mesh_shape or tuple(max(c) + 1 for c in zip(*(r.coordinate for r in records)))
    seen: dict[tuple, Piece] = {}
    for rec, rf in zip(records, files):
        box = region_of(rec, mesh_shape)
        want = tuple(hi - lo for lo, hi in box)
        if rec.local_shape != want:
            raise CheckpointError(
                f"{rf.path}: tensor {name!r}: local shape {list(rec.local_shape)} does not match the "
                f"{list(want)} piece that {', '.join(rec.placements)} gives rank {rf.rank}"
            )
        if 0 in want or box in seen:  # empty piece, or a replica of a piece we already have
            continue
        start = tuple(lo for lo, _ in box)
        path = str(rf.path)
        seen[box] = Piece(rf.rank, same(path, path), rec.offset, rec.local_shape, rec.local_stride, same(start, start))
    covered = sum(math.prod(p.shape) for p in seen.values())
    if covered != math.prod(first.shape):
        by_coord: dict[tuple, RankFile] = {}
        for rec, rf in zip(records, files):
            if rec.coordinate in by_coord:
                raise CheckpointError(
                    f"{rf.path}: holds the same mesh coordinate {rec.coordinate} as {by_coord[rec.coordinate].path.name} "
                    "(a copy of another rank's file, or from another run?)"
                )
            by_coord[rec.coordinate] = rf
        raise CheckpointError(
            f"{files[0].path.parent}: tensor {name!r}: the rank pieces cover {covered} of "
            f"{math.prod(first.shape)} elements (a mesh coordinate is missing or repeated)"
        )
    return first, tuple(seen.values())


# ---------------------------------------------------------------- tensors -> files

def assign_files(tensors: Sequence[TensorPlan], max_shard_size: int, *, prefix: str = "model",
                 metadata: Mapping[str, str] | None = SAFETENSORS_METADATA) -> tuple[tuple[FilePlan, ...], str | None]:
    """Greedy split in state-dict order, as huggingface_hub's split_torch_state_dict_into_shards does.

    A tensor larger than the limit gets a file of its own; when everything fits, one
    `{prefix}.safetensors` and no index.
    """
    groups: list[list[TensorPlan]] = []
    current: list[TensorPlan] = []
    current_size = 0
    for t in tensors:
        if t.nbytes > max_shard_size:
            groups.append([t])
            continue
        if current and current_size + t.nbytes > max_shard_size:
            groups.append(current)
            current, current_size = [], 0
        current.append(t)
        current_size += t.nbytes
    if current or not groups:
        groups.append(current)
    n = len(groups)
    files = []
    for i, group in enumerate(groups):
        name = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
        files.append(FilePlan(name, layout(((t.name, t.dtype, t.shape) for t in group), metadata)))
    index = None if n == 1 else f"{prefix}.safetensors.index.json"
    return tuple(files), index


# ---------------------------------------------------------------- dtype and tied weights

def resolve_dtype(option: str | dtypes.DType | None, hf_config: Mapping | None) -> dtypes.DType | None:
    """--dtype: 'auto' uses the config's dtype, else keeps; 'keep' keeps; a name casts. None = keep.

    A dtype object (ours or a torch.dtype, read by name) is taken as is."""
    if option is not None and not isinstance(option, str):
        return dtypes.of(option)
    option = (option or "auto").lower()
    if option == "keep":
        return None
    if option == "auto":
        named = (hf_config or {}).get("dtype") or (hf_config or {}).get("torch_dtype")
        return DTYPE_NAMES.get(str(named).replace("torch.", "")) if named else None
    if option not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {option!r}: use auto, keep, bfloat16, float16 or float32")
    return DTYPE_NAMES[option]


_OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight", "output.weight")
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight", "tok_embeddings.weight")


def ties_embeddings(hf_config: Mapping | None, hf_dir: Path | None) -> bool:
    """Whether the model ties its output embedding to its input embedding (transformers' rule)."""
    cfg = dict(hf_config or {})
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for c in (cfg, text_cfg):
        if "tie_word_embeddings" in c:
            return bool(c["tie_word_embeddings"])
    if hf_dir is None:
        return False
    try:  # the default depends on the model class: ask transformers (config only, no weights)
        from transformers import AutoConfig

        return bool(getattr(AutoConfig.from_pretrained(str(hf_dir)), "tie_word_embeddings", False))
    except Exception:
        return False


def tied_duplicates(tensors: Mapping[str, TensorPlan], tie_embeddings: bool) -> dict[str, str]:
    """Keys that save_pretrained would not write: aliases of one storage, and tied output embeddings."""
    dropped: dict[str, str] = {}
    by_pieces: dict[tuple, str] = {}
    for name, t in tensors.items():
        key = (t.shape, t.source_dtype, t.pieces)
        if key in by_pieces and t.pieces:
            dropped[name] = by_pieces[key]
        else:
            by_pieces[key] = name
    if tie_embeddings:
        for out_name in [n for n in tensors if n.endswith(_OUTPUT_EMBEDDINGS) and n not in dropped]:
            prefix = out_name.rsplit(".", 2)[0] + "." if out_name.count(".") >= 2 else ""
            inputs = [n for n in tensors if n.endswith(_INPUT_EMBEDDINGS) and n.startswith(prefix)
                      and tensors[n].shape == tensors[out_name].shape]
            if inputs:
                dropped[out_name] = inputs[0]
    # an alias of something tied keeps pointing at a key that is written
    return {k: v for k, v in dropped.items() if v not in dropped}


# ---------------------------------------------------------------- the model plan

def plan_tensors(ranks: RankSet, dtype: dtypes.DType | None) -> dict[str, TensorPlan]:
    """One TensorPlan per tensor name, in the state-dict order of rank 0.

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
        out_dtype = dtype if (dtype is not None and first.dtype.is_floating_point) else first.dtype
        placements = "plain" if first.placements is None else (
            first.placements[0] if len(first.placements) == 1 else "(" + ", ".join(first.placements) + ")")
        out[name] = TensorPlan(name, first.shape, first.dtype, out_dtype, placements, pieces)
    return out


def build_plan(checkpoint: Checkpoint, ranks: RankSet, *, dtype: dtypes.DType | None,
               max_shard_size: int, hf_config: Mapping | None) -> Plan:
    """The weights plan: pieces, tied-key dropping and output files."""
    tensors = plan_tensors(ranks, dtype)
    if not tensors:
        raise CheckpointError(f"{checkpoint.path}: the model rank files hold no tensors (empty checkpoint)")
    dropped = tied_duplicates(tensors, ties_embeddings(hf_config, checkpoint.hf_dir))
    kept = {k: v for k, v in tensors.items() if k not in dropped}
    files, index = assign_files(list(kept.values()), max_shard_size)
    return Plan(checkpoint=checkpoint, tensors=kept, files=files, index_filename=index, dropped=dropped)


def plan_to_json(plan: Plan) -> dict:
    """A JSON-friendly view of the plan (for `inspect --json`)."""
    return {
        "checkpoint": str(plan.checkpoint.path) if plan.checkpoint else None,
        "tensors": [
            {"name": t.name, "shape": list(t.shape), "source_dtype": _short(t.source_dtype), "dtype": _short(t.dtype),
             "placements": t.placements,
             "pieces": [{"rank": p.rank, "offset": p.offset, "shape": list(p.shape), "start": list(p.start)} for p in t.pieces]}
            for t in plan.tensors.values()
        ],
        "files": [{"filename": f.filename, "size": f.size, "tensors": list(f.names)} for f in plan.files],
        "index": plan.index_filename,
        "dropped": plan.dropped,
    }


def iter_all(plans: Iterable[Plan]) -> Iterable[tuple[Plan, FilePlan]]:
    for p in plans:
        for f in p.files:
            yield p, f
