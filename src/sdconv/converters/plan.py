"""Planning: from a source's key headers to a list of exact tensor operations.

read:  layout keys --(transform)--> canonical tensors     (plan_read)
write: canonical tensors --(inverse)--> target keys        (plan_write)
(between them, arch.py reads the architecture from the canonical shapes)

Nothing here reads tensor data: every shape comes from headers and the transforms' shape
functions, so a whole conversion is checked before a byte is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .sources import TensorInfo
from ..errors import InputError, LayoutError
from .registry import ResolvedLayout
from .schema import LAYER, Entry, Slot
from .templates import fill_layer, layer_pattern
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
    prefix: str = ""            # the prefix the encoder was found under
    buffers: dict = field(default_factory=dict)     # buffer name -> source key (dropped, but inspected)
    keys: tuple = ()            # every source key the slot accounts for (read, dropped or ignored)
    repairs: dict = field(default_factory=dict)     # source key -> fault its spelling repairs (aliases)

    @property
    def bytes_to_read(self) -> int:
        return self._bytes

    def op_for(self, canonical: str) -> ReadOp:
        return self._by_canonical[canonical]

    def drop(self, canonical: str, source):
        """Leave a canonical tensor (and the others its read op makes) unread and unwritten."""
        op = self.op_for(canonical)
        self.ops.remove(op)
        for c in op.canonical:
            self.shapes.pop(c, None)
            self.dtypes.pop(c, None)
        return self.index(source)

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


def _ignored(rel: str, patterns) -> bool:
    return any(rel.startswith(p) if p.endswith(".") else rel == p for p in patterns)


def slot_view(source, slot: Slot, prefix: str):
    """Keys of the slot as its naming spells them: {layout key: source key}, plus the folder.

    A pipeline component folder may be given on its own (e.g. a diffusers `text_encoder/`):
    then the slot's folder is the source's root."""
    folder = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
    keys = source.keys()
    if (folder and source.is_folder and getattr(source, "has_root_weights", False)
            and source.path.name + "/" == folder and not any(k.startswith(folder) for k in keys)):
        prefix, folder = prefix[len(folder):], ""
    view: dict[str, str] = {}
    aliased: dict[str, str] = {}
    repairs: dict[str, str] = {}    # source key -> the fault its spelling repairs
    for k in keys:
        if not k.startswith(prefix):
            continue
        rel = k[len(prefix):]
        if slot.scope and not _ignored(rel, slot.scope):
            continue
        for a in slot.aliases:
            if rel.startswith(a.source):
                aliased[a.target + rel[len(a.source):]] = k
                if a.repair:
                    repairs[k] = a.repair
                break
        else:
            view[rel] = k
    for rel, k in aliased.items():
        if rel in view:
            raise InputError(f"{source.path}: holds both {view[rel]!r} and {k!r}, two spellings of one tensor",
                             "remove one of them; sdconv will not guess which is right")
        view[rel] = k
    return view, folder, repairs


def slot_present(source, slot: Slot) -> list[str]:
    """The slot's prefixes under which the source has any key."""
    keys = source.keys()
    found = []
    for prefix in (slot.prefix, *slot.read_prefixes):
        folder = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        mounted = (folder and source.is_folder and source.path.name + "/" == folder
                   and getattr(source, "has_root_weights", False))
        if any(k.startswith(prefix) for k in keys) or (mounted and any(k.startswith(prefix[len(folder):]) for k in keys)):
            found.append(prefix)
    return found


def plan_read(source, rl: ResolvedLayout, slot: Slot, prefix: str | None = None) -> ReadPlan:
    """Match the source's keys under `prefix` (default: the slot's) against the slot's naming;
    raise LayoutError if they do not fit."""
    prefix = slot.prefix if prefix is None else prefix
    naming, family = rl.namings[slot.name], rl.family
    view, folder, repairs = slot_view(source, slot, prefix)
    where = f"layout {rl.name}, encoder {slot.name}" if len(rl.layout.slots) > 1 else f"layout {rl.name}"
    if not view:
        raise LayoutError(f"{source.path}: no keys under {prefix or 'the top level'!r} for {where}")

    entries = list(naming.entries) + list(slot.alternates)
    consumed: set[str] = set()
    layer_hits: dict[Entry, dict[int, str]] = {}
    flat_hits: dict[Entry, str] = {}
    exact = {e.key: e for e in entries if LAYER not in e.key}
    layered = [(e, layer_pattern(e.key)) for e in entries if LAYER in e.key]
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
        raise LayoutError(f"{source.path}: no {where} keys found (expected e.g. {prefix}{naming.entries[0].key})")
    if indices and indices != list(range(len(indices))):
        gaps = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise InputError(f"{source.path}: {where}: layers are not contiguous (missing layer {gaps[0]} of "
                         f"0..{indices[-1]})", "the file is damaged or was cut by a faulty merge")
    layers = len(indices)

    ops: list[ReadOp] = []
    missing: list[str] = []
    notes: list[str] = []
    alternate_for = {a.canonical: a for a in slot.alternates}
    for e in naming.entries:
        optional = all(family.spec(c).optional for c in e.canonical)
        if LAYER in e.key:
            hits = layer_hits.get(e, {})
            for i in range(layers):
                if i not in hits:
                    missing.append(prefix + fill_layer(e.key, i))
                    continue
                ops.append(ReadOp((view[hits[i]],), (hits[i],), e.transform, tuple(fill_layer(c, i) for c in e.canonical)))
            continue
        alt = alternate_for.get(e.canonical)
        use = e if e in flat_hits else None
        if alt is not None and alt in flat_hits:
            if use is not None:
                raise InputError(f"{source.path}: holds both {view[flat_hits[e]]!r} and {view[flat_hits[alt]]!r}, "
                                 f"two spellings of {e.canonical[0]}", "remove one of them")
            use = alt
            notes.append(f"read {view[flat_hits[alt]]} (an older spelling) with {alt.transform}")
        if use is None:
            if not optional:
                missing.append(prefix + e.key)
            continue
        rel = flat_hits[use]
        if any(c in slot.omit for c in e.canonical):
            notes.append(f"ignored {view[rel]}: {where} does not carry {', '.join(e.canonical)}")
            continue
        ops.append(ReadOp((view[rel],), (rel,), use.transform, e.canonical))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LayoutError(f"{source.path}: does not match {where}: missing {', '.join(missing[:3])}{more}")

    found_buffers = {}
    for bname, bkey in naming.buffers.items():
        if bkey in view:
            consumed.add(bkey)
            found_buffers[bname] = view[bkey]
            notes.append(f"dropped buffer {view[bkey]} (rebuilt on write where the target carries it)")
    for rel in view:
        if rel not in consumed and _ignored(rel, slot.ignore):
            consumed.add(rel)
            notes.append(f"ignored stray key {view[rel]}")
    unexpected = [view[r] for r in view if r not in consumed and not _ignored(r, rl.layout.ignore)]
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise LayoutError(f"{source.path}: keys that {where} does not know: {', '.join(unexpected[:3])}{more}",
                          "if the file is right and the layout incomplete, add them to its mapping file")
    if slot.drop_last_layers:
        notes.append(f"{where} stores {layers} blocks: the original's last {slot.drop_last_layers} "
                     f"{'is' if slot.drop_last_layers == 1 else 'are'} absent ({slot.why})")

    shapes, dtypes = {}, {}
    for op in ops:
        infos: list[TensorInfo] = [source.info(k) for k in op.keys]
        out = TRANSFORMS[op.transform].read_shape([i.shape for i in infos])
        if out is None:
            raise InputError(f"{source.path}: {op.keys[0]} has shape {list(infos[0].shape)}, which the "
                             f"{op.transform} transform cannot take")
        for c, s in zip(op.canonical, out):
            shapes[c], dtypes[c] = tuple(s), infos[0].dtype
    if repairs:
        notes.append(f"repaired {len(repairs)} keys: {sorted(set(repairs.values()))[0]} (read as the standard names)")
    return ReadPlan(rl, slot, ops, shapes, dtypes, layers, folder, notes, prefix, found_buffers,
                    tuple(view.values()), repairs).index(source)


# ---------------------------------------------------------------- write

def plan_write(rl: ResolvedLayout, slot: Slot, shapes: dict, layers: int, source_desc: str, absent_last: int = 0):
    """Target keys for every canonical tensor the source has and the target can hold.
    `absent_last`: blocks the encoder already lacks, which a lossy slot need not drop again."""
    naming, family = rl.namings[slot.name], rl.family
    ops, notes = [], []
    drop = max(0, slot.drop_last_layers - absent_last)
    if slot.drop_last_layers and not drop:
        notes.append(f"kept all {layers} blocks: the last {absent_last} were already absent, as {rl.name} stores it")
    if drop:
        kept = layers - drop
        if kept < 1:
            raise InputError(f"{source_desc}: {rl.name} keeps all but the last {drop} blocks, "
                             f"and the encoder has only {layers}")
        dropped = ", ".join(str(i) for i in range(kept, layers))
        notes.append(f"dropped block {dropped} of 0..{layers - 1}: {rl.name} stores {kept} ({slot.why})")
        layers = kept
    # write in family order, one layer at a time: embeddings, block 0, block 1, ..., final norm
    order = {t.name: i for i, t in enumerate(family.tensors)}
    first_layer = min((i for t, i in order.items() if LAYER in t), default=0)
    for e in naming.entries:
        rank = order[e.canonical[0]]
        for i in (range(layers) if LAYER in e.key else [None]):
            canon = tuple(fill_layer(c, i) for c in e.canonical)
            present = [c in shapes for c in canon]
            if not all(present):
                if any(present):
                    raise InputError(f"{source_desc}: has {canon[present.index(True)]} but not "
                                     f"{canon[present.index(False)]}; {rl.name} stores them together")
                if all(family.spec(c).optional for c in e.canonical) and not any(c in slot.omit for c in e.canonical):
                    notes.append(f"the source has no {', '.join(canon)}; none written")
                continue
            if any(c in slot.omit for c in canon):
                notes.append(f"dropped: {', '.join(canon)} ({rl.name} {slot.name} cannot hold it"
                             + (f"; {slot.why})" if slot.why else ")"))
                continue
            t = TRANSFORMS[e.transform]
            out = t.write_shape([shapes[c] for c in canon])
            if out is None:
                raise InputError(f"{source_desc}: {', '.join(canon)} cannot be written as {e.key} ({e.transform})")
            position = (1, i, rank) if i is not None else (0 if rank < first_layer else 2, 0, rank)
            ops.append((position, WriteOp(canon, e.transform, (slot.prefix + fill_layer(e.key, i),), tuple(out))))
    ops.sort(key=lambda pair: pair[0])
    ops = [op for _, op in ops]
    buffers = []
    for b in sorted(slot.buffers):
        spec = family.buffers[b]
        buffers.append(BufferOp(b, slot.prefix + naming.buffers[b], spec.shape, spec.synthesize))
    return ops, buffers, notes, layers
