"""Mapping-file schema 1: parse YAML into frozen objects, rejecting anything unknown.

Three kinds of file: a *family* (the canonical tensors and their symbolic shapes), a *naming*
(a key table shared by several layouts: canonical name -> key, with a transform), and a
*layout* (where a naming sits in a checkpoint: encoder slots, prefixes, aliases, what the
layout cannot hold). Every error names the file and line, and where it can, the nearest valid
word.

Each field is declared once, as one row on its dataclass field: `row(check, default=...,
yaml=...)` (see schema_rows.py). Rules that tie fields together follow each parse.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from ..errors import MappingError
from . import schema_values as values
from .schema_values import LAYER
from .schema_rows import (At, Parsed, as_dict, check_fields, flag, guarded, listed, mapping, named, number, obj, one_of,
                          parse_object, row, rows, string_set, strings, text, then, whole)
from .sources import PICKLE_EXT, SAFETENSORS_EXT
from .transforms import SYNTHESIZERS, TRANSFORMS
from .yamlload import load_yaml

SCHEMA_VERSION = 1
OUTPUTS = ("file", "folder")


# ---------------------------------------------------------------- family

@dataclass(frozen=True)
class TensorSpec(Parsed):
    name: str                   # canonical template, may hold <layer>
    shape: tuple = row(values.shape)  # symbols (str) or ints
    optional: bool = row(flag, default=False)
    sample: float | None = row(number, default=None)    # fixed value for synthetic samples (else random)


@dataclass(frozen=True)
class BufferSpec(Parsed):
    name: str
    shape: tuple = row(values.shape)
    dtype: str = row(text)
    synthesize: str = row(one_of(SYNTHESIZERS, "synthesizer"))


@dataclass(frozen=True)
class Kind(Parsed):
    """A known encoder (e.g. clip_l = OpenAI ViT-L/14): what its weights cannot say."""
    name: str
    title: str = row(text)
    width: int = row(whole(1))
    layers: int = row(whole(1))
    heads: int = row(whole(1))
    act: str = row(text)
    pad_token: str | None = row(text, default=None)     # its tokenizer's pad token, where not end-of-text


@dataclass(frozen=True)
class Family(Parsed):
    name: str = row(values.file_name)
    description: str = row(text)
    tensors: tuple[TensorSpec, ...] = row(named(TensorSpec, "tensor {}", key=lambda k, at: values.template(text(k, at), at, "tensors"),
                                                shorthand=(list, "shape"), into=tuple))
    head_width: int = row(whole(1), yaml="params.heads.head_width")
    act_choices: tuple[str, ...] = row(listed(values.activation), yaml="params.act.choices")
    act_default: str = row(text, yaml="params.act.default")
    path: Path
    buffers: dict = row(named(BufferSpec, "buffer {}"), default={})
    kinds: dict = row(named(Kind, "kind {}"), default={})       # kind name -> Kind
    presets: dict = row(mapping(mapping(lambda v, at: v)), default={})     # checked against the tensors
    overrides: bool = row(flag, default=False)
    linears: tuple[str, ...] = row(strings, default=())     # the [out, in] matrices a LoRA may adapt
    image_mean: tuple = row(listed(number), default=(), yaml="image.mean")   # how its images are normalised
    image_std: tuple = row(listed(number), default=(), yaml="image.std")

    def kind_by_width(self, width):
        return next((k for k in self.kinds.values() if k.width == width), None)

    def spec(self, template: str) -> TensorSpec | None:
        return next((t for t in self.tensors if t.name == template), None)


# ---------------------------------------------------------------- naming

@dataclass(frozen=True)
class Entry:
    canonical: tuple[str, ...] = row(values.canonicals)   # canonical templates produced on read (1, or 3 for split_qkv)
    key: str = row(values.key_template)                            # key template relative to the slot prefix
    transform: str = row(values.transform, default="rename")
    line: int = 0


@dataclass(frozen=True)
class Naming(Parsed):
    name: str = row(values.file_name)
    description: str = row(text)
    tensors: tuple[Entry, ...] = row(named(Entry, "tensor {}", key=lambda k, at: values.template(text(k, at), at, "canonical name"),
                                           shorthand=(str, "key"), into=tuple, given=lambda k: {"canonical": (k,)}))
    path: Path
    groups: tuple[Entry, ...] = row(listed(obj(Entry, "group", require=("transform",))), default=())
    buffers: dict = row(mapping(text), default={})      # buffer name -> key
    overrides: bool = row(flag, default=False)

    @property
    def entries(self) -> tuple[Entry, ...]:
        return self.tensors + self.groups


# ---------------------------------------------------------------- layout

@dataclass(frozen=True)
class Alias(Parsed):
    source: str = row(text, yaml="from")    # key prefix (relative to the slot prefix) as some tool writes it
    target: str = row(text, yaml="to")      # what it means in this naming
    repair: str = row(text, default="")     # if reading it repairs a known fault: what (recorded in the ledger)


@dataclass(frozen=True)
class ConfigSpec(Parsed):
    file: str = row(values.file_in_folder())                # in the slot's folder
    format: str = row(values.slot_format)


@dataclass(frozen=True)
class VisionConfig(ConfigSpec):
    """A whole CLIP's config: the same fields, the formats that serve a whole CLIP."""
    format: str = row(values.clip_format)


@dataclass(frozen=True)
class TokenizerSpec(Parsed):
    """Where an encoder slot's tokenizer files go (a folder of the output) and in what format."""
    folder: str = row(values.folder)
    format: str = row(values.tokenizer_format)


@dataclass(frozen=True)
class ProcessorSpec(Parsed):
    """A whole CLIP's image processor config: its file and format."""
    file: str = row(values.file_in_folder(".json"))
    format: str = row(values.processor_format)


@dataclass(frozen=True)
class Weights:
    """A folder output's weights file, per format."""
    safetensors: str | None = row(values.file_in_folder(*SAFETENSORS_EXT), default=None)
    pt: str | None = row(values.file_in_folder(*PICKLE_EXT), default=None)


@dataclass(frozen=True)
class Params:
    """What a layout may say of an encoder that its weights cannot: the defaults that
    plan.resolve_params reads (act is held to the family's choices when the layout is resolved)."""
    heads: int | None = row(whole(1), default=None)
    act: str | None = row(values.activation, default=None)


@dataclass(frozen=True)
class Slot(Parsed):
    name: str                               # a kind (clip_l, clip_h, clip_g) or a generic name such as clip
    prefix: str = row(values.prefix)              # where the slot is written, and read
    naming: str = row(text)
    aliases: tuple[Alias, ...] = row(listed(obj(Alias, "alias")), default=())
    omit: frozenset = row(string_set, default=frozenset())
    buffers: frozenset = row(string_set, default=frozenset())
    params: dict = row(then(obj(Params), as_dict), default={})
    config: ConfigSpec | None = row(obj(ConfigSpec, "config"), default=None)
    tokenizer: TokenizerSpec | None = row(obj(TokenizerSpec, "tokenizer"), default=None)
    read_prefixes: tuple[str, ...] = row(listed(values.prefix), default=())   # other places the slot is found in files (read only)
    ignore: tuple[str, ...] = row(strings, default=())          # stray keys under the prefix, skipped with a note
    alternates: tuple[Entry, ...] = row(listed(obj(Entry, "alternate", require=("transform",))), default=())
    drop_last_layers: int = row(whole(0), default=0)            # the layout stores this many fewer blocks ...
    why: str = row(text, default="")                            # ... and this is why
    scope: tuple[str, ...] = ()             # only these keys belong to the slot (prefixes end in '.'); not in YAML

    @property
    def folder(self) -> str:
        """The sub-folder of a folder container this slot lives in ('' for the root)."""
        return self.prefix.rsplit("/", 1)[0] + "/" if "/" in self.prefix else ""


@dataclass(frozen=True)
class VisionSpec(Parsed):
    """How a layout holds a whole CLIP (for --with-vision): the vision tower's naming, which keys
    are the vision side's, and the output's form."""
    family: str = row(text)
    naming: str = row(text)
    scope: tuple[str, ...] = row(strings)
    output: str = row(one_of(OUTPUTS))
    weights: dict = row(then(obj(Weights, "vision weights"), as_dict), default={})   # folder outputs: format -> file
    config: ConfigSpec | None = row(obj(VisionConfig, "vision config"), default=None)
    processor: ProcessorSpec | None = row(obj(ProcessorSpec, "vision processor"), default=None)


def _encoders(v, at: At) -> dict:
    if not isinstance(v, dict) or not v:
        raise at.error("encoders must map at least one slot name to its settings")
    return named(Slot, "encoder {}")(v, at)


@dataclass(frozen=True)
class Layout(Parsed):
    name: str = row(values.file_name)
    family: str = row(text)
    description: str = row(text)
    output: str = row(one_of(OUTPUTS))      # "file" or "folder"
    slots: dict = row(_encoders, yaml="encoders")
    path: Path
    folder_weights: dict = row(then(obj(Weights, "folder_weights"), as_dict), default={})
    ignore: tuple[str, ...] = row(strings, default=())
    priority: int = row(whole(None), default=0, yaml="detect.priority")
    sample_extra: dict = row(mapping(values.sizes), default={}, yaml="sample.extra")
    components: dict = row(mapping(strings), default={})    # other parts of a checkpoint, for inspect: name -> key prefixes
    vision: VisionSpec | None = row(obj(VisionSpec, "vision"), default=None)
    overrides: bool = row(flag, default=False)              # a user layout that replaces the built-in of the same name


# ---------------------------------------------------------------- parsers

def _parse_file(cls, path, kind: str):
    d = load_yaml(path)
    header = {"schema": values.equals(SCHEMA_VERSION, "unsupported schema {!r}", f"this sdconv reads schema {SCHEMA_VERSION}"),
              "kind": values.equals(kind, f"expected kind {kind!r}, found {{!r}}")}
    return parse_object(cls, d, At(path, d.line, kind), header=header, path=Path(path)), d


def _check_presets(fam: Family, d):
    """A preset (for `sdconv sample`) gives each size the family's tensors need, the number of
    layers, and the Params (heads, act)."""
    needed = {s for t in fam.tensors if not t.optional for s in t.shape if isinstance(s, str)}
    allowed = {**{s: s in needed for t in fam.tensors for s in t.shape if isinstance(s, str)}, "layers": True,
               **{n: True for n, _, _ in rows(Params)}}
    checks = {n: r.check for n, _, r in rows(Params)}
    for pname, p in fam.presets.items():
        raw = d["presets"][pname]
        at = At(fam.path, d["presets"].line_of(pname), f"preset {pname}")
        check_fields(raw, allowed, at)
        for k, v in p.items():
            checks.get(k, whole(1))(v, at.to(raw.line_of(k), f"{at.what} {k}"))
        if p["act"] not in fam.act_choices:
            raise at.error(f"{at.what}: activation {p['act']!r} is not one of {list(fam.act_choices)}")
        if "width" in p and p["width"] % p["heads"]:
            raise at.error(f"{at.what}: {p['heads']} heads do not divide width {p['width']}")


@guarded
def parse_family(path) -> Family:
    fam, d = _parse_file(Family, path, "family")
    choices = list(fam.act_choices)
    if fam.act_default not in choices:
        raise MappingError(path, d["params"]["act"].line, f"default activation {fam.act_default!r} is not one of {choices}")
    for k in fam.kinds.values():
        if k.act not in choices:
            raise MappingError(path, k.lines["act"], f"activation {k.act!r} is not one of {choices}")
        if k.width % k.heads:
            raise MappingError(path, k.lines["heads"], f"kind {k.name}: {k.heads} heads do not divide width {k.width}")
    for b in fam.buffers.values():
        if b.dtype != SYNTHESIZERS[b.synthesize]:      # the engine writes what the synthesizer makes
            raise MappingError(path, b.lines["dtype"], f"buffer {b.name}: synthesizer {b.synthesize!r} makes "
                                                       f"{SYNTHESIZERS[b.synthesize]}, not {b.dtype}")
    for name in fam.linears:
        spec = fam.spec(name)
        if spec is None or len(spec.shape) != 2:
            raise MappingError(path, d.line_of("linears"),
                               f"linears: {name!r} is not a matrix of family {fam.name}")
    _check_presets(fam, d)
    return fam


@guarded
def parse_naming(path, family: Family) -> Naming:
    naming, d = _parse_file(Naming, path, "naming")
    seen = {}
    for e in naming.entries:
        for c in e.canonical:
            if family.spec(c) is None:
                near = difflib.get_close_matches(c, [t.name for t in family.tensors], n=1)
                raise MappingError(path, e.line, f"{c!r} is not a canonical tensor of family {family.name}",
                                   f"did you mean {near[0]!r}?" if near else None)
        if any(LAYER in c for c in e.canonical) != (LAYER in e.key):
            raise MappingError(path, e.line, f"key {e.key!r} and canonical {list(e.canonical)} must both use <layer>, "
                                             "or neither")
        t = TRANSFORMS[e.transform]
        if t.n_canonical != len(e.canonical):
            raise MappingError(path, e.line, f"transform {e.transform!r} makes {t.n_canonical} canonical tensor(s), "
                                             f"{len(e.canonical)} listed")
        for c in e.canonical:
            if c in seen:
                raise MappingError(path, e.line, f"{c!r} is mapped twice (also at line {seen[c]})")
            seen[c] = e.line
    for t in family.tensors:
        if not t.optional and t.name not in seen:
            raise MappingError(path, d.line, f"required canonical tensor {t.name!r} is not mapped")
    for bname in naming.buffers:
        if bname not in family.buffers:
            raise MappingError(path, d["buffers"].line_of(bname), f"{bname!r} is not a buffer of family {family.name}")
    return naming


def _weights_named(weights: dict, at: At):
    names = [k for k, _, _ in rows(Weights)]
    missing = [k for k in names if k not in weights]
    if missing:
        raise at.error(f"{at.what} lacks the required field {missing[0]!r}" if weights else
                       f"output: folder needs {at.what}", f"a file name for each format: {', '.join(names)}")


def _check_alternate(a: Entry, at: At):
    """What plan_read serves: another spelling of one tensor outside the blocks, read one to one."""
    t = TRANSFORMS[a.transform]
    if len(a.canonical) != 1:
        raise at.error(f"{at.what} names {len(a.canonical)} canonical tensors", "an alternate spells one tensor")
    if LAYER in a.canonical[0] or LAYER in a.key:
        raise at.error(f"{at.what} for {a.canonical[0]!r} uses <layer>", "alternates are read only outside the blocks")
    if (t.n_keys, t.n_canonical) != (1, 1):
        raise at.error(f"{at.what}: transform {a.transform!r} makes {t.n_canonical} canonical tensor(s) from "
                       f"{t.n_keys} key(s)", "an alternate reads one key as one tensor")


@guarded
def parse_layout(path) -> Layout:
    lay, d = _parse_file(Layout, path, "layout")
    if lay.output == "folder":
        _weights_named(lay.folder_weights, At(path, lay.lines.get("folder_weights", d.line), "folder_weights"))
    for s in lay.slots.values():
        if s.drop_last_layers and not s.why:
            raise MappingError(path, s.lines["drop_last_layers"], "drop_last_layers needs a why: say what is lost")
        if "/" in s.prefix and lay.output == "file":
            raise MappingError(path, s.lines["prefix"], "a prefix with a folder needs output: folder")
        if s.tokenizer is not None and lay.output == "file":
            raise MappingError(path, s.lines["tokenizer"], f"encoder {s.name}: tokenizer files need output: folder")
        for a in s.alternates:
            _check_alternate(a, At(path, a.line, f"encoder {s.name} alternate"))
    v = lay.vision
    if v is not None and v.processor is not None and v.output == "file":
        raise MappingError(path, v.lines["processor"], "vision processor: a processor config needs output: folder")
    if v is not None and v.output == "folder":
        _weights_named(v.weights, At(path, v.lines.get("weights", lay.lines["vision"]), "vision weights"))
    return lay
