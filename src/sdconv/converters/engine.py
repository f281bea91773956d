"""The conversion API: make_plans() then convert().

container -> layout -> canonical -> layout -> container, with every decision recorded in a
Plan that --dry-run prints and the output's metadata keeps. A checkpoint may hold several
encoders (SDXL: clip_l and clip_g); each becomes an EncoderPlan, and a Plan is one output.
Reading and analysing the input is analyse.py's job, grafts grafts.py's, the metadata and
ledger provenance.py's, laying out files output.py's, atomic placement atomic.py's.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError, UsageError
from ..options import ConvertOptions
from . import leases, provenance
from .analyse import Found, analyse, apply_repairs, carried_placeholders, read_input
from .atomic import AtomicOutput
from .conversion import EncoderPlan, Plan, Result
from .execute import SourceReader, stream
from .folders import is_input
from .grafts import own_projection, plan_grafts, plan_vision
from .lora import bind, read_lora
from .hashing import LateValue
from .leases import Snapshot
from .output import SlotOutput, write_layout, write_whole_clip
from .plan import plan_write
from .remote import is_remote, warm_torch
from .registry import DEFAULT, Registry, ResolvedLayout
from .schema import Slot
from .vision import holds_vision
from .writers import format_for


def make_plans(input, options: ConvertOptions | None = None, *, output=None, registry: Registry = DEFAULT,
               **fields) -> list[Plan]:
    """Plan a conversion of `input`: one Plan per output (several only with encoder='all' into a
    layout that holds one encoder). Reads headers (and a few small tensors), writes nothing.
    `options` is a ConvertOptions, or give its fields as keywords: make_plans(path, to="hf")."""
    o = ConvertOptions.of(options, fields)
    given = dict(o.params)
    target = registry.layout(o.to)
    source, reads, verdicts = read_input(input, o.from_, given, registry)
    family = reads[0].layout.family
    if target.family.name != family.name:
        raise UsageError(f"{o.to} holds a {target.family.name} model, the input a {family.name} one")
    every = analyse(source, reads, given)
    found = _select(every, o.encoder, source.path)
    if source.costly_reads:     # a remote input: the encoders' tensors in few requests, before the checks read some
        source.prefetch([k for f in found for op in f.read.ops for k in op.keys])
    loras = [read_lora(spec, o.lora_from, registry) for spec in o.lora]
    applied = bind(loras, found, every, source.path) if loras else {}
    apply_repairs(found, o.fix_position_ids)
    with_vision, projection = (input if o.whole_clip else o.with_vision), o.projection
    if with_vision is not None and len(found) != 1:
        raise UsageError("--with-vision assembles one CLIP: choose one encoder with --encoder NAME")
    own_vision = with_vision is not None and is_input(source, with_vision)     # a whole CLIP converted
    if own_vision and not holds_vision(source, found[0], registry):
        flag = "--whole-clip" if o.whole_clip else f"--with-vision {with_vision}"
        raise UsageError(f"{flag}: the input holds no vision tower ({found[0].read.layout.name} "
                         f"{found[0].identity})", "convert its text encoder alone, or name a whole CLIP "
                         "(OpenAI .pt, open_clip, transformers CLIPModel) with --with-vision")
    if with_vision is not None and projection is None:
        projection = with_vision           # the text projection comes from the same CLIP
    if projection is not None and (own_vision if projection is with_vision else is_input(source, projection)):
        own_projection(found, projection)   # the input's own projection and logit_scale: nothing grafted
        projection = None
    if projection is not None:
        plan_grafts(found, projection, o.replace_projection, o.allow_synthetic, registry)
    for f in found:
        carried = carried_placeholders(source, f, o.allow_synthetic)
        if carried and (projection is not None or with_vision is not None) and not o.allow_synthetic:
            raise InputError(f"{source.path}: {carried[0]}", "an output meant for scoring (--projection, "
                             "--with-vision) refuses placeholders; pass --allow-synthetic to write it anyway")
        if o.strict and f.warnings:             # --strict: every warning, of any step, is an error
            raise InputError(f"--strict: {f.warnings[0]}", "fix the input, or run without --strict")
    vision = None
    if with_vision is not None:
        f = found[0]
        vision = plan_vision(with_vision, target, f, o.force_activation, registry,
                             (source, f) if own_vision else None)
        had = "logit_scale" in f.read.shapes
        if had:                                   # the pair's logit_scale is the reference's
            del f.read.shapes["logit_scale"]
            f.grafts.pop("logit_scale", None)
        if own_vision and "logit_scale" in vision.read.shapes:
            # the input's own, written: what its text side's reading said of it (an hf text
            # slot cannot hold one) does not apply
            f.read.notes[:] = [n for n in f.read.notes if "logit_scale" not in n]
            f.notes.append("logit_scale written with the vision tower")
        elif had:
            f.notes.append(f"logit_scale from {with_vision} (with its vision tower)")
    encs = []
    for f in found:
        tslot, slot_notes = target_slot(target, f.identity, family.kinds)
        ops, buffers, wnotes, layers_out = plan_write(target, tslot, f.read.shapes, f.read.layers, str(source.path),
                                                      f.absent_last)
        if vision is not None:      # the pair's logit_scale comes with the vision tower
            wnotes = [n for n in wnotes if "logit_scale" not in n]
        e = EncoderPlan(f.read, f.identity, f.identity_origin, f.arch, f.params, f.param_origin, tslot, ops,
                        buffers, layers_out, f.absent_last + f.read.layers - layers_out,
                        f.notes + slot_notes + wnotes, f.grafts, f.warnings, f.repairs)
        e.notes += [n for n in [e.tokenizer(make=False)[1]] if n]
        e.loras = applied.get(f.identity, [])
        e.notes += [f"--lora {lf.name} ({lf.format}, scale {lf.scale:g}): {len(d)} matrices adapted" for lf, d in e.loras]
        encs.append(e)
    for lf in loras:
        encs[0].notes += [f"--lora {lf.name}: {n}" for n in lf.notes] + (
            [f"--lora {lf.name}: {lf.unet_keys} UNet keys ignored"] if lf.unet_keys else [])

    plans = []
    for group, out in _outputs(encs, None if output is None else Path(output)):
        fmt = o.fmt
        if fmt is None:
            fmt = "safetensors" if target.layout.output == "folder" or out is None else format_for(out, None)
        plans.append(Plan(source, target, group, fmt, o.dtype, out, verdicts, vision))
    return plans


def _select(found: list[Found], encoder: str | None, path) -> list[Found]:
    """The encoders --encoder asks for: one by kind, or all; a file with several needs a choice."""
    names = [f.identity for f in found]
    if encoder is None and len(found) > 1:
        raise UsageError(f"{path} holds {len(found)} encoders: {', '.join(names)}",
                         f"choose one with --encoder {names[0]}, or --encoder all")
    if encoder in (None, "all"):
        return found
    chosen = [f for f in found if f.identity == encoder]
    if not chosen:
        raise UsageError(f"{path} holds no {encoder} encoder; it holds {', '.join(names)}",
                         f"use --encoder {' or '.join(names)}")
    return chosen


def _outputs(encs: list[EncoderPlan], output: Path | None) -> list[tuple[list[EncoderPlan], Path | None]]:
    """One output holding every encoder if the target has a slot for each, else one output per
    encoder, named `<stem>.<encoder><suffix>`."""
    if len({e.slot.name for e in encs}) == len(encs):
        return [(encs, output)]
    return [([e], None if output is None else split_name(output, e.identity)) for e in encs]


def target_slot(target: ResolvedLayout, identity: str, kinds) -> tuple[Slot, list[str]]:
    """The slot of `target` an encoder of kind `identity` is written to (and a note when it is
    only a guess); a UsageError when the target has none for it."""
    slots = target.layout.slots
    if identity in slots:
        return slots[identity], []
    generic = [s for s in slots.values() if s.name not in kinds]
    if generic:
        return generic[0], []
    if identity not in kinds:
        first = next(iter(slots.values()))
        return first, [f"the encoder's kind is unknown (its width matches none): written as {first.name}, "
                       f"{target.name}'s first slot (--param encoder=NAME to choose)"]
    raise UsageError(f"{target.name} has no place for a {identity} encoder; it holds {', '.join(slots)}",
                     "choose another --to, or another --encoder")


def split_name(output: Path, identity: str) -> Path:
    """out.safetensors -> out.clip_l.safetensors; te_folder -> te_folder.clip_l"""
    return output.with_name(f"{output.stem}.{identity}{output.suffix}" if output.suffix else f"{output.name}.{identity}")

def make_plan(input, options: ConvertOptions | None = None, **kw) -> Plan:
    """Plan a conversion that makes one output."""
    plans = make_plans(input, options, **kw)
    if len(plans) != 1:
        raise UsageError(f"this conversion makes {len(plans)} outputs", "use make_plans")
    return plans[0]


def convert(input, output, options: ConvertOptions | None = None, *, registry: Registry = DEFAULT,
            progress=None, record: dict | None = None, **fields) -> Result:
    """Convert the text encoder(s) in `input` to layout `options.to`, written at `output`
    atomically (nothing is left on failure; nothing replaced without force).

    `options` is a ConvertOptions, or give its fields as keywords: convert(a, b, to="hf").
    `progress`, if given, is a tqdm-like bar: reset(total=bytes) once, then update(bytes).
    `record`: options to store in the outputs (batch runs skip outputs made with the same)."""
    o = ConvertOptions.of(options, fields)
    output = Path(output)
    try:
        return _convert(input, output, o, registry, progress, record)
    finally:
        leases.release_all()


def _convert(input, output: Path, o: ConvertOptions, registry: Registry, progress, record) -> Result:
    if is_remote(input):        # torch is needed to write; import it while the encoder's bytes travel
        warm_torch()
    plans = make_plans(input, o, output=output, registry=registry)
    unchanged = Snapshot(p for plan in plans for p in plan.inputs())
    for p in plans:
        p.options = record
    folder = plans[0].writes_folder
    guards = []                         # outputs that may not be written are refused up front
    for p in plans:
        side = provenance.sidecar_path(p)
        beside = [side] if side is not None and not folder else []
        guards.append(AtomicOutput(p.output, folder, o.force, companions=beside, protect=p.inputs()))
    for p in plans:                     # remote inputs: fetch what the plans read, in few requests
        p.prefetch()
    sha = plans[0].source.late_sha256()         # local files: hashed in the background unless cached
    if progress is not None:
        progress.reset(total=sum(p.bytes_to_write for p in plans))
    files = []
    for p, guard in zip(plans, guards):
        files += _write_plan(p, guard, sha, progress, unchanged)     # a failed write is an OutputError (atomic.py)
    return Result(plans, [p.output for p in plans], files, sha.result() if isinstance(sha, LateValue) else sha)


def _write_plan(p: Plan, guard: AtomicOutput, sha, progress, unchanged: Snapshot) -> list[Path]:
    """Make one output: stream its tensors into the temporary, then rename it into place."""
    folder = p.writes_folder
    side = provenance.sidecar_path(p)
    meta = provenance.metadata(p, sha)
    with guard as tmp:
        per_encoder = [stream(e.reader(p.source, p.dtype),
                              e.ops, e.buffers, e.arch, p.dtype, progress.update if progress is not None else None)
                       for e in p.encoders]
        if p.vision is not None:
            v = p.vision
            vt = stream(SourceReader(v.source, v.read), v.ops, v.buffers, v.arch, p.dtype)
            e = p.encoders[0]
            written = write_whole_clip(p.target, v.target, p.fmt, tmp,
                                       SlotOutput(e.slot, per_encoder[0], e.arch_out, e.params,
                                                  tokenizer=e.tokenizer()[0]), vt,
                                       (v.arch, v.params), provenance.whole_clip_metadata(p, meta))
        else:
            parts = [SlotOutput(e.slot, s, e.arch_out, e.params,
                                provenance.slot_metadata(p, e, meta) if folder else None, e.tokenizer()[0])
                     for e, s in zip(p.encoders, per_encoder)]
            written = write_layout(p.target, p.fmt, tmp, parts, meta)
        if side is not None:        # the ledger and provenance, for containers without metadata
            at = tmp / side.name if folder else guard.companion(side)
            at.write_text(provenance.sidecar_text(meta))
            written.append(at)
        unchanged.check()           # an input changed meanwhile: the temporary is removed, exit 3
    return [p.output / f.relative_to(tmp) if folder else (side if side is not None and f.name == side.name else p.output)
            for f in written]
