"""Oracle helpers for the Stable Diffusion multi-encoder layouts (sgm, sd3, comfy, SD2 ldm, diffusers
text_encoder_2, the 23-block SD2 encoder). Independent of sdconv, like ``consumers.py`` (reused here):

- sources are written with hand-made key names, from the tiny references of ``consumers.py``
  (or a 3-block one built the same way);
- full-size files are built from the key lists of real checkpoints (``tests/data``);
- the full-size reference forward runs open_clip's own ``TextTransformer`` on the source tensors
  (open_clip naming; CLIP-L goes through the hand mapping ``consumers.hf_to_oc``).
"""
from __future__ import annotations

import ctypes
import gc
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from tests.helpers import consumers as C

DATA = Path(__file__).parents[1] / "data"

# prefixes (LAYOUTS.md §3.6-3.9, §6)
SD2_PREFIX = "cond_stage_model.model."
SGM_L = "conditioner.embedders.0.transformer."
SGM_G = "conditioner.embedders.1.model."
SGM_REFINER_G = "conditioner.embedders.0.model."
SD3_L = "text_encoders.clip_l.transformer."
SD3_G = "text_encoders.clip_g.transformer."

FAKE_SGM_KEYS = {  # UNet / VAE stand-ins of an sgm / sd3 file
    "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
    "model.diffusion_model.out.2.bias": (4,),
    "first_stage_model.encoder.conv_in.weight": (32, 3, 3, 3),
    "first_stage_model.decoder.conv_out.bias": (3,),
}
FAKE_SD3_KEYS = {
    "model.diffusion_model.x_embedder.proj.weight": (32, 16, 2, 2),
    "first_stage_model.decoder.conv_out.bias": (3,),
    "text_encoders.t5xxl.transformer.shared.weight": (64, 16),
    "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": (16,),
}


def _fake(keys: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in keys.items()}


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def save(sd: dict, path) -> Path:
    """Write a .safetensors file tensor by tensor (safetensors' save_file builds the whole file in
    memory first, which doubles the peak for the 1.4 GB full-size files). Checked below against
    safetensors' own reader."""
    header, offset = {}, 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        header[k] = {"dtype": _ST_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for v in sd.values():
            v = v.detach().contiguous()
            f.write(memoryview(v.reshape(-1).view(torch.uint8).numpy()))
    return Path(path)


def release_memory() -> None:
    """Free what the big tensors left behind: gc, then glibc's malloc_trim, which hands freed heap
    pages back to the OS (freed 10-30 MB tensors otherwise stay in the process's resident set)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: only the resident-set figure is affected
        pass


def metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


# --------------------------------------------------------------------------------------------
# Tiny references
# --------------------------------------------------------------------------------------------
def build_reference(act: str, layers: int, seed: int) -> C.Reference:
    """Like ``consumers.build_reference`` with a chosen depth (SD-era config: eos_token_id 2)."""
    from transformers import CLIPTextModelWithProjection

    cfg = C.hf_text_config(act, eos_token_id=2)
    cfg.num_hidden_layers = layers
    model = CLIPTextModelWithProjection(cfg).eval()
    C.seeded_randn_(model, seed=seed)
    hf_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hf_sd.pop("text_model.embeddings.position_ids", None)
    ref = C.Reference("H", act, model, hf_sd, C.hf_to_oc(hf_sd), torch.tensor(4.6052), C.token_ids(), ())
    ref.expected = ref.forward(ref.ids)
    return ref


@torch.no_grad()
def hf_hidden_normed(model, ids, index: int) -> torch.Tensor:
    """``final_layer_norm(hidden_states[index])`` of a transformers CLIP text model."""
    out = model(input_ids=ids, output_hidden_states=True)
    tm = model.text_model if hasattr(model, "text_model") else model
    return tm.final_layer_norm(out.hidden_states[index])


def hf_text_only(ref: C.Reference) -> dict:
    return {k: v for k, v in ref.hf_sd.items() if k.startswith("text_model.")}


def position_ids() -> torch.Tensor:
    return torch.arange(C.CONTEXT, dtype=torch.int64)[None]


# --------------------------------------------------------------------------------------------
# Tiny sources (hand-made names)
# --------------------------------------------------------------------------------------------
def write_sgm_base(L: C.Reference, G: C.Reference, path) -> Path:
    """SDXL base: CLIP-L (HF names, int64 position_ids, no projection) at embedders.0.transformer.,
    bigG (open_clip names, text_projection [W,P], logit_scale) at embedders.1.model., plus UNet/VAE."""
    sd = {SGM_L + k: v for k, v in hf_text_only(L).items()}
    sd[SGM_L + "text_model.embeddings.position_ids"] = position_ids()
    sd.update({SGM_G + k: v for k, v in G.oc_sd.items()})
    sd[SGM_G + "logit_scale"] = G.logit_scale.clone()
    sd.update(_fake(FAKE_SGM_KEYS, 7))
    return save(sd, path)


def write_sgm_refiner(G: C.Reference, path) -> Path:
    """SDXL refiner: bigG alone, at embedders.0.model."""
    sd = {SGM_REFINER_G + k: v for k, v in G.oc_sd.items()}
    sd[SGM_REFINER_G + "logit_scale"] = G.logit_scale.clone()
    sd.update(_fake(FAKE_SGM_KEYS, 8))
    return save(sd, path)


def write_sd3(L: C.Reference, G: C.Reference, path) -> Path:
    """SD3 single file: both CLIPs in HF naming (text_model.* + text_projection.weight [P,W]),
    T5 / MMDiT / VAE stand-ins beside them."""
    sd = {SD3_L + k: v for k, v in L.hf_sd.items()}
    sd.update({SD3_G + k: v for k, v in G.hf_sd.items()})
    sd.update(_fake(FAKE_SD3_KEYS, 9))
    return save(sd, path)


def write_comfy(G: C.Reference, path, old: bool = False) -> Path:
    """ComfyUI CLIPSave file: HF names at top level + text_projection.weight [P,W] + logit_scale;
    ``old``: a bare open_clip-style ``text_projection`` [W,P] instead."""
    sd = dict(hf_text_only(G))
    if old:
        sd["text_projection"] = G.hf_sd["text_projection.weight"].T
    else:
        sd["text_projection.weight"] = G.hf_sd["text_projection.weight"]
    sd["logit_scale"] = G.logit_scale.clone()
    return save(sd, path)


def write_ldm_sd2(H: C.Reference, path) -> Path:
    """SD2.x LDM file: ViT-H-style encoder (open_clip names) at cond_stage_model.model., with
    text_projection [W,P] and logit_scale, UNet/VAE stand-ins."""
    sd = {SD2_PREFIX + k: v for k, v in H.oc_sd.items()}
    sd[SD2_PREFIX + "logit_scale"] = H.logit_scale.clone()
    sd.update(_fake(C.FAKE_LDM_KEYS, 10))
    return save(sd, path)


# --------------------------------------------------------------------------------------------
# Full-size key lists (arenasys/stable-diffusion-webui-model-toolkit components, tests/data)
# --------------------------------------------------------------------------------------------
def keylist(name: str) -> list[tuple[str, list[int]]]:
    out = []
    for line in (DATA / name).read_text().splitlines():
        if not line.strip():
            continue
        key, shape = line.rsplit(" ", 1)
        inner = shape.strip("[]")
        out.append((key, [int(x) for x in inner.split(",")] if inner else []))
    return out


def random_full(name: str, seed: int) -> dict:
    """Every key of a key list with its exact shape: fp16 randn*0.02; position_ids int64 arange."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in keylist(name):
        if key.endswith("position_ids"):
            sd[key] = torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
        else:
            sd[key] = torch.empty(shape, dtype=torch.float16).normal_(0.0, 0.02, generator=g)  # randn*0.02
    return sd


# --------------------------------------------------------------------------------------------
# Independent full-size reference: open_clip's TextTransformer on the source tensors
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def open_clip_text_forward(oc_sd: dict, heads: int, act: str, ids: torch.Tensor, hidden_index: int | None = None,
                           consume: bool = False):
    """Run open_clip's ``TextTransformer`` (fp32) with the given open_clip-named text weights.

    Returns (last_hidden, pooled, projected_or_None, ln_final(output of block ``hidden_index``) or None).
    The module is built on the meta device and the fp32 weights assigned, so nothing is initialised.
    ``consume``: pop the tensors from ``oc_sd`` while casting (keeps one copy of the weights in memory).
    """
    from open_clip.transformer import QuickGELU, TextTransformer

    width = oc_sd["ln_final.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[2]) for k in oc_sd if k.startswith("transformer.resblocks."))
    vocab, context = oc_sd["token_embedding.weight"].shape[0], oc_sd["positional_embedding"].shape[0]
    proj = oc_sd.get("text_projection")
    with torch.device("meta"):
        m = TextTransformer(context_length=context, vocab_size=vocab, width=width, heads=heads, layers=layers,
                            output_dim=proj.shape[1] if proj is not None else None,
                            proj_type="linear" if proj is not None else "none",
                            act_layer=QuickGELU if act == "quick_gelu" else torch.nn.GELU, output_tokens=True)
    sd = {}
    for i, k in enumerate(list(oc_sd)):
        if k != "logit_scale":
            sd[k] = (oc_sd.pop(k) if consume else oc_sd[k]).float()
        if consume and i % 64 == 63:
            release_memory()            # hand the popped fp16 tensors back as we go
    missing, unexpected = m.load_state_dict(sd, strict=False, assign=True)
    assert not unexpected and not missing, (missing, unexpected)
    m.attn_mask = m.build_causal_mask()          # non-persistent buffer, still on meta
    m.eval()
    captured = {}
    hook = None
    if hidden_index is not None:
        hook = m.transformer.resblocks[hidden_index].register_forward_hook(
            lambda mod, inp, out: captured.__setitem__("h", out))
    try:
        pooled_proj, tokens = m(ids)
    finally:
        if hook is not None:
            hook.remove()
    pooled = C.pooled_at_argmax(tokens, ids)
    hidden = m.ln_final(captured["h"]) if hidden_index is not None else None
    del m, sd
    return tokens, pooled, (pooled_proj if proj is not None else None), hidden


def load_transformers_fp32(folder, with_projection: bool):
    """transformers from_pretrained in fp32 (the files are fp16); zero missing/unexpected keys."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    m, info = cls.from_pretrained(str(folder), output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"], f"missing: {info['missing_keys']}"
    assert not info["unexpected_keys"], f"unexpected: {info['unexpected_keys']}"
    assert not info.get("mismatched_keys"), f"mismatched: {info.get('mismatched_keys')}"
    assert all(p.dtype == torch.float32 for p in m.parameters())
    return m.eval()


@torch.no_grad()
def transformers_forward(m, ids, with_projection: bool):
    out = m(input_ids=ids)
    last = out.last_hidden_state
    return last, C.pooled_at_argmax(last, ids), (out.text_embeds if with_projection else None)
