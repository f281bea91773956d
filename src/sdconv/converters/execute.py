"""Execution: run a planned conversion, one canonical tensor group at a time."""
from __future__ import annotations

from .plan import BufferOp, ReadPlan, WriteOp
from .transforms import TRANSFORMS, synthesize

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def run(source, rp: ReadPlan, ops: list[WriteOp], buffers: list[BufferOp], arch: dict, dtype: str = "keep",
        progress=None, grafts: dict | None = None) -> dict:
    """Return {target key: tensor}. Canonical tensors live only until the op that needs them.
    `grafts`: {canonical name: (source, ReadOp)} read from another file (a reference CLIP)."""
    import torch
    cast = getattr(torch, DTYPES[dtype]) if dtype != "keep" else None
    cache: dict = {}
    out: dict = {}
    for op in ops:
        for c in op.canonical:
            if c not in cache:
                src, rop = (grafts or {}).get(c) or (source, rp.op_for(c))
                tensors = [src.load(k) for k in rop.keys]
                for name, t in zip(rop.canonical, TRANSFORMS[rop.transform].read(tensors)):
                    cache[name] = t
        written = TRANSFORMS[op.transform].write([cache.pop(c) for c in op.canonical])
        for key, t in zip(op.keys, written):
            if cast is not None and t.is_floating_point():
                t = t.to(cast)
            out[key] = t.contiguous()
            if progress:
                progress(t.numel() * t.element_size())
    for b in buffers:
        shape = [arch[s] if isinstance(s, str) else s for s in b.shape]
        out[b.key] = synthesize(b.synthesize, shape)
    return out


def load_canonical(source, rp: ReadPlan) -> dict:
    """Every canonical tensor of a read plan, as stored (verify compares them)."""
    out = {}
    for op in rp.ops:
        for name, t in zip(op.canonical, TRANSFORMS[op.transform].read([source.load(k) for k in op.keys])):
            out[name] = t
    return out
