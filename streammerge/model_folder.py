"""Carry the model folder: config (with the output dtype), generation config, tokenizer, remote code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .dtypes import DType

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_config(hf_dir: Path | None) -> dict | None:
    if hf_dir is None or not (hf_dir / "config.json").is_file():
        return None
    return json.loads((hf_dir / "config.json").read_text())


def carried_files(hf_dir: Path | None) -> Iterator[Path]:
    """Every file of huggingface/ except weights (which we write ourselves)."""
    if hf_dir is None:
        return
    for p in sorted(hf_dir.rglob("*")):
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name not in WEIGHT_INDEXES:
            yield p


def config_bytes(config: dict, dtype: DType | None) -> bytes:
    """config.json naming the dtype we wrote (both spellings transformers has used, where present)."""
    config = dict(config)
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        for k in keys:
            config[k] = name
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
