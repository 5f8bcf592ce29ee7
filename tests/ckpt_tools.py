"""Break and inspect veRL-format checkpoints, for the reliability tests.

The checkpoints themselves come from `streammerge.testing` (`rankfiles.write_rank_files`: any
placement on any mesh in one process; `synthetic`: real FSDP2 runs, the `make_ckpt` fixture); this
module copies them, edits single rank files and snapshots folders, and runs independent CLI processes at once.
"""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.tensor  # noqa: F401

from streammerge.testing.rankfiles import Spec, coordinate, device_mesh, local_piece, write_rank_files

REPO = Path(__file__).resolve().parents[1]
__all__ = ["REPO", "Spec", "coordinate", "copy_actor", "device_mesh", "local_piece", "rewrite_rank",
           "rewrite_with_torch", "run_together", "snapshot", "tree_bytes", "write_rank_files"]


def copy_actor(src: Path, dst: Path, *, optimizer: bool = False) -> Path:
    """A writable copy of a checkpoint folder: model files, fsdp_config, huggingface/ (optim files on request)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name.startswith("model_") or p.name == "fsdp_config.json" or (optimizer and p.name.startswith("optim_")):
            shutil.copyfile(p, dst / p.name)
    shutil.copytree(src / "huggingface", dst / "huggingface")
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def rewrite_rank(path: Path, edit: Callable[[dict], dict | None]) -> None:
    """Load a rank file safely, let `edit` change its state dict, save it back."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = edit(sd) or sd
    torch.save(sd, path)


def rewrite_with_torch(path: Path, edit) -> None:
    """Write the file again through torch's own zip writer (its alignment, its records), each record edited: where
    test_strict's `repack` layout sends a file to the stricter checks, this one stays a file torch.save could have
    written."""
    with zipfile.ZipFile(path) as z:
        items = [(i.filename.split("/", 1)[1], z.read(i)) for i in z.infolist()]
    w = torch._C.PyTorchFileWriter(str(path))
    for name, b in items:
        if name not in ("version", ".data/version", ".data/serialization_id"):  # the writer adds its own
            b = edit(name, b)
            w.write_record(name, b, len(b))
    w.write_end_of_file()


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime, to prove a folder was not modified."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tree_bytes(folder: Path, *, skip_state: bool = True) -> dict[str, bytes]:
    """Every output file's bytes, keyed by relative path (the .streammerge/ state folder left out)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not (skip_state and ".streammerge" in p.relative_to(folder).parts)}


def diverge(path: Path, prefix: str) -> str:
    """torch.save the rank file again with one element of its first DTensor named `prefix...` changed: every zip CRC
    is valid, only the value differs from the replica's. Returns the tensor's name."""
    from torch.distributed.tensor import DTensor

    sd = torch.load(path, map_location="cpu", weights_only=True)
    flat = sd["state"] if "state" in sd else sd
    if "state" in sd:
        name, key = next((f"state.{pid}.exp_avg", pid) for pid, e in sorted(flat.items())
                         if isinstance(e.get("exp_avg"), DTensor))
        local = flat[key]["exp_avg"]._local_tensor
    else:
        name = next(k for k, v in sorted(flat.items()) if k.startswith(prefix) and isinstance(v, DTensor))
        local = flat[name]._local_tensor
    local.view(-1)[-1] += 1.0
    torch.save(sd, path)
    return name


def run_together(*commands: list[str], timeout: float = 300, **popen) -> list[subprocess.CompletedProcess]:
    """`subprocess.run` of independent commands, all started at once: the test only waits, so the CLI processes share
    the cores instead of taking turns (each pays for its interpreter and imports). Output is captured as text."""
    procs: list[subprocess.Popen] = []
    try:
        for command in commands:
            procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen))
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
