"""Tensors to write, known before any is made.

A TensorStream holds the keys, dtypes and shapes of an output (all known from the plan) and a
generator that makes the tensors one at a time, in that order. A safetensors header can then be
written first and each tensor's bytes after it as it is made, so memory holds about one layer
rather than the whole encoder.

A made tensor may be a RowConcat: tensors to be joined along their first dimension (fused
q|k|v). Iterating a stream joins them; a writer that takes `pieces()` writes the parts one
after another instead, which gives the same bytes without the joined copy, and lets each
unchanged part be copied file to file.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

from . import dtypes


@dataclass(frozen=True)
class Entry:
    key: str
    dtype: str                  # safetensors code: F32, F16, BF16, I64, ...
    shape: tuple


class RowConcat:
    """Tensors of one dtype, to be joined along dim 0 (what torch.cat(parts) would give)."""

    def __init__(self, parts: list):
        self.parts = list(parts)
        self.dtype = self.parts[0].dtype
        self.shape = (sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:])

    def joined(self):
        import torch
        return torch.cat(self.parts, dim=0)


class TensorStream:
    def __init__(self, entries: list[Entry], make: Callable[[], Iterator[tuple[str, object]]]):
        self.entries = list(entries)
        self._make = make               # yields (key, tensor or RowConcat), unchecked

    @classmethod
    def from_dict(cls, tensors: dict) -> "TensorStream":
        entries = [Entry(k, dtypes.code_of(t.dtype), tuple(t.shape)) for k, t in tensors.items()]
        return cls(entries, lambda: iter(tensors.items()))

    @classmethod
    def concat(cls, streams: list["TensorStream"]) -> "TensorStream":
        def make():
            for s in streams:
                yield from s._make()
        return cls([e for s in streams for e in s.entries], make)

    def renamed(self, fn: Callable[[str], str]) -> "TensorStream":
        return TensorStream([Entry(fn(e.key), e.dtype, e.shape) for e in self.entries],
                            lambda: ((fn(k), t) for k, t in self._make()))

    def pieces(self):
        """(key, [tensor, ...]): each planned tensor as the parts whose bytes, one after
        another, are its bytes (one part unless it is a RowConcat), checked against the plan."""
        produced = self._make()
        for e in self.entries:
            key, t = next(produced)
            if key != e.key or dtypes.code_of(t.dtype) != e.dtype or tuple(t.shape) != e.shape:
                raise RuntimeError(f"internal error: planned {e}, made {key} {t.dtype} {tuple(t.shape)}")
            yield key, (t.parts if isinstance(t, RowConcat) else [t])

    def __iter__(self):
        """The tensors, checked against what the plan said they would be."""
        for key, parts in self.pieces():
            yield key, (parts[0] if len(parts) == 1 else RowConcat(parts).joined())

    def to_dict(self) -> dict:
        return dict(iter(self))

    def dominant_dtype(self) -> str | None:
        """The float dtype code most tensors have (what a config.json's torch_dtype states)."""
        counts = Counter(e.dtype for e in self.entries if dtypes.is_float(e.dtype))
        return counts.most_common(1)[0][0] if counts else None
