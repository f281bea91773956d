"""`sdconv inspect`: what a checkpoint holds, read from headers and a few small tensors.

On a .safetensors file nothing here imports torch: shapes come from the header, and the few
values looked at (position_ids, logit_scale, whether a projection is an identity) are decoded
from their raw bytes.
"""
from __future__ import annotations

import math
from pathlib import Path

from .converters import metakeys, untrusted
from .converters.analyse import analyse, read_input
from .converters.registry import DEFAULT, Registry
from .converters.configs import image_geometry
from .converters.vision import holds_vision, read_vision
from .errors import LayoutError, MalformedInputError, SdconvError
from .converters.synthetic import findings, position_ids_health, projection_look, scalar

INSPECT_VERSION = 1
REMOTE_NOTE = ("a remote input: its header and a few scalars were read, not its weights; the checks that read "
               "weights (an identity projection, copied blocks) run when it is converted")


def _architecture(family, arch: dict) -> str:
    k = family.kind_by_width(arch["width"])
    if k and arch["layers"] in (k.layers, k.layers - 1) and arch["ffn"] == 4 * arch["width"]:
        return k.title
    return "custom"


def _match(key: str, patterns) -> bool:
    return any(key.startswith(p) if p.endswith(".") else key == p for p in patterns)


def _lora(input, from_, registry) -> dict | None:
    """The description of a LoRA file, or None if no LoRA format reads it either."""
    from .converters.lora import describe
    if from_ is not None:
        return None
    try:
        return describe(input, registry)
    except LayoutError:
        return None


def inspect(input, from_: str | None = None, *, registry: Registry = DEFAULT) -> dict:
    """What `input` holds, as a dict (the stable JSON of `sdconv inspect --json`; see
    docs/inspect-and-verify.md): its layout and the candidates tried, each encoder's architecture,
    parameters, dtypes, projection, logit_scale, position_ids health and synthetic-looking parts,
    the other components of the checkpoint, its metadata and the summary of an sdconv ledger."""
    try:
        source, reads, verdicts = read_input(input, from_, {}, registry)
    except LayoutError as e:        # no checkpoint layout: a LoRA file?
        lora = _lora(input, from_, registry)
        if lora is None:
            raise e
        return {"inspect_version": INSPECT_VERSION, "file": str(input), "lora": lora}
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
        if source.costly_reads:     # the projection's key from the plan, its weights unread
            look = next(((op.keys[0], "not read") for op in rp.ops if "text_proj.weight" in op.canonical), None)
        else:
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
            "synthetic": [] if source.costly_reads else findings(source, rp),
            "notes": rp.notes + f.notes + f.warnings + ([REMOTE_NOTE] if source.costly_reads else []),
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
    file_notes: list[str] = []
    vision = _vision(source, found[0], registry, file_notes)
    ledger = _ledger_summary(source, reads[0].folder, file_notes)
    for e in encoders:              # a note of the file is each encoder's
        e["notes"] += file_notes
    size = source.size_bytes()
    return {
        "inspect_version": INSPECT_VERSION,
        "file": str(source.path), "container": source.kind(), "size_bytes": size,
        "layout": reads[0].layout.name, "detected": verdicts is not None,
        "candidates": [{"layout": v.layout, "matched": v.plans is not None, "reason": v.reason}
                       for v in (verdicts or [])],
        "encoders": encoders,
        "vision": vision,
        "components": components,
        "metadata": source.metadata(reads[0].folder),
        "ledger": ledger,
    }


def _vision(source, text, registry: Registry, notes: list) -> dict | None:
    """The vision tower of a whole CLIP (None when the input holds none); one that cannot be
    read as a ViT tower is a note of the file."""
    if not holds_vision(source, text, registry):
        return None
    try:
        v = read_vision(source, text, registry, str(source.path))
    except SdconvError as e:
        notes.append(f"its vision tower is not read: {e.message}")
        return None
    a = v.arch
    infos = [source.info(k) for op in v.read.ops for k in op.keys]
    image, patch = image_geometry(a)
    return {"layout": v.layout.name, "width": a["width"], "layers": a["layers"], "ffn": a["ffn"],
            "heads": v.params["heads"], "act": v.params["act"], "param_origin": v.origin,
            "patch_size": patch, "image_size": image, "channels": a["channels"], "projection_dim": a["proj"],
            "dtypes": {d: sum(i.dtype == d for i in infos) for d in sorted({i.dtype for i in infos})},
            "parameters": sum(math.prod(i.shape) for i in infos), "bytes": sum(i.nbytes for i in infos),
            "logit_scale": scalar(source, v.read, "logit_scale"), "notes": v.read.notes + v.notes}


def _ledger_summary(source, folder: str, notes: list) -> dict | None:
    """What an sdconv output says of its own tensors: counts by origin, repairs, grafts. The
    ledger is an optional record: a malformed one is ignored, with a note."""
    return untrusted.ignoring(notes, "its sdconv ledger", lambda: ledger_summary(source, folder))


def ledger_summary(source, folder: str) -> dict | None:
    """The summary of the ledger in `source`'s metadata or sidecar; MalformedInputError if it
    is not what sdconv writes."""
    raw = source.metadata(folder).get(metakeys.LEDGER)
    ledger = untrusted.parse_json(raw, f"{source.path} metadata {metakeys.LEDGER}") if raw else None
    if ledger is None:
        side = Path(str(source.path) + metakeys.SIDECAR_SUFFIX)
        if source.is_folder:
            side = Path(source.path) / metakeys.SIDECAR_IN_FOLDER
        if side.exists():
            try:
                ledger = untrusted.read_json(side).obj().get(metakeys.sidecar_key(metakeys.LEDGER))
            except OSError as e:
                raise MalformedInputError(f"{side}: unreadable ({e.strerror or e})")
    if ledger is None or not ledger.obj().size():
        return None
    origins: dict = {}
    grafted = set()
    tensors = ledger.get("tensors")
    for _, entry in tensors.items() if tensors is not None else ():
        origin = entry.obj()["origin"].text(most=64)
        origins[origin] = origins.get(origin, 0) + 1
        if origin == "grafted":
            grafted.add(f"{entry['file'].text()}:{entry['key'].text()}")

    def strings(name: str) -> list[str]:
        v = ledger.get(name)
        return v.strings() if v is not None else []
    return {"origins": origins, "repairs": strings("repairs"), "grafted": sorted(grafted),
            "warnings": strings("warnings")}
