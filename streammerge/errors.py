"""Errors a user can act on: each names the file and the problem in one line."""

from __future__ import annotations


class StreammergeError(Exception):
    """Base class: the CLI prints these as one line (no traceback unless --debug)."""

    exit_code = 2


class CheckpointError(StreammergeError):
    """The input folder is not a usable checkpoint (missing ranks, corrupt files, mixed runs...)."""


class UnsafePickleError(CheckpointError):
    """A rank file needs pickle features outside torch's weights-only allowlist."""


class UnsupportedLayoutError(CheckpointError):
    """A placement or layout we cannot place bytes for (e.g. Partial)."""


class OutputError(StreammergeError):
    """The output folder cannot be written safely (not empty, inside the checkpoint, disk full...)."""


class VerifyError(StreammergeError):
    """An output file does not match its plan, manifest or source."""

    exit_code = 1


class ConfigError(StreammergeError):
    """A setting is missing or wrong: a flag, a config file, the model name, a config that does not fit the weights."""
