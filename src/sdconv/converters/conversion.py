"""What a conversion will do, decided before a byte is read: a Plan per output, an EncoderPlan per
encoder in it, and the tensors taken from references (Graft, VisionPlan). Data only: making
them is engine.py's and grafts.py's job, printing them the command line's."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import dtypes
from .arch import infer_arch
from .execute import SourceReader
from .lora import LoraReader
from .plan import BufferOp, ReadOp, ReadPlan, WriteOp
from .preprocessing import tokenizer_files
from .registry import ResolvedLayout
from .schema import Slot
from .transforms import synthesized_code
from .sources import Source


@dataclass
class Graft:
    """A canonical tensor taken from a reference file instead of the input."""
    source: Source
    op: ReadOp                  # the reference's
    layout: str

    @property
    def sha256(self) -> str:
        return self.source.sha256()

    def record(self) -> dict:
        return {"file": Path(self.source.path).name, "sha256": self.sha256, "key": self.op.keys[0],
                "layout": self.layout}


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
    origin: dict = field(default_factory=dict)      # where heads and act came from
    notes: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return self.source.sha256()


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
    loras: list = field(default_factory=list)       # [(LoraFile, {canonical: Delta})], in the order applied

    def tokenizer(self, make: bool = True) -> tuple[dict, str]:
        """The tokenizer files written with this encoder ({path in the output: text}) and a note
        saying so (or why none are): the target slot's tokenizer, padded as the encoder's kind is."""
        kind = self.read.layout.family.kinds.get(self.identity)
        return tokenizer_files(self.slot.tokenizer, kind.pad_token if kind else None, self.arch, make)

    def reader(self, source: Source, dtype: str = "keep"):
        """Where this encoder's canonical tensors are read: `source`, and the grafts' references;
        with its LoRAs merged, cast to `dtype` (the output's) once."""
        r = SourceReader(source, self.read, {c: (g.source, g.op) for c, g in self.grafts.items()})
        return LoraReader(r, self.loras, dtype) if self.loras else r

    def source_op(self, canonical: str):
        """(the reference's Source, or None for the input; the ReadOp) a canonical tensor comes from."""
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

    def bytes_to_write(self, dtype: str) -> int:
        total = 0
        for op in self.ops:
            size = dtypes.size(dtypes.cast_code(self.dtype_of(op.canonical[0]), dtype))
            for s in op.shapes:
                n = 1
                for d in s:
                    n *= d
                total += n * size
        for b in self.buffers:
            n = 1
            for s in b.shape:
                n *= self.arch[s] if isinstance(s, str) else s
            total += dtypes.size(synthesized_code(b.synthesize)) * n
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
    verdicts: list | None = None                # detection results (None with --from)
    vision: VisionPlan | None = None            # --with-vision: the rest of a whole CLIP
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
    def warnings(self) -> list[str]:
        return [w for e in self.encoders for w in e.warnings]

    @property
    def bytes_to_write(self) -> int:
        return sum(e.bytes_to_write(self.dtype) for e in self.encoders)  # (the vision tower not counted)

    def inputs(self) -> list[Path]:
        """Every path this plan reads: the input, its files, and the references of grafts and of
        the vision tower (outputs may never be, contain or lie inside one of them)."""
        sources = [self.source, *(g.source for e in self.encoders for g in e.grafts.values()),
                   *(lf.source for e in self.encoders for lf, _ in e.loras)]
        if self.vision is not None:
            sources.append(self.vision.source)
        return list(dict.fromkeys(Path(p) for s in sources for p in [s.path, *s.files()]))

    @property
    def bytes_to_read(self) -> int:
        return sum(e.read.bytes_to_read for e in self.encoders)

    def prefetch(self) -> None:
        """Tell each source every tensor this plan will read, at once: a remote one fetches them in
        few requests before the writing starts."""
        wanted: dict = {}

        def want(source, keys):
            wanted.setdefault(id(source), (source, []))[1].extend(keys)
        for e in self.encoders:
            want(self.source, [k for op in e.read.ops if not set(op.canonical) & set(e.grafts) for k in op.keys])
            for g in e.grafts.values():
                want(g.source, g.op.keys)
        if self.vision is not None:
            want(self.vision.source, [k for op in self.vision.read.ops for k in op.keys])
        for source, keys in wanted.values():
            source.prefetch(keys)


@dataclass
class Result:
    """What convert() made."""
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
