"""Real torch DCP checkpoints of every layout the DCP reader must place: made by `dcp.save` itself.

FSDP2 models on 2, 3 and 4 gloo CPU processes (uneven shards, `Shard(1)` placements, HSDP on a
(2, 2) mesh, 2-D sharded DTensor grids, a bfloat16 layer next to float32 ones, empty shards,
replicated and plain tensors, optimizer state), and one-process saves of every dtype, 0-d,
empty and strided tensors and nested non-tensor items. `make_cases(root)` writes one folder per
case (`CASES`) and, beside each, torch's own consolidation (`<case>.pt`, `dcp_to_torch_save`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

CASES = ["single", "tiny", "w2_model", "w2_trainer", "w2_shard1", "w3_model", "w3_trainer", "w3_shard1", "w4_hsdp"]
_PRELOAD = ["torch.distributed.fsdp", "torch.distributed.checkpoint", "torch.distributed.checkpoint.state_dict",
            "torch.distributed.tensor"]


class Attention(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.q_proj = nn.Linear(h, h)


class Mlp(nn.Module):
    def __init__(self, h: int, inter: int):
        super().__init__()
        self.up_proj = nn.Linear(h, inter, bias=False)  # 7 rows: uneven on 2 and 3 ranks
        self.down_proj = nn.Linear(inter, h, bias=False)


class Block(nn.Module):
    def __init__(self, h: int, inter: int):
        super().__init__()
        self.self_attn = Attention(h)
        self.mlp = Mlp(h, inter)
        self.input_layernorm = nn.LayerNorm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn.q_proj(self.input_layernorm(x))
        return x + self.mlp.down_proj(torch.relu(self.mlp.up_proj(x)))


class Body(nn.Module):
    def __init__(self, vocab: int, h: int, inter: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList([Block(h, inter) for _ in range(2)])
        self.norm = nn.LayerNorm(h)


class Tiny(nn.Module):
    """HF-like names (model.layers.0.self_attn.q_proj.weight, lm_head.weight); vocab 11 shards unevenly."""

    def __init__(self, vocab: int = 11, h: int = 6, inter: int = 7):
        super().__init__()
        self.model = Body(vocab, h, inter)
        self.lm_head = nn.Linear(h, vocab, bias=False)
        self.register_buffer("step_count", torch.tensor(7, dtype=torch.int64))  # 0-d plain buffer on every rank
        self.register_buffer("inv_freq", torch.arange(3, dtype=torch.float32) / 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x.to(next(layer.parameters()).dtype)).float()
        return self.lm_head(self.model.norm(x))


def _shard_dim1_if_even(world: int):
    from torch.distributed.tensor import Shard

    def fn(p: torch.Tensor):  # like veRL's older shard_placement_fn: dim 1 where it divides, else dim 0
        return Shard(1) if p.ndim == 2 and p.shape[1] % world == 0 else Shard(0)
    return fn


def _build(mesh, placement_fn=None) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Tiny()
    model.model.layers[1].to(torch.bfloat16)  # a bf16 layer next to fp32 ones
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement_fn)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement_fn)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([[1, 2, 3, 4]])).sum().backward()
    opt.step()
    return model, opt


def _worker(rank: int, world: int, root: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    warnings.filterwarnings("ignore")
    if world == 4:  # HSDP: (replicate, shard) mesh, plus 2-D sharded DTensor grids
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ddp", "fsdp"))
        model, opt = _build(mesh)
        sd = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
        g = torch.Generator().manual_seed(1)
        sd["grid01"] = distribute_tensor(torch.randn(5, 7, generator=g), mesh, [Shard(0), Shard(1)])
        bf = torch.randn(5, 7, generator=g).to(torch.bfloat16)
        sd["grid10"] = distribute_tensor(bf, mesh, [Shard(1), Shard(0)])
        sd["rep_shard"] = distribute_tensor(torch.arange(9, dtype=torch.int64), mesh, [Replicate(), Shard(0)])
        dcp.save(sd, checkpoint_id=f"{root}/w4_hsdp")
        return
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    model, opt = _build(mesh)
    dcp.save(get_model_state_dict(model), checkpoint_id=f"{root}/w{world}_model")
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)},
             checkpoint_id=f"{root}/w{world}_trainer")
    model, opt = _build(mesh, _shard_dim1_if_even(world))
    g = torch.Generator().manual_seed(2)
    sd = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt),
          "extra": {
              "cols_uneven": distribute_tensor(torch.randint(-9, 9, (5, 7), generator=g), mesh, [Shard(1)]),
              "flags": distribute_tensor(torch.rand(7, generator=g) > 0.5, mesh, [Shard(0)]),
              "tiny": distribute_tensor(torch.ones(1, dtype=torch.bfloat16), mesh, [Shard(0)]),  # empty shards
              "rep": distribute_tensor(torch.randn(3, 4, generator=g), mesh, [Replicate()]),
              "plain": torch.arange(4, dtype=torch.float16),  # the same plain tensor on every rank
          }}
    dcp.save(sd, checkpoint_id=f"{root}/w{world}_shard1")


def save_single(root: Path) -> None:
    """dcp.save in one process (no_dist): dtypes, 0-d, empty, transposed and narrowed views, nesting."""
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 8, generator=g)
    sd = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(5, generator=g).half(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.randint(-2**40, 2**40, (4,), generator=g),
        "i32": torch.randint(-2**20, 2**20, (2, 3), generator=g, dtype=torch.int32),
        "i8": torch.randint(-100, 100, (6,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (6,), generator=g, dtype=torch.uint8),
        "u16": torch.randint(0, 60000, (3,), generator=g, dtype=torch.int32).to(torch.uint16),  # _rebuild_tensor_v3
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),  # _rebuild_tensor_v3
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "bool": torch.rand(9, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "scalar_i": torch.tensor(-5, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "transposed": base.t(),  # full storage, so torch.save keeps the strides (1, 8)
        "narrow": base.narrow(0, 2, 3),  # a view with a storage offset (DCP clones it)
        "slice_t": base[1:4, 2:7].t(),
        "nested": {"a": {"b": torch.arange(5, dtype=torch.int64)}, "lst": [torch.ones(2), 4, "x"]},
        "lr": 0.25,
        "name": "hello",
        "cfg": {"layers": 2, "tags": ["a", "b"]},
    }
    dcp.save(sd, checkpoint_id=str(root / "single"), no_dist=True)
    dcp.save({"w": torch.arange(15, dtype=torch.float32).reshape(3, 5), "note": "x"},
             checkpoint_id=str(root / "tiny"), no_dist=True)


def make_cases(root: Path) -> Path:
    """Every case under `root` (see CASES), each with torch's consolidation beside it as `<case>.pt`."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from .ranks import run_ranks

    save_single(root)
    for world in (2, 3, 4):
        run_ranks(_worker, (world, str(root)), world, preload=_PRELOAD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in CASES:
            dcp_to_torch_save(str(root / name), str(root / name) + ".pt")
    return root
