"""DCP benchmark: streammerge on a torch DCP checkpoint against `cp` and torch's own tools, in one run.

    python benchmarks/bench_dcp.py --preset qwen2.5-1.5b --world-size 8 --repeat 3

Makes a DCP checkpoint of the preset's shapes (`streammerge.testing.presets.make_dcp_checkpoint`: float32
FSDP2 Shard(0) DTensors on WORLD gloo processes, `dcp.save({"model": state_dict})`, a tied lm_head
saved too, as `get_model_state_dict` returns it) under --workdir, then runs every contender --repeat
times, interleaved, each in its own subprocess, with the page cache dropped before each run:

    cp                 cp of the .distcp files and .metadata, then sync of the copies (the physical limit)
    streammerge        python -m streammerge DCP OUT --dtype keep (float32, sha256 of every file, Rust-reader check)
    streammerge-bf16   ... --dtype bfloat16
    torch              benchmarks/dcp_torch_merge.py: dcp_to_torch_save, then torch.load(mmap) + save_file

Wall time is the whole subprocess; peak RSS is the largest sum of RSS over the process tree (sampled
every 10 ms, see bench_merge.measure). Outputs are checked: streammerge's and torch's float32 outputs
equal the preset's formula bit for bit (every tensor). Results: benchmarks/results/dcp.json.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # this checkout, not an installed streammerge

from bench_merge import bench_env, cache_policy, contender_parser, report, run_contenders  # noqa: E402

from streammerge.testing.presets import PRESETS, check_merge, make_dcp_checkpoint  # noqa: E402

CONTENDERS = ["cp", "streammerge", "streammerge-bf16", "torch"]


def command(name: str, ckpt: Path, out: Path) -> list[str]:
    files = [str(p) for p in sorted(ckpt.glob("*.distcp"))] + [str(ckpt / ".metadata")]
    if name == "cp":
        return ["sh", "-c", 'out="$1"; shift; cp "$@" "$out"/ && sync "$out"/* "$out"/.metadata', "sh", str(out),
                *files]
    if name == "streammerge":
        return [sys.executable, "-m", "streammerge", str(ckpt), str(out / "m"), "--dtype", "keep", "--no-progress"]
    if name == "streammerge-bf16":
        return [sys.executable, "-m", "streammerge", str(ckpt), str(out / "m"), "--dtype", "bfloat16", "--no-progress"]
    if name == "torch":
        return [sys.executable, str(HERE / "dcp_torch_merge.py"), str(ckpt), str(out / "m")]
    raise KeyError(name)


def main(argv: list[str] | None = None) -> int:
    p = contender_parser(__doc__, "bench_dcp", CONTENDERS)
    p.add_argument("--preset", default="qwen2.5-1.5b", choices=list(PRESETS))
    p.add_argument("--world-size", type=int, default=8)
    a = p.parse_args(argv)
    contenders = a.contenders
    env = bench_env()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"dcp-{a.preset}-ws{a.world_size}"
    if not (ckpt / "COMPLETE").exists():
        shutil.rmtree(ckpt, ignore_errors=True)
        t = time.perf_counter()
        make_dcp_checkpoint(ckpt, preset=a.preset, world_size=a.world_size)
        (ckpt / "COMPLETE").write_text("ok")
        print(f"checkpoint made in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    files = sorted(ckpt.glob("*.distcp")) + [ckpt / ".metadata"]
    size = sum(f.stat().st_size for f in files)
    policy = cache_policy()
    runs, kept = run_contenders(contenders, a.repeat, lambda c, out: command(c, ckpt, out), files, env, work, policy,
                                unwarmed=("cp",))
    checks = {f"{c} float32 output == the preset's tensors, bit for bit": check_merge(kept[c], a.preset) > 0
              for c in ("streammerge", "torch") if c in kept}
    for c in kept:
        shutil.rmtree(kept[c].parent, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    report("bench_dcp", a, argv, work, policy, runs, "cp", checks,
           f"{a.preset} DCP, world size {a.world_size}, {size / 1e9:.2f} GB; cache {policy}",
           {"preset": a.preset, "world_size": a.world_size, "checkpoint_bytes": size}, size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
