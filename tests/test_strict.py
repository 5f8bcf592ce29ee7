"""The rank-file reader decodes exactly what torch.load(weights_only=True) decodes, or refuses in one line.

Each case starts from real rank files (torch.save of DTensors on torch's fake process group) and damages
or re-lays them the way a copy tool, a big-endian machine or a hand edit would; the reader's tensors are
compared with torch.load's, byte for byte. A differential fuzz test does the same for random mutations.
"""

from __future__ import annotations

import io
import logging
import pickletools
import re
import shutil
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_tools import rewrite_with_torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import DTensor, Shard

from streammerge.errors import CheckpointError, StreammergeError
from streammerge.sources.base import ReadStats
from streammerge.sources.rankfile import load_rank_file
from streammerge.sources.rankset import load_ranks
from streammerge.sources.verl import verl_source
from streammerge.testing.rankfiles import write_rank_files

WS = 2
# refusals stricter than torch's, each with its stated reason
STRICTER = ("two zip records named", "big-endian", "two dtypes or sizes", "not where torch.save would have put it",
            "CRC mismatch", "differ in size", "bad local header", "runs past the end", "outside the archive folder",
            "central directory", "is malformed", "marked as a folder", "tensor names differ from rank 0",
            "as torch.save never names it", "does not start at the file's first byte",
            "not in the order its pickle names them")


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": (torch.randn(6, 4, generator=g), [Shard(0)]),
               "b.weight": (torch.randn(4, 6, generator=g).to(torch.bfloat16), [Shard(1)]),
               "c.bias": torch.randn(5, generator=g)}
    return write_rank_files(tmp_path_factory.mktemp("good"), tensors, (WS,))


def rank_file(d: Path, r: int = 0) -> Path:
    return d / f"model_world_size_{WS}_rank_{r}.pt"


def copy(good: Path, tmp: Path) -> Path:
    out = tmp / "actor"
    shutil.copytree(good, out)
    return out


def torch_locals(path: Path) -> dict[str, bytes]:
    logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for k, v in obj.items():
        local = v._local_tensor if isinstance(v, DTensor) else v
        out[k] = (tuple(v.shape), str(local.dtype), tuple(local.shape), local.contiguous().view(-1).view(torch.uint8)
                  .numpy().tobytes())
    return out


def reader_locals(path: Path, records: dict | None = None) -> dict[str, bytes]:
    """The reader's records, with each local tensor's bytes read where they say."""
    records = records if records is not None else load_rank_file(path, 0, WS).tensors
    raw = np.fromfile(path, np.uint8)
    out = {}
    for k, r in records.items():
        isz = r.dtype.itemsize
        if 0 in r.local_shape:
            data = b""
        else:
            view = np.lib.stride_tricks.as_strided(raw[r.offset:], shape=(*r.local_shape, isz),
                                                   strides=(*(s * isz for s in r.local_stride), 1))
            data = np.ascontiguousarray(view).tobytes()
        out[k] = (r.shape, "torch." + r.dtype.name, r.local_shape, data)
    return out


def differential(path: Path) -> str:
    """'same', 'both refuse', or 'stricter: <why>'; fails on any other outcome."""
    try:
        theirs = torch_locals(path)
    except Exception:
        theirs = None
    try:
        ours = reader_locals(path)
    except StreammergeError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        if theirs is None:
            return "both refuse"
        assert any(s in str(e) for s in STRICTER), f"refused what torch reads, without a stated reason: {e}"
        return "stricter"
    assert theirs is not None, f"{path}: read what torch.load refuses"
    assert ours == theirs, f"{path}: decoded differently from torch.load"
    return "same"


# ---------------------------------------------------------------- zip records

def records(path: Path) -> dict[str, zipfile.ZipInfo]:
    with zipfile.ZipFile(path) as z:
        return {i.filename.split("/", 1)[1]: i for i in z.infolist()}


def data_start(raw: bytes | bytearray, info: zipfile.ZipInfo) -> int:
    n, e = struct.unpack_from("<HH", raw, info.header_offset + 26)
    return info.header_offset + 30 + n + e


def repack(path: Path, edit=lambda items: items, data=lambda name, b: b) -> None:
    """Re-write the file with Python's zipfile (no alignment, its own headers): torch still reads such files."""
    with zipfile.ZipFile(path) as z:
        items = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as w:
        for name, b in edit(items):
            w.writestr(name, data(name.split("/", 1)[1], b))


def set_crc(raw: bytearray, info: zipfile.ZipInfo) -> None:
    start = data_start(raw, info)
    crc = zlib.crc32(raw[start:start + info.file_size])
    struct.pack_into("<I", raw, info.header_offset + 14, crc)
    name = info.filename.encode()
    pos = raw.find(b"PK\x01\x02")
    while pos >= 0:
        if raw[pos + 46:pos + 46 + struct.unpack_from("<H", raw, pos + 28)[0]] == name:
            struct.pack_into("<I", raw, pos + 16, crc)
        pos = raw.find(b"PK\x01\x02", pos + 4)


@pytest.mark.parametrize("case", ["zipfile", "reversed", "dup_last", "dup_first", "big", "unknown_order", "no_order",
                                  "short", "long", "missing", "case_decoy", "upper_big_order", "upper_data",
                                  "behind_legacy", "folder_named_with_a_newline"])
def test_zip_records(good: Path, tmp_path: Path, case: str) -> None:
    """torch's zip reader finds records ignoring case: a look-alike of a record (a zero-filled `Data/0` beside
    `data/0`, a `BYTEORDER` saying big) may be what it reads, so such files are refused, never read otherwise.
    torch.load reads a file that does not start with a zip record as a legacy torch.save file, whatever zip
    follows it."""
    p = rank_file(copy(good, tmp_path))
    if case == "zipfile":
        repack(p)
    elif case == "reversed":
        repack(p, lambda items: items[::-1])
    elif case in ("dup_last", "dup_first"):
        def dup(items):
            second = [(n, b"\0" * len(b)) for n, b in items if n.endswith("/data/0")]
            return items + second if case == "dup_last" else second + items
        repack(p, dup)
    elif case in ("big", "unknown_order"):
        repack(p, data=lambda n, b: (b"big" if case == "big" else b"middle") if n == "byteorder" else b)
    elif case == "no_order":
        repack(p, lambda items: [(n, b) for n, b in items if not n.endswith("/byteorder")])
    elif case in ("short", "long"):
        repack(p, data=lambda n, b: (b[:-8] if case == "short" else b + b"\1" * 8) if n == "data/0" else b)
    elif case == "missing":
        repack(p, lambda items: [(n, b) for n, b in items if not n.endswith("/data/1")])
    elif case == "case_decoy":
        repack(p, lambda items: items + [(n.replace("/data/0", "/Data/0"), b"\0" * len(b)) for n, b in items
                                         if n.endswith("/data/0")])
    elif case == "upper_big_order":
        repack(p, lambda items: [(n.replace("/byteorder", "/BYTEORDER"), b"big" if n.endswith("/byteorder") else b)
                                 for n, b in items])
    elif case == "upper_data":
        repack(p, lambda items: [(n.replace("/data/0", "/DATA/0"), b) for n, b in items])
    elif case == "folder_named_with_a_newline":  # the refusal names the record, still on one line
        repack(p, lambda items: items + [(items[0][0].split("/")[0] + "/x\ny/", b"")])
    elif case == "behind_legacy":  # other values in a legacy file, the rank file's zip appended behind it
        with zipfile.ZipFile(p) as z:
            items = [(i.filename, z.read(i)) for i in z.infolist()]
        other = torch.load(p, weights_only=True)
        other["c.bias"] += 1
        torch.save(other, p, _use_new_zipfile_serialization=False)
        with zipfile.ZipFile(p, "a") as w:
            for n, b in items:
                w.writestr(n, b)
    got = differential(p)
    expect = {"zipfile": "same", "reversed": "same", "no_order": "same", "dup_last": "stricter",
              "dup_first": "stricter", "big": "stricter", "case_decoy": "stricter", "upper_big_order": "stricter",
              "upper_data": "stricter", "behind_legacy": "stricter",
              "folder_named_with_a_newline": "stricter"}.get(case, "both refuse")
    assert got == expect


@pytest.mark.parametrize("case", ["extra+8", "name", "signature"])
def test_local_headers(good: Path, tmp_path: Path, case: str) -> None:
    """Bytes come from where the local header says, as torch's reader takes them (or both refuse)."""
    p = rank_file(copy(good, tmp_path))
    raw = bytearray(p.read_bytes())
    info = records(p)["data/0"]
    if case == "extra+8":
        extra = struct.unpack_from("<H", raw, info.header_offset + 28)[0]
        struct.pack_into("<H", raw, info.header_offset + 28, extra + 8)
    elif case == "name":
        raw[info.header_offset + 30 + len(info.filename) - 1] ^= 1
    else:
        raw[info.header_offset] = 0
    p.write_bytes(bytes(raw))
    assert differential(p) == ("both refuse" if case == "signature" else "same")


# ---------------------------------------------------------------- views and storages

def patch_pickle(path: Path, name: str, edit) -> None:
    """Same-length edits of the pickle's operands after `name`'s key (CRC kept right)."""
    raw = bytearray(path.read_bytes())
    info = records(path)["data.pkl"]
    start = data_start(raw, info)
    pkl = bytes(raw[start:start + info.file_size])
    ops = list(pickletools.genops(pkl))
    at = next(i for i, (op, arg, _) in enumerate(ops) if arg == name)
    for offset, value in edit(ops[at:]).items():
        raw[start + offset] = value
    set_crc(raw, info)
    path.write_bytes(bytes(raw))


def view_ops(ops):
    """Positions of the storage key, numel, offset, size and stride operands of a plain 1-D tensor's rebuild."""
    persid = next(i for i, (op, _, _) in enumerate(ops) if op.name == "BINPERSID")
    key = next(pos for op, arg, pos in reversed(ops[:persid]) if op.name == "BINUNICODE")
    numel, offset, size, stride = ops[persid - 2][2], ops[persid + 1][2], ops[persid + 2][2], ops[persid + 5][2]
    return {"key": key + 5, "numel": numel + 1, "offset": offset + 1, "size": size + 1, "stride": stride + 1}


@pytest.mark.parametrize("edit", [{"offset": 1}, {"offset": 255}, {"size": 6}, {"stride": 2}, {"numel": 4},
                                  {"numel": 6}, {"key": ord("9")}, {"key": ord("2")}, {"size": 0, "offset": 255},
                                  {"stride": 0}])
def test_views_and_storages(good: Path, tmp_path: Path, edit: dict) -> None:
    p = rank_file(copy(good, tmp_path))
    patch_pickle(p, "c.bias", lambda ops: {view_ops(ops)[k]: v for k, v in edit.items()})
    got = differential(p)
    if edit.get("key") == ord("2"):  # a storage named with two dtypes: torch takes the first
        assert got == "stricter"
    elif edit in ({"size": 0, "offset": 255}, {"stride": 0}):
        assert got == "same"
    else:
        assert got == "both refuse"


# ---------------------------------------------------------------- many ranks: the byte-compare matcher

def ranks_equal_torch(actor: Path, ws: int = WS) -> ReadStats:
    """Every rank's records from load_ranks (matcher on) read the same bytes as torch.load's tensors."""
    paths = [actor / f"model_world_size_{ws}_rank_{r}.pt" for r in range(ws)]
    stats = ReadStats()
    rs = load_ranks(paths, ws, match_min_records=0, stats=stats, threads=1)
    for k, p in enumerate(paths):
        assert reader_locals(p, {n: rs.record(k, n) for n in rs.names}) == torch_locals(p)
    return stats


@pytest.fixture(scope="module")
def colliding(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tensor names equal to every string the pickle and the matcher's tokens use."""
    names = ["_rank", "_hash", "cuda:0", "cpu", "mesh", "_coordinate_on_dim", "_layout", "_local_tensor", "_spec",
             "placements", "0", "storage", "X\x05\x00\x00\x00_hashK\x07", "h\x07K\x05", "x.weight"]
    g = torch.Generator().manual_seed(1)
    return write_rank_files(tmp_path_factory.mktemp("colliding"),
                            {n: (torch.randn(4, 2, generator=g), [Shard(0)]) for n in names}, (WS,))


def test_names_that_collide_with_tokens(colliding: Path) -> None:
    ranks_equal_torch(colliding)


@pytest.mark.parametrize("name", ["fsdp2_llama_shard1_ws4", "fsdp2_hsdp_llama_2x2"])
def test_matcher_on_gpu_saved_files(verl_fixtures: Path, name: str) -> None:
    """Files saved from GPUs carry the device and a cached hash in every record: matched, and still exact."""
    stats = ranks_equal_torch(verl_fixtures / name, 4)
    assert stats.matched >= 1  # some ranks match (small uneven files differ in more than tokens)


def test_matcher_reads_each_ranks_local_headers(good: Path, tmp_path: Path) -> None:
    actor = copy(good, tmp_path)
    p = rank_file(actor, 1)
    raw = bytearray(p.read_bytes())
    info = records(p)["data/0"]
    struct.pack_into("<H", raw, info.header_offset + 28, struct.unpack_from("<H", raw, info.header_offset + 28)[0] + 8)
    p.write_bytes(bytes(raw))
    assert ranks_equal_torch(actor).matched == 0  # not alike rank 0: decoded in full, from its own headers


def test_matcher_checks_each_ranks_byteorder(good: Path, tmp_path: Path) -> None:
    actor = copy(good, tmp_path)
    p = rank_file(actor, 1)
    raw = bytearray(p.read_bytes())
    info = records(p)["byteorder"]
    start = data_start(raw, info)
    raw[start:start + 6] = b"big\0\0\0"
    set_crc(raw, info)
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="byteorder"):
        load_ranks([rank_file(actor, r) for r in range(WS)], WS, match_min_records=0, threads=1)


# ---------------------------------------------------------------- the folder

def test_two_files_for_one_rank(good: Path, tmp_path: Path) -> None:
    actor = copy(good, tmp_path)
    shutil.copy(rank_file(actor, 1), actor / f"model_world_size_{WS}_rank_01.pt")
    with pytest.raises(CheckpointError, match="two files for rank 1"):
        verl_source(actor)


def test_world_size_from_a_file_name_is_bounded(good: Path, tmp_path: Path) -> None:
    actor = copy(good, tmp_path)
    for r in range(WS):
        rank_file(actor, r).rename(actor / f"model_world_size_30000000_rank_{r}.pt")
    (actor / "fsdp_config.json").unlink()
    with pytest.raises(CheckpointError, match="missing model rank files for rank.* of world size 30000000"):
        verl_source(actor)


@pytest.mark.parametrize("text", ["[2]", '{"world_size": Infinity}', '{"world_size": 2.5}', '{"world_size": "2"}',
                                  "not json", '{"FSDP_version": [2]}'])
def test_malformed_fsdp_config(good: Path, tmp_path: Path, text: str) -> None:
    actor = copy(good, tmp_path)
    (actor / "fsdp_config.json").write_text(text)
    with pytest.raises(CheckpointError, match="fsdp_config.json") as e:
        verl_source(actor)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- differential fuzz

MUTATIONS = st.one_of(
    st.tuples(st.just("directory"), st.integers(0, 10_000), st.integers(1, 255)),  # a byte of the zip's end
    st.tuples(st.just("local"), st.integers(0, 10_000), st.integers(1, 255)),  # a byte of a local header
    st.tuples(st.just("pickle"), st.integers(0, 100_000), st.integers(1, 255)),  # a pickle byte, CRC kept right
    st.tuples(st.just("truncate"), st.integers(0, 100_000), st.just(0)),
    st.tuples(st.just("repack"), st.integers(0, 1000), st.integers(0, 2)),  # zipfile, maybe reordered or one dropped
)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=MUTATIONS)
def test_differential_fuzz(good: Path, tmp_path_factory: pytest.TempPathFactory, mutation: tuple) -> None:
    mutate_and_compare(good, tmp_path_factory, mutation)


def mutate_and_compare(good: Path, tmp_path_factory: pytest.TempPathFactory, mutation: tuple) -> None:
    p = tmp_path_factory.mktemp("fuzz") / rank_file(good).name
    shutil.copy(rank_file(good), p)
    mutate(p, mutation)
    differential(p)


def mutate(p: Path, mutation: tuple) -> None:
    kind, where, value = mutation
    raw = bytearray(p.read_bytes())
    infos = list(records(p).values())
    if kind == "directory":
        cd = raw.find(b"PK\x01\x02")
        raw[cd + where % (len(raw) - cd)] ^= value
    elif kind == "local":
        info = infos[where % len(infos)]
        raw[info.header_offset + (where // len(infos)) % (30 + len(info.filename))] ^= value
    elif kind == "pickle":
        info = infos[0]
        raw[data_start(raw, info) + where % info.file_size] ^= value
        set_crc(raw, info)
    elif kind == "truncate":
        raw = raw[:where % len(raw)]
    p.write_bytes(bytes(raw))
    if kind == "repack":
        def edit(items):
            if value == 1:
                return items[where % len(items):] + items[:where % len(items)]
            if value == 2:
                return items[:where % len(items)] + items[where % len(items) + 1:]
            return items
        repack(p, edit)


# ---------------------------------------------------------------- many ranks, fuzzed

@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=MUTATIONS)
def test_matcher_differential_fuzz(good: Path, tmp_path_factory: pytest.TempPathFactory, mutation: tuple) -> None:
    """Rank 1 mutated, the matcher on: every rank's records read what torch.load reads, or the load refuses."""
    actor = tmp_path_factory.mktemp("fuzz_ranks") / "actor"
    shutil.copytree(good, actor)
    mutate(rank_file(actor, 1), mutation)
    try:
        torch_locals(rank_file(actor, 1))
        torch_ok = True
    except Exception:
        torch_ok = False
    try:
        ranks_equal_torch(actor)
    except StreammergeError as e:
        assert "\n" not in str(e)
        assert not torch_ok or any(s in str(e) for s in STRICTER), f"refused what torch reads: {e}"
        return
    except Exception:
        if torch_ok:
            raise
        return  # torch_locals inside ranks_equal_torch raised: the reader accepted what torch refuses
    assert torch_ok


# ---------------------------------------------------------------- verify reads through torch

def test_verify_reads_the_checkpoint_through_torch(verl_fixtures: Path, tmp_path: Path) -> None:
    """Offsets that move (a re-packed rank file) are followed; bytes that change are caught by torch's reading."""
    from ckpt_tools import copy_actor

    import streammerge

    ckpt = copy_actor(verl_fixtures / "fsdp2_llama_shard1_ws4", tmp_path / "actor")
    out = tmp_path / "out"
    streammerge.merge(ckpt, out, dtype="keep")
    victim = ckpt / "model_world_size_4_rank_2.pt"
    repack(victim)  # same bytes, every record elsewhere: the merge's old offsets would be wrong
    report = streammerge.verify(out, ckpt, chunk_size=4096)
    # the file changed since the merge (its plan fingerprint says so), its tensors did not
    assert [f for f in report.failures if "fingerprint" not in f] == [], report.summary()
    assert report.tensors_checked and not any("independent" in n for n in report.notes)
    again = tmp_path / "again"
    streammerge.merge(ckpt, again, dtype="keep")
    assert [p.read_bytes() for p in sorted(again.glob("*.safetensors"))] == \
        [p.read_bytes() for p in sorted(out.glob("*.safetensors"))]
    biggest = max((n for n in records(victim) if n.startswith("data/")), key=lambda n: records(victim)[n].file_size)
    repack(victim, data=lambda n, b: bytes(x ^ 0x40 for x in b) if n == biggest else b)  # CRCs stay right
    report = streammerge.verify(out, ckpt, chunk_size=4096)
    assert not report.ok
    assert any("model_world_size_4_rank_2.pt" in f and "torch.load" in f for f in report.failures), report.summary()


def test_shared_nested_state_is_walked_once(tmp_path: Path) -> None:
    """A pickle sharing one dict 2**40 times over loads in a blink; walking it naively never ends."""
    from streammerge.optimizer.fsdp import load_optim_file
    from streammerge.sources.verl_oracle import VerlOracle

    nested: dict = {"exp_avg": torch.zeros(2)}
    for _ in range(40):
        nested = {"a": nested, "b": nested}
    path = tmp_path / "optim_world_size_1_rank_0.pt"
    torch.save({"state": {0: nested}, "param_groups": [{"params": [0]}]}, path)
    with pytest.raises(CheckpointError, match="already seen"):
        load_optim_file(path, 0, 1)
    with pytest.raises(CheckpointError, match="already seen"):
        VerlOracle([path], 1).shape("state.0.a.exp_avg")


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.integers(0, 100_000), value=st.integers(1, 255))
def test_matcher_fuzz_on_gpu_saved_pickles(verl_fixtures: Path, tmp_path_factory: pytest.TempPathFactory,
                                           where: int, value: int) -> None:
    """A byte of a GPU-saved rank's pickle changed (CRC kept right), next to device and hash tokens: the
    matched records still read what torch.load reads, or the load refuses."""
    actor = tmp_path_factory.mktemp("fuzz_gpu") / "actor"
    shutil.copytree(verl_fixtures / "fsdp2_llama_shard1_ws4", actor,
                    ignore=shutil.ignore_patterns("optim_*", "extra_*"))
    victim = actor / "model_world_size_4_rank_2.pt"
    mutate(victim, ("pickle", where, value))
    try:
        torch_locals(victim)
        torch_ok = True
    except Exception:
        torch_ok = False
    try:
        ranks_equal_torch(actor, 4)
    except StreammergeError as e:
        assert not torch_ok or any(s in str(e) for s in STRICTER), f"refused what torch reads: {e}"
        return
    except Exception:
        if torch_ok:
            raise
        return
    assert torch_ok


def _build_after(nth_reduce: int, state: bytes):
    """A pickle edit: BUILD with `state` (opcodes pushing one object) on what the last storage's BINPERSID made
    (nth_reduce 0) or the nth REDUCE after it made (2: the tensor's _rebuild_tensor_v2; 1 is its hooks'
    OrderedDict()), right after it is made."""
    def edit(name: str, b: bytes) -> bytes:
        if name != "data.pkl":
            return b
        ops = list(pickletools.genops(b))
        at = max(i for i, (op, _, _) in enumerate(ops) if op.name == "BINPERSID")
        for _ in range(nth_reduce):
            at = next(i for i in range(at + 1, len(ops)) if ops[i][0].name == "REDUCE")
        pos = ops[at + 1][2]
        return b[:pos] + state + b"b" + b[pos:]
    return edit


def _short_unicode(text: str) -> bytes:
    return b"X" + struct.pack("<I", len(text)) + text.encode()


@pytest.mark.parametrize("case", ["storage_key", "tensor_offset"])
def test_state_set_on_a_storage_or_tensor(good: Path, tmp_path: Path, case: str) -> None:
    """BUILD on a storage or a tensor: torch's classes decide (a storage takes a harmless attribute, a tensor refuses
    (None, {'offset': 3})); our records must not take it as a new key or offset, which read other bytes."""
    p = rank_file(copy(good, tmp_path))
    field, value, nth = ("key", _short_unicode("0"), 0) if case == "storage_key" else ("offset", b"K\x03", 2)
    state = b"N}" + _short_unicode(field) + value + b"s\x86"  # (None, {field: value}): slot state
    repack(p, data=_build_after(nth, state))
    assert differential(p) in (("same", "stricter") if case == "storage_key" else ("both refuse",))


def test_a_dtype_where_a_storage_type_belongs(good: Path, tmp_path: Path) -> None:
    """A persistent id naming `torch.float32` instead of `torch.FloatStorage`: torch.load refuses it (a dtype is no
    storage type), so the reader must not take the two alike."""
    p = rank_file(copy(good, tmp_path))
    repack(p, data=lambda n, b: b.replace(b"ctorch\nFloatStorage\n", b"ctorch\nfloat32\n") if n == "data.pkl" else b)
    assert b"ctorch\nfloat32\n" in records_bytes(p)
    assert differential(p) == "both refuse"


def _drop_first_after(key: str, opname: str):
    """A pickle edit: remove the first `opname` opcode (one byte, no operand) after the string `key`."""
    def edit(name: str, b: bytes) -> bytes:
        if name != "data.pkl":
            return b
        ops = list(pickletools.genops(b))
        start = next(i for i, (_, arg, _) in enumerate(ops) if arg == key)
        at = next(pos for op, _, pos in ops[start:] if op.name == opname)
        return b[:at] + b[at + 1:]
    return edit


def test_a_rebuild_call_missing_an_argument(good: Path, tmp_path: Path) -> None:
    """_rebuild_tensor_v2 called without its requires_grad: torch's call fails (backward_hooks missing), so the
    reader must not build a record from the arguments it got."""
    p = rank_file(copy(good, tmp_path))
    repack(p, data=_drop_first_after("c.bias", "NEWFALSE"))
    assert differential(p) == "both refuse"


def test_an_integer_parameter_that_requires_grad(tmp_path: Path) -> None:
    """torch refuses an integer tensor requiring gradients when it rebuilds the Parameter; so must the reader."""
    p = tmp_path / f"model_world_size_{WS}_rank_0.pt"
    torch.save({"x": torch.nn.Parameter(torch.zeros(3, dtype=torch.int32), requires_grad=False), "y": torch.ones(2)},
               p)
    assert differential(p) == "same"

    def grad(name: str, b: bytes) -> bytes:  # the Parameter's requires_grad is the NEWFALSE before its hooks' BINGET
        return b.replace(b"\x89h\x0b)R", b"\x88h\x0b)R", 1) if name == "data.pkl" else b
    repack(p, data=grad)
    assert b"\x88h\x0b)R" in records_bytes(p)
    assert differential(p) == "both refuse"


def records_bytes(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


# ---------------------------------------------------------------- what torch's unpickler would not read alike

def _build_on_global(global_line: bytes, state: bytes):
    """A pickle edit: right after the first GLOBAL `global_line`, BUILD `state` on the global it pushed."""
    def edit(name: str, b: bytes) -> bytes:
        if name != "data.pkl":
            return b
        at = b.index(b"c" + global_line) + 1 + len(global_line)
        return b[:at] + state + b"b" + b[at:]
    return edit


@pytest.mark.parametrize("case", ["as_saved", "records_in_another_order", "storage_named_smaller"])
def test_meta_device_fallback_checks_what_torch_reads(tmp_path: Path, case: str) -> None:
    """A tensor attribute sends the file to torch.load on the meta device, which reads no record (a storage named
    smaller than its record grows to fit its view) and places each storage after the one the pickle names before it
    (records of one size in another order would read each other's bytes)."""
    p = tmp_path / "model_world_size_2_rank_0.pt"
    a = torch.full((4,), 1.0)
    a.note = "x"  # pickled as tensor state: read by torch's unpickler, not the fast decoder
    torch.save({"a": a, "b": torch.full((4,), 2.0), "c": torch.full((4,), 3.0)}, p)
    with zipfile.ZipFile(p) as z:
        items = dict((i.filename.split("/", 1)[1], z.read(i)) for i in z.infolist())
    order = ["data/0", "data/2", "data/1"] if case == "records_in_another_order" else ["data/0", "data/1", "data/2"]
    own = ("version", ".data/version", ".data/serialization_id")  # the writer adds its own
    w = torch._C.PyTorchFileWriter(str(p))
    for name in [n for n in items if not n.startswith("data/") and n not in own] + order:
        w.write_record(name, items[name], len(items[name]))
    w.write_end_of_file()
    if case == "storage_named_smaller":  # b's storage: 2 floats, its record and view 4
        def numel(ops):
            persid = next(i for i, (op, _, _) in enumerate(ops) if op.name == "BINPERSID")
            return {next(pos for op, _, pos in reversed(ops[:persid]) if op.name == "BININT1") + 1: 2}
        patch_pickle(p, "b", numel)
    stats = ReadStats()
    assert differential(p) == {"as_saved": "same", "records_in_another_order": "stricter",
                               "storage_named_smaller": "both refuse"}[case]
    if case == "as_saved":
        load_rank_file(p, 0, WS, stats=stats)
        assert stats.torch_loaded == 1


@pytest.mark.parametrize("case", ["storage_type", "function"])
def test_state_set_on_a_global_changes_no_later_file(good: Path, tmp_path: Path, case: str) -> None:
    """One object per allowlisted global serves every file of the process (watch merges step after step): a BUILD
    on it (torch refuses BUILD on a class or function) must not change how the next, clean file reads."""
    p = rank_file(copy(good, tmp_path / "bad"))
    if case == "storage_type":  # FloatStorage read as int32 from then on: same size, other values
        line, state = b"torch\nFloatStorage\n", b"}" + _short_unicode("dtype") + b"ctorch\nint32\n" + b"s"
    else:  # _rebuild_tensor_v2's default metadata, through slot state (None, {"__defaults__": ("neg",)})
        line = b"torch._utils\n_rebuild_tensor_v2\n"
        state = b"N}" + _short_unicode("__defaults__") + b"(" + _short_unicode("neg") + b"ts\x86"
    rewrite_with_torch(p, _build_on_global(line, state))
    assert differential(p) == "both refuse"
    clean, stats = rank_file(copy(good, tmp_path / "clean")), ReadStats()
    assert differential(clean) == "same"
    load_rank_file(clean, 0, WS, stats=stats)
    assert stats.decoded == 1, stats.describe()  # the fast decoder still takes a clean file


@pytest.mark.parametrize("case", ["protocol_4", "memo_index"])
def test_opcodes_torch_does_not_read(good: Path, tmp_path: Path, case: str) -> None:
    """The C unpickler reads every protocol and sizes its memo by the largest index named; torch reads protocol 2's
    opcodes and keeps a dict. Either kind of file goes to torch.load, which refuses the one and reads the other."""
    p = rank_file(copy(good, tmp_path))
    if case == "protocol_4":  # SHORT_BINUNICODE for a key: same meaning, an opcode torch's unpickler refuses
        old, new = _short_unicode("c.bias"), b"\x8c\x06c.bias"
    else:  # a memo index of 2**24 (PUT): 256 MB of C memo, from 5 bytes
        old = b"ccollections\nOrderedDict\n"
        new = old + b"r\x00\x00\x00\x01"
    rewrite_with_torch(p, lambda n, b: b.replace(old, new, 1) if n == "data.pkl" else b)
    assert new in records_bytes(p)
    stats = ReadStats()
    if case == "protocol_4":
        assert differential(p) == "both refuse"
        with pytest.raises(CheckpointError, match="opcode torch.save never writes"):
            load_rank_file(p, 0, WS)
    else:
        assert differential(p) == "same"
        load_rank_file(p, 0, WS, stats=stats)
        assert stats.torch_loaded == 1 and stats.decoded == 0


@pytest.mark.parametrize("numel, size, expect", [(9, 5, "both refuse"), (10, 5, "same"), (10, 4, "same")])
def test_an_untyped_storage_of_another_size(tmp_path: Path, numel: int, size: int, expect: str) -> None:
    """A uint16 tensor's untyped storage (10 bytes as saved) named with `numel` bytes and viewed as `size` elements:
    torch.load refuses a storage whose record is another size, read on its meta-device fallback or not."""
    p = tmp_path / "model_world_size_2_rank_0.pt"
    torch.save({"u16": torch.arange(5).to(torch.uint16)}, p)

    def edit(name: str, b: bytes) -> bytes:
        if name != "data.pkl":
            return b
        at = {arg: pos for op, arg, pos in pickletools.genops(b) if op.name == "BININT1"}
        b = b[:at[10] + 1] + bytes([numel]) + b[at[10] + 2:]
        return b[:at[5] + 1] + bytes([size]) + b[at[5] + 2:]
    rewrite_with_torch(p, edit)
    assert differential(p) == expect


@pytest.mark.parametrize("case", ["shape", "stride", "numel", "device"])
def test_dtensor_arguments_torch_refuses(good: Path, tmp_path: Path, case: str) -> None:
    """torch takes a DTensor's shape and stride as C int64s, counts its elements in one, and takes its device as a
    torch.device: it refuses a file with a larger number, or a torch.Size (a tuple, as a device's arguments are)
    where the device belongs."""
    p = rank_file(copy(good, tmp_path))
    old = {"shape": b"K\x06K\x04\x86", "stride": b"K\x04K\x01\x86", "numel": b"K\x06K\x04\x86",
           "device": b"ctorch\ndevice\n"}[case]
    big = b"\x8a\x09" + (2 ** 63).to_bytes(9, "little", signed=True) + old[2:]  # a.weight's global (6, 4) or (4, 1)
    if case == "numel":  # (2**62, 4): each a C int64, 2**64 elements
        big = b"\x8a\x08" + (2 ** 62).to_bytes(8, "little", signed=True) + old[2:]
    new = b"ctorch\nSize\n" if case == "device" else big
    rewrite_with_torch(p, lambda n, b: b.replace(old, new, 1) if n == "data.pkl" else b)
    assert new in records_bytes(p)
    assert differential(p) == "both refuse"


def test_opcode_allowlist_is_torchs() -> None:
    """Every opcode byte: refused by our walk exactly where torch's weights-only unpickler says it is unsupported."""
    from torch import _weights_only_unpickler as wou

    from streammerge.sources.picklescan import beyond_torch

    for c in range(256):
        data = b"\x80\x02" + bytes([c]) + b"\x00" * 16 + b"."
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # protocol numbers other than 2
                wou.Unpickler(io.BytesIO(data)).load()
            torch_refuses = False
        except Exception as e:
            torch_refuses = f"Unsupported operand {c}" in str(e)
        ours = beyond_torch(data)
        assert (ours == f"pickle opcode {bytes([c])!r}, which torch's weights-only unpickler does not read") \
            == torch_refuses, c


def test_the_opcode_walk_keeps_nothing_per_opcode() -> None:
    """A million of one small opcode (2 MB, a list of ints): the walk before the C unpickler reads a rank file's,
    a .metadata's or a common state's pickle in bounded memory (the regex engine kept state for every repeat of a
    match: ~60 bytes an opcode, gigabytes for a data.pkl of 100 MB)."""
    import tracemalloc

    from streammerge.sources.picklescan import beyond_torch, oversized_memo

    data = b"\x80\x02](" + b"K\x01" * 1_000_000 + b"e."
    tracemalloc.start()
    try:
        assert beyond_torch(data) is None and oversized_memo(data) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("bit", ["neg", "conj"])
def test_a_tensor_saved_with_its_negative_or_conjugate_bit(tmp_path: Path, bit: str) -> None:
    """torch.save keeps a lazy negation or conjugation as metadata: the stored bytes are not the values. Refused
    in one line (the fast decoder declines the metadata; torch.load's tensor has the bit)."""
    t = torch.arange(6.0).reshape(2, 3)
    lazy = torch._neg_view(t) if bit == "neg" else torch.complex(t, t).conj()
    p = tmp_path / f"model_world_size_{WS}_rank_0.pt"
    torch.save({"a": lazy, "b": torch.ones(2)}, p)
    with pytest.raises(StreammergeError, match=("negative" if bit == "neg" else "conjugate") + " bit") as e:
        load_rank_file(p, 0, WS)
    assert "\n" not in str(e.value)


def test_data_version_record_comes_first(good: Path, tmp_path: Path) -> None:
    """torch's reader takes `.data/version` where a file has it, `version` only where not."""
    for data_version, version, want in ((b"99\n", b"3\n", "both refuse"), (b"3\n", b"99\n", "same")):
        p = rank_file(copy(good, tmp_path / version.decode().strip()))
        prefix = p.stem + "/"
        repack(p, edit=lambda items: [(n, b) for n, b in items if not n.endswith("version")]  # noqa: B023
               + [(prefix + "version", version), (prefix + ".data/version", data_version)])  # noqa: B023
        assert differential(p) == want


@pytest.mark.parametrize("value", ["list", "int_key", "bytes"])
def test_entries_that_are_no_tensor(tmp_path: Path, value: str) -> None:
    """A list of tensors or a tensor under a number is refused (no name to give it); anything holding no tensor is
    left out and named in the summary."""
    t = torch.ones(2, 3)
    extra = {"list": {"c": [t * 2]}, "int_key": {3: t * 3}, "bytes": {"_extra_state": b"fp8 scales"}}[value]
    p = tmp_path / f"model_world_size_{WS}_rank_0.pt"
    torch.save({"a": t, **extra}, p)
    stats = ReadStats()
    if value == "bytes":
        assert set(load_rank_file(p, 0, WS, stats=stats).tensors) == {"a"}
        assert "left out (not tensors): '_extra_state'" in stats.describe()
    else:
        with pytest.raises(CheckpointError, match="holds tensors inside a list" if value == "list" else "int key 3"):
            load_rank_file(p, 0, WS, stats=stats)


def _point_data_pkl_at_a_second_copy(path: Path, edit) -> None:
    """Insert a second data.pkl record (edit(data.pkl), same length) after the first, padded so every later record
    moves by a multiple of 64, and point the directory's data.pkl entry at it, where torch's reader looks."""
    raw = bytearray(path.read_bytes())
    info = records(path)
    pkl_info = info["data.pkl"]
    start = data_start(raw, pkl_info)
    pkl = bytes(raw[start:start + pkl_info.file_size])
    new = edit(pkl)
    name = pkl_info.filename.encode()
    pad = -(30 + len(name) + 4 + len(new)) % 64
    extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
    block = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, zlib.crc32(new), len(new), len(new), len(name),
                        len(extra)) + name + extra + new
    at, shift = start + len(pkl), len(block)
    out = raw[:at] + block + raw[at:]
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    cd = out.find(b"PK\x01\x02", at + shift)
    for i, zi in enumerate(infos):  # central entries in order: data.pkl first
        assert out[cd:cd + 4] == b"PK\x01\x02"
        if i == 0:
            struct.pack_into("<II", out, cd + 16, zlib.crc32(new), len(new))
            struct.pack_into("<I", out, cd + 42, at)
        else:
            struct.pack_into("<I", out, cd + 42, zi.header_offset + shift)
        n, e, c = struct.unpack_from("<HHH", out, cd + 28)
        cd += 46 + n + e + c
    for sig, off in ((b"PK\x05\x06", 16), (b"PK\x06\x06", 48)):
        pos = out.rfind(sig)
        if pos >= 0:
            fmt = "<I" if off == 16 else "<Q"
            old = struct.unpack_from(fmt, out, pos + off)[0]
            if old not in (0xFFFFFFFF,):
                struct.pack_into(fmt, out, pos + off, old + shift)
    loc = out.rfind(b"PK\x06\x07")
    if loc >= 0:
        struct.pack_into("<Q", out, loc + 8, struct.unpack_from("<Q", out, loc + 8)[0] + shift)
    path.write_bytes(bytes(out))


def test_matcher_reads_data_pkl_where_the_directory_points(tmp_path: Path) -> None:
    """A rank file with two data.pkl records, the directory naming the second (two tensors' storages swapped):
    torch reads the second, and so must a rank the matcher proves alike rank 0."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    actor = write_rank_files(tmp_path / "actor", {"a.weight": (a, [Shard(0)]), "b.weight": (b, [Shard(0)]),
                                                  "c.weight": (a + b, [Shard(0)])}, (WS,))
    from streammerge.sources import torchpickle

    def swap(pkl: bytes) -> bytes:
        obj = torchpickle.decode(pkl)
        ka, kb = (obj[n].state["_local_tensor"].storage.key.encode() for n in ("a.weight", "b.weight"))
        other = {ka: kb, kb: ka}
        pattern = re.compile(rb"X\x01\x00\x00\x00(.)(q.X\x03\x00\x00\x00cpu)", re.S)  # a key, then its location
        out = pattern.sub(lambda m: b"X\x01\x00\x00\x00" + other.get(m.group(1), m.group(1)) + m.group(2), pkl)
        assert out != pkl and len(out) == len(pkl)
        return out
    _point_data_pkl_at_a_second_copy(rank_file(actor, 1), swap)
    local = torch.load(rank_file(actor, 1), map_location="cpu", weights_only=True)["a.weight"]._local_tensor
    assert torch.equal(local, b[3:])  # torch reads the second pickle
    ranks_equal_torch(actor)


@pytest.mark.parametrize("what", ["broken_link", "config_folder"])
def test_a_rank_file_or_fsdp_config_that_is_no_file(good: Path, tmp_path: Path, what: str) -> None:
    actor = copy(good, tmp_path)
    if what == "broken_link":
        rank_file(actor, 1).unlink()
        rank_file(actor, 1).symlink_to(tmp_path / "gone.pt")
        with pytest.raises(CheckpointError, match="a link to nothing"):
            verl_source(actor)
    else:
        (actor / "fsdp_config.json").unlink(missing_ok=True)
        (actor / "fsdp_config.json").mkdir()
        with pytest.raises(CheckpointError, match="fsdp_config.json: not a file"):
            verl_source(actor)


def _first_after(marker: bytes, old: bytes, new: bytes):
    """An edit of data.pkl: the first `old` after `marker` becomes `new`."""
    def edit(name: str, b: bytes) -> bytes:
        if name != "data.pkl":
            return b
        i = b.index(old, b.index(marker))
        return b[:i] + new + b[i + len(old):]
    return edit


def _shard_state(state: bytes):
    shard = rb"ctorch.distributed.tensor.placement_types\nShard\n(q.)\)\x81(q.)\}(q.)X\x03\x00\x00\x00dim(q.)K\x00sb"

    def edit(name: str, b: bytes) -> bytes:
        m = re.search(shard, b, re.S) if name == "data.pkl" else None
        if m is None:
            return b
        return (b[:m.start()] + b"ctorch.distributed.tensor.placement_types\nShard\n" + m.group(1) + b")\x81"
                + m.group(2) + state + b"b" + b[m.end():])
    return edit


def _text(s: bytes) -> bytes:
    return b"X" + len(s).to_bytes(4, "little") + s


TORCH_REFUSES = {
    # found by a differential fuzz campaign (43,000 mutants): each merged with exit code 0 although torch.load refuses
    "dtensor_global_of_another_module": lambda n, b: b.replace(b"ctorch.distributed.tensor\nDTensor\n",
                                                               b"ctorch.distributed.tensor._api\nDTensor\n"),
    "requires_grad_int": _first_after(b"c.bias", b"\x89", b"K\x00"),
    "dtensor_requires_grad_none": _first_after(b"ctorch\ndevice\n", b"\x89", b"N"),
    "device_leading_zero": _first_after(b"ctorch\ndevice\n", _text(b"cpu"), _text(b"cpu:01")),
    "shard_dim_text": _shard_state(b"}" + _text(b"dim") + _text(b"0") + b"s"),
    "shard_state_slots": _shard_state(b"N}" + _text(b"dim") + b"K\x00s\x86"),
    "storage_size_bool": _first_after(b"c.bias", b"K\x05t", b"\x88t"),
}


@pytest.mark.parametrize("case", sorted(TORCH_REFUSES))
def test_what_torch_refuses_to_rebuild_is_refused(good: Path, tmp_path: Path, case: str) -> None:
    p = rank_file(copy(good, tmp_path))
    before = records_bytes(p)
    rewrite_with_torch(p, TORCH_REFUSES[case])
    assert records_bytes(p) != before
    assert differential(p) == "both refuse"


def test_what_torch_reads_leniently_is_left_to_torch(good: Path, tmp_path: Path) -> None:
    """A plain tensor's requires_grad None: torch takes it (only a DTensor's must be a bool); the fast reader sends
    what is not true or false to torch's own reading, which decides."""
    p = rank_file(copy(good, tmp_path))
    rewrite_with_torch(p, _first_after(b"c.bias", b"\x89", b"N"))
    assert differential(p) == "same"


def test_a_torchscript_archive_is_refused(good: Path, tmp_path: Path) -> None:
    """torch.load(weights_only=True) refuses any zip holding constants.pkl (TorchScript's); the reader ignored it."""
    p = rank_file(copy(good, tmp_path))
    repack(p, edit=lambda items: [*items, (items[0][0].split("/", 1)[0] + "/constants.pkl", b"\x80\x02).")])
    assert differential(p) == "both refuse"
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        load_rank_file(p, 0, WS)


def test_a_float8_tensor_saved_requiring_grad(tmp_path: Path) -> None:
    """torch.save writes it, torch.load refuses it (a float8 tensor is rebuilt in place): so does the reader."""
    p = tmp_path / f"model_world_size_{WS}_rank_0.pt"
    torch.save({"w": torch.zeros(2, 4).to(torch.float8_e4m3fn).requires_grad_(True)}, p)
    assert differential(p) == "both refuse"


def test_a_spec_whose_mesh_is_no_mesh_is_decoded_in_full(tmp_path: Path) -> None:
    """torch.load reads a DTensor whose spec names another memoised object (a tuple) as its mesh; the rank-set matcher
    died there (AttributeError, an internal error): it now leaves such a file to the full decode."""
    g = torch.Generator().manual_seed(0)
    actor = write_rank_files(tmp_path / "actor", {f"t{i}.weight": (torch.randn(2, 2, generator=g), [Shard(0)])
                                                  for i in range(3)}, (WS,))

    def mesh_to_tuple(name: str, b: bytes) -> bytes:
        if name != "data.pkl":
            return b
        ops = list(pickletools.genops(b))
        tuple_memo = next(ops[i + 1][1] for i in range(len(ops) - 1)
                          if ops[i][0].name == "TUPLE2" and ops[i + 1][0].name == "BINPUT")
        mesh_key = next(ops[i + 1][1] for i in range(len(ops) - 1) if ops[i][1] == "mesh")
        first = next(i for i in range(len(ops) - 1) if ops[i][0].name == "BINGET" and ops[i][1] == mesh_key)
        pos = ops[first + 1][2]  # the BINGET of the mesh right after the 'mesh' key, in the second spec
        return b[:pos + 1] + bytes([tuple_memo]) + b[pos + 2:]

    rewrite_with_torch(rank_file(actor), mesh_to_tuple)
    torch_locals(rank_file(actor))  # torch reads it
    stats = ranks_equal_torch(actor)
    assert any("something other than a device mesh" in why for why in stats.fallbacks), stats.fallbacks


def _int_storage_key(name: str, b: bytes) -> bytes:
    """c.bias's storage key as the int torch formats into its record name (data/{key}), not the text torch.save
    writes."""
    if name != "data.pkl":
        return b
    m = re.compile(rb"X\x01\x00\x00\x00([0-9])").search(b, b.index(b"c.bias"))
    assert m is not None
    return b[:m.start()] + b"K" + bytes([int(m.group(1))]) + b[m.end():]


TORCH_READS = {
    "pickle_protocol_6": lambda n, b: b"\x80\x06" + b[2:] if n == "data.pkl" else b,
    "integer_storage_key": _int_storage_key,
}


@pytest.mark.parametrize("case", sorted(TORCH_READS))
def test_what_torch_reads_is_read_alike(good: Path, tmp_path: Path, case: str) -> None:
    """Found by the fuzz campaign as refusals stricter than torch's, each with a misleading message: torch's reader
    parses the version's leading digits, takes any pickle protocol number, and names a storage's record data/{key}
    whatever the key's type."""
    p = rank_file(copy(good, tmp_path))
    before = records_bytes(p)
    rewrite_with_torch(p, TORCH_READS[case])
    assert records_bytes(p) != before
    assert differential(p) == "same"


@pytest.mark.parametrize("version, expect", [(b"3.0", "same"), (b" 3\n", "same"), (b"3x", "same"),
                                             (b"x3", "both refuse"), (b"0x3", "both refuse"), (b"-3", "both refuse")])
def test_the_version_is_parsed_as_torch_parses_it(good: Path, tmp_path: Path, version: bytes, expect: str) -> None:
    p = rank_file(copy(good, tmp_path))
    repack(p, data=lambda name, b: version if name in ("version", ".data/version") else b)
    assert differential(p) == expect


def test_a_size_torch_cannot_build_is_left_to_torch(good: Path, tmp_path: Path) -> None:
    """A DTensor spec's TensorMeta shape torch.Size((6, 'x')): torch.Size refuses a string; the fast reader built it
    (the merge reads the shape elsewhere, so the file merged)."""
    p = rank_file(copy(good, tmp_path))
    rewrite_with_torch(p, _first_after(b"ctorch\nSize\n", b"K\x04", _text(b"x")))
    assert differential(p) == "both refuse"
