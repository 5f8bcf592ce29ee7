"""`streammerge demo`: the whole path in seconds, on a real sharded checkpoint made on this machine."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import OutputError

SHARD = "200KB"  # small on purpose: the tiny model still shows sharded files and an index


def run_demo(out_dir: str | Path) -> int:
    """Make a 2-rank FSDP2 checkpoint on CPU (gloo), show its plan, merge it, and load the result."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ..optimizer import load_optimizer_state_dict
    from ..pipeline import merge, plan
    from .synthetic import make_checkpoint

    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: not a folder; give a new folder for the demo")
    held = sorted(os.listdir(out)) if out.is_dir() else []
    if held:  # a merge output, a home folder, an earlier demo: its checkpoint/ and model/ go into a folder of its own
        raise OutputError(f"{out}: not empty (it holds {held[0]!r}{', ...' if len(held) > 1 else ''}); give a new "
                          "folder for the demo, which writes checkpoint/ and model/ there")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print("1/4 training a tiny Qwen2 with FSDP2 on 2 CPU processes (gloo) and saving veRL-style rank files ...")
    actor = make_checkpoint(out / "checkpoint", arch="qwen2", world_size=2, tie_word_embeddings=True, steps=2)
    print(f"    {actor}  ({time.perf_counter() - t0:.1f} s)\n")

    print("2/4 the plan (`streammerge inspect`), from metadata only:")
    print("    " + plan(actor, max_shard_size=SHARD).weights.describe(max_rows=6).replace("\n", "\n    ") + "\n")

    print("3/4 merging (`streammerge CKPT OUT`):")
    result = merge(actor, out / "model", max_shard_size=SHARD)
    print(f"    {result.summary()}")
    for w in result.warnings:
        print(f"    warning: {w}")
    print()

    print("4/4 loading the merged folder with transformers and comparing with the training state:")
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=False).eval()
    reference = load_file(actor / "reference" / "model.safetensors")
    dtype = next(model.parameters()).dtype
    same = all(torch.equal(p, reference[k].to(dtype)) for k, p in model.state_dict().items() if k in reference)
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits
    print(f"    weights equal the gathered training state (cast to {str(dtype)[6:]}): {same}")
    print(f"    logits {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}")
    optim = load_optimizer_state_dict(out / "model")
    ref_optim = torch.load(actor / "reference" / "optimizer.pt", weights_only=True)
    same_optim = all(torch.equal(v, ref_optim["state"][k][key])
                     for k, s in optim["state"].items() for key, v in s.items())
    print(f"    optimizer state: {len(optim['state'])} parameters in optimizer/, "
          f"equal to the training state: {same_optim}")
    print(f"\nDone in {time.perf_counter() - t0:.1f} s. Merged model: {out / 'model'}")
    return 0 if same and same_optim else 1
