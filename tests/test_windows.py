"""The writer's file-space windows: boxes of flat ranges, elements cut by window edges, O_DIRECT reads."""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest

import streammerge
from streammerge.write.manifest import MANIFEST, STATE_DIR, crc32_file
from streammerge.write.writer import Sources, flat_boxes


@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 4), (4, 1, 6)])
def test_flat_boxes_tile_the_range_in_order(shape):
    n = math.prod(shape)
    rng = random.Random(0)
    index = np.arange(n).reshape(shape)
    for _ in range(30):
        a = rng.randrange(n + 1)
        b = rng.randrange(a, n + 1)
        got = []
        for box in flat_boxes(shape, a, b):
            part = index[tuple(slice(lo, hi) for lo, hi in box)].reshape(-1)
            assert list(part) == list(range(part[0], part[0] + part.size)) if part.size else True  # contiguous
            got.extend(part.tolist())
        assert got == list(range(a, b))


def test_direct_reads_give_the_buffered_bytes(tmp_path):
    """Unaligned offsets and lengths, reads longer than the bounce buffer, a read to the end of the file."""
    data = os.urandom(3 * 2**20 + 123)
    path = tmp_path / "rank.bin"
    path.write_bytes(data)
    direct = Sources(drop_cache=False, direct=True, bounce=256 * 2**10)
    plain = Sources(drop_cache=False)
    rng = random.Random(1)
    cases = [(1, 2**20 + 7), (len(data) - 300_001, 300_001), (4096, 512 * 2**10)]
    cases += [(rng.randrange(len(data) - 2**20), rng.randrange(256 * 2**10, 2**20)) for _ in range(5)]
    try:
        for offset, n in cases:
            a, b = bytearray(n), bytearray(n)
            direct.read_into(str(path), offset, memoryview(a))
            plain.read_into(str(path), offset, memoryview(b))
            assert a == b == data[offset:offset + n]
    finally:
        direct.close()
        plain.close()
    assert direct.direct or direct.fell_back  # either it ran direct, or it says why not


def test_a_window_edge_inside_an_element_is_cut_there():
    """A float32 tensor that starts 2 bytes past a multiple of 4 (as after an odd-length bfloat16 one):
    the segments of any byte range tile it exactly, and cut elements keep the right bytes of one element."""
    from types import SimpleNamespace

    from streammerge import dtypes
    from streammerge.write.writer import FileWriter

    t = SimpleNamespace(dtype=dtypes.float32, geometry=(3, 5), fold=None)
    with FileWriter(workers=1, buffer_size=64 * 2**10) as w:
        for a, b in [(2, 30), (0, 60), (3, 5), (1, 2), (4, 8), (57, 60), (6, 6 + 4096)]:
            b = min(b, 60)
            pos, covered = a, 0
            for _, box, dst, cut in w._segments(t, a, b, 0):  # type: ignore[arg-type]
                assert dst == covered
                n_el = math.prod(hi - lo for lo, hi in box)
                first = sum(lo * st for (lo, _), st in zip(box, (5, 1)))
                if cut is None:
                    assert first * 4 == pos and n_el >= 1
                    length = n_el * 4
                else:
                    skip, keep = cut
                    assert n_el == 1 and first * 4 + skip == pos and 0 < keep < 4
                    length = keep
                pos += length
                covered += length
            assert pos == b


@pytest.mark.slow
def test_small_windows_write_the_same_files_and_the_manifest_records_crc32(make_ckpt, tmp_path):
    import json

    ckpt = make_ckpt(world_size=2)
    ref = streammerge.merge(ckpt, tmp_path / "ref", dtype="bfloat16", buffer_size="64MiB")
    streammerge.merge(ckpt, tmp_path / "small", dtype="bfloat16", buffer_size="16KiB", workers=3)
    for f in ref.files:
        assert (tmp_path / "ref" / f.filename).read_bytes() == (tmp_path / "small" / f.filename).read_bytes()
    manifest = json.loads((tmp_path / "small" / STATE_DIR / MANIFEST).read_text())
    data = [rel for rel in manifest["files"] if rel.endswith(".safetensors")]
    assert data
    for rel, entry in manifest["files"].items():
        assert crc32_file(tmp_path / "small" / rel) == entry["crc32"], rel
    assert not any("sha256" in manifest["files"][rel] for rel in data)  # hashed only when pushing


def _resident_pages(path, length: int) -> list[bool]:
    """Which pages of a file are in the page cache (mincore over a read-only mapping of it)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ)
    view = np.frombuffer(m, np.uint8)
    vec = ctypes.create_string_buffer(-(-length // mmap.PAGESIZE))
    rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(length), vec)
    del view
    m.close()
    if rc != 0:
        pytest.skip(f"mincore: errno {ctypes.get_errno()}")
    return [bool(b & 1) for b in vec.raw]


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no page-cache advice on this platform")
def test_a_block_leaves_the_page_cache_once_all_of_it_is_read_and_not_before(tmp_path):
    """Reads in a shuffled order, as the output order reads a rank file: a 2 MiB block is evicted after the
    last byte the plan reads from it, never earlier (an early eviction means reading it twice)."""
    import mmap

    from streammerge.write.writer import DROP_BLOCK

    size = 6 * DROP_BLOCK + 12345
    path = tmp_path / "rank.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    rng = random.Random(3)
    cuts = sorted({0, size, *(rng.randrange(1, size) for _ in range(40))})
    ranges = [(a, b - a) for a, b in zip(cuts, cuts[1:])]
    rng.shuffle(ranges)
    sources = Sources(drop_cache=True)
    sources.expect((str(path), off, n) for off, n in ranges)
    left = {b: 0 for b in range(-(-size // DROP_BLOCK))}
    for off, n in ranges:
        for b in left:
            left[b] += max(0, min(off + n, (b + 1) * DROP_BLOCK) - max(off, b * DROP_BLOCK))
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        if any(_resident_pages(path, size)):
            pytest.skip("this file system keeps a file's pages after POSIX_FADV_DONTNEED (tmpfs?)")
        page = mmap.PAGESIZE
        for off, n in ranges:
            buf = bytearray(n)
            sources.read_into(str(path), off, memoryview(buf))
            assert buf == data[off:off + n]
            for b in list(left):
                left[b] -= max(0, min(off + n, (b + 1) * DROP_BLOCK) - max(off, b * DROP_BLOCK))
            resident = _resident_pages(path, size)
            for b, still in left.items():
                pages = resident[b * DROP_BLOCK // page:(b + 1) * DROP_BLOCK // page]
                if still == 0:
                    assert not any(pages), f"block {b} is read in full but still cached"
            # a block with bytes still to read keeps what was read of it (a range just read is cached)
            first, last = off // page, (off + n - 1) // page
            if left[off // DROP_BLOCK] and left[(off + n - 1) // DROP_BLOCK]:
                assert resident[first] and resident[last]
        assert all(v == 0 for v in left.values())
    finally:
        sources.close()


def test_o_direct_writes_are_opt_in_and_write_the_same_files(make_ckpt, tmp_path, monkeypatch):
    ckpt = make_ckpt(world_size=2)
    ref = streammerge.merge(ckpt, tmp_path / "ref", dtype="bfloat16", buffer_size="256KiB")
    assert "O_DIRECT" not in ref.fell_back
    monkeypatch.setenv("STREAMMERGE_DIRECT_WRITES", "1")
    direct = streammerge.merge(ckpt, tmp_path / "direct", dtype="bfloat16", buffer_size="256KiB")
    for f in ref.files:
        assert (tmp_path / "ref" / f.filename).read_bytes() == (tmp_path / "direct" / f.filename).read_bytes()
    assert set(direct.fell_back) <= {"O_DIRECT"}  # where the file system refuses it, the summary says why
