"""veRL's optim rank files -> the optimizer export's plan.

FSDP2 (and plain full tensors) keep one state per parameter, DTensor-sharded like the parameter.
FSDP1 (use_orig_params=False) keeps one 1-D flat shard per FlatParameter instead: each decoder layer
is one unit, the remaining parameters form the root unit, parameters are concatenated in
registration order and the whole is padded to a multiple of the world size. Those flat shards
become flat pieces. Every state tensor is checked against its parameter's shape before anything is
written; layouts that cannot be named safely are skipped with a warning, the weights still exported.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..plan import Plan, TensorPlan, build_plan
from ..sources.base import Piece, SourceTensor
from ..sources.rankfile import RankFile, _record, _span_bytes, chunk_bounds, layout_name, tensor_pieces, torch_load_meta
from . import (LAYOUT_NAME, NO_OPTIMIZER_HINT, OPTIMIZER_DIR, OPTIMIZER_PT, OptimizerMismatchError,
               Skip)
from .export import walk_state
from .naming import ModelParams, model_params

if TYPE_CHECKING:
    from ..options import MergeOptions
    from ..sources.verl import VerlSource


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
            raise Skip(f"{path.name}: optimizer state keyed by {type(pid).__name__}, not by parameter index")
        for key, value in walk_state(entry):
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


def plan_optimizer(ck: VerlSource, weights_plan: Plan, options: MergeOptions, config: Mapping | None,
                   model_dir: Path | None) -> tuple[Plan | None, list[str]]:
    """Plan `OUT/optimizer/`: name every state, check it against its parameter, lay out the files.

    Returns (None, [reason]) when the layout cannot be named safely (the weights are still exported);
    raises OptimizerMismatchError when the state contradicts the model (we never guess names).
    """
    trust_pickle, max_shard_size, fmt = options.trust_pickle, options.max_shard_size, options.optimizer_format
    try:
        files = [load_optim_file(p, r, ck.world_size, trust_pickle=trust_pickle) for r, p in enumerate(ck.optim_files)]
        groups = files[0].other["param_groups"]
        for rf in files[1:]:
            if rf.other["ids"] != files[0].other["ids"] or set(rf.tensors) != set(files[0].tensors):
                raise CheckpointError(f"{rf.path}: optimizer entries differ from rank 0's (files from different runs?)")
        known = {n: t.shape for n, t in weights_plan.tensors.items()}
        known.update({n: weights_plan.tensors[k].shape for n, k in weights_plan.dropped.items()})
        where = str(model_dir / "config.json") if model_dir is not None else "config.json"
        model = model_params(config, known, where)
        ids = files[0].other["ids"]
        if len(groups) != 1:
            raise Skip(f"the optimizer has {len(groups)} param groups; the rank files do not record which "
                        "parameters each group holds, so their names cannot be assigned safely")
        if ids != list(range(len(ids))):
            raise Skip("the optimizer's parameter indices are not 0..N-1 in order")
        per_param = len(ids) == len(model.params)
        if ck.fsdp_version == 1 and not per_param or (
                ck.fsdp_version is None and len(ids) == len(model.units) != len(model.params)):
            # FSDP1 flat parameters (checkpoints older than fsdp_config.json: told by the entry count)
            tensors, fqns = _plan_fsdp1(files, model, weights_plan)
        elif ck.fsdp_version == 1:  # one entry per parameter: full plain tensors (world size 1) fit as is
            try:
                tensors, fqns = _plan_per_param(files, model)
            except OptimizerMismatchError:
                raise Skip("FSDP1 optimizer holds one entry per parameter but not in the parameters' shapes "
                            "(use_orig_params=True keeps 1-D pieces, which is not supported)") from None
        else:
            tensors, fqns = _plan_per_param(files, model)
    except Skip as e:
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
    return export_plan(tensors, index_metadata, fmt, max_shard_size), []


def export_plan(tensors: Mapping[str, TensorPlan], index_metadata: Mapping[str, str], fmt: str,
                max_shard_size: int) -> Plan:
    """`optimizer/` as sharded safetensors with an index (which carries the param groups, so it is always
    written), or one `optimizer.pt` (its size in the plan is the safetensors estimate)."""
    if fmt == "torch":
        return build_plan(tensors.values(), max_shard_size=max_shard_size, subdir=OPTIMIZER_DIR,
                          index_metadata=index_metadata, metadata=None, single_file=OPTIMIZER_PT)
    return build_plan(tensors.values(), max_shard_size=max_shard_size, prefix="optimizer", subdir=OPTIMIZER_DIR,
                      index_metadata=index_metadata, always_index=True)


def _plain(name: str, s: SourceTensor) -> TensorPlan:
    """Optimizer state is exported under its parameter's name, in the dtype it was saved in."""
    return TensorPlan(name, s, s.dtype)


def _check_json(obj: Any, what: str) -> None:
    try:
        json.dumps(obj, allow_nan=True)
    except (TypeError, ValueError):
        bad = {k: type(v).__name__ for k, v in obj.items() if not _jsonable(v)}
        raise Skip(f"{what} holds values that cannot be recorded as JSON: {bad}") from None


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
            tensors[out] = _plain(out, SourceTensor(name, first.shape, first.dtype, pieces, layout_name(first.placements)))
    return tensors, {pid: [model.params[pid][0]] for pid in ids}


def _plan_fsdp1(files: Sequence[RankFile], model: ModelParams,
                weights_plan: Plan) -> tuple[dict[str, TensorPlan], dict[int, list[str]]]:
    """FSDP1 flat parameters: cut each rank's 1-D shard back into the parameters it holds."""
    ids = files[0].other["ids"]
    world = len(files)
    if any(t.source.layout.startswith("(") for t in weights_plan.tensors.values()):
        raise Skip("FSDP1 with hybrid sharding (2-D mesh) is not supported for the optimizer export")
    units = model.units
    shapes = dict(model.params)
    if len(ids) != len(units):
        what = "one per parameter (use_orig_params=True?)" if len(ids) == len(model.params) else "flat parameters"
        raise Skip(f"FSDP1 optimizer holds {len(ids)} entries ({what}); expected {len(units)} flat parameters "
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
                raise Skip(f"FSDP1 optimizer entry {pid} ({key}) is a DTensor, not a flat shard")
            if all(r.local_shape == () for r in records):  # per-flat-parameter scalar (step): every member gets it
                first, pieces = tensor_pieces(name, records, files)
                for f in members:
                    out = f"state.{f}.{key}"
                    tensors[out] = _plain(out, SourceTensor(name, (), first.dtype, pieces))
                continue
            sizes = {r.local_shape for r in records}
            if sizes != {(chunk,)} or any(r.local_stride != (1,) for r in records):
                raise Skip(
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
                tensors[out] = _plain(out, SourceTensor(f"{name}[{f}]", shapes[f], dtype, tuple(pieces), "flat", flat=True))
    return tensors, fqns


