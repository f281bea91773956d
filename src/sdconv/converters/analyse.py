"""Reading an input: open it, find its encoders (detected or --from), and learn everything the
headers say of each (architecture, identity, heads and activation, absent blocks, the health of
the buffers it carries). Then the repairs and warnings that follow from that health.
Nothing here reads more than a few small tensors."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError, LayoutError
from . import configs, metakeys, untrusted
from .detect import detect, read_layout
from .remote_sources import open_input
from .arch import absent_last_blocks, identify, infer_arch, resolve_params
from .plan import ReadPlan
from .registry import DEFAULT, Registry
from .sources import Source
from .synthetic import UNINITIALISED, position_ids_health, scalar_placeholder, suspects

OWN_METADATA = "input metadata"     # the origin of what sdconv's own metadata in the input says


@dataclass
class Found:
    """An encoder read from the input, with everything known about it."""
    read: ReadPlan
    arch: dict
    identity: str
    identity_origin: str
    params: dict
    param_origin: dict
    absent_last: int
    notes: list[str]
    grafts: dict = field(default_factory=dict)
    health: dict = field(default_factory=dict)      # buffer name -> position_ids_health(...)
    warnings: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)


def read_input(input, from_: str | None = None, given: dict | None = None, registry: Registry = DEFAULT):
    """Open the input and read its encoders: (source, [ReadPlan], verdicts or None)."""
    given = given or {}
    src_layout = registry.layout(from_) if from_ else None      # unknown names fail before reading
    source = open_input(input)
    if src_layout is None:
        reads, verdicts = detect(source, registry, given.get("encoder"))
        return source, reads, verdicts
    try:
        return source, read_layout(source, src_layout, given.get("encoder")), None
    except LayoutError as e:
        hint = "check --from"
        try:
            found, _ = detect(source, registry)
            hint = f"it looks like {found[0].layout.name}: use --from {found[0].layout.name} or --from auto"
        except LayoutError:
            pass
        raise LayoutError(f"--from {from_}: {e.message}", hint)


def analyse(source: Source, reads: list[ReadPlan], given: dict) -> list[Found]:
    """Architecture, identity and parameters of each encoder read (headers only)."""
    family = reads[0].layout.family
    found = []
    for rp in reads:
        arch = infer_arch(family, rp.shapes, rp.layers, f"{source.path} ({rp.layout.name} {rp.slot.name}): ")
        from_input, origin, cfg_notes, own_warnings = _input_params(source, rp, arch)
        ident, ident_origin = identify(family, rp.slot, arch, given if len(reads) == 1 else {}, from_input)
        where = f"{source.path}/" if source.is_folder else f"{source.path}: "
        try:
            pr, po = resolve_params(family, rp.slot, arch, given, from_input, origin, ident, where)
        except InputError as e:
            if origin != OWN_METADATA:      # the input's config: its error; sdconv's old record: ignored
                raise
            own_warnings.append(f"{e.message}; its sdconv metadata ignored (sdconv's own record, not needed)")
            pr, po = resolve_params(family, rp.slot, arch, given, {}, "", ident, where)
        absent, depth = absent_last_blocks(family, ident, arch, rp.slot, from_input.get("absent_last", 0))
        f = Found(rp, arch, ident, ident_origin, pr, po, absent, cfg_notes + depth, warnings=own_warnings)
        _drop_placeholder_scalars(source, f)
        _check_dtypes(source, f)
        f.health = _buffer_health(source, f)
        found.append(f)
    return found


def _drop_placeholder_scalars(source: Source, f: Found):
    """A scalar the family knows a trained value of (logit_scale) that is not a number at all —
    kohya's int64 1, NaN, Inf — is a placeholder: named (a warning, in the ledger too), not
    written; the rest of the encoder converts. (A finite value far from the trained one is said
    by the synthetic-weight checks, and written.)"""
    for spec in f.read.layout.family.tensors:
        if spec.optional and spec.shape == () and spec.sample is not None and spec.name in f.read.shapes:
            why = scalar_placeholder(source, f.read, spec.name, spec.sample)
            if why is not None:
                key = f.read.op_for(spec.name).keys[0]
                f.read.drop(spec.name, source)
                f.warnings.append(f"{key} {why}: a placeholder, not written")


def carried_placeholders(source: Source, f: Found, allow_synthetic: bool) -> list[str]:
    """What looks fabricated in the encoder (a graft replaces what it takes). A matrix of
    uninitialised memory is not written (unless allow_synthetic): it was never a weight. The
    rest (an identity or all-ones projection, a copied block) is written as it is; each is said,
    on the terminal and in the ledger. Returns what is carried into the output."""
    carried = []
    for part, look, text in suspects(source, f.read):
        if part in f.grafts or (part in f.read.dtypes and part not in f.read.shapes):
            continue                # taken from a reference, or not written at all
        if look == UNINITIALISED and part in f.read.shapes and not allow_synthetic:
            f.read.drop(part, source)
            f.arch = infer_arch(f.read.layout.family, f.read.shapes, f.read.layers)
            f.warnings.append(f"{text}; not written (--allow-synthetic writes it)")
            continue
        carried.append(f"{text}; written as it is")
    f.warnings += carried
    return carried


def _check_dtypes(source: Source, f: Found):
    """Weights must be floating point; a mixture of float dtypes is said (OpenAI's releases
    keep norms and embeddings in fp32 beside fp16 matrices, merges sometimes mix by accident)."""
    counts: dict = {}
    for op in f.read.ops:
        for k in op.keys:
            info = source.info(k)
            if not info.is_float:
                raise InputError(f"{source.path}: {k} holds {info.dtype} values; a text encoder's weights are "
                                 f"floating point", "the file is damaged, or this key is not what the layout says")
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
    if len(counts) > 1:
        f.notes.append("mixed dtypes: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
                       + " (--dtype makes them one)")


def _buffer_health(source: Source, f: Found) -> dict:
    """Classify each rebuilt-not-copied buffer the source holds (position_ids): exact,
    drifted (floats that round back: recoverable) or corrupt."""
    out = {}
    fam = f.read.layout.family
    for name, key in f.read.buffers.items():
        spec = fam.buffers.get(name)
        if spec is None or spec.synthesize != "arange":
            continue
        info = source.info(key)
        n = info.shape[-1] if info.shape else 0
        out[name] = {"key": key, **position_ids_health(source.raw(key), info.dtype, n)}
    return out


def apply_repairs(found: list[Found], fix_position_ids: bool):
    """Drifted position_ids: a warning, or a recorded repair with --fix-position-ids. Corrupt
    ones: refused without it."""
    for f in found:
        for name, h in f.health.items():
            bad = h.get("bad_indices", [])
            where = f"{h['key']} ({h['dtype']}, wrong at {bad[:8]}{'...' if len(bad) > 8 else ''})"
            if h["status"] == "drifted":
                if fix_position_ids:
                    f.repairs.append(f"{name}: drifted {where}; rewritten as an int64 arange")
                else:
                    f.warnings.append(f"{name} drifted: {where} in runtimes that truncate; outputs that hold "
                                      f"{name} get a fresh int64 arange (pass --fix-position-ids to record the repair)")
            elif h["status"] == "corrupt":
                if not fix_position_ids:
                    raise InputError(f"{f.read.layout.name} {f.identity}: {name} are corrupt: {where}; runtimes "
                                     f"that load them read tokens at wrong positions",
                                     "pass --fix-position-ids to write a correct int64 arange (recorded)")
                f.repairs.append(f"{name}: corrupt {where}; rewritten as an int64 arange")
        f.repairs += [f"{k}: {why}" for k, why in sorted(f.read.repairs.items())]


def _input_params(source: Source, rp: ReadPlan, arch: dict):
    """What the input says of itself: heads/act from its config file (which must be well formed:
    it is the input's), else from sdconv's own metadata (an optional record: ignored with a
    warning when malformed); which encoder it is from that metadata."""
    meta = source.metadata(rp.folder)
    warnings: list[str] = []
    mine = untrusted.ignoring(warnings, "its sdconv metadata",
                              lambda: own_params(meta, rp.slot.name, f"{source.path}", rp.layout.family.act_choices))
    got, origin = mine or ({}, "")
    notes = []
    if meta.get(metakeys.ENCODER):
        got["encoder"] = meta[metakeys.ENCODER]
    cfg_spec = rp.slot.config
    cfg = source.read_json(rp.folder + cfg_spec.file) if cfg_spec is not None else None
    if cfg is not None:
        read = configs.SLOT_FORMATS[cfg_spec.format].read(cfg)
        got.update(read["params"])
        origin = rp.folder + cfg_spec.file
        notes = [f"{rp.folder + cfg_spec.file} says {k} = {v}, the weights say {arch[k]}"
                 for k, v in read["declared"].items() if k in arch and arch[k] != v]
    return got, origin, notes, warnings


def own_params(meta: dict, slot: str, where: str, acts) -> tuple[dict, str]:
    """heads/act (and blocks already dropped) that sdconv recorded in an earlier output's
    metadata: `sdconv.encoders` (per encoder), else `sdconv.params`. MalformedInputError if a
    record is not what sdconv writes."""
    def params(v: untrusted.Value) -> dict:
        out = {}
        if (heads := v.obj().get("heads")) is not None:
            out["heads"] = heads.whole(1, untrusted.MAX_HEADS)
        if (act := v.get("act")) is not None:
            out["act"] = act.text(choices=acts)
        return out
    if metakeys.ENCODERS in meta:
        per = untrusted.parse_json(meta[metakeys.ENCODERS], f"{where} metadata {metakeys.ENCODERS}").obj()
        mine = per.get(slot)
        if mine is None and per.size() == 1:
            mine = next(v for _, v in per.items())
        if mine is not None and mine.obj().size():
            got = params(mine.obj()["params"]) if mine.get("params") is not None else {}
            absent = mine.get("absent_last_blocks")
            if absent is not None and absent.whole(0, untrusted.MAX_LAYERS):
                got["absent_last"] = absent.raw
            return got, OWN_METADATA
    if metakeys.PARAMS in meta:
        return params(untrusted.parse_json(meta[metakeys.PARAMS], f"{where} metadata {metakeys.PARAMS}")), \
            OWN_METADATA
    return {}, ""
