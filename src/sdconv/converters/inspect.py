"""`sdconv inspect`: what a checkpoint holds, read from headers and a few small tensors.

On a .safetensors file nothing here imports torch: shapes come from the header, and the few
values looked at (position_ids, logit_scale, whether a projection is an identity) are decoded
from their raw bytes.
"""
from __future__ import annotations

import struct
from pathlib import Path

from .registry import DEFAULT, Registry
from .synthetic import findings, position_ids_health, projection_look, scalar

INSPECT_VERSION = 1
def _architecture(family, arch: dict) -> str:
    k = family.kind_by_width(arch["width"])
    if k and arch["layers"] in (k.layers, k.layers - 1) and arch["ffn"] == 4 * arch["width"]:
        return k.title
    return "custom"


def _match(key: str, patterns) -> bool:
    return any(key.startswith(p) if p.endswith(".") else key == p for p in patterns)


def inspect(input, from_: str | None = None, registry: Registry = DEFAULT) -> dict:
    from .engine import analyse, read_input

    source, reads, verdicts = read_input(input, from_, {}, registry)
    found = analyse(source, reads, {})
    family = reads[0].layout.family
    layout = reads[0].layout.layout
    encoders = []
    claimed: set[str] = set()
    for f in found:
        rp = f.read
        claimed.update(rp.keys)
        keys = [k for op in rp.ops for k in op.keys]
        infos = [source.info(k) for k in keys]
        dtypes: dict = {}
        for i in infos:
            dtypes[i.dtype] = dtypes.get(i.dtype, 0) + 1
        params = 0
        for i in infos:
            n = 1
            for d in i.shape:
                n *= d
            params += n
        proj = {"present": False}
        look = projection_look(source, rp)
        if look is not None:
            proj = {"present": True, "dim": f.arch.get("proj"), "key": look[0], "looks_like": look[1]}
        logit = scalar(source, rp, "logit_scale")
        pid = {"status": "absent"}
        if "position_ids" in rp.buffers:
            k = rp.buffers["position_ids"]
            info = source.info(k)
            pid = {"key": k, **position_ids_health(source.raw(k), info.dtype, f.arch["context"])}
        a = f.arch
        encoders.append({
            "encoder": f.identity, "slot": rp.slot.name, "prefix": rp.prefix,
            "architecture": _architecture(family, a),
            "width": a["width"], "layers": a["layers"], "ffn": a["ffn"], "vocab": a["vocab"], "context": a["context"],
            "heads": f.params["heads"], "act": f.params["act"],
            "param_origin": f.param_origin, "absent_last_blocks": f.absent_last,
            "dtypes": dtypes, "parameters": params, "bytes": sum(i.nbytes for i in infos),
            "projection": proj, "logit_scale": logit, "position_ids": pid,
            "synthetic": findings(source, rp),
            "notes": rp.notes + f.notes,
        })
    components: dict = {}
    for k in source.keys():
        if k in claimed:
            continue
        name = next((c for c, pats in layout.components.items() if _match(k, pats)), None)
        if name is None:
            name = "ignored" if _match(k, layout.ignore) else "unknown"
        c = components.setdefault(name, {"tensors": 0, "bytes": 0})
        c["tensors"] += 1
        c["bytes"] += source.info(k).nbytes
        if name == "unknown" and len(c.setdefault("examples", [])) < 5:
            c["examples"].append(k)
    path = Path(source.path)
    size = sum(p.stat().st_size for p in source.files())
    return {
        "inspect_version": INSPECT_VERSION,
        "file": str(path), "container": source.kind(), "size_bytes": size,
        "layout": reads[0].layout.name, "detected": verdicts is not None,
        "candidates": [{"layout": v.layout, "matched": v.plans is not None, "reason": v.reason}
                       for v in (verdicts or [])],
        "encoders": encoders,
        "components": components,
        "metadata": source.metadata(reads[0].folder),
        "ledger": _ledger_summary(source, reads[0].folder),
    }


def _ledger_summary(source, folder: str) -> dict | None:
    """What an sdconv output says of its own tensors: counts by origin, repairs, grafts."""
    import json
    raw = source.metadata(folder).get("sdconv.ledger")
    ledger = json.loads(raw) if raw else None
    if ledger is None:
        side = Path(str(source.path) + ".sdconv.json")
        if source.is_folder:
            side = Path(source.path) / "sdconv.json"
        if side.is_file():
            ledger = json.loads(side.read_text()).get("ledger")
    if not ledger:
        return None
    origins: dict = {}
    for entry in ledger.get("tensors", {}).values():
        origins[entry["origin"]] = origins.get(entry["origin"], 0) + 1
    grafted = sorted({f"{e['file']}:{e['key']}" for e in ledger["tensors"].values() if e["origin"] == "grafted"})
    return {"origins": origins, "repairs": ledger.get("repairs", []), "grafted": grafted,
            "warnings": ledger.get("warnings", [])}


def render(report: dict) -> str:
    """The human-readable form."""
    mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
    lines = [f"{report['file']}: {report['container']}, {mb(report['size_bytes'])}",
             f"layout: {report['layout']} ({'detected' if report['detected'] else 'given with --from'})"]
    for c in report["candidates"]:
        lines.append(f"  {'matched ' if c['matched'] else 'rejected'} {c['layout']}: {c['reason']}")
    for e in report["encoders"]:
        lines.append(f"encoder {e['encoder']} ({e['architecture']}) at {e['prefix'] or 'top level'}")
        lines.append(f"  width {e['width']}, layers {e['layers']}, ffn {e['ffn']}, heads {e['heads']}, {e['act']}, "
                     f"vocab {e['vocab']}, context {e['context']}")
        lines.append(f"  {e['parameters']:,} parameters, {mb(e['bytes'])}, dtypes "
                     + ", ".join(f"{k} x{v}" for k, v in sorted(e["dtypes"].items())))
        p = e["projection"]
        lines.append(f"  projection: {'none' if not p['present'] else str(p['dim']) + ' (' + p['looks_like'] + ')'}")
        lines.append(f"  logit_scale: {'none' if e['logit_scale'] is None else round(e['logit_scale'], 4)}")
        pid = e["position_ids"]
        extra = f", wrong at {pid['bad_indices'][:10]}" if pid.get("bad_indices") else ""
        if pid["status"] in ("drifted", "corrupt"):
            extra += " (convert with --fix-position-ids to repair)"
        lines.append(f"  position_ids: {pid['status']}{' (' + pid['dtype'] + ')' if 'dtype' in pid else ''}{extra}")
        for n in e["synthetic"]:
            lines.append(f"  SYNTHETIC? {n}")
        for n in e["notes"]:
            lines.append(f"  note: {n}")
    led = report.get("ledger")
    if led:
        lines.append("sdconv ledger: " + ", ".join(f"{n} {k}" for k, n in sorted(led["origins"].items())))
        for g in led["grafted"]:
            lines.append(f"  grafted from {g}")
        for r in led["repairs"]:
            lines.append(f"  repaired: {r}")
    if report["components"]:
        lines.append("other components:")
        for name, c in sorted(report["components"].items()):
            ex = f" (e.g. {', '.join(c['examples'][:3])})" if c.get("examples") else ""
            lines.append(f"  {name}: {c['tensors']} tensors, {mb(c['bytes'])}{ex}")
    return "\n".join(lines)
