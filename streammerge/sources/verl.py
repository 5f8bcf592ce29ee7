"""veRL FSDP checkpoints: `model_world_size_W_rank_R.pt` rank files holding DTensors (FSDP1, FSDP2, HSDP).

The rank files of one world size are found in a folder (every rank present, no mixed runs); the
tensors come from each rank file's metadata (`rankfile`), read for all ranks at once by `rankset`;
their DTensor placements give each rank's box of the full tensor.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import jsonfile
from ..errors import CheckpointError
from .base import Oracle, Source, SourceTensor, step_of
from .rankset import RankSet, load_ranks, source_tensors

if TYPE_CHECKING:
    from ..options import MergeOptions
    from ..plan import Plan

RANK_FILE = re.compile(r"^(model|optim|extra_state)_world_size_(\d+)_rank_(\d+)\.pt$")
STEP_DIR = re.compile(r"^global_step_(\d+)$")



def has_rank_files(folder: Path) -> bool:
    return any(RANK_FILE.match(p.name) for p in folder.iterdir())


def verl_source(actor: Path) -> VerlSource:
    """The checkpoint whose rank files are in `actor`."""
    found: dict[str, dict[int, dict[int, Path]]] = {}
    for p in sorted(actor.iterdir()):
        m = RANK_FILE.match(p.name)
        if m:
            if not p.is_file():
                what = "a link to nothing" if p.is_symlink() and not p.exists() else "not a file"
                raise CheckpointError(f"{p}: {what}; copy the rank file itself")
            kind, ws, rank = m.group(1), int(m.group(2)), int(m.group(3))
            same = found.setdefault(kind, {}).setdefault(ws, {})
            if rank in same:
                raise CheckpointError(f"{actor}: two files for rank {rank}: {same[rank].name} and {p.name}; "
                                      "keep the one the run saved")
            same[rank] = p
    models = found.get("model", {})
    if not models:
        raise CheckpointError(f"{actor}: no model_world_size_*_rank_*.pt files (only optimizer or extra state)")

    fsdp_version = None
    config_ws = None
    cfg_path = actor / "fsdp_config.json"
    if cfg_path.exists() and not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: not a file")
    if cfg_path.is_file():
        try:
            cfg = jsonfile.loads(cfg_path.read_text(), parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError, OSError) as e:
            raise CheckpointError(f"{cfg_path}: unreadable ({str(e)[:120]})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{cfg_path}: expected a JSON object, found {type(cfg).__name__}")
        config_ws = cfg.get("world_size")
        if config_ws is not None and (type(config_ws) is not int or config_ws < 1):
            raise CheckpointError(f"{cfg_path}: world_size {str(config_ws)[:40]!r} is not a positive integer")
        fsdp_version = cfg.get("FSDP_version")
        if fsdp_version is not None and type(fsdp_version) is not int:
            raise CheckpointError(f"{cfg_path}: FSDP_version {str(fsdp_version)[:40]!r} is not an integer")

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
    if world_size > len(ranks):  # never walk a world size taken from a file name: it may be any number
        missing = [r for r in range(min(world_size, max(ranks) + 2)) if r not in ranks][:1000]
        raise CheckpointError(
            f"{actor}: missing model rank files for rank(s) {_ranges(missing)}"
            f"{', ...' if world_size > max(ranks) + 2 else ''} of world size {world_size} "
            "(on clusters without a shared file system, copy every node's rank files into one folder)"
        )
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
    other_optim = tuple(sorted(ws for ws in found.get("optim", {}) if ws != world_size))
    return VerlSource(actor, world_size=world_size, model_files=tuple(ranks[r] for r in range(world_size)),
                      optim_files=optim_files, missing_optim_ranks=missing_optim, other_optim_world_sizes=other_optim,
                      hf_dir=hf_dir if hf_dir.is_dir() else None, fsdp_version=fsdp_version,
                      step=step_of(actor, STEP_DIR))


class VerlSource(Source):
    """The rank files of one veRL FSDP checkpoint (one world size, every rank present)."""

    format = "veRL FSDP"
    oracle_modules = ("torch.distributed.tensor",)  # its oracle rebuilds DTensors

    def __init__(self, path: Path, *, world_size: int, model_files: tuple[Path, ...],
                 optim_files: tuple[Path, ...] = (), missing_optim_ranks: tuple[int, ...] = (),
                 other_optim_world_sizes: tuple[int, ...] = (), hf_dir: Path | None = None,
                 fsdp_version: int | None = None, step: int | None = None):
        super().__init__(path, step=step, hf_dir=hf_dir)
        self.world_size = world_size
        self.model_files = model_files
        self.optim_files = optim_files
        self.missing_optim_ranks = missing_optim_ranks
        self.other_optim_world_sizes = other_optim_world_sizes  # optim files of no model world size: another run's
        self.fsdp_version = fsdp_version
        self._ranks: RankSet | None = None
        self._trust: bool | None = None

    def ranks(self, trust_pickle: bool = False) -> RankSet:
        """Every model rank file's records (read once)."""
        if self._ranks is None or self._trust != trust_pickle:
            self._ranks = load_ranks(self.model_files, self.world_size, trust_pickle=trust_pickle, stats=self.stats)
            self._trust = trust_pickle
        return self._ranks

    def tensors(self, options: MergeOptions) -> dict[str, SourceTensor]:
        tensors = source_tensors(self.ranks(options.trust_pickle))
        if not tensors:
            raise CheckpointError(f"{self.path}: the model rank files hold no tensors (empty checkpoint)")
        return tensors

    def has_optimizer(self) -> bool:  # or something to say why there is none
        return bool(self.optim_files or self.missing_optim_ranks or self.other_optim_world_sizes)

    def optimizer_plan(self, weights: Plan, options: MergeOptions, config: dict | None,
                       model_dir: Path | None) -> tuple[Plan | None, list[str]]:
        if not self.optim_files:
            if self.missing_optim_ranks:
                return None, [f"optimizer not exported: optim rank files missing for ranks "
                              f"{_ranges(list(self.missing_optim_ranks))}"]
            if self.other_optim_world_sizes:
                sizes = ", ".join(map(str, self.other_optim_world_sizes))
                return None, [f"optimizer not exported: {self.path} holds optim rank files of world size {sizes}, "
                              f"but the model rank files are of world size {self.world_size} (another run's "
                              "optimizer?); copy the run's own optim_world_size_"
                              f"{self.world_size}_rank_*.pt files"]
            return None, []
        from ..optimizer.fsdp import plan_optimizer  # optional stage: imports torch

        return plan_optimizer(self, weights, options, config, model_dir)

    def info(self) -> dict[str, Any]:
        return {"world size": self.world_size, "FSDP": self.fsdp_version or "?",
                "optimizer files": "yes" if self.optim_files else "no"}

    def files(self) -> list[Path]:
        return [*self.model_files, *self.optim_files]

    def oracle(self, options: MergeOptions) -> Oracle:
        from .verl_oracle import VerlOracle

        return VerlOracle(self.files(), self.world_size)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


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
