"""The package's boundaries, checked: the merge path (sources, plan, write, pipeline, CLI) imports no torch.

A merge of a model that needs no float8 cast and no LoRA fold runs without torch (1-2 s and ~220 MB
saved on a login node); that holds only while no module on the path imports torch, transformers
or huggingface_hub at import time. test_merge.py checks a whole merge; this checks every module.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import streammerge

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "huggingface_hub", "peft")
# modules whose job needs torch (they are imported only when that job runs)
TORCH_MODULES = {"streammerge.write.torch_format", "streammerge.testing.synthetic", "streammerge.testing.demo"}
NEEDS_HUB = ("streammerge.hub", "streammerge.publish", "streammerge.watch")


def _modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(streammerge.__path__, "streammerge."):
        name = info.name
        if (name.endswith("__main__") or name in TORCH_MODULES or name.startswith(NEEDS_HUB)
                or name.startswith("streammerge.testing")):
            continue
        names.append(info.name)
    return sorted(names)


def test_merge_path_modules_import_no_torch() -> None:
    names = _modules()
    assert {"streammerge.sources.verl", "streammerge.plan", "streammerge.write.writer", "streammerge.pipeline",
            "streammerge.cli"} <= set(names)
    code = ("import importlib, json, sys\n"
            "bad = {}\n"
            "for name in json.loads(sys.argv[1]):\n"
            "    before = set(sys.modules)\n"
            "    importlib.import_module(name)\n"
            f"    heavy = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in {HEAVY!r})\n"
            "    if heavy: bad[name] = heavy[:3]\n"
            "print(json.dumps(bad))\n")
    run = subprocess.run([sys.executable, "-c", code, json.dumps(names)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == {}, run.stdout


def test_public_names_resolve_to_the_functions_whatever_was_imported_first() -> None:
    """`streammerge.plan` and `streammerge.verify` are functions though submodules of those names exist, and
    `import streammerge` alone loads none of the pipeline (the script's start, where a Ctrl-C must stay clean)."""
    code = ("import json, sys, types\n"
            "first = sys.argv[1]\n"
            "if first: __import__(first)\n"
            "import streammerge\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('streammerge.'))\n"
            "kinds = {n: type(getattr(streammerge, n)).__name__ for n in streammerge.__all__}\n"
            "from streammerge import plan, verify\n"
            "print(json.dumps([loaded, kinds, callable(plan) and callable(verify), sorted(dir(streammerge))]))\n")
    for first in ("", "streammerge.plan", "streammerge.verify", "streammerge.cli"):
        run = subprocess.run([sys.executable, "-c", code, first], capture_output=True, text=True, cwd=REPO,
                             timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        loaded, kinds, callables, names = json.loads(run.stdout)
        if not first:
            assert loaded == [], loaded
        assert not [n for n, kind in kinds.items() if kind == "module"], kinds
        assert kinds["plan"] == kinds["verify"] == kinds["merge"] == "function" and callables
        assert set(streammerge.__all__) <= set(names)
