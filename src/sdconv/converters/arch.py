"""The architecture of an encoder, read from its canonical shapes: the family's shape symbols
bound (width, layers, ffn, vocab, context, proj), which kind of encoder it is, its heads and
activation (which the weights cannot say), and which of its last blocks are absent."""
from __future__ import annotations

from ..errors import InputError, UsageError
from ..options import ENCODER_PARAMS
from .schema import LAYER, Family, Slot
from .templates import expand, layer_pattern


def count_layers(family: Family, names) -> int:
    """Layers among canonical names, by the family's <layer> templates."""
    pats = [layer_pattern(t.name) for t in family.tensors if LAYER in t.name]
    found = {int(m.group(1)) for n in names for p in pats if (m := p.fullmatch(n))}
    return len(found)


def infer_arch(family: Family, shapes: dict, layers: int, where: str = "") -> dict:
    """Bind the family's shape symbols from the canonical shapes; every tensor must agree."""
    arch: dict = {"layers": layers}
    bound_by: dict = {}
    for spec in family.tensors:
        names = expand(spec.name, layers)
        for name in names:
            if name not in shapes:
                continue
            shape = shapes[name]
            if len(shape) != len(spec.shape):
                raise InputError(f"{where}{name} has {len(shape)} dimensions {list(shape)}, expected {len(spec.shape)} "
                                 f"({list(spec.shape)})")
            for sym, n in zip(spec.shape, shape):
                if isinstance(sym, int):
                    if sym != n:
                        raise InputError(f"{where}{name} has shape {list(shape)}, expected {list(spec.shape)}")
                elif sym not in arch:
                    arch[sym], bound_by[sym] = n, name
                elif arch[sym] != n:
                    raise InputError(f"{where}{name} has shape {list(shape)}: {sym} = {n}, but {bound_by[sym]} "
                                     f"says {sym} = {arch[sym]}", "the file mixes tensors of different models")
    for spec in family.tensors:       # symbols of absent optional tensors (e.g. no projection)
        for sym in spec.shape:
            if isinstance(sym, str):
                arch.setdefault(sym, None)
    return arch


def identify(family: Family, slot: Slot, arch: dict, given: dict, from_input: dict):
    """Which encoder is this (clip_l, clip_h, clip_g, or a generic name)? --param encoder=,
    then the slot's own kind, then what the input says, then the width; else the slot's name."""
    for name, origin in ((given.get("encoder"), "--param"), (slot.name if slot.name in family.kinds else None,
                         "layout slot"), (from_input.get("encoder"), "input metadata")):
        if name in family.kinds:
            return name, origin
        if name and origin == "--param":
            raise UsageError(f"unknown encoder {name!r}", f"known: {', '.join(family.kinds)}")
    k = family.kind_by_width(arch["width"])
    if k is not None:
        return k.name, f"width {arch['width']}"
    return slot.name, "no known kind has this width"


def resolve_params(family: Family, slot: Slot, arch: dict, given: dict, from_input: dict, input_origin: str,
                   identity: str, where: str = ""):
    """heads and act: --param > the input's own config > the layout's default > the kind's
    (heads only at the kind's own width) > the family's. A value that cannot serve is a usage
    error (2), or an input error (3) when it comes from the input (`where` names it)."""
    kind = family.kinds.get(identity)
    params, origin = {}, {}
    for name in ENCODER_PARAMS:
        if name in given:
            params[name], origin[name] = given[name], "--param"
        elif name in from_input:
            params[name], origin[name] = from_input[name], input_origin
        elif name in slot.params:
            params[name], origin[name] = slot.params[name], "layout default"
        elif kind is not None and (name == "act" or kind.width == arch["width"]):
            params[name], origin[name] = getattr(kind, name), f"{kind.name} ({kind.title})"
        elif name == "heads":
            if arch["width"] % family.head_width:
                raise UsageError(f"cannot tell the number of heads: width {arch['width']} is not a multiple of "
                                 f"{family.head_width}", "pass --param heads=N")
            params[name] = arch["width"] // family.head_width
            origin[name] = f"width {arch['width']} / head width {family.head_width}"
        else:
            params[name], origin[name] = family.act_default, f"{family.name} default"

    def refuse(name: str, message: str, hint: str):
        # a value from the input's own files is the input's fault (3); one given or chosen, usage (2)
        if input_origin and origin.get(name) == input_origin and name not in given:
            raise InputError(f"{where}{input_origin}: {message}", hint)
        raise UsageError(message, hint)
    if params["act"] not in family.act_choices:
        refuse("act", f"unknown activation {params['act']!r}",
               f"choose one of {', '.join(family.act_choices)} (--param act=NAME)")
    try:
        params["heads"] = int(params["heads"])
    except (TypeError, ValueError):
        refuse("heads", f"heads must be a whole number, found {params['heads']!r}", "pass --param heads=N")
    if params["heads"] <= 0 or arch["width"] % params["heads"]:
        refuse("heads", f"heads = {params['heads']} does not divide width {arch['width']}",
               "pass a --param heads=N that divides the width")
    return params, origin


def absent_last_blocks(family: Family, identity: str, arch: dict, slot: Slot, stated: int = 0):
    """How many of the encoder's last blocks are already gone, and the note that says so: the
    layout drops them (diffusers' SD2), the input's metadata says so, or a known kind has more
    blocks than this encoder (an SD2 encoder converted back from diffusers). Nothing is made up."""
    kind = family.kinds.get(identity)
    deficit = kind.layers - arch["layers"] if kind and kind.width == arch["width"] else 0
    n = max(slot.drop_last_layers, stated, deficit, 0)
    notes = []
    if deficit > 0 and not slot.drop_last_layers:
        notes.append(f"{kind.title} has {kind.layers} blocks; this encoder has {arch['layers']}: the last "
                     f"{deficit} absent (e.g. an SD2 encoder converted back from diffusers)")
    elif stated and not slot.drop_last_layers and not deficit:
        notes.append(f"the input says its last {stated} block(s) were dropped before (see its sdconv metadata)")
    return n, notes
