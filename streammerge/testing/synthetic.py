"""Make real veRL-format FSDP2 sharded checkpoints on CPU (and the same training saved as a torch DCP).

The merge core, its tests, ``streammerge demo`` and the benchmarks need inputs that are
byte-for-byte what veRL's ``FSDPCheckpointManager.save_checkpoint`` writes. Rather than
faking DTensor pickles, this module runs a genuine (tiny) FSDP2 training job on CPU
processes with the gloo backend and saves exactly the way veRL does, plus an oracle
(``reference/``) gathered from the live training state with torch's own full-state APIs.

    make_checkpoint("/tmp/ck", arch="qwen2", world_size=4, tie_word_embeddings=True)
    make_checkpoint("/tmp/ck", save_format="dcp")   # dcp.save({"model": ..., "optimizer": ...}) instead
    python -m streammerge.testing.synthetic /tmp/ck --arch qwen2 --world-size 4 --tie
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch

from .ranks import run_ranks

Arch = Literal["llama", "qwen2"]
ShardPlacement = Literal["dim0", "first_divisible"]
SaveFormat = Literal["verl", "dcp"]

# Everything a worker imports; preloaded once into the forkserver so each rank starts in
# milliseconds instead of re-importing torch and transformers (seconds per process).
_WORKER_IMPORTS = [
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint.state_dict",
    "torch.distributed.checkpoint",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "safetensors.torch",
    "transformers.tokenization_utils_tokenizers",
]
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_BATCH_SIZE = 2
_SEQ_LEN = 16


@dataclass(frozen=True)
class _Spec:
    """Everything a rank needs; plain data so it pickles to the worker processes."""

    actor_dir: str
    arch: Arch
    world_size: int
    mesh: tuple[int, ...]
    mesh_dim_names: tuple[str, ...]
    tie_word_embeddings: bool
    shard_placement: ShardPlacement
    hidden_size: int
    num_layers: int
    vocab_size: int
    steps: int
    seed: int
    optimizer: bool
    reference: bool
    extra_buffers: bool
    plain_tensors: bool
    save_format: SaveFormat = "verl"

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "qwen2"):
            raise ValueError(f"arch must be 'llama' or 'qwen2', got {self.arch!r}")
        if self.shard_placement not in ("dim0", "first_divisible"):
            raise ValueError(f"shard_placement must be 'dim0' or 'first_divisible', got {self.shard_placement!r}")
        if self.world_size < 1 or math.prod(self.mesh) != self.world_size:
            raise ValueError(f"mesh {self.mesh} does not multiply to world_size {self.world_size}")
        if len(self.mesh_dim_names) != len(self.mesh):
            raise ValueError(f"mesh_dim_names {self.mesh_dim_names} do not match mesh {self.mesh}")
        if self.hidden_size % 8:
            raise ValueError("hidden_size must be a multiple of 8 (4 heads of an even head_dim)")
        if self.num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        if self.vocab_size <= len(_SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed {len(_SPECIAL_TOKENS)} (the special tokens)")
        if self.arch == "qwen2" and self.vocab_size < 256 + len(_SPECIAL_TOKENS):
            raise ValueError("qwen2's byte-level tokenizer needs vocab_size >= 259")
        if self.steps < 0:
            raise ValueError("steps must be >= 0")
        if self.plain_tensors and self.world_size != 1:
            raise ValueError("plain_tensors is what FSDP1 saves at world size 1 only")
        if self.save_format not in ("verl", "dcp") or (self.save_format == "dcp" and self.plain_tensors):
            raise ValueError(f"save_format must be 'verl' or 'dcp' (without plain_tensors), got {self.save_format!r}")


def make_checkpoint(
    out_dir: str | os.PathLike,
    *,
    arch: Arch = "llama",
    world_size: int = 2,
    mesh: tuple[int, ...] | None = None,
    mesh_dim_names: tuple[str, ...] | None = None,
    tie_word_embeddings: bool = False,
    shard_placement: ShardPlacement = "dim0",
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 1003,
    steps: int = 2,
    seed: int = 0,
    optimizer: bool = True,
    reference: bool = True,
    extra_buffers: bool = False,
    plain_tensors: bool = False,
    save_format: SaveFormat = "verl",
) -> Path:
    """Train a tiny model with FSDP2 on ``world_size`` CPU ranks and save it as veRL does.

    Writes ``out_dir/global_step_{steps}/actor/`` (which must not hold files yet) and
    ``out_dir/latest_checkpointed_iteration.txt`` and returns the actor directory.
    ``mesh=(2, 2)`` gives HSDP with dim names ("ddp", "fsdp");
    ``shard_placement="first_divisible"`` is veRL's older shard_placement_fn (some Shard(1));
    ``plain_tensors`` (world size 1 only) saves plain full tensors, as FSDP1 does at world size 1.
    ``save_format="dcp"`` saves the same training with ``dcp.save({"model": get_model_state_dict(model),
    "optimizer": get_optimizer_state_dict(model, optim), "scheduler": ...})`` into ``out_dir/step_{steps}/``
    (beside its ``huggingface/`` and ``reference/``) and returns that folder.
    The same arguments always give the same tensor values.

    Ranks are forked from a forkserver that imports torch and transformers once per calling
    process, so only the first call pays seconds. Like every multiprocessing child, each rank
    re-imports the caller's main module: a calling script must guard its entry point with
    ``if __name__ == "__main__":``.
    """
    mesh = tuple(mesh) if mesh is not None else (world_size,)
    root = Path(out_dir)
    actor_dir = root / f"global_step_{steps}" / "actor" if save_format == "verl" else root / f"step_{steps}"
    spec = _Spec(
        actor_dir=str(actor_dir), arch=arch, world_size=world_size, mesh=mesh,
        mesh_dim_names=tuple(mesh_dim_names) if mesh_dim_names else _default_dim_names(len(mesh)),
        tie_word_embeddings=tie_word_embeddings, shard_placement=shard_placement,
        hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size, steps=steps,
        seed=seed, optimizer=optimizer, reference=reference, extra_buffers=extra_buffers,
        plain_tensors=plain_tensors, save_format=save_format,
    )
    if actor_dir.is_dir() and any(actor_dir.iterdir()):
        # Rank files of another world size would mix with ours into an unmergeable folder.
        raise FileExistsError(f"{actor_dir} is not empty; pick a new out_dir or remove it")
    actor_dir.mkdir(parents=True, exist_ok=True)
    run_ranks(_train_and_save, (spec,), spec.world_size, preload=_WORKER_IMPORTS)
    if save_format == "verl":  # veRL's trainer writes the tracker only after every rank has saved
        (root / "latest_checkpointed_iteration.txt").write_text(str(steps))
    return actor_dir


def _default_dim_names(ndim: int) -> tuple[str, ...]:
    names = {1: ("fsdp",), 2: ("ddp", "fsdp")}
    if ndim not in names:
        raise ValueError(f"mesh must be 1-D or 2-D (HSDP), got {ndim} dims")
    return names[ndim]


def _train_and_save(rank: int, spec: _Spec) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device_mesh = init_device_mesh("cpu", spec.mesh, mesh_dim_names=spec.mesh_dim_names)
    config = _model_config(spec)
    model = _build_model(spec, config)
    _shard(model, device_mesh, spec)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    # Like veRL's get_constant_schedule_with_warmup: a LambdaLR whose state has lr_lambdas [None].
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, lambda _: 1.0)
    _train(model, optim, scheduler, spec, rank)
    if spec.save_format == "dcp":
        _save_dcp(model, optim, scheduler, spec)
    else:
        _save_rank_files(model, optim, scheduler, spec, rank)
    if rank == 0:
        _save_hf_dir(config, spec)
    if spec.reference:
        _save_reference(model, optim, spec, rank)
    dist.barrier()


def _model_config(spec: _Spec):
    """A tiny config shaped like the GPU fixtures' (4 heads, 2 KV heads, SwiGLU 2.75x)."""
    bos_id, eos_id = spec.vocab_size - 2, spec.vocab_size - 1
    kwargs: dict[str, Any] = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 11 // 4, num_hidden_layers=spec.num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=bos_id, eos_token_id=eos_id,
    )
    if spec.arch == "llama":
        from transformers.models.llama.configuration_llama import LlamaConfig

        return LlamaConfig(head_dim=spec.hidden_size // 4, **kwargs)
    from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

    return Qwen2Config(**kwargs)


def _build_model(spec: _Spec, config) -> torch.nn.Module:
    """Same seed on every rank, so every rank holds the same full model before sharding."""
    from transformers.models.llama.modeling_llama import LlamaForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

    cls: Any = LlamaForCausalLM if spec.arch == "llama" else Qwen2ForCausalLM
    torch.manual_seed(spec.seed)
    model = cls(config).to(torch.float32)
    if spec.extra_buffers:
        values = torch.Generator().manual_seed(spec.seed)
        model.model.register_buffer("loss_scale", torch.rand((), generator=values))
        model.model.layers[0].register_buffer("token_counts", torch.randint(0, 100, (7,), generator=values))
    return model


def _shard(model: Any, device_mesh, spec: _Spec) -> None:
    """veRL's apply_fsdp2: fully_shard each decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    fsdp_size = spec.mesh[-1]

    def first_divisible(param: torch.nn.Parameter) -> Shard:
        return next((Shard(d) for d, n in enumerate(param.shape) if n % fsdp_size == 0), Shard(0))

    placement_fn = first_divisible if spec.shard_placement == "first_divisible" else None
    for layer in model.model.layers:
        fully_shard(layer, mesh=device_mesh, shard_placement_fn=placement_fn)
    fully_shard(model, mesh=device_mesh, shard_placement_fn=placement_fn)


def _train(model, optim, scheduler, spec: _Spec, rank: int) -> None:
    """AdamW steps on seeded random tokens; each rank gets its own data, as in data parallel."""
    tokens = torch.Generator().manual_seed(spec.seed * 1000 + rank + 1)
    for _ in range(spec.steps):
        batch = torch.randint(0, spec.vocab_size, (_BATCH_SIZE, _SEQ_LEN), generator=tokens)
        model(input_ids=batch, labels=batch).loss.backward()
        optim.step()
        scheduler.step()
        optim.zero_grad()


def _save_rank_files(model, optim, scheduler, spec: _Spec, rank: int) -> None:
    """What FSDPCheckpointManager.save_checkpoint writes on every rank."""
    actor = Path(spec.actor_dir)
    suffix = f"world_size_{spec.world_size}_rank_{rank}.pt"
    model_sd, optim_sd = model.state_dict(), optim.state_dict()
    if spec.plain_tensors:
        model_sd, optim_sd = _to_plain(model_sd), _to_plain(optim_sd)
    torch.save(model_sd, actor / f"model_{suffix}")
    if spec.optimizer:
        torch.save(optim_sd, actor / f"optim_{suffix}")
    extra = {"lr_scheduler": scheduler.state_dict(), "rng": {"cpu": torch.get_rng_state()}}
    torch.save(extra, actor / f"extra_state_{suffix}")


def _save_dcp(model, optim, scheduler, spec: _Spec) -> None:
    """A trainer's torch DCP (collective): model and optimizer by parameter name, the scheduler as bytes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "scheduler": scheduler.state_dict()}
    if spec.optimizer:
        state["optimizer"] = get_optimizer_state_dict(model, optim)
    dcp.save(state, checkpoint_id=spec.actor_dir)


def _to_plain(obj):
    """DTensors -> full plain tensors, recursively (FSDP1's world-size-1 output)."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return type(obj)((k, _to_plain(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    return obj


def _save_hf_dir(config, spec: _Spec) -> None:
    """Rank 0's part: config, generation config, tokenizer and fsdp_config.json."""
    from transformers import GenerationConfig

    actor = Path(spec.actor_dir)
    hf_dir = actor / "huggingface"
    config.dtype = torch.bfloat16  # real runs start from a bf16 HF model; we train fp32 masters
    config.architectures = [_ARCH_CLASS[spec.arch]]
    config.save_pretrained(hf_dir)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(hf_dir)
    _tokenizer(spec.arch, spec.vocab_size).save_pretrained(hf_dir)
    if spec.save_format == "verl":
        fsdp_config = {"FSDP_version": 1 if spec.plain_tensors else 2, "world_size": spec.world_size}
        (actor / "fsdp_config.json").write_text(json.dumps(fsdp_config, indent=4))


_ARCH_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _tokenizer(arch: Arch, vocab_size: int):
    """A real tokenizer whose last three ids are <unk>, <s>, </s>, as in the GPU fixtures.

    Llama gets a word-level one over t0..tN like the fixtures. Qwen2 needs byte-level BPE:
    transformers 5 always loads qwen2 folders with Qwen2Tokenizer, which rebuilds a BPE from
    tokenizer.json and encodes every text to [] with a word-level vocab (the fixtures' does).
    """
    from transformers import PreTrainedTokenizerFast

    backend = _byte_level_bpe(vocab_size) if arch == "qwen2" else _word_level(vocab_size)
    backend.add_special_tokens(list(_SPECIAL_TOKENS))
    unk, bos, eos = _SPECIAL_TOKENS
    # pad = eos as veRL sets it; without one Qwen2Tokenizer appends its own pad token.
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unk, bos_token=bos,
                                   eos_token=eos, pad_token=eos)


def _word_level(vocab_size: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = [f"t{i}" for i in range(vocab_size - len(_SPECIAL_TOKENS))] + list(_SPECIAL_TOKENS)
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=_SPECIAL_TOKENS[0]))
    backend.pre_tokenizer = Whitespace()
    return backend


def _byte_level_bpe(vocab_size: int):
    """BPE trained on seeded pseudo-words up to exactly vocab_size - 3 tokens."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ("".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(2 * vocab_size))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(_SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([" ".join(words)], trainer)
    if backend.get_vocab_size() != vocab_size - len(_SPECIAL_TOKENS):
        raise RuntimeError(f"BPE training stopped at {backend.get_vocab_size()} tokens")
    return backend


def _save_reference(model, optim, spec: _Spec, rank: int) -> None:
    """The oracle, gathered from live state with torch's own full-state APIs (collective)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_model = get_model_state_dict(model, options=options)
    full_optim = get_optimizer_state_dict(model, optim, options=options) if spec.optimizer else None
    if rank != 0:
        return
    ref_dir = Path(spec.actor_dir) / "reference"
    ref_dir.mkdir(exist_ok=True)
    # safetensors refuses shared storage; tied weights must be separate copies.
    save_file({k: cast(torch.Tensor, v).clone() for k, v in full_model.items()}, ref_dir / "model.safetensors",
              metadata={"format": "pt"})
    if full_optim is not None:
        torch.save(full_optim, ref_dir / "optimizer.pt")
    info = {
        "torch": torch.__version__,
        "fsdp_version": 1 if spec.plain_tensors else 2,
        "mesh": list(spec.mesh),
        "mesh_dim_names": list(spec.mesh_dim_names),
        "arch": spec.arch,
        "shard_placement_fn": spec.shard_placement == "first_divisible",
        "device": "cpu",
        "synthetic": {k: v for k, v in asdict(spec).items() if k != "actor_dir"},
        "param_order": [name for name, _ in model.named_parameters()],
    }
    (ref_dir / "INFO.json").write_text(json.dumps(info, indent=2))


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    """``python -m streammerge.testing.synthetic OUT_DIR [options]``: print the actor directory."""
    p = argparse.ArgumentParser(prog="python -m streammerge.testing.synthetic", description=main.__doc__)
    p.add_argument("out_dir")
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--mesh", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                   help="e.g. 2,2 for HSDP")
    p.add_argument("--mesh-dim-names", type=lambda s: tuple(s.split(",")), default=None,
                   help='default "fsdp" (1-D) or "ddp,fsdp" (2-D); VeOmni uses "dp_shard"')
    p.add_argument("--tie", action="store_true", help="tie_word_embeddings")
    p.add_argument("--shard-placement", choices=["dim0", "first_divisible"], default="dim0")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=1003)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-optimizer", action="store_true")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--extra-buffers", action="store_true")
    p.add_argument("--plain-tensors", action="store_true")
    p.add_argument("--save-format", choices=["verl", "dcp"], default="verl")
    a = p.parse_args(argv)
    actor = make_checkpoint(
        a.out_dir, arch=a.arch, world_size=a.world_size, mesh=a.mesh,
        mesh_dim_names=a.mesh_dim_names, tie_word_embeddings=a.tie,
        shard_placement=a.shard_placement, hidden_size=a.hidden_size, num_layers=a.num_layers,
        vocab_size=a.vocab_size, steps=a.steps, seed=a.seed, optimizer=not a.no_optimizer,
        reference=not a.no_reference, extra_buffers=a.extra_buffers, plain_tensors=a.plain_tensors,
        save_format=a.save_format,
    )
    print(actor)


if __name__ == "__main__":
    main()
