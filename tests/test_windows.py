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
