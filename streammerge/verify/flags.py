"""Which merge verify plans again to compare the folder with: the options its manifest records, else what the
folder shows (its weights' dtypes, whether it holds an optimizer export). verify's own flags (--lora, --base-model,
--model-name, ...) stand in for a manifest where there is none, and must agree with it where there is."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from .. import dtypes
from ..dtypes import DType
from ..optimizer import OPTIMIZER_DIR
from ..options import MergeOptions
from ..sources import Source
from ..write.safetensors_format import CODE_DTYPES, read_header
from .report import VerifyReport

if TYPE_CHECKING:
    from ..pipeline import MergePlan

MERGE_FIELDS = {f.name for f in dataclasses.fields(MergeOptions)} - set(MergeOptions.RUNTIME)


def recorded_options(recorded: dict | None, *, trust_pickle: bool, folder: dict | None = None) -> MergeOptions:
    """The options the merge ran with, as its manifest records them; without one, what the folder shows (`folder`,
    see `folder_options`) over the defaults, keeping dtypes."""
    fields = {k: v for k, v in (recorded or {}).items() if k in MERGE_FIELDS}
    if not recorded:
        fields = {"dtype": "keep", **(folder or {})}
    fields.setdefault("float32_names", ())  # never asked again: a merge records the names it kept in float32
    return MergeOptions.create(**{**fields, "trust_pickle": trust_pickle})


def folder_options(out: Path) -> tuple[dict, str]:
    """Without a manifest (a folder another tool wrote, or one whose .streammerge/ was removed): the options a merge
    into this folder had, as far as the folder shows them: the one floating-point dtype of its weights, and whether
    it holds an optimizer export. Returns them with the words for the report's note."""
    by_dtype: dict[DType, list[str]] = {}
    for path in sorted(out.glob("*.safetensors")):
        try:
            raw, _ = read_header(str(path))
        except (ValueError, OSError):
            continue  # the header check reports it
        for name, e in raw.items() if isinstance(raw, dict) else ():
            d = CODE_DTYPES.get(str(e.get("dtype"))) if name != "__metadata__" and isinstance(e, dict) else None
            if d is not None and d.is_floating_point:
                by_dtype.setdefault(d, []).append(name)
    floats = set(by_dtype)
    fields: dict = {"optimizer": (out / OPTIMIZER_DIR).is_dir()}
    words = [] if fields["optimizer"] else [f"without {OPTIMIZER_DIR}/ (the folder has none)"]
    half = floats - {dtypes.float32}
    if len(floats) == 2 and dtypes.float32 in floats and half <= {dtypes.bfloat16, dtypes.float16}:
        # a half-precision merge that kept what transformers keeps in float32 (pipeline.keep_float32)
        fields["dtype"] = next(iter(half)).name
        fields["float32_names"] = by_dtype[dtypes.float32]
        words.insert(0, f"cast to {fields['dtype']} but for the {len(by_dtype[dtypes.float32])} tensors it holds in "
                        "float32")
    elif len(floats) == 1:
        fields["dtype"] = next(iter(floats)).name
        words.insert(0, f"cast to {fields['dtype']} (its weights' one floating-point dtype)")
    else:
        words.insert(0, "dtypes as saved")
    return fields, "compared as a merge " + ", ".join(words) + ", tensor by tensor wherever the folder holds them"


def with_flags(options: MergeOptions, given: dict, manifest: dict | None, report: VerifyReport) -> MergeOptions:
    """verify's --lora/--lora-rank/--lora-alpha/--lora-rslora/--base-model/--model-name/--key-prefix: the options
    of a folder without a manifest; with one, they must be what it records (the merge's own). A LoRA flag the merge
    ran without is held to what the checkpoint's files gave it, once the plan says
    (`check_flags_the_merge_ran_without`)."""
    if not given:
        return options
    if manifest is None:
        return options.replace(**given)
    for key, value in given.items():
        ran = getattr(options, key)
        flag = "--" + key.replace("_", "-")
        if key == "key_prefix" and ran is not None:  # "model" and "model." name one container
            ran, value = ran.rstrip("."), value.rstrip(".")
        if ran is not None and ((ran != value) if isinstance(value, str) else (float(ran) != float(value))):
            report.fail(f"{flag} {value}: the merge ran with {flag} {ran} (.streammerge/manifest.json); the folder is "
                        "checked as it was made: leave the flag out, or merge again with it")
        elif ran is None and key in _NOT_LORA:
            report.fail(f"{flag} {value}: the merge ran without it (.streammerge/manifest.json); the folder is checked "
                        "as it was made: leave the flag out, or merge again with it")
    return options


_NOT_LORA = ("model_name", "key_prefix")  # verify's flags for what any checkpoint's merge may have been given


_PLANNED = {"lora_rank": "r", "lora_alpha": "alpha", "lora_rslora": "rslora"}  # a flag -> the plan's LoRA setting


def check_flags_the_merge_ran_without(ck: Source, options: MergeOptions, given: dict, plan: MergePlan,
                                      report: VerifyReport) -> None:
    """A LoRA flag for a checkpoint without an adapter is refused as the merge refuses it; one the merge ran without
    must equal what the checkpoint's files gave (lora_train_meta.json, adapter_config.json)."""
    from ..pipeline import refuse_lora_options

    given = {k: v for k, v in given.items() if k not in _NOT_LORA}
    if not given:
        return
    if plan.lora is None:
        refuse_lora_options(ck, options.replace(**given))
        return
    for key, value in given.items():
        if getattr(options, key) is not None:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "base_model":
            report.notes.append(f"{flag} {value}: not used; the checkpoint holds its own base weights, which the "
                                "merge folded onto")
            continue
        used = plan.lora.get(_PLANNED[key])
        if used is None or (float(used) != float(value)):
            report.fail(f"{flag} {value}: the merge used {used} (from the checkpoint's files); the folder is checked "
                        "as it was made: leave the flag out")
        else:
            report.notes.append(f"{flag} {value}: as the checkpoint's files give it (the merge took it from there)")
