"""The conversion API that the CLI drives: plan() then convert().

container -> layout -> canonical -> layout -> container, with every decision recorded in a
Plan that --dry-run prints and the output's metadata keeps.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from . import configs
from .containers import AtomicOutput, Source, format_for, open_source, save_tensors, sha256_of, torch_dtype_code, dominant_dtype
from .detect import Verdict, detect
from .errors import LayoutError, OutputError, UsageError
from .execute import DTYPES, run
from .plan import BufferOp, ReadPlan, WriteOp, infer_arch, plan_read, plan_write, resolve_params
from .registry import DEFAULT, Registry, ResolvedLayout

FORMATS = ("safetensors", "pt")
DTYPE_CHOICES = ("keep", *DTYPES)
_DTYPE_CODE = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


@dataclass
class Plan:
    source: Source
    read: ReadPlan
    target: ResolvedLayout
    ops: list[WriteOp]
    buffers: list[BufferOp]
    arch: dict
    params: dict
    param_origin: dict
    fmt: str
    dtype: str
    verdicts: list[Verdict] | None = None       # detection results (None with --from)
    notes: list[str] = field(default_factory=list)

    @property
    def target_slot(self):
        return next(iter(self.target.layout.slots.values()))

    def out_dtype(self, code: str) -> str:
        return _DTYPE_CODE.get(self.dtype, code) if code.startswith(("F", "BF")) else code

    @property
    def bytes_to_write(self) -> int:
        size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
        total = 0
        for op in self.ops:
            code = self.out_dtype(self.read.dtypes[op.canonical[0]])
            for s in op.shapes:
                n = 1
                for d in s:
                    n *= d
                total += n * size.get(code, 4)
        return total + sum(8 * self._numel(b.shape) for b in self.buffers)

    def _numel(self, shape):
        n = 1
        for s in shape:
            n *= self.arch[s] if isinstance(s, str) else s
        return n

    def describe(self) -> str:
        """The human-readable plan (--dry-run)."""
        r = self.read
        a = self.arch
        lines = []
        how = "given with --from" if self.verdicts is None else "detected"
        lines.append(f"input:   {self.source.path}")
        lines.append(f"layout:  {r.layout.name} ({how}), {r.layout.layout.description}")
        if self.verdicts:
            for v in self.verdicts:
                mark = "matched " if v.plan is not None else "rejected"
                lines.append(f"  {mark} {v.layout}: {v.reason}")
        lines.append(f"architecture: width {a['width']}, layers {a['layers']}, ffn {a['ffn']}, vocab {a['vocab']}, "
                     f"context {a['context']}, projection {a.get('proj') or 'none'}")
        for k in ("heads", "act"):
            lines.append(f"  {k} = {self.params[k]}  ({self.param_origin[k]})")
        lines.append(f"target:  {self.target.name} ({self.fmt}, dtype {self.dtype})")
        lines.append("tensors (canonical <- source [transform] -> target):")
        for op in self.ops:
            srcs = []
            for c in op.canonical:
                rop = r.op_for(c)
                srcs.append(rop.keys[0] + ("" if rop.transform == "rename" else f" [{rop.transform}]"))
            t = "" if op.transform == "rename" else f" [inverse of {op.transform}]"
            lines.append(f"  {', '.join(op.canonical)} <- {', '.join(dict.fromkeys(srcs))} -> {', '.join(op.keys)}{t}")
        for b in self.buffers:
            lines.append(f"  {b.key} <- synthesized ({b.synthesize}, int64)")
        for n in r.notes + self.notes:
            lines.append(f"note: {n}")
        lines.append(f"bytes: read {r.bytes_to_read:,}, write {self.bytes_to_write:,}")
        return "\n".join(lines)


def _parse_params(params) -> dict:
    out = {}
    for k, v in (params or {}).items():
        if k not in ("heads", "act"):
            raise UsageError(f"unknown parameter {k!r}", "known: heads, act")
        out[k] = v
    return out


def _input_params(source: Source, rp: ReadPlan, arch: dict):
    """heads/act the input states itself: its config file, or sdconv's own metadata."""
    cfg_spec = rp.slot.config
    if cfg_spec is not None:
        cfg = source.read_json(rp.folder + cfg_spec.file)
        if cfg is not None:
            got = configs.READERS[cfg_spec.format](cfg)
            notes = [f"{rp.folder + cfg_spec.file} says {k} = {v}, the weights say {arch[k]}"
                     for k, v in got["declared"].items() if k in arch and arch[k] != v]
            return got["params"], f"{rp.folder + cfg_spec.file}", notes
    meta = source.metadata().get("sdconv.params")
    if meta:
        try:
            return {k: v for k, v in json.loads(meta).items() if k in ("heads", "act")}, "input metadata", []
        except ValueError:
            pass
    return {}, "", []


def make_plan(input, to: str, from_: str | None = None, params=None, fmt: str | None = None,
              dtype: str = "keep", output=None, registry: Registry = DEFAULT) -> Plan:
    if dtype not in DTYPE_CHOICES:
        raise UsageError(f"unknown dtype {dtype!r}", f"choose one of {', '.join(DTYPE_CHOICES)}")
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", f"choose one of {', '.join(FORMATS)}")
    given = _parse_params(params)
    target = registry.layout(to)
    src_layout = registry.layout(from_) if from_ else None      # unknown names fail before reading
    source = open_source(input)
    verdicts = None
    if src_layout is not None:
        slot = next(iter(src_layout.layout.slots.values()))
        try:
            rp = plan_read(source, src_layout, slot)
        except LayoutError as e:
            hint = "check --from"
            try:
                found, _ = detect(source, registry)
                hint = f"it looks like {found.layout.name}: use --from {found.layout.name} or --from auto"
            except LayoutError:
                pass
            raise LayoutError(f"--from {from_}: {e.message}", hint)
    else:
        rp, verdicts = detect(source, registry)
    where = f"{source.path} ({rp.layout.name}): "
    arch = infer_arch(rp.layout.family, rp.shapes, rp.layers, where)
    from_input, origin, cfg_notes = _input_params(source, rp, arch)
    pr, po = resolve_params(rp.layout.family, rp.slot, arch, given, from_input, origin)
    if target.family.name != rp.layout.family.name:
        raise UsageError(f"{to} holds a {target.family.name} model, the input a {rp.layout.family.name} one")
    tslot = next(iter(target.layout.slots.values()))
    ops, buffers, notes = plan_write(target, tslot, rp.shapes, rp.layers, str(source.path))
    if output is not None and fmt is None:
        fmt = "safetensors" if target.layout.output == "folder" else format_for(Path(output), None)
    return Plan(source, rp, target, ops, buffers, arch, pr, po, fmt or "safetensors", dtype, verdicts,
                cfg_notes + notes)


def _check_output(plan: Plan, output: Path):
    inp = Path(plan.source.path).resolve()
    out = output.resolve()
    if out == inp or (output.exists() and os.path.samefile(output, inp)):
        raise OutputError(f"{output} is the input", "choose another output path; sdconv never writes over its input")
    if inp.is_dir() and inp in out.parents:
        raise OutputError(f"{output} is inside the input folder {inp}", "write the output somewhere else")
    if any(out == f.resolve() for f in plan.source.files()):
        raise OutputError(f"{output} is one of the input's files", "choose another output path")


def _metadata(plan: Plan, sha: str) -> dict:
    return {
        "format": "pt",
        "sdconv.version": __version__,
        "sdconv.source": Path(plan.source.path).name,
        "sdconv.source_sha256": sha,
        "sdconv.from": plan.read.layout.name,
        "sdconv.to": plan.target.name,
        "sdconv.params": json.dumps(plan.params, sort_keys=True),
        "sdconv.arch": json.dumps(plan.arch, sort_keys=True),
        "sdconv.notes": json.dumps(plan.read.notes + plan.notes),
    }


@dataclass
class Result:
    plan: Plan
    output: Path
    files: list[Path]
    source_sha256: str


def convert(input, output, to: str, from_: str | None = None, params=None, fmt: str | None = None,
            dtype: str = "keep", force: bool = False, registry: Registry = DEFAULT, progress=None) -> Result:
    """Convert the text encoder in `input` to layout `to`, written at `output` atomically.

    `progress`, if given, is a tqdm-like bar: reset(total=bytes) once, then update(bytes)."""
    output = Path(output)
    plan = make_plan(input, to, from_, params, fmt, dtype, output, registry)
    _check_output(plan, output)
    folder = plan.target.layout.output == "folder"
    with AtomicOutput(output, folder, force) as tmp:      # refuses an existing output early
        sha = sha256_of(plan.source.files())
        if progress is not None:
            progress.reset(total=plan.bytes_to_write)
        tensors = run(plan.source, plan.read, plan.ops, plan.buffers, plan.arch, plan.dtype,
                      progress.update if progress is not None else None)
        meta = _metadata(plan, sha)
        files = write_output(plan.target, plan.target_slot, tensors, tmp, plan.fmt, meta, plan.arch, plan.params)
    return Result(plan, output, [output / f.relative_to(tmp) if folder else output for f in files], sha)


def write_output(rl: ResolvedLayout, slot, tensors: dict, tmp: Path, fmt: str, meta: dict, arch: dict,
                 params: dict) -> list[Path]:
    """Write target-layout tensors into `tmp`: one file, or a folder with the slot's sub-folder,
    weights file and config."""
    if rl.layout.output == "file":
        save_tensors(tensors, tmp, fmt, meta)
        return [tmp]
    sub = tmp / slot.folder if slot.folder else tmp
    sub.mkdir(parents=True, exist_ok=True)
    strip = len(slot.folder)
    weights = sub / rl.layout.folder_weights[fmt]
    save_tensors({k[strip:]: v for k, v in tensors.items()}, weights, fmt, meta)
    files = [weights]
    if slot.config is not None:
        cfg = sub / slot.config.file
        cfg.write_text(configs.WRITERS[slot.config.format](arch, params, torch_dtype_code(dominant_dtype(tensors))))
        files.append(cfg)
    return files
