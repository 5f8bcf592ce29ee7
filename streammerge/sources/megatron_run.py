"""What a Megatron run recorded about its model, checked against the config.json the merge writes.

The tensors of a Megatron checkpoint do not say everything about the model: 8 heads of 4 dims and 4
KV heads give the shapes of 4 heads of 8 and 2 query groups (and split the fused QKV rows wrongly),
and the norm epsilon, rope base and scaling, activation and router settings change what the model
computes without changing a shape. Where the run recorded its settings, config.json must agree:

- Megatron-LM keeps its `args` (an `argparse.Namespace`) in the common state: the legacy `common.pt`
  file of the checkpoint folder, which Megatron reads first where it exists, else the
  `common_state/shard_0_1` bytes item of the DCP. It is read by `inert_loads`: every global the
  pickle names becomes a record of ours holding its name, arguments and state; nothing is imported or
  called, whatever the pickle names (args hold torch dtypes, enums, functions).
- veRL's Megatron backend writes the run's `TransformerConfig` as `transformer_config.json` beside the
  checkpoint (the actor folder, above `dist_ckpt/` or `model/dist_ckpt/`).

Each becomes a `Recorded` of the same settings (Megatron's names kept for the messages); a setting
that differs from config.json, or that no transformers model of this type has (LayerNorm, zero-centred
gamma, positions other than rope, interleaved or partial rope, sliding windows, sigmoid routers...),
stops the merge in one line naming both values. A plain `dist_checkpointing.save` records none of
this: there the config must be the run's (the README says so).
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from .. import jsonfile
from ..errors import CheckpointError, ConfigError, StreammergeError, UnsupportedLayoutError
from .picklescan import deep_stack, nesting_bound, oversized_memo
from .torchzip import read_directory, read_record

if TYPE_CHECKING:
    from .dcp import DcpCheckpoint
    from .megatron import Arch

RECORDED_CONFIG = "transformer_config.json"  # veRL's Megatron backend saves the run's TransformerConfig here
COMMON_FILE = "common.pt"  # megatron-core's legacy common state (newer saves: the common_state bytes item)
COMMON_KEY = "common_state/shard_0_1"

# transformers' defaults where config.json leaves a setting out (tests compare them with transformers' classes)
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    "qwen2": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    "qwen3": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    "qwen3_moe": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_experts_per_tok": 8, "norm_topk_prob": False},
    "mixtral": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_experts_per_tok": 2},
}
# Megatron's llama3 rope scaling (RotaryEmbedding._apply_scaling): only the factor is an argument
_MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# ---------------------------------------------------------------- an unpickler that runs nothing

class Record:
    """A global a recorded pickle names, or an object built from one: the name, the arguments, the state."""

    module = ""
    qualname = ""
    args: tuple[Any, ...]
    state: Any
    items: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Record:
        o = object.__new__(cls)
        o.args, o.state, o.items = args, None, []
        return o

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)


class _Inert(pickle.Unpickler):
    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self._classes: dict[tuple[str, str], type[Record]] = {}

    def find_class(self, module: str, name: str) -> type[Record]:
        """A class of ours named after the global (one per name), never the global itself: nothing is imported.

        Python 2 names (protocols 0-2 write `copy_reg`, `__builtin__`) get their Python 3 names, as pickle does."""
        key = (str(module), str(name))
        key = _compat_pickle.NAME_MAPPING.get(key) or (_compat_pickle.IMPORT_MAPPING.get(key[0], key[0]), key[1])
        if key not in self._classes:
            self._classes[key] = type("Record", (Record,), {"module": key[0], "qualname": key[1]})
        return self._classes[key]

    def persistent_load(self, pid: Any) -> Record:  # a tensor's storage: not read
        return self.find_class("<persistent>", "storage")(pid)


def inert_loads(data: bytes) -> Any:
    """Unpickle `data` into plain containers and `Record`s; raises pickle.UnpicklingError on a broken pickle."""
    why = oversized_memo(data)
    if why:
        raise pickle.UnpicklingError(why)
    try:
        return deep_stack(_Inert(data).load, nesting_bound(data))
    except pickle.UnpicklingError:
        raise
    except CheckpointError as e:  # no thread to unpickle it on
        raise pickle.UnpicklingError(str(e)) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, OverflowError,
            RecursionError) as e:
        raise pickle.UnpicklingError(f"{type(e).__name__}: {e}") from None


def global_name(value: Any) -> str | None:
    """`module.name` of a global the pickle named (a dtype, a function), or None for anything else."""
    if isinstance(value, type) and issubclass(value, Record):
        return f"{value.module}.{value.qualname}"
    return None


def namespace_fields(value: Any) -> dict[str, Any] | None:
    """The attributes of a pickled `argparse.Namespace` (any protocol), or None if `value` is not one."""
    if isinstance(value, Record) and (value.module, value.qualname) == ("copyreg", "_reconstructor"):
        cls = value.args[0] if value.args else None  # protocols 0 and 1: _reconstructor(cls, object, None)
        ok = global_name(cls) == "argparse.Namespace"
    else:
        ok = isinstance(value, Record) and (value.module, value.qualname) == ("argparse", "Namespace")
    if not ok:
        return None
    state = value.state
    if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
        state = {**(state[0] or {}), **(state[1] or {})}
    # getattr reaches only string names; str() of another key could recurse past the limit (a tuple nested deep)
    return {k: v for k, v in state.items() if isinstance(k, str)} if isinstance(state, dict) else {}


# ---------------------------------------------------------------- what the run recorded

@dataclass(frozen=True)
class Recorded:
    """One record of the run's settings: our names -> (Megatron's name, value), where it was read."""

    settings: dict[str, tuple[str, Any]]
    where: str


def common_state(folder: Path, ck: DcpCheckpoint) -> tuple[Any, str] | None:
    """The checkpoint's common state and where it was read (Megatron's order: common.pt first), or None."""
    legacy = folder / COMMON_FILE
    where = str(legacy)
    try:
        if legacy.is_file():
            d = read_directory(legacy)
            return inert_loads(read_record(d, "data.pkl")), where
        if COMMON_KEY not in ck.bytes_items:
            return None
        where = f"{ck.bytes_items[COMMON_KEY][0]} ({COMMON_KEY})"
        value = inert_loads(ck.read_pickle(COMMON_KEY))
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{where}: the run's common state cannot be read ({e}); without it the settings the "
                              "run recorded cannot be checked: not merged") from None
    except StreammergeError as e:
        raise CheckpointError(f"{e}; it holds the settings the run recorded, which must be checked: not merged") \
            from None
    # the common_state item holds [dict] (a ShardedObject's list); common.pt the dict itself
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value, where


def megatron_lm_args(args: Mapping[str, Any], where: str) -> Recorded:
    """Megatron-LM's args, in our names (old and new spellings: norm_epsilon / layernorm_epsilon, ...)."""
    s: dict[str, tuple[str, Any]] = {}

    def take(ours: str, *names: str) -> None:
        for n in names:
            if n in args:
                s[ours] = (n, args[n])
                return

    take("layers", "num_layers")
    take("hidden", "hidden_size")
    take("heads", "num_attention_heads")
    if args.get("group_query_attention") is False:  # Megatron-LM ignores num_query_groups then: one per head
        s["groups"] = ("num_attention_heads (no group_query_attention)", args.get("num_attention_heads"))
    else:
        take("groups", "num_query_groups")
    take("head_dim", "kv_channels")
    take("ffn", "ffn_hidden_size")
    take("eps", "layernorm_epsilon", "norm_epsilon")
    take("normalization", "normalization")
    take("zero_centered", "apply_layernorm_1p", "layernorm_zero_centered_gamma")
    if "swiglu" in args:
        act = ("swiglu" if args.get("swiglu") else "squared_relu" if args.get("squared_relu")
               else "quick_geglu" if args.get("quick_geglu") else "gelu")
        s["activation"] = ("swiglu", act)
    take("position_embedding", "position_embedding_type")
    take("rope_theta", "rotary_base")
    take("rope_scaling", "use_rope_scaling")
    if "rope_scaling" not in s and "rotary_base" in args:  # Megatron-LM before --use-rope-scaling: none
        s["rope_scaling"] = ("use_rope_scaling (not in the args: off)", False)
    take("rope_scaling_factor", "rope_scaling_factor")
    take("rotary_percent", "rotary_percent")
    take("rotary_interleaved", "rotary_interleaved")
    take("rope_interpolation", "rotary_seq_len_interpolation_factor")
    take("no_rope", "no_rope_freq")
    take("window", "window_size")
    take("qkv_bias", "add_qkv_bias")
    take("qk_norm", "qk_layernorm")
    take("experts", "num_experts", "num_moe_experts")
    take("topk", "moe_router_topk")
    take("expert_ffn", "moe_ffn_hidden_size")
    take("score_function", "moe_router_score_function")
    take("pre_softmax", "moe_router_pre_softmax")
    take("topk_scaling", "moe_router_topk_scaling_factor")
    return Recorded(s, where)


def _transformer_config(tc: Mapping[str, Any], where: str) -> Recorded:
    """veRL's transformer_config.json (Megatron-Core's TransformerConfig fields), in our names."""
    names = {"layers": "num_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
             "groups": "num_query_groups", "head_dim": "kv_channels", "ffn": "ffn_hidden_size",
             "eps": "layernorm_epsilon", "normalization": "normalization",
             "zero_centered": "layernorm_zero_centered_gamma", "rotary_interleaved": "rotary_interleaved",
             "no_rope": "no_rope_freq", "window": "window_size", "qkv_bias": "add_qkv_bias",
             "qk_norm": "qk_layernorm", "experts": "num_moe_experts", "topk": "moe_router_topk",
             "expert_ffn": "moe_ffn_hidden_size", "score_function": "moe_router_score_function",
             "pre_softmax": "moe_router_pre_softmax", "topk_scaling": "moe_router_topk_scaling_factor"}
    s = {ours: (n, tc[n]) for ours, n in names.items() if n in tc}
    if s.get("groups", ("", None))[1] is None and "num_attention_heads" in tc:  # None: one group per head
        s["groups"] = ("num_attention_heads (num_query_groups null)", tc["num_attention_heads"])
    if "gated_linear_unit" in tc:  # the activation function itself is not in the JSON
        s["gated"] = ("gated_linear_unit", tc["gated_linear_unit"])
    return Recorded(s, where)


def recorded(folder: Path, ck: DcpCheckpoint) -> list[Recorded]:
    """Every record of the run's settings found with the checkpoint in `folder`."""
    out = []
    common = common_state(folder, ck)
    if common is not None and isinstance(common[0], dict) and "args" in common[0]:
        args = namespace_fields(common[0]["args"])
        if args is None:
            raise CheckpointError(f"{common[1]}: the run's args are not an argparse.Namespace "
                                  f"({type(common[0]['args']).__name__}); its settings cannot be checked: not merged")
        out.append(megatron_lm_args(args, f"{common[1]} (Megatron-LM args)"))
    path = next((d / RECORDED_CONFIG for d in (folder, *folder.parents[:2]) if (d / RECORDED_CONFIG).is_file()), None)
    if path is not None:
        out.append(_transformer_config(jsonfile.read_object(path), str(path)))
    return out


# ---------------------------------------------------------------- config.json against the record

def _number(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def rope_of(cfg: Mapping[str, Any], model_type: str) -> tuple[Any, dict[str, Any]]:
    """(rope theta, the scaling: {} or {"rope_type": ..., ...}) as transformers 5 and 4 spell them."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]  # per layer type
    params = params if isinstance(params, dict) else {}
    theta = params.get("rope_theta", cfg.get("rope_theta", DEFAULTS[model_type]["rope_theta"]))
    scaling = dict(cfg.get("rope_scaling") or {}) if isinstance(cfg.get("rope_scaling"), dict) else {}
    scaling.update({k: v for k, v in params.items() if k != "rope_theta"})
    kind, old = scaling.pop("rope_type", None), scaling.pop("type", None)
    kind = kind or old
    return theta, ({"rope_type": kind, **scaling} if kind not in (None, "default") else {})


def check(a: Arch, cfg: Mapping[str, Any], records: list[Recorded], where: str) -> None:
    """config.json (`cfg`, the text config) against each record of the run; raises on the first difference."""
    for r in records:
        _check_one(a, cfg, r, where)


def _check_one(a: Arch, cfg: Mapping[str, Any], r: Recorded, where: str) -> None:
    s = r.settings

    def differs(ours: str, hf_key: str, hf_value: Any, saved: str | None = None) -> None:
        """`saved`: the recorded value as the message shows it, where its own repr would not say enough."""
        name, value = s[ours]
        raise ConfigError(f"{where}: gives {hf_key} {_show(hf_value)}, but the run recorded {name} "
                          f"{_show(value) if saved is None else saved} in {r.where}; give the run's own config "
                          "with --model-name")

    def unsupported(ours: str, why: str) -> None:
        name, value = s[ours]
        raise UnsupportedLayoutError(f"{r.where}: the run recorded {name} {_show(value)} ({why}); a transformers "
                                     f"{a.model_type} model computes otherwise, so the merged weights would not "
                                     "load as the trained model: not merged")

    def value(ours: str) -> Any:
        return s[ours][1] if ours in s else None

    def compare(ours: str, hf_key: str, hf_value: Any, *, when: bool = True) -> None:
        """A number the run recorded (absent or null: not recorded) against config.json's."""
        v = value(ours)
        if not when or v is None:
            return
        if not _number(v) or not _number(hf_value):
            raise ConfigError(f"{where}: gives {hf_key} {_show(hf_value)}, and the run recorded {s[ours][0]} "
                              f"{_show(v)} in {r.where}: not two numbers to compare; give the run's own config "
                              "with --model-name")
        if not math.isclose(v, hf_value, rel_tol=1e-6):
            differs(ours, hf_key, hf_value)

    # sizes: shapes cannot tell every head layout apart
    compare("layers", "num_hidden_layers", a.layers)
    compare("hidden", "hidden_size", a.hidden)
    compare("heads", "num_attention_heads", a.heads)
    compare("groups", "num_key_value_heads", a.groups)
    compare("head_dim", "head_dim", a.head_dim)
    compare("ffn", "intermediate_size", a.ffn, when=not a.experts)

    # norms
    defaults = DEFAULTS[a.model_type]
    if value("normalization") is not None and value("normalization") != "RMSNorm":
        unsupported("normalization", "the model's norms are RMSNorm")
    if value("zero_centered"):
        unsupported("zero_centered", "norm weights stored as gamma - 1")
    compare("eps", "rms_norm_eps", cfg.get("rms_norm_eps", defaults["rms_norm_eps"]))

    # activation: every mapped architecture is a SiLU-gated MLP
    act = cfg.get("hidden_act", "silu")
    if value("activation") is not None and value("activation") != "swiglu":
        differs("activation", "hidden_act", act, saved=f"False ({value('activation')})")
    if "gated" in s and value("gated") is not True:
        unsupported("gated", "the model's MLP is gated")
    if act != "silu" and "activation" in s:
        raise ConfigError(f"{where}: gives hidden_act {_show(act)}, but the run trained a SwiGLU MLP (SiLU) "
                          f"({r.where}); give the run's own config with --model-name")
    if act != "silu" and "gated" in s:
        raise UnsupportedLayoutError(f"{where}: gives hidden_act {_show(act)}; the run recorded a gated MLP but not "
                                     f"its activation function ({r.where}), and the mapped models' is SiLU: "
                                     "not merged")

    # positions
    pos = value("position_embedding")
    if pos is not None and pos != "rope":
        unsupported("position_embedding", "the model uses rope")
    theta, scaling = rope_of(cfg, a.model_type)
    compare("rope_theta", "rope theta", theta)
    if value("rotary_percent") is not None and value("rotary_percent") != 1.0:
        unsupported("rotary_percent", "rope on part of each head")
    if value("rotary_interleaved"):
        unsupported("rotary_interleaved", "interleaved rope pairs")
    if value("rope_interpolation") not in (None, 1):
        unsupported("rope_interpolation", "positions interpolated")
    if value("no_rope") is not None:
        unsupported("no_rope", "layers without rope")
    if value("window") is not None:
        unsupported("window", "sliding-window attention")
    if "rope_scaling" in s:  # Megatron's llama3 scaling: only the factor is a setting
        kind = scaling.get("rope_type")
        if not value("rope_scaling") and kind is not None:
            differs("rope_scaling", "rope_type", kind)
        if value("rope_scaling"):
            factor = value("rope_scaling_factor") if "rope_scaling_factor" in s else 8.0
            if kind != "llama3":
                differs("rope_scaling", "rope_type", kind or "default", saved=f"True (llama3, factor {_show(factor)})")
            for key, v in {"factor": factor, **_MEGATRON_LLAMA3}.items():
                got = scaling.get(key)
                if not (_number(got) and _number(v) and math.isclose(got, v, rel_tol=1e-9)):
                    differs("rope_scaling", f"rope scaling {key}", got,
                            saved=f"True (Megatron's llama3 scaling: {key} {_show(v)})")

    # attention parts the weights have too, but that the table could map otherwise
    if value("qkv_bias") is not None and bool(value("qkv_bias")) != (a.model_type == "qwen2"):
        if value("qkv_bias"):
            unsupported("qkv_bias", "of the mapped models only Qwen2 has q/k/v biases without an o_proj bias")
        differs("qkv_bias", "model_type", a.model_type)
    if value("qk_norm") is not None and bool(value("qk_norm")) != (a.model_type in ("qwen3", "qwen3_moe")):
        differs("qk_norm", "model_type", a.model_type)

    # MoE
    experts = value("experts")
    if "experts" in s and (experts if _number(experts) else 0) != a.experts:
        if not a.experts:
            differs("experts", "model_type", a.model_type)
        differs("experts", "num_experts" if a.model_type == "qwen3_moe" else "num_local_experts", a.experts)
    if a.experts and _number(experts):
        topk = cfg.get("num_experts_per_tok", defaults["num_experts_per_tok"])
        compare("topk", "num_experts_per_tok", topk)
        compare("expert_ffn", "moe_intermediate_size" if a.model_type == "qwen3_moe" else "intermediate_size",
                a.expert_ffn)
        if value("score_function") not in (None, "softmax"):
            unsupported("score_function", "the router is a softmax")
        if value("topk_scaling") not in (None, 1, 1.0):
            unsupported("topk_scaling", "routing weights scaled")
        normalized = cfg.get("norm_topk_prob", defaults.get("norm_topk_prob")) if a.model_type == "qwen3_moe" else True
        pre = value("pre_softmax")
        if pre is not None and bool(pre) == bool(normalized):  # pre-softmax: weights over all experts, not renormed
            differs("pre_softmax", "norm_topk_prob" if a.model_type == "qwen3_moe" else "model_type",
                    normalized if a.model_type == "qwen3_moe" else "mixtral (top-k weights renormalised)")


def _show(v: Any) -> str:
    """A recorded value as a message shows it; containers a few levels deep at most (the unpickler builds any depth,
    which str would recurse through past Python's limit)."""
    if isinstance(v, dict) and not all(isinstance(k, (str, int, float)) for k in v):
        v = list(v.items())  # reprlib looks each key up again, hashing a tuple key as deep as it nests
    if isinstance(v, (tuple, list, dict, set, frozenset)):
        return reprlib.repr(v)[:60]
    return (repr(v) if isinstance(v, str) else str(v))[:60]


__all__ = ["COMMON_FILE", "COMMON_KEY", "DEFAULTS", "RECORDED_CONFIG", "Record", "Recorded", "check", "common_state",
           "global_name", "inert_loads", "megatron_lm_args", "namespace_fields", "recorded", "rope_of"]
