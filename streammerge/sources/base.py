"""What every checkpoint format provides: its tensors as pieces of files, found from metadata alone.

A source (one per format: veRL FSDP rank files, torch DCP, Megatron) finds its files and describes
each tensor it holds -- name, full shape, dtype, and the `Piece`s of files its bytes lie in -- without
reading tensor data and without importing torch. The planner turns these into output files; the
writer copies the pieces. Nothing downstream knows which format a piece came from.
"""

from __future__ import annotations

import abc
import errno
import hashlib
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dtypes import DType
from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..options import MergeOptions
    from ..plan import Plan


def open_checkpoint_file(path: str | os.PathLike) -> int:
    """A read-only fd on a checkpoint file; one-line CheckpointError when it cannot be opened.

    Every data file stays open for the whole pass (a DCP save with one file per tensor group, or a
    thousand ranks, passes the usual soft limit of 1024): on EMFILE the soft limit is raised to the hard
    one once and the open retried.
    """
    try:
        try:
            return os.open(path, os.O_RDONLY)
        except OSError as e:
            if e.errno != errno.EMFILE or not _raise_open_files_limit():
                raise
            return os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno == errno.EMFILE:
            import resource
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            raise CheckpointError(f"{path}: cannot open it: the checkpoint has more files than this process may "
                                  f"hold open ({limit}); raise the limit (ulimit -Hn) and rerun") from None
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None


def _raise_open_files_limit() -> bool:
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == hard:
            return False
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return True
    except (ImportError, ValueError, OSError):
        return False


def pread_into(fd: int, view: memoryview, offset: int) -> bool:
    """Fill `view` from the file at `offset`; False when the file ends first."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            return False
        done += n
    return True


def no_readahead(fd: int) -> int:
    """Keep the kernel from reading ahead on `fd`, and return it.

    Metadata reads touch a few bytes per record. Pages read ahead around them carry a read-ahead mark,
    and a later hit on one makes the kernel read ahead blindly for the writer too, fetching again what
    it has already read and evicted; the writer reads exact ranges and prefetches them itself.
    """
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return fd


@dataclass(frozen=True, slots=True)  # one per tensor per rank: keep it small
class Piece:
    """A box of a tensor, stored contiguously or strided in one file."""

    rank: int  # which rank (or chunk) wrote it: for messages only
    file: str
    offset: int  # byte offset in the file of the piece's first element
    shape: tuple[int, ...]  # the box's size
    stride: tuple[int, ...]  # in elements, as stored
    start: tuple[int, ...]  # index of the box's first element in the full tensor


@dataclass(frozen=True)
class SourceTensor:
    """One tensor as a checkpoint stores it: its full shape and dtype, and pieces that tile it exactly once."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    pieces: Sequence[Piece]  # a tuple, or a lazy sequence for large checkpoints
    layout: str = "plain"  # for display: "Shard(0)", "(Replicate(), Shard(0))", "plain", "4 chunks"
    flat: bool = False  # pieces are boxes of the flattened tensor (FSDP1 flat parameters)

    @property
    def geometry(self) -> tuple[int, ...]:
        """The shape the pieces are boxes of."""
        n = 1
        for s in self.shape:
            n *= s
        return (n,) if self.flat else self.shape

    def renamed(self, name: str) -> SourceTensor:
        return SourceTensor(name, self.shape, self.dtype, self.pieces, self.layout, self.flat)


def pieces_key(pieces: Sequence[Piece]) -> str:
    """A stable digest of where a tensor's bytes are (part of the resume fingerprint)."""
    key = getattr(pieces, "key", None)
    if callable(key):
        return key()
    h = hashlib.sha256()
    for p in pieces:
        h.update(repr((p.rank, p.file, p.offset, p.shape, p.stride, p.start)).encode())
    return h.hexdigest()[:32]


@dataclass
class ReadStats:
    """How the metadata was read: the fast paths taken, and every fallback with its reason.

    A fallback is never an error (the slow path gives the same answer), but it should never be
    silent either: `inspect` and the merge summary print this.
    """

    files: int = 0
    matched: int = 0  # files proven alike a decoded one by byte compares
    decoded: int = 0  # files decoded in full
    torch_loaded: int = 0  # files read with torch.load (weights-only) because our decoder declined
    fallbacks: Counter = field(default_factory=Counter)  # reason -> how many files
    left_out: Counter = field(default_factory=Counter)  # a model file's entry that is no tensor -> how many files

    def fell_back(self, reason: str) -> None:
        self.fallbacks[reason] += 1

    def describe(self) -> str:
        parts = [f"{self.files} files"]
        if self.matched:
            parts.append(f"{self.matched} matched by byte compares")
        parts.append(f"{self.decoded} decoded")
        if self.torch_loaded:
            parts.append(f"{self.torch_loaded} read with torch.load")
        text = ", ".join(parts)
        if self.left_out:
            text += "; left out (not tensors): " + ", ".join(n for n, _ in self.left_out.most_common(3))
        if self.fallbacks:
            text += "; fell back: " + "; ".join(f"{n} x {why}" for why, n in self.fallbacks.most_common(3))
        return text


class Oracle(abc.ABC):
    """An independent reader of a checkpoint's tensors, through torch's own loaders: verify's reference.

    It shares nothing with the source's metadata readers (no zip parsing, no unpickler of ours), so
    a bug in those cannot hide itself from `verify OUT CKPT`. Boxes are `((lo, hi), ...)` of the
    full tensor; reads are bounded by the box (plus what torch memory-maps).
    """

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[tuple[int, ...], str] | None:
        """(full shape, dtype name) of a tensor as torch sees it; None when the checkpoint has no such tensor."""

    @abc.abstractmethod
    def read(self, name: str, box: tuple[tuple[int, int], ...]) -> Any:
        """One box of the full tensor, as a torch tensor in its saved dtype."""

    def locate(self, name: str, index: tuple[int, ...]) -> str:
        """Which file holds one element of a tensor, for messages ("rank 2's file ...")."""
        return "the checkpoint"

    def check_integrity(self, paths: Sequence[Path]) -> list[str]:
        """Checksums the format keeps and torch's loader skips (zip CRC-32s): one problem per line."""
        return []

    def disagreements(self) -> list[str]:
        """Copies of one piece that `read` found to differ (HSDP replicas): one problem per tensor and file."""
        return []

    reads_flat = False  # `read` gives boxes of tensors the source stores as pieces of the flattened tensor
    crc_from_reads = 0  # records whose checksum check_integrity took from what `read` gave
    crc_streamed = 0  # records check_integrity read for their checksum

    def crc_by_slow_reader(self) -> dict[str, int]:
        """Records check_integrity could not stream its fast way and read through a general reader, counted by why."""
        return {}

    def crc_as_read(self) -> bool:
        """Check checksums from the bytes `read` gives, before `check_integrity` streams what is left; False
        when this oracle cannot (then `check_integrity` reads everything)."""
        return False

    def release(self, t: Any) -> None:  # noqa: B027  (oracles that map nothing hold nothing per tensor)
        """Let go of what reading a compared output tensor `t` (a TensorPlan) brought into memory."""

    def prefetch(self) -> None:  # noqa: B027  (oracles that load nothing up front need nothing here)
        """Queue the small reads `load_all` will make, without waiting: verify calls this before it starts streaming
        the files for their checksums, behind which those reads would queue."""

    def load_all(self) -> None:  # noqa: B027  (oracles that load nothing up front need nothing here)
        """Read every file's metadata now, before the comparisons need it."""

    def close(self) -> None:  # noqa: B027  (most oracles hold nothing to release)
        """Release files and maps."""


class Source(abc.ABC):
    """A checkpoint found on disk. Subclasses read one format."""

    format: str = "?"  # "veRL FSDP", "torch DCP", "Megatron torch_dist"
    oracle_modules: tuple[str, ...] = ("torch",)  # what the oracle imports: verify starts that early
    oracle_after_plan = False  # the oracle needs what planning learns (the config): verify makes it after planning
    takes_key_prefix = False  # --key-prefix picks the model's tensors out of the saved dict (plain DCP only)
    # [size, mtime_ns] of its files (by path) when a caller found it complete (watch: two equal looks); a merge takes
    # this as the state it must end with, so a file saved again after those looks but before the merge read it fails
    seen: dict[str, list[int]] | None = None

    def __init__(self, path: Path, *, step: int | None = None, hf_dir: Path | None = None):
        self.path = path  # the folder holding the files
        self.step = step
        self.hf_dir = hf_dir  # config.json and tokenizer as saved with the checkpoint, if any
        self.stats = ReadStats()
        self.lora_base: Source | None = None  # an adapter-only LoRA checkpoint's base model (--base-model)

    @property
    def root(self) -> Path:
        """The folder holding the checkpoint and its huggingface/: copied files may not link out of it."""
        return self.path

    def trainer_folder(self) -> Path | None:
        """The folder a trainer saved the checkpoint into beside its own files (the HF Trainer's checkpoint-N/ around a
        DeepSpeed save): its config.json and tokenizer are taken as --model-name takes a folder (those alone) where
        nothing else names a config, and its peft adapter_config.json tells the LoRA settings."""
        return None

    def use_model(self, config: dict | None, model_dir: Path | None) -> None:
        """The config the merge writes (from the checkpoint or --model-name), given before `tensors`:
        formats whose tensors are named and laid out by the architecture (Megatron) need it."""
        return None

    @abc.abstractmethod
    def tensors(self, options: MergeOptions) -> dict[str, SourceTensor]:
        """Every model tensor, in save order, under the names the checkpoint uses."""

    def warnings(self, options: MergeOptions) -> list[str]:
        """What the merge leaves out of the checkpoint that might have been meant as the model's."""
        return []

    def optimizer_plan(self, weights: Plan, options: MergeOptions, config: dict | None,
                       model_dir: Path | None) -> tuple[Plan | None, list[str]]:
        """The optimizer export, or (None, [why not]) when there is none or it cannot be named safely."""
        return None, []

    def has_optimizer(self) -> bool:
        return False

    def info(self) -> dict[str, Any]:
        """Facts for `inspect` and the model card (world size, FSDP version, ...)."""
        return {}

    def files(self) -> list[Path]:
        """Every file the tensors are read from (for watch and verify)."""
        return []

    def oracle(self, options: MergeOptions) -> Oracle | None:
        """An independent reader for `verify` (None: this format has none; verify then says so)."""
        return None

    def names_hint(self) -> str | None:
        """What to try where transformers refuses the names as the model's, when the format can tell (a wrapper's
        names around the model), for the refusal's one line."""
        return None

    def describe(self) -> list[str]:
        info = ", ".join(f"{k} {v}" for k, v in self.info().items() if v is not None)
        step = self.step if self.step is not None else "?"
        return [f"checkpoint  {self.path}", f"format      {self.format}   step {step}" + (f"   {info}" if info else ""),
                f"read        {self.stats.describe()}"]


def step_of(path: Path, step_dir: re.Pattern[str]) -> int | None:
    """The training step a checkpoint folder belongs to: the innermost folder named like ``step_dir``."""
    for part in reversed(path.parts):
        m = step_dir.match(part)
        if m:
            return int(next(g for g in m.groups() if g is not None))
    return None


def bytes_rows(x: Any) -> Any:
    """A tensor's elements as rows of raw bytes: equality is bit equality (NaNs, -0.0 and all)."""
    import torch

    x = x.resolve_conj().resolve_neg().contiguous().reshape(-1)  # a lazy view's values, not its stored bytes
    return x.view(torch.uint8).reshape(x.numel(), x.element_size())


def row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The element strides of a contiguous tensor of this shape."""
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))
