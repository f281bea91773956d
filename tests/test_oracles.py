"""Consumer-oracle tests: sdconv outputs must load in the real consumer libraries and reproduce the
reference encoder's outputs (last hidden state, pooled, projected) to 1e-5 in fp32.

Helpers and the independent key mapping live in ``tests/consumers.py``. Sources in every layout are
built once per session from one reference per kind (L = QuickGELU, G = GELU), so all sources of a
kind hold the same weights and share one set of expected outputs.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import consumers as C

pytestmark = pytest.mark.oracle

KINDS = ("L", "G")
TARGETS = ("openai", "open_clip", "ldm", "hf", "diffusers")
MAIN_SOURCES = ("openai_pt", "open_clip", "ldm_ckpt", "hf", "diffusers")
VARIANT_SOURCES = ("openai_st", "open_clip_custom", "ldm_st", "ldm_nai", "hf_v5", "hf_file", "hf_v5_file",
                   "diffusers_te")
ALL_SOURCES = MAIN_SOURCES + VARIANT_SOURCES


oc_names: dict = {}  # kind -> open_clip model name registered with add_model_config (set by `world`)


def sdconv_api():
    """Imported lazily so the oracle self-checks run (and the rest fails loudly) without the engine."""
    import sdconv

    return sdconv.convert, sdconv.SdconvError


# --------------------------------------------------------------------------------------------
# Session fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle_sources")
    refs = {}
    for kind in KINDS:
        ref = C.build_reference(kind)
        C.write_sources(ref, root / kind)
        refs[kind] = ref
    names = {kind: C.register_open_clip_config(C.ACTS[kind], root) for kind in KINDS}
    oc_names.update(names)
    return {"root": root, "refs": refs, "oc_names": names}


# --------------------------------------------------------------------------------------------
# Conversion and target checks
# --------------------------------------------------------------------------------------------
def default_params(src: C.Source, kind: str):
    """Inputs without a config need act=gelu for a GELU model; L relies on the quick_gelu default."""
    if kind == "G" and not src.has_config:
        return {"act": "gelu"}
    return None


def out_path(tmp: Path, target: str, fmt: str) -> Path:
    if target in ("hf", "diffusers"):
        return tmp / f"out_{target}"
    ext = {"safetensors": ".safetensors", "pt": ".ckpt" if target == "ldm" else ".pt"}[fmt]
    return tmp / f"out_{target}{ext}"


def run_convert(src: C.Source, target: str, tmp: Path, kind: str, fmt: str = "safetensors",
                from_="layout", params="default", force=False) -> Path:
    convert, _ = sdconv_api()
    out = out_path(Path(tmp), target, fmt)
    convert(str(src.path), str(out), to=target, from_=src.layout if from_ == "layout" else from_,
            params=default_params(src, kind) if params == "default" else params, fmt=fmt, force=force)
    assert out.exists(), f"sdconv wrote nothing at {out}"
    return out


def _check_hf_folder(folder: Path, ref: C.Reference, has_proj: bool, fmt: str):
    cfg = json.loads((folder / "config.json").read_text())
    arch = "CLIPTextModelWithProjection" if has_proj else "CLIPTextModel"
    assert cfg.get("architectures") == [arch], cfg.get("architectures")
    assert cfg.get("hidden_act") == ref.act, cfg.get("hidden_act")
    assert cfg.get("eos_token_id") == 2, cfg.get("eos_token_id")
    assert cfg.get("num_attention_heads") == C.HEADS and cfg.get("hidden_size") == C.WIDTH
    assert cfg.get("num_hidden_layers") == C.LAYERS and cfg.get("intermediate_size") == C.FFN
    weights = folder / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    assert weights.is_file(), sorted(p.name for p in folder.iterdir())
    sd = C.read_state_dict(weights)
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in sd), sorted(sd)[:5]
    assert ("text_projection.weight" in sd) == has_proj
    if has_proj:
        assert sd["text_projection.weight"].shape == (C.PROJ, C.WIDTH)
    return C.load_transformers(folder, with_projection=has_proj)


def check_target(target: str, out: Path, ref: C.Reference, src: C.Source, tmp: Path, fmt: str = "safetensors"):
    """Load ``out`` with the target's real library (zero missing/unexpected text keys) and compare."""
    has_proj = src.has_proj and target != "ldm"
    exp = ref.expected
    ids = ref.ids
    label = f"{src.name}->{target}[{ref.kind}]"
    if target in ("openai", "open_clip"):
        sd = C.read_state_dict(out)
        want = C.oc_text_keys(proj=has_proj, logit_scale=src.has_logit_scale)
        assert set(sd) == want, f"extra {sorted(set(sd) - want)} missing {sorted(want - set(sd))}"
        assert all(v.dtype == torch.float32 for v in sd.values())
        if has_proj:
            assert sd["text_projection"].shape == (C.WIDTH, C.PROJ)
        if src.has_logit_scale:
            assert float(sd["logit_scale"]) == pytest.approx(float(ref.logit_scale))
        C.compare(C.load_open_clip(out, ref.act, has_proj, src.has_logit_scale).forward(ids), exp, label + " open_clip")
        if target == "open_clip":
            # the local named-config route (add_model_config + create_model) and CustomTextCLIP
            C.compare(C.load_open_clip(out, ref.act, has_proj, src.has_logit_scale,
                                       via_named_config=oc_names[ref.kind]).forward(ids), exp, label + " named cfg")
            if has_proj:  # open_clip moves a flat dict under "text." only when it has text_projection
                C.compare(C.load_open_clip(out, ref.act, has_proj, src.has_logit_scale, custom_text=True)
                          .forward(ids), exp, label + " CustomTextCLIP")
        if ref.act == "quick_gelu":  # OpenAI clip hard-codes QuickGELU
            C.compare(C.load_openai_clip(out, has_proj, src.has_logit_scale).forward(ids), exp, label + " clip")
    elif target == "ldm":
        sd = C.read_state_dict(out)
        hf_keys = {C.LDM_PREFIX + k for k in ref.hf_sd if k.startswith("text_model.")}
        pid = C.LDM_PREFIX + "text_model.embeddings.position_ids"
        want = hf_keys | {pid}
        assert set(sd) == want, f"extra {sorted(set(sd) - want)} missing {sorted(want - set(sd))}"
        assert sd[pid].dtype == torch.int64 and torch.equal(sd[pid], torch.arange(C.CONTEXT)[None])
        C.compare(C.load_ldm_via_diffusers(out, ref.pipeline_dir).forward(ids), exp, label + " diffusers-ldm")
    elif target == "hf":
        C.compare(_check_hf_folder(out, ref, has_proj, fmt).forward(ids), exp, label + " transformers")
    elif target == "diffusers":
        te = out / "text_encoder"
        assert te.is_dir(), sorted(p.name for p in out.iterdir())
        C.compare(_check_hf_folder(te, ref, has_proj, fmt).forward(ids), exp, label + " transformers")
        pipe_dir = C.assemble_pipeline(ref.pipeline_dir, te, Path(tmp) / "pipe")
        embeds, pids, _ = C.diffusers_encode_prompt(pipe_dir)
        torch.testing.assert_close(embeds, ref.forward(pids)[0], atol=C.ATOL, rtol=0)
    else:  # pragma: no cover
        raise AssertionError(target)


# --------------------------------------------------------------------------------------------
# 0. The oracles agree with each other before sdconv is involved
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_oracle_selfcheck(world, kind):
    ref = world["refs"][kind]
    s = ref.sources
    E, ids = ref.expected, ref.ids
    C.compare(C.load_transformers(s["hf"].path, True).forward(ids), E, "hf")
    C.compare(C.load_transformers(s["hf_v5"].path, False).forward(ids), E, "hf_v5")
    for name in ("openai_pt", "openai_st", "open_clip"):
        C.compare(C.load_open_clip(s[name].path, ref.act, True, True).forward(ids), E, name)
        if kind == "L":
            C.compare(C.load_openai_clip(s[name].path, True, True).forward(ids), E, name + " clip")
    C.compare(C.load_open_clip(s["open_clip_custom"].path, ref.act, True, True, custom_text=True).forward(ids),
              E, "custom")
    C.compare(C.load_open_clip(s["open_clip"].path, ref.act, True, True,
                               via_named_config=world["oc_names"][kind]).forward(ids), E, "named config")
    for name in ("ldm_ckpt", "ldm_st"):
        C.compare(C.load_ldm_via_diffusers(s[name].path, ref.pipeline_dir).forward(ids), E, name)
    embeds, pids, _ = C.diffusers_encode_prompt(ref.pipeline_dir)
    torch.testing.assert_close(embeds, ref.forward(pids)[0], atol=C.ATOL, rtol=0)
    # and the wrong activation is visible at this tolerance (otherwise the act checks are vacuous)
    wrong = "gelu" if ref.act == "quick_gelu" else "quick_gelu"
    with pytest.raises(AssertionError):
        C.compare(C.load_open_clip(s["open_clip"].path, wrong, True, True).forward(ids), E, "wrong act")


# --------------------------------------------------------------------------------------------
# 1. Full matrix: every source layout x every target layout x {L, G}
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", MAIN_SOURCES)
def test_convert_matrix(world, tmp_path, source, target, kind):
    ref = world["refs"][kind]
    src = ref.sources[source]
    out = run_convert(src, target, tmp_path, kind)
    check_target(target, out, ref, src, tmp_path)


# Source variants (other containers / key spellings of the same layout) into every target.
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", VARIANT_SOURCES)
def test_convert_variants(world, tmp_path, source, target, kind):
    ref = world["refs"][kind]
    src = ref.sources[source]
    out = run_convert(src, target, tmp_path, kind)
    check_target(target, out, ref, src, tmp_path)


# --------------------------------------------------------------------------------------------
# 2. .pt outputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", TARGETS)
def test_pt_outputs(world, tmp_path, target, kind):
    ref = world["refs"][kind]
    src = ref.sources["open_clip" if target in ("hf", "diffusers") else "hf"]
    out = run_convert(src, target, tmp_path, kind, fmt="pt")
    if target in ("openai", "open_clip", "ldm"):
        with open(out, "rb") as f:
            assert f.read(2) == b"PK", "a torch .pt/.ckpt output should be a zip-format torch.save file"
        torch.load(str(out), map_location="cpu", weights_only=True)  # loads without unsafe globals
    check_target(target, out, ref, src, tmp_path, fmt="pt")


# --------------------------------------------------------------------------------------------
# 3. Auto-detection of the source layout (from_=None)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", ALL_SOURCES)
def test_autodetect(world, tmp_path, source, kind):
    ref = world["refs"][kind]
    src = ref.sources[source]
    target = "hf" if source.startswith(("openai", "open_clip", "ldm")) else "openai"
    out = run_convert(src, target, tmp_path, kind, from_=None)
    check_target(target, out, ref, src, tmp_path)


# --------------------------------------------------------------------------------------------
# 4. Parameters, overwrite, errors, CLI
# --------------------------------------------------------------------------------------------
def test_heads_param_is_honoured(world, tmp_path):
    ref = world["refs"]["G"]
    src = ref.sources["hf_file"]
    (tmp_path / "ok").mkdir()
    (tmp_path / "bad").mkdir()
    out = run_convert(src, "hf", tmp_path / "ok", "G", params={"act": "gelu", "heads": C.HEADS})
    check_target("hf", out, ref, src, tmp_path)
    # a different head count must reach the config and change the outputs (the oracle sees heads)
    bad = run_convert(src, "hf", tmp_path / "bad", "G", params={"act": "gelu", "heads": 4})
    assert json.loads((bad / "config.json").read_text())["num_attention_heads"] == 4
    with pytest.raises(AssertionError):
        C.compare(C.load_transformers(bad, True).forward(ref.ids), ref.expected, "heads=4")


def test_act_param_overrides_default(world, tmp_path):
    """An L source without config converted with act=gelu must carry gelu (and then differ)."""
    ref = world["refs"]["L"]
    src = ref.sources["openai_pt"]
    out = run_convert(src, "hf", tmp_path, "L", params={"act": "gelu"})
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "gelu"
    with pytest.raises(AssertionError):
        C.compare(C.load_transformers(out, True).forward(ref.ids), ref.expected, "act=gelu on L")


def test_force_overwrites(world, tmp_path):
    L, G = world["refs"]["L"], world["refs"]["G"]
    out = run_convert(L.sources["hf"], "hf", tmp_path, "L")
    out2 = run_convert(G.sources["hf"], "hf", tmp_path, "G", force=True)
    assert out2 == out
    check_target("hf", out, G, G.sources["hf"], tmp_path)


def test_bad_inputs_raise_sdconv_error(world, tmp_path):
    convert, SdconvError = sdconv_api()
    junk = tmp_path / "junk.safetensors"
    save_file({"foo.weight": torch.zeros(3, 3)}, str(junk))
    with pytest.raises(SdconvError):
        convert(str(junk), str(tmp_path / "o1"), to="hf", from_=None)
    with pytest.raises(SdconvError):
        convert(str(tmp_path / "does_not_exist.safetensors"), str(tmp_path / "o2"), to="hf", from_="openai")
    with pytest.raises(SdconvError):  # declared layout does not match the file
        convert(str(world["refs"]["L"].sources["ldm_st"].path), str(tmp_path / "o3"), to="hf", from_="openai")


def test_cli(world, tmp_path):
    ref = world["refs"]["G"]
    src = ref.sources["open_clip"]
    out = tmp_path / "cli_hf"
    cmd = [sys.executable, "-m", "sdconv", "convert", str(src.path), "-o", str(out), "--to", "hf",
           "--from", "open_clip", "--param", "act=gelu", "--format", "pt"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    check_target("hf", out, ref, src, tmp_path, fmt="pt")


# --------------------------------------------------------------------------------------------
# 5. Negative controls: edit a correct output, the same comparison must fail
# --------------------------------------------------------------------------------------------
def _edit_safetensors(path: Path, fn):
    sd = dict(load_file(str(path)))
    fn(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def _swap_chunks(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    ch = list(t.chunk(3, 0))
    ch[a], ch[b] = ch[b], ch[a]
    return torch.cat(ch, 0)


def _hf_output(world, tmp_path, kind="L"):
    ref = world["refs"][kind]
    src = ref.sources["openai_pt"]
    out = run_convert(src, "hf", tmp_path, kind)
    check_target("hf", out, ref, src, tmp_path)  # correct before the edit
    return ref, out


def _openai_output(world, tmp_path, kind="L"):
    ref = world["refs"][kind]
    src = ref.sources["hf"]
    out = run_convert(src, "openai", tmp_path, kind)
    check_target("openai", out, ref, src, tmp_path)
    return ref, src, out


def test_negative_hf_transposed_projection(world, tmp_path):
    ref, out = _hf_output(world, tmp_path)
    _edit_safetensors(out / "model.safetensors",
                      lambda sd: sd.__setitem__("text_projection.weight", sd["text_projection.weight"].T))
    with pytest.raises(AssertionError, match="projected"):
        C.compare(C.load_transformers(out, True).forward(ref.ids), ref.expected, "T proj")


def test_negative_openai_transposed_projection(world, tmp_path):
    ref, src, out = _openai_output(world, tmp_path)
    _edit_safetensors(out, lambda sd: sd.__setitem__("text_projection", sd["text_projection"].T))
    with pytest.raises(AssertionError, match="projected"):
        C.compare(C.load_openai_clip(out, True, False).forward(ref.ids), ref.expected, "T proj clip")
    with pytest.raises(AssertionError, match="projected"):
        C.compare(C.load_open_clip(out, ref.act, True, False).forward(ref.ids), ref.expected, "T proj oc")


def test_negative_hf_swapped_q_k(world, tmp_path):
    ref, out = _hf_output(world, tmp_path)

    def swap(sd):
        for s in ("weight", "bias"):
            q, k = f"text_model.encoder.layers.1.self_attn.q_proj.{s}", f"text_model.encoder.layers.1.self_attn.k_proj.{s}"
            sd[q], sd[k] = sd[k], sd[q]

    _edit_safetensors(out / "model.safetensors", swap)
    with pytest.raises(AssertionError, match="last_hidden"):
        C.compare(C.load_transformers(out, True).forward(ref.ids), ref.expected, "q<->k")


@pytest.mark.parametrize("a,b", [(0, 1), (1, 2)])
def test_negative_openai_swapped_qkv_chunks(world, tmp_path, a, b):
    ref, src, out = _openai_output(world, tmp_path)

    def swap(sd):
        for s in ("weight", "bias"):
            k = f"transformer.resblocks.0.attn.in_proj_{s}"
            sd[k] = _swap_chunks(sd[k], a, b)

    _edit_safetensors(out, swap)
    with pytest.raises(AssertionError, match="last_hidden"):
        C.compare(C.load_openai_clip(out, True, False).forward(ref.ids), ref.expected, "chunks")


def test_negative_ldm_swapped_layernorms(world, tmp_path):
    ref = world["refs"]["L"]
    src = ref.sources["hf"]
    out = run_convert(src, "ldm", tmp_path, "L")
    check_target("ldm", out, ref, src, tmp_path)

    def swap(sd):
        p = C.LDM_PREFIX + "text_model.encoder.layers.0."
        for s in ("weight", "bias"):
            sd[p + f"layer_norm1.{s}"], sd[p + f"layer_norm2.{s}"] = sd[p + f"layer_norm2.{s}"], sd[p + f"layer_norm1.{s}"]

    _edit_safetensors(out, swap)
    with pytest.raises(AssertionError):
        C.compare(C.load_ldm_via_diffusers(out, ref.pipeline_dir).forward(ref.ids), ref.expected, "ln swap")


@pytest.mark.parametrize("kind", KINDS)
def test_negative_wrong_activation(world, tmp_path, kind):
    ref, out = _hf_output(world, tmp_path, kind)
    wrong = "gelu" if ref.act == "quick_gelu" else "quick_gelu"
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hidden_act"] = wrong
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AssertionError, match="last_hidden"):
        C.compare(C.load_transformers(out, True).forward(ref.ids), ref.expected, "wrong act hf")
    # and the same weights in open_clip naming, loaded with the wrong quick_gelu flag
    oc = run_convert(ref.sources["hf"], "open_clip", tmp_path, kind)
    with pytest.raises(AssertionError, match="last_hidden"):
        C.compare(C.load_open_clip(oc, wrong, True, False).forward(ref.ids), ref.expected, "wrong act oc")


# --------------------------------------------------------------------------------------------
# 6. Round trips are bitwise: A -> B -> A gives back the source's text tensors
# --------------------------------------------------------------------------------------------
def _text_tensors(path: Path, layout: str) -> dict:
    """The text tensors of a source or output, keyed by the layout's own names (prefix-normalised)."""
    if layout in ("hf", "diffusers"):
        p = Path(path)
        if p.is_dir():
            if layout == "diffusers" and (p / "text_encoder").is_dir():
                p = p / "text_encoder"
            p = p / "model.safetensors" if (p / "model.safetensors").exists() else p / "pytorch_model.bin"
        sd = C.read_state_dict(p)
        return {(k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k): v
                for k, v in sd.items()}
    sd = C.read_state_dict(path)
    if layout == "ldm":
        return {k: v for k, v in sd.items() if k.startswith(C.LDM_PREFIX)}
    return {k: v for k, v in sd.items() if not k.startswith("visual.")}


@pytest.mark.parametrize("source,via", [("openai_pt", "hf"), ("open_clip", "diffusers"), ("ldm_ckpt", "hf"),
                                        ("hf", "openai"), ("diffusers", "ldm"), ("ldm_st", "open_clip")])
@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip_bitwise(world, tmp_path, source, via, kind):
    ref = world["refs"][kind]
    src = ref.sources[source]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mid = run_convert(src, via, tmp_path / "a", kind)
    mid_src = C.Source("mid", via, mid, src.has_proj and via != "ldm", False, via in ("hf", "diffusers"))
    back = run_convert(mid_src, src.layout, tmp_path / "b", kind)
    a, b = _text_tensors(src.path, src.layout), _text_tensors(back, src.layout)
    lost = set()
    if not mid_src.has_proj:
        lost |= {"text_projection", "text_projection.weight"}
    if src.layout in ("openai", "open_clip"):
        lost.add("logit_scale")  # only openai/open_clip carry it; a hop through another layout drops it
    assert set(b) == set(a) - lost, f"extra {sorted(set(b) - set(a))} missing {sorted(set(a) - lost - set(b))}"
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------
# 7. Output refusal (CLI help: exit 6 "output refused (exists without --force, or is the input)")
# --------------------------------------------------------------------------------------------
def test_existing_output_refused_without_force(world, tmp_path):
    _, SdconvError = sdconv_api()
    ref = world["refs"]["L"]
    out = run_convert(ref.sources["openai_st"], "open_clip", tmp_path, "L")
    before = out.read_bytes()
    with pytest.raises(SdconvError):
        run_convert(ref.sources["hf"], "open_clip", tmp_path, "L")
    assert out.read_bytes() == before
    copy_in = tmp_path / "in.safetensors"
    copy_in.write_bytes(ref.sources["openai_st"].path.read_bytes())
    convert, _ = sdconv_api()
    with pytest.raises(SdconvError):
        convert(str(copy_in), str(copy_in), to="openai", from_="openai", force=True)
    assert copy_in.read_bytes() == ref.sources["openai_st"].path.read_bytes()


def test_cli_exit_codes(world, tmp_path):
    junk = tmp_path / "junk.safetensors"
    save_file({"foo.weight": torch.zeros(3, 3)}, str(junk))
    r = subprocess.run([sys.executable, "-m", "sdconv", "convert", str(junk), "-o", str(tmp_path / "o"),
                        "--to", "hf"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 5, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------
# 8. Other inputs within the contract
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ("openai", "hf", "diffusers"))
def test_pt_outputs_read_back(world, tmp_path, target):
    """A .pt-format output is itself a valid input of its layout (hf: pytorch_model.bin folder)."""
    ref = world["refs"]["L"]
    src = ref.sources["open_clip"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mid = run_convert(src, target, tmp_path / "a", "L", fmt="pt")
    mid_src = C.Source("pt_" + target, target, mid, True, target == "openai", target != "openai")
    out = run_convert(mid_src, "open_clip", tmp_path / "b", "L", from_=None)
    check_target("open_clip", out, ref, mid_src, tmp_path)


def test_hf_folder_without_config(world, tmp_path):
    ref = world["refs"]["G"]
    d = tmp_path / "noconfig"
    d.mkdir()
    (d / "model.safetensors").write_bytes((ref.sources["hf"].path / "model.safetensors").read_bytes())
    src = C.Source("hf_noconfig", "hf", d, True, False, False)
    out = run_convert(src, "openai", tmp_path, "G")  # act=gelu passed: nothing in the input says so
    check_target("openai", out, ref, src, tmp_path)


def test_open_clip_nonscalar_logit_scale(world, tmp_path):
    ref = world["refs"]["L"]
    sd = C.read_state_dict(ref.sources["open_clip"].path)
    sd["logit_scale"] = sd["logit_scale"].reshape(1)  # open_clip nonscalar_logit_scale=True
    f = tmp_path / "oc_ls1.safetensors"
    C.write_state_dict(sd, f)
    src = C.Source("oc_ls1", "open_clip", f, True, True, False)
    out = run_convert(src, "openai", tmp_path, "L", from_=None)
    check_target("openai", out, ref, src, tmp_path)


def test_openai_mixed_fp16_source(world, tmp_path):
    """OpenAI releases are mixed fp16/fp32 (clip.model.convert_weights); read per-tensor dtypes."""
    import clip.model

    ref = world["refs"]["L"]
    om = C.openai_model()
    om.load_state_dict(C.read_state_dict(ref.sources["openai_pt"].path))
    clip.model.convert_weights(om)
    sd = om.state_dict()
    assert {v.dtype for v in sd.values()} == {torch.float16, torch.float32}
    f = tmp_path / "openai_mixed.pt"
    torch.save(sd, str(f))
    # expected outputs: the same mixed weights upcast to fp32 in OpenAI's own model
    om32 = C.openai_model()
    om32.load_state_dict({k: v.float() for k, v in sd.items()})
    expected = C._hooked_forward(om32, ref.ids, True)
    src = C.Source("openai_mixed", "openai", f, True, True, False)
    out = run_convert(src, "hf", tmp_path, "L")
    from transformers import CLIPTextModelWithProjection

    m = CLIPTextModelWithProjection.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        o = m(input_ids=ref.ids)
    got = (o.last_hidden_state, C.pooled_at_argmax(o.last_hidden_state, ref.ids), o.text_embeds)
    C.compare(got, expected, "mixed fp16 openai -> hf")
    back = C.read_state_dict(out / "model.safetensors")  # dtype "keep": the fp16 tensors stay fp16
    assert back["text_model.encoder.layers.0.self_attn.q_proj.weight"].dtype == torch.float16
    assert back["text_model.embeddings.token_embedding.weight"].dtype == torch.float32


def test_cli_dtype_fp16(world, tmp_path):
    """`--dtype fp16` (CLI): compare with the reference whose weights were rounded to fp16 first."""
    ref = world["refs"]["L"]
    out = tmp_path / "hf16"
    r = subprocess.run([sys.executable, "-m", "sdconv", "convert", str(ref.sources["ldm_st"].path), "-o", str(out),
                        "--to", "hf", "--dtype", "fp16", "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    sd = C.read_state_dict(out / "model.safetensors")
    assert {v.dtype for v in sd.values()} == {torch.float16}
    from transformers import CLIPTextModel

    m, info = CLIPTextModel.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    r16 = copy.deepcopy(ref.model)
    r16.load_state_dict({k: v.half().float() for k, v in ref.hf_sd.items()}, strict=False)
    with torch.no_grad():
        got, exp = m.eval()(input_ids=ref.ids).last_hidden_state, r16(input_ids=ref.ids).last_hidden_state
    torch.testing.assert_close(got, exp, atol=C.ATOL, rtol=0)
