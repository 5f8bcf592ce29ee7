"""Scale-out with torchrun: every rank writes a disjoint share of the output files.

`torchrun --nnodes N --nproc-per-node P -m streammerge CKPT OUT` starts N*P copies of the CLI with
RANK/WORLD_SIZE set. Each copy plans the merge (the plan is deterministic, so all agree without
talking), takes its share with `Plan.split(world_size, rank)` and writes those files to the shared
output folder. torch.distributed (gloo, CPU only) gives the barriers: rank 0 sets the folder up
first, and writes the small files, the index and the final manifest only after every rank is done.
Ranks record finished files in their own part manifest, so they never clobber each other.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from .errors import OutputError
from .options import MergeOptions
from .pipeline import MergeResult, merge

# A rank waits at the last barrier while the others finish their share: allow long merges.
# torchrun's agent stops every rank when one fails, so a crash never leaves the others waiting.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


def launched_by_torchrun() -> bool:
    """True when torchrun started more than one copy of us.

    Several copies started by srun alone would each write every file into the same folder: refuse.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        return True
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        raise OutputError("started as one of several Slurm tasks without torchrun: every task would write "
                          "every file; run `srun torchrun ... -m streammerge CKPT OUT` (see README), or one task")
    return False


def merge_torchrun(checkpoint_dir: str | Path, out_dir: str | Path, options: MergeOptions | None = None,
                   **kwargs: Any) -> MergeResult:
    """`pipeline.merge` for this rank's share of the files; takes the same options."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        result = merge(checkpoint_dir, out_dir, options, num_parts=world, part=rank, sync=dist.barrier, **kwargs)
        dist.barrier()  # nobody reports success before rank 0 has written the index
        return result
    finally:
        if created:
            dist.destroy_process_group()
