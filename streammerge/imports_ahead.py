"""The architecture check's imports, read before the merge reads (a model's first merge on a machine).

Beside a merge, the check's child (architecture.py) imports torch and transformers from a cold page cache as
thousands of small dependent reads, each queued behind the large reads the merge keeps in flight: the child then
outlasts the merge and the merge waits for it. Read first, by several threads with nothing else on the disk, the
same pages take about a second, and the child imports from memory beside the merge (README, "What the
architecture check costs").

Which pages is known only once a child has imported: after answering, it records which pages of the files it
loaded are in the page cache (mincore), in the cache directory, keyed by this Python and the torch and
transformers versions. The next child reads those pages before it imports, and the merge starts reading once it
has (`ArchCheck.wait_ahead`). A machine's first child finds no list and imports as before.

The list comes from the user's cache directory, so it is only a hint: only regular files under this Python's
installation (and its bytecode cache) are read, never past their size, at most MAX_BYTES in all, and what is
read is thrown away.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_BYTES = 4 << 30
THREADS = 8
GAP = 256 << 10  # pages this close together are read as one range
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Ahead:
    """What `read_ahead` read: bytes, seconds, and the listed bytes it could not read (files gone or refused)."""

    bytes: int = 0
    seconds: float = 0.0
    missing: int = 0

    @property
    def stale(self) -> bool:
        """Much of the list is gone (an upgrade since it was recorded): the child records it again."""
        return self.missing > (self.bytes + self.missing) // 10


def list_path(cache_dir: Path, versions: str) -> Path:
    """Where this Python's list is kept: its own, since another environment imports other files."""
    key = hashlib.sha256(f"{os.path.realpath(sys.executable)}|{platform.machine()}|{versions}".encode())
    return cache_dir / f"{key.hexdigest()[:32]}.json"


def _roots() -> tuple[str, ...]:
    import site
    import sysconfig

    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, sys.pycache_prefix or "",
             *(sysconfig.get_paths().get(k, "") for k in ("stdlib", "platstdlib", "purelib", "platlib"))}
    try:
        found.update(site.getsitepackages())
        found.add(site.getusersitepackages())
    except AttributeError:  # a virtualenv's old site module
        pass
    for pkg in ("torch", "transformers"):
        mod = sys.modules.get(pkg)
        file = getattr(mod, "__file__", None)
        if isinstance(file, str):
            found.add(str(Path(file).parent.parent))
    return tuple(sorted({os.path.join(os.path.realpath(r), "") for r in found if r}))


def _allowed(path: str, roots: tuple[str, ...]) -> bool:
    return os.path.isabs(path) and os.path.realpath(path).startswith(roots)


def _entries(data: object) -> Iterator[tuple[str, list[tuple[int, int]]]]:
    if not isinstance(data, list):
        return
    for item in data:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], list)):
            continue
        ranges = [(r[0], r[1]) for r in item[1] if isinstance(r, list) and len(r) == 2
                  and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in r)]
        if ranges:
            yield item[0], ranges


def read_ahead(listed: Path, *, threads: int = THREADS, roots: tuple[str, ...] | None = None,
               meta: bool = True) -> Ahead:
    """Read the pages the list names into the page cache, the largest files first; a list that cannot be read is
    nothing to read. `meta`: also each entry's inode in the listed files' folders and their parents (the import
    system and the dynamic loader look up many names that are no listed file)."""
    t0 = time.perf_counter()
    try:
        data = json.loads(listed.read_text())
    except (OSError, ValueError, RecursionError):
        return Ahead(seconds=time.perf_counter() - t0)
    allowed = roots if roots is not None else _roots()
    files = sorted(_entries(data), key=lambda e: -sum(n for _, n in e[1]))
    # the import system lists each package's folder: those too, after the files
    folders = {os.path.dirname(p) for p, _ in files}
    if meta:
        for d in list(folders):
            while d != os.path.dirname(d):
                d = os.path.dirname(d)
                folders.add(d)
    work: list[tuple[str, list[tuple[int, int]] | None]] = [*files, *((d, None) for d in sorted(folders))]
    lock = threading.Lock()
    totals = {"read": 0, "missing": 0}
    items = iter(work)

    def run() -> None:
        buf = bytearray(_BLOCK)
        view = memoryview(buf)
        while True:
            with lock:
                item = next(items, None)
                if item is None or totals["read"] >= MAX_BYTES:
                    return
            got, gone = (_read_file(item[0], item[1], allowed, view) if item[1] is not None
                         else _list(item[0], allowed, meta))
            with lock:
                totals["read"] += got
                totals["missing"] += gone

    pool = [threading.Thread(target=run, name="streammerge-imports-ahead", daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return Ahead(totals["read"], time.perf_counter() - t0, totals["missing"])


def _list(folder: str, roots: tuple[str, ...], meta: bool) -> tuple[int, int]:
    if meta or _allowed(folder, roots):  # names and inodes only: nothing of a file outside the roots is read
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if meta:
                        entry.stat(follow_symlinks=False)
        except OSError:
            pass
    return 0, 0


def _read_file(path: str, ranges: list[tuple[int, int]], roots: tuple[str, ...], buf: memoryview) -> tuple[int, int]:
    listed = sum(n for _, n in ranges)
    if not _allowed(path, roots):
        return 0, listed
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return 0, listed
    got = 0
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return 0, listed
        for off, n in ranges:
            end = min(off + n, st.st_size)
            while off < end:
                k = os.preadv(fd, [buf[:min(len(buf), end - off)]], off)
                if k <= 0:
                    break
                off += k
                got += k
    except OSError:
        pass
    finally:
        os.close(fd)
    return got, max(0, listed - got)


# ---------------------------------------------------------------- recording (in the child, after it answered)

def loaded_files() -> set[str]:
    """The files this process imported or mapped, and transformers' sources (its import scans them)."""
    found: set[str] = set()
    for mod in list(sys.modules.values()):
        spec = getattr(mod, "__spec__", None)
        for f in (getattr(mod, "__file__", None), getattr(spec, "cached", None)):  # sources too: some read their own
            if isinstance(f, str):
                found.add(f)
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    found.add(parts[5].strip())
    except OSError:
        pass
    for site_dir in {os.path.dirname(os.path.dirname(f)) for f in found if f.endswith("/torch/__init__.py")}:
        try:  # which packages are installed, and their versions: transformers asks of dozens
            found.update(os.path.join(site_dir, d, "METADATA") for d in os.listdir(site_dir)
                         if d.endswith(".dist-info"))
        except OSError:
            pass
    tf = getattr(sys.modules.get("transformers"), "__file__", None)
    if isinstance(tf, str):
        for d, _, files in os.walk(Path(tf).parent):
            found.update(os.path.join(d, f) for f in files if not f.endswith(".pyc"))
    return found


def record(listed: Path, files: Iterable[str] | None = None) -> int:
    """Write the list: each file's ranges now in the page cache, under this Python's installation. Returns the
    bytes listed (0 where the page cache cannot be asked)."""
    resident = _Resident.make()
    if resident is None:
        return 0
    roots = _roots()
    out, total = [], 0
    for path in sorted(files if files is not None else loaded_files()):
        if total >= MAX_BYTES or not _allowed(path, roots):
            continue
        ranges = resident.ranges(path)
        if ranges:
            out.append([os.path.realpath(path), ranges])
            total += sum(n for _, n in ranges)
    try:
        listed.parent.mkdir(parents=True, exist_ok=True)
        tmp = listed.with_name(f".{listed.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out, separators=(",", ":")))
        os.replace(tmp, listed)
    except OSError:
        return 0
    return total


class _Resident:
    """mincore(2) through ctypes: Python has no call that asks which pages of a file are cached."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        self.libc = libc
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        self.page = os.sysconf("SC_PAGE_SIZE")

    @classmethod
    def make(cls) -> _Resident | None:
        if platform.system() != "Linux":
            return None
        try:
            return cls(ctypes.CDLL(None, use_errno=True))
        except (OSError, AttributeError):
            return None

    def ranges(self, path: str) -> list[list[int]]:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return []
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                return []
            size = st.st_size
            addr = self.libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED: no page is touched
            if addr in (None, ctypes.c_void_p(-1).value):
                return []
            try:
                pages = (size + self.page - 1) // self.page
                vec = ctypes.create_string_buffer(pages)
                if self.libc.mincore(addr, size, vec) != 0:
                    return []
                return _spans(vec.raw, self.page, size)
            finally:
                self.libc.munmap(addr, size)
        except OSError:
            return []
        finally:
            os.close(fd)


def _spans(vec: bytes, page: int, size: int) -> list[list[int]]:
    """Runs of cached pages (low bit set) as [offset, length], runs less than GAP apart joined."""
    bits = vec.translate(_LOW_BIT)
    out: list[list[int]] = []
    i = bits.find(1)
    while i >= 0:
        j = bits.find(0, i)
        j = len(bits) if j < 0 else j
        start, end = i * page, min(j * page, size)
        if out and start - (out[-1][0] + out[-1][1]) <= GAP:
            out[-1][1] = end - out[-1][0]
        else:
            out.append([start, end - start])
        i = bits.find(1, j)
    return out


_LOW_BIT = bytes(b & 1 for b in range(256))
