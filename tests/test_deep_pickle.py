"""A dict key nested hundreds of thousands of tuples deep, in each format's pickles: a one-line error, not a crash.

The unpickler builds such a tuple from one byte a level without recursing, then hashes it to set the key, and
CPython hashes a nested tuple by C recursion with no limit: on a thread's usual 8 MiB stack the process dies
(SIGSEGV), torch's own readers included. Each reader unpickles on a thread with a stack for the pickle's length, and
refuses such a key before anything hashes it again. The CLI runs in a child process, so that a crash fails the test.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from ckpt_tools import rewrite_with_torch
from torch.distributed.tensor import Shard

import streammerge
from streammerge.errors import CheckpointError
from streammerge.testing.rankfiles import write_rank_files

DEEP = b")" + b"\x85" * 300_000  # EMPTY_TUPLE, then TUPLE1 300,000 times: ((((),),),...)
SENTINEL = b"X\x08\x00\x00\x00SENTINEL"  # the string "SENTINEL" as protocol 2 pickles it
CODE = Path(streammerge.__file__).resolve().parents[1]  # the children run the streammerge this test imported
MEGATRON = Path(__file__).resolve().parent / "data" / "megatron" / "llama_tp2_pp2"


def _deep_key(pickled: bytes) -> bytes:
    assert SENTINEL in pickled
    return pickled.replace(SENTINEL, DEEP, 1)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A veRL rank-file checkpoint, a DCP and a Megatron run, each with a key nested 300,000 deep in its pickle."""
    root = tmp_path_factory.mktemp("deep")
    rank = write_rank_files(root / "verl", {"a.weight": (torch.ones(6, 4), [Shard(0)]), "SENTINEL": torch.ones(5)},
                            (2,))
    rewrite_with_torch(rank / "model_world_size_2_rank_0.pt", lambda n, b: _deep_key(b) if n == "data.pkl" else b)

    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(3, 5)}, checkpoint_id=str(root / "dcp"), no_dist=True)
    md = pickle.loads((root / "dcp" / ".metadata").read_bytes())
    md.state_dict_metadata["SENTINEL"] = md.state_dict_metadata["w"]
    (root / "dcp" / ".metadata").write_bytes(_deep_key(pickle.dumps(md, protocol=2)))

    run = shutil.copytree(MEGATRON, root / "megatron")
    args = argparse.Namespace(num_layers={"SENTINEL": 1}, hidden_size=32, params_dtype=torch.float32)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 1}, run / "common.pt")
    rewrite_with_torch(run / "common.pt", lambda n, b: _deep_key(b) if n == "data.pkl" else b)
    return {"verl": rank, "dcp": root / "dcp", "megatron": run}


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streammerge", *map(str, args)], cwd=CODE, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(CODE)})


@pytest.mark.parametrize("fmt, command, file, words", [
    ("verl", "merge", "model_world_size_2_rank_0.pt", "an entry under a tuple key"),
    ("dcp", "inspect", ".metadata", "values nested past Python's recursion limit"),
    ("megatron", "merge", "common.pt", r"recorded num_layers [((((((...),),),),), 1)]"),
])
def test_a_key_nested_past_the_stack_is_one_line(ckpts: dict[str, Path], tmp_path: Path, fmt: str, command: str,
                                                 file: str, words: str) -> None:
    folder = ckpts[fmt]
    out = tmp_path / "out"
    proc = _cli(folder, out, "--no-progress") if command == "merge" else _cli("inspect", folder)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("streammerge: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{folder}/" in lines[0] and file in lines[0] and words in lines[0], lines[0]
    assert not out.exists()


def test_torch_dies_on_the_same_files(ckpts: dict[str, Path]) -> None:
    """The differential: torch's readers of each file, each in a forked child on a thread with the usual 8 MiB stack,
    die of SIGSEGV where streammerge refuses in one line (stricter)."""
    code = f"""
import os, sys, threading, warnings
import torch, torch.distributed.tensor
from torch.distributed.checkpoint import FileSystemReader
warnings.simplefilter("ignore")
reads = [lambda: torch.load({str(ckpts["verl"] / "model_world_size_2_rank_0.pt")!r}, weights_only=True),
         lambda: FileSystemReader({str(ckpts["dcp"])!r}).read_metadata(),
         lambda: torch.load({str(ckpts["megatron"] / "common.pt")!r}, weights_only=False)]
threading.stack_size(8 << 20)
for read in reads:
    pid = os.fork()
    if pid == 0:
        t = threading.Thread(target=read)
        t.start()
        t.join()
        os._exit(0)
    print(os.waitpid(pid, 0)[1])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [int(s) for s in proc.stdout.split()] == [signal.SIGSEGV] * 3, proc.stdout


def test_a_deep_key_in_a_dtensors_state_on_the_rank_matcher(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """Rank 1's DTensor state with a deep key first: the rank matcher looks through the head's dicts for a device
    mesh's state without hashing a key that is no name again; the reader then refuses the key, as torch.load does
    (it sets each as an attribute)."""
    folder = write_rank_files(tmp_path / "verl", {f"l{i}.weight": (torch.ones(6, 4), [Shard(0)]) for i in range(3)},
                              (2,))
    state = b"N}q\x11(X\r\x00\x00\x00_local_tensor"  # the first DTensor's state: (None, {"_local_tensor": ...})
    deep_first = state[:5] + DEEP + b"K\x01" + state[5:]  # after the MARK: {deep: 1, "_local_tensor": ...}
    rewrite_with_torch(folder / "model_world_size_2_rank_1.pt",
                       lambda n, b: b.replace(state, deep_first, 1) if n == "data.pkl" else b)
    code = ("from pathlib import Path\nfrom streammerge.sources.rankset import load_ranks\n"
            f"load_ranks(sorted(Path({str(folder)!r}).glob('*.pt')), 2, match_min_records=0)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=CODE, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(CODE)})
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("streammerge.errors.CheckpointError: ") and "rank_1.pt: a tensor's state under a key " \
        "that is no attribute name; torch.load refuses" in last, last


def test_deep_stack_hands_back_what_the_call_returns_or_raises() -> None:
    from streammerge.sources.picklescan import deep_stack, nesting_bound

    data = b"\x80\x02}" + DEEP + b"K\x01s."
    got = deep_stack(lambda: pickle.loads(data), nesting_bound(data))
    read = isinstance(got, dict) and len(got) == 1
    del got  # out of pytest's report, whose repr of the key would hash it on this thread
    assert read
    error = ValueError("as raised")

    def fail() -> None:
        raise error
    with pytest.raises(ValueError) as raised:
        deep_stack(fail, 0)
    assert raised.value is error


def test_no_thread_with_the_stack_is_a_one_line_refusal() -> None:
    """Where the address space is limited (ulimit -v) the stack a deep pickle may need cannot be had: refused."""
    code = ("import resource\nfrom streammerge.errors import CheckpointError\n"
            "from streammerge.sources.picklescan import deep_stack\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
            "try:\n    deep_stack(lambda: None, 20_000_000)\nexcept CheckpointError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=CODE, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(CODE)})
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1, proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.startswith("no thread with a 2457 MiB stack can start to unpickle it"), proc.stdout
    assert "raise the address-space limit (ulimit -v)" in proc.stdout
    from streammerge.sources.picklescan import deep_stack

    with pytest.raises(CheckpointError, match="could nest tuples 100000000 deep, more than streammerge unpickles"):
        deep_stack(lambda: None, 100_000_000)


def test_verifys_oracle_names_no_entry_under_a_deep_key() -> None:
    """A rank file's entry holding no tensor, a dict under a deep key inside (the merge leaves it out): verify's
    oracle, which names nested entries by joining their keys, skips the key instead of recursing through str()."""
    from streammerge.sources.verl_oracle import _flat

    data = b"\x80\x02}(X\x02\x00\x00\x00zz}" + DEEP + b"K\x01sX\x01\x00\x00\x00wK\x02u."  # {"zz": {deep: 1}, "w": 2}
    state: list[dict] = []
    threading.stack_size(64 << 20)  # room to hash the key once, as the reader's thread has
    try:
        thread = threading.Thread(target=lambda: state.append(pickle.loads(data)))
        thread.start()
        thread.join()
    finally:
        threading.stack_size(0)
    try:
        names: object = dict(_flat(state.pop()))
    except RecursionError:  # kept from pytest's report, whose repr of the key would hash it on this thread
        names = "RecursionError"
    assert names == {"w": 2}
    assert dict(_flat({"state": {((),): {"step": 1}, 0: {"step": 2}}, "param_groups": []})) == {"state.0.step": 2}
