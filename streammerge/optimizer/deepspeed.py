"""DeepSpeed ZeRO optimizer state -> the optimizer export's plan.

The torch optimizer inside DeepSpeed steps over flat partitions, one per group and rank, so its state (exp_avg,
exp_avg_sq) is flat too, laid out exactly as the master weights (`sources.deepspeed`), and its `step` is one scalar
per group. The export is the same as for every other format: `state.<fqn>.<key>` in the saved dtype, each parameter's
group's step as its own, and the groups' settings with their parameters' names in the index metadata.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..plan import Plan, TensorPlan
from .export import index_metadata
from .fsdp import export_plan, jsonable

if TYPE_CHECKING:
    from ..options import MergeOptions
    from ..sources.deepspeed import DeepSpeedSource


def plan_deepspeed_optimizer(source: DeepSpeedSource, weights: Plan, options: MergeOptions
                             ) -> tuple[Plan | None, list[str]]:
    """Plan `OUT/optimizer/`, or (None, [why not])."""
    state, names, hyper = source.state_tensors()
    # the weights' names, or the checkpoint's own where a LoRA run's are folded away: the optimizer of a peft model
    # names the peft model's parameters (as the adapter export and set_optimizer_state_dict on that model do)
    known = set(weights.tensors) | set(weights.dropped) | set(source.tensors())
    stray = next((n for g in names for n in g if n not in known), None)
    if stray is not None:
        return None, [f"optimizer not exported: its state is for {stray!r}, which is not a weight of the model"]
    if not any(len(entry) > 1 for entry in state.values()):
        return None, ["optimizer not exported: the ZeRO partitions hold no per-parameter state (exp_avg, ...) laid out "
                      "as the weights"]
    if not hyper:
        return None, ["optimizer not exported: its param groups do not list the flat groups the partitions hold"]
    if any(not jsonable(h) for h in hyper):
        return None, ["optimizer not exported: a param group's settings cannot be recorded as JSON"]
    tensors: dict[str, TensorPlan] = {}
    for fqn, entry in state.items():
        for key, src in entry.items():
            name = f"state.{fqn}.{key}"
            tensors[name] = TensorPlan(name, src, src.dtype)
    groups: list[dict[str, Any]] = [{**h, "params": list(g)} for h, g in zip(hyper, names)]
    meta = index_metadata(groups, source=f"DeepSpeed ZeRO-{source.layout().stage} {source.path.name}",
                          step=source.step)
    return export_plan(tensors, meta, options.optimizer_format, options.max_shard_size)

