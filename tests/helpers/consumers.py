"""Consumer-library oracles for sdconv.

Everything here is independent of sdconv: tiny random CLIP text encoders are built with the real
libraries (transformers, open_clip, OpenAI clip, diffusers), their weights are mapped by hand between
the libraries' own key names, sources are saved in every layout, and loaders/forwards read an output
back with the library that consumes that layout.

Conventions
- One *reference* per architecture "kind": ``"L"`` (QuickGELU, like CLIP ViT-L/14) and ``"G"``
  (exact GELU, like OpenCLIP H/bigG), both width 128, 2 heads, 2 layers, V 49408, C 77, P 128.
  The reference is a transformers ``CLIPTextModelWithProjection``; every parameter is overwritten
  with ``randn * 0.2`` (seeded) so ln_1/ln_2, q/k/v order, activation and projection orientation
  all show in the outputs.
- A forward returns ``(last_hidden, pooled, projected_or_None)``: last hidden state after the final
  LayerNorm, pooled = last hidden at ``argmax(ids)`` (unprojected), projected = pooled @ projection.
"""
from __future__ import annotations

import copy
import gzip
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# The tiny models are far below the size where intra-op threads pay off: on the 2-core reference
# machine a 308x128 @ 128x512 matmul takes 0.4 ms on one thread and 5 ms on two (OpenMP spin/wake).
torch.set_num_threads(1)

# --------------------------------------------------------------------------------------------
# Architecture of the tiny models
# --------------------------------------------------------------------------------------------
WIDTH = 128
HEADS = 2
LAYERS = 2
VOCAB = 49408
CONTEXT = 77
PROJ = 128
FFN = 4 * WIDTH
BOS, EOS = 49406, 49407
ACTS = {"L": "quick_gelu", "G": "gelu"}
ATOL = 1e-5

LDM_PREFIX = "cond_stage_model.transformer."
FAKE_LDM_KEYS = {  # UNet / VAE / EMA stand-ins that must never leak into a text-encoder output
    "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
    "model.diffusion_model.input_blocks.0.0.bias": (32,),
    "model.diffusion_model.out.2.weight": (4, 32, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (32, 3, 3, 3),
    "first_stage_model.decoder.conv_out.bias": (3,),
    "model_ema.decay": (),
}


def seeded_randn_(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Overwrite every parameter (LayerNorms included) with randn*scale, deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def token_ids() -> torch.Tensor:
    """4 rows: bos first, eos at 5/20/76/40, rows 0 and 2 padded with 0, rows 1 and 3 with 49407."""
    g = torch.Generator().manual_seed(1234)
    rows = []
    for eos_pos, pad in ((5, 0), (20, EOS), (76, 0), (40, EOS)):
        r = torch.full((CONTEXT,), pad, dtype=torch.long)
        r[0] = BOS
        r[1:eos_pos] = torch.randint(1, 49405, (eos_pos - 1,), generator=g)
        r[eos_pos] = EOS
        rows.append(r)
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------
# Hand-written key mapping (the independent oracle): HF text_model.* <-> OpenAI/open_clip names
# --------------------------------------------------------------------------------------------
def hf_to_oc(hf: dict) -> dict:
    """HF ``text_model.*`` (+ ``text_projection.weight``) -> OpenAI / open_clip flat text names."""
    t = lambda k: hf["text_model." + k]  # noqa: E731
    oc = {
        "token_embedding.weight": t("embeddings.token_embedding.weight"),
        "positional_embedding": t("embeddings.position_embedding.weight"),
        "ln_final.weight": t("final_layer_norm.weight"),
        "ln_final.bias": t("final_layer_norm.bias"),
    }
    n = 1 + max(int(k.split(".")[3]) for k in hf if k.startswith("text_model.encoder.layers."))
    for i in range(n):
        h, o = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for s in ("weight", "bias"):
            oc[o + f"ln_1.{s}"] = t(h + f"layer_norm1.{s}")
            oc[o + f"ln_2.{s}"] = t(h + f"layer_norm2.{s}")
            oc[o + f"attn.in_proj_{s}"] = torch.cat([t(h + f"self_attn.{x}_proj.{s}") for x in "qkv"], 0)
            oc[o + f"attn.out_proj.{s}"] = t(h + f"self_attn.out_proj.{s}")
            oc[o + f"mlp.c_fc.{s}"] = t(h + f"mlp.fc1.{s}")
            oc[o + f"mlp.c_proj.{s}"] = t(h + f"mlp.fc2.{s}")
    if "text_projection.weight" in hf:
        oc["text_projection"] = hf["text_projection.weight"].T
    return {k: v.detach().clone().contiguous() for k, v in oc.items()}


def oc_text_keys(layers: int = LAYERS, proj: bool = True, logit_scale: bool = False) -> set:
    keys = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    for i in range(layers):
        o = f"transformer.resblocks.{i}."
        for s in ("weight", "bias"):
            keys |= {o + f"ln_1.{s}", o + f"ln_2.{s}", o + f"attn.in_proj_{s}", o + f"attn.out_proj.{s}",
                     o + f"mlp.c_fc.{s}", o + f"mlp.c_proj.{s}"}
    if proj:
        keys.add("text_projection")
    if logit_scale:
        keys.add("logit_scale")
    return keys


# --------------------------------------------------------------------------------------------
# Library model builders
# --------------------------------------------------------------------------------------------
def hf_text_config(act: str, eos_token_id: int = 2):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FFN,
                          num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          max_position_embeddings=CONTEXT, hidden_act=act, projection_dim=PROJ,
                          bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1)


def open_clip_cfgs():
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vcfg = CLIPVisionCfg(layers=1, width=64, head_width=64, patch_size=16, image_size=32)
    tcfg = CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=HEADS, layers=LAYERS)
    return vcfg, tcfg


_TEMPLATES: dict = {}


def _fresh(key, build):
    """A fresh copy of a library model; the (slow) random init runs once per key."""
    if key not in _TEMPLATES:
        _TEMPLATES[key] = build()
    return copy.deepcopy(_TEMPLATES[key])


def open_clip_model(act: str, custom_text: bool = False):
    from open_clip.model import CLIP, CustomTextCLIP

    def build():
        vcfg, tcfg = open_clip_cfgs()
        cls = CustomTextCLIP if custom_text else CLIP
        return cls(PROJ, vcfg, tcfg, quick_gelu=(act == "quick_gelu")).eval()

    return _fresh(("open_clip", act, custom_text), build)


def openai_model():
    """OpenAI clip (QuickGELU hard-coded)."""
    from clip.model import CLIP

    return _fresh(("openai",), lambda: CLIP(
        embed_dim=PROJ, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
        context_length=CONTEXT, vocab_size=VOCAB, transformer_width=WIDTH,
        transformer_heads=HEADS, transformer_layers=LAYERS).eval())


def open_clip_json_cfg(act: str) -> dict:
    return {
        "embed_dim": PROJ,
        "quick_gelu": act == "quick_gelu",
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 64, "patch_size": 16},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": WIDTH, "heads": HEADS,
                     "layers": LAYERS},
    }


# --------------------------------------------------------------------------------------------
# Tokenizer (offline, SETUP.md §6) and tiny diffusers pipeline (SETUP.md §7)
# --------------------------------------------------------------------------------------------
_TOKENIZER = None


def clip_tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        import open_clip
        from open_clip.tokenizer import bytes_to_unicode
        from transformers import CLIPTokenizer

        bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
        merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        vocab = list(bytes_to_unicode().values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        assert len(vocab) == VOCAB
        _TOKENIZER = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)},
                                   merges=[tuple(m.split()) for m in merges], model_max_length=CONTEXT)
    return _TOKENIZER


def tiny_pipeline(text_encoder):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=WIDTH, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


PROMPT = "a photo of an astronaut riding a horse, oil painting!"


# --------------------------------------------------------------------------------------------
# Reference model
# --------------------------------------------------------------------------------------------
@dataclass
class Reference:
    kind: str                 # "L" or "G"
    act: str                  # "quick_gelu" or "gelu"
    model: object             # transformers CLIPTextModelWithProjection
    hf_sd: dict               # text_model.* + text_projection.weight
    oc_sd: dict               # OpenAI / open_clip flat text names incl. text_projection [W,P]
    logit_scale: torch.Tensor
    ids: torch.Tensor
    expected: tuple           # (last, pooled, projected) on ids
    sources: dict = field(default_factory=dict)  # name -> Source
    pipeline_dir: Path | None = None

    @torch.no_grad()
    def forward(self, ids: torch.Tensor):
        out = self.model(input_ids=ids)
        last = out.last_hidden_state
        pooled = last[torch.arange(ids.shape[0]), ids.argmax(-1)]
        proj = pooled @ self.hf_sd["text_projection.weight"].T
        return last, pooled, proj


def build_reference(kind: str) -> Reference:
    from transformers import CLIPTextModelWithProjection

    act = ACTS[kind]
    # L: SD-era eos_token_id 2 (legacy argmax pooling); G: the transformers v5 default 49407.
    cfg = hf_text_config(act, eos_token_id=2 if kind == "L" else EOS)
    model = CLIPTextModelWithProjection(cfg).eval()
    seeded_randn_(model, seed={"L": 1, "G": 2}[kind])
    hf_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hf_sd.pop("text_model.embeddings.position_ids", None)
    ids = token_ids()
    ref = Reference(kind, act, model, hf_sd, hf_to_oc(hf_sd),
                    torch.tensor(4.6052 + (0.01 if kind == "G" else 0.0)), ids, ())
    ref.expected = ref.forward(ids)
    with torch.no_grad():  # transformers' own pooled/projected must agree with the hand-made ones
        out = model(input_ids=ids)
    torch.testing.assert_close(out.text_embeds, ref.expected[2], atol=ATOL, rtol=0)
    return ref


# --------------------------------------------------------------------------------------------
# Sources in every layout
# --------------------------------------------------------------------------------------------
@dataclass
class Source:
    name: str
    layout: str               # sdconv layout name of the input
    path: Path
    has_proj: bool
    has_logit_scale: bool
    has_config: bool          # architecture (act) recoverable from the input itself


def _save_pt(sd, path):
    torch.save(sd, str(path))


def write_sources(ref: Reference, root: Path) -> dict:
    """Write the reference's weights in every layout; return {name: Source}."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    srcs = {}
    g = torch.Generator().manual_seed(99)

    def add(name, layout, path, proj, ls, cfg):
        srcs[name] = Source(name, layout, Path(path), proj, ls, cfg)

    # --- hf: CLIPTextModelWithProjection.save_pretrained (text_model.* + text_projection.weight)
    d = root / "hf_withproj"
    ref.model.save_pretrained(str(d))
    keys = set(load_file(str(d / "model.safetensors")))
    assert "text_projection.weight" in keys and all(k.startswith("text_model.") or k == "text_projection.weight"
                                                    for k in keys), keys
    add("hf", "hf", d, True, False, True)

    # --- hf: transformers v5 CLIPTextModel.save_pretrained (unprefixed keys, no projection)
    te = CLIPTextModel(ref.model.config).eval()
    missing, unexpected = te.load_state_dict(
        {k[len("text_model."):]: v for k, v in ref.hf_sd.items() if k.startswith("text_model.")}, strict=False)
    assert not unexpected and set(missing) <= {"embeddings.position_ids"}, (missing, unexpected)
    d = root / "hf_v5_textmodel"
    te.save_pretrained(str(d))
    keys = set(load_file(str(d / "model.safetensors")))
    assert any(k.startswith("encoder.") for k in keys) and not any(k.startswith("text_model.") for k in keys)
    add("hf_v5", "hf", d, False, False, True)
    # single file without config, HF prefixed names + projection (SD3/ComfyUI-style standalone file)
    f = root / "hf_single.safetensors"
    save_file({k: v.contiguous() for k, v in ref.hf_sd.items()}, str(f))
    add("hf_file", "hf", f, True, False, False)
    # single unprefixed v5 file without config
    f = root / "hf_v5_single.safetensors"
    shutil.copy(d / "model.safetensors", f)
    add("hf_v5_file", "hf", f, False, False, False)

    # --- openai: the full clip.model.CLIP state dict (visual.* included), .pt and .safetensors
    om = openai_model()
    sd = om.state_dict()
    for k in list(sd):
        if k.startswith("visual."):
            sd[k] = torch.randn(sd[k].shape, generator=g) * 0.2 if sd[k].is_floating_point() else sd[k]
    assert oc_text_keys(logit_scale=True) <= set(sd)
    sd.update(ref.oc_sd)
    sd["logit_scale"] = ref.logit_scale.clone()
    sd = {k: v.contiguous() for k, v in sd.items()}
    _save_pt(sd, root / "openai.pt")
    save_file(sd, str(root / "openai.safetensors"))
    add("openai_pt", "openai", root / "openai.pt", True, True, False)
    add("openai_st", "openai", root / "openai.safetensors", True, True, False)

    # --- open_clip: flat CLIP state dict
    m = open_clip_model(ref.act)
    sd = m.state_dict()
    assert oc_text_keys(logit_scale=True) <= set(sd), oc_text_keys(logit_scale=True) - set(sd)
    sd.update(ref.oc_sd)
    sd["logit_scale"] = ref.logit_scale.clone()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "open_clip.safetensors"))
    add("open_clip", "open_clip", root / "open_clip.safetensors", True, True, False)
    # --- open_clip: CustomTextCLIP (text tower under "text.", logit_scale top level)
    m = open_clip_model(ref.act, custom_text=True)
    sd = m.state_dict()
    want = {"text." + k for k in oc_text_keys()} | {"logit_scale"}
    assert want <= set(sd), want - set(sd)
    assert not {k for k in sd if k.startswith("text.")} - want, {k for k in sd if k.startswith("text.")} - want
    sd.update({"text." + k: v for k, v in ref.oc_sd.items()})
    sd["logit_scale"] = ref.logit_scale.clone()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "open_clip_custom.safetensors"))
    add("open_clip_custom", "open_clip", root / "open_clip_custom.safetensors", True, True, False)

    # --- ldm SD1.x: HF names under cond_stage_model.transformer. + int64 position_ids + UNet/VAE
    ldm = {LDM_PREFIX + k: v.clone() for k, v in ref.hf_sd.items() if k.startswith("text_model.")}
    ldm[LDM_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(CONTEXT, dtype=torch.int64)[None]
    for k, shape in FAKE_LDM_KEYS.items():
        ldm[k] = torch.randn(shape, generator=g)
    torch.save({"state_dict": ldm, "global_step": 1}, str(root / "ldm.ckpt"))
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(root / "ldm.safetensors"))
    add("ldm_ckpt", "ldm", root / "ldm.ckpt", False, False, False)
    add("ldm_st", "ldm", root / "ldm.safetensors", False, False, False)
    nai = {k.replace(LDM_PREFIX + "text_model.", LDM_PREFIX): v for k, v in ldm.items()}
    save_file({k: v.contiguous() for k, v in nai.items()}, str(root / "ldm_nai.safetensors"))
    add("ldm_nai", "ldm", root / "ldm_nai.safetensors", False, False, False)

    # --- diffusers: tiny StableDiffusionPipeline.save_pretrained (text_encoder = CLIPTextModel)
    pipe = tiny_pipeline(te)
    d = root / "pipeline"
    pipe.save_pretrained(str(d))
    assert (d / "model_index.json").is_file() and (d / "text_encoder" / "config.json").is_file()
    add("diffusers", "diffusers", d, False, False, True)
    add("diffusers_te", "diffusers", d / "text_encoder", False, False, True)
    ref.pipeline_dir = d
    ref.sources = srcs
    return srcs


# --------------------------------------------------------------------------------------------
# Generic helpers
# --------------------------------------------------------------------------------------------
def read_state_dict(path) -> dict:
    path = str(path)
    if path.endswith(".safetensors"):
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return obj


def write_state_dict(sd: dict, path) -> None:
    path = str(path)
    if path.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)


def compare(got: tuple, expected: tuple, what: str = "") -> None:
    """Compare (last, pooled, projected); projected only when present on both sides."""
    names = ("last_hidden", "pooled", "projected")
    for name, a, b in zip(names, got, expected):
        if a is None or b is None:
            continue
        torch.testing.assert_close(a.float(), b.float(), atol=ATOL, rtol=0,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


def pooled_at_argmax(last, ids):
    return last[torch.arange(ids.shape[0]), ids.argmax(-1)]


# --------------------------------------------------------------------------------------------
# Consumers
# --------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    forward: object            # ids -> (last, pooled, projected-or-None)
    info: dict                 # library loading info, for reports


def _hooked_forward(model, ids, has_proj):
    captured = {}
    h = model.ln_final.register_forward_hook(lambda mod, inp, out: captured.__setitem__("x", out))
    try:
        with torch.no_grad():
            proj = model.encode_text(ids)
    finally:
        h.remove()
    last = captured["x"]
    if last.shape[0] != ids.shape[0]:  # batch_first=False legacy layouts
        last = last.permute(1, 0, 2)
    return last, pooled_at_argmax(last, ids), (proj if has_proj else None)


def _check_missing(missing, unexpected, has_proj, has_logit_scale, prefix=""):
    missing, unexpected = list(missing), list(unexpected)
    assert not unexpected, f"unexpected keys: {unexpected}"
    text_missing = {k for k in missing if not k.startswith("visual.")}
    allowed = set()
    if not has_proj:
        allowed.add(prefix + "text_projection")
    if not has_logit_scale:
        allowed.add("logit_scale")
    assert text_missing == allowed, f"missing text keys {sorted(text_missing)}, allowed only {sorted(allowed)}"


def load_open_clip(path, act: str, has_proj: bool, has_logit_scale: bool, custom_text: bool = False,
                   via_named_config: str | None = None) -> Loaded:
    """open_clip: build the tiny CLIP and ``open_clip.load_checkpoint(strict=False)``."""
    import open_clip

    if via_named_config:
        m = open_clip.create_model(via_named_config, pretrained=None).eval()
    else:
        m = open_clip_model(act, custom_text=custom_text)
    inc = open_clip.load_checkpoint(m, str(path), strict=False)
    _check_missing(inc.missing_keys, inc.unexpected_keys, has_proj, has_logit_scale,
                   prefix="text." if custom_text else "")
    text = m.text if custom_text else m

    def fwd(ids):
        if custom_text:
            captured = {}
            h = text.ln_final.register_forward_hook(lambda mod, inp, out: captured.__setitem__("x", out))
            try:
                with torch.no_grad():
                    proj = m.encode_text(ids)
            finally:
                h.remove()
            last = captured["x"]
            return last, pooled_at_argmax(last, ids), (proj if has_proj else None)
        return _hooked_forward(m, ids, has_proj)

    return Loaded(fwd, {"missing": inc.missing_keys, "model": m})


def register_open_clip_config(act: str, root: Path) -> str:
    """``open_clip.add_model_config`` of a tiny json config; returns the model name."""
    import open_clip

    name = f"sdconv-tiny-{act}"
    d = Path(root) / f"oc_cfg_{act}"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps(open_clip_json_cfg(act)))
    open_clip.add_model_config(d)
    assert name in open_clip.list_models(), open_clip.list_models()[:5]
    return name


def load_openai_clip(path, has_proj: bool, has_logit_scale: bool) -> Loaded:
    """OpenAI clip: ``clip.model.CLIP`` + ``load_state_dict(strict=False)`` (QuickGELU only)."""
    m = openai_model()
    sd = read_state_dict(path)
    inc = m.load_state_dict(sd, strict=False)
    _check_missing(inc.missing_keys, inc.unexpected_keys, has_proj, has_logit_scale)
    return Loaded(lambda ids: _hooked_forward(m, ids, has_proj), {"missing": inc.missing_keys, "model": m})


def load_transformers(folder, with_projection: bool) -> Loaded:
    """transformers ``from_pretrained(output_loading_info=True)``; no missing / unexpected keys."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    m, info = cls.from_pretrained(str(folder), output_loading_info=True)
    m.eval()
    assert not info["missing_keys"], f"missing: {info['missing_keys']}"
    assert not info["unexpected_keys"], f"unexpected: {info['unexpected_keys']}"
    assert not info.get("mismatched_keys"), f"mismatched: {info.get('mismatched_keys')}"

    def fwd(ids):
        with torch.no_grad():
            out = m(input_ids=ids)
        last = out.last_hidden_state
        pooled = pooled_at_argmax(last, ids)
        # transformers' own pooler must agree with the argmax pooling (eos 2 legacy / first eos)
        ref_pool = getattr(out, "pooler_output", None)
        if ref_pool is not None:
            torch.testing.assert_close(ref_pool, pooled, atol=ATOL, rtol=0)
        return last, pooled, (out.text_embeds if with_projection else None)

    return Loaded(fwd, {"model": m, "config": m.config})


def load_ldm_via_diffusers(path, config_dir) -> Loaded:
    """diffusers' single-file CLIP loader (``create_diffusers_clip_model_from_ldm``)."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    sd = read_state_dict(path)
    m = create_diffusers_clip_model_from_ldm(CLIPTextModel, sd, subfolder="text_encoder",
                                             config=str(config_dir), local_files_only=True)
    # diffusers silently skips unknown keys: check that every parameter came from the file
    loaded = {k[len(LDM_PREFIX + "text_model."):] for k in sd if k.startswith(LDM_PREFIX + "text_model.")}
    params = {k for k, _ in m.named_parameters()}
    params = {k[len("text_model."):] if k.startswith("text_model.") else k for k in params}
    assert params == loaded - {"embeddings.position_ids"}, (sorted(params ^ (loaded - {"embeddings.position_ids"})))

    def fwd(ids):
        with torch.no_grad():
            last = m(input_ids=ids).last_hidden_state
        return last, pooled_at_argmax(last, ids), None

    return Loaded(fwd, {"model": m})


def assemble_pipeline(template_dir: Path, text_encoder_dir: Path, dest: Path) -> Path:
    """A copy of a tiny pipeline folder whose text_encoder/ is replaced."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for item in Path(template_dir).iterdir():
        if item.name == "text_encoder":
            continue
        if item.is_dir():
            shutil.copytree(item, dest / item.name)
        else:
            shutil.copy(item, dest / item.name)
    shutil.copytree(text_encoder_dir, dest / "text_encoder")
    return dest


def diffusers_encode_prompt(pipeline_dir, prompt: str = PROMPT):
    """``StableDiffusionPipeline.from_pretrained`` + ``encode_prompt``; returns (embeds, ids, pipe).

    The tokenizer (identical to the one saved in the folder) is passed in memory only because
    parsing its 49408-entry BPE json costs ~0.4 s per load; every other component, the text
    encoder included, is read from ``pipeline_dir``.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True,
                                                   tokenizer=clip_tokenizer())
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)
    return embeds, ids, pipe
