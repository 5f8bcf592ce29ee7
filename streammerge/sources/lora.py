"""LoRA checkpoints: PEFT-named tensors -> a plain model with the adapter folded in, and the adapter itself.

A peft model's state dict names every tensor under `base_model.model.`; a LoRA-targeted Linear keeps
its weight as `<module>.base_layer.weight` beside `<module>.lora_A.<adapter>.weight` (r x in) and
`<module>.lora_B.<adapter>.weight` (out x r). Written as they are, transformers would load none of
them (every weight "missing", newly initialised). Here:

- fold: `<module>.weight = W + scale * (B @ A)`, a computed tensor of the plan (see plan.LoraFold),
  with standard names; `scale` is `lora_alpha / r` (rsLoRA: `lora_alpha / sqrt(r)`), as in peft.
  A GPT-2-style Conv1D (gpt2, openai-gpt, imagegpt, decision_transformer, clvp: c_attn, q_attn, c_proj,
  c_fc) keeps W as [in, out]: it gets `(B @ A).T`, as peft's fan_in_fan_out folds it. Which layers are
  Conv1D is told by config.json's model type and the module's name, never by the shapes alone (a square
  one fits either way); the shapes must agree with it.
- adapter: `lora_adapter/adapter_model.safetensors` + `adapter_config.json`, as peft's
  `save_pretrained` writes them (adapter name dropped from the keys; fan_in_fan_out true for Conv1D
  layers), for `PeftModel.from_pretrained`.

r, alpha and rsLoRA come from veRL's `lora_train_meta.json` and peft's `adapter_config.json` (in the checkpoint
folder, its `lora_adapter/` or its `huggingface/`), read strictly (r an integer > 0, lora_alpha a number,
use_rslora a boolean), or from options (`--lora-rank/--lora-alpha`, `--lora-rslora`: rsLoRA cannot be told from
the weights); two files that disagree, or an option that contradicts a file, are refused. An adapter-only
(`save_lora_only`) checkpoint takes its base weights from `--base-model` (`hf.HFSource`).
What peft's LoRA merge would compute differently or that we cannot fold exactly (DoRA, BD-LoRA, KaSA and peft's
other LoRA variants, embedding and convolution adapters, LoRA biases, several adapters, rank or alpha patterns,
target_parameters, an initialisation of unknown effect, Conv1D-named layers whose kind cannot be told: no config.json,
a GPT-2-style part inside another model, fan_in_fan_out on a model that is not GPT-2-style) is refused, never written
approximately; so are factors that do not fit each other or the base, a plain weight beside a base_layer.weight, and an
adapter-only checkpoint that lacks what the recorded config says was trained (modules_to_save copies, biases).
A PiSSA-like initialisation (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) left the residual base in the
checkpoint: it folds onto that one only, and its adapter is not exported (it would not fit the original base). With
bias "all" or "lora_only" the trained biases are written in both the fold and the adapter, as peft's save_pretrained
does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import dtypes, jsonfile
from ..dtypes import DType
from ..errors import CheckpointError, ConfigError
from ..model_folder import hub_id
from ..plan import LoraFold, Plan, TensorPlan, build_plan, output_dtype
from .base import Source, SourceTensor

PREFIX = "base_model.model."
META_FILE = "lora_train_meta.json"
ADAPTER_DIR = "lora_adapter"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
NOTE = "LoRA  "  # the plan note of a LoRA checkpoint (inspect shows it; the optimizer export looks for it)
# peft's model state dict names the adapter (`q_proj.lora_A.default.weight`); get_peft_model_state_dict (an adapter
# file's keys, and what the HF Trainer saves for a peft model under FSDP SHARDED_STATE_DICT) takes the name out
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


def split_factor(name: str) -> tuple[str, str, str | None] | None:
    """`<module>.lora_A[.<adapter>].weight` -> (module, "A", the adapter's name or None); None for other names."""
    m = _LORA.match(name)
    return (m["module"], m["ab"], m["adapter"]) if m else None


_UNSUPPORTED = {
    "lora_magnitude_vector": "DoRA (use_dora=True)",
    "lora_embedding_A": "LoRA on embeddings",
    "lora_embedding_B": "LoRA on embeddings",
    "lora_diag": "KaSA (kasa_config: B @ diag(lora_diag) @ A over an SVD-truncated base)",
    "lora_velora_embed": "VeLoRA (velora_config)",
    "lora_monteclora_sampler": "MonteCLoRA (monteclora_config)",
}
# peft's LoRA variants whose delta is not `scale * B @ A` over the saved base, or whose adapter needs its own config to
# load (an exported plain adapter would not fit): the LoraConfig field that turns each on, and what it is
_VARIANTS = {
    "use_bdlora": "BD-LoRA (block-diagonal lora_A or lora_B, stored as its blocks)",
    "kasa_config": "KaSA (B @ diag(lora_diag) @ A, over a base truncated by SVD)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow (per-token routing between adapters, which no single weight holds)",
    "use_qalora": "QALoRA (A applied to pooled inputs)",
}


def is_peft(tensors: Mapping[str, SourceTensor]) -> bool:
    """True for a peft model's state dict: LoRA keys, or every key under `base_model.` and the model under
    `base_model.model.` (other tuners keep shared tensors beside it, e.g. VeRA's `base_model.vera_A`)."""
    if any(".lora_A." in n or ".lora_B." in n for n in tensors):
        return True
    return all(n.startswith("base_model.") for n in tensors) and any(n.startswith(PREFIX) for n in tensors)


@dataclass
class LoraPlan:
    """What a LoRA checkpoint contributes to a merge."""

    weights: list[TensorPlan]  # the top-level model: folded (fold, both) or the base as saved (adapter)
    plans: list[Plan] = field(default_factory=list)  # the adapter export, when asked for
    generated: dict[str, bytes] = field(default_factory=dict)  # adapter_config.json
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # r, alpha, scale, rsLoRA, mode, base: for the model card


@dataclass(frozen=True)
class Adapter:
    """One LoRA-targeted module: its A and B, and the base weight they fold into (None: not in the checkpoint)."""

    module: str  # peft name of the module, e.g. base_model.model.model.layers.0.self_attn.q_proj
    a: SourceTensor
    b: SourceTensor
    base: SourceTensor | None


_CONV1D_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_decoder")
_CONV1D_ARCHS = ("GPT2", "OpenAIGPT", "ImageGPT", "DecisionTransformer", "Clvp")
_CONV1D_NAMES = ("c_attn", "c_proj", "c_fc", "q_attn")  # GPT-2's Conv1D modules: other models' c_proj is a Linear
_GPT2_LIKE = re.compile(r"c_\w+|q_attn")  # how custom-code models that borrow GPT-2's layers name them (JAIS: c_fc2)
# init_lora_weights that leave the base weights as they were (the fold onto any copy of the base is exact) and those
# that replace W by a residual W - s B0 A0 at initialisation (only the checkpoint's own base_layer.weight is right)
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class Recorded:
    """A value of the run's LoraConfig and the file (and field) it was read from."""

    value: Any
    where: str


@dataclass(frozen=True)
class LoraSettings:
    """The run's LoraConfig as far as the fold and the export need it."""

    r: int
    alpha: float
    rslora: bool
    task: str = "CAUSAL_LM"
    bias: str = "none"
    init: bool | str = True
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] = ()
    dropout: float = 0.0  # carried into the exported adapter_config.json, for training on from it
    where: dict[str, str] = field(default_factory=dict)  # the file and field each recorded value came from

    @property
    def residual_init(self) -> bool:
        """peft's initialisation replaced the base weights by a residual (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA)."""
        return isinstance(self.init, str) and self.init.lower().startswith(_RESIDUAL_INITS)


def adapter_config_files(source: Source) -> list[Path]:
    """peft's adapter_config.json where a checkpoint keeps it: in its folder, its `lora_adapter/` (veRL writes one
    there beside the rank files), its config folder (`huggingface/`) and the trainer's folder around it (the HF
    Trainer's checkpoint-N/)."""
    hf = source.hf_dir if source.hf_dir is not None else source.path / "huggingface"
    around = source.trainer_folder()
    found: dict[Path, Path] = {}
    for p in (source.path / ADAPTER_CONFIG, source.path / ADAPTER_DIR / ADAPTER_CONFIG, hf / ADAPTER_CONFIG,
              *([around / ADAPTER_CONFIG] if around is not None else [])):
        if p.is_file():
            found.setdefault(p.resolve(), p)
    return list(found.values())


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# field -> (test, what it must be); a field absent (or null, for the optional ones) is not recorded
_FIELDS: dict[str, tuple[Any, str]] = {
    "r": (lambda v: _is_int(v) and v > 0, "an integer > 0"),
    "lora_alpha": (_is_number, "a number"),
    "lora_dropout": (lambda v: v is None or (_is_number(v) and 0 <= v <= 1), "a number from 0 to 1"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "bias": (lambda v: v is None or v in ("none", "all", "lora_only"), '"none", "all" or "lora_only"'),
    "rank_pattern": (lambda v: v is None or isinstance(v, dict), "an object"),
    "alpha_pattern": (lambda v: v is None or isinstance(v, dict), "an object"),
    "target_parameters": (lambda v: v is None or isinstance(v, list), "a list"),
    "layer_replication": (lambda v: v is None or isinstance(v, list), "a list"),
    "alora_invocation_tokens": (lambda v: v is None or isinstance(v, list), "a list"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or a method's name"),
    "task_type": (lambda v: v is None or isinstance(v, str), "a string"),
    "peft_type": (lambda v: v is None or v == "LORA", '"LORA" (another peft method is not LoRA)'),
    "modules_to_save": (lambda v: v is None or (isinstance(v, list) and all(isinstance(m, str) and m for m in v)),
                        "a list of module names"),
    **{name: (lambda v: True, "") for name in _VARIANTS},  # any value but null/false/{} turns the variant on
}


def _records(source: Source) -> list[tuple[str, dict]]:
    """Every file that records the run's LoRA settings, as (path, fields by peft's names), checked strictly."""
    records: list[tuple[str, dict]] = []
    meta_path = source.path / META_FILE
    if meta_path.is_file():
        meta = jsonfile.read_object(meta_path)
        fields = {k: meta[k] for k in ("r", "lora_alpha", "use_rslora", "task_type") if k in meta}
        if "r" not in fields and "lora_rank" in meta:
            fields["r"] = meta["lora_rank"]
        records.append((str(meta_path), fields))
    files = adapter_config_files(source)
    for path in files:
        cfg = jsonfile.read_object(path)
        records.append((str(path), {k: cfg[k] for k in _FIELDS if k in cfg}))
    for where, fields in records:
        for name, value in fields.items():
            test, what = _FIELDS[name]
            if not test(value):
                key = "lora_rank" if name == "r" and where.endswith(META_FILE) and "r" not in fields else name
                raise CheckpointError(f"{where}: {key} is {json.dumps(value)}; it must be {what}")
    return records


def _same(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return float(a) == float(b)
    return type(a) is type(b) and a == b


def _recorded(records: list[tuple[str, dict]], name: str) -> Recorded | None:
    """The one value the files record for `name`; two files that disagree are refused, naming both."""
    found = [Recorded(fields[name], f"{where}: {name}") for where, fields in records if fields.get(name) is not None]
    for other in found[1:]:
        if not _same(other.value, found[0].value):
            raise CheckpointError(f"{found[0].where} is {json.dumps(found[0].value)} but {other.where} is "
                                  f"{json.dumps(other.value)}; which one the run used cannot be told")
    return found[0] if found else None


def _with_option(rec: Recorded | None, option: Any, flag: str) -> Any:
    """The option when given (it must agree with a recorded value), else the recorded value (None: neither)."""
    if option is None:
        return rec.value if rec else None
    if rec is not None and not _same(option, rec.value):
        raise ConfigError(f"{flag} {json.dumps(option)} contradicts {rec.where} {json.dumps(rec.value)}; leave the "
                          "flag out or correct the file")
    return option


def _refuse_pattern(records: list[tuple[str, dict]], name: str, field: str, value: Any) -> None:
    """A per-module rank or alpha the fold cannot apply; a pattern that gives every module `value` changes nothing."""
    rec = _recorded(records, name)
    if rec is not None and rec.value and any(not _same(v, value) for v in rec.value.values()):
        raise CheckpointError(f"{rec.where} is {json.dumps(rec.value)}: a {field} per module other than {field} "
                              f"{json.dumps(value)} is not supported by streammerge's LoRA fold; merge it with peft's "
                              "merge_and_unload instead")


def lora_settings(source: Source, options: Any, ranks: Mapping[int, list[str]]) -> LoraSettings:
    """The run's LoraConfig from lora_train_meta.json and adapter_config.json, and the options; refuses guesses,
    values of the wrong type, files that disagree and options that contradict a file. `ranks`: the adapted modules
    by their rank (lora_A's rows)."""
    records = _records(source)
    task = _recorded(records, "task_type")
    bias = _recorded(records, "bias")
    init = _recorded(records, "init_lora_weights")
    dora = _recorded(records, "use_dora")
    fifo = _recorded(records, "fan_in_fan_out")
    for name, why in (("target_parameters", "LoRA on parameters (peft's ParamWrapper, e.g. MoE experts)"),
                      ("layer_replication", "layers repeated over shared base weights"),
                      ("alora_invocation_tokens", "activated LoRA, applied only after its invocation tokens")):
        rec = _recorded(records, name)
        if rec is not None and rec.value:
            raise CheckpointError(f"{rec.where} is {json.dumps(rec.value)}: {why} is not supported by streammerge's "
                                  "LoRA fold; merge it with peft's merge_and_unload instead")
    for name, what in _VARIANTS.items():
        rec = _recorded(records, name)
        if rec is not None and rec.value:
            raise CheckpointError(f"{rec.where} is {json.dumps(rec.value)}: {what} is a LoRA variant streammerge does "
                                  "not fold or export exactly; merge it with peft's merge_and_unload instead")
    if dora is not None and dora.value:
        raise CheckpointError(f"{dora.where} is true: DoRA's magnitude vector rescales each column of the folded "
                              "weight, which streammerge's LoRA fold does not do; merge it with peft's "
                              "merge_and_unload instead")
    lbias = _recorded(records, "lora_bias")
    if lbias is not None and lbias.value:
        raise CheckpointError(f"{lbias.where} is true: LoRA biases (lora_bias=True) are not supported")
    if init is not None and isinstance(init.value, str) and not init.value.lower().startswith(
            (*_PLAIN_INITS, *_RESIDUAL_INITS)):
        raise CheckpointError(f"{init.where} is {json.dumps(init.value)}, an initialisation streammerge does not "
                              "know: whether it changed the base weights cannot be told, so the fold is refused")
    rank_opt, alpha_opt = options.lora_rank, options.lora_alpha
    flag = getattr(options, "lora_rslora", None)
    if rank_opt is not None and not (_is_int(rank_opt) and rank_opt > 0):
        raise ConfigError(f"--lora-rank {rank_opt!r}: it must be an integer > 0")
    if alpha_opt is not None and not _is_number(alpha_opt):
        raise ConfigError(f"--lora-alpha {alpha_opt!r}: it must be a finite number")
    if flag is not None and not isinstance(flag, bool):
        raise ConfigError(f"--lora-rslora {flag!r}: it must be true or false")
    r_rec = _recorded(records, "r")
    r = _with_option(r_rec, rank_opt, "--lora-rank")
    alpha = _with_option(_recorded(records, "lora_alpha"), alpha_opt, "--lora-alpha")
    rslora = _with_option(_recorded(records, "use_rslora"), flag, "--lora-rslora")
    if not ranks:
        raise CheckpointError(f"{source.path}: a peft model's tensor names (base_model.model.…) but no LoRA pair "
                              "(lora_A and lora_B): no adapter to fold or export; merge it with peft")
    if len(ranks) != 1:
        common = max(ranks, key=lambda k: len(ranks[k]))
        odd = min((k for k in ranks if k != common), key=lambda k: len(ranks[k]))
        raise CheckpointError(f"{source.path}: {ranks[odd][0]}: lora_A has {odd} rows but {len(ranks[common])} "
                              f"other modules' have {common} (LoRA adapters of several ranks {sorted(ranks)}: a "
                              "rank_pattern, or tensors of two runs?); folding them is not supported")
    (seen,) = ranks
    if r is None:
        r = seen
    _refuse_pattern(records, "rank_pattern", "r", r)
    if r != seen:
        where = "--lora-rank" if rank_opt is not None else r_rec.where if r_rec else "r"
        raise CheckpointError(f"{source.path}: LoRA rank {r!r} (from {where}) but lora_A has {seen} rows")
    if alpha is None:
        raise ConfigError(f"{source.path}: a LoRA checkpoint that records no lora_alpha (no {META_FILE} or "
                          f"{ADAPTER_CONFIG} with it): give --lora-alpha and --lora-rank, and --lora-rslora if the run "
                          "used rsLoRA, as the run's LoraConfig had them; the scale cannot be read from the weights")
    _refuse_pattern(records, "alpha_pattern", "lora_alpha", alpha)
    saved = _recorded(records, "modules_to_save")
    dropout = _recorded(records, "lora_dropout")
    wheres = {name: rec.where for name, rec in (("bias", bias), ("init_lora_weights", init), ("fan_in_fan_out", fifo),
                                                 ("modules_to_save", saved)) if rec is not None}
    return LoraSettings(r=r, alpha=float(alpha), rslora=bool(rslora),
                        task=task.value if task is not None else "CAUSAL_LM",
                        bias=bias.value if bias is not None else "none",
                        init=init.value if init is not None else True,
                        fan_in_fan_out=bool(fifo and fifo.value),
                        modules_to_save=tuple(saved.value) if saved is not None else (),
                        dropout=dropout.value if dropout is not None else 0.0, where=wheres)


def plan_lora(source: Source, tensors: Mapping[str, SourceTensor], options: Any, config: Mapping | None,
              dtype: DType | None, *, token: str | None = None, endpoint: str | None = None) -> LoraPlan:
    """The output tensors of a LoRA checkpoint (see the module docstring for the modes).

    `token` and `endpoint` reach the Hub for a `--base-model` given as a Hub model (never recorded).
    """
    for name in tensors:
        for marker, what in _UNSUPPORTED.items():
            if f".{marker}." in name or name.endswith(f".{marker}"):
                raise CheckpointError(f"{source.path}: {name!r}: {what} is not supported by streammerge's LoRA fold; "
                                      "merge it with peft's merge_and_unload instead")
        if re.search(r"\.lora_B(\.[^.]+)?\.bias$", name):
            raise CheckpointError(f"{source.path}: {name!r}: LoRA biases (lora_bias=True) are not supported")
    adapters, plain, adapter_names, saved = _pair(source, tensors)
    # a module whose base_layer holds parameters other than a Linear's weight and bias: peft's ParamWrapper
    # (target_parameters) or a layer of another kind (nn.MultiheadAttention's in_proj_weight)
    not_linear: dict[str, str] = {}
    for n in tensors:
        if ".base_layer." in n and n.split(".base_layer.", 1)[1] not in ("weight", "bias"):
            not_linear.setdefault(*n.split(".base_layer.", 1))
    for a in adapters:
        if a.base is None and a.module in not_linear:
            raise CheckpointError(f"{source.path}: {_short(a.module)!r}: LoRA on a layer whose base holds "
                                  f"{not_linear[a.module]!r}, not a Linear's weight (peft's ParamWrapper for "
                                  "target_parameters, e.g. MoE experts, or nn.MultiheadAttention) is not supported by "
                                  "streammerge's LoRA fold; merge it with peft's merge_and_unload instead")
    if len(adapter_names) > 1:
        raise CheckpointError(f"{source.path}: several LoRA adapters {sorted(adapter_names)}; streammerge folds "
                              "one (peft's merge_and_unload folds the active ones)")
    ranks: dict[int, list[str]] = {}
    for a in adapters:
        if len(a.a.shape) != 2 or len(a.b.shape) != 2:
            raise CheckpointError(f"{source.path}: {_short(a.module)}: lora_A {list(a.a.shape)} and lora_B "
                                  f"{list(a.b.shape)} are not both matrices; cannot fold")
        ranks.setdefault(a.a.shape[0], []).append(_short(a.module))
    settings = lora_settings(source, options, ranks)  # first: a variant the config records is named as such
    for a in adapters:
        if a.b.shape[1] != a.a.shape[0]:  # checked here, not only against a base: an adapter-only export has none
            raise CheckpointError(f"{source.path}: {_short(a.module)}: lora_B {list(a.b.shape)} has {a.b.shape[1]} "
                                  f"columns but lora_A {list(a.a.shape)} has {a.a.shape[0]} rows (its rank); B @ A "
                                  "cannot be formed (a block-diagonal BD-LoRA factor, or tensors of two runs?)")
    conv1d = _conv1d_modules(source, config, adapters, settings)
    r, alpha, rslora, task = settings.r, settings.alpha, settings.rslora, settings.task
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    mode = options.lora
    missing = [a.module for a in adapters if a.base is None]
    if settings.residual_init:
        init = f"{settings.where['init_lora_weights']} is {json.dumps(settings.init)}"
        if missing:
            raise CheckpointError(f"{init}: peft replaced the base weights by a residual when it initialised the "
                                  "adapter, and the checkpoint holds only the adapter (the base model's weights are "
                                  "not that residual); merge it with peft instead")
        if mode != "fold":
            raise ConfigError(f"{init}: this adapter belongs to the residual base weights saved in the checkpoint, "
                              "not to the base model, so an exported adapter would load wrong; give --lora fold")
    biases = _trained_biases(tensors, adapters, settings.bias)
    copies = {_short_name(n) for n in saved}  # modules_to_save copies are exported with their module
    own_biases = sorted(n for n in plain if n.endswith(".bias") and n not in copies)
    if missing and own_biases and settings.bias == "none" and mode != "fold":
        said = (f"{settings.where['bias']} is \"none\"" if "bias" in settings.where
                else f"{source.path}: no file records peft's bias setting (\"none\" assumed)")
        raise CheckpointError(f"{said}, but the adapter-only checkpoint holds trained biases ({own_biases[0]!r}, "
                              f"{len(own_biases)} in all): an exported adapter would leave them out and load with the "
                              "base model's biases; give --lora fold --base-model BASE (the fold writes them), or "
                              "record the run's bias in an adapter_config.json")
    out = LoraPlan(weights=[])
    base_name = getattr(options, "base_model", None)
    if base_name and not missing:
        raise ConfigError(f"--base-model {base_name}: {source.path} holds its own base weights "
                          f"({_short(adapters[0].module)}.base_layer.weight), which are the ones trained with the "
                          "adapter; --base-model is for adapter-only (save_lora_only) checkpoints: leave it out")
    if missing and base_name:
        own = set(plain)
        adapters, plain = _with_base(source, adapters, plain, base_name, options, token, endpoint)
        out.notes.append(f"base        {base_name} (the checkpoint holds only the adapter)")
        if settings.bias != "none":
            targets = {_short(a.module) + ".bias" for a in adapters}
            lost = [n for n in plain if n not in own and n.endswith(".bias")
                    and (settings.bias == "all" or n in targets)]
            if lost:
                raise CheckpointError(f"{settings.where['bias']} is {json.dumps(settings.bias)}: the run trained "
                                      f"biases, but the checkpoint lacks {lost[0]!r} ({len(lost)} in all), so the "
                                      "base model's untrained one would be written")
    elif missing and mode == "adapter" and settings.bias != "none" and not biases:
        raise CheckpointError(f"{settings.where['bias']} is {json.dumps(settings.bias)}: the run trained biases, but "
                              "the checkpoint holds none (the model may have none, or the save left them out: "
                              "which cannot be told)")
    elif missing and mode != "adapter":
        raise ConfigError(f"{source.path}: the checkpoint holds only the LoRA adapter (save_lora_only: "
                          f"{_short(missing[0])}.base_layer.weight is not there); give the base model with "
                          "--base-model, or export just the adapter with --lora adapter")
    model_names = [*plain, *(_short(a.module) + ".weight" for a in adapters)] if not missing or base_name else None
    _check_modules_to_save(source, settings, saved, model_names)
    if not missing or base_name:
        for name, t in plain.items():
            out.weights.append(TensorPlan(name, t, output_dtype(t.dtype, dtype)))
        for a in adapters:
            assert a.base is not None
            _check_shapes(source, a, a.module in conv1d)
            if mode in ("fold", "both"):
                _check_dtypes(source, a)
            name = _short(a.module) + ".weight"
            fold = LoraFold(a.a, a.b, scale, transpose=a.module in conv1d) if mode in ("fold", "both") else None
            out.weights.append(TensorPlan(name, a.base, output_dtype(a.base.dtype, dtype), fold))
        order: dict[str, int] = {}
        for n in [*(_short_name(n) for n in tensors), *(source.lora_base.tensors(options) if source.lora_base else ())]:
            order.setdefault(n, len(order))
        out.weights.sort(key=lambda t: order.get(t.name, len(order)))
    out.notes.append(f"{NOTE}      {len(adapters)} adapted modules, r {r}, alpha {alpha:g}, scale {scale:g}"
                     f"{' (rsLoRA)' if rslora else ''}, mode {mode}"
                     + (" (fold: W + scale * B @ A, computed in float32)" if mode != "adapter" else "")
                     + (f"; {len(conv1d)} of them Conv1D ([in, out]: W + scale * (B @ A).T)" if conv1d else ""))
    base_ref = base_name or (config or {}).get("_name_or_path")
    base_ref = base_ref if isinstance(base_ref, str) and base_ref else None
    out.info = {"r": r, "alpha": alpha, "scale": scale, "rslora": rslora, "mode": mode, "base_model": base_ref,
                "modules": len(adapters), "adapter_dir": ADAPTER_DIR if mode in ("adapter", "both") else None,
                "adapted": sorted(_short(a.module) + ".weight" for a in adapters)}
    if mode in ("adapter", "both"):
        out.plans.append(_adapter_plan(adapters, {**saved, **biases}, options))
        modules = {n.rsplit(".", i)[0] for n in [*plain, *(_short(a.module) + ".weight" for a in adapters)]
                   for i in range(1, n.count(".") + 1)}
        wrapped = {_short(m[:m.index(".modules_to_save.")]) for m in tensors if ".modules_to_save." in m}
        out.generated[f"{ADAPTER_DIR}/{ADAPTER_CONFIG}"] = _adapter_config(
            _peft_names({_short(a.module) for a in adapters}, modules, dot=True), r, alpha, rslora, task,
            hub_id(base_ref) or base_ref,
            list(settings.modules_to_save) or _peft_names(wrapped, modules, dot=False), settings.bias, bool(conv1d),
            settings.dropout)
    return out


def _peft_names(chosen: set[str], modules: set[str], *, dot: bool) -> list[str]:
    """adapter_config.json's names for the `chosen` modules, among the model's `modules`: each one's shortest trailing
    part that matches no other module, as peft matches them when it loads the adapter: target_modules (`dot`) where
    a module's name is the part or ends with "." + it, modules_to_save where it ends with it. Short names where they
    are unambiguous (`q_proj`), longer ones where not (a vision merger's `mlp.0`: `0` would wrap whole blocks)."""
    by_leaf: dict[str, list[str]] = {}
    for key in modules | chosen:
        by_leaf.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    fits: dict[str, bool] = {}
    out = set()
    for module in sorted(chosen):
        parts = module.split(".")
        near = [k for leaf, keys in by_leaf.items() if (leaf == parts[-1] if dot else leaf.endswith(parts[-1]))
                for k in keys]
        for i in range(len(parts) - 1, -1, -1):
            part = ".".join(parts[i:])
            if part not in fits:
                fits[part] = all(k in chosen for k in near
                                 if (k == part or k.endswith("." + part) if dot else k.endswith(part)))
            if fits[part]:
                out.add(part)
                break
    return sorted(out)


def _conv1d_model(config: Mapping) -> str | None:
    """The model type or architecture that makes `config` a GPT-2-style model (its Conv1D layers named in
    _CONV1D_NAMES); None: not one."""
    if config.get("model_type") in _CONV1D_TYPES:
        return str(config["model_type"])
    archs = config.get("architectures")
    if isinstance(archs, list):
        return next((a for a in archs if isinstance(a, str) and a.startswith(_CONV1D_ARCHS)), None)
    return None


def _conv1d_part(config: Mapping, where: str = "") -> str | None:
    """A sub-config of a GPT-2-style model (an encoder-decoder's `decoder`...), as `key: type`; None: none."""
    for key, value in config.items():
        if isinstance(value, Mapping):
            path = f"{where}.{key}" if where else str(key)
            kind = _conv1d_model(value)
            found = f"{path}: {kind}" if kind else _conv1d_part(value, path)
            if found:
                return found
    return None


def _conv1d_modules(source: Source, config: Mapping | None, adapters: list[Adapter],
                    settings: LoraSettings) -> set[str]:
    """The adapted modules that are GPT-2-style Conv1D layers: W kept as [in, out], into which peft folds
    `(B @ A).T` (it sets fan_in_fan_out per layer, Conv1D or Linear). Told by the model's type and the module's
    name; where that cannot be told (a square layer would pass the shape check either way) it is refused."""
    named = {a.module for a in adapters if _short(a.module).rsplit(".", 1)[-1] in _CONV1D_NAMES}
    if config is not None and _conv1d_model(config):
        return named
    names = ", ".join(sorted({_short(m).rsplit(".", 1)[-1] for m in named}))
    part = _conv1d_part(config) if config is not None else None
    if config is None and named:
        raise CheckpointError(f"{source.path}: LoRA on modules named {names} and no config.json to tell whether "
                              "they are GPT-2-style Conv1D layers (weight [in, out], folded transposed) or Linear "
                              "ones; give the model's config with --model-name, or merge it with peft's "
                              "merge_and_unload instead")
    if part and named:
        raise CheckpointError(f"{source.path}: LoRA on modules named {names} of a model that holds a GPT-2-style "
                              f"part (config.json {part}): which of them are its Conv1D layers (weight [in, out], "
                              "folded transposed) cannot be told; merge it with peft's merge_and_unload instead")
    square = sorted({_short(a.module).rsplit(".", 1)[-1] for a in adapters
                     if _GPT2_LIKE.fullmatch(_short(a.module).rsplit(".", 1)[-1]) and a.a.shape[-1] == a.b.shape[0]})
    if config is not None and config.get("auto_map") and square:
        raise CheckpointError(f"{source.path}: LoRA on square layers named {', '.join(square)} of a model with its "
                              "own modeling code (config.json auto_map; some such models use GPT-2's Conv1D): whether "
                              "their weights are kept [in, out] and folded transposed cannot be told from the shapes; "
                              "merge it with peft's merge_and_unload instead")
    if settings.fan_in_fan_out:
        model = f"model_type {config.get('model_type')!r}" if config is not None else "a model with no config.json"
        raise CheckpointError(f"{settings.where['fan_in_fan_out']} is true, but {model} is none of "
                              f"the GPT-2-style models ({', '.join(_CONV1D_TYPES)}) whose Conv1D layers streammerge "
                              "knows: which weights are kept transposed cannot be told; merge it with peft's "
                              "merge_and_unload instead")
    return set()


def _trained_biases(tensors: Mapping[str, SourceTensor], adapters: list[Adapter], bias: str) -> dict[str, SourceTensor]:
    """The biases peft's save_pretrained puts in the adapter file for `bias` ("all": every `.bias`; "lora_only": the
    LoRA-targeted modules' own), by the peft model's names (modules_to_save copies go with their module)."""
    if bias == "all":
        return {n: t for n, t in tensors.items() if n.endswith(".bias") and ".lora_" not in n
                and ".original_module." not in n and ".modules_to_save." not in n}
    if bias == "lora_only":
        names = [a.module + ".base_layer.bias" for a in adapters]
        return {n: tensors[n] for n in names if n in tensors}
    return {}


_CLASSIFIERS = ("classifier", "score")  # peft adds both to modules_to_save for a classification model, which has one


def _check_modules_to_save(source: Source, settings: LoraSettings, saved: Mapping[str, SourceTensor],
                           model_names: list[str] | None) -> None:
    """Every module the recorded `modules_to_save` names (peft wraps each module whose name ends with one) has its
    trained copy in the checkpoint: else the fold writes, and the exported adapter loads, the base model's untrained
    module. `model_names`: the output tensors' names (None: no base, only the checkpoint's own names are known)."""
    if not settings.modules_to_save:
        return
    where = settings.where["modules_to_save"]
    trained = {_short_name(n).rsplit(".", 1)[0] for n in saved}

    def refuse(module: str, name: str) -> None:
        raise CheckpointError(f"{where} names {name!r}, but the checkpoint holds no trained copy of {module} (peft "
                              f"saves it as {module}.modules_to_save.<adapter>.…): the base model's untrained {module} "
                              "would be written in its place; save the checkpoint with it")

    if model_names is not None:
        modules = {n.rsplit(".", i)[0] for n in model_names for i in range(1, n.count(".") + 1)}
        for name in settings.modules_to_save:
            for m in sorted(modules):
                if m.endswith(name) and not any(m == t or m.startswith(t + ".") or t.startswith(m + ".")
                                                for t in trained):
                    refuse(m, name)
        return
    for name in settings.modules_to_save:  # no base: a name must match a trained module (of the two classifier
        alternatives = _CLASSIFIERS if name in _CLASSIFIERS else (name,)  # names peft adds, one)
        if not any(t.endswith(n) for t in trained for n in alternatives if n in settings.modules_to_save):
            refuse(name, name)


def _with_base(source: Source, adapters: list[Adapter], plain: dict[str, SourceTensor], base_name: str, options: Any,
               token: str | None, endpoint: str | None) -> tuple[list[Adapter], dict[str, SourceTensor]]:
    """An adapter-only checkpoint completed by the base model's weights (the checkpoint's own tensors win)."""
    from .hf import HFSource, resolve_base

    base = HFSource(resolve_base(base_name, token=token, endpoint=endpoint))
    weights = base.tensors(options)
    source.lora_base = base  # verify reads the base through its own oracle
    done = []
    for a in adapters:
        if a.base is None:
            name = _short(a.module) + ".weight"
            if name not in weights:
                raise CheckpointError(f"{base.path}: the base model has no {name!r}, which the adapter "
                                      f"{_short(a.module)} folds into (a base of another architecture?)")
            a = Adapter(a.module, a.a, a.b, weights[name])
        done.append(a)
    folded = {_short(a.module) + ".weight" for a in done}
    merged = {n: t for n, t in weights.items() if n not in folded}
    merged.update(plain)
    return done, merged


def _pair(source: Source, tensors: Mapping[str, SourceTensor]
          ) -> tuple[list[Adapter], dict[str, SourceTensor], set[str], dict[str, SourceTensor]]:
    """LoRA modules with their A, B and base weight; every other tensor under its plain name (the source
    keeps the checkpoint's name); and the trained modules_to_save tensors under peft's adapter-file names."""
    parts: dict[str, dict[str, SourceTensor]] = {}
    names: set[str] = set()
    lora_keys: set[str] = set()
    unnamed = None  # a factor saved without its adapter's name
    for name, t in tensors.items():
        m = _LORA.match(name)
        if m:
            parts.setdefault(m["module"], {})[m["ab"]] = t
            if m["adapter"] is None:
                unnamed = name
            else:
                names.add(m["adapter"])
            lora_keys.add(name)
    if unnamed is not None:
        _check_unnamed(source, tensors, unnamed, names, lora_keys)
    adapters = []
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{source.path}: {module!r} has lora_{''.join(ab)} but not its pair")
        if module + ".weight" in tensors:  # peft keeps a wrapped module's weight as base_layer.weight, never both
            other = "beside its base_layer.weight" if module + ".base_layer.weight" in tensors else "instead of a " \
                "base_layer.weight"
            raise CheckpointError(f"{source.path}: {module + '.weight'!r} {other}, for a module with a LoRA pair: "
                                  f"which one is {_short(module)}.weight (the base to fold into) cannot be told")
        adapters.append(Adapter(module, ab["A"], ab["B"], tensors.get(module + ".base_layer.weight")))
    used = {a.module + ".base_layer.weight" for a in adapters}
    plain: dict[str, SourceTensor] = {}
    saved: dict[str, SourceTensor] = {}
    for name, t in tensors.items():
        if name in lora_keys or name in used:
            continue
        if ".original_module." in name:  # modules_to_save keeps the untrained copy too: the trained one is written
            continue
        _refuse_other_tuners(source, name, names, parts)
        m = re.search(r"\.modules_to_save\.([^.]+)\.", name)
        if m:
            names.add(m.group(1))
            saved[name[:m.start()] + "." + name[m.end():]] = t
        short = _short_name(name)
        if short in plain:
            raise CheckpointError(f"{source.path}: {name!r} and another key both become {short!r}")
        plain[short] = t
    return adapters, plain, names, saved


def _check_unnamed(source: Source, tensors: Mapping[str, SourceTensor], unnamed: str, names: set[str],
                   lora_keys: set[str]) -> None:
    """Factors saved without the adapter's name (an adapter state dict: get_peft_model_state_dict) are folded only
    where they are all the checkpoint holds: there, a modules_to_save copy and a trained bias both lost the marks
    that tell them apart, and without the run's adapter_config.json which one a key is cannot be told."""
    if names:
        raise CheckpointError(f"{source.path}: {unnamed!r} has no adapter name but other LoRA keys name "
                              f"{sorted(names)[0]!r}: tensors of two saves?")
    other = next((n for n in tensors if n not in lora_keys), None)
    if other is not None:
        raise CheckpointError(f"{source.path}: an adapter state dict (LoRA keys without the adapter's name, as peft's "
                              f"get_peft_model_state_dict gives them) that also holds {other!r}: a modules_to_save "
                              "copy or a trained bias, which cannot be told apart without the run's "
                              "adapter_config.json; load it into the peft model (set_peft_model_state_dict) and use "
                              "peft's merge_and_unload")


def _refuse_other_tuners(source: Source, name: str, adapter_names: set[str], lora_modules: Mapping) -> None:
    """A key that is neither LoRA's nor the model's is another peft tuner's part, which the fold would leave out
    (or write under a name transformers ignores)."""
    if ".trainable_tokens_" in name or ".token_adapter." in name:
        raise CheckpointError(f"{source.path}: {name!r}: peft trainable tokens (trainable_token_indices) are not "
                              "supported by streammerge's LoRA fold; merge it with peft's merge_and_unload instead")
    last = name.rsplit(".", 1)[-1]
    wrapped = name.split(".base_layer.", 1)[0] if ".base_layer." in name else None
    if (not name.startswith(PREFIX) or (wrapped is not None and wrapped not in lora_modules) or ".lora_" in name
            or last in adapter_names or last == "default"):
        raise CheckpointError(f"{source.path}: {name!r}: a peft tensor that is not LoRA's A, B or base weight (another "
                              "tuner: VeRA, IA3, LoHa, LoKr, AdaLoRA...) is not supported by streammerge's LoRA "
                              "fold; merge it with peft's merge_and_unload instead")


def _short_name(name: str) -> str:
    """A peft key -> the key transformers expects: no `base_model.model.`, `base_layer.`, modules_to_save."""
    name = name.removeprefix(PREFIX).replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


def _short(module: str) -> str:
    return _short_name(module + ".x")[:-2]


def _check_shapes(source: Source, a: Adapter, conv1d: bool) -> None:
    """lora_A (r, in) and lora_B (out, r) against the base weight: a Linear's (out, in), a Conv1D's (in, out)."""
    base = a.base
    assert base is not None
    ab = len(a.a.shape) == 2 and len(a.b.shape) == 2 and a.b.shape[1] == a.a.shape[0]
    want = (a.a.shape[1], a.b.shape[0]) if conv1d else (a.b.shape[0], a.a.shape[1])
    if not ab or tuple(base.shape) != want:
        kind = "a GPT-2-style Conv1D's (in, out)" if conv1d else "a Linear's (out, in)"
        raise CheckpointError(f"{source.path}: {_short(a.module)}: lora_A {list(a.a.shape)} and lora_B "
                              f"{list(a.b.shape)} do not fit the base weight {list(base.shape)} ({kind}); cannot fold")


def _check_dtypes(source: Source, a: Adapter) -> None:
    """The fold is real floating-point arithmetic: an integer (quantized) base weight would be truncated after it,
    and a complex factor's imaginary part lost."""
    assert a.base is not None
    for what, t in (("base weight", a.base), ("lora_A", a.a), ("lora_B", a.b)):
        if t.dtype not in dtypes.FULL_PRECISION:
            why = "a quantized base is dequantized first by peft" if t is a.base else "no real floating-point dtype"
            raise CheckpointError(f"{source.path}: {_short(a.module)}: its {what} is {t.dtype.name}, which the fold "
                                  f"W + scale * B @ A cannot be computed exactly in ({why}); merge it with peft, or "
                                  "export the adapter with --lora adapter")


def _adapter_plan(adapters: list[Adapter], saved: Mapping[str, SourceTensor], options: Any) -> Plan:
    """peft's adapter file: `base_model.model.<module>.lora_A.weight` (and modules_to_save tensors under their
    module's name), in the dtype the run saved."""
    tensors = []
    for a in adapters:
        for ab, t in (("A", a.a), ("B", a.b)):
            tensors.append(TensorPlan(f"{a.module}.lora_{ab}.weight", t, t.dtype))
    for name, t in saved.items():
        tensors.append(TensorPlan(name, t, t.dtype))
    return build_plan(tensors, max_shard_size=options.max_shard_size, subdir=ADAPTER_DIR,
                      single_file=ADAPTER_FILE)


def _adapter_config(targets: list[str], r: int, alpha: float, rslora: bool, task: str, base: str | None,
                    modules_to_save: list[str], bias: str = "none", fan_in_fan_out: bool = False,
                    dropout: float = 0.0) -> bytes:
    """adapter_config.json as peft writes it for a LoraConfig with these settings (peft turns fan_in_fan_out on
    in the config it saves when it wraps a Conv1D; lora_A and lora_B are saved untransposed either way)."""
    cfg = {
        "peft_type": "LORA", "task_type": task, "r": r,
        "lora_alpha": alpha if not float(alpha).is_integer() else int(alpha),
        "target_modules": targets, "lora_dropout": dropout, "bias": bias, "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": rslora, "use_dora": False, "modules_to_save": modules_to_save or None, "init_lora_weights": True,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base,
    }
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def peft_params(model: Any, shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """The plain model's parameter order (optimizer.naming.ModelParams) as the peft model's `named_parameters()`.

    peft wraps a targeted Linear as `base_layer` (registered first) then `lora_A.<adapter>` and
    `lora_B.<adapter>`; a modules_to_save module as `original_module` then `modules_to_save.<adapter>`.
    An optimizer built over the peft model's parameters (veRL passes them all; the frozen ones get
    no state) is indexed in this order, so its state is named by the adapter parameters.
    """
    from ..optimizer.naming import ModelParams

    lora: dict[str, list[str]] = {}
    for name in shapes:
        m = _LORA.match(name)
        if m:
            lora.setdefault(m["module"], []).append(name)
    saved: dict[str, str] = {}
    for name in shapes:
        m = re.search(r"\.modules_to_save\.([^.]+)\.", name)
        if m:
            saved[name[:m.start()]] = m.group(1)
    groups: list[tuple[str, list[tuple[str, tuple[int, ...]]]]] = []
    for fqn, shape in model.params:
        module, leaf = fqn.rsplit(".", 1) if "." in fqn else ("", fqn)
        if groups and groups[-1][0] == module:
            groups[-1][1].append((leaf, shape))
        else:
            groups.append((module, [(leaf, shape)]))
    params: list[tuple[str, tuple[int, ...]]] = []
    for module, leaves in groups:
        pm = PREFIX + module
        if pm in lora:
            params += [(f"{pm}.base_layer.{leaf}", shape) for leaf, shape in leaves]
            params += [(n, tuple(shapes[n])) for n in sorted(lora.pop(pm), key=lambda n: ".lora_B." in n)]
        elif pm in saved:
            params += [(f"{pm}.original_module.{leaf}", shape) for leaf, shape in leaves]
            params += [(f"{pm}.modules_to_save.{saved[pm]}.{leaf}", shape) for leaf, shape in leaves]
        else:
            params += [(f"{PREFIX}{module}.{leaf}" if module else PREFIX + leaf, shape) for leaf, shape in leaves]
    if lora:
        raise CheckpointError(f"LoRA module {next(iter(lora))!r} is not a parameter of {model.model_class}; cannot "
                              "name the optimizer state")
    for name, shape in params:
        if name in shapes and tuple(shapes[name]) != shape:
            raise CheckpointError(f"{name!r} is {list(shapes[name])} in the checkpoint but {list(shape)} in "
                                  f"{model.model_class}; cannot name the optimizer state")
    return ModelParams(tuple(params), _peft_fsdp1_units(model, [n for n, _ in params]), model.model_class)


def _peft_fsdp1_units(model: Any, names: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """FSDP1 units of the peft model as veRL's LoRA wrap policy makes them: the plain model's units (root, one per
    decoder layer), and every leaf module with a trainable weight (each `lora_A.<adapter>`, `lora_B.<adapter>` and
    `modules_to_save.<adapter>` copy) a unit of its own, nested where it stands. FlatParameters come in the order
    named_parameters visits their modules: a unit before the units nested in it, siblings in module order."""
    unit_of = {PREFIX + fqn: PREFIX + prefix if prefix else "" for prefix, members in model.units for fqn in members}
    owner: dict[str, str] = {}
    for name in names:
        m = re.search(r"^(.+\.(?:lora_[AB]|modules_to_save)\.[^.]+)\.[^.]+$", name)
        if m:
            owner[name] = m.group(1)
            continue
        plain = re.sub(r"\.(?:base_layer|original_module)(?=\.[^.]+$)", "", name)
        if plain not in unit_of:  # e.g. a modules_to_save copy of a module with children: units not known
            return ()
        owner[name] = unit_of[plain]
    members: dict[str, list[str]] = {}
    first: dict[str, int] = {}  # module -> the first parameter under it: where named_parameters enters it
    for i, name in enumerate(names):
        members.setdefault(owner[name], []).append(name)
        for at in (j for j, c in enumerate(name) if c == "."):
            first.setdefault(name[:at], i)
    # a unit's module before the units nested in it (same first parameter, fewer dots); the root first of all
    order = sorted(members, key=lambda u: (first[u], u.count(".")) if u else (-1, -1))
    return tuple((u, tuple(members[u])) for u in order)
