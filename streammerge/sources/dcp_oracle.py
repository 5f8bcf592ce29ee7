"""verify's reference reader for DCP folders: torch's own classes and loaders, none of the merge's readers.

`.metadata` is unpickled into torch's own DCP classes (`Metadata`, `_StorageInfo`, ...) by a
`pickle.Unpickler` that resolves only those classes; torch's weights-only unpickler would be the
obvious choice but refuses DCP's protocol-4 pickles (FRAME, STACK_GLOBAL), and torch's
`FileSystemReader.read_metadata` is a plain `pickle.load` that runs anything. Each chunk is read by
`torch.load(weights_only=True)` of its item's byte range (torch's zip reader and unpickler), and
placed in the box by the chunk offsets torch recorded. Shared with the merge: nothing but the file
names. Memory: the bytes a box reads. As `torch.load(mmap=True)` does for a file, a chunk's tensor comes from
torch's unpickler onto the meta device (shape, strides, storage offset) and its storage from where torch's zip
reader says its record lies; a box reads only its span of that record (a one-process save stores each tensor,
however large, as one chunk).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import CheckpointError
from .base import Oracle, pread_into
from .picklescan import deep_stack, nesting_bound, oversized_memo, torch_load

Box = tuple[tuple[int, int], ...]
CACHE_CHUNKS = 4096  # where chunks lie (a few numbers each), for the boxes still to come


def _allowed() -> dict[tuple[str, str], Any]:
    import pathlib

    import torch
    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint import planner
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    classes = [md.Metadata, md.TensorStorageMetadata, md.ChunkStorageMetadata, md.BytesStorageMetadata,
               md.MetadataIndex, md.StorageMeta, md.TensorProperties, md._MEM_FORMAT_ENCODING, _StorageInfo,
               planner.SavePlan, planner.WriteItem, planner.WriteItemType, planner.TensorWriteData,
               planner.BytesIOWriteData, torch.Size, pathlib.PosixPath, pathlib.PurePosixPath, OrderedDict]
    out: dict[tuple[str, str], Any] = {(c.__module__, c.__qualname__): c for c in classes}
    out[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    out.update({("pathlib", c.__name__): c for c in (pathlib.PosixPath, pathlib.PurePosixPath)})
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            out[("torch", name)] = getattr(torch, name)
    return out


class _TorchClasses(pickle.Unpickler):
    def __init__(self, f: Any):
        super().__init__(f)
        self._ok = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ok[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata class") from None


def load_metadata(folder: Path) -> Any:
    """`.metadata` as torch's own `Metadata` object, unpickled with only DCP's classes resolvable."""
    path = folder / ".metadata"
    try:
        data = path.read_bytes()
        why = oversized_memo(data)
        if why:
            raise ValueError(why)
        return deep_stack(_TorchClasses(io.BytesIO(data)).load, nesting_bound(data))
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, RuntimeError,
            CheckpointError) as e:
        raise CheckpointError(f"{path}: torch's DCP classes cannot read it ({e})") from None


class ItemFile(io.RawIOBase):
    """One item's byte range of a .distcp file as a seekable file (what torch.load and zipfile read)."""

    def __init__(self, path: Path, offset: int, length: int):
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        self._base, self._len, self._pos = offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, {0: pos, 1: self._pos + pos, 2: self._len + pos}[whence])
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        data = os.pread(self._fd, n, self._base + self._pos) if n else b""
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class DcpOracle(Oracle):
    """Tensors of a DCP folder as torch reads them; `names` maps output names to DCP keys (others are keys)."""

    def __init__(self, folder: Path, names: Mapping[str, str] | None = None):
        self.folder = folder
        self.names = dict(names or {})
        self._md: Any = None
        self._where: dict[tuple[str, tuple[int, ...] | None], Any] = {}
        self._cache: OrderedDict[tuple[str, tuple[int, ...]], tuple[Path, int, Any]] = OrderedDict()

    def metadata(self) -> Any:
        if self._md is None:
            self._md = load_metadata(self.folder)
            self._where = {(idx.fqn, tuple(idx.offset) if idx.offset is not None else None): info
                           for idx, info in self._md.storage_data.items()}
        return self._md

    def entry(self, name: str) -> Any:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        item = self.metadata().state_dict_metadata.get(self.names.get(name, name))
        return item if isinstance(item, TensorStorageMetadata) else None

    def shape(self, name: str) -> tuple[tuple[int, ...], str] | None:
        item = self.entry(name)
        if item is None:
            return None
        return tuple(item.size), str(item.properties.dtype).removeprefix("torch.")

    def chunk(self, key: str, offsets: tuple[int, ...]) -> tuple[Path, int | None, Any]:
        """One stored chunk as torch.load(weights_only=True) finds it in its item's bytes: the file, the byte
        offset of its storage there and the tensor unpickled onto the meta device (no data read); or, for an
        item torch.save of one tensor on this machine would not write, no offset and the tensor torch.load gives."""
        import torch

        cached = self._cache.get((key, offsets))
        if cached is not None:
            self._cache.move_to_end((key, offsets))
            return cached
        info = self._where.get((key, offsets))
        if info is None:
            raise CheckpointError(f"{self.folder}: torch finds no stored chunk of {key!r} at {list(offsets)}")
        path = self.folder / info.relative_path
        t, start = self._load(path, info, key, "meta")
        if (start is None or start + t.untyped_storage().nbytes() > info.length or t.layout != torch.strided
                or t.is_conj() or t.is_neg()):
            return path, None, self._load(path, info, key, "cpu")[0]  # held for this box only
        located = (path, info.offset + start, t)
        self._cache[(key, offsets)] = located
        while len(self._cache) > CACHE_CHUNKS:
            self._cache.popitem(last=False)
        return located

    def _load(self, path: Path, info: Any, key: str, device: str) -> tuple[Any, int | None]:
        """torch.load(weights_only=True) of an item onto `device`, and where in the item torch's zip reader puts
        its one storage (None: not one storage in this machine's byte order)."""
        import torch

        with ItemFile(path, info.offset, info.length) as f:
            try:
                t = torch_load(f, map_location=device, weights_only=True)
                f.seek(0)
                reader = torch._C.PyTorchFileReader(f)  # type: ignore[call-overload]  # as torch.load above
                records = [r for r in reader.get_all_records() if r.startswith("data/")]
                order = reader.get_record("byteorder").decode() if reader.has_record("byteorder") else "little"
                start = reader.get_record_offset(records[0]) if len(records) == 1 and order == sys.byteorder else None
            except Exception as e:
                why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise CheckpointError(f"{path}: torch.load(weights_only=True) refuses item {key!r} ({why})") from None
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: item {key!r} is not a tensor for torch.load")
        return t, start

    def read(self, name: str, box: Box) -> Any:
        import torch

        item = self.entry(name)
        if item is None:
            raise CheckpointError(f"{self.folder}: torch finds no tensor {name!r}")
        key = self.names.get(name, name)
        out = torch.empty(tuple(hi - lo for lo, hi in box), dtype=item.properties.dtype)
        filled = 0
        for c in item.chunks:
            offsets, sizes = tuple(c.offsets), tuple(c.sizes)
            lo = [max(b[0], o) for b, o in zip(box, offsets)]
            hi = [min(b[1], o + n) for b, o, n in zip(box, offsets, sizes)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            path, start, t = self.chunk(key, offsets)
            if tuple(t.shape) != sizes or t.dtype != item.properties.dtype:
                raise CheckpointError(f"{self.folder}: torch.load gives chunk {list(offsets)} of {key!r} as {t.dtype} "
                                      f"{list(t.shape)}, .metadata says {item.properties.dtype} {list(sizes)}")
            part = t[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))]
            if start is not None:
                part = _read_span(path, start, part)
            out[tuple(slice(a - b0, b - b0) for a, b, (b0, _) in zip(lo, hi, box))] = part
            filled += math.prod(b - a for a, b in zip(lo, hi))
        if filled != out.numel():
            raise CheckpointError(f"{key!r}: the stored chunks cover {filled} of the {out.numel()} elements of "
                                  f"the box {list(box)}")
        return out

    def check_integrity(self, paths: Sequence[Path]) -> list[str]:
        """Every item's zip record CRC-32s (torch.load checks none), with the standard library's zip reader."""
        problems = []
        for info in self.metadata().storage_data.values():
            path = self.folder / info.relative_path
            try:
                with ItemFile(path, info.offset, info.length) as f, zipfile.ZipFile(f) as z:
                    for zi in z.infolist():
                        if zi.CRC == 0:  # saved without CRCs (torch.serialization.set_crc32_options(False))
                            continue
                        with z.open(zi) as fh:
                            while fh.read(16 * 2**20):
                                pass
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                problems.append(f"{path}: the item at byte {info.offset} fails its zip CRC-32 check ({e}): the file "
                                "is corrupted (changed after torch saved it)")
        return problems

    def close(self) -> None:
        self._cache.clear()


class DcpPair(Oracle):
    """A model DCP and the optimizer DCP saved beside it (accelerate's `optimizer_0/`): each name is read from the
    folder that holds it (`optimizer_keys`: the optimizer folder's keys, by which the export's sources are named)."""

    def __init__(self, model: DcpOracle, optimizer: DcpOracle, optimizer_keys: set[str]):
        self.model, self.optimizer, self.optimizer_keys = model, optimizer, optimizer_keys

    def _of(self, name: str) -> DcpOracle:
        return self.optimizer if name in self.optimizer_keys and name not in self.model.names else self.model

    def shape(self, name: str) -> tuple[tuple[int, ...], str] | None:
        return self._of(name).shape(name)

    def read(self, name: str, box: Box) -> Any:
        return self._of(name).read(name, box)

    def check_integrity(self, paths: Sequence[Path]) -> list[str]:
        return self.model.check_integrity(paths) + self.optimizer.check_integrity(paths)

    def close(self) -> None:
        self.model.close()
        self.optimizer.close()


def _read_span(path: Path, storage: int, view: Any) -> Any:
    """The elements of a meta view of a stored tensor, from its storage's bytes at `storage` in `path`: only the
    span the view covers is read, as torch.load(mmap=True) would fault it in."""
    import torch

    isz = view.element_size()
    first = view.storage_offset()
    count = sum((n - 1) * st for n, st in zip(view.shape, view.stride())) + 1
    buf = bytearray(count * isz)
    fd = os.open(path, os.O_RDONLY)
    try:
        if not pread_into(fd, memoryview(buf), storage + first * isz):
            raise CheckpointError(f"{path}: ends inside a stored tensor (truncated after torch saved it?)")
    finally:
        os.close(fd)
    return torch.frombuffer(buf, dtype=view.dtype).as_strided(tuple(view.shape), tuple(view.stride()))


class KeyReader(Protocol):
    """Global Megatron tensors by torch_dist key, as torch reads them: a DCP folder's (`DcpOracle`), or the legacy
    format's rank files put together (`megatron_legacy.LegacyReader`)."""

    def entry(self, key: str) -> Any: ...  # global `size` and `properties.dtype`, or None

    def read(self, key: str, box: Box) -> Any: ...

    def check_integrity(self, paths: Sequence[Path]) -> list[str]: ...

    def close(self) -> None: ...


class MegatronOracle(Oracle):
    """HF tensors of a Megatron checkpoint: the mapping table's (key, layer/expert, part), read by torch.

    Shared with the merge: the table (which Megatron key and which part gives each HF tensor).
    Not shared: reading (torch.load of each chunk, placed by torch's recorded offsets) and the
    arithmetic of the part (`megatron.torch_view`: view/reshape/chunk, not our piece offsets).
    """

    def __init__(self, sources: Mapping[str, tuple[KeyReader, Any]], arch: Any):
        self.sources, self.arch = dict(sources), arch
        self._last: tuple[Any, Any] | None = None

    def shape(self, name: str) -> tuple[tuple[int, ...], str] | None:
        import torch

        from .megatron import torch_view

        if name not in self.sources:
            return None
        oracle, take = self.sources[name]
        item = oracle.entry(take.key)
        if item is None:
            return None
        k = len(take.index)
        hf = torch_view(torch.empty(tuple(item.size)[k:], device="meta"), take, self.arch)
        return tuple(hf.shape), str(item.properties.dtype).removeprefix("torch.")

    def _source(self, name: str) -> Any:
        from .megatron import torch_view

        oracle, take = self.sources[name]
        key = (id(oracle), take.key, take.index, take.part)
        if self._last is None or self._last[0] != key:
            item = oracle.entry(take.key)
            if item is None:
                raise CheckpointError(f"torch finds no {take.key!r} in the checkpoint")
            k = len(take.index)
            box = tuple((i, i + 1) for i in take.index) + tuple((0, n) for n in tuple(item.size)[k:])
            m = oracle.read(take.key, box).reshape(tuple(item.size)[k:])
            self._last = (key, torch_view(m, take, self.arch))
        return self._last[1]

    def read(self, name: str, box: Box) -> Any:
        """The box of an HF tensor, reading only the rows of `M[index]` it comes from: torch's arithmetic moves whole
        rows (view/reshape/chunk along dim 0), so `torch_view` of the row numbers says which rows those are (q, k and v
        rows lie in every query group's slice of the fused QKV)."""
        import torch

        from .megatron import torch_view

        oracle, take = self.sources[name]
        item = oracle.entry(take.key)
        if item is None:
            raise CheckpointError(f"torch finds no {take.key!r} in the checkpoint")
        shape = tuple(item.size)[len(take.index):]
        if not shape:
            return self._source(name)[()]
        rows = torch_view(torch.arange(shape[0]), take, self.arch)[box[0][0]:box[0][1]]
        if rows.numel() == 0:
            return torch.empty(tuple(hi - lo for lo, hi in box), dtype=item.properties.dtype)
        first, last = int(rows.min()), int(rows.max())
        src = oracle.read(take.key, tuple((i, i + 1) for i in take.index) + ((first, last + 1),) + tuple(box[1:]))
        return src.reshape((last + 1 - first,) + src.shape[len(take.index) + 1:])[rows - first]

    def check_integrity(self, paths: Sequence[Path]) -> list[str]:
        seen: dict[int, KeyReader] = {id(o): o for o, _ in self.sources.values()}
        return [p for o in seen.values() for p in o.check_integrity(paths)]

    def close(self) -> None:
        self._last = None
        for o, _ in self.sources.values():
            o.close()
