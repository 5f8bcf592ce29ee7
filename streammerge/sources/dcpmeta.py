"""A DCP folder's `.metadata`, read without torch and without running anything from the file.

`.metadata` is a plain pickle of `torch.distributed.checkpoint.metadata.Metadata`: per key the
global shape, dtype and chunks (`state_dict_metadata`), where each chunk's bytes are
(`storage_data`: `MetadataIndex(fqn, offset)` -> `_StorageInfo(relative_path, offset, length)`),
and how the flattened keys nest (`planner_data`: key -> path in the saved dict). The C unpickler
resolves only an allowlist of globals, each to a small record of ours that keeps its pickled state
in a dict (never as attributes, so no pickled name can shadow ours); everything else is refused.

Records whose meaning depends on every field (`_StorageInfo`: a new field such as
`transform_descriptors` changes what the bytes are) refuse fields they do not know; containers
(`Metadata`, `StorageMeta`, Megatron's cached save plans) keep extra fields as data.
Module paths and pickled forms were checked against torch 2.4 - 2.14 sources and real files of 2.13.
"""

from __future__ import annotations

import io
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .. import dtypes
from ..dtypes import DType
from ..errors import CheckpointError, UnsupportedLayoutError
from .picklescan import deep_stack, nesting_bound, oversized_memo

METADATA_FILE = ".metadata"
METADATA_TMP = ".metadata.tmp"  # what dcp.save writes, then renames to .metadata
_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
           "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")
_TORCH_DTYPE_NAME = re.compile(r"^(u?int\d+|float\d+(_\w+)?|bfloat16|complex\d+|bits\w+|q(u?int\d+\w*)|half|double)$")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor key: its dtype, global shape and chunks ((offsets, sizes) boxes of the global tensor)."""

    dtype: DType
    shape: tuple[int, ...]
    chunks: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]


@dataclass(frozen=True)
class DcpMetadata:
    """`.metadata` as plain data."""

    path: Path
    tensors: dict[str, TensorEntry]  # in save order
    byte_keys: tuple[str, ...]  # non-tensor items (one torch.save blob each)
    storage: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]]  # (fqn, chunk offsets) -> where
    planner_data: dict[str, tuple] | None  # flattened key -> path in the saved (nested) dict
    extras: dict[str, Any]  # version, storage_meta, other Metadata fields, as plain data


# ---------------------------------------------------------------- records the unpickler builds

class _Rec:
    """An allowlisted class: no constructor arguments, pickled state kept in `self.f`."""

    _fields: frozenset[str] = frozenset()
    _strict = True  # refuse unknown fields
    f: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> _Rec:
        if args or kwargs:
            raise UnsupportedLayoutError(f"{cls.__name__} pickled with constructor arguments")
        rec = object.__new__(cls)
        rec.f = {}
        return rec

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots)
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise UnsupportedLayoutError(f"{type(self).__name__} with unexpected pickled state {type(state).__name__}")
        unknown = set(state) - self._fields
        if unknown and self._strict:
            raise UnsupportedLayoutError(f"{type(self).__name__} has fields this reader does not know: "
                                         f"{sorted(unknown)}")
        self.f.update(state)

    def get(self, name: str, default: Any = None) -> Any:
        return self.f.get(name, default)


class _Metadata(_Rec):
    _fields = frozenset({"state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version"})
    _strict = False  # Megatron adds `all_local_plans`


class _TensorStorageMetadata(_Rec):
    _fields = frozenset({"properties", "size", "chunks"})


class _ChunkStorageMetadata(_Rec):
    _fields = frozenset({"offsets", "sizes"})


class _BytesStorageMetadata(_Rec):
    pass


class _MetadataIndex(_Rec):
    _fields = frozenset({"fqn", "offset", "index"})


class _StorageMeta(_Rec):
    _fields = frozenset({"checkpoint_id", "save_id", "load_id", "modules"})
    _strict = False


class _StorageInfo(_Rec):
    _fields = frozenset({"relative_path", "offset", "length", "transform_descriptors"})


class _Inert(_Rec):
    """Megatron's cached save plans (`Metadata.all_local_plans`): kept, never used."""

    _strict = False


class _TensorProperties(_Rec):
    """Pickled by its own __getstate__ as (dtype, layout, requires_grad, memory format code, pin_memory)."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            state = (state.get("dtype"), state.get("layout", "torch.strided"), state.get("requires_grad"),
                     state.get("memory_format", _MemFormat(0)), state.get("pin_memory"))
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsupportedLayoutError("TensorProperties with unexpected pickled state")
        if not isinstance(state[3], _MemFormat):  # torch compares it with its enum's members, and refuses another
            raise CheckpointError(f"TensorProperties with memory format {str(state[3])[:40]}, which is no "
                                  "memory-format code (torch refuses it)")
        self.f.update(zip(("dtype", "layout", "requires_grad", "memory_format", "pin_memory"), state))


def _size(dims: Any = ()) -> tuple[int, ...]:
    """torch.Size(tuple) -> tuple of non-negative ints."""
    dims = tuple(dims)
    if not all(type(d) is int and d >= 0 for d in dims):
        raise CheckpointError(f"bad torch.Size {dims!r}")
    return dims


def _get_layout(name: str) -> str:
    if name != "torch.strided":
        raise UnsupportedLayoutError(f"tensor layout {name!r} (only torch.strided is stored by DCP)")
    return name


class _MemFormat(int):
    """A memory-format code as torch's enum gives it: TensorProperties refuses any other value in its place."""


def _mem_format(code: int) -> int:
    if type(code) is not int or code not in (0, 1, 2):  # contiguous, channels_last, preserve: recorded only, strides
        raise CheckpointError(f"bad memory-format code {code!r}")  # come from the blob
    return _MemFormat(code)


def _enum_value(value: Any) -> Any:
    return value


def _posix_path(*parts: str) -> str:
    return str(PurePosixPath(*parts))


def _windows_path(*parts: str) -> str:
    return str(PureWindowsPath(*parts))


_MD = "torch.distributed.checkpoint.metadata"
_PLANNER = "torch.distributed.checkpoint.planner"
# (module, name) -> what find_class returns; besides these, `torch.<dtype>`.
_GLOBALS: dict[tuple[str, str], Any] = {
    (_MD, "Metadata"): _Metadata,  # 2.9+ adds `version`
    (_MD, "TensorStorageMetadata"): _TensorStorageMetadata,
    (_MD, "ChunkStorageMetadata"): _ChunkStorageMetadata,
    (_MD, "BytesStorageMetadata"): _BytesStorageMetadata,
    (_MD, "MetadataIndex"): _MetadataIndex,
    (_MD, "StorageMeta"): _StorageMeta,  # 2.7+ adds `modules`
    (_MD, "TensorProperties"): _TensorProperties,  # BUILD(5-tuple)
    (_MD, "_MEM_FORMAT_ENCODING"): _mem_format,  # Enum: REDUCE(value)
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,  # 2.7+: transform_descriptors
    (_PLANNER, "SavePlan"): _Inert,  # Megatron-Core's all_local_plans
    (_PLANNER, "WriteItem"): _Inert,
    (_PLANNER, "TensorWriteData"): _Inert,
    (_PLANNER, "BytesIOWriteData"): _Inert,
    (_PLANNER, "WriteItemType"): _enum_value,
    ("torch", "Size"): _size,  # REDUCE(tuple)
    ("torch.serialization", "_get_layout"): _get_layout,  # copyreg reducer of torch.layout: REDUCE(name)
    ("collections", "OrderedDict"): OrderedDict,
    # StorageMeta.checkpoint_id: the Path dcp.save was given (module pathlib._local when pickled by Python 3.13)
    **{(m, c): _posix_path for m in ("pathlib", "pathlib._local") for c in ("PosixPath", "PurePosixPath")},
    **{(m, c): _windows_path for m in ("pathlib", "pathlib._local") for c in ("WindowsPath", "PureWindowsPath")},
}
_HINTS = {
    ("torch.distributed.checkpoint._hf_utils", "_HFStorageInfo"):
        "a Hugging Face safetensors DCP (HuggingFaceStorageWriter): its .safetensors files are already a model",
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _DTYPES:
            return dtypes.of(name)
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            if module == "torch" and _TORCH_DTYPE_NAME.match(name):
                raise UnsupportedLayoutError(f"it holds tensors of dtype torch.{name}, which streammerge does not "
                                             f"read (it reads {', '.join(_DTYPES)})") from None
            hint = _HINTS.get((module, name), "not on the allowlist of DCP metadata classes")
            raise UnsupportedLayoutError(f"the pickle names {module}.{name}: {hint}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsupportedLayoutError("persistent id in .metadata")


def _unpickle(data: bytes, where: Path) -> Any:
    why = oversized_memo(data)
    if why:
        raise CheckpointError(f"{where}: corrupt pickle ({why}); copy it again")
    try:
        return deep_stack(_Unpickler(io.BytesIO(data)).load, nesting_bound(data))
    except UnsupportedLayoutError as e:
        raise UnsupportedLayoutError(f"{where}: {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except Exception as e:  # a corrupt pickle: UnpicklingError, EOFError, TypeError, ...
        raise CheckpointError(f"{where}: corrupt pickle ({type(e).__name__}: {e}); copy it again") from None


# ---------------------------------------------------------------- .metadata -> plain data

def _dims(v: Any) -> tuple[int, ...] | None:
    """A tuple of non-negative ints, or None."""
    if isinstance(v, tuple) and all(type(d) is int and d >= 0 for d in v):
        return v
    return None


def _plain(obj: Any, depth: int = 0) -> Any:
    """Our records -> dicts, recursively (for the metadata extras)."""
    if depth > 50:  # far deeper than torch nests: said as Python's own limit is (read_metadata names the file)
        raise RecursionError
    if isinstance(obj, _Rec):
        return {k: _plain(v, depth + 1) for k, v in obj.f.items()}
    if isinstance(obj, DType):
        return obj.name
    if isinstance(obj, dict):
        return {_plain(k, depth + 1): _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v, depth + 1) for v in obj)
    return obj


def read_metadata(folder: Path) -> DcpMetadata:
    """Read and check `.metadata` of a DCP folder; one-line errors naming the file."""
    try:
        return _read_metadata(folder)
    except RecursionError:  # the unpickler builds any depth; a check's message naming such a value cannot
        raise CheckpointError(f"{folder / METADATA_FILE}: values nested past Python's recursion limit (a damaged or "
                              "crafted .metadata)") from None


def _read_metadata(folder: Path) -> DcpMetadata:
    path = folder / METADATA_FILE
    tmp = folder / METADATA_TMP
    if tmp.exists():  # torch writes .metadata.tmp after every rank's data, removes .metadata, then renames
        raise CheckpointError(f"{folder}: the save did not finish ({METADATA_TMP} "
                              + ("beside .metadata: the .distcp files may be a newer save's than .metadata"
                                 if path.exists() else "and no .metadata")
                              + "); let it finish, or use an earlier checkpoint")
    if not path.is_file():
        if any(folder.glob("__*.metadata")):
            raise UnsupportedLayoutError(f"{folder}: only per-rank __N.metadata files (a DCP saved with "
                                         "use_collectives=False); load and save it once with torch to get .metadata")
        if (folder / "model.safetensors.index.json").is_file() or any(folder.glob("*.safetensors")):
            raise UnsupportedLayoutError(f"{folder}: safetensors files and no .metadata: already a model folder")
        if any(folder.glob("*.distcp")):  # .metadata is written last
            raise CheckpointError(f"{folder}: .distcp files and no .metadata: the save did not finish, or .metadata "
                                  "was not copied")
        raise CheckpointError(f"{folder}: no .metadata file, not a torch DCP checkpoint")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    md = _unpickle(data, path)
    if not isinstance(md, _Metadata) or not isinstance(md.get("state_dict_metadata"), dict) \
            or not isinstance(md.get("storage_data"), dict):
        raise CheckpointError(f"{path}: not a DCP Metadata with state_dict_metadata and storage_data")

    storage: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]] = {}
    for idx, info in md.get("storage_data").items():
        if not isinstance(idx, _MetadataIndex) or not isinstance(info, _StorageInfo):
            raise UnsupportedLayoutError(f"{path}: storage_data holds {type(idx).__name__} -> "
                                         f"{type(info).__name__}, not MetadataIndex -> _StorageInfo")
        fqn, off = idx.get("fqn"), idx.get("offset")
        rel, offset, length = info.get("relative_path"), info.get("offset"), info.get("length")
        transforms = info.get("transform_descriptors")
        if transforms is not None and not isinstance(transforms, list):  # torch writes a list of descriptor strings
            raise CheckpointError(f"{path}: item {fqn!r} has transform_descriptors {transforms!r:.80}, a "
                                  f"{type(transforms).__name__}, not a list (a damaged or hand-edited .metadata?)")
        if transforms:
            raise UnsupportedLayoutError(f"{path}: item {fqn!r} is stored through transforms "
                                         f"{transforms!r:.200} (compression or extensions)")
        if not isinstance(fqn, str) or not (off is None or _dims(off) is not None):
            raise CheckpointError(f"{path}: bad storage index {fqn!r} {off!r}")
        if not isinstance(rel, str) or not rel or rel != Path(rel).name or rel in (".", "..") \
                or "\\" in rel or "\0" in rel:
            raise CheckpointError(f"{path}: item {fqn!r} names file {rel!r} outside the checkpoint folder")
        if type(offset) is not int or type(length) is not int or offset < 0 or length <= 0:
            raise CheckpointError(f"{path}: item {fqn!r} has a bad range offset={offset!r} length={length!r}")
        if (fqn, off) in storage:
            raise CheckpointError(f"{path}: two storage entries for item {fqn!r} at {off}")
        storage[(fqn, off)] = (rel, offset, length)

    tensors: dict[str, TensorEntry] = {}
    byte_keys: list[str] = []
    for fqn, item in md.get("state_dict_metadata").items():
        if not isinstance(fqn, str):
            raise CheckpointError(f"{path}: non-string key {fqn!r}")
        _check_text(fqn, path)
        if isinstance(item, _BytesStorageMetadata):
            byte_keys.append(fqn)
        elif isinstance(item, _TensorStorageMetadata):
            tensors[fqn] = _tensor_entry(fqn, item, path, len(storage))
        else:
            raise UnsupportedLayoutError(f"{path}: item {fqn!r} is a {type(item).__name__}")

    planner = md.get("planner_data")
    planner_data = None
    if isinstance(planner, dict) and all(isinstance(v, tuple) for v in planner.values()):
        planner_data = {k: v for k, v in planner.items() if isinstance(k, str)}
        for k, v in planner_data.items():  # torch flattens a path by joining it: a key that is not its path's join
            if ".".join(map(str, v)) != k:  # is refused by torch's loader; the model/optimizer split would lose it
                raise CheckpointError(f"{path}: planner_data gives key {k!r} the path {v!r}, which torch would name "
                                      f"{'.'.join(map(str, v))!r} (a hand-edited or mixed .metadata?)")
    extras = {k: _plain(v) for k, v in md.f.items()
              if k not in ("state_dict_metadata", "storage_data", "planner_data", "all_local_plans")}
    return DcpMetadata(path, tensors, tuple(byte_keys), storage, planner_data, extras)


def _check_text(fqn: str, path: Path) -> None:
    """A key must be text UTF-8 can carry: a lone surrogate (what Python makes of undecodable bytes) cannot be a
    safetensors name, a JSON string or a line on the terminal."""
    try:
        fqn.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CheckpointError(f"{path}: key {fqn!r} is not valid text: it holds the lone surrogate "
                              f"U+{ord(fqn[e.start]):04X} (undecodable bytes decoded with surrogateescape?), which no "
                              "safetensors name can hold; rename the key and save again") from None


def _tensor_entry(fqn: str, item: _TensorStorageMetadata, path: Path, stored: int) -> TensorEntry:
    """One tensor's entry; each of its chunks is one of the `stored` items (a list of one chunk repeated costs two
    bytes a chunk in the pickle, and far more to check)."""
    props, shape, chunks = item.get("properties"), _dims(item.get("size")), item.get("chunks")
    if not isinstance(props, _TensorProperties) or shape is None or not isinstance(chunks, list) or not chunks:
        raise CheckpointError(f"{path}: tensor {fqn!r} has malformed metadata")
    if len(chunks) > stored:
        raise CheckpointError(f"{path}: tensor {fqn!r} lists {len(chunks)} chunks, more than the {stored} items "
                              "storage_data records (a damaged or hand-edited .metadata?)")
    dtype, layout = props.get("dtype"), props.get("layout")
    if not isinstance(dtype, DType):
        raise UnsupportedLayoutError(f"{path}: tensor {fqn!r} has dtype {dtype!r}")
    if layout != "torch.strided":
        raise UnsupportedLayoutError(f"{path}: tensor {fqn!r} has layout {layout!r}")
    boxes = []
    for c in chunks:
        start, size = (_dims(c.get("offsets")), _dims(c.get("sizes"))) if isinstance(c, _ChunkStorageMetadata) \
            else (None, None)
        if start is None or size is None:
            raise CheckpointError(f"{path}: tensor {fqn!r} has a malformed chunk")
        boxes.append((start, size))
    return TensorEntry(dtype, shape, tuple(boxes))
