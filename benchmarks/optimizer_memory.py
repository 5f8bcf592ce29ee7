"""Peak RSS of an optimizer export of several GB: streammerge against the usual gather-into-optimizer.pt.

    python benchmarks/optimizer_memory.py WORK_DIR [--vocab 128000 --hidden 2048 --world-size 4]

Makes a veRL-format checkpoint with big DTensor-sharded AdamW states (a Llama config with a large
vocabulary, so the embedding and LM head states dominate), saved rank by rank under torch's fake
process group; then measures, each in its own process:
  streammerge          `python -m streammerge CKPT OUT --dtype keep` (weights + optimizer/ safetensors)
  streammerge-torch    the same with --optimizer-format torch (one optimizer.pt)
  naive                torch.load every optim rank file, concatenate the shards of every state, torch.save
and checks that the streammerge export equals the naive optimizer.pt bit for bit (both memory-mapped).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _config(vocab: int, hidden: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                       num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=4,
                       head_dim=hidden // 16, tie_word_embeddings=False, dtype="float32")


def make_rank(actor: Path, rank: int, world_size: int, vocab: int, hidden: int) -> None:
    """One rank's model and optim files, as FSDP2 + veRL save them (Shard(0) DTensors, AdamW state)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AutoModelForCausalLM

    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("fsdp",))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(vocab, hidden))
    gen = torch.Generator().manual_seed(rank)

    def shard(shape, scale=1.0):
        full = torch.Size(shape)
        n = -(-full[0] // world_size)
        rows = max(0, min(full[0], (rank + 1) * n) - rank * n)
        local = torch.randn((rows, *full[1:]), generator=gen) * scale
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=full,
                                  stride=torch.empty(full, device="meta").stride())

    params = list(model.named_parameters())
    torch.save({n: shard(p.shape) for n, p in params}, actor / f"model_world_size_{world_size}_rank_{rank}.pt")
    state = {i: {"step": torch.tensor(7.0), "exp_avg": shard(p.shape, 1e-3), "exp_avg_sq": shard(p.shape, 1e-6).abs()}
             for i, (_, p) in enumerate(params)}
    groups = [{"lr": 1e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False,
               "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
               "decoupled_weight_decay": True, "initial_lr": 1e-5, "params": list(range(len(params)))}]
    torch.save({"state": state, "param_groups": groups}, actor / f"optim_world_size_{world_size}_rank_{rank}.pt")
    dist.destroy_process_group()


def make_checkpoint(work: Path, world_size: int, vocab: int, hidden: int) -> Path:
    actor = work / "ckpt" / "global_step_7" / "actor"
    if (actor / "fsdp_config.json").is_file():
        return actor
    actor.mkdir(parents=True, exist_ok=True)
    for rank in range(world_size):  # one process per rank: each holds only its own shards
        subprocess.run([sys.executable, __file__, "--make-rank", str(actor), str(rank), str(world_size),
                        str(vocab), str(hidden)], check=True, cwd=REPO)
    _config(vocab, hidden).save_pretrained(actor / "huggingface")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world_size}))
    return actor


def naive(actor: Path, out: Path) -> None:
    """The usual workaround: every rank file fully in RAM, every state gathered, one torch.save."""
    import torch
    import torch.distributed.tensor  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(actor.glob("optim_world_size_*_rank_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    ranks = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(actor / "huggingface"))
        names = [n for n, _ in model.named_parameters()]
    state = {}
    for i, fqn in enumerate(names):
        entry = ranks[0]["state"][i]
        state[fqn] = {k: (torch.cat([r["state"][i][k].to_local() for r in ranks]) if v.dim() else v)
                      for k, v in entry.items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in ranks[0]["param_groups"]]
    torch.save({"state": state, "param_groups": groups}, out)


def measure(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a command run as a child of a fresh helper process."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], check=True); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    secs, rss = out.stdout.strip().splitlines()[-1].split()
    return float(secs), int(rss)


def compare(export: Path, naive_pt: Path) -> int:
    """Bit-for-bit comparison, tensor by tensor, both sides memory-mapped; returns the bytes compared."""
    import torch

    sys.path.insert(0, str(REPO))
    from streammerge import load_optimizer_state_dict

    got = load_optimizer_state_dict(export)
    want = torch.load(naive_pt, mmap=True, weights_only=True, map_location="cpu")
    assert got["param_groups"] == want["param_groups"]
    assert list(got["state"]) == list(want["state"])
    n = 0
    for fqn, entry in want["state"].items():
        for k, v in entry.items():
            g = got["state"][fqn][k]
            same = torch.equal(g.view(-1).view(torch.uint8) if g.dim() else g,
                               v.view(-1).view(torch.uint8) if v.dim() else v)
            assert g.dtype == v.dtype and g.shape == v.shape and same, (fqn, k)
            n += v.numel() * v.element_size()
    return n


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--make-rank":
        actor, rank, ws, vocab, hidden = sys.argv[2:]
        make_rank(Path(actor), int(rank), int(ws), int(vocab), int(hidden))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path)
    p.add_argument("--vocab", type=int, default=128000)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--skip-naive", action="store_true")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    actor = make_checkpoint(a.work, a.world_size, a.vocab, a.hidden)
    optim_bytes = sum(f.stat().st_size for f in actor.glob("optim_*.pt"))
    print(f"checkpoint {actor}: optim rank files {optim_bytes / 1e9:.2f} GB "
          f"(made in {time.perf_counter() - t:.0f} s)", flush=True)
    rows = []
    for label, extra in (("streammerge", []), ("streammerge-torch", ["--optimizer-format", "torch"])):
        out = a.work / f"out-{label}"
        shutil.rmtree(out, ignore_errors=True)
        secs, rss = measure([sys.executable, "-m", "streammerge", str(actor), str(out), "--dtype", "keep",
                             "--no-progress", *extra])
        size = sum(f.stat().st_size for f in (out / "optimizer").iterdir())
        rows.append((label, secs, rss, size))
        print(f"{label:<18} {secs:7.1f} s   peak RSS {rss / 2**20:8.0f} MiB   optimizer/ {size / 1e9:.2f} GB",
              flush=True)
    if not a.skip_naive:
        naive_pt = a.work / "naive-optimizer.pt"
        secs, rss = measure([sys.executable, __file__, "--naive", str(actor), str(naive_pt)])
        rows.append(("naive", secs, rss, naive_pt.stat().st_size))
        size = naive_pt.stat().st_size
        print(f"{'naive':<18} {secs:7.1f} s   peak RSS {rss / 2**20:8.0f} MiB   optimizer.pt {size / 1e9:.2f} GB",
              flush=True)
        for label in ("streammerge", "streammerge-torch"):
            n = compare(a.work / f"out-{label}", naive_pt)
            print(f"{label}: equal to the naive optimizer.pt bit for bit ({n / 1e9:.2f} GB compared)", flush=True)
    (a.work / "optimizer_memory.json").write_text(json.dumps(
        [{"run": r[0], "seconds": r[1], "peak_rss": r[2], "bytes": r[3]} for r in rows], indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--naive":
        naive(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
