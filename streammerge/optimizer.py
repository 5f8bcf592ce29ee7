"""Optimizer: name the rank files' integer-keyed optimizer state, plan its export, and read it back.

`optimizer.state_dict()` keys its state by integers: positions in the optimizer's parameter list,
which for `AdamW(model.parameters())` is `model.named_parameters()` order. That is not the model
state-dict order (buffers sit in between, tied weights appear once), so the order is rebuilt from
`huggingface/config.json` by building the model on the meta device (no weights allocated), and every
state tensor's shape is checked against its parameter before anything is written.

The export is torch's flattened optimizer form (`get_optimizer_state_dict(...,
flatten_optimizer_state_dict=True)`): one tensor per `state.<param fqn>.<key>`, in the saved dtype,
written by the same planner and writer as the weights; the param groups go into the index metadata.

FSDP1 (use_orig_params=False) keeps one 1-D flat shard per FlatParameter instead: each decoder layer is
one unit, the remaining parameters form the root unit, parameters are concatenated in registration
order and the whole is padded to a multiple of the world size. Those flat shards become flat pieces.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import warnings as _warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from .discover import Checkpoint
from .errors import CheckpointError, StreammergeError
from .load import RankFile, _record, _span_bytes, torch_load_meta
from .plan import Piece, Plan, TensorPlan, assign_files, chunk_bounds, tensor_pieces

OPTIMIZER_DIR = "optimizer"
OPTIMIZER_INDEX = "optimizer.safetensors.index.json"
OPTIMIZER_PT = "optimizer.pt"
OPTIMIZER_FORMATS = ("safetensors", "torch")
LAYOUT_NAME = "torch.optim flattened state (streammerge)"
OPTIMIZER_SAVE_MODES = ("full", None)  # the seed workflow's `optimizer_save_mode` values
NO_OPTIMIZER_HINT = "rerun with --no-optimizer to export the weights only"


def optimizer_save_mode_enabled(value: Any) -> bool:
    """The seed workflow's `optimizer_save_mode`: "full" exports the optimizer, null skips it."""
    if value is None or value is False:
        return False
    if isinstance(value, str) and value.strip().lower() in ("", "null", "none", "~"):
        return False
    if value is True or (isinstance(value, str) and value.strip().lower() == "full"):
        return True
    raise ValueError(f"optimizer_save_mode: expected 'full' or null, got {value!r}")


class OptimizerMismatchError(CheckpointError):
    """The optimizer state does not fit the model its config describes: we refuse to guess names."""


class _Skip(Exception):
    """This optimizer layout cannot be named safely; the weights are still exported."""


# ---------------------------------------------------------------- parameter order from the config

@dataclass(frozen=True)
class ModelParams:
    """`named_parameters()` of the model the config describes, and its FSDP1 wrapping units."""

    params: tuple[tuple[str, tuple[int, ...]], ...]  # (fqn, shape), named_parameters order
    units: tuple[tuple[str, tuple[str, ...]], ...]  # FSDP1: (unit prefix, member fqns), flat-param order
    model_class: str


def _meta_models(hf_dir: Path):
    """Candidate models on the meta device: the config's architecture, then causal LM, then veRL's critic."""
    import torch
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(hf_dir))
    builders = []
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            builders.append(lambda cls=cls: cls._from_config(config))
    builders.append(lambda: transformers.AutoModelForCausalLM.from_config(config))
    builders.append(lambda: transformers.AutoModelForTokenClassification.from_config(config, num_labels=1))
    log = logging.getLogger("transformers")
    for build in builders:
        level = log.level
        try:
            log.setLevel(logging.ERROR)
            with torch.device("meta"), _warnings.catch_warnings():
                _warnings.simplefilter("ignore")
                model = build()
        except Exception:  # an architecture this transformers cannot build: try the next
            continue
        finally:
            log.setLevel(level)
        yield model


def model_params(hf_dir: Path | None, known: Mapping[str, tuple[int, ...]]) -> ModelParams:
    """Build the parameter order from huggingface/config.json without allocating weights.

    `known` maps the names in the model rank files to their shapes: the first candidate model whose
    parameters all appear there with the same shapes is the one that was trained.
    """
    if hf_dir is None or not (hf_dir / "config.json").is_file():
        raise _Skip("no huggingface/config.json to rebuild the parameter order from")
    if importlib.util.find_spec("transformers") is None:
        raise _Skip("transformers is not installed (needed to rebuild the parameter order)")
    tried = []
    try:
        for model in _meta_models(hf_dir):
            params = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
            bad = [n for n, s in params if known.get(n) != s]
            if not bad:
                return ModelParams(params, _fsdp1_units(model), type(model).__name__)
            tried.append(f"{type(model).__name__} (e.g. {bad[0]!r} "
                         f"{'has another shape' if bad[0] in known else 'is not in the model files'})")
    except Exception as e:  # an unreadable config: transformers' own message says why
        raise _Skip(f"transformers cannot read {hf_dir / 'config.json'} ({str(e).splitlines()[0][:160]})") from None
    if not tried:
        raise _Skip(f"transformers cannot build the model of {hf_dir / 'config.json'}")
    raise _Skip("no model built from huggingface/config.json has the parameters of the model files: "
                + "; ".join(tried))


def _fsdp1_units(model: torch.nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """FSDP1 units as veRL's transformer auto-wrap policy makes them: one per `_no_split_modules`
    layer, the rest in the root; the root's FlatParameter comes first in named_parameters order."""
    wrap = set(getattr(model, "_no_split_modules", None) or ())
    prefixes: list[str] = []
    for name, module in model.named_modules():
        if name and type(module).__name__ in wrap and not any(name.startswith(p + ".") for p in prefixes):
            prefixes.append(name)
    members: dict[str, list[str]] = {"": [], **{p: [] for p in prefixes}}
    for fqn, _ in model.named_parameters():
        owner = next((p for p in prefixes if fqn.startswith(p + ".")), "")
        members[owner].append(fqn)
    return tuple((p, tuple(m)) for p, m in members.items() if m)


# ---------------------------------------------------------------- reading optimizer rank files

def load_optim_file(path: Path, rank: int, world_size: int, *, trust_pickle: bool = False) -> RankFile:
    """Tensor records of one optim rank file, named `state.<int>.<key>`, without reading tensor data.

    `other` holds `param_groups`, `ids` (every int of the groups, in order), `keys` (each int's tensor
    names) and `values` (non-tensor state such as a float step, by name).
    """
    import torch

    # Straight to torch.load (weights_only unless trust_pickle; zip and pickle CRC checked first):
    # load_rank_file's metapickle fast path only takes flat name -> tensor dicts, so on the nested
    # state of an optimizer file it always unpickled the whole file for nothing before this ran.
    st = os.stat(path)
    obj = torch_load_meta(Path(path), trust_pickle=trust_pickle)
    state, groups = (obj.get("state"), obj.get("param_groups")) if isinstance(obj, dict) else (None, None)
    if not isinstance(state, dict) or not isinstance(groups, list):
        raise CheckpointError(f"{path}: not an optimizer state dict (expected 'state' and 'param_groups')")
    tensors: dict[str, Any] = {}
    values: dict[str, Any] = {}
    keys: dict[int, list[str]] = {}
    for pid, entry in state.items():
        if not isinstance(pid, int) or not isinstance(entry, dict):
            raise _Skip(f"{path.name}: optimizer state keyed by {type(pid).__name__}, not by parameter index")
        for key, value in _walk(entry):
            name = f"state.{pid}.{key}"
            if isinstance(value, torch.Tensor):
                rec = _record(name, value, rank, world_size, path)
                if rec.offset + _span_bytes(rec) > st.st_size:
                    raise CheckpointError(f"{path}: truncated: {name} needs bytes up to "
                                          f"{rec.offset + _span_bytes(rec)}, file has {st.st_size}")
                tensors[name] = rec
                keys.setdefault(pid, []).append(name)
            else:
                values[name] = value
    ids = [i for g in groups for i in g.get("params", [])]
    return RankFile(Path(path), rank, st.st_size, st.st_mtime_ns, tensors,
                    {"param_groups": groups, "ids": ids, "keys": keys, "values": values})


def _walk(entry: Mapping, prefix: str = ""):
    """(dotted key, value) of a possibly nested per-parameter state (torch flattens nesting with dots)."""
    for k, v in entry.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _walk(v, key + ".")
        else:
            yield key, v


# ---------------------------------------------------------------- planning

def plan_optimizer(ck: Checkpoint, weights_plan: Plan, *, max_shard_size: int, trust_pickle: bool = False,
                   fmt: str = "safetensors") -> tuple[Plan | None, list[str]]:
    """Plan `OUT/optimizer/`: name every state, check it against its parameter, lay out the files.

    Returns (None, [reason]) when the layout cannot be named safely (the weights are still exported);
    raises OptimizerMismatchError when the state contradicts the model (we never guess names).
    """
    if fmt not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer format {fmt!r}: use one of {', '.join(OPTIMIZER_FORMATS)}")
    try:
        if ck.lora:
            raise _Skip("LoRA checkpoints are not supported yet (the optimizer keys follow the PEFT model)")
        files = [load_optim_file(p, r, ck.world_size, trust_pickle=trust_pickle) for r, p in enumerate(ck.optim_files)]
        groups = files[0].other["param_groups"]
        for rf in files[1:]:
            if rf.other["ids"] != files[0].other["ids"] or set(rf.tensors) != set(files[0].tensors):
                raise CheckpointError(f"{rf.path}: optimizer entries differ from rank 0's (files from different runs?)")
        known = {n: t.shape for n, t in weights_plan.tensors.items()}
        known.update({n: weights_plan.tensors[k].shape for n, k in weights_plan.dropped.items()})
        model = model_params(ck.hf_dir, known)
        ids = files[0].other["ids"]
        if len(groups) != 1:
            raise _Skip(f"the optimizer has {len(groups)} param groups; the rank files do not record which "
                        "parameters each group holds, so their names cannot be assigned safely")
        if ids != list(range(len(ids))):
            raise _Skip("the optimizer's parameter indices are not 0..N-1 in order")
        per_param = len(ids) == len(model.params)
        if ck.fsdp_version == 1 and not per_param or (
                ck.fsdp_version is None and len(ids) == len(model.units) != len(model.params)):
            # FSDP1 flat parameters (checkpoints older than fsdp_config.json: told by the entry count)
            tensors, fqns = _plan_fsdp1(files, model, weights_plan)
        elif ck.fsdp_version == 1:  # one entry per parameter: full plain tensors (world size 1) fit as is
            try:
                tensors, fqns = _plan_per_param(files, model)
            except OptimizerMismatchError:
                raise _Skip("FSDP1 optimizer holds one entry per parameter but not in the parameters' shapes "
                            "(use_orig_params=True keeps 1-D pieces, which is not supported)") from None
        else:
            tensors, fqns = _plan_per_param(files, model)
    except _Skip as e:
        return None, [f"optimizer not exported: {e}"]

    values = {f"state.{f}.{n.split('.', 2)[2]}": v for n, v in files[0].other["values"].items()
              for f in fqns[int(n.split(".", 2)[1])]}
    _check_json(values, "non-tensor optimizer state")
    meta_groups = []
    for g in groups:
        hyper = {k: v for k, v in g.items() if k != "params"}
        _check_json(hyper, "param group")
        meta_groups.append({**hyper, "params": [f for i in g["params"] for f in fqns[i]]})
    index_metadata = {"format": LAYOUT_NAME, "param_groups": json.dumps(meta_groups)}
    if values:
        index_metadata["state_values"] = json.dumps(values)
    if ck.step is not None:
        index_metadata["step"] = str(ck.step)
    index_metadata["source_world_size"] = str(ck.world_size)
    if fmt == "torch":
        from .plan import FilePlan
        from .safetensors_format import layout

        # One file; its size in the plan is the safetensors estimate (the zip adds a few headers).
        file = FilePlan(OPTIMIZER_PT, layout(((t.name, t.dtype, t.shape) for t in tensors.values()), None))
        return Plan(checkpoint=ck, tensors=tensors, files=(file,), index_filename=None, subdir=OPTIMIZER_DIR,
                    index_metadata=index_metadata), []
    out_files, _ = assign_files(list(tensors.values()), max_shard_size, prefix="optimizer")
    # always an index: it carries the param groups, even when one file holds every tensor
    return Plan(checkpoint=ck, tensors=tensors, files=out_files, index_filename=OPTIMIZER_INDEX,
                subdir=OPTIMIZER_DIR, index_metadata=index_metadata), []


def _check_json(obj: Any, what: str) -> None:
    try:
        json.dumps(obj, allow_nan=True)
    except (TypeError, ValueError):
        bad = {k: type(v).__name__ for k, v in obj.items() if not _jsonable(v)}
        raise _Skip(f"{what} holds values that cannot be recorded as JSON: {bad}") from None


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _state_keys(files: Sequence[RankFile], pid: int) -> list[str]:
    return files[0].other["keys"].get(pid, [])


def _plan_per_param(files: Sequence[RankFile], model: ModelParams) -> tuple[dict[str, TensorPlan], dict[int, list[str]]]:
    """FSDP2 (and plain full tensors): one state per parameter, DTensor-sharded like the parameter."""
    ids = files[0].other["ids"]
    if len(ids) != len(model.params):
        raise OptimizerMismatchError(
            f"{files[0].path.parent}: the optimizer holds {len(ids)} parameters but {model.model_class} built from "
            f"huggingface/config.json has {len(model.params)}; cannot tell which parameter each optimizer "
            f"entry belongs to ({NO_OPTIMIZER_HINT})")
    tensors: dict[str, TensorPlan] = {}
    for pid in ids:
        fqn, shape = model.params[pid]
        for name in _state_keys(files, pid):
            records = [rf.tensors[name] for rf in files]
            first, pieces = tensor_pieces(name, records, files)
            if first.shape not in ((), shape):
                raise OptimizerMismatchError(
                    f"{files[0].path}: optimizer entry {pid} ({name.split('.', 2)[2]}) has shape "
                    f"{list(first.shape)}, but parameter {pid} in named_parameters order, {fqn}, has "
                    f"shape {list(shape)}; refusing to guess names ({NO_OPTIMIZER_HINT})")
            out = f"state.{fqn}.{name.split('.', 2)[2]}"
            placements = "plain" if first.placements is None else (
                first.placements[0] if len(first.placements) == 1 else "(" + ", ".join(first.placements) + ")")
            tensors[out] = TensorPlan(out, first.shape, first.dtype, first.dtype, placements, pieces)
    return tensors, {pid: [model.params[pid][0]] for pid in ids}


def _plan_fsdp1(files: Sequence[RankFile], model: ModelParams,
                weights_plan: Plan) -> tuple[dict[str, TensorPlan], dict[int, list[str]]]:
    """FSDP1 flat parameters: cut each rank's 1-D shard back into the parameters it holds."""
    ids = files[0].other["ids"]
    world = len(files)
    if any(t.placements.startswith("(") for t in weights_plan.tensors.values()):
        raise _Skip("FSDP1 with hybrid sharding (2-D mesh) is not supported for the optimizer export")
    units = model.units
    shapes = dict(model.params)
    if len(ids) != len(units):
        what = "one per parameter (use_orig_params=True?)" if len(ids) == len(model.params) else "flat parameters"
        raise _Skip(f"FSDP1 optimizer holds {len(ids)} entries ({what}); expected {len(units)} flat parameters "
                    f"(the root and one per {model.model_class} decoder layer); cannot match them to parameters")
    tensors: dict[str, TensorPlan] = {}
    fqns: dict[int, list[str]] = {}
    for pid, (prefix, members) in zip(ids, units):
        total = sum(math.prod(shapes[f]) for f in members)
        chunk = -(-total // world)
        where = f"the {'root unit' if not prefix else prefix}"
        fqns[pid] = list(members)
        for name in _state_keys(files, pid):
            key = name.split(".", 2)[2]
            records = [rf.tensors[name] for rf in files]
            if any(r.placements is not None for r in records):
                raise _Skip(f"FSDP1 optimizer entry {pid} ({key}) is a DTensor, not a flat shard")
            if all(r.local_shape == () for r in records):  # per-flat-parameter scalar (step): every member gets it
                first, pieces = tensor_pieces(name, records, files)
                for f in members:
                    out = f"state.{f}.{key}"
                    tensors[out] = TensorPlan(out, (), first.dtype, first.dtype, "plain", pieces)
                continue
            sizes = {r.local_shape for r in records}
            if sizes != {(chunk,)} or any(r.local_stride != (1,) for r in records):
                raise _Skip(
                    f"FSDP1 flat parameter {pid} ({key}) holds {sorted(s for s in sizes)} elements per rank, but "
                    f"{where} ({len(members)} parameters, {total} elements) padded to world size {world} gives "
                    f"{chunk}; the wrap policy differs from one unit per decoder layer, so its parts cannot be named")
            dtype = records[0].dtype
            flat_at = 0
            for f in members:
                n = math.prod(shapes[f])
                pieces = []
                for rank, rec in enumerate(records):
                    lo, hi = chunk_bounds(total, world, rank)
                    a, b = max(lo, flat_at), min(hi, flat_at + n)
                    if a < b:
                        pieces.append(Piece(rank, str(files[rank].path), rec.offset + (a - lo) * dtype.itemsize,
                                            (b - a,), (1,), (a - flat_at,)))
                flat_at += n
                out = f"state.{f}.{key}"
                tensors[out] = TensorPlan(out, shapes[f], dtype, dtype, "flat", tuple(pieces), flat=True)
    return tensors, fqns


# ---------------------------------------------------------------- the nested (torch) form

def nest(flat: Mapping[str, Any], param_groups: Sequence[Mapping]) -> dict:
    """`{"state.<fqn>.<key>": v}` + param groups -> `{"state": {fqn: {key: v}}, "param_groups": [...]}`.

    A parameter name is never a prefix of another followed by a dot (parameters are leaves), so the
    group's fqns split each name unambiguously; deeper keys become nested dicts, as torch does.
    """
    fqns = [f for g in param_groups for f in g["params"]]
    known = set(fqns)
    by_fqn: dict[str, dict] = {}
    for name, value in flat.items():
        parts = name.split(".")
        cut = next((k for k in range(2, len(parts)) if parts[0] == "state" and ".".join(parts[1:k]) in known), None)
        if cut is None:
            raise ValueError(f"optimizer state {name!r} names no parameter of the param groups")
        node = by_fqn.setdefault(".".join(parts[1:cut]), {})
        for part in parts[cut:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    state = {f: by_fqn[f] for f in fqns if f in by_fqn}
    groups = []
    for g in param_groups:
        hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in g.items() if k != "params"}
        groups.append({**hyper, "params": list(g["params"])})
    return {"state": state, "param_groups": groups}


def flatten(osd: Mapping) -> dict[str, Any]:
    """The nested form -> torch's flattened form (`state.<fqn>.<key>`, `param_groups.<fqn>.<key>`)."""
    out: dict[str, Any] = {}
    for fqn, entry in osd["state"].items():
        for key, value in _walk(entry):
            out[f"state.{fqn}.{key}"] = value
    for g in osd["param_groups"]:
        for fqn in g["params"]:
            for k, v in g.items():
                if k != "params":
                    out[f"param_groups.{fqn}.{k}"] = v
    return out


# ---------------------------------------------------------------- reading the export back

def _export_dir(path: Path) -> Path:
    path = Path(path).expanduser()
    if (path / OPTIMIZER_DIR).is_dir():
        return path / OPTIMIZER_DIR
    if (path / OPTIMIZER_INDEX).is_file() or (path / OPTIMIZER_PT).is_file():
        return path
    raise StreammergeError(f"{path}: no optimizer export ({OPTIMIZER_DIR}/{OPTIMIZER_INDEX} or "
                           f"{OPTIMIZER_DIR}/{OPTIMIZER_PT}) found")


def load_optimizer_state_dict(path: str | Path, *, flatten_state: bool = False) -> dict:
    """The full optimizer state of an export, name-keyed, as torch's `get_optimizer_state_dict(model,
    optim, options=StateDictOptions(full_state_dict=True))` returns it.

    Tensors are memory-mapped copy-on-write from the files, so nothing is read until used: each rank
    of a resumed job touches only the slices it keeps. `path` is the merge output folder (or its
    `optimizer/`). `flatten_state=True` gives torch's flattened form instead. Feed either to
    `torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`.
    """
    import torch

    folder = _export_dir(Path(path))
    if (folder / OPTIMIZER_INDEX).is_file():
        osd = _load_safetensors_export(folder)
    else:
        osd = torch.load(folder / OPTIMIZER_PT, map_location="cpu", mmap=True, weights_only=True)
    return flatten(osd) if flatten_state else osd


def _load_safetensors_export(folder: Path) -> dict:
    import torch

    from .safetensors_format import CODE_DTYPES, read_header

    index = json.loads((folder / OPTIMIZER_INDEX).read_text())
    meta = index.get("metadata", {})
    if "param_groups" not in meta:
        raise StreammergeError(f"{folder / OPTIMIZER_INDEX}: no param_groups in the index metadata")
    groups = json.loads(meta["param_groups"])
    flat: dict[str, Any] = {}
    for filename in dict.fromkeys(index["weight_map"].values()):
        path = folder / filename
        header, start = read_header(str(path))
        size = path.stat().st_size
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size) if size else None
        for name, e in header.items():
            if name == "__metadata__":
                continue
            dtype = CODE_DTYPES[e["dtype"]].torch()
            begin, end = e["data_offsets"]
            shape = tuple(e["shape"])
            if end - begin != math.prod(shape) * dtype.itemsize or start + end > size:
                raise StreammergeError(f"{path}: tensor {name!r} has inconsistent offsets")
            if math.prod(shape) == 0:
                flat[name] = torch.empty(shape, dtype=dtype)
            elif (start + begin) % dtype.itemsize == 0:  # always so in our files: 8-byte header, larger dtypes first
                flat[name] = torch.empty(0, dtype=dtype).set_(storage, (start + begin) // dtype.itemsize, shape)
            else:  # a file from elsewhere: copy this one tensor out
                raw = torch.empty(0, dtype=torch.uint8).set_(storage, start + begin, (end - begin,))
                flat[name] = raw.clone().view(dtype).reshape(shape)
    flat.update(json.loads(meta.get("state_values", "{}")))
    return nest(flat, groups)
