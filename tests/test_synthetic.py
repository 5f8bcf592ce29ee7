"""The synthetic checkpoints are what they claim: veRL's layout, real DTensors, a true oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.tensor  # noqa: F401  (lets weights_only loads rebuild DTensors)
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, Replicate, Shard

from streammerge.testing.synthetic import main, make_checkpoint

STEPS = 2
CASES = {
    "ws2": {},
    "ws4_first_divisible": {"world_size": 4, "shard_placement": "first_divisible"},
    "hsdp_2x2": {"world_size": 4, "mesh": (2, 2)},
    "qwen2_tied_ws4": {"arch": "qwen2", "tie_word_embeddings": True, "world_size": 4},
    "empty_pieces_ws4": {"world_size": 4, "vocab_size": 9},  # embed rows chunk as 3, 3, 3, 0
    "extra_buffers": {"extra_buffers": True},
    "plain_ws1": {"world_size": 1, "plain_tensors": True},
}
SHARDED_CASES = [c for c in CASES if c != "plain_ws1"]
# Our case -> the GPU-made fixture it imitates.
FIXTURE_TWINS = {
    "qwen2_tied_ws4": "fsdp2_qwen2_tied_ws4",
    "ws4_first_divisible": "fsdp2_llama_shard1_ws4",
    "hsdp_2x2": "fsdp2_hsdp_llama_2x2",
}


# ----------------------------------------------------------------------------- helpers


def world_size(actor: Path) -> int:
    return json.loads((actor / "fsdp_config.json").read_text())["world_size"]


def info(actor: Path) -> dict:
    return json.loads((actor / "reference" / "INFO.json").read_text())


def load_ranks(actor: Path, kind: str = "model", map_location: str = "cpu") -> list[dict]:
    ws = world_size(actor)
    mmap = map_location != "meta"
    return [
        torch.load(actor / f"{kind}_world_size_{ws}_rank_{r}.pt", map_location=map_location,
                   weights_only=True, mmap=mmap)
        for r in range(ws)
    ]


def gather(pieces: list[torch.Tensor], mesh: tuple[int, ...]) -> torch.Tensor:
    """The full tensor from one entry of every rank file (ranks row-major over the mesh)."""
    if not isinstance(pieces[0], DTensor):
        assert all(torch.equal(p, pieces[0]) for p in pieces), "plain tensors must match on all ranks"
        return pieces[0]
    return _assemble(pieces, torch.arange(len(pieces)).reshape(mesh), pieces[0].placements)


def _assemble(pieces, grid: torch.Tensor, placements) -> torch.Tensor:
    if grid.ndim == 0:
        return pieces[int(grid)]._local_tensor
    parts = [_assemble(pieces, sub, placements[1:]) for sub in grid]
    if placements[0].is_replicate():
        assert all(torch.equal(p, parts[0]) for p in parts), "replicas differ"
        return parts[0]
    return torch.cat(parts, dim=placements[0].dim)


def local_tensors(obj, path: str = ""):
    """(path, this rank's tensor) for every tensor in a nested state dict."""
    if isinstance(obj, torch.Tensor):
        yield path, obj._local_tensor if isinstance(obj, DTensor) else obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from local_tensors(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from local_tensors(v, f"{path}.{i}")


def chunk_shape(shape: torch.Size, dim: int, index: int, n: int) -> torch.Size:
    """Local shape of piece ``index`` when torch.chunk splits ``shape`` into ``n`` along ``dim``."""
    chunks = torch.empty(shape, device="meta").chunk(n, dim)
    if index < len(chunks):
        return chunks[index].shape
    return torch.Size(0 if d == dim else s for d, s in enumerate(shape))


@pytest.fixture(params=list(CASES))
def case(request, make_ckpt) -> tuple[str, Path]:
    return request.param, make_ckpt(**CASES[request.param])


@pytest.fixture(params=SHARDED_CASES)
def sharded(request, make_ckpt) -> tuple[str, Path]:
    return request.param, make_ckpt(**CASES[request.param])


# ----------------------------------------------------------------------------- layout


def test_veRL_layout(case):
    name, actor = case
    ws = world_size(actor)
    assert actor.name == "actor" and actor.parent.name == f"global_step_{STEPS}"
    assert (actor.parent.parent / "latest_checkpointed_iteration.txt").read_text() == str(STEPS)
    for rank in range(ws):
        for kind in ("model", "optim", "extra_state"):
            assert (actor / f"{kind}_world_size_{ws}_rank_{rank}.pt").is_file()
    fsdp_version = 1 if name == "plain_ws1" else 2
    assert json.loads((actor / "fsdp_config.json").read_text()) == {"FSDP_version": fsdp_version, "world_size": ws}
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (actor / "huggingface" / f).is_file()
    for f in ("model.safetensors", "optimizer.pt", "INFO.json"):
        assert (actor / "reference" / f).is_file()


def test_extra_state_holds_scheduler_and_rng(case):
    _, actor = case
    for extra in load_ranks(actor, "extra_state"):
        assert set(extra) == {"lr_scheduler", "rng"}
        assert extra["lr_scheduler"]["last_epoch"] == STEPS
        assert extra["rng"]["cpu"].dtype == torch.uint8


def test_without_optimizer_and_reference_writes_neither(make_ckpt):
    actor = make_ckpt(optimizer=False, reference=False)
    assert not list(actor.glob("optim_*.pt"))
    assert not (actor / "reference").exists()
    assert len(list(actor.glob("model_*.pt"))) == 2


# ----------------------------------------------------------------------------- model files


def test_reference_equals_gathered_rank_pieces(case):
    _, actor = case
    ranks, mesh = load_ranks(actor), tuple(info(actor)["mesh"])
    reference = load_file(actor / "reference" / "model.safetensors")
    assert set(ranks[0]) == set(reference)
    for key, full in reference.items():
        assert torch.equal(gather([r[key] for r in ranks], mesh), full), key


def test_model_files_hold_float32_dtensors(sharded):
    _, actor = sharded
    param_names = set(info(actor)["param_order"])
    for rank_sd in load_ranks(actor, map_location="meta"):
        params = [v for k, v in rank_sd.items() if k in param_names]
        assert params and all(isinstance(v, DTensor) and v.dtype == torch.float32 for v in params)


def test_local_shapes_follow_torch_chunk(sharded):
    _, actor = sharded
    mesh = tuple(info(actor)["mesh"])
    for rank, rank_sd in enumerate(load_ranks(actor, map_location="meta")):
        shard_index = rank % mesh[-1]
        for key, value in rank_sd.items():
            if isinstance(value, DTensor):
                (shard,) = [p for p in value.placements if isinstance(p, Shard)]
                expected = chunk_shape(value.shape, shard.dim, shard_index, mesh[-1])
                assert value._local_tensor.shape == expected, (key, rank)


def test_empty_pieces_exist_when_rows_run_out(make_ckpt):
    actor = make_ckpt(**CASES["empty_pieces_ws4"])
    last = load_ranks(actor, map_location="meta")[-1]
    assert last["model.embed_tokens.weight"]._local_tensor.shape == (0, 64)


@pytest.mark.parametrize(
    "name, expected",
    [("ws2", (Shard(0),)), ("hsdp_2x2", (Replicate(), Shard(0))), ("qwen2_tied_ws4", (Shard(0),))],
)
def test_placements(make_ckpt, name, expected):
    actor = make_ckpt(**CASES[name])
    for rank_sd in load_ranks(actor, map_location="meta"):
        assert {v.placements for v in rank_sd.values()} == {expected}


def test_first_divisible_shards_on_first_dim_divisible_by_fsdp_size(make_ckpt):
    actor = make_ckpt(**CASES["ws4_first_divisible"])
    rank_sd = load_ranks(actor, map_location="meta")[0]
    for key, value in rank_sd.items():
        dim = next((d for d, n in enumerate(value.shape) if n % 4 == 0), 0)
        assert value.placements == (Shard(dim),), key
    assert rank_sd["model.embed_tokens.weight"].placements == (Shard(1),)  # 1003 rows, 64 columns


def test_mesh_dim_names_can_be_chosen(make_ckpt):
    actor = make_ckpt(mesh_dim_names=("dp_shard",))
    assert info(actor)["mesh_dim_names"] == ["dp_shard"]
    embed = load_ranks(actor, map_location="meta")[0]["model.embed_tokens.weight"]
    assert embed.device_mesh.mesh_dim_names == ("dp_shard",)  # our own torch pickled it: readable


def test_tied_model_saves_embed_and_lm_head(make_ckpt):
    actor = make_ckpt(**CASES["qwen2_tied_ws4"])
    for rank_sd in load_ranks(actor):
        assert torch.equal(rank_sd["lm_head.weight"]._local_tensor, rank_sd["model.embed_tokens.weight"]._local_tensor)
    reference = load_file(actor / "reference" / "model.safetensors")
    assert torch.equal(reference["lm_head.weight"], reference["model.embed_tokens.weight"])
    assert "lm_head.weight" not in info(actor)["param_order"]  # named_parameters lists a tied one once


def test_extra_buffers_are_plain_full_copies_on_every_rank(make_ckpt):
    actor = make_ckpt(**CASES["extra_buffers"])
    reference = load_file(actor / "reference" / "model.safetensors")
    for rank_sd in load_ranks(actor):
        buffers = {k: v for k, v in rank_sd.items() if not isinstance(v, DTensor)}
        assert {k: v.dim() for k, v in buffers.items()} == {"model.loss_scale": 0, "model.layers.0.token_counts": 1}
        for key, value in buffers.items():
            assert torch.equal(value, reference[key])


def test_plain_tensors_at_world_size_one(make_ckpt):
    actor = make_ckpt(**CASES["plain_ws1"])
    (model_sd,), (optim_sd,) = load_ranks(actor), load_ranks(actor, "optim")
    assert not any(isinstance(v, DTensor) for v in model_sd.values())
    assert not any(isinstance(v, DTensor) for state in optim_sd["state"].values() for v in state.values())


# ----------------------------------------------------------------------------- optimizer files


def test_optimizer_is_int_keyed_in_named_parameters_order(case):
    name, actor = case
    param_order = info(actor)["param_order"]
    reference = torch.load(actor / "reference" / "optimizer.pt", weights_only=True)
    assert list(reference["state"]) == param_order
    ranks, models, mesh = load_ranks(actor, "optim"), load_ranks(actor), tuple(info(actor)["mesh"])
    for optim_sd in ranks:
        assert list(optim_sd["state"]) == list(range(len(param_order)))
        assert optim_sd["param_groups"][0]["params"] == list(range(len(param_order)))
    for index, fqn in enumerate(param_order):
        state = ranks[0]["state"][index]
        assert state["step"].dim() == 0 and state["step"].item() == STEPS
        if name != "plain_ws1":
            assert isinstance(state["exp_avg"], DTensor)
            assert state["exp_avg"].placements == models[0][fqn].placements
        for key in ("exp_avg", "exp_avg_sq"):
            full = gather([r["state"][index][key] for r in ranks], mesh)
            assert torch.equal(full, reference["state"][fqn][key]), (fqn, key)


# ----------------------------------------------------------------------------- huggingface/


@pytest.mark.parametrize("name", ["ws2", "qwen2_tied_ws4"])
def test_huggingface_dir_loads_offline(make_ckpt, name):
    from transformers import AutoConfig, AutoModelForCausalLM

    actor = make_ckpt(**CASES[name])
    hf = actor / "huggingface"
    config = AutoConfig.from_pretrained(hf)
    assert json.loads((hf / "config.json").read_text())["dtype"] == "bfloat16"
    assert config.dtype == torch.bfloat16 and config.model_type == CASES[name].get("arch", "llama")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(load_file(actor / "reference" / "model.safetensors"), strict=True)


@pytest.mark.parametrize("name", ["ws2", "qwen2_tied_ws4"])
def test_tokenizer_encodes_and_ends_with_special_ids(make_ckpt, name):
    from transformers import AutoTokenizer, GenerationConfig

    hf = make_ckpt(**CASES[name]) / "huggingface"
    tokenizer = AutoTokenizer.from_pretrained(hf)
    text = "t5 t7" if name == "ws2" else "hello world"
    ids = tokenizer(text)["input_ids"]
    assert ids and max(ids) < 1000 and tokenizer.decode(ids) == text
    assert len(tokenizer) == 1003
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [1000, 1001, 1002]
    generation = GenerationConfig.from_pretrained(hf)
    assert (generation.bos_token_id, generation.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)


# ----------------------------------------------------------------------------- determinism, API


def test_same_arguments_give_the_same_values(make_ckpt, tmp_path):
    kwargs = CASES["qwen2_tied_ws4"]
    cached, fresh = make_ckpt(**kwargs), make_checkpoint(tmp_path, **kwargs)
    for kind in ("model", "optim"):
        for a, b in zip(load_ranks(cached, kind), load_ranks(fresh, kind)):
            a, b = dict(local_tensors(a)), dict(local_tensors(b))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokenizer = Path("huggingface", "tokenizer.json")
    assert (cached / tokenizer).read_bytes() == (fresh / tokenizer).read_bytes()


def test_seed_changes_the_values(make_ckpt):
    a = load_file(make_ckpt() / "reference" / "model.safetensors")
    b = load_file(make_ckpt(seed=1) / "reference" / "model.safetensors")
    assert not torch.equal(a["model.norm.weight"], b["model.norm.weight"])


@pytest.mark.parametrize(
    "kwargs",
    [{"world_size": 3, "mesh": (2, 2)}, {"world_size": 2, "plain_tensors": True}, {"arch": "gpt2"},
     {"shard_placement": "last"}, {"world_size": 8, "mesh": (2, 2, 2)}],
)
def test_bad_arguments_fail_before_any_work(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_checkpoint(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_refuses_to_mix_into_a_used_actor_dir(tmp_path):
    actor = tmp_path / f"global_step_{STEPS}" / "actor"
    actor.mkdir(parents=True)
    (actor / "model_world_size_8_rank_0.pt").touch()
    with pytest.raises(FileExistsError):
        make_checkpoint(tmp_path)


def test_cli_prints_the_actor_dir(tmp_path, capsys):
    main([str(tmp_path), "--world-size", "1", "--steps", "1", "--no-reference"])
    actor = Path(capsys.readouterr().out.strip())
    assert actor == tmp_path / "global_step_1" / "actor"
    assert (actor / "model_world_size_1_rank_0.pt").is_file()


# ----------------------------------------------------------------------------- like the GPU fixtures


@pytest.mark.parametrize("name", list(FIXTURE_TWINS))
def test_structure_matches_the_gpu_fixture(make_ckpt, verl_fixtures, name):
    """tests/data/verl's model is smaller (hidden 30): everything but the sizes (and the Shard dims they decide)."""
    _assert_twins(make_ckpt(**CASES[name]), verl_fixtures / FIXTURE_TWINS[name], sizes=False)


@pytest.mark.parametrize("name", list(FIXTURE_TWINS))
def test_structure_matches_the_shared_gpu_fixture(make_ckpt, shared_verl_fixtures, name):
    """The extras outside the project have our sizes (hidden 64, vocab 1003): every shape and placement too."""
    _assert_twins(make_ckpt(**CASES[name]), shared_verl_fixtures / f"gpu_{FIXTURE_TWINS[name]}", sizes=True)


def _assert_twins(ours: Path, theirs: Path, *, sizes: bool) -> None:
    for kind in ("model", "optim"):
        for our_sd, their_sd in zip(load_ranks(ours, kind, "meta"), load_ranks(theirs, kind, "meta")):
            assert _structure(our_sd, sizes) == _structure(their_sd, sizes), kind
    assert info(ours)["param_order"] == info(theirs)["param_order"]
    assert info(ours)["mesh_dim_names"] == info(theirs)["mesh_dim_names"]
    our_extra, their_extra = (torch.load(d / "extra_state_world_size_4_rank_0.pt", weights_only=True)
                              for d in (ours, theirs))
    assert set(our_extra) == set(their_extra) and set(our_extra["lr_scheduler"]) == set(their_extra["lr_scheduler"])


def _structure(obj, sizes: bool = True):
    """Keys, types, placements, global and local shapes, dtypes: everything but the values.

    Without `sizes`: ranks instead of shapes, and placement kinds instead of placements."""
    if isinstance(obj, DTensor):
        if not sizes:
            return ("DTensor", tuple(type(p).__name__ for p in obj.placements), obj.dim(), obj.dtype)
        return ("DTensor", obj.placements, tuple(obj.shape), tuple(obj._local_tensor.shape), obj.dtype)
    if isinstance(obj, torch.Tensor):
        return ("Tensor", tuple(obj.shape) if sizes else obj.dim(), obj.dtype)
    if isinstance(obj, dict):
        return {k: _structure(v, sizes) for k, v in obj.items()} | {"__keys__": list(obj)}
    if isinstance(obj, (list, tuple)):
        return [_structure(v, sizes) for v in obj]
    return type(obj).__name__


# ----------------------------------------------------------------------------- the rank runner


def _crash_first_time(rank: int, marker: str) -> None:
    import os
    import signal

    if rank == 1 and not os.path.exists(marker):
        Path(marker).write_text("crashed once")
        os.kill(os.getpid(), signal.SIGSEGV)
    Path(f"{marker}.rank{rank}").write_text(os.environ.get("OPENBLAS_NUM_THREADS", "unset"))


def _raise(rank: int) -> None:
    raise ValueError(f"rank {rank} refuses")


def test_a_rank_killed_by_a_signal_reruns_the_job_once_with_a_warning(tmp_path):
    """And the ranks' thread pools are single-threaded (a forking process must be: see ranks.py)."""
    from streammerge.testing.ranks import run_ranks

    marker = tmp_path / "marker"
    with pytest.warns(RuntimeWarning, match=r"rank 1 of .*_crash_first_time died by SIGSEGV \(attempt 1 of 2\)"):
        run_ranks(_crash_first_time, (str(marker),), 2)
    assert [(tmp_path / f"marker.rank{r}").read_text() for r in (0, 1)] == ["1", "1"]


def test_a_rank_killed_twice_or_raising_fails_the_job(tmp_path):
    import torch.multiprocessing as tmp

    from streammerge.testing.ranks import run_ranks

    with pytest.raises(tmp.ProcessExitedException, match="SIGSEGV"):
        run_ranks(_crash_first_time, (str(tmp_path / "marker"),), 2, attempts=1)
    with pytest.raises(tmp.ProcessRaisedException, match="rank [01] refuses"):
        run_ranks(_raise, (), 2)
