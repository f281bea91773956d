"""Which layout explains a file, and which encoders does it hold? Every layout is tried on the
headers alone; the result says which matched and why the others did not."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError, LayoutError, MappingError
from .arch import infer_arch
from .plan import ReadPlan, plan_read, slot_present
from .registry import Registry, ResolvedLayout


@dataclass
class Verdict:
    layout: str
    plans: list[ReadPlan] | None
    reason: str                 # why it matched or was rejected
    error: Exception | None = None


def _fits(rl: ResolvedLayout, plan: ReadPlan) -> bool:
    """Does the slot's kind have the encoder's width?"""
    kind = rl.family.kinds.get(plan.slot.name)
    return kind is not None and infer_arch(rl.family, plan.shapes, plan.layers).get("width") == kind.width


def read_layout(source, rl: ResolvedLayout, encoder: str | None = None) -> list[ReadPlan]:
    """Every encoder slot of `rl` present in `source`, read. Slots that share a place in the
    file (an SDXL refiner's bigG and an SD2.1-turbo's ViT-H both sit at embedders.0.model.)
    are told apart by the kind that fits: --param encoder, then width; else the first slot."""
    plans: list[ReadPlan] = []
    errors: dict[str, LayoutError | InputError] = {}
    for slot in rl.layout.slots.values():
        for prefix in slot_present(source, slot):
            try:
                plans.append(plan_read(source, rl, slot, prefix))
            except (LayoutError, InputError) as e:
                errors.setdefault(prefix, e)
    by_prefix: dict[str, list[ReadPlan]] = {}
    for p in plans:
        by_prefix.setdefault(p.prefix, []).append(p)
    chosen = []
    for prefix, group in by_prefix.items():
        if len(group) > 1:
            named = [p for p in group if p.slot.name == encoder]
            if named:
                group = named
            else:
                fitting = [p for p in group if _fits(rl, p)]
                if len(fitting) != 1:
                    fitting = fitting or group
                    fitting[0].notes.append(
                        f"{prefix or 'the top level'} may hold {' or '.join(p.slot.name for p in group)}; nothing in "
                        f"the file tells which: read as {fitting[0].slot.name} (--param encoder=NAME to choose)")
                group = fitting
        chosen.append(group[0])
    for prefix, e in errors.items():
        if prefix not in by_prefix:
            raise e                   # an encoder is there but does not read cleanly
    if not chosen:
        places = ", ".join(dict.fromkeys(repr(p or "top level") for s in rl.layout.slots.values()
                                         for p in (s.prefix, *s.read_prefixes)))
        raise LayoutError(f"{source.path}: no keys for layout {rl.name} (looked under {places})")
    return chosen


def try_layouts(source, registry: Registry, encoder: str | None = None) -> list[Verdict]:
    out = []
    for name, rl in registry.all_layouts():
        if isinstance(rl, MappingError):
            out.append(Verdict(name, None, f"broken mapping file: {rl}"))
            continue
        try:
            plans = read_layout(source, rl, encoder)
            what = ", ".join(f"{p.slot.name} at {p.prefix or 'top level'} ({len(p.ops)} tensors, {p.layers} layers)"
                             for p in plans)
            out.append(Verdict(name, plans, what))
        except (LayoutError, InputError) as e:
            out.append(Verdict(name, None, e.message.replace(f"{source.path}: ", ""), e))
    return out


def _reading(plans: list[ReadPlan]) -> frozenset:
    return frozenset((op.keys, op.transform, op.canonical) for p in plans for op in p.ops)


def detect(source, registry: Registry, encoder: str | None = None) -> tuple[list[ReadPlan], list[Verdict]]:
    verdicts = try_layouts(source, registry, encoder)
    hits = [v for v in verdicts if v.plans is not None]
    damaged = [v for v in verdicts if isinstance(v.error, InputError)]
    if not hits and damaged:
        raise damaged[0].error          # the layout is recognised, its encoder is broken: say how
    if not hits:
        why = "; ".join(f"{v.layout}: {v.reason}" for v in verdicts)
        raise LayoutError(f"{source.path}: no CLIP text encoder found in any known layout ({why})",
                          "if you know the layout, pass --from NAME; `sdconv layouts` lists them")
    # the reading that explains the most: one that contains every other wins (a ComfyUI file
    # reads as hf too, less its logit_scale); equal readings are settled by layout priority
    readings = {v.layout: _reading(v.plans) for v in hits}
    top = [v for v in hits if all(readings[v.layout] >= r for r in readings.values())]
    if not top:
        raise LayoutError(f"{source.path}: ambiguous: it reads differently as {', '.join(v.layout for v in hits)}",
                          "pass --from NAME to choose")
    best = max(top, key=lambda v: (v.plans[0].layout.layout.priority, [-ord(c) for c in v.layout]))
    return best.plans, verdicts
