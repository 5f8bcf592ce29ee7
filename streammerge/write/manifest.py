"""The manifest: which output files are finished, with size, mtime and checksum, for resume, verify and push."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import jsonfile
from ..checksum import crc32
from ..errors import OutputError
from ..paths import NotAFile, read_small
from .writer import OutputFile, output_error

STATE_DIR = ".streammerge"
MANIFEST = "manifest.json"
PART_GLOB = "manifest.part-*.json"  # one per torchrun rank > 0, folded into MANIFEST by rank 0


class Manifest:
    """Lives in OUT/.streammerge/manifest.json and is rewritten atomically after every finished file."""

    def __init__(self, out_dir: Path, fingerprint: str, source: str, options: dict, part: int = 0,
                 inputs: dict[str, list[int]] | None = None):
        self.path = out_dir / STATE_DIR / (MANIFEST if part == 0 else PART_GLOB.replace("*", str(part)))
        self.data: dict[str, Any] = {"version": 2, "fingerprint": fingerprint, "source": source, "options": options,
                     "inputs": inputs or {}, "files": {}, "complete": False}
        self.refreshed = False  # an entry's mtime was brought up to date (its file checked by checksum): save it

    @staticmethod
    def identify(paths: Iterable[Path]) -> dict[str, list[int]]:
        """[size, mtime_ns] of each file a merge reads: the plan fingerprint says how the checkpoint is laid out, not
        what its files hold, and a checkpoint saved again at the same path keeps its layout."""
        out = {}
        for p in paths:
            st = os.stat(p)
            out[str(p)] = [st.st_size, st.st_mtime_ns]
        return out

    @staticmethod
    def changed(before: dict[str, list[int]], now: dict[str, list[int]]) -> list[str]:
        """The files of both records whose size or modification time differs (a record of an older version
        lists none)."""
        return sorted(k for k in before.keys() & now.keys() if before[k] != now[k])

    @staticmethod
    def read(out_dir: Path) -> dict | None:
        path = out_dir / STATE_DIR / MANIFEST
        try:
            data = read_small(path)
            return None if data is None else _checked(jsonfile.loads(data.decode()), path)
        except NotAFile as e:
            raise OutputError(f"{e}, where streammerge keeps its manifest; remove it and rerun") from None
        except ValueError:
            raise OutputError(f"{path}: unreadable manifest (delete the output folder to start over)") from None

    def adopt(self, previous: dict | None) -> None:
        """Keep what a previous run of the same merge finished, and whether it completed the folder."""
        if previous and previous.get("fingerprint") == self.data["fingerprint"]:
            self.data["files"] = dict(previous.get("files", {}))
            self.data["complete"] = previous.get("complete") is True
        self.gather_parts()

    def gather_parts(self) -> None:
        """Fold in the files that torchrun ranks listed in their part manifests (same merge only); `remove_parts`
        removes them."""
        for p in sorted(self.path.parent.glob(PART_GLOB)):
            if p == self.path:
                continue
            try:
                raw = read_small(p)
                if raw is None:
                    continue
                data = _checked(jsonfile.loads(raw.decode()), p)
            except (OSError, ValueError):
                continue  # a part being replaced right now; its rank lists it again when it finishes
            if data.get("fingerprint") == self.data["fingerprint"]:
                self.data["files"].update(data.get("files", {}))

    def remove_parts(self) -> None:
        """Remove the part manifests, once this manifest, as saved, lists what they listed."""
        for p in self.path.parent.glob(PART_GLOB):
            if p != self.path:
                p.unlink(missing_ok=True)

    def finished(self, out_dir: Path, filename: str) -> OutputFile | None:
        """A file counts as finished when the manifest lists it and it is still there, unchanged.

        Size and mtime as recorded mean untouched since written and checked; otherwise the file is
        read again and kept only if its checksum (crc32, or sha256 in manifests that recorded one) matches.
        """
        entry = self.data["files"].get(filename)
        if entry is None:
            return None
        path = out_dir / filename
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size != entry["size"]:
                return None  # a link is no file of ours, whatever it points to: written again, the link replaced
            if st.st_mtime_ns != entry.get("mtime_ns"):
                if not checksum_matches(path, entry):
                    return None
                entry["mtime_ns"] = st.st_mtime_ns
                self.refreshed = True
        except OSError:
            return None
        return OutputFile(filename, entry["size"], entry.get("crc32"), entry.get("sha256"))

    def add(self, f: OutputFile, *, stat: bool = True, save: bool = True) -> None:
        """List a file (`stat`: as it is now in place, with its modification time; `save`: now, else with the next
        change)."""
        entry = {k: v for k, v in asdict(f).items() if k != "filename" and v is not None}
        try:
            if stat:
                entry["mtime_ns"] = os.stat(self.path.parent.parent / f.filename).st_mtime_ns
        except OSError:
            pass
        self.data["files"][f.filename] = entry
        if save:
            self.save()

    def complete(self) -> None:
        self.data["complete"] = True
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)  # a link left there would be written through: a new file, made here
            with open(tmp, "x") as fh:
                fh.write(json.dumps(self.data, indent=1))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise output_error(e, self.path) from None


def _checked(data: Any, path: Path) -> dict:
    """A manifest as read, each file it lists a path inside the output folder: a rerun removes the listed files it no
    longer writes, and verify reads them, so a name such as `../x` or `/x` would have them remove or read a file
    elsewhere."""
    files = data.get("files", {}) if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
        raise ValueError("not a manifest")
    for rel in files:
        if "\\" in rel or "\0" in rel or any(part in ("", ".", "..") for part in rel.split("/")):
            raise OutputError(f"{path}: lists {rel[:200]!r}, which is no file inside the output folder (a damaged or "
                              "edited manifest); delete the output folder to start over")
    return data


def checksum_matches(path: Path, entry: dict) -> bool:
    """The file still has the checksum its manifest entry records (crc32 first: it is the cheap one)."""
    if entry.get("crc32") is not None:
        return crc32_file(path) == entry["crc32"]
    if entry.get("sha256") is not None:
        return sha256_file(path) == entry["sha256"]
    return False


def crc32_file(path: Path, chunk: int = 8 * 2**20) -> int:
    """The CRC-32 (zlib's polynomial) of a file, read in bounded chunks."""
    crc = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            crc = crc32(view[:n], crc)
    return crc


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    """sha256 of a file, read in bounded chunks."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
