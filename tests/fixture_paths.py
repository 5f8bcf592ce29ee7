"""Where the fixtures are: tests/data/<format>/<case> (in the project), and larger veRL extras outside it."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cases(folder: Path) -> list[str]:
    """The fixture cases in `folder`: each a folder with its reference/."""
    return sorted(p.name for p in folder.iterdir() if (p / "reference").is_dir())


def lora_split(folder: Path) -> tuple[list[str], list[str]]:
    """(the cases of a full model, the LoRA cases: those with peft's merge as reference/merged.safetensors)."""
    lora = [c for c in cases(folder) if (folder / c / "reference" / "merged.safetensors").is_file()]
    return [c for c in cases(folder) if c not in lora], lora


VERL_DATA = REPO / "tests" / "data" / "verl"
VERL_CASES = cases(VERL_DATA)
# The same kinds of case, larger, kept outside the project (../shared/fixtures/verl, or STREAMMERGE_FIXTURES).
SHARED_VERL = Path(os.environ.get("STREAMMERGE_FIXTURES") or REPO.parent / "shared" / "fixtures" / "verl").resolve()
SHARED_CASES = cases(SHARED_VERL) if SHARED_VERL.is_dir() else []
# veRL LoRA checkpoints of FSDP1 (peft, veRL's LoRA wrap policy), made on a GPU with peft's merge as the oracle
VERL_LORA_DATA = REPO / "tests" / "data" / "verl_lora"
VERL_LORA_CASES = cases(VERL_LORA_DATA)
# accelerate / HF Trainer FSDP1 and FSDP2 SHARDED_STATE_DICT checkpoints (checkpoint-N/ as Trainer wrote it, the
# model folder the run started from, torch's gathered state as the oracle), made on a GPU by
# tests/data/make_accelerate.py; the LoRA cases (a peft model trained by the Trainer) hold peft's merge as the oracle
ACCELERATE_DATA = REPO / "tests" / "data" / "accelerate"
ACCELERATE_CASES, ACCELERATE_LORA_CASES = lora_split(ACCELERATE_DATA)
# PyTorch Lightning checkpoints made by tests/data/make_lightning.py: sharded ones (a DCP folder per ModelCheckpoint
# save, with Lightning's meta.pt) of FSDP2 (ModelParallelStrategy, made on CPU) and FSDP1 (FSDPStrategy, made on a
# GPU), and single files (a torch.save of the whole training state) of DDPStrategy (made on CPU)
LIGHTNING_DATA = REPO / "tests" / "data" / "lightning"
LIGHTNING_CKPT = Path("run") / "checkpoints" / "epoch=0-step=3.ckpt"
LIGHTNING_CASES = [c for c in cases(LIGHTNING_DATA) if (LIGHTNING_DATA / c / LIGHTNING_CKPT).is_dir()]
LIGHTNING_FILE_CASES = [c for c in cases(LIGHTNING_DATA) if (LIGHTNING_DATA / c / LIGHTNING_CKPT).is_file()]
# DeepSpeed ZeRO checkpoints (stages 1, 2, 3; what engine.save_checkpoint wrote) with DeepSpeed's gathered master
# weights and optimizer state as the oracle (and peft's merge for the LoRA cases), made on CPU by
# tests/data/make_deepspeed.py
DEEPSPEED_DATA = REPO / "tests" / "data" / "deepspeed"
DEEPSPEED_CASES, DEEPSPEED_LORA_CASES = lora_split(DEEPSPEED_DATA)
