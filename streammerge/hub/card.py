"""The model card (``README.md``) of a merged checkpoint: where it came from and how to load it.

A generated card ends with a marker line, ``<!-- streammerge card sha256:<hex> -->`` (an HTML comment:
the Hub shows nothing), the sha256 of every byte before it. A later push that writes no card can then
tell a card that still describes an earlier upload, untouched, from one a person has edited since
(:func:`card_state`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK

CARD_TAG = "streammerge"
_MARKER_START = b"<!-- streammerge card sha256:"


def make_model_card(info: Mapping[str, Any]) -> str:
    """A README.md for a merged checkpoint, so users of the repo know where it came from.

    ``info`` keys (all optional): ``repo_id``, ``source`` (checkpoint path), ``format`` (e.g.
    ``"veRL FSDP"``), ``notes`` (lines the plan shows, e.g. LoRA settings), ``step``,
    ``world_size``, ``fsdp_version``, ``dtype``, ``optimizer`` (bool: ``optimizer/`` is included),
    ``optimizer_format`` (``"safetensors"``, the default, or ``"torch"``: how ``optimizer/`` was
    written), ``base_model``, ``license``, ``tags`` (e.g. the checkpoint format's), ``model_type``, ``lora``
    (a LoRA checkpoint's ``r``, ``alpha``, ``scale``, ``rslora``, ``mode``, ``base_model``, ``adapter_dir``),
    ``loads`` (False: no config.json or no weights at the top, so transformers cannot load the repo; default
    True), ``tokenizer`` (False: no tokenizer files; default True), ``model_class`` (config.json's architecture,
    where transformers has it: a class other than a causal LM is loaded by its own name).
    """
    repo_id = info.get("repo_id") or "REPO_ID"
    lora = info.get("lora")
    loads = info.get("loads", True)
    tags = [CARD_TAG] + (["lora"] if lora else []) + [t for t in info.get("tags") or [] if t]
    data = ModelCardData(library_name="transformers" if loads else None, base_model=info.get("base_model"),
                         license=info.get("license"), tags=tags)
    facts = [("Source checkpoint", info.get("source")), ("Training step", info.get("step")),
             ("FSDP world size", info.get("world_size")), ("FSDP version", info.get("fsdp_version")),
             ("Model type", info.get("model_type")), ("Weights dtype", info.get("dtype")),
             ("Optimizer state included", "yes" if info.get("optimizer") else "no")]
    if lora:
        facts += [("LoRA r", lora.get("r")), ("LoRA alpha", _num(lora.get("alpha"))),
                  ("LoRA scale", f"{lora.get('scale'):g}{' (rsLoRA)' if lora.get('rslora') else ''}")]
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in facts if v is not None and v != "")
    body = f"""
# {repo_id.split("/")[-1]}

This model was merged from a {info.get("format") or "sharded"} checkpoint with streammerge.{_lora_text(lora, loads)}

| | |
|---|---|
{rows}
{_how_to_load(repo_id, loads, info.get("tokenizer", True), lora, info.get("model_class"))}"""
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
    # A blank line before the marker, so that it is an HTML block of its own after a table or paragraph.
    text = str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")).rstrip("\n") + "\n\n"
    return text + _marker(text.encode()).decode()


def _marker(body: bytes) -> bytes:
    return _MARKER_START + hashlib.sha256(body).hexdigest().encode() + b" -->\n"


def is_untouched_card(data: bytes) -> bool:
    """Whether ``data`` is, byte for byte, a card :func:`make_model_card` wrote (its marker matches the text)."""
    start = data.rfind(_MARKER_START)
    return start >= 0 and data == data[:start] + _marker(data[:start])


def card_state(data: bytes) -> Literal["untouched", "edited", "other"]:
    """What a repo's README.md is to a push that writes no card, so that only our own stale card is removed.

    ``"untouched"``: a generated card nobody changed (it describes the upload that wrote it).
    ``"edited"``: tagged ``streammerge`` in its metadata but not byte for byte generated (edited since, or
    written before cards had a marker): someone's text now. ``"other"``: anything else.
    """
    if is_untouched_card(data):
        return "untouched"
    match = REGEX_YAML_BLOCK.search(data.decode("utf-8", errors="replace"))
    try:
        meta = yaml.safe_load(match.group(2)) if match else None
    except yaml.YAMLError:
        return "other"
    tags = meta.get("tags") if isinstance(meta, dict) else None
    tags = [tags] if isinstance(tags, str) else tags
    return "edited" if isinstance(tags, list) and CARD_TAG in tags else "other"


def _num(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _how_to_load(repo_id: str, loads: bool, tokenizer: bool, lora: Mapping[str, Any] | None,
                 model_class: str | None = None) -> str:
    if not loads:
        if lora and lora.get("adapter_dir"):
            return ""  # the LoRA text says how to load the adapter
        return ("\nThere is no `config.json` here (merged with `--weights-only`): transformers cannot load this repo "
                "on its own. Add the config of the model these weights belong to.\n")
    # a causal LM loads through the Auto class; a critic's token classifier, a VL model...: by their own class
    loader = model_class if model_class and not model_class.endswith("ForCausalLM") else "AutoModelForCausalLM"
    return _LOAD_TEXT.format(repo_id=repo_id, loader=loader, tokenizer_import=_TOKENIZER_IMPORT if tokenizer else "",
                             tokenizer=_TOKENIZER_LINE.format(repo_id=repo_id) if tokenizer else "")


_LOAD_TEXT = """
## How to load it

```python
from transformers import {loader}{tokenizer_import}

model = {loader}.from_pretrained("{repo_id}", dtype="auto"){tokenizer}
```
"""
_TOKENIZER_IMPORT = """, AutoTokenizer"""
_TOKENIZER_LINE = """
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")"""


def _lora_text(lora: Mapping[str, Any] | None, loads: bool = True) -> str:
    """What a LoRA fine-tune's card says: of which base, with r and alpha, folded or not, where the adapter is."""
    if not lora:
        return ""
    base = f"`{lora['base_model']}`" if lora.get("base_model") else "a base model the checkpoint does not name"
    text = (f"\n\nIt is a LoRA fine-tune of {base} (r={lora.get('r')}, lora_alpha={_num(lora.get('alpha'))}"
            f"{', rsLoRA' if lora.get('rslora') else ''}).")
    if not loads:
        text += " The checkpoint holds only the adapter, so this repo has no merged weights."
    elif lora.get("mode") in ("fold", "both"):
        text += (" The adapter is folded into the weights (`W + scale * B @ A`, computed in float32): load it as a "
                 "plain model.")
    else:
        text += " The weights are the base model's, without the adapter."
    if lora.get("adapter_dir"):
        text += (f" The peft adapter itself is in `{lora['adapter_dir']}/`: load it on the base model with peft's "
                 f"`PeftModel.from_pretrained`, `subfolder=\"{lora['adapter_dir']}\"`.")
    return text
