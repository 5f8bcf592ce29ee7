"""Computed tensors: a LoRA fold `W + scale * (B @ A)`, one window of W's rows at a time.

The arithmetic is peft's merge (`delta = B @ A; delta *= scale; W += delta`) in float32 (float64 where W or a
factor is float64: `TensorPlan.fold_dtype`), done by torch
(imported only when a plan holds a fold) so that rounding is torch's own; the result is then cast
to the output dtype with torch's `.to()`. A window of W needs only rows of B and all of A (r x in,
small), so memory stays at a few windows whatever the size of W.

`B @ A` is always computed in the same row blocks (`fold_blocks`: a size set by W's width alone,
16 to 256 rows, the last block up to twice that; every column), whatever the window: BLAS picks
other kernels for other shapes (one row, a few columns) and their sums round differently, so
windows cut anywhere would give bits that depend on the buffer size. In blocks like these, every
row comes out as in the whole product peft computes (checked on many shapes, ranks and thread
counts; tests compare with peft bit for bit), and verify, which recomputes folds in windows of its
own, uses the same blocks.

A GPT-2-style Conv1D keeps W as (in x out), and peft folds `(B @ A).T * scale` (fan_in_fan_out):
W's window rows are columns of B @ A and its window columns are rows, so the window takes the same
blocks of B @ A (every column) that cover its columns, and adds their transposed slice. A window of
whole rows of W then needs every block: the product is recomputed per window rather than held.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import DType
from ..plan import TensorPlan
from ..sources.base import SourceTensor, pieces_key, row_major
from .writer import Box, Sources, fill_window

if TYPE_CHECKING:
    import torch

FOLD_BLOCK_BYTES = 256 << 10  # a block of the product stays in cache while it is scaled and added
_CACHE_SIZE = 16  # lora_A and lora_B of the folds in flight: read once per weight, not once per window


def block_rows(cols: int) -> int:
    return max(16, min(256, FOLD_BLOCK_BYTES // (4 * max(1, cols))))


def fold_blocks(rows: int, cols: int, r0: int, r1: int) -> Iterator[tuple[int, int]]:
    """The fixed row blocks of a `rows` x `cols` product that meet rows [r0, r1)."""
    size = block_rows(cols)
    n = max(1, rows // size)
    first = min(r0 // size, n - 1)
    for i in range(first, n):
        lo, hi = i * size, (i + 1) * size if i < n - 1 else rows
        if lo >= r1:
            break
        yield lo, hi


def add_delta(w: torch.Tensor, read_b: Callable[[int, int], Any], a: torch.Tensor, scale: float, rows: int,
              box: Box, transpose: bool = False) -> None:
    """`w` (the window `box` of W, float32) += the same window of `(B @ A) * scale` (`transpose`: of
    `(B @ A).T * scale`, W being a Conv1D's), in the fixed blocks.

    `read_b(lo, hi)` gives rows lo..hi of B as float32; `a` is all of A as float32; `rows` is B's.
    """
    import torch

    (r0, r1), (c0, c1) = box
    if transpose:  # the window's columns are the product's rows
        (r0, r1), (c0, c1) = (c0, c1), (r0, r1)
    blocks = list(fold_blocks(rows, a.shape[1], r0, r1))
    first, last = blocks[0][0], blocks[-1][1]
    b = read_b(first, last)
    for lo, hi in blocks:
        delta = torch.mm(b[lo - first:hi - first], a)
        s, e = max(lo, r0), min(hi, r1)
        if transpose:
            w[:, s - r0:e - r0].add_(delta[s - lo:e - lo, c0:c1].mul_(scale).t())
        else:
            delta.mul_(scale)
            w[s - r0:e - r0].add_(delta[s - lo:e - lo, c0:c1])


def _read_as(work: DType, source, box: Box, scratch: np.ndarray, sources: Sources) -> np.ndarray:
    """One box of a source tensor, as `work` (the fold's float32 or float64; cast bit for bit as torch's .to()
    would)."""
    shape = tuple(hi - lo for lo, hi in box)
    buf = np.empty(math.prod(shape), dtype=np.dtype(work.numpy))
    fill_window(TensorPlan(source.name, source, work), geometry_box(source, box), buf.view(np.uint8), scratch, sources)
    return buf.reshape(shape)


def geometry_box(source, box: Box) -> Box:
    """`box` of the tensor in the coordinates its pieces use: itself, or for a tensor stored flattened (DeepSpeed's
    partitions) the run of the flattened tensor it is, which it is for the boxes windows are cut into (part of one
    row, or whole rows)."""
    if not source.flat:
        return box
    strides = row_major(source.shape)
    first = sum(lo * st for (lo, _), st in zip(box, strides))
    n = math.prod(hi - lo for lo, hi in box)
    last = sum((hi - 1) * st for (_, hi), st in zip(box, strides))
    assert n == 0 or last - first + 1 == n, (source.name, box)  # a contiguous run
    return ((first, first + n),)


_a_cache: OrderedDict[tuple[str, str, str], torch.Tensor] = OrderedDict()
_a_lock = threading.Lock()


def _whole_as(work: DType, a: SourceTensor, scratch: np.ndarray, sources: Sources) -> torch.Tensor:
    """All of lora_A or lora_B as `work`, read once for the windows of its weight (a few recent ones are
    kept): small reads once per window would each cost a seek on a cold cache."""
    import torch

    key = (a.name, pieces_key(a.pieces), work.name)
    with _a_lock:
        hit = _a_cache.get(key)
        if hit is not None:
            _a_cache.move_to_end(key)
            return hit
    value = torch.from_numpy(_read_as(work, a, ((0, a.shape[0]), (0, a.shape[1])), scratch, sources))
    with _a_lock:
        _a_cache[key] = value
        while len(_a_cache) > _CACHE_SIZE:
            _a_cache.popitem(last=False)
    return value


def forget() -> None:
    """Drop the cached adapter tensors (at the end of a merge: a later one may read rewritten files)."""
    with _a_lock:
        _a_cache.clear()


def fill_fold_window(t: TensorPlan, box: Box, out: np.ndarray, scratch: np.ndarray, sources: Sources) -> int:
    """Window `box` (rows, columns) of the folded weight, in the output dtype, into `out`; returns its bytes.

    A float32 output is folded in place in `out` (W is read straight into it). Runs in a writer thread:
    the threads already fold windows in parallel, and OpenMP threads inside each small product only
    add overhead (the setting is per thread).
    """
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)

    fold = t.fold
    assert fold is not None and len(box) == 2
    (r0, r1), (c0, c1) = box

    work = t.fold_dtype
    b = _whole_as(work, fold.b, scratch, sources)
    a = _whole_as(work, fold.a, scratch, sources)

    def read_b(lo: int, hi: int) -> torch.Tensor:
        return b[lo:hi]

    if t.dtype == work:
        n = fill_window(TensorPlan(t.source.name, t.source, work), geometry_box(t.source, box), out, scratch, sources)
        w = torch.from_numpy(out[:n].view(np.dtype(work.numpy))).view(r1 - r0, c1 - c0)
        add_delta(w, read_b, a, fold.scale, fold.b.shape[0], box, fold.transpose)
        return n
    w = torch.from_numpy(_read_as(work, t.source, box, scratch, sources))
    add_delta(w, read_b, a, fold.scale, fold.b.shape[0], box, fold.transpose)
    result = w.to(t.dtype.torch()).contiguous().view(torch.uint8).reshape(-1).numpy()
    out[:result.size] = result
    return int(result.size)
