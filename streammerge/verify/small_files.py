"""The files that are not tensors: config.json, generation_config.json, the tokenizer's files, the indexes, an
adapter's config, byte for byte what the merge writes from the checkpoint (in a folder another tool wrote, as data,
its writer's own keys aside); an optimizer export's param groups and non-tensor state; files the checkpoint no
longer gives, and files no merge wrote that a loader reads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .. import dtypes, jsonfile
from ..architecture import critic_config
from ..model_folder import DTYPE_KEYS
from ..optimizer import OPTIMIZER_DIR, OPTIMIZER_PT
from ..plan import Plan
from ..sources.lora import ADAPTER_CONFIG
from ..sources.picklescan import torch_load
from ..write.transaction import foreign_loaded_files
from .report import VerifyReport

if TYPE_CHECKING:
    from ..pipeline import MergePlan


def check_small_files(out: Path, merge_plan: MergePlan, manifest: dict | None, report: VerifyReport, *,
                      same_merge: bool) -> None:
    """config.json, generation_config.json, the tokenizer's files, the indexes, an adapter's config: byte for byte
    what the merge writes from the checkpoint (the manifest's checksums only say they are as the merge left them)."""
    listed = (manifest or {}).get("files", {})
    own_layout = manifest is None  # a folder another tool wrote: its index is its own, its files formatted its way
    if own_layout and merge_plan.config is None and (out / "config.json").is_file():
        report.notes.append("config.json and the tokenizer: not compared (the checkpoint has none, and without a "
                            "manifest the --model-name a merge took them from is unknown)")
    for rel in sorted(set(merge_plan.small) | (set() if own_layout else set(merge_plan.indexes))):
        path = out / rel
        if not path.is_file():
            if own_layout and rel in CONFIG_FILES:  # transformers reads none: it loads no model, or generates otherwise
                report.fail(f"{rel}: not in the folder, and the checkpoint gives one, which transformers reads with "
                            "these weights; rerun the merge to write it")
            elif own_layout:
                report.notes.append(f"{rel}: not in the folder (a merge would write it)")
            elif rel not in listed:  # else the manifest check said so
                report.fail(f"{rel}: missing (the checkpoint's plan writes it)")
            continue
        try:
            want = merge_plan.contents(rel)
        except OSError as e:
            report.fail(f"{rel}: cannot read what the checkpoint gives for it ({e})")
            continue
        got = path.read_bytes()
        report.files_checked.add(rel)
        report.count(read=len(got))
        if got != want and rel == "config.json":
            want = _as_critic(got, merge_plan) or want
        strict = rel in CONFIG_FILES  # what the model is and how it generates: never a note
        if rel == "config.json" and own_layout and merge_plan.dtype is not None:
            named = _named_dtype(got)
            if named is not None and named != merge_plan.dtype.name:
                report.fail(f"config.json: names the dtype {named}, but the weights are {merge_plan.dtype.name}: "
                            "transformers would load them cast to it, not as they are")
                continue
        if got != want and own_layout and _same_data(got, want, strict=strict):
            continue
        if got != want and own_layout and rel.endswith(ADAPTER_CONFIG):  # another writer's keys aside, the adapter's
            strict = not _same_data(got, want, strict=False, keys=ADAPTER_KEYS)
        if got != want:
            why = _first_difference(got, want)
            if own_layout and not strict:
                report.notes.append(f"{rel}: differs from the checkpoint's ({why})")
                continue
            report.fail(f"{rel}: differs from what the merge writes from the checkpoint ({why}); rerun the merge to "
                        "write it again")
    planned = {*merge_plan.small, *merge_plan.indexes, *(p.rel(f.filename) for p in merge_plan.plans for f in p.files)}
    # a rerun removes such a file only where it is still the same merge; where the checkpoint now plans another one
    # (its optimizer files gone, say), a rerun into this folder is refused
    advice = "rerun the merge to remove it" if same_merge else \
        "the checkpoint no longer plans the merge this folder holds: merge it into a new folder"
    for rel in sorted(set(listed) - planned - {"README.md"}):  # a push's card: noted below
        report.fail(f"{rel}: an earlier run of this merge wrote it, and the checkpoint no longer gives it; {advice}")
    if not own_layout:  # a folder of ours: a file a loader reads that the merge did not write changes what loads
        for rel in foreign_loaded_files(out, planned | set(listed)):
            report.fail(f"{rel}: not written by the merge (its plan has no such file), and transformers, the "
                        "tokenizer or load_optimizer_state_dict may read it; remove it")
    else:  # another tool's folder may hold files of its own (save_pretrained's generation_config.json): told of
        extra = [rel for rel in foreign_loaded_files(out, planned)
                 if not rel.endswith((".safetensors", ".safetensors.index.json"))]  # compared wherever they are
        if extra:
            report.notes.append(f"{len(extra)} files the checkpoint gives nothing for are not compared, and "
                                f"transformers, the tokenizer or peft may read them: {', '.join(extra[:4])}"
                                f"{', ...' if len(extra) > 4 else ''}")
    if (out / ADAPTER_CONFIG).is_file() and ADAPTER_CONFIG not in merge_plan.small and (out / "config.json").is_file():
        report.fail(f"{ADAPTER_CONFIG}: beside config.json it makes transformers load this folder as a peft adapter of "
                    "the base model it names, not as these weights; remove it")
    card = "README.md"
    if (out / card).is_file() and card not in merge_plan.small:
        report.notes.append(f"{card}: a model card (push writes one) is not made again from the checkpoint"
                            + ("; checked against the manifest's checksum only" if card in listed else ""))


CONFIG_FILES = ("config.json", "generation_config.json")  # what the model is and how it generates: never a note
# what peft builds an adapter from: another writer's other keys (its version, new defaults) are notes
ADAPTER_KEYS = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "target_modules",
                "rank_pattern", "alpha_pattern", "bias", "modules_to_save", "layers_to_transform", "layers_pattern",
                "exclude_modules", "layer_replication", "target_parameters", "trainable_token_indices", "lora_bias")
# peft's defaults for the keys above that the merge does not write: absent is the default
ADAPTER_DEFAULTS = {"lora_bias": False}
# What save_pretrained adds or spells its own way; the dtype is the tensors' own (compared one by one).
WRITER_KEYS = ("transformers_version", "_name_or_path", *DTYPE_KEYS)


def _named_dtype(config: bytes) -> str | None:
    """The floating dtype a config.json names for its weights (dtype, else torch_dtype), or None."""
    try:
        data = jsonfile.loads(config)
    except ValueError:
        return None
    value = next((data[k] for k in DTYPE_KEYS if isinstance(data, dict) and isinstance(data.get(k), str)), None)
    name = value.removeprefix("torch.") if value is not None else None
    return name if name in {d.name for d in dtypes.FULL_PRECISION} else None


def _same_data(got: bytes, want: bytes, *, strict: bool, keys: tuple[str, ...] | None = None) -> bool:
    """Whether two JSON files hold the same data (a config as another writer formats it). `strict` (a config) leaves
    out only what the writer adds (WRITER_KEYS) and keeps every other key, defaults included; `keys` compares those
    keys alone."""
    try:
        a, b = jsonfile.loads(got), jsonfile.loads(want)
    except ValueError:
        return False
    if keys is not None:
        return isinstance(a, dict) and isinstance(b, dict) and all(
            a.get(k, ADAPTER_DEFAULTS.get(k)) == b.get(k, ADAPTER_DEFAULTS.get(k)) for k in keys)
    if strict and isinstance(a, dict) and isinstance(b, dict):
        a, b = ({k: v for k, v in d.items() if k not in WRITER_KEYS} for d in (a, b))
    return bool(a == b)


def _as_critic(got: bytes, merge_plan: MergePlan) -> bytes | None:
    """config.json as the merge writes it for a critic saved with its base model's config: the same config with
    its value-head class (architecture.critic_config), the class read from the written file."""
    try:
        cls = jsonfile.loads(got.decode())["architectures"][0]
    except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        return None
    if not (isinstance(cls, str) and cls.endswith("ForTokenClassification")) or merge_plan.config is None:
        return None
    archs = merge_plan.config.get("architectures")
    if isinstance(archs, list) and archs and str(archs[0]).endswith("ForTokenClassification"):
        return None  # the checkpoint's config names its token classifier already: the merge writes it as it is
    if cls != _token_classifier(merge_plan.config.get("model_type"), cls):
        return None  # the merge writes the class transformers' AutoModelForTokenClassification builds, no other
    weights = merge_plan.weights
    head = [t for n, t in weights.tensors.items() if n.rsplit(".", 1)[0].endswith("score") and n.endswith(".weight")]
    if "lm_head.weight" in {*weights.tensors, *weights.dropped} or not any(t.shape[:1] == (1,) for t in head):
        return None  # the weights have no one-label value head: a critic's config is not theirs
    return dataclasses.replace(merge_plan, config=critic_config(merge_plan.config, cls)).contents("config.json")


def _token_classifier(model_type: object, default: str) -> str:
    """The class AutoModelForTokenClassification builds for a model type (its name, from transformers' table), which
    the merge names in a critic's config.json; `default` where transformers is not installed or has none."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES as names
    except ImportError:
        return default
    found = names.get(model_type) if isinstance(model_type, str) else None
    return found if isinstance(found, str) else default


# what an optimizer export's index records as data besides its tensors (load_optimizer_state_dict reads them)
OPTIMIZER_DATA = ("param_groups", "state_values", "megatron_param_groups")


def check_optimizer_groups(out: Path, p: Plan, report: VerifyReport) -> None:
    """Without a manifest: the optimizer export's param groups (lr, betas, weight_decay, ... and the parameters each
    group holds) and its non-tensor state, as data, against the checkpoint's. A comparison tensor by tensor does not
    see them, and a resumed run would take them as trained."""
    from ..optimizer import OPTIMIZER_INDEX

    index, pt = out / OPTIMIZER_DIR / OPTIMIZER_INDEX, out / OPTIMIZER_DIR / OPTIMIZER_PT
    rel = f"{OPTIMIZER_DIR}/{OPTIMIZER_INDEX}"
    want = {k: jsonfile.loads(p.index_metadata[k]) for k in OPTIMIZER_DATA if k in p.index_metadata}
    if index.is_file():
        try:
            meta = jsonfile.loads(index.read_text()).get("metadata")
            got = {k: jsonfile.loads(meta[k]) for k in OPTIMIZER_DATA if k in meta}
        except (ValueError, UnicodeDecodeError, OSError, AttributeError, TypeError) as e:
            report.fail(f"{rel}: its metadata cannot be read as an optimizer export's "
                        f"({(str(e).splitlines() or [''])[0][:120]})")
            return
    elif pt.is_file() and "param_groups" in want:
        from ..optimizer.export import nest

        rel = f"{OPTIMIZER_DIR}/{OPTIMIZER_PT}"
        try:
            got = {"param_groups": torch_load(pt, map_location="cpu", mmap=True, weights_only=True)["param_groups"]}
        except Exception as e:  # noqa: BLE001  (torch's reader refuses a damaged file in many ways)
            report.fail(f"{rel}: torch.load cannot read its param groups ({(str(e).splitlines() or [''])[0][:120]})")
            return
        want = {"param_groups": nest({}, want["param_groups"])["param_groups"]}  # as the writer nests them
    else:
        return
    for key in sorted(set(want) | set(got)):
        a, b = got.get(key), want.get(key)
        try:
            why = _first_group_difference(a, b) if _canonical(a) != _canonical(b) else None
        except RecursionError:  # read from a pickle, which can nest lists deeper than Python recurses
            why = "they nest deeper than the checkpoint's"
        if why is not None:
            report.fail(f"{rel}: {key} differ from the checkpoint's ({why}); rerun the merge to write them again")
        else:
            report.files_checked.add(rel)


def _canonical(v: object) -> str:
    """JSON text to compare by (tuples as lists, NaN equal to NaN, keys in order)."""
    return json.dumps(v, sort_keys=True, default=repr)


def _first_group_difference(got: object, want: object) -> str:
    if got is None or want is None:
        return "none in the folder" if got is None else "the checkpoint has none"
    if not isinstance(got, (list, tuple)) or not isinstance(want, (list, tuple)) or len(got) != len(want):
        n = len(got) if isinstance(got, (list, tuple)) else type(got).__name__
        return f"{n} groups, the checkpoint gives {len(want) if isinstance(want, (list, tuple)) else want!r}"
    for i, (g, w) in enumerate(zip(got, want)):
        if isinstance(g, dict) and isinstance(w, dict):
            for k in [*w, *(k for k in g if k not in w)]:
                if _canonical(g.get(k)) != _canonical(w.get(k)):
                    return (f"group {i}: {k!r} is {_brief(g[k]) if k in g else 'missing'}, the checkpoint gives "
                            f"{_brief(w[k]) if k in w else 'none'}")
        elif _canonical(g) != _canonical(w):
            return f"entry {i} is {_brief(g)}, the checkpoint gives {_brief(w)}"
    return "written differently"


def _first_difference(got: bytes, want: bytes) -> str:
    """Where a small file differs: the first key of a JSON object whose value differs, else the first byte."""
    try:
        a, b = jsonfile.loads(got.decode()), jsonfile.loads(want.decode())
    except (ValueError, UnicodeDecodeError):
        a = b = None
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(b) + [k for k in a if k not in b]:
            if key not in a:
                return f"no {key!r}, the checkpoint gives {_brief(b[key])}"
            if key not in b:
                return f"{key!r} is {_brief(a[key])}, the checkpoint gives none"
            if a[key] != b[key]:
                return f"{key!r} is {_brief(a[key])}, the checkpoint gives {_brief(b[key])}"
        return "the same JSON, written differently"
    at = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
    return f"{len(got)} bytes, the checkpoint gives {len(want)}; first difference at byte {at}"


def _brief(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
