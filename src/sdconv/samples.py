"""Synthetic checkpoints with random weights and a layout's exact keys (`sdconv sample`).

Canonical tensors are written through the same write plan as any conversion, so a sample is
exactly what that layout looks like. `whole_clip` writes a reference CLIP instead (text tower,
projections, vision tower, logit_scale), through the write path of `--with-vision`."""
from __future__ import annotations

import json
from pathlib import Path

from .converters import dtypes, metakeys
from .converters.atomic import AtomicOutput
from .converters.configs import image_geometry
from .converters.engine import target_slot
from .converters.execute import MemoryReader, stream
from .converters.output import SlotOutput, write_layout, write_whole_clip
from .converters.arch import count_layers, infer_arch
from .converters.plan import plan_write
from .converters.templates import expand
from .converters.registry import DEFAULT, Registry
from .converters.stream import TensorStream
from .converters.writers import format_for
from .errors import UsageError
from .options import ENCODER_PARAMS


def canonical_sample(family, preset: dict, seed: int = 0, generator=None, cast=None) -> dict:
    """Random canonical tensors of `preset`, drawn in the family's order (from `generator` if
    given, which then goes on from where this leaves it; else from a new one seeded `seed`).
    cast: a torch dtype each tensor is cast to once drawn (the values a write in it would hold)."""
    import torch
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    out = {}
    for spec in family.tensors:
        if any(isinstance(s, str) and not preset.get(s) for s in spec.shape):   # e.g. no projection
            continue
        shape = [preset[s] if isinstance(s, str) else s for s in spec.shape]
        names = expand(spec.name, preset["layers"])
        for n in names:
            t = (torch.full(shape, float(spec.sample)) if spec.sample is not None
                 else torch.randn(shape, generator=g) * 0.02)
            out[n] = t if cast is None else t.to(cast)
    return out


def _made(rl, slot, canon: dict, dtype: str):
    """The target tensors of canonical tensors written in `slot` of `rl`, and the architecture written."""
    fam = rl.family
    shapes = {k: tuple(v.shape) for k, v in canon.items()}
    arch = infer_arch(fam, shapes, count_layers(fam, canon))
    ops, buffers, _, layers_out = plan_write(rl, slot, shapes, arch["layers"], "canonical tensors")
    # samples and test fixtures may hold planted faults (NaN): written as given
    tensors = stream(MemoryReader(canon), ops, buffers, arch, dtype, check_finite=False).to_dict()
    written = {c: shapes[c] for op in ops for c in op.canonical}
    return tensors, infer_arch(fam, written, layers_out)


def write_canonical(canon: dict, output, layout: str, params: dict, fmt: str | None = None, dtype: str = "keep",
                    force: bool = False, extra: dict | None = None, metadata: dict | None = None,
                    registry: Registry = DEFAULT, vision: tuple | None = None):
    """Write canonical tensors {canonical name: tensor} as `layout` at `output` (file or folder).
    params: heads, act, and optionally encoder (which slot of a multi-encoder layout).
    vision: (canonical vision tensors, their heads and act) to write a whole CLIP as the layout's
    `vision:` lays it out. Returns the tensors written, {key: tensor}."""
    rl = registry.layout(layout)
    fam = rl.family
    tv = registry.vision(rl) if vision is not None else None
    if vision is not None and tv is None:
        raise UsageError(f"{layout} holds no whole CLIP", "write a whole CLIP as openai, open_clip or hf")
    width = infer_arch(fam, {k: tuple(v.shape) for k, v in canon.items()}, count_layers(fam, canon))["width"]
    identity = params.get("encoder") or getattr(fam.kind_by_width(width), "name", "clip")
    slot, _ = target_slot(rl, identity, fam.kinds)
    tensors, arch = _made(rl, slot, canon, dtype)
    tensors.update(extra or {})
    output = Path(output)
    out_kind = (tv or rl).layout.output
    fmt = fmt or ("safetensors" if out_kind == "folder" else format_for(output, None))
    hp = {k: params[k] for k in ENCODER_PARAMS}
    meta = {metakeys.FORMAT: metakeys.FORMAT_PT, metakeys.PARAMS: json.dumps(hp, sort_keys=True),
            metakeys.ENCODER: identity, **(metadata or {})}
    part = SlotOutput(slot, TensorStream.from_dict(tensors), arch, hp)
    with AtomicOutput(output, out_kind == "folder", force) as tmp:
        if tv is None:
            write_layout(rl, fmt, tmp, [part], meta)
            return tensors
        vtensors, varch = _made(tv, tv.layout.slots["vision"], vision[0], dtype)
        vparams = {k: vision[1][k] for k in ENCODER_PARAMS}
        write_whole_clip(rl, tv, fmt, tmp, part, TensorStream.from_dict(vtensors), (varch, vparams), meta)
    return {**tensors, **vtensors}


def sample(output, *, layout: str = "ldm", preset: str = "tiny", dtype: str = "fp16", seed: int = 0,
           fmt: str | None = None, force: bool = False, whole_clip: bool = False,
           registry: Registry = DEFAULT) -> dict:
    """Write a synthetic checkpoint of `layout` with random weights (seeded) and the layout's
    real keys; returns {"tensors": count, "preset": name, "params": {heads, act}, "vision":
    {heads, act, image} or None}.

    whole_clip: a whole reference CLIP instead (openai, open_clip or hf): the text tower drawn
    exactly as the sample of the same preset and seed draws it (the same tensors), then its text
    projection, then the vision tower of the clip_vision preset of that name, and logit_scale."""
    import torch
    rl = registry.layout(layout)
    fam = rl.family
    if preset not in fam.presets:
        raise UsageError(f"unknown preset {preset!r}", f"choose one of {', '.join(fam.presets)}")
    if dtype not in dtypes.CASTS:
        raise UsageError(f"unknown dtype {dtype!r}", f"choose one of {', '.join(dtypes.CASTS)}")
    p = fam.presets[preset]
    hp = {k: p[k] for k in ENCODER_PARAMS}
    meta = {metakeys.SAMPLE: f"{layout}/{preset}/seed {seed}" + ("/whole clip" if whole_clip else "")}
    if whole_clip:
        return _whole_clip(output, rl, layout, preset, dtype, seed, fmt, force, meta, registry)
    g = torch.Generator().manual_seed(seed + 1)
    cast = dtypes.torch_dtype(dtypes.BY_CAST[dtype].code)
    extra = {k: (torch.randn(s, generator=g) * 0.02).to(cast) for k, s in rl.layout.sample_extra.items()}
    tensors = write_canonical(canonical_sample(fam, p, seed), output, layout, hp, fmt, dtype, force, extra, meta,
                              registry)
    return {"tensors": len(tensors), "preset": preset, "params": hp, "vision": None}


def _whole_clip(output, rl, layout, preset, dtype, seed, fmt, force, meta, registry) -> dict:
    import torch
    tv = registry.vision(rl)
    if tv is None:
        have = [n for n, r in registry.all_layouts() if not isinstance(r, Exception) and r.layout.vision is not None]
        raise UsageError(f"--whole-clip: {layout} holds a text encoder only", f"choose --layout {' or '.join(have)}")
    vfam = tv.family
    if preset not in vfam.presets:
        raise UsageError(f"--whole-clip: no vision tower for preset {preset!r}",
                         f"choose one of {', '.join(vfam.presets)}")
    p, vp = rl.family.presets[preset], vfam.presets[preset]
    if p.get("proj", vp["proj"]) != vp["proj"]:
        raise UsageError(f"preset {preset}: the text projection has {p['proj']} outputs, the vision one {vp['proj']}",
                         "give both presets the same proj")
    g = torch.Generator().manual_seed(seed)
    # cast as drawn (half the memory of a full-size CLIP): the values the write's cast would give
    cast = dtypes.torch_dtype(dtypes.BY_CAST[dtype].code)
    text = canonical_sample(rl.family, {**p, "proj": vp["proj"]}, generator=g, cast=cast)   # the sample's tower, then text_proj
    vision = canonical_sample(vfam, vp, generator=g, cast=cast)
    text.pop("logit_scale", None)             # the pair's logit_scale is written with the vision tower
    hp, vparams = {k: p[k] for k in ENCODER_PARAMS}, {k: vp[k] for k in ENCODER_PARAMS}
    tensors = write_canonical(text, output, layout, hp, fmt, dtype, force, None, meta, registry, (vision, vparams))
    image, _ = image_geometry(vp)
    return {"tensors": len(tensors), "preset": preset, "params": hp, "vision": {**vparams, "image": image}}
