"""The manifest: which output files are finished, with size and sha256, for resume, verify and push."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from .errors import OutputError
from .write import OutputFile

STATE_DIR = ".streammerge"
MANIFEST = "manifest.json"
PART_GLOB = "manifest.part-*.json"  # one per torchrun rank > 0, folded into MANIFEST by rank 0


class Manifest:
    """Lives in OUT/.streammerge/manifest.json and is rewritten atomically after every finished file."""

    def __init__(self, out_dir: Path, fingerprint: str, source: str, options: dict, part: int = 0):
        self.path = out_dir / STATE_DIR / (MANIFEST if part == 0 else PART_GLOB.replace("*", str(part)))
        self.data = {"version": 1, "fingerprint": fingerprint, "source": source, "options": options,
                     "files": {}, "complete": False}

    @staticmethod
    def read(out_dir: Path) -> dict | None:
        path = out_dir / STATE_DIR / MANIFEST
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            raise OutputError(f"{path}: unreadable manifest (delete the output folder to start over)") from None

    def adopt(self, previous: dict | None) -> None:
        """Keep what a previous run of the same merge finished."""
        if previous and previous.get("fingerprint") == self.data["fingerprint"]:
            self.data["files"] = dict(previous.get("files", {}))
        self.gather_parts(remove=False)

    def gather_parts(self, remove: bool = True) -> None:
        """Fold in the files that torchrun ranks listed in their part manifests (same merge only)."""
        for p in sorted(self.path.parent.glob(PART_GLOB)):
            if p == self.path:
                continue
            try:
                data = json.loads(p.read_text())
            except (OSError, ValueError):
                continue  # a part being replaced right now; its rank lists it again when it finishes
            if data.get("fingerprint") == self.data["fingerprint"]:
                self.data["files"].update(data.get("files", {}))
            if remove:
                p.unlink(missing_ok=True)

    def finished(self, out_dir: Path, filename: str) -> OutputFile | None:
        """A file counts as finished when the manifest lists it and it is still there at its size."""
        entry = self.data["files"].get(filename)
        if entry is None:
            return None
        try:
            if os.path.getsize(out_dir / filename) != entry["size"]:
                return None
        except OSError:
            return None
        return OutputFile(filename, entry["size"], entry["sha256"])

    def add(self, f: OutputFile) -> None:
        self.data["files"][f.filename] = {k: v for k, v in asdict(f).items() if k != "filename"}
        self.save()

    def complete(self) -> None:
        self.data["complete"] = True
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)
