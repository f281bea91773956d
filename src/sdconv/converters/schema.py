"""Mapping-file schema 1: parse YAML into frozen objects, rejecting anything unknown.

Three kinds of file: a *family* (the canonical tensors and their symbolic shapes), a *naming*
(a key table shared by several layouts: canonical name -> key, with a transform), and a
*layout* (where a naming sits in a checkpoint: encoder slots, prefixes, aliases, what the
layout cannot hold). Every error names the file and line, and where it can, the nearest valid
word.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MappingError
from .transforms import SYNTHESIZERS, TRANSFORMS
from .yamlload import LineDict, LineList, load_yaml

SCHEMA_VERSION = 1
LAYER = "<layer>"
_PLACEHOLDER = re.compile(r"<[^>]*>|\{[^}]*\}")
CONFIG_FORMATS = ("hf_clip_text", "hf_clip", "open_clip")
PARAM_NAMES = ("heads", "act", "encoder")


# ---------------------------------------------------------------- objects

@dataclass(frozen=True)
class TensorSpec:
    name: str                   # canonical template, may hold <layer>
    shape: tuple                # symbols (str) or ints
    optional: bool = False
    sample: float | None = None   # fixed value for synthetic samples (else random)


@dataclass(frozen=True)
class BufferSpec:
    name: str
    shape: tuple
    dtype: str
    synthesize: str


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    tensors: tuple[TensorSpec, ...]
    buffers: dict
    head_width: int
    act_choices: tuple[str, ...]
    act_default: str
    kinds: dict                 # kind name -> Kind
    presets: dict
    path: Path

    def kind_by_width(self, width):
        return next((k for k in self.kinds.values() if k.width == width), None)

    def spec(self, template: str) -> TensorSpec | None:
        return next((t for t in self.tensors if t.name == template), None)


@dataclass(frozen=True)
class Kind:
    """A known encoder (e.g. clip_l = OpenAI ViT-L/14): what its weights cannot say."""
    name: str
    title: str
    width: int
    layers: int
    heads: int
    act: str


@dataclass(frozen=True)
class Entry:
    canonical: tuple[str, ...]  # canonical templates produced on read (1, or 3 for split_qkv)
    key: str                    # key template relative to the slot prefix
    transform: str
    line: int = 0


@dataclass(frozen=True)
class Naming:
    name: str
    description: str
    entries: tuple[Entry, ...]
    buffers: dict               # buffer name -> key
    path: Path


@dataclass(frozen=True)
class Alias:
    source: str                 # key prefix (relative to the slot prefix) as some tool writes it
    target: str                 # what it means in this naming
    repair: str = ""            # if reading it repairs a known fault: what (recorded in the ledger)


@dataclass(frozen=True)
class ConfigSpec:
    file: str                   # relative to the slot's folder
    format: str


@dataclass(frozen=True)
class Slot:
    name: str                   # a kind (clip_l, clip_h, clip_g) or a generic name such as clip
    prefix: str                 # where the slot is written, and read
    naming: str
    aliases: tuple[Alias, ...] = ()
    omit: frozenset = frozenset()
    buffers: frozenset = frozenset()
    params: dict = field(default_factory=dict)
    config: ConfigSpec | None = None
    read_prefixes: tuple[str, ...] = ()     # other places the slot is found in files (read only)
    ignore: tuple[str, ...] = ()            # stray keys under the prefix, skipped with a note
    alternates: tuple[Entry, ...] = ()      # older spellings, read only (e.g. a bare projection)
    drop_last_layers: int = 0               # the layout stores this many fewer blocks ...
    why: str = ""                           # ... and this is why
    scope: tuple[str, ...] = ()             # only these keys belong to the slot (prefixes end in '.')

    @property
    def folder(self) -> str:
        """The sub-folder of a folder container this slot lives in ('' for the root)."""
        return self.prefix.rsplit("/", 1)[0] + "/" if "/" in self.prefix else ""


@dataclass(frozen=True)
class VisionSpec:
    """How a layout holds a whole CLIP (for --with-vision): the vision tower's naming, which keys
    are the vision side's, and the output's form."""
    family: str
    naming: str
    scope: tuple[str, ...]
    output: str                 # file or folder
    weights: dict               # folder outputs: format -> weights file name
    config: ConfigSpec | None


@dataclass(frozen=True)
class Layout:
    name: str
    family: str
    description: str
    output: str                 # "file" or "folder"
    folder_weights: dict
    slots: dict
    ignore: tuple[str, ...]
    priority: int
    sample_extra: dict
    components: dict            # other parts of a checkpoint, for inspect: name -> key prefixes
    path: Path
    vision: VisionSpec | None = None
    overrides: bool = False     # a user layout that replaces the built-in of the same name


# ---------------------------------------------------------------- checks

def _fields(d: LineDict, path, allowed: dict, where: str):
    """Reject unknown fields (suggesting the nearest) and missing required ones."""
    if not isinstance(d, dict):
        raise MappingError(path, getattr(d, "line", 0), f"{where} must be a mapping")
    for k in d:
        if k not in allowed:
            near = difflib.get_close_matches(str(k), list(allowed), n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"allowed: {', '.join(allowed)}"
            raise MappingError(path, d.line_of(k), f"unknown field {k!r} in {where}", hint)
    for k, required in allowed.items():
        if required and k not in d:
            raise MappingError(path, d.line, f"{where} lacks the required field {k!r}")


def _str(v, path, line, what) -> str:
    if not isinstance(v, str):
        raise MappingError(path, line, f"{what} must be a string, found {v!r}")
    return v


def _template(s: str, path, line, what) -> str:
    for m in _PLACEHOLDER.findall(s):
        if m != LAYER:
            raise MappingError(path, line, f"bad template {s!r} in {what}: unknown placeholder {m}",
                               "the only placeholder is <layer>")
    if s.count(LAYER) > 1:
        raise MappingError(path, line, f"bad template {s!r} in {what}: <layer> appears twice")
    return s


def _transform(name, path, line) -> str:
    if name not in TRANSFORMS:
        near = difflib.get_close_matches(str(name), list(TRANSFORMS), n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(TRANSFORMS)}"
        raise MappingError(path, line, f"unknown transform {name!r}", hint)
    return name


def _header(d, path, kind):
    if d.get("schema") != SCHEMA_VERSION:
        raise MappingError(path, d.line_of("schema"),
                           f"unsupported schema {d.get('schema')!r}", f"this sdconv reads schema {SCHEMA_VERSION}")
    if d.get("kind") != kind:
        raise MappingError(path, d.line_of("kind"), f"expected kind {kind!r}, found {d.get('kind')!r}")
    name = _str(d.get("name"), path, d.line_of("name"), "name")
    if not re.fullmatch(r"[a-z][a-z0-9_\-]*", name):
        raise MappingError(path, d.line_of("name"), f"bad name {name!r}", "use lower-case letters, digits, _ and -")
    stem = Path(path).stem
    if stem != name:
        raise MappingError(path, d.line_of("name"), f"name {name!r} differs from the file name {stem!r}")
    return name


def _shape(v, path, line, what):
    if not isinstance(v, list) or not all(isinstance(x, (str, int)) for x in v):
        raise MappingError(path, line, f"{what}: a shape is a list of symbols or integers, found {v!r}")
    return tuple(v)


# ---------------------------------------------------------------- parsers

def _guarded(parse):
    """A structure the checks above did not foresee (a list where a mapping belongs, a number
    where a name belongs) is still a MappingError naming the file, never a traceback."""
    import functools

    @functools.wraps(parse)
    def wrapper(path, *args):
        try:
            return parse(path, *args)
        except MappingError:
            raise
        except (TypeError, AttributeError, KeyError, ValueError, IndexError, RecursionError) as e:
            raise MappingError(path, 0, f"malformed {parse.__name__.replace('parse_', '')} file "
                                        f"({type(e).__name__}: {e})",
                               "compare it with a built-in mapping file, or run `sdconv layouts`")
    return wrapper


@_guarded
def parse_family(path) -> Family:
    d = load_yaml(path)
    _fields(d, path, {"schema": True, "kind": True, "name": True, "description": True,
                      "tensors": True, "buffers": False, "params": True, "kinds": False, "presets": False,
                      "overrides": False}, "family")
    name = _header(d, path, "family")
    tensors = []
    for tname, v in d["tensors"].items():
        line = d["tensors"].line_of(tname)
        _template(tname, path, line, "tensors")
        if isinstance(v, dict):
            _fields(v, path, {"shape": True, "optional": False, "sample": False}, f"tensor {tname}")
            tensors.append(TensorSpec(tname, _shape(v["shape"], path, line, tname), bool(v.get("optional", False)),
                                      v.get("sample")))
        else:
            tensors.append(TensorSpec(tname, _shape(v, path, line, tname)))
    buffers = {}
    for bname, v in (d.get("buffers") or {}).items():
        line = d["buffers"].line_of(bname)
        _fields(v, path, {"shape": True, "dtype": True, "synthesize": True}, f"buffer {bname}")
        if v["synthesize"] not in SYNTHESIZERS:
            raise MappingError(path, line, f"unknown synthesizer {v['synthesize']!r}", f"known: {', '.join(SYNTHESIZERS)}")
        buffers[bname] = BufferSpec(bname, _shape(v["shape"], path, line, bname), v["dtype"], v["synthesize"])
    p = d["params"]
    _fields(p, path, {"heads": True, "act": True}, "params")
    _fields(p["heads"], path, {"head_width": True}, "params.heads")
    _fields(p["act"], path, {"choices": True, "default": True}, "params.act")
    act = p["act"]
    if act["default"] not in act["choices"]:
        raise MappingError(path, act.line, f"default activation {act['default']!r} is not one of {list(act['choices'])}")
    kinds = {}
    for kname, kv in (d.get("kinds") or {}).items():
        _fields(kv, path, {"title": True, "width": True, "layers": True, "heads": True, "act": True}, f"kind {kname}")
        if kv["act"] not in act["choices"]:
            raise MappingError(path, kv.line_of("act"), f"activation {kv['act']!r} is not one of {list(act['choices'])}")
        kinds[kname] = Kind(kname, str(kv["title"]), int(kv["width"]), int(kv["layers"]), int(kv["heads"]), kv["act"])
    presets = {}
    for pname, pv in (d.get("presets") or {}).items():
        presets[pname] = dict(pv)
    return Family(name, _str(d["description"], path, d.line_of("description"), "description"), tuple(tensors),
                  buffers, int(p["heads"]["head_width"]), tuple(act["choices"]), act["default"], kinds, presets,
                  Path(path))


@_guarded
def parse_naming(path, family: Family) -> Naming:
    d = load_yaml(path)
    _fields(d, path, {"schema": True, "kind": True, "name": True, "description": True,
                      "tensors": True, "groups": False, "buffers": False, "overrides": False}, "naming")
    name = _header(d, path, "naming")
    entries = []

    def add(canon: list, key, transform, line):
        for c in canon:
            _template(c, path, line, "canonical name")
            if family.spec(c) is None:
                near = difflib.get_close_matches(c, [t.name for t in family.tensors], n=1)
                raise MappingError(path, line, f"{c!r} is not a canonical tensor of family {family.name}",
                                   f"did you mean {near[0]!r}?" if near else None)
        _template(key, path, line, "key")
        if any(LAYER in c for c in canon) != (LAYER in key):
            raise MappingError(path, line, f"key {key!r} and canonical {canon} must both use <layer>, or neither")
        t = TRANSFORMS[_transform(transform, path, line)]
        if t.n_canonical != len(canon):
            raise MappingError(path, line, f"transform {transform!r} makes {t.n_canonical} canonical tensor(s), "
                                           f"{len(canon)} listed")
        entries.append(Entry(tuple(canon), key, transform, line))

    for cname, v in d["tensors"].items():
        line = d["tensors"].line_of(cname)
        if isinstance(v, str):
            add([cname], v, "rename", line)
        else:
            _fields(v, path, {"key": True, "transform": False}, f"tensor {cname}")
            add([cname], _str(v["key"], path, line, "key"), v.get("transform", "rename"), line)
    for g in d.get("groups") or []:
        _fields(g, path, {"canonical": True, "key": True, "transform": True}, "group")
        if not isinstance(g["canonical"], list):
            raise MappingError(path, g.line, "group canonical must be a list")
        add(list(g["canonical"]), _str(g["key"], path, g.line, "key"), g["transform"], g.line)
    seen = {}
    for e in entries:
        for c in e.canonical:
            if c in seen:
                raise MappingError(path, e.line, f"{c!r} is mapped twice (also at line {seen[c]})")
            seen[c] = e.line
    for t in family.tensors:
        if not t.optional and t.name not in seen:
            raise MappingError(path, d.line, f"required canonical tensor {t.name!r} is not mapped")
    buffers = {}
    for bname, key in (d.get("buffers") or {}).items():
        if bname not in family.buffers:
            raise MappingError(path, d["buffers"].line_of(bname), f"{bname!r} is not a buffer of family {family.name}")
        buffers[bname] = _str(key, path, d["buffers"].line_of(bname), "buffer key")
    return Naming(name, d["description"], tuple(entries), buffers, Path(path))


@_guarded
def parse_layout(path) -> Layout:
    d = load_yaml(path)
    _fields(d, path, {"schema": True, "kind": True, "name": True, "family": True, "description": True,
                      "output": True, "folder_weights": False, "encoders": True, "ignore": False,
                      "detect": False, "sample": False, "components": False, "vision": False,
                      "overrides": False}, "layout")
    name = _header(d, path, "layout")
    if d["output"] not in ("file", "folder"):
        raise MappingError(path, d.line_of("output"), f"output must be 'file' or 'folder', found {d['output']!r}")
    fw = d.get("folder_weights") or {}
    if d["output"] == "folder":
        _fields(fw, path, {"safetensors": True, "pt": True}, "folder_weights")
    slots = {}
    if not isinstance(d["encoders"], dict) or not d["encoders"]:
        raise MappingError(path, d.line_of("encoders"), "encoders must map at least one slot name to its settings")
    for sname, s in d["encoders"].items():
        where = f"encoder {sname}"
        _fields(s, path, {"prefix": True, "naming": True, "aliases": False, "omit": False, "buffers": False,
                          "params": False, "config": False, "read_prefixes": False, "ignore": False,
                          "alternates": False, "drop_last_layers": False, "why": False}, where)
        alternates = []
        for a in s.get("alternates") or []:
            _fields(a, path, {"canonical": True, "key": True, "transform": True}, "alternate")
            alternates.append(Entry((_str(a["canonical"], path, a.line, "canonical"),),
                                    _template(_str(a["key"], path, a.line, "key"), path, a.line, "alternate"),
                                    _transform(a["transform"], path, a.line), a.line))
        if int(s.get("drop_last_layers", 0)) and not s.get("why"):
            raise MappingError(path, s.line_of("drop_last_layers"), "drop_last_layers needs a why: say what is lost")
        aliases = []
        for a in s.get("aliases") or []:
            _fields(a, path, {"from": True, "to": True, "repair": False}, "alias")
            aliases.append(Alias(_str(a["from"], path, a.line, "alias from"), _str(a["to"], path, a.line, "alias to"),
                                 str(a.get("repair", ""))))
        params = dict(s.get("params") or {})
        for k in params:
            if k not in PARAM_NAMES:
                raise MappingError(path, s["params"].line_of(k), f"unknown parameter {k!r}", f"known: {', '.join(PARAM_NAMES)}")
        config = None
        if s.get("config") is not None:
            c = s["config"]
            _fields(c, path, {"file": True, "format": True}, "config")
            if c["format"] not in CONFIG_FORMATS:
                raise MappingError(path, c.line, f"unknown config format {c['format']!r}", f"known: {', '.join(CONFIG_FORMATS)}")
            config = ConfigSpec(c["file"], c["format"])
        prefix = _str(s["prefix"], path, s.line_of("prefix"), "prefix")
        if "/" in prefix and d["output"] == "file":
            raise MappingError(path, s.line_of("prefix"), "a prefix with a folder needs output: folder")
        read_prefixes = tuple(_str(x, path, s.line_of("read_prefixes"), "read prefix") for x in s.get("read_prefixes") or ())
        slots[sname] = Slot(sname, prefix, _str(s["naming"], path, s.line_of("naming"), "naming"),
                            tuple(aliases), frozenset(s.get("omit") or ()), frozenset(s.get("buffers") or ()),
                            params, config, read_prefixes, tuple(s.get("ignore") or ()), tuple(alternates),
                            int(s.get("drop_last_layers", 0)), str(s.get("why", "")))
    detect = d.get("detect") or {}
    _fields(detect, path, {"priority": False}, "detect")
    sample = d.get("sample") or {}
    _fields(sample, path, {"extra": False}, "sample")
    extra = {k: tuple(v) for k, v in (sample.get("extra") or {}).items()}
    components = {str(k): tuple(v) for k, v in (d.get("components") or {}).items()}
    vision = None
    if d.get("vision") is not None:
        v = d["vision"]
        _fields(v, path, {"family": True, "naming": True, "scope": True, "output": True, "weights": False,
                          "config": False}, "vision")
        if v["output"] not in ("file", "folder"):
            raise MappingError(path, v.line_of("output"), "vision output must be 'file' or 'folder'")
        vcfg = None
        if v.get("config") is not None:
            _fields(v["config"], path, {"file": True, "format": True}, "vision config")
            if v["config"]["format"] not in CONFIG_FORMATS:
                raise MappingError(path, v["config"].line, f"unknown config format {v['config']['format']!r}",
                                   f"known: {', '.join(CONFIG_FORMATS)}")
            vcfg = ConfigSpec(v["config"]["file"], v["config"]["format"])
        if v["output"] == "folder":
            _fields(v.get("weights") or {}, path, {"safetensors": True, "pt": True}, "vision weights")
        vision = VisionSpec(v["family"], v["naming"], tuple(v["scope"]), v["output"], dict(v.get("weights") or {}),
                            vcfg)
    return Layout(name, _str(d["family"], path, d.line_of("family"), "family"), d["description"], d["output"],
                  dict(fw), slots, tuple(d.get("ignore") or ()), int(detect.get("priority", 0)), extra, components,
                  Path(path), vision, bool(d.get("overrides", False)))
