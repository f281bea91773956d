"""Text-encoder LoRAs merged into the extracted encoder (issue 16), checked against the formula
W' = W + sum of scale * alpha / rank * up @ down (fp32, cast once), written out here by hand with
its own key table; PEFT's and diffusers' own merges are the oracles of tests/test_lora_oracles.py."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from sdconv import UsageError, convert, inspect, make_plan, verify
from sdconv.cli import main
from sdconv.converters import metakeys as K
from sdconv.converters.analyse import analyse, read_input
from sdconv.converters.execute import load_canonical
from sdconv.errors import LayoutError
from tests.helpers.fixtures import distinct_canonical, write_layout, write_multi

LAYERS, WIDTH, FFN = 2, 128, 512
# the test's own table: module (transformers name) -> canonical matrix, and its shape
MODULES = {"self_attn_q_proj": ("attn_q", (WIDTH, WIDTH)), "self_attn_k_proj": ("attn_k", (WIDTH, WIDTH)),
           "self_attn_v_proj": ("attn_v", (WIDTH, WIDTH)), "self_attn_out_proj": ("attn_out", (WIDTH, WIDTH)),
           "mlp_fc1": ("ffn_up", (FFN, WIDTH)), "mlp_fc2": ("ffn_down", (WIDTH, FFN))}


def _lora(seed: int, modules=MODULES, alphas=True):
    """{(layer, module): (down, up, alpha or None)}: ranks 2..5 and alphas that differ by module."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(LAYERS):
        for n, (m, (_, (o, inp))) in enumerate(modules.items()):
            r = 2 + (i + n) % 4
            alpha = float(1 + n) if alphas and n != 2 else None           # v_proj: no alpha (= rank)
            out[(i, m)] = (torch.randn(r, inp, generator=g) * 0.1, torch.randn(o, r, generator=g) * 0.1, alpha)
    return out


def kohya(deltas, path, prefix="lora_te_", unet=True, extra=None):
    t = {}
    for p, d in ([(prefix, deltas)] if isinstance(deltas, dict) else deltas):
        for (i, m), (down, up, alpha) in d.items():
            k = f"{p}text_model_encoder_layers_{i}_{m}"
            t[k + ".lora_down.weight"], t[k + ".lora_up.weight"] = down.contiguous(), up.contiguous()
            if alpha is not None:
                t[k + ".alpha"] = torch.tensor(alpha)
    if unet:
        t["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
        t["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    t.update(extra or {})
    save_file(t, str(path))
    return path


def diffusers_peft(parts, path):
    """PEFT-style diffusers keys (lora_A/lora_B); alphas as `.alpha` keys."""
    t = {}
    for prefix, d in parts:
        for (i, m), (down, up, alpha) in d.items():
            k = f"{prefix}text_model.encoder.layers.{i}.{m.replace('self_attn_', 'self_attn.').replace('mlp_', 'mlp.')}"
            t[k + ".lora_A.weight"], t[k + ".lora_B.weight"] = down.contiguous(), up.contiguous()
            if alpha is not None:
                t[k + ".alpha"] = torch.tensor(alpha)
    t["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"] = torch.zeros(4, 32)
    save_file(t, str(path))
    return path


def expected(canon: dict, loras, dtype=None) -> dict:
    """The formula, in fp32, cast once to the stored dtype."""
    out = dict(canon)
    total: dict = {}
    for deltas, scale in loras:
        for (i, m), (down, up, alpha) in deltas.items():
            c = f"blk.{i}.{MODULES[m][0]}.weight"
            rank = down.shape[0]
            step = (up.float() @ down.float()) * (scale * (alpha if alpha is not None else rank) / rank)
            total[c] = step if c not in total else total[c] + step
    for c, d in total.items():
        out[c] = (canon[c].float() + d).to(dtype or canon[c].dtype)
    return out


def canonical_of(path, encoder=None) -> dict:
    source, reads, _ = read_input(path)
    found = analyse(source, reads, {})
    f = next(x for x in found if encoder in (None, x.identity))
    return load_canonical(source, f.read)


def _same(a: dict, b: dict, keys=None):
    keys = keys or [k for k in a if k in b]
    bad = [k for k in keys if not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    sd1 = write_layout(distinct_canonical(vocab=1000), d / "sd1.safetensors", "ldm")
    l, g = distinct_canonical(vocab=1000, seed=1), distinct_canonical(vocab=1000, seed=2)
    xl = write_multi(d / "xl.safetensors", "sgm", {"clip_l": l, "clip_g": g})
    a, b = _lora(10), _lora(11)
    return {"d": d, "sd1": sd1, "xl": xl, "a": a, "b": b,
            "ka": kohya(a, d / "a.safetensors"), "kb": kohya(b, d / "b.safetensors"),
            "kxl": kohya([("lora_te1_", a), ("lora_te2_", b)], d / "xl-kohya.safetensors"),
            "dxl": diffusers_peft([("text_encoder.", a), ("text_encoder_2.", b)], d / "xl-diffusers.safetensors")}


@pytest.mark.parametrize("to", ["ldm", "openai", "open_clip", "hf", "diffusers", "comfy", "sgm", "sd3"])
def test_kohya_sd1_in_every_layout(world, tmp_path, to):
    out = tmp_path / ("o" if to in ("hf", "diffusers") else "o.safetensors")
    convert(world["sd1"], out, to=to, lora=[f"{world['ka']}:0.75"], params={"encoder": "clip_l"})
    want = expected(canonical_of(world["sd1"]), [(world["a"], 0.75)])
    _same(canonical_of(out), want, [c for c in want if c.startswith("blk.")])


@pytest.mark.parametrize("lora", ["kxl", "dxl"])
def test_both_sdxl_encoders_kohya_and_diffusers(world, tmp_path, lora):
    convert(world["xl"], tmp_path / "te", to="diffusers", encoder="all", lora=[world[lora]])
    for enc, deltas in (("clip_l", world["a"]), ("clip_g", world["b"])):
        want = expected(canonical_of(world["xl"], enc), [(deltas, 1.0)])
        got = canonical_of(tmp_path / "te", enc)
        _same(got, want, [c for c in got if c.startswith("blk.")])


def test_scale_zero_is_bitwise_the_encoder_and_two_loras_apply_in_order(world, tmp_path):
    convert(world["sd1"], tmp_path / "plain.safetensors", to="openai")
    convert(world["sd1"], tmp_path / "zero.safetensors", to="openai", lora=[(world["ka"], 0.0)])
    assert canonical_of(tmp_path / "plain.safetensors").keys() == canonical_of(tmp_path / "zero.safetensors").keys()
    _same(canonical_of(tmp_path / "plain.safetensors"), canonical_of(tmp_path / "zero.safetensors"))
    convert(world["sd1"], tmp_path / "ab.safetensors", to="openai", lora=[world["ka"], f"{world['kb']}:-0.5"])
    want = expected(canonical_of(world["sd1"]), [(world["a"], 1.0), (world["b"], -0.5)])
    _same(canonical_of(tmp_path / "ab.safetensors"), want)
    # negative control: up and down swapped in a file is not the same merge
    wrong = {k: (v[0], v[1], (v[2] or v[0].shape[0]) * 2) for k, v in world["a"].items()}     # alphas doubled
    kohya(wrong, tmp_path / "wrong.safetensors")
    convert(world["sd1"], tmp_path / "w.safetensors", to="openai", lora=[tmp_path / "wrong.safetensors"])
    got = canonical_of(tmp_path / "w.safetensors")
    right = expected(canonical_of(world["sd1"]), [(world["a"], 1.0)])
    assert not torch.equal(got["blk.0.attn_q.weight"], right["blk.0.attn_q.weight"])


def test_fp16_merges_in_fp32_and_casts_once(world, tmp_path):
    write_layout({k: v.half() if v.is_floating_point() else v for k, v in distinct_canonical(vocab=1000).items()},
                 tmp_path / "h.safetensors", "ldm")
    convert(tmp_path / "h.safetensors", tmp_path / "o.safetensors", to="openai", lora=[world["ka"], world["kb"]])
    want = expected(canonical_of(tmp_path / "h.safetensors"), [(world["a"], 1.0), (world["b"], 1.0)])
    _same(canonical_of(tmp_path / "o.safetensors"), want)
    convert(tmp_path / "h.safetensors", tmp_path / "f.safetensors", to="openai", lora=[world["ka"]], dtype="fp32")
    want = expected(canonical_of(tmp_path / "h.safetensors"), [(world["a"], 1.0)], dtype=torch.float32)
    _same(canonical_of(tmp_path / "f.safetensors"), want, [c for c in want if c.startswith("blk.0.attn_q")])


def test_recorded_in_the_metadata_and_ledger(world, tmp_path):
    r = convert(world["sd1"], tmp_path / "o.safetensors", to="openai", lora=[f"{world['ka']}:0.5"])
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        meta = f.metadata()
    (rec,) = json.loads(meta[K.LORAS])
    assert rec["file"] == "a.safetensors" and rec["scale"] == 0.5 and rec["format"] == "kohya"
    assert rec["changed"] == {"clip_l": 12} and rec["unet_keys_ignored"] == 2 and len(rec["sha256"]) == 64
    ledger = json.loads(meta[K.LEDGER])["tensors"]
    q = ledger["transformer.resblocks.0.attn.in_proj_weight"]["lora"]
    assert [x["adapts"] for x in q] == ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"]
    assert "lora" not in ledger["token_embedding.weight"]
    assert any("12 matrices adapted" in n for n in r.plan.notes)


def test_selected_encoder_only_and_ignored_parts_are_said(world, tmp_path):
    plan = make_plan(world["xl"], to="openai", encoder="clip_l", lora=[world["kxl"]], output=tmp_path / "o.safetensors")
    assert len(plan.encoders[0].loras) == 1
    assert any("adapt clip_g, not selected: ignored" in n for n in plan.notes), plan.notes


@pytest.mark.parametrize("case, says, code", [
    ("unet only", "no text-encoder weights in this LoRA", 2),
    ("dora", "DoRA", 2),
    ("embedding", "not a linear layer", 2),
    ("sdxl on sd1", "adapts clip_g", 2),
    ("wider", r"is \[256, 256\], the encoder's matrix \[128, 128\]", 2),
    ("down only", "but not both down and up", 3),
    ("not a lora", "not a LoRA file sdconv reads", 5),
])
def test_refusals(world, tmp_path, case, says, code):
    import re
    f = tmp_path / "bad.safetensors"
    if case == "unet only":
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 4)}, str(f))
    elif case == "dora":
        kohya(world["a"], f, extra={"lora_te_text_model_encoder_layers_0_self_attn_q_proj.dora_scale": torch.ones(1, 128)})
    elif case == "embedding":
        kohya(world["a"], f, extra={"lora_te_text_model_embeddings_token_embedding.lora_down.weight": torch.zeros(2, 1000),
                                    "lora_te_text_model_embeddings_token_embedding.lora_up.weight": torch.zeros(128, 2)})
    elif case == "sdxl on sd1":
        kohya([("lora_te2_", world["a"])], f)
    elif case == "wider":
        wide = {(0, "self_attn_q_proj"): (torch.zeros(2, 256), torch.zeros(256, 2), None)}
        kohya(wide, f)
    elif case == "down only":
        save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 128)}, str(f))
    else:
        save_file({"something.else": torch.zeros(2)}, str(f))
    c, out = _cli("convert", world["sd1"], "-o", tmp_path / "o.safetensors", "--to", "openai", "--lora", f)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert c == code and len(lines) == 1 and re.search(says, lines[0]), out
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_scales_verify_inspect_and_into(world, tmp_path):
    c, out = _cli("convert", world["sd1"], "-o", tmp_path / "o.safetensors", "--to", "openai",
                  "--lora", f"{world['ka']}:0.75", "--lora-from", "kohya")
    assert c == 0, out
    want = expected(canonical_of(world["sd1"]), [(world["a"], 0.75)])
    _same(canonical_of(tmp_path / "o.safetensors"), want)
    c, out = _cli("convert", world["sd1"], "-o", tmp_path / "x.safetensors", "--to", "openai", "--lora", f"{world['ka']}:abc")
    assert c != 0 and "no such file" in out, out                    # 'a.safetensors:abc' is a file name
    rep = verify(world["sd1"], tmp_path / "o.safetensors", lora_a=[f"{world['ka']}:0.75"])
    assert rep["verdict"] == "identical", rep["verdict"]
    rep = verify(world["sd1"], world["sd1"], lora_b=[world["ka"]])
    assert rep["exit_code"] == 1 and {p["part"] for p in rep["weights"]["parts"] if p["relative_drift"] > 0} == {
        "block 0", "block 1"}, rep["weights"]
    desc = inspect(world["kxl"])["lora"]
    assert desc["format"] == "kohya" and set(desc["encoders"]) == {"lora_te1_", "lora_te2_"}
    assert desc["encoders"]["lora_te1_"]["modules"] == 12 and desc["encoders"]["lora_te1_"]["blocks"] == [0, 1]
    assert desc["unet_keys"] == 2
    c, out = _cli("inspect", world["ka"])
    assert c == 0 and "a kohya LoRA" in out and "UNet keys: 2" in out, out
    # --into: the merged encoder written back into the checkpoint
    c, out = _cli("convert", tmp_path / "o.safetensors", "--to", "ldm", "--into", world["sd1"], "-o", tmp_path / "m.safetensors")
    assert c == 0, out
    _same(canonical_of(tmp_path / "m.safetensors"), want, [k for k in want if k.startswith("blk.")])
    c, out = _cli("convert", world["sd1"], "--to", "ldm", "--into", world["sd1"], "-o", tmp_path / "m2.safetensors",
                  "--lora", f"{world['ka']}:0.75")
    assert c == 0, out
    _same(canonical_of(tmp_path / "m2.safetensors"), want, [k for k in want if k.startswith("blk.")])


def test_detection_explained_and_forced(world, tmp_path):
    with pytest.raises(LayoutError, match="diffusers: .*kohya: .*peft: "):
        convert(world["sd1"], tmp_path / "o.safetensors", to="openai", lora=[world["sd1"]])
    with pytest.raises(LayoutError):
        convert(world["sd1"], tmp_path / "o.safetensors", to="openai", lora=[world["ka"]], lora_from="diffusers")
    with pytest.raises(UsageError, match="unknown LoRA format"):
        convert(world["sd1"], tmp_path / "o.safetensors", to="openai", lora=[world["ka"]], lora_from="kohyaa")


def test_plain_peft_adapter_with_its_config(world, tmp_path):
    """base_model.model.* keys; alphas from adapter_config.json beside it (lora_alpha, alpha_pattern)."""
    t = {}
    for (i, m), (down, up, _) in world["a"].items():
        k = f"base_model.model.text_model.encoder.layers.{i}.{m.replace('self_attn_', 'self_attn.').replace('mlp_', 'mlp.')}"
        t[k + ".lora_A.weight"], t[k + ".lora_B.weight"] = down.contiguous(), up.contiguous()
    (tmp_path / "peft").mkdir()
    save_file(t, str(tmp_path / "peft" / "adapter_model.safetensors"))
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"layers.0.self_attn.q_proj": 3}}))
    convert(world["sd1"], tmp_path / "o.safetensors", to="openai", lora=[tmp_path / "peft" / "adapter_model.safetensors"])
    alphas = {k: (d, u, 3.0 if k == (0, "self_attn_q_proj") else 8.0) for k, (d, u, _) in world["a"].items()}
    _same(canonical_of(tmp_path / "o.safetensors"), expected(canonical_of(world["sd1"]), [(alphas, 1.0)]))
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_dora": True}))
    with pytest.raises(UsageError, match="DoRA"):
        make_plan(world["sd1"], to="openai", lora=[tmp_path / "peft" / "adapter_model.safetensors"])
