"""LoRA mapping files (`mappings/lora/*.yaml`, kind: lora): how a LoRA format names the deltas it
holds for an encoder. A LoRA names each module it adapts as the family's naming spells the
module's weight (minus `.weight`), with `separator` between its parts, under a prefix per
encoder, followed by a part's suffix (down, up, alpha). The modules it may adapt are the
family's `linears`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .schema import SCHEMA_VERSION, Alias
from .schema_rows import (At, Parsed, flag, guarded, listed, mapping, named, obj, one_of, parse_object, row, strings,
                          text, whole)
from . import schema_values as values
from .yamlload import load_yaml


@dataclass(frozen=True)
class LoraEncoder(Parsed):
    """The keys under one prefix: the deltas of one encoder of the model the LoRA was trained on."""
    prefix: str
    kinds: tuple[str, ...] = row(strings)   # the encoders of a checkpoint it applies to ([]: the only one)


@dataclass(frozen=True)
class LoraParts(Parsed):
    """The suffixes of a module's tensors: down [rank, in], up [out, rank], alpha (0-d; absent: rank)."""
    down: str = row(text)
    up: str = row(text)
    alpha: str | None = row(text, default=None)
    module: str = row(text, default="")     # appended to the module name (a suffix that names it, to_q_lora)


@dataclass(frozen=True)
class LoraLayout(Parsed):
    name: str = row(values.file_name)
    family: str = row(text)
    description: str = row(text)
    naming: str = row(text)                 # whose weight keys, minus ".weight", name the modules
    separator: str = row(one_of((".", "_"), "separator"))
    encoders: dict = row(named(LoraEncoder, "encoder {}", given=lambda k: {"prefix": k}))
    parts: tuple[LoraParts, ...] = row(listed(obj(LoraParts, "part")))
    path: Path
    aliases: tuple[Alias, ...] = row(listed(obj(Alias, "alias")), default=())   # other spellings of module names
    unet: tuple[str, ...] = row(strings, default=())        # key prefixes of the UNet's deltas: counted, ignored
    # parts of formats sdconv does not apply: a key holding one of these is refused, not half-applied
    unsupported: dict = row(mapping(text), default={
        "dora_scale": "DoRA (weight-decomposed LoRA)", "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
        "hada_w1": "LoHa (LyCORIS)", "lokr_w1": "LoKr (LyCORIS)"})
    # where alphas are kept besides `.alpha` keys: a PEFT LoraConfig (lora_alpha, alpha_pattern;
    # use_dora / use_rslora refused), in a file beside the LoRA or in its metadata, JSON with each
    # field's name prefixed by the part's prefix
    config_file: str | None = row(values.file_in_folder(".json"), default=None)
    config_metadata: str | None = row(text, default=None)
    priority: int = row(whole(None), default=0, yaml="detect.priority")
    overrides: bool = row(flag, default=False)


@guarded
def parse_lora(path) -> LoraLayout:
    d = load_yaml(path)
    header = {"schema": values.equals(SCHEMA_VERSION, "unsupported schema {!r}", f"this sdconv reads schema {SCHEMA_VERSION}"),
              "kind": values.equals("lora", "expected kind 'lora', found {!r}")}
    return parse_object(LoraLayout, d, At(path, d.line, "lora"), header=header, path=Path(path))
