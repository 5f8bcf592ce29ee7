"""The peft way to fold a LoRA checkpoint, for comparison: gather everything, merge_and_unload, save_pretrained.

    python benchmarks/peft_merge.py ACTOR_DIR OUT_DIR R ALPHA

Every rank file is torch.load-ed, each DTensor's local shards are concatenated along dim 0 (all
Shard(0), as FSDP2 saves them), the model is built from huggingface/config.json, wrapped with
`get_peft_model(LoraConfig(r, alpha, target_modules="all-linear"))`, the gathered state dict loaded
into it, `merge_and_unload()` folds the adapter and `save_pretrained` writes the folder (float32).
Peak memory is the whole checkpoint plus the model.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor


def main(actor: str, out: str, r: str, alpha: str) -> int:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(Path(actor).glob("model_world_size_*_rank_*.pt"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    states = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in files]
    full = {}
    for key, first in states[0].items():
        if isinstance(first, DTensor):
            full[key] = torch.cat([s[key]._local_tensor for s in states], dim=0)
        else:
            full[key] = first
    del states
    config = AutoConfig.from_pretrained(Path(actor) / "huggingface")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=int(r), lora_alpha=float(alpha), target_modules="all-linear"))
    model.load_state_dict(full, strict=True, assign=True)
    del full
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
