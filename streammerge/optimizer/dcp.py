"""Optimizer state in a DCP checkpoint -> the optimizer export's plan.

`get_optimizer_state_dict(model, optim)` keys the state by parameter name, so a DCP of
`{"model": ..., "optimizer": ...}` holds `optimizer.state.<fqn>.<key>` tensors (DTensor chunks like
the parameter's) and `optimizer.param_groups.<i>.<field>` byte items (`.metadata`'s planner_data
records the nesting; torchtitan saves the flattened form, `param_groups.<fqn>.<field>`). The export
is the same as veRL's: `state.<fqn>.<key>` in the saved dtype, param groups in the index metadata.
No parameter order has to be rebuilt: every name is checked against the weights instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..plan import Plan, TensorPlan
from ..sources.dcp import strip_wrappers
from ..sources.lora import split_factor
from . import Skip
from .export import index_metadata
from .fsdp import export_plan

if TYPE_CHECKING:
    from ..options import MergeOptions
    from ..sources.dcp import DcpCheckpoint

# `<module>.lora_A.<adapter>.weight.<key>`: a LoRA factor's state, named as the peft model's parameter
_ADAPTER = re.compile(r"^(?P<factor>.+\.lora_[AB])\.(?P<adapter>[^.]+)\.weight\.")


def _param_and_key(rest: str, path: tuple | None, depth: int, params: Mapping[str, tuple[int, ...]]) -> tuple[str, str]:
    """`<fqn>.<key>` -> (fqn, key): from the saved nesting when recorded, else the longest parameter name
    (wrapper segments such as `_orig_mod.` removed, as from the model's names)."""
    if path is not None and len(path) >= depth + 2 and isinstance(path[depth], str):
        fqn, key = path[depth], ".".join(str(p) for p in path[depth + 1:])
        if f"{fqn}.{key}" == rest:
            return strip_wrappers(fqn), key
    rest = strip_wrappers(rest)
    best = max((f for f in params if rest.startswith(f + ".")), key=len, default=None)
    if best is None:
        raise Skip(f"optimizer state {rest!r} names no parameter of the model")
    return best, rest[len(best) + 1:]


def plan_dcp_optimizer(ck: DcpCheckpoint, prefix: str, weights: Plan, options: MergeOptions, *,
                       source_note: str, step: int | None, peft: Mapping[str, tuple[int, ...]] | None = None,
                       module_prefix: str = "") -> tuple[Plan | None, list[str]]:
    """Plan `OUT/optimizer/` from the `<prefix>state.*` tensors and `<prefix>param_groups.*` items.

    `peft`: the saved parameters of a peft model (name -> shape), where the optimizer was built over the peft
    model: its state is then named by them, as veRL's rank files' export names it.
    `module_prefix`: what the optimizer's parameter names have before the weights' names (a LightningModule's
    attribute, `model.`): the export is named by the weights' names, those of the model it loads into.
    """
    try:
        params = weight_shapes(weights)
        if peft is not None:
            params.update(_peft_names(ck, prefix, peft))
        params = {module_prefix + n: shape for n, shape in params.items()}
        tensors, groups, values = _state(ck, prefix, params)
    except Skip as e:
        return None, [f"optimizer not exported: {e}"]
    if module_prefix:
        tensors, groups, values = without_prefix(module_prefix, tensors, groups, values)
    meta = index_metadata(groups, source=source_note, values=values, step=step)
    return export_plan(tensors, meta, options.optimizer_format, options.max_shard_size)


def without_prefix(module_prefix: str, tensors: dict[str, TensorPlan], groups: list[dict], values: dict[str, Any]
                   ) -> tuple[dict[str, TensorPlan], list[dict], dict[str, Any]]:
    """The state and groups renamed to the weights' names (every parameter name starts with `module_prefix`: they
    were matched to the weights' names with it)."""
    n = len(module_prefix)

    def name(key: str) -> str:  # state.<module_prefix><fqn>.<key> -> state.<fqn>.<key>
        return "state." + key[len("state.") + n:]

    return ({name(k): replace(t, name=name(k)) for k, t in tensors.items()},
            [{**g, "params": [p[n:] for p in g["params"]]} for g in groups],
            {name(k): v for k, v in values.items()})


def weight_shapes(weights: Plan) -> dict[str, tuple[int, ...]]:
    params = {n: t.shape for n, t in weights.tensors.items()}
    params.update({n: weights.tensors[k].shape for n, k in weights.dropped.items()})
    return params


def _peft_names(ck: DcpCheckpoint, prefix: str, saved: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The peft model's parameter names, as its optimizer names them.

    An adapter state dict (get_peft_model_state_dict) drops the adapter's name (`q_proj.lora_A.weight`), which the
    peft model's parameters keep (`q_proj.lora_A.default.weight`): the optimizer state's keys tell the name.
    """
    names = dict(saved)
    unnamed = {f"{f[0]}.lora_{f[1]}": shape for n, shape in saved.items()
               if (f := split_factor(n)) is not None and f[2] is None}
    if unnamed:
        state = prefix + "state."
        found = {m["adapter"] for k in ck.tensors if k.startswith(state)
                 and (m := _ADAPTER.match(k[len(state):])) and m["factor"] in unnamed}
        if len(found) > 1:
            raise Skip(f"the optimizer state names adapters {', '.join(sorted(found))}, the saved factors none: "
                       "which one they are cannot be told")
        for adapter in found:
            names.update({f"{factor}.{adapter}.weight": shape for factor, shape in unnamed.items()})
    return names


def _state(ck: DcpCheckpoint, prefix: str, params: Mapping[str, tuple[int, ...]]
           ) -> tuple[dict[str, TensorPlan], list[dict], dict]:
    state_prefix = prefix + "state."
    depth = prefix.count(".") + 1  # where the fqn sits in a planner_data path
    pd = ck.meta.planner_data or {}
    tensors: dict[str, TensorPlan] = {}
    stateful: set[str] = set()  # parameters with state
    for key, src in ck.tensors.items():
        if not key.startswith(state_prefix):
            continue
        fqn, skey = _param_and_key(key[len(state_prefix):], pd.get(key), depth, params)
        if fqn not in params:
            raise Skip(f"optimizer state {key!r} is for {fqn!r}, which is not a weight of the model")
        if src.shape not in ((), params[fqn]):  # factored state (Adafactor's row/col variances): another layout
            raise Skip(f"optimizer state {key!r} has shape {list(src.shape)}, but the parameter {fqn!r} has "
                       f"{list(params[fqn])} (a factored optimizer such as Adafactor?); the export holds per-parameter "
                       "state of the parameter's shape only")
        out = f"state.{fqn}.{skey}"
        stateful.add(fqn)
        tensors[out] = TensorPlan(out, src, src.dtype)  # source keeps its DCP key: verify reads it by that name
    if not tensors:
        raise Skip(f"no tensors under {state_prefix!r}")
    values: dict[str, Any] = {}
    for key in ck.bytes_items:
        if key.startswith(state_prefix):
            fqn, skey = _param_and_key(key[len(state_prefix):], pd.get(key), depth, params)
            values[f"state.{fqn}.{skey}"] = _json_value(ck, key)
            stateful.add(fqn)
    groups = _param_groups(ck, prefix, depth, params)
    check_membership(groups, stateful, params)
    return tensors, groups, values


def check_membership(groups: list[dict], stateful: set[str], params: Mapping[str, Any]) -> None:
    """Each group's params are weights of the model, in one group each, and every parameter with state is in a
    group: torch's loader pairs the state with parameters through the groups, so anything else is an optimizer
    state dict it cannot load, or one that gives the state to other parameters."""
    owner: dict[str, int] = {}
    for i, g in enumerate(groups):
        for name in g["params"]:
            if name not in params:
                raise Skip(f"param group {i} holds {name!r}, which is not a weight of the model")
            if name in owner:
                raise Skip(f"{name!r} is in param groups {owner[name]} and {i}")
            owner[name] = i
    stray = sorted(stateful - set(owner))
    if stray:
        raise Skip(f"optimizer state for {stray[0]!r} ({len(stray)} parameters), which no param group holds")


def _json_value(ck: DcpCheckpoint, key: str) -> Any:
    try:
        value = ck.read_object(key)
    except CheckpointError as e:
        raise Skip(f"cannot read {key!r} ({e})") from None
    try:  # a tuple stays one: groups_json tells torch's lists from its tuples (betas)
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        raise Skip(f"{key!r} holds a {type(value).__name__}, which cannot be recorded as JSON") from None
    return value


def _param_groups(ck: DcpCheckpoint, prefix: str, depth: int, params: Mapping[str, Any]) -> list[dict]:
    """The param groups, as torch's nested form lists them (params by name)."""
    gp = prefix + "param_groups."
    pd = ck.meta.planner_data or {}
    tensor_field = next((k for k in ck.tensors if k.startswith(gp)), None)
    if tensor_field is not None:  # e.g. lr=torch.tensor(...): the index's JSON cannot record it, and leaving it out
        raise Skip(f"param group field {tensor_field!r} is a tensor, which the export cannot record")  # loses it
    nested: dict[int, dict[str, Any]] = {}
    flat: dict[str, dict[str, Any]] = {}
    for key in ck.bytes_items:
        if not key.startswith(gp):
            continue
        path = pd.get(key)
        if path is not None and len(path) == depth + 2 and isinstance(path[depth], int):
            nested.setdefault(path[depth], {})[str(path[depth + 1])] = _json_value(ck, key)
            continue
        head, _, field = key[len(gp):].partition(".")
        if head.isdigit() and "." not in field and path is None:
            nested.setdefault(int(head), {})[field] = _json_value(ck, key)
            continue
        rest = strip_wrappers(key[len(gp):])  # flattened form: param_groups.<fqn>.<field>
        fqn = max((f for f in params if rest.startswith(f + ".")), key=len, default=None)
        if fqn is None:
            raise Skip(f"param group entry {key!r} names no parameter of the model")
        flat.setdefault(fqn, {})[rest[len(fqn) + 1:]] = _json_value(ck, key)
    if nested and flat:
        raise Skip("param groups saved both nested and flattened")
    if nested:
        listed = [nested[i] for i in sorted(nested)]
        if any(not isinstance(g.get("params"), list) or not all(isinstance(n, str) for n in g["params"])
               for g in listed):
            raise Skip("a param group without its list of parameter names")
        # the state's names lose torch.compile's `_orig_mod.` (and other wrapper segments) as the model's keys do
        return [{**g, "params": [strip_wrappers(n) for n in g["params"]]} for g in listed]
    if not flat:
        raise Skip(f"no param groups under {gp!r}")
    groups: list[dict] = []  # the flattened form has one entry per parameter: equal settings share a group
    for fqn, hyper in flat.items():
        same = next((g for g in groups if {k: v for k, v in g.items() if k != "params"} == hyper), None)
        if same is None:
            same = {**hyper, "params": []}
            groups.append(same)
        same["params"].append(fqn)
    return groups



MEGATRON_LAYOUT = "Megatron distributed optimizer state (fully_reshardable), Hugging Face names (streammerge)"


def megatron_optimizer_plan(oc: DcpCheckpoint, arch: Any, takes: Mapping[str, Any], weights: Plan,
                            options: MergeOptions, *, step: int | None) -> tuple[Plan | None, list[str]]:
    """Megatron's `optimizer.state.<exp_avg|exp_avg_sq|param>.<key>` through the weights' table: exact copies.

    Megatron keeps `step` and the hyperparameters per param group and does not record which parameters
    each group holds, so the groups go into the index metadata as saved (`megatron_param_groups`), not
    as torch's param groups: the export is the state by parameter name, not a torch optimizer state dict.
    """
    from ..sources.megatron import optimizer_views

    views = optimizer_views(oc, arch, takes)
    if not views:
        return None, ["optimizer not exported: no optimizer.state.* tensors for the model's keys"]
    missing = sorted({n.rsplit(".", 1)[0].removeprefix("state.") for n in views}
                     - set(weights.tensors) - set(weights.dropped))
    if missing:
        return None, [f"optimizer not exported: state for {missing[0]!r}, which is not a weight of the model"]
    tensors = {name: TensorPlan(name, src, src.dtype) for name, src in views.items()}
    meta = {"format": MEGATRON_LAYOUT, "source": f"Megatron torch_dist {oc.folder.name}"}
    warnings: list[str] = []
    groups = _megatron_groups(oc)
    if groups is None:
        warnings.append(f"{oc.folder}: the optimizer's param groups (in common_state) are not readable without "
                        "running code; the export holds the state tensors only")
    else:
        meta["megatron_param_groups"] = json.dumps(groups)
    if step is not None:
        meta["step"] = str(step)
    return export_plan(tensors, meta, options.optimizer_format, options.max_shard_size, warnings)


def _megatron_groups(oc: DcpCheckpoint) -> list | None:
    key = next((k for k in oc.bytes_items if k.startswith("common_state/")), None)
    if key is None:
        return None
    try:
        common = oc.read_object(key)
    except CheckpointError:
        return None
    state = common[0] if isinstance(common, list) and common else common
    opt = state.get("optimizer") if isinstance(state, dict) else None
    inner = opt.get("optimizer") if isinstance(opt, dict) else None
    groups = inner.get("param_groups") if isinstance(inner, dict) else None
    if not isinstance(groups, list):
        return None
    try:
        json.dumps(groups)
    except (TypeError, ValueError):
        return None
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]
