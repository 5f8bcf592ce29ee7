"""streammerge: stream sharded training checkpoints into Hugging Face safetensors in bounded memory.

Public API::

    plan(ckpt_dir, **options) -> MergePlan       # what would be written, from metadata only
    merge(ckpt_dir, out_dir, **options) -> MergeResult
    verify(out_dir, checkpoint_dir=None) -> VerifyReport
    load_optimizer_state_dict(out_dir) -> dict  # full optimizer state, name-keyed, for set_optimizer_state_dict
    merge_and_push(ckpt_dir, out_dir, repo_id, **options) -> PushResult   # upload while merging
    watch(run_dir, repo_id=..., once=False, **options) -> list[PushResult]  # `streammerge watch`
    upload_checkpoint_to_hf(...), HuggingFaceUploader(...)                # the seed workflow's names

Options are keyword arguments or one `MergeOptions`.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# Imported on first use, so that `import streammerge` (and the `streammerge` script, which Ctrl-C may stop while it
# loads) costs nothing before the command starts; the Hub stack (huggingface_hub) loads only when a push needs it.
_HOMES = {
    "CheckpointError": "errors", "ConfigError": "errors", "OutputError": "errors", "StreammergeError": "errors",
    "UnsafePickleError": "errors", "VerifyError": "errors",
    "OPTIMIZER_SAVE_MODES": "optimizer", "load_optimizer_state_dict": "optimizer",
    "optimizer_save_mode_enabled": "optimizer",
    "MergeOptions": "options",
    "MergePlan": "pipeline", "MergeResult": "pipeline", "merge": "pipeline", "plan": "pipeline",
    "plan_merge": "pipeline",
    "Source": "sources", "open_checkpoint": "sources",
    "VerifyReport": "verify", "verify": "verify",
    "HuggingFaceUploader": "hub.publish", "PushResult": "hub.publish", "merge_and_push": "hub.publish",
    "upload_checkpoint_to_hf": "hub.publish",
    "watch": "hub.watch",
}

if TYPE_CHECKING:
    from .errors import CheckpointError, ConfigError, OutputError, StreammergeError, UnsafePickleError, VerifyError
    from .hub.publish import HuggingFaceUploader, PushResult, merge_and_push, upload_checkpoint_to_hf
    from .hub.watch import watch
    from .optimizer import OPTIMIZER_SAVE_MODES, load_optimizer_state_dict, optimizer_save_mode_enabled
    from .options import MergeOptions
    from .pipeline import MergePlan, MergeResult, merge, plan, plan_merge
    from .sources import Source, open_checkpoint
    from .verify import VerifyReport, verify


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # importing a submodule binds it on its package: the submodules `plan` and `verify` must not take the names
        # of the functions
        if not (name in _HOMES and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


__all__ = [
    "CheckpointError", "ConfigError", "MergeOptions", "MergePlan", "MergeResult", "OutputError", "Source",
    "StreammergeError", "UnsafePickleError", "VerifyError", "VerifyReport", "merge", "open_checkpoint", "plan",
    "plan_merge", "verify", "OPTIMIZER_SAVE_MODES", "load_optimizer_state_dict", "optimizer_save_mode_enabled",
    "HuggingFaceUploader", "PushResult", "merge_and_push", "upload_checkpoint_to_hf", "watch",
]
