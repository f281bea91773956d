"""sdconv: extract and convert the CLIP text encoder(s) of Stable Diffusion checkpoints."""
__version__ = "0.1.0"

from .converters.engine import convert, make_plan, make_plans  # noqa: E402
from .converters.errors import (  # noqa: E402
    InputError, LayoutError, MappingError, OutputError, SdconvError, UnsafeInputError, UsageError,
)

__all__ = ["convert", "make_plan", "make_plans", "SdconvError", "UsageError", "InputError", "UnsafeInputError",
           "LayoutError", "OutputError", "MappingError", "__version__"]
