"""One torch.save file of a whole model, streamed into a model folder: PyTorch Lightning's single-file `.ckpt`,
accelerate's FULL_STATE_DICT `pytorch_model_fsdp.bin` (with `optimizer.bin`), a user's
`torch.save(model.state_dict())`.

The Lightning cases are real DDP runs (`tests/data/lightning/<case>/run/checkpoints/epoch=0-step=3.ckpt`, made by
`tests/data/make_lightning.py` on CPU with 2 ranks), with the LightningModule's state dict as the oracle. The others
are written here by torch.save itself. Every reading is compared with torch.load's, also on mutated files.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  (imported: the merge asks transformers in this process, not in a child)
from fixture_paths import LIGHTNING_CKPT, LIGHTNING_DATA, LIGHTNING_FILE_CASES, VERL_CASES, VERL_DATA
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file
from test_accelerate import assert_trained_logits
from test_optimizer import assert_same_optimizer
from test_strict import MUTATIONS, STRICTER, mutate

import streammerge
from streammerge.cli import main
from streammerge.errors import StreammergeError
from streammerge.sources import open_checkpoint
from streammerge.sources.torchfile import TorchFileSource

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
ATTRIBUTE = "model."  # the LightningModule's attribute holding the transformers model


def _run(args: list, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def _tied(config: Path) -> bool:
    return transformers.AutoConfig.from_pretrained(config).tie_word_embeddings


# ---------------------------------------------------------------- Lightning's single-file checkpoint (DDP)

def test_the_fixture_is_what_lightning_writes_under_ddp() -> None:
    """One file (a zip torch.save wrote) of Lightning's whole checkpoint dict, its `state_dict` the LightningModule's
    (`model.` + transformers' names) and equal to the oracle; the optimizer's state keyed by position."""
    assert len(LIGHTNING_FILE_CASES) == 2
    for case in LIGHTNING_FILE_CASES:
        saved = torch.load(LIGHTNING_DATA / case / LIGHTNING_CKPT, weights_only=True)
        assert saved["pytorch-lightning_version"].startswith("2.") and saved["global_step"] == 3
        ref = load_file(LIGHTNING_DATA / case / "reference" / "model.safetensors")
        sd = saved["state_dict"]
        assert set(sd) == set(ref) and all(k.startswith(ATTRIBUTE) for k in sd)
        assert all(sd[k].dtype == v.dtype and torch.equal(sd[k], v) for k, v in ref.items())
        assert all(type(k) is int for k in saved["optimizer_states"][0]["state"])


@pytest.fixture(scope="module", params=LIGHTNING_FILE_CASES)
def merged(request, tmp_path_factory) -> tuple[str, Path, Path, str]:
    """`streammerge epoch=0-step=3.ckpt OUT --model-name huggingface/ --dtype keep`: (case, ckpt, out, stderr)."""
    case = request.param
    ckpt = LIGHTNING_DATA / case / LIGHTNING_CKPT
    out = tmp_path_factory.mktemp(case) / "out"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        rc = main([str(ckpt), str(out), "--model-name", str(LIGHTNING_DATA / case / "huggingface"), "--dtype", "keep"])
    assert rc == 0, stderr.getvalue()
    return case, ckpt, out, stderr.getvalue()


def test_weights_are_the_trained_ones_under_transformers_names(merged) -> None:
    """Every tensor bit for bit and in its saved dtype (bfloat16 in the bf16-true run), named as transformers names
    it (without the LightningModule's `model.`); the tied lm_head.weight left out as save_pretrained leaves it out.
    The previous code refused the file ("streammerge does not read" it)."""
    case, _, out, _ = merged
    ref = {k.removeprefix(ATTRIBUTE): v for k, v in
           load_file(LIGHTNING_DATA / case / "reference" / "model.safetensors").items()}
    tied = _tied(LIGHTNING_DATA / case / "huggingface")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(ref) - ({"lm_head.weight"} if tied else set())
    assert all(got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]) for k in got)


def test_transformers_loads_the_trained_model(merged) -> None:
    """The oracle's logits are a float32 model's holding the trained values (bfloat16 ones in the bf16-true run)."""
    case, _, out, _ = merged
    assert_trained_logits(out, LIGHTNING_DATA / case / "reference" / "logits.safetensors", dtype=torch.float32)


def test_the_optimizer_is_not_exported_and_the_warning_says_why(merged) -> None:
    """Lightning's optimizer_states keys the state by position: no export is guessed from it, and the merge says so."""
    _, _, out, stderr = merged
    assert not (out / "optimizer").exists()
    assert "optimizer not exported: epoch=0-step=3.ckpt's optimizer_states.0: its state is keyed by each " \
        "parameter's position" in stderr, stderr


def test_verify_passes(merged) -> None:
    _, ckpt, out, _ = merged
    report = streammerge.verify(out, ckpt)
    assert report.ok and not [n for n in report.notes if "own reader" in n], report.notes
    assert report.tensors_checked >= len(load_file(out / "model.safetensors"))


def test_verify_finds_a_changed_byte_of_the_file(merged, tmp_path: Path) -> None:
    """A byte of a weight changed after the merge: the output no longer equals what torch.load reads."""
    case, ckpt, out, _ = merged
    changed = tmp_path / ckpt.name
    shutil.copy(ckpt, changed)
    source = TorchFileSource(changed)
    t = source.tensors(streammerge.MergeOptions())["model.norm.weight"]
    raw = bytearray(changed.read_bytes())
    raw[t.pieces[0].offset] ^= 0x40
    changed.write_bytes(bytes(raw))
    report = streammerge.verify(out, changed)
    assert not report.ok
    assert any("model.norm.weight" in p for p in report.failures), report.failures


def test_inspect_says_what_was_taken(capsys) -> None:
    case = LIGHTNING_FILE_CASES[0]
    rc = main(["inspect", str(LIGHTNING_DATA / case / LIGHTNING_CKPT), "--model-name",
               str(LIGHTNING_DATA / case / "huggingface")])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert any(line.startswith("format      torch.save file   step 3") for line in lines), lines
    model = next(line for line in lines if line.startswith("model "))
    assert "Lightning's `state_dict`" in model and f"attribute '{ATTRIBUTE}' stripped" in model, model
    assert "optimizer   epoch=0-step=3.ckpt: optimizer_states.0.*, not exported: its state is keyed by position" \
        in lines, lines
    assert any(line.startswith("not merged") and "callbacks.*" in line for line in lines), lines


def test_a_module_holding_more_than_the_model_is_refused_and_key_prefix_picks_the_model(tmp_path: Path,
                                                                                        capsys) -> None:
    """A LightningModule with a parameter beside the transformers model (an RL value head): no attribute is the model
    alone, so the names stay the module's and the architecture check refuses them, in one line that names the
    `--key-prefix state_dict.model.` taking the transformers model; with it, the trained weights."""
    case = LIGHTNING_FILE_CASES[0]
    saved = torch.load(LIGHTNING_DATA / case / LIGHTNING_CKPT, weights_only=True)
    saved["state_dict"]["value_head.weight"] = torch.zeros(1, 16)
    path = tmp_path / "epoch=0-step=3.ckpt"
    torch.save(saved, path)
    base = LIGHTNING_DATA / case / "huggingface"
    rc, err = _run([path, tmp_path / "refused", "--model-name", base], capsys)
    lines = err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and "value_head.weight" in lines[0], lines
    assert lines[0].endswith(f"--key-prefix state_dict.{ATTRIBUTE} takes that attribute alone"), lines[0]
    assert not (tmp_path / "refused" / "model.safetensors").exists()
    rc, err = _run([path, tmp_path / "out", "--model-name", base, "--key-prefix", f"state_dict.{ATTRIBUTE}",
                    "--dtype", "keep"], capsys)
    assert rc == 0, err
    ref = load_file(LIGHTNING_DATA / case / "reference" / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got and all(torch.equal(v, ref[ATTRIBUTE + k]) for k, v in got.items())


# ---------------------------------------------------------------- torch.save files made here

def _qwen2(seed: int = 0):
    config = transformers.Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=40,
                                      tie_word_embeddings=True)
    transformers.set_seed(seed)
    return transformers.Qwen2ForCausalLM(config).eval()


def _strided(sd: dict) -> dict:
    """The same values, saved as views torch.save keeps as they are: a transposed one (strides (1, rows)) and one
    from the middle of a larger storage."""
    sd = dict(sd)
    w = sd["model.layers.0.mlp.down_proj.weight"]
    sd["model.layers.0.mlp.down_proj.weight"] = w.t().contiguous().t()
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.cat([torch.ones(7), q.flatten()])[7:].view(q.shape)
    assert not sd["model.layers.0.mlp.down_proj.weight"].is_contiguous()
    return sd


def _assert_model_of(out: Path, model, tmp_path: Path) -> None:
    """OUT loads into transformers with nothing missing and gives `model`'s logits exactly."""
    ids = torch.arange(12).view(2, 6)
    got, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert torch.equal(got.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


def _trained(seed: int) -> tuple:
    """A tiny tied Qwen2 after two AdamW steps (two param groups, as the HF Trainer makes them): (model, optimizer)."""
    model = _qwen2(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    ids = torch.arange(12).view(2, 6)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), opt


def _named_optimizer(model, opt) -> dict:
    """The optimizer's state by parameter name: what FSDP's optim_state_dict (accelerate's FULL_STATE_DICT) and
    get_optimizer_state_dict give."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))


def test_accelerates_full_state_dict_folder_is_merged_with_its_optimizer(tmp_path: Path, capsys) -> None:
    """accelerate's save_state under FULL_STATE_DICT: `pytorch_model_fsdp.bin` (torch.save of the gathered state
    dict) and `optimizer.bin` beside it (the optimizer's state by parameter name). The folder is given; views saved
    strided or at an offset are read as torch reads them; the optimizer is exported as torch gathered it. The previous
    code refused the folder."""
    model, opt = _trained(0)
    sd = _strided(model.state_dict())
    ckpt = tmp_path / "checkpoint-7"
    ckpt.mkdir()
    torch.save(sd, ckpt / "pytorch_model_fsdp.bin")
    torch.save(_named_optimizer(model, opt), ckpt / "optimizer.bin")
    model.config.save_pretrained(tmp_path / "base")
    rc, err = _run([ckpt, tmp_path / "out", "--model-name", tmp_path / "base"], capsys)
    assert rc == 0 and "warning" not in err, err
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = torch.load(ckpt / "pytorch_model_fsdp.bin", weights_only=True)
    assert set(got) == set(want) - {"lm_head.weight"}
    assert all(torch.equal(got[k], want[k]) for k in got)
    _assert_model_of(tmp_path / "out", model, tmp_path)
    assert_same_optimizer(streammerge.load_optimizer_state_dict(tmp_path / "out"), _named_optimizer(model, opt))
    report = streammerge.verify(tmp_path / "out", ckpt)
    assert report.ok, report.failures
    assert report.tensors_checked > len(got)  # the optimizer's tensors too, read from optimizer.bin by torch


def test_a_named_optimizer_in_a_lightning_file_is_exported_under_the_models_names(tmp_path: Path, capsys) -> None:
    """A LightningModule's optimizer saved by name (get_optimizer_state_dict of the LightningModule: `model.` + the
    transformers names): exported under the transformers names, as the weights are."""
    model, opt = _trained(6)
    named = _named_optimizer(model, opt)
    lit = {"state": {ATTRIBUTE + k: v for k, v in named["state"].items()},
           "param_groups": [{**g, "params": [ATTRIBUTE + n for n in g["params"]]} for g in named["param_groups"]]}
    path = tmp_path / "epoch=1-step=2.ckpt"
    torch.save({"state_dict": {ATTRIBUTE + k: v for k, v in model.state_dict().items()}, "optimizer_states": [lit],
                "global_step": 2, "pytorch-lightning_version": "2.6.6"}, path)
    model.config.save_pretrained(tmp_path / "base")
    rc, err = _run([path, tmp_path / "out", "--model-name", tmp_path / "base"], capsys)
    assert rc == 0 and "warning" not in err, err
    assert_same_optimizer(streammerge.load_optimizer_state_dict(tmp_path / "out"), named)
    assert streammerge.verify(tmp_path / "out", path).ok


def test_a_named_optimizer_of_other_parameters_is_not_exported(tmp_path: Path, capsys) -> None:
    """State for a parameter the model does not have (another model's optimizer saved beside it): not exported, and
    the warning says which."""
    model, opt = _trained(7)
    named = _named_optimizer(model, opt)
    named["state"]["value_head.weight"] = named["state"].pop("model.norm.weight")
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": named}, path)
    model.config.save_pretrained(tmp_path / "base")
    rc, err = _run([path, tmp_path / "out", "--model-name", tmp_path / "base"], capsys)
    assert rc == 0 and "optimizer not exported: ckpt.pt's optimizer: optimizer state for 'value_head.weight', " \
        "which is not a weight of the model" in err, err
    assert not (tmp_path / "out" / "optimizer").exists()


@pytest.mark.parametrize("container", ["model", "state_dict", "module", "model_state_dict"])
def test_a_training_dict_with_one_model_container_is_merged(container: str, tmp_path: Path, capsys) -> None:
    """A user's torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 5}): the
    container is the model, the rest left out (said by inspect); the optimizer, keyed by position, is not exported."""
    model, opt = _trained(1)
    path = tmp_path / "ckpt.pt"
    torch.save({container: model.state_dict(), "optimizer": opt.state_dict(), "step": 5}, path)
    model.config.save_pretrained(tmp_path / "base")
    rc, err = _run([path, tmp_path / "out", "--model-name", tmp_path / "base"], capsys)
    assert rc == 0 and "optimizer not exported: ckpt.pt's optimizer: its state is keyed by each parameter's " \
        "position" in err, err
    _assert_model_of(tmp_path / "out", model, tmp_path)
    assert main(["inspect", str(path), "--model-name", str(tmp_path / "base")]) == 0
    out = capsys.readouterr().out
    assert f"the {container!r} container of the saved dict" in out, out
    assert "optimizer   ckpt.pt: optimizer.*, not exported: its state is keyed by position" in out, out


def test_two_model_containers_are_refused_and_key_prefix_picks_one(tmp_path: Path, capsys) -> None:
    """{"model": policy, "module": another}: which is meant cannot be told; --key-prefix says."""
    model, other = _qwen2(2), _qwen2(3)
    path = tmp_path / "both.pt"
    torch.save({"model": model.state_dict(), "module": other.state_dict()}, path)
    model.config.save_pretrained(tmp_path / "base")
    rc, err = _run([path, tmp_path / "out", "--model-name", tmp_path / "base"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "several model containers (model, module)" in err, err
    rc, err = _run([path, tmp_path / "out", "--model-name", tmp_path / "base", "--key-prefix", "module"], capsys)
    assert rc == 0, err
    _assert_model_of(tmp_path / "out", other, tmp_path)


def test_a_model_entry_whose_key_is_no_name_is_refused(tmp_path: Path, capsys) -> None:
    """A tensor under a tuple key in the model's dict: no state dict holds one, and leaving it out would drop a
    tensor silently."""
    sd = dict(_qwen2().state_dict())
    sd[("lm_head", "bias")] = torch.zeros(40)
    path = tmp_path / "sd.pt"
    torch.save({"model": sd}, path)
    _refused(path, tmp_path, capsys, "'model.<a tuple key>': the model's state dict holds an entry whose key is "
             "no name")


def test_a_wrong_key_prefix_names_the_keys_there_are(tmp_path: Path, capsys) -> None:
    path = tmp_path / "sd.pt"
    torch.save({"model": _qwen2().state_dict()}, path)
    rc, err = _run(["inspect", path, "--key-prefix", "policy."], capsys)
    assert rc == 2 and "no tensor key starts with --key-prefix 'policy.'" in err and "model." in err, err


# ---------------------------------------------------------------- refused in one line

def _refused(path: Path, tmp_path: Path, capsys, *words: str) -> str:
    rc, err = _run([path, tmp_path / "out"], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert not (tmp_path / "out" / "model.safetensors").exists()
    return lines[0]


class _Payload:
    """Pickled as a call of Path.touch(marker): what a malicious checkpoint runs in torch.load(weights_only=False)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _lightning_file_with(path: Path, hparams: dict, **state_dict) -> object:
    """A Lightning checkpoint of a tiny Qwen2 (returned) whose hyper_parameters are `hparams`."""
    model = _qwen2(8)
    model.config.save_pretrained(path.parent / "base")
    torch.save({"state_dict": {**{ATTRIBUTE + k: v for k, v in model.state_dict().items()}, **state_dict},
                "pytorch-lightning_version": "2.6.6", "global_step": 3, "hyper_parameters": hparams}, path)
    return model


def test_objects_beside_the_model_are_read_as_inert_records(tmp_path: Path, capsys) -> None:
    """save_hyperparameters() of an argparse.Namespace and a transformers config: torch's weights-only loader refuses
    the file for them; the merge takes the model's tensors and reads those objects as inert records (inspect names
    their classes), and verify reads the file through torch with those classes allowlisted as inert stand-ins. The
    previous code refused the file."""
    import argparse

    path = tmp_path / "epoch=0-step=3.ckpt"
    model = _lightning_file_with(path, {"args": argparse.Namespace(lr=1e-3, tags=["a"]), "config": _qwen2(9).config})
    with pytest.raises(Exception, match="(?i)unsupported global"):
        torch.load(path, weights_only=True)
    rc, err = _run([path, tmp_path / "out", "--model-name", tmp_path / "base"], capsys)
    assert rc == 0, err
    _assert_model_of(tmp_path / "out", model, tmp_path)
    assert main(["inspect", str(path), "--model-name", str(tmp_path / "base")]) == 0
    read = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("read "))
    assert "left out (not tensors): argparse.Namespace" in read and "Qwen2Config" in read, read
    report = streammerge.verify(tmp_path / "out", path)
    assert report.ok, report.failures


def test_code_a_pickle_would_run_beside_the_model_is_never_run(tmp_path: Path, capsys) -> None:
    """A payload in hyper_parameters: the merge reads it as inert records (nothing runs) and takes the model's
    tensors; torch's weights-only loader refuses the file even with the classes allowlisted (the pickle calls what a
    call returned), so verify says that torch refuses it. Neither ran the payload."""
    marker = tmp_path / "ran"
    path = tmp_path / "epoch=0-step=3.ckpt"
    _lightning_file_with(path, {"evil": _Payload(marker)})
    rc, err = _run([path, tmp_path / "out", "--model-name", tmp_path / "base"], capsys)
    assert rc == 0, err
    with pytest.raises(StreammergeError, match=r"torch.load\(weights_only=True\) refuses it"):
        streammerge.verify(tmp_path / "out", path)
    assert not marker.exists()


def test_an_object_among_the_models_tensors_is_refused_and_nothing_runs(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "epoch=0-step=3.ckpt"
    _lightning_file_with(path, {}, **{ATTRIBUTE + "value_head.weight": _Payload(marker)})
    _refused(path, tmp_path, capsys, f"'state_dict.{ATTRIBUTE}value_head.weight' among the model's tensors is an "
             "object of __builtin__.getattr", "nothing of it was run")
    assert not marker.exists()


def test_a_file_of_torchs_legacy_format_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "old.pt"
    torch.save(_qwen2().state_dict(), path, _use_new_zipfile_serialization=False)
    _refused(path, tmp_path, capsys, "a file of torch.save's legacy format", "save it again with torch.save")


def test_one_ranks_file_of_a_sharded_save_is_refused(tmp_path: Path, capsys) -> None:
    """A veRL FSDP2 rank file given alone holds DTensors: one rank's shards, never a whole model."""
    fsdp2 = next(c for c in VERL_CASES if c.startswith("fsdp2"))
    rank0 = next((VERL_DATA / fsdp2).glob("model_world_size_*_rank_0.pt"))
    _refused(rank0, tmp_path, capsys, "one file of a sharded checkpoint (veRL FSDP", "give the folder holding it")
    alone = tmp_path / "rank0.pt"  # copied away from its folder: what it holds says what it is
    shutil.copy(rank0, alone)
    _refused(alone, tmp_path, capsys, "one rank's shard of a sharded model", "give the sharded save's folder")


def test_a_deepspeed_model_states_file_given_alone_is_refused(tmp_path: Path, capsys) -> None:
    """DeepSpeed's mp_rank_00_model_states.pt holds the model under `module`, in the training dtype (bfloat16 here),
    beside float32 master weights elsewhere in the save: given alone (away from its step folder, as a stage 0 save's
    would be), it is refused rather than merged from its 16-bit copy."""
    from fixture_paths import DEEPSPEED_DATA

    case = next(c for c in sorted(DEEPSPEED_DATA.iterdir()) if c.name == "llama_zero1_bf16")
    alone = tmp_path / "mp_rank_00_model_states.pt"
    shutil.copy(next(case.rglob("mp_rank_00_model_states.pt")), alone)
    _refused(alone, tmp_path, capsys, "a DeepSpeed model states file, which streammerge does not read alone")


def test_a_file_that_is_no_checkpoint_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    _refused(path, tmp_path, capsys, "not a checkpoint file streammerge reads")


# ---------------------------------------------------------------- every reading against torch.load's

def _torch_model(path: Path, keys: dict[str, tuple], inert: list) -> dict[str, tuple]:
    """The model's tensors as torch.load reads them, with the classes the source read as inert records allowlisted
    as stand-ins (verify's reading)."""
    from streammerge.sources import torchpickle as tp
    from streammerge.sources.torchfile import _py3_name

    with torch.serialization.safe_globals([tp.inert_class(*n) for n in {*inert, *map(_py3_name, inert)}]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for name, key in keys.items():
        t = obj
        for k in key:
            t = t[k]
        out[name] = (tuple(t.shape), str(t.dtype).removeprefix("torch."),
                     t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return out


def _our_model(path: Path) -> tuple[dict[str, tuple], dict[str, tuple], list]:
    """Each model tensor as the source places it (its bytes read where its piece says), each one's key path, and the
    globals read as inert records."""
    source = TorchFileSource(path)
    tensors = source.tensors(streammerge.MergeOptions())
    raw = np.fromfile(path, np.uint8)
    out = {}
    for name, t in tensors.items():
        size = t.dtype.itemsize
        if not t.pieces:
            data = b""
        else:
            (p,) = t.pieces
            view = np.lib.stride_tricks.as_strided(raw[p.offset:], (*p.shape, size),
                                                   (*(s * size for s in p.stride), 1), writeable=False)
            data = np.ascontiguousarray(view).tobytes()
        out[name] = (t.shape, t.dtype.name, data)
    return out, source.split(None)[0], source.inert


# refusals of this reader's own where torch reads the file, each for its stated reason: which tensors are the model
# (torch reads any dict), an object among them, a view whose elements share bytes, a memo index past the pickle's end
# (torch.save numbers its objects from 0; the C unpickler would allocate that many slots)
CHOICES = ("cannot tell which tensors are the model", "several model containers", "among the model's tensors is an "
           "object of", "an expanded view (a stride of 0)", "a memo index of")


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=MUTATIONS)
def test_differential_fuzz(tmp_path_factory: pytest.TempPathFactory, mutation: tuple) -> None:
    """Lightning's real file, mutated: the source reads every model tensor exactly as torch.load reads it, or refuses
    in one line where torch refuses too (or for a stated reason torch does not check)."""
    p = tmp_path_factory.mktemp("fuzz") / "epoch=0-step=3.ckpt"
    shutil.copy(LIGHTNING_DATA / LIGHTNING_FILE_CASES[0] / LIGHTNING_CKPT, p)
    mutate(p, mutation)
    try:
        ours, keys, inert = _our_model(p)
    except StreammergeError as e:
        assert "\n" not in str(e)
        try:
            torch.load(p, map_location="cpu", weights_only=True)
        except Exception:
            return
        assert any(s in str(e) for s in (*STRICTER, *CHOICES)), f"refused what torch reads: {e}"
        return
    try:
        want = _torch_model(p, keys, inert)
    except Exception as e:  # noqa: BLE001
        # torch refuses what the source read: only for a call of what a call returned (a mutated pickle can make one
        # of a global the source read as an inert record), outside the model's tensors, which equal torch's elsewhere
        assert "reduce for unrecognized function" in str(e) and inert, e
        return
    assert ours == want


def test_open_checkpoint_takes_the_file_and_the_accelerate_folder(tmp_path: Path) -> None:
    case = LIGHTNING_FILE_CASES[0]
    assert isinstance(open_checkpoint(LIGHTNING_DATA / case / LIGHTNING_CKPT), TorchFileSource)
    (tmp_path / "pytorch_model_fsdp.bin").write_bytes((LIGHTNING_DATA / case / LIGHTNING_CKPT).read_bytes())
    source = open_checkpoint(tmp_path)
    assert isinstance(source, TorchFileSource) and source.path == (tmp_path / "pytorch_model_fsdp.bin").resolve()


def test_a_lightning_module_holding_a_peft_model_folds_as_peft_merges(tmp_path: Path, capsys) -> None:
    """A LightningModule whose `model` is a peft model (LoRA on q_proj and v_proj, B made non-zero as training makes
    it): the merge folds the adapter into the base as peft's merge_and_unload() does, bit for bit."""
    import peft

    base = _qwen2(4)
    base.config.save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(5))
    path = tmp_path / "epoch=0-step=4.ckpt"
    torch.save({"state_dict": {ATTRIBUTE + k: v for k, v in lora.state_dict().items()}, "global_step": 4,
                "pytorch-lightning_version": "2.6.6"}, path)
    before = lora.state_dict()["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"].clone()
    want = lora.merge_and_unload().state_dict()
    rc, err = _run([path, tmp_path / "out", "--model-name", tmp_path / "base", "--lora-rank", "4", "--lora-alpha", "8",
                    "--dtype", "keep"], capsys)
    assert rc == 0, err
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(want) - {"lm_head.weight"}
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], before)  # the adapter is in it


def test_accelerates_file_given_alone_is_read_and_a_rank_file_names_its_folder(tmp_path: Path) -> None:
    """The FULL_STATE_DICT file itself is a whole model; a DCP's .distcp file given alone is one file of a sharded
    save, refused with its folder named."""
    case = LIGHTNING_FILE_CASES[0]
    (tmp_path / "pytorch_model_fsdp.bin").write_bytes((LIGHTNING_DATA / case / LIGHTNING_CKPT).read_bytes())
    assert isinstance(open_checkpoint(tmp_path / "pytorch_model_fsdp.bin"), TorchFileSource)
    sharded = LIGHTNING_DATA / "llama_fsdp2_fp32" / LIGHTNING_CKPT
    with pytest.raises(StreammergeError, match="one file of a sharded checkpoint .torch DCP.*give the folder"):
        open_checkpoint(sharded / "__0_0.distcp")
