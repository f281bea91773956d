"""Provenance: where every output tensor comes from (the ledger), and the metadata an output
carries (source, sha256, layouts, encoders, notes). Containers without metadata (torch .pt
files, folders of several files) get the same record as a JSON sidecar."""
from __future__ import annotations

import json
from pathlib import Path

from ..version import __version__
from . import metakeys as K
from .hashing import LateValue
from .conversion import EncoderPlan, Plan


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
        merged = [{"file": lf.name, "scale": lf.scale, "adapts": c, "keys": [d[c].down, d[c].up],
                   "alpha": d[c].alpha, "rank": d[c].rank} for c in op.canonical for lf, d in e.loras if c in d]
        for key in op.keys:
            if graft is not None:
                out[key] = {"origin": "grafted", **graft.record()}
            else:
                entry = {"origin": "checkpoint", "source": srcs, "transform": " then ".join(steps) or "rename"}
                if repaired:
                    entry["repaired"] = repaired[0]
                out[key] = entry
            if merged:
                out[key]["lora"] = merged
    for b in e.buffers:
        fixed = [r for r in e.repairs if r.startswith(f"{b.name}:")]
        out[b.key] = {"origin": "repaired" if fixed else "synthesized", "what": f"int64 {b.synthesize}",
                      "why": fixed[0] if fixed else f"{b.name} are rebuilt, never copied (merges corrupt them)"}
    return out


def ledger(plan: Plan, strip: str = "", only: EncoderPlan | None = None) -> dict:
    tensors = {}
    for e in plan.encoders:
        if only is None or e is only:
            tensors.update({k[len(strip):] if strip and k.startswith(strip) else k: v
                            for k, v in encoder_ledger(e).items()})
    if plan.vision is not None and only is None:
        v = plan.vision
        for op in v.ops:
            rops = [v.read.op_for(c) for c in op.canonical]
            if v.source is plan.source:         # a whole CLIP's own tower (--whole-clip)
                steps = [*dict.fromkeys(r.transform for r in rops if r.transform != "rename"),
                         *([f"inverse of {op.transform}"] if op.transform != "rename" else [])]
                entry = {"origin": "checkpoint", "source": list(dict.fromkeys(k for r in rops for k in r.keys)),
                         "transform": " then ".join(steps) or "rename"}
            else:       # (a fused key is named once per tensor it holds, as outputs have always said)
                entry = {"origin": "reference", "file": Path(v.source.path).name, "sha256": v.sha256,
                         "source": [k for r in rops for k in r.keys]}
            tensors.update({key: entry for key in op.keys})
    return {"version": LEDGER_VERSION, "tensors": tensors,
            "repairs": [r for e in plan.encoders if only is None or e is only for r in e.repairs],
            "warnings": [w for e in plan.encoders if only is None or e is only for w in e.warnings]}


def metadata(plan: Plan, sha) -> dict:
    """The output's metadata; `sha` is the source's sha256, or a LateValue computing it."""
    meta = {
        K.FORMAT: K.FORMAT_PT,
        K.VERSION: __version__,
        K.SOURCE: Path(plan.source.path).name,
        K.SOURCE_SHA256: sha,
        **plan.source.provenance(),
        K.FROM: plan.read.layout.name,
        K.TO: plan.target.name,
        K.ENCODERS: json.dumps({e.identity: {"slot": e.slot.name, "params": e.params, "arch": e.arch_out,
                                                    "absent_last_blocks": e.absent_last,
                                                    "grafted": {c: g.record() for c, g in e.grafts.items()}}
                                       for e in plan.encoders}, sort_keys=True),
        K.NOTES: json.dumps(plan.notes),
        K.LEDGER: json.dumps(ledger(plan), sort_keys=True),
    }
    if plan.options is not None:
        meta[K.OPTIONS] = json.dumps(plan.options, sort_keys=True)
    if any(e.loras for e in plan.encoders):
        meta[K.LORAS] = json.dumps(loras_record(plan), sort_keys=True)
    if len(plan.encoders) == 1:
        e = plan.encoders[0]
        meta.update({K.ENCODER: e.identity, K.PARAMS: json.dumps(e.params, sort_keys=True),
                     K.ARCH: json.dumps(e.arch_out, sort_keys=True)})
    return meta


def loras_record(plan: Plan) -> list[dict]:
    """Each LoRA merged, in order: file, sha256, format, scale, how many matrices of each encoder it changed."""
    files: dict = {}
    for e in plan.encoders:
        for lf, d in e.loras:
            files.setdefault(id(lf), (lf, {}))[1][e.identity] = sorted(d)
    return [lf.record(changed) for lf, changed in files.values()]


def slot_metadata(plan: Plan, e: EncoderPlan, meta: dict) -> dict:
    """A folder layout's per-encoder weights file: the output's metadata, with the ledger of
    this encoder's tensors alone, named as the file holds them (without the sub-folder)."""
    return {**meta, K.LEDGER: json.dumps(ledger(plan, e.slot.folder, e), sort_keys=True)}


def whole_clip_metadata(plan: Plan, meta: dict) -> dict:
    """A whole CLIP's weights file also names the vision tower's source."""
    v = plan.vision
    return {**meta, K.VISION_SOURCE: Path(v.source.path).name, K.VISION_SHA256: v.sha256}


def sidecar_path(plan: Plan) -> Path | None:
    """Where the ledger goes besides the metadata: `OUTPUT/sdconv.json` for folders,
    `OUTPUT.sdconv.json` beside a .pt file (which has no metadata); none for safetensors files."""
    if plan.writes_folder:
        return plan.output / K.SIDECAR_IN_FOLDER
    return plan.output.with_name(plan.output.name + K.SIDECAR_SUFFIX) if plan.fmt == "pt" else None


def sidecar_text(meta: dict) -> str:
    """The sidecar: the metadata with its JSON values decoded, keys without the `sdconv.` prefix."""
    meta = {k: (v.result() if isinstance(v, LateValue) else v) for k, v in meta.items()}
    record = {K.sidecar_key(k): (json.loads(v) if k in K.JSON_VALUED else v) for k, v in meta.items()}
    return json.dumps(record, indent=1, sort_keys=True) + "\n"
