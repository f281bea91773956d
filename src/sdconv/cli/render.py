"""Every line sdconv prints for people: plans (--dry-run), conversion summaries, inspect and
verify reports, batch records. The library returns data; this module turns it into text."""
from __future__ import annotations

from pathlib import Path

from ..options import ENCODER_PARAMS


def describe_plan(plan) -> str:
    """The plan, as --dry-run prints it."""
    lines = [f"input:   {plan.source.path}"]
    lay = plan.read.layout
    how = "given with --from" if plan.verdicts is None else "detected"
    lines.append(f"layout:  {lay.name} ({how}), {lay.layout.description}")
    for v in plan.verdicts or []:
        lines.append(f"  {'matched ' if v.plans is not None else 'rejected'} {v.layout}: {v.reason}")
    lines.append(f"output:  {plan.output or '-'} ({plan.target.name}, {plan.fmt}, dtype {plan.dtype})")
    for e in plan.encoders:
        a = e.arch
        lines.append(f"encoder {e.identity} ({e.identity_origin}), at {e.read.prefix or 'top level'} -> "
                     f"{plan.target.name} {e.slot.name} at {e.slot.prefix or 'top level'}")
        lines.append(f"  architecture: width {a['width']}, layers {a['layers']}, ffn {a['ffn']}, vocab {a['vocab']}, "
                     f"context {a['context']}, projection {a.get('proj') or 'none'}")
        for k in ENCODER_PARAMS:
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
    if plan.vision is not None:
        v = plan.vision
        where = "the input" if v.source is plan.source else v.source.path
        lines.append(f"vision tower from {where} ({v.read.layout.name}): width {v.arch['width']}, "
                     f"layers {v.arch['layers']}, patch {v.arch['patch']}, heads {v.params['heads']}, "
                     f"{v.params['act']}, projection {v.arch['proj']}; {len(v.ops)} tensors")
        for k in ENCODER_PARAMS:
            if k in v.origin:
                lines.append(f"  vision {k} = {v.params[k]}  ({v.origin[k]})")
        for n in v.notes:
            lines.append(f"  note: {n}")
    lines.append(f"bytes: read {plan.bytes_to_read:,}, write {plan.bytes_to_write:,}")
    return "\n".join(lines)


def describe_result(input, res) -> list[tuple[str, bool]]:
    """What a conversion made: (line, whether it is a warning for stderr), in order."""
    how = "detected" if res.plan.verdicts is not None else "--from"
    lines = [(f"{input}: {res.plan.read.layout.name} ({how})", False)]
    for p in res.plans:
        for e in p.encoders:
            a = e.arch
            lines.append((f"  {e.identity}: width {a['width']}, {a['layers']} layers, heads {e.params['heads']}, "
                          f"{e.params['act']}, projection {a.get('proj') or 'none'}", False))
        for e in p.encoders:
            lines += [(warning(w), True) for w in e.warnings]
            lines += [(f"  repaired: {r}", False) for r in e.repairs]
        lines += [(f"  note: {note}", False) for note in p.notes]
        n = sum(len(e.ops) + len(e.buffers) for e in p.encoders)
        lines.append((f"wrote {p.output} ({p.target.name}, {p.fmt}, {n} tensors, {p.bytes_to_write / 1e6:.1f} MB)",
                      False))
    return lines


def warning(text: str, input=None) -> str:
    return f"sdconv: warning: {input}: {text}" if input is not None else f"sdconv: warning: {text}"


def describe_write_back(into, output, records: dict, planned: bool = False) -> list[str]:
    """What a write-back did (or, planned, would do)."""
    verb = "would replace" if planned else "replaced"
    lines = [f"{verb} {slot} in {into} at {r['prefix']}: {r['removed']} tensors out, {r['written']} in; "
             f"everything else copied byte for byte" for slot, r in records.items()]
    return lines + [f"{'would write' if planned else 'wrote'} {output}"]


def describe_record(rec) -> str:
    """One batch input's line."""
    what = ", ".join(rec.outputs) if rec.outputs else (rec.error or rec.reason)
    return f"{rec.status:<9} {rec.input} -> {what}"


def describe_sample(output, layout, preset, seed, info: dict) -> str:
    v = info.get("vision")
    what = (f"{layout} whole CLIP sample (text and vision towers)" if v else f"{layout} sample")
    vision = f"; vision heads {v['heads']}, {v['act']}, {v['image']} px images" if v else ""
    return (f"wrote {output}: {what}, preset {preset} ({info['tensors']} tensors, "
            f"heads {info['params']['heads']}, {info['params']['act']}{vision}), random weights, seed {seed}")


def render_fingerprints(records: list, groups: list | None) -> str:
    """`sdconv fingerprint` without --json: a line per encoder, then the groups of equal ones."""
    lines = [f"{r['digest']}  {r['file']} ({r['encoder']}, {r['layout']}, {r['tensors']} tensors, "
             + ", ".join(f"{k} x{v}" for k, v in sorted(r["dtypes"].items())) + ")" for r in records]
    if groups is not None:
        same = [g for g in groups if g["count"] > 1]
        lines.append(f"{len(groups)} distinct encoder(s) among {len(records)}"
                     + "".join(f"\n  same weights: {', '.join(g['members'])}" for g in same))
    return "\n".join(lines)


def render_lora(report: dict) -> str:
    """`sdconv inspect LORA` without --json."""
    lo = report["lora"]
    lines = [f"{report['file']}: a {lo['format']} LoRA, {lo['bytes'] / 1e6:,.1f} MB"]
    for prefix, p in lo["encoders"].items():
        kinds = " or ".join(p["kinds"]) or "the model's only encoder"
        blocks = f"blocks {p['blocks'][0]}-{p['blocks'][-1]}" if p["blocks"] else "no blocks"
        lines.append(f"  {prefix}: adapts {kinds}: {p['modules']} modules ({', '.join(p['targets'])}), {blocks}, "
                     f"rank {'/'.join(map(str, p['ranks']))}, alpha {'/'.join(f'{a:g}' for a in p['alphas'])}")
    lines.append(f"  UNet keys: {lo['unet_keys']} (ignored by sdconv)")
    return "\n".join(lines)


def render_inspect(report: dict) -> str:
    """`sdconv inspect` without --json."""
    if "lora" in report:
        return render_lora(report)
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
    v = report.get("vision")
    if v:
        o = v["param_origin"]
        lines.append(f"vision tower ({v['layout']}): ViT, width {v['width']}, layers {v['layers']}, ffn {v['ffn']}, "
                     f"heads {v['heads']} ({o['heads']}), {v['act']} ({o['act']})")
        lines.append(f"  image {v['image_size']}, patch {v['patch_size']}, {v['channels']} channels, projection "
                     f"{v['projection_dim']}; {v['parameters']:,} parameters, {mb(v['bytes'])}, dtypes "
                     + ", ".join(f"{k} x{n}" for k, n in sorted(v["dtypes"].items())))
        if v["logit_scale"] is not None:        # the pair's (a CLIPModel's text part cannot hold it)
            lines.append(f"  logit_scale: {round(v['logit_scale'], 4)}")
        for n in v["notes"]:
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


def render_verify(r: dict) -> str:
    """`sdconv verify` without --json."""
    lines = []
    for side in ("a", "b"):
        s = r[side]
        lines.append(f"{side}: {s['file']} ({s['layout']}, {s['encoder']}, heads {s['params']['heads']}, "
                     f"{s['params']['act']}, {', '.join(f'{k} x{v}' for k, v in sorted(s['dtypes'].items()))})")
        for x in s["synthetic"]:
            lines.append(f"  SYNTHETIC? {x}")
    w = r["weights"]
    if not w["same_shapes"]:
        lines.append(f"different shapes: {', '.join(w['shape_differences'])}")
    for who, names in w.get("only", {}).items():
        if names:
            lines.append(f"only in {who}: {', '.join(names)}")
    if r.get("probes"):
        lines.append(f"{'probe':<16} {'last hidden cos / max-abs':>28} {'pooled cos / max-abs':>26} "
                     f"{'projected cos / max-abs':>26}")
        for p in r["probes"]:
            cells = []
            for out in ("last_hidden", "pooled", "projected"):
                c = p.get(out)
                cells.append(f"{c['cosine']:.8f} / {c['max_abs']:.2e}" if c else "-")
            lines.append(f"{p['name'][:16]:<16} {cells[0]:>28} {cells[1]:>26} {cells[2]:>26}")
    if w.get("same_shapes") and not w.get("identical"):
        parts = sorted(w["parts"], key=lambda x: -x["relative_drift"])
        lines.append("relative weight drift by part (largest first):")
        for p in parts[:8]:
            lines.append(f"  {p['part']:<16} {p['relative_drift']:.3e}")
    lines.append(f"verdict: {r['verdict']}" + (f" (outputs differ by at most {r['max_abs']:.2e})"
                                               if "max_abs" in r else ""))
    return "\n".join(lines)
