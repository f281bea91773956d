"""The built-in CLIP text forward (sdconv.converters.forward) against the real libraries.

Oracles: transformers ``CLIPTextModelWithProjection``, open_clip ``open_clip.model.CLIP`` and OpenAI
``clip.model.CLIP``. Each tiny model (width 128, 2 heads, vocab 49408, context 77) has every
parameter overwritten with ``randn * 0.2`` (seeded) so LayerNorms, q/k/v order, activation and
projection orientation all show in the outputs; its state dict is mapped to the canonical form by
hand, here, independently of sdconv's mapping YAML. fp32 agreement: ``atol 1e-5, rtol 0``.
"""
from __future__ import annotations

import pytest
import torch

from sdconv import clip_forward as fw
from sdconv.clip_forward import as_float32, encode, probe_ids

torch.set_num_threads(1)  # tiny models: one thread is much faster on the 2-core machine

WIDTH, HEADS, VOCAB, CONTEXT = 128, 2, 49408, 77
# quick_gelu: 2 layers and a square projection (so a transposed projection still runs);
# gelu: 3 layers and a non-square projection.
TOWERS = {"quick_gelu": {"layers": 2, "proj": 128, "seed": 11},
          "gelu": {"layers": 3, "proj": 96, "seed": 22}}
ATOL = 1e-5
EOS_POS = [3, 3, 38, 38, 76, 1]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def seeded_randn_(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def differs(got: torch.Tensor, want: torch.Tensor, what: str, floor: float = 1e-3) -> None:
    """A negative control: the comparison must fail, by a clear margin."""
    d = maxdiff(got, want)
    assert not torch.allclose(got.float(), want.float(), atol=ATOL, rtol=0), what
    assert d > floor, f"{what}: only {d:.2e} apart"


def canon_from_hf(sd: dict) -> dict:
    """transformers naming -> canonical (q/k/v already split; text_projection.weight is [P, W])."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    out = {"tok_embd.weight": sd["embeddings.token_embedding.weight"],
           "pos_embd.weight": sd["embeddings.position_embedding.weight"],
           "final_norm.weight": sd["final_layer_norm.weight"],
           "final_norm.bias": sd["final_layer_norm.bias"]}
    names = {"layer_norm1": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_out", "layer_norm2": "ffn_norm",
             "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(n):
        for hf, cn in names.items():
            for leaf in ("weight", "bias"):
                out[f"blk.{i}.{cn}.{leaf}"] = sd[f"encoder.layers.{i}.{hf}.{leaf}"]
    if "text_projection.weight" in sd:
        out["text_proj.weight"] = sd["text_projection.weight"]
    return {k: v.detach().clone() for k, v in out.items()}


def canon_from_oc(sd: dict) -> dict:
    """OpenAI / open_clip naming -> canonical (split the fused in_proj; transpose text_projection)."""
    out = {"tok_embd.weight": sd["token_embedding.weight"],
           "pos_embd.weight": sd["positional_embedding"],
           "final_norm.weight": sd["ln_final.weight"],
           "final_norm.bias": sd["ln_final.bias"]}
    names = {"ln_1": "attn_norm", "attn.out_proj": "attn_out", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    for i in range(n):
        p = f"transformer.resblocks.{i}."
        for oc, cn in names.items():
            for leaf in ("weight", "bias"):
                out[f"blk.{i}.{cn}.{leaf}"] = sd[f"{p}{oc}.{leaf}"]
        w, b = sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]
        width = w.shape[1]
        for j, cn in enumerate(("attn_q", "attn_k", "attn_v")):
            out[f"blk.{i}.{cn}.weight"] = w[j * width:(j + 1) * width]
            out[f"blk.{i}.{cn}.bias"] = b[j * width:(j + 1) * width]
    if "text_projection" in sd:
        out["text_proj.weight"] = sd["text_projection"].T
    out["logit_scale"] = sd["logit_scale"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# library models (built once per module)
# --------------------------------------------------------------------------------------------
def hf_model(act: str, eos_token_id: int = 2, context: int = CONTEXT, state: dict | None = None):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    t = TOWERS[act]
    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                         num_hidden_layers=t["layers"], num_attention_heads=HEADS,
                         max_position_embeddings=context, hidden_act=act, projection_dim=t["proj"],
                         bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1)
    m = CLIPTextModelWithProjection(cfg).eval()
    if state is None:
        seeded_randn_(m, t["seed"])
    else:
        m.load_state_dict(state)
    return m


_CACHE: dict = {}


def cached(key, build):
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def hf_run(act: str, eos_token_id: int = 2):
    """(canonical fp32, ids, transformers outputs) for a seeded transformers tower."""
    def build():
        base = hf_run(act, 2) if eos_token_id != 2 else None  # same weights, other pooling rule
        m = hf_model(act, eos_token_id, state=None if base is None else base[3])
        ids = probe_ids()
        with torch.no_grad():
            out = m(input_ids=ids, output_hidden_states=True)
        return canon_from_hf(m.state_dict()), ids, out, m.state_dict()

    return cached(("hf", act, eos_token_id), build)


def oc_run(act: str):
    """(canonical fp32, ids, encode_text output, ln_final output) for a seeded open_clip CLIP."""
    def build():
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        t = TOWERS[act]
        vcfg = CLIPVisionCfg(layers=1, width=64, head_width=64, patch_size=16, image_size=32)
        tcfg = CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=HEADS,
                           layers=t["layers"])
        m = CLIP(t["proj"], vcfg, tcfg, quick_gelu=(act == "quick_gelu")).eval()
        seeded_randn_(m, t["seed"] + 100)
        return (canon_from_oc(m.state_dict()),) + hooked(m)

    return cached(("oc", act), build)


def hooked(m):
    """ids, encode_text(ids), ln_final output as [B, L, W]."""
    ids = probe_ids()
    seen = {}
    h = m.ln_final.register_forward_hook(lambda mod, inp, out: seen.__setitem__("x", out))
    try:
        with torch.no_grad():
            proj = m.encode_text(ids)
    finally:
        h.remove()
    last = seen["x"]
    if last.shape[0] != ids.shape[0]:  # sequence-first layouts
        last = last.permute(1, 0, 2)
    return ids, proj, last


def openai_run():
    def build():
        from clip.model import CLIP

        t = TOWERS["quick_gelu"]
        m = CLIP(embed_dim=t["proj"], image_resolution=32, vision_layers=1, vision_width=64,
                 vision_patch_size=16, context_length=CONTEXT, vocab_size=VOCAB, transformer_width=WIDTH,
                 transformer_heads=HEADS, transformer_layers=t["layers"]).eval()
        seeded_randn_(m, t["seed"] + 200)
        return (canon_from_oc(m.state_dict()),) + hooked(m)

    return cached(("openai",), build)


# --------------------------------------------------------------------------------------------
# probe ids
# --------------------------------------------------------------------------------------------
def test_probe_ids_suite():
    ids = probe_ids()
    assert ids.dtype == torch.long and ids.shape == (len(fw.PROBE_ROWS), CONTEXT)
    assert torch.equal(ids, probe_ids()), "deterministic"
    assert (ids[:, 0] == 49406).all()
    assert ids.argmax(-1).tolist() == EOS_POS
    for r, (row, e) in enumerate(zip(ids, EOS_POS)):
        assert row[e] == 49407
        body = row[1:e]
        assert (body < 49406).all() and (body >= 1).all()
        pad = fw.PROBE_ROWS[r][2]
        tail = row[e + 1:]
        assert (tail == (49407 if pad == 49407 else 0)).all()
    # pad-0 / pad-eos pairs share their tokens up to the eos
    assert torch.equal(ids[0, :4], ids[1, :4]) and torch.equal(ids[2, :39], ids[3, :39])
    assert (ids[0, 4:] == 0).all() and (ids[1, 4:] == 49407).all() and (ids[2, 39:] == 0).all()
    assert len(set(ids[4, 1:76].tolist())) > 60, "random body"
    # the global RNG is not consumed
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    probe_ids()
    assert torch.equal(a, torch.rand(3))


def test_probe_ids_short_context():
    ids = probe_ids(context=16)
    assert ids.shape == (6, 16)
    assert ids.argmax(-1).tolist() == [3, 3, 8, 8, 15, 1]
    assert (ids[:, 0] == 49406).all()
    small = probe_ids(context=2)
    assert small.argmax(-1).tolist() == [1] * 6
    with pytest.raises(ValueError):
        probe_ids(context=1)


# --------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos_token_id", [2, 49407])
def test_matches_transformers(act, eos_token_id):
    canon, ids, out, _ = hf_run(act, eos_token_id)
    got = encode(canon, ids, HEADS, act, hidden_layers=True)
    n = TOWERS[act]["layers"]
    close(got["last_hidden"], out.last_hidden_state, "last_hidden")
    close(got["projected"], out.text_embeds, "projected")
    assert got["projected"].shape == (ids.shape[0], TOWERS[act]["proj"])
    assert len(got["hidden_states"]) == len(out.hidden_states) == n + 1
    for i, (a, b) in enumerate(zip(got["hidden_states"], out.hidden_states)):
        close(a, b, f"hidden_states[{i}]")
    # pooled = last_hidden at the eos; projected = pooled @ text_proj.weight.T
    close(got["pooled"], out.last_hidden_state[torch.arange(len(ids)), EOS_POS], "pooled")
    close(got["projected"], got["pooled"] @ canon["text_proj.weight"].T, "projected from pooled")


def test_pooled_ignores_padding_convention():
    canon, ids, _, _ = hf_run("gelu")
    got = encode(canon, ids, HEADS, "gelu")
    p = got["pooled"]
    assert torch.equal(p[0], p[1]) and torch.equal(p[2], p[3])
    assert maxdiff(p[0], p[2]) > 1e-2


def test_without_projection_and_fewer_layers():
    canon, ids, out, _ = hf_run("gelu")
    canon = {k: v for k, v in canon.items() if k != "text_proj.weight"}
    got = encode(canon, ids, HEADS, "gelu", hidden_layers=True)
    assert got["projected"] is None
    close(got["last_hidden"], out.last_hidden_state, "last_hidden, no projection")
    # drop the last block: the forward follows the keys
    two = {k: v for k, v in canon.items() if not k.startswith("blk.2.")}
    g2 = encode(two, ids, HEADS, "gelu", hidden_layers=True)
    assert len(g2["hidden_states"]) == 3
    close(g2["hidden_states"][2], out.hidden_states[2], "hidden_states[2] of 2 blocks")
    gap = {k: v for k, v in canon.items() if not k.startswith("blk.1.")}
    with pytest.raises(ValueError, match="contiguous"):
        encode(gap, ids, HEADS, "gelu")


def test_short_context_and_short_ids():
    """pos_embd shorter than 77, and ids shorter than the context."""
    act = "quick_gelu"
    m = hf_model(act, context=16)
    canon = canon_from_hf(m.state_dict())
    assert canon["pos_embd.weight"].shape == (16, WIDTH)
    for ids in (probe_ids(context=16), probe_ids(context=16)[:, :10]):
        with torch.no_grad():
            out = m(input_ids=ids)
        got = encode(canon, ids, HEADS, act)
        close(got["last_hidden"], out.last_hidden_state, f"last_hidden L={ids.shape[1]}")
        close(got["projected"], out.text_embeds, f"projected L={ids.shape[1]}")
    with pytest.raises(ValueError, match="sequence length"):
        encode(canon, probe_ids(), HEADS, act)


# --------------------------------------------------------------------------------------------
# open_clip and OpenAI clip
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_matches_open_clip(act):
    canon, ids, proj, last = oc_run(act)
    got = encode(canon, ids, HEADS, act)
    close(got["last_hidden"], last, "ln_final output")
    close(got["projected"], proj, "encode_text")


def test_matches_openai_clip():
    canon, ids, proj, last = openai_run()
    got = encode(canon, ids, HEADS, "quick_gelu")
    close(got["last_hidden"], last, "ln_final output")
    close(got["projected"], proj, "encode_text")


# --------------------------------------------------------------------------------------------
# negative controls: each mistake must make the comparison fail
# --------------------------------------------------------------------------------------------
def test_swapped_q_k_fails():
    canon, ids, out, _ = hf_run("quick_gelu")
    bad = dict(canon)
    for i in range(TOWERS["quick_gelu"]["layers"]):
        for leaf in ("weight", "bias"):
            q, k = f"blk.{i}.attn_q.{leaf}", f"blk.{i}.attn_k.{leaf}"
            bad[q], bad[k] = canon[k], canon[q]
    got = encode(bad, ids, HEADS, "quick_gelu")
    differs(got["last_hidden"], out.last_hidden_state, "q/k swapped: last_hidden")
    differs(got["projected"], out.text_embeds, "q/k swapped: projected")


@pytest.mark.parametrize("act,wrong", [("quick_gelu", "gelu"), ("gelu", "quick_gelu")])
def test_wrong_activation_fails(act, wrong):
    canon, ids, out, _ = hf_run(act)
    got = encode(canon, ids, HEADS, wrong)
    differs(got["last_hidden"], out.last_hidden_state, f"{wrong} for {act}: last_hidden")
    differs(got["projected"], out.text_embeds, f"{wrong} for {act}: projected")


def test_transposed_projection_fails():
    canon, ids, out, _ = hf_run("quick_gelu")
    bad = dict(canon, **{"text_proj.weight": canon["text_proj.weight"].T.contiguous()})
    got = encode(bad, ids, HEADS, "quick_gelu")
    close(got["last_hidden"], out.last_hidden_state, "last_hidden is unaffected")
    differs(got["projected"], out.text_embeds, "transposed projection")
    # same mistake on the OpenAI side: text_projection used without its transpose
    oc, oids, oproj, _ = oc_run("quick_gelu")
    bad = dict(oc, **{"text_proj.weight": oc["text_proj.weight"].T.contiguous()})
    differs(encode(bad, oids, HEADS, "quick_gelu")["projected"], oproj, "open_clip projection untransposed")


def test_wrong_heads_fails():
    canon, ids, out, _ = hf_run("gelu")
    differs(encode(canon, ids, 4, "gelu")["last_hidden"], out.last_hidden_state, "4 heads for 2")
    with pytest.raises(ValueError, match="heads"):
        encode(canon, ids, 3, "gelu")


# --------------------------------------------------------------------------------------------
# dtypes and inputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_fp16_close_to_fp32(act):
    canon, ids, _, _ = hf_run(act)
    ref = encode(canon, ids, HEADS, act, hidden_layers=True)
    half = {k: v.half() for k, v in canon.items()}
    got = encode(half, ids, HEADS, act, hidden_layers=True)
    assert got["last_hidden"].dtype == torch.float16 and got["projected"].dtype == torch.float16
    for name in ("last_hidden", "pooled", "projected"):
        assert torch.isfinite(got[name]).all()
        d = maxdiff(got[name], ref[name])
        assert d < 5e-3, f"fp16 {name}: {d:.2e}"
    # the un-normalised residual stream grows to |x| ~ 8, where one fp16 ulp is 4e-3: relative bound
    last_block, ref_block = got["hidden_states"][-1], ref["hidden_states"][-1]
    assert maxdiff(last_block, ref_block) < 5e-3 * ref_block.abs().max().item()
    # as_float32 of the fp16 dict runs in fp32 (and matches the fp16-rounded weights' fp32 run)
    back = encode(as_float32(half), ids, HEADS, act)
    assert back["last_hidden"].dtype == torch.float32
    assert maxdiff(back["last_hidden"], got["last_hidden"]) < 5e-3


def test_as_float32_copies():
    canon, _, _, _ = hf_run("quick_gelu")
    src = {k: v.half() for k, v in canon.items()}
    src["ids_buffer"] = torch.arange(4)
    f = as_float32(src)
    assert set(f) == set(src)
    assert f["ids_buffer"].dtype == torch.long
    assert all(v.dtype == torch.float32 for k, v in f.items() if k != "ids_buffer")
    f32 = as_float32(canon)
    assert all(f32[k].data_ptr() != canon[k].data_ptr() for k in canon)
    assert all(torch.equal(f32[k], canon[k]) for k in canon)


def test_mixed_dtypes_run_in_fp32():
    """OpenAI .pt archives mix fp16 matrices with fp32 embeddings/LayerNorms."""
    canon, ids, _, _ = hf_run("quick_gelu")
    mixed = {k: (v.half() if v.dim() == 2 and k.startswith("blk.") else v) for k, v in canon.items()}
    got = encode(mixed, ids, HEADS, "quick_gelu")
    assert got["last_hidden"].dtype == torch.float32
    ref = encode({k: v.float() for k, v in mixed.items()}, ids, HEADS, "quick_gelu")
    close(got["last_hidden"], ref["last_hidden"], "mixed = fp32 of the same values")


def test_input_checks():
    canon, ids, out, _ = hf_run("quick_gelu")
    one = encode(canon, ids[2], HEADS, "quick_gelu")  # a single [L] row
    close(one["last_hidden"][0], out.last_hidden_state[2], "1-D ids")
    with pytest.raises(ValueError, match="act"):
        encode(canon, ids, HEADS, "relu")
    with pytest.raises(ValueError, match="token ids"):
        encode(canon, torch.full((1, 5), VOCAB), HEADS, "quick_gelu")
    with pytest.raises(ValueError, match="lacks"):
        encode({k: v for k, v in canon.items() if k != "final_norm.bias"}, ids, HEADS, "quick_gelu")
