"""Shared fixtures: synthetic veRL checkpoints made once per session, and the GPU-made fixtures.

    def test_something(make_ckpt):
        actor = make_ckpt(world_size=4, shard_placement="first_divisible")  # -> .../actor

    def test_real(verl_fixtures):
        actor = verl_fixtures / "fsdp2_qwen2_tied_ws4"      # tests/data/verl: always there

    def test_extra(shared_verl_fixtures):
        actor = shared_verl_fixtures / "gpu_fsdp2_qwen2_tied_ws4"   # larger ones outside the project: skipped if absent

Checkpoints from ``make_ckpt`` are shared by every test that asks for the same arguments:
treat them as read-only and ``shutil.copytree`` the actor dir before changing anything.
"""

from __future__ import annotations

import inspect
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

# A shell that starts pytest in the background (`cmd &`) sets SIGINT to "ignore", and every child
# inherits that: Ctrl-C tests of the CLI would then test nothing. Python's own handler here means
# children start with the default again.
signal.signal(signal.SIGINT, signal.default_int_handler)

from fixture_paths import SHARED_VERL, VERL_DATA  # noqa: E402

from streammerge.testing.synthetic import make_checkpoint  # noqa: E402


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: unknown to pytest where xdist is not installed
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's addopts): a worker per core, at most 8, since many tests start process trees of
    their own (torchrun hosts, the CLI, its architecture child)."""
    import os

    return max(1, min(8, len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session", autouse=True)
def architecture_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The architecture check's answers go to a folder of this run, not the user's ~/.cache (CLI children too)."""
    import os

    folder = tmp_path_factory.mktemp("streammerge-cache")
    os.environ["STREAMMERGE_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def verl_fixtures() -> Path:
    """The GPU-made veRL checkpoints in tests/data/verl (one folder per case, each with reference/)."""
    assert VERL_DATA.is_dir(), f"{VERL_DATA} is part of the project: restore it (git checkout tests/data)"
    return VERL_DATA


@pytest.fixture(scope="session")
def shared_verl_fixtures() -> Path:
    """Larger GPU-made veRL checkpoints kept outside the project (an extra: skipped when absent)."""
    if not SHARED_VERL.is_dir():
        pytest.skip(f"extra veRL fixtures not found at {SHARED_VERL} (set STREAMMERGE_FIXTURES to their folder; "
                    "tests/data/verl covers the same cases)")
    return SHARED_VERL


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_ckpt(**make_checkpoint_kwargs) -> actor dir``, cached by the full argument set."""
    cache: dict[tuple, Path] = {}
    signature = inspect.signature(make_checkpoint)

    def make(**kwargs) -> Path:
        bound = signature.bind_partial(**kwargs)
        bound.apply_defaults()  # so make_ckpt() and make_ckpt(world_size=2) share one checkpoint
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in bound.arguments.items()}
        key = tuple(sorted(args.items()))
        if key not in cache:
            cache[key] = make_checkpoint(tmp_path_factory.mktemp("ckpt"), **kwargs)
        return cache[key]

    return make


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """No Xet, no token or endpoint from the machine, an empty HF cache, quiet progress bars."""
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    disable_progress_bars()
    yield
    enable_progress_bars()


@pytest.fixture
def hub():
    """A Hub-compatible server on 127.0.0.1 (tests/hubserver.py); a bug inside it fails the test."""
    from hubserver import HubServer

    with HubServer() as server:
        yield server
    assert not server.errors, server.errors
