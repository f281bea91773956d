"""LoRA oracles for sdconv's text-encoder LoRA merge (issue 16). Independent of sdconv.

The truth is PEFT's own merge: a random LoRA is made with ``peft`` on tiny transformers CLIP text
encoders (per-module ranks and alphas through ``rank_pattern`` / ``alpha_pattern``, lora_B non-zero),
``merge_and_unload`` gives the EXPECTED weights, and its forward the expected outputs. The same
adapter is then written in every file format sdconv reads, so that each format's reading of ranks,
alphas, names and orientation is held to the one merge.

Encoders and checkpoints (weights from ``consumers_sd.build_reference``: width 128, 2 heads,
2 blocks, every parameter randn*0.2, SD-era eos_token_id 2)
- SD1: CLIP-L, a transformers ``CLIPTextModel`` (QuickGELU), in an ldm file.
- SDXL: CLIP-L (``CLIPTextModel``) and bigG (``CLIPTextModelWithProjection``, GELU), in an sgm file.
  transformers 5 flattens ``CLIPTextModel`` (its modules are ``encoder.layers.N...``, no
  ``text_model.``), while ``CLIPTextModelWithProjection`` keeps ``text_model.``: the files that
  PEFT and diffusers write from them differ accordingly, and both spellings are real.

Canonical names here: transformers' ``text_model.encoder.layers.{i}.self_attn.q_proj`` (and
``text_projection``) for modules, with ``.weight`` for tensors.

File formats and their alpha conventions (what each writer below makes)
- kohya (kohya-ss/sd-scripts ``networks/lora.py``): ``LoRANetwork.create_modules`` names a module
  ``prefix + "." + path + "." + child`` with every "." made "_"; prefix ``lora_te`` (SD1/SD2),
  ``lora_te1`` / ``lora_te2`` (SDXL CLIP-L / bigG: ``LORA_PREFIX_TEXT_ENCODER1/2``), UNet ``lora_unet``.
  Per module ``.lora_down.weight`` [r, in], ``.lora_up.weight`` [out, r] and ``.alpha``, a 0-d
  tensor (``register_buffer("alpha", torch.tensor(alpha))``, saved in the file's dtype). A module
  without ``.alpha`` has alpha = rank (``create_network_from_weights``: "support old LoRA without
  alpha"). Merge: ``W + multiplier * (up @ down) * alpha / rank`` (``LoRAInfModule.merge_to``).
  Text-encoder targets: the Linear children of CLIPAttention / CLIPMLP; ``lora_te2_text_projection``
  comes from other trainers (diffusers' converter maps it: ``text.projection`` -> ``text_projection``).
- diffusers, attention-processor era (``StateDictType.DIFFUSERS_OLD``, utils/state_dict_utils.py):
  ``text_encoder.text_model.encoder.layers.{i}.self_attn.to_{q,k,v,out}_lora.{down,up}.weight``.
  No alphas in the file (alpha = rank); attention only; diffusers recognises it by ``to_out_lora``.
- diffusers, LoRALinearLayer era (``StateDictType.DIFFUSERS``): ``text_encoder[_2].text_model.
  encoder.layers.{i}.{self_attn.q_proj|...|mlp.fc1}.lora_linear_layer.{down,up}.weight``. No alphas
  in the file either: ``network_alphas`` only ever existed in memory, from kohya files
  (``_convert_non_diffusers_lora_to_diffusers`` returns them beside the state dict), and a file
  whose keys lack "lora" (a bare ``.alpha``) is refused by ``load_lora_weights``. alpha = rank.
- diffusers, PEFT era (``save_lora_weights`` of 0.42.1): ``text_encoder[_2].<module path>.
  lora_A.weight`` / ``lora_B.weight`` from ``get_peft_model_state_dict``; the training scripts pass
  them through ``convert_state_dict_to_diffusers`` first, which renames the attention modules'
  lora_A/B to ``lora_linear_layer.down/up`` and leaves fc1/fc2 as lora_A/B (``PEFT_TO_DIFFUSERS``
  has no mlp rows): a mixed file. Alphas: the safetensors ``__metadata__["lora_adapter_metadata"]``,
  JSON of the LoraConfig dict with keys prefixed ``text_encoder.`` / ``text_encoder_2.`` (``r``,
  ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ...; lora_base.py ``_save_lora_weights``,
  training_utils.py ``_collate_lora_metadata``). No metadata: alpha = rank per module
  (peft_utils.py ``get_peft_kwargs``: "the diffusers/PEFT convention is W_eff = W + lora_B @ lora_A").
- plain PEFT (``save_pretrained``): ``adapter_model.safetensors`` with ``base_model.model.<module
  path>.lora_A.weight`` / ``lora_B.weight`` and ``adapter_config.json`` (``r``, ``lora_alpha``,
  ``rank_pattern``, ``alpha_pattern``: regex keys matched as ``(.*\\.)?(KEY)$`` against the module
  path, the first that matches wins: peft/utils/other.py ``get_pattern_key``).

A format without alphas cannot say alpha != rank: its writer folds alpha / rank into the up matrix
(in fp32), so the file still holds the same adapter (to an ulp of the product).
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.helpers import consumers as C
from tests.helpers import consumers_sd as S

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")      # PEFT target_modules of a full LoRA
ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
PROJ = "text_projection"
W_ATOL = 1e-6        # merged weights (|W| <~ 1.5): one fp32 ulp of the sum is 1.2e-7 at 1.0

KOHYA_PREFIX = {"sd1": {"clip_l": "lora_te_"}, "sdxl": {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}}
DIFFUSERS_PREFIX = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
# diffusers' attention-processor names (utils/state_dict_utils.py DIFFUSERS_OLD_TO_PEFT)
ATTN_PROC = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}


# --------------------------------------------------------------------------------------------
# Encoders and checkpoints
# --------------------------------------------------------------------------------------------
@dataclass
class Encoder:
    name: str                     # sdconv's encoder name: clip_l / clip_g
    act: str
    with_projection: bool
    model: torch.nn.Module        # transformers CLIPTextModel / CLIPTextModelWithProjection, fp32, eval
    hf_sd: dict                   # canonical: text_model.* (+ text_projection.weight)
    ids: torch.Tensor
    expected: tuple = ()          # the base encoder's outputs (last, pooled, projected-or-None)

    def modules(self) -> list[str]:
        """Every linear a LoRA may target, canonical names."""
        out = [f"text_model.encoder.layers.{i}.{lin}" for i in range(C.LAYERS) for lin in LINEARS]
        return out + ([PROJ] if self.with_projection else [])

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)


def canonical_module(name: str) -> str:
    """A module path of either transformers class (or under PEFT's base_model.model.) -> canonical."""
    name = name.removeprefix("base_model.model.")
    return name if name.startswith("text_model.") or name == PROJ else "text_model." + name


def canonical_sd(model: torch.nn.Module) -> dict:
    """A transformers CLIP text model's tensors under canonical names (position_ids dropped)."""
    out = {}
    for k, v in model.state_dict().items():
        if not k.endswith("position_ids"):
            module, leaf = k.rsplit(".", 1)
            out[canonical_module(module) + "." + leaf] = v.detach().clone()
    return out


def build_encoder(name: str, seed: int) -> Encoder:
    from transformers import CLIPTextModel

    act, with_projection = ("quick_gelu", False) if name == "clip_l" else ("gelu", True)
    ref = S.build_reference(act, C.LAYERS, seed)
    if with_projection:
        model = ref.model
    else:
        model = CLIPTextModel(ref.model.config).eval()
        tm = {k[len("text_model."):]: v for k, v in ref.hf_sd.items() if k.startswith("text_model.")}
        if hasattr(model, "text_model"):            # transformers 4
            tm = {"text_model." + k: v for k, v in tm.items()}
        missing, unexpected = model.load_state_dict(tm, strict=False)
        assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    enc = Encoder(name, act, with_projection, model.eval(), {}, C.token_ids())
    enc.hf_sd = canonical_sd(model)
    enc.expected = forward(model, enc.ids)
    return enc


@torch.no_grad()
def forward(model, ids) -> tuple:
    """(last hidden, pooled at argmax(ids), text_embeds or None) of a transformers CLIP text model."""
    out = model(input_ids=ids)
    last = out.last_hidden_state
    return last, C.pooled_at_argmax(last, ids), getattr(out, "text_embeds", None)


def model_from(enc: Encoder, sd: dict) -> torch.nn.Module:
    """A fresh copy of the encoder's transformers class holding canonical tensors `sd` (all of them)."""
    m = enc.fresh()
    own = {canonical_module(k.rsplit(".", 1)[0]) + "." + k.rsplit(".", 1)[1]: k
           for k in m.state_dict() if not k.endswith("position_ids")}
    assert set(own) == set(sd), (sorted(set(own) ^ set(sd)))
    m.load_state_dict({own[k]: v.float() for k, v in sd.items()}, strict=False)
    return m.eval()


def rounded(enc: Encoder, dtype) -> Encoder:
    """The encoder with its weights rounded to `dtype` (held in fp32): what an fp16 checkpoint holds."""
    sd = {k: v.to(dtype).float() for k, v in enc.hf_sd.items()}
    model = model_from(enc, sd)
    return Encoder(enc.name, enc.act, enc.with_projection, model, sd, enc.ids, forward(model, enc.ids))


def write_sd1(sd: dict, path, dtype=torch.float32) -> Path:
    """SD1 ldm file: CLIP-L (canonical tensors `sd`) under cond_stage_model.transformer.text_model.,
    int64 position_ids, UNet/VAE stand-ins."""
    out = {C.LDM_PREFIX + k: v.to(dtype) for k, v in sd.items()}
    out[C.LDM_PREFIX + "text_model.embeddings.position_ids"] = S.position_ids()
    g = torch.Generator().manual_seed(5)
    for k, shape in C.FAKE_LDM_KEYS.items():
        out[k] = torch.randn(shape, generator=g).to(dtype)
    return S.save(out, path)


def write_sdxl(l_sd: dict, g_sd: dict, path) -> Path:
    """SDXL base sgm file: CLIP-L (HF names) at embedders.0.transformer., bigG (open_clip names,
    text_projection [W,P], logit_scale) at embedders.1.model., UNet/VAE stand-ins."""
    out = {S.SGM_L + k: v for k, v in l_sd.items()}
    out[S.SGM_L + "text_model.embeddings.position_ids"] = S.position_ids()
    out.update({S.SGM_G + k: v for k, v in C.hf_to_oc(g_sd).items()})
    out[S.SGM_G + "logit_scale"] = torch.tensor(4.6052)
    g = torch.Generator().manual_seed(6)
    for k, shape in S.FAKE_SGM_KEYS.items():
        out[k] = torch.randn(shape, generator=g)
    return S.save(out, path)


def oc_to_hf(oc: dict) -> dict:
    """OpenAI / open_clip flat text names -> canonical (the inverse of consumers.hf_to_oc)."""
    hf = {"text_model.embeddings.token_embedding.weight": oc["token_embedding.weight"],
          "text_model.embeddings.position_embedding.weight": oc["positional_embedding"],
          "text_model.final_layer_norm.weight": oc["ln_final.weight"],
          "text_model.final_layer_norm.bias": oc["ln_final.bias"]}
    n = 1 + max(int(k.split(".")[2]) for k in oc if k.startswith("transformer.resblocks."))
    for i in range(n):
        h, o = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for s in ("weight", "bias"):
            hf[h + f"layer_norm1.{s}"] = oc[o + f"ln_1.{s}"]
            hf[h + f"layer_norm2.{s}"] = oc[o + f"ln_2.{s}"]
            for x, t in zip("qkv", oc[o + f"attn.in_proj_{s}"].chunk(3, 0)):
                hf[h + f"self_attn.{x}_proj.{s}"] = t
            hf[h + f"self_attn.out_proj.{s}"] = oc[o + f"attn.out_proj.{s}"]
            hf[h + f"mlp.fc1.{s}"] = oc[o + f"mlp.c_fc.{s}"]
            hf[h + f"mlp.fc2.{s}"] = oc[o + f"mlp.c_proj.{s}"]
    if "text_projection" in oc:
        hf["text_projection.weight"] = oc["text_projection"].T
    return {k: v.clone().contiguous() for k, v in hf.items()}


# --------------------------------------------------------------------------------------------
# LoRAs: made with PEFT, held as per-module deltas
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Delta:
    down: torch.Tensor            # lora_A / lora_down [r, in], fp32
    up: torch.Tensor              # lora_B / lora_up [out, r], fp32
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def product(self) -> torch.Tensor:
        """(up @ down) * alpha / rank, as PEFT's get_delta_weight computes it (fp32)."""
        return (self.up.float() @ self.down.float()) * (self.alpha / self.rank)


@dataclass(frozen=True)
class Spec:
    """A PEFT LoraConfig, kept as data (patterns as PEFT matches them: ``(.*\\.)?(KEY)$``)."""
    r: int = 4
    alpha: float = 8
    rank_pattern: tuple = ()      # ((key, rank), ...)
    alpha_pattern: tuple = ()     # ((key, alpha), ...)
    targets: tuple = TARGETS

    def config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, rank_pattern=dict(self.rank_pattern),
                          alpha_pattern=dict(self.alpha_pattern), target_modules=list(self.targets),
                          lora_dropout=0.0, bias="none")


@dataclass
class Lora:
    """One LoRA for one checkpoint kind (sd1 / sdxl): per encoder, its PEFT spec and its deltas."""
    kind: str
    specs: dict                                      # encoder -> Spec
    deltas: dict = field(default_factory=dict)       # encoder -> {canonical module: Delta}

    def edited(self, encoder: str, module: str, **changes) -> "Lora":
        """A copy with one module's delta changed (down=, up=, alpha=): negative controls."""
        out = Lora(self.kind, dict(self.specs), {e: dict(d) for e, d in self.deltas.items()})
        d = out.deltas[encoder][module]
        out.deltas[encoder][module] = Delta(changes.get("down", d.down), changes.get("up", d.up),
                                            changes.get("alpha", d.alpha))
        return out

    def alphas_times(self, factor: float) -> "Lora":
        """A copy with every alpha multiplied by `factor` (its spec's patterns likewise)."""
        specs = {e: Spec(s.r, s.alpha * factor, s.rank_pattern, tuple((k, a * factor) for k, a in s.alpha_pattern),
                         s.targets) for e, s in self.specs.items()}
        return Lora(self.kind, specs, {e: {m: Delta(d.down, d.up, d.alpha * factor) for m, d in ds.items()}
                                       for e, ds in self.deltas.items()})


# The LoRAs of the tests. Per module: rank from rank_pattern, alpha from alpha_pattern; the modules
# whose alpha equals their rank (fc2 r4/a4 in both blocks, block 1 v_proj r3/a3) are the ones a
# kohya file writes without .alpha (unless alpha_when_rank).
MAIN_PATTERNS = dict(
    rank_pattern=(("layers.0.self_attn.k_proj", 2), ("layers.1.mlp.fc1", 8), ("layers.1.self_attn.v_proj", 3)),
    alpha_pattern=(("layers.0.self_attn.q_proj", 1), ("fc2", 4), ("layers.1.self_attn.v_proj", 3),
                   ("layers.1.self_attn.out_proj", 16)),
)
SPECS = {
    # every linear of both blocks (and bigG's text projection), ranks 2/3/4/8, alphas 1/3/4/8/16
    "main": {"clip_l": Spec(**MAIN_PATTERNS),
             "clip_g": Spec(rank_pattern=MAIN_PATTERNS["rank_pattern"],
                            alpha_pattern=MAIN_PATTERNS["alpha_pattern"] + ((PROJ, 2),),
                            targets=TARGETS + (PROJ,))},
    # bigG's text projection at a rank of its own (2; the others 4): diffusers cannot load it
    "proj_rank": {"clip_l": Spec(r=4, alpha=8),
                  "clip_g": Spec(r=4, alpha=8, rank_pattern=((PROJ, 2),), targets=TARGETS + (PROJ,))},
    # a second LoRA on a few modules, one of them (block 1 q_proj) shared with main
    "second": {e: Spec(r=2, alpha=3, targets=("layers.1.self_attn.q_proj", "layers.0.self_attn.out_proj",
                                              "layers.1.mlp.fc2")) for e in ("clip_l", "clip_g")},
    # one alpha for every module, ranks still differ: what diffusers' kohya converter reads right
    "uniform": {e: Spec(r=4, alpha=8, rank_pattern=MAIN_PATTERNS["rank_pattern"]) for e in ("clip_l", "clip_g")},
    # q, k, v and fc1 but not out_proj (one alpha): diffusers drops the q/k/v deltas of its kohya file
    "no_out": {e: Spec(r=4, alpha=4, targets=("q_proj", "k_proj", "v_proj", "fc1")) for e in ("clip_l", "clip_g")},
    # q, k, v alone (one alpha)
    "qkv": {e: Spec(r=4, alpha=4, targets=("q_proj", "k_proj", "v_proj")) for e in ("clip_l", "clip_g")},
    # attention only, alphas per module: diffusers' attention-processor era
    "attn": {e: Spec(r=4, alpha=4, rank_pattern=(("layers.1.self_attn.k_proj", 2),),
                     alpha_pattern=(("layers.0.self_attn.v_proj", 2),), targets=ATTN) for e in ("clip_l", "clip_g")},
}
ENCODERS = {"sd1": ("clip_l",), "sdxl": ("clip_l", "clip_g")}


def _lora_layers(pm, adapter: str):
    """(canonical module, LoraLayer) of a PEFT-wrapped (or PEFT-injected) model for one adapter."""
    from peft.tuners.lora import LoraLayer

    return [(canonical_module(n), m) for n, m in pm.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def make_lora(encoders: dict, kind: str, spec: str, seed: int) -> Lora:
    """A random LoRA: PEFT's get_peft_model with the spec's config decides each module's rank and
    alpha; lora_A and lora_B are seeded randn*0.2 rounded to fp16 (so an fp16 file holds them exactly)."""
    from peft import get_peft_model

    lora = Lora(kind, {e: SPECS[spec][e] for e in ENCODERS[kind]})
    g = torch.Generator().manual_seed(seed)
    for e in ENCODERS[kind]:
        pm = get_peft_model(encoders[e].fresh(), lora.specs[e].config())
        deltas = {}
        for name, m in sorted(_lora_layers(pm, "default"), key=lambda nm: nm[0]):
            r, a = m.r["default"], m.lora_alpha["default"]
            out_f, in_f = m.get_base_layer().weight.shape
            down = (torch.randn(r, in_f, generator=g) * 0.2).half().float()
            up = (torch.randn(out_f, r, generator=g) * 0.2).half().float()
            deltas[name] = Delta(down, up, float(a))
        lora.deltas[e] = deltas
    return lora


def peft_model(enc: Encoder, applied: list):
    """A PEFT model of the encoder holding the LoRAs `applied` [(Lora, scale)] as adapters a0, a1, ...,
    each module's scale set with PEFT's own LoraLayer.set_scale (scale * lora_alpha / r), all active."""
    from peft import get_peft_model

    names = [f"a{i}" for i in range(len(applied))]
    pm = None
    for name, (lora, _) in zip(names, applied):
        cfg = lora.specs[enc.name].config()
        if pm is None:
            pm = get_peft_model(enc.fresh(), cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    for name, (lora, scale) in zip(names, applied):
        layers = dict(_lora_layers(pm, name))
        deltas = lora.deltas[enc.name]
        assert set(layers) == set(deltas), sorted(set(layers) ^ set(deltas))
        for mod, m in layers.items():
            d = deltas[mod]
            assert m.r[name] == d.rank, (mod, m.r[name], d.rank)
            m.lora_alpha[name] = d.alpha          # the spec's, unless a negative control edited it
            with torch.no_grad():
                m.lora_A[name].weight.copy_(d.down)
                m.lora_B[name].weight.copy_(d.up)
            m.set_scale(name, scale)
    pm.base_model.set_adapter(names)
    return pm.eval(), names


@dataclass
class Expected:
    sd: dict                      # canonical tensors of PEFT's merge_and_unload
    out: tuple                    # their outputs
    touched: set                  # canonical tensor names the LoRAs change


def peft_expected(enc: Encoder, applied: list) -> Expected:
    """PEFT's merge of the LoRAs `applied` [(Lora, scale)] into `enc`, in order, and its outputs.
    Checked on the way: PEFT's unmerged forward (adapters active) gives the same outputs."""
    pm, names = peft_model(enc, [(lora, s) for lora, s in applied if enc.name in lora.deltas])
    live = forward(pm, enc.ids)
    merged = pm.merge_and_unload(adapter_names=names).eval()
    out = forward(merged, enc.ids)
    C.compare(out, live, f"PEFT merged vs unmerged {enc.name}")
    touched = {m + ".weight" for lora, _ in applied for m in lora.deltas.get(enc.name, {})}
    return Expected(canonical_sd(merged), out, touched)


def formula_merge(enc: Encoder, applied: list) -> dict:
    """The formula sdconv is held to, on deltas read from a file: W + sum(scale * alpha/r * up @ down), fp32."""
    sd = {k: v.clone() for k, v in enc.hf_sd.items()}
    for deltas, scale in applied:
        for mod, d in deltas.items():
            sd[mod + ".weight"] = sd[mod + ".weight"] + (d.up.float() @ d.down.float()) * (scale * d.alpha / d.rank)
    return sd


def assert_weights(got: dict, exp: Expected, base: dict, what: str, atol: float = W_ATOL) -> None:
    """`got` (canonical) holds PEFT's merged tensors: the LoRA's targets to `atol` (and visibly moved
    from the base), every other tensor bit for bit the base encoder's."""
    extra, missing = sorted(set(got) - set(exp.sd)), sorted(set(exp.sd) - set(got))
    assert not extra and not missing, f"{what}: extra {extra} missing {missing}"
    for k, v in got.items():
        if k in exp.touched:
            torch.testing.assert_close(v.float(), exp.sd[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{what} {k}: {m}")
            assert (exp.sd[k] - base[k]).abs().max() > 1e-2, f"{what} {k}: the LoRA does not move it"
        else:
            assert torch.equal(v.float(), base[k].float()), f"{what} {k}: not targeted, yet changed"


# --------------------------------------------------------------------------------------------
# Writers: the same LoRA in every format
# --------------------------------------------------------------------------------------------
def _kohya_name(prefix: str, module: str) -> str:
    return prefix + module.replace(".", "_")


def kohya_unet_keys(kind: str, r: int = 4) -> dict:
    """UNet LoRA keys shaped for the tiny diffusers UNet (consumers.tiny_pipeline): an attention
    linear and a LoCon 3x3 conv; SD1 files use diffusers' block names (kohya trains SD1 on the
    diffusers UNet), SDXL files sgm's (input_blocks.3.1 = down_blocks.1.attentions.0 there)."""
    g = torch.Generator().manual_seed(77)
    attn = ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" if kind == "sd1"
            else "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q")
    conv = "lora_unet_down_blocks_0_resnets_0_conv1" if kind == "sd1" else "lora_unet_input_blocks_1_0_in_layers_2"
    return {attn + ".lora_down.weight": torch.randn(r, 64, generator=g) * 0.1,
            attn + ".lora_up.weight": torch.randn(64, r, generator=g) * 0.1,
            attn + ".alpha": torch.tensor(float(r)),
            conv + ".lora_down.weight": torch.randn(r, 32, 3, 3, generator=g) * 0.1,
            conv + ".lora_up.weight": torch.randn(32, r, 1, 1, generator=g) * 0.1,
            conv + ".alpha": torch.tensor(1.0)}


def kohya(path, lora: Lora, *, dtype=torch.float32, unet: bool = True, alpha_when_rank: bool = False) -> Path:
    """kohya sd-scripts file. `alpha_when_rank`: also write .alpha where alpha == rank (sd-scripts
    always writes it; older files and other trainers leave it out: alpha = rank)."""
    sd = {}
    for e, deltas in lora.deltas.items():
        prefix = KOHYA_PREFIX[lora.kind][e]
        for mod, d in deltas.items():
            n = _kohya_name(prefix, mod)
            sd[n + ".lora_down.weight"] = d.down.to(dtype)
            sd[n + ".lora_up.weight"] = d.up.to(dtype)
            if alpha_when_rank or d.alpha != d.rank:
                sd[n + ".alpha"] = torch.tensor(d.alpha, dtype=dtype)
    if unet:
        sd.update({k: v.to(dtype) for k, v in kohya_unet_keys(lora.kind).items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"ss_network_module": "networks.lora"})
    return Path(path)


def _folded_up(d: Delta) -> torch.Tensor:
    """The up matrix of a file that cannot hold alpha: up * alpha / rank (fp32)."""
    return d.up.float() * (d.alpha / d.rank)


def diffusers_linear(path, lora: Lora) -> Path:
    """diffusers LoRALinearLayer-era file: <te>.text_model.<module>.lora_linear_layer.{down,up}.weight,
    no alphas (alpha = rank: alpha / rank folded into up)."""
    sd = {}
    for e, deltas in lora.deltas.items():
        for mod, d in deltas.items():
            n = f"{DIFFUSERS_PREFIX[e]}.{mod}.lora_linear_layer"
            sd[n + ".down.weight"] = d.down.clone()
            sd[n + ".up.weight"] = _folded_up(d)
    save_file(sd, str(path))
    return Path(path)


def diffusers_attn_procs(path, lora: Lora) -> Path:
    """diffusers attention-processor-era file: <te>.text_model.encoder.layers.N.self_attn.to_q_lora.down.weight ...
    (attention only; no alphas: folded into up)."""
    sd = {}
    for e, deltas in lora.deltas.items():
        for mod, d in deltas.items():
            parent, child = mod.rsplit(".", 1)
            assert child in ATTN_PROC, f"the attention-processor format holds attention only, not {mod}"
            n = f"{DIFFUSERS_PREFIX[e]}.{parent}.{ATTN_PROC[child]}"
            sd[n + ".down.weight"] = d.down.clone()
            sd[n + ".up.weight"] = _folded_up(d)
    save_file(sd, str(path))
    return Path(path)


def _injected(enc: Encoder, lora: Lora):
    """The encoder with the LoRA injected as PEFT does for transformers' add_adapter (which
    transformers 5.24 refuses below peft 0.22: inject_adapter_in_model is what it calls)."""
    from peft import inject_adapter_in_model

    spec = lora.specs[enc.name]
    model = inject_adapter_in_model(spec.config(), enc.fresh())
    layers = dict(_lora_layers(model, "default"))
    assert set(layers) == set(lora.deltas[enc.name])
    for mod, m in layers.items():
        d = lora.deltas[enc.name][mod]
        assert (m.r["default"], float(m.lora_alpha["default"])) == (d.rank, d.alpha)
        with torch.no_grad():
            m.lora_A["default"].weight.copy_(d.down)
            m.lora_B["default"].weight.copy_(d.up)
    return model, spec.config()


def diffusers_peft(folder, lora: Lora, encoders: dict, *, metadata: bool = True, training: bool = False,
                   unet: bool = False) -> Path:
    """diffusers 0.42.1's own save path: get_peft_model_state_dict of each PEFT-injected text
    encoder, StableDiffusion[XL]Pipeline.save_lora_weights with the LoraConfig dicts as
    text_encoder[_2]_lora_adapter_metadata (as training_utils._collate_lora_metadata makes them).
    `training`: the state dicts first go through convert_state_dict_to_diffusers, as diffusers'
    train_dreambooth_lora*.py scripts do (attention lora_linear_layer, mlp lora_A/B).
    `metadata=False`: no metadata, alpha = rank: alpha / rank folded into lora_B.
    `unet`: a UNet LoRA beside (unet.<module>.lora_A/B, for the tiny UNet of consumers.tiny_pipeline)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    kwargs = {}
    for e in lora.deltas:
        model, cfg = _injected(encoders[e], lora)
        sd = get_peft_model_state_dict(model)
        if not metadata:
            sd = _fold_peft_state(sd, lora.deltas[e])
        if training:
            sd = convert_state_dict_to_diffusers(sd)
        arg = "text_encoder" if e == "clip_l" else "text_encoder_2"
        kwargs[f"{arg}_lora_layers"] = sd
        if metadata:
            kwargs[f"{arg}_lora_adapter_metadata"] = cfg.to_dict()
    if unet:
        from peft import LoraConfig

        kwargs["unet_lora_layers"] = _diffusers_unet_lora()
        if metadata:    # a file with metadata has the UNet's too (diffusers needs it then)
            kwargs["unet_lora_adapter_metadata"] = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]).to_dict()
    pipe_cls = StableDiffusionPipeline if lora.kind == "sd1" else StableDiffusionXLPipeline
    pipe_cls.save_lora_weights(str(folder), **kwargs)
    return Path(folder) / "pytorch_lora_weights.safetensors"


def with_text_model_prefix(src, dst) -> Path:
    """A diffusers file whose flat CLIPTextModel names (text_encoder.encoder.*, as transformers 5
    writes them) are spelled as transformers 4 wrote them (text_encoder.text_model.encoder.*)."""
    def edit(sd):
        return {re.sub(r"^(text_encoder(?:_2)?)\.encoder\.", r"\1.text_model.encoder.", k): v for k, v in sd.items()}
    return rewrite(src, dst, edit)


def _fold_peft_state(sd: dict, deltas: dict) -> dict:
    out = {}
    for k, v in sd.items():
        mod = canonical_module(k.split(".lora_")[0])
        out[k] = _folded_up(deltas[mod]) if ".lora_B." in k else v
    return out


def _diffusers_unet_lora() -> dict:
    """A UNet LoRA as diffusers saves it (unet module path .lora_A/.lora_B), for the tiny UNet."""
    g = torch.Generator().manual_seed(78)
    n = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    return {n + ".lora_A.weight": torch.randn(4, 64, generator=g) * 0.1,
            n + ".lora_B.weight": torch.randn(64, 4, generator=g) * 0.1}


def peft_folder(folder, enc: Encoder, lora: Lora, *, text_model_prefix: bool = False) -> Path:
    """Plain PEFT: get_peft_model(encoder, config).save_pretrained(folder); returns its
    adapter_model.safetensors. `text_model_prefix`: keys renamed to base_model.model.text_model.*
    (a CLIPTextModel adapter saved under transformers 4, where CLIPTextModel had text_model.)."""
    pm, _ = peft_model(enc, [(lora, 1.0)])
    pm.save_pretrained(str(folder), selected_adapters=["a0"])
    # save_pretrained puts a non-default adapter in a sub-folder named after it
    sub = Path(folder) / "a0"
    src = sub if (sub / "adapter_model.safetensors").is_file() else Path(folder)
    f = src / "adapter_model.safetensors"
    if text_model_prefix:
        sd = load_file(str(f))
        sd = {("base_model.model.text_model." + k[len("base_model.model."):]
               if not k.startswith("base_model.model.text_model.") else k): v for k, v in sd.items()}
        save_file(sd, str(f))
    return f


# --------------------------------------------------------------------------------------------
# Readers: each format read back by hand (the oracle's own reading, for its self-check)
# --------------------------------------------------------------------------------------------
def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first key matching (.*\\.)?(KEY)$, else the default."""
    for key, v in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return v
    return default


def read_kohya(path, kind: str, encoders: dict) -> dict:
    sd = load_file(str(path))
    out = {}
    for e, prefix in KOHYA_PREFIX[kind].items():
        names = {_kohya_name(prefix, m): m for m in encoders[e].modules()}
        for n, mod in names.items():
            if n + ".lora_down.weight" in sd:
                down, up = sd[n + ".lora_down.weight"].float(), sd[n + ".lora_up.weight"].float()
                alpha = float(sd[n + ".alpha"]) if n + ".alpha" in sd else float(down.shape[0])
                out.setdefault(e, {})[mod] = Delta(down, up, alpha)
    used = {k.split(".")[0] for k in sd}
    known = {_kohya_name(p, m) for e, p in KOHYA_PREFIX[kind].items() for m in encoders[e].modules()}
    assert all(u in known or u.startswith("lora_unet_") for u in used), sorted(used - known)
    return out


def read_diffusers(path, kind: str, encoders: dict) -> dict:
    """Any diffusers generation: to_X_lora / lora_linear_layer / lora_A-lora_B, text_model. or not;
    alphas from lora_adapter_metadata, else alpha = rank."""
    sd = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
    inv_proc = {v: k for k, v in ATTN_PROC.items()}
    out, seen = {}, set()
    for e in ENCODERS[kind]:
        te = DIFFUSERS_PREFIX[e]
        cfg = {k[len(te) + 1:]: v for k, v in meta.items() if k.startswith(te + ".")}
        parts = {}
        for k, v in sd.items():
            if not k.startswith(te + "."):
                continue
            rest = k[len(te) + 1:]
            m = re.fullmatch(r"(.+)\.(lora_linear_layer\.down|lora_linear_layer\.up|lora_A|lora_B|"
                             r"to_[qkv]_lora\.down|to_[qkv]_lora\.up|to_out_lora\.down|to_out_lora\.up)\.weight", rest)
            assert m, k
            mod, role = m.group(1), m.group(2)
            if role.startswith("to_"):
                proc, role = role.split(".")
                mod = f"{mod}.{inv_proc[proc]}"
            role = "down" if role.endswith(("down", "lora_A")) else "up"
            parts.setdefault(canonical_module(mod), {})[role] = v.float()
            seen.add(k)
        for mod, p in parts.items():
            r = p["down"].shape[0]
            alpha = (_pattern_value(cfg.get("alpha_pattern") or {}, mod, cfg["lora_alpha"])
                     if cfg else float(r))
            out.setdefault(e, {})[mod] = Delta(p["down"], p["up"], float(alpha))
    assert all(k in seen or k.startswith("unet.") for k in sd), sorted(set(sd) - seen)[:3]
    return out


def read_peft(path, encoder: str) -> dict:
    sd = load_file(str(path))
    cfg = json.loads((Path(path).parent / "adapter_config.json").read_text())
    assert not cfg.get("use_rslora") and not cfg.get("use_dora")
    parts = {}
    for k, v in sd.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight", k)
        assert m, k
        parts.setdefault(m.group(1), {})["down" if m.group(2) == "lora_A" else "up"] = v.float()
    out = {}
    for mod, p in parts.items():
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, mod, cfg["lora_alpha"])
        out[canonical_module(mod)] = Delta(p["down"], p["up"], float(alpha))
    return {encoder: out}


# --------------------------------------------------------------------------------------------
# sdconv's outputs read back (by hand-written names) as canonical tensors
# --------------------------------------------------------------------------------------------
def read_output(layout: str, out: Path, encoder: str) -> dict:
    """The canonical tensors of `encoder` in an sdconv output of `layout` (a file or folder; for
    single-encoder layouts, the output of that encoder). Only the text encoder's weights."""
    out = Path(out)
    if layout == "hf":
        sd = load_file(str(out / "model.safetensors"))
    elif layout == "diffusers":
        sd = load_file(str(out / DIFFUSERS_PREFIX[encoder] / "model.safetensors"))
    elif layout in ("openai", "open_clip"):
        sd = oc_to_hf({k: v for k, v in C.read_state_dict(out).items() if k != "logit_scale"})
    elif layout == "ldm":
        raw = C.read_state_dict(out)
        sd = {k[len(C.LDM_PREFIX):]: v for k, v in raw.items() if k.startswith(C.LDM_PREFIX)}
    elif layout == "sgm":
        raw = C.read_state_dict(out)
        if encoder == "clip_l":
            sd = {k[len(S.SGM_L):]: v for k, v in raw.items() if k.startswith(S.SGM_L)}
        else:
            sd = oc_to_hf({k[len(S.SGM_G):]: v for k, v in raw.items()
                           if k.startswith(S.SGM_G) and not k.endswith("logit_scale")})
    else:
        raise ValueError(layout)
    sd = {(k if k.startswith("text_model.") or k.startswith(PROJ) else "text_model." + k): v
          for k, v in sd.items() if not k.endswith("position_ids")}
    return sd


# --------------------------------------------------------------------------------------------
# diffusers as the consumer of LoRA files
# --------------------------------------------------------------------------------------------
def diffusers_kohya_alphas(lora: Lora, enc: Encoder, written: set) -> dict:
    """The alpha diffusers 0.42.1 gives each module of a kohya file (`written`: the modules whose
    .alpha the file holds), as its code does it:
    - _convert_non_diffusers_lora_to_diffusers names an attention module's alpha
      ``text_model.encoder.layers.N.self_attn.to_q_lora.down.weight.alpha``, an mlp one's
      ``text_model.encoder.layers.N.mlp.fc1.lora_linear_layer.down.weight.alpha``, the projection's
      ``text_projection.alpha``;
    - get_peft_kwargs (is_unet=False) takes the most common alpha as lora_alpha, and for the others
      makes alpha_pattern keys ``".".join(k.split(".down.")[0].split(".")[:-1])``: the attention
      ones become ``text_model.encoder.layers.N.self_attn``, which matches no module (PEFT warns
      "alpha_pattern keys did not match any targeted module"); the mlp ones keep ``text_model.``,
      which matches only a model that has it (CLIPTextModelWithProjection, not transformers 5's
      flat CLIPTextModel); ``text_projection`` matches;
    - a module without .alpha gets lora_alpha (the common alpha), not its rank."""
    from collections import Counter

    deltas = lora.deltas[enc.name]
    have = {m: d.alpha for m, d in deltas.items() if m in written}
    if not have:
        return {m: float(d.rank) for m, d in deltas.items()}
    common = Counter(have.values()).most_common()[0][0]
    if len(set(have.values())) == 1:
        return {m: common for m in deltas}
    own = {m for m in have if m == PROJ or (".mlp." in m and hasattr(enc.model, "text_model"))}
    return {m: (have[m] if m in own else common) for m in deltas}


def tiny_sdxl_pipeline(te1, te2):
    """A tiny StableDiffusionXLPipeline (offline): the two text encoders given, a UNet whose
    cross-attention takes both (2 x width) and whose added conditioning takes bigG's embeds."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=2 * C.WIDTH, attention_head_dim=8,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + C.PROJ)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    tok = C.clip_tokenizer()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched)


_PIPES: dict = {}


def diffusers_fused(kind: str, encoders: dict, lora_file, scale: float = 1.0) -> dict:
    """diffusers' own reading of a LoRA file: pipe.load_lora_weights(file), pipe.fuse_lora(lora_scale),
    pipe.unload_lora_weights() on a tiny pipeline holding fresh copies of the encoders; returns
    {encoder: canonical tensors} of its text encoders."""
    if kind not in _PIPES:         # the UNet/VAE are built once; the text encoders are replaced each time
        if kind == "sd1":
            _PIPES[kind] = C.tiny_pipeline(encoders["clip_l"].fresh())
        else:
            _PIPES[kind] = tiny_sdxl_pipeline(encoders["clip_l"].fresh(), encoders["clip_g"].fresh())
    template = _PIPES[kind]
    comps = dict(template.components)
    comps["unet"] = copy.deepcopy(template.unet)
    comps["text_encoder"] = encoders["clip_l"].fresh()
    if kind == "sdxl":
        comps["text_encoder_2"] = encoders["clip_g"].fresh()
    pipe = type(template)(**comps)
    pipe.load_lora_weights(str(lora_file))
    names = ["text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
    pipe.fuse_lora(components=names, lora_scale=scale)
    pipe.unload_lora_weights()
    out = {"clip_l": canonical_sd(pipe.text_encoder)}
    if kind == "sdxl":
        out["clip_g"] = canonical_sd(pipe.text_encoder_2)
    return out


# --------------------------------------------------------------------------------------------
# Files sdconv must refuse or read with care
# --------------------------------------------------------------------------------------------
def rewrite(src, dst, edit) -> Path:
    """A copy of safetensors file `src` at `dst`, its tensors passed through `edit(dict) -> dict`
    (its metadata kept)."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    save_file({k: v.contiguous() for k, v in edit(load_file(str(src))).items()}, str(dst), metadata=meta)
    return Path(dst)


def kohya_alpha_modules(path, lora: Lora, encoder: str) -> set:
    """The modules of `encoder` whose .alpha a kohya file holds."""
    keys = set(load_file(str(path)))
    prefix = KOHYA_PREFIX[lora.kind][encoder]
    return {m for m in lora.deltas[encoder] if _kohya_name(prefix, m) + ".alpha" in keys}


def kohya_unet_only(path, kind: str) -> Path:
    save_file({k: v.contiguous() for k, v in kohya_unet_keys(kind).items()}, str(path))
    return Path(path)


def diffusers_unet_only(folder) -> Path:
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=_diffusers_unet_lora())
    return Path(folder) / "pytorch_lora_weights.safetensors"
