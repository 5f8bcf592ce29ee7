"""The parameter order an optimizer's integer keys follow, rebuilt from config.json without running its code.

transformers builds the model the config describes on the meta device (no weights allocated), from
the classes built into transformers only: `trust_remote_code=False` everywhere, and a config whose
model type needs the checkpoint's own code is not built at all (the optimizer is then skipped with
a warning that says why). Every candidate is checked against the shapes in the model rank files.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import warnings as _warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import Skip, Unreadable

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelParams:
    """`named_parameters()` of the model the config describes, and its FSDP1 wrapping units."""

    params: tuple[tuple[str, tuple[int, ...]], ...]  # (fqn, shape), named_parameters order
    units: tuple[tuple[str, tuple[str, ...]], ...]  # FSDP1: (unit prefix, member fqns), flat-param order
    model_class: str


def built_in_config(config: Mapping[str, Any], where: str) -> Any:
    """A transformers config object for a config.json dict, from transformers' own classes only.

    A model type transformers does not know needs the checkpoint's code (`auto_map`), which
    streammerge never runs: Skip says so.
    """
    from transformers import CONFIG_MAPPING, PretrainedConfig

    # from_pretrained decodes the {"__float__": "Infinity"} that save_pretrained writes for inf and NaN (transformers 5)
    config = getattr(PretrainedConfig, "_decode_special_floats", lambda c: c)(dict(config))
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        remote = " (its auto_map names code shipped with the checkpoint, which streammerge never runs)" \
            if config.get("auto_map") else ""
        raise Skip(f"{where}: model_type {model_type!r} is not built into transformers{remote}")
    try:
        return CONFIG_MAPPING[model_type].from_dict({k: v for k, v in config.items() if k != "auto_map"})
    except ImportError as e:  # a package this transformers wants for the model type: nothing said of the config
        raise Skip(f"{where}: transformers cannot read it here ({str(e).splitlines()[0][:160]})") from None
    except Exception as e:  # a config this transformers cannot read: its own message says why
        raise Unreadable(f"{where}: transformers cannot read it ({' '.join(str(e).split())[:160] or type(e).__name__})"
                         ) from None


def _meta_models(config: Any) -> Iterator[torch.nn.Module]:
    """Candidate models on the meta device: the config's architecture, then causal LM, then veRL's critic.

    Only classes built into transformers, with trust_remote_code=False: nothing from the checkpoint runs.
    """
    import torch
    import transformers

    # eager attention: a config naming a hub kernel ("kernels-community/...") would have transformers fetch
    # and import it; parameter names and shapes never depend on the attention implementation
    eager = {"attn_implementation": "eager"}
    builders: list[Callable[[], Any]] = []
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            builders.append(functools.partial(cls._from_config, config, **eager))
    builders.append(lambda: transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False, **eager))
    critic = copy.deepcopy(config)
    critic.num_labels = 1  # veRL's critic: one value per token (from_config no longer takes num_labels itself)
    builders.append(lambda: transformers.AutoModelForTokenClassification.from_config(
        critic, trust_remote_code=False, **eager))
    log = logging.getLogger("transformers")
    for build in builders:
        level = log.level
        try:
            log.setLevel(logging.ERROR)
            with torch.device("meta"), _warnings.catch_warnings():
                _warnings.simplefilter("ignore")
                model = build()
        except Exception:  # an architecture this transformers cannot build: try the next
            continue
        finally:
            log.setLevel(level)
        yield model


def model_params(config: Mapping[str, Any] | None, known: Mapping[str, tuple[int, ...]],
                 where: str = "config.json") -> ModelParams:
    """Build the parameter order from config.json without allocating weights.

    `known` maps the names in the model rank files to their shapes: of the candidate models whose
    parameters all appear there with the same shapes, the one with the most is the one that was trained
    (a causal LM with tied embeddings fits inside a critic built from the same config, which adds its head).
    """
    if not config:
        raise Skip("no huggingface/config.json to rebuild the parameter order from")
    if importlib.util.find_spec("transformers") is None:
        raise Skip("transformers is not installed (needed to rebuild the parameter order)")
    tried = []
    best: ModelParams | None = None
    for model in _meta_models(built_in_config(config, where)):
        params = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
        bad = [n for n, s in params if known.get(n) != s]
        if not bad:
            if best is None or len(params) > len(best.params):
                best = ModelParams(params, _fsdp1_units(model), type(model).__name__)
            continue
        tried.append(f"{type(model).__name__} (e.g. {bad[0]!r} "
                     f"{'has another shape' if bad[0] in known else 'is not in the model files'})")
    if best is not None:
        return best
    if not tried:
        raise Skip(f"transformers cannot build the model of {where}")
    raise Skip(f"no model built from {where} has the parameters of the model files: " + "; ".join(tried))


def _fsdp1_units(model: torch.nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """FSDP1 units as veRL's transformer auto-wrap policy makes them: one per `_no_split_modules`
    layer, the rest in the root; the root's FlatParameter comes first in named_parameters order."""
    wrap = set(getattr(model, "_no_split_modules", None) or ())
    prefixes: list[str] = []
    for name, module in model.named_modules():
        if name and type(module).__name__ in wrap and not any(name.startswith(p + ".") for p in prefixes):
            prefixes.append(name)
    members: dict[str, list[str]] = {"": [], **{p: [] for p in prefixes}}
    for fqn, _ in model.named_parameters():
        owner = next((p for p in prefixes if fqn.startswith(p + ".")), "")
        members[owner].append(fqn)
    return tuple((p, tuple(m)) for p, m in members.items() if m)


