"""Read a rank file's tensor metadata fast: a C unpickler that only knows a short allowlist.

`torch.load(weights_only=True)` runs a pure-Python unpickler and rebuilds real DTensors, device
meshes and specs: ~200 µs per DTensor, an hour for 1024 rank files of 50,000 tensors. Here the C
unpickler (`pickle.Unpickler`) runs instead, and every global the file may name is mapped to a tiny
record class of ours (`find_class`), never to torch's own code: nothing from the file can run, which is
stricter than weights_only. The C unpickler reads every protocol's opcodes, so the pickle's opcodes are
first checked against the few torch's reads (`picklescan.beyond_torch`). A file that uses anything outside
these allowlists is not an error here: `read_state` returns None and the caller falls back to
`torch.load(weights_only=True)`, which decides.
"""

from __future__ import annotations

import collections
import gc
import io
import math
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import dtypes
from ..dtypes import DType
from ..errors import CheckpointError
from .picklescan import beyond_torch, deep_stack, nesting_bound
from .torchzip import Directory, check_torch_records, data_offsets, read_directory, read_record

_DTYPES = {name: dtypes.of(name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")}


def _no_state(self: Any, state: Any) -> None:
    """A BUILD opcode on a storage or a tensor: torch's classes decide what that does (some refuse, some ignore
    it); ours would take it as new fields. torch's own unpickler reads such a file instead."""
    raise NotPlain(f"state set on a {type(self).__name__.lower()} (BUILD)")


class _StorageType:
    """`torch.FloatStorage` and the like, as a persistent id names them: a dtype (`torch.float32`) in that place
    is refused by torch.load, so the two must not decode alike. One object per name serves every file, so a
    BUILD opcode on it must not change it for the files read after (torch refuses BUILD on a storage type)."""

    __slots__ = ("dtype",)
    __setstate__ = _no_state
    dtype: DType

    def __init__(self, dtype: DType):
        object.__setattr__(self, "dtype", dtype)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")


_STORAGES = {name: _StorageType(d) for name, d in {
    "DoubleStorage": dtypes.float64, "FloatStorage": dtypes.float32, "HalfStorage": dtypes.float16,
    "BFloat16Storage": dtypes.bfloat16, "LongStorage": dtypes.int64, "IntStorage": dtypes.int32,
    "ShortStorage": dtypes.int16, "CharStorage": dtypes.int8, "ByteStorage": dtypes.uint8,
    "BoolStorage": dtypes.bool_, "ComplexFloatStorage": dtypes.complex64,
    "ComplexDoubleStorage": dtypes.complex128}.items()}


class NotPlain(Exception):
    """The file uses something outside the allowlist: let torch.load(weights_only=True) judge it."""


class Malformed(NotPlain):
    """The pickle describes tensors that torch.load refuses (a view outside its storage), or that torch and a
    reader could decode differently (one storage named with two dtypes or sizes): refused, never guessed."""


class Obj:
    """Any allowlisted class: keeps constructor args and the pickled state, runs nothing."""

    args: tuple[Any, ...]

    def __new__(cls, *args: Any) -> Obj:
        o = object.__new__(cls)
        o.args = args
        return o

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise NotPlain(f"unexpected state {type(state).__name__}")
        self.__dict__.update(state)


class Inert:
    """An object of a class no allowlist names, where the reader takes such objects (`InertGlobals`, and the storage
    reader, which wants only storage keys): it takes any arguments and state, keeps none, and runs nothing; its class
    says which global the pickle named."""

    global_name: tuple[str, str] = ("?", "?")  # (module, qualname)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:
        return type(self)()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


def inert_class(module: str, qualname: str) -> type[Inert]:
    """An `Inert` class under a global's own name (module and qualname: how torch's weights-only allowlist finds a
    class)."""
    return type(qualname.rpartition(".")[2], (Inert,), {"__module__": module, "__qualname__": qualname,
                                                        "global_name": (module, qualname)})


class InertGlobals(dict):
    """An `extra` allowlist that gives every global the allowlist lacks as an `Inert` class, and keeps their names:
    for a file whose objects beside the tensors need not be understood (a Lightning checkpoint's hyper_parameters).
    The reader must refuse an Inert where it takes tensors from."""

    def get(self, key: Any, default: Any = None) -> Any:
        found = super().get(key)
        if found is None:
            found = self[key] = inert_class(*key)
        return found


class DTensor(Obj):
    pass


class DTensorSpec(Obj):
    mesh: Any  # set from the pickled state
    placements: Any


class DeviceMesh(Obj):
    pass


class Layout(Obj):
    pass


class TensorMeta(Obj):
    pass


class _Placement(Obj):
    """A placement's state is exactly its fields, each of its type: torch's placements (C++ since 2.13) refuse
    another (a string dim, a slots tuple); such a file goes to torch.load, which says so."""

    FIELDS: dict[str, type] = {}

    def __setstate__(self, state: Any) -> None:
        if type(state) is not dict or set(state) != set(self.FIELDS) or any(
                type(state[k]) is not t for k, t in self.FIELDS.items()):
            raise NotPlain(f"{type(self).__name__} placement with state {str(state)[:60]}")
        self.__dict__.update(state)


class Shard(_Placement):
    FIELDS = {"dim": int}
    dim: int  # set from the pickled state


class Replicate(_Placement):
    pass


class Partial(_Placement):
    FIELDS = {"reduce_op": str}


class StridedShard(_Placement):
    FIELDS = {"dim": int, "split_factor": int}


class _UntypedStorage:
    """The `torch.storage.UntypedStorage` a persistent id names for dtypes rebuilt by _rebuild_tensor_v3."""

    __setstate__ = _no_state  # a BUILD on the class itself: refused (see Global)


class Global:
    """A function the allowlist maps a global to. One object serves every file read in this process, so a BUILD
    opcode must not set attributes on it (its `__defaults__`, say) for the files read after: refused, as torch
    refuses BUILD on anything but tensors, parameters and dicts."""

    __slots__ = ("fn",)
    __setstate__ = _no_state
    fn: Any

    def __init__(self, fn: Any):
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("read-only")


class Storage:
    __slots__ = ("key", "dtype", "numel")
    __setstate__ = _no_state

    def __init__(self, key: str, dtype: DType | None, numel: int):  # None: untyped, numel in bytes
        self.key, self.dtype, self.numel = key, dtype, numel


class Local:
    """A plain tensor as pickled: its storage and view (no data)."""

    __slots__ = ("storage", "offset", "shape", "stride")
    __setstate__ = _no_state

    def __init__(self, storage: Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

    @property
    def dtype(self) -> DType:
        assert self.storage.dtype is not None  # the rebuild functions only make Locals of typed storages
        return self.storage.dtype


class Wrapper:
    """A tensor subclass rebuilt by _rebuild_wrapper_subclass (DTensor): global dtype/shape plus state."""

    __setstate__ = _no_state

    def __init__(self, cls: type, dtype: DType, shape: tuple, stride: tuple):
        self.cls, self.dtype, self.shape, self.stride = cls, dtype, tuple(shape), tuple(stride)
        self.state: dict = {}


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None) -> Local:
    if not isinstance(storage, Storage) or storage.dtype is None:
        raise NotPlain("tensor without a typed storage")
    _plain_view(backward_hooks, metadata)
    _grad_ok(storage.dtype, requires_grad)
    return _view(storage, storage_offset, size, stride)


def _grad_ok(dtype: DType, requires_grad: Any, *, rebuilt_in_place: bool = False) -> None:
    """torch takes only true or false, and refuses gradients on integer tensors, and on any tensor it rebuilds in
    place (`_rebuild_tensor_v3`: float8, uint16-64); a flag the merge otherwise ignores."""
    if type(requires_grad) is not bool:
        raise NotPlain(f"requires_grad {str(requires_grad)[:20]} (torch takes only True or False)")
    if requires_grad and (rebuilt_in_place or not dtype.name.startswith(("float", "bfloat", "complex"))):
        raise Malformed(f"an {dtype.name} tensor saved as requiring gradients (torch.load refuses it)")


_INT64 = 2 ** 63


def _int64s(*values: Any) -> bool:
    """Whether every value is an int torch takes as a size, stride or offset: a C int64 (it refuses a larger one)."""
    return all(type(x) is int and -_INT64 <= x < _INT64 for x in values)


def _numel_ok(size: tuple[int, ...]) -> bool:
    """Whether torch can count the elements of a shape: it refuses one whose product overflows a C int64."""
    return abs(math.prod(size)) < _INT64


def _view(storage: Storage, storage_offset: Any, size: Any, stride: Any) -> Local:
    """A view as torch's `set_` accepts it: non-negative offset and sizes, and every element inside the storage."""
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and _int64s(storage_offset, *size, *stride) and _numel_ok(size)):
        raise NotPlain("tensor view that is not plain integers")
    if storage_offset < 0 or any(s < 0 for s in size):
        raise Malformed(f"a tensor view with a negative offset or size ({storage_offset}, {list(size)})")
    if all(s > 0 for s in size):
        if any(st < 0 for s, st in zip(size, stride) if s > 1):
            raise Malformed(f"a tensor view with negative strides {list(stride)}")
        last = storage_offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= storage.numel:
            raise Malformed(f"a tensor view (offset {storage_offset}, shape {list(size)}, stride {list(stride)}) "
                            f"reaches element {last} of storage data/{storage.key}, which holds {storage.numel}")
    return Local(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None) -> Local:
    """Dtypes without a legacy storage class (float8, uint16/32/64): an untyped storage plus the dtype."""
    if not isinstance(storage, Storage) or storage.dtype is not None or not isinstance(dtype, DType):
        raise NotPlain("_rebuild_tensor_v3 without an untyped storage and a dtype")
    _plain_view(backward_hooks, metadata)
    _grad_ok(dtype, requires_grad, rebuilt_in_place=True)
    # the view must fit in the storage's whole elements (its bytes are checked against the record by size)
    return _view(Storage(storage.key, dtype, storage.numel // dtype.itemsize), storage_offset, size, stride)


def _plain_view(backward_hooks: Any, metadata: Any) -> None:
    """The bytes mean what they say: no conjugate/negative bit (they change the values), no hooks."""
    if metadata:
        raise NotPlain(f"tensor with extra metadata {sorted(metadata)!r}")
    if backward_hooks:
        raise NotPlain("tensor with backward hooks")


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """torch's signature (no defaults: a call torch refuses fails here too); nn.Parameter refuses gradients on
    integer tensors."""
    if isinstance(data, (Local, Wrapper)):
        _grad_ok(data.dtype, requires_grad)
    else:
        raise NotPlain("a parameter of something that is no tensor")
    return data


def _rebuild_wrapper_subclass(cls, dtype, size, stride, storage_offset, layout, device, requires_grad) -> Wrapper:
    """torch's signature, without defaults: a call torch refuses (an argument left out) fails here too."""
    if cls is not DTensor or not isinstance(dtype, DType):
        raise NotPlain("unknown tensor subclass")
    if layout is not _STRIDED or type(device) is not Device:
        raise NotPlain("a DTensor whose layout or device is not one torch builds")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(type(x) is int and x >= 0 for x in (*size, *stride))):
        raise Malformed(f"a DTensor whose shape {str(size)[:40]} or stride {str(stride)[:40]} is not whole numbers")
    if not (_int64s(storage_offset, *size, *stride) and _numel_ok(size)):
        raise NotPlain("a DTensor offset, shape or stride that is no C int64")  # torch.load refuses it, and says why
    _grad_ok(dtype, requires_grad)
    return Wrapper(cls, dtype, size, stride)


class PlainTensor:
    """`torch.Tensor` as `_rebuild_from_type_v2` names it for a plain tensor pickled with Python attributes; only
    formats that save such tensors (DeepSpeed's flat partitions) map the name to it (torch.load takes it)."""

    __setstate__ = _no_state


def _rebuild_from_type_v2(func, new_type, args, state):
    ret = func(*args)
    if new_type is PlainTensor and isinstance(ret, Local):  # the attributes (DeepSpeed's bookkeeping) are not data
        if not (state is None or isinstance(state, dict) and all(isinstance(k, str) for k in state)):
            raise Malformed("a tensor's state under a key that is no attribute name")
        return ret
    if not isinstance(ret, Wrapper) or new_type is not DTensor:
        raise NotPlain("unknown tensor subclass")
    if isinstance(state, tuple) and len(state) == 2:
        state = {**(state[0] or {}), **(state[1] or {})}
    ret.state = dict(state or {})
    if not all(isinstance(k, str) for k in ret.state):  # torch sets each as an attribute
        raise Malformed("a tensor's state under a key that is no attribute name")
    return ret


def _size(*args):
    """torch.Size(iterable) as torch builds it: C int64s only (a bool is taken as 0 or 1); torch.load refuses others."""
    if len(args) != 1 or not isinstance(args[0], (tuple, list)):
        raise NotPlain(f"torch.Size of {str(args)[:40]}")
    size = tuple(int(x) if type(x) is bool else x for x in args[0])
    if not _int64s(*size):
        raise NotPlain(f"torch.Size {str(size)[:40]}, which torch refuses")
    return size


class Device(tuple):
    """torch.device's arguments, told apart from the tuple a torch.Size decodes to (torch.load refuses a Size where a
    device belongs)."""

    __slots__ = ()


def _device(*args):
    """torch.device(type[, index]) as torch builds it: a device type torch knows and an index it parses (no leading
    zero, not negative, an int), else torch.load refuses."""
    if not args or len(args) > 2 or type(args[0]) is not str or not _DEVICE.match(args[0]) or len(args) == 2 and (
            ":" in args[0] or type(args[1]) is not int or not 0 <= args[1] < 2**31):
        raise NotPlain(f"a tensor on device {str(args)[:40]}, which torch.device refuses")
    return Device(args)


_STRIDED = object()  # torch.strided, as only _get_layout gives it (a bare string is no layout to torch)


def _get_layout(name):
    if name != "torch.strided":
        raise NotPlain(f"layout {name}")
    return _STRIDED


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): Global(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): Global(_rebuild_tensor_v3),
    ("torch.storage", "UntypedStorage"): _UntypedStorage,
    ("torch._utils", "_rebuild_parameter"): Global(_rebuild_parameter),
    ("torch._utils", "_rebuild_wrapper_subclass"): Global(_rebuild_wrapper_subclass),
    ("torch._tensor", "_rebuild_from_type_v2"): Global(_rebuild_from_type_v2),
    ("torch", "Size"): Global(_size),
    ("torch", "device"): Global(_device),
    ("torch.serialization", "_get_layout"): Global(_get_layout),
    ("torch.distributed.tensor", "DTensor"): DTensor,
    ("torch.distributed.tensor._dtensor_spec", "DTensorSpec"): DTensorSpec,
    ("torch.distributed.tensor._dtensor_spec", "TensorMeta"): TensorMeta,
    ("torch.distributed.tensor._dtensor_spec", "ShardOrderEntry"): Obj,
    ("torch.distributed.device_mesh", "DeviceMesh"): DeviceMesh,
    ("torch.distributed._mesh_layout", "_MeshLayout"): Layout,
    ("torch.distributed._mesh_layout", "_FlatLayout"): Layout,
    ("torch.distributed.tensor.placement_types", "Shard"): Shard,
    ("torch.distributed.tensor.placement_types", "Replicate"): Replicate,
    ("torch.distributed.tensor.placement_types", "Partial"): Partial,
    ("torch.distributed.tensor.placement_types", "_StridedShard"): StridedShard,
}


# torch's device types (and accelerator plugins veRL saves from: npu, musa); torch.device refuses any other
_DEVICE = re.compile(r"(cpu|cuda|ipu|xpu|mkldnn|opengl|opencl|ideep|hip|ve|fpga|maia|xla|lazy|vulkan|mps|meta|hpu"
                       r"|mtia|privateuseone|npu|musa)(:(0|[1-9][0-9]{0,8}))?\Z")


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, extra: dict[tuple[str, str], Any] | None = None):
        super().__init__(file)
        self.storages: dict[str, tuple[DType | None, int]] = {}  # key -> (dtype, numel), as torch loads each once
        self.extra = extra if extra is not None else {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch":
            if name in _DTYPES:
                return _DTYPES[name]
            if name in _STORAGES:
                return _STORAGES[name]
        found = _GLOBALS.get((module, name)) or self.extra.get((module, name))
        if found is None:
            raise NotPlain(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and (isinstance(pid[1], _StorageType) or pid[1] is _UntypedStorage)):
            raise NotPlain("unknown persistent id")
        kind, key, numel = pid[1], pid[2], pid[4]  # the location is not read: torch.load maps it away too
        if type(key) is not str or type(numel) is not int or numel < 0:
            raise NotPlain("persistent id without a storage key and size")
        dtype = kind.dtype if isinstance(kind, _StorageType) else None
        if self.storages.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise Malformed(f"storage data/{key} is named with two dtypes or sizes (torch.load would use the first)")
        return Storage(key, dtype, numel)


@dataclass(frozen=True)
class State:
    """A rank file as read here: its zip directory, pickle bytes, decoded records and storage offsets."""

    directory: Directory
    pickle: bytes
    obj: Any
    offsets: dict[str, int]  # storage key -> byte offset of its data in the file (every storage the pickle names)


def read_state(path: str | Path, declined: list[str] | None = None,
               extra: dict[tuple[str, str], Any] | None = None) -> State | None:
    """Unpickle a torch zip checkpoint into our records, with each storage's byte offset in the file (`extra`: globals
    beyond the allowlist, as in read_format_state).

    Returns None when the file needs torch.load (unknown globals, legacy format), and adds why to `declined`.
    """
    try:
        d = read_directory(path)
        data = read_record(d, "data.pkl")
    except CheckpointError:
        return None  # load.check_zip (or torch.load) reports what is wrong with the file
    check_torch_records(d)
    try:
        obj, storages = _decode_storages(data, extra)
    except Malformed as e:
        raise CheckpointError(f"{d.path}: {e}; torch.load refuses or misreads such a file") from None
    except NotPlain as e:
        if declined is not None:
            declined.append(str(e))
        return None  # torch.load decides, and reports what is wrong with the file
    return State(d, data, obj, check_storages(d, storages))


def check_storages(d: Directory, storages: dict[str, tuple[DType | None, int]]) -> dict[str, int]:
    """Each storage's data offset; refuses a storage whose record is missing or not exactly its size, as torch does."""
    for key, (dtype, numel) in storages.items():
        name = f"data/{key}"
        if not d.has(name):
            raise CheckpointError(f"{d.path}: the pickle names storage {name}, which the zip does not hold "
                                  "(truncated or edited rank file)")
        nbytes = numel * (dtype.itemsize if dtype is not None else 1)
        have = d.sizes[d.index(name)]
        if have != nbytes:
            raise CheckpointError(f"{d.path}: zip record {name} holds {have} bytes, its storage needs {nbytes} "
                                  "(torch.load refuses it); copy the file again from the node that saved it")
    starts = data_offsets(d)  # every record's local header: torch's reader meets some of them (version, byteorder...)
    return {key: starts[d.index(f"data/{key}")] for key in storages}


def placement_name(p: Any) -> str:
    """The names load.py gives torch's placements; anything else goes to torch.load, which explains it."""
    if type(p) is Shard:
        return f"Shard({p.dim})"
    if type(p) is Replicate:
        return "Replicate()"
    raise NotPlain(f"placement {type(p).__name__}")


class MeshView:
    """What load._mesh_layout reads from a DTensor (`placements`, `device_mesh`), for an unpickled spec."""

    __slots__ = ("placements", "device_mesh")

    def __init__(self, spec: DTensorSpec):
        self.placements, self.device_mesh = spec.placements, spec.mesh



class _StorageReader(pickle._Unpickler):
    """The storages of every persistent id, in the order the pickle first names them; every other global is a stub.
    Python's pure-Python unpickler: its memo is a dict, which no index in the file can make huge."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file)
        self.storages: dict[str, tuple[DType | None, int]] = {}

    def _proto(self: Any) -> None:
        """torch's unpickler takes any protocol number; Python's refuses those it does not know."""
        self.read(1)

    dispatch = {**pickle._Unpickler.dispatch, pickle.PROTO[0]: _proto}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        return _UntypedStorage if (module, name) == ("torch.storage", "UntypedStorage") else Inert

    def persistent_load(self, pid: Any) -> Inert:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and (
                isinstance(pid[1], _StorageType) or pid[1] is _UntypedStorage):
            # torch reads record f"data/{key}": an int key 0 is data/0; a key or size of another type it refuses
            key = pid[2] if type(pid[2]) is str else str(pid[2]) if type(pid[2]) is int else None
            if key is None or type(pid[4]) is not int or pid[4] < 0:
                raise NotPlain(f"storage key {str(pid[2])[:20]} of size {str(pid[4])[:20]}")
            self.storages.setdefault(key, (pid[1].dtype if isinstance(pid[1], _StorageType) else None, pid[4]))
        return Inert()


def named_storages(data: bytes) -> dict[str, tuple[DType | None, int]] | None:
    """Every storage a pickle names (key -> dtype, numel), in the order it first names them, read without running
    anything; None if the pickle cannot be read so."""
    reader = _StorageReader(io.BytesIO(data))
    try:
        deep_stack(reader.load, nesting_bound(data))
    except (NotPlain, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, RecursionError, struct.error, CheckpointError):
        return None
    return reader.storages


def decode(data: bytes, *, memo: bool = False) -> Any | None:
    """Unpickle bytes into our records (and the memo, if asked); None when they need torch.load."""
    try:
        return decode_or_raise(data, memo=memo)
    except NotPlain:
        return None


def decode_or_raise(data: bytes, *, memo: bool = False) -> Any:
    """`decode`, raising NotPlain with the reason instead of returning None (for formats with no fallback)."""
    obj, memo_copy, _ = _decode(data, memo)
    return (obj, memo_copy) if memo else obj


def _decode_storages(data: bytes, extra: dict[tuple[str, str], Any] | None = None
                     ) -> tuple[Any, dict[str, tuple[DType | None, int]]]:
    """The decoded object and every storage its pickle names: key -> (dtype, numel)."""
    obj, _, storages = _decode(data, False, extra)
    return obj, storages


def read_format_state(path: Path, extra: dict[tuple[str, str], Any], what: str) -> State:
    """`read_state` for a format with no torch.load fallback (torch's weights-only loader refuses the classes its
    files name): `extra` maps those names to inert records of ours, and anything else is refused in one line."""
    try:
        d = read_directory(path)
        data = read_record(d, "data.pkl")
        check_torch_records(d)
        obj, storages = _decode_storages(data, extra)
    except NotPlain as e:
        raise CheckpointError(f"{path}: not {what} as streammerge reads it ({e}); nothing in it was run") from None
    return State(d, data, obj, check_storages(d, storages))


def _decode(data: bytes, memo: bool, extra: dict[tuple[str, str], Any] | None = None
            ) -> tuple[Any, dict | None, dict[str, tuple[DType | None, int]]]:
    why = beyond_torch(data)
    if why:
        raise NotPlain(why)
    if data[:1] == pickle.PROTO and len(data) > 1 and data[1] > pickle.HIGHEST_PROTOCOL:
        data = pickle.PROTO + bytes([2]) + data[2:]  # torch's unpickler takes any protocol number; Python's refuses
    gc_was_on = gc.isenabled()
    gc.disable()  # millions of small acyclic objects: the cyclic collector would rescan them again and again
    try:
        u = _Unpickler(io.BytesIO(data), extra)
        obj = deep_stack(u.load, nesting_bound(data))
        return obj, (u.memo.copy() if memo else None), u.storages
    except NotPlain:
        raise
    except CheckpointError as e:  # no thread to unpickle it on: torch.load's reading of the file says so, naming it
        raise NotPlain(str(e)) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, RecursionError) as e:
        raise NotPlain(f"corrupt pickle ({type(e).__name__}: {e})") from None
    finally:
        if gc_was_on:
            gc.enable()
