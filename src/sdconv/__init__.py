"""sdconv: extract and convert the CLIP text encoder(s) of Stable Diffusion checkpoints.

The API (`sdconv.convert`, `sdconv.make_plan`, `sdconv.make_plans`) is imported on first use,
so that `sdconv --help` and `sdconv layouts` start fast.
"""
__version__ = "0.1.0"

from .converters.errors import (  # noqa: E402  (light: no engine, no torch)
    InputError, LayoutError, MappingError, OutputError, SdconvError, UnsafeInputError, UsageError,
)

_API = ("convert", "make_plan", "make_plans")

__all__ = [*_API, "SdconvError", "UsageError", "InputError", "UnsafeInputError", "LayoutError", "OutputError",
           "MappingError", "__version__"]


def __getattr__(name):
    if name in _API:
        from .converters import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'sdconv' has no attribute {name!r}")
