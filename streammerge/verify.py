"""Verify: prove an output folder is complete and correct, reading everything in bounded chunks.

Without the checkpoint: every safetensors file opens with the Rust reader and its tensors tile the
data exactly, every file's checksum matches the manifest, and each index names exactly the tensors its
files hold. With the checkpoint: the merge is planned again from metadata and every output tensor is
compared with its source pieces, bit for bit (or with their cast, when a dtype was chosen); the zip
CRC32 of each source record is checked too, because torch.load never checks them. Tensors are
compared by a pool of threads while other threads stream the rank files once for their CRCs (which
also brings them into the page cache for the comparison); a safetensors file compared tensor by
tensor is not checksummed again, so each folder is read about once. Where the page cache cannot hold
the rank files, the streams' pages would be evicted before the comparison reads them: there the CRCs
are computed from the bytes the comparison reads, and the kernel is asked to read a bounded distance
ahead of it instead.

Nothing is fixed here and nothing is written: verify reports, the merge command repairs (rerun it).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import fnmatch
import functools
import itertools
import json
import math
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import architecture, dtypes, jsonfile
from .architecture import ArchCheck, critic_config
from .checksum import FELL_BACK as CRC_FELL_BACK
from .checksum import crc32
from .dtypes import DType
from .errors import CheckpointError, OutputError, StreammergeError
from .model_folder import DTYPE_KEYS
from .optimizer import OPTIMIZER_DIR, OPTIMIZER_PT
from .options import CHECKSUMS, LORA_MODES, MergeOptions, parse_size, resolve_dtype
from .paths import user_path, walk
from .plan import FilePlan, Piece, Plan, TensorPlan
from .sources import Source, model_folder, open_checkpoint
from .sources.base import Oracle, bytes_rows, open_checkpoint_file, pread_into, row_major
from .sources.hf import INDEX, SINGLE
from .sources.lora import ADAPTER_CONFIG
from .sources.picklescan import torch_load
from .sources.verl_oracle import zip_records
from .write.manifest import MANIFEST, STATE_DIR, Manifest, crc32_file, sha256_file
from .write.safetensors_format import CODE_DTYPES, read_header
from .write.transaction import foreign_loaded_files
from .write.writer import TMP_SUFFIX, _is_contiguous, piece_span, windows

if TYPE_CHECKING:
    import numpy as np
    import torch  # only comparing tensors with the checkpoint imports torch

    from .pipeline import MergePlan

MERGE_FIELDS = {f.name for f in dataclasses.fields(MergeOptions)} - set(MergeOptions.RUNTIME)

DEFAULT_CHUNK = 4 * 2**20
SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


@dataclass
class VerifyReport:
    """What verify checked and every problem it found; `ok` only when there are none."""

    out_dir: Path
    checkpoint: Path | None = None
    files_checked: set[str] = field(default_factory=set)  # relative paths
    tensors_checked: int = 0  # tensors compared with the checkpoint
    bytes_read: int = 0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def __repr__(self) -> str:
        return (f"VerifyReport({str(self.out_dir)!r}, ok={self.ok}, files={len(self.files_checked)}, "
                f"tensors={self.tensors_checked}, failures={len(self.failures)})")

    def summary(self) -> str:
        against = f", {self.tensors_checked} tensors compared with {self.checkpoint}" if self.checkpoint else ""
        head = (f"verify {self.out_dir}: {'OK' if self.ok else f'{len(self.failures)} problem(s)'} "
                f"({len(self.files_checked)} files checked{against})")
        return "\n".join([head] + [f"  note: {m}" for m in self.notes] + [f"  FAIL {m}" for m in self.failures])


def _open_given_checkpoint(checkpoint_dir: str | Path, out: Path) -> Source:
    """The checkpoint verify compares with; where it is not one but OUT is, the two were given the wrong way round."""
    try:
        return open_checkpoint(checkpoint_dir)
    except CheckpointError as e:
        given = user_path(checkpoint_dir).resolve()
        try:
            open_checkpoint(out)
        except StreammergeError:
            if given.is_dir() and model_folder(given):
                raise CheckpointError(f"{given}: a Hugging Face model folder, not the checkpoint {out} was merged "
                                      "from: give that checkpoint, or leave it out to check the folder against its "
                                      "manifest") from None
            raise e from None
        raise CheckpointError(f"{given} is not a checkpoint and {out} is one: the two are given the wrong way round; "
                              "the merged folder comes first (streammerge verify OUT_DIR CKPT_DIR)") from None


def verify(out_dir: str | Path, checkpoint_dir: str | Path | None = None, *, trust_pickle: bool = False,
           chunk_size: int | str = DEFAULT_CHUNK, workers: int | None = None,
           checksums: str = "auto", lora: str | None = None, lora_rank: int | None = None,
           lora_alpha: float | None = None, lora_rslora: bool | None = None,
           base_model: str | None = None, model_name: str | None = None,
           key_prefix: str | None = None) -> VerifyReport:
    """Check an output folder; given the checkpoint, check every tensor against its source pieces.

    Problems with the output are collected in the report (never raised); a checkpoint that cannot
    be read raises CheckpointError as the merge would. ``checksums`` says where veRL rank files' zip
    CRC-32s come from: ``"streams"`` read each file front to back beside the comparison (and bring it
    into the page cache for it), ``"compare"`` computes them from what the comparison reads, streaming
    only the records it did not read in order (for machines whose page cache cannot hold the rank
    files, where streams would have them read from disk twice); ``"auto"`` picks by the memory free.
    Other formats check their checksums after the comparison either way.

    ``lora``, ``lora_rank``, ``lora_alpha``, ``lora_rslora``, ``base_model``: a LoRA checkpoint's merge mode, the
    settings its files do not record and an adapter-only checkpoint's base weights, as the merge took them
    (``--lora adapter``, ``--lora-rank``, ``--base-model`` ...). A folder with a manifest
    is checked with those it records (one given that differs is a failure); one without is checked with these (a
    folder cannot tell whether its weights are the fold or the base as saved: without ``lora``, ``both``).
    ``model_name`` and ``key_prefix`` likewise: the config a merge took (a Megatron checkpoint's names come from it)
    and the DCP container it took the model from.
    """
    if checksums not in CHECKSUMS:
        raise ValueError(f"checksums must be one of {', '.join(CHECKSUMS)}, not {checksums!r}")
    if lora is not None and lora not in LORA_MODES:
        raise ValueError(f"lora must be one of {', '.join(LORA_MODES)}, not {lora!r}")
    out = user_path(out_dir).resolve()
    report = VerifyReport(out, user_path(checkpoint_dir).resolve() if checkpoint_dir else None)
    if not out.is_dir():
        report.fail(f"{out}: not a folder")
        return report
    chunk = max(4096, parse_size(chunk_size))
    workers = workers or _default_workers()
    arch = _start_architecture(out, report)  # first: a child importing transformers answers while the rest reads
    reading = None
    try:
        ck = _open_given_checkpoint(checkpoint_dir, out) if checkpoint_dir is not None else None
        # with the checkpoint, every tensor of a safetensors file is compared with its source: no checksum pass
        manifest = _check_manifest(out, report,
                                   checksum=lambda rel: checkpoint_dir is None or not rel.endswith(".safetensors"),
                                   against_checkpoint=ck is not None)
        if ck is not None:
            from .pipeline import absolute_folders, import_behind

            folders = absolute_folders(MergeOptions.create(base_model=base_model, model_name=model_name,
                                                           key_prefix=key_prefix))
            given = {"lora": lora, "lora_rank": lora_rank, "lora_alpha": lora_alpha, "lora_rslora": lora_rslora,
                     "base_model": folders.base_model, "model_name": folders.model_name, "key_prefix": key_prefix}
            reading = _start_reading(out, ck, manifest, report, trust_pickle=trust_pickle, workers=workers,
                                     checksums=checksums, lora={k: v for k, v in given.items() if v is not None},
                                     then=functools.partial(import_behind, *ck.oracle_modules))
        if ck is None and manifest is not None:
            _check_unlisted_files(out, manifest, report)
        _check_temp_files(out, report)
        headers = _check_safetensors(out, report)
        weight_maps = _check_indexes(out, headers, report)
        shapes = None
        if arch is not None:
            shapes = _weight_shapes(out, headers, weight_maps, report)
            if shapes is None:
                arch.close()
                arch = None
            else:
                arch.ready(sorted(shapes))  # the child places the names while the tensors are compared
        if ck is not None and reading is not None:
            report.checkpoint = ck.path
            _check_against_checkpoint(out, ck, reading, headers, report, chunk=chunk, workers=workers,
                                      weight_maps=weight_maps)
        if arch is not None and shapes is not None:
            _check_architecture(arch, shapes, report)
            _note_rounded_float32(arch, _loaded_map(out, headers, weight_maps) or {}, headers, report)
    finally:
        if reading is not None:
            reading.close()
        if arch is not None:
            arch.close()
    if CRC_FELL_BACK:  # the manifest's checksums and the rank files' zip CRCs alike
        report.notes.append(f"CRC-32s: {CRC_FELL_BACK}")
    return report


# ---------------------------------------------------------------- the output folder alone

def _rel(out: Path, path: Path) -> str:
    return path.relative_to(out).as_posix()


def _output_files(out: Path, pattern: str) -> list[Path]:
    return sorted(p for p in walk(out) if fnmatch.fnmatch(p.name, pattern) and p.is_file()
                  and STATE_DIR not in p.relative_to(out).parts)


def _check_manifest(out: Path, report: VerifyReport, checksum: Callable[[str], bool] = lambda rel: True, *,
                    against_checkpoint: bool = False) -> dict | None:
    try:
        manifest = Manifest.read(out)
    except OutputError as e:
        report.fail(str(e))
        return None
    if manifest is None and against_checkpoint:  # every file is compared with what the checkpoint gives instead
        report.notes.append(f"no manifest: {out} has no {STATE_DIR}/{MANIFEST} (not written by streammerge, or that "
                            "folder was removed): file checksums are not checked; every tensor is compared with the "
                            "checkpoint in whichever of the folder's files holds it, config.json and "
                            "generation_config.json as data, other small files where the folder has them")
        return None
    if manifest is None:
        report.fail(f"{out}: no {STATE_DIR}/{MANIFEST}: not a streammerge output, or its merge never started "
                    "(file checksums cannot be checked); give the checkpoint too (streammerge verify OUT CKPT) to "
                    "compare every tensor with it")
        return None
    try:
        recorded_options(manifest.get("options"), trust_pickle=False)
    except (ValueError, TypeError) as e:  # verify re-plans with them: compared as a folder without them instead
        report.fail(f"{out / STATE_DIR / MANIFEST}: records options no merge takes ({str(e)[:120]}): a damaged or "
                    "edited manifest; merge again into a new folder")
        manifest = {**manifest, "options": None}
    if not manifest.get("complete"):
        report.fail(f"{out}: the merge did not finish; rerun the same merge command to resume")
    for rel, entry in manifest.get("files", {}).items():
        path = out / rel
        report.files_checked.add(rel)
        if not path.is_file():
            report.fail(f"{rel}: listed in the manifest but missing")
            continue
        size = path.stat().st_size
        if size != entry.get("size"):
            report.fail(f"{rel}: {size} bytes, the manifest says {entry.get('size')} (changed after it was written)")
            continue
        if not checksum(rel):
            continue
        report.bytes_read += size
        if entry.get("crc32") is not None and type(entry["crc32"]) is not int:
            report.fail(f"{rel}: the manifest records crc32 {str(entry['crc32'])[:20]!r}, not a number (a damaged or "
                        "edited manifest)")
        elif entry.get("crc32") is not None:
            crc = crc32_file(path)
            if crc != entry["crc32"]:
                report.fail(f"{rel}: crc32 {crc:08x} differs from the manifest's {entry['crc32']:08x} "
                            "(changed after it was written)")
        elif entry.get("sha256") is not None:
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                report.fail(f"{rel}: sha256 {digest[:16]}... differs from the manifest's "
                            f"{str(entry['sha256'])[:16]}... (changed after it was written)")
        else:
            report.fail(f"{rel}: the manifest records no checksum for it")
    return manifest


def _check_temp_files(out: Path, report: VerifyReport) -> None:
    leftovers = [p for p in walk(out) if p.name.endswith(TMP_SUFFIX)]
    leftovers += [p for p in [out / STATE_DIR / "manifest.tmp"] if p.exists()]
    for p in sorted(leftovers):
        report.fail(f"{_rel(out, p)}: temporary file left by an interrupted merge; rerun the merge to finish")


@dataclass(frozen=True)
class _Entry:
    dtype: DType
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class _Header:
    path: Path
    data_start: int
    entries: dict[str, _Entry]


def _check_safetensors(out: Path, report: VerifyReport) -> dict[str, _Header]:
    """Every safetensors file: header parses, tensors tile the data exactly, the Rust reader agrees."""
    from safetensors import safe_open

    headers: dict[str, _Header] = {}
    for path in _output_files(out, "*.safetensors"):
        rel = _rel(out, path)
        report.files_checked.add(rel)
        try:
            raw, data_start = read_header(str(path))
            if not isinstance(raw, dict):
                raise ValueError("the header is not a JSON object")
        except (ValueError, OSError) as e:
            report.fail(f"{rel}: unreadable safetensors header ({e})")
            continue
        entries: dict[str, _Entry] = {}
        problems_before = len(report.failures)
        meta = raw.get("__metadata__")
        if "/" not in rel and not (isinstance(meta, dict) and meta.get("format") == "pt"):
            report.fail(f"{rel}: header metadata lacks format 'pt' (transformers refuses to load such weights)")
        for name, info in raw.items():
            if name == "__metadata__":
                continue
            try:
                dtype = CODE_DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                report.fail(f"{rel}: tensor {name!r} has a malformed header entry {info!r:.100}")
                continue
            need = math.prod(shape) * dtype.itemsize
            if end - begin != need:
                report.fail(f"{rel}: tensor {name!r} spans {end - begin} bytes, its dtype and shape need {need}")
            entries[name] = _Entry(dtype, shape, begin, end)
        data_len = path.stat().st_size - data_start
        pos, prev = 0, None
        for name, entry in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
            if entry.begin > pos:
                report.fail(f"{rel}: data bytes [{pos}, {entry.begin}) belong to no tensor")
            elif entry.begin < pos:
                report.fail(f"{rel}: tensors {prev!r} and {name!r} overlap")
            pos, prev = max(pos, entry.end), name
        if pos > data_len:
            report.fail(f"{rel}: truncated: tensor {prev!r} ends at data byte {pos}, the file has {data_len}")
        elif pos < data_len:
            report.fail(f"{rel}: {data_len - pos} bytes after the last tensor belong to no tensor")
        try:
            with safe_open(str(path), framework="numpy") as f:  # headers only: numpy's takes every dtype
                keys = set(f.keys())
                if keys != set(entries):
                    report.fail(f"{rel}: the safetensors reader sees tensors {sorted(keys ^ set(entries))[:3]} "
                                "differently")
                for name in keys & set(entries):
                    sl = f.get_slice(name)
                    if tuple(sl.get_shape()) != entries[name].shape:
                        report.fail(f"{rel}: the safetensors reader reads {name!r} with shape {sl.get_shape()}")
        except Exception as e:  # SafetensorError is not importable as one type
            report.fail(f"{rel}: the safetensors reader rejects the file ({str(e)[:200]})")
        if len(report.failures) == problems_before:
            headers[rel] = _Header(path, data_start, entries)
    return headers


def _bad_weight_map(weight_map: object, base: Path) -> str | None:
    """Why a weight map is not names -> file names beside its index (a path that leaves the folder), or None."""
    if not isinstance(weight_map, dict):
        return f"weight_map is a {type(weight_map).__name__}, not an object"
    for name, filename in weight_map.items():
        if not isinstance(filename, str):
            return f"{name!r} maps to {repr(filename)[:40]}, not a file name"
        if "\0" in filename:
            return f"{name!r} maps to {filename!r}, which no file is named"
        if ".." in Path(filename).parts or not (base / filename).resolve().is_relative_to(base.resolve()):
            return f"{name!r} maps to {filename!r}, outside the folder"
    return None


def _check_indexes(out: Path, headers: dict[str, _Header], report: VerifyReport) -> dict[str, dict]:
    """Each index names exactly the tensors its files hold; no shard file goes unnamed. Returns each readable
    index's weight map by its relative path."""
    named: set[str] = set()
    weight_maps: dict[str, dict] = {}
    checked = {_rel(out, p) for p in _output_files(out, "*.safetensors")}  # what _check_safetensors read
    for index in _output_files(out, "*.safetensors.index.json"):
        irel = _rel(out, index)
        report.files_checked.add(irel)
        try:
            data = jsonfile.loads(index.read_text())
            weight_map = data["weight_map"]
            total = data.get("metadata", {}).get("total_size")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            report.fail(f"{irel}: unreadable index ({e})")
            continue
        base = index.parent
        bad = _bad_weight_map(weight_map, base)
        if bad:
            report.fail(f"{irel}: unreadable index ({bad})")
            continue
        weight_maps[irel] = weight_map
        by_file: dict[str, set[str]] = {}
        for name, filename in weight_map.items():
            by_file.setdefault(filename, set()).add(name)
        size = 0
        for filename, names in sorted(by_file.items()):
            frel = _rel(out, base / filename)
            named.add(frel)
            header = headers.get(frel)
            if header is None:
                if not (base / filename).is_file():
                    report.fail(f"{irel}: names {filename}, which does not exist")
                elif frel not in checked:  # config.json, a file in .streammerge/: transformers would read it as weights
                    report.fail(f"{irel}: names {filename}, which is not one of the folder's safetensors files")
                continue  # unreadable files are reported by their own check
            held = set(header.entries)
            for name in sorted(names - held)[:5]:
                report.fail(f"{irel}: maps {name!r} to {filename}, which does not hold it")
            for name in sorted(held - names)[:5]:
                report.fail(f"{frel}: holds {name!r}, which {irel} does not map to it")
            size += sum(e.end - e.begin for e in header.entries.values())
        prefix = index.name[: -len(".safetensors.index.json")]
        for path in sorted(base.glob(f"{prefix}*.safetensors")):
            if _rel(out, path) not in named:
                report.fail(f"{_rel(out, path)}: not named by {irel}")
        if total is not None and all(_rel(out, base / f) in headers for f in by_file) and total != size:
            report.fail(f"{irel}: total_size {total} but its files hold {size} bytes of tensors")
    for rel in headers:
        if rel not in named and SHARD_NAME.search(rel):
            report.fail(f"{rel}: a shard file that no index names")
    return weight_maps


# ---------------------------------------------------------------- what transformers builds from config.json

def _start_architecture(out: Path, report: VerifyReport) -> ArchCheck | None:
    """Start asking transformers which tensors OUT's config.json describes (architecture.py: a child, the cache or
    this process); a folder it cannot be asked about gets a note, one without config.json nothing."""
    try:
        arch, note = architecture.start_folder(out)
    except StreammergeError as e:  # a config.json that is no JSON object: transformers cannot load the folder
        report.fail(f"{e}; rerun the merge to write it again")
        return None
    if note:
        report.notes.append(note)
    return arch


def _torch_file_header(path: Path, rel: str, plan: Plan, fp: FilePlan, report: VerifyReport) -> _Header | None:
    """Where each tensor of a torch.save file (optimizer.pt) lies, as torch's own reader finds it (the pickle read onto
    the meta device), so that its records are compared with the checkpoint as a safetensors file's tensors are."""
    from .write.torch_format import _record_offsets

    try:
        offsets = _record_offsets(path, {n: plan.tensors[n] for n in fp.names})
    except Exception as e:  # noqa: BLE001  (torch's reader refuses a damaged file in many ways)
        report.fail(f"{rel}: torch.load cannot read where its tensors lie ({(str(e).splitlines() or [''])[0][:160]})")
        return None
    entries = {}
    for offset, t in offsets:
        assert isinstance(t, TensorPlan)
        entries[t.name] = _Entry(t.dtype, t.shape, offset, offset + t.numel * t.dtype.itemsize)
    return _Header(path, 0, entries)


def _check_torch_pickle(path: Path, rel: str, plan: Plan, fp: FilePlan, report: VerifyReport) -> None:
    """A torch.save file of ours (optimizer.pt) holds exactly what the merge pickles besides the tensors' bytes (which
    are compared record by record): the param groups (lr, betas, ...), the non-tensor state, the nesting, each
    tensor's shape and dtype. Its pickle is what load_optimizer_state_dict returns, and the records' comparison
    does not see it."""
    import torch

    from .optimizer.export import nest

    try:
        groups = jsonfile.loads(plan.index_metadata["param_groups"])
        values = jsonfile.loads(plan.index_metadata.get("state_values", "{}"))
        want = nest({**{n: torch.empty(plan.tensors[n].shape, dtype=plan.tensors[n].dtype.torch(), device="meta")
                        for n in fp.names}, **values}, groups)
        got = torch_load(path, map_location="meta", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch's reader refuses a damaged file in many ways)
        first = (str(e).splitlines() or [""])[0][:160]
        report.fail(f"{rel}: torch.load cannot read it as the merge writes it ({first})")
        return
    storages: list[object] = []
    try:
        differs = _pickled(got, storages) != _pickled(want, [])
    except RecursionError:
        report.fail(f"{rel}: its pickle nests deeper than anything the merge writes; rerun the merge to write it again")
        return
    if differs:
        report.fail(f"{rel}: its pickle differs from what the merge writes (param groups, non-tensor state, nesting, "
                    "or where a tensor lies in its record); rerun the merge to write it again")
    elif len(set(storages)) != len(storages):
        report.fail(f"{rel}: tensors share one record (the merge writes one record for each); rerun the merge to "
                    "write it again")


def _pickled(v: object, storages: list[object]) -> str:
    """JSON text of what a torch.save file holds, tuples apart from lists, each tensor as its dtype, shape, strides,
    offset in its record and the record's size (the comparison reads each record from its first byte, row-major:
    a tensor that starts later or reads it in another order is other values). `storages`: each tensor's record."""
    import torch

    def plain(x: object) -> object:
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            storages.append(getattr(storage, "_checkpoint_offset", None) or id(storage))
            return ["<tensor>", str(x.dtype), list(x.shape), list(x.stride()), x.storage_offset(), storage.nbytes()]
        if isinstance(x, dict):
            return {repr(k): plain(y) for k, y in x.items()}
        if isinstance(x, tuple):
            return ["<tuple>", *(plain(y) for y in x)]
        if isinstance(x, list):
            return [plain(y) for y in x]
        return ["<" + type(x).__name__ + ">", repr(x)]

    return json.dumps(plain(v), sort_keys=True)


def _check_header_bytes(path: Path, rel: str, want: bytes, report: VerifyReport) -> None:
    """A file of ours has exactly the header the merge writes (as save_file would): tensor order, offsets and
    metadata, which a comparison tensor by tensor does not see."""
    try:
        with open(path, "rb") as f:
            got = f.read(len(want))
    except OSError as e:
        report.fail(f"{rel}: unreadable ({e.strerror or e})")
        return
    if got != want:
        report.fail(f"{rel}: its header is not the one the merge writes (tensor order, offsets or metadata differ); "
                    "rerun the merge to write it again")


def _loaded_map(out: Path, headers: dict[str, _Header], weight_maps: dict[str, dict]) -> dict[str, str] | None:
    """Name -> file of the tensors transformers loads with config.json: model.safetensors where there is one, else the
    files its index names (its order); None where neither can be read (a file that failed the checks above)."""
    if (out / SINGLE).is_file():
        return {name: SINGLE for name in headers[SINGLE].entries} if SINGLE in headers else None
    weight_map = weight_maps.get(INDEX)
    return dict(weight_map) if isinstance(weight_map, dict) else None


def _weight_shapes(out: Path, headers: dict[str, _Header], weight_maps: dict[str, dict],
                   report: VerifyReport) -> dict[str, tuple[int, ...]] | None:
    """The names and shapes of the tensors transformers loads (`_loaded_map`); None, with a note, where some of them
    failed the checks above."""
    loaded = _loaded_map(out, headers, weight_maps)
    try:
        if loaded is None:
            raise KeyError(SINGLE)
        return {name: headers[file].entries[name].shape for name, file in loaded.items()}
    except (KeyError, TypeError, AttributeError):
        report.notes.append("architecture check skipped: the weights' files failed the checks above")
        return None


def _check_architecture(arch: ArchCheck, shapes: dict[str, tuple[int, ...]], report: VerifyReport) -> None:
    """The model transformers builds from config.json must have exactly these tensors; a critic's config names its
    value-head class already (the merge writes it so)."""
    found = arch.verdict(shapes, held_by="folder")
    if found.critic is not None:
        report.fail(f"{found.problem}: transformers would load them as the class config.json names, without the "
                    f"value head; config.json needs architectures [{found.critic!r}] and one label (rerun the merge "
                    "to write it so)")
    elif found.problem and found.file != "config.json":
        report.fail(f"{found.file}: {found.problem}; fix or remove it (rerun the merge to write it again)")
    elif found.problem:
        report.fail(f"config.json: {found.problem}; put the weights' own config.json there (rerun the merge, with "
                    "--model-name where the checkpoint's config is not the model's)")
    else:
        report.notes.append(found.note)


def _note_rounded_float32(arch: ArchCheck, loaded: dict[str, str], headers: dict[str, _Header],
                          report: VerifyReport) -> None:
    """Tensors transformers keeps in float32 in the half-precision model config.json names, held in that half dtype
    here: they load upcast with rounded values. A merge writes them in float32 unless told otherwise (float32_names),
    so a folder without a manifest may hold them either way: a note, not a failure."""
    half = resolve_dtype("auto", arch.config)
    rules = (arch.answer or {}).get("fp32")
    if half not in (dtypes.bfloat16, dtypes.float16) or not isinstance(rules, dict):
        return
    held = {name: headers[file].entries[name].dtype for name, file in loaded.items()
            if file in headers and name in headers[file].entries}
    rounded = sorted(n for n in architecture.kept_in_float32(held, rules, half.name) if held[n] == half)
    if rounded:
        report.notes.append(f"{len(rounded)} tensors transformers keeps in float32 in a {half.name} model are "
                            f"{half.name} here ({rounded[0]}{', ...' if len(rounded) > 1 else ''}): they load upcast "
                            "with rounded values; a merge writes them in float32 unless given float32_names")


# ---------------------------------------------------------------- against the checkpoint

def recorded_options(recorded: dict | None, *, trust_pickle: bool, folder: dict | None = None) -> MergeOptions:
    """The options the merge ran with, as its manifest records them; without one, what the folder shows (`folder`,
    see `_folder_options`) over the defaults, keeping dtypes."""
    fields = {k: v for k, v in (recorded or {}).items() if k in MERGE_FIELDS}
    if not recorded:
        fields = {"dtype": "keep", **(folder or {})}
    fields.setdefault("float32_names", ())  # never asked again: a merge records the names it kept in float32
    return MergeOptions.create(**{**fields, "trust_pickle": trust_pickle})


def _folder_options(out: Path) -> tuple[dict, str]:
    """Without a manifest (a folder another tool wrote, or one whose .streammerge/ was removed): the options a merge
    into this folder had, as far as the folder shows them: the one floating-point dtype of its weights, and whether
    it holds an optimizer export. Returns them with the words for the report's note."""
    by_dtype: dict[DType, list[str]] = {}
    for path in sorted(out.glob("*.safetensors")):
        try:
            raw, _ = read_header(str(path))
        except (ValueError, OSError):
            continue  # the header check reports it
        for name, e in raw.items() if isinstance(raw, dict) else ():
            d = CODE_DTYPES.get(str(e.get("dtype"))) if name != "__metadata__" and isinstance(e, dict) else None
            if d is not None and d.is_floating_point:
                by_dtype.setdefault(d, []).append(name)
    floats = set(by_dtype)
    fields: dict = {"optimizer": (out / OPTIMIZER_DIR).is_dir()}
    words = [] if fields["optimizer"] else [f"without {OPTIMIZER_DIR}/ (the folder has none)"]
    half = floats - {dtypes.float32}
    if len(floats) == 2 and dtypes.float32 in floats and half <= {dtypes.bfloat16, dtypes.float16}:
        # a half-precision merge that kept what transformers keeps in float32 (pipeline.keep_float32)
        fields["dtype"] = next(iter(half)).name
        fields["float32_names"] = by_dtype[dtypes.float32]
        words.insert(0, f"cast to {fields['dtype']} but for the {len(by_dtype[dtypes.float32])} tensors it holds in "
                        "float32")
    elif len(floats) == 1:
        fields["dtype"] = next(iter(floats)).name
        words.insert(0, f"cast to {fields['dtype']} (its weights' one floating-point dtype)")
    else:
        words.insert(0, "dtypes as saved")
    return fields, "compared as a merge " + ", ".join(words) + ", tensor by tensor wherever the folder holds them"


def _with_flags(options: MergeOptions, given: dict, manifest: dict | None, report: VerifyReport) -> MergeOptions:
    """verify's --lora/--lora-rank/--lora-alpha/--lora-rslora/--base-model/--model-name/--key-prefix: the options
    of a folder without a manifest; with one, they must be what it records (the merge's own). A LoRA flag the merge
    ran without is held to what the checkpoint's files gave it, once the plan says
    (`_check_flags_the_merge_ran_without`)."""
    if not given:
        return options
    if manifest is None:
        return options.replace(**given)
    for key, value in given.items():
        ran = getattr(options, key)
        flag = "--" + key.replace("_", "-")
        if key == "key_prefix" and ran is not None:  # "model" and "model." name one container
            ran, value = ran.rstrip("."), value.rstrip(".")
        if ran is not None and ((ran != value) if isinstance(value, str) else (float(ran) != float(value))):
            report.fail(f"{flag} {value}: the merge ran with {flag} {ran} (.streammerge/manifest.json); the folder is "
                        "checked as it was made: leave the flag out, or merge again with it")
        elif ran is None and key in _NOT_LORA:
            report.fail(f"{flag} {value}: the merge ran without it (.streammerge/manifest.json); the folder is checked "
                        "as it was made: leave the flag out, or merge again with it")
    return options


_NOT_LORA = ("model_name", "key_prefix")  # verify's flags for what any checkpoint's merge may have been given


_PLANNED = {"lora_rank": "r", "lora_alpha": "alpha", "lora_rslora": "rslora"}  # a flag -> the plan's LoRA setting


def _check_flags_the_merge_ran_without(ck: Source, options: MergeOptions, given: dict, plan: MergePlan,
                                       report: VerifyReport) -> None:
    """A LoRA flag for a checkpoint without an adapter is refused as the merge refuses it; one the merge ran without
    must equal what the checkpoint's files gave (lora_train_meta.json, adapter_config.json)."""
    from .pipeline import refuse_lora_options

    given = {k: v for k, v in given.items() if k not in _NOT_LORA}
    if not given:
        return
    if plan.lora is None:
        refuse_lora_options(ck, options.replace(**given))
        return
    for key, value in given.items():
        if getattr(options, key) is not None:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "base_model":
            report.notes.append(f"{flag} {value}: not used; the checkpoint holds its own base weights, which the "
                                "merge folded onto")
            continue
        used = plan.lora.get(_PLANNED[key])
        if used is None or (float(used) != float(value)):
            report.fail(f"{flag} {value}: the merge used {used} (from the checkpoint's files); the folder is checked "
                        "as it was made: leave the flag out")
        else:
            report.notes.append(f"{flag} {value}: as the checkpoint's files give it (the merge took it from there)")


@dataclass
class _Reading:
    """What verify starts before anything else, so the disk is busy from the first moment: the plan, the oracle,
    and either the rank files' CRC streams or the readahead of the comparison's first bytes."""

    options: MergeOptions
    manifest: dict | None
    oracle: Oracle | None
    paths: list[Path]
    plan: MergePlan | None = None
    crc_pool: ThreadPoolExecutor | None = None
    integrity: list[Future[list[str]]] = field(default_factory=list)
    readahead: _Readahead | None = None

    def close(self) -> None:
        if self.readahead is not None:
            self.readahead.close()
        if self.oracle is not None:
            self.oracle.close()  # first: a verify stopped by an error need not wait for the streams to end
        if self.crc_pool is not None:
            self.crc_pool.shutdown(wait=True, cancel_futures=True)


def _start_reading(out: Path, ck: Source, manifest: dict | None, report: VerifyReport, *, trust_pickle: bool,
                   workers: int, checksums: str, then: Callable[[], None], lora: dict | None = None) -> _Reading:
    """Plan, make the oracle, start the CRC streams or the readahead, and call `then` (torch's import) as soon as
    the disk has work queued. Not before: where Python keeps no compiled bytecode, compiling torch's modules holds
    the GIL for seconds, and no other thread can start anything meanwhile."""
    from .pipeline import plan_merge

    folder = None
    if manifest is None:
        folder, note = _folder_options(out)
        report.notes.append(f"no manifest: {note}")
    options = recorded_options((manifest or {}).get("options"), trust_pickle=trust_pickle, folder=folder)
    options = _with_flags(options, lora or {}, manifest, report)
    reading = _Reading(options, manifest, None if ck.oracle_after_plan else ck.oracle(options), list(ck.files()))
    as_read = False  # the CRC-32s come from the comparison's reads (see _streams)
    try:
        oracle, paths = reading.oracle, reading.paths
        if oracle is not None and getattr(oracle, "thread_safe", False):
            # The small reads the planner and torch.load make go first: behind the streams or the readahead each
            # would wait its turn.
            oracle.prefetch()
            if _streams(checksums, paths, report, oracle):
                # The CRC streams need neither the plan nor torch, so they start first.
                reading.crc_pool = ThreadPoolExecutor(max(1, min(len(paths), workers)),
                                                      thread_name_prefix="streammerge-crc")
                reading.integrity = [reading.crc_pool.submit(oracle.check_integrity, [path]) for path in paths]
            else:
                as_read = True
        if not as_read:
            then()
        reading.plan = plan_merge(ck, options, check_architecture=False)
        if lora and manifest is not None:
            _check_flags_the_merge_ran_without(ck, options, lora, reading.plan, report)
        if as_read:  # the first tensors' bytes are on their way while torch is imported and each file loaded
            reading.readahead = _Readahead([t for p in reading.plan.plans for t in p.tensors.values()])
            then()
        return reading
    except BaseException:
        reading.close()
        raise


def _check_against_checkpoint(out: Path, ck: Source, reading: _Reading, headers: dict[str, _Header],
                              report: VerifyReport, *, chunk: int, workers: int,
                              weight_maps: dict[str, dict]) -> None:
    oracle, readahead, merge_plan = reading.oracle, reading.readahead, reading.plan
    assert merge_plan is not None
    sources = _Sources(chunk)
    own_reader = 0
    tasks: list[Callable[[], None]] = []
    lock = threading.Lock()
    serial: threading.Lock | None = None  # for oracles not made for threads

    def compare(rel: str, header: _Header, entry: _Entry, name: str, t: TensorPlan, with_oracle: bool) -> None:
        if readahead is not None:
            readahead.reached(t)
        try:
            if with_oracle:
                assert oracle is not None
                with serial or contextlib.nullcontext():
                    _compare_with_oracle(rel, header, entry, t, oracle, report, chunk)
                    oracle.release(t)
            else:
                _compare_tensor(rel, header, entry, name, t, sources, report, chunk)
        except OSError as e:
            report.fail(f"{rel}: tensor {name!r}: cannot read its source ({e})")
        with lock:
            report.tensors_checked += 1

    pool = None
    torch_threads = 0
    try:
        plans = merge_plan.plans
        same_merge = reading.manifest is None or merge_plan.fingerprint() == reading.manifest.get("fingerprint")
        if not same_merge:
            report.fail(f"{out}: was not made from {ck.path} with the options it records (its plan fingerprint "
                        "differs); tensors are compared one by one below")
        if ck.oracle_after_plan:
            oracle = reading.oracle = ck.oracle(reading.options)
        # an adapter's base model is found by planning it
        base = ck.lora_base.oracle(reading.options) if ck.lora_base is not None else None
        if oracle is not None and base is not None:
            from .sources.hf import CombinedOracle

            oracle = reading.oracle = CombinedOracle(oracle, base)
        if oracle is None:
            report.notes.append(f"{ck.format}: no reader independent of the merge's own; tensors are compared with "
                                "the bytes the merge's reader locates")
        elif not getattr(oracle, "thread_safe", False):
            serial = threading.Lock()
        if oracle is not None:
            oracle.load_all()
        import torch

        torch_threads = torch.get_num_threads()  # set back when the comparing threads are done
        pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="streammerge-verify",
                                  initializer=_one_torch_thread)
        _check_small_files(out, merge_plan, reading.manifest, report, same_merge=same_merge)
        own_layout = reading.manifest is None  # a folder another tool wrote: its own files, its own tie copies
        for p in plans:
            expected_files = {p.rel(fp.filename): fp for fp in p.files}
            mine = sorted(r for r in headers if (r.startswith(p.subdir + "/") if p.subdir else "/" not in r))
            if own_layout and p.subdir == OPTIMIZER_DIR:  # else the index is compared byte for byte
                _check_optimizer_groups(out, p, report)
            if own_layout and not mine and p.subdir:
                pt = p.subdir == OPTIMIZER_DIR and (out / OPTIMIZER_DIR / OPTIMIZER_PT).is_file()
                report.notes.append(f"{OPTIMIZER_DIR}/{OPTIMIZER_PT}: without a manifest only its param groups are "
                                    "compared" if pt else f"{p.subdir}/: not in the folder (a merge would write it)")
                continue
            for rel, fp in expected_files.items():
                if rel not in headers and not (out / rel).is_file():
                    if not own_layout:
                        report.fail(f"{rel}: missing (the checkpoint's plan has it)")
                elif rel.endswith(".pt") and not own_layout:  # torch's format (--optimizer-format torch): its records
                    torch_file = _torch_file_header(out / rel, rel, p, fp, report)
                    if torch_file is not None:
                        headers[rel] = torch_file
                        _check_torch_pickle(out / rel, rel, p, fp, report)
                elif not rel.endswith(".safetensors"):
                    report.notes.append(f"{rel}: not a safetensors file; checked against the manifest's checksum only")
                elif not own_layout:  # the tensors are compared below; the header says where each one lies
                    _check_header_bytes(out / rel, rel, fp.layout.header, report)
            loaded = _loaded_map(out, headers, weight_maps) if own_layout and not p.subdir else None
            if loaded is not None:  # compared are the tensors transformers loads, where it finds them
                files = set(loaded.values())
                for rel in sorted(set(mine) - files):
                    report.notes.append(f"{rel}: not a file transformers loads from this folder; not compared")
                mine = [rel for rel in mine if rel in files]
                where = {name: rel for name, rel in loaded.items() if rel in headers}
            elif own_layout:
                where = {name: rel for rel in reversed(mine) for name in headers[rel].entries}
            else:
                where = {name: rel for rel, fp in expected_files.items() for name in fp.names}
            # a tie the config made (not shared storage) is checked as the trained output embedding: its source
            # against the input embedding written in its place, or against the copy a folder of another tool holds
            checks = [(name, t, name) for name, t in p.tensors.items()]
            copies = {name for name in p.tie_checks if own_layout and name in where}
            checks += [(name, t, name if name in copies else p.dropped[name]) for name, t in p.tie_checks.items()]
            for rel in mine:
                extra = sorted(set(headers[rel].entries) - set(p.tensors) - copies)
                for name in [n for n in extra if n in merge_plan.buffers and not p.subdir][:1]:
                    report.notes.append(f"{rel}: holds {name!r} (and any like it), a buffer older transformers saved, "
                                        "which transformers does not read (a merge leaves it out); not compared")
                for name in [n for n in extra if n not in merge_plan.buffers or p.subdir][:5]:
                    report.fail(f"{rel}: holds {name!r}, which the checkpoint does not have")
            for name, t, written in checks:
                rel = where.get(written, "")
                header = headers.get(rel) if rel else None
                if header is None:
                    if own_layout:  # its map holds only what its readable files hold: the tensor is in none
                        report.fail(f"{written!r}: in none of the folder's files (the checkpoint has it)")
                    continue  # else a missing or broken file: reported above
                entry = header.entries.get(written)
                if entry is None:
                    report.fail(f"{rel}: lacks tensor {written!r}")
                    continue
                if entry.dtype != t.dtype or entry.shape != t.shape:
                    report.fail(f"{rel}: tensor {name!r} is {_short(entry.dtype)} {list(entry.shape)}, "
                                f"the checkpoint gives {_short(t.dtype)} {list(t.shape)}")
                    continue
                if oracle is not None and _oracle_can_read(oracle, t, rel, report):
                    tasks.append(functools.partial(compare, rel, header, entry, name, t, True))
                elif t.fold is None:
                    own_reader += 1
                    tasks.append(functools.partial(compare, rel, header, entry, name, t, False))
                else:
                    report.fail(f"{rel}: tensor {name!r}: a LoRA fold that no independent reader can check")
                    report.tensors_checked += 1
        for done in [pool.submit(task) for task in tasks]:
            done.result()
        if readahead is not None and readahead.refused:
            report.notes.append(f"the comparison read the rank files without readahead: {readahead.refused}")
        if oracle is not None:
            # copies the comparison did not read are compared first: their CRC-32s can then come from those reads
            diverged = oracle.disagreements()
            problems = ([m for fut in reading.integrity for m in fut.result()] if reading.crc_pool
                        else oracle.check_integrity(reading.paths))
            if oracle.crc_from_reads:
                report.notes.append(f"{oracle.crc_from_reads} zip records' CRC-32s were computed from the bytes the "
                                    f"comparison read; {oracle.crc_streamed} were streamed")
            slow = oracle.crc_by_slow_reader()
            if slow:
                report.notes.append(f"{sum(slow.values())} zip records' CRC-32s were read through Python's zip reader, "
                                    "not streamed: " + ", ".join(f"{n} {why}" for why, n in sorted(slow.items())))
            for problem in problems + diverged:
                report.fail(problem)
            if own_reader:
                report.notes.append(f"{own_reader} tensors (e.g. FSDP1 flat optimizer state) were compared through "
                                    "the merge's own reader: torch's loader has no tensor of that shape to compare")
        else:
            sources.finish_crcs(report)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(torch_threads)
        sources.close()


def _check_small_files(out: Path, merge_plan: MergePlan, manifest: dict | None, report: VerifyReport, *,
                       same_merge: bool) -> None:
    """config.json, generation_config.json, the tokenizer's files, the indexes, an adapter's config: byte for byte
    what the merge writes from the checkpoint (the manifest's checksums only say they are as the merge left them)."""
    listed = (manifest or {}).get("files", {})
    own_layout = manifest is None  # a folder another tool wrote: its index is its own, its files formatted its way
    if own_layout and merge_plan.config is None and (out / "config.json").is_file():
        report.notes.append("config.json and the tokenizer: not compared (the checkpoint has none, and without a "
                            "manifest the --model-name a merge took them from is unknown)")
    for rel in sorted(set(merge_plan.small) | (set() if own_layout else set(merge_plan.indexes))):
        path = out / rel
        if not path.is_file():
            if own_layout and rel in CONFIG_FILES:  # transformers reads none: it loads no model, or generates otherwise
                report.fail(f"{rel}: not in the folder, and the checkpoint gives one, which transformers reads with "
                            "these weights; rerun the merge to write it")
            elif own_layout:
                report.notes.append(f"{rel}: not in the folder (a merge would write it)")
            elif rel not in listed:  # else the manifest check said so
                report.fail(f"{rel}: missing (the checkpoint's plan writes it)")
            continue
        try:
            want = merge_plan.contents(rel)
        except OSError as e:
            report.fail(f"{rel}: cannot read what the checkpoint gives for it ({e})")
            continue
        got = path.read_bytes()
        report.files_checked.add(rel)
        report.bytes_read += len(got)
        if got != want and rel == "config.json":
            want = _as_critic(got, merge_plan) or want
        strict = rel in CONFIG_FILES  # what the model is and how it generates: never a note
        if rel == "config.json" and own_layout and merge_plan.dtype is not None:
            named = _named_dtype(got)
            if named is not None and named != merge_plan.dtype.name:
                report.fail(f"config.json: names the dtype {named}, but the weights are {merge_plan.dtype.name}: "
                            "transformers would load them cast to it, not as they are")
                continue
        if got != want and own_layout and _same_data(got, want, strict=strict):
            continue
        if got != want and own_layout and rel.endswith(ADAPTER_CONFIG):  # another writer's keys aside, the adapter's
            strict = not _same_data(got, want, strict=False, keys=ADAPTER_KEYS)
        if got != want:
            why = _first_difference(got, want)
            if own_layout and not strict:
                report.notes.append(f"{rel}: differs from the checkpoint's ({why})")
                continue
            report.fail(f"{rel}: differs from what the merge writes from the checkpoint ({why}); rerun the merge to "
                        "write it again")
    planned = {*merge_plan.small, *merge_plan.indexes, *(p.rel(f.filename) for p in merge_plan.plans for f in p.files)}
    # a rerun removes such a file only where it is still the same merge; where the checkpoint now plans another one
    # (its optimizer files gone, say), a rerun into this folder is refused
    advice = "rerun the merge to remove it" if same_merge else \
        "the checkpoint no longer plans the merge this folder holds: merge it into a new folder"
    for rel in sorted(set(listed) - planned - {"README.md"}):  # a push's card: noted below
        report.fail(f"{rel}: an earlier run of this merge wrote it, and the checkpoint no longer gives it; {advice}")
    if not own_layout:  # a folder of ours: a file a loader reads that the merge did not write changes what loads
        for rel in foreign_loaded_files(out, planned | set(listed)):
            report.fail(f"{rel}: not written by the merge (its plan has no such file), and transformers, the "
                        "tokenizer or load_optimizer_state_dict may read it; remove it")
    else:  # another tool's folder may hold files of its own (save_pretrained's generation_config.json): told of
        extra = [rel for rel in foreign_loaded_files(out, planned)
                 if not rel.endswith((".safetensors", ".safetensors.index.json"))]  # compared wherever they are
        if extra:
            report.notes.append(f"{len(extra)} files the checkpoint gives nothing for are not compared, and "
                                f"transformers, the tokenizer or peft may read them: {', '.join(extra[:4])}"
                                f"{', ...' if len(extra) > 4 else ''}")
    if (out / ADAPTER_CONFIG).is_file() and ADAPTER_CONFIG not in merge_plan.small and (out / "config.json").is_file():
        report.fail(f"{ADAPTER_CONFIG}: beside config.json it makes transformers load this folder as a peft adapter of "
                    "the base model it names, not as these weights; remove it")
    card = "README.md"
    if (out / card).is_file() and card not in merge_plan.small:
        report.notes.append(f"{card}: a model card (push writes one) is not made again from the checkpoint"
                            + ("; checked against the manifest's checksum only" if card in listed else ""))


def _check_unlisted_files(out: Path, manifest: dict, report: VerifyReport) -> None:
    """Without the checkpoint: the manifest lists every file the merge wrote, so a file a loader reads that it does
    not list (a chat template or tokenizer file copied in, pytorch_model.bin, a config.json whose entry was removed)
    is none of the merge's: the folder loads as something else."""
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        return
    for rel in foreign_loaded_files(out, set(listed)):
        report.fail(f"{rel}: not in {STATE_DIR}/{MANIFEST} (the merge did not write it), and transformers, the "
                    "tokenizer or load_optimizer_state_dict may read it; remove it, or give the checkpoint too "
                    "(streammerge verify OUT CKPT)")


CONFIG_FILES = ("config.json", "generation_config.json")  # what the model is and how it generates: never a note
# what peft builds an adapter from: another writer's other keys (its version, new defaults) are notes
ADAPTER_KEYS = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "target_modules",
                "rank_pattern", "alpha_pattern", "bias", "modules_to_save", "layers_to_transform", "layers_pattern",
                "exclude_modules", "layer_replication", "target_parameters", "trainable_token_indices", "lora_bias")
# peft's defaults for the keys above that the merge does not write: absent is the default
ADAPTER_DEFAULTS = {"lora_bias": False}
# What save_pretrained adds or spells its own way; the dtype is the tensors' own (compared one by one).
WRITER_KEYS = ("transformers_version", "_name_or_path", *DTYPE_KEYS)


def _named_dtype(config: bytes) -> str | None:
    """The floating dtype a config.json names for its weights (dtype, else torch_dtype), or None."""
    try:
        data = jsonfile.loads(config)
    except ValueError:
        return None
    value = next((data[k] for k in DTYPE_KEYS if isinstance(data, dict) and isinstance(data.get(k), str)), None)
    name = value.removeprefix("torch.") if value is not None else None
    return name if name in {d.name for d in dtypes.FULL_PRECISION} else None


def _same_data(got: bytes, want: bytes, *, strict: bool, keys: tuple[str, ...] | None = None) -> bool:
    """Whether two JSON files hold the same data (a config as another writer formats it). `strict` (a config) leaves
    out only what the writer adds (WRITER_KEYS) and keeps every other key, defaults included; `keys` compares those
    keys alone."""
    try:
        a, b = jsonfile.loads(got), jsonfile.loads(want)
    except ValueError:
        return False
    if keys is not None:
        return isinstance(a, dict) and isinstance(b, dict) and all(
            a.get(k, ADAPTER_DEFAULTS.get(k)) == b.get(k, ADAPTER_DEFAULTS.get(k)) for k in keys)
    if strict and isinstance(a, dict) and isinstance(b, dict):
        a, b = ({k: v for k, v in d.items() if k not in WRITER_KEYS} for d in (a, b))
    return bool(a == b)


def _as_critic(got: bytes, merge_plan: MergePlan) -> bytes | None:
    """config.json as the merge writes it for a critic saved with its base model's config: the same config with
    its value-head class (architecture.critic_config), the class read from the written file."""
    try:
        cls = jsonfile.loads(got.decode())["architectures"][0]
    except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        return None
    if not (isinstance(cls, str) and cls.endswith("ForTokenClassification")) or merge_plan.config is None:
        return None
    archs = merge_plan.config.get("architectures")
    if isinstance(archs, list) and archs and str(archs[0]).endswith("ForTokenClassification"):
        return None  # the checkpoint's config names its token classifier already: the merge writes it as it is
    if cls != _token_classifier(merge_plan.config.get("model_type"), cls):
        return None  # the merge writes the class transformers' AutoModelForTokenClassification builds, no other
    weights = merge_plan.weights
    head = [t for n, t in weights.tensors.items() if n.rsplit(".", 1)[0].endswith("score") and n.endswith(".weight")]
    if "lm_head.weight" in {*weights.tensors, *weights.dropped} or not any(t.shape[:1] == (1,) for t in head):
        return None  # the weights have no one-label value head: a critic's config is not theirs
    return dataclasses.replace(merge_plan, config=critic_config(merge_plan.config, cls)).contents("config.json")


def _token_classifier(model_type: object, default: str) -> str:
    """The class AutoModelForTokenClassification builds for a model type (its name, from transformers' table), which
    the merge names in a critic's config.json; `default` where transformers is not installed or has none."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES as names
    except ImportError:
        return default
    found = names.get(model_type) if isinstance(model_type, str) else None
    return found if isinstance(found, str) else default


# what an optimizer export's index records as data besides its tensors (load_optimizer_state_dict reads them)
OPTIMIZER_DATA = ("param_groups", "state_values", "megatron_param_groups")


def _check_optimizer_groups(out: Path, p: Plan, report: VerifyReport) -> None:
    """Without a manifest: the optimizer export's param groups (lr, betas, weight_decay, ... and the parameters each
    group holds) and its non-tensor state, as data, against the checkpoint's. A comparison tensor by tensor does not
    see them, and a resumed run would take them as trained."""
    from .optimizer import OPTIMIZER_INDEX

    index, pt = out / OPTIMIZER_DIR / OPTIMIZER_INDEX, out / OPTIMIZER_DIR / OPTIMIZER_PT
    rel = f"{OPTIMIZER_DIR}/{OPTIMIZER_INDEX}"
    want = {k: jsonfile.loads(p.index_metadata[k]) for k in OPTIMIZER_DATA if k in p.index_metadata}
    if index.is_file():
        try:
            meta = jsonfile.loads(index.read_text()).get("metadata")
            got = {k: jsonfile.loads(meta[k]) for k in OPTIMIZER_DATA if k in meta}
        except (ValueError, UnicodeDecodeError, OSError, AttributeError, TypeError) as e:
            report.fail(f"{rel}: its metadata cannot be read as an optimizer export's "
                        f"({(str(e).splitlines() or [''])[0][:120]})")
            return
    elif pt.is_file() and "param_groups" in want:
        from .optimizer.export import nest

        rel = f"{OPTIMIZER_DIR}/{OPTIMIZER_PT}"
        try:
            got = {"param_groups": torch_load(pt, map_location="cpu", mmap=True, weights_only=True)["param_groups"]}
        except Exception as e:  # noqa: BLE001  (torch's reader refuses a damaged file in many ways)
            report.fail(f"{rel}: torch.load cannot read its param groups ({(str(e).splitlines() or [''])[0][:120]})")
            return
        want = {"param_groups": nest({}, want["param_groups"])["param_groups"]}  # as the writer nests them
    else:
        return
    for key in sorted(set(want) | set(got)):
        a, b = got.get(key), want.get(key)
        try:
            why = _first_group_difference(a, b) if _canonical(a) != _canonical(b) else None
        except RecursionError:  # read from a pickle, which can nest lists deeper than Python recurses
            why = "they nest deeper than the checkpoint's"
        if why is not None:
            report.fail(f"{rel}: {key} differ from the checkpoint's ({why}); rerun the merge to write them again")
        else:
            report.files_checked.add(rel)


def _canonical(v: object) -> str:
    """JSON text to compare by (tuples as lists, NaN equal to NaN, keys in order)."""
    return json.dumps(v, sort_keys=True, default=repr)


def _first_group_difference(got: object, want: object) -> str:
    if got is None or want is None:
        return "none in the folder" if got is None else "the checkpoint has none"
    if not isinstance(got, (list, tuple)) or not isinstance(want, (list, tuple)) or len(got) != len(want):
        n = len(got) if isinstance(got, (list, tuple)) else type(got).__name__
        return f"{n} groups, the checkpoint gives {len(want) if isinstance(want, (list, tuple)) else want!r}"
    for i, (g, w) in enumerate(zip(got, want)):
        if isinstance(g, dict) and isinstance(w, dict):
            for k in [*w, *(k for k in g if k not in w)]:
                if _canonical(g.get(k)) != _canonical(w.get(k)):
                    return (f"group {i}: {k!r} is {_brief(g[k]) if k in g else 'missing'}, the checkpoint gives "
                            f"{_brief(w[k]) if k in w else 'none'}")
        elif _canonical(g) != _canonical(w):
            return f"entry {i} is {_brief(g)}, the checkpoint gives {_brief(w)}"
    return "written differently"


def _first_difference(got: bytes, want: bytes) -> str:
    """Where a small file differs: the first key of a JSON object whose value differs, else the first byte."""
    try:
        a, b = jsonfile.loads(got.decode()), jsonfile.loads(want.decode())
    except (ValueError, UnicodeDecodeError):
        a = b = None
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(b) + [k for k in a if k not in b]:
            if key not in a:
                return f"no {key!r}, the checkpoint gives {_brief(b[key])}"
            if key not in b:
                return f"{key!r} is {_brief(a[key])}, the checkpoint gives none"
            if a[key] != b[key]:
                return f"{key!r} is {_brief(a[key])}, the checkpoint gives {_brief(b[key])}"
        return "the same JSON, written differently"
    at = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
    return f"{len(got)} bytes, the checkpoint gives {len(want)}; first difference at byte {at}"


def _brief(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _streams(checksums: str, paths: list[Path], report: VerifyReport, oracle: Oracle) -> bool:
    """Whether the CRC-32 streams run beside the comparison: with "auto", when the rank files fit in half the
    page cache this process may fill (else a stream's pages are evicted before the comparison reads them
    again, and every byte comes from disk twice). Otherwise the oracle checks them from what it reads."""
    from .pipeline import memory_room

    if checksums == "streams":
        return True
    if checksums == "auto":
        total = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
        room = memory_room()
        if total <= room // 2:
            return True
        report.notes.append(f"the rank files ({total / 1e9:.2f} GB) do not fit in half the page cache this process "
                            f"may use ({room / 1e9:.2f} GB): their CRC-32s come from what the comparison reads")
    return not oracle.crc_as_read()


class _Readahead:
    """Without CRC streams nothing reads ahead of the comparison, whose mapped reads fault pages in a few at a time:
    so a thread asks the kernel (posix_fadvise WILLNEED) for the rank-file bytes of the tensors after the one being
    compared, up to an eighth of the memory free for page cache. Advice only: the pieces' places come from the
    merge's own reader, and a wrong one costs time, never a wrong result."""

    refused: str | None = None  # why nothing is read ahead (then the comparison's own faults read)

    def __init__(self, order: list[TensorPlan]):
        from .pipeline import memory_room

        self.budget = max(64 * 2**20, memory_room() // 8)
        self._order = order
        self._index = {id(t): i for i, t in enumerate(order)}
        self._starts = [0, *itertools.accumulate(sum(_span(p, t) for p in t.pieces) for t in order)]
        self._next = 0  # the first tensor not asked for yet
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="streammerge-readahead")
        self._fds: dict[str, int] = {}
        self._steps: dict[str, int] = {}
        self._ask(0)

    def reached(self, t: TensorPlan) -> None:
        """The comparison of `t` starts: ask for the tensors within the budget after it."""
        if id(t) in self._index and self.refused is None:
            self._ask(self._index[id(t)])

    def _ask(self, i: int) -> None:
        with self._lock:
            first = self._next
            while self._next < len(self._order) and self._starts[self._next] < self._starts[i] + self.budget:
                self._next += 1
            ahead = self._order[first:self._next]
        if ahead:
            self._pool.submit(self._advise, ahead)

    def _advise(self, tensors: list[TensorPlan]) -> None:
        for t in tensors:
            for p in t.pieces:
                try:
                    if p.file not in self._fds:
                        self._fds[p.file] = open_checkpoint_file(p.file)
                        self._steps[p.file] = _willneed_step(self._fds[p.file])
                    fd, step, end = self._fds[p.file], self._steps[p.file], p.offset + _span(p, t)
                    for pos in range(p.offset, end, step):
                        os.posix_fadvise(fd, pos, min(step, end - pos), os.POSIX_FADV_WILLNEED)
                except AttributeError:
                    self.refused = "this platform has no posix_fadvise"
                    return
                except OSError as e:
                    self.refused = f"posix_fadvise(WILLNEED) on {Path(p.file).name} failed ({e.strerror or e})"
                    return

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for fd in self._fds.values():
            os.close(fd)


def _willneed_step(fd: int) -> int:
    """The most one WILLNEED reads: Linux cuts the advice to the device's readahead or largest request size."""
    st = os.fstat(fd)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    for queue in (dev / "queue", dev / ".." / "queue"):  # a disk's, or the disk of a partition
        try:
            kib = max(int((queue / name).read_text()) for name in ("read_ahead_kb", "max_sectors_kb"))
            return min(8 * 2**20, max(128 * 2**10, kib * 2**10))
        except (OSError, ValueError):
            continue
    return 128 * 2**10


def _span(p: Piece, t: TensorPlan) -> int:
    """Bytes from a piece's first element to its last, as stored (none for an empty piece)."""
    return piece_span(p, p.shape, t.source_dtype.itemsize) if all(p.shape) else 0


def _one_torch_thread() -> None:
    """Each comparing thread runs torch's ops on itself alone: the threads already use every CPU, and intra-op
    threads started from each of them would outnumber the CPUs many times over."""
    import torch

    torch.set_num_threads(1)


def _default_workers() -> int:
    """Comparing is CPU work (torch's cast, numpy's compare, CRC-32): a thread per CPU, at most 8."""
    from .pipeline import cpu_count

    return min(8, cpu_count())


def _short(dtype: DType) -> str:
    return dtype.name


def _oracle_can_read(oracle: Oracle, t: TensorPlan, rel: str, report: VerifyReport) -> bool:
    """Whether torch's own reader sees the tensors the plan reads, as the plan sees them; a disagreement fails."""
    if t.flat:
        return False
    for s in [t.source] + ([t.fold.a, t.fold.b] if t.fold else []):
        seen = oracle.shape(s.name)
        if seen is None:
            if s is t.source and t.fold is None:
                return False
            report.fail(f"{rel}: tensor {t.name!r}: torch finds no {s.name!r} in the checkpoint")
            return False
        if seen != (s.shape, s.dtype.name):
            report.fail(f"{rel}: tensor {t.name!r}: streammerge's reader sees {s.name!r} as {s.dtype.name} "
                        f"{list(s.shape)}, torch.load as {seen[1]} {list(seen[0])}")
            return False
    return True


def _compare_with_oracle(rel: str, header: _Header, entry: _Entry, t: TensorPlan, oracle: Oracle,
                         report: VerifyReport, chunk: int) -> None:
    """Each window of the output tensor against what torch's own reader gives (cast, or folded, by torch)."""
    import numpy as np
    import torch

    isz = t.dtype.itemsize
    budget = max(isz, chunk // (4 if t.fold else 1))
    strides = row_major(t.shape)
    scratch = _Scratch.mine()
    with open(header.path, "rb", buffering=0) as out_file:
        for box in windows(t.shape, isz, budget):
            want = _expected(t, box, oracle, scratch).contiguous().reshape(-1).view(torch.uint8)
            first = sum(lo * st for (lo, _), st in zip(box, strides))
            got = scratch.buffer("got", want.numel())
            if not pread_into(out_file.fileno(), got, header.data_start + entry.begin + first * isz):
                report.fail(f"{rel}: tensor {t.name!r}: the file ends inside its data")
                return
            report.bytes_read += 2 * len(got)
            if not np.array_equal(np.frombuffer(got, dtype=np.uint8), want.numpy()) and not (
                    t.fold is None and _only_nan_payloads(t, want, torch.frombuffer(got, dtype=torch.uint8))
                    and _is_merge_cast(t, oracle.read(t.source.name, box), np.frombuffer(got, dtype=np.uint8))):
                _report_window(rel, t, box, want, got, oracle, report)
                return


def _only_nan_payloads(t: TensorPlan, want: torch.Tensor, got: torch.Tensor) -> bool:
    """A cast where the only elements that differ are NaN in both: torch's `.to()` writes other NaN bits on some of
    its paths (a 0-d tensor, a vector's tail) than on others, and the merge's cast matches one of them (cast.py)."""
    import torch

    if t.source_dtype == t.dtype or not t.dtype.is_floating_point:
        return False
    try:
        w, g = want.view(t.dtype.torch()), got.view(t.dtype.torch())
        differ = (bytes_rows(w) != bytes_rows(g)).any(dim=1).reshape(w.shape)
        return bool((torch.isnan(w[differ]) & torch.isnan(g[differ])).all())
    except (RuntimeError, TypeError):  # a dtype isnan does not take
        return False


def _is_merge_cast(t: TensorPlan, src: torch.Tensor, got: np.ndarray) -> bool:
    """Whether `got` (the output window's bytes) is exactly what the merge's own cast (cast.py) writes for `src`,
    NaN bits included: torch's other NaN bits on its scalar paths excuse the merge's bits, not any NaN at all (a
    NaN whose sign or payload was changed afterwards is no longer the merge's output). Casts the merge leaves to
    torch (float8) take any NaN bits torch may write."""
    import numpy as np
    import torch

    from .write.cast import cast_into, numpy_can_cast

    if not numpy_can_cast(t.source_dtype, t.dtype):
        return True
    source = src.contiguous().reshape(-1).view(torch.uint8).numpy().view(t.source_dtype.numpy)
    mine = np.empty(source.shape, t.dtype.numpy)
    cast_into(mine, source, t.source_dtype, t.dtype)
    return bool(np.array_equal(mine.view(np.uint8), np.asarray(got, dtype=np.uint8).reshape(-1)))


def _report_window(rel: str, t: TensorPlan, box: tuple[tuple[int, int], ...], want: torch.Tensor, got: memoryview,
                   oracle: Oracle, report: VerifyReport) -> None:
    """Name the first element that differs, and the file it comes from."""
    import numpy as np

    isz = t.dtype.itemsize
    rows = (np.frombuffer(want.numpy().tobytes(), np.uint8).reshape(-1, isz)
            != np.frombuffer(bytes(got), np.uint8).reshape(-1, isz))
    bad = rows.any(axis=1)
    shape = tuple(hi - lo for lo, hi in box)
    first = tuple(int(i) + lo for i, (lo, _) in zip(np.unravel_index(int(np.argmax(bad)), shape), box)) if shape else ()
    source = oracle.locate(t.source.name, first)
    report.fail(f"{rel}: tensor {t.name!r}: {int(bad.sum())} of {bad.size} elements in one window differ from "
                f"{source} as torch.load reads it{' and peft folds it' if t.fold else ''} "
                f"(first at index {list(first)})")


def _expected(t: TensorPlan, box: tuple[tuple[int, int], ...], oracle: Oracle, scratch: _Scratch) -> torch.Tensor:
    """The output window as torch computes it: `.to(dtype)` of the source, or peft's fold `W + (B @ A) * scale`
    (a Conv1D's: `W + (B @ A).T * scale`)."""
    src = oracle.read(t.source.name, box).contiguous()  # contiguous first: torch's strided cast writes other NaN bits
    if t.fold is None:
        if src.dtype == t.dtype.torch():
            return src
        return scratch.tensor("want", src.shape, t.dtype.torch()).copy_(src)  # what .to() does, into reused memory
    from .write.compute import add_delta  # the fold's block shapes: BLAS rounds other shapes otherwise

    fold = t.fold
    rank, cols = fold.a.shape
    work = t.fold_dtype.torch()  # float32, or float64 where W or a factor is
    w = src.to(work).clone()
    a = oracle.read(fold.a.name, ((0, rank), (0, cols))).to(work)
    add_delta(w, lambda lo, hi: oracle.read(fold.b.name, ((lo, hi), (0, rank))).to(work), a, fold.scale,
              fold.b.shape[0], box, fold.transpose)
    return w.to(t.dtype.torch())


class _Scratch:
    """A comparing thread's buffers, reused window after window: fresh ones would be new pages each time, which the
    kernel zeroes and maps in one fault at a time."""

    _local = threading.local()

    def __init__(self) -> None:
        self._bufs: dict[str, bytearray] = {}

    @classmethod
    def mine(cls) -> _Scratch:
        scratch = getattr(cls._local, "scratch", None)
        if scratch is None:
            scratch = cls._local.scratch = cls()
        return scratch

    def buffer(self, slot: str, n: int) -> memoryview:
        buf = self._bufs.get(slot)
        if buf is None or len(buf) < n:
            buf = self._bufs[slot] = bytearray(n)  # a new one: views of the old may still be alive
        return memoryview(buf)[:n]

    def tensor(self, slot: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        import torch

        n = math.prod(shape)
        return torch.frombuffer(self.buffer(slot, max(1, n * dtype.itemsize)), dtype=torch.uint8)[:n * dtype.itemsize] \
            .view(dtype).view(tuple(shape))


class _Sources:
    """Positioned reads of rank files, and the zip CRC32 of every source record a piece reads."""

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.fds: dict[str, int] = {}
        self.records: dict[str, list[tuple[int, int, int, str]]] = {}  # file -> (start, size, crc, name)
        self.checked: set[tuple[str, int]] = set()
        self.needed: dict[tuple[str, int], str] = {}  # record -> a tensor read from it
        self._lock = threading.Lock()  # comparison threads share the descriptors

    def fd(self, path: str) -> int:
        with self._lock:
            if path not in self.fds:
                fd = open_checkpoint_file(path)
                self.records[path] = zip_records(path, fd)
                self.fds[path] = fd
            return self.fds[path]

    def read(self, path: str, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        if not pread_into(self.fd(path), memoryview(buf), offset):
            raise OSError(f"{path}: ends before byte {offset + length}")
        return buf

    def record_of(self, path: str, offset: int) -> tuple[int, int, int, str] | None:
        self.fd(path)
        recs = self.records[path]
        i = bisect.bisect_right(recs, (offset, math.inf)) - 1
        if i >= 0 and recs[i][0] <= offset < recs[i][0] + recs[i][1]:
            return recs[i]
        return None

    def crc(self, path: str, start: int, end: int, crc: int = 0) -> int:
        """Continue a CRC32 over bytes [start, end) of a file, a chunk at a time."""
        for pos in range(start, end, self.chunk):
            crc = crc32(self.read(path, pos, min(self.chunk, end - pos)), crc)
        return crc

    def finish_crcs(self, report: VerifyReport) -> None:
        """Records no single contiguous piece streamed through in order get a sequential pass of their own."""
        for path, start in sorted(set(self.needed) - self.checked):
            rec = next(r for r in self.records[path] if r[0] == start)
            self.check_crc(path, rec, self.crc(path, start, start + rec[1]), report)

    def check_crc(self, path: str, rec: tuple[int, int, int, str], crc: int, report: VerifyReport) -> None:
        self.checked.add((path, rec[0]))
        if rec[2] != 0 and crc != rec[2]:  # 0: saved without CRCs (torch.serialization.set_crc32_options)
            report.fail(f"{path}: zip record {rec[3]} (data of {self.needed.get((path, rec[0]), '?')!r}) fails its "
                        "CRC32 check: the rank file is corrupted (changed after torch.save wrote it); the output "
                        "copies what is there now")

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _storage_order(p: Piece) -> tuple[int, ...]:
    """Dims of a piece from largest stride to smallest: windows in this order read its bytes front to back."""
    return tuple(sorted(range(len(p.shape)), key=lambda d: (-p.stride[d], d)))


def _read_box(fd: int, base: int, shape: tuple[int, ...], lo: tuple[int, ...], sizes: tuple[int, ...],
              dtype: torch.dtype, limit: int) -> torch.Tensor | None:
    """A box of a row-major tensor stored at `base`: one read when its span is small, else one read per run."""
    import torch

    isz = dtype.itemsize
    strides = row_major(shape)
    first = sum(a * st for a, st in zip(lo, strides))
    span = (sum((n - 1) * st for n, st in zip(sizes, strides)) + 1) * isz
    box_bytes = math.prod(sizes) * isz
    if span <= max(limit, 2 * box_bytes):
        raw = bytearray(span)
        if not pread_into(fd, memoryview(raw), base + first * isz):
            return None
        flat = torch.frombuffer(raw, dtype=torch.uint8)
        box = flat.as_strided(sizes + (isz,), tuple(st * isz for st in strides) + (1,))
        return box.contiguous().view(-1).view(dtype).view(sizes)
    k = max((d for d in range(len(shape)) if sizes[d] != shape[d]), default=0)  # dims after k are whole
    run = sizes[k] * strides[k] * isz
    out = bytearray(box_bytes)
    view, pos = memoryview(out), 0
    for idx in itertools.product(*(range(a, a + n) for a, n in zip(lo[:k], sizes[:k]))):
        offset = sum(i * st for i, st in zip(idx, strides)) + lo[k] * strides[k]
        if not pread_into(fd, view[pos:pos + run], base + offset * isz):
            return None
        pos += run
    return torch.frombuffer(out, dtype=torch.uint8).view(dtype).view(sizes)


def _compare_tensor(rel: str, header: _Header, entry: _Entry, name: str, t: TensorPlan, sources: _Sources,
                    report: VerifyReport, chunk: int) -> None:
    """Compare an output tensor with its source pieces, one bounded window of each piece at a time.

    Windows follow each piece's storage order, so a strided piece is read front to back like a
    contiguous one; the output box is gathered with positioned reads (no mmap, bounded memory).
    """
    import torch

    src_isz, out_isz = t.source_dtype.itemsize, t.dtype.itemsize
    budget = max(1, chunk // max(src_isz, out_isz)) * src_isz
    base = header.data_start + entry.begin
    with open(header.path, "rb", buffering=0) as out_file:
        for p in t.pieces:
            order = _storage_order(p)
            inverse = tuple(order.index(d) for d in range(len(order)))
            pshape = tuple(p.shape[d] for d in order)
            pstride = tuple(p.stride[d] for d in order)
            rec = sources.record_of(p.file, p.offset)
            if rec is not None:
                sources.needed.setdefault((p.file, rec[0]), name)
            streaming = (rec is not None and (p.file, rec[0]) not in sources.checked and _is_contiguous(pshape, pstride)
                         and p.offset + math.prod(p.shape) * src_isz <= rec[0] + rec[1])
            crc = 0
            if streaming:
                assert rec is not None  # streaming needs the piece's record
                crc = sources.crc(p.file, rec[0], p.offset)
            for pbox in windows(pshape, src_isz, budget):
                psizes = tuple(hi - lo for lo, hi in pbox)
                plo = tuple(lo for lo, _ in pbox)
                src_off = p.offset + sum(i * st for i, st in zip(plo, pstride)) * src_isz
                span = (sum((n - 1) * st for n, st in zip(psizes, pstride)) + 1) * src_isz
                raw = sources.read(p.file, src_off, span)
                if streaming:
                    crc = crc32(raw, crc)
                src = torch.frombuffer(raw, dtype=torch.uint8).view(t.source_dtype.torch())
                # contiguous before the cast: torch writes other NaN bits for strided tensors (see cast.py)
                source = src.as_strided(psizes, pstride).permute(inverse).contiguous()
                want = source.to(t.dtype.torch())
                sizes = tuple(psizes[inverse[d]] for d in range(len(order)))
                lo = tuple(s + plo[inverse[d]] for d, s in enumerate(p.start))
                got = _read_box(out_file.fileno(), base, t.geometry, lo, sizes, t.dtype.torch(), chunk)
                report.bytes_read += span + math.prod(sizes) * out_isz
                if got is None:
                    report.fail(f"{rel}: tensor {name!r}: the file ends inside its data")
                    return
                want_bytes, got_bytes = want.reshape(-1).view(torch.uint8), got.reshape(-1).view(torch.uint8)
                if not torch.equal(want_bytes, got_bytes) and not (
                        _only_nan_payloads(t, want_bytes, got_bytes) and _is_merge_cast(t, source, got_bytes.numpy())):
                    _report_mismatch(rel, name, p, want, got, lo, t, report)
                    return
            if streaming:
                assert rec is not None
                crc = sources.crc(p.file, p.offset + math.prod(p.shape) * src_isz, rec[0] + rec[1], crc)
                sources.check_crc(p.file, rec, crc, report)


def _report_mismatch(rel: str, name: str, p: Piece, want: torch.Tensor, got: torch.Tensor, lo: tuple[int, ...],
                     t: TensorPlan, report: VerifyReport) -> None:
    differs = (bytes_rows(want) != bytes_rows(got)).any(dim=1)
    first = int(differs.nonzero()[0])
    index = []
    for n in reversed(want.shape):
        index.append(first % n)
        first //= n
    at = [a + i for a, i in zip(lo, reversed(index))]
    where = f"flat index {at[0]}" if t.flat else f"index {at}"
    report.fail(f"{rel}: tensor {name!r}: {int(differs.sum())} of {want.numel()} elements in one window differ "
                f"from rank {p.rank}'s file {Path(p.file).name} (first at {where})")
