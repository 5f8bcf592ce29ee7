"""Optimizer state: name the rank files' integer-keyed state, plan its export, and read it back.

`optimizer.state_dict()` keys its state by integers: positions in the optimizer's parameter list,
which for `AdamW(model.parameters())` is `model.named_parameters()` order. `naming` rebuilds that
order from config.json (a model built on the meta device by transformers, never with code from the
checkpoint); `fsdp` plans the export from veRL's optim rank files (FSDP2 DTensors, FSDP1 flat
shards) through the same planner and writer as the weights; `export` reads an export back into
what `torch.distributed.checkpoint.state_dict.set_optimizer_state_dict` takes.

The export is torch's flattened optimizer form (`get_optimizer_state_dict(...,
flatten_optimizer_state_dict=True)`): one tensor per `state.<param fqn>.<key>`, in the saved dtype;
the param groups go into the index metadata.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError

OPTIMIZER_DIR = "optimizer"
OPTIMIZER_INDEX = "optimizer.safetensors.index.json"
OPTIMIZER_PT = "optimizer.pt"
OPTIMIZER_FORMATS = ("safetensors", "torch")
LAYOUT_NAME = "torch.optim flattened state (streammerge)"
OPTIMIZER_SAVE_MODES = ("full", None)  # the seed workflow's `optimizer_save_mode` values
NO_OPTIMIZER_HINT = "rerun with --no-optimizer to export the weights only"


def optimizer_save_mode_enabled(value: Any) -> bool:
    """The seed workflow's `optimizer_save_mode`: "full" exports the optimizer, null skips it."""
    if value is None or value is False:
        return False
    if isinstance(value, str) and value.strip().lower() in ("", "null", "none", "~"):
        return False
    if value is True or (isinstance(value, str) and value.strip().lower() == "full"):
        return True
    raise ValueError(f"optimizer_save_mode: expected 'full' or null, got {value!r}")


class OptimizerMismatchError(CheckpointError):
    """The optimizer state does not fit the model its config describes: we refuse to guess names."""


class Skip(Exception):
    """This optimizer layout cannot be named safely; the weights are still exported."""


class Unreadable(Skip):
    """transformers itself refuses the config.json (a value of the wrong type, a setting it cannot build): the
    folder would not load, so the architecture check refuses the merge where the optimizer export only skips."""


def load_optimizer_state_dict(path: Any, *, flatten_state: bool = False) -> dict:
    """The full optimizer state of an export, name-keyed (see `export.load_optimizer_state_dict`)."""
    from .export import load_optimizer_state_dict as load

    return load(path, flatten_state=flatten_state)
