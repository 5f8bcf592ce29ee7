"""Large veRL-format FSDP2 checkpoints, written fast, with the shapes of public models (for benchmarks).

Every rank file holds real DTensors (`DTensor.from_local` on a device mesh built in this process on
torch's fake process group, so no peers are needed), saved with `torch.save` exactly as veRL's
`FSDPCheckpointManager` saves `model.state_dict()`: `model_world_size_W_rank_R.pt`, optionally
`optim_world_size_W_rank_R.pt`, `extra_state_world_size_W_rank_R.pt`, `fsdp_config.json` and
`huggingface/config.json` for the preset.

Content is deterministic and independent of the world size: element i (row-major) of tensor k is
a fixed function of (k, i) (see `fill`). So `expected_tensor(preset, name)`
rebuilds any full tensor without reading the checkpoint, and merges of the same preset at different
world sizes must give the same bytes.

    python benchmarks/make_checkpoint.py /work/bench-tmp/q05 --preset qwen2.5-0.5b --world-size 8
    python -m streammerge.testing.presets /work/bench-tmp/q05 --preset qwen2.5-0.5b --world-size 8
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# name: (hidden, intermediate, layers, heads, kv_heads, vocab, tie, qkv_bias, model_type, rope_theta)
PRESETS: dict[str, tuple] = {
    "tiny": (64, 176, 2, 4, 2, 1003, True, True, "qwen2", 10000.0),
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True, True, "qwen2", 1000000.0),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True, True, "qwen2", 1000000.0),
    "qwen2.5-3b": (2048, 11008, 36, 16, 2, 151936, True, True, "qwen2", 1000000.0),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False, True, "qwen2", 1000000.0),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256, False, False, "llama", 500000.0),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    seed: int


def param_specs(preset: str, layers: int | None = None) -> list[Spec]:
    """The parameters of the preset in `model.state_dict()` order (transformers' Qwen2/Llama)."""
    hidden, inter, n_layers, heads, kv, vocab, tie, bias, _, _ = PRESETS[preset]
    n_layers = n_layers if layers is None else layers
    head_dim = hidden // heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes.append((p + "self_attn.q_proj.weight", (heads * head_dim, hidden)))
        if bias:
            shapes.append((p + "self_attn.q_proj.bias", (heads * head_dim,)))
        shapes.append((p + "self_attn.k_proj.weight", (kv * head_dim, hidden)))
        if bias:
            shapes.append((p + "self_attn.k_proj.bias", (kv * head_dim,)))
        shapes.append((p + "self_attn.v_proj.weight", (kv * head_dim, hidden)))
        if bias:
            shapes.append((p + "self_attn.v_proj.bias", (kv * head_dim,)))
        shapes += [(p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)),
                   (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter)),
                   (p + "input_layernorm.weight", (hidden,)),
                   (p + "post_attention_layernorm.weight", (hidden,))]
    shapes.append(("model.norm.weight", (hidden,)))
    if not tie:
        shapes.append(("lm_head.weight", (vocab, hidden)))
    return [Spec(n, s, k) for k, (n, s) in enumerate(shapes)]


def _hash_values(seed: int, start: int, count: int) -> torch.Tensor:
    """A 32-bit integer hash of (seed, index) mapped to [-0.5, 0.5): 24 random mantissa bits."""
    idx = torch.arange(start, start + count, dtype=torch.int64)
    h = (idx * 2654435761 + (seed + 1) * 40503) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 2246822519) & 0xFFFFFFFF
    h ^= h >> 13
    return (h & 0xFFFFFF).to(torch.float32).sub_(8388608.0).mul_(1.0 / 16777216.0)


PERIOD = 1_000_003  # prime: no row length of these models is a multiple of it, so misplaced pieces show
_BASE: list[torch.Tensor] = []


def _base() -> torch.Tensor:
    if not _BASE:
        _BASE.append(_hash_values(0, 0, PERIOD))
    return _BASE[0]


def fill(spec: Spec, start: int, out: torch.Tensor) -> None:
    """Fill a contiguous tensor with the elements of `spec` from flat index `start` on.

    Element i of tensor k is BASE[(i + 7919 k) mod PERIOD]: slices of one random block, copied at
    memory speed (hashing every element was far slower than the disk). Random mantissas, so a bfloat16 cast rounds.
    """
    base, flat = _base(), out.view(-1)
    pos, done = (start + spec.seed * 7919) % PERIOD, 0
    while done < flat.numel():
        n = min(PERIOD - pos, flat.numel() - done)
        flat[done:done + n] = base[pos:pos + n]
        done += n
        pos = 0


def expected_tensor(preset: str, name: str, dtype: torch.dtype = torch.float32,
                    layers: int | None = None) -> torch.Tensor:
    """The full tensor `name` of a checkpoint made from `preset` (for checking merges)."""
    specs = {s.name: s for s in param_specs(preset, layers)}
    if name == "lm_head.weight" and name not in specs:
        name = "model.embed_tokens.weight"
    spec = specs[name]
    out = torch.empty(spec.shape, dtype=dtype)
    fill(spec, 0, out)
    return out


def check_merge(out_dir: str | Path, preset: str, dtype: torch.dtype | None = None, layers: int | None = None,
                names: list[str] | None = None) -> int:
    """Compare tensors of a merged folder bit for bit with `expected_tensor`; returns how many were checked.

    `names=None` checks every tensor. `dtype=None` expects the saved dtype (float32).
    """
    from safetensors import safe_open

    out = Path(out_dir)
    index = out / "model.safetensors.index.json"
    where = (json.loads(index.read_text())["weight_map"] if index.is_file()
             else {k: "model.safetensors" for k in safe_open(str(out / "model.safetensors"), "pt").keys()})
    specs = {s.name for s in param_specs(preset, layers)}
    if set(where) != specs:
        raise AssertionError(f"{out}: tensor names differ from the preset: {sorted(set(where) ^ specs)[:5]}")
    checked = 0
    for name in (names if names is not None else sorted(where)):
        with safe_open(str(out / where[name]), "pt") as f:
            got = f.get_tensor(name)
        want = expected_tensor(preset, name, layers=layers)
        want = want if dtype is None else want.to(dtype)
        same = torch.equal(got.view(torch.uint8) if got.dim() else got,
                           want.view(torch.uint8) if want.dim() else want)
        if got.dtype != want.dtype or got.shape != want.shape or not same:
            raise AssertionError(f"{out}: tensor {name} differs from the source")
        checked += 1
    return checked


def chunk_rows(length: int, parts: int, index: int) -> tuple[int, int]:
    """torch.chunk bounds along dim 0 (what FSDP2's Shard(0) holds)."""
    size = -(-length // parts) if length else 0
    return min(index * size, length), min((index + 1) * size, length)


def mesh_shape(world_size: int, hsdp: int) -> tuple[int, ...]:
    if hsdp <= 1:
        return (world_size,)
    if world_size % hsdp:
        raise SystemExit(f"--hsdp {hsdp} must divide --world-size {world_size}")
    return (hsdp, world_size // hsdp)


def _rank_state(specs: list[Spec], mesh, coord: tuple[int, ...], shape: tuple[int, ...], dtype: torch.dtype,
                tie: bool, kind: str):
    from torch.distributed.tensor import DTensor, Replicate, Shard

    placements = [Shard(0)] if len(shape) == 1 else [Replicate(), Shard(0)]
    shards, index = shape[-1], coord[-1]
    state = {}
    for spec in specs:
        lo, hi = chunk_rows(spec.shape[0], shards, index)
        local = torch.empty((hi - lo,) + spec.shape[1:], dtype=dtype)
        row = math.prod(spec.shape[1:])
        if kind == "model":
            fill(spec, lo * row, local)
        else:  # optimizer moments: distinct, deterministic, cheap
            fill(Spec(spec.name, spec.shape, spec.seed + (100003 if kind == "exp_avg" else 200003)), lo * row, local)
            if kind == "exp_avg_sq":
                local.abs_()
        state[spec.name] = DTensor.from_local(local, mesh, placements, run_check=False,
                                              shape=torch.Size(spec.shape),
                                              stride=torch.empty(spec.shape, device="meta").stride())
    if kind == "model" and tie:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # one storage, as a tied model saves it
    return state


def _write_rank(args: tuple) -> float:
    """Write every file of one rank (runs in a pool worker; its mesh comes from a fake process group)."""
    out, preset, layers, world_size, hsdp, dtype_name, optimizer, rank = args
    from .rankfiles import device_mesh

    t0 = time.perf_counter()
    dtype = DTYPES[dtype_name]
    specs = param_specs(preset, layers)
    tie = PRESETS[preset][6]
    shape = mesh_shape(world_size, hsdp)
    mesh = device_mesh(shape, rank, ("ddp", "fsdp") if len(shape) == 2 else ("fsdp",))
    coord = tuple(mesh.get_coordinate() or ())
    out = Path(out)
    state = _rank_state(specs, mesh, coord, shape, dtype, tie, "model")
    _save(state, out / f"model_world_size_{world_size}_rank_{rank}.pt")
    del state
    if optimizer:
        moments = {k: _rank_state(specs, mesh, coord, shape, torch.float32, False, k)
                   for k in ("exp_avg", "exp_avg_sq")}
        opt = {"state": {i: {"step": torch.tensor(2.0), "exp_avg": moments["exp_avg"][s.name],
                             "exp_avg_sq": moments["exp_avg_sq"][s.name]} for i, s in enumerate(specs)},
               "param_groups": [{"lr": 1e-6, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.01,
                                 "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                                 "differentiable": False, "fused": None, "decoupled_weight_decay": True,
                                 "initial_lr": 1e-6, "params": list(range(len(specs)))}]}
        _save(opt, out / f"optim_world_size_{world_size}_rank_{rank}.pt")
        del opt, moments
    extra = {"lr_scheduler": {"base_lrs": [1e-6], "last_epoch": 2, "_step_count": 3}, "rng": {}}
    _save(extra, out / f"extra_state_world_size_{world_size}_rank_{rank}.pt")
    return time.perf_counter() - t0


def _save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def hf_config(preset: str, layers: int | None = None) -> dict:
    hidden, inter, n_layers, heads, kv, vocab, tie, _, model_type, theta = PRESETS[preset]
    arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[model_type]
    return {
        "architectures": [arch], "model_type": model_type, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": n_layers if layers is None else layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tie, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": theta, "dtype": "bfloat16",
        "attention_bias": model_type == "qwen2", "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": None, "eos_token_id": None,
    }


def checkpoint_bytes(preset: str, dtype: torch.dtype = torch.float32, layers: int | None = None) -> int:
    return sum(math.prod(s.shape) for s in param_specs(preset, layers)) * dtype.itemsize


def make_checkpoint(out: str | Path, *, preset: str = "qwen2.5-0.5b", world_size: int = 8, hsdp: int = 1,
                    dtype: str = "float32", optimizer: bool = False, layers: int | None = None,
                    jobs: int | None = None, step: int = 1) -> Path:
    """Write the checkpoint under OUT/global_step_STEP/actor and return the actor folder."""
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    root = Path(out)
    actor = root / f"global_step_{step}" / "actor"
    (actor / "huggingface").mkdir(parents=True, exist_ok=True)
    mesh_shape(world_size, hsdp)
    (actor / "huggingface" / "config.json").write_text(json.dumps(hf_config(preset, layers), indent=2) + "\n")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world_size}, indent=4))
    jobs = max(1, min(jobs or os.cpu_count() or 1, world_size))
    tasks = [(str(actor), preset, layers, world_size, hsdp, dtype, optimizer, r) for r in range(world_size)]
    if jobs == 1:
        for t in tasks:
            _write_rank(t)
    else:
        with mp.get_context("spawn").Pool(jobs) as pool:
            list(pool.imap_unordered(_write_rank, tasks))
    (root / "latest_checkpointed_iteration.txt").write_text(str(step))
    return actor


def _dcp_rank(rank: int, out: str, preset: str, layers: int | None, world_size: int) -> None:
    """One rank of a real gloo job: its Shard(0) DTensors of the preset, saved by dcp.save with the others."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("fsdp",))
    state = _rank_state(param_specs(preset, layers), mesh, (rank,), (world_size,), torch.float32,
                        PRESETS[preset][6], "model")
    dcp.save({"model": state}, checkpoint_id=out)


def make_dcp_checkpoint(out: str | Path, *, preset: str = "qwen2.5-0.5b", world_size: int = 8,
                        layers: int | None = None) -> Path:
    """The preset's weights (float32, FSDP2 Shard(0) on `world_size` gloo processes) saved by `dcp.save` as
    `{"model": state_dict}` into OUT (a tied lm_head is saved too, as get_model_state_dict returns it),
    with OUT/huggingface/config.json; returns OUT. Content as `make_checkpoint`'s: `check_merge` applies."""
    from .ranks import run_ranks

    root = Path(out)
    (root / "huggingface").mkdir(parents=True, exist_ok=True)
    (root / "huggingface" / "config.json").write_text(json.dumps(hf_config(preset, layers), indent=2) + "\n")
    run_ranks(_dcp_rank, (str(root), preset, layers, world_size), world_size, start_method="spawn", timeout_s=1800)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to create (the run folder; files go to OUT/global_step_1/actor)")
    p.add_argument("--preset", default="qwen2.5-0.5b", choices=list(PRESETS))
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--hsdp", type=int, default=1, help="replica groups (mesh (HSDP, W/HSDP), Replicate+Shard(0))")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="saved parameter dtype (veRL: float32)")
    p.add_argument("--optimizer", action="store_true", help="also write AdamW optim_world_size_*.pt files")
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder layers (smaller files)")
    p.add_argument("--jobs", type=int, default=None, help="processes writing ranks in parallel (default: CPU count)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    actor = make_checkpoint(a.out, preset=a.preset, world_size=a.world_size, hsdp=a.hsdp, dtype=a.dtype,
                            optimizer=a.optimizer, layers=a.layers, jobs=a.jobs)
    size = sum(f.stat().st_size for f in actor.glob("*_world_size_*.pt"))
    print(f"{actor}: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(actor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
