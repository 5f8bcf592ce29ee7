"""Real LoRA checkpoints: peft on a tiny transformers model, trained with FSDP2 on gloo, saved as veRL saves them.

`get_peft_model(model, LoraConfig(r, lora_alpha, target_modules="all-linear", ...))`, each decoder layer
and then the root `fully_shard`-ed over a CPU mesh of real processes (optionally with a bf16
`MixedPrecisionPolicy`), one AdamW step so that every lora_B is non-zero, then per rank
`torch.save(model.state_dict(), "model_world_size_W_rank_R.pt")` and the optimizer beside it.
`save_lora_only` keeps only the adapter tensors (and modules_to_save) in the rank files; the base
then lives in `reference/base/`, a plain HF folder.

The oracle, in `reference/` (rank 0, from the live training state):
- `model.safetensors`: the gathered full peft state dict (torch's full-state API);
- `merged.safetensors`: peft's own `merge_and_unload()` of that model (what a fold must equal);
- `logits.safetensors`: `input_ids` and the trained (unmerged) model's logits on them, in eval mode;
- `base/`: the untrained base model (`save_pretrained`, safetensors) with its tokenizer;
- `optimizer.pt`: the gathered optimizer state by parameter name.

    actor = make_lora_checkpoint("/tmp/ck", world_size=3, r=8, lora_alpha=16, mixed_precision="bf16")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .ranks import run_ranks
from .synthetic import _WORKER_IMPORTS, _tokenizer

_PEFT_IMPORTS = [*_WORKER_IMPORTS, "peft"]
_SEQ_LEN = 12


@dataclass(frozen=True)
class LoraSpec:
    """Everything a rank needs (plain data: it pickles to the workers)."""

    actor_dir: str
    world_size: int = 2
    r: int = 8
    lora_alpha: int = 16
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()
    mixed_precision: str | None = None  # "bf16": MixedPrecisionPolicy(param_dtype=bfloat16)
    save_lora_only: bool = False
    write_meta: bool = True
    hidden_size: int = 48
    num_layers: int = 2
    vocab_size: int = 263  # a prime: every rank's share of the embedding differs
    seed: int = 0
    lr: float = 1e-2


def make_lora_checkpoint(out_dir: str | os.PathLike, **kwargs) -> Path:
    """Train a tiny Qwen2 with peft LoRA under FSDP2 and save it as veRL does; returns the actor folder.

    Keyword arguments are `LoraSpec`'s fields. Writes `out_dir/global_step_1/actor/` (model, optim and
    extra_state rank files, `huggingface/`, `fsdp_config.json`, `lora_train_meta.json` unless
    `write_meta=False`) and the oracle in `actor/reference/`. A calling script must guard its entry
    point with `if __name__ == "__main__":` (the ranks are forkserver children).
    """
    actor = Path(out_dir) / "global_step_1" / "actor"
    if actor.is_dir() and any(actor.iterdir()):
        raise FileExistsError(f"{actor} is not empty")
    actor.mkdir(parents=True, exist_ok=True)
    spec = LoraSpec(actor_dir=str(actor), **kwargs)
    run_ranks(_train_and_save, (spec,), spec.world_size, preload=_PEFT_IMPORTS)
    (Path(out_dir) / "latest_checkpointed_iteration.txt").write_text("1")
    return actor


def lora_config(spec: LoraSpec, **extra):
    """The LoraConfig of the run (also what the tests build peft models with)."""
    from peft import LoraConfig

    return LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, target_modules="all-linear", lora_dropout=0.0,
                      use_rslora=spec.use_rslora, modules_to_save=list(spec.modules_to_save) or None,
                      task_type="CAUSAL_LM", **extra)


def model_config(spec: LoraSpec):
    from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

    config = Qwen2Config(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                         intermediate_size=spec.hidden_size * 11 // 4, num_hidden_layers=spec.num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=spec.vocab_size - 2,
                         eos_token_id=spec.vocab_size - 1)
    config.architectures = ["Qwen2ForCausalLM"]
    return config


def base_model(spec: LoraSpec):
    """The untrained base model: the same on every rank and in the oracle (seeded)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

    torch.manual_seed(spec.seed)
    return Qwen2ForCausalLM(model_config(spec)).float()


def peft_model(spec: LoraSpec):
    """The base with the run's LoRA adapter (lora_A seeded too, lora_B zero as peft initialises it)."""
    from peft import get_peft_model

    model = base_model(spec)
    torch.manual_seed(spec.seed + 1)
    return get_peft_model(model, lora_config(spec))


def input_ids(spec: LoraSpec) -> torch.Tensor:
    return torch.randint(0, spec.vocab_size, (2, _SEQ_LEN), generator=torch.Generator().manual_seed(7))


def _train_and_save(rank: int, spec: LoraSpec) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (spec.world_size,), mesh_dim_names=("fsdp",))
    model = peft_model(spec)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if spec.mixed_precision == "bf16" else MixedPrecisionPolicy()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    optim = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)  # as veRL: frozen ones get no state
    batch = torch.randint(0, spec.vocab_size, (2, _SEQ_LEN), generator=torch.Generator().manual_seed(100 + rank))
    model(input_ids=batch, labels=batch).loss.backward()
    optim.step()
    optim.zero_grad()

    actor = Path(spec.actor_dir)
    suffix = f"world_size_{spec.world_size}_rank_{rank}.pt"
    sd = model.state_dict()
    if spec.save_lora_only:
        sd = {k: v for k, v in sd.items() if ".lora_" in k or ".modules_to_save." in k}
    torch.save(sd, actor / f"model_{suffix}")
    torch.save(optim.state_dict(), actor / f"optim_{suffix}")
    torch.save({"lr_scheduler": {}, "rng": {"cpu": torch.get_rng_state()}}, actor / f"extra_state_{suffix}")
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    full_optim = get_optimizer_state_dict(model, optim, options=options)
    if rank == 0:
        _save_side_files(spec, full, full_optim)
    dist.barrier()


def _save_side_files(spec: LoraSpec, full: dict, full_optim: dict) -> None:
    """huggingface/, fsdp_config.json, lora_train_meta.json and the oracle (rank 0)."""
    from safetensors.torch import save_file

    actor = Path(spec.actor_dir)
    config = model_config(spec)
    tokenizer = _tokenizer("qwen2", spec.vocab_size)
    config.save_pretrained(actor / "huggingface")
    tokenizer.save_pretrained(actor / "huggingface")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": spec.world_size}))
    if spec.write_meta:
        meta = {"r": spec.r, "lora_alpha": spec.lora_alpha, "task_type": "CAUSAL_LM"}
        if spec.use_rslora:
            meta["use_rslora"] = True
        (actor / "lora_train_meta.json").write_text(json.dumps(meta))
    ref = actor / "reference"
    ref.mkdir(exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in full.items()}, ref / "model.safetensors")
    torch.save(full_optim, ref / "optimizer.pt")
    trained = peft_model(spec)
    trained.load_state_dict(full, strict=True)
    trained.eval()
    ids = input_ids(spec)
    with torch.no_grad():
        logits = trained(input_ids=ids).logits
    save_file({"input_ids": ids, "logits": logits.contiguous()}, ref / "logits.safetensors")
    merged = trained.merge_and_unload()
    save_file({k: v.clone().contiguous() for k, v in merged.state_dict().items()}, ref / "merged.safetensors")
    base = base_model(spec)
    base.config.name_or_path = str(ref / "base")
    base.save_pretrained(ref / "base")
    tokenizer.save_pretrained(ref / "base")
    (ref / "INFO.json").write_text(json.dumps({"torch": torch.__version__, "spec": spec.__dict__}, indent=2))


__all__ = ["LoraSpec", "base_model", "input_ids", "lora_config", "make_lora_checkpoint", "model_config", "peft_model"]
