"""The naive merge veRL's merger does, for comparison: load every rank fully, concatenate, save_pretrained.

    python benchmarks/naive_merge.py ACTOR_DIR OUT_DIR

Like `verl.model_merger` (backend fsdp): every rank file is torch.load-ed into RAM (threads, weights_only
off as veRL does), each DTensor's local shards are concatenated along the shard dim (replica 0 of an
HSDP mesh) and cast to bfloat16, an empty model is built from huggingface/config.json and
`save_pretrained(state_dict=...)` writes the folder. Peak memory is the whole checkpoint plus the merged
copy: it grows with the model.
"""

from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, Shard


def main(actor: str, out: str) -> int:
    actor_dir = Path(actor)
    files = sorted(actor_dir.glob("model_world_size_*_rank_*.pt"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    with ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as ex:
        states = list(ex.map(lambda p: torch.load(p, map_location="cpu", weights_only=False), files))
    merged, seen = {}, {}
    for key, first in states[0].items():
        ptr = (first._local_tensor if isinstance(first, DTensor) else first).untyped_storage().data_ptr()
        if ptr in seen:  # tied weights share one storage: keep them one tensor, as save_pretrained expects
            merged[key] = merged[seen[ptr]]
            continue
        seen[ptr] = key
        if isinstance(first, DTensor):
            shard_dim = next(p.dim for p in first.placements if isinstance(p, Shard))
            shards = first.device_mesh.shape[-1] if hasattr(first.device_mesh, "shape") else len(states)
            pieces = [s[key]._local_tensor for s in states[:shards]]  # replica 0 holds every shard
            merged[key] = torch.cat(pieces, dim=shard_dim).to(torch.bfloat16)
        else:
            merged[key] = first.to(torch.bfloat16)
    del states
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(actor_dir / "huggingface")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    model.save_pretrained(out, state_dict=merged)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
