"""Config-file formats that carry what the weights cannot say (heads, activation), read from
inputs and written with outputs. A closed vocabulary, like the transforms."""
from __future__ import annotations

import json

HF_TORCH_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def read_hf_clip_text(cfg: dict) -> dict:
    """Parameters and declared sizes from a transformers CLIPTextConfig (or a CLIPConfig)."""
    if "text_config" in cfg and isinstance(cfg["text_config"], dict):
        cfg = cfg["text_config"]
    out = {}
    if "num_attention_heads" in cfg:
        out["heads"] = int(cfg["num_attention_heads"])
    if "hidden_act" in cfg:
        out["act"] = str(cfg["hidden_act"])
    declared = {"width": cfg.get("hidden_size"), "layers": cfg.get("num_hidden_layers"),
                "ffn": cfg.get("intermediate_size"), "vocab": cfg.get("vocab_size"),
                "context": cfg.get("max_position_embeddings")}
    return {"params": out, "declared": {k: v for k, v in declared.items() if v is not None}}


def write_hf_clip_text(arch: dict, params: dict, dtype_code: str) -> str:
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


READERS = {"hf_clip_text": read_hf_clip_text}
WRITERS = {"hf_clip_text": write_hf_clip_text}
