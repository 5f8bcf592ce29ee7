"""Does transformers load full-precision weights as the trained model when config.json still carries the base
model's `quantization_config` (a bf16 fine-tune of an FP8 checkpoint)? Run on a GPU machine (on CPU transformers
dequantizes FP8 and the answer is trivially yes).

    python benchmarks/quant_config_gpu.py OUT.json

A tiny Llama in bfloat16 is saved with save_pretrained, its config.json given an FP8 quantization_config, and
loaded again on the GPU: the result says whether the layers were swapped for quantized ones and whether the
logits still equal the saved model's.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers


def main(out: str) -> None:
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    folder = Path(tempfile.mkdtemp())
    model.save_pretrained(folder)
    x = torch.randint(0, 256, (1, 16))
    want = model.cuda()(x.cuda()).logits.float()
    results = {"transformers": transformers.__version__, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0), "cases": {}}
    for name, qc in {"fp8_block": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]},
                     "fp8_plain": {"quant_method": "fp8", "activation_scheme": "dynamic"}}.items():
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = qc
        (folder / "config.json").write_text(json.dumps(config))
        case: dict = {}
        try:
            loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cuda")
            layer = loaded.model.layers[0].mlp.up_proj
            got = loaded(x.cuda()).logits.float()
            case.update(layer=type(layer).__name__, weight_dtype=str(layer.weight.dtype),
                        max_logit_diff=float((got - want).abs().max()), logits_equal=bool(torch.equal(got, want)))
        except Exception as e:  # noqa: BLE001
            case["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        results["cases"][name] = case
    shutil.rmtree(folder)
    Path(out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
