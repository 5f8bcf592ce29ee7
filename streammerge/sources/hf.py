"""A plain Hugging Face model folder (safetensors) as a source: the base weights of an adapter-only checkpoint.

veRL's `save_lora_only` checkpoints hold the LoRA tensors and nothing else; the fold needs the base
weights, which `--base-model` names: a local folder, or a Hub model of which only the safetensors
files, their index and the config are fetched (huggingface_hub's cache; no code is run). Tensors are
read from the safetensors headers like any other source: one contiguous piece each, streamed by the
writer. `HFOracle` is verify's independent reader of the same files (safetensors' own `safe_open`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import dtypes, jsonfile
from ..errors import CheckpointError
from ..paths import user_path
from ..write.safetensors_format import read_header
from .base import Oracle, Piece, Source, SourceTensor, row_major

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
HUB_PATTERNS = ("*.safetensors", INDEX, "config.json")


def resolve_base(name: str, *, token: str | None = None, endpoint: str | None = None) -> Path:
    """The folder of `--base-model`: a local folder as is, or a Hub model's safetensors and config fetched."""
    local = user_path(name)
    if local.is_dir():
        return local.resolve()
    from ..model_folder import hub_snapshot

    return hub_snapshot(name, "--base-model", HUB_PATTERNS, "its safetensors", token=token, endpoint=endpoint)


class HFSource(Source):
    """The safetensors weights of a model folder (sharded with an index, or one model.safetensors)."""

    format = "HF safetensors"

    def __init__(self, path: Path):
        super().__init__(path, hf_dir=path if (path / "config.json").is_file() else None)
        self._tensors: dict[str, SourceTensor] | None = None

    def weight_files(self) -> list[Path]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = jsonfile.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: unreadable index (weight_map is no object)")
            for n in weight_map.values():  # a Hub model's index names what it likes: never a file elsewhere here
                if not isinstance(n, str) or Path(n).is_absolute() or ".." in Path(n).parts:
                    raise CheckpointError(f"{index}: names {str(n)[:200]!r}, which is no file in {self.path}")
            names = sorted(set(weight_map.values()))
            files = [self.path / n for n in names]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names {missing[0]}, which is not in {self.path}")
            return files
        if (self.path / SINGLE).is_file():
            return [self.path / SINGLE]
        found = sorted(self.path.glob("*.safetensors"))
        if not found:
            raise CheckpointError(f"{self.path}: no safetensors weights (give a model folder saved with "
                                  "save_pretrained(safe_serialization=True))")
        return found

    def tensors(self, options: Any = None) -> dict[str, SourceTensor]:
        if self._tensors is None:
            out: dict[str, SourceTensor] = {}
            for f in self.weight_files():
                for name, t in _read(f).items():
                    if name in out:
                        raise CheckpointError(f"{f}: tensor {name!r} is also in another file of {self.path}")
                    out[name] = t
            self._tensors = out
            self.stats.files += len(self.weight_files())
        return self._tensors

    def files(self) -> list[Path]:
        return self.weight_files()

    def oracle(self, options: Any = None) -> Oracle:
        return HFOracle(self.weight_files())


def _read(path: Path) -> dict[str, SourceTensor]:
    """Every tensor of a safetensors file, checked as safetensors' own loader checks the header: whole numbers, and
    tensors whose bytes tile the data after the header exactly (no gap, no overlap, no byte left over)."""
    try:
        header, start = read_header(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (its header is a {type(header).__name__}, not "
                              "an object)")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: its __metadata__ is not a map of strings (safetensors refuses the file)")
    size = path.stat().st_size
    out = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = dtypes.BY_CODE[entry["dtype"]]
            shape, (begin, end) = tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if not all(type(x) is int and 0 <= x < 2 ** 64 for x in (*shape, begin, end)):  # safetensors' usize
            raise CheckpointError(f"{path}: tensor {name!r} has a shape or data offsets that are not whole numbers")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r}: its data offsets do not fit its shape")
        spans.append((begin, end, name))
        stride = row_major(shape)
        out[name] = SourceTensor(name, shape, dtype, (Piece(0, str(path), start + begin, shape, stride,
                                                            (0,) * len(shape)),))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise CheckpointError(f"{path}: tensor {name!r}'s bytes start at {begin}, not where the tensor before "
                                  f"it ends ({at}): a gap or an overlap, which safetensors refuses")
        at = end
    if start + at != size:
        raise CheckpointError(f"{path}: its tensors end at byte {start + at} of the {size}-byte file (safetensors "
                              "refuses it: truncated, or bytes no tensor holds)")
    return out


class HFOracle(Oracle):
    """The base folder's tensors as safetensors' own reader gives them."""

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)
        self._where: dict[str, Path] | None = None

    def _index(self) -> dict[str, Path]:
        if self._where is None:
            from safetensors import safe_open

            self._where = {}
            for f in self.files:
                with safe_open(str(f), "pt") as st:
                    for k in st.keys():
                        self._where[k] = f
        return self._where

    def shape(self, name: str) -> tuple[tuple[int, ...], str] | None:
        f = self._index().get(name)
        if f is None:
            return None
        from safetensors import safe_open

        with safe_open(str(f), "pt") as st:
            sl = st.get_slice(name)
            return tuple(sl.get_shape()), dtypes.BY_CODE[sl.get_dtype()].name

    def read(self, name: str, box: tuple[tuple[int, int], ...]) -> Any:
        from safetensors import safe_open

        with safe_open(str(self._index()[name]), "pt") as st:
            return st.get_slice(name)[tuple(slice(lo, hi) for lo, hi in box)]

    def locate(self, name: str, index: tuple[int, ...]) -> str:
        f = self._index().get(name)
        return str(f) if f else "the base model"


class CombinedOracle(Oracle):
    """The checkpoint's oracle, then the base model's for names the checkpoint does not hold."""

    def __init__(self, first: Oracle, base: Oracle):
        self.first, self.base = first, base

    def _for(self, name: str) -> Oracle:
        return self.first if self.first.shape(name) is not None else self.base

    def shape(self, name: str) -> tuple[tuple[int, ...], str] | None:
        return self.first.shape(name) or self.base.shape(name)

    def read(self, name: str, box: tuple[tuple[int, int], ...]) -> Any:
        return self._for(name).read(name, box)

    def locate(self, name: str, index: tuple[int, ...]) -> str:
        return self._for(name).locate(name, index)

    def check_integrity(self, paths: Sequence[Path]) -> list[str]:
        return self.first.check_integrity(paths)

    def disagreements(self) -> list[str]:
        return self.first.disagreements() + self.base.disagreements()

    def prefetch(self) -> None:
        self.first.prefetch()

    def load_all(self) -> None:
        self.first.load_all()

    def release(self, t: Any) -> None:
        self.first.release(t)

    def close(self) -> None:
        self.first.close()
        self.base.close()
