"""What transformers loads from the folder: the names and shapes of the tensors in the files it reads, against the
model it builds from config.json (asked through architecture.py, started before anything else); and a note for
tensors it keeps in float32 that the folder holds in the half dtype."""

from __future__ import annotations

from pathlib import Path

from .. import architecture, dtypes
from ..architecture import ArchCheck
from ..errors import StreammergeError
from ..options import resolve_dtype
from ..sources.hf import INDEX, SINGLE
from .folder import Header
from .report import VerifyReport


def start_architecture(out: Path, report: VerifyReport) -> ArchCheck | None:
    """Start asking transformers which tensors OUT's config.json describes (architecture.py: a child, the cache or
    this process); a folder it cannot be asked about gets a note, one without config.json nothing."""
    try:
        arch, note = architecture.start_folder(out)
    except StreammergeError as e:  # a config.json that is no JSON object: transformers cannot load the folder
        report.fail(f"{e}; rerun the merge to write it again")
        return None
    if note:
        report.notes.append(note)
    return arch


def loaded_map(out: Path, headers: dict[str, Header], weight_maps: dict[str, dict]) -> dict[str, str] | None:
    """Name -> file of the tensors transformers loads with config.json: model.safetensors where there is one, else the
    files its index names (its order); None where neither can be read (a file that failed the folder's checks)."""
    if (out / SINGLE).is_file():
        return {name: SINGLE for name in headers[SINGLE].entries} if SINGLE in headers else None
    weight_map = weight_maps.get(INDEX)
    return dict(weight_map) if isinstance(weight_map, dict) else None


def weight_shapes(out: Path, headers: dict[str, Header], weight_maps: dict[str, dict],
                  report: VerifyReport) -> dict[str, tuple[int, ...]] | None:
    """The names and shapes of the tensors transformers loads (`loaded_map`); None, with a note, where some of them
    failed the folder's checks (folder.py)."""
    loaded = loaded_map(out, headers, weight_maps)
    try:
        if loaded is None:
            raise KeyError(SINGLE)
        return {name: headers[file].entries[name].shape for name, file in loaded.items()}
    except (KeyError, TypeError, AttributeError):
        report.notes.append("architecture check skipped: the weights' files failed the checks above")
        return None


def check_architecture(arch: ArchCheck, shapes: dict[str, tuple[int, ...]], report: VerifyReport) -> None:
    """The model transformers builds from config.json must have exactly these tensors; a critic's config names its
    value-head class already (the merge writes it so)."""
    found = arch.verdict(shapes, held_by="folder")
    if found.critic is not None:
        report.fail(f"{found.problem}: transformers would load them as the class config.json names, without the "
                    f"value head; config.json needs architectures [{found.critic!r}] and one label (rerun the merge "
                    "to write it so)")
    elif found.problem and found.file != "config.json":
        report.fail(f"{found.file}: {found.problem}; fix or remove it (rerun the merge to write it again)")
    elif found.problem:
        report.fail(f"config.json: {found.problem}; put the weights' own config.json there (rerun the merge, with "
                    "--model-name where the checkpoint's config is not the model's)")
    else:
        report.notes.append(found.note)


def note_rounded_float32(arch: ArchCheck, loaded: dict[str, str], headers: dict[str, Header],
                         report: VerifyReport) -> None:
    """Tensors transformers keeps in float32 in the half-precision model config.json names, held in that half dtype
    here: they load upcast with rounded values. A merge writes them in float32 unless told otherwise (float32_names),
    so a folder without a manifest may hold them either way: a note, not a failure."""
    half = resolve_dtype("auto", arch.config)
    rules = (arch.answer or {}).get("fp32")
    if half not in (dtypes.bfloat16, dtypes.float16) or not isinstance(rules, dict):
        return
    held = {name: headers[file].entries[name].dtype for name, file in loaded.items()
            if file in headers and name in headers[file].entries}
    # matched as transformers loads the names (renamed from a checkpoint's original spellings)
    loads_as = architecture.first_loads_as(arch.answer)
    rounded = sorted(n for n in architecture.kept_in_float32(held, rules, half.name, loads_as) if held[n] == half)
    if rounded:
        report.notes.append(f"{len(rounded)} tensors transformers keeps in float32 in a {half.name} model are "
                            f"{half.name} here ({rounded[0]}{', ...' if len(rounded) > 1 else ''}): they load upcast "
                            "with rounded values; a merge writes them in float32 unless given float32_names")
