"""How much reading the rank files in threads of the same process slows `import torch` (verify's first wait).

    python benchmarks/import_contention.py --mode zip FILE...      # one JSON line

verify starts the rank files' CRC-32 streams before it imports torch, so that the disk is busy while torch's
modules load. This measures the import alone (`none`) and beside one stream per file, read three ways:
`zip` (the standard library's zip reader, 4 MiB reads, as `check_integrity` streamed), `pread` (os.preadv into
one reused 8 MiB buffer per thread, then zlib.crc32: no allocation, the GIL held only between the calls), and
`willneed` (one thread asking the kernel to read the files, posix_fadvise WILLNEED in 8 MiB steps, no CRC).
Run it on cold files (drop the page cache first); the streams run to their end, and their time is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import zipfile
import zlib

STEP = 8 * 2**20


def zip_stream(path: str, counter: list[int]) -> None:
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            with z.open(info) as fh:
                while data := fh.read(4 * 2**20):
                    counter[0] += len(data)


def pread_stream(path: str, counter: list[int]) -> None:
    view = memoryview(bytearray(8 * 2**20))
    fd = os.open(path, os.O_RDONLY)
    try:
        pos, crc = 0, 0
        while n := os.preadv(fd, [view], pos):
            crc = zlib.crc32(view[:n], crc)
            pos += n
            counter[0] += n
    finally:
        os.close(fd)


def willneed(paths: list[str], counter: list[int]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            for pos in range(0, size, STEP):
                os.posix_fadvise(fd, pos, min(STEP, size - pos), os.POSIX_FADV_WILLNEED)
                counter[0] += min(STEP, size - pos)
        finally:
            os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["none", "zip", "pread", "willneed"], required=True)
    p.add_argument("files", nargs="+")
    a = p.parse_args()
    counter = [0]
    ended: list[float] = []
    t0 = time.perf_counter()

    def run(fn, *args) -> None:  # type: ignore[no-untyped-def]
        fn(*args)
        ended.append(time.perf_counter() - t0)

    if a.mode == "willneed":
        threads = [threading.Thread(target=run, args=(willneed, a.files, counter))]
    elif a.mode != "none":
        fn = zip_stream if a.mode == "zip" else pread_stream
        threads = [threading.Thread(target=run, args=(fn, f, counter)) for f in a.files]
    else:
        threads = []
    for t in threads:
        t.start()
    import torch  # noqa: F401

    imported = time.perf_counter() - t0
    at_import = counter[0]
    for t in threads:
        t.join()
    print(json.dumps({"mode": a.mode, "import_s": round(imported, 2), "gb_by_import": round(at_import / 1e9, 2),
                      "streams_s": round(max(ended), 2) if ended else None, "gb": round(counter[0] / 1e9, 2)}))


if __name__ == "__main__":
    main()
