"""Where the architecture check's child spends a cold start, and whether reading its files ahead helps (issue 15).

    python benchmarks/arch_child_prefetch.py CONFIG_JSON --rounds 2 --beside FILE --results OUT.json

The child (`streammerge.architecture.describe`) imports torch and transformers; `import transformers` alone reads
every source file under transformers/models (its lazy import table is built by scanning them). From a cold page
cache those are thousands of small reads, one at a time. Modes, each in a fresh process after drop_caches:
  none      the child as it is;
  list      threads first ask the kernel to read (POSIX_FADV_WILLNEED) exactly the pages a cold child read: recorded
            once, after drop_caches and one cold child, as the resident ranges (mincore) of every file a child has
            open or mapped (sys.modules' sources and bytecode, /proc/self/maps, the scanned models/ sources);
  static    the same from a directory walk of torch and transformers only (what a first child can know).
Each mode runs alone and (--beside) next to `cat FILE > /dev/null`, a disk kept busy as a merge keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from block_device import disk_of, diskstats  # noqa: E402

CHILD = r"""
import json, os, sys, time, threading
t0 = time.perf_counter()
mode, listfile, cfg = sys.argv[1], sys.argv[2], sys.argv[3]
def willneed(paths, threads=16):
    def work(part):
        for p in part:
            p, ranges = (p, [(0, 0)]) if isinstance(p, str) else p
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            for off, n in ranges:
                try:
                    os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass
            os.close(fd)
    for i in range(threads):
        threading.Thread(target=work, args=(paths[i::threads],), daemon=True).start()
if mode == "list":
    willneed(json.load(open(listfile + ".resident")))
elif mode == "static":
    import importlib.util
    def walk(pkg):
        spec = importlib.util.find_spec(pkg)
        out = []
        for root in spec.submodule_search_locations or []:
            for d, _, fs in os.walk(root):
                out += [os.path.join(d, f) for f in fs if f.endswith((".py", ".pyc")) or ".so" in f]
        return out
    willneed(walk("transformers") + walk("torch"))
from streammerge.architecture import describe
t1 = time.perf_counter()
d = describe(json.load(open(cfg)), [])
t2 = time.perf_counter()
if mode == "record":
    import importlib.util
    files = set()
    for m in list(sys.modules.values()):
        for attr in ("__file__", "__cached__"):
            f = getattr(m, attr, None)
            if isinstance(f, str) and os.path.isfile(f):
                files.add(f)
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[5].startswith("/") and os.path.isfile(parts[5]):
            files.add(parts[5])
    tf = os.path.dirname(importlib.util.find_spec("transformers").origin)
    for dp, _, fs in os.walk(os.path.join(tf, "models")):
        files.update(os.path.join(dp, f) for f in fs if f.endswith(".py"))
    json.dump(sorted(files), open(listfile, "w"))
    print(json.dumps({"files": len(files), "mb": round(sum(os.path.getsize(f) for f in files) / 1e6, 1)}))
print(json.dumps({"import_s": round(t1 - t0, 2), "describe_s": round(t2 - t1, 2), "class": d["models"][0]["class"],
                  "modules": len(sys.modules)}))
"""

# Which pages of the recorded files are in the page cache (run right after a cold child): what it read.
RESIDENT = r"""
import ctypes, json, mmap, os, sys
import numpy as np
listfile = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
page, out, total = mmap.PAGESIZE, [], 0
for f in json.load(open(listfile)):
    size = os.path.getsize(f)
    if not size:
        continue
    with open(f, "rb") as fh:
        m = mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ)
    n = (size + page - 1) // page
    vec = ctypes.create_string_buffer(n)
    view = np.frombuffer(m, dtype=np.uint8)
    libc.mincore(view.ctypes.data, size, vec)
    del view
    m.close()
    ranges, start = [], None
    for i, b in enumerate(vec.raw):
        if b & 1 and start is None:
            start = i
        elif not b & 1 and start is not None:
            ranges.append([start * page, (i - start) * page])
            start = None
    if start is not None:
        ranges.append([start * page, (n - start) * page])
    if ranges:
        out.append([f, ranges])
        total += sum(r[1] for r in ranges)
json.dump(out, open(listfile + ".resident", "w"))
print(json.dumps({"files": len(out), "mb": round(total / 1e6, 1)}))
"""


def drop() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--beside", help="a large file to cat > /dev/null while the child runs")
    p.add_argument("--modes", default="none,list,static")
    p.add_argument("--deadline", type=float, default=1e9, help="seconds from start; no run starts after it")
    p.add_argument("--results", default=str(HERE / "results" / "arch_child_prefetch.json"))
    a = p.parse_args()
    t0 = time.perf_counter()
    listfile = str(Path(a.results).with_suffix(".files.json"))
    dev = disk_of(Path(a.config).resolve().parent)
    env = dict(os.environ)
    res: dict = {"runs": {}, "python": sys.version.split()[0], "cpus": os.cpu_count()}
    rec = subprocess.run([sys.executable, "-c", CHILD, "record", listfile, a.config], env=env, capture_output=True,
                         text=True)
    res["recorded"] = rec.stdout.strip().splitlines()[0] if rec.returncode == 0 else rec.stderr[-800:]
    drop()
    subprocess.run([sys.executable, "-c", CHILD, "none", listfile, a.config], env=env, capture_output=True)
    r = subprocess.run([sys.executable, "-c", RESIDENT, listfile], env=env, capture_output=True, text=True)
    res["cold_child_read"] = r.stdout.strip() or r.stderr[-800:]
    print("recorded", res["recorded"], "a cold child read", res["cold_child_read"], flush=True)
    for _ in range(a.rounds):
        for beside in ([None, a.beside] if a.beside else [None]):
            for mode in ["warm", *a.modes.split(",")]:
                if time.perf_counter() - t0 > a.deadline:
                    break
                if mode != "warm":
                    drop()
                bg = subprocess.Popen(["cat", beside], stdout=subprocess.DEVNULL) if beside else None
                before = diskstats(dev)
                t = time.perf_counter()
                r = subprocess.run([sys.executable, "-c", CHILD, "none" if mode == "warm" else mode, listfile,
                                    a.config], env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t
                after = diskstats(dev)
                if bg:
                    bg.kill()
                    bg.wait()
                key = f"{mode}{'/beside_cat' if beside else ''}"
                run = {"wall_s": round(wall, 2), "read_mb": round((after[0] - before[0]) * 512 / 1e6, 1),
                       "rc": r.returncode}
                run.update(json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else
                           {"err": r.stderr[-400:]})
                res["runs"].setdefault(key, []).append(run)
                print(key, run, flush=True)
    Path(a.results).write_text(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / Path(a.results).name).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
