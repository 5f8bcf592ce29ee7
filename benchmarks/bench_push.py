"""Push of a merge to a local Hub-compatible server: overlapped with the merge vs merge-then-upload.

    python benchmarks/bench_push.py [--size-gb 2] [--max-shard-size 500MB] [--repeat 1]

Makes a ~size-gb checkpoint (world size 1, plain float32 tensors in veRL file naming), then, each on
a fresh server (tests/hubserver.py, run as a subprocess so it does not share our GIL):

- ``serial``: ``merge()`` then ``push_folder()`` of the finished folder (what a user does with two
  tools: the upload hashes every file again).
- ``serial_hashed``: ``merge()`` then a push given the writer's sha256 from the manifest (isolates
  the gain of overlapping from the gain of not hashing twice).
- ``overlapped``: ``merge_and_push()``: each file uploads while the next one is merged.
- ``hf_upload_folder``: ``merge()``, then huggingface_hub's own upload (``HfApi.create_repo`` +
  ``upload_folder``, what ``hf upload`` runs) of the finished folder, as a user without streammerge's push
  would upload it. (huggingface_hub 2.x has no ``upload_large_folder``.)

The server keeps blobs in memory and hashes what it receives (sha256, md5 per multipart part), on
the same machine: its CPU and memory traffic are part of every number. ``--link-mbps 0 400 100``
also runs with the server's uplink limited to a shared N MB/s (a bandwidth model of a real upload,
no latency). Results go to benchmarks/results/push.json. Big files are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # the test server speaks LFS only
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("STREAMMERGE_ARCH_CHECK", "0")  # plain tensors, no model: transformers would refuse the config

TENSOR_ROWS, TENSOR_COLS = 4096, 16384  # 256 MiB of float32 per tensor


def make_checkpoint(actor: Path, size_gb: float) -> int:
    """Plain float32 tensors in one rank file of world size 1; returns the tensor bytes."""
    import torch

    actor.mkdir(parents=True, exist_ok=True)
    per = TENSOR_ROWS * TENSOR_COLS * 4
    n = max(1, round(size_gb * 1e9 / per))
    gen = torch.Generator().manual_seed(0)
    state = {f"model.layers.{i}.mlp.up_proj.weight": torch.rand(TENSOR_ROWS, TENSOR_COLS, generator=gen)
             for i in range(n)}
    torch.save(state, actor / "model_world_size_1_rank_0.pt")
    (actor / "huggingface").mkdir(exist_ok=True)
    (actor / "huggingface" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False,
         "torch_dtype": "float32"}))
    return n * per


def drop_cache(folder: Path) -> None:
    """Evict files from the page cache, so every run reads them from disk as the first did."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Server:
    """tests/hubserver.py in a subprocess; stops when its stdin closes."""

    def __init__(self, link_mbps: float):
        self.link_mbps = link_mbps

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", "--link-mbps", str(self.link_mbps)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.endpoint = self.proc.stdout.readline().strip()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


class Link:
    """One shared uplink of ``rate`` bytes/s: each received body waits for its turn on the wire."""

    def __init__(self, rate: float):
        self.rate, self.free_at, self.lock = rate, 0.0, threading.Lock()

    def carry(self, nbytes: int) -> None:
        with self.lock:
            start = max(time.monotonic(), self.free_at)
            self.free_at = start + nbytes / self.rate
            done = self.free_at
        time.sleep(max(0.0, done - time.monotonic()))


def serve(link_mbps: float) -> None:
    import hubserver
    from hubserver import HubServer

    if link_mbps > 0:  # model a network uplink: the answer to a body comes when it has crossed the link
        link, read_body = Link(link_mbps * 1e6), hubserver._Handler._read_body

        def throttled(handler) -> bytes:
            body = read_body(handler)
            link.carry(len(body))
            return body

        hubserver._Handler._read_body = throttled
    with HubServer(multipart_chunk_size=16 * 2**20) as hub:
        print(hub.endpoint, flush=True)
        sys.stdin.read()


def run_mode(mode: str, ckpt: Path, out: Path, shard: str, link_mbps: float, workers: int) -> dict:
    from hubserver import WRITE_TOKEN

    import streammerge
    from streammerge.hub.publish import merge_and_push
    from streammerge.hub.pusher import HubPusher, push_folder

    shutil.rmtree(out, ignore_errors=True)
    drop_cache(ckpt)
    merge_opts = {"dtype": "keep", "max_shard_size": shard, "optimizer": False}
    with Server(link_mbps) as server:
        push_opts = {"token": WRITE_TOKEN, "endpoint": server.endpoint}
        ours = {"upload_workers": workers}
        t0 = time.perf_counter()
        if mode == "overlapped":
            result = merge_and_push(ckpt, out, f"bench-{mode}", model_card=False, **push_opts, **ours, **merge_opts)
            t_merge_done = t0 + result.merge.seconds
            files = len(result.files)
        else:
            merged = streammerge.merge(ckpt, out, **merge_opts)
            t_merge_done = time.perf_counter()
            if mode == "serial":
                push_folder(out, f"bench-{mode}", max_workers=workers, **push_opts)
            elif mode.startswith("hf_"):
                hf_upload(out, f"alice/bench-{mode}", server.endpoint)
            else:  # serial_hashed
                with HubPusher(f"bench-{mode}", max_workers=workers, **push_opts) as pusher:
                    for f in merged.files:
                        pusher.submit(out / f.filename, f.filename, sha256=f.sha256, size=f.size)
            files = len(merged.files)
        t_end = time.perf_counter()
    return {"mode": mode, "link_mbps": link_mbps or None, "upload_workers": workers, "total_s": round(t_end - t0, 2),
            "merge_s": round(t_merge_done - t0, 2), "after_merge_s": round(t_end - t_merge_done, 2), "files": files}


def hf_upload(folder: Path, repo_id: str, endpoint: str) -> None:
    """huggingface_hub's upload of a finished folder (the merge's state folder left out)."""
    from hubserver import WRITE_TOKEN
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=WRITE_TOKEN)
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, ignore_patterns=[".streammerge/*"])


MODES = ("serial", "serial_hashed", "overlapped", "hf_upload_folder")


def summarize(runs: list[dict]) -> dict:
    """Medians per mode, and the overlapped time against merge+upload and against max(merge, upload)."""
    def med(mode: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs if r["mode"] == mode), 2)

    done = {r["mode"] for r in runs}
    out: dict = {m: {k: med(m, k) for k in ("total_s", "merge_s", "after_merge_s")} for m in MODES if m in done}
    if not {"serial", "serial_hashed", "overlapped"} <= done:
        return out
    out["overlapped_vs_serial"] = round(out["overlapped"]["total_s"] / out["serial"]["total_s"], 3)
    out["overlapped_vs_serial_hashed"] = round(out["overlapped"]["total_s"] / out["serial_hashed"]["total_s"], 3)
    # The floor for overlapping: the longer of merge and upload, as measured apart in serial_hashed.
    floor = max(out["serial_hashed"]["merge_s"], out["serial_hashed"]["after_merge_s"])
    out["overlapped_vs_max_of_merge_and_upload"] = round(out["overlapped"]["total_s"] / floor, 3)
    for m in MODES:
        if m.startswith("hf_") and m in done:
            out[f"overlapped_vs_{m}"] = round(out["overlapped"]["total_s"] / out[m]["total_s"], 3)
    return out


def main() -> None:
    from streammerge.options import UPLOAD_WORKERS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--max-shard-size", default="500MB")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workdir", default=str(ROOT / "benchmarks" / "work" / "push"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--link-mbps", type=float, nargs="+", default=[0.0],
                    help="server uplink speeds in MB/s to run at; 0 = as fast as the local server goes (default)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    ap.add_argument("--upload-workers", type=int, default=UPLOAD_WORKERS,
                    help=f"streammerge's files uploaded at once (its default: {UPLOAD_WORKERS})")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "push.json"))
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.link_mbps[0])

    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        ap.error(f"unknown modes {sorted(set(modes) - set(MODES))}")
    load_at_start = os.getloadavg()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    ckpt = work / "ckpt" / "actor"
    try:
        t = time.perf_counter()
        nbytes = make_checkpoint(ckpt, args.size_gb)
        print(f"checkpoint: {nbytes / 1e9:.2f} GB of tensors in {time.perf_counter() - t:.1f} s", flush=True)
        runs = []
        for link in args.link_mbps:
            for i in range(args.repeat):
                for mode in modes[i % len(modes):] + modes[:i % len(modes)]:  # no mode always runs first
                    r = run_mode(mode, ckpt, work / f"out-{mode}", args.max_shard_size, link, args.upload_workers)
                    r["repeat"] = i
                    print(json.dumps(r), flush=True)
                    runs.append(r)
                    shutil.rmtree(work / f"out-{mode}", ignore_errors=True)
        summary = {f"link_{link:g}MBps" if link else "link_unlimited": summarize([r for r in runs
                   if (r["link_mbps"] or 0.0) == link]) for link in args.link_mbps}
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        result = {
            "benchmark": "push",
            "bytes": nbytes, "max_shard_size": args.max_shard_size, "repeat": args.repeat,
            "load_avg_at_start": load_at_start,
            "machine": {"cpus": os.cpu_count(), "memory_gb": round(mem / 1e9, 1), "python": platform.python_version(),
                        "platform": platform.platform(), "load_avg_at_end": os.getloadavg()},
            "server": "tests/hubserver.py in a subprocess on 127.0.0.1, blobs in memory, 16 MiB multipart parts; "
                      "link_N: each request body is held until it has crossed one shared N MB/s link",
            "runs": runs, "summary": summary,
            "note": "The local server's CPU (HTTP parsing, sha256/md5 of every byte, joining parts) and memory "
                    "copies share the machine with the merge in every run; link_unlimited has no network at all, "
                    "link_N models only a bandwidth (no latency, no TLS).",
        }
        out = Path(args.results)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(summary, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
