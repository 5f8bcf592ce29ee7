"""Megatron-LM's legacy `torch` checkpoints: one torch.save file per model-parallel rank.

`--ckpt-format torch` writes `iter_NNNNNNN/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt` (the tensor, pipeline and expert
parallel rank; the pipeline rank only with PP > 1, the expert rank only with EP > 1). Each is that rank's dict: `args`
(the run's argparse.Namespace), `model` (its part of the model under megatron-core's module names: TP shards, the
stage's layers numbered from 0, the rank's experts numbered from 0), `optimizer`, `rng_state`. Data-parallel replicas
write no file of their own.

With virtual pipeline stages (the interleaved schedule), a rank file holds `model0`, `model1`, ... instead of `model`:
chunk v of every pipeline rank comes before chunk v + 1 in the model, each with its layers numbered from 0.

The files are read by the torch.save file reader (the allowlisting unpickler; the args and the rng state are read as
inert records beside the model: nothing runs). Every tensor is placed where a `torch_dist` save of the same model keeps
it: layers stacked on a leading dim (the (virtual) stage's first layer plus the layer's number; a stage's first layer is
counted from the layers the stages before it hold, so uneven stages need no formula), TP shards side by side on the
dim the layer splits (column-parallel rows, row-parallel columns; a gated fc1's shard is [gate; up], each half going to
its half), experts on their axis, norms and the router from TP rank 0. Those global tensors, as pieces of the rank
files, go through the `torch_dist` mapping table (`megatron.table`), so the Hugging Face names, the QKV split and the
checks against config.json and the run's args are the same for both formats. The args also give the parallel sizes,
which the rank folders' names cannot (`mp_rank_00_001` is a pipeline or an expert rank).

Refused: an expert tensor-parallel size other than TP's, a key whose TP split is not known here, missing or extra rank
folders, model chunks other than the args' virtual stages. The optimizer is not exported: `optimizer.state_dict()`
keys it by position, and the distributed optimizer's `distrib_optim.pt` keeps flat buffers; neither says which
parameter an entry is.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import CheckpointError, UnsupportedLayoutError
from . import megatron_run
from . import torchpickle as tp
from .base import Oracle, Piece, Source, SourceTensor, step_of
from .dcp_oracle import MegatronOracle
from .megatron import Arch, Take, arch_of, pieces_by_layer, table, text_config, view
from .torchfile import KeyPath, NotAName, TorchFileOracle, flatten, read_torch_file, whole_tensor
from .torchzip import read_directory, read_record

if TYPE_CHECKING:
    from ..options import MergeOptions
    from ..plan import Plan

FILE = "model_optim_rng.pt"
DISTRIB_OPTIM = "distrib_optim.pt"  # the distributed optimizer's flat buffers, beside a rank's file
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_STEP_DIR = re.compile(r"^iter_(\d+)$")

Split = tuple[int, bool] | None  # (the dim TP splits, the shard is [gate; up] halves), or None: every rank holds it
_COLUMN: Split = (0, False)
_ROW: Split = (1, False)
_GATED: Split = (0, True)
_LAYER_SPLIT: dict[str, Split] = {  # a layer's tensors, after `decoder.layers.N.`
    "self_attention.linear_qkv.weight": _COLUMN,
    "self_attention.linear_qkv.bias": _COLUMN,
    "self_attention.linear_proj.weight": _ROW,
    "self_attention.linear_qkv.layer_norm_weight": None,
    "self_attention.q_layernorm.weight": None,
    "self_attention.k_layernorm.weight": None,
    "mlp.linear_fc1.layer_norm_weight": None,
    "mlp.linear_fc1.weight": _GATED,
    "mlp.linear_fc2.weight": _ROW,
    "mlp.router.weight": None,
}
_EXPERT_SPLIT: dict[str, Split] = {"linear_fc1.weight": _GATED, "linear_fc2.weight": _ROW}  # after local_experts.K.
_MODEL_SPLIT: dict[str, Split] = {"embedding.word_embeddings.weight": _COLUMN, "output_layer.weight": _COLUMN,
                                  "decoder.final_layernorm.weight": None}
# the local (non-Transformer-Engine) layer's norms under the names Transformer Engine's fused layers give them, as
# megatron-core's sharded_state_dict_keys_map renames them in a torch_dist save
_LOCAL_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
_UNKNOWN = "unknown"  # a key whose split is not in the tables
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
_L = "decoder.layers."
_EXPERTS = _L + "mlp.experts.experts."


def holds(folder: Path) -> bool:
    return any(RANK_DIR.match(p.parent.name) for p in folder.glob(f"mp_rank_*/{FILE}"))


def rank_dir(t: int, p: int, e: int, pp: int, ep: int) -> str:
    """Megatron-LM's folder name for a rank's file (get_checkpoint_name)."""
    return f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")


@dataclass(frozen=True)
class Sizes:
    """The run's parallel layout, from its args."""

    tp: int
    pp: int
    ep: int
    layers: int
    experts: int  # 0: dense
    vpp: int = 1  # virtual pipeline stages per pipeline rank: each rank file holds model0, model1, ... instead of model

    def chunks(self) -> list[str]:
        """The model chunks each rank file holds, in virtual stage order."""
        return ["model"] if self.vpp == 1 else [f"model{v}" for v in range(self.vpp)]

    def lead(self, n: int) -> tuple[int, ...]:
        """The leading dims of a global tensor whose placements have `n` leading indices: none, layers, or
        (layers, experts)."""
        return ((), (self.layers,), (self.layers, self.experts))[n]


@dataclass(frozen=True)
class Placement:
    """One tensor of one rank file, and where it goes in the global tensor a torch_dist save keeps."""

    key: str  # the global (torch_dist) key
    file: Path
    path: KeyPath  # its key path in the file's dict
    lead: tuple[int, ...]  # (layer,) or (layer, expert): the global tensor's leading indices; () for others
    tp: int  # whose TP shard it is
    split: Split


class _Entry(NamedTuple):
    """A tensor of a rank file's model chunk, before it is placed."""

    file: Path
    t: int  # TP rank
    s: int  # virtual stage: pipeline rank, and model chunk with VPP
    e: int  # expert rank
    key: str  # as the chunk's state dict names it
    shown: str  # as messages name it (`model1.` in front with VPP)
    path: KeyPath  # in the file's dict


def _whole(value: Any, name: str, where: str, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise CheckpointError(f"{where}: the run's args give {name} {value!r}, not a positive whole number")


def sizes_of(args: Mapping[str, Any], where: str) -> Sizes:
    """TP, PP, EP, layers and experts from the run's args; refuses the layouts this reader does not place."""
    tp = _whole(args.get("tensor_model_parallel_size"), "tensor_model_parallel_size", where, 1)
    pp = _whole(args.get("pipeline_model_parallel_size"), "pipeline_model_parallel_size", where, 1)
    ep = _whole(args.get("expert_model_parallel_size"), "expert_model_parallel_size", where, 1)
    vpp = _whole(args.get("virtual_pipeline_model_parallel_size"), "virtual_pipeline_model_parallel_size", where, 1)
    etp = args.get("expert_tensor_parallel_size")
    if etp not in (None, tp):
        raise UnsupportedLayoutError(f"{where}: expert_tensor_parallel_size {etp} differs from "
                                     f"tensor_model_parallel_size {tp}, which streammerge does not read in the legacy "
                                     "format: save with --ckpt-format torch_dist")
    experts = args.get("num_experts", args.get("num_moe_experts"))
    experts = 0 if experts is None else _whole(experts, "num_experts", where)
    if experts % ep:
        raise CheckpointError(f"{where}: the run's args give {experts} experts over {ep} expert-parallel ranks")
    return Sizes(tp, pp, ep, _whole(args.get("num_layers"), "num_layers", where), experts, vpp)


class MegatronLegacySource(Source):
    """A Megatron-LM `--ckpt-format torch` step folder (`iter_NNNNNNN/` or `release/`, its `mp_rank_*/` inside)."""

    format = "Megatron-LM legacy torch"
    oracle_after_plan = True  # names and layouts come from the architecture in the config
    takes_key_prefix = False  # the architecture names the tensors

    def __init__(self, path: Path):
        from .dcp import find_hf_dir

        super().__init__(path, hf_dir=find_hf_dir(path), step=step_of(path, _STEP_DIR))
        self.config: dict | None = None
        self._config_where = str(path)
        self._read: tuple[dict[str, Any], Sizes, list[Placement], dict[str, SourceTensor]] | None = None
        self._mapping: tuple[Arch, dict[str, Take]] | None = None
        self.inert: list[tuple[str, str]] = []
        self._optimizer: list[str] = []  # where optimizer state is: the files' `optimizer`, distrib_optim.pt
        self.copies: list[Placement] = []  # replicas not read (placed as the shard each must equal)
        self._args_file: Path | None = None  # the rank file the run's args were read from

    def use_model(self, config: dict | None, model_dir: Path | None) -> None:
        self.config = config
        self._config_where = str(model_dir / "config.json") if model_dir is not None else str(self.path)
        self._mapping = None

    # -- reading

    def rank_files(self) -> dict[str, Path]:
        found = {p.parent.name: p for p in sorted(self.path.glob(f"mp_rank_*/{FILE}")) if RANK_DIR.match(p.parent.name)}
        if not found:
            raise CheckpointError(f"{self.path}: no mp_rank_*/{FILE}")
        return found

    def args(self, file: Path) -> dict[str, Any]:
        """The run's args, as `file` keeps them (read as inert records: nothing the pickle names is imported)."""
        import pickle

        try:
            obj = megatron_run.inert_loads(read_record(read_directory(file), "data.pkl"))
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{file}: its pickle cannot be read ({e}): not merged") from None
        args = megatron_run.namespace_fields(obj.get("args")) if isinstance(obj, dict) else None
        if args is None:
            raise CheckpointError(f"{file}: no run args (an argparse.Namespace under `args`), which say how the model "
                                  "was split over its ranks: not a Megatron-LM checkpoint streammerge reads")
        if isinstance(obj, dict) and type(obj.get("iteration")) is int and obj["iteration"] >= 0:
            self.step = obj["iteration"]
        return args

    def read(self) -> tuple[dict[str, Any], Sizes, list[Placement], dict[str, SourceTensor]]:
        """(the run's args, its sizes, every tensor's placement, the global torch_dist tensors)."""
        if self._read is None:
            self._read = self._read_all()
        return self._read

    def _read_all(self) -> tuple[dict[str, Any], Sizes, list[Placement], dict[str, SourceTensor]]:
        found = self.rank_files()
        first = self._args_file = next(iter(found.values()))
        args = self.args(first)
        sizes = sizes_of(args, f"{first} (args)")
        want = {rank_dir(t, p, e, sizes.pp, sizes.ep): (t, p, e)
                for t in range(sizes.tp) for p in range(sizes.pp) for e in range(sizes.ep)}
        layout = f"the run's args give TP {sizes.tp}, PP {sizes.pp}, EP {sizes.ep}: {len(want)} rank files"
        missing = sorted(set(want) - set(found))
        if missing:
            raise CheckpointError(f"{self.path}: {missing[0]}/{FILE} is missing ({layout})")
        extra = sorted(set(found) - set(want))
        if extra:
            raise CheckpointError(f"{self.path}: {extra[0]}/ is not a rank of this run ({layout})")
        tied = not args.get("untie_embeddings_and_output_weights", False)

        states: dict[Path, tp.State] = {}
        entries: list[_Entry] = []
        for name, rank in want.items():
            file = found[name]
            st, inert = read_torch_file(file)
            states[file] = st
            self.stats.files += 1
            self.stats.decoded += 1
            for g in inert:
                self.stats.left_out[".".join(g)] += 1
            self.inert += [g for g in inert if g not in self.inert]
            entries += self._entries(file, st.obj, rank, sizes)
        placements = self._place(entries, sizes, tied)
        return args, sizes, placements, self._globals(sizes, placements, states)

    def _entries(self, file: Path, obj: Any, rank: tuple[int, int, int], sizes: Sizes) -> list[_Entry]:
        """One rank file's model tensors, each with its TP rank, virtual stage and expert rank."""
        self._check_chunks(file, obj, sizes)
        if obj.get("optimizer") and "optimizer" not in self._optimizer:
            self._optimizer.append("optimizer")
        if (file.parent / DISTRIB_OPTIM).is_file() and DISTRIB_OPTIM not in self._optimizer:
            self._optimizer.append(DISTRIB_OPTIM)
        t, p, e = rank
        out = []
        for v, chunk in enumerate(sizes.chunks()):
            flat, _ = flatten(obj[chunk])
            for key, (path, value) in flat.items():
                shown = key if sizes.vpp == 1 else f"{chunk}.{key}"
                if key.endswith("_extra_state"):  # Transformer Engine's FP8 metadata, no weights (as in torch_dist)
                    self.stats.left_out["_extra_state"] += 1
                    continue
                if isinstance(value, NotAName):
                    raise CheckpointError(f"{file}: {shown!r}: the model's state dict holds an entry whose key is no "
                                          "name, which no state dict holds")
                if key.startswith("language_model."):
                    raise UnsupportedLayoutError(f"{file}: Megatron key {shown!r}: a model of Megatron-LM's own, older "
                                                 "than megatron-core's GPTModel (`language_model.*` names), which "
                                                 "streammerge does not read: convert it with Megatron-LM's "
                                                 "tools/checkpoint/convert.py --saver mcore first")
                # chunk v of every pipeline rank comes before chunk v + 1 in the model
                out.append(_Entry(file, t, v * sizes.pp + p, e, key, shown, (chunk, *path)))
        return out

    def _place(self, entries: Sequence[_Entry], sizes: Sizes, tied: bool) -> list[Placement]:
        """Where each entry goes in the torch_dist global tensors; the replicas not read go to `self.copies`."""
        # each (virtual) stage's first layer: the layers of the stages before it (TP rank 0, expert rank 0 counts them)
        counts = [0] * (sizes.pp * sizes.vpp)
        for x in entries:
            m = _LAYER.match(x.key)
            if m and x.t == 0 and x.e == 0:
                counts[x.s] = max(counts[x.s], int(m.group(1)) + 1)
        first_layer = [sum(counts[:s]) for s in range(len(counts))]
        if sum(counts) != sizes.layers:
            raise CheckpointError(f"{self.path}: the rank files hold {sum(counts)} layers "
                                  f"({'+'.join(map(str, counts))} over the {'virtual ' if sizes.vpp > 1 else ''}"
                                  f"pipeline stages), the run's args num_layers {sizes.layers}")
        per_rank = sizes.experts // sizes.ep if sizes.experts else 0

        placements: list[Placement] = []
        self.copies = []
        for x in entries:
            file, t, s, e = x.file, x.t, x.s, x.e
            lead: tuple[int, ...] = ()
            m = _LAYER.match(x.key)
            if m:
                j, rest = int(m.group(1)), _LOCAL_NAMES.get(m.group(2), m.group(2))
                if j >= counts[s]:
                    raise CheckpointError(f"{file}: {x.shown!r}: {_stage(s, sizes)} has {counts[s]} layers on TP "
                                          "rank 0")
                ex = _EXPERT.match(rest)
                if ex:
                    k, part = int(ex.group(1)), ex.group(2)
                    if k >= per_rank:
                        raise CheckpointError(f"{file}: {x.shown!r}: the run's args give {per_rank} experts per rank")
                    gkey, split, lead = _EXPERTS + part, _EXPERT_SPLIT.get(part, _UNKNOWN), \
                        (first_layer[s] + j, e * per_rank + k)
                else:
                    gkey, split, lead = _L + rest, _LAYER_SPLIT.get(rest, _UNKNOWN), (first_layer[s] + j,)
            else:
                gkey, split = x.key, _MODEL_SPLIT.get(x.key, _UNKNOWN)
                if x.key == "output_layer.weight" and tied and s > 0:
                    # the last stage's copy of the tied embedding (kept equal to it by Megatron's all-reduce)
                    self.stats.left_out["output_layer.weight (the last stage's copy of the tied embedding)"] += 1
                    self.copies.append(Placement("embedding.word_embeddings.weight", file, x.path, lead, t, _COLUMN))
                    continue
            if isinstance(split, str):
                raise UnsupportedLayoutError(f"{file}: Megatron key {x.shown!r}: streammerge does not know how tensor "
                                             "parallelism splits it, so it cannot put its shards together; refusing "
                                             "to drop it")
            # every TP rank holds an unsplit tensor, every expert rank the dense layers: rank 0's is taken (torch_dist
            # keeps one replica), and verify compares the others with it (a copy is placed as the shard it must equal)
            copy = (split is None and t) or (e and len(lead) != 2)
            (self.copies if copy else placements).append(
                Placement(gkey, file, x.path, lead, t if split is not None else 0, split))
        return placements

    @staticmethod
    def _check_chunks(file: Path, obj: Any, sizes: Sizes) -> None:
        """The file holds the model chunks the run's args give: `model`, or one `modelV` per virtual stage."""
        if not isinstance(obj, dict):
            raise CheckpointError(f"{file}: no `model` dict: not a Megatron-LM rank file")
        held = {k for k in obj if isinstance(k, str) and re.fullmatch(r"model\d*", k)}
        want = sizes.chunks()
        if held == set(want):
            odd = next((k for k in want if not isinstance(obj[k], dict)), None)
            if odd is None:
                return
            raise CheckpointError(f"{file}: `{odd}` is {type(obj[odd]).__name__}, not a dict: not a Megatron-LM rank "
                                  "file")
        if not held:
            raise CheckpointError(f"{file}: no `model` dict: not a Megatron-LM rank file")
        given = f"{sizes.vpp} virtual pipeline stages" if sizes.vpp > 1 else "no virtual pipeline stages"
        raise CheckpointError(f"{file}: holds {', '.join(sorted(held))} where the run's args give {given} "
                              f"({', '.join(want)}): the files and the args are not of one run")

    def _globals(self, sizes: Sizes, placements: Sequence[Placement],
                 states: Mapping[Path, tp.State]) -> dict[str, SourceTensor]:
        """Each global tensor as pieces of the rank files; every shard of it present once, all alike."""
        by_key: dict[str, list[Placement]] = defaultdict(list)
        for pl in placements:
            by_key[pl.key].append(pl)
        ranks = {f: i for i, f in enumerate(states)}
        out: dict[str, SourceTensor] = {}
        for key, pls in by_key.items():
            shards = {pl: whole_tensor(pl.file, states[pl.file], key, pl.path, ranks[pl.file]) for pl in pls}
            first = shards[pls[0]]
            odd = next((pl for pl in pls if shards[pl].shape != first.shape or shards[pl].dtype != first.dtype), None)
            if odd is not None:
                s = shards[odd]
                raise CheckpointError(f"{odd.file}: {key!r} is {s.dtype.name} {list(s.shape)}, where "
                                      f"{pls[0].file} holds {first.dtype.name} {list(first.shape)}")
            split = pls[0].split
            tps = sizes.tp if split is not None else 1
            lead_shape = sizes.lead(len(pls[0].lead))
            shape = list(first.shape)
            if split is not None:
                if split[0] >= len(shape) or (split[1] and shape[0] % 2):
                    raise CheckpointError(f"{pls[0].file}: {key!r} is {list(shape)}, which tensor parallelism "
                                          "does not split so")
                shape[split[0]] *= sizes.tp
            seen = {(pl.lead, pl.tp) for pl in pls}
            count = tps * math.prod(lead_shape)
            if len(seen) != len(pls) or len(pls) != count:
                raise CheckpointError(f"{self.path}: {key!r}: the rank files hold {len(pls)} shards "
                                      f"({len(seen)} different), the run's layout {count}")
            pieces: list[Piece] = []
            for pl in pls:
                pieces += _pieces(shards[pl], pl, sizes.tp)
            out[key] = SourceTensor(key, (*lead_shape, *shape), first.dtype, tuple(pieces),
                                    f"{tps} TP shards" if tps > 1 else "plain")
        return out

    # -- the mapping

    def mapping(self) -> tuple[Arch, dict[str, Take]]:
        if self._mapping is None:
            args, _, _, tensors = self.read()
            arch = arch_of(self.config, self._config_where)
            recorded = megatron_run.megatron_lm_args(args, f"{self._args_file} (Megatron-LM args)")
            megatron_run.check(arch, text_config(self.config), [recorded], self._config_where)
            where = f"{self.path} (with {self._config_where})"
            takes = table(arch, {k: t.shape for k, t in tensors.items()}, where,
                          {k: t.dtype for k, t in tensors.items()})
            self._mapping = arch, {t.hf: t for t in takes}
        return self._mapping

    def tensors(self, options: MergeOptions) -> dict[str, SourceTensor]:
        tensors = self.read()[3]
        arch, takes = self.mapping()
        layers = {k: pieces_by_layer(tensors[k]) for k in {t.key for t in takes.values() if t.index}}
        return {name: view(tensors[t.key], t, arch, by_layer=layers.get(t.key)) for name, t in takes.items()}

    # -- the rest

    def has_optimizer(self) -> bool:
        self.read()
        return bool(self._optimizer)

    def optimizer_plan(self, weights: Plan, options: MergeOptions, config: dict | None,
                       model_dir: Path | None) -> tuple[Plan | None, list[str]]:
        if not self.has_optimizer():
            return None, []
        how = {"optimizer": "optimizer.state_dict() in each rank file keys the state by each parameter's position",
               DISTRIB_OPTIM: f"the distributed optimizer's {DISTRIB_OPTIM} keeps flat buffers"}
        return None, [f"optimizer not exported: {'; '.join(how[k] for k in self._optimizer)}, which does not say "
                      "which parameter an entry is (save with --ckpt-format torch_dist and "
                      "--dist-ckpt-optim-fully-reshardable to export it)"]

    def info(self) -> dict[str, Any]:
        if self._read is None:
            return {}
        s = self._read[1]
        return {"TP": s.tp, "PP": s.pp, "VPP": s.vpp if s.vpp > 1 else None, "EP": s.ep if s.ep > 1 else None,
                "layers": s.layers,
                "experts": s.experts or None}

    def files(self) -> list[Path]:
        return list(self.rank_files().values())

    def oracle(self, options: MergeOptions) -> Oracle:
        _, sizes, placements, _ = self.read()
        arch, takes = self.mapping()
        reader = LegacyReader(placements, sizes, self.inert, self.copies)
        return LegacyOracle({name: (reader, t) for name, t in takes.items()}, arch, reader)


def _stage(s: int, sizes: Sizes) -> str:
    """A virtual stage by its pipeline rank (and model chunk)."""
    p, v = s % sizes.pp, s // sizes.pp
    return f"stage {p}" if sizes.vpp == 1 else f"stage {p}'s model{v}"


def _pieces(shard: SourceTensor, pl: Placement, tp_size: int) -> list[Piece]:
    """Where one rank's shard goes in the global tensor: one piece, or two for a gated fc1's [gate; up]."""
    if not shard.pieces:
        return []
    p = shard.pieces[0]
    lead_shape, lead_stride = (1,) * len(pl.lead), (0,) * len(pl.lead)
    if pl.split is None:
        return [Piece(p.rank, p.file, p.offset, lead_shape + p.shape, lead_stride + p.stride,
                      pl.lead + (0,) * len(p.shape))]
    d, gated = pl.split
    zeros = [0] * len(p.shape)
    if not gated:
        start = list(zeros)
        start[d] = pl.tp * p.shape[d]
        return [Piece(p.rank, p.file, p.offset, lead_shape + p.shape, lead_stride + p.stride, pl.lead + tuple(start))]
    half = p.shape[0] // 2
    shape = (half, *p.shape[1:])
    out = []
    for i in range(2):  # the gate half, then the up half: each among its own TP shards
        start = list(zeros)
        start[0] = i * half * tp_size + pl.tp * half
        offset = p.offset + i * half * p.stride[0] * shard.dtype.itemsize
        out.append(Piece(p.rank, p.file, offset, lead_shape + shape, lead_stride + p.stride, pl.lead + tuple(start)))
    return out


class LegacyReader:
    """The global torch_dist tensors as torch reads the rank files (`torch.load(weights_only=True, mmap=True)`): a box
    is the concatenation, in TP order, of each shard's part in it (a gated shard's gate halves first, then its up
    halves), cut with torch. Shared with the source: which file holds which shard (the placements)."""

    def __init__(self, placements: Sequence[Placement], sizes: Sizes, inert: Sequence[tuple[str, str]],
                 copies: Sequence[Placement] = ()):
        self.sizes = sizes
        self._by_key: dict[str, dict[tuple[int, ...], list[tuple[int, Placement]]]] = defaultdict(dict)
        located: dict[str, tuple[Path, KeyPath]] = {}
        self._taken: dict[tuple[str, tuple[int, ...], int], int] = {}
        for i, pl in enumerate(placements):
            located[str(i)] = (pl.file, pl.path)
            self._by_key[pl.key].setdefault(pl.lead, []).append((i, pl))
            self._taken[pl.key, pl.lead, pl.tp] = i
        self.copies = list(copies)
        for i, pl in enumerate(self.copies):
            located[f"copy {i}"] = (pl.file, pl.path)
        for shards in self._by_key.values():
            for lst in shards.values():
                lst.sort(key=lambda x: x[1].tp)
        self._files = TorchFileOracle(located, inert)

    def _shard(self, i: int) -> Any:
        return self._files.tensor(str(i))

    def entry(self, key: str) -> SimpleNamespace | None:
        """The global tensor's `size` and `properties.dtype`, as MegatronOracle asks them of DCP metadata."""
        shards = self._by_key.get(key)
        if not shards:
            return None
        lead = next(iter(shards))
        i, pl = shards[lead][0]
        t = self._shard(i)
        shape = list(t.shape)
        if pl.split is not None:
            shape[pl.split[0]] *= len(shards[lead])
        return SimpleNamespace(size=(*self.sizes.lead(len(lead)), *shape), properties=SimpleNamespace(dtype=t.dtype))

    def read(self, key: str, box: tuple[tuple[int, int], ...]) -> Any:
        import torch

        shards = self._by_key[key]
        k = len(next(iter(shards)))
        lead_box, rest = box[:k], box[k:]
        out = []
        for lead in _indices(lead_box):
            parts = [(pl, self._shard(i)) for i, pl in shards.get(lead, [])]
            if not parts:
                raise CheckpointError(f"torch finds no shard of {key!r} at {lead}")
            cut = [slice(lo, hi) for lo, hi in rest]
            split = parts[0][0].split
            if split is None:
                t = parts[0][1]
            else:
                d, gated = split
                ordered = [s for _, s in parts]
                if gated:
                    halves = [s.chunk(2, dim=0) for s in ordered]
                    ordered = [h[0] for h in halves] + [h[1] for h in halves]
                t = _cat_box(ordered, d, rest[d])
                cut[d] = slice(None)
            out.append(t[tuple(cut)].clone())
        stacked = torch.stack(out) if out else torch.empty(0)
        return stacked.reshape(*(hi - lo for lo, hi in lead_box), *stacked.shape[1:])

    def disagreements(self) -> list[str]:
        """Each replica the merge did not read against the shard it took, bit for bit."""
        from .base import bytes_rows

        out = []
        for i, pl in enumerate(self.copies):
            taken = self._taken.get((pl.key, pl.lead, pl.tp))
            if taken is None:
                out.append(f"{pl.file}: {'.'.join(map(str, pl.path))} has no taken shard to equal")
                continue
            a, b = self._shard(taken), self._files.tensor(f"copy {i}")
            if a.dtype != b.dtype or a.shape != b.shape or not bytes_rows(a).equal(bytes_rows(b)):
                file = self._files.located[str(taken)][0]
                shown = ".".join(map(str, pl.path[1:] if pl.path[0] == "model" else pl.path))
                out.append(f"{pl.file}: {shown} differs from the copy the merge took "
                           f"from {file.parent.name}/{file.name}: the ranks disagree on the trained weights")
        return out

    def locate(self, name: str, index: tuple[int, ...]) -> str:
        return "the rank files"

    def check_integrity(self, paths: Sequence[Path]) -> list[str]:
        return self._files.check_integrity(paths)

    def close(self) -> None:
        self._files.close()


class LegacyOracle(MegatronOracle):
    """The mapping's HF tensors read through `LegacyReader`, and the replicas the merge did not read compared."""

    def __init__(self, sources: Mapping[str, tuple[Any, Take]], arch: Arch, reader: LegacyReader):
        super().__init__(sources, arch)
        self.reader = reader

    def disagreements(self) -> list[str]:
        return self.reader.disagreements()


def _indices(box: tuple[tuple[int, int], ...]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for lo, hi in box:
        out = [(*o, i) for o in out for i in range(lo, hi)]
    return out


def _cat_box(parts: Sequence[Any], dim: int, span: tuple[int, int]) -> Any:
    """`torch.cat(parts, dim)[span]` along `dim`, reading only the parts that reach into the span."""
    import torch

    lo, hi = span
    taken, at = [], 0
    for t in parts:
        n = t.shape[dim]
        a, b = max(lo, at), min(hi, at + n)
        if a < b:
            taken.append(t.narrow(dim, a - at, b - a))
        at += n
    if not taken:
        return parts[0].narrow(dim, 0, 0)
    return torch.cat(taken, dim=dim)


def open_legacy(folder: Path) -> Source:
    return MegatronLegacySource(folder)


__all__ = ["FILE", "LegacyReader", "MegatronLegacySource", "Placement", "holds", "open_legacy", "rank_dir"]
