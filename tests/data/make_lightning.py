#!/usr/bin/env python3
"""Generate real PyTorch Lightning checkpoints of FSDP training (sharded: torch DCP) and of DDP training (one file),
with torch-gathered oracles.

NOT run in CI: the committed fixture is ``tests/data/lightning/`` (see its README.md). Usage::

    python tests/data/make_lightning.py OUT_DIR [--cases a,b]     # lightning, transformers; FSDPStrategy: a GPU

Two strategies saving a DCP folder named as the checkpoint file would be: ``ModelParallelStrategy`` (FSDP2, the
model sharded by ``fully_shard`` in ``configure_model``; runs on CPU) and ``FSDPStrategy(state_dict_type="sharded")``
(FSDP1; a GPU). And ``DDPStrategy`` (CPU), whose rank 0 torch.saves Lightning's whole checkpoint dict into the one file
``epoch=0-step=3.ckpt`` (its reference/ then holds no optimizer.pt: one file's optimizer state is not exported).

For each case it writes ``OUT_DIR/<case>/``:

    huggingface/                   config.json, generation_config.json and a tiny offline tokenizer: the model folder
                                   the LightningModule built its transformers model from (a user's --model-name)
    run/checkpoints/epoch=0-step=3.ckpt/
                                   exactly what Lightning's ModelCheckpoint wrote through the strategy's
                                   save_checkpoint: a torch DCP folder of {"model" (FSDPStrategy) or "state_dict"
                                   (ModelParallelStrategy): the LightningModule's state dict, "optimizer_0": the
                                   optimizer's} and Lightning's meta.pt (nothing added or removed)
    reference/model.safetensors    the LightningModule's full state dict, gathered in the training processes when
                                   training ended (right after the checkpoint):
                                   get_model_state_dict(full_state_dict=True, cpu_offload=True); keys as the
                                   LightningModule names them (`model.` + transformers')
    reference/optimizer.pt         torch.save(get_optimizer_state_dict(..., full_state_dict=True, cpu_offload=True))
    reference/logits.safetensors   input_ids and the logits of a float32 CPU transformers model built from
                                   huggingface/config.json and loaded (strict) with that state, `model.` stripped
    reference/INFO.json            versions, device, launch command, strategy settings, the files written

The LightningModule holds the transformers model as ``self.model`` (the usual way), so its state dict keys are
``model.`` + transformers' names, and Lightning nests them once more: DCP keys ``model.model.model.embed_tokens.weight``
(FSDPStrategy) or ``state_dict.model.model.embed_tokens.weight`` (ModelParallelStrategy).

Why a GPU for FSDPStrategy: Lightning refuses it without one (``The strategy `fsdp` requires a GPU accelerator``),
and torch's FSDP1 needs an accelerator device. One GPU is enough: both ranks use cuda:0 (Lightning's device parsing
is told there are two, and both map to cuda:0) and talk through gloo (NCCL refuses two ranks on one GPU; gloo stages
CUDA tensors through host memory). Nothing of that reaches the checkpoint, which Lightning's own code writes. The
oracle's gathers run after training.

The committed ModelParallelStrategy cases were made on CPU (this project's VM: torch 2.13.0, transformers 5.25.0,
lightning 2.6.6), the FSDPStrategy cases on one H100 (torch 2.11.0, transformers 5.17.0, lightning 2.6.6); see
tests/data/lightning/README.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from make_accelerate import (  # this folder: the script's own, first on sys.path
    cli,
    run_workers,
    save_logits,
    save_oracle,
    write_base,
)

HERE = Path(__file__).resolve().parent
WORLD_SIZE = 2
STEPS = 3
SEQ = 16
BATCH = 2  # per device

# strategy: "fsdp" is FSDPStrategy (FSDP1, use_orig_params, ShardedTensors; the DCP's model container is `model`), GPU
# only; "model_parallel" is ModelParallelStrategy (FSDP2 through fully_shard in configure_model, DTensors; the
# container is `state_dict`), which runs on CPU. mixed: bf16 compute with float32 master weights (FSDP1: Lightning's
# "bf16-mixed" precision; FSDP2: fully_shard's MixedPrecisionPolicy, as Lightning's docs set it up)
# One decoder layer (make_accelerate's models otherwise): DCP writes each tensor as a small archive of its own, and a
# Lightning checkpoint holds the model and the optimizer in one folder.
CASES = {
    "llama_fsdp2_fp32": dict(arch="llama", tie=False, mixed="no", strategy="model_parallel", seed=11, vocab=99,
                             layers=1),
    "qwen2_fsdp2_tied_bf16": dict(arch="qwen2", tie=True, mixed="bf16", strategy="model_parallel", seed=12,
                                  vocab=263, layers=1),
    "llama_fsdp1_fp32": dict(arch="llama", tie=False, mixed="no", strategy="fsdp", seed=13, vocab=99, layers=1),
    "qwen2_fsdp1_tied_bf16": dict(arch="qwen2", tie=True, mixed="bf16", strategy="fsdp", seed=14, vocab=263,
                                  layers=1),
    # DDPStrategy: every rank holds the whole model, and rank 0 torch.saves Lightning's whole checkpoint dict into one
    # file (no folder); "bf16-true": the weights themselves in bfloat16
    "llama_ddp_fp32": dict(arch="llama", tie=False, mixed="no", strategy="ddp", seed=15, vocab=99, layers=1),
    "qwen2_ddp_tied_bf16": dict(arch="qwen2", tie=True, mixed="bf16-true", strategy="ddp", seed=16, vocab=263,
                                layers=1),
}


def _one_gpu_for_every_rank(world_size: int) -> None:
    """Lightning's device parsing asks for as many GPUs as ranks: give every rank cuda:0."""
    import torch
    from lightning.pytorch.accelerators import CUDAAccelerator

    CUDAAccelerator.parse_devices = staticmethod(lambda devices: list(range(int(devices))))
    CUDAAccelerator.get_parallel_devices = staticmethod(lambda devices: [torch.device("cuda", 0)] * len(devices))


def worker(case_name: str, case_dir: Path) -> None:
    """One training process (started by torchrun): train, let ModelCheckpoint save, gather the oracle."""
    import lightning as L
    import torch
    import transformers
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from transformers import AutoConfig, AutoModelForCausalLM

    case = CASES[case_name]
    gpu = case["strategy"] == "fsdp"
    ddp = case["strategy"] == "ddp"
    if gpu:
        _one_gpu_for_every_rank(WORLD_SIZE)
        torch.cuda.set_device(0)
    base = case_dir / "huggingface"
    ref_dir = case_dir / "reference"
    config = AutoConfig.from_pretrained(base)

    class LitLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            transformers.set_seed(case["seed"])  # the same init on every rank
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

        def configure_model(self) -> None:
            if gpu or ddp:  # FSDPStrategy wraps the module itself; DDP shards nothing
                return
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = self.device_mesh["data_parallel"]
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16) \
                if case["mixed"] == "bf16" else MixedPrecisionPolicy()
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(self.model, mesh=mesh, mp_policy=policy)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)

    gathered: dict = {}

    class Oracle(L.Callback):
        """After the last checkpoint (ModelCheckpoint saves at the epoch's end): torch's gather of the live state."""

        def on_train_end(self, trainer, pl_module):
            sys.path.insert(0, str(HERE))
            from make_verl_gpu import _stage_dtensor_gathers_through_cpu

            _stage_dtensor_gathers_through_cpu()
            # DDP: the LightningModule itself (every rank holds all of it), not DDP's wrapper around it
            model, optim = pl_module if ddp else trainer.strategy.model, trainer.optimizers[0]
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            gathered["model"] = get_model_state_dict(model, options=options)
            gathered["optimizer"] = get_optimizer_state_dict(model, optim, options=options)
            gathered["step"] = trainer.global_step
            gathered["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"

    g = torch.Generator().manual_seed(case["seed"])
    data = torch.randint(0, case["vocab"] - 3, (WORLD_SIZE * BATCH * STEPS, SEQ), generator=g)
    layer_cls = type(AutoModelForCausalLM.from_config(config).model.layers[0])
    if gpu:
        strategy = FSDPStrategy(state_dict_type="sharded", process_group_backend="gloo", auto_wrap_policy={layer_cls})
        precision = "bf16-mixed" if case["mixed"] == "bf16" else "32-true"
    elif ddp:
        strategy = DDPStrategy(process_group_backend="gloo")
        precision = "bf16-true" if case["mixed"] == "bf16-true" else "32-true"
    else:
        strategy = ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1)
        precision = "32-true"
    checkpoint = ModelCheckpoint(dirpath=case_dir / "run" / "checkpoints")
    trainer = L.Trainer(accelerator="cuda" if gpu else "cpu", devices=WORLD_SIZE, strategy=strategy,
                        precision=precision, max_epochs=1, logger=False, enable_progress_bar=False,
                        callbacks=[checkpoint, Oracle()], enable_model_summary=False, use_distributed_sampler=True)
    trainer.fit(LitLM(), torch.utils.data.DataLoader(data, batch_size=BATCH))
    assert gathered.get("step") == STEPS, gathered.get("step")
    if int(os.environ["RANK"]) != 0:
        return
    full = gathered["model"]
    save_oracle(ref_dir, full, gathered["optimizer"])
    if ddp:  # one file's optimizer state is keyed by position, not name, and not exported: no oracle kept for it
        (ref_dir / "optimizer.pt").unlink()
    cpu_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    cpu_model.load_state_dict({k.removeprefix("model."): v for k, v in full.items()}, strict=True)
    save_logits(ref_dir, cpu_model, case["vocab"])
    info = {
        "case": {"name": case_name, **case},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "lightning": L.__version__},
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "world_size": int(os.environ["WORLD_SIZE"]),
        "strategy": {"class": type(trainer.strategy).__name__, "precision": precision, "process_group_backend":
                     trainer.strategy.process_group_backend if gpu or ddp else "gloo (torch's default for CPU)",
                     **({"state_dict_type": "sharded", "auto_wrap_policy": [layer_cls.__name__],
                         "kwargs": {k: str(v) for k, v in trainer.strategy.kwargs.items()}} if gpu else {} if ddp else
                        {"fully_shard": "each decoder layer, then the transformers model",
                         "mp_policy": "bfloat16 params and reduce" if case["mixed"] == "bf16" else "default"})},
        "optimizer": "torch.optim.AdamW(lr=1e-3, weight_decay=0.01)",
        "model_class": gathered["model_class"],
        "steps": STEPS, "per_device_batch": BATCH, "seq": SEQ,
    }
    (ref_dir / "INFO.json").write_text(json.dumps(info, indent=2) + "\n")


def make_case(case_name: str, out: Path) -> Path:
    import torch

    if CASES[case_name]["strategy"] == "fsdp" and not torch.cuda.is_available():
        raise SystemExit(f"{case_name}: Lightning runs FSDPStrategy only on a GPU (see this script's docstring)")
    case_dir = out / case_name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case = CASES[case_name]
    write_base(case_name, case_dir, case)
    run_workers(Path(__file__), case_name, case_dir, {})
    return case_dir


if __name__ == "__main__":
    cli(__doc__, CASES, make_case, worker)
