"""One torch.save file of a whole model (PyTorch Lightning's single-file .ckpt): streammerge against the usual way to a
model folder, torch.load and save_pretrained, in one run.

    python benchmarks/bench_torchfile.py --preset qwen2.5-0.5b --repeat 3

Makes the checkpoint once (under --workdir): a transformers model of the preset's shapes (random init, float32), one
AdamW step, and torch.save of the dict Lightning's Trainer saves ({"state_dict": the LightningModule's state dict,
`model.` + transformers' names; "optimizer_states": [the optimizer's state dict]; "global_step", "epoch",
"pytorch-lightning_version"}): the layout of tests/data/lightning/*_ddp_*. Then runs every contender --repeat times,
interleaved, each in its own subprocess, with the page cache dropped before each run:

    load+save_pretrained   torch.load(weights_only=True), the LightningModule's `model.` stripped,
                           AutoModelForCausalLM.from_config + load_state_dict, save_pretrained (safetensors)
    mmap+save_pretrained   the same with torch.load(mmap=True): the tensors stay in the file's pages until copied
    streammerge            python -m streammerge CKPT OUT --model-name CONFIG_DIR --dtype keep

Wall time is the whole subprocess; peak RSS the largest sum over the process tree (bench_merge.measure). The
outputs are checked: streammerge's weights equal save_pretrained's, tensor for tensor, bit for bit.
Results: benchmarks/results/torchfile.json.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # this checkout, not an installed streammerge

from bench_merge import bench_env, cache_policy, contender_parser, report, run_contenders, same_weights  # noqa: E402

CONTENDERS = ["load+save_pretrained", "mmap+save_pretrained", "streammerge"]
# what a user writes to turn a Lightning .ckpt into a model folder: argv is CKPT CONFIG_DIR OUT MMAP
NAIVE = """
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
ckpt, config_dir, out, mmap = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=mmap)["state_dict"]
config = AutoConfig.from_pretrained(config_dir)
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, assign=True)
model.save_pretrained(out)
"""


def make(preset: str, ckpt: Path, config_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from streammerge.testing.presets import hf_config

    settings = hf_config(preset)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, 1000, (1, 8))
    model(input_ids=batch, labels=batch).loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    torch.save({"epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.6.6",
                "state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "optimizer_states": [optim.state_dict()], "lr_schedulers": []}, ckpt)
    config.save_pretrained(config_dir)


def command(name: str, ckpt: Path, config_dir: Path, out: Path) -> list[str]:
    if name in ("load+save_pretrained", "mmap+save_pretrained"):
        return [sys.executable, "-c", NAIVE, str(ckpt), str(config_dir), str(out / "m"),
                "1" if name.startswith("mmap") else "0"]
    if name == "streammerge":
        return [sys.executable, "-m", "streammerge", str(ckpt), str(out / "m"), "--model-name", str(config_dir),
                "--dtype", "keep", "--no-progress"]
    raise KeyError(name)


def main(argv: list[str] | None = None) -> int:
    p = contender_parser(__doc__, "bench_torchfile", CONTENDERS)
    p.add_argument("--preset", default="qwen2.5-0.5b")
    a = p.parse_args(argv)
    contenders = a.contenders
    env = bench_env()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, config_dir = work / f"{a.preset}-epoch=0-step=1.ckpt", work / f"{a.preset}-config"
    if not ckpt.is_file() or not (config_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-c", f"import bench_torchfile as b, pathlib as p; b.make({a.preset!r}, "
                        f"p.Path({str(ckpt)!r}), p.Path({str(config_dir)!r}))"], cwd=HERE, env=env, check=True)
    size = ckpt.stat().st_size
    policy = cache_policy()
    runs, kept = run_contenders(contenders, a.repeat, lambda c, out: command(c, ckpt, config_dir, out), [ckpt], env,
                                work, policy)
    checks = {f"streammerge's weights == {c}'s, bit for bit": same_weights(kept["streammerge"], kept[c])
              for c in kept if c != "streammerge" and "streammerge" in kept}
    for c in kept:
        shutil.rmtree(kept[c].parent, ignore_errors=True)
    if not a.keep:
        ckpt.unlink()
        shutil.rmtree(config_dir, ignore_errors=True)
    report("bench_torchfile", a, argv, work, policy, runs, contenders[0], checks,
           f"{a.preset}, a Lightning .ckpt of {size / 1e9:.2f} GB (weights and AdamW state); cache {policy}",
           {"preset": a.preset, "checkpoint_bytes": size})
    return 0


if __name__ == "__main__":
    sys.exit(main())
