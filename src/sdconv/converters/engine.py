"""The conversion API that the CLI drives: make_plans() then convert().

container -> layout -> canonical -> layout -> container, with every decision recorded in a
Plan that --dry-run prints and the output's metadata keeps. A checkpoint may hold several
encoders (SDXL: clip_l and clip_g); each becomes an EncoderPlan, and a Plan is one output.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from . import configs
from .containers import AtomicOutput, Source, format_for, open_source, save_tensors
from .hashing import LateValue, late_sha256, sha256_of
from .detect import Verdict, detect, read_layout
from .errors import InputError, LayoutError, OutputError, UsageError
from .execute import DTYPES, stream
from .stream import TensorStream
from .plan import (BufferOp, ReadPlan, WriteOp, absent_last_blocks, identify, infer_arch, plan_read, plan_write,
                   resolve_params)
from .registry import DEFAULT, Registry, ResolvedLayout
from .schema import Slot

FORMATS = ("safetensors", "pt")
DTYPE_CHOICES = ("keep", *DTYPES)
_DTYPE_CODE = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8}


@dataclass
class EncoderPlan:
    read: ReadPlan
    identity: str               # clip_l, clip_h, clip_g, or the source slot's generic name
    identity_origin: str
    arch: dict                  # as read
    params: dict
    param_origin: dict
    slot: Slot                  # the target slot
    ops: list[WriteOp]
    buffers: list[BufferOp]
    layers_out: int
    absent_last: int = 0        # last blocks the written encoder lacks (e.g. diffusers' SD2)
    notes: list[str] = field(default_factory=list)
    grafts: dict = field(default_factory=dict)      # canonical -> Graft
    warnings: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)

    def source_op(self, canonical: str):
        g = self.grafts.get(canonical)
        return (g.source, g.op) if g else (None, self.read.op_for(canonical))

    def dtype_of(self, canonical: str) -> str:
        g = self.grafts.get(canonical)
        return g.source.info(g.op.keys[0]).dtype if g else self.read.dtypes[canonical]

    @property
    def arch_out(self) -> dict:
        """The architecture of what is written: symbols of dropped tensors (a projection that the
        target cannot hold) are unbound, the layer count is the one written."""
        written = {c: self.read.shapes[c] for op in self.ops for c in op.canonical}
        return infer_arch(self.read.layout.family, written, self.layers_out)

    def out_dtype(self, code: str, dtype: str) -> str:
        return _DTYPE_CODE.get(dtype, code) if code.startswith(("F", "BF")) else code

    def bytes_to_write(self, dtype: str) -> int:
        total = 0
        for op in self.ops:
            code = self.out_dtype(self.dtype_of(op.canonical[0]), dtype)
            for s in op.shapes:
                n = 1
                for d in s:
                    n *= d
                total += n * _SIZE.get(code, 4)
        for b in self.buffers:
            n = 1
            for s in b.shape:
                n *= self.arch[s] if isinstance(s, str) else s
            total += 8 * n
        return total


@dataclass
class Plan:
    """One output: the encoders it holds and how each is written."""
    source: Source
    target: ResolvedLayout
    encoders: list[EncoderPlan]
    fmt: str
    dtype: str
    output: Path | None = None
    verdicts: list[Verdict] | None = None       # detection results (None with --from)
    vision: "VisionPlan | None" = None          # --with-vision: the rest of a whole CLIP
    options: dict | None = None                 # the options a batch run records, to skip up-to-date outputs

    @property
    def writes_folder(self) -> bool:
        return (self.vision.target if self.vision else self.target).layout.output == "folder"

    # single-encoder shorthands (most conversions)
    @property
    def read(self) -> ReadPlan:
        return self.encoders[0].read

    @property
    def arch(self) -> dict:
        return self.encoders[0].arch

    @property
    def params(self) -> dict:
        return self.encoders[0].params

    @property
    def param_origin(self) -> dict:
        return self.encoders[0].param_origin

    @property
    def ops(self) -> list[WriteOp]:
        return [op for e in self.encoders for op in e.ops]

    @property
    def notes(self) -> list[str]:
        """Everything the plan has to say: what was read, dropped, assumed."""
        return [n for e in self.encoders for n in e.read.notes + e.notes]

    @property
    def bytes_to_write(self) -> int:
        return sum(e.bytes_to_write(self.dtype) for e in self.encoders)  # (the vision tower not counted)

    @property
    def bytes_to_read(self) -> int:
        return sum(e.read.bytes_to_read for e in self.encoders)

    def describe(self) -> str:
        """The human-readable plan (--dry-run)."""
        lines = [f"input:   {self.source.path}"]
        lay = self.read.layout
        how = "given with --from" if self.verdicts is None else "detected"
        lines.append(f"layout:  {lay.name} ({how}), {lay.layout.description}")
        for v in self.verdicts or []:
            lines.append(f"  {'matched ' if v.plans is not None else 'rejected'} {v.layout}: {v.reason}")
        lines.append(f"output:  {self.output or '-'} ({self.target.name}, {self.fmt}, dtype {self.dtype})")
        for e in self.encoders:
            a = e.arch
            lines.append(f"encoder {e.identity} ({e.identity_origin}), at {e.read.prefix or 'top level'} -> "
                         f"{self.target.name} {e.slot.name} at {e.slot.prefix or 'top level'}")
            lines.append(f"  architecture: width {a['width']}, layers {a['layers']}, ffn {a['ffn']}, vocab {a['vocab']}, "
                         f"context {a['context']}, projection {a.get('proj') or 'none'}")
            for k in ("heads", "act"):
                lines.append(f"  {k} = {e.params[k]}  ({e.param_origin[k]})")
            lines.append("  tensors (canonical <- source [transform] -> target):")
            for op in e.ops:
                srcs = []
                for c in op.canonical:
                    gsrc, rop = e.source_op(c)
                    where = f"{Path(gsrc.path).name}:" if gsrc is not None else ""
                    srcs.append(where + rop.keys[0] + ("" if rop.transform == "rename" else f" [{rop.transform}]"))
                t = "" if op.transform == "rename" else f" [inverse of {op.transform}]"
                lines.append(f"    {', '.join(op.canonical)} <- {', '.join(dict.fromkeys(srcs))} -> "
                             f"{', '.join(op.keys)}{t}")
            for b in e.buffers:
                lines.append(f"    {b.key} <- synthesized ({b.synthesize}, int64)")
            for n in e.warnings:
                lines.append(f"  WARNING: {n}")
            for n in e.repairs:
                lines.append(f"  repaired: {n}")
            for n in e.read.notes + e.notes:
                lines.append(f"  note: {n}")
        if self.vision is not None:
            v = self.vision
            lines.append(f"vision tower from {v.source.path} ({v.read.layout.name}): width {v.arch['width']}, "
                         f"layers {v.arch['layers']}, patch {v.arch['patch']}, heads {v.params['heads']}, "
                         f"{v.params['act']}, projection {v.arch['proj']}; {len(v.ops)} tensors")
        lines.append(f"bytes: read {self.bytes_to_read:,}, write {self.bytes_to_write:,}")
        return "\n".join(lines)


def _parse_params(params) -> dict:
    out = {}
    for k, v in (params or {}).items():
        if k not in ("heads", "act", "encoder"):
            raise UsageError(f"unknown parameter {k!r}", "known: heads, act, encoder")
        out[k] = v
    return out


def _input_params(source: Source, rp: ReadPlan, arch: dict):
    """What the input says of itself: heads/act from its config file, else from sdconv's own
    metadata; which encoder it is from that metadata."""
    got, origin, notes = {}, "", []
    meta = source.metadata(rp.folder)
    try:
        per = json.loads(meta.get("sdconv.encoders", "{}"))
        mine = per.get(rp.slot.name) or (next(iter(per.values())) if len(per) == 1 else None)
        if mine is not None:
            got, origin = dict(mine.get("params", {})), "input metadata"
            if mine.get("absent_last_blocks"):
                got["absent_last"] = int(mine["absent_last_blocks"])
        elif "sdconv.params" in meta:
            got = {k: v for k, v in json.loads(meta["sdconv.params"]).items() if k in ("heads", "act")}
            origin = "input metadata"
    except (ValueError, AttributeError, TypeError):
        got = {}
    if meta.get("sdconv.encoder"):
        got["encoder"] = meta["sdconv.encoder"]
    cfg_spec = rp.slot.config
    cfg = source.read_json(rp.folder + cfg_spec.file) if cfg_spec is not None else None
    if cfg is not None:
        read = configs.READERS[cfg_spec.format](cfg)
        got.update(read["params"])
        origin = rp.folder + cfg_spec.file
        notes = [f"{rp.folder + cfg_spec.file} says {k} = {v}, the weights say {arch[k]}"
                 for k, v in read["declared"].items() if k in arch and arch[k] != v]
    return got, origin, notes


@dataclass
class Graft:
    """A canonical tensor taken from a reference file instead of the input."""
    source: Source
    op: object                  # the reference's ReadOp
    layout: str
    sha256: str

    def record(self) -> dict:
        return {"file": Path(self.source.path).name, "sha256": self.sha256, "key": self.op.keys[0],
                "layout": self.layout}


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
    source = open_source(input)
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
        from_input, origin, cfg_notes = _input_params(source, rp, arch)
        ident, ident_origin = identify(family, rp.slot, arch, given if len(reads) == 1 else {}, from_input)
        pr, po = resolve_params(family, rp.slot, arch, given, from_input, origin, ident)
        absent, depth = absent_last_blocks(family, ident, arch, rp.slot, int(from_input.get("absent_last", 0)))
        f = Found(rp, arch, ident, ident_origin, pr, po, absent, cfg_notes + depth)
        _check_dtypes(source, f)
        f.health = _buffer_health(source, f)
        found.append(f)
    return found


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
    from .synthetic import position_ids_health
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


def apply_repairs(found: list[Found], fix_position_ids: bool, strict: bool):
    """Drifted position_ids: a warning, or a recorded repair with --fix-position-ids. Corrupt
    ones: refused without it. --strict turns every warning into an error."""
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
                                     f"pass --fix-position-ids to write a correct int64 arange (recorded)")
                f.repairs.append(f"{name}: corrupt {where}; rewritten as an int64 arange")
        f.repairs += [f"{k}: {why}" for k, why in sorted(f.read.repairs.items())]
        if strict and f.warnings:
            raise InputError(f"--strict: {f.warnings[0]}", "fix the input, or run without --strict")


@dataclass
class VisionPlan:
    """The rest of a whole CLIP, from a reference: vision tower, visual projection, logit_scale."""
    source: Source
    read: ReadPlan
    arch: dict
    params: dict
    target: ResolvedLayout      # the target layout's vision side
    ops: list[WriteOp]
    buffers: list[BufferOp]
    sha256: str


def plan_vision(reference, target: ResolvedLayout, text: "Found", force_activation: bool,
                registry: Registry) -> VisionPlan:
    """Read the reference's vision tower (in its own layout's vision naming) and plan writing it
    in the target's. The activation must suit the target: OpenAI's clip hard-codes QuickGELU,
    and open_clip has one flag for both towers."""
    tv = registry.vision(target)
    if tv is None:
        raise UsageError(f"--with-vision writes a whole CLIP as openai, open_clip or hf, not {target.name}")
    ref_source, ref_reads, _ = read_input(reference, None, {}, registry)
    rv = registry.vision(ref_reads[0].layout)
    if rv is None:
        raise UsageError(f"--with-vision {reference}: a {ref_reads[0].layout.name} file holds no vision tower",
                         "use a full CLIP: OpenAI .pt, open_clip, or a transformers CLIPModel")
    try:
        vread = plan_read(ref_source, rv, rv.layout.slots["vision"])
    except LayoutError as e:
        raise UsageError(f"--with-vision {reference}: no complete ViT vision tower ({e.message})",
                         "ResNet CLIPs are not supported; use a ViT CLIP")
    varch = infer_arch(rv.family, vread.shapes, vread.layers, f"{reference} (vision): ")
    ref_text = analyse(ref_source, ref_reads, {})[0]
    cfg = ref_source.read_json(ref_reads[0].folder + "config.json") if ref_source.is_folder else None
    vact = ((cfg or {}).get("vision_config") or {}).get("hidden_act") or ref_text.params["act"]
    vparams = {"heads": varch["width"] // rv.family.head_width, "act": vact}
    if varch["proj"] != text.arch.get("proj"):
        raise UsageError(f"the vision projection has {varch['proj']} outputs, the text projection "
                         f"{text.arch.get('proj')}: they must match", "use one reference for both")
    acts = {text.params["act"], vact}
    if not force_activation:
        if target.name == "openai" and acts != {"quick_gelu"}:
            raise UsageError(f"OpenAI's clip runs QuickGELU, and these towers use {' and '.join(sorted(acts))}",
                             "write --to open_clip or hf, or pass --force-activation")
        if target.name == "open_clip" and len(acts) > 1:
            raise UsageError("open_clip has one activation flag for both towers; the text tower uses "
                             f"{text.params['act']} and the vision tower {vact}", "write --to hf, or pass --force-activation")
    ops, buffers, _, _ = plan_write(tv, tv.layout.slots["vision"], vread.shapes, vread.layers, str(reference))
    return VisionPlan(ref_source, vread, varch, vparams, tv, ops, buffers, sha256_of(ref_source.files()))


GRAFTED = ("text_proj.weight", "logit_scale")     # what --projection takes from the reference


def plan_grafts(found: list[Found], reference, replace: bool, allow_synthetic: bool, registry: Registry):
    """Take each encoder's text projection (and logit_scale) from `reference`: the reference
    encoder of the same width. Refuses placeholders, and a projection the input already has."""
    from .synthetic import findings
    ref_source, ref_reads, _ = read_input(reference, None, {}, registry)
    ref_found = analyse(ref_source, ref_reads, {})
    with_proj = [r for r in ref_found if "text_proj.weight" in r.read.shapes]
    if not with_proj:
        raise UsageError(f"{reference}: its encoder has no text projection to graft",
                         "use a full CLIP (OpenAI, open_clip or transformers CLIPModel) as --projection")
    sha = sha256_of(ref_source.files())
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
                f.grafts[c] = Graft(ref_source, op, r.read.layout.name, sha)
                f.read.shapes[c] = r.read.shapes[c]
        f.arch = infer_arch(f.read.layout.family, {**f.read.shapes}, f.read.layers)
        f.notes.append(f"grafted {', '.join(f.grafts)} from {reference} ({r.read.layout.name} "
                       f"{r.identity}, key {f.grafts['text_proj.weight'].op.keys[0]})")


def _target_slot(target: ResolvedLayout, identity: str, kinds) -> tuple[Slot, list[str]]:
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


def _split_name(output: Path, identity: str) -> Path:
    """out.safetensors -> out.clip_l.safetensors; te_folder -> te_folder.clip_l"""
    return output.with_name(f"{output.stem}.{identity}{output.suffix}" if output.suffix else f"{output.name}.{identity}")


def make_plans(input, to: str, from_: str | None = None, params=None, fmt: str | None = None,
               dtype: str = "keep", output=None, encoder: str | None = None,
               projection=None, replace_projection: bool = False, allow_synthetic: bool = False,
               with_vision=None, force_activation: bool = False, fix_position_ids: bool = False,
               strict: bool = False, registry: Registry = DEFAULT) -> list[Plan]:
    """Plan a conversion: one Plan per output (several only with encoder='all' into a layout
    that holds one encoder)."""
    if dtype not in DTYPE_CHOICES:
        raise UsageError(f"unknown dtype {dtype!r}", f"choose one of {', '.join(DTYPE_CHOICES)}")
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", f"choose one of {', '.join(FORMATS)}")
    given = _parse_params(params)
    target = registry.layout(to)
    source, reads, verdicts = read_input(input, from_, given, registry)
    family = reads[0].layout.family
    if target.family.name != family.name:
        raise UsageError(f"{to} holds a {target.family.name} model, the input a {family.name} one")
    found = analyse(source, reads, given)
    names = [f.identity for f in found]
    if encoder in (None, "") and len(found) > 1:
        raise UsageError(f"{source.path} holds {len(found)} encoders: {', '.join(names)}",
                         f"choose one with --encoder {names[0]}, or --encoder all")
    if encoder not in (None, "", "all"):
        found = [f for f in found if f.identity == encoder]
        if not found:
            raise UsageError(f"{source.path} holds no {encoder} encoder; it holds {', '.join(names)}",
                             f"use --encoder {' or '.join(names)}")

    apply_repairs(found, fix_position_ids, strict)
    if with_vision is not None and len(found) != 1:
        raise UsageError("--with-vision assembles one CLIP: choose one encoder with --encoder NAME")
    if with_vision is not None and projection is None:
        projection = with_vision           # the text projection comes from the same CLIP
    if projection is not None:
        plan_grafts(found, projection, replace_projection, allow_synthetic, registry)
    vision = None
    if with_vision is not None:
        vision = plan_vision(with_vision, target, found[0], force_activation, registry)
        f = found[0]
        if "logit_scale" in f.read.shapes:        # the pair's logit_scale is the reference's
            del f.read.shapes["logit_scale"]
            f.grafts.pop("logit_scale", None)
            f.notes.append(f"logit_scale from {with_vision} (with its vision tower)")
    encs = []
    for f in found:
        tslot, slot_notes = _target_slot(target, f.identity, family.kinds)
        ops, buffers, wnotes, layers_out = plan_write(target, tslot, f.read.shapes, f.read.layers, str(source.path),
                                                      f.absent_last)
        if vision is not None:      # the pair's logit_scale comes with the vision tower
            wnotes = [n for n in wnotes if "logit_scale" not in n]
        encs.append(EncoderPlan(f.read, f.identity, f.identity_origin, f.arch, f.params, f.param_origin, tslot, ops,
                                buffers, layers_out, f.absent_last + f.read.layers - layers_out,
                                f.notes + slot_notes + wnotes, f.grafts, f.warnings, f.repairs))

    if output is not None:
        output = Path(output)
    slots_used = [e.slot.name for e in encs]
    if len(set(slots_used)) == len(encs):
        groups = [encs]                       # the target holds them all: one output
    else:
        groups = [[e] for e in encs]          # one output per encoder
    plans = []
    for g in groups:
        out = output if (output is None or len(groups) == 1) else _split_name(output, g[0].identity)
        f = fmt
        if f is None:
            f = "safetensors" if target.layout.output == "folder" or out is None else format_for(out, None)
        plans.append(Plan(source, target, g, f, dtype, out, verdicts, vision))
    return plans


def make_plan(input, to: str, **kw) -> Plan:
    """Plan a conversion that makes one output."""
    plans = make_plans(input, to, **kw)
    if len(plans) != 1:
        raise UsageError(f"this conversion makes {len(plans)} outputs", "use make_plans")
    return plans[0]


def _check_output(plan: Plan, output: Path):
    inp = Path(plan.source.path).resolve()
    out = output.resolve()
    if out == inp or (output.exists() and os.path.samefile(output, inp)):
        raise OutputError(f"{output} is the input", "choose another output path; sdconv never writes over its input")
    if inp.is_dir() and inp in out.parents:
        raise OutputError(f"{output} is inside the input folder {inp}", "write the output somewhere else")
    if any(out == f.resolve() for f in plan.source.files()):
        raise OutputError(f"{output} is one of the input's files", "choose another output path")


LEDGER_VERSION = 1


def encoder_ledger(e: EncoderPlan) -> dict:
    """Where every tensor this encoder writes comes from: the checkpoint (source keys and
    transforms, and a repair where the spelling was a known fault), a graft (file, sha256, key),
    or synthesis (what and why; repaired when the source's copy was broken)."""
    out = {}
    for op in e.ops:
        srcs, steps, repaired = [], [], []
        graft = None
        for c in op.canonical:
            if c in e.grafts:
                graft = e.grafts[c]
                continue
            rop = e.read.op_for(c)
            srcs += [k for k in rop.keys if k not in srcs]
            if rop.transform != "rename" and rop.transform not in steps:
                steps.append(rop.transform)
            repaired += [e.read.repairs[k] for k in rop.keys if k in e.read.repairs]
        if op.transform != "rename":
            steps.append(f"inverse of {op.transform}")
        for key in op.keys:
            if graft is not None:
                out[key] = {"origin": "grafted", **graft.record()}
            else:
                entry = {"origin": "checkpoint", "source": srcs, "transform": " then ".join(steps) or "rename"}
                if repaired:
                    entry["repaired"] = repaired[0]
                out[key] = entry
    for b in e.buffers:
        fixed = [r for r in e.repairs if r.startswith(f"{b.name}:")]
        out[b.key] = {"origin": "repaired" if fixed else "synthesized", "what": f"int64 {b.synthesize}",
                      "why": fixed[0] if fixed else f"{b.name} are rebuilt, never copied (merges corrupt them)"}
    return out


def _ledger(plan: Plan, strip: str = "", only: EncoderPlan | None = None) -> dict:
    tensors = {}
    for e in plan.encoders:
        if only is None or e is only:
            tensors.update({k[len(strip):] if strip and k.startswith(strip) else k: v
                            for k, v in encoder_ledger(e).items()})
    if plan.vision is not None and only is None:
        v = plan.vision
        for op in v.ops:
            for key in op.keys:
                tensors[key] = {"origin": "reference", "file": Path(v.source.path).name, "sha256": v.sha256,
                                "source": [k for c in op.canonical for k in v.read.op_for(c).keys]}
    return {"version": LEDGER_VERSION, "tensors": tensors,
            "repairs": [r for e in plan.encoders if only is None or e is only for r in e.repairs],
            "warnings": [w for e in plan.encoders if only is None or e is only for w in e.warnings]}


def _metadata(plan: Plan, sha: str) -> dict:
    meta = {
        "format": "pt",
        "sdconv.version": __version__,
        "sdconv.source": Path(plan.source.path).name,
        "sdconv.source_sha256": sha,
        "sdconv.from": plan.read.layout.name,
        "sdconv.to": plan.target.name,
        "sdconv.encoders": json.dumps({e.identity: {"slot": e.slot.name, "params": e.params, "arch": e.arch_out,
                                                    "absent_last_blocks": e.absent_last,
                                                    "grafted": {c: g.record() for c, g in e.grafts.items()}}
                                       for e in plan.encoders}, sort_keys=True),
        "sdconv.notes": json.dumps(plan.notes),
        "sdconv.ledger": json.dumps(_ledger(plan), sort_keys=True),
    }
    if plan.options is not None:
        meta["sdconv.options"] = json.dumps(plan.options, sort_keys=True)
    if len(plan.encoders) == 1:
        e = plan.encoders[0]
        meta.update({"sdconv.encoder": e.identity, "sdconv.params": json.dumps(e.params, sort_keys=True),
                     "sdconv.arch": json.dumps(e.arch_out, sort_keys=True)})
    return meta


@dataclass
class Result:
    plans: list[Plan]
    outputs: list[Path]
    files: list[Path]
    source_sha256: str

    @property
    def plan(self) -> Plan:
        return self.plans[0]

    @property
    def output(self) -> Path:
        return self.outputs[0]


def convert(input, output, to: str, from_: str | None = None, params=None, fmt: str | None = None,
            dtype: str = "keep", force: bool = False, encoder: str | None = None, projection=None,
            replace_projection: bool = False, allow_synthetic: bool = False, with_vision=None,
            force_activation: bool = False, fix_position_ids: bool = False, strict: bool = False,
            registry: Registry = DEFAULT, progress=None, options: dict | None = None) -> Result:
    """Convert the text encoder(s) in `input` to layout `to`, written at `output` atomically.

    `encoder` picks one encoder of a multi-encoder checkpoint, or 'all'. `progress`, if
    given, is a tqdm-like bar: reset(total=bytes) once, then update(bytes)."""
    output = Path(output)
    plans = make_plans(input, to, from_, params, fmt, dtype, output, encoder, projection, replace_projection,
                       allow_synthetic, with_vision, force_activation, fix_position_ids, strict, registry)
    for p in plans:
        p.options = options
    folder = plans[0].writes_folder
    for p in plans:
        _check_output(p, p.output)
    guards = [AtomicOutput(p.output, folder, force) for p in plans]    # refuse existing outputs up front
    for p in plans:
        side = sidecar_path(p)
        if side is not None and not folder and side.exists() and not force:
            raise OutputError(f"{side} already exists", "pass --force to replace it")
    sha = late_sha256(plans[0].source.files())        # in the background unless cached
    if progress is not None:
        progress.reset(total=sum(p.bytes_to_write for p in plans))
    files = []
    for p, guard in zip(plans, guards):
        try:
            files += _write_plan(p, guard, sha, folder, progress)
        except OSError as e:       # disk full, folder gone or read-only: the temporary is removed
            raise OutputError(f"{p.output}: writing failed ({e.strerror or e})",
                              "check the free space and permissions of the output folder")
    return Result(plans, [p.output for p in plans], files, sha.result() if isinstance(sha, LateValue) else sha)


SIDECAR = ".sdconv.json"


def sidecar_path(plan: Plan) -> Path | None:
    """Where the ledger goes besides the metadata: `OUTPUT/sdconv.json` for folders,
    `OUTPUT.sdconv.json` beside a .pt file (which has no metadata); none for safetensors files."""
    if plan.writes_folder:
        return plan.output / SIDECAR.lstrip(".")
    return plan.output.with_name(plan.output.name + SIDECAR) if plan.fmt == "pt" else None


def _write_plan(p: Plan, guard: AtomicOutput, sha, folder: bool, progress) -> list[Path]:
    """Make one output: stream its tensors into the temporary, then rename it into place."""
    side = sidecar_path(p)
    with guard as tmp:
        per_encoder = [stream(p.source, e.read, e.ops, e.buffers, e.arch, p.dtype,
                              progress.update if progress is not None else None,
                              {c: (g.source, g.op) for c, g in e.grafts.items()}) for e in p.encoders]
        if p.vision is not None:
            v = p.vision
            vt = stream(v.source, v.read, v.ops, v.buffers, v.arch, p.dtype)
            written = write_full_clip(p, per_encoder[0], vt, tmp, _metadata(p, sha))
        else:
            written = write_output(p, per_encoder, tmp, _metadata(p, sha))
        if side is not None:        # the ledger and provenance, for containers without metadata
            meta = _metadata(p, sha.result() if isinstance(sha, LateValue) else sha)
            record = {k.replace("sdconv.", ""): (json.loads(v) if k in _JSON_META else v) for k, v in meta.items()}
            text = json.dumps(record, indent=1, sort_keys=True) + "\n"
            if folder:
                (tmp / side.name).write_text(text)
                written.append(tmp / side.name)
            else:                   # beside the file: its own temporary, renamed once the file is in place
                pending = side.with_name(f".{side.name}.sdconv-tmp")
                pending.write_text(text)
    if side is not None and not folder:
        try:
            os.replace(pending, side)
        finally:
            pending.unlink(missing_ok=True)
        written.append(side)
    return [p.output / f.relative_to(tmp) if folder else (side if f == side else p.output) for f in written]


_JSON_META = {"sdconv.encoders", "sdconv.notes", "sdconv.ledger", "sdconv.params", "sdconv.arch", "sdconv.options"}


def write_full_clip(plan: Plan, text: TensorStream, vision: TensorStream, tmp: Path, meta: dict) -> list[Path]:
    """A whole CLIP: text and vision tensors in one weights file (plus a config for folders)."""
    v = plan.vision
    tensors = TensorStream.concat([text, vision])
    meta = {**meta, "sdconv.vision_source": Path(v.source.path).name, "sdconv.vision_sha256": v.sha256}
    if v.target.layout.output == "file":
        save_tensors(tensors, tmp, plan.fmt, meta)
        return [tmp]
    weights = tmp / v.target.layout.folder_weights[plan.fmt]
    save_tensors(tensors, weights, plan.fmt, meta)
    files = [weights]
    spec = plan.target.layout.vision.config
    if spec is not None:
        e = plan.encoders[0]
        cfg = tmp / spec.file
        cfg.write_text(configs.WRITERS[spec.format](e.arch_out, e.params, tensors.dominant_dtype(), (v.arch, v.params)))
        files.append(cfg)
    return files


def write_output(plan: Plan, per_encoder: list[TensorStream], tmp: Path, meta: dict) -> list[Path]:
    """Write the encoders' target tensors into `tmp`: one file, or a folder with each slot's
    sub-folder, weights file and config."""
    rl = plan.target
    if rl.layout.output == "file":
        save_tensors(TensorStream.concat(per_encoder), tmp, plan.fmt, meta)
        return [tmp]
    files = []
    for e, tensors in zip(plan.encoders, per_encoder):
        slot = e.slot
        sub = tmp / slot.folder if slot.folder else tmp
        sub.mkdir(parents=True, exist_ok=True)
        strip = len(slot.folder)
        weights = sub / rl.layout.folder_weights[plan.fmt]
        own = {**meta, "sdconv.ledger": json.dumps(_ledger(plan, slot.folder, e), sort_keys=True)}
        save_tensors(tensors.renamed(lambda k: k[strip:]), weights, plan.fmt, own)
        files.append(weights)
        if slot.config is not None:
            cfg = sub / slot.config.file
            cfg.write_text(configs.WRITERS[slot.config.format](e.arch_out, e.params, tensors.dominant_dtype()))
            files.append(cfg)
    return files
