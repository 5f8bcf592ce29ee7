"""DeepSpeed benchmark: streammerge on a real ZeRO-3 checkpoint against DeepSpeed's own zero_to_fp32.py, in one run.

    python benchmarks/bench_deepspeed.py --preset qwen2.5-0.5b --repeat 3     # needs deepspeed (not in CI)

Makes the checkpoint with DeepSpeed itself (under --workdir, once): a transformers model of the preset's shapes
(`streammerge.testing.presets.hf_config`, random init), `deepspeed.initialize` with ZeRO stage --stage and a torch
AdamW, one training step, `engine.save_checkpoint`, on --world-size processes: on CPU through gloo (DeepSpeed's CPU
accelerator), or on the GPUs through NCCL where there are some. Then runs every contender --repeat times,
interleaved, each in its own subprocess, with the page cache dropped before each run:

    zero_to_fp32         python CKPT/zero_to_fp32.py CKPT OUT: the script DeepSpeed writes into every checkpoint, the
                         float32 weights as pytorch_model.bin (torch.save)
    zero_to_fp32-safetensors  ... --safe_serialization: the same as sharded safetensors (DeepSpeed 0.19.8: refused by
                         safetensors on a tied model, "Some tensors share memory"; recorded as it fails)
    streammerge-weights  python -m streammerge CKPT OUT --dtype keep --no-optimizer: the same float32 weights, plus
                         config and tokenizer files (and the manifest, checksums, architecture check)
    streammerge          python -m streammerge CKPT OUT --dtype keep: the weights and the optimizer export

Wall time is the whole subprocess; peak RSS is the largest sum of RSS over the process tree (sampled every 10 ms,
bench_merge.measure). Outputs are checked: streammerge's weights equal zero_to_fp32's, tensor for tensor, bit for
bit. Results: benchmarks/results/deepspeed.json. The first run of each command finds no cached architecture answer
(streammerge's transformers check, once per model and machine) and no compiled bytecode: the median of 3 is the
steady state.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # this checkout, not an installed streammerge

from bench_merge import bench_env, cache_policy, contender_parser, report, run_contenders, same_weights  # noqa: E402

CONTENDERS = ["zero_to_fp32", "zero_to_fp32-safetensors", "streammerge-weights", "streammerge"]


def _train(stage: int, preset: str, out: str) -> None:
    """One rank of the run (torchrun starts --world-size of them)."""
    import deepspeed
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from streammerge.testing.presets import hf_config

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    settings = hf_config(preset)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                              lr=1e-4)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**6})
    batch = torch.randint(0, 1000, (1, 8)).to(engine.device)
    engine.backward(engine(input_ids=batch, labels=batch).loss)
    engine.step()
    engine.save_checkpoint(out)
    if int(os.environ["RANK"]) == 0:
        config.save_pretrained(out)  # as the HF Trainer saves it beside the ZeRO files


def command(name: str, ckpt: Path, out: Path) -> list[str]:
    if name == "zero_to_fp32":
        return [sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out / "m")]
    if name == "zero_to_fp32-safetensors":
        return [sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out / "m"), "--safe_serialization"]
    if name == "streammerge-weights":
        return [sys.executable, "-m", "streammerge", str(ckpt), str(out / "m"), "--dtype", "keep", "--no-optimizer",
                "--no-progress"]
    if name == "streammerge":
        return [sys.executable, "-m", "streammerge", str(ckpt), str(out / "m"), "--dtype", "keep", "--no-progress"]
    raise KeyError(name)


def main(argv: list[str] | None = None) -> int:
    p = contender_parser(__doc__, "bench_deepspeed", CONTENDERS)
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--train", nargs=2, metavar=("STAGE", "OUT"), help=argparse.SUPPRESS)  # a rank of the run
    a = p.parse_args(argv)
    if a.train:
        _train(int(a.train[0]), a.preset, a.train[1])
        return 0
    contenders = a.contenders
    env = bench_env()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"zero{a.stage}-{a.preset}-ws{a.world_size}"
    if not (ckpt / "COMPLETE").exists():
        shutil.rmtree(ckpt, ignore_errors=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.world_size}",
                        str(Path(__file__).resolve()), "--preset", a.preset, "--train", str(a.stage), str(ckpt)],
                       env=env, check=True)
        (ckpt / "COMPLETE").write_text("ok")
        print(f"checkpoint made in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    tag = (ckpt / "latest").read_text().strip()
    files = sorted((ckpt / tag).glob("*.pt"))
    size = sum(f.stat().st_size for f in files)
    import deepspeed

    policy = cache_policy()
    runs, kept = run_contenders(contenders, a.repeat, lambda c, out: command(c, ckpt, out), files, env, work, policy)
    checks: dict[str, bool] = {}
    if "zero_to_fp32" in kept:
        for c in ("streammerge-weights", "streammerge"):
            if c in kept:
                checks[f"{c}'s weights == zero_to_fp32's, bit for bit"] = same_weights(kept[c], kept["zero_to_fp32"])
    for c in kept:
        shutil.rmtree(kept[c].parent, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    report("bench_deepspeed", a, argv, work, policy, runs, "zero_to_fp32", checks,
           f"{a.preset} ZeRO-{a.stage}, world size {a.world_size}, {size / 1e9:.2f} GB of step files; cache {policy}",
           {"deepspeed": deepspeed.__version__, "preset": a.preset, "stage": a.stage, "world_size": a.world_size,
            "checkpoint_bytes": size})
    return 0


if __name__ == "__main__":
    sys.exit(main())
