"""Execution: run a planned conversion, one canonical tensor group at a time."""
from __future__ import annotations

from .errors import InputError
from .plan import BufferOp, ReadPlan, WriteOp
from .stream import Entry, RowConcat, TensorStream
from .transforms import TRANSFORMS, synthesize

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_CODE = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


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


def stream(source, rp: ReadPlan, ops: list[WriteOp], buffers: list[BufferOp], arch: dict, dtype: str = "keep",
           progress=None, grafts: dict | None = None, check_finite: bool = True) -> TensorStream:
    """The target tensors of one encoder, made one write op at a time (a layer's worth of
    memory). Canonical tensors live only until the op that needs them. `grafts`: {canonical
    name: (source, ReadOp)} read from another file (a reference CLIP)."""
    grafts = grafts or {}

    def source_dtype(c):
        src, rop = grafts.get(c) or (source, rp.op_for(c))
        return src.info(rop.keys[0]).dtype

    def out_code(code):
        return _CODE[dtype] if dtype != "keep" and code.startswith(("F", "BF")) else code
    entries = [Entry(k, out_code(source_dtype(op.canonical[0])), tuple(s)) for op in ops for k, s in zip(op.keys, op.shapes)]
    for b in buffers:
        entries.append(Entry(b.key, "I64", tuple(arch[s] if isinstance(s, str) else s for s in b.shape)))

    def make():
        import torch
        cast = getattr(torch, DTYPES[dtype]) if dtype != "keep" else None
        cache: dict = {}
        for op in ops:
            for c in op.canonical:
                if c not in cache:
                    src, rop = grafts.get(c) or (source, rp.op_for(c))
                    tensors = [src.load(k) for k in rop.keys]
                    for name, t in zip(rop.canonical, TRANSFORMS[rop.transform].read(tensors)):
                        cache[name] = t
            written = TRANSFORMS[op.transform].write([cache.pop(c) for c in op.canonical])
            for key, t in zip(op.keys, written):
                parts = t.parts if isinstance(t, RowConcat) else [t]
                # checked as it is made, before its bytes reach the (temporary) output
                if check_finite and not all(_finite(p) for p in parts):
                    src, rop = grafts.get(op.canonical[0]) or (source, rp.op_for(op.canonical[0]))
                    raise InputError(f"{src.path}: {', '.join(rop.keys)} holds NaN or Inf values (for {key})",
                                     "the checkpoint is damaged (a failed merge or training run); nothing was written")
                if cast is not None and parts[0].is_floating_point():
                    parts = [p.to(cast) for p in parts]
                if progress:
                    progress(sum(p.numel() * p.element_size() for p in parts))
                parts = [p.contiguous() for p in parts]
                yield key, (RowConcat(parts) if isinstance(t, RowConcat) else parts[0])
        for b in buffers:
            shape = [arch[s] if isinstance(s, str) else s for s in b.shape]
            yield b.key, synthesize(b.synthesize, shape)
    return TensorStream(entries, make)


def run(source, rp: ReadPlan, ops: list[WriteOp], buffers: list[BufferOp], arch: dict, dtype: str = "keep",
        progress=None, grafts: dict | None = None, check_finite: bool = True) -> dict:
    """The same, all in memory: {target key: tensor}."""
    return stream(source, rp, ops, buffers, arch, dtype, progress, grafts, check_finite).to_dict()


def load_canonical(source, rp: ReadPlan) -> dict:
    """Every canonical tensor of a read plan, as stored (verify compares them)."""
    out = {}
    for op in rp.ops:
        for name, t in zip(op.canonical, TRANSFORMS[op.transform].read([source.load(k) for k in op.keys])):
            out[name] = t
    return out
