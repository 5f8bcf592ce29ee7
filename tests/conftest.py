"""Shared fixtures: synthetic veRL checkpoints made once per session, and the GPU-made fixtures.

    def test_something(make_ckpt):
        actor = make_ckpt(world_size=4, shard_placement="first_divisible")  # -> .../actor

    def test_real(verl_fixtures):
        actor = verl_fixtures / "gpu_fsdp2_qwen2_tied_ws4"

Checkpoints from ``make_ckpt`` are shared by every test that asks for the same arguments:
treat them as read-only and ``shutil.copytree`` the actor dir before changing anything.
"""

from __future__ import annotations

import inspect
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

# A shell that starts pytest in the background (`cmd &`) sets SIGINT to "ignore", and every child
# inherits that: Ctrl-C tests of the CLI would then test nothing. Python's own handler here means
# children start with the default again.
signal.signal(signal.SIGINT, signal.default_int_handler)

from streammerge.testing.synthetic import make_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
VERL_FIXTURES = Path(
    os.environ.get("STREAMMERGE_FIXTURES") or REPO_ROOT.parent / "shared" / "fixtures" / "verl"
).resolve()


@pytest.fixture(scope="session")
def verl_fixtures() -> Path:
    """The real GPU-made veRL checkpoints (one folder per case); skips when not present."""
    if not VERL_FIXTURES.is_dir():
        pytest.skip(f"veRL fixtures not found at {VERL_FIXTURES}; set STREAMMERGE_FIXTURES to their folder")
    return VERL_FIXTURES


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
