"""torch DCP folders against torch itself: real checkpoints saved by `dcp.save` (FSDP2 on 2, 3 and 4 gloo
CPU processes, HSDP, Shard(1), uneven and empty shards; one-process saves of every dtype and view),
every tensor assembled from the reader's pieces with positioned reads and compared bit for bit with
`dcp_to_torch_save`; damaged copies must raise a clear one-line error or still agree; then merges
(keys, optimizer export, transformers loading, verify, torchrun) of a real FSDP2-trained Qwen2.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import streammerge
from streammerge.cli import main
from streammerge.errors import CheckpointError, ConfigError, UnsupportedLayoutError
from streammerge.sources import dcpmeta, open_checkpoint, torchpickle
from streammerge.sources.base import SourceTensor
from streammerge.sources.dcp import DcpCheckpoint, DcpSource, read_dcp
from streammerge.sources.dcp_oracle import load_metadata
from streammerge.testing.dcp_cases import CASES, make_cases
from streammerge.testing.synthetic import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> Path:
    return make_cases(tmp_path_factory.mktemp("dcp_cases"))


@pytest.fixture(scope="session")
def qwen_dcp(tmp_path_factory) -> Path:
    """A tiny Qwen2 (tied embeddings) trained 2 steps with FSDP2 on 3 ranks, saved by dcp.save as a trainer does."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen_dcp"), arch="qwen2", world_size=3, tie_word_embeddings=True,
                           save_format="dcp")


# ---------------------------------------------------------------- comparing

def assemble(t: SourceTensor) -> np.ndarray:
    """The global tensor as raw items (numpy void dtype), from the pieces with positioned reads only."""
    itemsize = t.dtype.itemsize
    vd = np.dtype(f"V{itemsize}")
    out = np.zeros(t.shape, dtype=vd)
    seen = np.zeros(t.shape, dtype=np.int32)
    for p in t.pieces:
        span = (sum((n - 1) * s for n, s in zip(p.shape, p.stride)) + 1) * itemsize
        fd = os.open(p.file, os.O_RDONLY)
        try:
            buf = os.pread(fd, span, p.offset)
        finally:
            os.close(fd)
        assert len(buf) == span
        src = np.lib.stride_tricks.as_strided(np.frombuffer(buf, dtype=vd), shape=p.shape,
                                              strides=tuple(s * itemsize for s in p.stride))
        box = tuple(slice(o, o + n) for o, n in zip(p.start, p.shape))
        out[box] = src
        seen[box] += 1
    assert (seen == 1).all(), f"{t.name}: pieces do not tile the tensor exactly once"
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def flat_reference(folder: Path, ck: DcpCheckpoint) -> dict:
    """torch's own answer (dcp_to_torch_save), flattened with the planner's key paths."""
    ref = torch.load(str(folder) + ".pt", weights_only=False)
    mapping = ck.meta.planner_data or {k: (k,) for k in ref}
    out = {}
    for fqn, path in mapping.items():
        obj = ref
        for k in path:
            obj = obj[k]
        out[fqn] = obj
    return out


def check_against_torch(folder: Path, ck: DcpCheckpoint | None = None) -> DcpCheckpoint:
    ck = ck or read_dcp(folder)
    ref = flat_reference(folder, ck)
    assert set(ck.tensors) | set(ck.bytes_items) == set(ref)
    for name, t in ck.tensors.items():
        r = ref[name]
        assert isinstance(r, torch.Tensor), name
        assert str(r.dtype) == str(t.dtype) and tuple(r.shape) == t.shape, name
        assert assemble(t).tobytes() == raw(r), f"{folder.name}: {name} differs from torch"
    for name, (file, offset, length) in ck.bytes_items.items():
        with open(file, "rb") as f:
            f.seek(offset)
            blob = f.read(length)
        assert torch.load(io.BytesIO(blob), weights_only=False) == ref[name], name
    return ck


# ---------------------------------------------------------------- the reader on real checkpoints

@pytest.mark.parametrize("name", CASES)
def test_bit_for_bit_with_dcp_to_torch_save(ckpts: Path, name: str) -> None:
    ck = check_against_torch(ckpts / name)
    assert ck.tensors and all(os.path.isabs(p.file) and p.file.startswith(str(ckpts))
                              for t in ck.tensors.values() for p in t.pieces)
    assert ck.meta.extras["storage_meta"]["save_id"]


def test_expected_layouts(ckpts: Path) -> None:
    single = read_dcp(ckpts / "single")
    assert single.tensors["transposed"].pieces[0].stride == (1, 8)  # kept non-contiguous
    assert single.tensors["scalar"].shape == () and single.tensors["scalar"].pieces[0].shape == ()
    assert single.tensors["empty"].pieces == ()
    assert single.tensors["nested.a.b"].dtype.name == "int64" and single.tensors["f8"].dtype.name == "float8_e4m3fn"
    assert {"lr", "name", "cfg.layers", "nested.lst.1"} <= set(single.bytes_items)
    assert single.read_object("cfg.tags") == ["a", "b"] and single.read_object("lr") == 0.25

    w3 = read_dcp(ckpts / "w3_trainer")
    emb = w3.tensors["model.model.embed_tokens.weight"]
    assert emb.shape == (11, 6) and [p.shape for p in emb.pieces] == [(4, 6), (4, 6), (3, 6)]
    assert sorted(p.rank for p in emb.pieces) == [0, 1, 2]
    assert "optimizer.state.model.layers.0.mlp.up_proj.weight.exp_avg" in w3.tensors
    assert w3.tensors["model.model.layers.1.mlp.up_proj.weight"].dtype.name == "bfloat16"
    assert w3.tensors["model.step_count"].shape == () and len(w3.tensors["model.step_count"].pieces) == 1

    s1 = read_dcp(ckpts / "w3_shard1")
    q = s1.tensors["model.model.layers.0.self_attn.q_proj.weight"]
    assert sorted(p.start for p in q.pieces) == [(0, 0), (0, 2), (0, 4)]  # Shard(1)
    assert [p.shape for p in s1.tensors["extra.cols_uneven"].pieces] == [(5, 3), (5, 3), (5, 1)]
    assert [p.shape for p in s1.tensors["extra.tiny"].pieces] == [(1,)]  # the empty shards hold nothing

    hsdp = read_dcp(ckpts / "w4_hsdp")
    assert len(hsdp.tensors["grid01"].pieces) == 4
    assert len(hsdp.tensors["model.model.embed_tokens.weight"].pieces) == 2  # replicas written once by DCP


def test_reading_and_merging_never_import_torch(ckpts: Path, tmp_path: Path) -> None:
    code = ("import sys, streammerge; from streammerge.sources import open_checkpoint; "
            "src = open_checkpoint(sys.argv[1]); "
            "r = streammerge.merge(src, sys.argv[2], dtype='bfloat16', weights_only=True); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(r.files))")
    out = subprocess.run([sys.executable, "-c", code, str(ckpts / "w3_trainer"), str(tmp_path / "out")],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0 and int(out.stdout) >= 2, out.stderr


class _Anything:
    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _Recorder(pickle.Unpickler):
    """Lists the globals a pickle names; every one resolves to an inert stand-in."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.seen: set[tuple[str, str]] = set()

    def find_class(self, module, name):
        self.seen.add((module, name))
        return _Anything

    def persistent_load(self, pid):
        return None


def _globals_named(data: bytes) -> set[tuple[str, str]]:
    r = _Recorder(data)
    r.load()
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    assert not ops & {"INST", "OBJ", "EXT1", "EXT2", "EXT4"}, ops
    return r.seen


def test_allowlist_covers_what_real_files_name(ckpts: Path) -> None:
    """Every global in every real .metadata and tensor blob is on an allowlist (Megatron's files included)."""
    meta_globals, blob_globals = set(), set()
    folders = [ckpts / n for n in CASES] + [p.parent for p in (ROOT / "tests/data/megatron").rglob(".metadata")]
    for folder in folders:
        meta_globals |= _globals_named((folder / ".metadata").read_bytes())
        ck = read_dcp(folder)
        md = pickle.loads((folder / ".metadata").read_bytes())
        for idx, info in md.storage_data.items():
            if idx.fqn in ck.tensors:
                with open(folder / info.relative_path, "rb") as f:
                    f.seek(info.offset)
                    z = zipfile.ZipFile(io.BytesIO(f.read(info.length)))
                blob_globals |= _globals_named(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
    dtypes_named = {("torch", n) for n in dcpmeta._DTYPES} | {("torch", n) for n in torchpickle._STORAGES}
    assert meta_globals <= set(dcpmeta._GLOBALS) | dtypes_named, meta_globals - set(dcpmeta._GLOBALS)
    assert blob_globals <= set(torchpickle._GLOBALS) | dtypes_named, blob_globals
    assert ("torch.distributed.checkpoint.filesystem", "_StorageInfo") in meta_globals
    assert ("torch.distributed.checkpoint.planner", "SavePlan") in meta_globals  # Megatron's all_local_plans
    assert ("torch._utils", "_rebuild_tensor_v3") in blob_globals  # float8 / uint16


def test_blob_format_facts(ckpts: Path) -> None:
    """What the reader relies on, seen in real files: one zip per item at _StorageInfo.offset, offsets
    relative to the blob, 64-byte aligned within the blob (not the file), byte items first."""
    folder = ckpts / "w2_trainer"
    md = pickle.loads((folder / ".metadata").read_bytes())
    ck = read_dcp(folder)
    by_file: dict[str, list] = {}
    for idx, info in md.storage_data.items():
        by_file.setdefault(info.relative_path, []).append(info)
        with open(folder / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        assert blob[:4] == b"PK\x03\x04" and blob[-22:-18] == b"PK\x05\x06" and b"PK\x06\x06" in blob[-120:]
        if idx.fqn in ck.tensors:
            z = zipfile.ZipFile(io.BytesIO(blob))
            rec = next(i for i in z.infolist() if "/data/" in i.filename)
            nlen, elen = struct.unpack_from("<HH", blob, rec.header_offset + 26)
            assert (rec.header_offset + 30 + nlen + elen) % 64 == 0
    kinds = {(info.relative_path, info.offset): idx.fqn in ck.bytes_items for idx, info in md.storage_data.items()}
    for infos in by_file.values():  # items are concatenated with no gaps, byte items first
        infos.sort(key=lambda i: i.offset)
        assert infos[0].offset == 0
        assert all(a.offset + a.length == b.offset for a, b in zip(infos, infos[1:]))
        assert os.path.getsize(folder / infos[0].relative_path) == infos[-1].offset + infos[-1].length
        is_bytes = [kinds[(i.relative_path, i.offset)] for i in infos]
        assert is_bytes == sorted(is_bytes, reverse=True)
    assert any(p.offset % 64 for t in ck.tensors.values() for p in t.pieces)  # aligned in the blob only


# ---------------------------------------------------------------- damaged and refused checkpoints

def _copy(ckpts: Path, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(ckpts / name, dst)
    shutil.copy(str(ckpts / name) + ".pt", str(dst) + ".pt")
    return dst


def _edit_metadata(folder: Path, fn) -> None:
    md = pickle.loads((folder / ".metadata").read_bytes())
    fn(md)
    (folder / ".metadata").write_bytes(pickle.dumps(md))


def _entry(md, fqn: str):
    return next((k, v) for k, v in md.storage_data.items() if k.fqn == fqn)


def test_truncated_file(ckpts: Path, tmp_path: Path) -> None:
    folder = _copy(ckpts, "w2_trainer", tmp_path)
    f = folder / "__1_0.distcp"
    for cut in (1, f.stat().st_size // 2):
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size - cut)
        with pytest.raises(CheckpointError, match=r"__1_0\.distcp: .*runs past the end"):
            read_dcp(folder)


def test_missing_file(ckpts: Path, tmp_path: Path) -> None:
    folder = _copy(ckpts, "w2_model", tmp_path)
    (folder / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: cannot read"):
        read_dcp(folder)


def test_a_data_file_that_is_a_pipe(ckpts: Path, tmp_path: Path) -> None:
    """A pipe's size is 0: it is named as not a file, not as a "0-byte file" an item runs past."""
    folder = _copy(ckpts, "tiny", tmp_path)
    (folder / "__0_0.distcp").unlink()
    os.mkfifo(folder / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: not a file \(a pipe"):
        read_dcp(folder)


def test_a_megatron_metadata_json_that_is_a_pipe(ckpts: Path, tmp_path: Path) -> None:
    """Not taken for a plain DCP folder without Megatron-Core's marker, nor read (a pipe waits for a writer)."""
    folder = _copy(ckpts, "tiny", tmp_path)
    os.mkfifo(folder / "metadata.json")
    with pytest.raises(CheckpointError, match=r"metadata\.json: not a file \(a pipe"):
        open_checkpoint(folder)


def test_metadata_points_outside_file(ckpts: Path, tmp_path: Path) -> None:
    folder = _copy(ckpts, "tiny", tmp_path)
    size = (folder / "__0_0.distcp").stat().st_size
    _edit_metadata(folder, lambda md: setattr(_entry(md, "w")[1], "offset", size - 10))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: item 'w' .*runs past the end"):
        read_dcp(folder)


def test_metadata_path_escape(ckpts: Path, tmp_path: Path) -> None:
    folder = _copy(ckpts, "tiny", tmp_path)
    _edit_metadata(folder, lambda md: setattr(_entry(md, "w")[1], "relative_path", "../tiny/__0_0.distcp"))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        read_dcp(folder)


def test_two_items_share_bytes(ckpts: Path, tmp_path: Path) -> None:
    folder = _copy(ckpts, "w2_model", tmp_path)

    def fn(md):
        a = _entry(md, "model.norm.weight")[1]
        b = _entry(md, "model.norm.bias")[1]
        b.relative_path, b.offset, b.length = a.relative_path, a.offset, a.length
    _edit_metadata(folder, fn)
    with pytest.raises(CheckpointError, match="overlap in the file"):
        read_dcp(folder)


def test_metadata_points_at_other_blob(ckpts: Path, tmp_path: Path) -> None:
    folder = _copy(ckpts, "w2_model", tmp_path)

    def fn(md):  # a weight's entry moved onto a bias blob of the same rank, the bias entry onto the weight's
        w = [v for k, v in md.storage_data.items() if k.fqn == "model.layers.0.self_attn.q_proj.weight"][0]
        b = [v for k, v in md.storage_data.items() if k.fqn == "model.layers.0.self_attn.q_proj.bias"
             and v.relative_path == w.relative_path][0]
        (w.offset, w.length), (b.offset, b.length) = (b.offset, b.length), (w.offset, w.length)
    _edit_metadata(folder, fn)
    with pytest.raises(CheckpointError, match=r"stored shape .* but \.metadata says chunk sizes"):
        read_dcp(folder)


EMB = "model.embed_tokens.weight"


def test_chunks_must_tile(ckpts: Path, tmp_path: Path) -> None:
    for i, (change, msg) in enumerate([
            (lambda c: c.pop(), "gap or overlap"),  # a missing chunk
            (lambda c: c.append(c[0]), "gap or overlap"),  # a chunk twice
            (lambda c: setattr(c[0], "sizes", torch.Size([c[0].sizes[0] + 1, c[0].sizes[1]])), "gap or overlap"),
            (lambda c: setattr(c[-1], "sizes", torch.Size([c[-1].sizes[0] + 1, c[-1].sizes[1]])), "runs past"),
    ]):
        folder = _copy(ckpts, "w3_model", tmp_path / str(i))
        _edit_metadata(folder, lambda md, change=change: change(md.state_dict_metadata[EMB].chunks))
        with pytest.raises(CheckpointError, match=msg):
            read_dcp(folder)
    folder = _copy(ckpts, "w3_model", tmp_path / "moved")  # same volume, one chunk moved onto another

    def move(md):
        chunks = md.state_dict_metadata["model.layers.0.self_attn.q_proj.bias"].chunks
        chunks[1].offsets = chunks[0].offsets
    _edit_metadata(folder, move)
    with pytest.raises(CheckpointError, match="overlap|no storage entry"):
        read_dcp(folder)


def test_stray_storage_entry(ckpts: Path, tmp_path: Path) -> None:
    folder = _copy(ckpts, "w2_model", tmp_path)
    _edit_metadata(folder, lambda md: md.state_dict_metadata.pop("model.norm.bias"))
    with pytest.raises(CheckpointError, match="match no chunk"):
        read_dcp(folder)


def test_disallowed_global_in_metadata(ckpts: Path, tmp_path: Path) -> None:
    folder = _copy(ckpts, "tiny", tmp_path)
    _edit_metadata(folder, lambda md: setattr(md, "planner_data", {"w": os.getcwd}))
    with pytest.raises(UnsupportedLayoutError, match=r"\.metadata: the pickle names posix\.getcwd: not on the allow"):
        read_dcp(folder)
    marker = tmp_path / "pwned"  # a payload that would run a command if anything resolved it: nothing runs

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    _edit_metadata(folder, lambda md: setattr(md, "planner_data", {"w": Evil()}))
    with pytest.raises(UnsupportedLayoutError, match="posix.system"):
        read_dcp(folder)
    with pytest.raises(CheckpointError, match="posix.system"):  # verify's torch-class reader refuses it too
        load_metadata(folder)
    assert not marker.exists()


def test_unknown_storage_info_field_refused(ckpts: Path, tmp_path: Path) -> None:
    folder = _copy(ckpts, "tiny", tmp_path)
    _edit_metadata(folder, lambda md: setattr(_entry(md, "w")[1], "compression", "lz4"))
    with pytest.raises(UnsupportedLayoutError, match=r"_StorageInfo has fields this reader does not know: \['compr"):
        read_dcp(folder)


def _xor_extension():
    from torch.distributed.checkpoint._extension import StreamTransformExtension

    class Xor(StreamTransformExtension):
        @staticmethod
        def registry_name() -> str:
            return "xor"

        @staticmethod
        def from_descriptor(version: str) -> Xor:
            return Xor()

        def get_descriptor(self) -> str:
            return "xor/1"

        def transform_to(self, output):
            class W(io.RawIOBase):
                def writable(self):
                    return True

                def write(self, b):
                    output.write(bytes(x ^ 0x5A for x in bytes(b)))
                    return len(b)
            return W()

        def transform_from(self, input):
            return io.BytesIO(bytes(x ^ 0x5A for x in input.read()))
    return Xor


def test_transform_descriptors_refused(tmp_path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemWriter

    Xor = _xor_extension()
    dcp.save({"w": torch.ones(3)}, storage_writer=FileSystemWriter(str(tmp_path / "x"), _extensions=[Xor()]),
             no_dist=True)
    md = pickle.loads((tmp_path / "x" / ".metadata").read_bytes())
    assert _entry(md, "w")[1].transform_descriptors == ["xor/1"]
    with pytest.raises(UnsupportedLayoutError, match=r"item 'w' is stored through transforms \['xor/1'\]"):
        read_dcp(tmp_path / "x")


@pytest.mark.parametrize("value", [5, "xor/1", "", 0, {}, ("xor/1",)])
def test_transform_descriptors_that_are_not_a_list_refused(ckpts: Path, tmp_path: Path, value) -> None:
    """torch writes None or a list of descriptor strings. An int ended in an internal TypeError, a string was read
    as one descriptor per character, a falsy one ("", 0, {}) was read as "no transforms": one line naming it."""
    folder = _copy(ckpts, "tiny", tmp_path)
    _edit_metadata(folder, lambda md: setattr(_entry(md, "w")[1], "transform_descriptors", value))
    with pytest.raises(CheckpointError, match=r"item 'w' has transform_descriptors .*, not a list") as e:
        read_dcp(folder)
    assert "\n" not in str(e.value)
    _edit_metadata(folder, lambda md: setattr(_entry(md, "w")[1], "transform_descriptors", []))
    check_against_torch(folder)  # an empty list: no transforms, as torch reads it


def test_safetensors_format_refused(tmp_path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    for sd in ({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16), "x": 1.5}, {"a": torch.ones(2)}):
        d = tmp_path / f"st{len(sd)}"
        dcp.save(sd, storage_writer=FileSystemWriter(str(d), serialization_format=SerializationFormat.SAFETENSORS),
                 no_dist=True)
        with pytest.raises(UnsupportedLayoutError, match="serialization_format=SAFETENSORS"):
            read_dcp(d)


def test_a_dtype_streammerge_does_not_read_is_named(tmp_path: Path) -> None:
    """MX scales (float8_e8m0fnu) and the fnuz float8s: the error names the dtype, not an allowlist of classes."""
    for dtype in (torch.float8_e8m0fnu, torch.float8_e4m3fnuz):
        d = tmp_path / str(dtype)
        dcp.save({"w": torch.zeros(4, dtype=dtype), "b": torch.zeros(2)}, checkpoint_id=str(d), no_dist=True)
        with pytest.raises(UnsupportedLayoutError, match=rf"tensors of dtype {dtype}, which streammerge does not"):
            read_dcp(d)


def test_a_key_with_a_lone_surrogate_is_one_clear_line(tmp_path: Path) -> None:
    """dcp.save takes a key with a lone surrogate (undecodable bytes decoded with surrogateescape): merge and inspect
    ended in "'utf-8' codec can't encode character" from deep in the writer. One line naming the key and the file."""
    folder = tmp_path / "ck"
    dcp.save({"layers.0.w\udce9": torch.ones(2), "b": torch.ones(2)}, checkpoint_id=str(folder), no_dist=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for cmd in ([str(folder), str(tmp_path / "out"), "--weights-only", "--no-progress"], ["inspect", str(folder)]):
        r = subprocess.run([sys.executable, "-m", "streammerge", *cmd], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r"key 'layers.0.w\udce9' is not valid text" in r.stderr and "U+DCE9" in r.stderr, r.stderr
        assert str(folder / ".metadata") in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_key_holding_a_terminal_escape_is_printed_escaped(tmp_path: Path, capsys) -> None:
    """A key may hold an escape sequence (this one clears the screen): inspect, merge and verify print it escaped,
    so what a checkpoint names cannot rewrite what the terminal shows."""
    folder = tmp_path / "ck"
    dcp.save({"w\x1b[2J\x1b[1A": torch.ones(2)}, checkpoint_id=str(folder), no_dist=True)
    out_dir = tmp_path / "out"
    for cmd in (["inspect", folder], ["merge", folder, out_dir, "--weights-only"], ["verify", out_dir]):
        assert main([str(a) for a in cmd]) == 0
        out, err = capsys.readouterr()
        assert "\x1b" not in out + err, cmd
    main(["inspect", str(folder)])
    assert r"w\x1b[2J\x1b[1A" in capsys.readouterr().out


def test_hf_storage_folder_refused(tmp_path: Path) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save({"a": torch.ones(2, 3)}, storage_writer=HuggingFaceStorageWriter(str(tmp_path / "hf")), no_dist=True)
    with pytest.raises(UnsupportedLayoutError, match="safetensors"):
        read_dcp(tmp_path / "hf")


def _append_blob(folder: Path, fqn: str, obj, edit=lambda blob: blob) -> bytes:
    """Store `obj` (torch.save, then `edit`) at the end of the item's file and point the item's entry at it."""
    md = pickle.loads((folder / ".metadata").read_bytes())
    _, info = _entry(md, fqn)
    buf = io.BytesIO()
    torch.save(obj, buf)
    blob = edit(buf.getvalue())
    f = folder / info.relative_path
    info.offset, info.length = f.stat().st_size, len(blob)
    with open(f, "ab") as fh:
        fh.write(blob)
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    return blob


def test_views_with_storage_offset_agree_with_torch(tmp_path: Path) -> None:
    """DCP clones views before saving, so real blobs have storage offset 0; blobs holding a view of a
    larger storage (offset, strides) or a Parameter are still valid torch.save data that torch loads."""
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    dcp.save({"v": torch.zeros(2, 3), "w": torch.zeros(3, 2), "x": torch.zeros(4, dtype=torch.bfloat16),
              "p": torch.zeros(2, 3)}, checkpoint_id=str(tmp_path / "views"), no_dist=True)
    folder = tmp_path / "views"
    _append_blob(folder, "v", base[1:3, 2:5])  # storage offset 10, stride (8, 1)
    _append_blob(folder, "w", base[2:4, 1:4].t())  # storage offset 17, stride (1, 8)
    _append_blob(folder, "x", torch.arange(10, dtype=torch.bfloat16)[3:7])
    _append_blob(folder, "p", nn.Parameter(torch.ones(2, 3)))
    dcp_to_torch_save(str(folder), str(folder) + ".pt")
    ck = check_against_torch(folder)
    assert ck.tensors["v"].pieces[0].stride == (8, 1) and ck.tensors["w"].pieces[0].stride == (1, 8)


def _repacked(blob: bytes, records=lambda items: items, after=lambda raw: raw, front: bytes = b"") -> bytes:
    """A torch.save blob written again by Python's zipfile (behind `front`), its records and then its bytes edited."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        items = [(i.filename, z.read(i)) for i in z.infolist()]
    out = io.BytesIO(front)
    out.seek(len(front))
    with zipfile.ZipFile(out, "a" if front else "w") as w:
        for name, b in records(items):
            w.writestr(name, b)
    return after(out.getvalue())


def _set_central(field: int, value: int, name: bytes):
    """A byte edit: set a 16-bit field of the central directory entry whose name ends with `name`."""
    def edit(raw: bytes) -> bytes:
        raw = bytearray(raw)
        at = raw.index(b"PK\x01\x02")
        while not raw[at + 46:at + 46 + struct.unpack_from("<H", raw, at + 28)[0]].endswith(name):
            at = raw.index(b"PK\x01\x02", at + 4)
        struct.pack_into("<H", raw, at + field, value)
        return bytes(raw)
    return edit


def _legacy(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


W = torch.arange(6, dtype=torch.float32).reshape(2, 3)
BLOB_EDITS = {
    "zipfile": lambda b: _repacked(b),  # another writer's layout: read alike
    "behind_a_legacy_file": lambda b: _repacked(b, front=_legacy(W + 1)),  # torch.load reads the legacy file
    "version_11": lambda b: _repacked(b, lambda items: [(n, b"11" if n.endswith("/version") else d)
                                                        for n, d in items]),
    "upper_case_big_byteorder": lambda b: _repacked(b, lambda items: [
        (n.replace("/byteorder", "/BYTEORDER"), b"big" if n.endswith("/byteorder") else d) for n, d in items]),
    "entry_on_disk_2": lambda b: _repacked(b, after=_set_central(34, 2, b"data.pkl")),
    "strong_encryption_flag": lambda b: _repacked(b, after=_set_central(8, 0x40, b"data.pkl")),
    "name_not_utf8": lambda b: _repacked(b, after=lambda raw: raw.replace(b"serialization_id", b"serializ\xfftion_id")),
    "format_version_header": lambda b: _repacked(
        b, after=lambda raw: raw.replace(b"PK\x03\x04", b"PK\x03\x05", 2).replace(b"PK\x03\x05", b"PK\x03\x04", 1)),
    "torchscript_constants": lambda b: _repacked(b, lambda items: [
        *items, (items[0][0].split("/")[0] + "/constants.pkl", b"\x80\x02).")]),
    "requires_grad_int": lambda b: _repacked(b, lambda items: [
        (n, d.replace(b"\x89", b"K\x00", 1) if n.endswith("/data.pkl") else d) for n, d in items]),
}


@pytest.mark.parametrize("case", list(BLOB_EDITS))
def test_blob_zips_torch_reads_otherwise(tmp_path: Path, case: str) -> None:
    """A tensor blob's zip as torch.load reads it (DCP's reader loads each blob with it): one that does not start with
    a zip record is a legacy file to it; it reads record names ignoring case, refuses a version it does not know, an
    entry on another disk or flagged as encrypted, a name that is not UTF-8, a broken local header of any record."""
    dcp.save({"w": torch.zeros(2, 3)}, checkpoint_id=str(tmp_path / "b"), no_dist=True)
    blob = _append_blob(tmp_path / "b", "w", W.clone(), BLOB_EDITS[case])
    try:
        theirs = torch.load(io.BytesIO(blob), weights_only=True)
    except Exception:
        theirs = None
    if case == "zipfile":
        assert torch.equal(theirs, W)
        assert assemble(read_dcp(tmp_path / "b").tensors["w"]).tobytes() == raw(W)
        return
    assert theirs is None or not torch.equal(theirs, W), "torch.load reads this blob as the tensor saved"
    with pytest.raises(CheckpointError) as e:
        read_dcp(tmp_path / "b")
    assert "__0_0.distcp: item 'w'" in str(e.value) and "\n" not in str(e.value)


def test_disallowed_global_in_blob(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    dcp.save({"v": torch.zeros(2, 3)}, checkpoint_id=str(tmp_path / "p"), no_dist=True)
    _append_blob(tmp_path / "p", "v", nn.Linear(2, 3))
    with pytest.raises(UnsupportedLayoutError, match=r"item 'v' .*data\.pkl: torch\.nn\.modules\.linear\.Linear"):
        read_dcp(tmp_path / "p")
    _append_blob(tmp_path / "p", "v", Evil())
    with pytest.raises(UnsupportedLayoutError, match=r"data\.pkl: posix\.system"):
        read_dcp(tmp_path / "p")
    assert not marker.exists()


def test_blob_dtype_and_view_checks(tmp_path: Path) -> None:
    dcp.save({"v": torch.zeros(2, 3)}, checkpoint_id=str(tmp_path / "d"), no_dist=True)
    _append_blob(tmp_path / "d", "v", torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(CheckpointError, match="stored dtype float64 but .metadata says float32"):
        read_dcp(tmp_path / "d")
    _append_blob(tmp_path / "d", "v", torch.zeros(3, 2))
    with pytest.raises(CheckpointError, match=r"stored shape \[3, 2\]"):
        read_dcp(tmp_path / "d")


def _tensor_blob(folder: Path, fqn: str) -> tuple[Path, int, int]:
    md = pickle.loads((folder / ".metadata").read_bytes())
    _, info = _entry(md, fqn)
    return folder / info.relative_path, info.offset, info.length


def _flip(path: Path, at: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ mask]))


def test_targeted_zip_damage(ckpts: Path, tmp_path: Path) -> None:
    """One flipped byte in each zip structure of a tensor blob: a one-line error naming file and item."""
    src = ckpts / "tiny"
    file, off, length = _tensor_blob(src, "w")
    blob = file.read_bytes()[off:off + length]
    z = zipfile.ZipFile(io.BytesIO(blob))
    rec = next(i for i in z.infolist() if i.filename == "archive/data/0")
    nlen, elen = struct.unpack_from("<HH", blob, rec.header_offset + 26)
    data_end = rec.header_offset + 30 + nlen + elen + rec.file_size
    first_cd = blob.index(b"PK\x01\x02")
    cases = {
        "eocd signature": (length - 22, "no zip end record"),
        "zip64 end record": (blob.index(b"PK\x06\x06"), "bad zip64 end record"),
        "central directory signature": (first_cd, "bad zip central directory entry"),
        "central crc of data.pkl": (first_cd + 16, "CRC mismatch in data.pkl|data descriptor"),
        "pickle byte": (64 + 40, "CRC mismatch in data.pkl"),
        "local header signature of data/0": (rec.header_offset, "bad zip local header for data/0"),
        "local extra length of data/0": (rec.header_offset + 28, "data descriptor"),
        "data descriptor of data/0": (data_end + 5, "data descriptor"),
    }
    pos = first_cd
    for info in z.infolist():  # the central entry of data/0: its size and its local header offset
        if info.filename == "archive/data/0":
            cases["central size of data/0"] = (pos + 24, "data descriptor|storage record|different stored and real")
            cases["central local-header offset of data/0"] = (pos + 42, "local header|outside|share|data descriptor")
        n, x, c = struct.unpack_from("<HHH", blob, pos + 28)
        pos += 46 + n + x + c
    for what, (at, msg) in cases.items():
        folder = tmp_path / what.replace(" ", "_").replace("/", "_")
        shutil.copytree(src, folder)
        _flip(folder / file.name, off + at)
        with pytest.raises(CheckpointError, match=msg) as e:
            read_dcp(folder)
        assert "__0_0.distcp: item 'w'" in str(e.value) and "\n" not in str(e.value), what


def _result_or_error(folder: Path):
    try:
        return read_dcp(folder)
    except CheckpointError as e:
        assert "\n" not in str(e)
        return None


@pytest.mark.slow
def test_fuzz_every_structural_byte_of_a_blob(ckpts: Path, tmp_path: Path) -> None:
    """Flip each byte of the tensor blob outside the tensor data: we raise, or return exactly the bytes of
    the undamaged checkpoint (the byte was padding, a timestamp, a record nobody reads)."""
    src = ckpts / "tiny"
    file, off, length = _tensor_blob(src, "w")
    ck = read_dcp(src)
    good = assemble(ck.tensors["w"]).tobytes()
    piece = ck.tensors["w"].pieces[0]
    data = range(piece.offset - off, piece.offset - off + 15 * 4)
    folder = tmp_path / "f"
    shutil.copytree(src, folder)
    target = folder / file.name
    pristine = target.read_bytes()
    raised = 0
    for at in range(length):
        if at in data:
            continue
        _flip(target, off + at)
        got = _result_or_error(folder)
        if got is None:
            raised += 1
        else:
            assert assemble(got.tensors["w"]).tobytes() == good, f"silently wrong after flipping blob byte {at}"
            assert got.tensors["w"].pieces[0].offset == piece.offset, at
        target.write_bytes(pristine)
    assert raised > 200


@pytest.mark.slow
@pytest.mark.parametrize("bomb", [b"\x80\x02N" + b"r" + struct.pack("<I", 2**20) + b".",  # LONG_BINPUT
                                  b"(dp1048576\n."])  # protocol 0's PUT
def test_a_memo_index_past_the_pickle_is_refused_before_unpickling(ckpts: Path, tmp_path: Path, bomb: bytes) -> None:
    """The C unpickler allocates and clears twice as many memo slots as the largest index a PUT names: 16 MiB here
    from a dozen bytes, 64 GiB for 2**32 - 1. Refused in one line by every reader of such a pickle, before it runs."""
    from streammerge.sources.megatron_run import inert_loads

    folder = _copy(ckpts, "tiny", tmp_path)
    (folder / ".metadata").write_bytes(bomb)
    words = f"a memo index of 1048576 in a pickle of {len(bomb)} bytes"
    with pytest.raises(CheckpointError, match=words):
        read_dcp(folder)
    with pytest.raises(CheckpointError, match=words):  # verify's torch-class reader
        load_metadata(folder)
    with pytest.raises(pickle.UnpicklingError, match=words):  # Megatron's common.pt and common_state item
        inert_loads(bomb)


@pytest.mark.parametrize("field", ["transform_descriptors", "relative_path", "planner_data", "storage_meta"])
def test_values_nested_past_the_recursion_limit(ckpts: Path, tmp_path: Path, field: str) -> None:
    """The unpickler builds a tuple 200,000 deep from as many bytes without recursing; a message naming it, or a
    check that walks it, would end in a RecursionError. One line naming .metadata instead."""
    folder = _copy(ckpts, "tiny", tmp_path)
    md = pickle.loads((folder / ".metadata").read_bytes())
    if field == "planner_data":
        md.planner_data = {"w": "SENTINEL"}
    elif field == "storage_meta":
        md.storage_meta = "SENTINEL"
    else:
        setattr(_entry(md, "w")[1], field, "SENTINEL")
    data = pickle.dumps(md, protocol=2)
    (folder / ".metadata").write_bytes(data.replace(b"X\x08\x00\x00\x00SENTINEL", b")" + b"\x85" * 200_000))
    with pytest.raises(CheckpointError, match=r"tiny/\.metadata: values nested past Python's recursion limit"):
        read_dcp(folder)


def test_more_chunks_than_stored_items_are_refused_before_each_is_read(ckpts: Path, tmp_path: Path) -> None:
    """One chunk listed 10**5 times costs two bytes each in the pickle (a memo GET) and far more to check one by one:
    every chunk is a stored item, so a tensor listing more chunks than .metadata stores items is refused at once."""
    folder = _copy(ckpts, "tiny", tmp_path)
    _edit_metadata(folder, lambda md: setattr(md.state_dict_metadata["w"], "chunks",
                                              md.state_dict_metadata["w"].chunks[:1] * 10**5))
    assert (folder / ".metadata").stat().st_size < 10**6
    with pytest.raises(CheckpointError, match=r"tensor 'w' lists 100000 chunks, more than the \d+ items storage_data"):
        read_dcp(folder)


def test_fuzz_every_byte_of_metadata(ckpts: Path, tmp_path: Path) -> None:
    """Flip each byte of .metadata: we raise, or every tensor we return equals what torch reads from the
    same damaged folder (when torch can read it), or the undamaged value of a tensor of that shape."""
    src = ckpts / "tiny"
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    target = folder / ".metadata"
    pristine = target.read_bytes()
    originals = {assemble(t).tobytes() for t in read_dcp(src).tensors.values()}
    for at, mask in [(at, mask) for mask in (0xFF, 0x01, 0x10) for at in range(len(pristine))]:
        damaged = bytearray(pristine)
        damaged[at] ^= mask
        target.write_bytes(bytes(damaged))
        got = _result_or_error(folder)
        if got is None:
            continue
        for name, t in got.tensors.items():
            mine = assemble(t).tobytes()
            if mine in originals:
                continue
            dcp_to_torch_save(str(folder), str(folder) + ".pt")
            assert mine == raw(flat_reference(folder, got)[name]), f"silently wrong after flipping .metadata byte {at}"
    target.write_bytes(pristine)


def test_per_rank_metadata_refused(tmp_path: Path) -> None:
    dcp.save({"a": torch.ones(2)}, checkpoint_id=str(tmp_path / "nc"), no_dist=True, use_collectives=False)
    assert (tmp_path / "nc" / "__0.metadata").is_file()
    with pytest.raises(UnsupportedLayoutError, match="use_collectives=False"):
        streammerge.plan(tmp_path / "nc")  # found by discovery, refused by the reader


@pytest.mark.filterwarnings("ignore:Detected an existing checkpoint")
@pytest.mark.parametrize("stop_at", ["rename", "rm_file"])
def test_a_save_that_did_not_finish_is_refused(tmp_path: Path, monkeypatch, stop_at: str) -> None:
    """dcp.save writes .metadata.tmp last, removes an older .metadata, then renames. Stopped before the rename
    (.metadata.tmp alone) it read as "not a torch DCP checkpoint"; stopped before the removal (an older save's
    .metadata beside the new .distcp files) it was merged as the older save. Both: the save did not finish."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    folder = tmp_path / "ck"
    dcp.save({"w": torch.zeros(3)}, checkpoint_id=str(folder), no_dist=True)  # an earlier save in the same folder

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(FileSystem, stop_at, crash)
    with pytest.raises(BaseException, match="killed"):
        dcp.save({"w": torch.ones(3)}, checkpoint_id=str(folder), no_dist=True)
    monkeypatch.undo()
    assert (folder / ".metadata.tmp").is_file() and (folder / ".metadata").exists() == (stop_at == "rm_file")
    with pytest.raises(CheckpointError, match="the save did not finish"):
        open_checkpoint(folder).tensors(streammerge.MergeOptions())  # found by discovery, refused by the reader
    want = "beside .metadata" if stop_at == "rm_file" else "and no .metadata"
    with pytest.raises(CheckpointError, match=rf"ck: the save did not finish \(\.metadata\.tmp {want}"):
        read_dcp(folder)
    assert main([str(folder), str(tmp_path / "out"), "--weights-only", "--no-progress"]) == 2
    (folder / ".metadata.tmp").unlink()
    (folder / ".metadata").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=r"\.distcp files and no \.metadata: the save did not finish"):
        read_dcp(folder)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no .metadata file"):
        read_dcp(tmp_path)
    (tmp_path / ".metadata").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"\.metadata: corrupt pickle"):
        read_dcp(tmp_path)


def test_conjugate_bit_refused(tmp_path: Path) -> None:
    """torch.save stores a conj view's unconjugated bytes plus {'conj': True}; copying them would be wrong."""
    c = torch.randn(3, dtype=torch.complex64).conj()
    dcp.save({"c": c}, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    with pytest.raises(UnsupportedLayoutError, match=r"item 'c' .*data\.pkl: tensor with extra metadata \['conj'\]"):
        read_dcp(tmp_path / "c")


def test_crc_off_and_other_alignment_agree_with_torch(tmp_path: Path) -> None:
    """Blobs saved without CRCs (crc 0) and with a 4096-byte storage alignment (torch 2.7+ config)."""
    from torch.utils.serialization import config

    old_align = config.save.storage_alignment
    try:
        torch.serialization.set_crc32_options(False)
        config.save.storage_alignment = 4096
        dcp.save({"a": torch.randn(5, 3), "b": torch.arange(7, dtype=torch.int16), "s": "x"},
                 checkpoint_id=str(tmp_path / "o"), no_dist=True)
    finally:
        torch.serialization.set_crc32_options(True)
        config.save.storage_alignment = old_align
    folder = tmp_path / "o"
    dcp_to_torch_save(str(folder), str(folder) + ".pt")
    ck = check_against_torch(folder)
    md = pickle.loads((folder / ".metadata").read_bytes())
    assert (ck.tensors["a"].pieces[0].offset - _entry(md, "a")[1].offset) % 4096 == 0


def test_metadata_as_older_torch_wrote_it(ckpts: Path, tmp_path: Path) -> None:
    """torch 2.4-2.8 files lack Metadata.version (2.9+) and StorageMeta.modules (2.7+); older ones had no
    storage_meta at all. _StorageInfo pickles the same three fields in all of them."""
    folder = _copy(ckpts, "w2_trainer", tmp_path)

    def strip(md):
        del md.version
        del md.storage_meta.modules
    _edit_metadata(folder, strip)
    ck = check_against_torch(folder)
    assert "version" not in ck.meta.extras and "modules" not in ck.meta.extras["storage_meta"]
    _edit_metadata(folder, lambda md: delattr(md, "storage_meta"))
    assert "storage_meta" not in check_against_torch(folder).meta.extras


# ---------------------------------------------------------------- which keys are the model

def test_model_keys_from_the_saved_nesting(ckpts: Path) -> None:
    """{"model": ..., "optimizer": ...} -> the model's own names; a bare state dict -> every key as saved."""
    opts = streammerge.MergeOptions()
    trainer = open_checkpoint(ckpts / "w2_trainer")
    names = trainer.tensors(opts)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names and "step_count" in names
    assert not any(n.startswith(("optimizer.", "model.model.")) for n in names)
    assert trainer.has_optimizer()
    bare = open_checkpoint(ckpts / "w2_model").tensors(opts)
    assert set(bare) == set(names) and not open_checkpoint(ckpts / "w2_model").has_optimizer()
    shard1 = open_checkpoint(ckpts / "w2_shard1")
    shard1.tensors(opts)
    assert any("extra.* (5 tensors)" in line for line in shard1.describe())  # told, not merged
    prefixed = open_checkpoint(ckpts / "w2_shard1").tensors(opts.replace(key_prefix="extra."))
    assert set(prefixed) == {"cols_uneven", "flags", "tiny", "rep", "plain"}
    with pytest.raises(ConfigError, match="no tensor key starts with --key-prefix 'nope.'"):
        open_checkpoint(ckpts / "w2_shard1").tensors(opts.replace(key_prefix="nope."))


def test_verify_takes_the_key_prefix_the_merge_took(tmp_path: Path) -> None:
    """A folder merged with --key-prefix ema, copied without .streammerge/: verify compared it with model.'s tensors
    and failed, and had no --key-prefix to be told otherwise. With a manifest, another prefix is a failure."""
    torch.manual_seed(0)
    state = {"model": {"w": torch.randn(4, 4)}, "ema": {"w": torch.randn(4, 4)}}
    dcp.save(state, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    out = tmp_path / "out"
    streammerge.merge(tmp_path / "ck", out, weights_only=True, key_prefix="ema")
    assert torch.equal(load_file(out / "model.safetensors")["w"], state["ema"]["w"])
    assert streammerge.verify(out, tmp_path / "ck", key_prefix="ema.").ok
    report = streammerge.verify(out, tmp_path / "ck", key_prefix="model")
    assert not report.ok and any("--key-prefix model: the merge ran with --key-prefix ema" in f
                                 for f in report.failures), report.summary()
    shutil.rmtree(out / ".streammerge")
    assert not streammerge.verify(out, tmp_path / "ck").ok  # checked as a merge of model.: its tensors differ
    assert streammerge.verify(out, tmp_path / "ck", key_prefix="ema").ok
    r = subprocess.run([sys.executable, "-m", "streammerge", "verify", str(out), str(tmp_path / "ck"), "--key-prefix",
                        "ema"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.startswith(f"verify {out}: OK"), r.stdout + r.stderr


def test_two_model_containers_or_none_at_all(tmp_path: Path) -> None:
    """Two `model` containers at one depth: the one merged followed the string hash seed (actor in one run, critic
    in the next, and verify disagreed). A save of no tensors ended in an internal IndexError. Both: one line."""
    opts = streammerge.MergeOptions()
    dcp.save({"actor": {"model": {"w": torch.ones(2)}}, "critic": {"model": {"w": torch.zeros(2)}}},
             checkpoint_id=str(tmp_path / "two"), no_dist=True)
    with pytest.raises(CheckpointError, match=r"several model containers \(actor\.model\., critic\.model\.\)"):
        open_checkpoint(tmp_path / "two").tensors(opts)
    chosen = open_checkpoint(tmp_path / "two").tensors(opts.replace(key_prefix="critic.model."))
    assert list(chosen) == ["w"]
    dcp.save({"step": 5}, checkpoint_id=str(tmp_path / "none"), no_dist=True)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        open_checkpoint(tmp_path / "none").tensors(opts)


def _torch_full(folder: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    return torch.load(str(folder) + ".pt", weights_only=False)[prefix]


@pytest.mark.parametrize("name", ["w2_trainer", "w3_shard1", "w4_hsdp"])
def test_merge_equals_torch(ckpts: Path, tmp_path: Path, name: str) -> None:
    """Every merged tensor equals dcp_to_torch_save's, bit for bit; bfloat16 casts equal torch's .to()."""
    ref = _torch_full(ckpts / name)
    out = tmp_path / "keep"
    streammerge.merge(ckpts / name, out, dtype="keep", max_shard_size="300B", weights_only=True)
    got = {}
    for f in out.glob("model*.safetensors"):
        got.update(load_file(f))
    assert set(got) == set(ref)
    assert all(raw(got[k]) == raw(ref[k]) and got[k].dtype == ref[k].dtype for k in ref)
    report = streammerge.verify(out, ckpts / name, chunk_size=4096)
    assert report.ok and report.tensors_checked >= len(ref), report.summary()
    cast = tmp_path / "bf16"
    streammerge.merge(ckpts / name, cast, dtype="bfloat16", optimizer=False, weights_only=True)
    got = load_file(cast / "model.safetensors")
    assert all(raw(got[k]) == raw(v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in ref.items())


def test_merge_and_optimizer_of_an_fsdp2_trained_model(qwen_dcp: Path, tmp_path: Path) -> None:
    """A real Qwen2 trained with FSDP2 and saved by dcp.save: the output is the trained model (transformers
    loads it with no missing keys, every tensor equal to torch's full state dict) and the optimizer export
    is torch's full optimizer state dict (every state tensor and the param groups)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = streammerge.merge(qwen_dcp, out, dtype="keep")
    assert not result.warnings, result.warnings
    ref = load_file(qwen_dcp / "reference" / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert set(ref) - set(got) == {"lm_head.weight"}  # tied: dropped like save_pretrained
    assert all(torch.equal(got[k], ref[k]) for k in got)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all(torch.equal(p, ref[n]) for n, p in model.state_dict().items())  # lm_head: the tied embedding
    osd = streammerge.load_optimizer_state_dict(out)
    want = torch.load(qwen_dcp / "reference" / "optimizer.pt", weights_only=True)
    assert osd["param_groups"] == want["param_groups"] and set(osd["state"]) == set(want["state"])
    for fqn, state in want["state"].items():
        assert set(osd["state"][fqn]) == set(state)
        assert all(torch.equal(osd["state"][fqn][k], v) for k, v in state.items()), fqn
    index = json.loads((out / "optimizer" / "optimizer.safetensors.index.json").read_text())
    assert index["metadata"]["step"] == "2"
    report = streammerge.verify(out, qwen_dcp, chunk_size=4096)
    assert report.ok, report.summary()


def test_discovery_of_trainer_layouts(qwen_dcp: Path, tmp_path: Path) -> None:
    """What users type: prime-rl's step folder (the DCP is its trainer/), the DCP folder itself."""
    step = tmp_path / "checkpoints" / "step_2"
    shutil.copytree(qwen_dcp, step / "trainer")
    source = open_checkpoint(step)
    assert isinstance(source, DcpSource) and source.path == step / "trainer" and source.step == 2
    assert source.hf_dir == step / "trainer" / "huggingface"
    plan = streammerge.plan(tmp_path / "checkpoints" / "step_2" / "trainer")
    assert plan.source.format == "torch DCP" and "model.norm.weight" in plan.weights.tensors


def test_verify_catches_a_changed_chunk_through_torch(qwen_dcp: Path, tmp_path: Path) -> None:
    """After the merge a chunk's bytes change in the checkpoint: verify reads them through torch.load and
    reports the tensor, and the item's zip CRC-32 no longer holds."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(qwen_dcp, ckpt)
    out = tmp_path / "out"
    streammerge.merge(ckpt, out, optimizer=False)
    t = read_dcp(ckpt).tensors["model.model.norm.weight"]
    _flip(Path(t.pieces[0].file), t.pieces[0].offset + 3, 0x01)  # an exponent bit: survives the bfloat16 cast
    report = streammerge.verify(out, ckpt)
    assert not report.ok
    assert any("model.norm.weight" in f and "torch.load" in f for f in report.failures), report.summary()
    assert any("CRC-32" in f for f in report.failures), report.summary()


def test_a_tie_made_by_the_config_is_checked_against_the_bytes(qwen_dcp: Path, tmp_path: Path, capsys) -> None:
    """dcp.save stores a tied model's lm_head.weight apart from its embedding, so the tie comes from the config alone.
    Equal bytes: lm_head is dropped, and verify compares its source with the embedding written in its place. Once
    they differ (a config that says tied for an untied run): verify names lm_head, and the merge refuses in one line
    before it writes anything; with the config untied, both are written as torch reads them."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(qwen_dcp, ckpt)
    out = tmp_path / "out"
    streammerge.merge(ckpt, out, optimizer=False)
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    report = streammerge.verify(out, ckpt)
    assert report.ok, report.summary()
    head = read_dcp(ckpt).tensors["model.lm_head.weight"]
    _flip(Path(head.pieces[-1].file), head.pieces[-1].offset + 3, 0x01)  # an exponent bit: survives the cast
    report = streammerge.verify(out, ckpt)
    assert not report.ok and any("lm_head.weight" in f for f in report.failures), report.summary()
    assert main([str(ckpt), str(tmp_path / "again"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lm_head.weight differs from model.embed_tokens.weight" in err and err.count("\n") == 1, err
    assert not (tmp_path / "again").exists()
    config = json.loads((ckpt / "huggingface" / "config.json").read_text())
    (ckpt / "huggingface" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    streammerge.merge(ckpt, tmp_path / "untied", optimizer=False, dtype="keep")
    got = load_file(tmp_path / "untied" / "model.safetensors")
    dcp_to_torch_save(str(ckpt), str(ckpt) + ".pt")
    want = flat_reference(ckpt, read_dcp(ckpt))
    assert torch.equal(got["lm_head.weight"], want["model.lm_head.weight"])
    assert not torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


def test_without_a_config_only_weights_only_writes(ckpts: Path, tmp_path: Path, capsys) -> None:
    """A DCP of bare tensors has no config: transformers could not load the output as a model, so exit 0 needs the
    user to ask for the weights alone; inspect still shows the plan."""
    assert main(["inspect", str(ckpts / "w2_model")]) == 0
    capsys.readouterr()
    assert main([str(ckpts / "w2_model"), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and "--weights-only" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    assert main([str(ckpts / "w2_model"), str(tmp_path / "out"), "--no-progress", "--weights-only"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "config.json").exists()


def test_cli_inspect_and_merge(qwen_dcp: Path, tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(qwen_dcp)]) == 0
    text = capsys.readouterr().out
    assert "torch DCP" in text and "'model.' stripped" in text and "[optimizer]" in text
    assert main([str(qwen_dcp), str(tmp_path / "out"), "--no-progress", "--verify"]) == 0
    assert (tmp_path / "out" / "optimizer" / "optimizer.safetensors.index.json").is_file()


@pytest.mark.slow
def test_torchrun_merge_equals_one_process(qwen_dcp: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    opts = ["--max-shard-size", "50KB", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "streammerge", str(qwen_dcp), str(one), *opts], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "streammerge", str(qwen_dcp), str(two), *opts], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr

    def files(d: Path) -> dict[str, bytes]:
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*")
                if p.is_file() and ".streammerge" not in p.parts}
    a, b = files(one), files(two)
    assert a == b and len([f for f in a if f.endswith(".safetensors")]) >= 4


def test_an_interrupted_merge_resumes(qwen_dcp: Path, tmp_path: Path) -> None:
    """Finished files are reused, missing ones written again: the folder equals an uninterrupted merge."""
    def files(d: Path) -> dict[str, bytes]:
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*")
                if p.is_file() and ".streammerge" not in p.parts}

    full, cut = tmp_path / "full", tmp_path / "cut"
    streammerge.merge(qwen_dcp, full, max_shard_size="60KB")
    streammerge.merge(qwen_dcp, cut, max_shard_size="60KB")
    shards = sorted(cut.glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[1].unlink()
    (cut / "model.safetensors.index.json").unlink()
    again = streammerge.merge(qwen_dcp, cut, max_shard_size="60KB")
    assert shards[0].name in again.reused and shards[1].name not in again.reused
    assert files(cut) == files(full)


def _trained_tiny() -> tuple[nn.Module, torch.optim.Optimizer]:
    from streammerge.testing.dcp_cases import Tiny

    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW([{"params": list(model.model.parameters()), "lr": 1e-2},
                             {"params": list(model.lm_head.parameters()), "lr": 3e-3, "weight_decay": 0.0}])
    model(torch.tensor([[1, 2, 3, 4]])).sum().backward()
    opt.step()
    return model, opt


def _same_optimizer_state(got: dict, want: dict) -> None:
    assert got["param_groups"] == want["param_groups"]
    assert set(got["state"]) == set(want["state"])
    for fqn, state in want["state"].items():
        assert set(got["state"][fqn]) == set(state) and all(torch.equal(got["state"][fqn][k], v)
                                                            for k, v in state.items()), fqn


@pytest.mark.parametrize("layout", ["prime-rl", "torchtitan"])
def test_trainer_layouts_and_their_optimizer(layout: str, tmp_path: Path) -> None:
    """prime-rl's `{"app": {"model", "optimizers", ...}}` under step_N/trainer/, and torchtitan's top-level
    model keys beside a flattened optimizer (`state.<fqn>.<key>`, `param_groups.<fqn>.<key>`): the model
    under its own names, the optimizer export equal to torch's full optimizer state dict, two param groups."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    model, opt = _trained_tiny()
    want_model = get_model_state_dict(model)
    want_opt = get_optimizer_state_dict(model, opt)
    if layout == "prime-rl":
        folder = tmp_path / "checkpoints" / "step_7" / "trainer"
        state = {"app": {"model": want_model, "optimizers": want_opt, "progress": {"step": 7}}}
        typed = folder.parent
    else:
        folder = typed = tmp_path / "step-7"
        flat = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
        state = {**want_model, "optimizer": flat, "lr_scheduler": {"last_epoch": 7}, "train_state": {"step": 7}}
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    out = tmp_path / "out"
    result = streammerge.merge(typed, out, dtype="keep", weights_only=True)
    assert not result.warnings[1:], result.warnings  # [0]: no config.json
    got = load_file(out / "model.safetensors")
    assert set(got) == set(want_model) and all(torch.equal(got[k], v) for k, v in want_model.items())
    _same_optimizer_state(streammerge.load_optimizer_state_dict(out), want_opt)
    assert result.plan.source.step == 7



@pytest.mark.parametrize("case", ["tensor_lr", "adafactor"])
def test_optimizer_state_the_export_cannot_hold_is_a_warning(case: str, tmp_path: Path) -> None:
    """A tensor lr was dropped from the exported param groups without a word; Adafactor's factored state refused
    the whole merge. Both: the weights are written (equal to the model's), the optimizer skipped with the reason."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from streammerge.testing.dcp_cases import Tiny

    torch.manual_seed(0)
    model = Tiny()
    opt = (torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.01)) if case == "tensor_lr"
           else torch.optim.Adafactor(model.parameters(), lr=0.01))
    model(torch.tensor([[1, 2, 3, 4]])).sum().backward()
    opt.step()
    want = get_model_state_dict(model)
    dcp.save({"model": want, "optimizer": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    result = streammerge.merge(tmp_path / "ck", tmp_path / "out", dtype="keep", weights_only=True)
    why = "is a tensor" if case == "tensor_lr" else "a factored optimizer such as Adafactor"
    assert any(w.startswith("optimizer not exported") and why in w for w in result.warnings), result.warnings
    assert not (tmp_path / "out" / "optimizer").exists()
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())


def test_planner_data_that_disagrees_with_its_key(tmp_path: Path) -> None:
    """A path in planner_data that does not join to its key: torch's loader refuses the save, and the model/optimizer
    split put the tensor in neither (it vanished from the merge, exit 0). Refused in one line."""
    import pickle

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ck = tmp_path / "ck"
    dcp.save({"model": {"a": torch.ones(2), "b": torch.zeros(3)}}, checkpoint_id=str(ck), no_dist=True)
    with open(ck / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own file, just written
    md.planner_data["model.b"] = ("stray", *md.planner_data["model.b"])
    with open(ck / ".metadata", "wb") as f:
        pickle.dump(md, f)
    from torch.distributed.checkpoint.api import CheckpointException
    with pytest.raises(CheckpointException, match="Missing key"):
        dcp_to_torch_save(str(ck), str(tmp_path / "ref.pt"))
    with pytest.raises(CheckpointError, match=r"planner_data gives key 'model\.b' the path"):
        read_dcp(ck)


def test_more_files_than_the_soft_open_files_limit(tmp_path: Path) -> None:
    """One .distcp per item (single_file_per_rank=False): more files than `ulimit -Sn` were refused (EMFILE) where
    torch consolidates them. The soft limit is raised to the hard one; at the hard limit the error says so."""
    import resource

    from torch.distributed.checkpoint import FileSystemWriter

    ck = tmp_path / "ck"
    state = {f"layers.{i}.w": torch.full((4,), float(i)) for i in range(300)}
    dcp.save(state, storage_writer=FileSystemWriter(str(ck), single_file_per_rank=False), no_dist=True)
    assert len(list(ck.glob("*.distcp"))) == 300
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"hard open-files limit {hard}")

    def run(limit: tuple[int, int], out: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "streammerge", str(ck), str(out), "--weights-only", "--no-progress"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit),
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    ok = run((128, min(hard, 4096) if hard != resource.RLIM_INFINITY else 4096), tmp_path / "out")
    assert ok.returncode == 0, ok.stderr
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(state) and all(torch.equal(got[k], v) for k, v in state.items())
    low = run((128, 128), tmp_path / "low")
    assert low.returncode == 2 and "more files than this process may hold open (128)" in low.stderr, low.stderr
    assert low.stderr.count("\n") == 1


def _split_of(tmp_path: Path, state: dict, key_prefix: str | None = None):
    from streammerge.sources.dcp import _split_keys

    folder = tmp_path / "ck"
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return _split_keys(read_dcp(folder), key_prefix)


def test_which_keys_are_the_model(tmp_path: Path) -> None:
    """A flat dict's optimizer keys are not the model; a top-level key that reads like a model key ('model.extra' beside
    a 'model' dict) is listed as not merged; --key-prefix without its dot names a container, never half a name."""
    w = torch.ones(2, 2)
    flat = _split_of(tmp_path / "a", {"model.w": w, "optimizer.state.w.exp_avg": w, "optimizer.state.w.step": w[0, 0]})
    assert list(flat.model) == ["model.w"] and flat.optimizer_prefix == "optimizer."
    dotted = _split_of(tmp_path / "b", {"model": {"w": w}, "model.extra": w})
    assert dotted.model == {"w": "model.w"} and dotted.others == {"model": 1}
    prefixed = _split_of(tmp_path / "c", {"model": {"w": w, "b": w[0]}, "step": w[0, 0]}, key_prefix="model")
    assert set(prefixed.model) == {"w", "b"}


def test_a_tensor_named_like_the_safetensors_metadata_key(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    dcp.save({"__metadata__": torch.ones(2), "w": torch.ones(2)}, checkpoint_id=str(folder), no_dist=True)
    with pytest.raises(CheckpointError, match="a tensor named '__metadata__'"):
        streammerge.merge(folder, tmp_path / "out", weights_only=True)


def test_a_trainers_rng_state_is_not_a_model_tensor(tmp_path: Path) -> None:
    """Top-level model keys beside a trainer's top-level tensors (torch.get_rng_state(), a step counter): those were
    merged into model.safetensors as weights named 'rng_state' and 'step'. They are listed as not merged."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from streammerge.testing.dcp_cases import Tiny

    want = get_model_state_dict(Tiny())
    folder = tmp_path / "ck"
    dcp.save({**want, "rng_state": torch.get_rng_state(), "step": torch.tensor(7), "lr_scheduler": {"last_epoch": 7}},
             checkpoint_id=str(folder), no_dist=True)
    split = open_checkpoint(folder).split(None)
    assert set(split.model) == set(want) and split.others == {"rng_state": 1, "step": 1}
    streammerge.merge(folder, tmp_path / "out", dtype="keep", weights_only=True)
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())


def test_tensors_pickled_inside_a_non_tensor_item_are_refused(tmp_path: Path, capsys) -> None:
    """DCP stores a tuple of tensors (or an object holding some) as one pickled non-tensor item; the merge reads
    tensor items only, so such a model's tensors vanished from the output (exit 0). Refused where the item is the
    model's; elsewhere (an `extra` container) the model is merged as torch reads it."""
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    pair = (torch.ones(3), torch.zeros(2, dtype=torch.bfloat16))
    cases = {"nested": {"model": {"w": w, "pair": pair}}, "top": {"w": w, "pair": pair}}
    for name, state in cases.items():
        folder = tmp_path / name
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
        dcp_to_torch_save(str(folder), str(folder) + ".pt")
        ref = flat_reference(folder, read_dcp(folder))
        key = "model.pair" if name == "nested" else "pair"
        assert all(torch.equal(a, b) for a, b in zip(ref[key], pair))  # torch reads the tensors back from the item
        assert main([str(folder), str(tmp_path / f"out_{name}"), "--weights-only", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"item {key!r} of the model pickles tensors inside a non-tensor value" in err, err
        assert err.count("\n") == 1 and not (tmp_path / f"out_{name}").exists()
    folder = tmp_path / "extra"
    dcp.save({"model": {"w": w}, "extra": {"pair": pair, "note": "x"}}, checkpoint_id=str(folder), no_dist=True)
    streammerge.merge(folder, tmp_path / "out_extra", dtype="keep", weights_only=True)
    assert raw(load_file(tmp_path / "out_extra" / "model.safetensors")["w"]) == raw(w)


class _WithExtraState(nn.Module):
    """A module whose state dict holds what get_extra_state() returns: DCP flattens a dict or list of tensors below
    the module's key ('0._extra_state.scale')."""

    def __init__(self, extra: object) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.extra = extra

    def get_extra_state(self) -> object:
        return self.extra

    def set_extra_state(self, state: object) -> None:
        self.extra = state


@pytest.mark.parametrize("extra", ["dict", "list"])
def test_a_modules_extra_state_is_merged_as_torch_reads_it(tmp_path: Path, extra: str) -> None:
    """A bare model.state_dict() whose module keeps tensors in its extra state: they sit nested below the module's key,
    and the merge took them for a trainer's container beside the model and left them out (exit 0), where the same
    state dict saved as {"model": ...} kept them. Both now merge every tensor torch reads back."""
    torch.manual_seed(0)
    value = {"scale": torch.tensor([0.5, 2.0])} if extra == "dict" else [torch.tensor([0.5, 2.0]), 3]
    state = nn.Sequential(_WithExtraState(value), nn.Linear(2, 1)).state_dict()
    for nest, saved in (("bare", state), ("nested", {"model": state})):
        folder = tmp_path / nest
        dcp.save(saved, checkpoint_id=str(folder), no_dist=True)
        dcp_to_torch_save(str(folder), str(folder) + ".pt")
        ref = flat_reference(folder, read_dcp(folder))
        want = {k.removeprefix("model."): v for k, v in ref.items() if isinstance(v, torch.Tensor)}
        assert len(want) == 5
        result = streammerge.merge(folder, tmp_path / f"out_{nest}", dtype="keep", weights_only=True)
        got = load_file(tmp_path / f"out_{nest}" / "model.safetensors")
        assert set(got) == set(want), nest
        assert all(raw(got[k]) == raw(v) and got[k].dtype == v.dtype for k, v in want.items()), nest
        assert not [w for w in result.plan.warnings if "left out" in w]


def test_a_tensor_container_beside_a_bare_model_is_named_when_left_out(tmp_path: Path, capsys) -> None:
    """Beside a bare state dict's top-level tensors, a container under a plain name ('ema') is taken for a trainer's
    state, as optimizer or lr_scheduler are; it was left out with a word only from inspect (as 'ema.*'). The merge now
    says what it left out; --key-prefix merges it instead."""
    w, e = torch.arange(4.0).reshape(2, 2), torch.ones(3)
    folder = tmp_path / "ck"
    dcp.save({"w": w, "ema": {"w": e}, "lr_scheduler": {"last": torch.tensor(3)}}, checkpoint_id=str(folder),
             no_dist=True)
    assert main([str(folder), str(tmp_path / "out"), "--weights-only", "--no-progress", "--dtype", "keep"]) == 0
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "left out" in x]
    assert "left out ema.* (1 tensors)" in line and "lr_scheduler" not in line and "--key-prefix" in line
    assert list(load_file(tmp_path / "out" / "model.safetensors")) == ["w"]
    streammerge.merge(folder, tmp_path / "ema", dtype="keep", weights_only=True, key_prefix="ema")
    assert raw(load_file(tmp_path / "ema" / "model.safetensors")["w"]) == raw(e)


def test_a_save_with_flatten_state_dict_false(tmp_path: Path, capsys) -> None:
    """flatten_state_dict=False stores each nested dict whole, as one pickled item, and .metadata records no nesting:
    the model inside {"model": ...} was dropped and the top-level tensors merged as the model (exit 0). Refused in one
    line saying so; such a save of a flat dict of tensors (nothing pickled whole) is merged as torch reads it."""
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, opt = _trained_tiny()
    want = get_model_state_dict(model)
    nested = tmp_path / "nested"
    dcp.save({"model": want, "optimizer": get_optimizer_state_dict(model, opt), "step": torch.tensor(7)},
             checkpoint_id=str(nested), no_dist=True, planner=DefaultSavePlanner(flatten_state_dict=False))
    ck = read_dcp(nested)
    assert ck.meta.planner_data is None and set(ck.bytes_items) == {"model", "optimizer"}
    assert list(ck.tensors) == ["step"]
    for args in ([], ["--key-prefix", "model."]):
        assert main([str(nested), str(tmp_path / "out"), "--weights-only", "--no-progress", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and not (tmp_path / "out").exists(), err
        assert "item 'model' pickles tensors inside one non-tensor item" in err and "flatten_state_dict=False" in err
    flat = tmp_path / "flat"
    dcp.save(dict(want), checkpoint_id=str(flat), no_dist=True, planner=DefaultSavePlanner(flatten_state_dict=False))
    assert read_dcp(flat).meta.planner_data is None
    dcp_to_torch_save(str(flat), str(flat) + ".pt")
    ref = torch.load(str(flat) + ".pt", weights_only=True)
    streammerge.merge(flat, tmp_path / "out_flat", dtype="keep", weights_only=True)
    got = load_file(tmp_path / "out_flat" / "model.safetensors")
    assert set(got) == set(ref) == set(want) and all(raw(got[k]) == raw(v) for k, v in ref.items())


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_torch_compile_prefix_is_stripped_in_the_param_groups_too(tmp_path: Path) -> None:
    """A torch.compile'd model's own names (`_orig_mod.` ...) for its weights and optimizer state: the state's names
    lost the prefix but the param groups' `params` kept it, so load_optimizer_state_dict refused the export (its state
    in no group). Both stripped: the export is torch's full optimizer state dict of the uncompiled model, and it
    resumes the optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model, opt = _trained_tiny()
    compiled = torch.compile(model)  # wraps only: nothing is compiled until it runs
    names = {p: n for n, p in compiled.named_parameters()}
    assert all(n.startswith("_orig_mod.") for n in names.values())
    osd = {"state": {names[p]: dict(s) for p, s in opt.state.items()},
           "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[p] for p in g["params"]]}
                            for g in opt.param_groups]}
    folder = tmp_path / "ck"
    dcp.save({"model": compiled.state_dict(), "optimizer": osd}, checkpoint_id=str(folder), no_dist=True)
    result = streammerge.merge(folder, tmp_path / "out", dtype="keep", weights_only=True)
    assert not result.warnings[1:], result.warnings  # [0]: no config.json
    want_model = get_model_state_dict(model)
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(want_model) and all(torch.equal(got[k], v) for k, v in want_model.items())
    exported = streammerge.load_optimizer_state_dict(tmp_path / "out")
    _same_optimizer_state(exported, get_optimizer_state_dict(model, opt))
    fresh, fresh_opt = _trained_tiny()
    fresh_opt.param_groups[0]["lr"] = 0.5
    set_optimizer_state_dict(fresh, fresh_opt, exported)
    _same_optimizer_state(get_optimizer_state_dict(fresh, fresh_opt), get_optimizer_state_dict(model, opt))


@pytest.mark.parametrize("case", ["state_in_no_group", "group_names_no_weight", "param_in_two_groups"])
def test_param_groups_that_do_not_hold_the_state_are_a_warning(case: str, tmp_path: Path) -> None:
    """State for a parameter that no param group holds was exported (exit 0), and load_optimizer_state_dict then
    refused the folder; a group naming no weight, or a parameter in two groups, likewise. The weights are written
    (equal to the model's), the optimizer is not, with the reason."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, opt = _trained_tiny()
    osd = get_optimizer_state_dict(model, opt)
    groups = osd["param_groups"]
    if case == "state_in_no_group":
        osd["param_groups"] = groups[:1]
        why = "optimizer state for 'lm_head.weight' (1 parameters), which no param group holds"
    elif case == "group_names_no_weight":
        groups[1]["params"] = ["lm_head.weight", "value_head.weight"]
        why = "param group 1 holds 'value_head.weight', which is not a weight of the model"
    else:
        groups[1]["params"] = ["lm_head.weight", "model.norm.weight"]
        why = "'model.norm.weight' is in param groups 0 and 1"
    want = get_model_state_dict(model)
    dcp.save({"model": want, "optimizer": osd}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    result = streammerge.merge(tmp_path / "ck", tmp_path / "out", dtype="keep", weights_only=True)
    assert any(w == f"optimizer not exported: {why}" for w in result.warnings), result.warnings
    assert not (tmp_path / "out" / "optimizer").exists()
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_a_list_valued_param_group_setting_is_loaded_as_a_list(fmt: str, tmp_path: Path) -> None:
    """JSON has no tuples, and every list in the exported groups came back a tuple (right for torch's betas): a
    setting torch held as a list was loaded as a tuple, which != the list in Python."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, opt = _trained_tiny()
    opt.param_groups[0]["custom"] = [1, 2]
    want = get_optimizer_state_dict(model, opt)
    assert isinstance(want["param_groups"][0]["betas"], tuple)
    dcp.save({"model": get_model_state_dict(model), "optimizer": want}, checkpoint_id=str(tmp_path / "ck"),
             no_dist=True)
    out = tmp_path / "out"
    streammerge.merge(tmp_path / "ck", out, dtype="keep", weights_only=True, optimizer_format=fmt)
    got = streammerge.load_optimizer_state_dict(out)
    assert got["param_groups"][0]["custom"] == [1, 2] and isinstance(got["param_groups"][0]["betas"], tuple)
    _same_optimizer_state(got, want)
    assert streammerge.verify(out, tmp_path / "ck").ok


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_verify_without_a_manifest_compares_the_param_groups(fmt: str, tmp_path: Path) -> None:
    """A folder without .streammerge/ (another tool's, or one whose state folder was removed) had its optimizer tensors
    compared but not its param groups: a changed lr, betas or a parameter moved to another group passed. They are
    compared with the checkpoint's, in the index's metadata or in optimizer.pt."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, opt = _trained_tiny()
    folder = tmp_path / "ck"
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(folder), no_dist=True)
    out = tmp_path / "out"
    streammerge.merge(folder, out, dtype="keep", weights_only=True, optimizer_format=fmt)
    shutil.rmtree(out / ".streammerge")
    report = streammerge.verify(out, folder)
    assert report.ok, report.summary()
    index = out / "optimizer" / "optimizer.safetensors.index.json"
    pt = out / "optimizer" / "optimizer.pt"
    pristine = (index if fmt == "safetensors" else pt).read_bytes()

    def edit(fn) -> None:
        if fmt == "safetensors":
            j = json.loads(pristine)
            groups = json.loads(j["metadata"]["param_groups"])
            fn(groups)
            j["metadata"]["param_groups"] = json.dumps(groups)
            index.write_text(json.dumps(j))
        else:
            osd = torch.load(io.BytesIO(pristine), weights_only=True)
            fn(osd["param_groups"])
            torch.save(osd, pt)

    def move(groups) -> None:
        groups[1]["params"].append(groups[0]["params"].pop())
    for change, why in [(lambda g: g[0].update(lr=0.5), "group 0: 'lr' is 0.5, the checkpoint gives 0.01"),
                        (lambda g: g[1].update(betas=[0.8, 0.9]), "group 1: 'betas' is"),
                        (move, "group 0: 'params' is"),
                        (lambda g: g.pop(), "1 groups, the checkpoint gives 2")]:
        edit(change)
        report = streammerge.verify(out, folder)
        assert not report.ok and any("param_groups differ from the checkpoint's" in f and why in f
                                     for f in report.failures), report.summary()
    (index if fmt == "safetensors" else pt).write_bytes(pristine)
    assert streammerge.verify(out, folder).ok


def test_a_memory_format_that_is_no_code_is_refused(ckpts: Path, tmp_path: Path) -> None:
    """torch's TensorProperties compares the memory format with its enum's members and refuses anything else (here the
    plain int 0 where the enum belongs); the reader took any value there, and verify died on it (an internal error)."""
    folder = _copy(ckpts, next(iter(CASES)), tmp_path)
    data = (folder / ".metadata").read_bytes()
    ops = list(pickletools.genops(data))
    at = next(ops[i + 1][2] for i in range(len(ops) - 3)
              if [o[0].name for o in ops[i:i + 4]] == ["NEWFALSE", "BINGET", "NEWFALSE", "TUPLE"])
    (folder / ".metadata").write_bytes(data[:at] + b"K\x00" + data[at + 2:])  # BINGET n -> BININT1 0, same length
    with pytest.raises(RuntimeError, match="memory_format"):
        pickle.loads((folder / ".metadata").read_bytes())
    with pytest.raises(CheckpointError, match="memory format 0, which is no memory-format code"):
        read_dcp(folder)
    with pytest.raises(CheckpointError, match="torch's DCP classes cannot read it"):
        load_metadata(folder)


def test_an_item_pickled_under_another_protocol_number_is_read(tmp_path: Path) -> None:
    """torch's unpickler takes any protocol number (the opcodes decide); Python's refuses one above 5, and the item
    was refused as "unsupported pickle protocol" though torch reads it."""
    dcp.save({"w": torch.zeros(2, 3)}, checkpoint_id=str(tmp_path / "b"), no_dist=True)
    blob = _append_blob(tmp_path / "b", "w", W.clone(), lambda b: _repacked(b, lambda items: [
        (n, b"\x80\x06" + d[2:] if n.endswith("/data.pkl") else d) for n, d in items]))
    assert torch.equal(torch.load(io.BytesIO(blob), weights_only=True), W)
    assert assemble(read_dcp(tmp_path / "b").tensors["w"]).tobytes() == raw(W)
