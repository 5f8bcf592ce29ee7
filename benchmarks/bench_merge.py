"""Merge benchmark: streammerge against the physical limit (cat/cp) and the naive approach, in one run.

    python benchmarks/bench_merge.py --preset qwen2.5-0.5b --world-size 8
    python benchmarks/bench_merge.py --preset qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-3b   # the README plot

For each preset: make a synthetic veRL checkpoint (benchmarks/make_checkpoint.py) under --workdir,
then run every contender --repeat times, interleaved, each in its own subprocess:

    cat             cat of the model rank files into one file, then sync of that file (the physical limit)
    cp              cp of the model rank files, then sync of the copies
    cat+sha256      cat | tee FILE | openssl dgst -sha256, then sync: the same work with standard tools when
                    the output must also be hashed (streammerge hashes every file it writes: CRC-32 for
                    resume and verify, sha256 too when it pushes); pipes make it slower than one process
                    that hashes its own buffers
    streammerge     python -m streammerge CKPT OUT --dtype keep        (float32 -> float32)
    streammerge-bf16  ... --dtype bfloat16                             (writes half the bytes)
    naive           benchmarks/naive_merge.py: load every rank, torch.cat, save_pretrained (bfloat16)
    verl            python -m verl.model_merger merge --backend fsdp (bfloat16), when veRL imports
                    (see --verl-path); otherwise recorded as not run, with the reason

Before every run the page cache is dropped (as root: sync; echo 3 > /proc/sys/vm/drop_caches;
otherwise posix_fadvise(DONTNEED) on the rank files), so the rank files are read cold. Then, unless
--cold-imports, the Python start-up is warmed (`import torch, transformers, streammerge`) so all Python
contenders start with their libraries cached, as on a machine that uses them; the cold import time is
measured and reported on its own. Wall time is the whole subprocess (interpreter start included). Peak
RSS is the largest sum of RSS over the process tree, sampled every 10 ms with psutil, and at least the
children's ru_maxrss. MB/s is rank-file bytes over wall time. Times are medians over --repeat runs
(all runs are kept in the JSON); ratios compare medians of the same run.

Outputs are checked: streammerge's float32 output bit for bit against the maker's formula, the
bfloat16 outputs of streammerge, naive and veRL compared file by file (sha256).

Results: benchmarks/results/merge.json and merge.png (time and peak RAM against checkpoint size).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from streammerge.testing.presets import PRESETS, check_merge, checkpoint_bytes, make_checkpoint  # noqa: E402

CONTENDERS = ["cat", "cp", "cat+sha256", "streammerge", "streammerge-bf16", "naive", "verl"]
WARM = "import torch, torch.distributed.tensor, transformers, safetensors, streammerge.pipeline"


# ---------------------------------------------------------------- measuring one process tree

def measure(cmd: list[str], env: dict, cwd: Path = ROOT) -> dict:
    """Run cmd; wall time, peak RSS of the whole tree (sampled every 10 ms) and of each process (VmHWM).

    Not the children's ru_maxrss: it survives exec, so a child spawned (vfork) by this process while it is
    large, e.g. right after it made a checkpoint, reports this process's peak as its own.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, hwm = [0], [0]
    stop = threading.Event()

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                        hwm[0] = max(hwm[0], vm_hwm(p.pid))
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                break
            peak[0] = max(peak[0], total)
            stop.wait(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    return {"wall_s": wall, "peak_rss_mb": max(peak[0], hwm[0]) / 2**20,
            "sampled_peak_rss_mb": peak[0] / 2**20, "max_process_rss_mb": hwm[0] / 2**20,
            "returncode": proc.returncode, "stdout": out[-2000:], "stderr": err[-2000:]}


def vm_hwm(pid: int) -> int:
    """A live process's peak resident set since its exec, in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


# ---------------------------------------------------------------- cache control

def cache_policy() -> str:
    if os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK):
        return "drop_caches"
    return "fadvise"


def drop_cache(files: list[Path], policy: str) -> None:
    os.sync()
    if policy == "drop_caches":
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3")
            return
        except OSError:
            pass
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- contenders

def command(name: str, actor: Path, out: Path, verl_path: str | None) -> list[str] | None:
    files = [str(p) for p in sorted(actor.glob("model_world_size_*_rank_*.pt"))]
    if name == "cat":
        return ["sh", "-c", 'out="$1"; shift; cat "$@" > "$out" && sync "$out"', "sh", str(out / "all.bin"), *files]
    if name == "cat+sha256":
        hasher = "openssl dgst -sha256" if shutil.which("openssl") else "sha256sum"  # openssl: SHA-NI, ~6x faster here
        return ["sh", "-c", f'out="$1"; shift; cat "$@" | tee "$out" | {hasher} > /dev/null && sync "$out"', "sh",
                str(out / "all.bin"), *files]
    if name == "cp":
        return ["sh", "-c", 'out="$1"; shift; cp "$@" "$out"/ && sync "$out"/*', "sh", str(out), *files]
    if name == "streammerge":
        return [sys.executable, "-m", "streammerge", str(actor), str(out / "m"), "--dtype", "keep", "--no-optimizer",
                "--no-progress"]
    if name == "streammerge-bf16":
        return [sys.executable, "-m", "streammerge", str(actor), str(out / "m"), "--dtype", "bfloat16",
                "--no-optimizer", "--no-progress"]
    if name == "naive":
        return [sys.executable, str(HERE / "naive_merge.py"), str(actor), str(out / "m")]
    if name == "verl":
        return [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir", str(actor),
                "--target_dir", str(out / "m")]
    raise KeyError(name)


def verl_status(env: dict) -> str | None:
    """None when veRL's merger imports here; otherwise why not."""
    r = subprocess.run([sys.executable, "-c", "import verl.model_merger.fsdp_model_merger"], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode == 0:
        return None
    last = (r.stderr.strip().splitlines() or ["import failed"])[-1]
    return f"not run: veRL's merger does not import here ({last[:200]})"


def sha_files(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
        out[p.name] = h.hexdigest()
    return out


# ---------------------------------------------------------------- machine

def run_contenders(contenders: list[str], repeat: int, command, files: list[Path], env: dict, work: Path,
                   policy: str, unwarmed: tuple[str, ...] = ()) -> tuple[dict[str, list[dict]], dict[str, Path]]:
    """Each contender `repeat` times, interleaved, each `command(contender, out)` in its own process after the page
    cache is dropped (and the common imports warmed, but for the `unwarmed`, which import nothing: cp): every run, and
    each contender's output folder (`out/m`) from its last run where that succeeded (the caller compares and removes
    them)."""
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    kept: dict[str, Path] = {}
    for rep in range(repeat):
        for c in contenders:
            out = work / f"out-{c}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            drop_cache(files, policy)
            if c not in unwarmed:
                subprocess.run([sys.executable, "-c", WARM], cwd=ROOT, env=env, capture_output=True)
            load = os.getloadavg()[0]
            r = measure(command(c, out), env)
            r["loadavg_1m_before"] = load
            r.pop("stdout")
            if r["returncode"] != 0:
                print(f"{c} failed ({r['returncode']}): {r['stderr'][-800:]}", file=sys.stderr)
                r["error"] = next((ln.strip() for ln in reversed(r["stderr"].splitlines()) if ln.strip()), "")[:300]
                r["stderr"] = r["stderr"][-3000:]
            else:
                r.pop("stderr")
            runs[c].append(r)
            print(f"run {rep + 1}/{repeat} {c:<22} {r['wall_s']:7.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
                  f"(load {load:.1f})", file=sys.stderr)
            if rep == repeat - 1 and r["returncode"] == 0:
                kept[c] = out / "m"
            else:
                shutil.rmtree(out, ignore_errors=True)
    return runs, kept


def same_weights(a: Path, b: Path) -> bool:
    """Every tensor of folder `a` (safetensors or pytorch_model*.bin) is in `b` with the same dtype, shape and bytes
    (`b` may hold more: a tied lm_head.weight that zero_to_fp32 writes). Bytes, not values: torch.equal calls -0.0 equal
    to 0.0, and a NaN unequal to itself."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
        for f in folder.glob("pytorch_model*.bin"):
            out.update(torch.load(f, weights_only=True, mmap=True))
        return out

    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(-1).view(torch.uint8)

    ta, tb = tensors(a), tensors(b)
    return bool(ta) and set(ta) <= set(tb) and all(
        v.dtype == tb[k].dtype and v.shape == tb[k].shape and torch.equal(raw(v), raw(tb[k])) for k, v in ta.items())


def contender_summary(runs: dict[str, list[dict]], baseline: str, size: int | None = None) -> dict:
    """Per contender: the median wall time of its successful runs (and each), the largest peak RSS, the throughput
    over `size` bytes where given, and the ratio to `baseline`'s median."""
    summary = {}
    for c, rs in runs.items():
        ok = [r for r in rs if r["returncode"] == 0]
        if ok:
            wall = statistics.median(r["wall_s"] for r in ok)
            summary[c] = {"wall_s": round(wall, 2), "wall_s_all": [round(r["wall_s"], 2) for r in ok],
                          "peak_rss_mb": round(max(r["peak_rss_mb"] for r in ok), 1), "runs": len(ok)}
            if size:
                summary[c]["mb_per_s"] = round(size / 1e6 / wall, 1)
    if baseline in summary:
        for s in summary.values():
            s[f"ratio_to_{baseline}"] = round(s["wall_s"] / summary[baseline]["wall_s"], 2)
    return summary


def print_summary(title: str, summary: dict, baseline: str, checks: dict[str, bool]) -> None:
    print(title)
    width = max(map(len, summary), default=0) + 2
    for c, s in summary.items():
        ratio = s.get(f"ratio_to_{baseline}", float("nan"))
        print(f"  {c:<{width}}{s['wall_s']:>8.2f} s{s['peak_rss_mb']:>10.0f} MB{ratio:>7.2f} x {baseline}")
    for k, v in checks.items():
        print(f"  check: {k}: {'yes' if v else 'NO'}")


def contender_parser(doc: str, name: str, contenders: list[str]) -> argparse.ArgumentParser:
    """The options every contenders benchmark takes; `name` (bench_dcp, ...) names its work folder; `--contenders`
    (a comma-separated list, parsed to a list) picks from `contenders`, all by default."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contenders", default=list(contenders), type=lambda text: [c for c in text.split(",") if c],
                   help=f"comma-separated, of {','.join(contenders)}")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=f"/work/bench-tmp/{name}", help="checkpoint and outputs")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--keep", action="store_true", help="keep the checkpoint for the next run")
    return p


def bench_env() -> dict:
    """The contenders' environment: this checkout's streammerge, no tokenizer threads."""
    return dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")


def report(name: str, a: argparse.Namespace, argv: list[str] | None, work: Path, policy: str, runs: dict,
           baseline: str, checks: dict[str, bool], title: str, facts: dict, size: int | None = None) -> None:
    """Summarise the runs against `baseline`, write results/<name without bench_>.json (the machine, the command, the
    benchmark's `facts`, the summary, the checks and every run) and print the summary under `title`."""
    summary = contender_summary(runs, baseline, size)
    result = {"machine": machine(), "disk": disk(work), "cache_policy": policy, "repeat": a.repeat,
              "command": " ".join([f"{name}.py", *(argv if argv is not None else sys.argv[1:])]), **facts,
              "summary": summary, "checks": checks, "runs": runs}
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / f"{name.removeprefix('bench_')}.json").write_text(json.dumps(result, indent=1) + "\n")
    print_summary(title, summary, baseline, checks)


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def disk(path: Path) -> dict:
    best = None
    for part in psutil.disk_partitions(all=True):
        if str(path).startswith(part.mountpoint) and (best is None or len(part.mountpoint) > len(best.mountpoint)):
            best = part
    usage = shutil.disk_usage(path)
    return {"path": str(path), "mount": best.mountpoint if best else "?", "device": best.device if best else "?",
            "fstype": best.fstype if best else "?", "free_gb": round(usage.free / 1e9, 1)}


def import_cost(env: dict, policy: str, files: list[Path]) -> dict:
    """Start-up of `python -m streammerge`'s imports: RSS baseline, and time cold and warm."""
    code = "import streammerge.pipeline, streammerge.cli"
    drop_cache(files, policy)
    cold = measure([sys.executable, "-c", code], env)
    warm = measure([sys.executable, "-c", code], env)
    bare = measure([sys.executable, "-c", "import torch"], env)
    return {"cold_s": round(cold["wall_s"], 3), "warm_s": round(warm["wall_s"], 3),
            "rss_mb": round(warm["peak_rss_mb"], 1), "import_torch_rss_mb": round(bare["peak_rss_mb"], 1),
            "cold_measured_with": policy}


# ---------------------------------------------------------------- one preset

def bench_preset(preset: str, a: argparse.Namespace, env: dict, verl_reason: str | None, policy: str) -> dict:
    work = Path(a.workdir)
    ckdir = work / f"ckpt-{preset}-ws{a.world_size}"
    marker = ckdir / "COMPLETE"
    if not marker.exists():
        shutil.rmtree(ckdir, ignore_errors=True)
        t = time.perf_counter()
        make_checkpoint(ckdir, preset=preset, world_size=a.world_size)
        marker.write_text("ok")
        print(f"[{preset}] checkpoint made in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    actor = ckdir / "global_step_1" / "actor"
    files = sorted(actor.glob("model_world_size_*_rank_*.pt"))
    size = sum(p.stat().st_size for p in files)
    ram = psutil.virtual_memory().total
    runs: dict[str, list[dict]] = {c: [] for c in a.contenders}
    notes: dict[str, str] = {}
    for c in ("naive", "verl"):
        if c in runs and size * 2.2 > ram * a.naive_ram_fraction:
            notes[c] = (f"not run: loads the whole checkpoint (~{size * 2.2 / 1e9:.0f} GB with the merged copy) "
                        f"on a {ram / 1e9:.0f} GB machine shared with others (see --naive-ram-fraction)")
    if "verl" in runs and verl_reason:
        notes["verl"] = verl_reason
    checks: dict[str, object] = {}
    bf16_sha: dict[str, dict[str, str]] = {}
    for rep in range(a.repeat):
        for c in a.contenders:
            if c in notes:
                continue
            out = work / f"out-{c}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            drop_cache(files, policy)
            if not a.cold_imports and c not in ("cat", "cp", "cat+sha256"):
                subprocess.run([sys.executable, "-c", WARM], cwd=ROOT, env=env, capture_output=True)
            load = os.getloadavg()[0]
            r = measure(command(c, actor, out, a.verl_path), env)
            r["loadavg_1m_before"] = load
            m = re.search(r" in ([\d.]+) s \(", r["stdout"])
            if c.startswith("streammerge") and m:
                r["merge_s_in_process"] = float(m.group(1))
            if r["returncode"] != 0:
                print(f"[{preset}] {c} failed ({r['returncode']}): {r['stderr'][-500:]}", file=sys.stderr)
            else:
                if rep == 0 and c == "streammerge":
                    checks["streammerge float32 == source, bit for bit (every tensor)"] = \
                        check_merge(out / "m", preset) > 0
                if rep == 0 and c in ("streammerge-bf16", "naive", "verl"):
                    bf16_sha[c] = sha_files(out / "m")
            for k in ("stdout", "stderr"):
                if r["returncode"] == 0:
                    r.pop(k)
            runs[c].append(r)
            print(f"[{preset}] run {rep + 1}/{a.repeat} {c:<17} {r['wall_s']:7.2f} s  peak RSS "
                  f"{r['peak_rss_mb']:7.0f} MB  (load {load:.1f})", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
    if "streammerge-bf16" in bf16_sha:
        for c in ("naive", "verl"):
            if c in bf16_sha:
                same = bf16_sha[c] == bf16_sha["streammerge-bf16"]
                checks[f"streammerge bfloat16 files byte-identical to {c}'s"] = same
    summary = {}
    for c, rs in runs.items():
        ok = [r for r in rs if r["returncode"] == 0]
        if not ok:
            continue
        wall = statistics.median(r["wall_s"] for r in ok)
        summary[c] = {"wall_s": round(wall, 3), "wall_s_min": round(min(r["wall_s"] for r in ok), 3),
                      "peak_rss_mb": round(max(r["peak_rss_mb"] for r in ok), 1),
                      "mb_per_s": round(size / 1e6 / wall, 1), "runs": len(ok)}
        if any("merge_s_in_process" in r for r in ok):
            summary[c]["merge_s_in_process"] = round(statistics.median(r["merge_s_in_process"] for r in ok
                                                                       if "merge_s_in_process" in r), 3)
    for base in ("cat", "cp", "cat+sha256"):
        if base in summary:
            for c in summary:
                summary[c][f"ratio_to_{base}"] = round(summary[c]["wall_s"] / summary[base]["wall_s"], 2)
    if not a.keep:
        shutil.rmtree(ckdir, ignore_errors=True)
    return {"preset": preset, "world_size": a.world_size, "dtype_saved": "float32", "checkpoint_bytes": size,
            "model_params": checkpoint_bytes(preset) // 4, "summary": summary, "not_run": notes, "checks": checks,
            "runs": runs}


# ---------------------------------------------------------------- plot

def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the JSON has every number; the plot is a convenience
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = sorted(result["presets"], key=lambda p: p["checkpoint_bytes"])
    xs = [p["checkpoint_bytes"] / 1e9 for p in presets]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"cat": ("k", "--"), "cp": ("grey", ":"), "cat+sha256": ("tab:green", "--"),
              "streammerge": ("tab:blue", "-"),
              "streammerge-bf16": ("tab:cyan", "-"), "naive": ("tab:red", "-"), "verl": ("tab:orange", "-")}
    for c in CONTENDERS:
        pts = [(x, p["summary"][c]) for x, p in zip(xs, presets) if c in p["summary"]]
        if not pts:
            continue
        color, ls = styles[c]
        ax1.plot([x for x, _ in pts], [s["wall_s"] for _, s in pts], marker="o", color=color, ls=ls, label=c)
        if c not in ("cat", "cp", "cat+sha256"):
            ax2.plot([x for x, _ in pts], [s["peak_rss_mb"] for _, s in pts], marker="o", color=color, ls=ls, label=c)
    base = result["import"]["rss_mb"]
    ax2.axhline(base, color="tab:blue", lw=0.8, ls=":", label=f"streammerge import baseline ({base:.0f} MB)")
    ax1.set(xlabel="checkpoint size (GB, float32 rank files)", ylabel="wall time (s)", title="merge time (cold cache)")
    ax2.set(xlabel="checkpoint size (GB, float32 rank files)", ylabel="peak RSS of the process tree (MB)",
            title="peak memory")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_xlim(left=0)
    m = result["machine"]
    fig.suptitle(f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {result['disk']['fstype']} on "
                 f"{result['disk']['device']}; world size {presets[0]['world_size']}; {m['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-0.5b", help=f"comma-separated, from {', '.join(PRESETS)}")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--workdir", default="/work/bench-tmp/bench_merge", help="checkpoints and outputs (deleted after)")
    p.add_argument("--results", default=str(HERE / "results"), help="where merge.json and merge.png go")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints for the next run")
    p.add_argument("--cold-imports", action="store_true", help="do not warm Python's libraries after dropping caches")
    p.add_argument("--verl-path", default=os.environ.get("VERL_PATH"),
                   help="a folder to add to PYTHONPATH for veRL, e.g. made with `pip install --no-deps --target DIR "
                        "verl ray msgpack protobuf tensordict pyvers omegaconf accelerate`")
    p.add_argument("--naive-ram-fraction", type=float, default=0.6,
                   help="skip naive/verl when the checkpoint x2.2 exceeds this fraction of RAM")
    a = p.parse_args(argv)
    a.contenders = [c for c in a.contenders.split(",") if c]
    unknown = set(a.contenders) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contenders {sorted(unknown)}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (str(ROOT), a.verl_path) if x),
               TOKENIZERS_PARALLELISM="false")
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    policy = cache_policy()
    verl_reason = verl_status(env) if "verl" in a.contenders else None
    result = {"machine": machine(), "disk": disk(Path(a.workdir)), "cache_policy": policy,
              "software_warm_before_each_run": not a.cold_imports, "repeat": a.repeat,
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "presets": []}
    for preset in [s for s in a.preset.split(",") if s]:
        if preset not in PRESETS:
            p.error(f"unknown preset {preset}")
        result["presets"].append(bench_preset(preset, a, env, verl_reason, policy))
    result["import"] = import_cost(env, policy, [])
    base = result["import"]["rss_mb"]
    for pr in result["presets"]:
        for c in ("streammerge", "streammerge-bf16"):
            if c in pr["summary"]:
                pr["summary"][c]["rss_growth_over_import_mb"] = round(pr["summary"][c]["peak_rss_mb"] - base, 1)
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "merge.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "merge.png")
    print(table(result))
    print(f"wrote {out / 'merge.json'} and {out / 'merge.png'}", file=sys.stderr)
    return 0


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB; "
             f"cache: {result['cache_policy']}; import baseline {result['import']['rss_mb']:.0f} MB RSS, "
             f"{result['import']['cold_s']:.1f} s cold / {result['import']['warm_s']:.1f} s warm"]
    for pr in result["presets"]:
        lines.append(f"\n{pr['preset']} (world size {pr['world_size']}, {pr['checkpoint_bytes'] / 1e9:.2f} GB):")
        lines.append(f"  {'contender':<18}{'wall s':>8}{'MB/s':>8}{'peak RSS MB':>13}{'x cat':>7}{'x cp':>7}"
                     f"{'x cat+sha':>10}")
        for c, s in pr["summary"].items():
            lines.append(f"  {c:<18}{s['wall_s']:>8.2f}{s['mb_per_s']:>8.0f}{s['peak_rss_mb']:>13.0f}"
                         f"{s.get('ratio_to_cat', float('nan')):>7.2f}{s.get('ratio_to_cp', float('nan')):>7.2f}"
                         f"{s.get('ratio_to_cat+sha256', float('nan')):>10.2f}")
        for c, why in pr["not_run"].items():
            lines.append(f"  {c}: {why}")
        for k, v in pr["checks"].items():
            lines.append(f"  check: {k}: {'yes' if v else 'NO'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
