"""Does transformers build, from the config.json we write, a model with exactly the tensors we write?

transformers loads a folder by building the model its config.json describes and filling it by name:
a tensor of the folder it has no place for is dropped ("unexpected"), a parameter the folder lacks is
randomly initialised ("missing"), a shape that differs is an error or, with ignore_mismatched_sizes,
random again. `check_config_fits` (model_folder.py) catches the plain contradictions without torch;
this check asks transformers itself, before the folder is completed (its index and config.json), and
verify asks it again of a finished folder's own config.json and weights (`start_folder`).

The model is built on the meta device (no weights allocated) from transformers' own classes only:
the config through `CONFIG_MAPPING[model_type]` (never the Auto config class, which reads auto_map), the model with
`trust_remote_code=False`, eager attention (a config naming a hub kernel must not fetch it). A
config with `auto_map`, a model type or architecture transformers does not know, or no
transformers installed: the check is left out with a note the merge's summary shows, never failed. A config
transformers itself refuses to read or build (but for a package it lacks here) fails it: the folder would not load.
So does a generation_config.json beside it that transformers' GenerationConfig refuses (from_pretrained builds one).

Importing torch and transformers costs seconds (more from a cold disk) and hundreds of MB, more than a whole
merge is allowed, so it runs in a child process started when the config is read, which answers while the
merge writes: the merge takes the answer between files and waits for it only before completing the folder.
The child detaches from the merge (a double fork), so its memory does not count as the merge's peak RSS; it
reports its own. Where torch and transformers are already imported (a Python session, a test run) it is done
in-process instead. Answers are cached by config and generation config, then by the weights' names: a config with a
cached answer starts no child unless the names are new.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .model_folder import DTYPE_KEYS, GENERATION_CONFIG, legacy_buffers
from .options import env_seconds

CHECK_VERSION = 3  # 2: the answer covers generation_config.json too; 3: and what transformers keeps in float32
TIMEOUT_ENV = "STREAMMERGE_ARCH_TIMEOUT"  # seconds the merge waits for the child (default 300)
DISABLE_ENV = "STREAMMERGE_ARCH_CHECK"  # "0": skip the check (with a warning)
CACHE_ENV = "STREAMMERGE_CACHE"
FLOAT32_LINE = b"float32 "  # the child's early line: float32_rules, before it asks for the weights' names
PLACED_LINE = b"loads_as "  # its second early line: the first model's `loads_as` of the names, once given them
IO_ENV = "STREAMMERGE_ARCH_IO"  # "idle": this process reads in the idle I/O class while the child imports (opt-in)
Shapes = Mapping[str, tuple[int, ...]]
# What loads a config.json that names no architectures (transformers maps its model_type): the first that has a class
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForSeq2SeqLM")


# ---------------------------------------------------------------- in the child (or in-process): ask transformers

def describe(config: Mapping[str, Any], names: Any = None, generation: Mapping[str, Any] | None = None,
             early: Any = None, built: dict[int, Any] | None = None, placed: Any = None) -> dict[str, Any]:
    """What transformers builds from `config`: {"models": [...]}, {"skip": why} or {"refuse": why} (transformers
    refuses the config, or `generation`, the generation_config.json written beside it: then "file" names it).
    Imports torch and transformers.

    Each model: its class, `forms` (names -> shapes as save_pretrained writes them, then as the model's own
    state_dict names them where that differs: transformers loads both), `optional` (tied copies and buffers:
    their absence loads the same model), and the class's ignore patterns. The config's own class comes first,
    then (a config that is no token classifier) the same model as veRL's critic: <Type>ForTokenClassification
    with one label. `fp32` holds `float32_rules` of the config's own class, given to `early` as soon as that model
    is built (the merge's plan may wait for it; the weights' names come later), and the config's own model's
    `loads_as` to `placed` as soon as the names are placed (the plan may wait for it too: transformers matches its
    float32 rules to the names as it loads them). `built` keeps the models built (on the meta device) for a later
    call with the same config, which then builds none.
    """
    import logging

    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)  # its warnings about the config are not the merge's; the caller's level comes back
    try:
        return _describe(config, names, generation, early, built, placed)
    finally:
        log.setLevel(level)


def _describe(config: Mapping[str, Any], names: Any, generation: Mapping[str, Any] | None = None,
              early: Any = None, built: dict[int, Any] | None = None, placed: Any = None) -> dict[str, Any]:
    import copy
    import warnings

    import torch
    import transformers

    from .optimizer import Skip, Unreadable
    from .optimizer.naming import built_in_config

    try:
        cfg = built_in_config(config, "config.json")
    except Unreadable as e:
        return {"refuse": str(e).removeprefix("config.json: "), "transformers": transformers.__version__}
    except Skip as e:
        return {"skip": str(e).removeprefix("config.json: ")}
    if generation is not None:  # from_pretrained builds it so; a file it cannot read loads a model that generates
        try:                    # otherwise (transformers ignores one that is not JSON) or not at all
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                transformers.GenerationConfig.from_dict(dict(generation))
        except Exception as e:  # noqa: BLE001 - any refusal of transformers' is the folder's
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            return {"refuse": f"transformers {transformers.__version__} cannot read it ({first})",
                    "file": GENERATION_CONFIG, "transformers": transformers.__version__}
    archs = [a for a in (getattr(cfg, "architectures", None) or []) if isinstance(a, str)]
    own: Any = None
    if archs:
        own = getattr(transformers, archs[0], None)
        if not (isinstance(own, type) and issubclass(own, transformers.PreTrainedModel)):
            return {"skip": f"architectures names {archs[0]!r}, which is not a class built into transformers "
                            f"{transformers.__version__}"}
    else:  # no class named: the Auto class that maps this config loads it (a VLM's is image-text-to-text)
        autos = [getattr(transformers, name) for name in AUTO_CLASSES if hasattr(transformers, name)]
        own = next((auto for auto in autos if type(cfg) in auto._model_mapping), None)
        if own is None:
            return {"refuse": f"it names no architectures, and none of transformers {transformers.__version__}'s "
                              f"{', '.join(AUTO_CLASSES)} takes model type {getattr(cfg, 'model_type', None)!r}, so "
                              "which model would load these weights is unknown; name the model's class in its "
                              "architectures", "said": True, "transformers": transformers.__version__}
    builders: list[tuple[Any, Any]] = [(own, cfg)]
    if not (own and own.__name__.endswith("ForTokenClassification")):
        critic = copy.deepcopy(cfg)
        critic.num_labels = 1
        builders.append((transformers.AutoModelForTokenClassification, critic))
    models: list[dict] = []
    rules: dict[str, Any] = {}
    built = {} if built is None else built
    for i, (cls, c) in enumerate(builders):
        try:
            if i in built:
                model = built[i]
            else:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if cls.__name__.startswith("AutoModel"):
                        model = cls.from_config(c, trust_remote_code=False, attn_implementation="eager")
                    else:
                        model = cls._from_config(c, attn_implementation="eager")
                built[i] = model
        except Exception as e:
            if i == 0:
                first = (str(e).splitlines() or [type(e).__name__])[0][:200]
                why = f"transformers {transformers.__version__} cannot build {cls.__name__} from it ({first})"
                # a package the model's code wants is missing here, or its __init__ computes with tensors, which
                # the meta device cannot: that says nothing of the config
                skip = isinstance(e, ImportError) or "meta" in str(e).lower()
                return {"skip" if skip else "refuse": why, "transformers": transformers.__version__}
            continue
        if i == 0:
            rules = float32_rules(model)
            if early is not None:
                early(rules)
        entry = _model_names(model)
        if callable(names):
            names = names()
        entry["loads_as"] = _loads_as(model, names or [])
        if i == 0 and placed is not None:
            placed(entry["loads_as"])
        models.append(entry)
    return {"transformers": transformers.__version__, "models": models, "fp32": rules}


def float32_rules(model: Any) -> dict[str, Any]:
    """What transformers keeps in float32 when it loads `model` in half precision, and how it matches the names:
    `strict` for bfloat16 and float16 (routers' gates and score biases of DeepSeek-V3, GLM-4.5, ...), `float16` for
    float16 alone; `match` "search" (transformers 5: a regular expression anywhere in the name, `*` for any run)
    or "module" (transformers 4: a whole part of the dotted name)."""
    import transformers

    def patterns(attr: str) -> list[str]:
        value = getattr(model, attr, None)
        return sorted({str(p) for p in value}) if isinstance(value, (list, tuple, set, frozenset)) else []

    major = int(re.match(r"\d+", transformers.__version__).group())  # type: ignore[union-attr]
    return {"strict": patterns("_keep_in_fp32_modules_strict"), "float16": patterns("_keep_in_fp32_modules"),
            "match": "search" if major >= 5 else "module"}


def kept_in_float32(names: Iterable[str], rules: Mapping[str, Any], dtype: str,
                    loads_as: Mapping[str, Any] | None = None) -> set[str]:
    """Of `names`, those transformers loads in float32 into a model loaded in `dtype` (`float32_rules`): the names
    it matches as its loader does, which matches the name a tensor loads as (`loads_as`: the answer's, name ->
    [the model's key, fused?]; Ergo's `tok_embeddings` loads as `embed_tokens`, DeepSeek-V4's `gate.bias` as
    `gate.e_score_correction_bias`) as well as the name written. An answer it could not have given (a pattern that
    is no regular expression) matches nothing."""
    found = float32_patterns(rules, dtype)
    if not found:
        return set()
    if rules.get("match") == "module":
        alternatives = [rf"((^|\.){p}($|\.))" for p in found]
    else:
        alternatives = [f"(?:{p.replace('*', '.*')})" for p in found]
    try:
        rx = re.compile("|".join(alternatives))
    except re.error:
        return set()
    renamed = {n: str(t[0]) for n, t in (loads_as or {}).items()
               if isinstance(t, (list, tuple)) and t and isinstance(t[0], str)}
    return {n for n in names if rx.search(n) or (n in renamed and rx.search(renamed[n]))}


def float32_patterns(rules: Mapping[str, Any], dtype: str) -> list[str]:
    """The patterns of `float32_rules` that keep names in float32 in a model loaded in `dtype` ([] for an answer
    transformers could not have given)."""
    found = list(rules.get("strict") or ()) if dtype in ("bfloat16", "float16") else []
    if dtype == "float16":
        found += list(rules.get("float16") or ())
    return found if all(isinstance(p, str) for p in found) else []


def first_loads_as(answer: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `loads_as` of the config's own model in a check's answer ({} where there is none)."""
    models = (answer or {}).get("models")
    first = models[0] if isinstance(models, list) and models and isinstance(models[0], dict) else {}
    value = first.get("loads_as")
    return value if isinstance(value, dict) else {}


def names_float32(config: Mapping[str, Any], dtype: str) -> bool:
    """Whether transformers' own modeling code for this config's model types (its sub-configs' too) names modules it
    keeps in float32 for `dtype`: read as text, nothing imported. Where it does, the plan waits for transformers'
    answer; where it does not, it need not (the check's answer says so again, and a difference is warned of)."""
    if dtype not in ("bfloat16", "float16"):
        return False
    attr = "_keep_in_fp32_modules_strict" if dtype == "bfloat16" else "_keep_in_fp32_modules"
    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        return False
    roots = list(spec.submodule_search_locations or ()) if spec is not None else []
    if not roots:
        return False
    types: set[str] = set()
    stack: list[Any] = [config]
    while stack:
        part = stack.pop()
        if isinstance(part, Mapping):
            if isinstance(part.get("model_type"), str):
                types.add(part["model_type"])
            stack.extend(v for v in part.values() if isinstance(v, Mapping))
    for kind in types:
        if not re.fullmatch(r"[\w-]+", kind):  # a model type is a folder name of transformers', never a path
            continue
        for path in (Path(roots[0]) / "models" / kind.replace("-", "_")).glob("modeling_*.py"):
            try:
                if attr in path.read_text(encoding="utf-8", errors="replace"):
                    return True
            except OSError:
                continue
    return False


def _loads_as(model: Any, names: list[str]) -> dict[str, list]:
    """The names transformers' loader renames (old spellings, MoE experts fused into one tensor): name ->
    [the model's key, whether several checkpoint tensors become that one (no shape to compare one to one)]."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: the class's own table of old spellings
        return loads_as_v4(getattr(model, "_checkpoint_conversion_mapping", None) or {}, names)
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta = model.state_dict()
    out: dict[str, list] = {}
    for name in names:
        try:
            target, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
        except Exception:  # noqa: BLE001 - a name the loader cannot place stays as it is (unexpected)
            continue
        converted = pattern is not None and any(pattern in c.source_patterns for c in converters)
        if target != name or converted:
            out[name] = [target, converted]
    return out


def loads_as_v4(mapping: Mapping[str, str], names: list[str]) -> dict[str, list]:
    """transformers 4's renaming on load (`_checkpoint_conversion_mapping`, e.g. Qwen2.5-VL's `^visual` ->
    `model.visual`): the first pattern that matches a name renames it."""
    out: dict[str, list] = {}
    for name in names:
        for pattern, replacement in mapping.items():
            target, n = re.subn(pattern, replacement, name)
            if n:
                if target != name:
                    out[name] = [target, False]
                break
    return out


def _model_names(model: Any) -> dict[str, Any]:
    sd = model.state_dict()
    shapes = {k: list(v.shape) for k, v in sd.items()}
    params = dict(model.named_parameters(remove_duplicate=False))
    by_id: dict[int, list[str]] = {}
    for k in sd:
        if k in params:
            by_id.setdefault(id(params[k]), []).append(k)
    tied = {n for group in by_id.values() if len(group) > 1 for n in group[1:]}
    tied |= set(getattr(model, "all_tied_weights_keys", None) or {})
    buffers = {k for k in sd if k not in params}
    forms = [shapes]
    try:  # transformers >= 5 renames (fuses MoE experts) on load and back on save: both spellings load
        from transformers.core_model_loading import revert_weight_conversion

        saved = revert_weight_conversion(model, {k: v for k, v in sd.items() if k not in tied})
        saved_shapes = {k: list(v.shape) for k, v in saved.items()}
        if set(saved_shapes) != set(shapes) - tied:
            forms.insert(0, saved_shapes)
    except Exception:  # an older transformers (no conversion), or one whose conversion needs real tensors
        pass
    return {"class": type(model).__name__, "forms": forms, "optional": sorted(tied | buffers),
            "ignore_missing": [str(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()],
            "ignore_unexpected": [str(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]}


def child_main() -> None:
    """The child: a line of JSON in (the config and the generation config), then (once the merge has planned, or
    while it plans where it needs them) a line of the weights' names; out, its early lines (the float32 rules once
    the model is built, before it reads the names; the names as it loads them, once placed) and one JSON line (the
    answer and this process's peak RSS). The model is built while the merge plans."""
    try:
        asked = json.loads(sys.stdin.buffer.readline())
        answer = describe(asked["config"], lambda: json.loads(sys.stdin.buffer.readline() or b"[]"),
                          asked.get("generation"), early=_say_float32, placed=_say_placed)
    except Exception as e:
        answer = {"skip": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
    answer["rss"] = _own_peak()
    sys.stdout.write("\n" + json.dumps(answer) + "\n")
    sys.stdout.flush()


def _say_float32(rules: Mapping[str, Any]) -> None:
    sys.stdout.write(FLOAT32_LINE.decode() + json.dumps(rules) + "\n")
    sys.stdout.flush()


def _say_placed(loads_as: Mapping[str, Any]) -> None:
    sys.stdout.write(PLACED_LINE.decode() + json.dumps(loads_as) + "\n")
    sys.stdout.flush()


def _own_peak() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return 0


# The launcher forks and exits: the merge reaps it at once, and the detached child's
# memory never reaches the merge's RUSAGE_CHILDREN (the merge's own peak stays its own).
# `-c` puts the current folder first on sys.path (unless safe_path): taken off before any import.
_CHILD = """\
import sys
if not getattr(sys.flags, "safe_path", False):
    del sys.path[0]
import os
if hasattr(os, "fork") and os.fork():
    os._exit(0)
sys.stdout.write(str(os.getpid()) + "\\n"); sys.stdout.flush()
sys.path.insert(0, {root!r})
from streammerge.architecture import child_main
child_main()
"""


def child_command() -> list[str]:
    """The child's command line: this interpreter, this package first on sys.path, and never the current folder (a
    json.py or transformers.py there, the user's or a checkpoint's, would run in the child)."""
    return [sys.executable, "-c", _CHILD.format(root=str(Path(__file__).resolve().parents[1]))]


# ---------------------------------------------------------------- in the merge: start, wait, compare

@dataclass
class ArchCheck:
    """A started check: `result()` waits for it; `check(shapes)` compares."""

    config: dict
    where: str
    generation: dict | None = None  # generation_config.json written beside config.json, if any
    started: float = field(default_factory=time.perf_counter)
    answer: dict[str, Any] | None = None
    how: str = ""
    _thread: threading.Thread | None = None
    _proc: subprocess.Popen | None = None
    _out: bytes = b""
    _err: bytes = b""
    _pid: int | None = None
    _names: list[str] | None = None
    _names_ready: threading.Event = field(default_factory=threading.Event)
    seconds: float = 0.0
    _yield: Any = None  # ioprio.Yield while the child imports
    io_note: str | None = None  # why this process could not step aside on the disk
    _float32: dict | None = None  # the child's early answer (float32_rules)
    _float32_ready: threading.Event = field(default_factory=threading.Event)
    _built: dict[int, Any] = field(default_factory=dict, repr=False)  # in-process: models `float32` built on meta
    _placed: dict | None = None  # the child's second early answer: the first model's loads_as of `_names`
    _placed_ready: threading.Event = field(default_factory=threading.Event)
    _answer_cached: bool = False  # the answer this check computed is in the cache

    def float32(self, dtype: str) -> dict[str, Any] | None:
        """transformers' `float32_rules` for the config's model, which the plan needs before any byte is written:
        cached, or asked (in this process, or of the child, waited for) where transformers' own code for the model
        names such modules for `dtype` at all. None where it cannot be told (the check will skip)."""
        cached = _cached_float32(self.asked())
        if cached is not None or not names_float32(self.config, dtype):
            return cached
        if self.how == "in-process":
            rules = _safe_describe(self.config, [], self.generation, self._built).get("fp32")
        elif self._thread is None or not self._float32_ready.wait(_timeout()):
            return None  # (deferred: a cached config whose answers all predate the float32 rules)
        else:
            rules = self._float32
        if isinstance(rules, dict):
            _cache_float32(self.asked(), rules)
        return rules

    def loads_as(self, names: list[str], planned: list[str] | None = None) -> dict[str, Any] | None:
        """The names transformers' loader renames, as the config's own model loads them (its answer's `loads_as`),
        which the plan needs before any byte is written where transformers keeps some in float32: its rules match
        the name a tensor loads as. A cached answer for `planned` (the names the check will be given, if the plan can
        tell them), else asked: `names` (all of them: any list holding the checked names places them alike, each name
        on its own) are given to the check now, in place of those `ready` would give. None where it cannot be told
        (the check will skip, or refuse the config)."""
        if self.answer is None and self._names is None and planned is not None and planned != names:
            cached = _cache_get(self.asked(), planned)
            if cached is not None:
                self.close()
                self.answer, self.how, self._names = cached, "cache", list(planned)
                self._names_ready.set()
        self.ready(names)
        if self.answer is None and self._thread is None:  # in-process: the models `float32` built, if it did
            self.answer = _safe_describe(self.config, names, self.generation, self._built)
            self._built.clear()
        if self.answer is not None:
            return first_loads_as(self.answer) if "models" in self.answer else None
        if not self._placed_ready.wait(_timeout()):
            return None  # (the check says so once it gives up waiting)
        return self._placed

    def ready(self, names: list[str]) -> bool:
        """Whether `result` answers without waiting: in-process, cached, or the child has answered. The first call
        gives the child the weights' names (it places them while the merge writes); later calls do not read them."""
        if self.answer is None and self._names is None:
            self._names = names
            cached = _cache_get(self.asked(), names)
            if cached is not None:
                self.close()
                self.answer, self.how = cached, "cache"
            elif self.how == "deferred":
                note = self.spawn()
                if note:
                    self.answer = {"skip": note.removeprefix("architecture check skipped: ")}
            self._names_ready.set()
        return self.answer is not None or self._thread is None or not self._thread.is_alive()

    def result(self, names: list[str]) -> dict[str, Any]:
        self.ready(names)
        if self.answer is not None:
            if "models" in self.answer and self.how == "in-process" and not self._answer_cached:
                self._answer_cached = True  # computed by the plan (`loads_as`) for names holding these
                _cache_put(self.asked(), names, self.answer)
            return self.answer
        if self._thread is None:  # in-process: the models `float32` built, if it did
            self.answer = _safe_describe(self.config, names, self.generation, self._built)
            self._built.clear()
        else:
            timeout = _timeout()
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.close()
                self.answer = {"skip": f"transformers did not answer within {timeout:.0f} s (set {TIMEOUT_ENV} "
                                       "to wait longer)"}
            else:
                self.answer = _parse(self._out, self._err)
        self.seconds = time.perf_counter() - self.started
        if "models" in self.answer:
            self._answer_cached = True
            _cache_put(self.asked(), names, self.answer)
        return self.answer

    def spawn(self) -> str | None:
        """Start the child that asks transformers (None, or a note why it could not start)."""
        env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
                   TOKENIZERS_PARALLELISM="false")
        try:
            err = tempfile.TemporaryFile()  # a file, not a pipe: warnings that fill a pipe would stall the child
            self._proc = subprocess.Popen(child_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                          env=env)
        except OSError as e:
            return f"architecture check skipped: cannot start a child process ({e.strerror or e})"
        self.how = "child"
        if os.environ.get(IO_ENV) == "idle":
            from . import ioprio

            self._yield = ioprio.Yield()
            self.io_note = self._yield.start()
        data = json.dumps(self.asked()).encode() + b"\n"
        self._thread = threading.Thread(target=_run_child, args=(self, data, err), name="streammerge-archcheck",
                                        daemon=True)
        self._thread.start()
        return None

    def asked(self, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What transformers is asked about (and the cache keyed by): the config and the generation config."""
        return {"config": self.config if config is None else config, "generation": self.generation}

    def _how(self) -> str:
        if self.how == "child" and self.answer is not None:
            rss = self.answer.get("rss") or 0
            aside = ""
            if self._yield is not None:
                aside = f"; this process kept its I/O priority ({self.io_note})" if self.io_note else \
                    "; it read the disk first (this process stood in the idle I/O class meanwhile)"
            return f"asked a child process: {self.seconds:.1f} s, {rss / 2**20:.0f} MiB{aside}"
        return {"cache": "answer cached", "in-process": "asked in this process"}.get(self.how, self.how)

    def close(self) -> None:
        """Stop a child still running (the merge failed or was interrupted before it answered)."""
        if self._pid is not None and self._thread is not None and self._thread.is_alive():
            import signal

            try:
                os.kill(self._pid, signal.SIGKILL)
            except OSError:
                pass
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._yield is not None:
            self._yield.end()

    def verdict(self, shapes: Shapes, *, held_by: str = "checkpoint") -> Verdict:
        """What transformers' answer says of these weights, held by the `held_by` (the checkpoint, the folder); waits
        for the answer. The caller words what to do about it."""
        answer = self.result(sorted(shapes))
        if "refuse" in answer:
            tail = "" if answer.get("said") else "; transformers would not load the folder"
            return Verdict(problem=answer["refuse"] + tail, file=answer.get("file", "config.json"))
        if "skip" in answer:
            return Verdict(f"architecture check skipped: {answer['skip']}")
        models = answer["models"]
        own = models[0]
        ignored = set(legacy_buffers(self.config, shapes))  # never read by transformers (another tool's folder)
        shapes = {name: shape for name, shape in shapes.items() if name not in ignored}
        problems = _compare(own, shapes, held_by)
        version = answer.get("transformers", "?")
        if not problems:
            return Verdict(f"architecture: {own['class']} built from config.json by transformers {version} has "
                           f"exactly these tensor names and shapes ({self._how()})")
        for alt in models[1:]:
            if not _compare(alt, shapes):
                return Verdict(problem=f"config.json says {_archs(self.config)} but the weights are "
                                       f"{alt['class']}'s (a value head, veRL's critic)", critic=alt["class"])
        return Verdict(problem=f"transformers {version} builds {own['class']} from this config.json, which is not "
                               f"these weights: {problems} (it would load them with those tensors dropped or "
                               "randomly initialised)")

    def remember_written(self, written: Mapping[str, Any], names: list[str]) -> None:
        """Cache the answer under the config.json the merge wrote too, so that verify of the folder finds it: the
        checked config but for its dtype (which names no tensor and sizes none), or its critic correction (the
        answer holds that model)."""
        if not self.answer or "models" not in self.answer:
            return
        if _but_dtype(written) == _but_dtype(self.config):
            _cache_put(self.asked(written), names, self.answer)
            return
        cls = (written.get("architectures") or [None])[0]
        alt = [m for m in self.answer["models"][1:] if m["class"] == cls]
        if alt and _but_dtype(written) == _but_dtype(critic_config(self.config, cls)):
            _cache_put(self.asked(written), names, {**self.answer, "models": alt})

    def check(self, shapes: Shapes, tied: Mapping[str, str] | None = None) -> tuple[dict | None, str]:
        """(a config to write instead, or None; a note). Raises ConfigError where transformers would load
        another model than these tensors. `tied`: output embeddings left out as tied (name -> the input embedding
        written), which the model must tie to be these weights."""
        found = self.verdict(shapes)
        untied = {name: kept for name, kept in (tied or {}).items() if kept in shapes}
        if found.problem and not found.critic and found.file == "config.json" and untied and \
                not self.verdict({**shapes, **{name: shapes[kept] for name, kept in untied.items()}}).problem:
            name, kept = sorted(untied.items())[0]
            cls = self.answer["models"][0]["class"] if self.answer else "the model"
            raise ConfigError(f"{self.where}: ties the embeddings (tie_word_embeddings), but transformers "
                              f"{(self.answer or {}).get('transformers', '?')} builds {cls}, which does not tie "
                              f"{name} to {kept}: it would load without the trained {name} (randomly initialised); "
                              "set tie_word_embeddings to false in that config (both are then written)")
        if found.critic is not None:
            return critic_config(self.config, found.critic), (f"{found.problem}: config.json is written with "
                                                               f"architectures [{found.critic!r}] and one label")
        if found.problem and found.file != "config.json":
            raise ConfigError(f"{Path(self.where).with_name(found.file)}: {found.problem}; fix that file, or remove it "
                              f"(transformers then generates with the defaults config.json gives) ({DISABLE_ENV}=0 "
                              "writes it anyway)")
        if found.problem:
            raise ConfigError(f"{self.where}: {found.problem}; give the model's own config with --model-name "
                              f"({DISABLE_ENV}=0 writes it anyway)")
        return None, found.note


@dataclass(frozen=True)
class Verdict:
    """transformers' answer about some weights: `note` says how it answered, or why the check was left out; else
    `problem` says what differs, and `critic` names the value-head class (veRL's critic) the weights are where that
    model, not the config's own, has exactly their tensors."""

    note: str = ""
    problem: str = ""
    critic: str | None = None
    file: str = "config.json"  # the file transformers refused


def _timeout() -> float:
    return env_seconds(TIMEOUT_ENV, 300, f"how long the architecture check may take; {DISABLE_ENV}=0 leaves it out")


def _safe_describe(config: Mapping[str, Any], names: list[str], generation: Mapping[str, Any] | None = None,
                   built: dict[int, Any] | None = None) -> dict[str, Any]:
    try:
        return describe(config, names, generation, built=built)
    except Exception as e:  # noqa: BLE001
        return {"skip": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}


def _parse(out: bytes, err: bytes) -> dict[str, Any]:
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
    if lines:
        try:
            answer = json.loads(lines[-1])
            if isinstance(answer, dict) and ("models" in answer or "skip" in answer or "refuse" in answer):
                return answer
        except ValueError:
            pass
    why = [ln.strip() for ln in err.decode(errors="replace").splitlines() if ln.strip()]
    return {"skip": f"the child process that asks transformers failed ({why[-1][:200] if why else 'no output'})"}


def _archs(config: Mapping[str, Any]) -> str:
    a = config.get("architectures")
    return f"architectures {a}" if a else "no architectures"


def _but_dtype(config: Mapping[str, Any]) -> dict:
    return {k: v for k, v in config.items() if k not in DTYPE_KEYS}


def critic_config(config: Mapping[str, Any], cls: str) -> dict:
    """The config as veRL's critic is: its token-classification class, one label."""
    fixed = dict(config)
    fixed["architectures"] = [cls]
    labels = config.get("id2label")
    if not (isinstance(labels, dict) and len(labels) == 1):
        fixed["id2label"] = {"0": "LABEL_0"}
        fixed["label2id"] = {"LABEL_0": 0}
    fixed.pop("num_labels", None)
    return fixed


def _compare(model: Mapping[str, Any], shapes: Shapes, held_by: str = "checkpoint") -> str:
    """'' when `shapes` is one of the model's forms (optional names and ignore patterns aside) or loads exactly as
    transformers' loader places it (old spellings renamed, MoE experts fused), else what differs."""
    optional = set(model["optional"])
    ig_missing = [re.compile(p) for p in model["ignore_missing"]]
    ig_unexpected = [re.compile(p) for p in model["ignore_unexpected"]]

    def differences(form: Mapping[str, Any], place: Mapping[str, Any]) -> tuple[int, str]:
        unexpected, other, landed = [], [], set()
        fused_sizes: dict[str, int] = {}
        for name, shape in shapes.items():
            target, fused = place.get(name, (name, False))
            if target not in form:
                if not any(p.search(name) for p in ig_unexpected):
                    unexpected.append(name)
                continue
            landed.add(target)
            if fused:  # several checkpoint tensors (an MoE layer's experts) make this one: their sizes must add up
                fused_sizes[target] = fused_sizes.get(target, 0) + math.prod(shape)
            elif tuple(form[target]) != tuple(shape):
                other.append(f"{name} is {list(shape)} in the {held_by}, {list(form[target])} in the model")
        for target, size in fused_sizes.items():
            if size != math.prod(form[target]):
                other.append(f"the {held_by} tensors fused into {target} hold {size} elements, the model's "
                             f"{list(form[target])} holds {math.prod(form[target])}")
        missing = [k for k in form
                   if k not in landed and k not in optional and not any(p.search(k) for p in ig_missing)]
        parts = ["shapes differ: " + ", ".join(other[:3])] if other else []
        for what, names in ((f"missing from the {held_by}", missing), ("not in the model", unexpected)):
            if names:
                more = ", ..." if len(names) > 3 else ""
                parts.append(f"{len(names)} {what} ({', '.join(names[:3])}{more})")
        return len(other) + len(missing) + len(unexpected), "; ".join(parts)

    found = [differences(form, {}) for form in model["forms"]]
    if model.get("loads_as"):
        found.append(differences(model["forms"][-1], model["loads_as"]))
    return min(found)[1]  # "" where one fits; else the way of reading the names that differs least


def start(config: Mapping[str, Any] | None, where: str,
          generation: Mapping[str, Any] | None = None) -> tuple[ArchCheck | None, str | None]:
    """Start the check of `config`, and of `generation` (the generation_config.json beside it, if any): None and a
    note where it cannot run."""
    if not config:
        return None, None
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"architecture check skipped: {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    text = config.get("text_config")
    if config.get("auto_map") or (isinstance(text, dict) and text.get("auto_map")):
        return None, "architecture check skipped: config.json has auto_map (the model is the checkpoint's own " \
                     "code, which streammerge never runs)"
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        return None, "architecture check skipped: transformers is not installed, so nothing checked that " \
                     "config.json describes these weights"
    _timeout()  # a setting out of range is refused however the check is answered (a child, this process, the cache)
    check = ArchCheck(dict(config), where, None if generation is None else dict(generation))
    if "transformers" in sys.modules and "torch" in sys.modules:
        check.how = "in-process"  # already paid for: no child, computed when asked
        return check, None
    if _cached_config(check.asked()):
        check.how = "deferred"  # a child only if the weights' names are not the cached ones
        return check, None
    note = check.spawn()
    return (None, note) if note else (check, None)


def start_folder(folder: Path) -> tuple[ArchCheck | None, str | None]:
    """Start the check of a model folder's own config.json (verify), to be given the weights' shapes once their
    headers are read. (None, None) where there is no config.json; (None, a note) where the folder holds no weights
    transformers would load with it. Raises CheckpointError for a config.json that is not a JSON object."""
    from .model_folder import read_config, read_generation_config
    from .sources.hf import INDEX, SINGLE
    from .sources.lora import ADAPTER_CONFIG

    config = read_config(folder)
    if config is None:
        return None, None
    if not any((folder / f).is_file() for f in (SINGLE, INDEX)):
        what = f"a peft adapter folder ({ADAPTER_CONFIG}), whose base weights are elsewhere" \
            if (folder / ADAPTER_CONFIG).is_file() else "no weights transformers would load"
        return None, f"architecture check skipped: {what}: no {SINGLE} or {INDEX} beside config.json"
    return start(config, str(folder / "config.json"), read_generation_config(folder))


def _early_line(proc: subprocess.Popen, check: ArchCheck, prefix: bytes) -> dict | None:
    """The child's early answer that starts with `prefix` (a JSON object after it), read from its stdout; the lines
    before it belong to the final answer. None if the child ends, or says something else there."""
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        if line.startswith(prefix):
            with contextlib.suppress(ValueError):
                value = json.loads(line[len(prefix):])
                return value if isinstance(value, dict) else None
            return None
        check._out += line
    return None


def _run_child(check: ArchCheck, data: bytes, err: Any) -> None:
    proc = check._proc
    assert proc is not None and proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(data)
        proc.stdin.flush()
        first = proc.stdout.readline()
        if first.strip().isdigit():
            check._pid = int(first)
        else:
            check._out = first
        try:  # the float32 rules come once the model is built, before the child asks for the names
            check._float32 = _early_line(proc, check, FLOAT32_LINE)
        finally:
            check._float32_ready.set()
        check._names_ready.wait()
        try:
            proc.stdin.write(json.dumps(check._names or []).encode() + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:  # the child answered without the names (a refusal of the config) and has exited
            pass
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:  # the first model's loads_as, as soon as the child has placed the names (the plan may wait for it)
            check._placed = _early_line(proc, check, PLACED_LINE)
        finally:
            check._placed_ready.set()
        check._out += proc.stdout.read()
        if check._yield is not None:
            check._yield.end()
        proc.wait()
        err.seek(0)
        check._err = err.read()[-4096:]
    except Exception as e:  # noqa: BLE001
        check._err += str(e).encode()
    finally:
        check._float32_ready.set()
        check._placed_ready.set()
        err.close()


# ---------------------------------------------------------------- cache: the same config, the same transformers

@functools.cache
def _versions() -> str | None:
    """Read once per process: each lookup parses the package's metadata (milliseconds, twice per check)."""
    from importlib import metadata

    try:
        return f"{metadata.version('transformers')}|{metadata.version('torch')}"
    except metadata.PackageNotFoundError:
        return None


def _config_key(asked: Mapping[str, Any]) -> str | None:
    versions = _versions()
    if versions is None:
        return None
    h = hashlib.sha256(f"streammerge architecture v{CHECK_VERSION}|{versions}|".encode())
    h.update(json.dumps(asked, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _cache_key(asked: Mapping[str, Any], names: list[str]) -> str | None:
    """`<config and generation config>-<names>`: the first part alone says whether a child may be needed at all."""
    key = _config_key(asked)
    return None if key is None else f"{key}-{hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]}"


def _cached_config(asked: Mapping[str, Any]) -> bool:
    key = _config_key(asked)
    try:
        return key is not None and any(_cache_dir().glob(f"{key}-*.json"))
    except OSError:
        return False


def _asked(config: Mapping[str, Any], generation: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a check of this config is asked (`ArchCheck.asked`), for the cache's answers without a check."""
    return {"config": dict(config), "generation": None if generation is None else dict(generation)}


def cached_float32(config: Mapping[str, Any], generation: Mapping[str, Any] | None = None) -> dict | None:
    """`float32_rules` for this config from an earlier check's answer, without asking transformers (inspect)."""
    return _cached_float32(_asked(config, generation))


def cached_loads_as(config: Mapping[str, Any], generation: Mapping[str, Any] | None,
                    names: list[str]) -> dict[str, Any] | None:
    """The config's own model's `loads_as` from an earlier check's answer for exactly these weights' names (None where
    there is none), without asking transformers (a plan made without the check, inspect)."""
    answer = _cache_get(_asked(config, generation), names)
    return None if answer is None else first_loads_as(answer)


def _cached_float32(asked: Mapping[str, Any]) -> dict | None:
    """The float32 rules cached for this config (they do not depend on the weights' names): a small file of their
    own, `<config key>.float32.json`, so that a plan reads no whole answer."""
    key = _config_key(asked)
    return None if key is None else _cache_read(f"{key}.float32.json")


def _cache_float32(asked: Mapping[str, Any], rules: Mapping[str, Any]) -> None:
    key = _config_key(asked)
    if key is not None:
        _cache_write(f"{key}.float32.json", rules)


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "architecture"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "streammerge" / "architecture"


def _cache_get(asked: Mapping[str, Any], names: list[str]) -> dict | None:
    key = _cache_key(asked, names)
    answer = None if key is None else _cache_read(f"{key}.json")
    return answer if answer is not None and isinstance(answer.get("models"), list) else None


def _cache_read(name: str) -> dict | None:
    try:
        data = json.loads((_cache_dir() / name).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _cache_put(asked: Mapping[str, Any], names: list[str], answer: dict) -> None:
    key = _cache_key(asked, names)
    if key is None:
        return
    _cache_write(f"{key}.json", {k: v for k, v in answer.items() if k != "rss"})
    if isinstance(answer.get("fp32"), dict):
        _cache_float32(asked, answer["fp32"])


def _cache_write(name: str, data: Mapping[str, Any]) -> None:
    try:
        d = _cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, d / name)
    except OSError:
        pass
