"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3): the float32 master weights, streamed from each rank's partition.

`engine.save_checkpoint(DIR)` writes `DIR/latest` (the tag) and `DIR/global_stepN/` holding
- the model states: `mp_rank_00_model_states.pt` (stages 1 and 2) or each rank's
  `zero_pp_rank_R_mp_rank_00_model_states.pt` (stage 3): `param_shapes` (per optimizer group, each parameter's name
  and shape in the order of the group's flat buffer), `shared_params` (a tied name -> the name it shares),
  `buffer_names` and `module` (the buffers' values; in stages 1 and 2 also the 16-bit weights), frozen parameters;
- each rank's optimizer partition, `[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`: `optimizer_state_dict` with
  the stage, the partition count and one flat float32 tensor per group (`single_partition_of_fp32_groups` in stages 1
  and 2, `fp32_flat_groups` in stage 3), and the torch optimizer's state over those flat tensors (exp_avg, ...).

The master weights lie in those flat tensors as DeepSpeed's own zero_to_fp32.py reassembles them:
- stages 1 and 2: a group's flat buffer is the ranks' partitions end to end, and its parameters lie in it one after
  another in `param_shapes` order, each followed by its `param_alignment_paddings` entry;
- stage 3: every parameter is cut into world-size chunks of ceil(numel / world size) elements (the last padded), and
  each rank's flat tensors, end to end over the groups, hold its chunk of every parameter in `param_shapes` order.
Each parameter is therefore a few contiguous runs of float32 in the partition files: pieces of the flattened tensor,
which the writer streams like any other. The optimizer's exp_avg and exp_avg_sq lie in the same layout.

The pickles name three DeepSpeed classes (its loss scaler, ZeRO stage enum and fragment address), which torch's
weights-only unpickler refuses; DeepSpeed and its zero_to_fp32.py load these files with weights_only=False. Here those
names decode to inert records (nothing from the file runs), and any other name is refused.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import dtypes
from ..errors import CheckpointError, UnsupportedLayoutError
from ..paths import NotAFile, read_small
from . import torchpickle as tp
from .base import Piece, Source, SourceTensor, row_major

MODEL_STATES = "mp_rank_00_model_states.pt"  # stages 1 and 2 (and 0)
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_STEP = re.compile(r"^global_step(\d+)$")
LATEST = "latest"


def _zero_stage(value: Any) -> int:
    if type(value) is not int:
        raise tp.NotPlain(f"ZeroStageEnum({str(value)[:20]})")
    return value


# DeepSpeed's classes in its optimizer files, as inert records (their pickled state kept, nothing run)
GLOBALS: dict[tuple[str, str], Any] = {
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"): tp.Obj,
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"): tp.Obj,
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"): tp.Global(_zero_stage),
    ("deepspeed.utils.tensor_fragment", "fragment_address"): tp.Obj,
    ("torch", "Tensor"): tp.PlainTensor,
}


def _optim_files(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if _OPTIM.match(p.name)]
    except OSError:
        return []


def _tag(folder: Path) -> str:
    """The text of DeepSpeed's `latest` tag in `folder` ("" where there is none; anything long is no tag, unread)."""
    try:
        tag = read_small(folder / LATEST) if (folder / LATEST).is_file() and \
            (folder / LATEST).stat().st_size < 256 else None
    except (OSError, NotAFile):
        return ""
    return tag.decode(errors="replace").strip() if tag is not None else ""


def tagged_folder(path: Path) -> Path | None:
    """The step folder `path`'s `latest` tag names, where it is one."""
    name = _tag(path)
    if not name or "/" in name or name in (".", ".."):
        return None
    return path / name if (path / name).is_dir() else None


def step_folder(path: Path) -> Path | None:
    """The folder holding the ZeRO partitions: `path` itself, or the one its `latest` tag names (a save folder, or
    the HF Trainer's checkpoint-N/)."""
    if _optim_files(path):
        return path
    tagged = tagged_folder(path)
    return tagged if tagged is not None and _optim_files(tagged) else None


def tagged_step(run_dir: Path) -> int | None:
    """The step DeepSpeed's `latest` tag names (`global_stepN`, written once a save is complete), else None."""
    m = _STEP.fullmatch(_tag(run_dir))
    return int(m.group(1)) if m and len(m.group(1)) <= 20 else None


def holds(path: Path) -> bool:
    return step_folder(path) is not None


def open_deepspeed(path: Path) -> DeepSpeedSource:
    folder = step_folder(path)
    assert folder is not None
    return DeepSpeedSource(folder)


@dataclass(frozen=True)
class Flat:
    """One rank's flat tensor (of one group): where its elements lie in its file."""

    rank: int
    file: str
    offset: int  # byte offset of element 0
    numel: int
    dtype: dtypes.DType


ParamGroup = tuple[dict[str, Any], list[int]]  # an optimizer param group's settings, and the flat groups it holds


@dataclass(frozen=True)
class ZeroLayout:
    """What the model states and optimizer partitions say of where each parameter lies."""

    stage: int
    world_size: int
    groups: list[list[tuple[str, tuple[int, ...]]]]  # per flat group, (name, shape) in flat order (ZeRO-3: per
    # sub-group, as it cuts a group of more than `sub_group_size` elements into several of whole parameters)
    paddings: list[list[int]] | None  # stages 1 and 2: elements after each parameter
    shared: dict[str, str]  # tied name -> the parameter it shares
    buffers: dict[str, SourceTensor]
    frozen: dict[str, SourceTensor]  # parameters no optimizer holds (a LoRA run's base), in the training dtype
    flats: dict[str, list[list[Flat]]]  # "fp32" (master weights), "exp_avg", ...: [rank][group]
    steps: list[Flat | None]  # per flat group: the optimizer's step (rank 0's scalar)
    hyper: list[ParamGroup]  # per optimizer param group
    global_steps: int | None
    version: str | None
    order: tuple[str, ...] = ()  # the model's state dict order (the module state dict's keys)

    def pieces(self, what: str, group: int, index: int) -> list[Piece]:
        """Where parameter `index` of `group` lies in the `what` flats: runs of its flattened elements."""
        return (_pieces_12 if self.stage <= 2 else _pieces_3)(self, self.flats[what], group, index)

    @functools.cached_property
    def starts(self) -> list[list[int]]:
        """Where each parameter starts, per group: stages 1 and 2, in its group's flat buffer (the ranks' partitions
        end to end); stage 3, in every rank's flats end to end, where its chunk lies. One pass for all: a model of
        thousands of parameters (an MoE's experts) would be summed again for each one."""
        out: list[list[int]] = []
        at = 0
        for g, params in enumerate(self.groups):
            pads = self.paddings[g] if self.paddings is not None else [0] * len(params)
            if self.stage <= 2:
                at = 0
            row = []
            for (_, shape), pad in zip(params, pads):
                row.append(at)
                at += math.prod(shape) + pad if self.stage <= 2 else -(-math.prod(shape) // self.world_size)
            out.append(row)
        return out


def _pieces_12(z: ZeroLayout, flats: list[list[Flat]], group: int, index: int) -> list[Piece]:
    start = z.starts[group][index]
    numel = math.prod(z.groups[group][index][1])
    out, base = [], 0  # the ranks' partitions end to end (the last rank's may be longer: the group's padding)
    for r in range(z.world_size):
        f = flats[r][group]
        lo, hi = max(start, base), min(start + numel, base + f.numel)
        if lo < hi:
            out.append(Piece(r, f.file, f.offset + (lo - base) * f.dtype.itemsize, (hi - lo,), (1,), (lo - start,)))
        base += f.numel
    return out


def _pieces_3(z: ZeroLayout, flats: list[list[Flat]], group: int, index: int) -> list[Piece]:
    numel = math.prod(z.groups[group][index][1])
    chunk = -(-numel // z.world_size)
    start = z.starts[group][index]  # in each rank's flats, end to end
    out = []
    for r in range(z.world_size):
        first, length = r * chunk, max(0, min(chunk, numel - r * chunk))  # the last chunks hold padding or nothing
        base = 0
        for f in flats[r]:
            lo, hi = max(start, base), min(start + length, base + f.numel)
            if lo < hi:
                out.append(Piece(r, f.file, f.offset + (lo - base) * f.dtype.itemsize, (hi - lo,), (1,),
                                 (first + lo - start,)))
            base += f.numel
    return out


def _check_sizes(z: ZeroLayout, where: Path) -> None:
    """The master weights' flats hold exactly the parameters, as zero_to_fp32 checks (stages 1 and 2: up to
    DeepSpeed's alignment of each group to 2 x world size elements)."""
    flats = z.flats["fp32"]
    for g, params in enumerate(z.groups):
        if z.stage <= 2:
            pads = z.paddings[g] if z.paddings is not None else [0] * len(params)
            used = sum(math.prod(s) + p for (_, s), p in zip(params, pads))
            have = sum(flats[r][g].numel for r in range(z.world_size))
            align = 2 * z.world_size
            if -(-used // align) * align != -(-have // align) * align:
                raise CheckpointError(f"{where}: the master weights of group {g} hold {have} elements, its "
                                      f"parameters {used} (a partition of another save?)")
    if z.stage == 3:
        want = sum(-(-math.prod(s) // z.world_size) for g in z.groups for _, s in g)
        for r in range(z.world_size):
            have = sum(f.numel for f in flats[r])
            if have != want:
                raise CheckpointError(f"{where}: rank {r}'s master weights hold {have} elements, its chunks of "
                                      f"the parameters {want} (a partition of another save?)")


def _state_like_weights(state: list[list[Flat]], weights: list[list[Flat]], pads: Any) -> list[list[Flat]] | None:
    """The optimizer state's flats cut to the weights' (stages 1 and 2 save the last rank's master weights without the
    group's padding at their end, and its state with it); None where the state is laid out otherwise."""
    last = len(weights) - 1
    out = []
    for r, (per_s, per_w) in enumerate(zip(state, weights)):
        row = []
        for g, (s, w) in enumerate(zip(per_s, per_w)):
            extra = s.numel - w.numel
            if extra and not (r == last and isinstance(pads, list) and g < len(pads) and pads[g] == extra):
                return None
            row.append(Flat(s.rank, s.file, s.offset, w.numel, s.dtype))
        out.append(row)
    return out


class DeepSpeedSource(Source):
    """A DeepSpeed ZeRO step folder (global_stepN/)."""

    format = "DeepSpeed ZeRO"

    def __init__(self, folder: Path):
        from .dcp import find_hf_dir

        m = _STEP.match(folder.name)
        super().__init__(folder, step=int(m.group(1)) if m else None, hf_dir=find_hf_dir(folder))
        self._layout: ZeroLayout | None = None
        self._tensors: dict[str, SourceTensor] | None = None  # the weights' (the optimizer plan names them too)
        self._files: list[Path] = []

    @property
    def root(self) -> Path:
        """huggingface/ may sit beside the step folder."""
        return self.path.parent if self.hf_dir is not None and self.hf_dir.parent == self.path.parent else self.path

    def trainer_folder(self) -> Path | None:
        """The HF Trainer's checkpoint-N/ (config.json, the tokenizer or peft's adapter_config.json beside `latest`
        and global_stepN/, among its trainer_state.json, scheduler.pt and DeepSpeed's scripts, which are no part of a
        model folder); else the step folder itself."""
        return self.path.parent if _tag(self.path.parent) == self.path.name else self.path

    def layout(self) -> ZeroLayout:
        if self._layout is None:
            self._layout = self._read()
        return self._layout

    def _read(self) -> ZeroLayout:
        optim = sorted(_optim_files(self.path), key=lambda p: int(_OPTIM.match(p.name).group(1)))  # type: ignore[union-attr]
        if any(_OPTIM.match(p.name).group(2) != "00" for p in optim):  # type: ignore[union-attr]
            raise UnsupportedLayoutError(f"{self.path}: a DeepSpeed checkpoint of tensor (model) parallel training "
                                         "(mp_rank_01 and up), which streammerge does not merge")
        ranks = [int(_OPTIM.match(p.name).group(1)) for p in optim]  # type: ignore[union-attr]
        if ranks != list(range(len(ranks))) or len({p.name.startswith("bf16_") for p in optim}) != 1:
            raise CheckpointError(f"{self.path}: the optimizer partitions are not one save's ranks 0..N-1 "
                                  f"({', '.join(p.name for p in optim[:4])}...)")
        states = [self._state(p, "a DeepSpeed optimizer partition") for p in optim]
        osd = [self._field(s.obj, "optimizer_state_dict", dict, p) for s, p in zip(states, optim)]
        stage = self._field(osd[0], "zero_stage", int, optim[0])
        counts = osd[0].get("partition_count")
        world = max(counts) if isinstance(counts, list) and counts and all(type(c) is int for c in counts) else counts
        if stage not in (1, 2, 3):
            raise UnsupportedLayoutError(f"{optim[0]}: ZeRO stage {stage}, which streammerge does not merge")
        if type(world) is not int or world != len(optim) or isinstance(counts, list) and len(set(counts)) != 1:
            raise CheckpointError(f"{self.path}: {len(optim)} optimizer partitions, but they were saved by "
                                  f"{world if type(world) is int else counts} ranks (an earlier save's files mixed "
                                  "in, or some missing)")
        model_file = self.path / MODEL_STATES if stage <= 2 else self.path / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        if not model_file.is_file():
            raise CheckpointError(f"{model_file}: not there; a ZeRO stage {stage} save writes it beside the optimizer "
                                  "partitions")
        model = self._state(model_file, "DeepSpeed model states")
        groups = self._param_groups(model.obj, model_file)
        frozen, model_files = self._frozen(model, model_file, stage, world)
        shared = model.obj.get("shared_params") or {}
        if not (isinstance(shared, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items())):
            raise CheckpointError(f"{model_file}: shared_params is not a map of names")
        key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
        flats = {"fp32": [self._flats(s, o, key, p, r) for r, (s, o, p) in enumerate(zip(states, osd, optim))]}
        if any(len(f) != len(groups) for f in flats["fp32"]):
            raise CheckpointError(f"{optim[0]}: the optimizer partitions hold {len(flats['fp32'][0])} flat groups, "
                                  f"the model states list {len(groups)}")
        base_key = "base_optimizer_state" if stage <= 2 else "optimizer_state_dict"
        state, steps, hyper = self._optimizer_state(states, osd, optim, base_key, len(groups))
        paddings = osd[0].get("param_alignment_paddings") if stage <= 2 else None
        if paddings is not None and not (isinstance(paddings, list) and len(paddings) == len(groups) and all(
                isinstance(p, list) and len(p) == len(g) and all(type(x) is int and x >= 0 for x in p)
                for p, g in zip(paddings, groups))):
            raise CheckpointError(f"{optim[0]}: its param_alignment_paddings do not list the parameters of the model "
                                  "states' groups (a partition of another save?)")
        buffers = self._buffers(model, model_file)
        self._files = [*optim, *model_files]
        self.stats.files = len(self._files)
        self.stats.decoded = len(self._files)
        steps_done = model.obj.get("global_steps")
        version = model.obj.get("ds_version")
        module = model.obj.get("module")
        order = tuple(k for k in module if isinstance(k, str)) if isinstance(module, dict) else ()
        pads = osd[-1].get("group_paddings") if stage <= 2 else None
        for k, per_rank in state.items():  # state of another layout than the weights' (not per element): not exported
            same = _state_like_weights(per_rank, flats["fp32"], pads)
            if same is not None:
                flats[k] = same
        z = ZeroLayout(stage, world, groups, paddings, dict(shared), buffers, frozen, flats, steps, hyper,
                       steps_done if type(steps_done) is int else None, version if isinstance(version, str) else None,
                       order)
        _check_sizes(z, self.path)
        if self.step is None and z.global_steps is not None:
            self.step = z.global_steps
        return z

    def _optimizer_state(self, states: list[tp.State], osd: list[dict], optim: list[Path], base_key: str,
                         n_flats: int) -> tuple[dict[str, list[list[Flat]]], list[Flat | None], list[ParamGroup]]:
        """The torch optimizer's state over the flat partitions: per key (exp_avg, ...) each rank's flats, each flat
        group's step (rank 0's scalar), and each param group's settings with the flat groups it holds (its `params`,
        indices of the state). What is not laid out as expected is left out."""
        state: dict[str, list[list[Flat]]] = {}
        steps: list[Flat | None] = [None] * n_flats
        hyper: list[ParamGroup] = []
        base0 = osd[0].get(base_key)
        if not (isinstance(base0, dict) and isinstance(base0.get("state"), dict)):
            return state, steps, hyper
        for k in sorted({k for v in base0["state"].values() if isinstance(v, dict) for k in v if k != "step"}):
            try:
                per_rank = [self._flats(s, o, (base_key, "state", k), p, r)
                            for r, (s, o, p) in enumerate(zip(states, osd, optim))]
            except CheckpointError:
                continue
            if all(len(f) == n_flats for f in per_rank):
                state[k] = per_rank
        for g, v in base0["state"].items():
            if type(g) is int and 0 <= g < n_flats and isinstance(v, dict) and isinstance(v.get("step"), tp.Local) \
                    and v["step"].shape == ():
                steps[g] = self._flat(states[0], v["step"], optim[0], 0)
        pg = base0.get("param_groups")
        if isinstance(pg, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in pg):
            members = [list(g["params"]) for g in pg]
            if sorted(i for m in members for i in m) == list(range(n_flats)):
                hyper = [({k: v for k, v in g.items() if k != "params"}, m) for g, m in zip(pg, members)]
        return state, steps, hyper

    def _frozen(self, model: tp.State, path: Path, stage: int, world: int
                ) -> tuple[dict[str, SourceTensor], list[Path]]:
        """Parameters that are not trained (a LoRA run's base model): stages 1 and 2 keep each whole in the model
        states (`frozen_param_fragments`), stage 3 one chunk of each in every rank's model states, cut as the
        trained ones are. Also the model states files read."""
        shapes = model.obj.get("frozen_param_shapes") or {}
        if not isinstance(shapes, dict) or not all(isinstance(k, str) and isinstance(v, tuple) for k, v in
                                                   shapes.items()):
            raise CheckpointError(f"{path}: frozen_param_shapes is not a map of names to shapes")
        if not shapes:
            return {}, [path]
        files = [(model, path)] if stage <= 2 else [
            (model, path) if r == 0 else (self._state(self.path / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt",
                                                      "DeepSpeed model states"),
                                          self.path / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
            for r in range(world)]
        out: dict[str, SourceTensor] = {}
        for name, shape in shapes.items():
            numel = math.prod(shape)
            chunk = numel if stage <= 2 else -(-numel // world)
            pieces, dtype = [], None
            for r, (st, f) in enumerate(files):
                frags = st.obj.get("frozen_param_fragments")
                t = frags.get(name) if isinstance(frags, dict) else None
                length = max(0, min(chunk, numel - r * chunk))
                want = shape if stage <= 2 else (chunk,) if length else None
                if not isinstance(t, tp.Local) or t.storage.key not in st.offsets or (
                        want is not None and t.shape != want) or t.stride != row_major(t.shape) or \
                        t.offset < 0 or t.offset + math.prod(t.shape) > t.storage.numel or dtype not in (None, t.dtype):
                    raise CheckpointError(f"{f}: the frozen parameter {name!r} is not saved as a ZeRO stage {stage} "
                                          f"save keeps it ({list(shape)}, in {world} ranks' chunks of {chunk})")
                dtype = t.dtype
                if length:
                    pieces.append(Piece(r, str(f), st.offsets[t.storage.key] + t.offset * t.dtype.itemsize,
                                        (length,), (1,), (r * chunk,)))
            assert dtype is not None
            out[name] = SourceTensor(name, shape, dtype, tuple(pieces), layout=f"ZeRO-{stage} frozen", flat=True)
        return out, [f for _, f in files]

    def _state(self, path: Path, what: str) -> tp.State:
        st = tp.read_format_state(path, GLOBALS, what)
        if not isinstance(st.obj, dict):
            raise CheckpointError(f"{path}: not {what} (a {type(st.obj).__name__}, not a dict)")
        return st

    @staticmethod
    def _field(d: Any, key: str, kind: type, path: Path) -> Any:
        v = d.get(key) if isinstance(d, dict) else None
        if not isinstance(v, kind) or kind is int and type(v) is not int:
            raise CheckpointError(f"{path}: no {key} in it (a DeepSpeed ZeRO save records it)")
        return v

    def _flat(self, st: tp.State, t: Any, path: Path, rank: int) -> Flat:
        if not isinstance(t, tp.Local) or t.storage.key not in st.offsets or len(t.shape) > 1 or \
                t.shape and t.stride != (1,):
            raise CheckpointError(f"{path}: a flat partition that is no contiguous tensor")
        numel = t.shape[0] if t.shape else 1
        if t.offset < 0 or t.offset + numel > t.storage.numel:
            raise CheckpointError(f"{path}: a flat partition outside its storage")
        return Flat(rank, str(path), st.offsets[t.storage.key] + t.offset * t.dtype.itemsize, numel, t.dtype)

    def _flats(self, st: tp.State, osd: dict, key: Any, path: Path, rank: int) -> list[Flat]:
        got: Any
        if isinstance(key, tuple):  # base optimizer state: {"state": {group: {key: flat}}}
            base, _, k = key
            state = osd.get(base, {}).get("state", {}) if isinstance(osd.get(base), dict) else {}
            if not isinstance(state, dict) or not all(type(g) is int for g in state):
                raise CheckpointError(f"{path}: {base}.state is not keyed by group numbers")
            got = [state[g].get(k) if isinstance(state[g], dict) else None for g in sorted(state)]
            name = f"{base}.state.*.{k}"
        else:
            got, name = osd.get(key), key
        if not isinstance(got, list) or not got:
            raise CheckpointError(f"{path}: no {name} (a ZeRO save's flat partitions)")
        return [self._flat(st, t, path, rank) for t in got]

    @staticmethod
    def _param_groups(obj: dict, path: Path) -> list[list[tuple[str, tuple[int, ...]]]]:
        shapes = obj.get("param_shapes")
        if not isinstance(shapes, list) or not all(isinstance(g, dict) for g in shapes):
            raise CheckpointError(f"{path}: no param_shapes (a list of each group's parameter shapes)")
        out, seen = [], set()
        for g in shapes:
            group = []
            for name, shape in g.items():
                if not isinstance(name, str) or not isinstance(shape, tuple) or \
                        not all(type(x) is int and x >= 0 for x in shape) or name in seen:
                    raise CheckpointError(f"{path}: param_shapes holds {str(name)[:80]!r}: {str(shape)[:40]}")
                seen.add(name)
                group.append((name, shape))
            out.append(group)
        if not seen:
            raise CheckpointError(f"{path}: param_shapes lists no parameter")
        return out

    def _buffers(self, model: tp.State, path: Path) -> dict[str, SourceTensor]:
        names = model.obj.get("buffer_names") or []
        module = model.obj.get("module")
        if not isinstance(names, list) or not isinstance(module, dict):
            raise CheckpointError(f"{path}: no module state dict or buffer_names")
        out = {}
        for name in names:
            t = module.get(name)
            if not isinstance(name, str) or not isinstance(t, tp.Local) or t.storage.key not in model.offsets:
                raise CheckpointError(f"{path}: buffer {str(name)[:80]!r} is not a tensor in the module state dict")
            if t.stride != row_major(t.shape) and math.prod(t.shape) > 1:
                raise CheckpointError(f"{path}: buffer {name!r} is saved strided, which streammerge does not read")
            offset = model.offsets[t.storage.key] + t.offset * t.dtype.itemsize
            if t.offset < 0 or t.offset + math.prod(t.shape) > t.storage.numel:
                raise CheckpointError(f"{path}: buffer {name!r} lies outside its storage")
            out[name] = SourceTensor(name, t.shape, t.dtype, (Piece(0, str(path), offset, t.shape, row_major(t.shape),
                                                                    (0,) * len(t.shape)),))
        return out

    def tensors(self, options: Any = None) -> dict[str, SourceTensor]:
        if self._tensors is None:
            self._tensors = self._model_tensors()
        return self._tensors

    def _model_tensors(self) -> dict[str, SourceTensor]:
        z = self.layout()
        out: dict[str, SourceTensor] = {}
        dtype = z.flats["fp32"][0][0].dtype
        for g, params in enumerate(z.groups):
            for i, (name, shape) in enumerate(params):
                out[name] = SourceTensor(name, shape, dtype, tuple(z.pieces("fp32", g, i)), layout=f"ZeRO-{z.stage}",
                                         flat=True)
        for name, target in z.shared.items():
            if target not in out:
                raise CheckpointError(f"{self.path}: shared_params ties {name!r} to {target!r}, which no group holds")
            out.setdefault(name, out[target].renamed(name))
        for name, t in [*z.frozen.items(), *z.buffers.items()]:
            out.setdefault(name, t)
        return {**{n: out[n] for n in z.order if n in out}, **out}  # as the model's state dict orders them

    def state_tensors(self) -> tuple[dict[str, dict[str, SourceTensor]], list[list[str]], list[dict[str, Any]]]:
        """The optimizer's per-parameter state (name -> key -> tensor), its groups' parameter names and settings."""
        z = self.layout()
        state: dict[str, dict[str, SourceTensor]] = {}
        for g, params in enumerate(z.groups):
            for i, (name, shape) in enumerate(params):
                entry = state.setdefault(name, {})
                step = z.steps[g]
                if step is not None:
                    entry["step"] = SourceTensor(f"{name}.step", (), step.dtype,
                                                 (Piece(0, step.file, step.offset, (), (), ()),))
                for k in z.flats:
                    if k != "fp32":
                        entry[k] = SourceTensor(f"{name}.{k}", shape, z.flats[k][0][0].dtype,
                                                tuple(z.pieces(k, g, i)), layout=f"ZeRO-{z.stage}", flat=True)
        names = [[n for i in flat_groups for n, _ in z.groups[i]] for _, flat_groups in z.hyper]
        return state, names, [h for h, _ in z.hyper]

    def has_optimizer(self) -> bool:
        return True

    def files(self) -> list[Path]:
        self.layout()
        return list(self._files)

    def info(self) -> dict[str, Any]:
        z = self.layout()
        return {"stage": z.stage, "world size": z.world_size, "deepspeed": z.version}

    def optimizer_plan(self, weights: Any, options: Any, config: Mapping | None, model_dir: Path | None
                       ) -> tuple[Any, list[str]]:
        from ..optimizer.deepspeed import plan_deepspeed_optimizer

        return plan_deepspeed_optimizer(self, weights, options)

    def oracle(self, options: Any = None) -> Any:
        from .deepspeed_oracle import DeepSpeedOracle

        return DeepSpeedOracle(self.path)

