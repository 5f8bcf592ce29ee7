"""Rank worker for tests/test_optimizer.py's resume test: a tiny Llama trained with FSDP2 on CPU (gloo).

Every rank sees the same global batch each step, so the averaged gradient is the same whatever the
world size (for power-of-two world sizes the average of identical values is exact), which lets the
test compare a resumed run with an uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

VOCAB, HIDDEN, LAYERS = 203, 32, 2
LR, BETAS, WEIGHT_DECAY = 1e-2, (0.9, 0.95), 0.1


@dataclass(frozen=True)
class Job:
    mode: str  # "train": k steps, save veRL rank files, then one more step | "resume": load export, one step
    world_size: int
    port: int
    work: str  # folder for outputs
    steps: int  # k
    export: str = ""  # streammerge output to resume from (mode "resume")
    fsdp: bool = True  # False: one plain process, no process group
    tag: str = ""
    load_optimizer: bool = True  # False: a control run that resumes the weights only


def config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=88, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                       tie_word_embeddings=False, dtype="float32")


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1000 + step))


def run(rank: int, job: Job) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if job.fsdp:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{job.port}", rank=rank,
                                world_size=job.world_size, timeout=timedelta(seconds=120))
    try:
        (_train if job.mode == "train" else _resume)(rank, job)
    finally:
        if job.fsdp:
            dist.destroy_process_group()


def _model(job: Job, init: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    torch.manual_seed(0 if init else 12345)  # a resumed model starts from other weights: they must be loaded
    model = LlamaForCausalLM(config()).to(torch.float32)
    if job.fsdp:
        mesh = init_device_mesh("cpu", (job.world_size,), mesh_dim_names=("fsdp",))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, lambda _: 1.0)  # as veRL: adds initial_lr
    return model, optim, scheduler


def _step(model, optim, scheduler, step: int) -> None:
    ids = batch(step)
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    scheduler.step()
    optim.zero_grad()


def _save_full_model(model, path: Path, rank: int, job: Job) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=job.fsdp, cpu_offload=job.fsdp))
    if rank == 0:
        save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path))


def _train(rank: int, job: Job) -> None:
    """k steps, veRL's save_checkpoint layout (and a name-keyed oracle), then step k+1 uninterrupted."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model, optim, scheduler = _model(job, init=True)
    for step in range(job.steps):
        _step(model, optim, scheduler, step)
    actor = Path(job.work) / f"global_step_{job.steps}" / "actor"
    actor.mkdir(parents=True, exist_ok=True)
    suffix = f"world_size_{job.world_size}_rank_{rank}.pt"
    torch.save(model.state_dict(), actor / f"model_{suffix}")
    torch.save(optim.state_dict(), actor / f"optim_{suffix}")
    oracle = get_optimizer_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    flat = get_optimizer_state_dict(model, optim, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True))
    if rank == 0:
        torch.save(oracle, Path(job.work) / "oracle_optimizer.pt")
        torch.save(flat, Path(job.work) / "oracle_optimizer_flat.pt")
        (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": job.world_size}))
        config().save_pretrained(actor / "huggingface")
    _step(model, optim, scheduler, job.steps)
    _save_full_model(model, Path(job.work) / "uninterrupted.safetensors", rank, job)


def _resume(rank: int, job: Job) -> None:
    """The documented recipe: weights and optimizer from the streammerge export, on any world size."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from streammerge import load_optimizer_state_dict

    model, optim, scheduler = _model(job, init=False)
    weights = load_file(os.path.join(job.export, "model.safetensors"))
    if job.fsdp:  # every rank passes the full state; torch keeps each rank's shard
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=options)
        if job.load_optimizer:
            set_optimizer_state_dict(model, optim, load_optimizer_state_dict(job.export), options=options)
    else:  # one process: torch's flattened form, as get_optimizer_state_dict(flatten_optimizer_state_dict=True) gives
        model.load_state_dict(weights)
        if job.load_optimizer:
            set_optimizer_state_dict(model, optim, load_optimizer_state_dict(job.export, flatten_state=True),
                                     options=StateDictOptions(flatten_optimizer_state_dict=True))
    _step(model, optim, scheduler, job.steps)
    _save_full_model(model, Path(job.work) / f"resumed_{job.tag}.safetensors", rank, job)
