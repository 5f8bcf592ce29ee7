"""One torch.save file holding a whole model: PyTorch Lightning's single-file `.ckpt` (DDP, one device,
FSDPStrategy(state_dict_type="full")), accelerate's FULL_STATE_DICT `pytorch_model_fsdp.bin`, or a user's
`torch.save(model.state_dict())`.

Such a file is gathered already, but the usual way to a model folder (torch.load, then save_pretrained) holds the
whole model in memory. torch.save writes a zip with each storage as one uncompressed record, so every tensor is one
piece of the file (its storage's record, from the tensor's offset, with its strides), which the writer streams as it
streams a rank file's. The pickle is decoded by the allowlisting unpickler (torchpickle): plain data and tensors,
nothing run. Objects of other classes beside the model (what save_hyperparameters() keeps in a Lightning checkpoint:
an argparse.Namespace, a config object) are decoded as inert records that keep nothing and run nothing, and their
classes are listed; one among the model's tensors is refused.

Which tensors are the model: `--key-prefix` when given; a Lightning checkpoint's `state_dict`, without the
LightningModule's attribute every name starts with (`model.`); a dict of tensors (a bare state dict); else the one
container named as a model's (`model`, `state_dict`, `module`, `model_state_dict`).

The optimizer (Lightning's `optimizer_states`, a training dict's `optimizer`, accelerate's `optimizer.bin` beside its
model file) is exported where its state is keyed by parameter name (`get_optimizer_state_dict`, FSDP's
`optim_state_dict`), not where `optimizer.state_dict()` keyed it by each parameter's position among the optimizer's
parameters: the file does not say which parameter each position is (optimizer/torchfile.py).
"""

from __future__ import annotations

import _compat_pickle
import math
import re
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, UnsupportedLayoutError
from . import torchpickle as tp
from .base import Oracle, Piece, Source, SourceTensor
from .rankfile import check_zip

LIGHTNING_VERSION = "pytorch-lightning_version"  # a key of every checkpoint dict Lightning's Trainer saves
MODEL_KEYS = ("model", "state_dict", "module", "model_state_dict")
OPTIMIZER_KEYS = ("optimizer_states", "optimizer", "optimizer_state_dict", "optim")
ACCELERATE_FULL = "pytorch_model_fsdp.bin"  # accelerate's save_state under FULL_STATE_DICT (its first model)
ACCELERATE_OPTIMIZER = "optimizer.bin"  # beside it: the first optimizer's state dict, by parameter name
SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # torch.save files' names: a damaged one is read, to say what is wrong
_LEGACY = b"\x80\x02\x8a\x0a"  # torch.save's format before torch 1.6: a protocol 2 pickle opening with a long
_STEP = re.compile(r"(?:^|[-_])step[=_-]?(\d+)(?:[-_.]|$)")

KeyPath = tuple[Any, ...]  # the keys from the saved object down to one tensor


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
    """The FULL_STATE_DICT model file of an accelerate save_state folder, or None."""
    path = folder / ACCELERATE_FULL
    return path if path.is_file() else None


class NotAName:
    """What a dict holds under a key that is no name (neither str nor int): no state dict's entry."""


def flatten(obj: Any) -> tuple[dict[str, tuple[KeyPath, Any]], set[str]]:
    """Every tensor in the saved object under its dotted name (as torch DCP flattens a state dict), with its key path,
    every object of a class beyond the allowlist (`tp.Inert`) and every entry whose key is no name (`NotAName`); and
    the dotted names two paths give (`{"a.b": x, "a": {"b": y}}`). Dicts and lists are walked, each once."""
    out: dict[str, tuple[KeyPath, Any]] = {}
    twice: set[str] = set()
    seen: set[int] = set()
    stack: list[tuple[KeyPath, Any]] = [((), obj)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, (tp.Local, tp.Wrapper, tp.Inert)):
            name = ".".join(map(str, path))
            if name in out:
                twice.add(name)
            out[name] = (path, v)
        elif isinstance(v, (dict, list, tuple)) and id(v) not in seen:
            seen.add(id(v))
            items = v.items() if isinstance(v, dict) else enumerate(v)
            stack.extend(reversed([((*path, k), x) if isinstance(k, (str, int)) else
                                   ((*path, f"<a {type(k).__name__} key>"), NotAName()) for k, x in items]))
        elif isinstance(v, NotAName):
            out[".".join(map(str, path))] = (path, v)
    return out, twice


def _container(prefix: str) -> str:
    return prefix if prefix.endswith(".") else prefix + "."


def read_torch_file(path: Path) -> tuple[tp.State, list[tuple[str, str]]]:
    """A torch.save file's pickle, decoded by the allowlisting unpickler, with each storage's place in the file, and
    the globals beyond the allowlist it names (decoded as inert records: nothing of them runs); a file it does not read
    is refused in one line that says why."""
    declined: list[str] = []
    inert = tp.InertGlobals()
    st = tp.read_state(path, declined, extra=inert)
    if st is not None:
        return st, sorted(inert)
    if declined:
        raise CheckpointError(f"{path}: not a torch.save file streammerge reads ({declined[0]}); nothing in it was run")
    if _legacy(path):
        raise CheckpointError(f"{path}: a file of torch.save's legacy format (torch before 1.6, or "
                              "_use_new_zipfile_serialization=False), which streammerge does not read: load it and "
                              "save it again with torch.save")
    check_zip(path)  # says what is wrong with the zip
    raise CheckpointError(f"{path}: not a torch.save file streammerge reads")


def _py3_name(name: tuple[str, str]) -> tuple[str, str]:
    """A global's name as Python 3 calls it (`__builtin__.getattr` -> `builtins.getattr`): torch's weights-only
    unpickler looks a protocol-2 pickle's names up so; the allowlisting unpickler keeps them as written."""
    mapped = _compat_pickle.NAME_MAPPING.get(name)
    return mapped if mapped is not None else (_compat_pickle.IMPORT_MAPPING.get(name[0], name[0]), name[1])


def _global(v: tp.Inert) -> str:
    return ".".join(v.global_name)


def at_path(obj: Any, path: KeyPath) -> Any:
    """What the saved object holds at key path `path`."""
    for k in path:
        obj = obj[k]
    return obj


def whole_tensor(file: Path, st: tp.State, name: str, path: KeyPath, rank: int = 0) -> SourceTensor:
    """The tensor at key path `path` of `file` (read as `st`) as one piece of the file: its storage's record, from the
    tensor's offset, with its strides (`rank`: which file of several, for messages)."""
    t = at_path(st.obj, path)
    key = ".".join(map(str, path))
    if isinstance(t, tp.Wrapper):
        raise UnsupportedLayoutError(f"{file}: {key!r} is a {t.cls.__name__} (one rank's shard of a sharded "
                                     "model), not a whole tensor: give the sharded save's folder")
    if isinstance(t, tp.Inert):
        raise CheckpointError(f"{file}: {key!r} is an object of {_global(t)} (nothing of it was run), which "
                              "streammerge does not merge: it merges tensors")
    if not isinstance(t, tp.Local) or t.storage.key not in st.offsets or t.storage.dtype is None:
        raise CheckpointError(f"{file}: {key!r} has no stored data")
    numel = math.prod(t.shape)
    if numel > 1 and any(stride == 0 and s > 1 for s, stride in zip(t.shape, t.stride)):
        raise UnsupportedLayoutError(f"{file}: {key!r} is saved as an expanded view (a stride of 0), whose "
                                     "elements share bytes; save it after .contiguous()")
    last = sum((s - 1) * stride for s, stride in zip(t.shape, t.stride)) if numel else -1
    if t.offset < 0 or numel and t.offset + last + 1 > t.storage.numel:
        raise CheckpointError(f"{file}: {key!r} reaches outside its storage (torch.load refuses it)")
    piece = Piece(rank, str(file), st.offsets[t.storage.key] + t.offset * t.dtype.itemsize, t.shape, t.stride,
                  (0,) * len(t.shape))
    return SourceTensor(name, t.shape, t.dtype, (piece,) if numel else ())


class TorchFileSource(Source):
    """A whole state dict in one torch.save file (the file is `path`)."""

    format = "torch.save file"
    takes_key_prefix = True
    oracle_after_plan = True  # it reads the tensors planning found (the optimizer's may be in a file beside)

    def __init__(self, path: Path):
        super().__init__(path)
        self._state: tp.State | None = None
        self._others: dict[Path, tp.State] = {}  # other files read (accelerate's optimizer.bin)
        self._split: tuple[str | None, dict[str, KeyPath], str, str] | None = None
        self._located: dict[str, tuple[Path, KeyPath]] = {}  # each planned tensor's file and key path, for verify
        self.inert: list[tuple[str, str]] = []  # globals the files name beyond the allowlist, read as inert records

    def state(self) -> tp.State:
        if self._state is None:
            self._state, inert = read_torch_file(self.path)
            self.inert += inert
            for name in inert:
                self.stats.left_out[".".join(name)] += 1
            self.stats.files = self.stats.decoded = 1
            obj = self._state.obj
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
        if (isinstance(obj, dict) and "ds_version" in obj) or \
                any(module.split(".")[0] == "deepspeed" for module, _ in self.inert):
            raise UnsupportedLayoutError(
                f"{self.path}: a DeepSpeed model states file, which streammerge does not read alone: its `module` "
                "holds the model in the training dtype, and a save with mixed precision keeps the float32 master "
                "weights elsewhere; streammerge reads ZeRO stages 1 to 3 from the step folder")
        flat, twice = flatten(obj)
        heads = sorted({name.split(".", 1)[0] for name in flat})
        attribute = ""
        if key_prefix is not None:
            prefix, how = _container(key_prefix), f"--key-prefix {key_prefix!r}"
            if not any(name.startswith(prefix) for name in flat):
                raise ConfigError(f"{self.path}: no tensor key starts with --key-prefix {prefix!r} (keys start with "
                                  f"{', '.join(h + '.' for h in heads[:6])})")
        elif self.lightning():
            prefix, how = "state_dict.", "the LightningModule's state dict (Lightning's `state_dict`)"
        elif isinstance(obj, dict) and obj and all(isinstance(v, (tp.Local, tp.Wrapper, tp.Inert))
                                                   for v in obj.values()):
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
        odd = [key for key in model.values() if isinstance(flat[key][1], NotAName)]
        if odd:
            raise CheckpointError(f"{self.path}: {odd[0]!r}: the model's state dict holds an entry whose key is no "
                                  "name, which no state dict holds; streammerge merges named tensors")
        objects = [key for key in model.values() if isinstance(flat[key][1], tp.Inert)]
        if objects:
            raise CheckpointError(f"{self.path}: {objects[0]!r} among the model's tensors is an object of "
                                  f"{_global(flat[objects[0]][1])} (nothing of it was run), which streammerge does not "
                                  "merge: it merges tensors")
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
        return {name: self.file_tensor(self.path, st, name, path) for name, path in model.items()}

    def file_tensor(self, file: Path, st: tp.State, name: str, path: KeyPath) -> SourceTensor:
        """The tensor at key path `path` of `file` (read as `st`), as one piece of the file; verify's oracle finds it
        by `name`."""
        t = whole_tensor(file, st, name, path)
        self._located[name] = (file, path)
        return t

    def _optimizer(self) -> tuple[Path, tp.State, KeyPath] | str | None:
        """Where the optimizer's state dict is (its file, read; its key path there), or why none is exported, or None
        where the checkpoint holds none: in the file (Lightning's `optimizer_states`, a training dict's `optimizer`),
        else accelerate's `optimizer.bin` beside its FULL_STATE_DICT model file."""
        obj = self.state().obj
        found = [(k, obj[k]) for k in OPTIMIZER_KEYS if isinstance(obj, dict) and obj.get(k)
                 and isinstance(obj[k], (dict, list))]
        if found:
            key, value = found[0]
            if isinstance(value, list):  # Lightning: one state dict per optimizer configure_optimizers returned
                if len(value) != 1:
                    return (f"the checkpoint holds {len(value)} optimizers ({key}), and the export is one "
                            "optimizer's state")
                return self.path, self._state_of(self.path), (key, 0)
            return self.path, self._state_of(self.path), (key,)
        if self.path.name == ACCELERATE_FULL:
            beside = sorted(p.name for p in self.path.parent.glob("optimizer*.bin"))
            if len(beside) > 1:
                return f"{self.path.parent} holds {len(beside)} optimizers ({', '.join(beside)})"
            if beside == [ACCELERATE_OPTIMIZER]:
                other = self.path.parent / ACCELERATE_OPTIMIZER
                return other, self._state_of(other), ()
        return None

    def _state_of(self, file: Path) -> tp.State:
        if file == self.path:
            return self.state()
        if file not in self._others:
            self._others[file], inert = read_torch_file(file)
            self.inert += inert
        return self._others[file]

    def has_optimizer(self) -> bool:
        try:
            return self._optimizer() is not None
        except CheckpointError:
            return True  # optimizer_plan says why it is not exported

    def optimizer_plan(self, weights: Any, options: Any, config: Any, model_dir: Path | None
                       ) -> tuple[Any, list[str]]:
        from ..optimizer.torchfile import plan_file_optimizer
        from .lora import NOTE as LORA_NOTE

        try:
            found = self._optimizer()
        except CheckpointError as e:
            return None, [f"optimizer not exported: {e}"]
        if found is None:
            return None, []
        if isinstance(found, str):
            return None, [f"optimizer not exported: {found}"]
        file, st, at = found
        peft = None
        if any(n.startswith(LORA_NOTE) for n in weights.notes):  # its optimizer names the peft model's parameters
            peft = {name: t.shape for name, t in self.tensors(options).items()}
        _, _, attribute = self.split(options.key_prefix)
        return plan_file_optimizer(self, file, st, at, weights, options, peft=peft, module_prefix=attribute)

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
        beside = self.path.parent / ACCELERATE_OPTIMIZER
        return [self.path, beside] if self.path.name == ACCELERATE_FULL and beside.is_file() else [self.path]

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
            flat, _ = flatten(self.state().obj)
            try:
                found = self._optimizer()
            except CheckpointError as e:
                found = str(e)
            if isinstance(found, str):
                lines.append(f"optimizer   not exported: {found}")
            elif found is not None:
                file, st, at = found
                where = ".".join(map(str, at))
                osd = at_path(st.obj, at)
                state = osd.get("state") if isinstance(osd, dict) else None
                named = isinstance(state, dict) and all(isinstance(k, str) for k in state)
                lines.append(f"optimizer   {file.name}" + (f": {where}.*" if where else "") + (
                    ", by parameter name" if named else ", not exported: its state is keyed by position"))
                if file == self.path:
                    taken |= {name for name in flat if name.startswith(where + ".")}
            left = Counter(name.split(".", 1)[0] for name, (_, v) in flat.items()
                           if name not in taken and isinstance(v, (tp.Local, tp.Wrapper)))
            if left:
                lines.append("not merged  " + ", ".join(f"{k}.* ({n} tensors)" for k, n in sorted(left.items())))
        return lines

    def oracle(self, options: Any) -> Oracle:
        model, _, _ = self.split(options.key_prefix)
        return TorchFileOracle({**{name: (self.path, path) for name, path in model.items()}, **self._located},
                               self.inert)


def open_torch_file(path: Path) -> TorchFileSource:
    return TorchFileSource(path)


class TorchFileOracle(Oracle):
    """The files as `torch.load(weights_only=True, mmap=True)` gives them; each name's tensor found by its file and key
    path. Classes the files name beyond torch's allowlist (`inert`: none is in the model, which the source refused)
    are allowlisted as inert stand-ins under their names, as torch's `safe_globals` takes them: nothing of them runs.
    The zip records' CRC-32s (which torch.load does not check) are checked by the rank files' oracle's streaming."""

    def __init__(self, located: dict[str, tuple[Path, KeyPath]], inert: Sequence[tuple[str, str]] = ()):
        from .verl_oracle import VerlOracle

        self.located, self.inert = located, list(inert)
        self._loaded: dict[Path, Any] = {}
        self._zip = VerlOracle(sorted({f for f, _ in located.values()}), 1)

    def load_all(self) -> None:
        import torch

        from .picklescan import torch_load

        stand_ins: list[Any] = [tp.inert_class(*name) for name in {*self.inert, *map(_py3_name, self.inert)}]
        for file in sorted({f for f, _ in self.located.values()} - set(self._loaded)):
            try:
                with torch.serialization.safe_globals(stand_ins):
                    self._loaded[file] = torch_load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # noqa: BLE001  (torch's loader raises many kinds; each is a file it refuses)
                raise CheckpointError(f"{file}: torch.load(weights_only=True) refuses it ({type(e).__name__}: "
                                      f"{(str(e).splitlines() or [''])[0][:200]})") from None

    def tensor(self, name: str) -> Any:
        where = self.located.get(name)
        if where is None:
            return None
        self.load_all()
        return at_path(self._loaded[where[0]], where[1])

    def shape(self, name: str) -> tuple[tuple[int, ...], str] | None:
        t = self.tensor(name)
        return None if t is None else (tuple(t.shape), str(t.dtype).removeprefix("torch."))

    def read(self, name: str, box: tuple[tuple[int, int], ...]) -> Any:
        return self.tensor(name)[tuple(slice(lo, hi) for lo, hi in box)].clone()

    def locate(self, name: str, index: tuple[int, ...]) -> str:
        where = self.located.get(name)
        return where[0].name if where else "the checkpoint"

    def check_integrity(self, paths: Any) -> list[str]:
        return self._zip.check_integrity(paths)

    def crc_by_slow_reader(self) -> dict[str, int]:
        return self._zip.crc_by_slow_reader()

    def close(self) -> None:
        self._zip.close()
        self._loaded.clear()
