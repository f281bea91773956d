"""A tiny OpenAI CLIP reference and SD1.x checkpoints holding its text tower (graft, verify)."""
import torch

from tests.helpers import consumers as C


def oc_to_hf(oc: dict) -> dict:
    """OpenAI text names -> transformers text_model.* (hand-written, the inverse of consumers.hf_to_oc)."""
    hf = {"text_model.embeddings.token_embedding.weight": oc["token_embedding.weight"],
          "text_model.embeddings.position_embedding.weight": oc["positional_embedding"],
          "text_model.final_layer_norm.weight": oc["ln_final.weight"],
          "text_model.final_layer_norm.bias": oc["ln_final.bias"]}
    hf.update(blocks_to_hf(oc, "", "text_model."))
    return {k: v.detach().clone().contiguous() for k, v in hf.items()}


def blocks_to_hf(sd: dict, src: str, dst: str) -> dict:
    """The residual blocks of an OpenAI tower under `src` (transformer.resblocks.N.*, fused q|k|v)
    as transformers names under `dst` (encoder.layers.N.*, q/k/v split), by hand."""
    out = {}
    pre = src + "transformer.resblocks."
    n = 1 + max(int(k[len(pre):].split(".")[0]) for k in sd if k.startswith(pre))
    for i in range(n):
        o, h = f"{pre}{i}.", f"{dst}encoder.layers.{i}."
        for s in ("weight", "bias"):
            out[h + f"layer_norm1.{s}"] = sd[o + f"ln_1.{s}"]
            out[h + f"layer_norm2.{s}"] = sd[o + f"ln_2.{s}"]
            for x, chunk in zip("qkv", sd[o + f"attn.in_proj_{s}"].chunk(3, 0)):
                out[h + f"self_attn.{x}_proj.{s}"] = chunk
            out[h + f"self_attn.out_proj.{s}"] = sd[o + f"attn.out_proj.{s}"]
            out[h + f"mlp.fc1.{s}"] = sd[o + f"mlp.c_fc.{s}"]
            out[h + f"mlp.fc2.{s}"] = sd[o + f"mlp.c_proj.{s}"]
    return out


def reference_and_sd1(d, dtype=torch.float32, tweak=None, fp16_exact=False, seed=7):
    """Write d/ViT-tiny.pt (a full tiny OpenAI CLIP state dict, fp32, logit_scale ln 100) and
    d/sd1.ckpt (an SD1.x checkpoint whose text tower holds the same weights, stored as `dtype`;
    `tweak(hf_state_dict)` may edit it first). Returns the clip.model.CLIP reference.
    fp16_exact: every weight a value fp16 holds exactly, so that clip.load (which rounds the
    weights to fp16, then back to fp32 on a CPU) loads the reference unchanged."""
    m = C.openai_model()
    C.seeded_randn_(m, seed)
    with torch.no_grad():
        if fp16_exact:
            for p in m.parameters():
                p.copy_(p.half().float())
        m.logit_scale.fill_(4.6052)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    torch.save(sd, d / "ViT-tiny.pt")
    text = {k: v for k, v in sd.items() if not k.startswith("visual.") and k not in ("text_projection", "logit_scale")}
    hf = oc_to_hf(text)
    if tweak:
        tweak(hf)
    ldm = {"cond_stage_model.transformer." + k: v.to(dtype) for k, v in hf.items()}
    ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ldm["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4)
    torch.save({"state_dict": ldm, "global_step": 1}, d / "sd1.ckpt")
    return m
