"""Broken checkpoints through the real CLI: one line naming the file and the problem, exit 2, no traceback.

Every case starts from a good checkpoint (real DTensor rank files) and breaks it the way it breaks in
practice: a node's ranks never copied, a file cut short, two runs in one folder, a rank re-saved with
a different shape... The source folder is never modified, and nothing is written for a bad input.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from ckpt_tools import REPO, copy_actor, device_mesh, rewrite_rank, run_together, snapshot
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor.placement_types import _StridedShard

import streammerge
from streammerge.cli import main
from streammerge.errors import CheckpointError, ConfigError

WS = 4


def rank(d: Path, r: int, ws: int = WS) -> Path:
    return d / f"model_world_size_{ws}_rank_{r}.pt"


def redo(t: DTensor, r: int, *, local: torch.Tensor | None = None, placements=None, shape=None) -> DTensor:
    """The same DTensor as rank r would save it, with one thing changed."""
    local = t._local_tensor if local is None else local
    shape = tuple(t.shape) if shape is None else shape
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, device_mesh((WS,), r), list(placements or t.placements), run_check=False,
                              shape=shape, stride=stride)


def edit_rank(r: int, fn):
    def breaker(d: Path) -> None:
        rewrite_rank(rank(d, r), lambda sd: fn(sd, r))
    return breaker


def _set(sd: dict, key: str, value) -> dict:
    sd[key] = value
    return sd


def _flip_pickle(d: Path) -> None:
    p = rank(d, 1)
    with zipfile.ZipFile(p) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    data = bytearray(p.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + 40  # inside the pickle stream
    for i in range(start, start + 16):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))


def _truncate(fraction: float):
    def breaker(d: Path) -> None:
        p = rank(d, 2)
        os.truncate(p, int(p.stat().st_size * fraction))
    return breaker


def _empty_ckpt(d: Path) -> None:
    for r in range(WS):
        torch.save({"step": 3}, rank(d, r))


def _not_a_checkpoint(d: Path) -> None:
    for p in d.glob("*.pt"):
        p.unlink()
    (d / "notes.txt").write_text("not a checkpoint")


DOWN = "model.layers.0.mlp.down_proj.weight"
NORM = "model.norm.weight"

# id -> (how to break a good checkpoint, words the one-line error must contain; "{d}" is the checkpoint folder)
DEEP = "[" * 100_000 + "]" * 100_000  # 200 kB of JSON nested past Python's recursion limit
CASES = {
    "missing_ranks": (lambda d: [rank(d, 1).unlink(), rank(d, 3).unlink()],
                      ["{d}", "missing model rank files", "rank(s) 1, 3", "world size 4"]),
    "missing_ranks_no_fsdp_config": (lambda d: [rank(d, 3).unlink(), (d / "fsdp_config.json").unlink()],
                                     ["{d}", "missing model rank files", "rank(s) 3"]),
    "two_world_sizes": (lambda d: shutil.copyfile(rank(d, 0), rank(d, 0, ws=2)),
                        ["{d}", "several world sizes [2, 4]", "remove the files of world size [2]"]),
    "two_world_sizes_no_fsdp_config": (lambda d: [shutil.copyfile(rank(d, 0), rank(d, 0, ws=2)),
                                                  (d / "fsdp_config.json").unlink()],
                                       ["{d}", "several world sizes [2, 4]"]),
    "config_names_absent_world_size": (lambda d: (d / "fsdp_config.json").write_text('{"world_size": 8}'),
                                       ["fsdp_config.json", "world_size 8", "found world sizes [4]"]),
    "fsdp_config_unreadable": (lambda d: (d / "fsdp_config.json").write_text("{oops"),
                               ["fsdp_config.json", "unreadable"]),
    "fsdp_config_nested_too_deeply": (lambda d: (d / "fsdp_config.json").write_text(DEEP),
                                      ["fsdp_config.json", "unreadable", "recursion"]),
    "config_nested_too_deeply": (lambda d: (d / "huggingface" / "config.json").write_text(DEEP),
                                 ["config.json", "not valid JSON", "recursion"]),
    "config_is_a_pipe": (lambda d: [(d / "huggingface" / "config.json").unlink(),
                                    os.mkfifo(d / "huggingface" / "config.json")],
                         ["huggingface/config.json", "not a file"]),
    "tokenizer_links_to_nothing": (lambda d: [(d / "huggingface" / "tokenizer.json").unlink(),
                                              (d / "huggingface" / "tokenizer.json").symlink_to(d / "gone.json")],
                                   ["huggingface/tokenizer.json", "not a file"]),
    "truncated_half": (_truncate(0.5), ["model_world_size_4_rank_2.pt", "truncated or corrupted"]),
    "truncated_tail": (_truncate(0.995), ["model_world_size_4_rank_2.pt", "truncated or corrupted"]),
    "zero_bytes": (_truncate(0.0), ["model_world_size_4_rank_2.pt", "truncated or corrupted", "0 bytes"]),
    "not_a_zip": (lambda d: rank(d, 2).write_bytes(os.urandom(4096)),
                  ["model_world_size_4_rank_2.pt", "truncated or corrupted"]),
    "flipped_pickle_bytes": (_flip_pickle, ["model_world_size_4_rank_1.pt", "corrupted", "CRC"]),
    "other_global_shape": (edit_rank(1, lambda sd, r: _set(sd, DOWN, redo(
                               sd[DOWN], r, local=sd[DOWN]._local_tensor[:, :-1].clone(),
                               shape=(sd[DOWN].shape[0], sd[DOWN].shape[1] - 1)))),
                           ["model_world_size_4_rank_1.pt", DOWN, "shape", "different runs"]),
    "wrong_local_shape": (edit_rank(1, lambda sd, r: _set(sd, DOWN, redo(sd[DOWN], r,
                                                                           local=sd[DOWN]._local_tensor[:-1].clone()))),
                          ["model_world_size_4_rank_1.pt", DOWN, "local shape"]),
    "other_dtype": (edit_rank(2, lambda sd, r: _set(sd, NORM, redo(sd[NORM], r,
                                                                     local=sd[NORM]._local_tensor.bfloat16()))),
                    ["model_world_size_4_rank_2.pt", NORM, "dtype torch.bfloat16", "rank 0 has torch.float32"]),
    "other_placements": (edit_rank(3, lambda sd, r: _set(sd, NORM, redo(sd[NORM], r,
                                                                          placements=[Replicate()]))),
                         ["model_world_size_4_rank_3.pt", NORM, "placements"]),
    "extra_name": (edit_rank(1, lambda sd, r: _set(sd, "model.extra.weight", torch.zeros(3))),
                   ["model_world_size_4_rank_1.pt", "names differ", "model.extra.weight"]),
    "missing_name": (edit_rank(2, lambda sd, r: {k: v for k, v in sd.items() if k != NORM}),
                     ["model_world_size_4_rank_2.pt", "names differ", "lacks", NORM]),
    "rank_file_copied_over_another": (lambda d: shutil.copyfile(rank(d, 0), rank(d, 1)),
                                      ["model_world_size_4_rank_1.pt", "same mesh coordinate",
                                       "model_world_size_4_rank_0.pt"]),
    "partial_placement": (edit_rank(0, lambda sd, r: _set(sd, NORM, redo(sd[NORM], r, placements=[Partial()]))),
                          ["model_world_size_4_rank_0.pt", NORM, "Partial"]),
    "strided_shard_placement": (edit_rank(0, lambda sd, r: _set(sd, NORM, redo(
                                    sd[NORM], r, placements=[_StridedShard(0, split_factor=2)]))),
                                ["model_world_size_4_rank_0.pt", NORM, "_StridedShard", "not supported"]),
    "sparse_layout": (edit_rank(0, lambda sd, r: _set(sd, NORM, torch.zeros(sd[NORM].shape).to_sparse())),
                      ["model_world_size_4_rank_0.pt", NORM, "sparse", "only dense"]),
    "not_a_state_dict": (lambda d: torch.save([1, 2, 3], rank(d, 0)),
                         ["model_world_size_4_rank_0.pt", "expected a state dict"]),
    "empty_checkpoint": (_empty_ckpt, ["{d}", "no tensors", "empty checkpoint"]),
    "not_a_checkpoint": (_not_a_checkpoint, ["{d}", "not a checkpoint streammerge can read"]),
    "only_optimizer_files": (lambda d: [os.rename(rank(d, r), d / f"optim_world_size_4_rank_{r}.pt")
                                        for r in range(WS)],
                             ["{d}", "no model_world_size_*_rank_*.pt files"]),
}


@pytest.fixture(scope="module")
def good(make_ckpt, tmp_path_factory) -> Path:
    """A real FSDP2 checkpoint (Shard(0) and Shard(1), uneven pieces) without optimizer files."""
    return copy_actor(make_ckpt(world_size=WS, shard_placement="first_divisible"),
                      tmp_path_factory.mktemp("good") / "actor")


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_gives_one_line(case, good, tmp_path, capsys):
    breaker, words = CASES[case]
    ckpt = tmp_path / "actor"
    shutil.copytree(good, ckpt)
    breaker(ckpt)
    before = snapshot(ckpt)
    out = tmp_path / "out"
    for command in (["merge", ckpt, out], ["inspect", ckpt]):
        code, stdout, stderr = run_cli(command, capsys)
        assert code == 2, (case, command, stdout, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("streammerge: error: "), stderr
        for w in words:
            assert w.format(d=ckpt) in lines[0], (w, lines[0])
        assert "Traceback" not in stderr
    assert not out.exists(), "nothing may be written for a bad input"
    assert snapshot(ckpt) == before, "the checkpoint was modified"


def _deepspeed_run(d: Path) -> Path:
    """DeepSpeed's layout without ZeRO (stage 0: the model states alone, names as its engine saves them): a `latest`
    tag naming the step folder. (ZeRO's partitions are read: tests/test_deepspeed.py.)"""
    (d / "global_step10").mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, d / "global_step10" / "mp_rank_00_model_states.pt")
    (d / "latest").write_text("global_step10")
    (d / "zero_to_fp32.py").write_text("raise SystemExit('never run')\n")
    return d


def _accelerate_per_rank(d: Path) -> Path:
    """accelerate's save_fsdp_model/save_fsdp_optimizer with use_dcp=False: one torch.save per rank, no DCP."""
    d.mkdir(parents=True)
    for r in range(2):
        torch.save({"model.embed_tokens.weight": torch.zeros(2, 4)}, d / f"pytorch_model_fsdp_0_rank{r}.bin")
        torch.save({"state": {}, "param_groups": []}, d / f"optimizer_0_rank{r}.bin")
    return d


def _accelerate_local(d: Path) -> Path:
    """accelerate's FSDP1 LOCAL_STATE_DICT: each rank's flat parameter shard, torch.save'd as it is."""
    d.mkdir(parents=True)
    for r in range(2):
        torch.save({"_flat_param": torch.zeros(8)}, d / f"pytorch_model_fsdp_rank{r}.bin")
    return d


def _trainer_full(d: Path) -> Path:
    """The HF Trainer's checkpoint under FULL_STATE_DICT: save_pretrained's folder, and accelerate's file beside."""
    _hf_folder(d)
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 4)}, d / "pytorch_model_fsdp.bin")
    return d


def _lightning_state() -> dict:
    return {"epoch": 0, "global_step": 3, "pytorch-lightning_version": "2.6.6",
            "state_dict": {"model.model.embed_tokens.weight": torch.zeros(2, 4)},
            "optimizer_states": [{"state": {}, "param_groups": []}]}


def _lightning_folder(d: Path) -> Path:
    """ModelCheckpoint's dirpath, the folder its .ckpt saves go into."""
    d.mkdir(parents=True)
    for step in (3, 6):
        torch.save(_lightning_state(), d / f"epoch=0-step={step}.ckpt")
    return d


def _tiny_qwen2():
    import transformers

    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=32))


def _hf_folder(d: Path) -> Path:
    _tiny_qwen2().save_pretrained(d)
    return d


def _peft_adapter(d: Path) -> Path:
    import peft

    peft.get_peft_model(_tiny_qwen2(), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(d)
    return d


@pytest.mark.parametrize(("make", "words"), [
    (_deepspeed_run, "a DeepSpeed checkpoint without ZeRO"),
    (_hf_folder, "already a Hugging Face model folder"), (_peft_adapter, "a peft adapter folder"),
    (_accelerate_per_rank, "accelerate's per-rank FSDP files"),
    (_accelerate_local, "accelerate's FSDP1 LOCAL_STATE_DICT files"),
    (_trainer_full, "already a Hugging Face model folder"), (_lightning_folder, "a folder of PyTorch Lightning")],
    ids=["deepspeed", "hf-folder", "peft-adapter", "accelerate-per-rank", "accelerate-local",
         "trainer-full", "lightning-folder"])
def test_a_format_streammerge_does_not_read_is_named_with_what_reads_it(make, words, tmp_path, capsys):
    """Rather than "not a checkpoint": what the folder is, in one line, and which tool reads it."""
    ckpt = make(tmp_path / "ckpt")
    capsys.readouterr()  # save_pretrained's progress bar
    before = snapshot(ckpt)
    for command in (["merge", ckpt, tmp_path / "out"], ["inspect", ckpt]):
        code, stdout, stderr = run_cli(command, capsys)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and words in lines[0], (command, stdout, stderr)
    assert not (tmp_path / "out").exists() and snapshot(ckpt) == before


def test_the_good_checkpoint_merges(good, tmp_path, capsys):
    """The cases above fail because of what they break, not because the base checkpoint is bad."""
    code, stdout, stderr = run_cli(["merge", good, tmp_path / "out", "--verify"], capsys)
    assert code == 0, stderr
    assert "verify" in stdout and "OK" in stdout


def test_real_process_exit_code_and_debug(good, tmp_path):
    """In a real process: exit code 2 and one line; with --debug the exception (and its traceback) propagates."""
    ckpt = tmp_path / "actor"
    shutil.copytree(good, ckpt)
    rank(ckpt, 2).unlink()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    plain = subprocess.run([sys.executable, "-m", "streammerge", str(ckpt), str(tmp_path / "out")],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [plain.stderr.strip()]
    assert "rank(s) 2" in plain.stderr and "Traceback" not in plain.stderr
    with pytest.raises(CheckpointError, match="rank\\(s\\) 2"):
        main([str(ckpt), str(tmp_path / "out"), "--debug"])


def test_run_folder_naming_a_missing_step(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "global_step_5" / "actor").mkdir(parents=True)
    (run / "latest_checkpointed_iteration.txt").write_text("7")
    code, _, stderr = run_cli(["merge", run, tmp_path / "out"], capsys)
    assert code == 2 and "names step 7" in stderr and "global_step_7 does not exist" in stderr


@pytest.mark.parametrize("text", ["²", "step 7", "", "9" * 5000])
def test_a_tracker_that_is_not_a_step_number(tmp_path, capsys, text):
    """str.isdigit() takes '²', which int() refuses, and int() refuses 5,000 digits with an error naming no file:
    the tracker must still give its one line."""
    run = tmp_path / "run"
    (run / "global_step_5" / "actor").mkdir(parents=True)
    (run / "latest_checkpointed_iteration.txt").write_text(text)
    code, _, stderr = run_cli(["merge", run, tmp_path / "out"], capsys)
    assert code == 2 and "expected a step number" in stderr and stderr.count("\n") == 1, stderr


def test_watch_of_a_tracker_that_is_a_pipe(tmp_path):
    """Reading a pipe waits for a writer: watch, which reads the tracker every poll, would hang for ever."""
    run = tmp_path / "run"
    (run / "global_step_5" / "actor").mkdir(parents=True)
    os.mkfifo(run / "latest_checkpointed_iteration.txt")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "streammerge", "watch", str(run), "--once", "--no-push"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "latest_checkpointed_iteration.txt: not a file" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("command", [[], ["inspect"]])
def test_merge_or_inspect_of_a_tracker_that_is_a_pipe(tmp_path, command):
    """A pipe as the tracker is named as what it is, as watch names it, not "not a checkpoint"; and never opened to
    read, which would wait for a writer."""
    run = tmp_path / "run"
    (run / "global_step_5" / "actor").mkdir(parents=True)
    os.mkfifo(run / "latest_checkpointed_iteration.txt")
    env = {**os.environ, "PYTHONPATH": str(Path(streammerge.__file__).parents[1])}  # the code under test
    out = [str(tmp_path / "out")] if not command else []
    r = subprocess.run([sys.executable, "-m", "streammerge", *command, str(run), *out], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "latest_checkpointed_iteration.txt: not a file (a pipe" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "out").exists(), r.stderr


def test_path_that_is_a_file_or_missing(tmp_path, capsys):
    f = tmp_path / "model_world_size_1_rank_0.pt"
    f.write_bytes(b"x")
    code, _, stderr = run_cli(["merge", f, tmp_path / "out"], capsys)
    assert code == 2 and "not a folder" in stderr and str(f) in stderr
    code, _, stderr = run_cli(["merge", tmp_path / "nope", tmp_path / "out"], capsys)
    assert code == 2 and "no such file or directory" in stderr


# ---------------------------------------------------------------- hostile pickles


class Payload:
    """Unpickling this runs `exec`, which creates a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_never_runs(good, tmp_path, capsys):
    ckpt = tmp_path / "actor"
    shutil.copytree(good, ckpt)
    marker = tmp_path / "PWNED"
    rewrite_rank(rank(ckpt, 1), lambda sd: _set(sd, "evil", Payload(marker)))
    with zipfile.ZipFile(rank(ckpt, 1)) as z:  # the payload really is in the file
        assert b"exec" in z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert run_cli(["merge", good, tmp_path / "good_out"], capsys)[0] == 0
    for command in (["merge", ckpt, tmp_path / "out"], ["inspect", ckpt],
                    ["verify", tmp_path / "good_out", ckpt]):
        code, _, stderr = run_cli(command, capsys)
        assert code == 2, (command, stderr)
        assert "model_world_size_4_rank_1.pt" in stderr and "refused to load" in stderr
        assert "--trust-pickle" in stderr and "exec" in stderr
        assert not marker.exists(), "the pickled code ran"
    assert not (tmp_path / "out").exists()

    # the explicit, per-run opt-in: the user is warned, and the payload does run (so the test above can fail)
    code, _, stderr = run_cli(["merge", ckpt, tmp_path / "out", "--trust-pickle"], capsys)
    assert code == 0, stderr
    assert "warning: --trust-pickle" in stderr and "code pickled in them will run" in stderr
    assert marker.read_text() == "pwned"


def test_trust_pickle_warning_reaches_a_real_terminal(good, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "streammerge", "inspect", str(good), "--trust-pickle"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("warning: --trust-pickle") == 1


# ---------------------------------------------------------------- the output folder


@pytest.fixture()
def ckpt(good, tmp_path) -> Path:
    d = tmp_path / "ckpt" / "actor"
    shutil.copytree(good, d)
    return d


def test_refuses_a_non_empty_foreign_folder(ckpt, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work")
    (out / "sub" / "model.safetensors").write_bytes(b"not ours")
    before = snapshot(out)
    code, _, stderr = run_cli(["merge", ckpt, out], capsys)
    assert code == 2 and "not empty" in stderr and "nothing was changed" in stderr
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["sub", "thesis.tex"]


def test_a_foreign_folder_is_refused_before_planning(make_ckpt, tmp_path):
    """The refusal needs no plan, so it comes before one: naming the optimizer state imports torch and transformers
    (seconds) only to be refused."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    ckpt = make_ckpt(world_size=WS, shard_placement="first_divisible")  # good's checkpoint, its optimizer files too
    code = ("import sys; from streammerge.cli import main; code = main(sys.argv[1:]); "
            "print(code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(Path(streammerge.__file__).parents[1])}  # the code under test
    r = subprocess.run([sys.executable, "-c", code, str(ckpt), str(out)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert "not empty" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert r.stdout == "2 []\n" and [p.name for p in out.iterdir()] == ["thesis.tex"], r.stdout


def test_a_pipe_as_the_manifest_is_refused_never_read(make_ckpt, tmp_path):
    """OUT/.streammerge/manifest.json as a pipe: merge and verify say so in one line; opening it to read would wait
    for a writer for ever."""
    out = tmp_path / "out"
    (out / ".streammerge").mkdir(parents=True)
    os.mkfifo(out / ".streammerge" / "manifest.json")
    ckpt = make_ckpt(world_size=WS, shard_placement="first_divisible")
    env = {**os.environ, "PYTHONPATH": str(Path(streammerge.__file__).parents[1])}  # the code under test
    merged, verified = run_together([sys.executable, "-m", "streammerge", str(ckpt), str(out), "--no-optimizer"],
                                    [sys.executable, "-m", "streammerge", "verify", str(out)], env=env, timeout=60)
    for r, code in ((merged, 2), (verified, 1)):
        assert r.returncode == code and "manifest.json: not a file (a pipe" in r.stderr + r.stdout, r.stderr
    assert merged.stderr.count("\n") == 1, merged.stderr


@pytest.mark.parametrize("where", ["actor", "actor/huggingface", "actor/new/deeper"])
def test_refuses_an_output_inside_the_checkpoint(ckpt, tmp_path, capsys, where):
    before = snapshot(ckpt)
    out = ckpt.parent / where
    code, _, stderr = run_cli(["merge", ckpt, out], capsys)
    assert code == 2 and "inside the checkpoint" in stderr
    assert snapshot(ckpt) == before
    assert not (ckpt / "new").exists()


def test_refuses_a_file_as_output(ckpt, tmp_path, capsys):
    out = tmp_path / "out.txt"
    out.write_text("x")
    code, _, stderr = run_cli(["merge", ckpt, out], capsys)
    assert code == 2 and "not a folder" in stderr and out.read_text() == "x"


def test_refuses_a_folder_holding_another_merge(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(["merge", ckpt, out, "--dtype", "bfloat16"], capsys)[0] == 0
    before = snapshot(out)
    code, _, stderr = run_cli(["merge", ckpt, out, "--dtype", "float16"], capsys)
    assert code == 2 and "different merge" in stderr
    assert snapshot(out) == before
    code, stdout, _ = run_cli(["merge", ckpt, out, "--dtype", "bfloat16"], capsys)  # the same merge: resumes
    assert code == 0 and "reused" in stdout
    assert snapshot(out).keys() == before.keys()


def test_a_rerun_changes_nothing_outside_the_output_folder(ckpt, tmp_path, capsys):
    """A manifest naming files outside OUT (crafted, or edited) and a state folder that links out of OUT: a rerun
    would remove those files, or write its manifest there; it is refused instead, and verify reads none of them."""
    done = tmp_path / "done"
    assert run_cli(["merge", ckpt, done], capsys)[0] == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "victim.txt"
    victim.write_text("precious")

    def listing(out: Path) -> None:
        manifest = out / ".streammerge" / "manifest.json"
        data = json.loads(manifest.read_text())
        data["files"].update({"../elsewhere/victim.txt": {"size": 8, "crc32": 1}, str(victim): {"size": 8, "crc32": 1}})
        manifest.write_text(json.dumps(data))

    def linked_state(out: Path) -> None:
        shutil.move(out / ".streammerge", elsewhere / "state")
        (out / ".streammerge").symlink_to(elsewhere / "state")

    def linked_lock(out: Path) -> None:
        (out / ".streammerge" / "lock").unlink()
        (out / ".streammerge" / "lock").symlink_to(victim)

    for case, tamper, words in [("listed", listing, "lists '../elsewhere/victim.txt'"),
                                ("linked", linked_state, "links out of the output folder"),
                                ("lock", linked_lock, ".streammerge/lock: a link")]:
        out = tmp_path / case
        shutil.copytree(done, out, symlinks=True)
        tamper(out)
        before = snapshot(elsewhere)
        code, _, stderr = run_cli(["merge", ckpt, out], capsys)
        assert code == 2 and words in stderr and stderr.count("\n") == 1, (case, stderr)
        assert snapshot(elsewhere) == before, case
        if case == "listed":
            code, stdout, _ = run_cli(["verify", out], capsys)
            assert code == 1 and words in stdout and "victim.txt: crc32" not in stdout, (case, stdout)

    # a finished file replaced by a link to another file, its manifest entry given that file's size and mtime: a rerun
    # (which a push uploads from) writes it again instead of taking the linked file for the merged one; a link left
    # as the manifest's temp file is replaced, not written through
    out = tmp_path / "relinked"
    shutil.copytree(done, out)
    manifest = out / ".streammerge" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["files"]["model.safetensors"].update(size=victim.stat().st_size, mtime_ns=victim.stat().st_mtime_ns)
    manifest.write_text(json.dumps(data))
    (out / "model.safetensors").unlink()
    (out / "model.safetensors").symlink_to(victim)
    (out / ".streammerge" / "manifest.tmp").symlink_to(victim)
    code, stdout, stderr = run_cli(["merge", ckpt, out], capsys)
    assert code == 0 and "wrote 1 data file" in stdout, stdout + stderr
    assert not (out / "model.safetensors").is_symlink() and victim.read_text() == "precious"


def test_source_is_never_modified(ckpt, tmp_path, capsys):
    """Bytes and mtimes of every checkpoint file survive a merge, a verify and failed merges."""
    before = snapshot(ckpt.parent)
    out = tmp_path / "out"
    assert run_cli(["merge", ckpt, out, "--verify", "--max-shard-size", "100KB"], capsys)[0] == 0
    assert run_cli(["verify", out, ckpt], capsys)[0] == 0
    assert run_cli(["merge", ckpt, out, "--dtype", "float16"], capsys)[0] == 2  # refused: another merge
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    os.truncate(rank(broken, 3), 100)
    assert run_cli(["merge", broken, tmp_path / "out2"], capsys)[0] == 2
    assert snapshot(ckpt.parent) == before


def test_real_gpu_checkpoint_missing_a_rank(verl_fixtures, tmp_path, capsys):
    """A real GPU-made checkpoint with one rank missing names that rank (the multi-node case)."""
    d = copy_actor(verl_fixtures / "fsdp2_hsdp_llama_2x2", tmp_path / "actor")
    rank(d, 2).unlink()
    code, _, stderr = run_cli(["merge", d, tmp_path / "out"], capsys)
    assert code == 2 and "rank(s) 2 of world size 4" in stderr and "shared file system" in stderr
    cfg = json.loads((d / "fsdp_config.json").read_text())
    assert cfg["world_size"] == 4


def test_a_torchrun_setting_out_of_range_neither_stops_a_plain_merge_nor_goes_unnamed(good, tmp_path, capsys,
                                                                                       monkeypatch):
    """STREAMMERGE_TORCHRUN_STARTUP_S was read with float() whenever the module loaded, which every merge does: "inf"
    ended a plain merge with an internal error (OverflowError), "abc" with a message naming no variable. A plain
    merge does not use it; where torchrun's ranks meet, a bad value is one line naming it."""
    from streammerge.distributed import STARTUP_ENV
    from streammerge.options import env_seconds

    for value in ("inf", "1e20", "abc", "-1"):
        monkeypatch.setenv(STARTUP_ENV, value)
        code, _, stderr = run_cli(["merge", good, tmp_path / value, "--no-progress"], capsys)
        assert code == 0, stderr
        with pytest.raises(ConfigError, match=rf"^{STARTUP_ENV}='{re.escape(value)}' is not a number of seconds"):
            env_seconds(STARTUP_ENV, 600, "how long torchrun's ranks may take to meet")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e20"])
def test_a_watch_interval_out_of_range_gives_one_line(good, tmp_path, capsys, value):
    """--interval inf (or 1e20) overflowed the wait's timer: an internal error after the first look."""
    run = tmp_path / "run"
    shutil.copytree(good, run / "global_step_1" / "actor")
    code, _, stderr = run_cli(["watch", run, "--interval", value], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "--interval" in stderr, stderr


@pytest.mark.parametrize("args, env, words", [
    (["--buffer-size", "100TB"], {}, "buffer_size (--buffer-size) 100000000000000 is more than this machine's memory"),
    (["--buffer-size", "0"], {}, "buffer_size (--buffer-size) 0: give more than 0 bytes"),
    (["--max-shard-size", "0"], {}, "max_shard_size (--max-shard-size) 0: give more than 0 bytes"),
    (["--workers", "0"], {}, "workers (--workers) 0: give 1 or more"),
    (["--max-shard-size", "1.5"], {}, "size '1.5' is not a whole number of bytes: give a unit, e.g. 1.5GB"),
    ([], {"STREAMMERGE_ARCH_TIMEOUT": "inf"}, "STREAMMERGE_ARCH_TIMEOUT='inf' is not a number of seconds above 0"),
    ([], {"STREAMMERGE_ARCH_TIMEOUT": "-1"}, "STREAMMERGE_ARCH_TIMEOUT='-1' is not a number of seconds above 0"),
    ([], {"STREAMMERGE_ARCH_TIMEOUT": "nan"}, "STREAMMERGE_ARCH_TIMEOUT='nan' is not a number of seconds above 0"),
])
def test_settings_out_of_range_give_one_line(good, tmp_path, capsys, monkeypatch, args, env, words):
    """A buffer bigger than the machine, a timeout that can never (or always) expire: one line naming the setting,
    never an internal error or a check quietly left out."""
    monkeypatch.setenv("STREAMMERGE_CACHE", str(tmp_path / "no-cache"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, stdout, stderr = run_cli(["merge", good, tmp_path / "out", *args], capsys)
    assert code == 2 and stderr.count("\n") == 1 and words in stderr, stderr


def test_optimizer_save_mode_none_without_a_push(make_ckpt, tmp_path, capsys):
    """The seed workflow's --optimizer-save-mode none is --no-optimizer, with or without a push."""
    code, stdout, stderr = run_cli(["merge", make_ckpt(), tmp_path / "out", "--optimizer-save-mode", "none"], capsys)
    assert code == 0, stderr
    assert not (tmp_path / "out" / "optimizer").exists()


@pytest.mark.parametrize("text", ["[]", '{"targets": []}', '{"targets": {"x": 5}}', "{"])
def test_a_watch_state_file_that_is_no_state(make_ckpt, tmp_path, text):
    from streammerge.errors import StreammergeError
    from streammerge.hub.watch import Watcher

    state = tmp_path / "state.json"
    state.write_text(text)
    watcher = Watcher(make_ckpt().parents[1], push=False, state_file=state, out_root=tmp_path / "out")
    with pytest.raises(StreammergeError, match="unreadable watch state; fix or delete it"):
        watcher.done_steps()


def test_verify_of_a_folder_that_does_not_exist_is_a_usage_error(tmp_path, capsys):
    """A mistyped OUT was reported as a folder that failed verification (exit 1, "FAIL ... not a folder")."""
    code, stdout, stderr = run_cli(["verify", tmp_path / "no-such-folder"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "no such file or directory" in stderr and not stdout, stderr


def test_closed_standard_streams_neither_fail_a_merge_nor_end_in_its_files(good, tmp_path):
    """`streammerge CKPT OUT >&-` finished the merge, then ended in an internal error printing its summary (exit 3);
    with all three closed it wrote nothing (exit 3); verify and inspect printed a traceback and exited 1. A closed
    stream is /dev/null now, and its descriptor is taken before any output file is opened."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ref = tmp_path / "ref"
    streammerge.merge(good, ref)
    for closed in (">&-", "<&- >&- 2>&-"):
        out = tmp_path / f"out{len(closed)}"
        for args in ([good, out, "--no-progress"], ["verify", out], ["inspect", good]):
            proc = subprocess.run(["bash", "-c", f'exec "$0" -m streammerge "$@" {closed}', sys.executable,
                                   *map(str, args)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, (closed, args, proc.stderr)
        assert snapshot(out) and {k: v[0] for k, v in snapshot(out).items() if not k.startswith(".streammerge")} == \
            {k: v[0] for k, v in snapshot(ref).items() if not k.startswith(".streammerge")}


def test_an_interrupted_verify_or_inspect_says_nothing_of_files_kept(good, tmp_path, capsys, monkeypatch):
    """verify and inspect write nothing: their Ctrl-C said "finished files are kept, rerun the same command to
    resume". The interrupt is raised by safetensors' reader, as a Ctrl-C lands there."""
    import safetensors

    import streammerge.pipeline

    out = tmp_path / "out"
    streammerge.merge(good, out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors, "safe_open", interrupted)
    code, _, stderr = run_cli(["verify", out], capsys)
    assert code == 130 and stderr == "streammerge: interrupted\n", stderr
    monkeypatch.setattr(streammerge.pipeline, "open_checkpoint", interrupted)  # a Ctrl-C while planning
    code, _, stderr = run_cli(["inspect", good], capsys)
    assert code == 130 and stderr == "streammerge: interrupted\n", stderr


@pytest.mark.parametrize("args, words", [
    (["--repo-id", "me/x"], "--repo-id is a push setting, and there is no --push: add --push to push"),
    (["--private"], "--private/--no-private is a push setting, and there is no --push"),
    (["--revision", "dev", "--commit-message", "m"], "--revision is a push setting, and there is no --push"),
    (["--upload-workers", "0"], "--upload-workers is a push setting, and there is no --push"),
    (["--max-files-per-commit", "9"], "--max-files-per-commit is a push setting, and there is no --push"),
    (["--key-prefix", "model."], "--key-prefix 'model.': {ck} is a veRL FSDP checkpoint, whose tensors need no prefix"),
    (["--lora-rank", "8"], "--lora-rank: {ck} holds no LoRA adapter (no lora_A/lora_B tensors)"),
    (["--weights-only"], "--weights-only: {ck}/huggingface/config.json describes these weights"),
    (["--no-optimizer", "--optimizer-format", "torch"], "--optimizer-format torch: no optimizer is exported "
                                                         "(--no-optimizer was given), so there is nothing for it"),
    (["--lora", "adapter"], "--lora adapter: {ck} holds no LoRA adapter"),
    (["--lora-rslora"], "--lora-rslora: {ck} holds no LoRA adapter"),
    (["--base-model", "some/model"], "--base-model: {ck} holds no LoRA adapter"),
])
def test_a_flag_that_would_change_nothing_is_refused(good, tmp_path, capsys, args, words):
    """--repo-id without --push merged only and exited 0 (the user meant to push); --key-prefix on rank files, or a
    LoRA flag on a checkpoint without an adapter, was dropped: each says the user expects another checkpoint."""
    code, stdout, stderr = run_cli([good, tmp_path / "out", *args], capsys)
    assert code == 2 and stderr.count("\n") == 1 and words.format(ck=good) in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_push_flags_with_no_push_merge_and_watch_refuses_them_without_push(good, tmp_path, capsys):
    code, stdout, stderr = run_cli([good, tmp_path / "out", "--no-push", "--repo-id", "me/x", "--no-optimizer"],
                                   capsys)
    assert code == 0 and (tmp_path / "out" / "config.json").is_file(), stderr
    run = tmp_path / "run"
    shutil.copytree(good, run / "global_step_1" / "actor")
    code, stdout, stderr = run_cli(["watch", run, "--repo-id", "me/x", "--once", "--out-root", tmp_path / "w"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "--repo-id is a push setting" in stderr, stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("prefix", ["", "."])
def test_an_empty_key_prefix_is_refused_as_given(good, tmp_path, capsys, prefix):
    """It was taken as '.', and a DCP merge said no key starts with --key-prefix '.'."""
    code, _, stderr = run_cli(["inspect", good, "--key-prefix", prefix], capsys)
    assert code == 2 and stderr.count("\n") == 1 and f"(--key-prefix) {prefix!r}: give the name of the container" \
        in stderr, stderr


def test_key_prefix_on_a_megatron_checkpoint_is_refused(tmp_path):
    """Megatron's tensors are named by the architecture: a --key-prefix was dropped."""
    ck = REPO / "tests" / "data" / "megatron" / "qwen2_tp2"
    with pytest.raises(ConfigError, match="is a Megatron torch_dist checkpoint, whose tensors need no prefix"):
        streammerge.merge(ck, tmp_path / "out", key_prefix="decoder.")
    assert not (tmp_path / "out").exists()


def test_verify_with_the_folders_swapped_says_so(good, tmp_path, capsys):
    """It said the merged folder was "already a Hugging Face model folder: there is nothing to merge"."""
    out = tmp_path / "out"
    assert run_cli([good, out, "--no-optimizer"], capsys)[0] == 0
    code, stdout, stderr = run_cli(["verify", good, out], capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert f"{out} is not a checkpoint and {good} is one: the two are given the wrong way round" in stderr, stderr
    code, stdout, stderr = run_cli(["verify", out, out], capsys)  # it said "there is nothing to merge"
    assert code == 2 and f"{out}: a Hugging Face model folder, not the checkpoint {out} was merged from" in stderr, \
        stderr
    code, stdout, stderr = run_cli(["verify", out, tmp_path], capsys)  # neither is a checkpoint: the plain error
    assert code == 2 and "wrong way round" not in stderr and "not a checkpoint streammerge can read" in stderr, stderr


def test_verify_advises_a_rerun_only_where_the_rerun_is_the_same_merge(make_ckpt, tmp_path, capsys):
    """A file the checkpoint no longer gives: verify said "rerun the merge to remove it" also where the checkpoint
    now plans another merge (its optimizer files gone), and that rerun was refused as "holds a different merge"."""
    ck = copy_actor(make_ckpt(), tmp_path / "actor", optimizer=True)
    out = tmp_path / "out"
    assert run_cli([ck, out], capsys)[0] == 0 and (out / "optimizer").is_dir()
    (ck / "huggingface" / "generation_config.json").unlink()  # the same merge, less one small file
    code, stdout, _ = run_cli(["verify", out, ck], capsys)
    assert code == 1 and "generation_config.json: an earlier run of this merge wrote it, and the checkpoint no " \
        "longer gives it; rerun the merge to remove it" in stdout, stdout
    assert run_cli([ck, out], capsys)[0] == 0 and run_cli(["verify", out, ck], capsys)[0] == 0
    next(ck.glob("optim_world_size_*_rank_1.pt")).unlink()  # no optimizer export is planned any more
    code, stdout, _ = run_cli(["verify", out, ck], capsys)
    assert code == 1 and "the checkpoint no longer plans the merge this folder holds: merge it into a new folder" \
        in stdout and "rerun the merge to remove it" not in stdout, stdout
    code, _, stderr = run_cli([ck, out], capsys)
    assert code == 2 and "holds a different merge" in stderr, stderr
