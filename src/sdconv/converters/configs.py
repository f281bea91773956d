"""Config-file formats that carry what the weights cannot say (heads, activation), read from
inputs and written with outputs. A closed vocabulary, like the transforms, declared by what each
format serves (SLOT_FORMATS, CLIP_FORMATS): mapping files may name only those."""
from __future__ import annotations

import json
from typing import Callable, NamedTuple

from . import dtypes, untrusted

# The activations sdconv serves: the reference forward pass computes them (clip_forward.py) and
# every config format can say them (open_clip's has a single quick_gelu flag).
ACTIVATIONS = ("quick_gelu", "gelu")

# the torch_dtype a transformers config states: floats of 16 bits and wider
HF_TORCH_DTYPE = {d.code: d.torch for d in dtypes.TABLE if d.is_float and d.size >= 2}


def read_hf_clip_text(cfg: untrusted.Value) -> dict:
    """Parameters and declared sizes from a transformers CLIPTextConfig (or a CLIPConfig), each
    checked for its type and range (MalformedInputError naming the file and field)."""
    cfg = cfg.obj()
    text = cfg.get("text_config")
    if text is not None and text.is_object():
        cfg = text
    out = {}
    if (heads := cfg.get("num_attention_heads")) is not None:
        out["heads"] = heads.whole(1, untrusted.MAX_HEADS)
    if (act := cfg.get("hidden_act")) is not None:
        out["act"] = act.text(most=64)
    declared = {}
    for name, field in (("width", "hidden_size"), ("layers", "num_hidden_layers"), ("ffn", "intermediate_size"),
                        ("vocab", "vocab_size"), ("context", "max_position_embeddings")):
        if (v := cfg.get(field)) is not None:
            declared[name] = v.whole(1, 1 << 40)
    return {"params": out, "declared": declared}


def read_hf_clip_vision(cfg: untrusted.Value) -> dict:
    """Parameters and declared sizes of the vision tower a transformers CLIPConfig states."""
    vision = cfg.obj().get("vision_config")
    out, declared = {}, {}
    if vision is None or not vision.is_object():
        return {"params": out, "declared": declared}
    if (heads := vision.get("num_attention_heads")) is not None:
        out["heads"] = heads.whole(1, untrusted.MAX_HEADS)
    if (act := vision.get("hidden_act")) is not None:
        out["act"] = act.text(most=64)
    for name, field in (("width", "hidden_size"), ("layers", "num_hidden_layers"), ("ffn", "intermediate_size"),
                        ("patch", "patch_size"), ("channels", "num_channels"), ("image", "image_size")):
        if (v := vision.get(field)) is not None:
            declared[name] = v.whole(1, 1 << 40)
    return {"params": out, "declared": declared}


# open_clip's own defaults (open_clip.model: CLIP(quick_gelu=False), CLIPTextCfg.heads,
# CLIPVisionCfg.head_width): what it runs when its config does not say
OPEN_CLIP_TEXT_HEADS = 8
OPEN_CLIP_HEAD_WIDTH = 64


def _open_clip_model_cfg(cfg: untrusted.Value) -> untrusted.Value:
    """open_clip_config.json's `model_cfg` (open_clip takes the whole file when it has none)."""
    model = cfg.obj().get("model_cfg")
    return model.obj() if model is not None else cfg


def _open_clip_act(model: untrusted.Value) -> str:
    """One flag for both towers; absent, open_clip builds exact GELU."""
    flag = model.get("quick_gelu")
    return "quick_gelu" if flag is not None and flag.flag() else "gelu"


def _open_clip_sizes(tower: untrusted.Value, fields) -> dict:
    """Whole-number sizes a tower config states (a [h, w] pair, as some ViTs give, is not one)."""
    return {name: v.whole(1, 1 << 40) for name, field in fields
            if (v := tower.get(field)) is not None and not isinstance(v.raw, list)}


def read_open_clip_text(cfg: untrusted.Value) -> dict:
    """The text tower's parameters and declared sizes from an open_clip_config.json."""
    model = _open_clip_model_cfg(cfg)
    out = {"act": _open_clip_act(model)}
    text = model.get("text_cfg")
    if text is None:
        return {"params": out, "declared": {}}
    heads = text.obj().get("heads")
    out["heads"] = heads.whole(1, untrusted.MAX_HEADS) if heads is not None else OPEN_CLIP_TEXT_HEADS
    declared = _open_clip_sizes(text, (("width", "width"), ("layers", "layers"), ("vocab", "vocab_size"),
                                       ("context", "context_length")))
    return {"params": out, "declared": declared}


def read_open_clip_vision(cfg: untrusted.Value) -> dict:
    """The vision tower's parameters and declared sizes from an open_clip_config.json: heads are
    its width over its head width."""
    model = _open_clip_model_cfg(cfg)
    out = {"act": _open_clip_act(model)}
    vision = model.get("vision_cfg")
    if vision is None:
        return {"params": out, "declared": {}}
    hw = vision.obj().get("head_width")
    out["head_width"] = hw.whole(1, 1 << 20) if hw is not None else OPEN_CLIP_HEAD_WIDTH
    declared = _open_clip_sizes(vision, (("width", "width"), ("layers", "layers"), ("patch", "patch_size"),
                                         ("image", "image_size")))
    return {"params": out, "declared": declared}


def write_hf_clip_text(arch: dict, params: dict, dtype_code: str, vision=None) -> str:
    cfg = {
        "architectures": ["CLIPTextModelWithProjection" if arch.get("proj") else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": arch["vocab"],
        "hidden_size": arch["width"],
        "intermediate_size": arch["ffn"],
        "num_hidden_layers": arch["layers"],
        "num_attention_heads": params["heads"],
        "max_position_embeddings": arch["context"],
        "hidden_act": params["act"],
        "layer_norm_eps": 1e-05,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        # SD-era token ids: eos_token_id 2 selects transformers' argmax pooling, which is what
        # OpenAI CLIP does (the end-of-text token 49407 is the largest id).
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    if arch.get("proj"):
        cfg["projection_dim"] = arch["proj"]
    if dtype_code in HF_TORCH_DTYPE:
        cfg["torch_dtype"] = cfg["dtype"] = HF_TORCH_DTYPE[dtype_code]   # v4 reads one, v5 the other
    return json.dumps(cfg, indent=2) + "\n"


def image_geometry(varch: dict) -> tuple[int, int]:
    """(image size, patch size) of a ViT: positions = grid^2 + 1 (the class token)."""
    grid = round((varch["positions"] - 1) ** 0.5)
    return grid * varch["patch"], varch["patch"]


class VisionTower(NamedTuple):
    """What a whole CLIP's config says of its vision side."""
    arch: dict
    params: dict                # heads, act
    mean: tuple                 # how its images are normalised (the vision family's)
    std: tuple


def write_hf_clip(arch: dict, params: dict, dtype_code: str, vision: VisionTower) -> str:
    """transformers CLIPModel config: text and vision halves, one projection dim."""
    varch, vparams = vision.arch, vision.params
    text = json.loads(write_hf_clip_text(arch, params, dtype_code))
    for k in ("architectures", "torch_dtype", "dtype"):
        text.pop(k, None)
    image, patch = image_geometry(varch)
    vis = {"model_type": "clip_vision_model", "hidden_size": varch["width"], "intermediate_size": varch["ffn"],
           "num_hidden_layers": varch["layers"], "num_attention_heads": vparams["heads"], "image_size": image,
           "patch_size": patch, "num_channels": varch["channels"], "hidden_act": vparams["act"],
           "layer_norm_eps": 1e-05, "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02,
           "initializer_factor": 1.0, "projection_dim": varch["proj"]}
    cfg = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": arch["proj"],
           "logit_scale_init_value": 2.6592, "initializer_factor": 1.0, "text_config": text, "vision_config": vis}
    if dtype_code in HF_TORCH_DTYPE:
        cfg["torch_dtype"] = cfg["dtype"] = HF_TORCH_DTYPE[dtype_code]
    return json.dumps(cfg, indent=2) + "\n"


def write_open_clip(arch: dict, params: dict, dtype_code: str, vision: VisionTower) -> str:
    """open_clip_config.json for open_clip.create_model_and_transforms("local-dir:...") and
    get_tokenizer("local-dir:..."): the towers (the text context is the tokenizer's context
    length; no hf_tokenizer_name: open_clip's own CLIP tokenizer), and how images are prepared.
    One activation flag serves both towers (the caller checks they agree)."""
    varch, vparams = vision.arch, vision.params
    image, patch = image_geometry(varch)
    cfg = {"model_cfg": {
        "embed_dim": arch["proj"],
        "quick_gelu": params["act"] == "quick_gelu",
        "vision_cfg": {"image_size": image, "layers": varch["layers"], "width": varch["width"], "patch_size": patch,
                       "head_width": varch["width"] // vparams["heads"], "mlp_ratio": varch["ffn"] / varch["width"]},
        "text_cfg": {"context_length": arch["context"], "vocab_size": arch["vocab"], "width": arch["width"],
                     "heads": params["heads"], "layers": arch["layers"], "mlp_ratio": arch["ffn"] / arch["width"]},
    }, "preprocess_cfg": {"mean": list(vision.mean), "std": list(vision.std), "interpolation": "bicubic",
                          "resize_mode": "shortest"}}
    return json.dumps(cfg, indent=2) + "\n"


class SlotFormat(NamedTuple):
    read: Callable              # config (untrusted.Value) -> {"params": ..., "declared": ...}
    write: Callable | None      # (arch, params, dtype code) -> text; None: read only (file layouts)


# An encoder slot's config (`encoders: NAME: config:`): read from inputs, written with outputs.
# open_clip_text is the text half of open_clip_config.json, which a text tower alone cannot
# be loaded from: read, never written (a folder layout may not name it).
SLOT_FORMATS = {"hf_clip_text": SlotFormat(read_hf_clip_text, write_hf_clip_text),
                "open_clip_text": SlotFormat(read_open_clip_text, None)}
# A whole CLIP's config (a layout's `vision: config:`), written by --with-vision:
# (arch, params, dtype code, VisionTower) -> text.
CLIP_FORMATS = {"hf_clip": write_hf_clip, "open_clip": write_open_clip}
# ... and its vision half, read from inputs: config -> {"params": {heads or head_width, act},
# "declared": {...}}. Every CLIP format has a reader (tests/test_whole_clip.py).
CLIP_READERS = {"hf_clip": read_hf_clip_vision, "open_clip": read_open_clip_vision}

