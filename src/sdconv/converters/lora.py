"""Text-encoder LoRAs (--lora FILE[:SCALE]): read a LoRA file as its format's mapping file names
its tensors (mappings/lora/*.yaml), find which of an input's encoders each of its parts adapts,
and merge: for each matrix it targets, W' = W + sum over the LoRAs, in order, of
scale * (alpha / rank) * up @ down, computed in fp32, added once, cast once to the output dtype.
The UNet's deltas are counted and ignored; formats sdconv does not apply (DoRA, LoHa, LoKr) and
targets the encoder lacks are refused, never half-applied."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, LayoutError, UsageError
from ..options import parse_lora_spec as parse_spec
from . import dtypes, untrusted
from .registry import DEFAULT, Registry, ResolvedLora
from .schema import LAYER
from .synthetic import decode

@dataclass(frozen=True)
class Delta:
    """One module's low-rank delta: up @ down, times alpha / rank."""
    canonical: str              # the matrix it adapts (blk.3.attn_q.weight)
    down: str                   # key of down [rank, in]
    up: str                     # key of up [out, rank]
    alpha: float
    rank: int
    shape: tuple                # (out, in)


@dataclass
class LoraFile:
    """A LoRA file read: its deltas per encoder part (a prefix of its keys)."""
    path: str
    source: object
    format: str
    scale: float
    parts: dict                 # prefix -> {canonical: Delta}
    kinds: dict                 # prefix -> the encoder kinds it applies to (() = the only one)
    unet_keys: int
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return Path(str(self.path)).name

    def record(self, changed: dict) -> dict:
        """What the output's metadata says of it; `changed`: {encoder: [canonical names]}."""
        return {"file": self.name, "sha256": self.source.sha256(), "format": self.format, "scale": self.scale,
                "changed": {e: len(c) for e, c in changed.items()}, "unet_keys_ignored": self.unet_keys}


def _modules(rl: ResolvedLora) -> list[tuple[re.Pattern, str]]:
    """(pattern of a module's name in this format, the canonical template of its matrix)."""
    out = []
    linears = set(rl.family.linears)
    for e in rl.naming.entries:
        if e.canonical[0] in linears and e.transform == "rename" and e.key.endswith(".weight"):
            name = e.key[:-len(".weight")].replace(".", rl.layout.separator)
            pattern = re.escape(name).replace(re.escape(LAYER), r"(\d+)")
            out.append((re.compile(pattern), e.canonical[0]))
    return out


def _canonical(rl, modules, module: str) -> str | None:
    for a in rl.layout.aliases:
        src, dst = (x.replace(".", rl.layout.separator) for x in (a.source, a.target))
        if module.startswith(src):
            module = dst + module[len(src):]
            break
    for pattern, template in modules:
        m = pattern.fullmatch(module)
        if m:
            return template.replace(LAYER, m.group(1)) if m.groups() else template
    return None


def _config(lay, source, path, prefix: str):
    """The PEFT LoraConfig fields kept for the part at `prefix` (a file beside the LoRA, or its
    metadata with prefixed fields), as {field: untrusted.Value}; {} without one."""
    if lay.config_file:
        p = Path(path).parent / lay.config_file
        return dict(untrusted.read_json(p).obj().items()) if p.is_file() else {}
    raw = source.metadata().get(lay.config_metadata) if lay.config_metadata else None
    if not raw:
        return {}
    head = prefix.rstrip(".") + "."
    doc = untrusted.parse_json(raw, f"{path} metadata {lay.config_metadata}").obj()
    return {k[len(head):]: v for k, v in doc.items() if k.startswith(head)}


def _alphas(lay, source, path, prefix: str):
    """module name -> alpha, from the part's PEFT config (lora_alpha, alpha_pattern); None without one."""
    cfg = _config(lay, source, path, prefix)
    if not cfg:
        return None
    for flag, what in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA (alpha / sqrt(rank))")):
        if (v := cfg.get(flag)) is not None and v.raw is True:
            raise UsageError(f"{path}: {what} adapters are not applied by sdconv", "use a plain LoRA")
    alpha = cfg.get("lora_alpha")
    alpha = float(alpha.number()) if alpha is not None else None
    pattern = cfg.get("alpha_pattern")
    patterns = {k: float(v.number()) for k, v in pattern.obj().items()} if pattern is not None and pattern.raw else {}

    def alpha_of(module: str, rank: int) -> float:
        for key, a in patterns.items():            # PEFT's get_pattern_key: the first that matches
            if re.match(rf"(.*\.)?({key})$", module):
                return a
        return alpha if alpha is not None else float(rank)
    return alpha_of


def _explain(rl: ResolvedLora, source, path) -> LoraFile | str:
    """This format's reading of the file, or why it does not read it."""
    lay = rl.layout
    modules = _modules(rl)
    prefixes = sorted(lay.encoders, key=len, reverse=True)
    groups: dict = {}
    unet, foreign = 0, []
    for key in source.keys():
        if any(key.startswith(p) for p in lay.unet):
            unet += 1
            continue
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        hit = None
        if prefix is not None:
            rest = key[len(prefix):]
            for part in lay.parts:
                for role in ("down", "up", "alpha"):
                    suffix = getattr(part, role)
                    if suffix and rest.endswith(suffix):
                        hit = (role, rest[:-len(suffix)] + part.module.replace(".", lay.separator))
                        break
                if hit:
                    break
        if hit is None:
            foreign.append(key)
            continue
        groups.setdefault((prefix, hit[1]), {})[hit[0]] = key
    if foreign:
        return f"{len(foreign)} keys it does not name, e.g. {foreign[0]!r}"
    if not groups and not unet:
        return "no keys of this format"
    alphas = {p: _alphas(lay, source, path, p) for p in {p for p, _ in groups}}
    parts: dict = {}
    for (prefix, module), roles in sorted(groups.items()):
        canonical = _canonical(rl, modules, module)
        where = f"{path}: {prefix}{module}"
        if canonical is None:
            raise UsageError(f"{where} adapts a module that is not a linear layer of a CLIP text encoder",
                             "sdconv applies LoRAs to q, k, v, out, fc1, fc2 and the text projection")
        if "down" not in roles or "up" not in roles:
            raise InputError(f"{where} has {' and '.join(sorted(roles))} but not both down and up", "the LoRA is damaged")
        down, up = source.info(roles["down"]), source.info(roles["up"])
        if len(down.shape) != 2 or len(up.shape) != 2:
            raise UsageError(f"{where}: a {len(down.shape)}-d delta (a convolution's?) is not applied by sdconv",
                             "text-encoder LoRAs adapt linear layers")
        rank = down.shape[0]
        if up.shape[1] != rank or not (down.is_float and up.is_float):
            raise InputError(f"{where}: up {list(up.shape)} and down {list(down.shape)} do not make a rank-{rank} delta",
                             "the LoRA is damaged")
        if "alpha" in roles:
            alpha = float(decode(source.raw(roles["alpha"]), source.info(roles["alpha"]).dtype)[0])
        elif alphas[prefix] is not None:
            alpha = alphas[prefix](module.replace(lay.separator, "."), rank)
        else:
            alpha = float(rank)
        parts.setdefault(prefix, {})[canonical] = Delta(canonical, roles["down"], roles["up"], alpha, rank,
                                                        (up.shape[0], down.shape[1]))
    return LoraFile(str(path), source, lay.name, 1.0, parts, {p: lay.encoders[p].kinds for p in parts}, unet)


def read_lora(spec, lora_from: str | None = None, registry: Registry = DEFAULT, text_only: bool = True) -> LoraFile:
    """Open and read one LoRA (`spec`: FILE[:SCALE] or (FILE, SCALE)); its format detected unless
    given. `text_only`: one that adapts the UNet alone is an error (it changes no text encoder)."""
    from .remote_sources import open_input
    path, scale = parse_spec(spec)
    source = open_input(path)
    if source.is_folder:                    # a PEFT adapter folder
        raise UsageError(f"{path}: a folder", "name the LoRA's weights file (for PEFT: adapter_model.safetensors)")
    names = [lora_from] if lora_from else registry.lora_names()
    # what the formats tried do not apply: refused before any of them half-reads the file
    refused = {s: w for n in names for s, w in registry.lora(n).layout.unsupported.items()}
    unsupported = {w for k in source.keys() for s, w in refused.items() if s in k}
    if unsupported:
        raise UsageError(f"{path}: a {sorted(unsupported)[0]} file; sdconv applies plain LoRAs only",
                         "merge it with the tool that trained it")
    reasons = []
    for name in names:
        got = _explain(registry.lora(name), source, path)
        if isinstance(got, LoraFile):
            got.scale = scale
            if not got.parts and text_only:
                raise UsageError(f"{path}: no text-encoder weights in this LoRA ({got.unet_keys} UNet keys)",
                                 "it adapts the UNet only: the text encoder is the checkpoint's own")
            return got
        reasons.append(f"{name}: {got}")
    raise LayoutError(f"{path}: not a LoRA file sdconv reads ({'; '.join(reasons)})",
                      "pass --lora-from FORMAT if it is one of them; `sdconv inspect` shows its keys")


def bind(loras: list[LoraFile], found: list, all_found: list, path) -> dict:
    """{identity: [(LoraFile, {canonical: Delta})]} for the encoders `found` (those --encoder
    selected) of an input holding `all_found`. Each LoRA part goes to the encoder of its kinds
    (a kind-less part, or a lone part and a lone encoder of no known kind, to the only one);
    parts for an encoder not selected are noted and ignored; targets the encoder lacks are errors."""
    out: dict = {f.identity: [] for f in found}
    for lf in loras:
        for prefix, deltas in lf.parts.items():
            kinds = lf.kinds[prefix]
            target = [f for f in all_found if f.identity in kinds] if kinds else list(found if len(found) == 1 else all_found)
            lone = all_found[0] if len(all_found) == 1 else None
            if not target and lone is not None and len(lf.parts) == 1 and lone.identity not in lone.read.layout.family.kinds:
                target = [lone]             # an encoder of no known kind (a custom width): the LoRA's only part
            if len(target) != 1:
                names = ", ".join(f.identity for f in all_found)
                raise UsageError(f"--lora {lf.name}: its {prefix!r} part adapts "
                                 f"{' or '.join(kinds) if kinds else 'one encoder'}; {path} holds {names}",
                                 "use the LoRA made for this model" if not target else "choose one with --encoder")
            f = target[0]
            if f.identity not in out:
                lf.notes.append(f"{len(deltas)} modules of its {prefix!r} part adapt {f.identity}, not selected: ignored")
                continue
            for c, d in deltas.items():
                have = f.read.shapes.get(c)
                if have is None:
                    raise UsageError(f"--lora {lf.name}: it adapts {c} ({prefix}), which {f.identity} in {path} lacks",
                                     "use the LoRA made for this model")
                if tuple(have) != d.shape:
                    raise UsageError(f"--lora {lf.name}: its delta for {c} is {list(d.shape)}, the encoder's matrix "
                                     f"{list(have)}", "use the LoRA made for this model")
            out[f.identity].append((lf, deltas))
    return out


class LoraReader:
    """A reader of canonical tensors with LoRAs merged into the matrices they adapt: fp32 sums,
    added once, cast once to the dtype the output holds the tensor in."""

    def __init__(self, inner, applied: list, dtype: str):
        self.inner, self.applied, self.cast = inner, applied, dtype

    def dtype(self, canonical: str) -> str:
        return self.inner.dtype(canonical)

    def origin(self, canonical: str) -> str:
        return self.inner.origin(canonical)

    def load(self, canonical: str) -> dict:
        got = self.inner.load(canonical)
        return {c: self.merged(c, t) for c, t in got.items()}

    def merged(self, canonical: str, t):
        import torch
        deltas = [(lf, d[canonical]) for lf, d in self.applied if canonical in d]
        if not deltas:
            return t
        total = None
        for lf, d in deltas:
            up, down = lf.source.load(d.up).float(), lf.source.load(d.down).float()
            step = (up @ down) * (lf.scale * d.alpha / d.rank)
            total = step if total is None else total + step
        out = dtypes.torch_dtype(dtypes.cast_code(dtypes.code_of(t.dtype), self.cast))
        return (t.to(torch.float32) + total).to(out)


def apply(canonical: dict, applied: list) -> dict:
    """Canonical tensors with the LoRAs merged (verify), kept in their dtypes."""
    r = LoraReader(None, applied, "keep")
    return {c: r.merged(c, t) for c, t in canonical.items()}


def describe(path, registry: Registry = DEFAULT) -> dict:
    """What a LoRA file holds (inspect): its format, and per part the modules, ranks, alphas and blocks."""
    lf = read_lora(path, None, registry, text_only=False)
    parts = {}
    for prefix, deltas in lf.parts.items():
        blocks = sorted({int(c.split(".")[1]) for c in deltas if c.startswith("blk.")})
        parts[prefix] = {"kinds": list(lf.kinds[prefix]), "modules": len(deltas),
                         "ranks": sorted({d.rank for d in deltas.values()}),
                         "alphas": sorted({d.alpha for d in deltas.values()}), "blocks": blocks,
                         "targets": sorted({re.sub(r"^blk\.\d+\.", "blk.N.", c) for c in deltas})}
    return {"file": str(path), "format": lf.format, "encoders": parts, "unet_keys": lf.unet_keys,
            "bytes": lf.source.size_bytes(), "metadata": dict(lf.source.metadata())}
