"""Synthetic checkpoints with random weights and a layout's exact keys (`sdconv sample`).

Canonical tensors are written through the same write plan as any conversion, so a sample is
exactly what that layout looks like."""
from __future__ import annotations

import json
from pathlib import Path

from .containers import AtomicOutput, format_for
from .errors import UsageError
from .execute import DTYPES, run
from .plan import LAYER, ReadOp, ReadPlan, _fill, plan_write
from .registry import DEFAULT, Registry


class _Memory:
    """A Source over tensors held in memory."""

    def __init__(self, tensors: dict):
        self.t = tensors

    def load(self, key):
        return self.t[key]

    def info(self, key):
        from .containers import TensorInfo, torch_dtype_code
        return TensorInfo(tuple(self.t[key].shape), torch_dtype_code(self.t[key].dtype))


def canonical_sample(family, preset: dict, seed: int = 0) -> dict:
    import torch
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in family.tensors:
        if any(isinstance(s, str) and not preset.get(s) for s in spec.shape):   # e.g. no projection
            continue
        shape = [preset[s] if isinstance(s, str) else s for s in spec.shape]
        names = [_fill(spec.name, i) for i in range(preset["layers"])] if LAYER in spec.name else [spec.name]
        for n in names:
            out[n] = (torch.full(shape, float(spec.sample)) if spec.sample is not None
                      else torch.randn(shape, generator=g) * 0.02)
    return out


def write_canonical(canon: dict, output, layout: str, params: dict, fmt: str | None = None, dtype: str = "keep",
                    force: bool = False, extra: dict | None = None, metadata: dict | None = None,
                    registry: Registry = DEFAULT):
    """Write canonical tensors {canonical name: tensor} as `layout` at `output` (file or folder).
    params: heads, act, and optionally encoder (which slot of a multi-encoder layout)."""
    from .engine import EncoderPlan, Plan, _target_slot, write_output
    from .plan import count_layers, infer_arch

    rl = registry.layout(layout)
    fam = rl.family
    shapes = {k: tuple(v.shape) for k, v in canon.items()}
    layers = count_layers(fam, canon)
    arch = infer_arch(fam, shapes, layers)
    identity = params.get("encoder") or getattr(fam.kind_by_width(arch["width"]), "name", "clip")
    slot, _ = _target_slot(rl, identity, fam.kinds)
    rp = ReadPlan(rl, slot, [ReadOp((c,), (c,), "rename", (c,)) for c in canon], shapes,
                  {c: "F32" for c in canon}, layers, "")
    rp._by_canonical = {op.canonical[0]: op for op in rp.ops}
    ops, buffers, notes, layers_out = plan_write(rl, slot, shapes, layers, "canonical tensors")
    # samples and test fixtures may hold planted faults (NaN): written as given
    tensors = run(_Memory(canon), rp, ops, buffers, arch, dtype, check_finite=False)
    tensors.update(extra or {})
    from .stream import TensorStream
    tensors = TensorStream.from_dict(tensors)
    output = Path(output)
    fmt = fmt or ("safetensors" if rl.layout.output == "folder" else format_for(output, None))
    hp = {k: params[k] for k in ("heads", "act")}
    enc = EncoderPlan(rp, identity, "given", arch, hp, {}, slot, ops, buffers, layers_out, notes)
    plan = Plan(None, rl, [enc], fmt, dtype, output)
    meta = {"format": "pt", "sdconv.params": json.dumps(hp, sort_keys=True), "sdconv.encoder": identity,
            **(metadata or {})}
    with AtomicOutput(output, rl.layout.output == "folder", force) as tmp:
        write_output(plan, [tensors], tmp, meta)
    return tensors.to_dict()


def write_sample(output, layout: str = "ldm", preset: str = "tiny", dtype: str = "fp16", seed: int = 0,
                 fmt: str | None = None, force: bool = False, registry: Registry = DEFAULT) -> dict:
    import torch
    rl = registry.layout(layout)
    fam = rl.family
    if preset not in fam.presets:
        raise UsageError(f"unknown preset {preset!r}", f"choose one of {', '.join(fam.presets)}")
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", f"choose one of {', '.join(DTYPES)}")
    p = fam.presets[preset]
    g = torch.Generator().manual_seed(seed + 1)
    cast = getattr(torch, DTYPES[dtype])
    extra = {k: (torch.randn(s, generator=g) * 0.02).to(cast) for k, s in rl.layout.sample_extra.items()}
    tensors = write_canonical(canonical_sample(fam, p, seed), output, layout, {k: p[k] for k in ("heads", "act")},
                              fmt, dtype, force, extra, {"sdconv.sample": f"{layout}/{preset}/seed {seed}"}, registry)
    return {"tensors": len(tensors), "preset": preset, "params": {k: p[k] for k in ("heads", "act")}}
