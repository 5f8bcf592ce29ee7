#!/usr/bin/env python3
"""Generate real accelerate / HF Trainer FSDP1 and FSDP2 ``SHARDED_STATE_DICT`` checkpoints with torch-gathered
oracles, of full models and of peft LoRA models.

NOT run in CI: the committed fixture is ``tests/data/accelerate/`` (see its README.md). Usage::

    python tests/data/make_accelerate.py OUT_DIR [--cases a,b]     # needs one CUDA GPU, accelerate, transformers

For each case it writes ``OUT_DIR/<case>/``:

    huggingface/                the model folder the run started from, which a user passes as --model-name:
                                config.json, generation_config.json and a tiny offline tokenizer (no weights: the
                                model is built from the config with a fixed seed). Named as the other fixtures'
                                config folders; streammerge does not find it on its own (it is not in or beside
                                the DCP folder), as it would not find a user's model folder
    run/checkpoint-N/           exactly what ``Trainer._save_checkpoint`` wrote (nothing added or removed)
    reference/model.safetensors full model state dict gathered in the training processes at the moment the
                                checkpoint was saved: get_model_state_dict(full_state_dict=True, cpu_offload=True)
    reference/optimizer.pt      torch.save(get_optimizer_state_dict(..., full_state_dict=True, cpu_offload=True))
    reference/logits.safetensors  input_ids and the logits of a float32 CPU model built from huggingface/config.json and
                                loaded with that full state dict (strict)
    reference/INFO.json         versions, device, launch command and environment, arguments, the files written

The LoRA cases also write ``huggingface/model.safetensors`` (the frozen base, saved before ``get_peft_model``: the
user's --base-model) and ``reference/merged.safetensors`` (peft's ``merge_and_unload()`` of a CPU peft model loaded
with the gathered state); their logits are the merged model's.

Training: ``transformers.Trainer`` with ``fsdp="full_shard auto_wrap", fsdp_config={"version": 1 or 2,
"state_dict_type": "SHARDED_STATE_DICT", ...}``, 2 processes started by torchrun, a few AdamW steps, then
the checkpoint.

Why a GPU: accelerate never runs FSDP on CPU. ``PartialState._prepare_backend`` (accelerate/state.py, 1.16.0,
line 769) gives CPU processes ``DistributedType.MULTI_CPU`` (with no accelerator and no ``cpu=True``, line 776:
``NO``), and ``AcceleratorState.__init__`` turns the run into FSDP only inside ``elif self.distributed_type in
[DistributedType.MULTI_GPU, ...]`` (line 947), a list without MULTI_CPU: on CPU (``use_cpu=True``, torchrun, 2
ranks) the Trainer silently trains with DDP and saves ``model.safetensors`` and ``optimizer.pt`` instead. No
environment variable changes that (ACCELERATE_USE_FSDP and FSDP_* are read only inside that branch; the
distributed type comes from ``torch.accelerator.current_accelerator()``).

One GPU is enough: both ranks use cuda:0 through settings that change nothing that is saved.
``ACCELERATE_TORCH_DEVICE=cuda:0`` (read by ``PartialState.__init__``) keeps accelerate off the absent cuda:1,
``torch.cuda.set_device(0)`` before training keeps torch's DeviceMesh from picking cuda:LOCAL_RANK, and
``TrainingArguments(ddp_backend="gloo")`` replaces NCCL, which refuses two ranks on one GPU (gloo stages CUDA
tensors through host memory). The checkpoint is written by accelerate's own ``save_fsdp_model`` /
``save_fsdp_optimizer`` (``dist_cp.save({"model": ...})`` into ``pytorch_model_fsdp_0/``,
``dist_cp.save({"optimizer": ...})`` into ``optimizer_0/``), called by ``Trainer._save_checkpoint``. Only the
oracle's gathers, after the save, are routed through host memory (make_verl_gpu's
``_stage_dtensor_gathers_through_cpu``: gloo's coalesced all-gather crashes on CUDA tensors).

Made with torch 2.11.0+cu130, transformers 5.17.0 (the GPU machine's) and accelerate 1.16.0 (carried as a wheel)
on one NVIDIA H200 or H100, peft 0.21.0 (the machine's) or 0.22.0 (a wheel, for the case that asks for it); see
tests/data/accelerate/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from make_verl_gpu import _free_port as free_port  # this folder: the script's own, first on sys.path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORLD_SIZE = 2
STEPS = 3
SEQ = 16
BATCH = 2  # per device

# arch: llama | qwen2; mixed: accelerate's mixed precision (master weights are float32 always); fsdp: accelerate's
# fsdp_version (1 is accelerate's default); lora: the run trains a peft LoRA adapter on a frozen base model. Odd vocab
# sizes: the embedding's rows shard unevenly over the 2 ranks (50/49, 132/131)
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"], lora_dropout=0.0)
CASES = {
    # Llama, untied, float32 throughout
    "llama_fp32": dict(arch="llama", tie=False, mixed="no", seed=1, vocab=99, fsdp=2),
    # Qwen2 (q/k/v biases), tied embeddings, bf16 mixed precision (FSDP2 MixedPrecisionPolicy, fp32 master weights)
    # (byte-level BPE, which transformers 5 loads Qwen2 tokenizers as, needs more than 256 ids)
    "qwen2_tied_bf16": dict(arch="qwen2", tie=True, mixed="bf16", seed=2, vocab=263, fsdp=2),
    # the same two under FSDP1 (use_orig_params, ShardedTensors in the DCP)
    "llama_fsdp1_fp32": dict(arch="llama", tie=False, mixed="no", seed=3, vocab=99, fsdp=1),
    "qwen2_fsdp1_tied_bf16": dict(arch="qwen2", tie=True, mixed="bf16", seed=4, vocab=263, fsdp=1),
    # peft LoRA: the Trainer saves get_peft_model_state_dict (adapter_only=True), keys without the adapter's name
    "llama_lora_fsdp2": dict(arch="llama", tie=False, mixed="no", seed=5, vocab=99, fsdp=2, lora=True),
    # peft 0.21 under FSDP1: its get_peft_model_state_dict strips only a leading _fsdp_wrapped_module. from module
    # names and finds no adapter inside the nested decoder-layer units: the checkpoint holds no weights
    "qwen2_lora_fsdp1_tied": dict(arch="qwen2", tie=True, mixed="no", seed=6, vocab=263, fsdp=1, lora=True,
                                  peft="0.21."),
    # the same run with peft 0.22, whose get_peft_model_state_dict strips wrapper names at any depth
    "qwen2_lora_fsdp1_tied_peft022": dict(arch="qwen2", tie=True, mixed="no", seed=8, vocab=263, fsdp=1, lora=True,
                                          peft="0.22."),
    # FSDP1 with use_orig_params=False: flat parameters in training, original names in the saved state
    "llama_fsdp1_flat_fp32": dict(arch="llama", tie=False, mixed="no", seed=7, vocab=99, fsdp=1, orig_params=False),
}
HIDDEN = 16
INTERMEDIATE = 32
LAYERS = 2
HEADS = 2  # head_dim 8
KV_HEADS = 1


def _config(case: dict):
    from transformers import LlamaConfig, Qwen2Config

    vocab = case["vocab"]
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                  num_hidden_layers=case.get("layers", LAYERS), num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                  tie_word_embeddings=case["tie"], bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                  pad_token_id=vocab - 1, dtype="float32")
    if case["arch"] == "llama":
        cfg = LlamaConfig(**common)
        cfg.architectures = ["LlamaForCausalLM"]
    else:
        cfg = Qwen2Config(**common)
        cfg.architectures = ["Qwen2ForCausalLM"]
    return cfg


def write_base(case_name: str, case_dir: Path, case: dict | None = None) -> Path:
    """config.json, generation_config.json and the tokenizer: the folder a user gives as --model-name (`case`: another
    generator's case, with the same arch, tie and vocab fields)."""
    from transformers import GenerationConfig

    sys.path.insert(0, str(REPO))
    from streammerge.testing.synthetic import _tokenizer

    base = case_dir / "huggingface"
    case = case or CASES[case_name]
    cfg = _config(case)
    cfg.save_pretrained(base)
    GenerationConfig.from_model_config(cfg).save_pretrained(base)
    tok = _tokenizer(case["arch"], case["vocab"])  # ids: ..., <unk>, <s>, </s> last, as bos/eos/pad above
    tok.save_pretrained(base)
    return base


class _Dataset:
    """Fixed random token sequences (labels = inputs: causal LM loss)."""

    def __init__(self, n: int, vocab: int, seed: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab - 3, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def worker(case_name: str, case_dir: Path) -> None:
    """One training process (started by torchrun): train, let Trainer save checkpoint-N, gather the oracle."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    case = CASES[case_name]
    base = case_dir / "huggingface"
    ref_dir = case_dir / "reference"
    # both ranks on the one GPU: select it before anything else does (torch's DeviceMesh would otherwise pick
    # cuda:LOCAL_RANK, absent for rank 1)
    torch.cuda.set_device(0)
    transformers.set_seed(case["seed"])
    config = AutoConfig.from_pretrained(base)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # same seed: same init on every rank
    layer_cls = type(model.model.layers[0]).__name__
    if case.get("lora"):
        import peft
        from peft import LoraConfig, get_peft_model

        assert peft.__version__.startswith(case.get("peft", "")), f"case {case_name} needs peft {case['peft']}x"
        if int(os.environ["RANK"]) == 0:  # the frozen base model the run started from: the user's --base-model
            model.save_pretrained(base)
        model = get_peft_model(model, LoraConfig(**LORA, task_type="CAUSAL_LM"))
    fsdp_config = {"version": case["fsdp"], "state_dict_type": "SHARDED_STATE_DICT",
                   "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": [layer_cls]}
    if case["fsdp"] == 2:
        fsdp_config["reshard_after_forward"] = True
    else:  # FSDP1: "full_shard" gives the sharding strategy; frozen and trained parameters share flat parameters
        fsdp_config["use_orig_params"] = case.get("orig_params", True)
    args = TrainingArguments(
        output_dir=str(case_dir / "run"), max_steps=STEPS, save_strategy="steps", save_steps=STEPS,
        per_device_train_batch_size=BATCH, learning_rate=1e-3, weight_decay=0.01,
        lr_scheduler_type="linear", logging_steps=1, report_to="none", seed=case["seed"], data_seed=case["seed"],
        bf16=case["mixed"] == "bf16", fsdp="full_shard auto_wrap", fsdp_config=fsdp_config, ddp_backend="gloo",
        dataloader_num_workers=0, disable_tqdm=True,
    )
    gathered: dict = {}

    class Oracle(TrainerCallback):
        """Runs on every rank right after Trainer saved checkpoint-N: torch's own gather of the live state."""

        def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
            # gloo's coalesced all-gather, which DTensor.full_tensor() uses, crashes on CUDA tensors: stage those
            # gathers through host memory (the checkpoint is already written; training is over)
            sys.path.insert(0, str(HERE))
            from make_verl_gpu import _stage_dtensor_gathers_through_cpu

            _stage_dtensor_gathers_through_cpu()
            optim = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            gathered["model"] = get_model_state_dict(model, options=options)
            gathered["optimizer"] = get_optimizer_state_dict(model, optim, options=options)
            gathered["step"] = state.global_step
            gathered["param_order"] = [n for n, _ in model.named_parameters()]
            gathered["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
            gathered["optimizer_class"] = f"{type(optim).__module__}.{type(optim).__qualname__}"

    data = _Dataset(64, case["vocab"], case["seed"])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Oracle()])
    assert trainer.is_fsdp_enabled, "accelerate did not enable FSDP"
    trainer.train()
    assert gathered.get("step") == STEPS, gathered.get("step")
    if int(os.environ["RANK"]) != 0:
        return
    plugin = trainer.accelerator.state.fsdp_plugin
    full = gathered["model"]
    save_oracle(ref_dir, full, gathered["optimizer"])
    cpu_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if case.get("lora"):
        # the trained model as peft merges it: the fold streammerge must equal
        from peft import LoraConfig, get_peft_model

        cpu_model = get_peft_model(cpu_model, LoraConfig(**LORA, task_type="CAUSAL_LM"))
        cpu_model.load_state_dict(full, strict=True)
        cpu_model = cpu_model.merge_and_unload().eval()
        merged = cpu_model.state_dict()
        save_file({k: v.detach().clone().contiguous() for k, v in merged.items()}, ref_dir / "merged.safetensors",
                  metadata={"format": "pt"})
    else:
        cpu_model.load_state_dict(full, strict=True)
    save_logits(ref_dir, cpu_model, case["vocab"])
    import accelerate

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                "accelerate": accelerate.__version__}
    if case.get("lora"):
        import peft

        versions["peft"] = peft.__version__
    info = {
        "case": {"name": case_name, **case},
        "versions": versions,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "world_size": int(os.environ["WORLD_SIZE"]),
        "environment": {k: os.environ.get(k) for k in ("ACCELERATE_TORCH_DEVICE",)},
        "distributed_type": str(trainer.accelerator.state.distributed_type),
        "backend": trainer.accelerator.state.backend,
        "fsdp_plugin": {"fsdp_version": plugin.fsdp_version, "state_dict_type": str(plugin.state_dict_type),
                        "mixed_precision_policy": str(plugin.mixed_precision_policy)},
        "fsdp_config": fsdp_config,
        "lora": LORA if case.get("lora") else None,
        "optimizer": gathered["optimizer_class"],
        "optim_name": str(args.optim),
        "model_class": gathered["model_class"],
        "steps": STEPS, "per_device_batch": BATCH, "seq": SEQ,
        "param_order": gathered["param_order"],
    }
    (ref_dir / "INFO.json").write_text(json.dumps(info, indent=2) + "\n")


def save_oracle(ref_dir: Path, model: dict, optimizer: dict) -> None:
    """reference/model.safetensors and reference/optimizer.pt: the state torch gathered."""
    import torch
    from safetensors.torch import save_file

    ref_dir.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage: tied weights are saved as separate copies, every key kept
    save_file({k: v.detach().clone().contiguous() for k, v in model.items()}, ref_dir / "model.safetensors",
              metadata={"format": "pt"})
    torch.save(optimizer, ref_dir / "optimizer.pt")


def save_logits(ref_dir: Path, model, vocab: int) -> None:
    """reference/logits.safetensors: fixed input_ids [2, 8] and the logits `model` (float32, CPU) gives them."""
    import torch
    from safetensors.torch import save_file

    input_ids = torch.randint(0, vocab - 3, (2, 8), generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    save_file({"input_ids": input_ids, "logits": logits.contiguous()}, ref_dir / "logits.safetensors",
              metadata={"format": "pt"})


def make_case(case_name: str, out: Path) -> Path:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("accelerate runs FSDP only on an accelerator (see this script's docstring): run it on a "
                         "machine with a CUDA GPU")
    case_dir = out / case_name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    write_base(case_name, case_dir)
    run_workers(Path(__file__), case_name, case_dir, {"ACCELERATE_TORCH_DEVICE": "cuda:0"})
    return case_dir


def run_workers(script: Path, case_name: str, case_dir: Path, env: dict[str, str], world_size: int = WORLD_SIZE
                ) -> None:
    """torchrun `world_size` processes of `script --worker CASE CASE_DIR` (this repo first on their path, `env` added),
    then record in the case's INFO.json the command and every file written."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}",
               f"--master_port={free_port()}", str(script.resolve()), "--worker", case_name, str(case_dir)]
    subprocess.run(command, env={**os.environ, **env, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"},
                   check=True)
    info_path = case_dir / "reference" / "INFO.json"
    info = json.loads(info_path.read_text())
    info["command"] = " ".join([*(f"{k}={v}" for k, v in env.items()), "torchrun", command[3],
                                f"tests/data/{script.name}", "--worker", case_name, f"OUT/{case_name}"])
    info["files"] = {str(p.relative_to(case_dir)): p.stat().st_size
                     for p in sorted(case_dir.rglob("*")) if p.is_file()}
    info_path.write_text(json.dumps(info, indent=2) + "\n")


def cli(doc: str, cases: dict, make: Callable[[str, Path], Path], work: Callable[[str, Path], None]) -> None:
    """A generator's command line: `OUT [--cases a,b]`, or, in the processes torchrun starts, `--worker CASE DIR`."""
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        import faulthandler

        faulthandler.enable()
        work(sys.argv[2], Path(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--cases", default=",".join(cases))
    a = p.parse_args()
    for name in a.cases.split(","):
        print(make(name, a.out.resolve()))


if __name__ == "__main__":
    cli(__doc__, CASES, make_case, worker)
