"""Which layout explains a file? Every layout is tried on the headers alone; the result says
which matched and why the others did not."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError, LayoutError, MappingError
from .plan import ReadPlan, plan_read
from .registry import Registry


@dataclass
class Verdict:
    layout: str
    plan: ReadPlan | None
    reason: str                 # why it matched or was rejected


def try_layouts(source, registry: Registry) -> list[Verdict]:
    out = []
    for name, rl in registry.all_layouts():
        if isinstance(rl, MappingError):
            out.append(Verdict(name, None, f"broken mapping file: {rl}"))
            continue
        slot = next(iter(rl.layout.slots.values()))
        try:
            p = plan_read(source, rl, slot)
            out.append(Verdict(name, p, f"{len(p.ops)} tensors, {p.layers} layers"))
        except (LayoutError, InputError) as e:
            out.append(Verdict(name, None, e.message.replace(f"{source.path}: ", "")))
    return out


def _reading(p: ReadPlan):
    return frozenset((op.keys, op.transform, op.canonical) for op in p.ops)


def detect(source, registry: Registry) -> tuple[ReadPlan, list[Verdict]]:
    verdicts = try_layouts(source, registry)
    hits = [v for v in verdicts if v.plan is not None]
    if not hits:
        why = "; ".join(f"{v.layout}: {v.reason}" for v in verdicts)
        raise LayoutError(f"{source.path}: no CLIP text encoder found in any known layout ({why})",
                          "if you know the layout, pass --from NAME; `sdconv layouts` lists them")
    if len({_reading(v.plan) for v in hits}) > 1:
        raise LayoutError(f"{source.path}: ambiguous: it reads differently as {', '.join(v.layout for v in hits)}",
                          "pass --from NAME to choose")
    # equivalent readings (e.g. a flat open_clip/OpenAI file): the layout's priority decides
    best = max(hits, key=lambda v: (v.plan.layout.layout.priority, [-ord(c) for c in v.layout]))
    return best.plan, verdicts
