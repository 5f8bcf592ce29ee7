"""The model folder: config (read as JSON, written with the output dtype), tokenizer and the other small files.

Config and tokenizer come from the checkpoint's `huggingface/` folder, or from `--model-name` (a
local folder, or a Hub model of which only config and tokenizer files are fetched). Nothing here
imports transformers or runs code from the folder: `config.json` is read as JSON, and what a model
class would decide (does it tie its embeddings?) comes from a table of transformers' defaults.
Files are never followed through links that leave their folder.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from . import jsonfile
from .dtypes import DType
from .errors import CheckpointError, ConfigError
from .paths import user_path, walk

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
GENERATION_CONFIG = "generation_config.json"
DTYPE_KEYS = ("dtype", "torch_dtype")  # both spellings of config.json's dtype that transformers has used
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# What a model name contributes to the merged folder: config, generation config, tokenizer, remote code.
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                       "added_tokens.json", "vocab*", "merges.txt", "chat_template*", "*.tiktoken",
                       "spiece.model", "*.py")

# transformers' default `tie_word_embeddings` per model type, for configs that do not say
# (save_pretrained leaves the key out when it equals the defaults). Unknown types: keep both tensors.
TIE_DEFAULTS = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next", "phi",
                     "phi3", "olmo", "olmo2", "deepseek_v2", "deepseek_v3", "granite", "gpt_neox", "stablelm", "glm",
                     "glm4", "glm4_moe", "gpt_oss", "seed_oss", "hunyuan_v1_dense", "exaone4", "apertus", "arcee",
                     "dots1", "llama4_text", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"), False),
    **dict.fromkeys(("gemma", "gemma2", "gemma3", "gemma3_text", "gpt2", "starcoder2", "falcon", "opt", "bloom",
                     "cohere", "ernie4_5", "smollm3", "mistral3"), True),
}


def read_config(model_dir: Path | None) -> dict | None:
    """config.json as a dict, or None when there is none; one-line errors for a file that is not a JSON object."""
    if model_dir is None:
        return None
    path = model_dir / "config.json"
    if not path.is_file():
        if os.path.lexists(path):  # reading a pipe would wait for ever
            raise CheckpointError(f"{path}: not a file (a link to nothing, a pipe or a device); replace it with the "
                                  "file itself")
        return None
    return jsonfile.read_object(path)  # Infinity and NaN as transformers reads them (4.x wrote them so)


def read_generation_config(model_dir: Path | None) -> dict | None:
    """generation_config.json as a dict, or None when there is none. One that is not a JSON object is refused:
    transformers ignores a file it cannot parse (the model then generates with other settings, silently) and fails
    on one that is no object."""
    if model_dir is None or not (model_dir / GENERATION_CONFIG).is_file():
        return None
    try:
        return jsonfile.read_object(model_dir / GENERATION_CONFIG)
    except CheckpointError as e:
        raise ConfigError(f"{e}: transformers would load the model without it, generating otherwise than it was set "
                          "up to, or not load it at all; fix the file, or remove it") from None


def ties_embeddings(config: Mapping | None) -> bool:
    """Whether the model ties its output embedding to its input embedding; False when unsure (keeps both)."""
    cfg: dict[str, Any] = dict(config or {})
    text_cfg: dict[str, Any] = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else {}
    for c in (cfg, text_cfg):
        if isinstance(c.get("tie_word_embeddings"), bool):
            return c["tie_word_embeddings"]
    for c in (text_cfg, cfg):
        if c.get("model_type") in TIE_DEFAULTS:
            return TIE_DEFAULTS[c["model_type"]]
    return False


def drop_quantization(config: dict) -> list[tuple[str, Any]]:
    """Take every `quantization_config` out of `config`, the top level's and a sub-config's (a VLM's text_config, which
    transformers reads too: `get_text_config(decoder=True)`); returns (where, value) of each, e.g.
    ("text_config.quantization_config", {...})."""
    found: list[tuple[str, Any]] = []

    def walk(node: dict, where: str) -> None:
        if "quantization_config" in node:
            found.append((where + "quantization_config", node.pop("quantization_config")))
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{where}{key}.")

    walk(config, "")
    return found


# What a writer of config.json adds or spells its own way: no difference in the model.
_WRITER_KEYS = ("transformers_version", "_name_or_path")


def config_differences(given: Mapping[str, Any], own: Mapping[str, Any], where: str = "") -> list[str]:
    """The keys (sub-configs' as `text_config.key`) whose values differ between two config.json files, each as
    `key (given value, own value)`; a key only one of them has counts (its class default is not known here)."""
    found = []
    for key in sorted(set(given) | set(own)):
        if key in _WRITER_KEYS:
            continue
        a, b = given.get(key, _ABSENT), own.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            found += config_differences(a, b, f"{where}{key}.")
        elif a != b:
            found.append(f"{where}{key} ({_short(a)}, {_short(b)})")
    return found


_ABSENT = object()


def _short(value: Any) -> str:
    text = "absent" if value is _ABSENT else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def carried_files(model_dir: Path | None, root: Path | None = None,
                  keep: Callable[[Path], bool] = lambda p: True) -> Iterator[Path]:
    """Every file of the model folder except weights (which we write ourselves), hidden files and folders
    (`.env`, `.git/`, `.cache/`: secrets and tool state, not the model) and `__pycache__/`.

    A link is followed only where it stays inside `root` (the checkpoint, or the folder itself):
    a `huggingface/` file linking to `/etc/passwd` or a home folder must not end up on the Hub.
    """
    if model_dir is None:
        return
    root = (root or model_dir).resolve()
    for p in sorted(walk(model_dir)):
        if p.name.endswith(WEIGHT_SUFFIXES) or p.name in WEIGHT_INDEXES or p.is_dir():
            continue
        if any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(model_dir).parts):
            continue
        if not keep(p):
            continue
        if not p.is_file():  # left out, the folder would load without it (a tokenizer.json, a chat template)
            raise CheckpointError(f"{p}: not a file (a link to nothing, a pipe or a device); replace it with the "
                                  "file itself, or remove it")
        target = p.resolve()
        if target != root and root not in target.parents:
            raise CheckpointError(f"{p}: links outside {root} (to {target}); streammerge does not copy files "
                                  "from outside the checkpoint: replace the link with the file itself")
        yield p


def config_bytes(config: dict, dtype: DType | None) -> bytes:
    """config.json naming the dtype we wrote (both spellings transformers has used, where present)."""
    config = dict(config)
    if dtype is not None:
        keys = [k for k in DTYPE_KEYS if k in config] or ["torch_dtype"]
        for k in keys:
            config[k] = dtype.name
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def hub_id(name: str | None) -> str | None:
    """The Hub model `name` stands for, or None: a Hub id itself (not a local folder), or the repo of a Hub cache
    snapshot (`.../models--org--name/snapshots/rev`, on this machine or the training one). The card's
    `base_model` must be such an id (the Hub refuses a card whose metadata names a path); a local folder
    elsewhere names nothing public."""
    if not name:
        return None
    parts = PurePosixPath(name.replace("\\", "/")).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            repo = parts[i - 1].removeprefix("models--").replace("--", "/", 1)
            return repo if _is_model_id(repo) else None
    if not _is_model_id(name):
        return None
    try:
        here = Path(name).exists()
    except (OSError, ValueError):
        return None
    return None if here else name


def _is_model_id(name: str) -> bool:
    """A name the Hub takes as a model id (huggingface_hub's own rule: a path, `~user`, `--`, `.git` are none)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_snapshot(name: str, what: str, patterns: Iterable[str], fetched: str, *, token: str | None = None,
                 endpoint: str | None = None) -> Path:
    """The snapshot folder of Hub model `name`, only the files matching `patterns` fetched (never code run), or a
    one-line ConfigError: a name the Hub takes as no model id is a missing local folder."""
    if not _is_model_id(name):
        raise ConfigError(f"{what} {name!r}: no such folder (and not a Hub model id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=list(patterns), token=token,
                                      endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None))
    except Exception as e:  # offline, not found, no access: all mean "give a local folder"
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ConfigError(f"{what} {name!r}: not a local folder, and {fetched} could not be fetched from the Hub "
                          f"({first})") from None


def model_dir_for(model_name: str, *, token: str | None = None, endpoint: str | None = None) -> tuple[Path, Path]:
    """(folder with config and tokenizer, root that links may point into) for a local folder or a Hub model.

    A local folder is read as is. A Hub name is fetched with huggingface_hub into its cache, limited
    to MODEL_FILE_PATTERNS: never the weights, never code run (files are only copied).
    """
    local = user_path(model_name)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model_name {model_name!r}: no config.json in {local}")
        folder = local.resolve()
        if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
            return folder, folder.parent.parent  # a Hub cache snapshot: its files link into the repo's blobs/
        return folder, folder
    snap = hub_snapshot(model_name, "model_name", MODEL_FILE_PATTERNS, "its config and tokenizer", token=token,
                        endpoint=endpoint)
    if not (snap / "config.json").is_file():
        raise ConfigError(f"model_name {model_name!r}: the Hub model has no config.json")
    return snap, snap.parent.parent  # the cache's snapshots/<rev>/ link into the repo's blobs/


# DeepSpeed's scripts, which it writes into every save folder (the HF Trainer's checkpoint-N/ too): not model code
NOT_MODEL_FILES = ("zero_to_fp32.py", "zero_to_torch.py")


def model_files(model_dir: Path, root: Path) -> Iterator[Path]:
    """The config and tokenizer files of a model given by name (not its weights or anything else)."""
    yield from carried_files(model_dir, root, keep=lambda p: p.parent == model_dir and p.name not in NOT_MODEL_FILES
                             and any(fnmatch.fnmatchcase(p.name, pat) for pat in MODEL_FILE_PATTERNS))


# ---------------------------------------------------------------- buffers older transformers saved

# Buffers that older transformers saved with the weights and current transformers computes itself and never reads
# from a checkpoint: a rotary embedding's inverse frequencies (a non-persistent buffer, built from config.json), GPT-2's
# and GPT-J's causal mask and its fill value (ignored on load, or gone). Each by the shape it has: a real bias is 1-D.
_LEGACY_BUFFERS = re.compile(r"(?:^|\.)(?:rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


def legacy_buffers(config: Mapping | None, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The names of such buffers among the weights, which the merge leaves out as save_pretrained does: transformers
    loads the same model with or without them (it builds them from config.json), and the architecture check then
    shows the model has exactly the rest (a model that did have one as a persistent buffer would miss it, and the
    merge would be refused). None without a config (nothing would load them as a model) or with `auto_map` (the
    checkpoint's own code, which may keep them, is not asked)."""
    text = config.get("text_config") if config else None
    if not config or config.get("auto_map") or (isinstance(text, dict) and text.get("auto_map")):
        return []
    found = []
    for name, shape in shapes.items():
        if not _LEGACY_BUFFERS.search(name):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (leaf == "inv_freq" and len(shape) == 1 or leaf == "masked_bias" and len(shape) <= 1 and
                all(n == 1 for n in shape) or leaf == "bias" and len(shape) == 4 and shape[:2] == (1, 1) and
                shape[2] == shape[3]):
            found.append(name)
    return found


# ---------------------------------------------------------------- does the config describe these weights?

_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
# Keys that change what another key means: the embedding is projected (OPT, ALBERT), the vocabulary padded.
_EMBED_WIDTH_KEYS = ("word_embed_proj_dim", "embedding_size")
_MTP_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers")  # extra decoder layers saved


def check_config_fits(config: Mapping | None, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Refuse a config that does not describe these weights (transformers would load them as another model).

    Torch-free and structural, and only where both sides say something: a key absent from config.json
    (transformers then takes its class default, which we do not know) and names that give no rule say
    nothing, and a config with `auto_map` is read by its own code, so it is not judged at all. The
    rules, for the text decoder the input embedding belongs to (not a vision tower beside it):
    the embedding is vocab_size x hidden_size, the decoder has num_hidden_layers layers (plus any
    multi-token-prediction layers), attention and MLP inputs are hidden_size wide, a dense MLP's
    down projection is intermediate_size wide. Raises ConfigError naming the first contradiction.
    """
    if not config or config.get("auto_map"):
        return
    text = config.get("text_config")
    cfg: Mapping = text if isinstance(text, dict) else config
    if cfg.get("auto_map"):
        return
    embed = next((n for n in shapes if n.endswith(_INPUT_EMBEDDINGS) and len(shapes[n]) == 2), None)
    if embed is None:
        return
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model")
    vocab = _int(cfg, "padded_vocab_size", "vocab_size")
    rows, width = shapes[embed]
    embed_width = _int(cfg, *_EMBED_WIDTH_KEYS) or (None if any(k in cfg for k in _EMBED_WIDTH_KEYS) else hidden)
    if embed_width is not None and width != embed_width:
        _mismatch(where, f"{embed} is {width} wide but the config's hidden_size is {embed_width}")
    if vocab is not None and rows != vocab:
        _mismatch(where, f"{embed} has {rows} rows but the config's vocab_size is {vocab}")

    prefix = embed[: embed.rindex(".", 0, len(embed) - len(".weight")) + 1]  # "model." of model.embed_tokens.weight
    layer = re.compile(re.escape(prefix) + r"(?:layers|h)\.(\d+)\.(.*)$")  # h: GPT-2, BLOOM, Falcon
    decoder = {m.group(1, 2): n for n in shapes for m in [layer.match(n)] if m}
    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    seen = {int(i) for i, _ in decoder}
    if layers is not None and seen and max(seen) + 1 not in (layers, layers + (_int(cfg, *_MTP_KEYS) or 0)):
        _mismatch(where, f"the weights have {max(seen) + 1} decoder layers but the config's num_hidden_layers "
                         f"is {layers}")
    inter = None if _is_moe(cfg) else _int(cfg, "intermediate_size")
    for (_, rest), name in decoder.items():
        shape = shapes[name]
        if len(shape) != 2:
            continue
        if hidden is not None and rest in ("self_attn.q_proj.weight", "mlp.up_proj.weight") and shape[1] != hidden:
            _mismatch(where, f"{name} is {shape[1]} wide but the config's hidden_size is {hidden}")
        if inter is not None and rest == "mlp.down_proj.weight" and shape[1] != inter:
            _mismatch(where, f"{name} is {shape[1]} wide but the config's intermediate_size is {inter}")


def _is_moe(cfg: Mapping) -> bool:
    return any(k in cfg for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size"))


def _int(cfg: Mapping, *keys: str) -> int | None:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _mismatch(where: str, what: str) -> None:
    raise ConfigError(f"{where}: config.json does not describe these weights: {what} (a config of another "
                      "model? give the right one with --model-name)")
