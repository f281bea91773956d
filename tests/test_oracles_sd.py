"""Consumer-oracle tests for the Stable Diffusion layouts: sgm (SDXL base / refiner), sd3, comfy,
SD2 ldm (OpenCLIP-H at cond_stage_model.model.) and diffusers' text_encoder_2 / 23-block SD2 folder.

Sources are written with hand-made names from the tiny references of ``consumers.py`` (width 128,
2 heads, every parameter randn*0.2); outputs are loaded by the consuming libraries (transformers,
open_clip, OpenAI clip, diffusers) and must reproduce the reference to 1e-5 in fp32. The last part
builds full-size files from the key lists of real checkpoints (tests/data) and checks them against
open_clip's own TextTransformer run on the source tensors.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import consumers as C
from tests.helpers import consumers_sd as S
from sdconv import UsageError, convert, make_plans

pytestmark = pytest.mark.oracle

G_LAYERS = C.LAYERS          # the bigG-shaped and CLIP-L-shaped tiny references: 2 blocks
H_LAYERS = 3                 # the SD2-style tiny reference: 3 blocks (diffusers keeps 2)


# --------------------------------------------------------------------------------------------
# Tiny world
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_sources")
    L, G = C.build_reference("L"), C.build_reference("G")
    H = S.build_reference("gelu", H_LAYERS, seed=3)
    src = {
        "sgm_base": S.write_sgm_base(L, G, root / "sdxl_base.safetensors"),
        "sgm_refiner": S.write_sgm_refiner(G, root / "sdxl_refiner.safetensors"),
        "sd3": S.write_sd3(L, G, root / "sd3.safetensors"),
        "comfy": S.write_comfy(G, root / "clip_g.safetensors"),
        "comfy_old": S.write_comfy(G, root / "clip_g_old.safetensors", old=True),
        "sd2": S.write_ldm_sd2(H, root / "sd2.safetensors"),
    }
    oc_names = {act: C.register_open_clip_config(act, root) for act in ("gelu", "quick_gelu")}
    # the SD2 pipeline template: a tiny diffusers SD pipeline whose text encoder has the SD2 shape
    from transformers import CLIPTextModel
    cfg = C.hf_text_config("gelu", eos_token_id=2)
    cfg.num_hidden_layers = H_LAYERS - 1
    pipe = C.tiny_pipeline(CLIPTextModel(cfg).eval())
    pipe.save_pretrained(str(root / "sd2_pipeline"))
    return {"root": root, "L": L, "G": G, "H": H, "src": src, "oc_names": oc_names,
            "sd2_pipeline": root / "sd2_pipeline"}


def _hf_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def check_hf_folder(folder: Path, ref: C.Reference, with_projection: bool, label: str, layers: int = G_LAYERS):
    """A transformers folder: config, key names, zero missing/unexpected keys, same outputs."""
    cfg = _hf_config(folder)
    arch = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    assert cfg["architectures"] == [arch], (label, cfg["architectures"])
    assert cfg["hidden_act"] == ref.act, (label, cfg["hidden_act"])
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == \
        (C.WIDTH, C.HEADS, layers, C.FFN), (label, cfg)
    assert cfg["eos_token_id"] == 2
    if with_projection:
        assert cfg["projection_dim"] == C.PROJ
    sd = load_file(str(Path(folder) / "model.safetensors"))
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in sd), sorted(sd)[:5]
    assert ("text_projection.weight" in sd) == with_projection, label
    assert all(v.dtype == torch.float32 for v in sd.values())
    loaded = C.load_transformers(folder, with_projection=with_projection)
    C.compare(loaded.forward(ref.ids), ref.expected, label + " transformers")
    return loaded


def check_oc_file(path: Path, ref: C.Reference, has_proj: bool, has_logit_scale: bool, label: str, oc_names: dict):
    """An OpenAI/open_clip flat file: exact text key set, then open_clip (flat CLIP, named config,
    CustomTextCLIP) and, for QuickGELU, OpenAI clip; all reproduce the reference."""
    sd = C.read_state_dict(path)
    want = C.oc_text_keys(proj=has_proj, logit_scale=has_logit_scale)
    assert set(sd) == want, f"{label}: extra {sorted(set(sd) - want)} missing {sorted(want - set(sd))}"
    assert all(v.dtype == torch.float32 for v in sd.values())
    if has_proj:
        assert sd["text_projection"].shape == (C.WIDTH, C.PROJ)
        torch.testing.assert_close(sd["text_projection"], ref.oc_sd["text_projection"], atol=0, rtol=0)
    if has_logit_scale:
        assert float(sd["logit_scale"]) == pytest.approx(float(ref.logit_scale))
    ids, exp = ref.ids, ref.expected
    C.compare(C.load_open_clip(path, ref.act, has_proj, has_logit_scale).forward(ids), exp, label + " open_clip")
    C.compare(C.load_open_clip(path, ref.act, has_proj, has_logit_scale, via_named_config=oc_names[ref.act])
              .forward(ids), exp, label + " open_clip named config")
    if has_proj:  # open_clip moves a flat dict under "text." only when it has text_projection
        C.compare(C.load_open_clip(path, ref.act, has_proj, has_logit_scale, custom_text=True).forward(ids),
                  exp, label + " CustomTextCLIP")
    if ref.act == "quick_gelu":
        C.compare(C.load_openai_clip(path, has_proj, has_logit_scale).forward(ids), exp, label + " OpenAI clip")


def test_sources_selfcheck(tiny):
    """The hand-written sources hold the reference's weights (the oracle is right before sdconv)."""
    L, G, H = tiny["L"], tiny["G"], tiny["H"]
    base = load_file(str(tiny["src"]["sgm_base"]))
    for k, v in G.oc_sd.items():
        assert torch.equal(base[S.SGM_G + k], v), k
    assert base[S.SGM_L + "text_model.embeddings.position_ids"].dtype == torch.int64
    # open_clip on the bigG part of the sgm file reproduces the reference
    oc = {k[len(S.SGM_G):]: v for k, v in base.items() if k.startswith(S.SGM_G)}
    p = tiny["root"] / "selfcheck_g.safetensors"
    S.save(oc, p)
    C.compare(C.load_open_clip(p, "gelu", True, True).forward(G.ids), G.expected, "selfcheck G")
    # the 3-block H reference: penultimate-with-norm differs from the last hidden state
    pen = S.hf_hidden_normed(H.model, H.ids, -2)
    torch.testing.assert_close(S.hf_hidden_normed(H.model, H.ids, -1), H.expected[0], atol=C.ATOL, rtol=0)
    assert (pen - H.expected[0]).abs().max() > 1e-2
    # the full-size reference route (open_clip TextTransformer on meta + assign) agrees with transformers
    for ref in (L, G, H):
        last, pooled, proj, hid = S.open_clip_text_forward(ref.oc_sd, C.HEADS, ref.act, ref.ids, hidden_index=-2)
        C.compare((last, pooled, proj), ref.expected, f"open_clip_text_forward {ref.act}")
        torch.testing.assert_close(hid, S.hf_hidden_normed(ref.model, ref.ids, -2), atol=C.ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# 1. bigG-shaped (GELU, square projection) encoder into transformers and open_clip
# --------------------------------------------------------------------------------------------
G_SOURCES = {  # name -> (expected detected layout, convert kwargs, has logit_scale)
    "sgm_base": ("sgm", {"encoder": "clip_g"}, True),
    "sd3": ("sd3", {"encoder": "clip_g"}, False),
    "comfy": ("comfy", {"params": {"encoder": "clip_g"}}, True),
    "comfy_old": ("comfy", {"params": {"encoder": "clip_g"}}, True),
}


@pytest.mark.parametrize("target", ["hf", "open_clip"])
@pytest.mark.parametrize("source", list(G_SOURCES))
def test_bigg_to_hf_and_open_clip(tiny, tmp_path, source, target):
    layout, kw, has_ls = G_SOURCES[source]
    G = tiny["G"]
    out = tmp_path / ("out" if target == "hf" else "out.safetensors")
    res = convert(str(tiny["src"][source]), str(out), to=target, from_=None, **kw)
    assert res.outputs == [out]
    (e,) = res.plans[0].encoders
    assert res.plans[0].read.layout.name == layout
    assert e.identity == "clip_g" and e.params == {"heads": C.HEADS, "act": "gelu"}, (e.identity, e.params)
    label = f"{source}->{target}"
    if target == "hf":
        check_hf_folder(out, G, True, label)
    else:
        check_oc_file(out, G, True, has_ls, label, tiny["oc_names"])


# --------------------------------------------------------------------------------------------
# 2. SD2 -> diffusers reproduces the penultimate layer (and 5. its negative control)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd2_diffusers(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd2_out") / "sd2_diffusers"
    res = convert(str(tiny["src"]["sd2"]), str(out), to="diffusers", from_=None)
    return res, out


def test_sd2_to_diffusers_penultimate(tiny, sd2_diffusers, tmp_path):
    H = tiny["H"]
    res, out = sd2_diffusers
    plan = res.plans[0]
    assert plan.read.layout.name == "ldm"
    (e,) = plan.encoders
    assert e.identity == "clip_h" and e.params == {"heads": C.HEADS, "act": "gelu"}, (e.identity, e.params)
    te = out / "text_encoder"
    assert sorted(p.name for p in out.iterdir()) == ["sdconv.json", "text_encoder", "tokenizer"]
    cfg = _hf_config(te)
    assert cfg["num_hidden_layers"] == H_LAYERS - 1 and cfg["hidden_act"] == "gelu", cfg
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["eos_token_id"]) == (C.WIDTH, C.HEADS, 2)
    sd = load_file(str(te / "model.safetensors"))
    assert "text_projection.weight" not in sd and "logit_scale" not in sd
    blocks = {int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")}
    assert blocks == set(range(H_LAYERS - 1)), blocks
    assert set(sd) == {k for k in H.hf_sd if k.startswith("text_model.") and f"layers.{H_LAYERS - 1}." not in k}
    # the notes say block 2 was dropped, and why; the output's metadata records them
    dropped = [n for n in plan.notes if "block 2" in n and "dropped" in n]
    assert dropped and "penultimate" in dropped[0], plan.notes
    notes = json.loads(S.metadata(te / "model.safetensors")["sdconv.notes"])
    assert any("block 2" in n and "penultimate" in n for n in notes), notes

    expected = S.hf_hidden_normed(H.model, H.ids, -2)         # final_layer_norm(output of block 1)
    loaded = C.load_transformers(te, with_projection=False)
    last = loaded.forward(H.ids)[0]
    torch.testing.assert_close(last, expected, atol=C.ATOL, rtol=0)

    # a tiny diffusers SD pipeline with this text_encoder/: encode_prompt gives the same tensor
    pipe_dir = C.assemble_pipeline(tiny["sd2_pipeline"], te, tmp_path / "pipe")
    embeds, pids, pipe = C.diffusers_encode_prompt(pipe_dir)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert pipe.text_encoder.config.num_hidden_layers == H_LAYERS - 1
    torch.testing.assert_close(embeds, S.hf_hidden_normed(H.model, pids, -2), atol=C.ATOL, rtol=0)


def test_sd2_to_diffusers_negative_control_last_layer(tiny, sd2_diffusers):
    """5. The same output against final_layer_norm(hidden_states[-1]) (SD1-style last layer) must fail."""
    H = tiny["H"]
    _, out = sd2_diffusers
    last = C.load_transformers(out / "text_encoder", with_projection=False).forward(H.ids)[0]
    wrong = S.hf_hidden_normed(H.model, H.ids, -1)
    torch.testing.assert_close(wrong, H.expected[0], atol=C.ATOL, rtol=0)   # it is the reference's last layer
    with pytest.raises(AssertionError):
        torch.testing.assert_close(last, wrong, atol=C.ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# 3. --encoder all on an SDXL base; SDXL refiner and SD3 detected and converted
# --------------------------------------------------------------------------------------------
def test_sdxl_base_all_to_diffusers(tiny, tmp_path):
    L, G = tiny["L"], tiny["G"]
    out = tmp_path / "sdxl"
    res = convert(str(tiny["src"]["sgm_base"]), str(out), to="diffusers", from_=None, encoder="all")
    assert res.outputs == [out] and len(res.plans) == 1
    plan = res.plans[0]
    assert plan.read.layout.name == "sgm"
    assert [(e.identity, e.slot.name, e.params["act"]) for e in plan.encoders] == \
        [("clip_l", "clip_l", "quick_gelu"), ("clip_g", "clip_g", "gelu")]
    assert sorted(p.name for p in out.iterdir()) == ["sdconv.json", "text_encoder", "text_encoder_2", "tokenizer",
                                                   "tokenizer_2"]
    check_hf_folder(out / "text_encoder", L, False, "sdxl->diffusers text_encoder")
    check_hf_folder(out / "text_encoder_2", G, True, "sdxl->diffusers text_encoder_2")


@pytest.mark.parametrize("target", ["openai", "open_clip", "hf"])
def test_sdxl_base_all_to_single_encoder_outputs(tiny, tmp_path, target):
    """A layout with one encoder: one output per encoder, <stem>.<encoder><suffix> (folders: <name>.<encoder>)."""
    L, G = tiny["L"], tiny["G"]
    out = tmp_path / ("out" if target == "hf" else "out.safetensors")
    res = convert(str(tiny["src"]["sgm_base"]), str(out), to=target, from_=None, encoder="all")
    names = ["out.clip_l", "out.clip_g"] if target == "hf" else ["out.clip_l.safetensors", "out.clip_g.safetensors"]
    want = [tmp_path / n for n in names]
    assert sorted(res.outputs) == sorted(want), res.outputs
    assert sorted(tmp_path.iterdir()) == sorted(want), "nothing else (no out / out.safetensors) is written"
    assert [e.identity for p in res.plans for e in p.encoders] == ["clip_l", "clip_g"]
    if target == "hf":
        check_hf_folder(want[0], L, False, "sdxl->hf clip_l")
        check_hf_folder(want[1], G, True, "sdxl->hf clip_g")
        return
    # SDXL's CLIP-L has no projection and no logit_scale; bigG has both
    check_oc_file(want[0], L, False, False, f"sdxl->{target} clip_l", tiny["oc_names"])
    check_oc_file(want[1], G, True, True, f"sdxl->{target} clip_g", tiny["oc_names"])


def test_sdxl_base_without_encoder_is_a_usage_error(tiny, tmp_path):
    for to in ("hf", "diffusers", "openai"):
        with pytest.raises(UsageError) as ei:
            convert(str(tiny["src"]["sgm_base"]), str(tmp_path / f"x_{to}"), to=to)
        msg = str(ei.value)
        assert "clip_l" in msg and "clip_g" in msg, msg
        assert not (tmp_path / f"x_{to}").exists()
    with pytest.raises(UsageError):
        make_plans(str(tiny["src"]["sgm_base"]), to="hf")


@pytest.mark.parametrize("target", ["diffusers", "open_clip"])
def test_sdxl_refiner_detected_and_converted(tiny, tmp_path, target):
    G = tiny["G"]
    out = tmp_path / ("refiner" if target == "diffusers" else "refiner.safetensors")
    res = convert(str(tiny["src"]["sgm_refiner"]), str(out), to=target, from_=None)
    plan = res.plans[0]
    assert res.outputs == [out] and plan.read.layout.name == "sgm"
    (e,) = plan.encoders
    assert e.read.prefix == S.SGM_REFINER_G
    # at width 128 the place embedders.0.model. is ambiguous (refiner bigG / SD2.1-turbo ViT-H):
    # sdconv reads it as clip_g and says so
    assert e.identity == "clip_g" and e.params == {"heads": C.HEADS, "act": "gelu"}, (e.identity, e.params)
    assert any("clip_h" in n for n in plan.notes), plan.notes
    if target == "diffusers":
        assert sorted(p.name for p in out.iterdir()) == ["sdconv.json", "text_encoder_2", "tokenizer_2"]
        check_hf_folder(out / "text_encoder_2", G, True, "refiner->diffusers")
    else:
        check_oc_file(out, G, True, True, "refiner->open_clip", tiny["oc_names"])


def test_sd3_all_detected_and_converted(tiny, tmp_path):
    L, G = tiny["L"], tiny["G"]
    out = tmp_path / "sd3"
    res = convert(str(tiny["src"]["sd3"]), str(out), to="diffusers", from_=None, encoder="all")
    plan = res.plans[0]
    assert res.outputs == [out] and plan.read.layout.name == "sd3"
    assert [(e.identity, e.params["act"]) for e in plan.encoders] == [("clip_l", "quick_gelu"), ("clip_g", "gelu")]
    assert sorted(p.name for p in out.iterdir()) == ["sdconv.json", "text_encoder", "text_encoder_2", "tokenizer",
                                                   "tokenizer_2"]
    # SD3's clip_l carries a projection here: diffusers' SD3 text_encoder is WithProjection too
    check_hf_folder(out / "text_encoder", L, True, "sd3->diffusers text_encoder")
    check_hf_folder(out / "text_encoder_2", G, True, "sd3->diffusers text_encoder_2")
    # and into single-encoder files: one per encoder
    res = convert(str(tiny["src"]["sd3"]), str(tmp_path / "sd3.safetensors"), to="open_clip", encoder="all")
    assert sorted(p.name for p in res.outputs) == ["sd3.clip_g.safetensors", "sd3.clip_l.safetensors"]
    check_oc_file(tmp_path / "sd3.clip_l.safetensors", L, True, False, "sd3->open_clip clip_l", tiny["oc_names"])
    check_oc_file(tmp_path / "sd3.clip_g.safetensors", G, True, False, "sd3->open_clip clip_g", tiny["oc_names"])


# --------------------------------------------------------------------------------------------
# 4. Real key sets at full size
# --------------------------------------------------------------------------------------------
FULL_IDS = C.token_ids()[[1, 2]]        # 2 sequences: eos at 20 (49407-padded) and at 76
FULL_ATOL = 1e-4


def _check_written(path: Path, sd: dict, prefix: str):
    """The streamed file reads back with safetensors: same names, shapes, dtypes; spot-check values."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {prefix + k for k in sd}
        for k in list(sd)[::37]:
            assert torch.equal(f.get_tensor(prefix + k), sd[k]), k


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Full-size files with the exact key names and shapes of real checkpoints (fp16 randn*0.02,
    int64 position_ids), and the reference outputs open_clip computes from the same tensors.

    - sd2:     CLIP-v2-SD (24 blocks, projection, logit_scale) at cond_stage_model.model.
    - sd2_wd:  CLIP-v2-WD (23 blocks): the same tensors less block 23, projection, logit_scale
    - base:    CLIP-XL-SD at conditioner.embedders.1.model. + CLIP-v1-SD at
               conditioner.embedders.0.transformer.text_model. (a full SDXL base text side)
    - refiner: the same bigG at conditioner.embedders.0.model.
    """
    root = tmp_path_factory.mktemp("full_size")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    files, refs = {}, {}
    try:
        # --- ViT-H (SD2) and the 23-block WD variant
        h = S.random_full("CLIP-v2-SD.txt", seed=21)
        wd_keys = [k for k, _ in S.keylist("CLIP-v2-WD.txt")]
        assert set(wd_keys) <= set(h) and not any(".resblocks.23." in k for k in wd_keys)
        files["sd2"] = S.save({S.SD2_PREFIX + k: v for k, v in h.items()}, root / "sd2.safetensors")
        files["sd2_wd"] = S.save({S.SD2_PREFIX + k: h[k] for k in wd_keys}, root / "sd2_wd.safetensors")
        _check_written(files["sd2"], h, S.SD2_PREFIX)
        last, pooled, proj, pen = S.open_clip_text_forward(h, 16, "gelu", FULL_IDS, hidden_index=22, consume=True)
        refs["sd2"] = (last, pooled, proj)
        refs["sd2_wd"] = (pen, C.pooled_at_argmax(pen, FULL_IDS), None)   # ln_final(block 22) = 23-block output
        del h
        S.release_memory()
        # --- bigG + CLIP-L (SDXL base), bigG alone (refiner)
        g = S.random_full("CLIP-XL-SD.txt", seed=22)
        lk = S.random_full("CLIP-v1-SD.txt", seed=23)
        base = {S.SGM_G + k: v for k, v in g.items()}
        base.update({S.SGM_L + "text_model." + k: v for k, v in lk.items()})
        files["base"] = S.save(base, root / "sdxl_base.safetensors")
        del base
        files["refiner"] = S.save({S.SGM_REFINER_G + k: v for k, v in g.items()}, root / "sdxl_refiner.safetensors")
        _check_written(files["refiner"], g, S.SGM_REFINER_G)
        refs["clip_g"] = S.open_clip_text_forward(g, 20, "gelu", FULL_IDS, consume=True)[:3]
        del g
        S.release_memory()
        # CLIP-L goes through the hand mapping HF -> open_clip names (consumers.hf_to_oc)
        lk.pop("embeddings.position_ids")
        oc_l = C.hf_to_oc({"text_model." + k: v for k, v in lk.items()})
        refs["clip_l"] = S.open_clip_text_forward(oc_l, 12, "quick_gelu", FULL_IDS, consume=True)[:3]
        del lk, oc_l
        S.release_memory()
        for name, r in refs.items():  # the comparisons below are not vacuous at this scale
            assert r[0].abs().max() > 100 * FULL_ATOL, name
            assert (r[0][0] - r[0][1]).abs().max() > 100 * FULL_ATOL, name
        yield {"root": root, "files": files, "refs": refs}
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)


FULL_CASES = {
    # name: (file, convert kwargs, layout, identity, heads, act, layers, width, proj, reference)
    "sd2": ("sd2", {}, "ldm", "clip_h", 16, "gelu", 24, 1024, 1024, "sd2"),
    "sd2_wd": ("sd2_wd", {}, "ldm", "clip_h", 16, "gelu", 23, 1024, None, "sd2_wd"),
    "sdxl_base_clip_g": ("base", {"encoder": "clip_g"}, "sgm", "clip_g", 20, "gelu", 32, 1280, 1280, "clip_g"),
    "sdxl_base_clip_l": ("base", {"encoder": "clip_l"}, "sgm", "clip_l", 12, "quick_gelu", 12, 768, None, "clip_l"),
    "sdxl_refiner": ("refiner", {}, "sgm", "clip_g", 20, "gelu", 32, 1280, 1280, "clip_g"),
}


@pytest.mark.parametrize("case", list(FULL_CASES))
@pytest.mark.fullsize
def test_full_size_real_keys(full, tmp_path, case):
    fname, kw, layout, ident, heads, act, layers, width, proj, refname = FULL_CASES[case]
    out = tmp_path / "hf"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = convert(str(full["files"][fname]), str(out), to="hf", from_=None, **kw)
        plan = res.plans[0]
        (e,) = plan.encoders
        layout_got, ident_got, params_got, arch_got, notes = (
            plan.read.layout.name, (e.identity, e.identity_origin), dict(e.params), dict(e.arch), list(plan.notes))
        # the Result keeps the source open (its pages stay resident): let it go before loading 2.8 GB
        del res, plan, e
        S.release_memory()
        assert layout_got == layout
        assert ident_got[0] == ident, ident_got
        assert params_got == {"heads": heads, "act": act}, params_got
        assert (arch_got["layers"], arch_got["width"], arch_got["proj"]) == (layers, width, proj), arch_got
        absent = [n for n in notes if "absent" in n]
        if case == "sd2_wd":
            assert absent and "24" in absent[0] and "23" in absent[0], notes
        else:
            assert not absent, notes
        assert not any("may hold" in n for n in notes), notes   # the width settles embedders.0.model.
        cfg = _hf_config(out)
        assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"], cfg["hidden_act"]) == \
            (layers, heads, width, act), cfg
        assert cfg["architectures"] == ["CLIPTextModelWithProjection" if proj else "CLIPTextModel"]
        assert cfg.get("torch_dtype") == "float16" or cfg.get("dtype") == "float16"
        m = S.load_transformers_fp32(out, with_projection=bool(proj))
        got = S.transformers_forward(m, FULL_IDS, bool(proj))
        del m
        S.release_memory()
        exp = full["refs"][refname]
        for what, a, b in zip(("last_hidden", "pooled", "projected"), got, exp):
            if a is None or b is None:
                continue
            torch.testing.assert_close(a, b, atol=FULL_ATOL, rtol=0, msg=lambda m, w=what: f"{case} {w}: {m}")
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(out, ignore_errors=True)
        S.release_memory()


# --------------------------------------------------------------------------------------------
# Output metadata / config consistency (kept last: the tiny SD2 folder's config)
# --------------------------------------------------------------------------------------------
def test_sd2_diffusers_config_declares_no_projection(tiny, sd2_diffusers):
    """The text_encoder/ written for SD2 holds no text_projection, so its config must not name
    CLIPTextModelWithProjection (a loader that follows `architectures` would get a random projection)."""
    _, out = sd2_diffusers
    cfg = _hf_config(out / "text_encoder")
    assert cfg["architectures"] == ["CLIPTextModel"], cfg
