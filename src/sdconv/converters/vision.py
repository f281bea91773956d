"""A whole CLIP's vision tower, read from an input in its own layout's vision naming: shapes,
architecture, and heads and activation with where each came from. The layout's whole-CLIP
config (a CLIPModel's config.json, open_clip_config.json) says them when the input has one;
else the heads are those of the known tower of that width (clip_vision kinds: OpenCLIP H and bigG
are not width / 64) or follow the head width, and the activation is the text tower's (OpenAI's clip
and open_clip run one activation for both towers)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError, LayoutError, UsageError
from . import configs
from .analyse import Found
from .arch import infer_arch
from .plan import ReadPlan, plan_read
from .registry import Registry, ResolvedLayout
from .sources import Source

FULL_CLIPS = "use a full CLIP: OpenAI .pt, open_clip, or a transformers CLIPModel"


@dataclass
class Vision:
    """The vision side of an input: its layout (a one-slot vision layout), read plan and what
    it is. `params`: heads and act; `origin`: where each came from; `notes`: what its config
    says that the weights do not."""
    layout: ResolvedLayout
    read: ReadPlan
    arch: dict
    params: dict
    origin: dict
    notes: list


def holds_vision(source: Source, text: Found, registry: Registry) -> bool:
    """Does the input's layout have a vision side, and does the input hold any of its keys?"""
    rv = registry.vision(text.read.layout)
    if rv is None:
        return False
    scope = rv.layout.slots["vision"].scope
    prefixes = tuple(p for p in scope if p.endswith("."))      # logit_scale alone is no tower
    return any(k.startswith(prefixes) for k in source.keys())


def read_vision(source: Source, text: Found, registry: Registry, where: str) -> Vision:
    """The vision tower of `source`, whose text tower `text` was read; UsageError when its
    layout holds none or it is not a complete ViT. `where` starts each message."""
    layout = text.read.layout
    rv = registry.vision(layout)
    if rv is None:
        raise UsageError(f"{where}: a {layout.name} file holds no vision tower", FULL_CLIPS)
    try:
        vread = plan_read(source, rv, rv.layout.slots["vision"])
    except LayoutError as e:
        raise UsageError(f"{where}: no complete ViT vision tower ({e.message})",
                         "ResNet CLIPs are not supported; use a ViT CLIP")
    fam = rv.family
    varch = infer_arch(fam, vread.shapes, vread.layers, f"{where} (vision): ")
    spec = layout.layout.vision.config
    cfg = source.read_json(text.read.folder + spec.file) if spec is not None else None
    said = configs.CLIP_READERS[spec.format](cfg) if cfg is not None else {"params": {}, "declared": {}}
    cfg_name = f"{text.read.folder}{spec.file}" if cfg is not None else ""
    got = said["params"]
    params, origin = {}, {}
    if "act" in got:
        params["act"], origin["act"] = got["act"], cfg_name
    else:
        params["act"], origin["act"] = text.params["act"], f"as the text tower: {text.param_origin['act']}"
    if params["act"] not in fam.act_choices:
        raise InputError(f"{where}: {cfg_name} says the vision tower runs {params['act']!r}, which sdconv does not "
                         f"serve", f"known: {', '.join(fam.act_choices)}")
    width = varch["width"]
    kind = fam.kind_by_width(width)
    if "heads" in got:
        params["heads"], origin["heads"] = got["heads"], cfg_name
    elif kind is not None and "head_width" not in got:     # OpenCLIP's H and bigG are not width / 64
        params["heads"], origin["heads"] = kind.heads, f"{kind.title}, width {width}"
    else:       # a head width: open_clip's config, else the family's
        said_hw = f"{cfg_name}'s head width" if "head_width" in got else "head width"
        hw = got.get("head_width", fam.head_width)
        if width % hw:
            raise InputError(f"{where}: a vision width of {width} is not a multiple of the {said_hw} {hw}",
                             "sdconv cannot tell the vision tower's heads")
        params["heads"], origin["heads"] = width // hw, f"width {width} / {said_hw} {hw}"
    if width % params["heads"]:
        raise InputError(f"{where}: {params['heads']} vision heads ({origin['heads']}) do not divide the width "
                         f"{width}", "the config and the weights are of different models")
    have = {**varch, "image": configs.image_geometry(varch)[0]}
    notes = [f"{cfg_name} says vision {k} = {v}, the weights say {have[k]}"
             for k, v in said["declared"].items() if k in have and have[k] != v]
    return Vision(rv, vread, varch, params, origin, notes)
