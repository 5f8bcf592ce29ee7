"""torch Distributed Checkpoint (DCP) folders: `.metadata` plus `__<rank>_<n>.distcp` files.

Every stored item sits in a `.distcp` file at its `_StorageInfo.offset` as one `torch.save` zip blob
of `length` bytes (a file is its items back to back). A tensor chunk's blob holds `data.pkl` (one
`_rebuild_tensor_v2/v3` call: storage, offset, size, stride) and the storage record `data/<key>`;
the zip's offsets are relative to the blob, so its 64-byte alignment holds within the blob only.
Planning reads `.metadata` (`dcpmeta`), then each chunk's zip directory and `data.pkl` (2-3
positioned reads per chunk, `torchpickle`'s allowlisted unpickler): a piece per chunk, with the
absolute offset and strides of its bytes. No tensor data is read, nothing from the files runs, and
every offset is checked against the file, the blob, the record and the metadata.

The blob's zip is read here, bounded to [offset, offset + length) of the file: `torchzip` reads
zips that are whole files (until it reads byte ranges, this module keeps its own small reader).

Which keys are the model: the nesting `planner_data` records (`{"model": ..., "optimizer": ...}` ->
`model.` keys, prime-rl's `app.model.`, torchtitan's top-level keys next to `optimizer`), or
`--key-prefix`. Megatron-Core `torch_dist` folders (`metadata.json`) are read by `megatron.py`.
"""

from __future__ import annotations

import collections
import gc
import os
import re
import stat
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from .. import jsonfile
from ..checksum import crc32
from ..errors import CheckpointError, ConfigError, UnsupportedLayoutError
from ..paths import NotAFile, read_small
from . import torchpickle
from .base import Oracle, Piece, ReadStats, Source, SourceTensor, no_readahead, open_checkpoint_file, step_of
from .dcpmeta import METADATA_FILE, METADATA_TMP, DcpMetadata, TensorEntry, read_metadata
from .torchzip import (
    REFUSED_FLAGS,
    names_problem,
    on_one_disk,
    torch_records_problem,
    zip64_fields,
)

if TYPE_CHECKING:
    from ..options import MergeOptions
    from ..plan import Plan

RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")
LIGHTNING_STEP = re.compile(r"^(?:.+-)?step=(\d+)(?:-.+)?\.ckpt$")  # Lightning's ModelCheckpoint: epoch=0-step=3.ckpt
STEP_DIR = re.compile(r"^(?:global_step_|iter_|step[_-]|checkpoint-)(\d+)$|" + LIGHTNING_STEP.pattern)
# PyTorch Lightning's sharded save: a DCP of {"model" (FSDPStrategy) or "state_dict" (ModelParallelStrategy): the
# LightningModule's state dict, "optimizer_<i>": each optimizer's}, with this pickle of the rest beside it (never read)
LIGHTNING_META = "meta.pt"
LIGHTNING_CONTAINERS = ("model.", "state_dict.")  # FSDPStrategy's, ModelParallelStrategy's
_NUMBERED_OPTIMIZER = re.compile(r"optimizer_\d+\.")
MEGATRON_METADATA = "metadata.json"  # Megatron-Core dist_checkpointing: {"sharded_backend": "torch_dist", ...}
# Where trainers keep the DCP below the folder a user names: veRL Megatron (<= 0.8: actor/dist_ckpt,
# >= 0.9: actor/model/dist_ckpt), prime-rl (step_N/trainer), accelerate FSDP (pytorch_model_fsdp_0).
DCP_SUBFOLDERS = ("dist_ckpt", "model/dist_ckpt", "trainer", "pytorch_model_fsdp_0")
# accelerate's save_fsdp_optimizer writes the optimizer as a DCP of its own ({"optimizer": ...}) beside the model's
ACCELERATE_OPTIMIZER = {"pytorch_model_fsdp_0": "optimizer_0"}
MODEL_CONTAINERS = ("model",)
OPTIMIZER_CONTAINERS = ("optimizer", "optimizers", "optim")
_T = TypeVar("_T")
# top-level names of a trainer's saved dict, recognised when .metadata records no nesting
_TRAINER_KEYS = {"model", "optimizer", "optimizers", "optim", "app", "lr_scheduler", "scheduler", "dataloader",
                 "train_state", "extra", "progress", "rng_state"}
# top-level tensors that are a trainer's state, never a model's weight (torch.get_rng_state() is a uint8 tensor)
NOT_MODEL_KEYS = frozenset(_TRAINER_KEYS - {"model"} | {"rng_states", "rng", "cpu_rng_state", "cuda_rng_state",
                                                         "step", "global_step", "epoch", "iteration"})


# ---------------------------------------------------------------- finding the folder

def is_dcp_folder(folder: Path) -> bool:
    """A DCP folder, or the remains of one (per-rank metadata only, .distcp files only): its reader explains."""
    if (folder / METADATA_FILE).is_file() or (folder / METADATA_TMP).is_file():
        return True
    try:
        return any(RANK_FILE.match(p.name) or re.match(r"^__\d+\.metadata$", p.name) for p in folder.iterdir())
    except OSError:
        return False


def locate(folder: Path) -> Path | None:
    """The DCP folder at or just below `folder` (the layouts trainers write), or None."""
    for sub in ("", *DCP_SUBFOLDERS):
        d = folder / sub if sub else folder
        if d.is_dir() and is_dcp_folder(d):
            return d
    return None


def holds(folder: Path) -> bool:
    return locate(folder) is not None


def open_dcp(folder: Path) -> Source:
    """The checkpoint at or below `folder`: Megatron-Core `torch_dist` when `metadata.json` says so, else DCP."""
    d = locate(folder)
    if d is None:
        raise CheckpointError(f"{folder}: no DCP checkpoint (.metadata) here or in {', '.join(DCP_SUBFOLDERS)}")
    hf_dir = find_hf_dir(d)
    step = lightning_step(d) if is_lightning(d) else None
    step = step_of(d, STEP_DIR) if step is None else step
    backend = megatron_backend(d)
    if backend is not None:
        if backend != "torch_dist":
            raise UnsupportedLayoutError(f"{d / MEGATRON_METADATA}: Megatron sharded backend {backend!r}; only "
                                         "torch_dist is supported (re-save with --ckpt-format torch_dist)")
        from .megatron import MegatronSource

        return MegatronSource(d, hf_dir=hf_dir, step=step)
    return DcpSource(d, hf_dir=hf_dir, step=step)


def megatron_backend(folder: Path) -> str | None:
    """Megatron-Core's `metadata.json` backend name, or None when the folder has none."""
    path = folder / MEGATRON_METADATA
    try:
        data = read_small(path)  # a pipe is not read (it would wait), nor ignored (the layout would be guessed)
        if data is None:
            return None
        backend = jsonfile.loads(data.decode())["sharded_backend"]
    except NotAFile as e:
        raise CheckpointError(f"{e}; copy Megatron-Core's file itself") from None
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"{path}: not Megatron-Core checkpoint metadata ({e})") from None
    return str(backend)


def find_hf_dir(dcp_dir: Path) -> Path | None:
    """config.json and tokenizer saved with the checkpoint: a `huggingface/` folder in or beside the DCP
    folder (veRL: actor/huggingface, actor/model/huggingface). A config.json lying among other files
    (accelerate's checkpoint-N/) is not taken: every file of this folder is carried into the output,
    so such a folder is given with --model-name, which carries its config and tokenizer only."""
    for d in (dcp_dir, dcp_dir.parent):
        if (d / "huggingface" / "config.json").is_file():
            return d / "huggingface"
    return None



# ---------------------------------------------------------------- one item's torch.save zip

_EOCD = struct.Struct("<IHHHHIIH")
_LOC64 = struct.Struct("<IIQI")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_M32 = 0xFFFFFFFF
# the records torch's reader reads besides data.pkl and the storages: their local headers are checked as theirs
_SMALL_RECORDS = ("byteorder", "version", ".data/version", ".storage_alignment", ".data/serialization_id",
                  ".format_version", "constants.pkl")  # the last: TorchScript's, which torch.load refuses


class _Entry(NamedTuple):
    name: str  # without the archive prefix
    raw_name: bytes
    lho: int  # blob-relative
    size: int
    crc: int


class _Blob:
    """One item's [offset, offset+length) of a .distcp file, read as a zip whose offsets start at 0.

    The end of the blob (end records, central directory) and its head (data.pkl, the small records,
    the storage's local header) are each read once: a tensor blob costs 2-3 positioned reads.
    """

    _WINDOW = 4096

    def __init__(self, fd: int, path: str, offset: int, length: int, fqn: str):
        self.fd, self.path, self.base, self.length, self.fqn = fd, path, offset, length, fqn
        self._cache: list[tuple[int, bytes]] = []
        self._lhos: list[int] = []  # local header offsets, sorted: each record must end where the next begins

    def fail(self, why: str, cls: type[CheckpointError] = CheckpointError) -> CheckpointError:
        return cls(f"{self.path}: item {self.fqn!r} at [{self.base}, {self.base + self.length}): {why}")

    def read(self, at: int, n: int, cache: bool = False) -> bytes:
        if at < 0 or n < 0 or at + n > self.length:
            raise self.fail(f"zip structure points outside the item ({at}+{n} > {self.length})")
        for s, buf in self._cache:
            if s <= at and at + n <= s + len(buf):
                return buf[at - s:at - s + n]
        try:
            data = os.pread(self.fd, n, self.base + at)
        except OSError as e:
            raise self.fail(f"cannot read ({e.strerror or e})") from None
        if len(data) != n:
            raise self.fail("file cut short")
        if cache:
            self._cache.append((at, data))
        return data

    def directory(self) -> tuple[dict[str, _Entry], int]:
        """Central directory entries by name (archive prefix removed), and where the directory starts."""
        n = min(self.length, self._WINDOW)
        tail = self.read(self.length - n, n, cache=True)
        eocd_at = self.length - _EOCD.size
        if eocd_at < 0 or tail[-_EOCD.size:][:4] != b"PK\x05\x06":
            if _is_safetensors_at(self.path, self.base):
                raise self.fail("a safetensors blob, not a torch.save zip (a DCP saved with "
                                "serialization_format=SAFETENSORS); not supported", UnsupportedLayoutError)
            if self.read(0, min(4, self.length)) != b"PK\x03\x04":
                raise self.fail("not a torch.save zip")
            raise self.fail("no zip end record at the end of the item")
        if self.read(0, n, cache=True)[:4] != b"PK\x03\x04":  # torch.load reads such an item as a legacy file
            raise self.fail("a zip that does not start at the item's first byte, which torch.load would read as "
                            "another format")
        _, disk, cd_disk, on_disk, count, cd_size, cd_off, clen = _EOCD.unpack(self.read(eocd_at, _EOCD.size))
        if clen or disk:
            raise self.fail("zip end record with a comment or several disks")
        cd_end = eocd_at
        loc_at = eocd_at - _LOC64.size
        if loc_at >= 0 and self.read(loc_at, 4) == b"PK\x06\x07":  # torch always writes zip64 end records
            _, _, eocd64_at, disks = _LOC64.unpack(self.read(loc_at, _LOC64.size))
            rec = self.read(eocd64_at, _EOCD64.size)
            if rec[:4] != b"PK\x06\x06" or eocd64_at + _EOCD64.size != loc_at or disks != 1:
                raise self.fail("bad zip64 end record")
            _, _, _, _, disk, cd_disk, on_disk, count, cd_size, cd_off = _EOCD64.unpack(rec)
            cd_end = eocd64_at
        elif _M32 in (cd_size, cd_off) or count == 0xFFFF:
            raise self.fail("zip64 locator missing")
        if not on_one_disk(disk, cd_disk, count, on_disk):
            raise self.fail("a zip split over several disks")
        if cd_off + cd_size != cd_end:
            raise self.fail("zip central directory does not end where the end record starts")
        cd = self.read(cd_off, cd_size)
        entries: list[_Entry] = []
        pos = 0
        for _ in range(count):
            if pos + _CENTRAL.size > len(cd):
                raise self.fail("zip central directory cut short")
            (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, disk, _, attr, lho) = \
                _CENTRAL.unpack_from(cd, pos)
            if sig != 0x02014B50 or disk != 0:
                raise self.fail("bad zip central directory entry")
            if method != 0 or flags & REFUSED_FLAGS:
                raise self.fail("compressed or encrypted zip record", UnsupportedLayoutError)
            at = pos + _CENTRAL.size
            raw = cd[at:at + nlen]
            if _M32 in (csize, usize, lho):
                usize, csize, lho = zip64_fields(cd[at + nlen:at + nlen + elen], usize, csize, lho)
            if csize != usize:
                raise self.fail("zip record with different stored and real sizes")
            if attr & 0x10 or raw.endswith(b"/"):  # torch's zip reader reads a folder entry as no bytes
                raise self.fail(f"zip record {raw[:60]!r} is marked as a folder")
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:  # torch's reader lists every record's name as text
                raise self.fail(f"zip record name {raw[:60]!r} is not UTF-8") from None
            entries.append(_Entry(name, raw, lho, usize, crc))
            pos = at + nlen + elen + clen
        if pos != len(cd):
            raise self.fail("zip central directory has trailing bytes")
        pickles = [e for e in entries if e.name == "data.pkl" or e.name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise self.fail("not a torch.save zip (no single data.pkl)")
        prefix = pickles[0].name[:-len("data.pkl")]
        if not all(e.name.startswith(prefix) for e in entries):
            raise self.fail("zip records outside the archive folder")
        problem = names_problem([e.name for e in entries], len(prefix))
        if problem is not None:
            raise self.fail(problem)
        out = {e.name[len(prefix):]: e for e in entries}
        if len(out) != len(entries):
            raise self.fail("duplicate zip record names")
        self._lhos = sorted(e.lho for e in entries)
        if len(set(self._lhos)) != len(self._lhos):
            raise self.fail("two zip records share a local header")
        return out, cd_off

    def locate(self, entries: dict[str, _Entry], cd_off: int, names: list[str]) -> dict[str, tuple[int, int]]:
        """(data start, size) of the named records. torch packs records back to back (alignment padding
        sits in the next local header's extra field) and, with zip flag bit 3, follows each record's
        data with a data descriptor; both are checked, so a shifted header or size cannot go unnoticed."""
        lhos = self._lhos
        self.read(0, min(self.length, self._WINDOW), cache=True)
        out: dict[str, tuple[int, int]] = {}
        for name in names:
            e = entries[name]
            nxt = next((x for x in lhos if x > e.lho), cd_off)
            head = self.read(e.lho, _LOCAL.size + len(e.raw_name))
            sig, _, flags, method, _, _, crc, csize, usize, nlen, elen = _LOCAL.unpack_from(head)
            if sig != 0x04034B50 or head[_LOCAL.size:] != e.raw_name:
                raise self.fail(f"bad zip local header for {name}")
            if method != 0 or flags & 1:
                raise self.fail(f"compressed or encrypted zip record {name}", UnsupportedLayoutError)
            start = e.lho + _LOCAL.size + nlen + elen
            end = start + e.size
            gap = nxt - end
            if flags & 8:
                fmt = {16: "<4sIII", 24: "<4sIQQ"}.get(gap)
                desc = struct.unpack(fmt, self.read(end, gap)) if fmt else None
                if desc != (b"PK\x07\x08", e.crc, e.size, e.size):
                    raise self.fail(f"zip record {name} does not end where its data descriptor should be")
            elif gap != 0 or ((crc, csize, usize) != (e.crc, e.size, e.size) and _M32 not in (csize, usize)):
                raise self.fail(f"zip local header of {name} disagrees with the directory")
            out[name] = (start, e.size)
        return out

    def pickle(self) -> tuple[dict[str, _Entry], int, Any]:
        """The directory and `data.pkl` decoded by the allowlisted unpickler (byte order checked)."""
        entries, cd_off, pkl = self.pickle_bytes()
        try:
            obj = torchpickle.decode_or_raise(pkl)
        except torchpickle.NotPlain as e:
            raise self.fail(f"data.pkl: {e} (torch.load reads more than this reader allows; re-save the item "
                            "with dcp.save)", UnsupportedLayoutError) from None
        return entries, cd_off, obj

    def pickle_bytes(self) -> tuple[dict[str, _Entry], int, bytes]:
        """The directory and `data.pkl`'s bytes, not decoded; its CRC and the small records torch's reader parses
        are checked."""
        entries, cd_off = self.directory()
        head = self.locate(entries, cd_off, [n for n in ("data.pkl", *_SMALL_RECORDS) if n in entries])
        pkl = self.read(*head["data.pkl"])
        crc = entries["data.pkl"].crc
        if crc and crc32(pkl) != crc:  # 0: saved with torch.serialization.set_crc32_options(False)
            raise self.fail("CRC mismatch in data.pkl")
        problem = torch_records_problem(lambda name: self.read(*head[name]) if name in head else None)
        if problem is not None:
            raise self.fail(problem[1], problem[0])
        return entries, cd_off, pkl


def _is_safetensors_at(path: str, offset: int) -> bool:
    """Whether a safetensors file starts at `offset`: 8-byte little-endian header size, then a JSON object."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            head = f.read(9)
            n = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
            return head[8:9] == b"{" and offset + 8 + n <= os.fstat(f.fileno()).st_size
    except OSError:
        return False


def _chunk_location(blob: _Blob, entry: TensorEntry, sizes: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """(absolute offset of the chunk's first element, element strides) from one tensor item's blob."""
    entries, cd_off, view = blob.pickle()
    if not isinstance(view, torchpickle.Local):
        raise blob.fail("data.pkl does not hold one plain tensor", UnsupportedLayoutError)
    shape, stride, offset = view.shape, view.stride, view.offset
    if not all(type(v) is int and v >= 0 for v in (offset, *shape, *stride)) or len(shape) != len(stride):
        raise blob.fail(f"bad tensor view offset={offset!r} size={shape!r} stride={stride!r}")
    if view.dtype is not entry.dtype:
        raise blob.fail(f"stored dtype {view.dtype.name} but .metadata says {entry.dtype.name}")
    if shape != sizes:
        raise blob.fail(f"stored shape {list(shape)} but .metadata says chunk sizes {list(sizes)}")
    rec = f"data/{view.storage.key}"
    if rec not in entries:
        raise blob.fail(f"no zip record {rec}")
    data_start, nbytes = blob.locate(entries, cd_off, [rec])[rec]
    itemsize = entry.dtype.itemsize
    if view.storage.numel * itemsize != nbytes:
        raise blob.fail(f"storage record holds {nbytes} bytes, the pickle says {view.storage.numel * itemsize}")
    if _numel(shape):
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
        if (last + 1) * itemsize > nbytes:
            raise blob.fail("tensor view reaches past its storage")
    return blob.base + data_start + offset * itemsize, stride


# ---------------------------------------------------------------- the folder

def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_tiling(where: str, shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    """The chunks must cover every element exactly once: in bounds, volumes add up, no two overlap."""
    total = 0
    for start, size in boxes:
        if len(start) != len(shape) or len(size) != len(shape):
            raise CheckpointError(f"{where}: chunk rank differs from the tensor's")
        if any(o + n > d for o, n, d in zip(start, size, shape)):
            raise CheckpointError(f"{where}: chunk at {list(start)} of {list(size)} runs past the shape {list(shape)}")
        total += _numel(size)
    if total != _numel(shape):
        raise CheckpointError(f"{where}: chunks hold {total} elements, the tensor has {_numel(shape)} "
                              "(gap or overlap)")
    live = [b for b in boxes if _numel(b[1])]
    if len(live) < 2 or not shape:
        return
    # sweep along the dim with the most distinct starts: neighbours there are few for FSDP/TP splits
    dim = max(range(len(shape)), key=lambda d: len({b[0][d] for b in live}))
    live.sort(key=lambda b: b[0][dim])
    active: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for b in live:
        active = [a for a in active if a[0][dim] + a[1][dim] > b[0][dim]]
        for a in active:
            if all(ao < bo + bn and bo < ao + an for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1])):
                raise CheckpointError(f"{where}: chunks at {list(a[0])} and {list(b[0])} overlap")
        active.append(b)


@dataclass
class DcpCheckpoint:
    """A DCP folder as planned: every tensor's pieces (by DCP key) and every byte item's range."""

    folder: Path
    meta: DcpMetadata
    tensors: dict[str, SourceTensor]  # DCP key -> pieces, in save order
    bytes_items: dict[str, tuple[str, int, int]]  # DCP key -> (file, offset, length)
    files: list[Path] = field(default_factory=list)  # every .distcp file .metadata names

    def read_object(self, key: str) -> Any:
        """A byte item's value (a torch.save blob of plain Python data), through the allowlisted unpickler."""
        return self._with_blob(key, lambda blob: blob.pickle()[2])

    def holds_tensors(self, key: str) -> bool:
        """Whether a byte item pickles tensors inside (its torch.save zip has storage records): a tuple of tensors,
        an object holding some, or a nested dict saved with flatten_state_dict=False. Reads the zip directory only."""
        entries, _ = self._with_blob(key, lambda blob: blob.directory())
        return any(name.startswith("data/") for name in entries)

    def read_pickle(self, key: str) -> bytes:
        """A byte item's `data.pkl`, CRC-checked but not decoded (for a reader with its own unpickler)."""
        return self._with_blob(key, lambda blob: blob.pickle_bytes()[2])

    def _with_blob(self, key: str, read: Callable[[_Blob], _T]) -> _T:
        file, offset, length = self.bytes_items[key]
        fd = no_readahead(os.open(file, os.O_RDONLY))
        try:
            return read(_Blob(fd, file, offset, length, key))
        finally:
            os.close(fd)


def read_dcp(folder: Path, stats: ReadStats | None = None) -> DcpCheckpoint:
    """Plan a DCP folder: every tensor's pieces and every byte item's range, all checked; reads no tensor data."""
    gc_was_on = gc.isenabled()
    gc.disable()  # many small acyclic records: the cyclic collector would rescan them again and again
    try:
        return _read_dcp(folder, stats or ReadStats())
    finally:
        if gc_was_on:
            gc.enable()


def _read_dcp(folder: Path, stats: ReadStats) -> DcpCheckpoint:
    md = read_metadata(folder)
    sizes: dict[str, int] = {}
    spans: dict[str, list[tuple[int, int, str]]] = {}
    where: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]] = {}
    for (fqn, off), (rel, offset, length) in md.storage.items():
        file = str(folder / rel)
        if file not in sizes:
            try:
                st = os.stat(file)
            except OSError as e:
                raise CheckpointError(f"{file}: cannot read ({e.strerror or e}), named by {md.path}") from None
            if not stat.S_ISREG(st.st_mode):  # a pipe's size is 0: "past the end of the 0-byte file" would mislead
                raise CheckpointError(f"{file}: not a file (a pipe, a device or a folder), named by {md.path}; "
                                      "copy the checkpoint's file itself")
            sizes[file] = st.st_size
        if offset + length > sizes[file]:
            raise CheckpointError(f"{file}: item {fqn!r} at [{offset}, {offset + length}) runs past the end of the "
                                  f"{sizes[file]}-byte file (truncated? copy it again)")
        where[(fqn, off)] = (file, offset, length)
        spans.setdefault(file, []).append((offset, offset + length, fqn))
    for file, ranges in spans.items():
        ranges.sort()
        for (s0, e0, f0), (s1, _, f1) in zip(ranges, ranges[1:]):
            if s1 < e0:
                if s0 == s1 and _is_safetensors_at(file, s0):
                    raise UnsupportedLayoutError(f"{file}: tensors stored as one safetensors blob (a DCP saved "
                                                 "with serialization_format=SAFETENSORS); not supported")
                raise CheckpointError(f"{file}: items {f0!r} and {f1!r} overlap in the file")

    tensors: dict[str, SourceTensor] = {}
    bytes_items: dict[str, tuple[str, int, int]] = {}
    used: set[tuple[str, tuple[int, ...] | None]] = set()
    for fqn in md.byte_keys:
        if (fqn, None) not in where:
            raise CheckpointError(f"{md.path}: byte item {fqn!r} has no storage entry")
        used.add((fqn, None))
        bytes_items[fqn] = where[(fqn, None)]
    fds: dict[str, int] = {}
    try:
        for fqn, entry in md.tensors.items():
            tensors[fqn] = _tensor(fqn, entry, where, used, fds, md.path)
    finally:
        for fd in fds.values():
            os.close(fd)
    stray = set(where) - used
    if stray:
        fqn, off = sorted(stray, key=str)[0]
        raise CheckpointError(f"{md.path}: {len(stray)} storage entries match no chunk, e.g. {fqn!r} at {off}")
    files = sorted({Path(f) for f in sizes})
    stats.files += len(files)
    stats.decoded += len(files)
    return DcpCheckpoint(folder, md, tensors, bytes_items, files)


def _tensor(fqn: str, entry: TensorEntry, where: Mapping, used: set, fds: dict[str, int], mpath: Path) -> SourceTensor:
    check_tiling(f"{mpath}: tensor {fqn!r}", entry.shape, list(entry.chunks))
    pieces = []
    for start, size in entry.chunks:
        loc = where.get((fqn, start))
        if loc is None:
            if _numel(size) == 0:  # torch dedups empty chunks that share an offset; nothing to read
                continue
            raise CheckpointError(f"{mpath}: tensor {fqn!r} chunk at {list(start)} has no storage entry")
        used.add((fqn, start))
        file, offset, length = loc
        if file not in fds:
            fds[file] = no_readahead(open_checkpoint_file(file))
        data_at, stride = _chunk_location(_Blob(fds[file], file, offset, length, fqn), entry, size)
        if _numel(size):
            m = RANK_FILE.match(os.path.basename(file))
            pieces.append(Piece(int(m.group(1)) if m else -1, file, data_at, size, stride, start))
    layout = "plain" if len(entry.chunks) == 1 else f"{len(entry.chunks)} chunks"
    return SourceTensor(fqn, entry.shape, entry.dtype, tuple(pieces), layout)


# ---------------------------------------------------------------- which keys are the model

@dataclass(frozen=True)
class KeySplit:
    """The model's keys (output name -> DCP key), the optimizer's containers, and what is left out."""

    prefix: str  # stripped from model keys ("" for none)
    model: dict[str, str]
    optimizers: tuple[str, ...]  # ("optimizer.",): keys <prefix>state.<fqn>.<key>; or Lightning's optimizer_<i>.
    others: dict[str, int]  # other containers holding tensors -> how many (not exported)
    how: str  # for inspect: how the split was decided
    module_prefix: str = ""  # a LightningModule's attribute holding the model (`model.`): left out of the names

    @property
    def optimizer_prefix(self) -> str | None:
        """The optimizer exported: the one found (with several, none is: the export is one optimizer's state)."""
        return self.optimizers[0] if len(self.optimizers) == 1 else None


def _paths(ck: DcpCheckpoint) -> dict[str, tuple]:
    """Each tensor key's path in the saved dict: from planner_data, else guessed from trainer-style names."""
    pd = ck.meta.planner_data
    if pd is not None and all(k in pd for k in ck.tensors):
        return {k: pd[k] for k in ck.tensors}
    heads = {k.split(".", 1)[0] for k in ck.tensors if "." in k}
    trainer = len(heads & _TRAINER_KEYS) >= 2 and all(k.split(".", 1)[0] in _TRAINER_KEYS for k in ck.tensors)
    return {k: tuple(k.split(".", 1)) if trainer else (k,) for k in ck.tensors}


# Module names that wrappers put into a state dict's keys and torch's own state-dict hooks (get_model_state_dict,
# checkpoint_wrapper, FSDP) leave out: torch.compile's `_orig_mod.`, activation checkpointing's, FSDP1's.
WRAPPER_SEGMENTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")
_WRAPPERS = re.compile(r"(?:^|(?<=\.))(?:" + "|".join(WRAPPER_SEGMENTS) + r")\.")


def strip_wrappers(name: str) -> str:
    """`_orig_mod.model.layers.0.x` -> `model.layers.0.x`: the name the unwrapped model gives the parameter."""
    return _WRAPPERS.sub("", name)


def split_keys(ck: DcpCheckpoint, key_prefix: str | None) -> KeySplit:
    """Decide which tensors are the model (wrapper segments removed from their names, see `unwrapped`).

    Non-tensor items that pickle tensors inside are refused where they could be the model's: DCP stores a tuple
    of tensors, an object holding some, or (saved with flatten_state_dict=False) a whole nested dict as one
    pickle, which the merge does not read; dropping them would leave the model without those weights."""
    from .megatron import megatron_keys

    marked = megatron_keys(ck)
    if marked:  # Megatron's stacked, fused keys written as they are would be no Hugging Face model
        raise CheckpointError(f"{ck.folder}: no {MEGATRON_METADATA}, but this is a Megatron-Core checkpoint "
                              f"({marked}); without that marker its layout would be guessed: copy "
                              f"{MEGATRON_METADATA} from where it was saved (a torch_dist save writes "
                              '{"sharded_backend": "torch_dist", '
                              '"sharded_backend_version": 1})')
    if ck.meta.planner_data is None:  # no recorded nesting (flatten_state_dict=False): any item may be the model
        within = _container(key_prefix) if key_prefix is not None else ""
        for key in ck.bytes_items:
            if (key.startswith(within) or within.startswith(key + ".")) and ck.holds_tensors(key):
                raise UnsupportedLayoutError(
                    f"{ck.meta.path}: item {key!r} pickles tensors inside one non-tensor item, and .metadata records "
                    "no nesting: a save with flatten_state_dict=False, which stores each nested dict whole; "
                    "streammerge reads DCP's tensor items only. Load it with torch and save it again with "
                    "flatten_state_dict=True (dcp.save's default)")
    split = _split_keys(ck, key_prefix)
    pickled = [k for k in ck.bytes_items if _of_model(k, split, ck) and ck.holds_tensors(k)]
    if pickled:
        raise UnsupportedLayoutError(
            f"{ck.meta.path}: item {pickled[0]!r} of the model pickles tensors inside a non-tensor value (a tuple or "
            f"an object, which DCP stores whole; {len(pickled)} such items), and the merge would leave them out; "
            "save them as tensors (in a dict or a list), or choose the model's keys with --key-prefix")
    model = unwrapped(split.model, ck.folder)
    if model != split.model:
        split = replace(split, model=model,
                        how=f"{split.how}, wrapper segments ({', '.join(WRAPPER_SEGMENTS)}) removed")
    if key_prefix is None and split.prefix in LIGHTNING_CONTAINERS and is_lightning(ck.folder):
        split = _lightning_module(split)
    return split


def is_lightning(folder: Path) -> bool:
    return (folder / LIGHTNING_META).is_file()


def lightning_step(folder: Path) -> int | None:
    """`global_step` from Lightning's meta.pt (a `last.ckpt/` names none), read by the allowlisting unpickler: nothing
    in it runs, and a pickle naming anything else gives None (the folder's name may tell the step then)."""
    try:
        read = torchpickle.read_state(folder / LIGHTNING_META)
    except (CheckpointError, OSError):
        return None
    state = read.obj if read is not None else None
    step = state.get("global_step") if isinstance(state, dict) else None
    return step if type(step) is int and step >= 0 else None


def _lightning_module(split: KeySplit) -> KeySplit:
    """Lightning's `model` container is the LightningModule's state dict: where every name starts with one attribute
    (`self.model = AutoModelForCausalLM...`), that attribute is the transformers model, and its names are the
    model's without it. (transformers 5 loads the longer names too; other loaders of the folder would not.)"""
    attribute = lightning_attribute(split.model)
    if attribute is None:
        return split
    model = {name[len(attribute):]: key for name, key in split.model.items()}
    return replace(split, model=model, module_prefix=attribute)


def lightning_attribute(names: Iterable[str]) -> str | None:
    """The one attribute of a LightningModule every name of its state dict starts with (`model.`), or None."""
    heads = set()
    for name in names:
        if "." not in name:
            return None
        heads.add(name.split(".", 1)[0])
    return heads.pop() + "." if len(heads) == 1 else None


def unwrapped(model: Mapping[str, str], where: Path) -> dict[str, str]:
    """Output names without wrapper segments: a model saved with `model.state_dict()` under torch.compile or
    activation checkpointing carries them, and transformers would find none of its parameters under those
    names. Two keys that become one name are refused: the folder would hold one of them, silently."""
    out: dict[str, str] = {}
    for name, key in model.items():
        clean = strip_wrappers(name)
        if clean in out:
            raise CheckpointError(f"{where}: keys {out[clean]!r} and {key!r} are both {clean!r} once the wrapper "
                                  f"segments torch's state_dict leaves out ({', '.join(WRAPPER_SEGMENTS)}) are "
                                  "removed: the save holds two copies of one parameter; save the model once, or "
                                  "choose its keys with --key-prefix")
        out[clean] = key
    return out


def _container(prefix: str) -> str:
    return prefix if prefix.endswith(".") else prefix + "."  # a container, never part of a name


def _of_model(key: str, split: KeySplit, ck: DcpCheckpoint) -> bool:
    """Whether a (non-tensor) key sits where the split takes the model's tensors from."""
    if split.optimizer_prefix and key.startswith(split.optimizer_prefix):
        return False
    if split.prefix:
        return key.startswith(split.prefix)
    path = (ck.meta.planner_data or {}).get(key, (key,))
    return _top_level_model(path) and key not in NOT_MODEL_KEYS


def _top_level_model(path: tuple) -> bool:
    """Whether a key of a saved dict with no `model` container is the model's: a top-level key, or nested below a
    module's key (`layer._extra_state.scale`, what a module's get_extra_state() returns): a model's state dict has
    dotted keys, a trainer's containers beside it (optimizer, lr_scheduler, ...) plain names."""
    return len(path) == 1 or "." in str(path[0]) or path[0] == "_extra_state"


def _split_keys(ck: DcpCheckpoint, key_prefix: str | None) -> KeySplit:
    """Decide which tensors are the model: `key_prefix` when given, else the saved dict's nesting.

    A `model` container (at the top, or one level down as prime-rl's `app.model`) is the model; without
    one, the top-level tensors are (a bare state dict, or torchtitan's model keys next to `optimizer`).
    """
    keys = list(ck.tensors)
    if not keys:
        raise CheckpointError(f"{ck.folder}: the save holds no tensors ({len(ck.bytes_items)} non-tensor items; a "
                              "save with flatten_state_dict=False pickles nested dicts whole, which streammerge does "
                              "not unpickle)")
    if key_prefix is not None:
        key_prefix = _container(key_prefix)
        model = {k[len(key_prefix):]: k for k in keys if k.startswith(key_prefix) and len(k) > len(key_prefix)}
        if not model:
            heads = sorted({k.split(".", 1)[0] + "." for k in keys})[:6]
            raise ConfigError(f"{ck.folder}: no tensor key starts with --key-prefix {key_prefix!r} "
                              f"(keys start with {', '.join(heads)})")
        parent = key_prefix[:-len("model.")] if key_prefix.endswith("model.") else None
        opts = _optimizers(keys, parent) if parent is not None else ()
        container = next((c for c in LIGHTNING_CONTAINERS if key_prefix.startswith(c)), None)
        module = ""
        if not opts and container is not None and is_lightning(ck.folder):
            # a module inside the LightningModule: its optimizer names the parameters from the LightningModule down
            opts, module = _optimizers(keys, ""), key_prefix[len(container):]
        return KeySplit(key_prefix, model, opts, _others(_paths(ck), model, opts), f"--key-prefix {key_prefix!r}",
                        module_prefix=module if len(opts) == 1 else "")
    paths = _paths(ck)
    containers = {p[:i] for p in paths.values() for i in range(1, min(len(p), 3))}
    named = MODEL_CONTAINERS + (("state_dict",) if is_lightning(ck.folder) else ())
    candidates = sorted((c for c in containers if c[-1] in named), key=lambda c: (len(c), tuple(map(str, c))))
    found = candidates[0] if candidates else None
    if found is not None and len(candidates) > 1 and len(candidates[1]) == len(found):
        names = [".".join(map(str, c)) + "." for c in candidates if len(c) == len(found)]
        raise CheckpointError(f"{ck.folder}: several model containers ({', '.join(names)}): say which one is the "
                              f"model with --key-prefix, e.g. --key-prefix {names[0]}")
    if found is not None:
        prefix = ".".join(str(x) for x in found) + "."
        model = {k[len(prefix):]: k for k, p in paths.items() if p[:len(found)] == found}
        if all(k.startswith(prefix) for k in model.values()):
            opts = _optimizers(keys, ".".join(str(x) for x in found[:-1]) + "." if len(found) > 1 else "")
            return KeySplit(prefix, model, opts, _others(paths, model, opts), f"the {prefix!r} keys of the saved dict")
    opts = _optimizers(keys, "")
    top = {k: k for k, p in paths.items()  # not the flat optimizer's keys, nor a trainer's rng_state, step, ...
           if _top_level_model(p) and not k.startswith(opts) and k not in NOT_MODEL_KEYS}
    if not top:
        heads = sorted({str(p[0]) for p in paths.values()})[:6]
        likely = [h for h in heads if h not in NOT_MODEL_KEYS and not _NUMBERED_OPTIMIZER.match(h + ".")] or heads
        raise CheckpointError(f"{ck.folder}: cannot tell which tensors are the model (the saved dict holds "
                              f"{', '.join(heads)}); name them with --key-prefix, e.g. --key-prefix {likely[0]}.")
    nested = {str(p[0]) + "." for p in paths.values() if len(p) > 1}
    how = "every key" if not nested and len(top) == len(keys) else "the top-level keys of the saved dict"
    return KeySplit("", top, opts, _others(paths, top, opts), how)


def _optimizers(keys: list[str], parent: str) -> tuple[str, ...]:
    """The containers under `parent` holding optimizer state: a trainer's `optimizer.`, else Lightning's numbered
    ones (one per optimizer configure_optimizers returned)."""
    for name in OPTIMIZER_CONTAINERS:
        p = f"{parent}{name}."
        if any(k.startswith(p + "state.") for k in keys):
            return (p,)
    return tuple(_numbered_optimizers(keys, parent))


def _numbered_optimizers(keys: list[str], parent: str) -> list[str]:
    """Lightning's `optimizer_<i>.` containers that hold optimizer state (one per optimizer configure_optimizers
    returned)."""
    found = set()
    for k in keys:
        m = _NUMBERED_OPTIMIZER.match(k, len(parent)) if k.startswith(parent) else None
        if m and k.startswith("state.", m.end()):
            found.add(k[:m.end()])
    return sorted(found)


def _others(paths: Mapping[str, tuple], model: Mapping[str, str], opts: tuple[str, ...]) -> dict[str, int]:
    """The keys neither the model nor an optimizer takes, counted by the saved dict's key they sit under (inspect
    lists them)."""
    taken = set(model.values())
    out: dict[str, int] = {}
    for k, path in paths.items():
        if k not in taken and not k.startswith(opts):
            head = str(path[0]) if len(path) > 1 else k.split(".", 1)[0]
            out[head] = out.get(head, 0) + 1
    return out


# ---------------------------------------------------------------- the source

class DcpSource(Source):
    """A torch DCP folder (dcp.save of an FSDP2 model, torchtitan, prime-rl, accelerate's SHARDED_STATE_DICT)."""

    format = "torch DCP"
    oracle_modules = ("torch.distributed.checkpoint",)
    takes_key_prefix = True

    def __init__(self, path: Path, *, hf_dir: Path | None = None, step: int | None = None):
        super().__init__(path, step=step, hf_dir=hf_dir)
        self._ck: DcpCheckpoint | None = None
        self._opt_ck: DcpCheckpoint | None = None
        self._opt_error: str | None = None
        self._split: tuple[str | None, KeySplit] | None = None

    @property
    def root(self) -> Path:
        """huggingface/ may sit beside the DCP folder (veRL: actor/dist_ckpt and actor/huggingface)."""
        if self.hf_dir is None:
            return self.path
        return Path(os.path.commonpath([self.path, self.hf_dir]))

    def checkpoint(self) -> DcpCheckpoint:
        """The folder's plan (read once)."""
        if self._ck is None:
            self._ck = read_dcp(self.path, self.stats)
        return self._ck

    def split(self, key_prefix: str | None) -> KeySplit:
        if self._split is None or self._split[0] != key_prefix:
            ck = self.checkpoint()
            if not ck.tensors:
                self._refuse_empty(ck)
            self._split = (key_prefix, split_keys(ck, key_prefix))
        return self._split[1]

    def _refuse_empty(self, ck: DcpCheckpoint) -> None:
        """A model DCP with no tensors beside an optimizer DCP of a peft model's adapter: what accelerate's FSDP1
        SHARDED_STATE_DICT save of a peft model writes with peft 0.21, whose adapter filter removes FSDP1's wrapper
        name from the front of a module's name only (0.22 removes it at any depth, and its saves hold the adapter)."""
        oc = self.optimizer_dcp()
        adapter = next((k for k in oc.tensors if ".lora_A." in k or ".lora_B." in k), None) if oc else None
        if oc is not None and adapter is not None:
            raise CheckpointError(
                f"{ck.folder}: the save holds no tensors: the trained LoRA adapter is in no file of this checkpoint "
                f"({oc.folder.name} beside it holds only its optimizer state, e.g. {adapter}): under FSDP1, peft "
                "0.21's get_peft_model_state_dict (what the HF Trainer's checkpoint saves) finds no adapter inside "
                "nested FSDP units; checkpoints saved with peft 0.22 or later, or with FSDP2, hold it")

    def tensors(self, options: MergeOptions) -> dict[str, SourceTensor]:
        ck = self.checkpoint()
        split = self.split(options.key_prefix)
        tensors = {name: ck.tensors[key].renamed(name) for name, key in split.model.items()}
        if not tensors:
            raise CheckpointError(f"{self.path}: the checkpoint holds no model tensors")
        return tensors

    def warnings(self, options: MergeOptions) -> list[str]:
        split = self.split(options.key_prefix)
        if len(split.optimizers) > 1 and options.optimizer:
            why = "configure_optimizers returned several" if is_lightning(self.path) else "the training used several"
            return [f"optimizer not exported: the checkpoint holds {len(split.optimizers)} optimizers "
                    f"({', '.join(p[:-1] for p in split.optimizers)}: {why}), and the export is one optimizer's state"]
        if split.prefix or options.key_prefix is not None:
            return []
        unknown = {head: n for head, n in split.others.items() if head not in _TRAINER_KEYS | NOT_MODEL_KEYS}
        if not unknown:
            return []
        left = ", ".join(f"{head}.* ({n} tensors)" for head, n in sorted(unknown.items()))
        return [f"{self.checkpoint().folder}: left out {left}: nested beside the top-level tensors the merge takes "
                "as the model, so taken for a trainer's state (a model's state dict nests nothing under a plain "
                "name); to merge them, name them with --key-prefix"]

    def names_hint(self) -> str | None:
        """A LightningModule whose names start with more than one attribute (the model and a value head, say) keeps
        its names: --key-prefix takes the attribute most of them start with."""
        split = self._split[1] if self._split is not None else None
        if split is None or split.module_prefix or split.prefix not in LIGHTNING_CONTAINERS or \
                not is_lightning(self.path):
            return None
        heads = collections.Counter(name.split(".", 1)[0] for name in split.model if "." in name)
        if not heads:
            return None
        head = heads.most_common(1)[0][0]
        return (f"this is a LightningModule's state dict, and more than its {head!r} attribute: --key-prefix "
                f"{split.prefix}{head}. takes that attribute alone")

    def has_optimizer(self) -> bool:
        try:
            return self.split(self._key_prefix()).optimizer_prefix is not None or self._optimizer_folder() is not None
        except CheckpointError:
            return False

    def _optimizer_folder(self) -> Path | None:
        """accelerate's optimizer DCP beside this model DCP (checkpoint-N/optimizer_0/ of `{"optimizer": ...}`)."""
        name = ACCELERATE_OPTIMIZER.get(self.path.name)
        beside = self.path.parent / name if name else None
        return beside if beside is not None and beside.is_dir() and is_dcp_folder(beside) else None

    def optimizer_dcp(self) -> DcpCheckpoint | None:
        """The DCP beside this one that holds the optimizer (read once), or None where there is none or it cannot
        be read (`_opt_error` says why: the weights are merged all the same)."""
        if self._opt_ck is None and self._opt_error is None:
            beside = self._optimizer_folder()
            if beside is not None:
                try:
                    self._opt_ck = read_dcp(beside, self.stats)
                except CheckpointError as e:
                    self._opt_error = str(e)
        return self._opt_ck

    def _key_prefix(self) -> str | None:
        return self._split[0] if self._split is not None else None

    def optimizer_plan(self, weights: Plan, options: MergeOptions, config: dict | None,
                       model_dir: Path | None) -> tuple[Plan | None, list[str]]:
        from ..optimizer.dcp import plan_dcp_optimizer
        from .lora import NOTE as LORA_NOTE

        split = self.split(options.key_prefix)
        peft = None
        if any(n.startswith(LORA_NOTE) for n in weights.notes):  # its optimizer names the peft model's parameters
            ck = self.checkpoint()
            peft = {name: ck.tensors[key].shape for name, key in split.model.items()}
        if split.optimizer_prefix is not None:
            return plan_dcp_optimizer(self.checkpoint(), split.optimizer_prefix, weights, options, peft=peft,
                                      source_note=f"torch DCP {self.path.name}", step=self.step,
                                      module_prefix=split.module_prefix)
        oc = self.optimizer_dcp()
        if oc is None:
            return None, [f"optimizer not exported: {self._opt_error}"] if self._opt_error else []
        found = _optimizers(list(oc.tensors), "")
        prefix = found[0] if len(found) == 1 else None
        if prefix is None:
            return None, [f"optimizer not exported: {oc.folder} holds no optimizer state tensors "
                          f"({', '.join(OPTIMIZER_CONTAINERS)}.state.*)"]
        return plan_dcp_optimizer(oc, prefix, weights, options, step=self.step, peft=peft,
                                  source_note=f"torch DCP {oc.folder.name}, beside {self.path.name}")

    def info(self) -> dict[str, Any]:
        ck = self.checkpoint()
        return {"files": len(ck.files), "keys": len(ck.tensors) + len(ck.bytes_items)}

    def describe(self) -> list[str]:
        lines = super().describe()
        if self._split is not None:
            split = self._split[1]
            stripped = [repr(split.prefix)] if split.prefix else []
            if split.module_prefix:
                stripped.append(f"the LightningModule's attribute {split.module_prefix!r}")
            lines.append(f"model       {len(split.model)} tensors: {split.how}"
                         + (f", {' and '.join(stripped)} stripped" if stripped else ""))
            if split.optimizer_prefix:
                lines.append(f"optimizer   {split.optimizer_prefix}state.*")
            elif (beside := self._optimizer_folder()) is not None:
                lines.append(f"optimizer   {beside}, beside this folder")
            if split.others:
                left = ", ".join(f"{k}.* ({n} tensors)" for k, n in sorted(split.others.items()))
                lines.append(f"not merged  {left}")
        return lines

    def files(self) -> list[Path]:
        oc = self.optimizer_dcp()
        return list(self.checkpoint().files) + (list(oc.files) if oc is not None else [])

    def oracle(self, options: MergeOptions) -> Oracle:
        from .dcp_oracle import DcpOracle, DcpPair

        model = DcpOracle(self.path, self.split(options.key_prefix).model)  # optimizer sources keep their DCP keys
        oc = self.optimizer_dcp()
        return model if oc is None else DcpPair(model, DcpOracle(oc.folder), set(oc.tensors))
