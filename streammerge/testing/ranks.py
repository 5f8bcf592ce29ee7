"""Run a function as the ranks of a real gloo job on this machine: how every fixture generator trains and saves.

Each rank is a forkserver child (or a spawned one) that joins a process group over a TCPStore this
process holds on a port the OS picks, runs `fn(rank, *args)` and leaves the group. The forkserver
is made single-threaded: numpy and scipy, which transformers imports, start OpenBLAS thread servers
at import, and a process that forks while other threads run may hand its children a lock held
forever or a half-updated structure. A rank that still dies by a signal (a crash inside torch or
gloo: the ranks only train and save with torch, transformers and peft, no code under test runs there)
is reported as a warning and the whole job runs once more; the generators are seeded and write the
same files each time.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any
from unittest.mock import patch

import torch

_SINGLE_THREADED = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_ranks(fn: Callable[..., None], args: Sequence[Any], world_size: int, *, preload: Sequence[str] = (),
              start_method: str = "forkserver", timeout_s: float = 120, attempts: int = 2) -> None:
    """Run `fn(rank, *args)` on `world_size` processes in one gloo group; raises with the failing rank's error.

    `fn` must be a module-level function (it is pickled to the ranks). `preload` names the modules
    the forkserver imports once, so each rank starts warm; it has no effect once this process's
    forkserver runs.
    """
    import torch.multiprocessing as tmp
    from torch.distributed import TCPStore

    for attempt in range(1, attempts + 1):
        store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        try:
            with patch.dict(os.environ, _SINGLE_THREADED):  # for the children and a forkserver started now
                if start_method == "forkserver":
                    multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload))
                tmp.start_processes(_rank_entry, args=(fn, tuple(args), world_size, store.port, timeout_s),
                                    nprocs=world_size, join=True, start_method=start_method)
            return
        except tmp.ProcessExitedException as e:
            if e.signal_name is None or attempt == attempts:
                raise
            warnings.warn(f"rank {e.error_index} of {fn.__module__}.{fn.__name__} died by {e.signal_name} "
                          f"(attempt {attempt} of {attempts}); running all {world_size} ranks again",
                          RuntimeWarning, stacklevel=2)
        finally:
            del store


def _rank_entry(rank: int, fn: Callable[..., None], args: tuple, world_size: int, port: int,
                timeout_s: float) -> None:
    import torch.distributed as dist

    faulthandler.enable(all_threads=True)  # a crash prints every thread's Python stack to the test's stderr
    torch.set_num_threads(1)  # ranks outnumber cores; intra-op threads would only contend
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        fn(rank, *args)
        dist.barrier()  # no rank leaves the group while another still talks to it
    finally:
        dist.destroy_process_group()
