"""The layout registry: finds mapping files, parses each one only when asked, validates the
references between them (layout -> family, layout slot -> naming) and suggests close names.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import MappingError, UsageError
from .configs import SLOT_FORMATS
from .lora_schema import LoraLayout, parse_lora
from .schema import Family, Layout, Naming, Slot, parse_family, parse_layout, parse_naming
from .yamlload import load_yaml

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "mappings"


@dataclass(frozen=True)
class ResolvedLayout:
    layout: Layout
    family: Family
    namings: dict               # slot name -> Naming

    @property
    def name(self) -> str:
        return self.layout.name


@dataclass(frozen=True)
class ResolvedLora:
    layout: LoraLayout
    family: Family
    naming: Naming

    @property
    def name(self) -> str:
        return self.layout.name


class Registry:
    """Mapping files from the built-in folder, then user folders (--mappings, SDCONV_MAPPINGS).
    A user file with a built-in file's name must say `overrides: true`; a later user folder
    wins over an earlier one."""

    def __init__(self, dirs=(BUILTIN_DIR,)):
        self.dirs = tuple(Path(d) for d in dirs)

    @classmethod
    def with_user_dirs(cls, extra=()) -> "Registry":
        env = [d for d in os.environ.get("SDCONV_MAPPINGS", "").split(os.pathsep) if d]
        dirs = [Path(d) for d in [*env, *extra]]
        for d in dirs:
            if not d.is_dir():
                raise UsageError(f"mapping folder {d} does not exist",
                                 "check --mappings and SDCONV_MAPPINGS (a list of folders)")
        return cls((BUILTIN_DIR, *dirs)) if dirs else DEFAULT

    def _find(self, sub: str, name: str) -> Path | None:
        for d in reversed(self.dirs):            # later folders override earlier ones
            p = d / sub / f"{name}.yaml"
            if p.is_file():
                self._check_override(p, sub, name)
                return p
        return None

    def _check_override(self, p: Path, sub: str, name: str):
        builtin = BUILTIN_DIR / sub / f"{name}.yaml"
        if p.resolve() == builtin.resolve() or not builtin.is_file():
            return
        d = load_yaml(p)
        if d.get("overrides") is not True:
            raise MappingError(p, d.line, f"{name!r} is the name of a built-in {sub.rstrip('/') or 'layout'} "
                                          f"({builtin})", "rename it, or add `overrides: true` to replace the built-in")

    def origin(self, name: str) -> str:
        """'built-in' or the user file a layout comes from."""
        for d in reversed(self.dirs):
            p = d / f"{name}.yaml"
            if p.is_file():
                return "built-in" if d == BUILTIN_DIR else str(p)
        return "?"

    def layout_names(self) -> list[str]:
        return sorted({p.stem for d in self.dirs for p in d.glob("*.yaml")})

    @lru_cache(maxsize=None)
    def family(self, name: str) -> Family:
        p = self._find("family", name)
        if p is None:
            raise UsageError(f"unknown family {name!r}")
        return parse_family(p)

    @lru_cache(maxsize=None)
    def naming(self, name: str, family: str) -> Naming:
        p = self._find("naming", name)
        if p is None:
            raise UsageError(f"unknown naming table {name!r}")
        return parse_naming(p, self.family(family))

    @lru_cache(maxsize=None)
    def layout(self, name: str) -> ResolvedLayout:
        p = self._find("", name)
        if p is None:
            names = self.layout_names()
            near = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
            hint = (f"did you mean {near[0]!r}? " if near else "") + f"known layouts: {', '.join(names)}"
            raise UsageError(f"unknown layout {name!r}", hint + " (see `sdconv layouts`)")
        lay = parse_layout(p)
        try:
            fam = self.family(lay.family)
        except UsageError:
            raise MappingError(p, 0, f"unknown family {lay.family!r}")
        namings = {}
        for s in lay.slots.values():
            if self._find("naming", s.naming) is None:
                raise MappingError(p, 0, f"encoder {s.name}: unknown naming {s.naming!r}")
            nm = namings[s.name] = self.naming(s.naming, lay.family)
            optional = {t.name for t in fam.tensors if t.optional}
            for o in s.omit:
                if o not in optional:
                    raise MappingError(p, 0, f"encoder {s.name}: omit lists {o!r}, which is not an optional "
                                             f"canonical tensor", f"optional ones: {', '.join(sorted(optional))}")
            for a in s.alternates:
                if fam.spec(a.canonical[0]) is None:
                    raise MappingError(p, a.line, f"encoder {s.name}: alternate for unknown canonical {a.canonical[0]!r}")
                if not any(e.canonical == a.canonical for e in nm.entries):     # else it would never be read
                    raise MappingError(p, a.line, f"encoder {s.name}: alternate for {a.canonical[0]!r}, which naming "
                                                  f"{nm.name} does not map")
            act = s.params.get("act")
            if act is not None and act not in fam.act_choices:
                raise MappingError(p, s.lines.get("params", 0), f"encoder {s.name}: activation {act!r} is not one "
                                                                f"of {list(fam.act_choices)}")
            if lay.output == "folder" and s.config is not None and SLOT_FORMATS[s.config.format].write is None:
                raise MappingError(p, s.lines.get("config", 0), f"encoder {s.name}: config format "
                                   f"{s.config.format!r} is read from inputs, never written; a folder layout "
                                   f"writes its slots' configs", "use output: file, or another format")
            for b in s.buffers:
                if b not in nm.buffers:
                    raise MappingError(p, 0, f"encoder {s.name}: naming {nm.name} has no buffer {b!r}")
        if lay.vision is not None:
            if self._find("family", lay.vision.family) is None or self._find("naming", lay.vision.naming) is None:
                raise MappingError(p, 0, f"vision: unknown family {lay.vision.family!r} or naming {lay.vision.naming!r}")
            self.naming(lay.vision.naming, lay.vision.family)           # validate it now
            vfam = self.family(lay.vision.family)
            if lay.vision.processor is not None and not (len(vfam.image_mean) == len(vfam.image_std) == 3):
                raise MappingError(p, lay.vision.lines.get("processor", 0), f"vision processor: family {vfam.name} "
                                   "gives no image: mean and std (three numbers each) to write it with")
        return ResolvedLayout(lay, fam, namings)

    def lora_names(self) -> list[str]:
        return sorted({p.stem for d in self.dirs for p in (d / "lora").glob("*.yaml")})

    @lru_cache(maxsize=None)
    def lora(self, name: str) -> ResolvedLora:
        """A LoRA format's mapping file, with its family and naming."""
        p = self._find("lora", name)
        if p is None:
            names = self.lora_names()
            raise UsageError(f"unknown LoRA format {name!r}", f"known: {', '.join(names)}")
        lay = parse_lora(p)
        try:
            fam = self.family(lay.family)
        except UsageError:
            raise MappingError(p, 0, f"unknown family {lay.family!r}")
        if self._find("naming", lay.naming) is None:
            raise MappingError(p, lay.lines.get("naming", 0), f"unknown naming {lay.naming!r}")
        return ResolvedLora(lay, fam, self.naming(lay.naming, lay.family))

    def vision(self, rl: ResolvedLayout) -> ResolvedLayout | None:
        """The layout's vision side as a one-slot layout of its own (for --with-vision)."""
        v = rl.layout.vision
        if v is None:
            return None
        slot = Slot("vision", "", v.naming, scope=v.scope)
        lay = dataclasses.replace(rl.layout, slots={"vision": slot}, ignore=(), output=v.output,
                                  folder_weights=v.weights or rl.layout.folder_weights)
        return ResolvedLayout(lay, self.family(v.family), {"vision": self.naming(v.naming, v.family)})

    def all_layouts(self):
        """(name, ResolvedLayout or the MappingError that broke it): one bad file breaks only itself."""
        out = []
        for n in self.layout_names():
            try:
                out.append((n, self.layout(n)))
            except MappingError as e:
                out.append((n, e))
        return out


DEFAULT = Registry()
