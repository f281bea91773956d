"""The closed vocabulary of tensor transforms that mapping files may name.

Each transform is declared once, in the read direction (layout keys -> canonical tensors), with
its inverse (canonical -> layout keys) and a shape function, so a whole conversion can be
planned and shape-checked from file headers before any tensor data is read. All are exact:
they only slice, concatenate, transpose or reshape. User YAML can name them but not add code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from . import dtypes
from .stream import RowConcat

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Transform:
    name: str
    n_keys: int                  # layout-side tensors consumed on read
    n_canonical: int             # canonical tensors produced on read
    read: Callable               # list[Tensor] -> list[Tensor]
    write: Callable              # list[Tensor] -> list[Tensor | RowConcat]  (the inverse)
    read_shape: Callable         # list[Shape] -> list[Shape] | None (None: shape not acceptable)
    write_shape: Callable        # list[Shape] -> list[Shape] | None
    describe: str


def _same(shapes):
    return list(shapes)


def _transpose_shape(shapes):
    (s,) = shapes
    return [tuple(reversed(s))] if len(s) == 2 else None


def _transpose(ts):
    return [ts[0].t().contiguous()]


def _split_shape(shapes):
    (s,) = shapes
    if not s or s[0] % 3:
        return None
    return [(s[0] // 3, *s[1:])] * 3


def _fuse_shape(shapes):
    if len(set(shapes)) != 1 or not shapes[0]:
        return None
    s = shapes[0]
    return [(3 * s[0], *s[1:])]


def _split_qkv(ts):
    # rows [0:W] = q, [W:2W] = k, [2W:3W] = v (nn.MultiheadAttention's in_proj order)
    return [c.contiguous() for c in ts[0].chunk(3, dim=0)]


def _fuse_qkv(ts):
    # joined when iterated; a safetensors writer writes the parts one after another instead
    return [RowConcat(ts)]


def _scalar_read_shape(shapes):
    (s,) = shapes
    return [()] if s in ((), (1,)) else None


def _scalar_read(ts):
    return [ts[0].reshape(())]


TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in [
        Transform("rename", 1, 1, list, list, _same, _same, "rename"),
        Transform("transpose", 1, 1, _transpose, _transpose, _transpose_shape, _transpose_shape,
                  "transpose [in,out] <-> [out,in]"),
        Transform("split_qkv", 1, 3, _split_qkv, _fuse_qkv, _split_shape, _fuse_shape,
                  "split fused q|k|v rows (write: fuse)"),
        Transform("scalar", 1, 1, _scalar_read, list, _scalar_read_shape, _same,
                  "scalar: [] or [1] read as []"),
    ]
}


def synthesize(kind: str, shape: Sequence[int]):
    """Buffers that are rebuilt, never copied (see LAYOUTS.md §4 for why position_ids is)."""
    import torch
    if kind == "arange":
        n = shape[-1]
        return torch.arange(n, dtype=getattr(torch, SYNTHESIZERS[kind])).reshape(tuple(shape))
    raise KeyError(kind)


# name -> the dtype it makes, which is the one a family's buffer must declare
SYNTHESIZERS = {"arange": "int64"}


def synthesized_code(kind: str) -> str:
    """The dtype code of a synthesized buffer (what a header states before it is made)."""
    return dtypes.code_of(SYNTHESIZERS[kind])
