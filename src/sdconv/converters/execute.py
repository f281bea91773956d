"""Execution: make a planned encoder's target tensors, one write op at a time.

Canonical tensors come from a reader: SourceReader reads them from an input (and from the
reference files of grafts), MemoryReader hands out tensors held in memory (samples). Either
gives, for a canonical name, its dtype code, the canonical tensors its read op makes, and where
it comes from (for error messages)."""
from __future__ import annotations

from ..errors import InputError, UsageError
from . import dtypes
from .plan import BufferOp, ReadPlan, WriteOp
from .stream import Entry, RowConcat, TensorStream
from .transforms import TRANSFORMS, synthesize, synthesized_code


class SourceReader:
    """Canonical tensors of one encoder, read from its source; `grafts`: {canonical name:
    (source, ReadOp)} read from another file (a reference CLIP) instead."""

    def __init__(self, source, rp: ReadPlan, grafts: dict | None = None):
        self.source, self.rp, self.grafts = source, rp, grafts or {}

    def _op(self, canonical: str):
        return self.grafts.get(canonical) or (self.source, self.rp.op_for(canonical))

    def dtype(self, canonical: str) -> str:
        src, rop = self._op(canonical)
        return src.info(rop.keys[0]).dtype

    def load(self, canonical: str) -> dict:
        """{canonical name: tensor} for every tensor the read op that makes `canonical` makes."""
        src, rop = self._op(canonical)
        return dict(zip(rop.canonical, TRANSFORMS[rop.transform].read([src.load(k) for k in rop.keys])))

    def origin(self, canonical: str) -> str:
        src, rop = self._op(canonical)
        return f"{src.path}: {', '.join(rop.keys)}"


class MemoryReader:
    """Canonical tensors held in memory: {canonical name: tensor}."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def dtype(self, canonical: str) -> str:
        return dtypes.code_of(self.tensors[canonical].dtype)

    def load(self, canonical: str) -> dict:
        return {canonical: self.tensors[canonical]}

    def origin(self, canonical: str) -> str:
        return canonical


def _finite(t) -> bool:
    """No NaN or Inf in a float tensor. aminmax propagates NaN and shows Inf, and is ~40x faster
    than isfinite(t).all() (it makes no boolean copy)."""
    import math

    import torch
    if not t.is_floating_point() or t.numel() == 0:
        return True
    try:
        lo, hi = torch.aminmax(t)
        return math.isfinite(float(lo)) and math.isfinite(float(hi))
    except RuntimeError:            # dtypes without aminmax (float8)
        return bool(torch.isfinite(t.float()).all())


def stream(reader, ops: list[WriteOp], buffers: list[BufferOp], arch: dict, dtype: str = "keep",
           progress=None, check_finite: bool = True) -> TensorStream:
    """The target tensors of one encoder, made one write op at a time (a layer's worth of
    memory). Canonical tensors live only until the op that needs them."""
    entries = [Entry(k, dtypes.cast_code(reader.dtype(op.canonical[0]), dtype), tuple(s))
               for op in ops for k, s in zip(op.keys, op.shapes)]
    for b in buffers:
        entries.append(Entry(b.key, synthesized_code(b.synthesize), tuple(arch[s] if isinstance(s, str) else s for s in b.shape)))

    def make():
        cast = dtypes.torch_dtype(dtypes.BY_CAST[dtype].code) if dtype in dtypes.BY_CAST else None
        cache: dict = {}
        for op in ops:
            for c in op.canonical:
                if c not in cache:
                    cache.update(reader.load(c))
            written = TRANSFORMS[op.transform].write([cache.pop(c) for c in op.canonical])
            for key, t in zip(op.keys, written):
                parts = t.parts if isinstance(t, RowConcat) else [t]
                source = parts
                if cast is not None and parts[0].is_floating_point():
                    parts = [p.to(cast) for p in parts]
                # what is written is checked as it is made, after any cast, before its bytes
                # reach the (temporary) output
                if check_finite and not all(_finite(p) for p in parts):
                    if parts is not source and all(_finite(p) for p in source):
                        peak = max(float(p.abs().max()) for p in source if p.numel())
                        raise UsageError(f"{reader.origin(op.canonical[0])}: values up to {peak:.4g} do not fit in "
                                         f"{dtype} (for {key}); the cast would write Inf",
                                         "keep the dtype (--dtype keep), or use bf16 or fp32")
                    raise InputError(f"{reader.origin(op.canonical[0])} holds NaN or Inf values (for {key})",
                                     "the checkpoint is damaged (a failed merge or training run); nothing was written")
                if progress:
                    progress(sum(p.numel() * p.element_size() for p in parts))
                parts = [p.contiguous() for p in parts]
                yield key, (RowConcat(parts) if isinstance(t, RowConcat) else parts[0])
        for b in buffers:
            shape = [arch[s] if isinstance(s, str) else s for s in b.shape]
            yield b.key, synthesize(b.synthesize, shape)
    return TensorStream(entries, make)


def dtype_counts(tensors) -> dict:
    """{torch dtype name (float16, ...): how many of `tensors`}."""
    out: dict = {}
    for t in tensors:
        name = str(t.dtype).replace("torch.", "")
        out[name] = out.get(name, 0) + 1
    return out


def load_canonical(source, rp: ReadPlan) -> dict:
    """Every canonical tensor of a read plan, as stored (verify compares them)."""
    out = {}
    for op in rp.ops:
        for name, t in zip(op.canonical, TRANSFORMS[op.transform].read([source.load(k) for k in op.keys])):
            out[name] = t
    return out
