"""Synthetic-weight detector: placeholders that tools put where real weights belong.

Flags an identity / all-ones / zero projection (ComfyUI and diffusers fill a missing CLIP-L
projection with an identity), a block that duplicates its neighbour (padding fabricated to
reach a layer count), a logit_scale far from a trained CLIP's, and (deep) NaN/Inf values.
Shallow checks decode a few small tensors from raw bytes (no torch on .safetensors); deep
checks load every tensor. Shared by inspect, projection grafts and verify.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from . import dtypes
from .plan import ReadPlan
from .schema import LAYER
from .templates import layer_pattern


def _struct(dtype: str) -> str | None:
    d = dtypes.BY_CODE.get(dtype)
    return d.struct if d is not None else None


def decode(raw: bytes, dtype: str) -> list:
    """Little-endian bytes to Python numbers (bf16 widened to f32 by shifting)."""
    if dtype == "BF16":
        raw = b"".join(b"\x00\x00" + raw[i:i + 2] for i in range(0, len(raw), 2))
        dtype = "F32"
    fmt = _struct(dtype)
    if fmt is None:
        raise ValueError(f"cannot decode {dtype}")
    return list(struct.unpack(f"<{len(raw) // dtypes.size(dtype)}{fmt}", raw))


def _one(dtype: str) -> bytes:
    if dtype == "BF16":
        return struct.pack("<f", 1.0)[2:]
    return struct.pack(f"<{_struct(dtype)}", 1)


def matrix_look(raw: bytes, shape: tuple, dtype: str) -> str:
    """identity / all_ones / zeros / trained, by comparing bytes (fast even for 1280x1280)."""
    if _struct(dtype) is None and dtype != "BF16":
        return "unknown"
    size = dtypes.size(dtype)
    one, zero = _one(dtype), b"\x00" * size
    n = 1
    for d in shape:
        n *= d
    if raw == one * n:
        return "all_ones"
    if raw == zero * n:
        return "zeros"
    if _uninitialised(raw, dtype):
        return UNINITIALISED
    if len(shape) == 2 and shape[0] == shape[1]:
        rows, cols = shape
        ident = bytearray(zero * n)
        for i in range(rows):
            ident[(i * cols + i) * size:(i * cols + i + 1) * size] = one
        if raw == bytes(ident):
            return "identity"
    return "trained"


def _uninitialised(raw: bytes, dtype: str) -> bool:
    """Memory that was never written (torch.empty; ComfyUI's CLIPSave of a CLIP-L that had no
    projection): bit patterns of every magnitude at once — NaN/Inf, huge values, denormals —
    where a trained matrix holds values of one scale (|x| well under 10, no NaN, no denormals
    but for a few)."""
    if dtype == "BF16" or _struct(dtype) is None or not dtypes.is_float(dtype):
        return False
    vals = decode(raw, dtype)
    if not vals:
        return False
    tiny = 1e-30 if dtype in ("F32", "F64") else 1e-7
    odd = sum(1 for v in vals if v != v or abs(v) > 1e3 or (v != 0 and abs(v) < tiny))
    return odd > max(2, len(vals) // 1000)


def scalar_placeholder(source, rp: ReadPlan, canonical: str, trained: float) -> str | None:
    """Why a scalar such as logit_scale is a placeholder rather than a value (None: it is a
    number): not a float (kohya saves an int64 1), or not finite."""
    op = _op_with(rp, canonical)
    if op is None:
        return None
    info = source.info(op.keys[0])
    try:
        value = decode(source.raw(op.keys[0]), info.dtype)[0]
    except (ValueError, IndexError, struct.error):
        return f"holds {info.dtype} values sdconv cannot read as a number"
    if not dtypes.is_float(info.dtype):
        return f"holds the {info.dtype} value {value}, not a float"
    if value != value or value in (float("inf"), float("-inf")):
        return f"is {value}, not a number a trained CLIP holds (about {trained})"
    return None


def position_ids_health(raw: bytes, dtype: str, context: int) -> dict:
    """exact (int, 0..C-1) / drifted (float, rounds back to 0..C-1: recoverable) / corrupt
    (anything else). bad_indices: for drifted, where runtimes that truncate (transformers
    <= 4.30) read the wrong position; for the others, where the value is wrong."""
    vals = decode(raw, dtype)
    want = list(range(context))
    if dtype.startswith(("I", "U")):
        bad = [i for i, v in enumerate(vals) if i >= context or v != i]
        return {"status": "exact" if vals == want else "corrupt", "dtype": dtype, "bad_indices": bad}
    if any(v != v or v in (float("inf"), float("-inf")) for v in vals):      # NaN or Inf: no position at all
        return {"status": "corrupt", "dtype": dtype,
                "bad_indices": [i for i, v in enumerate(vals) if not (v == v and abs(v) != float("inf"))]}
    rounded = [round(v) for v in vals]
    if rounded == want:   # a float buffer is already off the rails: merges drift it further
        return {"status": "drifted", "dtype": dtype, "bad_indices": [i for i, v in enumerate(vals) if int(v) != i]}
    return {"status": "corrupt", "dtype": dtype, "bad_indices": [i for i, v in enumerate(rounded) if i >= context or v != i]}


def _op_with(rp: ReadPlan, canonical: str):
    return next((op for op in rp.ops if canonical in op.canonical), None)


def projection_look(source, rp: ReadPlan, canonical: str = "text_proj.weight") -> tuple[str, str] | None:
    """(key, look) of the encoder's projection, or None without one."""
    op = _op_with(rp, canonical)
    if op is None:
        return None
    info = source.info(op.keys[0])
    return op.keys[0], matrix_look(source.raw(op.keys[0]), info.shape, info.dtype)


def scalar(source, rp: ReadPlan, canonical: str) -> float | None:
    op = _op_with(rp, canonical)
    if op is None:
        return None
    return decode(source.raw(op.keys[0]), source.info(op.keys[0]).dtype)[0]


def duplicate_blocks(source, rp: ReadPlan) -> list[int]:
    """Blocks i whose every small tensor (norms, biases) equals block i-1's byte for byte."""
    fam = rp.layout.family
    pats = [(layer_pattern(t.name), t) for t in fam.tensors
            if LAYER in t.name and len(t.shape) == 1]
    per_layer: dict[int, dict[str, str]] = {}
    for op in rp.ops:
        for p, t in pats:
            m = p.fullmatch(op.canonical[0])
            if m:
                per_layer.setdefault(int(m.group(1)), {})[t.name] = op.keys[0]
    raw: dict[str, bytes] = {}

    def get(k):
        if k not in raw:
            raw[k] = source.raw(k)
        return raw[k]
    dups = []
    for i in range(1, rp.layers):
        a, b = per_layer.get(i - 1, {}), per_layer.get(i, {})
        if a and a.keys() == b.keys() and all(get(a[n]) == get(b[n]) for n in a):
            dups.append(i)
    return dups


UNINITIALISED = "uninitialised"        # the look of memory that was never written: not a weight at all
PLACEHOLDER_LOOKS = ("identity", "all_ones", "zeros", UNINITIALISED)
UNTRAINED_SCALE, COPIED_BLOCK = "untrained_scale", "copied_block"


class Suspect(NamedTuple):
    part: str                   # the canonical name, or "block N"
    look: str                   # one of PLACEHOLDER_LOOKS, UNTRAINED_SCALE, COPIED_BLOCK
    text: str                   # the sentence that names it


def suspects(source, rp: ReadPlan) -> list[Suspect]:
    """Each part of this encoder that looks fabricated."""
    out = []
    proj = projection_look(source, rp)
    if proj is not None and proj[1] in PLACEHOLDER_LOOKS:
        what = "uninitialised memory" if proj[1] == UNINITIALISED else proj[1].replace("_", " ")
        out.append(Suspect("text_proj.weight", proj[1], f"{proj[0]} is {what}: a placeholder, not a trained projection"))
    fam = rp.layout.family
    spec = fam.spec("logit_scale")
    value = scalar(source, rp, "logit_scale")
    if value is not None and spec is not None and spec.sample is not None and abs(value - spec.sample) > 0.05:
        out.append(Suspect("logit_scale", UNTRAINED_SCALE,
                           f"logit_scale is {value:.4f}, far from a trained CLIP's {spec.sample} (ln 100); "
                           f"2.6593 = ln(1/0.07) is CLIP's untrained initial value"))
    for i in duplicate_blocks(source, rp):
        out.append(Suspect(f"block {i}", COPIED_BLOCK,
                           f"block {i} repeats block {i - 1} (its norms and biases are byte-identical): padding?"))
    return out


def findings(source, rp: ReadPlan, deep: bool = False) -> list[str]:
    """What looks fabricated in this encoder, each in a sentence naming the tensor."""
    out = [s.text for s in suspects(source, rp)]
    if deep:
        import torch
        for op in rp.ops:
            for k in op.keys:
                t = source.load(k)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    out.append(f"{k} holds NaN or Inf values")
    return out
