"""streammerge.verify and `streammerge verify`: passes on real merges, names every kind of damage."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from ckpt_tools import REPO, copy_actor, diverge, run_together, write_rank_files
from fixture_paths import VERL_CASES as FIXTURES
from torch.distributed.tensor import Replicate, Shard

import streammerge
from streammerge.cli import main
from streammerge.sources.verl_oracle import VerlOracle
from streammerge.write.manifest import MANIFEST, STATE_DIR
from streammerge.write.writer import tmp_path

INDEX = "model.safetensors.index.json"


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
@pytest.mark.parametrize("name", FIXTURES)
def test_real_merges_verify(name, dtype, verl_fixtures, tmp_path):
    """Every GPU fixture (FSDP1 flat pieces with and without use_orig_params, Shard(1), HSDP replicas, tied
    weights), weights and optimizer, kept or cast, in tiny windows; the rank files' CRC-32s streamed, and
    (cast only, to keep the suite short) taken from what the comparison reads."""
    ckpt = copy_actor(verl_fixtures / name, tmp_path / "actor", optimizer=True)
    out = tmp_path / "out"
    result = streammerge.merge(ckpt, out, dtype=dtype, max_shard_size="20KB")
    assert result.warnings == [] and (out / "optimizer").is_dir()
    for checksums in ("streams", "compare") if dtype == "bfloat16" else ("streams",):
        report = streammerge.verify(out, ckpt, chunk_size=4096, checksums=checksums)
        assert report.ok, report.summary()
    if name.startswith("fsdp2") and dtype == "bfloat16":  # DTensor pieces read in order: checked from the reads
        assert any("computed from the bytes the comparison read" in n for n in report.notes), report.notes
    assert report.tensors_checked >= len(json.loads((out / INDEX).read_text())["weight_map"])
    assert report.bytes_read > sum(p.stat().st_size for p in out.glob("*.safetensors"))


@pytest.mark.parametrize("checksums", ["streams", "compare"])
def test_strided_and_two_d_sources_verify(tmp_path, checksums):
    """Column-major local tensors and (Shard, Shard) meshes: verify walks each piece in storage order. Read
    out of order, their records' CRC-32s are streamed after the comparison instead."""
    g = torch.Generator().manual_seed(3)
    specs = {
        "a": (torch.randn(13, 7, generator=g), [Shard(0), Shard(1)]),
        "b": (torch.randn(5, 9, 3, generator=g), [Replicate(), Shard(2)]),
        "c": (torch.randn(11, 6, generator=g), [Shard(1), Shard(1)]),
    }
    ckpt = write_rank_files(tmp_path / "actor", specs, (2, 3), strided=["a", "b", "c"])
    out = tmp_path / "out"
    streammerge.merge(ckpt, out, dtype="bfloat16", weights_only=True)
    report = streammerge.verify(out, ckpt, chunk_size=4096, checksums=checksums)
    assert report.ok, report.summary()
    assert report.tensors_checked == 3


# ---------------------------------------------------------------- damage, one kind at a time


@pytest.fixture(scope="module")
def merged(make_ckpt, tmp_path_factory) -> tuple[Path, Path]:
    """A real HSDP checkpoint with its optimizer, merged (weights cast to bfloat16) into several files."""
    base = tmp_path_factory.mktemp("merged")
    ckpt = copy_actor(make_ckpt(world_size=4, mesh=(2, 2)), base / "actor", optimizer=True)
    out = base / "out"
    streammerge.merge(ckpt, out, max_shard_size="100KB", dtype="bfloat16")
    return ckpt, out


def shards(out: Path) -> list[Path]:
    return sorted(out.glob("model-*.safetensors"))


def flip_data_byte(out: Path) -> None:
    p = shards(out)[1]
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x10
    p.write_bytes(bytes(data))


def edit_index(fn):
    def damage(out: Path) -> None:
        idx = json.loads((out / INDEX).read_text())
        fn(idx)
        (out / INDEX).write_text(json.dumps(idx))
    return damage


def edit_manifest(fn):
    def damage(out: Path) -> None:
        m = json.loads((out / STATE_DIR / MANIFEST).read_text())
        fn(m)
        (out / STATE_DIR / MANIFEST).write_text(json.dumps(m))
    return damage


def move_one_tensor(idx: dict) -> None:
    name = sorted(idx["weight_map"])[0]
    files = sorted(set(idx["weight_map"].values()))
    idx["weight_map"][name] = next(f for f in files if f != idx["weight_map"][name])


def gap_in_header(out: Path) -> None:
    """A valid-looking shard whose two tensors leave 8 bytes of data unaccounted for."""
    p = shards(out)[0]
    header = {"__metadata__": {"format": "pt"},
              "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "y": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    p.write_bytes(struct.pack("<Q", len(text)) + text + bytes(24))


def flip_optimizer_byte(out: Path) -> None:
    p = sorted((out / "optimizer").glob("optimizer-*.safetensors"))[-1]
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x20
    p.write_bytes(bytes(data))


# id -> (damage, words that some failure line must contain; with_ckpt: compare with the checkpoint too)
DAMAGE = {
    "flipped_byte": (flip_data_byte, ["model-00002-of-", "crc32", "differs from the manifest"], False),
    "flipped_byte_vs_source": (flip_data_byte, ["model-00002-of-", "elements in one window differ from rank"], True),
    "truncated": (lambda out: os.truncate(shards(out)[2], shards(out)[2].stat().st_size - 10),
                  ["model-00003-of-", "truncated"], False),
    "deleted_shard": (lambda out: shards(out)[0].unlink(), ["model-00001-of-", "does not exist"], False),
    "deleted_shard_vs_source": (lambda out: shards(out)[0].unlink(), ["model-00001-of-", "missing"], True),
    "index_maps_to_wrong_file": (edit_index(move_one_tensor), [INDEX, "which does not hold it"], False),
    "index_lacks_a_tensor": (edit_index(lambda idx: idx["weight_map"].pop(sorted(idx["weight_map"])[-1])),
                             ["does not map to it"], False),
    "index_total_size": (edit_index(lambda idx: idx["metadata"].update(total_size=1)), ["total_size 1"], False),
    "stray_shard": (lambda out: shutil.copyfile(shards(out)[0], out / "model-00042-of-00042.safetensors"),
                    ["model-00042-of-00042.safetensors", "not named by"], False),
    "unfinished_manifest": (edit_manifest(lambda m: m.update(complete=False)), ["did not finish", "resume"], False),
    "manifest_size": (edit_manifest(lambda m: m["files"]["config.json"].update(size=1)),
                      ["config.json", "manifest says 1"], False),
    "no_manifest": (lambda out: (out / STATE_DIR / MANIFEST).unlink(), ["no .streammerge/manifest.json"], False),
    "temp_file_left": (lambda out: tmp_path(shards(out)[0]).write_bytes(b"x"), ["temporary file"], False),
    "gap_in_header": (gap_in_header, ["model-00001-of-", "belong to no tensor"], False),
    "optimizer_byte": (flip_optimizer_byte, ["optimizer/optimizer-", "crc32"], False),
    "optimizer_byte_vs_source": (flip_optimizer_byte,
                                 ["optimizer/optimizer-", "differ from rank", "optim_world_size_4"], True),
    "optimizer_index": (lambda out: (out / "optimizer" / "optimizer.safetensors.index.json").write_text("{"),
                        ["optimizer/optimizer.safetensors.index.json", "unreadable index"], False),
    # an index that is JSON but no weight map: a failure line, never an internal error
    "index_weight_map_a_list": (edit_index(lambda idx: idx.update(weight_map=[])), [INDEX, "is a list"], False),
    "index_maps_to_a_number": (edit_index(lambda idx: idx["weight_map"].update({"x": 5})), [INDEX, "not a file"],
                               False),
    "index_maps_to_config_json": (edit_index(lambda idx: idx["weight_map"].update({"x": "config.json"})),
                                  [INDEX, "names config.json, which is not one of the folder's safetensors"], False),
    "index_maps_into_state_folder": (lambda out: (shutil.copyfile(shards(out)[0], out / STATE_DIR / "x.safetensors"),
                                                  edit_index(lambda idx: idx["weight_map"].update(
                                                      {"x": f"{STATE_DIR}/x.safetensors"}))(out)),
                                     [INDEX, "not one of the folder's safetensors"], False),
    "index_maps_outside": (edit_index(lambda idx: idx["weight_map"].update({"x": "/etc/passwd"})),
                           [INDEX, "outside the folder"], False),
    "index_maps_to_a_nul": (edit_index(lambda idx: idx["weight_map"].update({"x": "a\0b"})),
                            [INDEX, "which no file is named"], True),
    # an edited manifest: failure lines, not a ValueError out of verify (exit 2 naming no file)
    "manifest_crc32_a_string": (edit_manifest(lambda m: m["files"]["config.json"].update(crc32="x")),
                                ["config.json", "the manifest records crc32 'x', not a number"], False),
    "manifest_dtype_unknown": (edit_manifest(lambda m: m["options"].update(dtype="int3")),
                               ["manifest.json", "records options no merge takes (unknown dtype 'int3')"], True),
    "manifest_float32_names_a_string": (edit_manifest(lambda m: m["options"].update(float32_names="w")),
                                        ["manifest.json", "records options no merge takes"], False),
    # the header's metadata edited (same length): the tensors all compare equal, the file is not what the merge wrote
    "header_metadata_vs_source": (lambda out: shards(out)[0].write_bytes(
        shards(out)[0].read_bytes().replace(b'"format":"pt"', b'"format":"np"', 1)),
        ["model-00001-of-", "header is not the one the merge writes"], True),
    # files a loader reads that the merge never wrote: a chat template, other weights beside ours
    "added_chat_template": (lambda out: (out / "chat_template.jinja").write_text("{{ 'other' }}"),
                            ["chat_template.jinja", "not written by the merge"], True),
    "added_pytorch_model_bin": (lambda out: shutil.copyfile(shards(out)[0], out / "pytorch_model.bin"),
                                ["pytorch_model.bin", "not written by the merge"], True),
    # the same without the checkpoint: the manifest lists every file the merge wrote
    "added_chat_template_alone": (lambda out: (out / "chat_template.jinja").write_text("{{ 'other' }}"),
                                  ["chat_template.jinja", "not in .streammerge/manifest.json"], False),
    "added_tokenizer_file_alone": (lambda out: (out / "special_tokens_map.json").write_text('{"eos_token": "x"}'),
                                   ["special_tokens_map.json", "not in .streammerge/manifest.json"], False),
    "added_mistral_tokenizer_alone": (lambda out: (out / "tokenizer.model.v3").write_bytes(b"other vocabulary"),
                                      ["tokenizer.model.v3", "not in .streammerge/manifest.json"], False),
    "added_marian_spm": (lambda out: (out / "source.spm").write_bytes(b"other vocabulary"),
                         ["source.spm", "not written by the merge"], True),
    # a config.json changed, its manifest entry removed (so no crc32 to differ)
    "config_unlisted_and_changed": (lambda out: (edit_manifest(lambda m: m["files"].pop("config.json"))(out),
                                                 (out / "config.json").write_text('{"model_type": "llama"}')),
                                    ["config.json", "not in .streammerge/manifest.json"], False),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_named(case, merged, tmp_path, capsys):
    ckpt, good = merged
    damage, words, with_ckpt = DAMAGE[case]
    out = tmp_path / "out"
    shutil.copytree(good, out)
    damage(out)
    report = streammerge.verify(out, ckpt if with_ckpt else None)
    assert not report.ok
    assert any(all(w in f for w in words) for f in report.failures), report.summary()
    code = main(["verify", str(out)] + ([str(ckpt)] if with_ckpt else []))
    stdout = capsys.readouterr().out
    assert code == 1
    assert stdout.count("  FAIL ") == len(report.failures) > 0


def test_one_thread_reusing_its_buffers_names_every_damaged_tensor(merged, tmp_path):
    """One comparing thread, small windows: its buffers are reused for every window of every tensor, so a window
    compared after a good one (and a tensor after a damaged one) must still be compared with its own bytes."""
    ckpt, good = merged
    out = tmp_path / "out"
    shutil.copytree(good, out)
    flipped = []
    for p in shards(out)[:3]:
        data = bytearray(p.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        name, info = max(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
        data[8 + n + info["data_offsets"][1] - 1] ^= 0x40  # the last byte of the file's largest tensor
        p.write_bytes(bytes(data))
        flipped.append(name)
    assert streammerge.verify(good, ckpt, chunk_size=4096, workers=1).ok
    report = streammerge.verify(out, ckpt, chunk_size=4096, workers=1)
    assert sorted(n for f in report.failures for n in flipped if repr(n) in f) == sorted(flipped), report.summary()
    assert all("elements in one window differ" in f for f in report.failures), report.summary()


def test_the_undamaged_copy_verifies(merged, tmp_path, capsys):
    ckpt, good = merged
    out = tmp_path / "out"
    shutil.copytree(good, out)
    assert main(["verify", str(out), str(ckpt)]) == 0
    assert "OK" in capsys.readouterr().out


def test_files_in_a_folder_that_is_a_link_are_verified(merged, tmp_path):
    """optimizer/ replaced by a link to a copy with one flipped bit, and an added linked folder holding a chat template
    transformers' tokenizer reads: verify listed the folder's files with Path.rglob, which does not enter linked
    folders, and said OK (against the checkpoint, with a quarter of the tensors compared)."""
    ckpt, good = merged
    out = tmp_path / "out"
    shutil.copytree(good, out)
    counted = streammerge.verify(out, ckpt).tensors_checked
    shutil.move(out / "optimizer", tmp_path / "elsewhere")
    (out / "optimizer").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    same = streammerge.verify(out, ckpt)
    assert same.ok and same.tensors_checked == counted, same.summary()  # a link to the same files is the same folder
    flip_optimizer_byte(out)
    for checkpoint in (ckpt, None):
        report = streammerge.verify(out, checkpoint)
        assert any("optimizer/optimizer-" in f for f in report.failures), report.summary()
    shutil.rmtree(tmp_path / "elsewhere")
    shutil.copytree(good / "optimizer", tmp_path / "elsewhere")
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "default.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (out / "additional_chat_templates").symlink_to(tmp_path / "templates", target_is_directory=True)
    for checkpoint in (ckpt, None):
        report = streammerge.verify(out, checkpoint)
        assert [f for f in report.failures if "additional_chat_templates/default.jinja" in f], report.summary()


@pytest.mark.parametrize("checksums", ["streams", "compare"])
def test_verify_command_takes_the_crcs_where_told(merged, capsys, checksums):
    ckpt, out = merged
    assert main(["verify", str(out), str(ckpt), "--checksums", checksums]) == 0
    printed = capsys.readouterr().out
    assert "OK" in printed
    assert ("computed from the bytes the comparison read" in printed) == (checksums == "compare"), printed


def test_the_verify_process_prints_its_whole_report_and_exits_with_its_code(merged, tmp_path):
    """The process entry ends a read-only command without the interpreter's teardown: nothing printed may be lost
    (stdout a pipe, so block-buffered), and the exit code is the report's, unless the report could not be written."""
    ckpt, good = merged
    out = tmp_path / "out"
    shutil.copytree(good, out)
    shards(out)[0].write_bytes(b"")  # several failures: the file's own, and the index's about it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"PYTHONPATH": str(REPO)}
    cases = [(good, 0), (out, 1)]
    runs = run_together(*([sys.executable, "-m", "streammerge", "verify", str(f), str(ckpt)] for f, _ in cases),
                        cwd=REPO, env=env)
    for (folder, code), r in zip(cases, runs):
        report = streammerge.verify(folder, ckpt)
        assert r.returncode == code, r.stderr
        assert r.stdout == report.summary() + "\n"
        assert report.ok == (code == 0) and (code == 0 or len(report.failures) > 1)
    if os.path.exists("/dev/full"):  # a report that cannot be written is no success
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, "-m", "streammerge", "verify", str(good)], cwd=REPO, stdout=full,
                               stderr=subprocess.PIPE, text=True, env=env, timeout=300)
        assert r.returncode != 0


def test_a_verify_without_readahead_says_so(merged, monkeypatch):
    """Where the platform has no posix_fadvise (macOS), the comparison's readahead cannot be asked for: the result is
    the same, and the report says the fast path was not taken and why."""
    ckpt, out = merged
    assert not any("without readahead" in n for n in streammerge.verify(out, ckpt, checksums="compare").notes)
    monkeypatch.delattr(os, "posix_fadvise")
    report = streammerge.verify(out, ckpt, checksums="compare")
    assert report.ok, report.summary()
    assert any("without readahead: this platform has no posix_fadvise" in n for n in report.notes), report.notes


def test_another_checkpoint_is_not_the_source(merged, make_ckpt):
    ckpt, out = merged
    other = make_ckpt(world_size=4, mesh=(2, 2), seed=1)  # same names and shapes, other values
    report = streammerge.verify(out, other)
    assert any("was not made from" in f for f in report.failures)
    weights = json.loads((out / INDEX).read_text())["weight_map"]
    differ = [f for f in report.failures if "differ from rank" in f and f.startswith("model-")]
    assert len(differ) == len(weights) > 0  # every weight; of the optimizer, all but the equal step counts


def test_corrupted_source_data_is_caught_by_merge_verify(verl_fixtures, tmp_path, capsys):
    """torch.load never checks zip CRCs: a flipped bit in a rank's tensor data merges silently, --verify catches it."""
    ckpt = copy_actor(verl_fixtures / "fsdp2_llama_shard1_ws4", tmp_path / "actor")
    victim = ckpt / "model_world_size_4_rank_2.pt"
    with zipfile.ZipFile(victim) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)  # biggest tensor
    data = bytearray(victim.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 100] ^= 0x04
    victim.write_bytes(bytes(data))
    code = main([str(ckpt), str(tmp_path / "out"), "--verify"])
    out = capsys.readouterr().out
    assert code == 1
    assert "model_world_size_4_rank_2.pt" in out and "CRC32" in out and info.filename in out


def _flip_in_record(path: Path, info: zipfile.ZipInfo, at: int) -> None:
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + at] ^= 0x04
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("checksums", ["streams", "compare"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_corrupted_record_is_caught_whichever_way_its_crc_is_taken(verl_fixtures, tmp_path, checksums, where):
    """A flipped bit in a rank's tensor data, merged as it is now (so the output equals the source): only the
    record's CRC-32 can tell, whether streamed or computed from the comparison's reads. The flip sits at a
    record's first, a middle or its last byte, so a running CRC that skipped a window's edge would miss it."""
    ckpt = copy_actor(verl_fixtures / "fsdp2_llama_shard1_ws4", tmp_path / "actor", optimizer=True)
    victim = ckpt / "optim_world_size_4_rank_3.pt"
    with zipfile.ZipFile(victim) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    _flip_in_record(victim, info, {"first": 0, "middle": info.file_size // 2, "last": info.file_size - 1}[where])
    out = tmp_path / "out"
    streammerge.merge(ckpt, out, dtype="keep")
    report = streammerge.verify(out, ckpt, chunk_size=4096, checksums=checksums)
    bad = [f for f in report.failures if info.filename in f and "CRC32" in f]
    assert len(bad) == 1 and victim.name in bad[0], report.summary()
    assert not [f for f in report.failures if "differ" in f], report.summary()  # the output is what the file holds
    assert ("over the bytes torch.load mapped" in bad[0]) == (checksums == "compare"), bad[0]


@pytest.mark.parametrize("checksums", ["streams", "compare"])
@pytest.mark.parametrize("where", ["before", "after"])
def test_a_flip_in_storage_outside_its_tensor_is_caught_by_the_crc(tmp_path, checksums, where):
    """torch.save writes a view's whole storage: bytes before and after the tensor are in its record, never
    compared, and a running CRC over the comparison's reads must take them in too."""
    g = torch.Generator().manual_seed(4)
    ckpt = write_rank_files(tmp_path / "actor", {"w": torch.randn(8, 6, generator=g)}, (2,), padded=["w"])
    out = tmp_path / "out"
    streammerge.merge(ckpt, out, dtype="keep", weights_only=True)
    assert streammerge.verify(out, ckpt, checksums=checksums).ok
    victim = ckpt / "model_world_size_2_rank_0.pt"  # the full copy torch's reader compares (rank 1's is streamed)
    with zipfile.ZipFile(victim) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert info.file_size == (3 + 8 * 6 + 5) * 4  # the whole storage
    _flip_in_record(victim, info, 1 if where == "before" else info.file_size - 2)
    report = streammerge.verify(out, ckpt, checksums=checksums)
    bad = [f for f in report.failures if info.filename in f and "CRC32" in f]
    assert len(bad) == 1 and len(report.failures) == 1, report.summary()
    assert ("over the bytes torch.load mapped" in bad[0]) == (checksums == "compare"), bad[0]


def _zipfile_bad_record(path: Path) -> str | None:
    """The standard library's verdict on a zip: the first record its reader fails on (read to its end, where the
    CRC is checked), "?" when the file cannot be read as a zip, None when all hold. Each record is opened by its
    directory entry: testzip() opens by name, and a flip that makes two names equal would have it read one twice."""
    record = "?"
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                record = info.filename
                with z.open(info) as fh:
                    while fh.read(2**20):
                        pass
    except Exception:
        return record
    return None


def _deflate_small_records(src: Path, dst: Path) -> None:
    """The rank file again with its pickle and small records deflated (torch.save stores them; a zip may not)."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for info in z.infolist():
            packed = zipfile.ZIP_STORED if "/data/" in info.filename else zipfile.ZIP_DEFLATED
            out.writestr(info.filename, z.read(info), compress_type=packed)


@pytest.mark.parametrize("deflated", [False, True])
def test_crc_streams_agree_with_zipfile_on_mutated_rank_files(verl_fixtures, tmp_path, deflated):
    """check_integrity reads stored records itself (os.preadv, zlib.crc32) and hands any other kind to zipfile: on
    a real rank file with one flipped bit at every header field, name, first and last data byte, the central
    directory, the end record and random places, and truncated, it finds a bad record exactly when zipfile's own
    reader fails on one, and names that record."""
    src = verl_fixtures / "fsdp2_llama_shard1_ws4" / "model_world_size_4_rank_1.pt"
    if deflated:
        _deflate_small_records(src, tmp_path / "deflated.pt")
        src = tmp_path / "deflated.pt"
    data = src.read_bytes()
    oracle = VerlOracle([src], 4)
    assert oracle.check_integrity([src]) == [] and _zipfile_bad_record(src) is None
    slow = oracle.crc_by_slow_reader()  # the fallback is counted, by why
    with zipfile.ZipFile(src) as z:
        deflated_records = sum(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
    assert slow == ({"compressed (method 8)": deflated_records} if deflated else {})
    assert deflated_records > 0 or not deflated
    with zipfile.ZipFile(src) as z:
        infos, start_dir = z.infolist(), z.start_dir
    places = set(range(start_dir, len(data), 7)) | set(range(len(data) - 22, len(data)))
    for info in infos:
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        begin = info.header_offset + 30 + name_len + extra_len
        places |= {info.header_offset + k for k in (0, 3, 6, 7, 8, 14, 18, 22, 26, 27, 28, 30, 30 + name_len - 1)}
        places |= {begin, begin + info.compress_size // 2, begin + info.compress_size - 1}
    rng = random.Random(0)
    places |= {rng.randrange(len(data)) for _ in range(40)}
    mutants = [(at, 1 << rng.randrange(8)) for at in sorted(places)] + [(-1, 0)]  # (-1, 0): cut in half
    streamed = 0
    for i, (at, bit) in enumerate(mutants):
        victim = tmp_path / f"mutant{i}.pt"
        mutated = bytearray(data) if at >= 0 else bytearray(data[:len(data) // 2])
        if at >= 0:
            mutated[at] ^= bit
        victim.write_bytes(bytes(mutated))
        found = VerlOracle([victim], 4).check_integrity([victim])
        named = _zipfile_bad_record(victim)
        assert bool(found) == (named is not None), (at, bit, found)
        if named is not None:
            assert len(found) == 1 and f"zip record {named} " in found[0], (at, bit, found)
            streamed += "/data/" in named
        victim.unlink()
    assert streamed >= 2 * sum("/data/" in i.filename for i in infos)  # every tensor record's first and last byte


@pytest.mark.slow
def test_verify_reads_in_bounded_memory(tmp_path):
    """32 MB and 128 MB tensors verified with 512 KiB chunks, files cold: the peak RSS grows by a fixed
    amount (threads, windows, torch), never by the tensor. Mapped rank-file pages peak a little higher on
    the longer tensor (cold files: about 13 MiB more, and the same for a 512 MB tensor)."""
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so this child would start at this test process's peak
    hwm = "next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))"
    commands = {}
    for rows in (2048, 8192):
        g = torch.Generator().manual_seed(0)
        ckpt = write_rank_files(tmp_path / f"actor{rows}", {"w": (torch.randn(rows, 4096, generator=g), [Shard(1)])},
                                (2,))
        out = tmp_path / f"out{rows}"
        streammerge.merge(ckpt, out, weights_only=True)
        for f in [*ckpt.glob("*.pt"), *out.glob("*.safetensors")]:  # cold, as after a merge of a large model
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        code = ("import sys, streammerge, streammerge.sources.verl_oracle, torch\n"
                f"before = {hwm}\n"
                f"r = streammerge.verify({str(out)!r}, {str(ckpt)!r}, chunk_size='512KiB')\n"
                "assert r.ok, r.summary()\n"
                f"print({hwm} - before)\n")
        commands[rows] = [sys.executable, "-c", code]
    grown = {}
    runs = run_together(*commands.values(), cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    for rows, r in zip(commands, runs):  # each its own peak (VmHWM), so side by side
        assert r.returncode == 0, r.stderr
        grown[rows] = int(r.stdout.strip().splitlines()[-1])
    print(f"verify grew peak RSS by {grown[2048] / 2**20:.1f} MiB (32 MB tensor), "
          f"{grown[8192] / 2**20:.1f} MiB (128 MB)")
    assert abs(grown[8192] - grown[2048]) < 24 * 2**20, grown  # a tensor 96 MB larger
    assert grown[8192] < 128 * 2**20, grown


# ---------------------------------------------------------------- HSDP replicas


@pytest.mark.parametrize("rank", [0, 2])  # rank 0's copy is the one the merge reads; rank 2's is its replica
@pytest.mark.parametrize("kind", ["model", "optim"])
def test_a_diverged_hsdp_replica_is_named_by_verify(kind, rank, make_ckpt, tmp_path, capsys):
    """Mesh (2, 2), (Replicate(), Shard(0)): ranks 0 and 2 hold the same shards. One of them re-saved with one
    changed value (valid CRCs) merges (the merge reads one replica), and verify names the file and the tensor."""
    ckpt = copy_actor(make_ckpt(world_size=4, mesh=(2, 2)), tmp_path / "actor", optimizer=True)
    victim = ckpt / f"{kind}_world_size_4_rank_{rank}.pt"
    name = diverge(victim, "model.layers.0.")
    out = tmp_path / "out"
    streammerge.merge(ckpt, out)
    for checksums in ("streams", "compare"):
        report = streammerge.verify(out, ckpt, checksums=checksums, chunk_size=4096)
        replica = [f for f in report.failures if "differ from its replica" in f]
        assert len(replica) == 1, report.summary()
        assert str(ckpt / f"{kind}_world_size_4_rank_2.pt") in replica[0] and repr(name) in replica[0]
        assert f"{kind}_world_size_4_rank_0.pt" in replica[0]
        assert "CRC32" not in report.summary()  # torch.save wrote every record's CRC afresh
        if rank == 2:  # the merge read rank 0's copy: the output itself matches it
            assert report.failures == replica, report.summary()
    assert main(["verify", str(out), str(ckpt)]) == 1
    assert "differ from its replica" in capsys.readouterr().out


@pytest.mark.parametrize("checksums", ["streams", "compare"])
def test_a_diverged_fsdp1_hsdp_flat_optimizer_shard_is_named_by_verify(verl_fixtures, tmp_path, checksums):
    """FSDP1 with HYBRID_SHARD: the flat optimizer shards are plain tensors, compared through the merge's reader
    (one replica); their other replica is compared with it too. Ranks 0 and 2 hold the same shard."""
    ckpt = copy_actor(verl_fixtures / "fsdp1_hsdp_llama_2x2", tmp_path / "actor", optimizer=True)
    victim = ckpt / "optim_world_size_4_rank_2.pt"
    osd = torch.load(victim, map_location="cpu", weights_only=True)
    osd["state"][1]["exp_avg"][-1] += 1.0
    torch.save(osd, victim)
    out = tmp_path / "out"
    streammerge.merge(ckpt, out)
    report = streammerge.verify(out, ckpt, checksums=checksums, chunk_size=4096)
    n = osd["state"][1]["exp_avg"].numel()
    assert report.failures == [
        f"{victim}: tensor 'state.1.exp_avg': 1 of {n} elements in one window differ from its replica in "
        f"optim_world_size_4_rank_0.pt (first at index [{n - 1}]): replicas of one "
        "shard hold the same values, so one of these files diverged or comes from another save (the merge copies "
        "optim_world_size_4_rank_0.pt's); copy the rank files of one save again"], report.summary()
    clean = copy_actor(verl_fixtures / "fsdp1_hsdp_llama_2x2", tmp_path / "clean", optimizer=True)
    streammerge.merge(clean, tmp_path / "out2")
    assert streammerge.verify(tmp_path / "out2", clean, checksums=checksums).ok


# ---------------------------------------------------------------- the small files, against the checkpoint


@pytest.fixture(scope="module")
def merged_keep(make_ckpt, tmp_path_factory) -> tuple[Path, Path]:
    """The HSDP checkpoint with its optimizer, merged with the default options but dtypes as saved (what verify
    re-plans with when the folder has no manifest)."""
    base = tmp_path_factory.mktemp("merged_keep")
    ckpt = copy_actor(make_ckpt(world_size=4, mesh=(2, 2)), base / "actor", optimizer=True)
    out = base / "out"
    streammerge.merge(ckpt, out, dtype="keep")
    return ckpt, out


def _rewrite(out: Path, rel: str, edit) -> None:
    """Change a small file and record it in the manifest as written so: its checksum alone cannot tell."""
    from streammerge.checksum import crc32

    path = out / rel
    data = edit(path.read_bytes())
    path.write_bytes(data)
    m = json.loads((out / STATE_DIR / MANIFEST).read_text())
    entry = m["files"][rel]
    entry.update(size=len(data), crc32=crc32(data), mtime_ns=path.stat().st_mtime_ns)
    entry.pop("sha256", None)
    (out / STATE_DIR / MANIFEST).write_text(json.dumps(m))


def _edit_json(fn):
    def edit(data: bytes) -> bytes:
        obj = json.loads(data)
        fn(obj)
        return json.dumps(obj, indent=2).encode()
    return edit


SMALL_EDITS = {
    "config.json": (_edit_json(lambda c: c.update(rms_norm_eps=0.5)), "'rms_norm_eps' is 0.5, the checkpoint gives"),
    "generation_config.json": (_edit_json(lambda c: c.update(temperature=3.0)), "'temperature' is 3.0"),
    "tokenizer.json": (lambda b: b.replace(b'"', b"'", 1), "bytes, the checkpoint gives"),
    "optimizer/optimizer.safetensors.index.json": (
        _edit_json(lambda i: i["metadata"].update(param_groups=i["metadata"]["param_groups"].replace("0.", "0.9", 1))),
        "'metadata' is"),
}


@pytest.mark.parametrize("rel", list(SMALL_EDITS))
def test_an_edited_small_file_is_named_against_the_checkpoint(rel, merged_keep, tmp_path):
    """config.json, generation_config.json, the tokenizer, the optimizer's index (its param groups): compared byte for
    byte with what the merge writes from the checkpoint, so an edit the manifest was made to agree with is caught."""
    ckpt, good = merged_keep
    assert (good / rel).is_file(), sorted(p.name for p in good.iterdir())
    out = tmp_path / "out"
    shutil.copytree(good, out)
    edit, words = SMALL_EDITS[rel]
    _rewrite(out, rel, edit)
    assert streammerge.verify(out).ok  # the folder alone: its manifest agrees
    report = streammerge.verify(out, ckpt)
    assert [f for f in report.failures if f.startswith(f"{rel}: differs from what the merge writes")], report.summary()
    assert any(words in f for f in report.failures), report.summary()
    assert rel in report.files_checked


def test_without_a_manifest_the_checkpoint_still_checks_everything(merged_keep, tmp_path):
    """No manifest, but the checkpoint given: a note, not a failure; the small files are still compared."""
    ckpt, good = merged_keep
    out = tmp_path / "out"
    shutil.copytree(good, out)
    shutil.rmtree(out / STATE_DIR)
    report = streammerge.verify(out, ckpt)
    assert report.ok, report.summary()
    assert any(n.startswith("no manifest: ") for n in report.notes), report.notes
    assert {"config.json", "optimizer/optimizer.safetensors.index.json"} <= report.files_checked
    assert report.tensors_checked > 0
    assert not [n for n in report.notes if "the checkpoint gives nothing for" in n]
    assert not streammerge.verify(out).ok  # the folder alone: nothing to check it against
    # files a loader reads that the checkpoint gives nothing for (another tool's, or added): passed with no word
    (out / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (out / "extra_templates").mkdir()
    (out / "extra_templates" / "tools.jinja").write_text("{{ tools }}")
    report = streammerge.verify(out, ckpt)
    assert report.ok and [n for n in report.notes if n.startswith("2 files the checkpoint gives nothing for are not "
                                                                  "compared") and "chat_template.jinja" in n
                          and "extra_templates/tools.jinja" in n], report.notes
    (out / "chat_template.jinja").unlink()
    shutil.rmtree(out / "extra_templates")
    config = json.loads((out / "config.json").read_text())
    config["hidden_act"] = "relu"
    (out / "config.json").write_text(json.dumps(config))
    report = streammerge.verify(out, ckpt)
    assert report.failures == ["config.json: differs from what the merge writes from the checkpoint ('hidden_act' is "
                               "'relu', the checkpoint gives 'silu'); rerun the merge to write it again"], \
        report.summary()


def _resave(edit):
    def rewrite(data: bytes) -> bytes:
        import io

        osd = torch.load(io.BytesIO(data), weights_only=True)
        edit(osd)
        buf = io.BytesIO()
        torch.save(osd, buf)
        return buf.getvalue()
    return rewrite


def _relaid(osd: dict, storage, offset: int, stride) -> None:
    """A 2-D exp_avg whose record holds its bytes as the merge writes them (row-major from the first byte), but whose
    view starts later in the record or reads it column-major: torch.load gives other values."""
    state = next(s for s in osd["state"].values() if s["exp_avg"].dim() == 2)
    t = state["exp_avg"]
    view = torch.empty(0, dtype=t.dtype).set_(storage(t).untyped_storage(), offset, t.shape,
                                              stride(t) if stride else t.stride())
    assert not torch.equal(view, t)
    state["exp_avg"] = view


def _alias_steps(osd: dict) -> None:
    """Two parameters' step counts (equal values) as one record."""
    first, second = list(osd["state"].values())[:2]
    second["step"] = first["step"]


@pytest.mark.parametrize("edit", [
    lambda osd: osd["param_groups"][0].update(lr=123.0),
    lambda osd: osd["param_groups"][0].update(betas=list(osd["param_groups"][0]["betas"])),
    lambda osd: osd.update(extra={"scheduler": 1}),
    lambda osd: _relaid(osd, lambda t: torch.cat([t.reshape(-1), t.reshape(-1)[:1]]), 1, None),
    lambda osd: _relaid(osd, lambda t: t.contiguous().reshape(-1), 0, lambda t: (1, t.shape[0])),
    lambda osd: _alias_steps(osd),
], ids=["lr", "betas_a_list", "extra_key", "starts_later_in_its_record", "read_column_major", "one_record_shared"])
def test_an_optimizer_pt_whose_pickle_changed_fails_against_the_checkpoint(merged_keep, tmp_path, edit):
    """--optimizer-format torch: optimizer.pt re-saved with its tensors unchanged but another lr (or any other
    difference load_optimizer_state_dict would return), the manifest agreeing: the records compare equal, the pickle
    is not what the merge writes."""
    ckpt, _ = merged_keep
    out = tmp_path / "out"
    streammerge.merge(ckpt, out, dtype="keep", optimizer_format="torch")
    assert streammerge.verify(out, ckpt).ok
    _rewrite(out, "optimizer/optimizer.pt", _resave(edit))
    assert streammerge.verify(out).ok  # the folder alone: its manifest agrees
    report = streammerge.verify(out, ckpt)
    assert len(report.failures) == 1, report.summary()
    assert report.failures[0].startswith("optimizer/optimizer.pt: ") and report.failures[0].endswith(
        "; rerun the merge to write it again") and ("pickle differs" in report.failures[0]
                                                    or "share one record" in report.failures[0]), report.summary()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_folder_transformers_wrote_is_compared_as_it_holds_the_weights(merged_keep, tmp_path, dtype):
    """No manifest: a folder another tool wrote (here save_pretrained, as veRL's model merger does), in its own dtype,
    shards and JSON formatting and without the optimizer, is compared tensor by tensor with the checkpoint, cast to
    the dtype it holds; one changed element, a missing tensor or another config value fails."""
    import transformers
    from safetensors.torch import load_file, save_file

    ckpt, good = merged_keep
    model = transformers.AutoModelForCausalLM.from_pretrained(good, dtype=torch.float32)
    folder = tmp_path / "folder"
    model.to(dtype).save_pretrained(folder, max_shard_size="300KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1 and not (folder / STATE_DIR).exists()
    alone = streammerge.verify(folder)  # nothing to compare the tensors with: refused, saying what would do
    assert not alone.ok and any("give the checkpoint too (streammerge verify OUT CKPT)" in f for f in alone.failures)
    report = streammerge.verify(folder, ckpt)
    assert report.ok, report.summary()
    name = str(dtype).removeprefix("torch.")
    assert any(n.startswith(f"no manifest: compared as a merge cast to {name} ") for n in report.notes), report.notes
    held = {k for f in shards for k in load_file(f)}
    assert report.tensors_checked == len(held)

    def edited(tmp: str, edit) -> Path:
        out = tmp_path / tmp
        shutil.copytree(folder, out)
        edit(out)
        return out

    def change_one(out: Path) -> None:
        state = load_file(out / shards[-1].name)
        key = sorted(k for k, v in state.items() if v.is_floating_point())[0]
        state[key].view(-1)[0] += 1
        save_file(state, out / shards[-1].name, metadata={"format": "pt"})

    failures = streammerge.verify(edited("changed", change_one), ckpt).failures
    assert failures and all(shards[-1].name in f for f in failures), failures

    def drop_one(out: Path) -> None:
        state = load_file(out / shards[0].name)
        gone = sorted(state)[0]
        del state[gone]
        save_file(state, out / shards[0].name, metadata={"format": "pt"})
        index = json.loads((out / "model.safetensors.index.json").read_text())
        del index["weight_map"][gone]
        (out / "model.safetensors.index.json").write_text(json.dumps(index))

    failures = streammerge.verify(edited("dropped", drop_one), ckpt).failures
    assert any("in none of the folder's files (the checkpoint has it)" in f for f in failures), failures

    def other_config(out: Path) -> None:
        config = json.loads((out / "config.json").read_text())
        config["rms_norm_eps"] *= 10
        (out / "config.json").write_text(json.dumps(config))

    for rel in ("config.json", "generation_config.json"):  # transformers would load no model, or generate otherwise
        failures = streammerge.verify(edited(f"no_{rel}", lambda out, rel=rel: (out / rel).unlink()), ckpt).failures
        assert any(f.startswith(f"{rel}: not in the folder, and the checkpoint gives one") for f in failures), failures

    failures = streammerge.verify(edited("config", other_config), ckpt).failures
    assert any(f.startswith("config.json: differs from what the merge writes") and "'rms_norm_eps' is" in f
               for f in failures), failures

    def other_dtype(out: Path) -> None:  # transformers' dtype="auto" would load the weights cast
        config = json.loads((out / "config.json").read_text())
        config["dtype"] = "float16"
        (out / "config.json").write_text(json.dumps(config))

    failures = streammerge.verify(edited("dtype", other_dtype), ckpt).failures
    assert f"config.json: names the dtype float16, but the weights are {name}: transformers would load them cast to " \
           "it, not as they are" in failures, failures

    def decoy(out: Path) -> None:  # an unchanged copy beside, the changed one where the index points
        shutil.copyfile(out / shards[-1].name, out / "backup.safetensors")
        change_one(out)

    report = streammerge.verify(edited("decoy", decoy), ckpt)
    assert report.failures and all(shards[-1].name in f for f in report.failures), report.summary()
    assert "backup.safetensors: not a file transformers loads from this folder; not compared" in report.notes


def test_a_model_card_is_not_made_again_and_the_report_says_so(merged_keep, tmp_path):
    """push writes a README.md model card that re-planning does not make: a note, not a failure."""
    ckpt, good = merged_keep
    out = tmp_path / "out"
    shutil.copytree(good, out)
    (out / "README.md").write_text("# a card\n")
    report = streammerge.verify(out, ckpt)
    assert report.ok, report.summary()
    assert any(n.startswith("README.md: a model card") for n in report.notes), report.notes


# ---------------------------------------------------------------- files beside the weights that change what loads


def test_an_adapter_config_beside_config_json_is_never_written_and_fails_verify(make_ckpt, tmp_path):
    """A checkpoint with no LoRA whose huggingface/ holds peft's adapter_config.json: copied beside config.json it
    would make transformers load OUT as an adapter of another base. Left out with a warning; verify fails a folder
    that has one."""
    from transformers import AutoModelForCausalLM

    ckpt = copy_actor(make_ckpt(), tmp_path / "actor")
    adapter = json.dumps({"peft_type": "LORA", "base_model_name_or_path": "meta-llama/Llama-3.2-1B", "r": 8,
                          "lora_alpha": 16, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"})
    (ckpt / "huggingface" / "adapter_config.json").write_text(adapter)
    out = tmp_path / "out"
    result = streammerge.merge(ckpt, out, optimizer=False)
    assert not (out / "adapter_config.json").exists()
    assert any("adapter_config.json: not copied" in w for w in result.warnings), result.warnings
    AutoModelForCausalLM.from_pretrained(out)  # a model, not an adapter
    assert streammerge.verify(out, ckpt).ok
    (out / "adapter_config.json").write_text(adapter)
    report = streammerge.verify(out, ckpt)
    assert [f for f in report.failures if f.startswith("adapter_config.json: beside config.json")], report.summary()


def test_a_small_file_the_checkpoint_no_longer_gives_is_removed_by_the_rerun(make_ckpt, tmp_path):
    """Merged with a chat template, which is then removed from the checkpoint's huggingface/: verify fails the
    folder (the manifest lists a file the plan does not write), and a rerun of the merge removes it."""
    from transformers import AutoTokenizer

    ckpt = copy_actor(make_ckpt(), tmp_path / "actor")
    (ckpt / "huggingface" / "chat_template.jinja").write_text("{{ 'OLD TEMPLATE' }}")
    out = tmp_path / "out"
    streammerge.merge(ckpt, out, optimizer=False)
    assert AutoTokenizer.from_pretrained(out).chat_template == "{{ 'OLD TEMPLATE' }}"
    (ckpt / "huggingface" / "chat_template.jinja").unlink()
    report = streammerge.verify(out, ckpt)
    assert [f for f in report.failures if f.startswith("chat_template.jinja: an earlier run")], report.summary()
    result = streammerge.merge(ckpt, out, optimizer=False)
    assert not (out / "chat_template.jinja").exists()
    assert any(w.startswith("removed chat_template.jinja") for w in result.warnings), result.warnings
    assert AutoTokenizer.from_pretrained(out).chat_template is None
    assert streammerge.verify(out, ckpt).ok


def test_verify_from_another_folder_finds_a_relative_model_name(make_ckpt, tmp_path, monkeypatch):
    """--model-name given as a folder relative to where the merge ran: the manifest records it absolute, so verify
    (or a resume) run from elsewhere finds the same config and tokenizer."""
    ckpt = copy_actor(make_ckpt(), tmp_path / "a" / "ckpt")
    (ckpt / "huggingface").rename(tmp_path / "a" / "mdl")
    monkeypatch.chdir(tmp_path / "a")
    streammerge.merge("ckpt", tmp_path / "out", model_name="mdl", optimizer=False)
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    report = streammerge.verify(tmp_path / "out", tmp_path / "a" / "ckpt")
    assert report.ok, report.summary()


def test_a_rerun_removes_the_temp_file_of_a_small_file_it_no_longer_writes(make_ckpt, tmp_path):
    """A merge killed while it wrote a small file the checkpoint has since lost leaves that file's temp copy, under
    the name no planned file has: the rerun removes every file of our temp suffix (never another name)."""
    from streammerge.write.writer import tmp_path as temp_of

    ckpt = copy_actor(make_ckpt(), tmp_path / "actor")
    out = tmp_path / "out"
    streammerge.merge(ckpt, out, optimizer=False)
    temp_of(out / "chat_template.jinja").write_text("{{ 'half written' }}")
    (out / "notes.md").write_text("mine")
    streammerge.merge(ckpt, out, optimizer=False)
    assert not temp_of(out / "chat_template.jinja").exists() and (out / "notes.md").exists()
    assert streammerge.verify(out, ckpt).ok
