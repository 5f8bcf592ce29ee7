"""The torch way to turn a DCP checkpoint into safetensors, for comparison: `dcp_to_torch_save` + `save_file`.

    python benchmarks/dcp_torch_merge.py DCP_DIR OUT_DIR

`torch.distributed.checkpoint.format_utils.dcp_to_torch_save` loads every tensor of the checkpoint into
RAM and writes one torch.save file; that file is then loaded (mmap=True, weights_only=True, the lighter
way) and the model's tensors written with `safetensors.torch.save_file` into one model.safetensors (the
tied lm_head dropped, as save_pretrained does). The intermediate .pt is deleted at the end.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save


def main(ckpt: str, out: str) -> int:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "consolidated.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(ckpt, tmp)
    state = torch.load(tmp, map_location="cpu", mmap=True, weights_only=True)["model"]
    config = json.loads((Path(ckpt) / "huggingface" / "config.json").read_text())
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    del state
    tmp.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
