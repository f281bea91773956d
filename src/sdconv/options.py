"""The options of a conversion, as one frozen, keyword-only object, and the choices they take.

The command line builds a ConvertOptions from its flags; the Python API takes one (or the same
fields as keywords). Every choice (output formats, dtypes, parameter names) is declared here or
in the dtype table, once, and the command line offers exactly these.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from .converters.dtypes import DTYPE_CHOICES
from .errors import UsageError

FORMATS = ("safetensors", "pt")                 # output containers (--format)
ENCODER_PARAMS = ("heads", "act")               # what an encoder's weights cannot say
PARAM_NAMES = (*ENCODER_PARAMS, "encoder")      # what --param may say (encoder: which kind it is)
AUTO = "auto"                                   # --from auto: detect the layout
# options added after batch runs began recording them: left out of a record while off, so that
# outputs made before still count as made with the same options
_RECORDED_WHEN_SET = ("whole_clip", "lora", "lora_from")


def check_params(params: Mapping | None) -> dict:
    """--param NAME=VALUE pairs, checked: only the names the engine knows."""
    out = {}
    for k, v in (params or {}).items():
        if k not in PARAM_NAMES:
            raise UsageError(f"unknown parameter {k!r}", f"known: {', '.join(PARAM_NAMES)}")
        out[k] = v
    return out


def parse_lora_spec(spec) -> tuple[str, float]:
    """FILE[:SCALE], or (FILE, SCALE): the file and its scale (1.0 when left out)."""
    if isinstance(spec, (tuple, list)):
        path, scale = spec
    else:
        path, scale = str(spec), 1.0
        head, sep, tail = path.rpartition(":")
        if sep and head and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail):
            path, scale = head, float(tail)
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        scale = float("nan")
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise UsageError(f"--lora {spec!r}: the scale must be a finite number",
                         "write FILE or FILE:SCALE, e.g. style.safetensors:0.8")
    return str(path), scale



@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """How to convert: every choice of `sdconv convert` but the input and output paths.

    Example:
        ConvertOptions(to="hf", dtype="fp16")
        ConvertOptions(to="openai", encoder="all", projection="ViT-L-14.pt")
    """
    to: str                                     # the target layout (see `sdconv layouts`)
    from_: str | None = None                    # the input's layout; None or "auto": detect it
    params: Mapping = field(default_factory=dict)   # heads, act, encoder: what the weights cannot say
    fmt: str | None = None                      # safetensors or pt; None: from the output's suffix
    dtype: str = "keep"                         # keep, fp32, fp16, bf16 (floats only)
    encoder: str | None = None                  # one encoder of several (clip_l, clip_g), or "all"
    projection: str | Path | None = None        # graft the text projection of this reference CLIP
    replace_projection: bool = False            # ... even over the encoder's own
    allow_synthetic: bool = False               # ... even if the reference's looks like a placeholder
    with_vision: str | Path | None = None       # assemble a whole CLIP with this reference's vision tower
    whole_clip: bool = False                    # the input is a whole CLIP: --with-vision the input itself
    force_activation: bool = False              # ... even if the target library runs another activation
    fix_position_ids: bool = False              # repair drifted or corrupt position_ids (recorded)
    strict: bool = False                        # warnings are errors
    force: bool = False                         # replace existing outputs
    lora: tuple = ()                            # LoRAs to merge, in order: "FILE[:SCALE]" or (FILE, SCALE)
    lora_from: str | None = None                # their format (kohya, diffusers, peft); None: detect it

    def __post_init__(self):
        if self.dtype not in DTYPE_CHOICES:
            raise UsageError(f"unknown dtype {self.dtype!r}", f"choose one of {', '.join(DTYPE_CHOICES)}")
        if self.fmt is not None and self.fmt not in FORMATS:
            raise UsageError(f"unknown format {self.fmt!r}", f"choose one of {', '.join(FORMATS)}")
        object.__setattr__(self, "params", MappingProxyType(check_params(self.params)))
        if self.from_ == AUTO:
            object.__setattr__(self, "from_", None)
        if self.encoder == "":
            object.__setattr__(self, "encoder", None)
        if isinstance(self.lora, (str, Path)):
            object.__setattr__(self, "lora", (self.lora,))
        object.__setattr__(self, "lora", tuple(parse_lora_spec(s) for s in self.lora))     # (FILE, SCALE) pairs
        if self.whole_clip and self.with_vision is not None:
            raise UsageError("--whole-clip takes the vision tower from the input itself; --with-vision names "
                             "another CLIP", "pass one of them")

    def replace(self, **changes) -> "ConvertOptions":
        return dataclasses.replace(self, **changes)

    def record(self) -> dict:
        """The options as plain JSON values (what a batch run records in each output)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "force" or (f.name in _RECORDED_WHEN_SET and not getattr(self, f.name)):
                continue
            v = getattr(self, f.name)
            if f.name == "lora":            # a file's sha256 too: another file of the same name is another LoRA
                from .converters.hashing import sha256_of
                v = [[p, s, sha256_of([p]) if Path(p).is_file() else None] for p, s in v]
            out[f.name] = dict(v) if f.name == "params" else (str(v) if isinstance(v, Path) else v)
        return out

    @classmethod
    def of(cls, options: "ConvertOptions | None", fields: dict) -> "ConvertOptions":
        """`options`, or one made from keyword fields (not both); unknown fields are a UsageError."""
        if options is not None and fields:
            raise UsageError(f"pass options or keywords, not both (got {', '.join(fields)})")
        if options is not None:
            return options
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in fields if k not in known]
        if unknown:
            raise UsageError(f"unknown option {unknown[0]!r}", f"ConvertOptions takes {', '.join(sorted(known))}")
        if "to" not in fields:
            raise UsageError("no target layout", "pass to=LAYOUT")
        return cls(**fields)
