"""Why `cp` can beat a keep-dtype merge on a small VM: ways of copying the same rank files, interleaved, cold cache.

    python benchmarks/copy_ab.py CKPT_ACTOR_DIR --rounds 8 --results benchmarks/results/copy_ab_2core.json

Every way copies the model rank files' bytes and ends with fsync of what it wrote; the order of the ways is reversed
every other round (a run's time depends on what ran before it, e.g. on a file system mounted with `discard`):
    cp          coreutils cp of the files into a folder, then sync of the copies (bench_merge's baseline)
    cfr_files   copy_file_range of each whole file into a file of its own, fsync after each (the kernel copies,
                as in cp, which leaves the write-back to its final sync instead)
    cfr_one     copy_file_range of the files, 4 MiB at a time, into one file (the kernel copies)
    rw_one      pread + pwrite of 4 MiB windows into one file on 2 threads, no checksum (copies through user memory)
    rw_one_crc  the same, with a CRC-32 of every window (what a keep merge does per byte, without its plan)
    merge_keep  `streammerge CKPT OUT --dtype keep` (interpreter start included)
So the gap between cfr_one and rw_one is the price of copying through user memory, and the gap between rw_one_crc
and merge_keep is the merge's own (start-up, plan, reading in output order). Wall and CPU seconds per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WAYS = ["cp", "cfr_files", "cfr_one", "rw_one", "rw_one_crc", "merge_keep"]
WINDOW = 4 * 2**20


def copy(way: str, out: Path, files: list[Path]) -> None:
    """One way of copying, in this process (the benchmark runs it as a child)."""
    if way == "cfr_files":
        out.mkdir()
        for f in files:
            with open(f, "rb") as src, open(out / f.name, "wb") as dst:
                n = os.fstat(src.fileno()).st_size
                while n > 0:
                    n -= os.copy_file_range(src.fileno(), dst.fileno(), n)
                os.fsync(dst.fileno())
        return
    jobs, base = [], 0
    fds = [os.open(f, os.O_RDONLY) for f in files]
    for fd in fds:
        size = os.fstat(fd).st_size
        jobs += [(fd, pos, base + pos, min(WINDOW, size - pos)) for pos in range(0, size, WINDOW)]
        base += size
    dst = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(dst, base)

    if way == "cfr_one":
        for fd, src_pos, dst_pos, n in jobs:
            done = 0
            while done < n:
                done += os.copy_file_range(fd, dst, n - done, src_pos + done, dst_pos + done)
    else:
        from streammerge.checksum import crc32

        def window(job: tuple[int, int, int, int]) -> int:
            fd, src_pos, dst_pos, n = job
            buf = os.pread(fd, n, src_pos)
            os.pwrite(dst, buf, dst_pos)
            return crc32(buf) if way == "rw_one_crc" else 0

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(window, jobs))
    os.fsync(dst)
    os.close(dst)
    for fd in fds:
        os.close(fd)


def command(way: str, actor: Path, out: Path, files: list[Path]) -> list[str]:
    """The child process that copies one way."""
    if way == "cp":
        script = 'o="$1"; shift; mkdir "$o" && cp "$@" "$o"/ && sync "$o"/*'
        return ["sh", "-c", script, "sh", str(out), *map(str, files)]
    if way == "merge_keep":
        return [sys.executable, "-m", "streammerge", str(actor), str(out), "--dtype", "keep", "--no-optimizer",
                "--no-progress"]
    return [sys.executable, __file__, "--run", way, str(out), *map(str, files)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("actor", type=Path, nargs="?")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--ways", default=",".join(WAYS))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/copy-ab"))
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--run", nargs="+", metavar=("WAY", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.run:
        copy(a.run[0], Path(a.run[1]), [Path(f) for f in a.run[2:]])
        return 0
    if a.actor is None:
        p.error("ACTOR_DIR is needed")
    import bench_merge  # not in the copying children: their start-up is part of their time
    from device_bench import ROOT, measure

    files = sorted(a.actor.glob("model_world_size_*_rank_*.pt"))
    ways = [w for w in a.ways.split(",") if w]
    a.workdir.mkdir(parents=True, exist_ok=True)
    where = bench_merge.disk(a.workdir)
    policy = bench_merge.cache_policy()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs: dict[str, list[dict]] = {}
    for r in range(a.rounds):
        for way in ways if r % 2 == 0 else ways[::-1]:
            out = a.workdir / "out"
            shutil.rmtree(out, ignore_errors=True)
            out.unlink(missing_ok=True)
            bench_merge.drop_cache(files, policy)
            m = measure(command(way, a.actor, out, files), env)
            if m["returncode"] != 0:
                raise SystemExit(f"{way}: rc {m['returncode']}: {m['stderr'][-500:]}")
            runs.setdefault(way, []).append({k: m[k] for k in ("wall_s", "user_s", "sys_s")})
            print(f"round {r} {way:11} {m['wall_s']:6.2f} s  user {m['user_s']:5.2f}  sys {m['sys_s']:5.2f}",
                  flush=True)
    shutil.rmtree(a.workdir, ignore_errors=True)
    median = {w: {k: round(statistics.median(x[k] for x in v), 2) for k in ("wall_s", "user_s", "sys_s")}
              for w, v in runs.items()}
    result = {"machine": bench_merge.machine(), "disk": where, "cache": policy,
              "checkpoint_bytes": sum(f.stat().st_size for f in files), "rounds": a.rounds,
              "command": " ".join(["copy_ab.py", *(argv if argv is not None else sys.argv[1:])]),
              "median": median, "runs": runs}
    if "cp" in median:
        result["wall_vs_cp"] = {w: round(m["wall_s"] / median["cp"]["wall_s"], 2) for w, m in median.items()}
    print(json.dumps({k: result[k] for k in ("median", "wall_vs_cp") if k in result}, indent=1))
    if a.results:
        a.results.parent.mkdir(parents=True, exist_ok=True)
        a.results.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
