"""Synthetic checkpoints with random weights and a layout's exact keys (`sdconv sample`).

Canonical tensors are written through the same write plan as any conversion, so a sample is
exactly what that layout looks like."""
from __future__ import annotations

import json
from pathlib import Path

from .converters import dtypes, metakeys
from .converters.atomic import AtomicOutput
from .converters.engine import target_slot
from .converters.execute import MemoryReader, stream
from .converters.output import SlotOutput, write_layout
from .converters.arch import count_layers, infer_arch
from .converters.plan import plan_write
from .converters.templates import expand
from .converters.registry import DEFAULT, Registry
from .converters.stream import TensorStream
from .converters.writers import format_for
from .errors import UsageError
from .options import ENCODER_PARAMS


def canonical_sample(family, preset: dict, seed: int = 0) -> dict:
    import torch
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in family.tensors:
        if any(isinstance(s, str) and not preset.get(s) for s in spec.shape):   # e.g. no projection
            continue
        shape = [preset[s] if isinstance(s, str) else s for s in spec.shape]
        names = expand(spec.name, preset["layers"])
        for n in names:
            out[n] = (torch.full(shape, float(spec.sample)) if spec.sample is not None
                      else torch.randn(shape, generator=g) * 0.02)
    return out


def write_canonical(canon: dict, output, layout: str, params: dict, fmt: str | None = None, dtype: str = "keep",
                    force: bool = False, extra: dict | None = None, metadata: dict | None = None,
                    registry: Registry = DEFAULT):
    """Write canonical tensors {canonical name: tensor} as `layout` at `output` (file or folder).
    params: heads, act, and optionally encoder (which slot of a multi-encoder layout). Returns the
    tensors written, {key: tensor}."""
    rl = registry.layout(layout)
    fam = rl.family
    shapes = {k: tuple(v.shape) for k, v in canon.items()}
    arch = infer_arch(fam, shapes, count_layers(fam, canon))
    identity = params.get("encoder") or getattr(fam.kind_by_width(arch["width"]), "name", "clip")
    slot, _ = target_slot(rl, identity, fam.kinds)
    ops, buffers, _, layers_out = plan_write(rl, slot, shapes, arch["layers"], "canonical tensors")
    # samples and test fixtures may hold planted faults (NaN): written as given
    tensors = stream(MemoryReader(canon), ops, buffers, arch, dtype, check_finite=False).to_dict()
    tensors.update(extra or {})
    output = Path(output)
    fmt = fmt or ("safetensors" if rl.layout.output == "folder" else format_for(output, None))
    hp = {k: params[k] for k in ENCODER_PARAMS}
    written = {c: shapes[c] for op in ops for c in op.canonical}
    meta = {metakeys.FORMAT: metakeys.FORMAT_PT, metakeys.PARAMS: json.dumps(hp, sort_keys=True),
            metakeys.ENCODER: identity, **(metadata or {})}
    with AtomicOutput(output, rl.layout.output == "folder", force) as tmp:
        part = SlotOutput(slot, TensorStream.from_dict(tensors), infer_arch(fam, written, layers_out), hp)
        write_layout(rl, fmt, tmp, [part], meta)
    return tensors


def sample(output, *, layout: str = "ldm", preset: str = "tiny", dtype: str = "fp16", seed: int = 0,
           fmt: str | None = None, force: bool = False, registry: Registry = DEFAULT) -> dict:
    """Write a synthetic checkpoint of `layout` with random weights (seeded) and the layout's
    real keys; returns {"tensors": count, "preset": name, "params": {heads, act}}."""
    import torch
    rl = registry.layout(layout)
    fam = rl.family
    if preset not in fam.presets:
        raise UsageError(f"unknown preset {preset!r}", f"choose one of {', '.join(fam.presets)}")
    if dtype not in dtypes.CASTS:
        raise UsageError(f"unknown dtype {dtype!r}", f"choose one of {', '.join(dtypes.CASTS)}")
    p = fam.presets[preset]
    g = torch.Generator().manual_seed(seed + 1)
    cast = dtypes.torch_dtype(dtypes.BY_CAST[dtype].code)
    extra = {k: (torch.randn(s, generator=g) * 0.02).to(cast) for k, s in rl.layout.sample_extra.items()}
    tensors = write_canonical(canonical_sample(fam, p, seed), output, layout, {k: p[k] for k in ENCODER_PARAMS},
                              fmt, dtype, force, extra, {metakeys.SAMPLE: f"{layout}/{preset}/seed {seed}"}, registry)
    return {"tensors": len(tensors), "preset": preset, "params": {k: p[k] for k in ENCODER_PARAMS}}
