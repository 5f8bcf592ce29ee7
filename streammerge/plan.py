"""Plan: source tensors -> output tensors -> output files with their exact headers and offsets.

A plan is plain data computed from metadata alone (no tensor bytes are read): every output tensor
says where its bytes come from -- pieces of source files copied as they are (cast if asked), or a
declared computation over windows of source tensors (a LoRA fold) -- and every output file carries
its final header. It can be printed (`streammerge inspect`), tested, replayed by `verify` and split
across workers or torchrun ranks; the writer only executes it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import dtypes
from .dtypes import DType
from .errors import CheckpointError
from .sources.base import Piece, SourceTensor, pieces_key
from .write.safetensors_format import Layout, layout

if TYPE_CHECKING:
    from .sources.base import Source

WEIGHTS_INDEX = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}
PLAN_VERSION = 2  # bump when the plan's meaning changes: older output folders are then not resumed


@dataclass(frozen=True)
class LoraFold:
    """`W + scale * (B @ A)` (peft's merge), computed in float32 one window of W's rows at a time.

    `base` is W (out x in), `a` is lora_A (r x in), `b` is lora_B (out x r): each a source tensor of
    its own, so the fold reads them from wherever the checkpoint keeps them. `transpose`: W is a
    GPT-2-style Conv1D's (in x out), and peft folds `(B @ A).T * scale` into it (fan_in_fan_out).
    """

    a: SourceTensor
    b: SourceTensor
    scale: float
    transpose: bool = False

    def key(self) -> str:
        a, b = self.a, self.b
        tail = ",T" if self.transpose else ""  # a Linear's key as before: manifests record it for resume
        return f"fold({self.scale!r},{a.name},{pieces_key(a.pieces)},{b.name},{pieces_key(b.pieces)}{tail})"


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its name, shape and dtype, and where its bytes come from."""

    name: str
    source: SourceTensor  # copied (cast if dtype differs), or the base of a fold
    dtype: DType  # output dtype
    fold: LoraFold | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def source_dtype(self) -> DType:
        return self.source.dtype

    @property
    def pieces(self) -> Sequence[Piece]:
        return self.source.pieces

    @property
    def flat(self) -> bool:
        return self.source.flat and self.fold is None

    @property
    def geometry(self) -> tuple[int, ...]:
        """The shape the writer's boxes are in: the pieces' (a fold's are its rows and columns; it reads each source's
        box in that source's own)."""
        return self.shape if self.fold is not None else self.source.geometry

    @property
    def fold_dtype(self) -> DType:
        """What a fold computes in: float32, or float64 where W or a factor is float64 (peft's merge adds in W's
        float64; float32 would round away W's low bits)."""
        assert self.fold is not None
        wide = dtypes.float64 in (self.source.dtype, self.fold.a.dtype, self.fold.b.dtype)
        return dtypes.float64 if wide else dtypes.float32

    @property
    def placements(self) -> str:
        return self.source.layout + ((" + LoRA.T" if self.fold.transpose else " + LoRA") if self.fold else "")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def key(self) -> str:
        """What the bytes of this tensor depend on (resume fingerprint)."""
        fold = self.fold.key() if self.fold else ""
        if self.fold and self.fold_dtype is dtypes.float64:
            fold += "@float64"  # earlier versions folded these in float32: their outputs are not resumed
        return (f"{self.name}|{self.source.name}|{self.source_dtype.name}|{self.dtype.name}|{self.shape}|"
                f"{self.source.flat}|{pieces_key(self.pieces)}|{fold}")


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
    """One output set (the weights, the optimizer, an adapter): everything the writer needs, no tensor data."""

    tensors: dict[str, TensorPlan]
    files: tuple[FilePlan, ...]
    index_filename: str | None  # None when one file holds everything (and no index is needed)
    dropped: dict[str, str] = field(default_factory=dict)  # tied duplicate -> the key kept
    # a duplicate dropped because the config ties it, not because it shares the kept one's storage: the writer
    # (and verify) must find its bytes equal to the kept tensor's, or the tied model is not the trained one
    tie_checks: dict[str, TensorPlan] = field(default_factory=dict)
    subdir: str = ""  # "" for weights, "optimizer" for the optimizer export, "lora_adapter"
    index_metadata: dict = field(default_factory=dict)
    source: Source | None = field(default=None, repr=False, compare=False)
    notes: list[str] = field(default_factory=list)  # what inspect shows under the header (LoRA r/alpha ...)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def __repr__(self) -> str:
        index = f", index={self.index_filename!r}" if self.index_filename else ""
        return (f"Plan({self.subdir or 'weights'}: {len(self.tensors)} tensors, {fmt_bytes(self.total_bytes)} in "
                f"{len(self.files)} files{index}, tied={len(self.dropped)})")

    def rel(self, filename: str) -> str:
        """A file's path relative to the output folder."""
        return f"{self.subdir}/{filename}" if self.subdir else filename

    def weight_map(self) -> dict[str, str]:
        return {name: f.filename for f in self.files for name in f.names}

    def index_json(self) -> dict:
        meta = {"total_size": self.total_bytes, **self.index_metadata}
        return {"metadata": meta, "weight_map": dict(sorted(self.weight_map().items()))}

    def fingerprint(self) -> str:
        """Identifies what this plan writes: same inputs and options give the same fingerprint."""
        h = hashlib.sha256(f"plan v{PLAN_VERSION}|{self.subdir}".encode())
        for f in self.files:
            h.update(f.filename.encode())
            h.update(f.layout.header)
        for t in self.tensors.values():
            h.update(t.key().encode())
        h.update(json.dumps(self.index_metadata, sort_keys=True).encode())
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
        lines = list(self.source.describe()) if self.source is not None and not self.subdir else []
        lines += self.notes
        src = sum(t.numel * t.source_dtype.itemsize for t in self.tensors.values())
        title = f"[{self.subdir}] " if self.subdir else ""
        lines.append(f"{title}tensors     {len(self.tensors)}   source {fmt_bytes(src)}   "
                     f"output {fmt_bytes(self.total_bytes)}")
        if self.dropped:
            lines.append("tied (not written, like save_pretrained): "
                         + ", ".join(f"{k} -> {v}" for k, v in self.dropped.items()))
        lines.append("")
        lines.append(f"{'tensor':<56} {'shape':<16} {'dtype':<18} {'placements':<26} {'pieces':>6} {'bytes':>10}")
        rows = list(self.tensors.values())
        shown = rows if max_rows is None else rows[:max_rows]
        for t in shown:
            dt = t.source_dtype.name + ("" if t.dtype == t.source_dtype else f"->{t.dtype.name}")
            lines.append(f"{t.name:<56} {str(list(t.shape)):<16} {dt:<18} {t.placements:<26} "
                         f"{len(t.pieces):>6} {fmt_bytes(t.nbytes):>10}")
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more tensors")
        lines.append("")
        for f in self.files:
            lines.append(f"{self.rel(f.filename):<44} {len(f.layout.entries):>6} tensors {fmt_bytes(f.size):>10}")
        if self.index_filename:
            lines.append(self.rel(self.index_filename))
        return "\n".join(lines)

    def to_json(self) -> dict:
        """A JSON-friendly view of the plan (for `inspect --json`)."""
        def pieces(ps: Sequence[Piece]) -> list[dict]:
            return [{"rank": p.rank, "file": p.file, "offset": p.offset, "shape": list(p.shape),
                     "stride": list(p.stride), "start": list(p.start)} for p in ps]

        tensors = []
        for t in self.tensors.values():
            row: dict[str, Any] = {"name": t.name, "source": t.source.name, "shape": list(t.shape),
                                   "source_dtype": t.source_dtype.name, "dtype": t.dtype.name,
                                   "placements": t.placements, "pieces": pieces(t.pieces)}
            if t.fold:
                row["fold"] = {"scale": t.fold.scale, "lora_A": t.fold.a.name, "lora_A_pieces": pieces(t.fold.a.pieces),
                               "lora_B": t.fold.b.name, "lora_B_pieces": pieces(t.fold.b.pieces)}
                if t.fold.transpose:
                    row["fold"]["transpose"] = True
            tensors.append(row)
        return {"subdir": self.subdir, "tensors": tensors,
                "files": [{"filename": f.filename, "size": f.size, "tensors": list(f.names)} for f in self.files],
                "index": self.index_filename, "dropped": self.dropped}


def fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


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


def output_dtype(source_dtype: DType, dtype: DType | None) -> DType:
    """--dtype casts floating tensors only; integers and bools keep their type."""
    return dtype if (dtype is not None and source_dtype.is_floating_point) else source_dtype


# ---------------------------------------------------------------- tied weights

OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight", "output.weight")
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight",
                     "tok_embeddings.weight")


def _storage_key(t: TensorPlan) -> str:
    return t.key().split("|", 2)[2]  # everything but the names: equal keys read the same bytes the same way


def tied_duplicates(tensors: Mapping[str, TensorPlan], tie_embeddings: bool) -> dict[str, str]:
    """Keys that save_pretrained would not write: aliases of one storage, and tied output embeddings.

    An output embedding sharing the input embedding's storage is dropped only when the config ties them:
    under an untied config transformers expects it in the file (the trained run tied them; the untied
    model is still the trained function with both written).
    """
    dropped: dict[str, str] = {}
    by_bytes: dict[str, str] = {}
    for name, t in tensors.items():
        key = _storage_key(t)
        if key in by_bytes and t.pieces and (tie_embeddings or not any(
                n.endswith(OUTPUT_EMBEDDINGS) for n in (name, by_bytes[key]))):
            dropped[name] = by_bytes[key]
        else:
            by_bytes[key] = name
    if tie_embeddings:
        # save_pretrained keeps the input embedding: one dropped above as an alias of an output embedding that came
        # first in the state dict is kept, and the output embedding is dropped as tied below
        for name, kept in list(dropped.items()):
            if name.endswith(_INPUT_EMBEDDINGS) and kept.endswith(OUTPUT_EMBEDDINGS):
                del dropped[name]
        for out_name in [n for n in tensors if n.endswith(OUTPUT_EMBEDDINGS) and n not in dropped]:
            prefix = out_name.rsplit(".", 2)[0] + "." if out_name.count(".") >= 2 else ""
            inputs = [n for n in tensors if n.endswith(_INPUT_EMBEDDINGS) and n.startswith(prefix)
                      and tensors[n].shape == tensors[out_name].shape]
            if inputs:
                dropped[out_name] = inputs[0]
    # an alias of something tied keeps pointing at a key that is written
    return {k: v for k, v in dropped.items() if v not in dropped}


def build_plan(tensors: Iterable[TensorPlan], *, max_shard_size: int, tie_embeddings: bool = False,
               prefix: str = "model", subdir: str = "", index_metadata: Mapping | None = None,
               metadata: Mapping[str, str] | None = SAFETENSORS_METADATA, always_index: bool = False,
               single_file: str | None = None, source: Source | None = None, notes: Sequence[str] = ()) -> Plan:
    """Output tensors -> files: drop tied duplicates (like save_pretrained), split, lay out headers.

    `single_file` puts every tensor in one file of that name (e.g. `optimizer.pt`, whose size the
    safetensors layout only estimates) and writes no index.
    """
    planned = {t.name: t for t in tensors}
    where = f"{source.path}: " if source is not None else ""
    for t in planned.values():
        if not t.name.isascii():
            try:
                t.name.encode("utf-8")
            except UnicodeEncodeError:
                raise CheckpointError(f"{where}tensor name {t.name!r} is not valid UTF-8 (a lone surrogate): no "
                                      "safetensors header or index can hold it; rename it before saving") from None
        if single_file is None and t.dtype.code is None:
            raise CheckpointError(f"{where}tensor {t.name!r} has dtype {t.dtype.name}, which safetensors cannot "
                                  "store; convert it before saving (complex128 to two float64 tensors, say)")
    if single_file is None and "__metadata__" in planned:
        raise CheckpointError(f"{where}a tensor named '__metadata__', the key a safetensors header keeps for its "
                              "metadata: no safetensors reader would load it; rename it before saving")
    dropped = tied_duplicates(planned, tie_embeddings) if not subdir else {}
    kept = {k: v for k, v in planned.items() if k not in dropped}
    checks = {k: planned[k] for k, v in dropped.items() if _storage_key(planned[k]) != _storage_key(planned[v])}
    if single_file is not None:
        entries = ((t.name, t.dtype, t.shape) for t in kept.values())
        return Plan(tensors=kept, files=(FilePlan(single_file, layout(entries, metadata)),), index_filename=None,
                    subdir=subdir, index_metadata=dict(index_metadata or {}), source=source, notes=list(notes))
    files, index = assign_files(list(kept.values()), max_shard_size, prefix=prefix, metadata=metadata)
    if always_index and index is None:
        index = f"{prefix}.safetensors.index.json"
    return Plan(tensors=kept, files=files, index_filename=index, dropped=dropped, tie_checks=checks, subdir=subdir,
                index_metadata=dict(index_metadata or {}), source=source, notes=list(notes))


def copy_plans(sources: Iterable[SourceTensor], dtype: DType | None) -> list[TensorPlan]:
    """Output tensors that copy source tensors as they are (cast to `dtype` where floating)."""
    return [TensorPlan(s.name, s, output_dtype(s.dtype, dtype)) for s in sources]


__all__ = ["FilePlan", "LoraFold", "Piece", "Plan", "SourceTensor", "TensorPlan", "assign_files", "build_plan",
           "copy_plans", "dtypes", "fmt_bytes", "output_dtype", "tied_duplicates"]
