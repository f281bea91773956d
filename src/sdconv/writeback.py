"""Write an encoder back into a full checkpoint (`sdconv convert ENC --to ldm --into CKPT -o NEW`).

Every tensor of the checkpoint that is not the replaced encoder's is copied byte for byte, its
metadata kept as it was (sdconv adds its own keys); the new encoder is written where the old one
was (the checkpoint's own prefix: a refiner's bigG stays at embedders.0). The output is streamed,
so memory follows the largest tensor, not the checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .converters import leases, metakeys
from .converters.atomic import AtomicOutput, refuse_overlap
from .converters.conversion import Plan
from .converters.detect import read_layout
from .converters.engine import make_plans
from .converters.execute import stream
from .converters.folders import open_source
from .converters.leases import Snapshot
from .converters.arch import infer_arch
from .converters.plan import plan_write
from .converters.registry import DEFAULT, Registry
from .converters.stream import Entry, TensorStream
from .converters.writers import save_tensors
from .errors import LayoutError, UsageError
from .options import ConvertOptions

ARCH_KEYS = ("width", "layers", "ffn", "vocab", "context", "proj")


@dataclass
class WriteBack:
    """A planned write-back: the encoder plan, the checkpoint, and per slot what is replaced."""
    plan: Plan
    checkpoint: Path
    output: Path
    force: bool
    records: dict                   # slot -> {from, prefix, removed, written}
    kept: list                      # the checkpoint's keys copied as they are
    streams: list                   # the new encoders' tensors, made when written
    source: object                  # the checkpoint, opened


def plan_write_back(input, checkpoint, output, options: ConvertOptions | None = None, *,
                    registry: Registry = DEFAULT, **fields) -> WriteBack:
    """Check and plan writing the encoder(s) of `input` into a copy of the full checkpoint
    `checkpoint` (layout `options.to`: ldm, sgm or sd3) as `output`; nothing is written."""
    o = ConvertOptions.of(options, fields)
    output, checkpoint = Path(output), Path(checkpoint)
    if output.suffix != ".safetensors":
        raise UsageError("--into writes a .safetensors checkpoint", f"name the output {output.stem}.safetensors")
    to = o.to
    plans = make_plans(input, o.replace(fmt="safetensors", dtype="keep", encoder=o.encoder or "all", with_vision=None,
                                        whole_clip=False, force_activation=False),
                       registry=registry)
    if len(plans) != 1:
        raise UsageError(f"{to} cannot hold these encoders together")
    plan = plans[0]
    refuse_overlap(output, [*plan.inputs(), checkpoint])
    ck = open_source(checkpoint)
    if ck.is_folder:
        raise UsageError(f"--into {checkpoint}: a folder; write-back needs a single-file checkpoint")
    try:
        present = {rp.slot.name: rp for rp in read_layout(ck, plan.target)}
    except LayoutError as e:
        raise LayoutError(f"--into {checkpoint}: not a {to} checkpoint ({e.message})", "check --to")

    removed, streams, records = set(), [], {}
    for e in plan.encoders:
        old = present.get(e.slot.name)
        if old is None:
            raise LayoutError(f"--into {checkpoint}: it holds no {e.slot.name} encoder (it holds "
                              f"{', '.join(present) or 'none'})", "choose --encoder, or another checkpoint")
        old_arch = infer_arch(plan.target.family, old.shapes, old.layers)
        new_arch = {**e.arch_out}
        diff = [f"{k} {old_arch.get(k)} -> {new_arch.get(k)}" for k in ARCH_KEYS
                if old_arch.get(k) != new_arch.get(k) and k != "context"]
        if diff:
            raise UsageError(f"{e.identity} does not fit the {e.slot.name} in {checkpoint}: {'; '.join(diff)}",
                             "write back an encoder of the same architecture")
        if old_arch.get("context") != new_arch.get("context") and not o.force:
            # a long-context encoder (Long-CLIP: 248 positions) in a checkpoint whose loaders build
            # the encoder from the checkpoint's own family assume its context (77)
            raise UsageError(f"{e.identity} has {new_arch.get('context')} positions, the {e.slot.name} in {checkpoint} "
                             f"{old_arch.get('context')}: loaders of this checkpoint build a "
                             f"{old_arch.get('context')}-position encoder and fail to load, or cut, the longer one",
                             "pass --force to write it anyway (for loaders that read the context from the weights)")
        # where this checkpoint keeps the slot (a refiner's bigG is at embedders.0.model.)
        slot = dataclasses.replace(e.slot, prefix=old.prefix)
        ops, buffers, _, _ = plan_write(plan.target, slot, e.read.shapes, e.read.layers, str(input), e.absent_last)
        removed |= set(old.keys)
        streams.append(stream(e.reader(plan.source, plan.dtype),
                              ops, buffers, e.arch))
        records[e.slot.name] = {"from": Path(plan.source.path).name, "prefix": old.prefix,
                                "removed": len(old.keys), "written": len(ops) + len(buffers)}

    kept = [k for k in ck.keys() if k not in removed]
    new_keys = {en.key for s in streams for en in s.entries}
    clash = [k for k in kept if k in new_keys]
    if clash:
        raise UsageError(f"{checkpoint} already holds {clash[0]} outside the replaced encoder")
    return WriteBack(plan, checkpoint, output, o.force, records, kept, streams, ck)


def write_back(input, checkpoint, output, options: ConvertOptions | None = None, *,
               registry: Registry = DEFAULT, **fields):
    """Write the encoder(s) of `input` into a copy of the full checkpoint `checkpoint` (layout
    `options.to`: ldm, sgm or sd3), as the new .safetensors checkpoint `output`. Returns (the Plan,
    {slot: what was replaced})."""
    try:
        return _write_back(plan_write_back(input, checkpoint, output, options, registry=registry, **fields))
    finally:
        leases.release_all()


def _write_back(wb: WriteBack):
    unchanged = Snapshot([*wb.plan.inputs(), wb.checkpoint])
    ck, kept = wb.source, wb.kept
    keep = TensorStream([Entry(k, ck.info(k).dtype, ck.info(k).shape) for k in kept],
                        lambda: ((k, ck.load(k)) for k in kept))
    meta = dict(ck.metadata())            # the checkpoint's own metadata, unchanged
    meta.update({metakeys.INTO: json.dumps({"checkpoint": wb.checkpoint.name, "encoders": wb.records,
                                            "encoder_sha256": wb.plan.source.sha256()}, sort_keys=True)})
    with AtomicOutput(wb.output, False, wb.force, protect=[*wb.plan.inputs(), wb.checkpoint]) as tmp:
        save_tensors(TensorStream.concat([keep, *wb.streams]), tmp, "safetensors", meta)
        unchanged.check()
    return wb.plan, wb.records
