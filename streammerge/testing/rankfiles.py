"""DTensor rank files from full tensors, in one process and in milliseconds: any placement on any mesh.

Each rank's DeviceMesh is made by `init_device_mesh` under torch's fake process group (one process,
any world size), so the pickles carry exactly what a real rank would save (mesh layout, this rank's
coordinate, placements). Local tensors are cut from a full tensor with `torch.chunk`, the reference
the planner is checked against. Real training runs are in `synthetic` (FSDP2) and `lora`; large
checkpoints of public model shapes in `presets`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.tensor  # noqa: F401
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Shard

Spec = tuple[torch.Tensor, Sequence[Placement]]  # a full tensor and how it is placed on the mesh


@cache
def device_mesh(mesh_shape: tuple[int, ...], rank: int, names: tuple[str, ...] | None = None) -> DeviceMesh:
    """The mesh object rank `rank` would hold, made under a fake process group of the right size."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=math.prod(mesh_shape))
    try:
        return init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    finally:
        dist.destroy_process_group()


def coordinate(mesh_shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    coord, r = [], rank
    for s in reversed(mesh_shape):
        coord.append(r % s)
        r //= s
    return tuple(reversed(coord))


def local_piece(full: torch.Tensor, placements: Sequence[Placement], mesh_shape: tuple[int, ...],
                coord: tuple[int, ...]) -> torch.Tensor:
    """What one rank holds: torch.chunk along each Shard dim in mesh order (empty when chunk runs out)."""
    t = full
    for p, n, c in zip(placements, mesh_shape, coord):
        if isinstance(p, Shard):
            parts = list(torch.chunk(t, n, dim=p.dim))
            if c < len(parts):
                t = parts[c]
            else:
                t = t.narrow(p.dim, t.shape[p.dim], 0)
    return t


def write_rank_files(out_dir: Path, tensors: Mapping[str, Spec | torch.Tensor], mesh_shape: tuple[int, ...], *,
                     strided: Sequence[str] = (), padded: Sequence[str] = ()) -> Path:
    """Save `model_world_size_W_rank_R.pt` for each rank: DTensors for specs, full copies for plain tensors.

    Names in `strided` are saved as column-major local tensors (a strided storage layout); plain tensors
    named in `padded` as views into a larger storage, 3 elements after its start and 5 before its end
    (torch.save writes the whole storage).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = math.prod(mesh_shape)
    for rank in range(world):
        mesh = device_mesh(tuple(mesh_shape), rank)
        coord = coordinate(mesh_shape, rank)
        sd = {}
        for name, spec in tensors.items():
            if isinstance(spec, torch.Tensor):
                sd[name] = _padded(spec) if name in padded else spec.clone()
                continue
            full, placements = spec
            local = local_piece(full, placements, mesh_shape, coord).clone()
            if name in strided and local.dim() >= 2:
                local = local.transpose(-1, -2).contiguous().transpose(-1, -2)
            sd[name] = DTensor.from_local(local, mesh, list(placements), run_check=False,
                                          shape=full.shape, stride=full.stride())
        torch.save(sd, out_dir / f"model_world_size_{world}_rank_{rank}.pt")
    (out_dir / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world}))
    return out_dir


def _padded(t: torch.Tensor) -> torch.Tensor:
    storage = torch.full((3 + t.numel() + 5,), -7.0, dtype=t.dtype)
    storage[3:3 + t.numel()] = t.reshape(-1)
    return storage[3:3 + t.numel()].view(t.shape)
