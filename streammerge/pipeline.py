"""The pipeline in one place: find the checkpoint -> read its metadata -> plan -> write. The CLI calls this.

`plan_merge` decides everything from metadata (the source, the model folder, the output dtype, the
weights, optimizer and adapter plans, the resume fingerprint) and returns plain data that
`inspect` prints, `verify` replays and torchrun splits; `merge` executes it inside an output-folder
transaction. A plain model merge never imports torch.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import architecture, dtypes
from .architecture import ArchCheck
from .dtypes import DType
from .errors import CheckpointError, ConfigError, UnsupportedLayoutError
from .model_folder import (
    GENERATION_CONFIG,
    carried_files,
    check_config_fits,
    config_bytes,
    config_differences,
    drop_quantization,
    legacy_buffers,
    model_dir_for,
    model_files,
    read_config,
    read_generation_config,
    ties_embeddings,
)
from .options import DEFAULT_BUFFER_SIZE, MergeOptions, resolve_dtype
from .paths import user_path
from .plan import OUTPUT_EMBEDDINGS, FilePlan, Plan, TensorPlan, build_plan, copy_plans, fmt_bytes, tied_duplicates
from .sources import Source, open_checkpoint
from .write.manifest import Manifest
from .write.transaction import OutputFolder, check_out_dir, index_bytes
from .write.writer import FileWriter, OutputFile, in_flight, piece_ranges

FINGERPRINT_VERSION = 2
MODEL_CONFIG_FILES = ("config.json", GENERATION_CONFIG)  # what makes a folder load as a model
FileCallback = Callable[[OutputFile, Path], None]


@dataclass
class MergePlan:
    """Everything a merge writes, decided from metadata alone: the plans and the small files."""

    source: Source
    options: MergeOptions
    dtype: DType | None  # the output dtype of floating tensors (None: as saved)
    config: dict | None  # config.json as read (written with `dtype`)
    model_dir: Path | None  # where config and tokenizer come from
    plans: list[Plan]  # the weights first, then the optimizer and the LoRA adapter when there are
    small: dict[str, Path | None] = field(default_factory=dict)  # rel path -> file to copy (None: generated)
    generated: dict[str, bytes | Callable[[], bytes]] = field(default_factory=dict)  # rel path -> generated contents
    warnings: list[str] = field(default_factory=list)
    lora: dict[str, Any] | None = None  # a LoRA checkpoint's settings (r, alpha, scale, mode, base) for the card
    arch: ArchCheck | None = field(default=None, repr=False)  # transformers' names for config.json (started)
    arch_done: bool = False
    arch_note: str = ""  # what the architecture check found or why it did not run (the summary says it)
    generation: dict | None = None  # generation_config.json as written (transformers is asked whether it reads it)
    buffers: list[str] = field(default_factory=list)  # buffers older transformers saved, left out (legacy_buffers)
    float32: tuple[str, ...] = ()  # written in float32 where `dtype` would round them (keep_float32)
    dtypes_pending: bool = False  # whether several kept dtypes are warned of waits for the check (several_dtypes)
    no_card: bool = False  # pushed without a model card: an earlier push's card in OUT goes, as on the Hub

    @property
    def weights(self) -> Plan:
        return self.plans[0]

    def kept_dtypes(self) -> set[DType]:
        """The floating dtypes of the weights as written."""
        return {t.dtype for t in self.weights.tensors.values() if t.dtype.is_floating_point}

    def saved_dtype(self) -> DType | None:
        """The one floating dtype the weights keep (config.json must name it, or transformers' dtype "auto"
        loads them cast to the dtype the training config named); None when there are several, or none."""
        kept = self.kept_dtypes()
        return kept.pop() if len(kept) == 1 else None

    def __repr__(self) -> str:
        plans = ", ".join(f"{p.subdir or 'weights'}: {len(p.tensors)} tensors in {len(p.files)} files"
                          for p in self.plans)
        dtype = self.dtype.name if self.dtype else None
        return (f"MergePlan({str(self.source.path)!r}, {self.source.format}, dtype={dtype}, {plans}, "
                f"small files={len(self.small)}, warnings={len(self.warnings)})")

    def add_generated(self, rel: str, data: bytes | Callable[[], bytes]) -> None:
        """A small file made by streammerge (model card, adapter config), written with the rest of the folder; a
        callable makes it then, from the plan as the merge left it (the card names the class of a corrected
        config)."""
        self.generated[rel] = data
        self.small[rel] = None

    def check_architecture(self, *, wait: bool = True) -> None:
        """Before the folder is complete: the model transformers builds from the config.json we write must have
        exactly the weights' names and shapes (architecture.py). Raises ConfigError; a check that cannot run
        (custom code, no transformers) leaves a note (inspect shows it). A critic's config is corrected to its
        value-head class. Without `wait`, only an answer already there is taken: the merge asks before and
        between files, so a child still importing transformers costs no wall time, and waits only at the end."""
        if self.arch_done:
            return
        if self.config is None or not self.weights.tensors or self.model_dir is None:
            self.arch_done = True
            return
        if self.arch is None:
            self.arch, note = architecture.start(self.config, self._where(), self.generation)
            if self.arch is None:
                self.arch_done = True
                if note:
                    self.note_architecture(note)
                return
        if not wait and not self.arch.ready(self._weight_names):
            return
        self.arch_done = True
        try:
            fixed, note = self.arch.check(self._weight_shapes, self._tied_outputs())
        except ConfigError as e:
            hint = self.source.names_hint()
            if hint is None:
                raise
            raise ConfigError(f"{e}; or {hint}") from None
        finally:
            self.arch.close()
        if fixed is not None:
            self.config = fixed
            self.warnings.append(note)
        self.note_architecture(note)
        rules = (self.arch.answer or {}).get("fp32")
        loads_as = architecture.first_loads_as(self.arch.answer)
        self._adapter_loads(loads_as)
        self._float32_differs(rules, loads_as)
        if self.dtypes_pending:
            self.several_dtypes(rules, loads_as)
        if self.config is not None:
            self.arch.remember_written(json.loads(config_bytes(self.config, self.dtype or self.saved_dtype())),
                                       self._weight_names)

    def _adapter_loads(self, loads_as: dict[str, Any]) -> None:
        """An exported adapter names the modules as the checkpoint does; where transformers renames or fuses their
        weights on load (transformers 4 names: Qwen2-VL's `model.layers`, Qwen2-MoE's per-expert layers), the model
        PeftModel.from_pretrained wraps may have no such modules (it loads the adapter inert or on other layers), unless
        peft converts the names itself, which it does for some models (LLaVA, Qwen3-MoE): warned of, not refused."""
        lora = self.lora or {}
        moved = sorted(n for n in lora.get("adapted", ()) if n in loads_as) if lora.get("adapter_dir") else []
        if moved:
            target, fused = loads_as[moved[0]][:2]
            more = f" (and {len(moved) - 1} more adapted weights)" if len(moved) > 1 else ""
            self.warnings.append(
                f"{moved[0]}{more}: transformers {'fuses it into' if fused else 'loads it as'} {target} on load, and "
                "the exported adapter (lora_adapter/) names the checkpoint's modules: peft finds them only where it "
                "converts such names itself (it does for some models, not for others), so check that the adapter "
                "loads as trained, or use the folded weights, which do")

    def several_dtypes(self, rules: Any, loads_as: dict[str, Any] | None = None) -> None:
        """Weights kept (`--dtype keep`) in several floating dtypes are warned of: transformers loads them all as
        one. Not where config.json names the one half dtype and the float32 ones are just those transformers keeps
        in float32 beside it (`rules`: `float32_rules`, e.g. a bfloat16 model's float32 router; matched as the
        names load, `loads_as`)."""
        self.dtypes_pending = False
        kept = sorted(d.name for d in self.kept_dtypes())
        if self.config is None or self.dtype is not None or len(kept) < 2:
            return
        named = resolve_dtype("auto", self.config)
        half = named.name if named is not None and named != dtypes.float32 else None
        if isinstance(rules, dict) and half is not None and kept == sorted((half, "float32")):
            wide = {n for n, t in self.weights.tensors.items() if t.dtype == dtypes.float32}
            if architecture.kept_in_float32(wide, rules, half, loads_as) == wide:
                return
        self.warnings.append(f"the weights keep several floating dtypes ({', '.join(kept)}): transformers loads them "
                             "all as the one its dtype option or config.json names; give --dtype to write one")

    def _float32_differs(self, rules: Any, loads_as: dict[str, Any] | None = None) -> None:
        """A plan made without transformers' float32 rules (its code did not seem to name any), or without the names
        as transformers loads them (`loads_as`: its rules match those; the plan could not wait for them), that the
        answer contradicts: warned of, since transformers loads the weights either way (rounded ones upcast)."""
        if not isinstance(rules, dict) or self.dtype is None or self.options.float32_names is not None:
            return
        wide = (dtypes.float32, dtypes.float64)
        candidates = {n for n, t in self.weights.tensors.items() if t.source_dtype in wide and t.dtype == self.dtype}
        candidates |= set(self.float32)
        wanted = architecture.kept_in_float32(candidates, rules, self.dtype.name, loads_as)
        missed, extra = sorted(wanted - set(self.float32)), sorted(set(self.float32) - wanted)
        if missed:
            more = ", ..." if len(missed) > 1 else ""
            self.warnings.append(f"transformers keeps {len(missed)} of these tensors in float32 when it loads the "
                                 f"model in {self.dtype.name} ({missed[0]}{more}), and this merge wrote them as "
                                 f"{self.dtype.name} (loaded upcast, their values rounded): merge again into a new "
                                 "folder to write them in float32 (transformers' answer is cached)")
        if extra:
            self.warnings.append(f"{len(extra)} tensors were written in float32 ({extra[0]}"
                                 f"{', ...' if len(extra) > 1 else ''}) that transformers would load in "
                                 f"{self.dtype.name}: their values are the trained ones, unrounded")

    def _tied_outputs(self) -> dict[str, str]:
        """Output embeddings left out as tied by config.json (name -> the input embedding written)."""
        if not ties_embeddings(self.config):
            return {}
        return {name: kept for name, kept in self.weights.dropped.items() if name.endswith(OUTPUT_EMBEDDINGS)}

    @functools.cached_property
    def _weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The weights' shapes by name, in the plan's order, made once: the merge asks the check after every file."""
        return {n: t.shape for n, t in self.weights.tensors.items()}

    @functools.cached_property
    def _weight_names(self) -> list[str]:
        return sorted(self._weight_shapes)

    def note_architecture(self, note: str) -> None:
        self.arch_note = note
        if note not in self.warnings:
            self.weights.notes.append(note)

    def _where(self) -> str:
        return str(self.model_dir / "config.json") if self.model_dir is not None else str(self.source.path)

    def plan(self, subdir: str) -> Plan | None:
        return next((p for p in self.plans if p.subdir == subdir), None)

    @property
    def indexes(self) -> list[str]:
        return [p.rel(p.index_filename) for p in self.plans if p.index_filename]

    def record(self) -> dict[str, Any]:
        """The options as the manifest records them (what verify re-plans with)."""
        kept = {"float32_names": list(self.float32)} if self.float32 else {}
        return {**self.options.fingerprint_fields(), "resolved_dtype": self.dtype.name if self.dtype else None,
                "subdirs": [p.subdir for p in self.plans], **kept}

    def fingerprint(self) -> str:
        """Identifies this merge: a resumed run must match it, and verify checks it. Versioned."""
        h = hashlib.sha256(f"streammerge merge v{FINGERPRINT_VERSION}".encode())
        h.update(json.dumps(self.record(), sort_keys=True, default=str).encode())
        for p in self.plans:
            h.update(p.fingerprint().encode())
        return h.hexdigest()

    def contents(self, rel: str) -> bytes:
        """The bytes of a small file (config, tokenizer, generated files, indexes)."""
        if rel in self.generated:
            data = self.generated[rel]
            return data() if callable(data) else data
        for p in self.plans:
            if p.index_filename and p.rel(p.index_filename) == rel:
                return index_bytes(p.index_json())
        src = self.small[rel]
        if rel == "config.json" and self.config is not None:
            return config_bytes(self.config, self.dtype or self.saved_dtype())
        assert src is not None
        return src.read_bytes()

    def describe(self, max_rows: int | None = None) -> str:
        parts = [p.describe(max_rows) for p in self.plans]
        text = "\n\n".join(parts)
        if self.warnings:
            text += "\n\n" + "\n".join(f"warning: {w}" for w in self.warnings)
        return text

    def to_json(self) -> dict:
        return {"checkpoint": str(self.source.path), "format": self.source.format, "step": self.source.step,
                "info": self.source.info(), "read": self.source.stats.describe(),
                "dtype": self.dtype.name if self.dtype else None, "plans": [p.to_json() for p in self.plans],
                "small_files": sorted(self.small), "warnings": self.warnings}


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Millions of small acyclic records: the cyclic GC would rescan them over and over."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _refuse_quantized(weights: Plan, where: str) -> None:
    """Weights that are stored quantized (integer or 8-bit float tensors, scales) need the quantization_config that
    is left out for full-precision ones: such a checkpoint is not merged."""
    for t in weights.tensors.values():
        if t.dtype not in dtypes.FULL_PRECISION or "scale" in t.name.rsplit(".", 1)[-1]:
            raise UnsupportedLayoutError(f"{where}: config.json has a quantization_config and the weights are stored "
                                         f"quantized ({t.name} is {t.dtype.name}): quantized checkpoints are not "
                                         "merged")


def absolute_folders(options: MergeOptions) -> MergeOptions:
    """A --model-name or --base-model given as a relative folder, made absolute: the manifest records the options,
    and verify (or a resume) run from another folder must find the same one."""
    changes = {}
    for key in ("model_name", "base_model"):
        value = getattr(options, key)
        if value and not os.path.isabs(value) and user_path(value).is_dir():
            changes[key] = os.path.abspath(user_path(value))
    return options.replace(**changes) if changes else options


def _config_from_base(options: MergeOptions, source: Source) -> tuple[MergeOptions, str | None]:
    """--base-model stands in for --model-name where the checkpoint has no config.json (the HF Trainer's checkpoint
    of a peft model): the base model's config and tokenizer are the folded model's, as for peft's own merge. Else a
    folder the source names beside it (the HF Trainer's checkpoint-N/ around a DeepSpeed save). Recorded as
    --model-name, so that verify and a resume read the same folder; returns whose config it is, for inspect."""
    if options.model_name or options.weights_only or read_config(source.hf_dir) is not None:
        return options, None
    if options.base_model:
        return options.replace(model_name=options.base_model), "--base-model's: the checkpoint has no config.json"
    beside = source.trainer_folder()
    if beside is None or not (beside / "config.json").is_file():
        return options, None
    return options.replace(model_name=str(beside)), "the folder around the checkpoint: its config and tokenizer only"


def _model_name_differs(model_name: str, config: dict, source: Source) -> list[str]:
    """A warning where --model-name's config.json says other than the one the checkpoint was saved with (its
    huggingface/ folder): the weights were trained as the checkpoint's config describes, and config.json is written
    from --model-name's."""
    own_dir = source.hf_dir
    try:
        own = read_config(own_dir)
    except CheckpointError:
        own = None  # not a JSON object: what --model-name is for
    if own is None or own_dir is None:
        return []
    found = config_differences(config, own)
    if not found:
        return []
    more = f", and {len(found) - 5} more" if len(found) > 5 else ""
    return [f"--model-name {model_name}: its config.json differs from the one saved with the checkpoint "
            f"({own_dir / 'config.json'}) in {', '.join(found[:5])}{more} (--model-name's value first); config.json is "
            "written from --model-name's, while the weights were trained as the checkpoint's describes: leave "
            "--model-name out to write the checkpoint's own"]


def plan_merge(checkpoint: str | Path | Source, options: MergeOptions | None = None, *, token: str | None = None,
               endpoint: str | None = None, check_architecture: bool = True, **kwargs: Any) -> MergePlan:
    """Plan a merge from metadata alone: nothing is written, no tensor data is read.

    `token` and `endpoint` reach the Hub for a `model_name` given as a Hub model (never recorded).
    `check_architecture` starts asking transformers which tensors config.json describes, beside reading the
    checkpoint's metadata (`merge` waits for the answer before writing; inspect and verify do not ask).
    """
    options = absolute_folders(MergeOptions.create(options, **kwargs))
    source = checkpoint if isinstance(checkpoint, Source) else open_checkpoint(checkpoint)
    options, from_base = _config_from_base(options, source)
    model_dir: Path | None
    if options.model_name:
        model_dir, root = model_dir_for(options.model_name, token=token, endpoint=endpoint)
        model_paths = list(model_files(model_dir, root))
    else:
        model_dir, root = source.hf_dir, source.root
        model_paths = list(carried_files(model_dir, root))
    config = read_config(model_dir)
    generation = read_generation_config(model_dir) if model_dir is not None and \
        model_dir / GENERATION_CONFIG in model_paths else None
    dtype = resolve_dtype(options.dtype, config)
    warnings: list[str] = []
    if options.model_name and config is not None:
        warnings += _model_name_differs(options.model_name, config, source)
    quantized = drop_quantization(config) if config is not None else []
    for key, value in quantized:
        method = value.get("quant_method") if isinstance(value, dict) else None
        warnings.append(f"config.json's {key} ({method or 'no quant_method'}) is left out: the merged weights are the "
                        "trained ones, unquantized, and transformers would load them as quantized layers with scales "
                        "it never finds")
    arch, arch_note = (None, None)
    if check_architecture and model_dir is not None:
        arch, arch_note = architecture.start(config, str(model_dir / "config.json"), generation)
    try:
        merge_plan = _plan_merge(source, options, model_dir, model_paths, config, dtype, warnings, token, endpoint,
                                 arch, generation)
        if quantized:
            _refuse_quantized(merge_plan.weights, str(model_dir / "config.json") if model_dir else str(source.path))
    except BaseException:
        if arch is not None:
            arch.close()
        raise
    if from_base:
        merge_plan.weights.notes.append(f"config      {model_dir} ({from_base})")
    merge_plan.arch = arch
    merge_plan.generation = generation
    if arch is None and arch_note:
        merge_plan.note_architecture(arch_note)
        merge_plan.arch_done = True
    return merge_plan


def keep_float32(tensors: list[TensorPlan], options: MergeOptions, dtype: DType | None, config: dict | None,
                 arch: ArchCheck | None, generation: dict | None) -> tuple[list[TensorPlan], tuple[str, ...], str]:
    """The tensors transformers keeps in float32 when it loads the model in half precision (the routers' gates and
    score biases of DeepSeek-V3 or GLM-4.5, say) are written in float32, as save_pretrained writes them, where
    `dtype` would round them: `options.float32_names` (what a merge recorded, for verify), else transformers' rules
    for the config's class (asked by the check, else cached), matched to the names as transformers loads them
    (renamed from a checkpoint's original spellings: the check's `loads_as`, asked of it where the rules keep any
    name in float32, else cached). Returns the tensors, the names kept so, and a note."""
    half = [t for t in tensors if t.dtype in (dtypes.bfloat16, dtypes.float16)
            and t.source_dtype in (dtypes.float32, dtypes.float64) and t.dtype == dtype]
    if not half or dtype is None:
        return tensors, (), ""
    # a tied output embedding is the input embedding's tensor in transformers, in that tensor's dtype (not written)
    tied = tied_duplicates({t.name: t for t in tensors}, ties_embeddings(config))
    if options.float32_names is not None:
        keep = set(options.float32_names)
    else:
        rules = arch.float32(dtype.name) if arch is not None else \
            architecture.cached_float32(config, generation) if config is not None else None
        keep = set()
        if rules and architecture.float32_patterns(rules, dtype.name):
            # the names as transformers loads them. The check is given, and its answer cached by, the names of the
            # weights' plan (`MergePlan._weight_names`): these but for the tied duplicates `build_plan` drops, which
            # keep_float32 leaves as they are (a duplicate is kept in float32 with what it duplicates), so
            # `planned` is that list; the child is given all (a name loads as it does whatever else is asked)
            names = sorted({t.name for t in tensors})
            planned = [n for n in names if n not in tied]
            loads_as = arch.loads_as(names, planned) if arch is not None else \
                architecture.cached_loads_as(config, generation, planned) if config is not None else None
            keep = architecture.kept_in_float32((t.name for t in half), rules, dtype.name, loads_as)
        if rules is None and arch is None and config is not None and architecture.names_float32(config, dtype.name):
            return tensors, (), (f"float32     transformers may keep some of these in float32 when it loads the model "
                                 f"in {dtype.name}; a merge asks it, and writes those in float32")
    if not keep:
        return tensors, (), ""
    kept = sorted(t.name for t in half if tied.get(t.name, t.name) in keep)
    if not kept:
        return tensors, (), ""
    note = (f"float32     {len(kept)} tensors written in float32, not {dtype.name}: transformers keeps them in float32 "
            f"({kept[0]}{', ...' if len(kept) > 1 else ''})")
    return [replace(t, dtype=dtypes.float32) if t.name in kept else t for t in tensors], tuple(kept), note


def refuse_lora_options(source: Source, options: MergeOptions) -> None:
    """A LoRA flag on a checkpoint without an adapter would change nothing: the user expects another checkpoint."""
    given = [flag for flag, value in (("--lora " + options.lora, options.lora != "both"),
                                      ("--lora-rank", options.lora_rank is not None),
                                      ("--lora-alpha", options.lora_alpha is not None),
                                      ("--lora-rslora", options.lora_rslora is not None),
                                      ("--base-model", options.base_model is not None)) if value]
    if given:
        raise ConfigError(f"{given[0]}: {source.path} holds no LoRA adapter (no lora_A/lora_B tensors), so there is "
                          "nothing for it to change; leave it out")


def _plan_merge(source: Source, options: MergeOptions, model_dir: Path | None, model_paths: list[Path],
                config: dict | None, dtype: DType | None, warnings: list[str], token: str | None,
                endpoint: str | None, arch: ArchCheck | None = None,
                generation: dict | None = None) -> MergePlan:
    source.use_model(config, model_dir)
    if options.key_prefix is not None and not source.takes_key_prefix:
        raise ConfigError(f"--key-prefix {options.key_prefix!r}: {source.path} is a {source.format} checkpoint, "
                          "whose tensors need no prefix to be picked out (it is for torch DCP); leave it out")
    with gc_paused():
        tensors = source.tensors(options)
        if options.weights_only and config is not None and model_dir is not None:  # after what the source refuses
            raise ConfigError(f"--weights-only: {model_dir / 'config.json'} describes these weights, and the folder "
                              "gets it so that transformers loads it as the model (--weights-only is for a checkpoint "
                              "without one); leave --weights-only out")
        warnings += source.warnings(options)
        from .sources import lora

        generated: dict[str, bytes | Callable[[], bytes]] = {}
        lora_info = None
        # peft's adapter_config.json beside config.json would make transformers load OUT as an adapter (of the
        # base it names); a LoRA adapter's own config is written in lora_adapter/
        adapter_config = [p for p in model_paths if p.name == lora.ADAPTER_CONFIG and p.parent == model_dir]
        model_paths = [p for p in model_paths if p not in adapter_config]
        if lora.is_peft(tensors):
            planned = lora.plan_lora(source, tensors, options, config, dtype, token=token, endpoint=endpoint)
            weights_tensors, extra, notes = planned.weights, planned.plans, planned.notes
            generated.update(planned.generated)
            warnings += planned.warnings
            lora_info = planned.info
        else:
            refuse_lora_options(source, options)
            weights_tensors, extra, notes = copy_plans(tensors.values(), dtype), [], []
            warnings += [f"{p}: not copied: the checkpoint holds no LoRA adapter, and beside config.json it would make "
                         "transformers load OUT as a peft adapter" for p in adapter_config]
        buffers = set(legacy_buffers(config, {t.name: t.shape for t in weights_tensors}))
        if buffers:
            weights_tensors = [t for t in weights_tensors if t.name not in buffers]
            example = sorted(buffers)[0]
            warnings.append(f"{len(buffers)} buffers older transformers saved with the weights ({example}"
                            f"{', ...' if len(buffers) > 1 else ''}) are not written, as save_pretrained does not "
                            "write them: transformers computes them from config.json and never reads them from a "
                            "checkpoint")
        weights_tensors, float32, note = keep_float32(weights_tensors, options, dtype, config, arch, generation)
        notes = [*notes, note] if note else notes
        where = str(model_dir / "config.json") if model_dir is not None else str(source.path)
        check_config_fits(config, {t.name: t.shape for t in weights_tensors}, where)
        weights = build_plan(weights_tensors, max_shard_size=options.max_shard_size,
                             tie_embeddings=ties_embeddings(config), source=source, notes=notes)
        if lora_info is not None and not weights_tensors:
            # just the adapter: a config.json beside no weights would load as a randomly initialised model
            weights = replace(weights, files=(), index_filename=None)
            model_paths = [p for p in model_paths if p.name not in MODEL_CONFIG_FILES]
            warnings.append("only the LoRA adapter is written (lora_adapter/): the checkpoint holds no base weights "
                            "and no --base-model was given, so there is no model and no config.json at the top")
    if config is None:
        warnings.append(f"{source.path}: no config.json (and no --model-name): the output holds weights that "
                        "transformers cannot load on their own")
    plans = [weights, *extra]
    exports = options.optimizer and source.has_optimizer()
    if exports:
        opt_plan, opt_warnings = source.optimizer_plan(weights, options, config, model_dir)
        warnings += opt_warnings
        if opt_plan is not None:
            plans.insert(1, opt_plan)
    if options.optimizer_format != "safetensors" and not exports:
        why = "--no-optimizer was given" if not options.optimizer else f"{source.path} holds no optimizer state"
        raise ConfigError(f"--optimizer-format {options.optimizer_format}: no optimizer is exported ({why}), so there "
                          "is nothing for it to change; leave it out")
    small: dict[str, Path | None] = {}
    if model_dir is not None:
        for p in model_paths:
            small[p.relative_to(model_dir).as_posix()] = p
    merge_plan = MergePlan(source, options, dtype, config, model_dir, plans, small, warnings=warnings, lora=lora_info,
                           buffers=sorted(buffers), float32=float32)
    if config is not None and dtype is None and len(merge_plan.kept_dtypes()) > 1:
        rules = architecture.cached_float32(config, generation)
        if rules is None and arch is not None:
            merge_plan.dtypes_pending = True  # the check's answer holds the float32 rules
        else:
            merge_plan.several_dtypes(rules)
    for rel, data in generated.items():
        merge_plan.add_generated(rel, data)
    return merge_plan


# ---------------------------------------------------------------- executing a plan

@dataclass(repr=False)
class MergeResult:
    out_dir: Path
    files: list[OutputFile]
    plan: MergePlan
    bytes_written: int  # bytes of data files written by this run (reused files and small files excluded)
    bytes_total: int
    seconds: float
    peak_rss: int  # bytes, this process (and its children)
    reused: list[str] = field(default_factory=list)  # files an earlier run left as this one writes them
    warnings: list[str] = field(default_factory=list)
    fell_back: dict[str, str] = field(default_factory=dict)  # writer fast path -> why it was not taken

    @property
    def plans(self) -> list[Plan]:
        return self.plan.plans

    def __repr__(self) -> str:
        return (f"MergeResult({str(self.out_dir)!r}, files={len(self.files)}, reused={len(self.reused)}, "
                f"bytes_written={self.bytes_written}, seconds={self.seconds:.2f}, warnings={len(self.warnings)})")

    def summary(self) -> str:
        """One line: the data files written and reused, the small files (config, tokenizer, indexes), speed, memory.

        Data files are the weight, optimizer and adapter shards; only their bytes count for the speed.
        """
        data = {p.rel(fp.filename) for p in self.plans for fp in p.files}
        reused = [f for f in self.files if f.filename in self.reused and f.filename in data]
        new = [f for f in self.files if f.filename in data and f.filename not in self.reused]
        small = [f for f in self.files if f.filename not in data and f.filename not in self.reused]
        kept = [f for f in self.files if f.filename not in data and f.filename in self.reused]
        wrote = []
        if new:
            wrote.append(f"{_count(len(new), 'data file')} ({fmt_bytes(sum(f.size for f in new))})")
        if small:
            wrote.append(f"{_count(len(small), 'small file')} (config, tokenizer, indexes)")
        earlier = (f"{_count(len(reused), 'data file')} ({fmt_bytes(sum(f.size for f in reused))}) "
                   "finished by an earlier run")
        if kept:
            earlier += f" and {_count(len(kept), 'small file')} (config, tokenizer, indexes) as it left them"
        if reused and not new:
            what = f"nothing left to merge in {self.out_dir}: reused {earlier}"
            what += f" and wrote {' and '.join(wrote)}" if wrote else ""
        else:
            what = f"wrote {' and '.join(wrote) or 'nothing'} to {self.out_dir}"
            what += f" and reused {earlier}," if reused else ""
        speed = f" ({fmt_bytes(int(self.bytes_written / self.seconds))}/s)" if new and self.seconds > 0 else ""
        slow = "; ".join(f"{k} ({v})" for k, v in self.fell_back.items())
        slow = f"; write fell back: {slow}" if slow else ""
        arch = f"; {self.plan.arch_note}" if self.plan.arch_note else ""
        if self.plan.float32:
            arch += f"; {_count(len(self.plan.float32), 'tensor')} kept in float32, as transformers keeps them"
        return (f"{what} in {self.seconds:.2f} s{speed}, peak RSS {self.peak_rss / 2**20:.0f} MiB; "
                f"read {self.plan.source.stats.describe()}{slow}{arch}")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def peak_rss() -> int:
    """Peak resident set size of this process and its finished children, in bytes.

    On Linux this process's own peak is VmHWM: `ru_maxrss` survives exec, so a merge started by a large
    process (a trainer, a benchmark) through vfork would report that process's peak as its own.
    """
    scale = 1 if sys.platform == "darwin" else 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    try:
        with open("/proc/self/status") as f:
            own = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return max(own, kids)


def merge(checkpoint: str | Path | Source | MergePlan, out_dir: str | Path, options: MergeOptions | None = None, *,
          on_file_done: FileCallback | None = None, num_parts: int = 1, part: int = 0,
          sync: Callable[[], None] | None = None, hash_sha256: bool = False, **kwargs: Any) -> MergeResult:
    """Merge a checkpoint into a Hugging Face folder, streaming in bounded memory.

    Options are a `MergeOptions` or keyword arguments (`dtype="bfloat16"`, `max_shard_size="5GB"`,
    ...). Re-running after an interruption reuses the files already finished. `on_file_done` is
    called for each finished file (e.g. to start uploading it while the next one is written).
    `num_parts`/`part` write only this worker's share of the files (torchrun); part 0 also writes
    the small files and the index. `sync` is a barrier across the parts (see distributed.py).
    `hash_sha256` records each data file's sha256 as it is written (a push needs it; resume does not).
    """
    t0 = time.perf_counter()
    out = user_path(out_dir).resolve()
    if isinstance(checkpoint, MergePlan):
        mp = checkpoint
    else:
        source = checkpoint if isinstance(checkpoint, Source) else open_checkpoint(checkpoint)
        if part == 0:  # another part looks once part 0 has set the folder up
            check_out_dir(out, source.path)
        mp = plan_merge(source, options, **kwargs)
    opts = mp.options
    if mp.config is None and not opts.weights_only:
        raise ConfigError(f"{mp.source.path}: no config.json (no huggingface/ folder beside it, no --model-name): "
                          "transformers could not load the output as a model; give the model's config and tokenizer "
                          "with --model-name (a folder or a Hub model), or --weights-only to write the weights alone")
    shares = [(p, fp) for p in mp.plans for fp in p.split(num_parts, part)]
    folds = any(t.fold is not None for p, fp in shares for t in (p.tensors[n] for n in fp.names))
    if folds:
        import_behind("torch")  # folds need torch: its import (seconds) overlaps the first files' copies
    mp.check_architecture(wait=False)  # answered already (in-process, cached): before a byte is written
    _check_ties(mp, shares)
    inputs = _inputs(mp)
    folder = OutputFolder(out, fingerprint=mp.fingerprint(), source=mp.source.path, options=mp.record(),
                          data_files=[p.rel(fp.filename) for p, fp in shares],
                          small_files=sorted(set(mp.small) - set(mp.indexes)), index_files=mp.indexes,
                          all_data_files=[p.rel(fp.filename) for p in mp.plans for fp in p.files],
                          part=part, sync=sync, inputs=inputs, drop_card=mp.no_card)
    files: list[OutputFile] = []
    reused: list[str] = []
    written = planned = 0
    fell_back: dict[str, str] = {}
    bar = _progress_bar(sum(fp.size for _, fp in shares), opts.progress)

    def done(f: OutputFile) -> None:
        files.append(f)
        if on_file_done is not None:
            on_file_done(f, out / f.filename)

    try:
        with folder, FileWriter(workers=opts.workers or default_workers(opts.buffer_size), buffer_size=opts.buffer_size,
                                drop_cache=opts.drop_cache, progress=bar.update if bar else None,
                                sha256=hash_sha256) as writer:
            for p, fp in shares:
                rel = p.rel(fp.filename)
                planned += fp.size
                prior = folder.finished(rel)
                if prior is None:
                    if p.index_filename is None and fp.filename.endswith(".pt"):  # --optimizer-format torch
                        from .write.torch_format import write_torch_file

                        f = write_torch_file(p, fp, out / rel, writer)
                    else:
                        f = writer.write(p, fp, out / rel)
                    written += f.size
                    folder.add(f)
                else:
                    f = prior
                    reused.append(rel)
                if bar:  # the writer counts tensor bytes as they land; headers, a torch file's records: here
                    bar.update(planned - bar.n)
                done(f)
                _check_architecture(mp, folder, wait=False)
            fell_back.update(writer.fallbacks)
            _check_architecture(mp, folder)  # the index and config.json appear only once transformers agreed
            _check_unchanged(mp, inputs)
            folder.finish(mp.contents, done)
    finally:
        if mp.arch is not None:
            mp.arch.close()  # a merge that failed first: the child's answer is no longer wanted
        if bar:
            bar.close()
        if folds:
            from .write import compute

            compute.forget()
    removed = [f"removed {rel}: an earlier run of this merge wrote it, and the checkpoint no longer gives it"
               for rel in folder.removed]
    return MergeResult(out, files, mp, written, sum(f.size for f in files), time.perf_counter() - t0,
                       peak_rss(), reused + folder.kept, list(mp.warnings) + removed, fell_back)


def _check_architecture(mp: MergePlan, folder: OutputFolder, *, wait: bool = True) -> None:
    """A refusal that comes after data files were written (transformers answered late) takes them away again."""
    try:
        mp.check_architecture(wait=wait)
    except ConfigError:
        folder.abandon()
        raise


def _inputs(mp: MergePlan, *, baseline: bool = True) -> dict[str, list[int]]:
    """[size, mtime_ns] of each checkpoint file; the `baseline` a merge must end with is, for a file the caller found
    complete earlier (`Source.seen`), what it found then."""
    try:
        files = [*mp.source.files(), *(mp.source.lora_base.files() if mp.source.lora_base is not None else ())]
        now = Manifest.identify(files)
    except OSError as e:
        raise CheckpointError(f"{mp.source.path}: cannot read a checkpoint file ({e})") from None
    seen = mp.source.seen if baseline else None
    return {k: seen.get(k, v) for k, v in now.items()} if seen else now


def _check_unchanged(mp: MergePlan, before: dict[str, list[int]]) -> None:
    """Before the index says "complete": a checkpoint file rewritten in place while it was merged (saved again at
    the same path) gave some files its old bytes and some its new ones."""
    changed = Manifest.changed(before, _inputs(mp, baseline=False))
    if changed:
        raise CheckpointError(f"{changed[0]} changed while it was merged (saved again?): the output would mix two "
                              "saves; delete the output folder and merge again once the checkpoint is complete")


def _check_ties(mp: MergePlan, shares: list[tuple[Plan, FilePlan]]) -> None:
    """Refuse, before anything is written, an output embedding dropped as tied (the config says so) whose bytes
    differ from the input embedding's: transformers would load the input embedding in its place."""
    mine = {(id(p), n) for p, fp in shares for n in fp.names}
    ties = [(p, name, t) for p in mp.plans for name, t in p.tie_checks.items() if (id(p), p.dropped[name]) in mine]
    if not ties:
        return
    # The kept tensor's pages stay in the page cache for the merge, which reads them next; the dropped one's go.
    with FileWriter(workers=1, buffer_size=mp.options.buffer_size, drop_cache=False) as writer:
        for p, name, t in ties:
            kept = p.dropped[name]
            same = writer.same_bytes(t, p.tensors[kept])
            if mp.options.drop_cache:
                writer.sources.evict(piece_ranges([t]))
            if not same:
                where = mp.model_dir / "config.json" if mp.model_dir is not None else mp.source.path
                trained = "with its LoRA folded in " if t.fold is not None else ""
                raise ConfigError(f"{where}: ties the embeddings (tie_word_embeddings), but the checkpoint's "
                                  f"{name} {trained}differs from {kept}, so a tied model would not be the trained "
                                  "one; set tie_word_embeddings to false in that config (both are then written), "
                                  "or give the run's own config with --model-name")


def import_behind(*modules: str) -> None:
    """Import modules (torch) on a thread of their own: seconds, more from a cold disk, that other work overlaps."""
    import importlib
    import threading

    def run() -> None:
        for name in modules:
            importlib.import_module(name)

    threading.Thread(target=run, name="streammerge-import", daemon=True).start()


def default_workers(buffer_size: int = DEFAULT_BUFFER_SIZE) -> int:
    """Two threads (one on a single CPU), never more than the windows in flight. The disk's queue depth
    comes from the reads queued ahead of the windows and the kernel's write-back, not from threads
    waiting on it, so threads only copy, cast and fold; two keep up with the disk on the machines
    measured (README), and more only take turns with the thread that queues reads and hashes."""
    return max(1, min(2, in_flight(buffer_size), cpu_count()))


def cpu_count() -> int:
    """CPUs this process may run on (a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def memory_room() -> int:
    """Bytes of memory this process can still fill with page cache: what the machine has available, or less
    where a memory cgroup (ours or a parent's, v1 or v2) allows less; the cgroup's own cache counts as room."""
    import psutil

    room = psutil.virtual_memory().available
    for limit, anon in _cgroup_memory():
        room = min(room, max(0, limit - anon))
    return room


def _cgroup_memory() -> Iterator[tuple[int, int]]:
    """(limit, anonymous memory in use) of each memory cgroup above this process that sets a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        v1 = "memory" in controllers.split(",")
        if not v1 and controllers:
            continue
        root = Path("/sys/fs/cgroup/memory" if v1 else "/sys/fs/cgroup")
        limit_file, anon_key = ("memory.limit_in_bytes", "total_rss") if v1 else ("memory.max", "anon")
        group = root / rel.lstrip("/")
        while True:
            try:
                text = (group / limit_file).read_text().strip()
                stat = dict(ln.split() for ln in (group / "memory.stat").read_text().splitlines())
                if text != "max" and int(text) < 2**60:
                    yield int(text), int(stat.get(anon_key, 0))
            except (OSError, ValueError):
                pass
            if group == root:
                break
            group = group.parent


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="merge", file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def plan(checkpoint: str | Path | Source, options: MergeOptions | None = None, **kwargs: Any) -> MergePlan:
    """`plan_merge` under its short public name."""
    return plan_merge(checkpoint, options, **kwargs)


__all__ = ["MergePlan", "MergeResult", "merge", "plan", "plan_merge"]
