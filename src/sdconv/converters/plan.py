"""Planning: from a source's key headers to a list of exact tensor operations.

read:  layout keys --(transform)--> canonical tensors     (plan_read)
arch:  canonical shapes --> width, layers, ffn, ...        (infer_arch, resolve_params)
write: canonical tensors --(inverse)--> target keys        (plan_write)

Nothing here reads tensor data: every shape comes from headers and the transforms' shape
functions, so a whole conversion is checked before a byte is read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .containers import TensorInfo
from .errors import InputError, LayoutError, UsageError
from .registry import ResolvedLayout
from .schema import LAYER, Entry, Family, Slot
from .transforms import TRANSFORMS


@dataclass(frozen=True)
class ReadOp:
    keys: tuple[str, ...]       # source keys, as stored
    layout_keys: tuple[str, ...]  # the same keys as the naming spells them (after prefix/aliases)
    transform: str
    canonical: tuple[str, ...]


@dataclass
class ReadPlan:
    layout: ResolvedLayout
    slot: Slot
    ops: list[ReadOp]
    shapes: dict                # canonical name -> shape
    dtypes: dict                # canonical name -> dtype code
    layers: int
    folder: str                 # where the slot's files sit in the source ('' = root)
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_to_read(self) -> int:
        return self._bytes

    def op_for(self, canonical: str) -> ReadOp:
        return self._by_canonical[canonical]

    def index(self, source):
        self._by_canonical = {c: op for op in self.ops for c in op.canonical}
        self._bytes = sum(source.info(k).nbytes for op in self.ops for k in op.keys)
        return self


@dataclass(frozen=True)
class WriteOp:
    canonical: tuple[str, ...]
    transform: str              # the read transform; its inverse is applied
    keys: tuple[str, ...]       # target keys (with the slot prefix)
    shapes: tuple


@dataclass(frozen=True)
class BufferOp:
    name: str
    key: str
    shape: tuple
    synthesize: str


def _pattern(template: str) -> re.Pattern:
    head, _, tail = template.partition(LAYER)
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) if LAYER in template else re.escape(template))


def _fill(template: str, layer: int | None) -> str:
    return template.replace(LAYER, str(layer)) if layer is not None else template


def _ignored(rel: str, patterns) -> bool:
    return any(rel.startswith(p) if p.endswith(".") else rel == p for p in patterns)


def slot_view(source, slot: Slot):
    """Keys of the slot as its naming spells them: {layout key: source key}, plus the folder.

    A pipeline component folder may be given on its own (e.g. a diffusers `text_encoder/`):
    then the slot's folder is the source's root."""
    prefix, folder = slot.prefix, slot.folder
    keys = source.keys()
    if (folder and source.is_folder and getattr(source, "has_root_weights", False)
            and source.path.name + "/" == folder and not any(k.startswith(folder) for k in keys)):
        prefix, folder = prefix[len(folder):], ""
    view: dict[str, str] = {}
    aliased: dict[str, str] = {}
    for k in keys:
        if not k.startswith(prefix):
            continue
        rel = k[len(prefix):]
        for a in slot.aliases:
            if rel.startswith(a.source):
                aliased[a.target + rel[len(a.source):]] = k
                break
        else:
            view[rel] = k
    for rel, k in aliased.items():
        if rel in view:
            raise InputError(f"{source.path}: holds both {view[rel]!r} and {k!r}, two spellings of one tensor",
                             "remove one of them; sdconv will not guess which is right")
        view[rel] = k
    return view, folder


def plan_read(source, rl: ResolvedLayout, slot: Slot) -> ReadPlan:
    """Match the source's keys against the slot's naming; raise LayoutError if they do not fit."""
    naming, family = rl.namings[slot.name], rl.family
    view, folder = slot_view(source, slot)
    where = f"layout {rl.name}" + (f", encoder {slot.name}" if len(rl.layout.slots) > 1 else "")
    if not view:
        raise LayoutError(f"{source.path}: no keys under {slot.prefix or 'the top level'!r} for {where}")

    consumed: set[str] = set()
    layer_hits: dict[Entry, dict[int, str]] = {}
    flat_hits: dict[Entry, str] = {}
    patterns = [(e, _pattern(e.key)) for e in naming.entries]
    exact = {e.key: e for e in naming.entries if LAYER not in e.key}
    layered = [(e, p) for e, p in patterns if LAYER in e.key]
    for rel in view:
        e = exact.get(rel)
        if e is not None:
            flat_hits[e] = rel
            consumed.add(rel)
            continue
        for e, p in layered:
            m = p.fullmatch(rel)
            if m:
                layer_hits.setdefault(e, {})[int(m.group(1))] = rel
                consumed.add(rel)
                break

    indices = sorted({i for hits in layer_hits.values() for i in hits})
    if not indices and not flat_hits:
        raise LayoutError(f"{source.path}: no {where} keys found (expected e.g. {slot.prefix}{naming.entries[0].key})")
    if indices and indices != list(range(len(indices))):
        gaps = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise InputError(f"{source.path}: {where}: layers are not contiguous (missing layer {gaps[0]} of "
                         f"0..{indices[-1]})", "the file is damaged or was cut by a faulty merge")
    layers = len(indices)

    ops: list[ReadOp] = []
    missing: list[str] = []
    notes: list[str] = []
    for e in naming.entries:
        specs = [family.spec(c) for c in e.canonical]
        optional = all(s.optional for s in specs)
        if LAYER in e.key:
            hits = layer_hits.get(e, {})
            for i in range(layers):
                if i not in hits:
                    missing.append(slot.prefix + _fill(e.key, i))
                    continue
                ops.append(ReadOp((view[hits[i]],), (hits[i],), e.transform, tuple(_fill(c, i) for c in e.canonical)))
        elif e in flat_hits:
            rel = flat_hits[e]
            if any(c in slot.omit for c in e.canonical):
                notes.append(f"ignored {view[rel]}: {where} does not carry {', '.join(e.canonical)}")
                continue
            ops.append(ReadOp((view[rel],), (rel,), e.transform, e.canonical))
        elif not optional:
            missing.append(slot.prefix + e.key)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LayoutError(f"{source.path}: does not match {where}: missing {', '.join(missing[:3])}{more}")

    for bname, bkey in naming.buffers.items():
        if bkey in view:
            consumed.add(bkey)
            notes.append(f"dropped buffer {view[bkey]} (rebuilt on write where the target carries it)")
    unexpected = [view[r] for r in view if r not in consumed and not _ignored(r, rl.layout.ignore)]
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise LayoutError(f"{source.path}: keys that {where} does not know: {', '.join(unexpected[:3])}{more}",
                          "if the file is right and the layout incomplete, add them to its mapping file")

    shapes, dtypes = {}, {}
    for op in ops:
        infos: list[TensorInfo] = [source.info(k) for k in op.keys]
        out = TRANSFORMS[op.transform].read_shape([i.shape for i in infos])
        if out is None:
            raise InputError(f"{source.path}: {op.keys[0]} has shape {list(infos[0].shape)}, which the "
                             f"{op.transform} transform cannot take")
        for c, s in zip(op.canonical, out):
            shapes[c], dtypes[c] = tuple(s), infos[0].dtype
    return ReadPlan(rl, slot, ops, shapes, dtypes, layers, folder, notes).index(source)


# ---------------------------------------------------------------- architecture

def count_layers(family: Family, names) -> int:
    """Layers among canonical names, by the family's <layer> templates."""
    pats = [_pattern(t.name) for t in family.tensors if LAYER in t.name]
    found = {int(m.group(1)) for n in names for p in pats if (m := p.fullmatch(n))}
    return len(found)


def infer_arch(family: Family, shapes: dict, layers: int, where: str = "") -> dict:
    """Bind the family's shape symbols from the canonical shapes; every tensor must agree."""
    arch: dict = {"layers": layers}
    bound_by: dict = {}
    for spec in family.tensors:
        names = [_fill(spec.name, i) for i in range(layers)] if LAYER in spec.name else [spec.name]
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


def resolve_params(family: Family, slot: Slot, arch: dict, given: dict, from_input: dict, input_origin: str):
    """heads and act: --param > the input's own config > the layout's default > the family's."""
    params, origin = {}, {}
    for name in ("heads", "act"):
        if name in given:
            params[name], origin[name] = given[name], "--param"
        elif name in from_input:
            params[name], origin[name] = from_input[name], input_origin
        elif name in slot.params:
            params[name], origin[name] = slot.params[name], "layout default"
        elif name == "heads":
            if arch["width"] % family.head_width:
                raise UsageError(f"cannot tell the number of heads: width {arch['width']} is not a multiple of "
                                 f"{family.head_width}", "pass --param heads=N")
            params[name] = arch["width"] // family.head_width
            origin[name] = f"width {arch['width']} / head width {family.head_width}"
        else:
            params[name] = family.act_by_width.get(arch["width"], family.act_default)
            origin[name] = f"{family.name} default for width {arch['width']}"
    if params["act"] not in family.act_choices:
        raise UsageError(f"unknown activation {params['act']!r}", f"choose one of {', '.join(family.act_choices)}")
    try:
        params["heads"] = int(params["heads"])
    except (TypeError, ValueError):
        raise UsageError(f"heads must be a whole number, found {params['heads']!r}")
    if params["heads"] <= 0 or arch["width"] % params["heads"]:
        raise UsageError(f"heads = {params['heads']} does not divide width {arch['width']}",
                         "pass a --param heads=N that divides the width")
    return params, origin


# ---------------------------------------------------------------- write

def plan_write(rl: ResolvedLayout, slot: Slot, shapes: dict, layers: int, source_desc: str):
    """Target keys for every canonical tensor the source has and the target can hold."""
    naming, family = rl.namings[slot.name], rl.family
    ops, notes = [], []
    # write in family order, one layer at a time: embeddings, block 0, block 1, ..., final norm
    order = {t.name: i for i, t in enumerate(family.tensors)}
    first_layer = min((i for t, i in order.items() if LAYER in t), default=0)
    for e in naming.entries:
        rank = order[e.canonical[0]]
        for i in (range(layers) if LAYER in e.key else [None]):
            canon = tuple(_fill(c, i) for c in e.canonical)
            present = [c in shapes for c in canon]
            if not all(present):
                if any(present):
                    raise InputError(f"{source_desc}: has {canon[present.index(True)]} but not "
                                     f"{canon[present.index(False)]}; {rl.name} stores them together")
                if all(family.spec(c).optional for c in e.canonical) and not any(c in slot.omit for c in e.canonical):
                    notes.append(f"the source has no {', '.join(canon)}; none written")
                continue
            if any(c in slot.omit for c in canon):
                notes.append(f"dropped: {', '.join(canon)} ({rl.name} cannot hold it)")
                continue
            t = TRANSFORMS[e.transform]
            out = t.write_shape([shapes[c] for c in canon])
            if out is None:
                raise InputError(f"{source_desc}: {', '.join(canon)} cannot be written as {e.key} ({e.transform})")
            position = (1, i, rank) if i is not None else (0 if rank < first_layer else 2, 0, rank)
            ops.append((position, WriteOp(canon, e.transform, (slot.prefix + _fill(e.key, i),), tuple(out))))
    ops.sort(key=lambda pair: pair[0])
    ops = [op for _, op in ops]
    buffers = []
    for b in sorted(slot.buffers):
        spec = family.buffers[b]
        buffers.append(BufferOp(b, slot.prefix + naming.buffers[b], spec.shape, spec.synthesize))
    return ops, buffers, notes
