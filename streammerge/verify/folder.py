"""The output folder on its own, as files, with no checkpoint: its manifest and the checksums it records, leftovers
of an interrupted merge, every safetensors header (and the Rust reader's view of it), the indexes, files a loader
reads that the merge did not write. Given the merge's plan, also what a comparison tensor by tensor does not see
in a file of ours: a safetensors file's exact header, a torch.save file's records and pickle."""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import jsonfile
from ..dtypes import DType
from ..errors import OutputError
from ..paths import walk
from ..plan import FilePlan, Plan, TensorPlan
from ..sources.picklescan import torch_load
from ..write.manifest import MANIFEST, STATE_DIR, Manifest, crc32_file, sha256_file
from ..write.safetensors_format import CODE_DTYPES, read_header
from ..write.transaction import foreign_loaded_files
from ..write.writer import TMP_SUFFIX
from .flags import recorded_options
from .report import VerifyReport

SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


def _rel(out: Path, path: Path) -> str:
    return path.relative_to(out).as_posix()


def _output_files(out: Path, pattern: str) -> list[Path]:
    return sorted(p for p in walk(out) if fnmatch.fnmatch(p.name, pattern) and p.is_file()
                  and STATE_DIR not in p.relative_to(out).parts)


def check_manifest(out: Path, report: VerifyReport, checksum: Callable[[str], bool] = lambda rel: True, *,
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
        report.count(read=size)
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


def check_temp_files(out: Path, report: VerifyReport) -> None:
    leftovers = [p for p in walk(out) if p.name.endswith(TMP_SUFFIX)]
    leftovers += [p for p in [out / STATE_DIR / "manifest.tmp"] if p.exists()]
    for p in sorted(leftovers):
        report.fail(f"{_rel(out, p)}: temporary file left by an interrupted merge; rerun the merge to finish")


@dataclass(frozen=True)
class Entry:
    dtype: DType
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    path: Path
    data_start: int
    entries: dict[str, Entry]


def check_safetensors(out: Path, report: VerifyReport) -> dict[str, Header]:
    """Every safetensors file: header parses, tensors tile the data exactly, the Rust reader agrees."""
    from safetensors import safe_open

    headers: dict[str, Header] = {}
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
        entries: dict[str, Entry] = {}
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
            entries[name] = Entry(dtype, shape, begin, end)
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
            headers[rel] = Header(path, data_start, entries)
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


def check_indexes(out: Path, headers: dict[str, Header], report: VerifyReport) -> dict[str, dict]:
    """Each index names exactly the tensors its files hold; no shard file goes unnamed. Returns each readable
    index's weight map by its relative path."""
    named: set[str] = set()
    weight_maps: dict[str, dict] = {}
    checked = {_rel(out, p) for p in _output_files(out, "*.safetensors")}  # what check_safetensors read
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


def check_unlisted_files(out: Path, manifest: dict, report: VerifyReport) -> None:
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


def torch_file_header(path: Path, rel: str, plan: Plan, fp: FilePlan, report: VerifyReport) -> Header | None:
    """Where each tensor of a torch.save file (optimizer.pt) lies, as torch's own reader finds it (the pickle read onto
    the meta device), so that its records are compared with the checkpoint as a safetensors file's tensors are."""
    from ..write.torch_format import record_offsets

    try:
        offsets = record_offsets(path, {n: plan.tensors[n] for n in fp.names})
    except Exception as e:  # noqa: BLE001  (torch's reader refuses a damaged file in many ways)
        report.fail(f"{rel}: torch.load cannot read where its tensors lie ({(str(e).splitlines() or [''])[0][:160]})")
        return None
    entries = {}
    for offset, t in offsets:
        assert isinstance(t, TensorPlan)
        entries[t.name] = Entry(t.dtype, t.shape, offset, offset + t.numel * t.dtype.itemsize)
    return Header(path, 0, entries)


def check_torch_pickle(path: Path, rel: str, plan: Plan, fp: FilePlan, report: VerifyReport) -> None:
    """A torch.save file of ours (optimizer.pt) holds exactly what the merge pickles besides the tensors' bytes (which
    are compared record by record): the param groups (lr, betas, ...), the non-tensor state, the nesting, each
    tensor's shape and dtype. Its pickle is what load_optimizer_state_dict returns, and the records' comparison
    does not see it."""
    import torch

    from ..optimizer.export import nest

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


def check_header_bytes(path: Path, rel: str, want: bytes, report: VerifyReport) -> None:
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
