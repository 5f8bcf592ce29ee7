"""Megatron-Core `torch_dist` checkpoints: Megatron's stacked, fused tensors as Hugging Face tensors.

A `torch_dist` checkpoint is a DCP folder (plus `metadata.json`) whose keys are Megatron-Core's
sharded-tensor keys, with the global layout whatever TP/PP/EP it was saved with: layers stacked on
a leading dim (`decoder.layers.self_attention.linear_qkv.weight` is [L, (nq+2ng)d, H]), QKV rows
interleaved per KV group (`[q heads of the group; k; v]`), `linear_fc1` = `[gate; up]`, MoE experts
stacked on dim 1, norms under Transformer-Engine names (`linear_qkv.layer_norm_weight`; the norm before an MoE
layer, which Transformer Engine cannot fuse into a router, as `pre_mlp_layernorm.weight`), the vocab padded.
Every Hugging Face tensor is a box of one of them (a layer, an expert, the rows of a group, a half, the unpadded
vocab), so the mapping is a view: plain pieces (offset, shape, strides) of the
DCP chunks, copied by the writer like any other; verify, resume and torchrun work unchanged.

The table (`table`) names, per architecture, which Megatron key and which box gives each HF tensor;
head counts, sizes and the vocab come from config.json (`--model-name` or `huggingface/`), checked
against the settings the run recorded where it did (`megatron_run`). Every key of the checkpoint is
used, or known to hold no weights (`_extra_state`, `common_state`, `rng_state`, optimizer state), or
the merge stops; shapes that disagree with the config, and weights not stored in full precision
(FP8, integers), stop it too.

Optimizer: the distributed optimizer saved `fully_reshardable` keeps `optimizer.state.<kind>.<key>`
in the model keys' layout, so the same table maps it exactly; `dp_reshardable` keeps flat DDP
buffers whose parameter order and padding are not in the checkpoint: skipped with a warning.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dtypes import FULL_PRECISION, DType
from ..errors import CheckpointError, ConfigError, UnsupportedLayoutError
from ..model_folder import ties_embeddings
from . import megatron_run
from .base import Oracle, Piece, SourceTensor
from .dcp import DcpCheckpoint, DcpSource, megatron_backend, read_dcp

if TYPE_CHECKING:
    from ..options import MergeOptions
    from ..plan import Plan

ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")
# keys only Megatron-Core writes: stacked layers (no layer number after `layers.`), ShardedObjects, its common state
_MEGATRON_KEY = re.compile(r"^decoder\.layers\.[a-z_]|\._extra_state/shard_|^common_state/")
_NO_WEIGHTS = re.compile(r"(\._extra_state/|^common_state/|^rng_state/|^optimizer\.)")
_L = "decoder.layers."
OPTIMIZER_KINDS = ("exp_avg", "exp_avg_sq", "param")


@dataclass(frozen=True)
class Arch:
    """What the mapping needs from config.json."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    groups: int  # KV heads (query groups)
    head_dim: int
    vocab: int
    ffn: int  # dense MLP intermediate size
    experts: int  # 0: dense
    expert_ffn: int
    tied: bool


def text_config(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The language model's part of config.json (`text_config` of a multimodal config), or all of it."""
    config = config or {}
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def arch_of(config: Mapping[str, Any] | None, where: str) -> Arch:
    """The numbers of the model config.json describes; refuses what the table does not map."""
    if not config:
        raise ConfigError(f"{where}: a Megatron checkpoint needs the model's config.json (head counts, vocab size): "
                          "give it with --model-name (a Hub model or a folder with config.json)")
    cfg = text_config(config)
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedLayoutError(f"{where}: model_type {model_type!r}: streammerge maps Megatron checkpoints of "
                                     f"{', '.join(ARCHITECTURES)} only")

    def need(*keys: str, default: int | None = None) -> int:
        """The first of `keys` the config has (null counts as absent), which must be a positive whole number."""
        for k in keys:
            v = cfg.get(k)
            if v is None:
                continue
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
            raise ConfigError(f"{where}: config.json's {k} is {json.dumps(v)[:40]}, not a positive whole number")
        if default is not None:
            return default
        raise ConfigError(f"{where}: config.json has no {keys[0]}")

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    groups = need("num_key_value_heads", default=heads)
    head_dim = need("head_dim", default=hidden // heads)
    experts, expert_ffn = 0, 0
    if model_type == "qwen3_moe":
        experts, expert_ffn = need("num_experts", "num_local_experts"), need("moe_intermediate_size")
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise UnsupportedLayoutError(f"{where}: Qwen3-MoE with dense layers (mlp_only_layers, decoder_sparse_step) "
                                         "is not mapped")
    elif model_type == "mixtral":
        experts, expert_ffn = need("num_local_experts", "num_experts"), need("intermediate_size")
    if model_type == "llama" and cfg.get("mlp_bias"):
        raise UnsupportedLayoutError(f"{where}: Llama with mlp_bias is not mapped")
    if heads % groups:
        raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {groups}")
    return Arch(model_type, need("num_hidden_layers"), hidden, heads, groups, head_dim, need("vocab_size"),
                need("intermediate_size") if model_type != "mixtral" else 0, experts, expert_ffn,
                ties_embeddings(config))


def megatron_keys(ck: DcpCheckpoint) -> str | None:
    """What makes a DCP folder Megatron-Core's whatever metadata.json says (a key, common.pt), or None."""
    if (ck.folder / megatron_run.COMMON_FILE).is_file():
        return f"{megatron_run.COMMON_FILE} beside .metadata"
    key = next((k for k in (*ck.bytes_items, *ck.tensors) if _MEGATRON_KEY.search(k)), None)
    return None if key is None else f"key {key!r}"


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Take:
    """One HF tensor = a box of one Megatron tensor: fixed leading indices, then a part of what remains."""

    hf: str
    key: str  # Megatron's key
    index: tuple[int, ...]  # layer, or (layer, expert)
    part: str  # "all", "vocab" (the unpadded rows), "q", "k", "v", "gate", "up"


def _dense_names(a: Arch) -> dict[str, str]:
    return {"gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"}


def _moe_names(a: Arch, e: int) -> dict[str, str]:
    if a.model_type == "mixtral":
        p = f"block_sparse_moe.experts.{e}."
        return {"gate": p + "w1.weight", "up": p + "w3.weight", "down": p + "w2.weight"}
    p = f"mlp.experts.{e}."
    return {"gate": p + "gate_proj.weight", "up": p + "up_proj.weight", "down": p + "down_proj.weight"}


def table(a: Arch, shapes: Mapping[str, tuple[int, ...]], where: str,
          dtypes_of: Mapping[str, DType] | None = None) -> list[Take]:
    """Every HF tensor of the model, in `named_parameters` order, as a box of a Megatron tensor.

    `shapes` are the checkpoint's model keys; each one the table uses is checked against the config, and its
    dtype (`dtypes_of`) must be a full-precision float: FP8 or integer weights mean nothing without their scales.
    """
    dtypes_of = dtypes_of or {}
    qkv_rows = (a.heads + 2 * a.groups) * a.head_dim
    # the norm before the MLP: fused into linear_fc1 (the local spec's renamed so too), or a layer of its own (the
    # Transformer Engine spec's MoE layers); both present is two norms for one, and the second stays unmapped
    pre_mlp = _L + "pre_mlp_layernorm.weight"
    if pre_mlp not in shapes:
        pre_mlp = _L + "mlp.linear_fc1.layer_norm_weight"
    expect: dict[str, tuple[int, ...]] = {
        "embedding.word_embeddings.weight": (-1, a.hidden),
        _L + "self_attention.linear_qkv.layer_norm_weight": (a.layers, a.hidden),
        _L + "self_attention.linear_qkv.weight": (a.layers, qkv_rows, a.hidden),
        _L + "self_attention.linear_proj.weight": (a.layers, a.hidden, a.heads * a.head_dim),
        pre_mlp: (a.layers, a.hidden),
        "decoder.final_layernorm.weight": (a.hidden,),
    }
    bias = _L + "self_attention.linear_qkv.bias"
    if a.model_type == "qwen2":
        expect[bias] = (a.layers, qkv_rows)
    elif bias in shapes:
        raise UnsupportedLayoutError(f"{where}: the checkpoint has q/k/v biases ({bias}), which a transformers "
                                     f"{a.model_type} model does not have (Llama's attention_bias adds an o_proj bias "
                                     "the checkpoint lacks; of the mapped models only Qwen2 has q/k/v biases alone); "
                                     "refusing to drop them")
    if a.model_type in ("qwen3", "qwen3_moe"):
        expect[_L + "self_attention.q_layernorm.weight"] = (a.layers, a.head_dim)
        expect[_L + "self_attention.k_layernorm.weight"] = (a.layers, a.head_dim)
    if a.experts:
        expect[_L + "mlp.router.weight"] = (a.layers, a.experts, a.hidden)
        expect[_L + "mlp.experts.experts.linear_fc1.weight"] = (a.layers, a.experts, 2 * a.expert_ffn, a.hidden)
        expect[_L + "mlp.experts.experts.linear_fc2.weight"] = (a.layers, a.experts, a.hidden, a.expert_ffn)
    else:
        expect[_L + "mlp.linear_fc1.weight"] = (a.layers, 2 * a.ffn, a.hidden)
        expect[_L + "mlp.linear_fc2.weight"] = (a.layers, a.hidden, a.ffn)
    if "output_layer.weight" in shapes or not a.tied:
        expect["output_layer.weight"] = (-1, a.hidden)
        if a.tied:
            raise ConfigError(f"{where}: config.json ties the embeddings, but the checkpoint has its own "
                              "output_layer.weight (trained untied? give the right config with --model-name)")

    unmapped = sorted(k for k in shapes if k not in expect)
    if unmapped:
        raise UnsupportedLayoutError(f"{where}: Megatron key {unmapped[0]!r} has no Hugging Face {a.model_type} "
                                     f"tensor to go to ({len(unmapped)} unmapped keys); refusing to drop weights")
    for key, dtype in dtypes_of.items():
        if key in expect and dtype not in FULL_PRECISION:
            raise UnsupportedLayoutError(f"{where}: {key} is stored as {dtype.name}, not a full-precision float: "
                                         "quantized values whose scales are not applied here (Megatron itself saves "
                                         "FP8 parameters dequantized); refusing to write them as the weights")
    for key, want in expect.items():
        got = shapes.get(key)
        if got is None:
            raise CheckpointError(f"{where}: no {key!r} in the checkpoint (a {a.model_type} model needs it)")
        if len(got) != len(want) or any(w not in (-1, g) for w, g in zip(want, got)):
            raise ConfigError(f"{where}: config.json does not describe this checkpoint: {key} is {list(got)}, the "
                              f"config gives {[('V' if w == -1 else w) for w in want]} (give the right config with "
                              "--model-name)")
        if want[0] == -1 and got[0] < a.vocab:
            raise ConfigError(f"{where}: {key} has {got[0]} rows, fewer than the config's vocab_size {a.vocab}")

    takes = [Take("model.embed_tokens.weight", "embedding.word_embeddings.weight", (), "vocab")]
    attn = "self_attn."
    for i in range(a.layers):
        p = f"model.layers.{i}."
        qkv = _L + "self_attention.linear_qkv.weight"
        for part in "qkv":
            takes.append(Take(f"{p}{attn}{part}_proj.weight", qkv, (i,), part))
            if bias in expect:
                takes.append(Take(f"{p}{attn}{part}_proj.bias", bias, (i,), part))
        takes.append(Take(f"{p}{attn}o_proj.weight", _L + "self_attention.linear_proj.weight", (i,), "all"))
        if a.model_type in ("qwen3", "qwen3_moe"):
            takes.append(Take(f"{p}{attn}q_norm.weight", _L + "self_attention.q_layernorm.weight", (i,), "all"))
            takes.append(Take(f"{p}{attn}k_norm.weight", _L + "self_attention.k_layernorm.weight", (i,), "all"))
        if a.experts:
            gate = "block_sparse_moe.gate.weight" if a.model_type == "mixtral" else "mlp.gate.weight"
            takes.append(Take(p + gate, _L + "mlp.router.weight", (i,), "all"))
            for e in range(a.experts):
                n = _moe_names(a, e)
                fc1 = _L + "mlp.experts.experts.linear_fc1.weight"
                takes += [Take(p + n["gate"], fc1, (i, e), "gate"), Take(p + n["up"], fc1, (i, e), "up"),
                          Take(p + n["down"], _L + "mlp.experts.experts.linear_fc2.weight", (i, e), "all")]
        else:
            n = _dense_names(a)
            takes += [Take(p + n["gate"], _L + "mlp.linear_fc1.weight", (i,), "gate"),
                      Take(p + n["up"], _L + "mlp.linear_fc1.weight", (i,), "up"),
                      Take(p + n["down"], _L + "mlp.linear_fc2.weight", (i,), "all")]
        takes += [Take(p + "input_layernorm.weight", _L + "self_attention.linear_qkv.layer_norm_weight", (i,), "all"),
                  Take(p + "post_attention_layernorm.weight", pre_mlp, (i,), "all")]
    takes.append(Take("model.norm.weight", "decoder.final_layernorm.weight", (), "all"))
    if "output_layer.weight" in expect:
        takes.append(Take("lm_head.weight", "output_layer.weight", (), "vocab"))
    return takes


# ---------------------------------------------------------------- a take as boxes of the Megatron tensor

Segment = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (source start, HF start, HF size)


def segments(take: Take, a: Arch, mshape: tuple[int, ...]) -> tuple[tuple[int, ...], list[Segment]]:
    """(HF shape, boxes): HF[dst : dst+size] = M[index, src[k:] : src[k:]+size], k = len(index)."""
    k = len(take.index)
    rest = mshape[k:]
    idx = take.index
    if take.part == "all":
        return rest, [(idx + (0,) * len(rest), (0,) * len(rest), rest)]
    if take.part == "vocab":
        shape = (a.vocab,) + rest[1:]
        return shape, [(idx + (0,) * len(rest), (0,) * len(rest), shape)]
    tail = rest[1:]  # the hidden dim of a weight, nothing for a bias
    zeros = (0,) * len(tail)
    if take.part in ("gate", "up"):
        half = rest[0] // 2
        start = 0 if take.part == "gate" else half
        return (half,) + tail, [(idx + (start,) + zeros, (0,) + zeros, (half,) + tail)]
    per_group = a.heads // a.groups
    d = a.head_dim
    group_rows = (per_group + 2) * d
    rows, first = {"q": (per_group * d, 0), "k": (d, per_group * d), "v": (d, (per_group + 1) * d)}[take.part]
    segs = [(idx + (g * group_rows + first,) + zeros, (g * rows,) + zeros, (rows,) + tail) for g in range(a.groups)]
    return (a.groups * rows,) + tail, segs


def view(src: SourceTensor, take: Take, a: Arch, name: str | None = None,
         by_layer: Mapping[int, list[Piece]] | None = None) -> SourceTensor:
    """The HF tensor `take` names, as pieces of the Megatron tensor's chunks (a copy, never a computation).

    `by_layer` (from `pieces_by_layer`) saves scanning every chunk of a stacked tensor for each layer.
    """
    shape, segs = segments(take, a, src.shape)
    k = len(take.index)
    isz = src.dtype.itemsize
    pieces = []
    if k:
        candidates = (by_layer if by_layer is not None else pieces_by_layer(src)).get(take.index[0], [])
    else:
        candidates = list(src.pieces)
    for p in candidates:
        for s_src, s_dst, size in segs:
            lo = [max(a0, b0) for a0, b0 in zip(p.start, s_src)]
            hi = [min(a0 + n, b0 + (1 if d < k else size[d - k]))
                  for d, (a0, n, b0) in enumerate(zip(p.start, p.shape, s_src))]
            if any(x >= y for x, y in zip(lo, hi)):
                continue
            offset = p.offset + sum((x - s) * st for x, s, st in zip(lo, p.start, p.stride)) * isz
            pieces.append(Piece(p.rank, p.file, offset, tuple(y - x for x, y in zip(lo[k:], hi[k:])), p.stride[k:],
                                tuple(t + x - s for t, x, s in zip(s_dst, lo[k:], s_src[k:]))))
    short = ".".join(take.key.split(".")[-2:])
    where = f"[{','.join(map(str, take.index))}]" if take.index else ""
    layout = f"{short}{where}" + ("" if take.part == "all" else f" {take.part}")
    return SourceTensor(name or take.hf, shape, src.dtype, tuple(pieces), layout)


def pieces_by_layer(src: SourceTensor) -> dict[int, list[Piece]]:
    """A stacked tensor's chunks by the index of its leading dim (a chunk may span several)."""
    out: dict[int, list[Piece]] = {}
    for p in src.pieces:
        for i in range(p.start[0], p.start[0] + p.shape[0]):
            out.setdefault(i, []).append(p)
    return out


def torch_view(m: Any, take: Take, a: Arch) -> Any:
    """The same HF tensor computed by torch from `M[index]` (view/reshape/chunk): verify's independent arithmetic."""
    if take.part == "all":
        return m
    if take.part == "vocab":
        return m[:a.vocab]
    if take.part in ("gate", "up"):
        return m.chunk(2, dim=0)[0 if take.part == "gate" else 1]
    per_group = a.heads // a.groups
    g = m.reshape(a.groups, per_group + 2, a.head_dim, *m.shape[1:])
    part = {"q": g[:, :per_group], "k": g[:, per_group:per_group + 1], "v": g[:, per_group + 1:]}[take.part]
    return part.reshape(-1, *m.shape[1:])


# ---------------------------------------------------------------- the source

class MegatronSource(DcpSource):
    """A Megatron-Core `torch_dist` folder (Megatron-LM, NeMo 2, veRL's Megatron backend without mbridge)."""

    format = "Megatron torch_dist"
    oracle_after_plan = True  # names and layouts come from the architecture in the config
    takes_key_prefix = False  # the architecture names the tensors

    def __init__(self, path: Path, *, hf_dir: Path | None = None, step: int | None = None):
        super().__init__(path, hf_dir=hf_dir, step=step)
        self.config: dict | None = None
        self._config_where = str(path)
        self._arch: Arch | None = None
        self._takes: dict[str, Take] | None = None
        self._optimizer: tuple[DcpCheckpoint | None, str | None] | None = None

    def use_model(self, config: dict | None, model_dir: Path | None) -> None:
        self.config = config
        self._config_where = str(model_dir / "config.json") if model_dir is not None else str(self.path)
        self._arch = self._takes = None

    def mapping(self) -> tuple[Arch, dict[str, Take]]:
        """The architecture and the table for this checkpoint (every key checked)."""
        if self._arch is None or self._takes is None:
            ck = self.checkpoint()
            arch = arch_of(self.config, self._config_where)
            megatron_run.check(arch, text_config(self.config), megatron_run.recorded(self.path, ck), self._config_where)
            where = f"{self.path} (with {self._config_where})"
            odd = sorted(k for k in ck.bytes_items if not _NO_WEIGHTS.search(k))
            if odd:
                raise UnsupportedLayoutError(f"{self.path}: Megatron item {odd[0]!r} is not a tensor and not known "
                                             "to hold no weights; refusing to drop it")
            model = {k: t for k, t in ck.tensors.items() if not k.startswith("optimizer.")}
            shapes = {k: t.shape for k, t in model.items()}
            self._takes = {t.hf: t for t in table(arch, shapes, where, {k: t.dtype for k, t in model.items()})}
            self._arch = arch
        return self._arch, self._takes

    def tensors(self, options: MergeOptions) -> dict[str, SourceTensor]:
        ck = self.checkpoint()
        arch, takes = self.mapping()
        layers = {k: pieces_by_layer(ck.tensors[k]) for k in {t.key for t in takes.values() if t.index}}
        return {name: view(ck.tensors[t.key], t, arch, by_layer=layers.get(t.key)) for name, t in takes.items()}

    # -- optimizer

    def optimizer_checkpoint(self) -> tuple[DcpCheckpoint | None, str | None]:
        """(the DCP holding optimizer state, its kind): this folder, or veRL's optimizer/dist_ckpt beside model/."""
        if self._optimizer is None:
            self._optimizer = self._find_optimizer()
        return self._optimizer

    def _find_optimizer(self) -> tuple[DcpCheckpoint | None, str | None]:
        ck = self.checkpoint()
        sibling = self.path.parent.parent / "optimizer" / "dist_ckpt" if self.path.parent.name == "model" else None
        candidates = [ck]
        if sibling is not None and (sibling / ".metadata").is_file() and megatron_backend(sibling) == "torch_dist":
            candidates.append(read_dcp(sibling, self.stats))
        for c in candidates:
            if any(k.startswith("optimizer.state.") for k in c.tensors):
                return c, "fully_reshardable"
            if any(k.startswith("optimizer.distributed.") for k in c.tensors):
                return c, "dp_reshardable"
        return None, None

    def has_optimizer(self) -> bool:
        return self.optimizer_checkpoint()[1] is not None

    def warnings(self, options: MergeOptions) -> list[str]:
        return []  # its mapping takes every key or refuses the checkpoint

    def optimizer_plan(self, weights: Plan, options: MergeOptions, config: dict | None,
                       model_dir: Path | None) -> tuple[Plan | None, list[str]]:
        oc, kind = self.optimizer_checkpoint()
        if oc is None:
            return None, []
        if kind != "fully_reshardable":
            return None, [f"optimizer not exported: Megatron's distributed optimizer saved {kind} keeps flat DDP "
                          "buffers whose parameter order and padding are not in the checkpoint, so its state cannot "
                          "be assigned to parameters exactly (save with --dist-ckpt-optim-fully-reshardable, veRL "
                          "dist_ckpt_optim_fully_reshardable: true, to export it)"]
        from ..optimizer.dcp import megatron_optimizer_plan

        arch, takes = self.mapping()
        return megatron_optimizer_plan(oc, arch, takes, weights, options, step=self.step)

    def info(self) -> dict[str, Any]:
        info = super().info()
        if self._arch is not None:
            info.update({"layers": self._arch.layers, "experts": self._arch.experts or None})
        return info

    def files(self) -> list[Path]:
        files = list(self.checkpoint().files)
        oc, _ = self.optimizer_checkpoint()
        if oc is not None and oc.folder != self.path:
            files += oc.files
        return files

    def oracle(self, options: MergeOptions) -> Oracle:
        from .dcp_oracle import DcpOracle, MegatronOracle

        arch, takes = self.mapping()
        oc, kind = self.optimizer_checkpoint()
        sources: dict[str, tuple[Any, Take]] = {}
        model = DcpOracle(self.path)
        for name, t in takes.items():
            sources[name] = (model, t)
        if oc is not None and kind == "fully_reshardable":
            opt = model if oc.folder == self.path else DcpOracle(oc.folder)
            for name, t in takes.items():
                for k in OPTIMIZER_KINDS:
                    key = f"optimizer.state.{k}.{t.key}"
                    sources[optimizer_name(name, k)] = (opt, Take(t.hf, key, t.index, t.part))
        return MegatronOracle(sources, arch)


def optimizer_name(hf: str, kind: str) -> str:
    return f"state.{hf}.{kind}"


def optimizer_views(oc: DcpCheckpoint, arch: Arch, takes: Mapping[str, Take]) -> dict[str, SourceTensor]:
    """`state.<hf name>.<exp_avg|exp_avg_sq|param>` as views of `optimizer.state.<kind>.<Megatron key>`."""
    out: dict[str, SourceTensor] = {}
    layers: dict[str, dict[int, list[Piece]]] = {}
    for name, t in takes.items():
        for kind in OPTIMIZER_KINDS:
            key = f"optimizer.state.{kind}.{t.key}"
            src = oc.tensors.get(key)
            if src is None:
                continue
            if t.index and key not in layers:
                layers[key] = pieces_by_layer(src)
            out[optimizer_name(name, kind)] = view(src, t, arch, optimizer_name(name, kind), layers.get(key))
    used = {f"optimizer.state.{k}.{t.key}" for t in takes.values() for k in OPTIMIZER_KINDS}
    odd = sorted(k for k in oc.tensors if k.startswith("optimizer.") and k not in used)
    if odd:
        raise UnsupportedLayoutError(f"{oc.folder}: optimizer key {odd[0]!r} maps to no parameter; refusing to drop it")
    return out


__all__ = ["ARCHITECTURES", "Arch", "MegatronSource", "Take", "arch_of", "segments", "table", "torch_view", "view"]
