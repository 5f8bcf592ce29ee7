"""streammerge: stream sharded FSDP (veRL) checkpoints into Hugging Face safetensors in constant memory.

Public API::

    plan(ckpt_dir) -> Plan                      # what would be written, from metadata only
    merge(ckpt_dir, out_dir, **options) -> MergeResult
    verify(out_dir, checkpoint_dir=None) -> VerifyReport
    load_optimizer_state_dict(out_dir) -> dict  # full optimizer state, name-keyed, for set_optimizer_state_dict
    merge_and_push(ckpt_dir, out_dir, repo_id, **options) -> PushResult   # upload while merging
    upload_checkpoint_to_hf(...), HuggingFaceUploader(...)                # the seed workflow's names
"""

from .discover import Checkpoint, find_checkpoint
from .errors import CheckpointError, OutputError, StreammergeError, UnsafePickleError, VerifyError
from .optimizer import OPTIMIZER_SAVE_MODES, load_optimizer_state_dict, optimizer_save_mode_enabled
from .pipeline import MergeResult, merge, plan
from .plan import Plan
from .verify import VerifyReport, verify

_PUBLISH = ("HuggingFaceUploader", "PushResult", "merge_and_push", "upload_checkpoint_to_hf")


def __getattr__(name: str):
    """The Hub stack (huggingface_hub: ~0.3 s, ~18 MB RSS) is imported only when a push needs it."""
    if name in _PUBLISH:
        from .hub import publish

        return getattr(publish, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__version__ = "0.1.0"
__all__ = [
    "Checkpoint", "CheckpointError", "MergeResult", "OutputError", "Plan", "StreammergeError",
    "UnsafePickleError", "VerifyError", "VerifyReport", "find_checkpoint", "merge", "plan", "verify",
    "OPTIMIZER_SAVE_MODES", "load_optimizer_state_dict", "optimizer_save_mode_enabled",
    "HuggingFaceUploader", "PushResult", "merge_and_push", "upload_checkpoint_to_hf",
]
