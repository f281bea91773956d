"""The one dtype table: every element type sdconv meets, by its safetensors code.

Everything else is derived from it: sizes, which codes are floats, torch dtypes (imported only
when a tensor is made), struct formats (to decode small tensors without torch), numpy type
codes (as old pickles spell `numpy.dtype('f8')`), and the names `--dtype` accepts.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    code: str                   # safetensors code: F32, F16, BF16, I64, ...
    size: int                   # bytes per element
    is_float: bool
    torch: str                  # attribute of the torch module
    struct: str | None = None   # struct format character (None: struct cannot decode it)
    numpy: str | None = None    # numpy type code
    cast: str | None = None     # the --dtype name that casts to it


TABLE = (
    DType("F64", 8, True, "float64", "d", "f8"),
    DType("F32", 4, True, "float32", "f", "f4", cast="fp32"),
    DType("F16", 2, True, "float16", "e", "f2", cast="fp16"),
    DType("BF16", 2, True, "bfloat16", cast="bf16"),
    DType("F8_E4M3", 1, True, "float8_e4m3fn"),
    DType("F8_E5M2", 1, True, "float8_e5m2"),
    DType("I64", 8, False, "int64", "q", "i8"),
    DType("I32", 4, False, "int32", "i", "i4"),
    DType("I16", 2, False, "int16", "h", "i2"),
    DType("I8", 1, False, "int8", "b", "i1"),
    DType("U64", 8, False, "uint64", "Q", "u8"),
    DType("U32", 4, False, "uint32", "I", "u4"),
    DType("U16", 2, False, "uint16", "H", "u2"),
    DType("U8", 1, False, "uint8", "B", "u1"),
    DType("BOOL", 1, False, "bool", "?", "b1"),
)

BY_CODE = {d.code: d for d in TABLE}
BY_CAST = {d.cast: d for d in TABLE if d.cast}
CASTS = tuple(BY_CAST)                          # fp32, fp16, bf16
DTYPE_CHOICES = ("keep", *CASTS)                # --dtype
STRUCT_BY_NUMPY = {d.numpy: d.struct for d in TABLE if d.numpy}


def size(code: str) -> int:
    return BY_CODE[code].size


def is_float(code: str) -> bool:
    d = BY_CODE.get(code)
    return d is not None and d.is_float


def cast_code(code: str, cast: str) -> str:
    """The code a tensor of `code` is written as under --dtype `cast` (integers never change)."""
    return BY_CAST[cast].code if cast in BY_CAST and is_float(code) else code


def torch_dtype(code: str):
    import torch
    return getattr(torch, BY_CODE[code].torch)


def code_of(torch_dt) -> str:
    """The safetensors code of a torch dtype (its name, if sdconv has no code for it)."""
    name = str(torch_dt).replace("torch.", "")
    return next((d.code for d in TABLE if d.torch == name), str(torch_dt))
