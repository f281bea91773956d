"""Builders for tiny synthetic encoders (no consumer library needed)."""
from __future__ import annotations

import functools

import torch
from safetensors import safe_open

from sdconv.converters.folders import open_source
from sdconv.converters.registry import DEFAULT
from sdconv.samples import write_canonical

LAYOUTS = ["ldm", "hf", "diffusers", "openai", "open_clip"]
ALL_LAYOUTS = ["comfy", "diffusers", "hf", "ldm", "open_clip", "openai", "sd3", "sgm"]
TINY = {"vocab": 49408, "context": 77, "width": 128, "ffn": 512, "layers": 2}


def distinct_canonical(with_proj=True, with_logit_scale=True, seed=0, width=128, layers=2, vocab=49408) -> dict:
    # copies: a test that edits a tensor must not change the cached one other tests use
    return {k: v.clone() for k, v in _distinct_canonical(with_proj, with_logit_scale, seed, width, layers, vocab).items()}


@functools.lru_cache(maxsize=None)
def _distinct_canonical(with_proj, with_logit_scale, seed, width, layers, vocab) -> dict:
    """Canonical tensors in which every value in the whole encoder is distinct, so any mix-up
    of tensors, rows or chunks changes some value."""
    fam = DEFAULT.family("clip_text")
    sizes = dict(TINY, width=width, ffn=4 * width, layers=layers, proj=width, vocab=vocab)
    g = torch.Generator().manual_seed(seed)
    out, offset = {}, 0
    for spec in fam.tensors:
        if spec.name == "text_proj.weight" and not with_proj:
            continue
        if spec.name == "logit_scale" and not with_logit_scale:
            continue
        shape = [sizes[s] if isinstance(s, str) else s for s in spec.shape]
        names = [spec.name.replace("<layer>", str(i)) for i in range(layers)] if "<layer>" in spec.name else [spec.name]
        for n in names:
            numel = 1
            for d in shape:
                numel *= d
            vals = (torch.randperm(numel, generator=g).double() + offset) * 1e-7 - 0.1
            out[n] = vals.float().reshape(shape)
            offset += numel
    if "logit_scale" in out:
        out["logit_scale"] = torch.tensor(4.6052)       # what trained CLIPs hold (a random one looks fake)
    return out


def write_layout(canon: dict, path, layout: str, fmt="safetensors", params=None):
    write_canonical(canon, path, layout, params or {"heads": 2, "act": "quick_gelu"}, fmt=fmt)
    return path


def read_all(path) -> dict:
    """Every tensor of a file or folder output, as {key: tensor} (folder keys with sub-folder)."""
    src = open_source(path)
    return {k: src.load(k).clone() for k in src.keys()}


def target_slot(layout: str, identity: str):
    """The slot an encoder of kind `identity` is written to, or None if the layout has none."""
    from sdconv.converters.engine import target_slot
    from sdconv import UsageError
    rl = DEFAULT.layout(layout)
    try:
        return target_slot(rl, identity, rl.family.kinds)[0]
    except UsageError:
        return None


def holdable(canon: dict, slot) -> dict:
    """The canonical tensors a slot can hold."""
    return {k: v for k, v in canon.items() if k not in slot.omit}


def drop_last_blocks(canon: dict, n: int, layers: int) -> dict:
    gone = {f"blk.{i}." for i in range(layers - n, layers)}
    return {k: v for k, v in canon.items() if not any(k.startswith(g) for g in gone)}


def write_multi(path, layout: str, encoders: dict, extra: dict | None = None):
    """A checkpoint holding several encoders: {kind: canonical tensors} written into one file
    (or one folder) of `layout`, each in its slot, plus `extra` tensors (UNet stand-ins...)."""
    import shutil
    import tempfile
    from pathlib import Path

    from sdconv.converters.writers import write_safetensors
    path = Path(path)
    folder = DEFAULT.layout(layout).layout.output == "folder"
    merged = dict(extra or {})
    with tempfile.TemporaryDirectory() as tmp:
        for kind, canon in encoders.items():
            one = Path(tmp) / (kind if folder else f"{kind}.safetensors")
            act = "quick_gelu" if kind == "clip_l" else "gelu"
            write_layout(holdable(canon, target_slot(layout, kind)), one, layout,
                         params={"heads": 2, "act": act, "encoder": kind})
            if folder:
                for sub in (p for p in one.iterdir() if p.is_dir()):
                    shutil.copytree(sub, path / sub.name)
            else:
                merged.update(read_all(one))
    if not folder:
        write_safetensors(merged, path, {"format": "pt"})
    return path


def sparse_safetensors(path, keys: dict, values: dict | None = None):
    """A full-size safetensors file without writing its data: a real header ({key: (shape,
    dtype)}), the few `values` {key: bytes} written in place, the rest a sparse hole of zeros."""
    import json
    import struct
    from sdconv.converters.dtypes import size
    header, offset = {}, 0
    for k, (shape, dtype) in keys.items():
        n = 1
        for d in shape:
            n *= d
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n * size(dtype)]}
        offset += n * size(dtype)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k, b in (values or {}).items():
            f.seek(8 + len(raw) + header[k]["data_offsets"][0])
            f.write(b)
        f.truncate(8 + len(raw) + offset)
    return path


def realkeys(name: str, prefix: str, dtype: str = "F16") -> dict:
    """{prefix + key: (shape, dtype)} from a key list of real checkpoints (tests/data)."""
    from pathlib import Path
    out = {}
    for line in (Path(__file__).parents[1] / "data" / name).read_text().splitlines():
        key, shape = line.rsplit(" ", 1)
        dims = [int(x) for x in shape.strip("[]").split(",") if x]
        out[prefix + key] = (dims, "I64" if key.endswith("position_ids") else dtype)
    return out
