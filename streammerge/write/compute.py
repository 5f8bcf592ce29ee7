"""Computed tensors: a LoRA fold `W + scale * (B @ A)`, one window of W's rows at a time.

The arithmetic is peft's merge (`delta = (B @ A) * scaling; W += delta`) in float32, done by torch
(imported only when a plan holds a fold) so that rounding is torch's own; the result is then cast
to the output dtype with torch's `.to()`. A window of rows needs only the same rows of B and the
matching columns of A, so memory stays at a few windows whatever the size of W.
"""

from __future__ import annotations

import math

import numpy as np

from .. import dtypes
from ..plan import TensorPlan
from .writer import Box, Sources, fill_window


def _read_f32(source, box: Box, scratch: np.ndarray, sources: Sources) -> np.ndarray:
    """One box of a source tensor, as float32 (cast bit for bit as torch's .to() would)."""
    shape = tuple(hi - lo for lo, hi in box)
    buf = np.empty(math.prod(shape), dtype=np.float32)
    fill_window(TensorPlan(source.name, source, dtypes.float32), box, buf.view(np.uint8), scratch, sources)
    return buf.reshape(shape)


def fill_fold_window(t: TensorPlan, box: Box, out: np.ndarray, scratch: np.ndarray, sources: Sources) -> int:
    """Window `box` (rows, columns) of the folded weight, in the output dtype, into `out`; returns its bytes.

    The same operations as peft's merge, in its order: `delta = B @ A`, `delta *= scale`, `W += delta`.
    A float32 output is folded in place in `out` (W is read straight into it).
    """
    import torch

    fold = t.fold
    assert fold is not None and len(box) == 2
    (r0, r1), (c0, c1) = box
    rank = fold.a.shape[0]
    b = torch.from_numpy(_read_f32(fold.b, ((r0, r1), (0, rank)), scratch, sources))
    a = torch.from_numpy(_read_f32(fold.a, ((0, rank), (c0, c1)), scratch, sources))
    delta = torch.mm(b, a)
    delta.mul_(fold.scale)
    if t.dtype == dtypes.float32:
        n = fill_window(TensorPlan(t.source.name, t.source, dtypes.float32), box, out, scratch, sources)
        w = torch.from_numpy(out[:n].view(np.float32)).view(r1 - r0, c1 - c0)
        w.add_(delta)
        return n
    w = torch.from_numpy(_read_f32(t.source, box, scratch, sources))
    w.add_(delta)
    result = w.to(t.dtype.torch()).contiguous().view(torch.uint8).reshape(-1).numpy()
    out[:result.size] = result
    return int(result.size)
