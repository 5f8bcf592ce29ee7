"""Read an optimizer export back: the nested, name-keyed state torch's `set_optimizer_state_dict` takes.

Tensors are memory-mapped copy-on-write from the export's files, so nothing is read until used:
each rank of a resumed job touches only the slices it keeps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import jsonfile
from ..errors import CheckpointError, StreammergeError
from ..paths import user_path
from ..sources.picklescan import torch_load
from . import LAYOUT_NAME, OPTIMIZER_DIR, OPTIMIZER_INDEX, OPTIMIZER_PT


def walk_state(entry: Mapping, prefix: str = "", _seen: set[int] | None = None):
    """(dotted key, value) of a possibly nested per-parameter state (torch flattens nesting with dots).

    Each dict is walked once: a pickle can share one dict many times over, whose walk would never end.
    """
    seen = _seen if _seen is not None else {id(entry)}
    for k, v in entry.items():
        if not isinstance(k, (str, int)):  # a tuple may nest deeper than str() can follow
            raise CheckpointError(f"optimizer state {prefix.rstrip('.')!r} has a {type(k).__name__} key (not an "
                                  "optimizer's state; a crafted file?)")
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if id(v) in seen or key.count(".") > 64:
                raise CheckpointError(f"optimizer state {key!r} holds a dict already seen, or nests too deep "
                                      "(not an optimizer's state; a crafted file?)")
            seen.add(id(v))
            yield from walk_state(v, key + ".", seen)
        else:
            yield key, v


LIST_FIELDS = "streammerge_lists"  # a group's fields that torch held as lists: JSON writes tuples as lists too


def index_metadata(groups: Sequence[Mapping], *, source: str | None = None, values: Mapping[str, Any] | None = None,
                   step: int | None = None) -> dict[str, str]:
    """The optimizer index's metadata for torch's flattened layout: the param groups, where the state came from, its
    values that are no tensors (as JSON) and the training step."""
    meta = {"format": LAYOUT_NAME, "param_groups": groups_json(groups)}
    if source is not None:
        meta["source"] = source
    if values:
        meta["state_values"] = json.dumps(values)
    if step is not None:
        meta["step"] = str(step)
    return meta


def groups_json(groups: Sequence[Mapping]) -> str:
    """The param groups as the index metadata holds them: JSON, with each group's list-valued fields named, since
    JSON has no tuples and `nest` takes every other list for one (torch's betas)."""
    out = []
    for g in groups:
        lists = sorted(k for k, v in g.items() if isinstance(v, list) and k not in ("params", "param_names"))
        out.append({**g, LIST_FIELDS: lists} if lists else dict(g))
    return json.dumps(out)


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
        # JSON has no tuples: torch's are betas and the like; param_names (named-parameter optimizers) is a list, and
        # so is each field groups_json names
        lists = {"param_names", *g.get(LIST_FIELDS, ())}
        hyper = {k: tuple(v) if isinstance(v, list) and k not in lists else v for k, v in g.items()
                 if k not in ("params", LIST_FIELDS)}
        groups.append({**hyper, "params": list(g["params"])})
    return {"state": state, "param_groups": groups}


def flatten(osd: Mapping) -> dict[str, Any]:
    """The nested form -> torch's flattened form (`state.<fqn>.<key>`, `param_groups.<fqn>.<key>`)."""
    out: dict[str, Any] = {}
    for fqn, entry in osd["state"].items():
        for key, value in walk_state(entry):
            out[f"state.{fqn}.{key}"] = value
    for g in osd["param_groups"]:
        for fqn in g["params"]:
            for k, v in g.items():
                if k != "params":
                    out[f"param_groups.{fqn}.{k}"] = v
    return out


def _export_dir(path: Path) -> Path:
    path = user_path(path)
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
    folder = _export_dir(Path(path))
    if (folder / OPTIMIZER_INDEX).is_file():
        osd = _load_safetensors_export(folder)
    else:
        osd = torch_load(folder / OPTIMIZER_PT, map_location="cpu", mmap=True, weights_only=True)
    return flatten(osd) if flatten_state else osd


def _load_safetensors_export(folder: Path) -> dict:
    import torch

    from ..write.safetensors_format import CODE_DTYPES, read_header

    index = jsonfile.loads((folder / OPTIMIZER_INDEX).read_text())
    meta = index.get("metadata", {})
    if "param_groups" not in meta:
        why = (" (a Megatron distributed optimizer export: state tensors by parameter name, no torch param groups; "
               "read its files with safetensors)" if "megatron_param_groups" in meta else "")
        raise StreammergeError(f"{folder / OPTIMIZER_INDEX}: no param_groups in the index metadata{why}")
    groups = jsonfile.loads(meta["param_groups"])
    flat: dict[str, Any] = {}
    for filename in dict.fromkeys(index["weight_map"].values()):
        path = folder / filename
        header, start = read_header(str(path))
        size = path.stat().st_size
        storage: Any = (torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size) if size
                        else torch.UntypedStorage())
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
                flat[name] = torch.empty(0, dtype=dtype).set_(storage, (start + begin) // dtype.itemsize, shape,
                                                              torch.empty(shape, device="meta").stride())
            else:  # a file from elsewhere: copy this one tensor out
                raw = torch.empty(0, dtype=torch.uint8).set_(storage, start + begin, (end - begin,), (1,))
                flat[name] = raw.clone().view(dtype).reshape(shape)
    flat.update(jsonfile.loads(meta.get("state_values", "{}")))
    return nest(flat, groups)
