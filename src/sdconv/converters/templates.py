"""Name templates: canonical names and keys with a <layer> placeholder (`blk.<layer>.attn_q.weight`),
filled with a layer number or matched against names to find it."""
from __future__ import annotations

import re

from .schema import LAYER


def fill_layer(template: str, layer: int | None) -> str:
    """The template with <layer> replaced by `layer` (unchanged when layer is None)."""
    return template.replace(LAYER, str(layer)) if layer is not None else template


def layer_pattern(template: str) -> re.Pattern:
    """A pattern that matches the template's names, with the layer number as group 1."""
    head, _, tail = template.partition(LAYER)
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) if LAYER in template else re.escape(template))


def expand(template: str, layers: int) -> list[str]:
    """Every name a template stands for in an encoder of `layers` blocks."""
    return [fill_layer(template, i) for i in range(layers)] if LAYER in template else [template]
