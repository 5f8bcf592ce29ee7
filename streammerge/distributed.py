"""Scale-out with torchrun: one writer per host, each writing a disjoint share of the output files.

One process already reads and writes at the speed of a host's disk, so several writers on one disk only
contend, and each one would pay for importing torch and joining a process group. So under
`torchrun --nnodes N --nproc-per-node P -m streammerge CKPT OUT` only local rank 0 of each host writes:
it plans the merge (the plan is deterministic, so the hosts agree without talking), takes its host's
share with `Plan.split(N, host)` and writes those files to the shared output folder. Ranks beyond local
rank 0 have nothing to do and return at once.

On one host the writer is a plain one-process merge: no process group, and no rank imports torch for
it. On several hosts every rank joins a gloo process group (CPU only; it needs every rank), the writers
get a group of their own for the barriers, and the other ranks leave: host 0's writer sets the folder up
first, and writes the small files, the index and the final manifest only after every writer is done.
Writers record finished files in their own part manifest, so they never clobber each other.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OutputError
from .options import MergeOptions, env_seconds
from .pipeline import MergeResult, merge, peak_rss

# A writer waits at the last barrier while the others finish their share: allow long merges (torchrun's agent
# stops the ranks of its own host when one fails; a writer that fails on another host says so before it leaves).
BARRIER_TIMEOUT = datetime.timedelta(hours=24)
# Until every host's ranks have met: a host that died before (another host's agent does not stop ours) must not
# leave the others waiting for a day.
STARTUP_ENV = "STREAMMERGE_TORCHRUN_STARTUP_S"


def launched_by_torchrun() -> bool:
    """True when torchrun started more than one copy of us.

    Several copies started by srun alone would each write every file into the same folder: refuse.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        if "GROUP_RANK" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
            # another launcher's environment, inherited by one process (a Kubeflow pod, a Ray worker): joining a
            # group of WORLD_SIZE ranks would wait for ranks that never come
            raise OutputError(f"RANK and WORLD_SIZE={os.environ['WORLD_SIZE']} are set, but not by torchrun (no "
                              "GROUP_RANK): unset RANK and WORLD_SIZE to merge in this process, or start the "
                              "merge with torchrun")
        return True
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        raise OutputError("started as one of several Slurm tasks without torchrun: every task would write "
                          "every file; run `srun torchrun ... -m streammerge CKPT OUT` (see README), or one task")
    return False


@dataclass(frozen=True)
class Place:
    """Where this rank runs, from torchrun's environment."""

    rank: int
    local_rank: int
    host: int  # torchrun's GROUP_RANK: the node's index
    hosts: int  # GROUP_WORLD_SIZE

    @classmethod
    def from_env(cls) -> Place:
        """Without GROUP_RANK/GROUP_WORLD_SIZE (a launcher other than torchrun's agent) the hosts are
        unknown: every rank counts as a host of its own, so every rank writes a share."""
        rank = int(os.environ.get("RANK", "0"))
        if "GROUP_RANK" in os.environ and "GROUP_WORLD_SIZE" in os.environ:
            return cls(rank, int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["GROUP_RANK"]),
                       int(os.environ["GROUP_WORLD_SIZE"]))
        return cls(rank, 0, rank, int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def writes(self) -> bool:
        return self.local_rank == 0


def merge_torchrun(checkpoint_dir: str | Path, out_dir: str | Path, options: MergeOptions | None = None,
                   **kwargs: Any) -> MergeResult | None:
    """`pipeline.merge` for this host's share of the files, on local rank 0; takes the same options.

    Returns None on the other ranks: they have nothing to write and return at once, before the writers
    finish (wait for those, e.g. with a barrier, before reading the folder).
    """
    me = Place.from_env()
    if me.hosts == 1:
        return merge(checkpoint_dir, out_dir, options, **kwargs) if me.writes else None

    import torch.distributed as dist

    created = not dist.is_initialized()
    try:
        if created:
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=env_seconds(
                STARTUP_ENV, 600, "how long torchrun's ranks on every host may take to meet")))
        writers = _writer_ranks(me)
        # every rank must take part in creating a group, even one it is not in; the writers' own group waits long
        group = dist.new_group(ranks=writers, timeout=BARRIER_TIMEOUT)
    except BaseException as e:
        if created and dist.is_initialized():
            dist.destroy_process_group()
        if isinstance(e, RuntimeError):  # gloo's or the store's error when another host's rank never came or left
            raise OutputError(f"another host's ranks did not start or stopped before the merge began ({_first(e)}); "
                              "their own error says why; rerun the same command") from None
        raise
    try:
        if dist.get_rank() not in writers:
            return None

        def sync() -> None:
            try:
                dist.barrier(group=group)
            except RuntimeError as e:  # gloo's error when a peer writer has failed and left
                raise OutputError(f"another host's writer stopped ({_first(e)}): its own error says why; fix that "
                                  "and rerun the same command (finished files are kept)") from None

        result = merge(checkpoint_dir, out_dir, options, num_parts=me.hosts, part=me.host, sync=sync, **kwargs)
        sync()  # nobody reports success before host 0's writer has written the index
        return result
    finally:
        if created:
            dist.destroy_process_group()


def _first(e: BaseException) -> str:
    """The first sentence of gloo's message, without its source location."""
    first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [type(e).__name__])[0])
    return first.split(". ")[0][:120]


def _writer_ranks(me: Place) -> list[int]:
    """The global ranks that write, in host order, as the ranks themselves report their places."""
    import torch.distributed as dist

    places: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(places, (me.host, me.local_rank, dist.get_rank()))
    writers = sorted((host, rank) for host, local_rank, rank in places if local_rank == 0)
    if [host for host, _ in writers] != list(range(me.hosts)):
        raise OutputError(f"torchrun's ranks do not show one local rank 0 on each of {me.hosts} hosts "
                          f"(hosts of the local ranks 0: {[host for host, _ in writers]}); nothing was written")
    return [rank for _, rank in writers]


def idle_summary() -> str:
    """The line a rank without files prints: which rank it is, who writes instead, and its memory."""
    me = Place.from_env()
    return (f"streammerge: rank {me.rank} (local rank {me.local_rank} on host {me.host}): nothing to write, "
            f"local rank 0 writes this host's files; peak RSS {peak_rss() / 2**20:.0f} MiB")
