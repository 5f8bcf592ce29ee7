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

from typing import Any

from .errors import CheckpointError, ConfigError, OutputError, StreammergeError, UnsafePickleError, VerifyError
from .optimizer import OPTIMIZER_SAVE_MODES, load_optimizer_state_dict, optimizer_save_mode_enabled
from .options import MergeOptions
from .pipeline import MergePlan, MergeResult, merge, plan, plan_merge
from .sources import Source, open_checkpoint
from .verify import VerifyReport, verify

__version__ = "0.2.0"

_PUBLISH = ("HuggingFaceUploader", "PushResult", "merge_and_push", "upload_checkpoint_to_hf")


def __getattr__(name: str) -> Any:
    """The Hub stack (huggingface_hub) is imported only when a push needs it."""
    if name in _PUBLISH:
        from .hub import publish

        return getattr(publish, name)
    if name == "watch":
        from .hub.watch import watch

        return watch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError", "ConfigError", "MergeOptions", "MergePlan", "MergeResult", "OutputError", "Source",
    "StreammergeError", "UnsafePickleError", "VerifyError", "VerifyReport", "merge", "open_checkpoint", "plan",
    "plan_merge", "verify", "OPTIMIZER_SAVE_MODES", "load_optimizer_state_dict", "optimizer_save_mode_enabled",
    "HuggingFaceUploader", "PushResult", "merge_and_push", "upload_checkpoint_to_hf", "watch",
]
