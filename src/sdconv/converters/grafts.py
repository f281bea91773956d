"""Tensors taken from a reference CLIP: its text projection and logit_scale (--projection), or
its whole vision side (--with-vision). The reference is read like any input, in any layout;
the canonical names make the transposes automatic."""
from __future__ import annotations

from ..errors import InputError, UsageError
from .analyse import Found, analyse, read_input
from .arch import infer_arch
from .plan import plan_write
from .conversion import Graft, VisionPlan
from .registry import Registry, ResolvedLayout
from .synthetic import findings
from .vision import read_vision


GRAFTED = ("text_proj.weight", "logit_scale")     # what --projection takes from the reference


def plan_grafts(found: list[Found], reference, replace: bool, allow_synthetic: bool, registry: Registry):
    """Take each encoder's text projection (and logit_scale) from `reference`: the reference
    encoder of the same width. Refuses placeholders, and a projection the input already has."""
    ref_source, ref_reads, _ = read_input(reference, None, {}, registry)
    ref_found = analyse(ref_source, ref_reads, {})
    with_proj = [r for r in ref_found if "text_proj.weight" in r.read.shapes]
    if not with_proj:
        raise UsageError(f"{reference}: its encoder has no text projection to graft",
                         "use a full CLIP (OpenAI, open_clip or transformers CLIPModel) as --projection")
    for f in found:
        width = f.arch["width"]
        match = [r for r in with_proj if r.arch["width"] == width]
        if not match:
            have = ", ".join(f"{r.arch['width']} ({r.identity})" for r in with_proj)
            raise UsageError(f"--projection {reference}: no encoder of width {width} ({f.identity}) in it; "
                             f"widths found: {have}", "use the reference CLIP this encoder was trained as")
        r = match[0]
        if "text_proj.weight" in f.read.shapes and not replace:
            raise UsageError(f"{f.identity} already has a text projection",
                             "pass --replace-projection to replace it with the reference's")
        fake = [x for x in findings(ref_source, r.read) if "projection" in x or "logit_scale" in x]
        if fake and not allow_synthetic:
            raise InputError(f"--projection {reference}: {fake[0]}",
                             "use a real CLIP as the reference, or pass --allow-synthetic")
        if f.identity == "clip_g":
            f.notes.append("bigG's own projection is trained and used by SDXL (pooled output); the grafted "
                           "one replaces it" if "text_proj.weight" in f.read.shapes else
                           "bigG's projection is trained and used by SDXL; this encoder had none")
        f.grafts = {}
        for c in GRAFTED:
            if c in r.read.shapes:
                op = r.read.op_for(c)
                f.grafts[c] = Graft(ref_source, op, r.read.layout.name)
                f.read.shapes[c] = r.read.shapes[c]
        f.arch = infer_arch(f.read.layout.family, {**f.read.shapes}, f.read.layers)
        f.notes.append(f"grafted {', '.join(f.grafts)} from {reference} ({r.read.layout.name} "
                       f"{r.identity}, key {f.grafts['text_proj.weight'].op.keys[0]})")


def own_projection(found: list[Found], reference):
    """--projection (or --with-vision) names the input itself: each encoder keeps its own text
    projection and logit_scale, which it must have."""
    for f in found:
        if "text_proj.weight" not in f.read.shapes:
            raise UsageError(f"{reference} is the input itself, and its {f.identity} encoder has no text projection",
                             "name a full CLIP (OpenAI, open_clip or transformers CLIPModel) as --projection")


def plan_vision(reference, target: ResolvedLayout, text: Found, force_activation: bool, registry: Registry,
                own: tuple | None = None) -> VisionPlan:
    """Read the reference's vision tower (in its own layout's vision naming) and plan writing it
    in the target's. `own`: (source, its text encoder) when the reference is the input itself.
    The activation must suit the target: OpenAI's clip hard-codes QuickGELU, and open_clip has
    one flag for both towers."""
    tv = registry.vision(target)
    if tv is None:
        raise UsageError(f"a whole CLIP (--with-vision, --whole-clip) is written as openai, open_clip or hf, "
                         f"not {target.name}", "choose one of them with --to")
    if own is None:
        ref_source, ref_reads, _ = read_input(reference, None, {}, registry)
        ref_text = analyse(ref_source, ref_reads, {})[0]
    else:
        ref_source, ref_text = own
    v = read_vision(ref_source, ref_text, registry, f"--with-vision {reference}")
    varch, vparams = v.arch, v.params
    if varch["proj"] != text.arch.get("proj"):
        raise UsageError(f"the vision projection has {varch['proj']} outputs, the text projection "
                         f"{text.arch.get('proj')}: they must match", "use one reference for both")
    acts = {text.params["act"], vparams["act"]}
    if not force_activation:
        if target.name == "openai" and acts != {"quick_gelu"}:
            raise UsageError(f"OpenAI's clip runs QuickGELU, and these towers use {' and '.join(sorted(acts))}",
                             "write --to open_clip or hf, or pass --force-activation")
        if target.name == "open_clip" and len(acts) > 1:
            raise UsageError("open_clip has one activation flag for both towers; the text tower uses "
                             f"{text.params['act']} and the vision tower {vparams['act']}",
                             "write --to hf, or pass --force-activation")
    ops, buffers, _, _ = plan_write(tv, tv.layout.slots["vision"], v.read.shapes, v.read.layers, str(reference))
    return VisionPlan(ref_source, v.read, varch, vparams, tv, ops, buffers, v.origin, v.notes)
