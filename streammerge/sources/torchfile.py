"""One torch.save file holding a whole model: PyTorch Lightning's single-file `.ckpt` (DDP, one device,
FSDPStrategy(state_dict_type="full")), accelerate's FULL_STATE_DICT `pytorch_model_fsdp.bin`, or a user's
`torch.save(model.state_dict())`.

Such a file is gathered already, but the usual way to a model folder (torch.load, then save_pretrained) holds the
whole model in memory. torch.save writes a zip with each storage as one uncompressed record, so every tensor is one
piece of the file (its storage's record, from the tensor's offset, with its strides), which the writer streams as it
streams a rank file's. The pickle is decoded by the allowlisting unpickler (torchpickle): plain data and tensors,
nothing run; a pickle naming any other class is refused in one line.

Which tensors are the model: `--key-prefix` when given; a Lightning checkpoint's `state_dict`, without the
LightningModule's attribute every name starts with (`model.`); a dict of tensors (a bare state dict); else the one
container named as a model's (`model`, `state_dict`, `module`, `model_state_dict`).

The optimizer is not exported: `optimizer.state_dict()` keys each parameter's state by its position among the
optimizer's parameters, and the file does not say which parameter each position is (a sharded save names them).
"""

from __future__ import annotations

import math
import re
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, UnsupportedLayoutError
from . import torchpickle as tp
from .base import Oracle, Piece, Source, SourceTensor
from .rankfile import check_zip

LIGHTNING_VERSION = "pytorch-lightning_version"  # a key of every checkpoint dict Lightning's Trainer saves
MODEL_KEYS = ("model", "state_dict", "module", "model_state_dict")
OPTIMIZER_KEYS = ("optimizer_states", "optimizer", "optimizer_state_dict", "optim")
ACCELERATE_FULL = re.compile(r"^pytorch_model_fsdp(?:_0)?\.bin$")  # accelerate's save_state, FULL_STATE_DICT
_STEP = re.compile(r"(?:^|[-_])step[=_-]?(\d+)(?:[-_.]|$)")

KeyPath = tuple[Any, ...]  # the keys from the saved object down to one tensor


SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # torch.save files' names: a damaged one is read, to say what is wrong
_LEGACY = b"\x80\x02\x8a\x0a"  # torch.save's format before torch 1.6: a protocol 2 pickle opening with a long


def holds(path: Path) -> bool:
    """A file (not a folder) that torch.save wrote, or named as one; what it holds is decided on opening."""
    return path.is_file() and (path.suffix in SUFFIXES or zipfile.is_zipfile(path) or _legacy(path))


def _legacy(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(_LEGACY)) == _LEGACY
    except OSError:
        return False


def accelerate_full(folder: Path) -> Path | None:
    """The one FULL_STATE_DICT model file of an accelerate save_state folder, or None."""
    try:
        found = [p for p in folder.iterdir() if ACCELERATE_FULL.match(p.name) and p.is_file()]
    except OSError:
        return None
    return found[0] if len(found) == 1 else None


def _flatten(obj: Any) -> tuple[dict[str, tuple[KeyPath, Any]], set[str]]:
    """Every tensor in the saved object under its dotted name (as torch DCP flattens a state dict), with its key path;
    and the dotted names two paths give (`{"a.b": x, "a": {"b": y}}`). Dicts and lists are walked, each once."""
    out: dict[str, tuple[KeyPath, Any]] = {}
    twice: set[str] = set()
    seen: set[int] = set()
    stack: list[tuple[KeyPath, Any]] = [((), obj)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, (tp.Local, tp.Wrapper)):
            name = ".".join(map(str, path))
            if name in out:
                twice.add(name)
            out[name] = (path, v)
        elif isinstance(v, (dict, list, tuple)) and id(v) not in seen:
            seen.add(id(v))
            items = v.items() if isinstance(v, dict) else enumerate(v)
            stack.extend(reversed([((*path, k), x) for k, x in items if isinstance(k, (str, int))]))
    return out, twice


def _container(prefix: str) -> str:
    return prefix if prefix.endswith(".") else prefix + "."


class TorchFileSource(Source):
    """A whole state dict in one torch.save file (the file is `path`)."""

    format = "torch.save file"
    takes_key_prefix = True

    def __init__(self, path: Path):
        super().__init__(path)
        self._state: tp.State | None = None
        self._split: tuple[str | None, dict[str, KeyPath], str, str] | None = None

    def state(self) -> tp.State:
        if self._state is None:
            declined: list[str] = []
            st = tp.read_state(self.path, declined)
            if st is None:
                if declined and " " not in declined[0]:  # a global's name: module.qualname
                    raise CheckpointError(
                        f"{self.path}: not a torch.save file streammerge reads (its pickle names {declined[0]}, "
                        "neither plain data nor a tensor: in a Lightning .ckpt, an object save_hyperparameters() "
                        "kept); nothing in it was run, and torch.load(weights_only=True) refuses it too. A file you "
                        "trust can be saved again without that entry")
                if declined:
                    raise CheckpointError(f"{self.path}: not a torch.save file streammerge reads ({declined[0]}); "
                                          "nothing in it was run")
                if _legacy(self.path):
                    raise CheckpointError(f"{self.path}: a file of torch.save's legacy format (torch before 1.6, or "
                                          "_use_new_zipfile_serialization=False), which streammerge does not read: "
                                          "load it and save it again with torch.save")
                check_zip(self.path)  # says what is wrong with the zip
                raise CheckpointError(f"{self.path}: not a torch.save file streammerge reads")
            self._state = st
            self.stats.files = self.stats.decoded = 1
            obj = st.obj
            step = obj.get("global_step") if isinstance(obj, dict) and LIGHTNING_VERSION in obj else None
            m = _STEP.search(self.path.stem)
            self.step = step if type(step) is int and step >= 0 else int(m.group(1)) if m else None
        return self._state

    def lightning(self) -> bool:
        obj = self.state().obj
        return isinstance(obj, dict) and LIGHTNING_VERSION in obj and isinstance(obj.get("state_dict"), dict)

    def split(self, key_prefix: str | None) -> tuple[dict[str, KeyPath], str, str]:
        """(output name -> key path of each model tensor, how they were chosen, the LightningModule attribute
        stripped)."""
        if self._split is None or self._split[0] != key_prefix:
            self._split = (key_prefix, *self._choose(key_prefix))
        return self._split[1:]

    def _choose(self, key_prefix: str | None) -> tuple[dict[str, KeyPath], str, str]:
        from .dcp import lightning_attribute, unwrapped

        obj = self.state().obj
        flat, twice = _flatten(obj)
        heads = sorted({name.split(".", 1)[0] for name in flat})
        attribute = ""
        if key_prefix is not None:
            prefix, how = _container(key_prefix), f"--key-prefix {key_prefix!r}"
            if not any(name.startswith(prefix) for name in flat):
                raise ConfigError(f"{self.path}: no tensor key starts with --key-prefix {prefix!r} (keys start with "
                                  f"{', '.join(h + '.' for h in heads[:6])})")
        elif self.lightning():
            prefix, how = "state_dict.", "the LightningModule's state dict (Lightning's `state_dict`)"
        elif isinstance(obj, dict) and obj and all(isinstance(v, (tp.Local, tp.Wrapper)) for v in obj.values()):
            prefix, how = "", "every key (a state dict)"
        else:
            found = [k for k in MODEL_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)
                     and any(name.startswith(k + ".") for name in flat)]
            if len(found) > 1:
                raise CheckpointError(f"{self.path}: several model containers ({', '.join(found)}): say which one is "
                                      f"the model with --key-prefix, e.g. --key-prefix {found[0]}.")
            if not found:
                raise CheckpointError(f"{self.path}: cannot tell which tensors are the model (the saved "
                                      f"{type(obj).__name__} holds {', '.join(heads[:6]) or 'no tensor'}); name them "
                                      f"with --key-prefix{', e.g. --key-prefix ' + heads[0] + '.' if heads else ''}")
            prefix, how = found[0] + ".", f"the {found[0]!r} container of the saved dict"
        model = {name[len(prefix):]: name for name in flat if name.startswith(prefix) and len(name) > len(prefix)}
        if not model:
            raise CheckpointError(f"{self.path}: {how} holds no tensor")
        if key_prefix is None and self.lightning():
            attribute = lightning_attribute(model) or ""
            model = {name[len(attribute):]: key for name, key in model.items()}
        both = sorted(set(model.values()) & twice)
        if both:
            raise CheckpointError(f"{self.path}: two tensors are both named {both[0]!r} (a key with dots beside a "
                                  "nested dict of the same path), and the merge would keep one")
        named = unwrapped(model, self.path)
        if named != model:
            how += ", wrapper segments removed"
        return {name: flat[key][0] for name, key in named.items()}, how, attribute

    def tensors(self, options: Any) -> dict[str, SourceTensor]:
        st = self.state()
        model, _, _ = self.split(options.key_prefix)
        out = {}
        for name, path in model.items():
            out[name] = self._tensor(st, name, path)
        return out

    def _tensor(self, st: tp.State, name: str, path: KeyPath) -> SourceTensor:
        t: Any = st.obj
        for k in path:
            t = t[k]
        key = ".".join(map(str, path))
        if isinstance(t, tp.Wrapper):
            raise UnsupportedLayoutError(f"{self.path}: {key!r} is a {t.cls.__name__} (one rank's shard of a sharded "
                                         "model), not a whole tensor: give the sharded save's folder")
        if t.storage.key not in st.offsets or t.storage.dtype is None:
            raise CheckpointError(f"{self.path}: {key!r} has no stored data")
        numel = math.prod(t.shape)
        if numel > 1 and any(st_ == 0 and s > 1 for s, st_ in zip(t.shape, t.stride)):
            raise UnsupportedLayoutError(f"{self.path}: {key!r} is saved as an expanded view (a stride of 0), whose "
                                         "elements share bytes; save it after .contiguous()")
        last = sum((s - 1) * st_ for s, st_ in zip(t.shape, t.stride)) if numel else -1
        if t.offset < 0 or numel and t.offset + last + 1 > t.storage.numel:
            raise CheckpointError(f"{self.path}: {key!r} reaches outside its storage (torch.load refuses it)")
        piece = Piece(0, str(self.path), st.offsets[t.storage.key] + t.offset * t.dtype.itemsize, t.shape, t.stride,
                      (0,) * len(t.shape))
        return SourceTensor(name, t.shape, t.dtype, (piece,) if numel else ())

    def _optimizer_keys(self) -> list[str]:
        obj = self.state().obj
        return [k for k in OPTIMIZER_KEYS if isinstance(obj, dict) and obj.get(k)]

    def warnings(self, options: Any) -> list[str]:
        found = self._optimizer_keys()
        if not found or not options.optimizer:
            return []
        return [f"optimizer not exported: {self.path.name}'s {found[0]!r} keys each parameter's state by its "
                "position in the optimizer, and the file does not say which parameter each position is (a sharded "
                "save names them)"]

    def names_hint(self) -> str | None:
        """A LightningModule with more than one attribute (a model and a value head) keeps its names."""
        if self._split is None or self._split[3] or not self.lightning():
            return None
        heads = Counter(name.split(".", 1)[0] for name in self._split[1] if "." in name)
        if not heads:
            return None
        head = heads.most_common(1)[0][0]
        return (f"this is a LightningModule's state dict, and more than its {head!r} attribute: --key-prefix "
                f"state_dict.{head}. takes that attribute alone")

    def files(self) -> list[Path]:
        return [self.path]

    def info(self) -> dict[str, Any]:
        obj = self.state().obj
        return {"lightning": obj.get(LIGHTNING_VERSION) if self.lightning() else None}

    def describe(self) -> list[str]:
        lines = super().describe()
        if self._split is not None:
            model, how, attribute = self._split[1:]
            lines.append(f"model       {len(model)} tensors: {how}"
                         + (f", the LightningModule's attribute {attribute!r} stripped" if attribute else ""))
            taken = {".".join(map(str, p)) for p in model.values()}
            flat, _ = _flatten(self.state().obj)
            left = Counter(name.split(".", 1)[0] for name in flat if name not in taken)
            if left:
                lines.append("not merged  " + ", ".join(f"{k}.* ({n} tensors)" for k, n in sorted(left.items())))
        return lines

    def oracle(self, options: Any) -> Oracle:
        model, _, _ = self.split(options.key_prefix)
        return TorchFileOracle(self.path, model)


def open_torch_file(path: Path) -> TorchFileSource:
    return TorchFileSource(path)


class TorchFileOracle(Oracle):
    """The file as `torch.load(weights_only=True, mmap=True)` gives it; each name's tensor found by its key path.
    The zip records' CRC-32s (which torch.load does not check) are checked by the rank files' oracle's streaming."""

    def __init__(self, path: Path, model: dict[str, KeyPath]):
        from .verl_oracle import VerlOracle

        self.path, self.model = path, model
        self._obj: Any = None
        self._zip = VerlOracle([path], 1)

    def load_all(self) -> None:
        if self._obj is None:
            from .picklescan import torch_load

            try:
                self._obj = torch_load(self.path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # noqa: BLE001  (torch's loader raises many kinds; each is a file it refuses)
                raise CheckpointError(f"{self.path}: torch.load(weights_only=True) refuses it ({type(e).__name__}: "
                                      f"{(str(e).splitlines() or [''])[0][:200]})") from None

    def _get(self, name: str) -> Any:
        self.load_all()
        path = self.model.get(name)
        if path is None:
            return None
        t = self._obj
        for k in path:
            t = t[k]
        return t

    def shape(self, name: str) -> tuple[tuple[int, ...], str] | None:
        t = self._get(name)
        return None if t is None else (tuple(t.shape), str(t.dtype).removeprefix("torch."))

    def read(self, name: str, box: tuple[tuple[int, int], ...]) -> Any:
        return self._get(name)[tuple(slice(lo, hi) for lo, hi in box)].clone()

    def locate(self, name: str, index: tuple[int, ...]) -> str:
        return self.path.name

    def check_integrity(self, paths: Any) -> list[str]:
        return self._zip.check_integrity(paths)

    def crc_by_slow_reader(self) -> dict[str, int]:
        return self._zip.crc_by_slow_reader()

    def close(self) -> None:
        self._zip.close()
        self._obj = None
