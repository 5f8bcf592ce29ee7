"""Element types without torch: name, safetensors code, size, and the numpy dtype of the bytes.

A merge only needs to know how big an element is, what safetensors calls it and whether `--dtype`
casts it; importing torch for that costs more time and memory than the merge's buffer. These objects
are what the planner, the unpickler (metapickle) and the writer pass around. Torch dtypes are accepted
wherever a dtype is (`of(torch.bfloat16)`, by name, so torch is never imported to read one) and
compare equal to ours::

    >>> of("bf16") is of(torch.bfloat16) is bfloat16
    True
    >>> str(bfloat16), bfloat16.code, bfloat16.itemsize
    ('torch.bfloat16', 'BF16', 2)

`str()` is torch's spelling on purpose: manifests, fingerprints and messages written before stay
the same. Surprise: a torch dtype equals ours but does not hash like it, so never mix the two as
keys of one dict; convert with `of()` first.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class DType:
    """One element type. Instances are unique per name (compare with `is` or `==`)."""

    __slots__ = ("name", "code", "itemsize", "is_floating_point", "numpy", "_str")
    name: str
    code: str | None
    itemsize: int
    is_floating_point: bool
    numpy: np.dtype
    _str: str

    def __init__(self, name: str, code: str | None, itemsize: int, is_floating_point: bool, numpy: str):
        object.__setattr__(self, "name", name)  # "bfloat16", as torch names it
        object.__setattr__(self, "code", code)  # "BF16"; None: safetensors cannot store it
        object.__setattr__(self, "itemsize", itemsize)
        object.__setattr__(self, "is_floating_point", is_floating_point)
        # numpy dtype of the stored bytes: the values themselves where numpy has the type, else
        # unsigned bits of the same width (bfloat16 -> <u2, float8 -> u1)
        object.__setattr__(self, "numpy", np.dtype(numpy))
        object.__setattr__(self, "_str", "torch." + name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("DType is immutable")

    def __str__(self) -> str:
        return self._str

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DType):
            return other is self
        return _is_torch_dtype(other) and str(other) == self._str

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self._str)

    def __reduce__(self) -> tuple:
        return of, (self.name,)

    @property
    def native(self) -> bool:
        """numpy holds the values of this type itself (so numpy can cast it), not just its bits."""
        return self.numpy.kind in "fc" or not self.is_floating_point

    def torch(self) -> Any:
        """The torch.dtype (imports torch)."""
        import torch

        return getattr(torch, self.name)


def _is_torch_dtype(obj: object) -> bool:
    t = type(obj)
    return t.__name__ == "dtype" and t.__module__ == "torch"


_ALL = [
    DType("bool", "BOOL", 1, False, "|b1"),
    DType("uint8", "U8", 1, False, "|u1"),
    DType("int8", "I8", 1, False, "|i1"),
    DType("float8_e5m2", "F8_E5M2", 1, True, "|u1"),
    DType("float8_e4m3fn", "F8_E4M3", 1, True, "|u1"),
    DType("int16", "I16", 2, False, "<i2"),
    DType("uint16", "U16", 2, False, "<u2"),
    DType("float16", "F16", 2, True, "<f2"),
    DType("bfloat16", "BF16", 2, True, "<u2"),
    DType("int32", "I32", 4, False, "<i4"),
    DType("uint32", "U32", 4, False, "<u4"),
    DType("float32", "F32", 4, True, "<f4"),
    DType("complex64", "C64", 8, False, "<c8"),  # torch: complex is not floating point (never cast)
    DType("float64", "F64", 8, True, "<f8"),
    DType("int64", "I64", 8, False, "<i8"),
    DType("uint64", "U64", 8, False, "<u8"),
    DType("complex128", None, 16, False, "<c16"),
]
BY_NAME: dict[str, DType] = {d.name: d for d in _ALL}
BY_CODE: dict[str, DType] = {d.code: d for d in _ALL if d.code}
SAFETENSORS: tuple[DType, ...] = tuple(d for d in _ALL if d.code)  # every dtype a safetensors file can hold
ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
           "fp64": "float64", "double": "float64", "long": "int64", "int": "int32", "short": "int16"}

bool_, uint8, int8 = BY_NAME["bool"], BY_NAME["uint8"], BY_NAME["int8"]
float8_e5m2, float8_e4m3fn = BY_NAME["float8_e5m2"], BY_NAME["float8_e4m3fn"]
int16, uint16, float16, bfloat16 = BY_NAME["int16"], BY_NAME["uint16"], BY_NAME["float16"], BY_NAME["bfloat16"]
int32, uint32, float32 = BY_NAME["int32"], BY_NAME["uint32"], BY_NAME["float32"]
complex64, float64, int64, uint64, complex128 = (BY_NAME[n] for n in ("complex64", "float64", "int64", "uint64",
                                                                        "complex128"))
# the floating dtypes weights are trained and kept in; float8 is floating point too, but a quantized storage
FULL_PRECISION: tuple[DType, ...] = (float16, bfloat16, float32, float64)


def of(dtype: DType | str | Any) -> DType:
    """Ours for a DType, a torch.dtype (read by name: torch is not imported) or a name ("bf16", "torch.float32")."""
    if isinstance(dtype, DType):
        return dtype
    if isinstance(dtype, str) or _is_torch_dtype(dtype):
        name = str(dtype).lower().removeprefix("torch.")
        found = BY_NAME.get(ALIASES.get(name, name))
        if found is not None:
            return found
    raise ValueError(f"unknown dtype {dtype!r}")


def maybe(dtype: DType | str | Any | None) -> DType | None:
    """`of`, passing None through (None means "keep the saved dtype" in options)."""
    return None if dtype is None else of(dtype)
