"""One options object for every command: merge, inspect, verify, push, watch and torchrun use it alike.

`MergeOptions` is frozen plain data. Callers build it once (the CLI from flags, the library from
keyword arguments) and every stage reads the fields it needs, so an option can never mean one thing
in `merge` and another in `verify`. `fingerprint_fields()` is what a resumed run must agree on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import dtypes
from .dtypes import DType

MAX_SHARD_SIZE = 5 * 10**9  # huggingface_hub's default ("5GB", decimal)
DEFAULT_BUFFER_SIZE = 64 * 2**20
UPLOAD_WORKERS = 5  # files a push uploads at once: huggingface_hub's upload_folder default
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
DTYPE_CHOICES = ("auto", "keep", "bfloat16", "float16", "float32")
OUTPUT_DTYPES = {"bfloat16": dtypes.bfloat16, "float16": dtypes.float16, "float32": dtypes.float32,
                 "bf16": dtypes.bfloat16, "fp16": dtypes.float16, "fp32": dtypes.float32, "half": dtypes.float16,
                 "float": dtypes.float32, "float64": dtypes.float64}
OPTIMIZER_FORMATS = ("safetensors", "torch")
LORA_MODES = ("both", "fold", "adapter")
CHECKSUMS = ("auto", "streams", "compare")  # where verify takes veRL rank files' zip CRC-32s from


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as huggingface_hub does); '64MiB' is binary."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"cannot read size {size!r}: use e.g. 5GB, 500MB or 64MiB")
    if not m.group(2) and "." in m.group(1):  # "1.5" was taken as 1 byte
        raise ValueError(f"size {size!r} is not a whole number of bytes: give a unit, e.g. {m.group(1)}GB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2) or "B"])


def resolve_dtype(option: str | DType | Any | None, hf_config: Mapping | None) -> DType | None:
    """--dtype: 'auto' uses the config's dtype, else keeps; 'keep' keeps; a name casts. None = keep.

    A dtype object (ours or a torch.dtype, read by name) is taken as is.
    """
    if option is not None and not isinstance(option, str):
        return dtypes.of(option)
    option = (option or "auto").lower().removeprefix("torch.")
    if option == "keep":
        return None
    if option == "auto":
        cfg = hf_config if isinstance(hf_config, Mapping) else {}
        named = cfg.get("dtype") or cfg.get("torch_dtype")
        return OUTPUT_DTYPES.get(str(named).replace("torch.", "")) if isinstance(named, str) else None
    if option not in OUTPUT_DTYPES:
        raise ValueError(f"unknown dtype {option!r}: use {', '.join(DTYPE_CHOICES)}")
    return OUTPUT_DTYPES[option]


@dataclass(frozen=True)
class MergeOptions:
    """Everything that decides what a merge writes, and how it runs.

    Sizes are stored in bytes (`MergeOptions.create` parses "5GB"); `dtype` stays the user's word
    ("auto", "keep", "bfloat16", ...) until the checkpoint's config resolves it.
    """

    dtype: str = "auto"
    max_shard_size: int = MAX_SHARD_SIZE
    optimizer: bool = True
    optimizer_format: str = "safetensors"
    trust_pickle: bool = False
    model_name: str | None = None  # config and tokenizer from this folder or Hub model
    lora: str = "both"  # LoRA checkpoints: fold the adapter in, export it, or both
    lora_rank: int | None = None  # r and alpha when the checkpoint does not record them
    lora_alpha: float | None = None
    lora_rslora: bool | None = None  # rsLoRA (alpha/sqrt(r)) when the checkpoint does not record it
    base_model: str | None = None  # adapter-only checkpoints: the base weights (folder or Hub model)
    key_prefix: str | None = None  # DCP: strip this prefix from keys ("model."); None: detect
    weights_only: bool = False  # without a config: write the weights alone, a folder transformers cannot load
    # tensors written in float32 where dtype would round them; None: those transformers keeps in float32 (a merge
    # records the names it kept, and verify replays them)
    float32_names: tuple[str, ...] | None = None
    # how it runs (not part of the fingerprint)
    workers: int | None = None
    buffer_size: int = DEFAULT_BUFFER_SIZE
    drop_cache: bool = True
    progress: bool = False

    RUNTIME = ("workers", "buffer_size", "drop_cache", "progress", "trust_pickle", "weights_only")

    def __post_init__(self) -> None:
        if self.optimizer_format not in OPTIMIZER_FORMATS:
            raise ValueError(f"optimizer format {self.optimizer_format!r}: use one of {', '.join(OPTIMIZER_FORMATS)}")
        if self.lora not in LORA_MODES:
            raise ValueError(f"--lora {self.lora!r}: use one of {', '.join(LORA_MODES)}")
        if self.max_shard_size <= 0:
            raise ValueError(f"max_shard_size (--max-shard-size) {self.max_shard_size}: give more than 0 bytes")
        if self.buffer_size <= 0:  # 0 was taken, and ran in the smallest windows there are
            raise ValueError(f"buffer_size (--buffer-size) {self.buffer_size}: give more than 0 bytes")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers (--workers) {self.workers}: give 1 or more")
        memory = _physical_memory()
        if memory and self.buffer_size > memory:
            raise ValueError(f"buffer_size (--buffer-size) {self.buffer_size} is more than this machine's memory "
                             f"({memory} bytes); "
                             "the default 64MiB runs at disk speed")

    @classmethod
    def create(cls, options: MergeOptions | None = None, **kwargs: Any) -> MergeOptions:
        """Options from keyword arguments (sizes as "5GB" or bytes, a dtype as a name or dtype object),
        applied over `options`. Unknown names raise TypeError, as a misspelt argument should."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown merge option(s) {', '.join(unknown)}")
        for key in ("max_shard_size", "buffer_size"):
            if key in kwargs and kwargs[key] is not None:
                kwargs[key] = parse_size(kwargs[key])
        if "dtype" in kwargs:
            kwargs["dtype"] = dtype_word(kwargs["dtype"])
        prefix = kwargs.get("key_prefix")
        if prefix is not None and (not isinstance(prefix, str) or not prefix.strip(".")):
            raise ValueError(f"key_prefix (--key-prefix) {prefix!r}: give the name of the container that holds the "
                             "model's tensors (model, app.model), or leave it out to read the saved dict's nesting")
        if kwargs.get("float32_names") is not None:
            if isinstance(kwargs["float32_names"], str) or \
                    not all(isinstance(n, str) for n in kwargs["float32_names"]):
                raise ValueError("float32_names must be a list of tensor names")
            kwargs["float32_names"] = tuple(sorted(set(kwargs["float32_names"])))
        given = {k: v for k, v in kwargs.items() if v is not None or k in ("workers", "model_name", "base_model",
                                                                         "lora_rank", "lora_alpha", "lora_rslora",
                                                                         "key_prefix")}
        return dataclasses.replace(options or cls(), **given)

    def replace(self, **kwargs: Any) -> MergeOptions:
        return MergeOptions.create(self, **kwargs)

    def fingerprint_fields(self) -> dict[str, Any]:
        """The options a resumed run must share with the run it resumes (how it runs does not count)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME}
        del fields["float32_names"]  # the plan records the names it kept, where it kept any (MergePlan.record)
        return fields


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def dtype_word(dtype: str | DType | Any | None) -> str:
    """The user's dtype choice as a word: None -> "keep", torch.bfloat16 -> "bfloat16"."""
    if dtype is None:
        return "keep"
    if isinstance(dtype, str):
        word = dtype.lower().removeprefix("torch.")
        return word if word in ("auto", "keep") else dtypes.of(word).name
    return dtypes.of(dtype).name


def env_seconds(name: str, default: float, what: str) -> float:
    """A number of seconds from the environment variable `name` (`default` where unset): above 0 and finite, else a
    one-line ConfigError naming the variable (a float() of "inf" would overflow a timer later, "nan" never fire)."""
    from .errors import ConfigError

    text = os.environ.get(name) or str(default)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < 10**9:
        raise ConfigError(f"{name}={text!r} is not a number of seconds above 0 ({what}; the default is {default:g})")
    return seconds
