"""sdconv: extract and convert the CLIP text encoder(s) of Stable Diffusion checkpoints.

    from sdconv import convert, ConvertOptions
    result = convert("v1-5.safetensors", "clip-l-hf", ConvertOptions(to="hf", dtype="fp16"))

The API (see docs/api.md) is imported on first use, so that `import sdconv` and `sdconv --help`
stay fast and do not import torch; the TYPE_CHECKING block lets IDEs and type checkers see it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import (
    InputError, LayoutError, MappingError, OutputError, SdconvError, UnsafeInputError, UsageError,
)
from .version import __version__

# public name -> the module that defines it (imported when the name is first used)
_LAZY = {
    "convert": "sdconv.converters.engine",
    "make_plans": "sdconv.converters.engine",
    "make_plan": "sdconv.converters.engine",
    "Plan": "sdconv.converters.conversion",
    "Result": "sdconv.converters.conversion",
    "ConvertOptions": "sdconv.options",
    "Registry": "sdconv.converters.registry",
    "inspect": "sdconv.inspection",
    "verify": "sdconv.verification",
    "write_back": "sdconv.writeback",
    "sample": "sdconv.samples",
    "tokenize": "sdconv.tokenizer",
    "fingerprint": "sdconv.fingerprint",
    "Tokenizer": "sdconv.tokenizer",
}

if TYPE_CHECKING:
    from .converters.engine import convert, make_plan, make_plans
    from .converters.conversion import Plan, Result
    from .converters.registry import Registry
    from .fingerprint import fingerprint
    from .inspection import inspect
    from .options import ConvertOptions
    from .samples import sample
    from .tokenizer import Tokenizer, tokenize
    from .verification import verify
    from .writeback import write_back

__all__ = [*_LAZY, "SdconvError", "UsageError", "InputError", "UnsafeInputError", "LayoutError", "OutputError",
           "MappingError", "__version__"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sdconv' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value         # once imported, an ordinary attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
