"""Whole CLIPs (text and vision towers) written by the libraries themselves, each in its own
layout, and read back by them: the oracle for sdconv's whole-CLIP conversions.

One tiny OpenAI CLIP (clipref.reference_and_sd1's ViT-tiny.pt) is saved as an OpenAI state dict,
a TorchScript archive, an open_clip folder (open_clip's own config writer), an open_clip state
dict file, and a transformers CLIPModel folder (save_pretrained); the weights are mapped to
transformers' names by hand here, independently of sdconv. Features are computed in fp32 by the
library each layout belongs to.
"""
from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file, save_file

from tests.helpers import consumers as C
from tests.helpers.clipref import blocks_to_hf

# a source's name -> the layout (and library) it belongs to
HOME = {"openai_pt": "openai", "torchscript": "openai", "open_clip_folder": "open_clip",
        "open_clip_file": "open_clip", "hf": "hf"}
JIT_ATTRS = ("input_resolution", "context_length", "vocab_size")     # ints a TorchScript state_dict holds
OC_CFG = "open_clip_config.json"


def openai_to_clipmodel(sd: dict) -> dict:
    """OpenAI CLIP names (text and visual.*) -> transformers CLIPModel names, by hand."""
    out = {}

    out.update(blocks_to_hf(sd, "", "text_model."))
    out.update(blocks_to_hf(sd, "visual.", "vision_model."))
    out.update({
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].T,
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].T,
        "logit_scale": sd["logit_scale"],
    })
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def hf_clip_config(act: str = "quick_gelu"):
    from transformers import CLIPConfig
    text = dict(vocab_size=C.VOCAB, hidden_size=C.WIDTH, intermediate_size=C.FFN, num_hidden_layers=C.LAYERS,
                num_attention_heads=C.HEADS, max_position_embeddings=C.CONTEXT, hidden_act=act)
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=1, image_size=32,
                  patch_size=16, hidden_act=act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=C.PROJ)


def open_clip_from(sd: dict, act: str):
    m = C.open_clip_model(act)
    m.load_state_dict(sd, strict=True)
    return m.eval()


def save_open_clip_folder(model, folder: Path, model_cfg: dict) -> Path:
    """What open_clip's save_for_hf writes (weights as safetensors, its own config writer)."""
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.push_to_hf_hub import save_config_for_hf
    from open_clip.transform import PreprocessCfg
    set_model_preprocess_cfg(model, PreprocessCfg().__dict__)        # what create_model sets
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    save_config_for_hf(model, folder / OC_CFG, model_cfg)
    return folder


def write_whole_clips(d: Path, m) -> dict:
    """Every source layout of the whole CLIP `m` (clip.model.CLIP, fp32): name -> path."""
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    out = {"openai_pt": d / "ViT-tiny.pt"}
    if not out["openai_pt"].exists():
        torch.save(sd, out["openai_pt"])
    out["torchscript"] = d / "ViT-tiny-jit.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # torch.jit is deprecated
        torch.jit.trace_module(m, {"encode_text": C.token_ids()}, check_trace=False).save(str(out["torchscript"]))
    oc = open_clip_from(sd, "quick_gelu")
    out["open_clip_folder"] = save_open_clip_folder(oc, d / "oc-clip", C.open_clip_json_cfg("quick_gelu"))
    out["open_clip_file"] = d / "oc-clip.bin"
    torch.save(oc.state_dict(), out["open_clip_file"])
    from transformers import CLIPModel
    hf = CLIPModel(hf_clip_config()).eval()
    missing, unexpected = hf.load_state_dict(openai_to_clipmodel(sd), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    hf.save_pretrained(str(d / "hf-clip"))
    out["hf"] = d / "hf-clip"
    return out


def gelu_open_clip_folder(d: Path) -> Path:
    """An open_clip whole CLIP with exact GELU towers, its config saying so as open_clip's own
    configs do: by leaving quick_gelu out."""
    m = C.open_clip_model("gelu")
    C.seeded_randn_(m, 11)
    with torch.no_grad():
        m.logit_scale.fill_(4.6052)
    cfg = C.open_clip_json_cfg("gelu")
    del cfg["quick_gelu"]
    return save_open_clip_folder(m, d / "oc-gelu", cfg)


def state_dict(path: Path) -> dict:
    """The tensors of a whole CLIP as its layout stores them (a folder: its one weights file)."""
    path = Path(path)
    if path.is_dir():
        (w,) = [p for p in path.iterdir() if p.suffix == ".safetensors"]
        return load_file(str(w))
    if path.suffix == ".safetensors":
        return load_file(str(path))
    with zipfile.ZipFile(path) as z:
        scripted = any(n.endswith("/constants.pkl") for n in z.namelist())
    if scripted:                                    # a TorchScript archive (the test made it)
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in sd.items() if k not in JIT_ATTRS}


def bitwise_differences(a: dict, b: dict) -> list[str]:
    """Keys missing on either side, or whose dtype, shape or bytes differ."""
    diff = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k].contiguous(), b[k].contiguous()
        if x.dtype != y.dtype or x.shape != y.shape or \
                not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            diff.append(k)
    return diff


def features(library: str, path: Path, ids, img, act: str = "quick_gelu"):
    """(text features, image features) of the whole CLIP at `path`, run by `library`, fp32."""
    with torch.no_grad():
        if library == "openai":
            import clip.model
            with mock.patch.object(clip.model, "convert_weights", lambda model: None):   # keep fp32
                model = clip.model.build_model(state_dict(path)).eval()
            return model.encode_text(ids), model.encode_image(img)
        if library == "open_clip":
            import open_clip
            if Path(path).is_dir():
                model = open_clip.create_model("local-dir:" + str(path))
            else:
                model = C.open_clip_model(act)
                open_clip.load_checkpoint(model, str(path), strict=True)
            model.eval()
            return model.encode_text(ids), model.encode_image(img)
        from transformers import CLIPModel
        model, info = CLIPModel.from_pretrained(str(path), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        model.eval()
        t = model.get_text_features(input_ids=ids)
        i = model.get_image_features(pixel_values=img)
        return getattr(t, "pooler_output", t), getattr(i, "pooler_output", i)


def open_clip_config(folder: Path) -> dict:
    return json.loads((Path(folder) / OC_CFG).read_text())["model_cfg"]
