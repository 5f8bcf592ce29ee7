"""verify's reference reader for DeepSpeed ZeRO checkpoints: torch's own loader, none of the merge's readers.

Each file is read by `torch.load(weights_only=True, mmap=True)`, with DeepSpeed's three classes (loss scaler, ZeRO
stage, fragment address) allowlisted under their names as inert stand-ins of this module (torch's `safe_globals`),
so nothing from the file runs and DeepSpeed need not be installed. A parameter's elements are then taken out of the
memory-mapped flat partitions by torch's own tensor ops, walking the layout as DeepSpeed's zero_to_fp32.py describes
it; shared with the merge: the file names and that description. Memory: the rows a box asks for.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .base import Oracle

Box = tuple[tuple[int, int], ...]
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


class _Inert:
    """A DeepSpeed object in the pickle (loss scaler, fragment address): its state kept, nothing of DeepSpeed run."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Stage(int):
    """DeepSpeed's ZeroStageEnum(n), as the number."""


def _stand_in(path: str, base: type) -> type:
    """A class of ours under DeepSpeed's name (module and qualname), which is how torch's allowlist finds it."""
    module, _, name = path.rpartition(".")
    return type(name, (base,), {"__module__": module, "__qualname__": name})


_STAND_INS: list[Any] = [_stand_in("deepspeed.runtime.fp16.loss_scaler.LossScaler", _Inert),
                         _stand_in("deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", _Inert),
                         _stand_in("deepspeed.runtime.zero.config.ZeroStageEnum", _Stage),
                         _stand_in("deepspeed.utils.tensor_fragment.fragment_address", _Inert)]


def _load(path: Path) -> Any:
    import torch

    try:
        with torch.serialization.safe_globals(_STAND_INS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (torch's loader raises many kinds; each is a file it refuses)
        raise CheckpointError(f"{path}: torch.load refuses it ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]})") from None


class DeepSpeedOracle(Oracle):
    """The master weights (and buffers) of a ZeRO step folder, as torch loads its files."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._ready = False

    def load_all(self) -> None:
        if self._ready:
            return
        files = sorted((p for p in self.folder.iterdir() if _OPTIM.match(p.name)),
                       key=lambda p: int(_OPTIM.match(p.name).group(1)))  # type: ignore[union-attr]
        optim = [_load(p)["optimizer_state_dict"] for p in files]
        self.stage = int(optim[0]["zero_stage"])
        self.world = len(files)
        key = "single_partition_of_fp32_groups" if self.stage <= 2 else "fp32_flat_groups"
        base = "base_optimizer_state" if self.stage <= 2 else "optimizer_state_dict"
        self.flats = [o[key] for o in optim]  # [rank][group]
        states = [[o[base]["state"][g] for g in sorted(o[base]["state"])] for o in optim]  # [rank][group]
        self.tables = {"fp32": self.flats}  # what -> [rank][group]: the master weights, exp_avg, exp_avg_sq, ...
        self.tables.update({k: [[s[k] for s in per_rank] for per_rank in states] for k in states[0][0] if k != "step"})
        self.steps = [s.get("step") for s in states[0]]
        self.paddings = optim[0].get("param_alignment_paddings") if self.stage <= 2 else None
        model_file = "mp_rank_00_model_states.pt" if self.stage <= 2 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
        model = _load(self.folder / model_file)
        self.files = files
        self.groups = [list(g.items()) for g in model["param_shapes"]]
        self.where: dict[str, tuple[int, int]] = {n: (g, i) for g, ps in enumerate(self.groups)
                                                  for i, (n, _) in enumerate(ps)}
        self.shared = dict(model.get("shared_params") or {})
        self.buffers = {n: model["module"][n] for n in model.get("buffer_names") or []}
        self.frozen = dict(model.get("frozen_param_shapes") or {})  # name -> shape: not trained (a LoRA run's base)
        ranks = [model] if self.stage <= 2 or not self.frozen else [
            model, *(_load(self.folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt") for r in range(1, self.world))]
        self.fragments = [m.get("frozen_param_fragments") or {} for m in ranks]  # [rank][name]: whole, or a chunk
        self.starts = self._starts()
        self._ready = True

    def _starts(self) -> dict[tuple[int, int], int]:
        """(group, index) -> where the parameter starts: in its group's buffer (stages 1 and 2: the ranks' partitions
        end to end, each parameter followed by its padding), or in every rank's flats end to end (stage 3: its chunk of
        ceil(numel / world) elements). One pass: summed again per read, an MoE's thousands of parameters would cost
        the square of their number."""
        out, at = {}, 0
        for g, params in enumerate(self.groups):
            pads = self.paddings[g] if self.paddings is not None else [0] * len(params)
            at = 0 if self.stage <= 2 else at
            for i, ((_, shape), pad) in enumerate(zip(params, pads)):
                out[(g, i)] = at
                at += math.prod(shape) + pad if self.stage <= 2 else math.ceil(math.prod(shape) / self.world)
        return out

    reads_flat = True  # every tensor whole, however the merge's plan cuts it into pieces

    def _param(self, name: str) -> tuple[int, int, str] | None:
        """(group, index, what): `what` is "fp32" for a weight, else the optimizer state key (`<param>.<key>`)."""
        self.load_all()
        at = self.where.get(self.shared.get(name, name))
        if at is not None:
            return (*at, "fp32")
        param, _, key = name.rpartition(".")
        at = self.where.get(param)
        return (*at, key) if at is not None and (key in self.tables or key == "step") else None

    def shape(self, name: str) -> tuple[tuple[int, ...], str] | None:
        at = self._param(name)
        if at is not None:
            g, i, what = at
            if what == "step":
                step = self.steps[g]
                return None if step is None else ((), str(step.dtype).removeprefix("torch."))
            return tuple(self.groups[g][i][1]), str(self.tables[what][0][g].dtype).removeprefix("torch.")
        if name in self.frozen:
            return tuple(self.frozen[name]), str(self.fragments[0][name].dtype).removeprefix("torch.")
        b = self.buffers.get(name)
        return None if b is None else (tuple(b.shape), str(b.dtype).removeprefix("torch."))

    def _frozen_rows(self, name: str, lo: int, hi: int) -> Any:
        """Rows [lo, hi) of a frozen parameter: the saved tensor (stages 1 and 2), or the ranks' chunks end to end."""
        shape = tuple(self.frozen[name])
        if self.stage <= 2:
            return self.fragments[0][name][lo:hi].clone()
        inner = math.prod(shape[1:])
        chunks = [f[name] for f in self.fragments]
        flat = self._rank_range(chunks, lo * inner, (hi - lo) * inner)  # chunk r starts at element r * chunk
        return flat.reshape((hi - lo, *shape[1:]))

    def _elements(self, g: int, i: int, what: str, lo: int, hi: int) -> Any:
        """Elements [lo, hi) of the flattened parameter (or of its optimizer state `what`)."""
        import torch

        flats = self.tables[what]
        start = self.starts[(g, i)]
        parts = []
        if self.stage <= 2:
            parts.append(self._rank_range([flats[r][g] for r in range(self.world)], start + lo, hi - lo))
        else:
            chunk = math.ceil(math.prod(self.groups[g][i][1]) / self.world)
            for r in range(self.world):
                a, b = max(lo, r * chunk), min(hi, (r + 1) * chunk)
                if a >= b:
                    continue
                parts.append(self._rank_range(flats[r], start + a - r * chunk, b - a))
        got = torch.cat(parts) if len(parts) != 1 else parts[0].clone()
        if got.numel() != hi - lo:
            raise CheckpointError(f"{self.folder}: the partitions hold {got.numel()} of a parameter's {hi - lo} "
                                  "elements asked for")
        return got

    @staticmethod
    def _rank_range(groups: list, at: int, n: int) -> Any:
        """n elements from `at` of flat tensors taken end to end: a rank's groups (a ZeRO-3 chunk may cross from one
        to the next), or a group's ranks (ZeRO-1/2: the ranks' partitions, the last one's longer by the padding)."""
        import torch

        out, base = [], 0
        for t in groups:
            a, b = max(at, base), min(at + n, base + t.numel())
            if a < b:
                out.append(t.narrow(0, a - base, b - a))
            base += t.numel()
        return torch.cat(out) if out else torch.empty(0)

    def read(self, name: str, box: Box) -> Any:
        at = self._param(name)
        if at is None and name in self.frozen:
            if not self.frozen[name]:
                return self._frozen_rows(name, 0, 1).reshape(())
            rows = self._frozen_rows(name, box[0][0], box[0][1])
            return rows[(slice(None), *(slice(lo, hi) for lo, hi in box[1:]))]
        if at is None:
            b = self.buffers[name]
            return b[tuple(slice(lo, hi) for lo, hi in box)].clone()
        g, i, what = at
        if what == "step":
            return self.steps[g].clone()
        shape = tuple(self.groups[g][i][1])
        if not shape:
            return self._elements(g, i, what, 0, 1).reshape(())
        inner = math.prod(shape[1:])
        rows = self._elements(g, i, what, box[0][0] * inner, box[0][1] * inner).reshape(
            (box[0][1] - box[0][0], *shape[1:]))
        return rows[(slice(None), *(slice(lo, hi) for lo, hi in box[1:]))]

    def locate(self, name: str, index: tuple[int, ...]) -> str:
        return f"the ZeRO partitions in {self.folder}"
