#!/usr/bin/env python3
"""Generate real DeepSpeed ZeRO checkpoints (stages 1, 2 and 3) of a tiny causal LM, with DeepSpeed-gathered oracles.

NOT run in CI: the committed fixture is ``tests/data/deepspeed/`` (see its README.md). Usage::

    python tests/data/make_deepspeed.py OUT_DIR [--cases a,b]     # deepspeed, transformers; runs on CPU

For each case it writes ``OUT_DIR/<case>/``:

    huggingface/                   config.json, generation_config.json and a tiny offline tokenizer: the model folder
                                   the run built its model from (a user's --model-name; DeepSpeed saves no config)
    run/                           exactly what ``engine.save_checkpoint(run)`` wrote: ``latest`` (the tag),
                                   ``global_step3/`` (the model states and each rank's ZeRO optimizer partition),
                                   DeepSpeed's ``zero_to_fp32.py`` and ``zero_to_torch.py``
    reference/model.safetensors    every parameter's float32 master weights, gathered by DeepSpeed in the training
                                   processes right after the save (``safe_get_full_fp32_param``), under the model's
                                   names (a tied lm_head.weight is the embedding, and not listed again)
    reference/optimizer.pt         torch.save of the optimizer state gathered the same way
                                   (``safe_get_full_optimizer_state``: exp_avg, exp_avg_sq; the group's step), as a
                                   torch optimizer state dict keyed by parameter names
    reference/logits.safetensors   input_ids and the logits of a float32 CPU transformers model built from
                                   huggingface/config.json and loaded (strict) with those weights
    reference/INFO.json            versions, the DeepSpeed config, launch command, the files written; and whether
                                   DeepSpeed's own zero_to_fp32 gives the same weights (it must: checked here)

The LoRA cases train a peft model (``get_peft_model`` with make_accelerate's LoRA settings) and also write
``reference/merged.safetensors``: peft's ``merge_and_unload()`` of a CPU peft model loaded with the gathered state
(the frozen base gathered with ``deepspeed.zero.GatheredParameters``); their logits are the merged model's.

Training: ``deepspeed.initialize`` of a transformers model with a torch AdamW of two parameter groups as the HF
Trainer makes them (weight decay 0.01; none for norms and biases), 3 steps of batch 2 per rank, 2 or 3 ranks on CPU
(torchrun, DeepSpeed's CPU accelerator, gloo). DeepSpeed runs on CPU as it runs on GPUs for these stages: what it
saves is the same (its partitioning does not depend on the device).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from make_accelerate import (  # this folder: the script's own, first on sys.path
    LORA,
    SEQ,
    cli,
    run_workers,
    save_logits,
    save_oracle,
    write_base,
)

STEPS = 3
BATCH = 2  # per rank

# stage: ZeRO stage; bf16: DeepSpeed's bf16 mode (bfloat16 weights in training, float32 master weights in the
# optimizer partitions); world: ranks; layers 1: the checkpoint holds three copies of the model (weights, exp_avg,
# exp_avg_sq). llama_zero2_ws3_fp32: 3 ranks and vocab 101, so a group's elements do not split evenly and the last
# rank's partition is shorter (its padding is not saved with the weights, and is with the optimizer state).
# sub_group: ZeRO-3's sub_group_size (elements of a rank's partition), small so that a group is cut into several
# sub-groups, a flat tensor and an optimizer step each, as DeepSpeed's default of 1e9 cuts a 70B model's on 8 ranks
CASES = {
    "llama_zero2_ws3_fp32": dict(arch="llama", tie=False, stage=2, bf16=False, seed=21, vocab=101, layers=1, world=3),
    "qwen2_zero3_tied_bf16": dict(arch="qwen2", tie=True, stage=3, bf16=True, seed=22, vocab=263, layers=1,
                                  sub_group=1000),
    "llama_lora_zero2_fp32": dict(arch="llama", tie=False, stage=2, bf16=False, seed=25, vocab=99, layers=1,
                                  lora=True),
    "llama_lora_zero3_fp32": dict(arch="llama", tie=False, stage=3, bf16=False, seed=26, vocab=99, layers=1,
                                  lora=True),
    "llama_zero1_bf16": dict(arch="llama", tie=False, stage=1, bf16=True, seed=23, vocab=99, layers=1),
}


def _groups(model) -> list[dict]:
    """The HF Trainer's two parameter groups: weight decay for weights, none for norms and biases (of the trained
    parameters: a LoRA run's adapter matrices are all in the first)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    rest = [p for p in trained if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.01}] + ([{"params": rest, "weight_decay": 0.0}] if rest else [])


def worker(case_name: str, case_dir: Path) -> None:
    """One training process (started by torchrun): train, save, gather the oracle."""
    import deepspeed
    import torch
    import transformers
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from transformers import AutoConfig, AutoModelForCausalLM

    case = CASES[case_name]
    deepspeed.init_distributed(dist_backend="gloo")
    config = AutoConfig.from_pretrained(case_dir / "huggingface")
    transformers.set_seed(case["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if case.get("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**LORA))
    names = {id(p): n for n, p in model.named_parameters()}
    optim = torch.optim.AdamW(_groups(model), lr=1e-3, weight_decay=0.01)
    ds_config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": case["stage"],
                                       **({"sub_group_size": case["sub_group"]} if "sub_group" in case else {})},
                 "zero_allow_untested_optimizer": True,
                 "bf16": {"enabled": case["bf16"]}, "steps_per_print": 10**6}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, config=ds_config)
    rank = int(os.environ["RANK"])
    g = torch.Generator().manual_seed(case["seed"])
    data = torch.randint(0, case["vocab"] - 3, (STEPS, int(os.environ["WORLD_SIZE"]), BATCH, SEQ), generator=g)
    for step in range(STEPS):
        batch = data[step, rank].to(engine.device)
        engine.backward(engine(input_ids=batch, labels=batch).loss)
        engine.step()
    run = case_dir / "run"
    engine.save_checkpoint(run)

    zero = engine.optimizer
    if hasattr(zero, "_hp_optimizer_states_linked"):
        # ZeRO-1/2 links each parameter to its optimizer state once, after the first group's first step, when a later
        # group has no state yet (safe_get_full_optimizer_state then finds no exp_avg for norms): link them again
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    weights, state, groups = {}, {}, []
    for group in optim.param_groups:
        groups.append({k: v for k, v in group.items() if k != "params"})
    # the torch AdamW over DeepSpeed's flat partitions, one per group or, in ZeRO-3, per sub-group (ZeRO-3 swaps them
    # into its groups at each step): their state, in that order, holds each one's step; DeepSpeed's own lists of the
    # parameters in each say which step is a parameter's
    steps = [s["step"].clone() for s in engine.optimizer.optimizer.state.values()]
    flat_groups = next(getattr(zero, a) for a in ("fp16_groups", "bit16_groups", "bf16_groups") if hasattr(zero, a))
    assert len(steps) == len(flat_groups), (len(steps), len(flat_groups))
    step_of = {id(p): steps[i] for i, ps in enumerate(flat_groups) for p in ps}
    for gi, group in enumerate(_groups(engine.module)):
        groups[gi]["params"] = []
        for p in group["params"]:  # collectives under ZeRO-3: every rank asks for every parameter in one order
            name = names[id(p)]
            weights[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
            state[name] = {"step": step_of[id(p)],
                           "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().cpu().clone(),
                           "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu().clone()}
            groups[gi]["params"].append(name)
    for name, p in engine.module.named_parameters():  # the frozen ones (a LoRA run's base), as the module holds them
        if not p.requires_grad:
            with deepspeed.zero.GatheredParameters([p]):  # ZeRO-3 holds a chunk per rank; 1 and 2 the whole
                weights[name] = p.data.detach().cpu().clone()
    torch.distributed.barrier()
    if rank != 0:
        return
    ref_dir = case_dir / "reference"
    save_oracle(ref_dir, weights, {"state": state, "param_groups": groups})
    cpu_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if case.get("lora"):  # the peft model loaded with the gathered state, merged by peft itself
        from peft import LoraConfig, get_peft_model
        from safetensors.torch import save_file

        cpu_model = get_peft_model(cpu_model, LoraConfig(**LORA))
        missing, unexpected = cpu_model.load_state_dict(weights, strict=True)
        cpu_model = cpu_model.merge_and_unload().eval()
        save_file({k: v.contiguous() for k, v in cpu_model.state_dict().items()}, ref_dir / "merged.safetensors",
                  metadata={"format": "pt"})
    else:
        missing, unexpected = cpu_model.load_state_dict(weights, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"} and (not missing or config.tie_word_embeddings)
    save_logits(ref_dir, cpu_model, case["vocab"])
    info = {
        "case": {"name": case_name, **case},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "deepspeed": deepspeed.__version__},
        "device": "cpu (DeepSpeed's CPU accelerator)",
        "world_size": int(os.environ["WORLD_SIZE"]),
        "deepspeed_config": ds_config,
        "optimizer": "torch.optim.AdamW(lr=1e-3), groups: weight_decay 0.01 (ndim >= 2), 0.0 (norms, biases)",
        **({"lora": {**LORA, "peft": __import__("peft").__version__}} if case.get("lora") else {}),
        "steps": STEPS, "per_rank_batch": BATCH, "seq": SEQ,
    }
    (ref_dir / "INFO.json").write_text(json.dumps(info, indent=2) + "\n")


def _check_with_zero_to_fp32(case_dir: Path) -> str:
    """DeepSpeed's own consolidation of the checkpoint (its zero_to_fp32 functions) against the gathered oracle."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    got = get_fp32_state_dict_from_zero_checkpoint(str(case_dir / "run"))
    want = load_file(case_dir / "reference" / "model.safetensors")
    extra = set(got) - set(want)  # zero_to_fp32 adds the tied lm_head.weight as the embedding
    assert set(want) <= set(got) and all(torch.equal(got[k], got[v]) for k, v in
                                         [(e, "model.embed_tokens.weight") for e in extra]), sorted(extra)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    return "zero_to_fp32's get_fp32_state_dict_from_zero_checkpoint gives every tensor of reference/model.safetensors"


def make_case(case_name: str, out: Path) -> Path:
    case_dir = out / case_name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    write_base(case_name, case_dir, CASES[case_name])
    run_workers(Path(__file__), case_name, case_dir, {}, world_size=CASES[case_name].get("world", 2))
    info_path = case_dir / "reference" / "INFO.json"
    info = json.loads(info_path.read_text())
    info["zero_to_fp32"] = _check_with_zero_to_fp32(case_dir)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return case_dir


if __name__ == "__main__":
    cli(__doc__, CASES, make_case, worker)
