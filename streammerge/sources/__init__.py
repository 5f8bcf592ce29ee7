"""Sources: find a checkpoint on disk and the format that reads it.

`open_checkpoint(path)` accepts what users type: the folder holding the files, one torch.save file of a whole
model (a Lightning `.ckpt`), a `global_step_N` folder (its `actor/`), or a run folder whose
`latest_checkpointed_iteration.txt` names the step (veRL's `global_step_N/`, Megatron-LM's `iter_NNNNNNN/` or
`release/`). Each format registers how to recognise its folder and how to open it; the first that recognises a folder
reads it (a DCP format also looks just below: veRL Megatron's `dist_ckpt/` and `model/dist_ckpt/`, prime-rl's
`trainer/`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import CheckpointError
from ..model_folder import WEIGHT_INDEXES
from ..paths import NotAFile, read_small, user_path
from . import dcp, deepspeed, megatron_legacy, torchfile, verl
from .base import Piece, ReadStats, Source, SourceTensor
from .hf import SINGLE

LATEST_FILE = "latest_checkpointed_iteration.txt"
SUBFOLDERS = ("actor",)  # where a step folder keeps its checkpoint


def _accelerate_full(path: Path) -> Path | None:
    """accelerate's FULL_STATE_DICT file in a save_state folder. Not the HF Trainer's checkpoint under
    FULL_STATE_DICT, which writes it beside save_pretrained's model folder: that is a model folder."""
    return None if model_folder(path) else torchfile.accelerate_full(path)


def _open_accelerate_full(path: Path) -> Source:
    found = _accelerate_full(path)
    if found is None:  # FORMATS found it there a moment ago
        raise CheckpointError(f"{path}: accelerate's pytorch_model_fsdp.bin is gone")
    return torchfile.open_torch_file(found)


# (what it is, does this folder hold it, open it)
FORMATS: list[tuple[str, Callable[[Path], bool], Callable[[Path], Source]]] = [
    ("veRL FSDP rank files (model_world_size_*_rank_*.pt)", verl.has_rank_files, verl.verl_source),
    ("torch DCP or Megatron torch_dist (.metadata, __*_*.distcp)", dcp.holds, dcp.open_dcp),
    ("DeepSpeed ZeRO (global_stepN/ with *zero_pp_rank_*_optim_states.pt, or the folder whose `latest` names it)",
     deepspeed.holds, deepspeed.open_deepspeed),
    ("Megatron-LM legacy torch format (mp_rank_*/model_optim_rng.pt)", megatron_legacy.holds,
     megatron_legacy.open_legacy),
    ("accelerate's FULL_STATE_DICT save (pytorch_model_fsdp.bin)", lambda p: _accelerate_full(p) is not None,
     _open_accelerate_full),
]


def open_checkpoint(path: str | Path) -> Source:
    """The checkpoint at `path`, opened by the format that recognises it (metadata is read lazily)."""
    folder, opener = _find(user_path(path).resolve())
    return opener(folder)


def step_number(text: str | None) -> int | None:
    """The step a tracker's text names, or None (str.isdigit also takes "²", which int() refuses; a number of
    thousands of digits is a damaged file, which int() refuses with an error that names no file)."""
    return int(text) if text and len(text) <= 20 and text.isascii() and text.isdigit() else None


def read_tracker(folder: Path) -> str | None:
    """The text of `folder`'s tracker file, stripped; None where there is none. A pipe there is refused, never read:
    reading one waits for a writer (a watcher would wait at every look, a merge for ever)."""
    try:
        data = read_small(folder / LATEST_FILE)
    except NotAFile as e:
        raise CheckpointError(f"{e}; the tracker is the trainer's text file naming its latest step") from None
    return None if data is None else data.decode(errors="replace").strip()


def _find(path: Path, depth: int = 0) -> tuple[Path, Callable[[Path], Source]]:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        sharded = next((what for what, holds, opener in FORMATS
                        if opener is not _open_accelerate_full and holds(path.parent)), None)
        if sharded is not None:
            raise CheckpointError(f"{path}: one file of a sharded checkpoint ({sharded}), not a folder: give the "
                                  f"folder holding it, {path.parent}")
        if path.name == megatron_legacy.FILE and megatron_legacy.holds(path.parent.parent):
            raise CheckpointError(f"{path}: one rank's file of a Megatron-LM checkpoint (legacy torch format), not a "
                                  f"folder: give the folder holding its mp_rank_*/ folders, {path.parent.parent}")
        if torchfile.holds(path):
            return path, torchfile.open_torch_file
        raise CheckpointError(f"{path}: not a checkpoint file streammerge reads (it reads one torch.save file of a "
                              "whole model, such as a Lightning .ckpt; else give the checkpoint folder)")
    for _, holds, opener in FORMATS:
        if holds(path):
            return path, opener
    latest = path / LATEST_FILE
    text = read_tracker(path) if depth < 2 else None
    if text is not None:
        if text == "release":  # Megatron-LM's converted checkpoints
            names = ["release"]
        elif (step := step_number(text)) is not None:
            names = [f"global_step_{step}", f"iter_{step:07d}"]  # veRL, Megatron-LM
        else:
            raise CheckpointError(f"{latest}: expected a step number, found {text[:40]!r}")
        step_dir = next((path / n for n in names if (path / n).is_dir()), None)
        if step_dir is None:
            also = f" (nor {names[1]}/, Megatron-LM's name for it)" if len(names) > 1 else ""
            raise CheckpointError(f"{latest} names step {text}, but {path / names[0]} does not exist{also}")
        return _find(step_dir, depth + 1)
    for sub in SUBFOLDERS:
        if (path / sub).is_dir() and depth < 3:
            return _find(path / sub, depth + 1)
    if depth < 3 and any(holds(path / "critic") for _, holds, _ in FORMATS if (path / "critic").is_dir()):
        raise CheckpointError(f"{path}: no actor/ here, only critic/ (veRL's value model); give "
                              f"{path / 'critic'} to merge the critic")
    for holds_it, what in UNREAD:
        if holds_it(path):
            raise CheckpointError(f"{path}: {what}")
    kinds = "; ".join(what for what, _, _ in FORMATS)
    raise CheckpointError(f"{path}: not a checkpoint streammerge can read (looked for: {kinds}; "
                          f"an actor/ folder; {LATEST_FILE})")


def _has(path: Path, *patterns: str) -> bool:
    return any(next(path.glob(p), None) is not None for p in patterns)


def _deepspeed(path: Path) -> bool:
    """DeepSpeed's files, here or in the step folder its `latest` file names (names only, nothing read)."""
    files = ("mp_rank_*_model_states.pt", "*zero_pp_rank_*_optim_states.pt", "layer_*-model_*-model_states.pt")
    if _has(path, *files):
        return True
    tagged = deepspeed.tagged_folder(path)
    return tagged is not None and _has(tagged, *files)


def _peft_adapter(path: Path) -> bool:
    from .lora import ADAPTER_CONFIG, ADAPTER_FILE  # (lora reads plans, and the planner reads sources)

    return (path / ADAPTER_CONFIG).is_file() and _has(path, ADAPTER_FILE, "adapter_model.bin")


def model_folder(path: Path) -> bool:
    """A Hugging Face model folder: config.json and the weights transformers loads with it."""
    return (path / "config.json").is_file() and _has(path, SINGLE, "pytorch_model.bin", *WEIGHT_INDEXES)


# Formats recognised by their file names, to say what reads them: (is it here, what it is and what to do)
UNREAD: list[tuple[Callable[[Path], bool], str]] = [
    (_deepspeed, "a DeepSpeed checkpoint without ZeRO optimizer partitions (mp_rank_*_model_states.pt alone: ZeRO "
                 "stage 0, or pipeline-parallel layer_*-model_states.pt), which streammerge does not read (it reads "
                 "ZeRO stages 1 to 3): the model states file holds the whole model, under `module`"),
    (lambda p: bool(megatron_legacy.RANK_DIR.match(p.name)) and (p / megatron_legacy.FILE).is_file(),
     "one rank's folder of a Megatron-LM checkpoint (legacy torch format): give the folder holding its mp_rank_*/ "
     "folders"),
    (lambda p: _has(p, "pytorch_model_fsdp_*_rank*.bin"),
     "accelerate's per-rank FSDP files (pytorch_model_fsdp_*_rank*.bin, saved with use_dcp=False), which streammerge "
     "does not read: save with accelerate's default (use_dcp=True, a pytorch_model_fsdp_0/ folder), which it reads"),
    (lambda p: _has(p, "pytorch_model_fsdp_rank*.bin"),
     "accelerate's FSDP1 LOCAL_STATE_DICT files (pytorch_model_fsdp_rank*.bin: each rank's flat parameter shard, "
     "which records no parameter names), which streammerge does not read: save with SHARDED_STATE_DICT (a "
     "pytorch_model_fsdp_0/ folder), which it reads"),
    (_peft_adapter,
     "a peft adapter folder (adapter_config.json and its weights), which streammerge does not read: it folds LoRA "
     "from training checkpoints; peft's merge_and_unload() of the adapter loaded onto its base folds this one"),
    (model_folder,
     "already a Hugging Face model folder (config.json and its weights): there is nothing to merge (`hf upload` "
     "pushes it as it is)"),
    (lambda p: _has(p, "*.ckpt"),
     "a folder of PyTorch Lightning checkpoints (*.ckpt): give the one to merge (a .ckpt file, or a sharded save's "
     ".ckpt folder)"),
]


__all__ = ["FORMATS", "Piece", "ReadStats", "Source", "SourceTensor", "open_checkpoint", "read_tracker"]
