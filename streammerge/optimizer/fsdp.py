"""veRL's optim rank files -> the optimizer export's plan.

FSDP2 (and plain full tensors) keep one state per parameter, DTensor-sharded like the parameter.
FSDP1 flattens each wrapped unit (one per decoder layer, the rest in the root) into a FlatParameter
and gives each rank one contiguous slice of it; its optimizer state follows that layout:
- `use_orig_params=False`: one 1-D flat shard per FlatParameter (parameters concatenated in
  registration order, the whole padded to a multiple of the shard count);
- `use_orig_params=True`: one state per original parameter, holding only this rank's 1-D piece of
  the flattened parameter; a rank holding none of it has no entry. FSDP1 aligns parameters inside
  the FlatParameter with padding, so piece sizes are read from the files, never derived.
With hybrid sharding (a 2-D mesh) the flat slices are sharded over the mesh dim on which the model's
DTensors are `Shard` and replicated over the other: one replica is read, the others must agree.
Every state tensor is checked against its parameter's shape before anything is written; layouts
that cannot be named safely are skipped with a warning, the weights still exported.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..plan import Plan, TensorPlan, build_plan
from ..sources import lora
from ..sources.base import Piece, SourceTensor, open_checkpoint_file
from ..sources.rankfile import (
    RankFile,
    chunk_bounds,
    holds_tensor,
    layout_name,
    row_major_coordinate,
    span_bytes,
    storage_records,
    tensor_pieces,
    tensor_record,
    torch_load_meta,
)
from . import NO_OPTIMIZER_HINT, OPTIMIZER_DIR, OPTIMIZER_PT, OptimizerMismatchError, Skip
from .export import index_metadata, walk_state
from .naming import ModelParams, model_params

Named = tuple[dict[str, TensorPlan], dict[int, list[str]]]  # output tensors; each entry's parameter names

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
    for g in groups:
        params = g.get("params") if isinstance(g, dict) else None
        if not (isinstance(params, list) and all(type(i) is int for i in params)):
            raise CheckpointError(f"{path}: not an optimizer state dict (a param group that is not a dict with a "
                                  "'params' list of parameter indices)")
    for pid in state:  # before any is hashed again: a tuple key may nest deeper than this thread's stack can hash
        if not isinstance(pid, int):
            raise Skip(f"{path.name}: optimizer state keyed by {type(pid).__name__}, not by parameter index")
    orphans = sorted(set(state) - {i for g in groups for i in g["params"]}, key=str)
    if orphans:
        raise CheckpointError(f"{path}: optimizer state entry {orphans[0]!r} is in no param group (a damaged or "
                              f"hand-edited file); {NO_OPTIMIZER_HINT}")
    tensors: dict[str, Any] = {}
    values: dict[str, Any] = {}
    keys: dict[int, list[str]] = {}
    records = storage_records(Path(path))
    for pid, entry in state.items():
        if not isinstance(pid, int) or not isinstance(entry, dict):
            raise Skip(f"{path.name}: optimizer state keyed by {type(pid).__name__}, not by parameter index")
        try:
            flat = list(walk_state(entry))
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        for key, value in flat:
            name = f"state.{pid}.{key}"
            if isinstance(value, torch.Tensor):
                rec = tensor_record(name, value, rank, world_size, path, records)
                if rec.offset + span_bytes(rec) > st.st_size:
                    raise CheckpointError(f"{path}: truncated: {name} needs bytes up to "
                                          f"{rec.offset + span_bytes(rec)}, file has {st.st_size}")
                tensors[name] = rec
                keys.setdefault(pid, []).append(name)
            elif holds_tensor(value):  # torch.load reads it; no export format holds a tensor inside a container
                raise Skip(f"{path.name}: optimizer state {name} holds tensors inside a {type(value).__name__}")
            else:
                values[name] = value
    for i, g in enumerate(groups):
        for k, v in g.items():
            if k != "params" and not hasattr(v, "shape") and holds_tensor(v):
                raise Skip(f"{path.name}: param group {i} holds tensors inside its {k!r}")
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
            if rf.other["ids"] != files[0].other["ids"]:
                raise CheckpointError(f"{rf.path}: its param groups list other parameter indices than "
                                      f"{files[0].path.name}'s (files from different runs?)")
            for i, (g, g0) in enumerate(zip(rf.other["param_groups"], groups)):
                for k in sorted(set(g) | set(g0), key=str):
                    if k != "params" and not _same_setting(g.get(k), g0.get(k)):
                        raise CheckpointError(f"{rf.path}: param group {i} has {k} {g.get(k)!r}, but "
                                              f"{files[0].path.name}'s has {g0.get(k)!r}: every rank holds the same "
                                              "settings, so the rank files come from different runs "
                                              f"({NO_OPTIMIZER_HINT})")
        known = {n: t.shape for n, t in weights_plan.tensors.items()}
        known.update({n: weights_plan.tensors[k].shape for n, k in weights_plan.dropped.items()})
        where = str(model_dir / "config.json") if model_dir is not None else "config.json"
        model = model_params(config, known, where)
        if any(n.startswith(lora.NOTE) for n in weights_plan.notes):  # built over the peft model's parameters
            model = lora.peft_params(model, {n: t.shape for n, t in ck.tensors(options).items()})
        _check_trained_order(model, ck.ranks(trust_pickle).names)
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
            tensors, fqns = _plan_fsdp1(shard_files(ck, files, trust_pickle), model)
        elif ck.fsdp_version in (1, None) and per_param and _orig_param_pieces(files, model):
            tensors, fqns = _plan_orig_params(shard_files(ck, files, trust_pickle), model)
        else:
            tensors, fqns = _plan_per_param(files, model)
        _check_recorded_names(groups, fqns)
        _check_scalars_agree(files, fqns)
        values: dict[str, Any] = {}
        held: dict[str, RankFile] = {}
        for rf in files:  # FSDP1 use_orig_params: a parameter's values are only on the ranks holding a piece of it
            for n, v in rf.other["values"].items():
                first = held.setdefault(n, rf)
                if rf is not first and not _same_value(v, first.other["values"][n]):
                    raise CheckpointError(_scalar_mismatch(rf, first, n, v, first.other["values"][n], fqns))
                for f in fqns[int(n.split(".", 2)[1])]:
                    values.setdefault(f"state.{f}.{n.split('.', 2)[2]}", v)
        _check_json(values, "non-tensor optimizer state")
        meta_groups = []
        for g in groups:
            hyper = {k: v for k, v in g.items() if k != "params"}
            _check_json(hyper, "param group")
            meta_groups.append({**hyper, "params": [f for i in g["params"] for f in fqns[i]]})
    except Skip as e:
        return None, [f"optimizer not exported: {e}"]
    meta = index_metadata(meta_groups, values=values, step=ck.step)
    meta["source_world_size"] = str(ck.world_size)
    return export_plan(tensors, meta, fmt, max_shard_size)


def export_plan(tensors: Mapping[str, TensorPlan], index_metadata: Mapping[str, str], fmt: str,
                max_shard_size: int, warnings: Sequence[str] = ()) -> tuple[Plan | None, list[str]]:
    """`optimizer/` as sharded safetensors with an index (which carries the param groups, so it is always
    written), or one `optimizer.pt` (its size in the plan is the safetensors estimate).

    State in a dtype safetensors has no code for (complex128) is not exported, with a warning: the weights
    do not depend on it, so it need not stop the merge."""
    odd = next((t for t in tensors.values() if t.dtype.code is None), None)
    if odd is not None:
        return None, [*warnings, f"optimizer not exported: {odd.name!r} is {odd.dtype.name}, which neither "
                                 "optimizer format streammerge writes can hold; the weights are exported"]
    names = {*tensors, *json.loads(index_metadata.get("state_values", "{}"))}
    inside = next(((n[:i], n) for n in sorted(names) for i, c in enumerate(n) if c == "." and n[:i] in names), None)
    if inside is not None:  # {"exp_avg": T, "exp_avg.x": 0.5}: torch's flat names, nested again, cannot hold both
        return None, [*warnings, f"optimizer not exported: its state holds both {inside[0]!r} and {inside[1]!r}, "
                                 "which the export's dotted names cannot tell apart when loaded back; the weights are "
                                 "exported"]
    if fmt == "torch":
        return build_plan(tensors.values(), max_shard_size=max_shard_size, subdir=OPTIMIZER_DIR,
                          index_metadata=index_metadata, metadata=None, single_file=OPTIMIZER_PT), list(warnings)
    return build_plan(tensors.values(), max_shard_size=max_shard_size, prefix="optimizer", subdir=OPTIMIZER_DIR,
                      index_metadata=index_metadata, always_index=True), list(warnings)


def _plain(name: str, s: SourceTensor) -> TensorPlan:
    """Optimizer state is exported under its parameter's name, in the dtype it was saved in."""
    return TensorPlan(name, s, s.dtype)


_WRAPPERS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod|module)\.")


def _check_recorded_names(groups: list[dict], fqns: Mapping[int, list[str]]) -> None:
    """An optimizer built from named parameters records them (`param_names`, torch >= 2.6). The state is named
    here by position in the model's named_parameters(); where the optimizer's own names say another order
    (layers listed in reverse have the same shapes), that naming is wrong: skip rather than misname."""
    for g in groups:
        names = g.get("param_names")
        if names is None:
            continue
        for pid, recorded in zip(g.get("params", []), names):
            ours = fqns.get(pid, [])
            if len(ours) != 1:  # an FSDP1 flat parameter: several names, none recorded
                continue
            a, b = _WRAPPERS.sub(r"\1", str(recorded)), ours[0]
            if not (a == b or a.endswith("." + b) or b.endswith("." + a)):
                raise Skip(f"the optimizer records parameter {pid} as {recorded!r} (param_names), but it is "
                           f"{b!r} in the model's named_parameters() order; the state cannot be named by position")


def _check_trained_order(model: ModelParams, file_order: Sequence[str]) -> None:
    """The model rank files hold the trained model's state_dict, whose order is its named_parameters() order (with
    buffers and tied copies between). The optimizer's integer keys follow that order; they are named here by the
    order of the class transformers builds now. Where the two differ (another transformers version, a patched class),
    same-shaped parameters (q_proj and o_proj) would swap names with no shape to tell: skip rather than misname."""
    at = {n: i for i, n in enumerate(file_order)}
    if not all(fqn in at for fqn, _ in model.params):  # named otherwise in the files (peft): not comparable
        return
    ours = [fqn for fqn, _ in model.params]
    trained = sorted(ours, key=at.__getitem__)
    for i, (a, b) in enumerate(zip(trained, ours)):
        if a != b:
            raise Skip(f"parameter {i} of the trained model is {a!r} (the order of the model rank files), but "
                       f"{model.model_class} as this transformers builds it has {b!r} there (trained with another "
                       "transformers version or model code?); the optimizer's state, indexed in the trained order, "
                       "cannot be named by position")


def _check_json(obj: Any, what: str) -> None:
    try:
        json.dumps(obj, allow_nan=True)
    except (TypeError, ValueError):
        bad = {k: type(v).__name__ for k, v in obj.items() if not jsonable(v)}
        raise Skip(f"{what} holds values that cannot be recorded as JSON: {bad}") from None


def _check_scalars_agree(files: Sequence[RankFile], fqns: Mapping[int, list[str]]) -> None:
    """Scalar state (Adam's `step`) is the same on every rank holding it: one read of a few bytes per rank and entry.
    A rank file saved at another step (copied from another save) disagrees here, though its shapes all match; the
    export would otherwise carry rank 0's value as if every rank had it."""
    scalars: dict[str, list[tuple[RankFile, bytes]]] = {}
    for rf in files:
        entries = [(n, r) for n, r in rf.tensors.items() if r.local_shape == () and r.placements is None]
        if not entries:
            continue
        fd = open_checkpoint_file(rf.path)
        try:
            for n, r in entries:
                raw = os.pread(fd, r.dtype.itemsize, r.offset)
                if len(raw) != r.dtype.itemsize:
                    raise CheckpointError(f"{rf.path}: truncated: {n} needs bytes up to {r.offset + r.dtype.itemsize}")
                scalars.setdefault(n, []).append((rf, raw))
        finally:
            os.close(fd)
    for n, held in scalars.items():
        first, want = held[0]
        for rf, raw in held[1:]:
            if raw != want:
                dtype = first.tensors[n].dtype.torch()
                raise CheckpointError(_scalar_mismatch(rf, first, n, _scalar(raw, dtype), _scalar(want, dtype), fqns))


def _scalar(raw: bytes, dtype: Any) -> Any:
    import torch

    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).item()


def _same_setting(a: Any, b: Any) -> bool:
    """Two ranks' values of a param group setting agree (a tensor, loaded onto the meta device, by kind and shape)."""
    if hasattr(a, "shape") or hasattr(b, "shape"):  # a tensor on one rank and a number on another: not the same
        return hasattr(a, "shape") and hasattr(b, "shape") and (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    return _same_value(a, b)


def _same_value(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _scalar_mismatch(rf: RankFile, first: RankFile, name: str, got: Any, want: Any,
                     fqns: Mapping[int, list[str]]) -> str:
    pid, key = name.split(".", 2)[1:]
    params = fqns.get(int(pid), [])
    which = f" ({params[0]}{f' and {len(params) - 1} more' if len(params) > 1 else ''})" if params else ""
    return (f"{rf.path}: optimizer entry {pid}{which} has {key} {got!r}, but {first.path.name} has {want!r}: every "
            f"rank holds the same {key}, so the rank files come from different saves (copy one save's files; "
            f"{NO_OPTIMIZER_HINT})")


def jsonable(v: Any) -> bool:
    """Whether the index metadata's JSON can record `v`."""
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _state_keys(files: Sequence[RankFile], pid: int) -> list[str]:
    return files[0].other["keys"].get(pid, [])


def _plan_per_param(files: Sequence[RankFile], model: ModelParams) -> Named:
    """FSDP2 (and plain full tensors): one state per parameter, DTensor-sharded like the parameter."""
    _same_entries(files)
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
            layout = layout_name(first.placements)
            tensors[out] = _plain(out, SourceTensor(name, first.shape, first.dtype, pieces, layout))
    return tensors, {pid: [model.params[pid][0]] for pid in ids}


def _same_entries(files: Sequence[RankFile]) -> None:
    """Layouts where every rank holds a part of every state: the same entries on every rank."""
    for rf in files[1:]:
        if set(rf.tensors) != set(files[0].tensors):
            odd = sorted(set(files[0].tensors) ^ set(rf.tensors))[0]
            raise CheckpointError(f"{rf.path}: optimizer entries differ from {files[0].path.name}'s (e.g. {odd}, "
                                  "in one only; files from different runs?)")


def shard_files(ck: VerlSource, files: Sequence[RankFile], trust_pickle: bool = False) -> list[RankFile]:
    """FSDP1: one optim file per shard of the FlatParameters, in shard order.

    FSDP1 shards over the mesh dim on which the model's DTensors are `Shard` (all ranks for a 1-D
    mesh; the "fsdp" dim of HSDP's (Replicate(), Shard(0))) and replicates over the other. The
    model rank files give each rank's coordinate; of each shard's replicas the first is read, and
    the others must hold the same entries in the same shapes.
    """
    ranks = ck.ranks(trust_pickle)
    name = next((n for n in ranks.names if ranks.template.tensors[n].placements), None)
    if name is None:  # plain tensors (world size 1, or full state dicts): shards in rank order
        return list(files)
    records = [ranks.record(k, name) for k in range(len(files))]
    placements = records[0].placements or ()
    dims = [d for d, p in enumerate(placements) if p.startswith("Shard")]
    if len(dims) != 1 or any(r.coordinate is None for r in records):
        raise Skip(f"the model is sharded as {layout_name(placements)}: cannot tell which ranks hold which "
                   "slice of FSDP1's flat parameters")
    mesh = records[0].mesh_shape or tuple(max(c) + 1 for c in zip(*(r.coordinate for r in records)))
    for k, rec in enumerate(records):  # flat shards carry no coordinate: an optim file is its model file's rank's
        if rec.coordinate != row_major_coordinate(k, mesh):
            raise Skip(f"{ck.model_files[k].name} holds mesh coordinate {rec.coordinate}, not rank {k}'s "
                       f"{row_major_coordinate(k, mesh)} (model rank files renamed?); FSDP1's flat optimizer shards "
                       f"record no coordinate, so which slice {files[k].path.name} holds cannot be told")
    by_shard: dict[int, list[RankFile]] = {}
    for rec, rf in zip(records, files):
        by_shard.setdefault(rec.coordinate[dims[0]], []).append(rf)  # type: ignore[index]
    if sorted(by_shard) != list(range(len(by_shard))) or len({len(g) for g in by_shard.values()}) != 1:
        raise CheckpointError(f"{ck.path}: the model rank files' mesh coordinates do not form a full mesh "
                              f"(ranks per shard: { {k: [rf.rank for rf in g] for k, g in sorted(by_shard.items())} })")
    for group in by_shard.values():
        first = group[0]
        for rf in group[1:]:
            for n, rec in first.tensors.items():
                other = rf.tensors.get(n)
                if other is None or (other.local_shape, other.dtype) != (rec.local_shape, rec.dtype):
                    have = "no such entry" if other is None else f"{other.dtype.name} {list(other.local_shape)}"
                    raise CheckpointError(f"{rf.path}: optimizer entry {n} ({have}) differs from its replica "
                                          f"{first.path.name} ({rec.dtype.name} {list(rec.local_shape)}); "
                                          "files from different runs?")
            if set(rf.tensors) != set(first.tensors):
                extra = sorted(set(rf.tensors) - set(first.tensors))[0]
                raise CheckpointError(f"{rf.path}: holds optimizer entry {extra}, which its replica "
                                      f"{first.path.name} lacks; files from different runs?")
    return [by_shard[i][0] for i in range(len(by_shard))]


def _orig_param_pieces(files: Sequence[RankFile], model: ModelParams) -> bool:
    """FSDP1 use_orig_params=True: some state is a plain piece smaller than its parameter, or some
    rank has no entry for a parameter (it holds none of it)."""
    keys = files[0].other["keys"]
    for rf in files:
        if rf.other["keys"] != keys:
            return True
        for name, rec in rf.tensors.items():
            pid = int(name.split(".", 2)[1])
            if rec.placements is None and pid < len(model.params) and rec.local_shape not in ((), model.params[pid][1]):
                return True
    return False


def _plan_orig_params(files: Sequence[RankFile], model: ModelParams) -> Named:
    """FSDP1 use_orig_params=True: each parameter's state is the 1-D pieces the shards hold, joined in shard order.

    A shard's slice of a FlatParameter is contiguous, so the part of one parameter it holds is too,
    and the parameter is the pieces joined in shard order. Piece sizes come from the files (FSDP1
    pads between parameters, so they cannot be derived from the shapes); they must add up to the
    parameter exactly, from consecutive shards.
    """
    tensors: dict[str, TensorPlan] = {}
    for pid in files[0].other["ids"]:
        fqn, shape = model.params[pid]
        numel = math.prod(shape)
        holders = [rf for rf in files if pid in rf.other["keys"]]
        if not holders:  # no state (a frozen parameter, or no step taken): as torch leaves it
            continue
        keys = [n.split(".", 2)[2] for n in holders[0].other["keys"][pid]]
        for rf in holders[1:]:
            if [n.split(".", 2)[2] for n in rf.other["keys"][pid]] != keys:
                raise CheckpointError(f"{rf.path}: optimizer entry {pid} holds {rf.other['keys'][pid]}, but "
                                      f"{holders[0].path.name} holds {holders[0].other['keys'][pid]}")
        for key in keys:
            name = f"state.{pid}.{key}"
            records = [rf.tensors[name] for rf in holders]
            if any(r.placements is not None for r in records) or len({r.dtype for r in records}) != 1:
                raise Skip(f"FSDP1 optimizer entry {pid} ({key}) is not a plain tensor of one dtype on every rank")
            out = f"state.{fqn}.{key}"
            first = records[0]
            if all(r.local_shape == () for r in records):  # a scalar (step): every holder has its own copy
                tensors[out] = _plain(out, SourceTensor(name, (), first.dtype, (
                    Piece(holders[0].rank, str(holders[0].path), first.offset, (), (), ()),)))
                continue
            sizes = [r.local_shape[0] if len(r.local_shape) == 1 and r.local_stride in ((1,), ()) else -1
                     for r in records]
            shards = [files.index(rf) for rf in holders]
            if -1 in sizes or sum(sizes) != numel or shards != list(range(shards[0], shards[0] + len(shards))):
                raise OptimizerMismatchError(
                    f"{holders[0].path.parent}: optimizer entry {pid} ({key}) holds pieces of "
                    f"{[list(r.local_shape) for r in records]} elements on ranks {[rf.rank for rf in holders]}, but "
                    f"parameter {pid} in named_parameters order, {fqn}, has shape {list(shape)} ({numel} elements, "
                    f"which FSDP1 with use_orig_params gives to consecutive ranks); refusing to guess names "
                    f"({NO_OPTIMIZER_HINT})")
            pieces, at = [], 0
            for rf, rec, n in zip(holders, records, sizes):
                if n:
                    pieces.append(Piece(rf.rank, str(rf.path), rec.offset, (n,), (1,), (at,)))
                at += n
            tensors[out] = _plain(out, SourceTensor(name, shape, first.dtype, tuple(pieces), "flat", flat=True))
    return tensors, {pid: [model.params[pid][0]] for pid in files[0].other["ids"]}


def _plan_fsdp1(files: Sequence[RankFile], model: ModelParams) -> Named:
    """FSDP1 flat parameters: cut each shard's 1-D slice (one file per shard) back into the parameters it holds."""
    _same_entries(files)
    ids = files[0].other["ids"]
    world = len(files)
    units = model.units
    shapes = dict(model.params)
    if len(ids) != len(units) or not units:
        what = "one per parameter (use_orig_params=True?)" if len(ids) == len(model.params) else "flat parameters"
        lora = any(".lora_" in f for _, members in units for f in members)
        if not units:
            expected = "no FSDP1 units are known for this model's modules"
        else:
            expected = (f"expected {len(units)} flat parameters (the root, one per {model.model_class} decoder layer"
                        + (" and one per LoRA factor, as veRL's LoRA wrap policy makes them)" if lora else ")"))
        raise Skip(f"FSDP1 optimizer holds {len(ids)} entries ({what}); {expected}; cannot match them to parameters")
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
            for rf, rec in zip(files[1:], records[1:]):
                if rec.dtype != records[0].dtype:
                    raise CheckpointError(f"{rf.path}: optimizer entry {pid} ({key}) is {rec.dtype.name}, but "
                                          f"{files[0].path.name}'s is {records[0].dtype.name}: every shard of a flat "
                                          f"parameter has one dtype (files from different runs?; {NO_OPTIMIZER_HINT})")
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
                parts: list[Piece] = []
                for shard, rec in enumerate(records):
                    lo, hi = chunk_bounds(total, world, shard)
                    a, b = max(lo, flat_at), min(hi, flat_at + n)
                    if a < b:
                        rf, at = files[shard], rec.offset + (a - lo) * dtype.itemsize
                        parts.append(Piece(rf.rank, str(rf.path), at, (b - a,), (1,), (a - flat_at,)))
                flat_at += n
                out = f"state.{f}.{key}"
                src = SourceTensor(f"{name}[{f}]", shapes[f], dtype, tuple(parts), "flat", flat=True)
                tensors[out] = _plain(out, src)
    return tensors, fqns


