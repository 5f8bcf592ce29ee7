"""Discover: a path a user typed -> the rank files, world size and model folder of one checkpoint."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError

RANK_FILE = re.compile(r"^(model|optim|extra_state)_world_size_(\d+)_rank_(\d+)\.pt$")
LATEST_FILE = "latest_checkpointed_iteration.txt"
STEP_DIR = re.compile(r"^global_step_(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """One FSDP checkpoint folder (veRL's `actor/`), as found on disk."""

    path: Path
    world_size: int
    model_files: tuple[Path, ...]
    optim_files: tuple[Path, ...] = ()
    missing_optim_ranks: tuple[int, ...] = ()
    hf_dir: Path | None = None
    fsdp_version: int | None = None
    step: int | None = None
    lora: dict | None = field(default=None, compare=False)

    @property
    def has_optimizer(self) -> bool:
        return bool(self.optim_files)


def _actor_dir(path: Path) -> Path:
    """Accept the actor folder, a global_step_N folder, or a run folder with latest_checkpointed_iteration.txt."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (give the checkpoint folder, not a file)")
    if any(RANK_FILE.match(p.name) for p in path.iterdir()):
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        text = latest.read_text().strip()
        if not text.isdigit():
            raise CheckpointError(f"{latest}: expected a step number, found {text[:40]!r}")
        step_dir = path / f"global_step_{int(text)}"
        if not step_dir.is_dir():
            raise CheckpointError(f"{latest} names step {text}, but {step_dir} does not exist")
        return _actor_dir(step_dir)
    actor = path / "actor"
    if actor.is_dir():
        return _actor_dir(actor)
    raise CheckpointError(
        f"{path}: not an FSDP checkpoint (no model_world_size_*_rank_*.pt files, no actor/ folder, "
        f"no {LATEST_FILE})"
    )


def _step_of(path: Path) -> int | None:
    for part in reversed(path.parts):
        m = STEP_DIR.match(part)
        if m:
            return int(m.group(1))
    return None


def find_checkpoint(path: str | Path) -> Checkpoint:
    """Find the rank files of one checkpoint and check that every rank is there."""
    actor = _actor_dir(Path(path).expanduser().resolve())
    found: dict[str, dict[int, dict[int, Path]]] = {}
    for p in actor.iterdir():
        m = RANK_FILE.match(p.name)
        if m:
            kind, ws, rank = m.group(1), int(m.group(2)), int(m.group(3))
            found.setdefault(kind, {}).setdefault(ws, {})[rank] = p
    models = found.get("model", {})
    if not models:
        raise CheckpointError(f"{actor}: no model_world_size_*_rank_*.pt files (only optimizer or extra state)")

    fsdp_version = None
    config_ws = None
    cfg_path = actor / "fsdp_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
            config_ws = int(cfg["world_size"]) if "world_size" in cfg else None
            fsdp_version = cfg.get("FSDP_version")
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{cfg_path}: unreadable ({e})") from None

    if config_ws is not None:
        world_size = config_ws
        if world_size not in models:
            raise CheckpointError(
                f"{cfg_path} says world_size {world_size}, but no model_world_size_{world_size}_rank_*.pt "
                f"files are in {actor} (found world sizes {sorted(models)})"
            )
    elif len(models) > 1:
        raise CheckpointError(
            f"{actor}: rank files of several world sizes {sorted(models)} in one folder "
            "(files from different runs?); keep one run's files or add fsdp_config.json"
        )
    else:
        world_size = next(iter(models))
    if len(models) > 1 and config_ws is not None:
        others = sorted(ws for ws in models if ws != world_size)
        raise CheckpointError(
            f"{actor}: rank files of several world sizes {sorted(models)} in one folder; "
            f"fsdp_config.json says {world_size}; remove the files of world size {others}"
        )

    ranks = models[world_size]
    missing = [r for r in range(world_size) if r not in ranks]
    if missing:
        raise CheckpointError(
            f"{actor}: missing model rank files for rank(s) {_ranges(missing)} of world size {world_size} "
            "(on clusters without a shared file system, copy every node's rank files into one folder)"
        )
    extra = sorted(r for r in ranks if r >= world_size)
    if extra:
        raise CheckpointError(f"{actor}: rank files for rank(s) {extra} beyond world size {world_size}")

    optim = found.get("optim", {}).get(world_size, {})
    optim_files: tuple[Path, ...] = ()
    missing_optim: tuple[int, ...] = ()
    if optim:
        missing_optim = tuple(r for r in range(world_size) if r not in optim)
        if not missing_optim:
            optim_files = tuple(optim[r] for r in range(world_size))

    hf_dir = actor / "huggingface"
    lora = None
    lora_path = actor / "lora_train_meta.json"
    if lora_path.is_file():
        try:
            lora = json.loads(lora_path.read_text())
        except ValueError:
            lora = None
    return Checkpoint(
        path=actor,
        world_size=world_size,
        model_files=tuple(ranks[r] for r in range(world_size)),
        optim_files=optim_files,
        missing_optim_ranks=missing_optim,
        hf_dir=hf_dir if hf_dir.is_dir() else None,
        fsdp_version=fsdp_version,
        step=_step_of(actor),
        lora=lora,
    )


def _ranges(ranks: list[int]) -> str:
    """[0,1,2,5] -> '0-2, 5': short enough for a one-line error on 1024 ranks."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(f"{start}-{r}" if r != start else f"{r}")
            start = None
    return ", ".join(out)
