"""An optimizer state dict saved by name in a torch.save file -> the optimizer export's plan.

`get_optimizer_state_dict(model, optim)` and FSDP's `optim_state_dict` (what accelerate's FULL_STATE_DICT save writes
into `optimizer.bin`) key the state by each parameter's name, and the param groups list the names. That is exported as
every other format's: `state.<fqn>.<key>` in the saved dtype, the groups in the index metadata; every name is checked
against the weights. `optimizer.state_dict()` keys the state by position instead, which no name can be given to
safely: that is not exported (the source says why).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..plan import Plan, TensorPlan
from ..sources import torchpickle as tp
from ..sources.dcp import strip_wrappers
from ..sources.torchfile import at_path
from . import Skip
from .dcp import check_membership, weight_shapes, without_prefix
from .export import index_metadata
from .fsdp import export_plan, jsonable

if TYPE_CHECKING:
    from ..options import MergeOptions
    from ..sources.torchfile import KeyPath, TorchFileSource


def plan_file_optimizer(source: TorchFileSource, path: Path, st: tp.State, at: KeyPath, weights: Plan,
                        options: MergeOptions, *, peft: Mapping[str, tuple[int, ...]] | None = None,
                        module_prefix: str = "") -> tuple[Plan | None, list[str]]:
    """Plan `OUT/optimizer/` from the optimizer state dict at key path `at` of the file `path` (read as `st`).

    `peft`: the saved parameters of a peft model (name -> shape), whose optimizer names them (the LoRA fold's
    inputs). `module_prefix`: what the optimizer's names have before the weights' names (a LightningModule's
    attribute).
    """
    osd = at_path(st.obj, at)
    try:
        params = {module_prefix + n: shape for n, shape in weight_shapes(weights).items()}
        params.update({module_prefix + n: shape for n, shape in (peft or {}).items()})
        tensors, groups, values = _state(source, path, st, at, osd, params)
    except Skip as e:
        return None, [f"optimizer not exported: {path.name}" + (f"'s {'.'.join(map(str, at))}" if at else "")
                      + f": {e}"]
    if module_prefix:
        tensors, groups, values = without_prefix(module_prefix, tensors, groups, values)
    where = f" ({'.'.join(map(str, at))})" if at else ""
    meta = index_metadata(groups, source=f"torch.save file {path.name}{where}", values=values, step=source.step)
    return export_plan(tensors, meta, options.optimizer_format, options.max_shard_size)


def _state(source: TorchFileSource, path: Path, st: tp.State, at: KeyPath, osd: dict,
           params: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, TensorPlan], list[dict], dict[str, Any]]:
    if not isinstance(osd, dict):
        raise Skip(f"it is a {type(osd).__name__}, no optimizer state dict")
    state, groups = osd.get("state"), osd.get("param_groups")
    if not isinstance(state, dict) or not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise Skip("it is no optimizer state dict (state and param_groups)")
    if not state:
        raise Skip("the optimizer holds no state (saved before its first step)")
    tensors: dict[str, TensorPlan] = {}
    values: dict[str, Any] = {}
    for saved_fqn, entry in state.items():
        if not isinstance(saved_fqn, str):
            raise Skip("its state is keyed by each parameter's position in the optimizer, and the file does not say "
                       "which parameter each position is (get_optimizer_state_dict names them)")
        fqn = strip_wrappers(saved_fqn)
        if fqn not in params:
            raise Skip(f"optimizer state for {saved_fqn!r}, which is not a weight of the model")
        if not isinstance(entry, dict):
            raise Skip(f"the state of {saved_fqn!r} is no dict")
        for key, v in entry.items():
            name = f"state.{fqn}.{key}"
            if isinstance(v, tp.Local):
                if v.shape not in ((), params[fqn]):
                    raise Skip(f"optimizer state {name!r} has shape {list(v.shape)}, but the parameter has "
                               f"{list(params[fqn])} (a factored optimizer such as Adafactor, or a shard?); the export "
                               "holds per-parameter state of the parameter's shape only")
                src = source.file_tensor(path, st, f"{'.'.join(map(str, at))}.state.{saved_fqn}.{key}",
                                         (*at, "state", saved_fqn, key))
                tensors[name] = TensorPlan(name, src, src.dtype)
            elif jsonable(v):
                values[name] = v
            else:
                raise Skip(f"optimizer state {name!r} is a {type(v).__name__}, which cannot be recorded")
    named = []
    for i, g in enumerate(groups):
        names = g.get("params")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise Skip(f"param group {i} does not list its parameters by name")
        hyper = {k: v for k, v in g.items() if k != "params"}
        if not jsonable(hyper):
            raise Skip(f"param group {i}'s settings cannot be recorded as JSON")
        named.append({**hyper, "params": [strip_wrappers(n) for n in names]})
    check_membership(named, {strip_wrappers(f) for f in state}, params)
    return tensors, named, values

