"""Where the GPU-made veRL fixtures are: tests/data/verl (in the project), and larger extras outside it."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERL_DATA = REPO / "tests" / "data" / "verl"
VERL_CASES = sorted(p.name for p in VERL_DATA.iterdir() if (p / "reference").is_dir())
# The same kinds of case, larger, kept outside the project (../shared/fixtures/verl, or STREAMMERGE_FIXTURES).
SHARED_VERL = Path(os.environ.get("STREAMMERGE_FIXTURES") or REPO.parent / "shared" / "fixtures" / "verl").resolve()
SHARED_CASES = sorted(p.name for p in SHARED_VERL.iterdir() if (p / "reference").is_dir()) \
    if SHARED_VERL.is_dir() else []
# veRL LoRA checkpoints of FSDP1 (peft, veRL's LoRA wrap policy), made on a GPU with peft's merge as the oracle
VERL_LORA_DATA = REPO / "tests" / "data" / "verl_lora"
VERL_LORA_CASES = sorted(p.name for p in VERL_LORA_DATA.iterdir() if (p / "reference").is_dir())
# accelerate / HF Trainer FSDP1 and FSDP2 SHARDED_STATE_DICT checkpoints (checkpoint-N/ as Trainer wrote it, the
# model folder the run started from, torch's gathered state as the oracle), made on a GPU by
# tests/data/make_accelerate.py; the LoRA cases (a peft model trained by the Trainer) hold peft's merge as the oracle
ACCELERATE_DATA = REPO / "tests" / "data" / "accelerate"
_ACCELERATE = sorted(p.name for p in ACCELERATE_DATA.iterdir() if (p / "reference").is_dir())
ACCELERATE_LORA_CASES = [c for c in _ACCELERATE if (ACCELERATE_DATA / c / "reference" / "merged.safetensors").is_file()]
ACCELERATE_CASES = [c for c in _ACCELERATE if c not in ACCELERATE_LORA_CASES]
# PyTorch Lightning sharded checkpoints (a DCP folder per ModelCheckpoint save, with Lightning's meta.pt) of FSDP2
# (ModelParallelStrategy, made on CPU by tests/data/make_lightning.py, whose FSDPStrategy cases need a GPU)
LIGHTNING_DATA = REPO / "tests" / "data" / "lightning"
LIGHTNING_CASES = sorted(p.name for p in LIGHTNING_DATA.iterdir() if (p / "reference").is_dir())
# DeepSpeed ZeRO checkpoints (stages 1, 2, 3; what engine.save_checkpoint wrote) with DeepSpeed's gathered master
# weights and optimizer state as the oracle, made on CPU by tests/data/make_deepspeed.py
DEEPSPEED_DATA = REPO / "tests" / "data" / "deepspeed"
_DEEPSPEED = sorted(p.name for p in DEEPSPEED_DATA.iterdir() if (p / "reference").is_dir())
DEEPSPEED_LORA_CASES = [c for c in _DEEPSPEED if (DEEPSPEED_DATA / c / "reference" / "merged.safetensors").is_file()]
DEEPSPEED_CASES = [c for c in _DEEPSPEED if c not in DEEPSPEED_LORA_CASES]
