"""The model card (``README.md``) of a merged checkpoint: where it came from and how to load it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


def make_model_card(info: Mapping[str, Any]) -> str:
    """A README.md for a merged checkpoint, so users of the repo know where it came from.

    ``info`` keys (all optional): ``repo_id``, ``source`` (checkpoint path), ``format`` (e.g.
    ``"veRL FSDP"``), ``notes`` (lines the plan shows, e.g. LoRA settings), ``step``,
    ``world_size``, ``fsdp_version``, ``dtype``, ``optimizer`` (bool: ``optimizer/`` is included),
    ``optimizer_format`` (``"safetensors"``, the default, or ``"torch"``: how ``optimizer/`` was
    written), ``base_model``, ``license``, ``tags``, ``model_type``.
    """
    repo_id = info.get("repo_id") or "REPO_ID"
    tags = ["streammerge", "verl", "fsdp"] + [t for t in info.get("tags") or [] if t]
    data = ModelCardData(library_name="transformers", base_model=info.get("base_model"),
                         license=info.get("license"), tags=tags)
    facts = [("Source checkpoint", info.get("source")), ("Training step", info.get("step")),
             ("FSDP world size", info.get("world_size")), ("FSDP version", info.get("fsdp_version")),
             ("Model type", info.get("model_type")), ("Weights dtype", info.get("dtype")),
             ("Optimizer state included", "yes" if info.get("optimizer") else "no")]
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in facts if v is not None and v != "")
    body = f"""
# {repo_id.split("/")[-1]}

This model was merged from a {info.get("format") or "sharded"} checkpoint with streammerge.

| | |
|---|---|
{rows}

## How to load it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```
"""
    if info.get("optimizer"):
        fmt = info.get("optimizer_format") or "safetensors"
        if fmt == "torch":
            what = """`optimizer/optimizer.pt` holds the optimizer state as one torch file (it loads with
`torch.load(..., weights_only=True)`), keyed by parameter name (`state[<param name>][<key>]` and
`param_groups`), as `torch.distributed.checkpoint.state_dict.get_optimizer_state_dict` returns the
full state, so training can resume on any world size:"""
        elif fmt == "safetensors":
            what = """`optimizer/` holds the optimizer state as safetensors (with
`optimizer.safetensors.index.json`), in
the flattened form of `torch.distributed.checkpoint.state_dict`
(`state.<param name>.<key>`, `param_groups.<param name>.<key>`), so training can resume on any
world size:"""
        else:
            raise ValueError(f"optimizer_format {fmt!r}: expected 'safetensors' or 'torch'")
        body += f"""
## Optimizer state

{what}

```python
from huggingface_hub import snapshot_download
from streammerge import load_optimizer_state_dict

local = snapshot_download("{repo_id}", allow_patterns=["optimizer/*"])
optim_state = load_optimizer_state_dict(f"{{local}}/optimizer")

# then, with your model and optimizer built:
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
set_optimizer_state_dict(model, optimizer, optim_state,
                         options=StateDictOptions(flatten_optimizer_state_dict=True))
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
