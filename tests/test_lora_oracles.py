"""LoRA oracles (issue 16): sdconv's merge of text-encoder LoRAs is held to PEFT's own merge.

One random PEFT LoRA per test LoRA (tests/helpers/lora.py: per-module ranks and alphas through
rank_pattern / alpha_pattern, lora_B non-zero, values fp16-exact) is written in every format sdconv
reads (kohya, diffusers' three generations, plain PEFT); ``merge_and_unload`` of the same adapter is
the expectation. Tiny encoders (width 128, 2 blocks): SD1's CLIP-L in an ldm file, SDXL's CLIP-L and
bigG in an sgm file.

What is compared, and how exactly
- Merged weights, in canonical terms: every output is read back by hand-written names
  (``lora.read_output``: open_clip/OpenAI names split back to q/k/v, the projection transposed back).
  A tensor the LoRA targets must equal PEFT's to 1e-6 (fp32; |W| < ~1.5, so a few ulps): not bit for
  bit, because "added once" lets sdconv sum several LoRAs' deltas before adding them to W, where PEFT
  adds them one at a time, and because scale * alpha / rank may be formed in another order. Every
  tensor the LoRA does not target must be bit for bit the checkpoint's.
- Outputs: the read-back weights run through transformers (``from_pretrained`` of hf / diffusers
  outputs, a CLIPTextModel[WithProjection] holding them otherwise) and must equal PEFT's merged
  model's outputs to 1e-5 (last hidden, pooled, bigG's projected).
- The oracle is checked first: each file read back by hand gives, through W + s*alpha/r*up@down,
  PEFT's merged weights (bit for bit: the same fp32 operations PEFT's get_delta_weight does), and
  the negative controls (a wrong alpha, up and down swapped) fail it.

diffusers 0.42.1 as the consumer: ``pipe.load_lora_weights(file)`` + ``pipe.fuse_lora()`` on a tiny
pipeline agrees with PEFT on the files its converter reads right, and shows its faults on kohya
files: one alpha for (nearly) every module when the alphas differ, q/k/v deltas dropped when
out_proj is not targeted, a kohya file of q/k/v alone refused, a text projection of another rank
than the rest refused. sdconv must equal PEFT on those files.

The sdconv-calling tests need the engine of issue 16 (``convert(..., lora=..., lora_from=...)``,
``inspect`` of a LoRA, ``verify --lora-a/--lora-b``); the oracle and diffusers tests stand alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import consumers as C
from tests.helpers import lora as L

pytestmark = pytest.mark.oracle

KINDS = {"sd1": ("clip_l",), "sdxl": ("clip_l", "clip_g")}
NATIVE = {"sd1": "ldm", "sdxl": "sgm"}
LAYOUTS = ("openai", "open_clip", "hf", "diffusers", "native")
FOLDERS = ("hf", "diffusers")
SEEDS = {"main": 101, "second": 202, "uniform": 303, "no_out": 404, "qkv": 505, "attn": 606, "proj_rank": 707}
# file formats of one LoRA for a whole checkpoint (plain PEFT is per encoder: see PEFT_CASES)
FORMATS = ("kohya", "kohya_fp16", "diffusers_linear", "diffusers_peft", "diffusers_peft_v4", "diffusers_peft_nometa",
           "diffusers_train")
# Which output layouts each format is converted into: every layout for the two formats most LoRAs
# come in, two for each other one (reading a format and writing a layout are separate steps of
# sdconv: the cross product would repeat itself), every layout reached by several formats.
FORMAT_LAYOUTS = {"kohya": LAYOUTS, "diffusers_peft": LAYOUTS, "kohya_fp16": ("openai", "diffusers"),
                  "diffusers_linear": ("open_clip", "native"), "diffusers_peft_v4": ("hf", "native"),
                  "diffusers_peft_nometa": ("hf", "openai"), "diffusers_train": ("diffusers", "open_clip")}
LORA_FROM = {"kohya": "kohya", "kohya_fp16": "kohya", "diffusers_linear": "diffusers", "diffusers_peft": "diffusers",
             "diffusers_peft_v4": "diffusers", "diffusers_peft_nometa": "diffusers", "diffusers_train": "diffusers",
             "diffusers_attn_procs": "diffusers", "peft": "peft", "peft_v4": "peft"}


# --------------------------------------------------------------------------------------------
# The tiny world: encoders, checkpoints, LoRAs and their files, PEFT's expectations (all cached)
# --------------------------------------------------------------------------------------------
class World:
    def __init__(self, root: Path):
        self.root = root
        L1 = L.build_encoder("clip_l", 11)
        XL, XG = L.build_encoder("clip_l", 12), L.build_encoder("clip_g", 13)
        self.enc = {"sd1": {"clip_l": L1}, "sdxl": {"clip_l": XL, "clip_g": XG}}
        self.ckpt = {"sd1": L.write_sd1(L1.hf_sd, root / "sd1.safetensors"),
                     "sdxl": L.write_sdxl(XL.hf_sd, XG.hf_sd, root / "sdxl.safetensors")}
        self._loras, self._files, self._expected = {}, {}, {}

    def lora(self, kind: str, spec: str) -> L.Lora:
        if (kind, spec) not in self._loras:
            self._loras[kind, spec] = L.make_lora(self.enc[kind], kind, spec, SEEDS[spec] + (kind == "sdxl"))
        return self._loras[kind, spec]

    def file(self, kind: str, spec: str, fmt: str, encoder: str | None = None) -> Path:
        """The LoRA `spec` of `kind` written in format `fmt` (plain PEFT: for one `encoder`)."""
        key = (kind, spec, fmt, encoder)
        if key not in self._files:
            lora, name = self.lora(kind, spec), "_".join(x for x in key if x)
            p = self.root / "loras" / name
            p.parent.mkdir(exist_ok=True)
            st = p.with_suffix(".safetensors")
            if fmt == "kohya":
                f = L.kohya(st, lora)
            elif fmt == "kohya_fp16":      # as SDXL LoRAs usually ship: fp16, .alpha on every module
                f = L.kohya(st, lora, dtype=torch.float16, alpha_when_rank=True)
            elif fmt == "diffusers_linear":
                f = L.diffusers_linear(st, lora)
            elif fmt == "diffusers_attn_procs":
                f = L.diffusers_attn_procs(st, lora)
            elif fmt == "diffusers_peft":         # with a UNet LoRA beside (unet.*)
                f = L.diffusers_peft(p, lora, self.enc[kind], unet=True)
            elif fmt == "diffusers_peft_v4":    # as transformers 4 names CLIPTextModel's modules
                f = L.with_text_model_prefix(L.diffusers_peft(p, lora, self.enc[kind]), st)
            elif fmt == "diffusers_peft_nometa":
                f = L.diffusers_peft(p, lora, self.enc[kind], metadata=False, unet=True)
            elif fmt == "diffusers_train":
                f = L.diffusers_peft(p, lora, self.enc[kind], training=True)
            elif fmt in ("peft", "peft_v4"):
                f = L.peft_folder(p, self.enc[kind][encoder], lora, text_model_prefix=fmt == "peft_v4")
            else:
                raise ValueError(fmt)
            self._files[key] = f
        return self._files[key]

    def expected(self, kind: str, applied: tuple) -> dict:
        """{encoder: PEFT's merge} of the LoRAs `applied` ((spec, scale), ...), in order."""
        key = (kind, applied)
        if key not in self._expected:
            self._expected[key] = {e: L.peft_expected(enc, [(self.lora(kind, s), sc) for s, sc in applied])
                                   for e, enc in self.enc[kind].items()}
        return self._expected[key]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("lora_world"))


def _layout(kind: str, to: str) -> str:
    return NATIVE[kind] if to == "native" else to


def run_convert(world: World, kind: str, tmp_path: Path, to: str, lora, encoder: str | None = None,
                source: Path | None = None, **kw) -> dict:
    """sdconv convert of the kind's checkpoint (all its encoders, or `encoder`) with `lora`;
    returns {encoder: its output (file or folder)}."""
    from sdconv import convert

    to = _layout(kind, to)
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / ("out" if to in FOLDERS else "out.safetensors")
    if encoder is None and kind == "sdxl":
        encoder = "all"
    res = convert(str(source or world.ckpt[kind]), str(out), to=to, encoder=encoder, lora=lora, **kw)
    encs = KINDS[kind] if encoder in (None, "all") else (encoder,)
    if len(res.outputs) == 1:
        return {e: Path(res.outputs[0]) for e in encs}
    return {e: next(Path(p) for p in res.outputs if f".{e}" in Path(p).name) for e in encs}


def check_encoder(world: World, kind: str, e: str, to: str, path: Path, exp: L.Expected, label: str,
                  base: L.Encoder | None = None, atol: float = L.W_ATOL) -> dict:
    """sdconv's output of encoder `e` holds PEFT's merged weights and gives its outputs."""
    enc = base or world.enc[kind][e]
    to = _layout(kind, to)
    got = L.read_output(to, path, e)
    L.assert_weights(got, exp, enc.hf_sd, label, atol=atol)
    if to in FOLDERS:            # the consumer reads the folder itself (config included)
        folder = path if to == "hf" else path / L.DIFFUSERS_PREFIX[e]
        model = C.load_transformers(folder, with_projection=enc.with_projection).info["model"]
    else:
        model = L.model_from(enc, got)
    C.compare(L.forward(model, enc.ids), exp.out, label)
    return got


# --------------------------------------------------------------------------------------------
# 0. The oracle itself (no sdconv): PEFT's merge is the formula, every file holds the adapter
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_peft_merge_is_the_formula(world, kind):
    """merge_and_unload == W + sum(s * alpha/r * B @ A), bit for bit (the same fp32 operations), for
    one LoRA and for two at scales 0.8 and -1.5; and PEFT's per-module ranks/alphas are the specs'."""
    for applied in ((("main", 1.0),), (("main", 0.8), ("second", -1.5))):
        exp = world.expected(kind, applied)
        for e, enc in world.enc[kind].items():
            formula = L.formula_merge(enc, [(world.lora(kind, s).deltas[e], sc) for s, sc in applied])
            for k, v in exp[e].sd.items():
                assert torch.equal(v, formula[k]), (kind, e, applied, k)
    main = world.lora(kind, "main")
    for e in KINDS[kind]:
        got = {m.replace("text_model.encoder.layers.", ""): (d.rank, d.alpha) for m, d in main.deltas[e].items()}
        want = {"0.self_attn.k_proj": (2, 8), "1.mlp.fc1": (8, 8), "1.self_attn.v_proj": (3, 3),
                "0.self_attn.q_proj": (4, 1), "0.mlp.fc2": (4, 4), "1.self_attn.out_proj": (4, 16)}
        assert {k: got[k] for k in want} == want, got
        assert (L.PROJ in got) == (e == "clip_g")
        assert all(d.up.abs().min() > 0 for d in main.deltas[e].values()), "lora_B must not be zero"


def _read_back(world, kind, spec, fmt):
    f = world.file(kind, spec, fmt)
    reader = L.read_kohya if fmt.startswith("kohya") else L.read_diffusers
    return reader(f, kind, world.enc[kind])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_oracle_files_hold_the_adapter(world, kind, fmt):
    """Each file, read back by hand, gives PEFT's merged weights through the formula."""
    got = _read_back(world, kind, "main", fmt)
    exp = world.expected(kind, (("main", 1.0),))
    assert set(got) == set(KINDS[kind])
    for e, enc in world.enc[kind].items():
        L.assert_weights(L.formula_merge(enc, [(got[e], 1.0)]), exp[e], enc.hf_sd, f"{kind} {fmt} {e}")


PEFT_CASES = {  # name: (kind, encoder, format)
    "sd1": ("sd1", "clip_l", "peft"),
    "sd1_v4keys": ("sd1", "clip_l", "peft_v4"),
    "sdxl_clip_l": ("sdxl", "clip_l", "peft"),
    "sdxl_clip_g": ("sdxl", "clip_g", "peft"),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_oracle_peft_files_hold_the_adapter(world, case):
    kind, e, fmt = PEFT_CASES[case]
    f = world.file(kind, "main", fmt, e)
    cfg = json.loads((f.parent / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (4, 8, "LORA")
    assert cfg["alpha_pattern"]["layers.0.self_attn.q_proj"] == 1 and cfg["rank_pattern"]["layers.1.mlp.fc1"] == 8
    keys = set(load_file(str(f)))
    # transformers 5's CLIPTextModel is flat (no text_model.); CLIPTextModelWithProjection is not
    stem = "base_model.model." + ("encoder" if (e == "clip_l" and fmt == "peft") else "text_model.encoder")
    assert f"{stem}.layers.0.self_attn.q_proj.lora_A.weight" in keys, sorted(keys)[:3]
    assert ("base_model.model.text_projection.lora_B.weight" in keys) == (e == "clip_g")
    got = L.read_peft(f, e)
    exp = world.expected(kind, (("main", 1.0),))[e]
    L.assert_weights(L.formula_merge(world.enc[kind][e], [(got[e], 1.0)]), exp, world.enc[kind][e].hf_sd, case)


def test_oracle_key_formats(world):
    """The files are spelled as their tools spell them (see the helper's docstring for where)."""
    # kohya SD1: lora_te_<module with _>, .alpha 0-d, left out where alpha == rank; lora_unet_ beside
    sd = load_file(str(world.file("sd1", "main", "kohya")))
    n = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert sd[n + ".lora_down.weight"].shape == (4, 128) and sd[n + ".lora_up.weight"].shape == (128, 4)
    assert sd[n + ".alpha"].shape == () and float(sd[n + ".alpha"]) == 1.0
    assert "lora_te_text_model_encoder_layers_0_mlp_fc2.alpha" not in sd          # r 4, alpha 4
    assert "lora_te_text_model_encoder_layers_1_self_attn_v_proj.alpha" not in sd  # r 3, alpha 3
    assert sd["lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight"].shape == (8, 128)
    assert sum(k.startswith("lora_unet_") for k in sd) == 6
    assert any(v.dim() == 4 for k, v in sd.items() if k.startswith("lora_unet_")), "a LoCon conv among the UNet keys"
    # kohya SDXL, fp16: lora_te1_ / lora_te2_, bigG's projection as lora_te2_text_projection, alphas fp16
    sd = load_file(str(world.file("sdxl", "main", "kohya_fp16")))
    assert {k.split("_text_")[0] for k in sd if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    assert sd["lora_te2_text_projection.lora_up.weight"].shape == (128, 4)
    alpha = sd["lora_te2_text_projection.alpha"]
    assert alpha.dtype == torch.float16 and float(alpha) == 2
    assert all(v.dtype == torch.float16 for v in sd.values())
    # diffusers LoRALinearLayer era: text_model. names, no alpha anywhere
    sd = load_file(str(world.file("sdxl", "main", "diffusers_linear")))
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight" in sd
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.lora_linear_layer.up.weight" in sd
    assert not any("alpha" in k for k in sd)
    # diffusers PEFT era (save_lora_weights): lora_A/lora_B, CLIP-L flat under transformers 5,
    # alphas in the lora_adapter_metadata JSON, prefixed per text encoder
    f = world.file("sdxl", "main", "diffusers_peft")
    sd = load_file(str(f))
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight" in sd
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in sd
    assert "text_encoder_2.text_projection.lora_A.weight" in sd
    assert sum(k.startswith("unet.") for k in sd) == 2
    with safe_open(str(f), "pt") as fh:
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert meta["text_encoder.lora_alpha"] == 8 and meta["text_encoder.r"] == 4
    assert meta["text_encoder_2.alpha_pattern"]["layers.1.self_attn.out_proj"] == 16
    assert meta["text_encoder_2.rank_pattern"]["layers.0.self_attn.k_proj"] == 2
    sd = load_file(str(world.file("sdxl", "main", "diffusers_peft_v4")))
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in sd
    with safe_open(str(world.file("sdxl", "main", "diffusers_peft_v4")), "pt") as fh:
        v4 = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert v4 == {k: v for k, v in meta.items() if k.startswith("text_encoder")}
    with safe_open(str(world.file("sdxl", "main", "diffusers_peft_nometa")), "pt") as fh:
        assert "lora_adapter_metadata" not in (fh.metadata() or {})
    # diffusers training scripts (convert_state_dict_to_diffusers): attention lora_linear_layer, mlp lora_A/B
    sd = load_file(str(world.file("sd1", "main", "diffusers_train")))
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight" in sd
    assert "text_encoder.encoder.layers.0.mlp.fc1.lora_A.weight" in sd
    # diffusers attention-processor era
    sd = load_file(str(world.file("sd1", "attn", "diffusers_attn_procs")))
    assert "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight" in sd
    assert len(sd) == 2 * 4 * 2


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_oracle_negative_controls(world, kind, tmp_path):
    """The comparison catches a wrong alpha, and up and down swapped (transposed so the shapes
    still fit: a square matrix), in a file read back by hand."""
    lora, e = world.lora(kind, "main"), KINDS[kind][-1]
    q0 = "text_model.encoder.layers.0.self_attn.q_proj"
    exp = world.expected(kind, (("main", 1.0),))[e]
    enc = world.enc[kind][e]
    d = lora.deltas[e][q0]
    for label, bad in (("wrong alpha", lora.edited(e, q0, alpha=8.0)),
                       ("up/down swapped", lora.edited(e, q0, down=d.up.T.contiguous(), up=d.down.T.contiguous()))):
        f = L.kohya(tmp_path / f"{label.replace('/', '_').replace(' ', '_')}.safetensors", bad)
        got = L.read_kohya(f, kind, world.enc[kind])[e]
        with pytest.raises(AssertionError, match="q_proj"):
            L.assert_weights(L.formula_merge(enc, [(got, 1.0)]), exp, enc.hf_sd, label)


# --------------------------------------------------------------------------------------------
# 1. sdconv == PEFT: every format, both checkpoints, every output layout
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,fmt,to", [(k, f, t) for k in ("sd1", "sdxl")
                                         for f in FORMATS for t in FORMAT_LAYOUTS[f]])
def test_merge_matches_peft(world, tmp_path, kind, fmt, to):
    lora = world.file(kind, "main", fmt)
    outs = run_convert(world, kind, tmp_path, to, [(str(lora), 1.0)])
    exp = world.expected(kind, (("main", 1.0),))
    for e in KINDS[kind]:
        check_encoder(world, kind, e, to, outs[e], exp[e], f"{kind} {fmt} --to {to} {e}")


@pytest.mark.parametrize("case,to", [("sd1", t) for t in LAYOUTS] + [(c, t) for c in list(PEFT_CASES)[1:]
                                                                     for t in ("hf", "native")])
def test_merge_matches_peft_plain_peft(world, tmp_path, case, to):
    """A plain PEFT adapter of one encoder (adapter_model.safetensors, its adapter_config.json
    beside it: alphas from lora_alpha and alpha_pattern); in SDXL, --encoder names the one."""
    kind, e, fmt = PEFT_CASES[case]
    f = world.file(kind, "main", fmt, e)
    outs = run_convert(world, kind, tmp_path, to, [str(f)], encoder=e if kind == "sdxl" else None)
    check_encoder(world, kind, e, to, outs[e], world.expected(kind, (("main", 1.0),))[e], f"{case} --to {to}")


@pytest.mark.parametrize("fmt", ["kohya", "diffusers_peft", "peft"])
def test_lora_from_names_the_format(world, tmp_path, fmt):
    """--lora-from FORMAT reads the file as that format (the same merge); another format refuses it."""
    from sdconv import SdconvError

    kind, e = "sd1", "clip_l"
    f = world.file(kind, "main", fmt, e if fmt == "peft" else None)
    outs = run_convert(world, kind, tmp_path / "ok", "hf", [str(f)], lora_from=LORA_FROM[fmt])
    check_encoder(world, kind, e, "hf", outs[e], world.expected(kind, (("main", 1.0),))[e], f"--lora-from {fmt}")
    wrong = {"kohya": "peft", "diffusers_peft": "kohya", "peft": "kohya"}[fmt]
    with pytest.raises(SdconvError):
        run_convert(world, kind, tmp_path / "bad", "hf", [str(f)], lora_from=wrong)
    assert not (tmp_path / "bad" / "out").exists()


def test_diffusers_attention_processor_format(world, tmp_path):
    """diffusers' oldest files (to_q_lora ... to_out_lora, attention only, alpha = rank)."""
    for kind in ("sd1", "sdxl"):
        f = world.file(kind, "attn", "diffusers_attn_procs")
        outs = run_convert(world, kind, tmp_path / kind, "hf", [str(f)])
        exp = world.expected(kind, (("attn", 1.0),))
        for e in KINDS[kind]:
            check_encoder(world, kind, e, "hf", outs[e], exp[e], f"{kind} attn procs {e}")


# --------------------------------------------------------------------------------------------
# 2. Scales and several LoRAs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_scale_zero_is_the_encoder_bit_for_bit(world, tmp_path, kind):
    to = "hf" if kind == "sd1" else "diffusers"
    f = world.file(kind, "main", "kohya")
    with_zero = run_convert(world, kind, tmp_path / "zero", to, [f"{f}:0"])
    plain = run_convert(world, kind, tmp_path / "plain", to, [])
    for e, enc in world.enc[kind].items():
        a, b = L.read_output(to, with_zero[e], e), L.read_output(to, plain[e], e)
        assert set(a) == set(b) == set(enc.hf_sd)
        for k in a:
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], enc.hf_sd[k]), (kind, e, k)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_two_loras_apply_in_order(world, tmp_path, kind):
    """kohya main at 0.8 then a diffusers LoRALinearLayer file at -1.5 (the FILE:SCALE form) == PEFT
    with the two adapters at those scales merged one after the other; the scales belong to their LoRAs."""
    main, second = world.file(kind, "main", "kohya"), world.file(kind, "second", "diffusers_linear")
    outs = run_convert(world, kind, tmp_path, "hf", [(str(main), 0.8), f"{second}:-1.5"])
    exp = world.expected(kind, (("main", 0.8), ("second", -1.5)))
    swapped = world.expected(kind, (("main", -1.5), ("second", 0.8)))
    alone = world.expected(kind, (("main", 0.8),))
    for e in KINDS[kind]:
        got = check_encoder(world, kind, e, "hf", outs[e], exp[e], f"{kind} two LoRAs {e}")
        for label, other in (("scales swapped", swapped[e]), ("second left out", alone[e])):
            with pytest.raises(AssertionError):
                L.assert_weights(got, other, world.enc[kind][e].hf_sd, label)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_scale_half_is_alpha_halved(world, tmp_path, kind):
    """Scale 0.5 on a LoRA == the LoRA with every alpha halved at 1.0 == PEFT at scale 0.5.
    The two sdconv outputs agree bit for bit: halving is exact in binary floating point."""
    lora = world.lora(kind, "main")
    halved = L.kohya(tmp_path / "halved.safetensors", lora.alphas_times(0.5), alpha_when_rank=True)
    a = run_convert(world, kind, tmp_path / "a", "hf", [(str(world.file(kind, "main", "kohya")), 0.5)])
    b = run_convert(world, kind, tmp_path / "b", "hf", [str(halved)])
    exp = world.expected(kind, (("main", 0.5),))
    for e in KINDS[kind]:
        ga = check_encoder(world, kind, e, "hf", a[e], exp[e], f"{kind} scale 0.5 {e}")
        gb = check_encoder(world, kind, e, "hf", b[e], exp[e], f"{kind} alpha halved {e}")
        assert all(torch.equal(ga[k], gb[k]) for k in ga), (kind, e)


# --------------------------------------------------------------------------------------------
# 3. Negative controls through sdconv: the oracle catches a wrong file's merge
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("control", ["wrong_alpha", "up_down_swapped"])
def test_negative_control_caught(world, tmp_path, control):
    kind, e = "sdxl", "clip_g"
    lora = world.lora(kind, "main")
    q0 = "text_model.encoder.layers.0.self_attn.q_proj"
    d = lora.deltas[e][q0]
    bad = (lora.edited(e, q0, alpha=8.0) if control == "wrong_alpha"
           else lora.edited(e, q0, down=d.up.T.contiguous(), up=d.down.T.contiguous()))
    f = L.kohya(tmp_path / f"{control}.safetensors", bad)
    outs = run_convert(world, kind, tmp_path, "hf", [str(f)], encoder=e)
    got = L.read_output("hf", outs[e], e)
    exp = world.expected(kind, (("main", 1.0),))[e]
    with pytest.raises(AssertionError, match="q_proj"):
        L.assert_weights(got, exp, world.enc[kind][e].hf_sd, control)
    # and sdconv did merge the bad file as written (it is the file that is wrong, not the merge)
    L.assert_weights(got, L.peft_expected(world.enc[kind][e], [(bad, 1.0)]), world.enc[kind][e].hf_sd, control)


# --------------------------------------------------------------------------------------------
# 4. Encoders, UNet keys, refusals
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("e", ["clip_l", "clip_g"])
def test_sdxl_one_encoder_takes_its_part_only(world, tmp_path, e):
    """--encoder clip_g with a te1+te2 kohya file: only lora_te2_ applies (te1 and the UNet keys ignored)."""
    f = world.file("sdxl", "main", "kohya")
    outs = run_convert(world, "sdxl", tmp_path, "open_clip", [str(f)], encoder=e)
    assert list(outs) == [e]
    check_encoder(world, "sdxl", e, "open_clip", outs[e], world.expected("sdxl", (("main", 1.0),))[e], f"--encoder {e}")


@pytest.mark.parametrize("which", ["kohya", "diffusers"])
def test_unet_only_lora_is_a_clear_error(world, tmp_path, which):
    from sdconv import UsageError

    f = (L.kohya_unet_only(tmp_path / "unet.safetensors", "sd1") if which == "kohya"
         else L.diffusers_unet_only(tmp_path / "unet_lora"))
    with pytest.raises(UsageError, match="no text-encoder weights in this LoRA"):
        run_convert(world, "sd1", tmp_path, "hf", [str(f)])
    assert not (tmp_path / "out").exists()


def _kohya_main(world, tmp_path, name, edit) -> Path:
    return L.rewrite(world.file("sd1", "main", "kohya"), tmp_path / f"{name}.safetensors", edit)


def test_dora_is_refused(world, tmp_path):
    from sdconv import UsageError

    n = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    f = _kohya_main(world, tmp_path, "dora", lambda sd: {**sd, n + ".dora_scale": torch.ones(128, 1)})
    with pytest.raises(UsageError, match="(?i)dora"):
        run_convert(world, "sd1", tmp_path, "hf", [str(f)])
    # a PEFT DoRA adapter: use_dora in adapter_config.json, lora_magnitude_vector beside lora_A/B
    src = world.file("sd1", "main", "peft", "clip_l")
    d = tmp_path / "peft_dora"
    d.mkdir()
    cfg = json.loads((src.parent / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    magnitude = "base_model.model.encoder.layers.0.self_attn.q_proj.lora_magnitude_vector"
    L.rewrite(src, d / "adapter_model.safetensors", lambda sd: {**sd, magnitude: torch.ones(128)})
    with pytest.raises(UsageError, match="(?i)dora"):
        run_convert(world, "sd1", tmp_path / "p", "hf", [str(d / "adapter_model.safetensors")])
    assert not (tmp_path / "out").exists() and not (tmp_path / "p" / "out").exists()


def test_conv_target_is_refused(world, tmp_path):
    """A text-encoder module with 4-d (convolution) down/up: refused, not reshaped (UNet LoCon keys,
    by contrast, are counted and ignored: every kohya file here has one)."""
    from sdconv import UsageError

    n = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"

    def conv(sd):
        sd = dict(sd)
        sd[n + ".lora_down.weight"] = sd[n + ".lora_down.weight"][:, :, None, None]
        sd[n + ".lora_up.weight"] = sd[n + ".lora_up.weight"][:, :, None, None]
        return sd
    f = _kohya_main(world, tmp_path, "conv", conv)
    with pytest.raises(UsageError, match="q_proj"):      # the refusal names the module
        run_convert(world, "sd1", tmp_path, "hf", [str(f)])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fault", ["missing_block", "wrong_width"])
def test_target_the_encoder_lacks_is_named(world, tmp_path, fault):
    from sdconv import SdconvError

    g = torch.Generator().manual_seed(9)
    if fault == "missing_block":   # block 5 of a 2-block encoder
        n, width = "lora_te_text_model_encoder_layers_5_self_attn_q_proj", 128
    else:                          # a LoRA made for a 768-wide CLIP-L
        n, width = "lora_te_text_model_encoder_layers_1_self_attn_k_proj", 768
    f = _kohya_main(world, tmp_path, fault, lambda sd: {
        **{k: v for k, v in sd.items() if not (fault == "wrong_width" and k.startswith(n))},
        n + ".lora_down.weight": torch.randn(4, width, generator=g),
        n + ".lora_up.weight": torch.randn(width, 4, generator=g),
        n + ".alpha": torch.tensor(4.0)})
    with pytest.raises(SdconvError) as ei:
        run_convert(world, "sd1", tmp_path, "hf", [str(f)])
    msg = str(ei.value)
    block = "5" if fault == "missing_block" else "1"
    assert any(s in msg for s in (f"layers_{block}", f"layers.{block}", f"blk.{block}")), msg
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# 5. dtypes: computed in fp32, added once, cast once
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["fp16_source_keep", "fp32_source_to_fp16", "fp16_source_to_fp32"])
def test_cast_once(world, tmp_path, case):
    """fp16 in or out: the output is (W in fp32 + delta in fp32) cast once. Against PEFT's fp32 merge
    cast to the output dtype: at most one fp16 ulp apart (two fp32 sums an ulp apart may round to
    neighbouring fp16 values), nearly all equal; adding in fp16 (a cast before the sum) is far off."""
    enc32 = world.enc["sd1"]["clip_l"]
    enc = L.rounded(enc32, torch.float16) if case.startswith("fp16_source") else enc32
    src = L.write_sd1(enc.hf_sd, tmp_path / "src.safetensors",
                      dtype=torch.float16 if case.startswith("fp16_source") else torch.float32)
    lora = world.lora("sd1", "main")
    dtype = {"fp16_source_keep": "keep", "fp32_source_to_fp16": "fp16", "fp16_source_to_fp32": "fp32"}[case]
    outs = run_convert(world, "sd1", tmp_path, "hf", [str(world.file("sd1", "main", "kohya_fp16"))], source=src,
                       dtype=dtype)
    exp = L.peft_expected(enc, [(lora, 1.0)])
    got = L.read_output("hf", outs["clip_l"], "clip_l")
    out16 = case != "fp16_source_to_fp32"
    assert all(v.dtype == (torch.float16 if out16 else torch.float32) for v in got.values())
    if not out16:
        check_encoder(world, "sd1", "clip_l", "hf", outs["clip_l"], exp, case, base=enc)
        return
    mism, total, wrong_mism = 0, 0, 0
    for k, v in got.items():
        want = exp.sd[k].half()
        if k not in exp.touched:
            assert torch.equal(v, enc.hf_sd[k].half()), k
            continue
        ulp = torch.finfo(torch.float16).eps * want.float().abs().clamp_min(2 ** -14)
        assert ((v.float() - want.float()).abs() <= ulp).all(), k
        mism += int((v != want).sum())
        total += v.numel()
        # the cast-first merge a fp16 pipeline would do: W16 + delta16, summed in fp16
        d = lora.deltas["clip_l"][k[:-len(".weight")]]
        wrong = enc.hf_sd[k].half() + d.product().half()
        wrong_mism += int((wrong != want).sum())
    assert mism <= total // 1000, (mism, total)
    assert wrong_mism > total // 100, ("the control must be visible", wrong_mism, total)


# --------------------------------------------------------------------------------------------
# 6. inspect, the command line, verify
# --------------------------------------------------------------------------------------------
INSPECT_CASES = {  # name: (kind, fmt, format name)
    "kohya_sdxl": ("sdxl", "kohya", "kohya"),
    "diffusers_peft_metadata_sd1": ("sd1", "diffusers_peft_v4", "diffusers"),
    "diffusers_linear_sdxl": ("sdxl", "diffusers_linear", "diffusers"),
}


@pytest.mark.parametrize("case", list(INSPECT_CASES))
def test_inspect_describes_a_lora(world, case):
    """inspect(lora)["lora"]: format; per encoder part the module count, ranks, alphas, blocks;
    the UNet keys counted. (The encoders' keys are not pinned: the values are compared as a set.)"""
    from sdconv import inspect

    kind, fmt, name = INSPECT_CASES[case]
    f = world.file(kind, "main", fmt)
    info = inspect(str(f))["lora"]
    assert info["format"] == name
    lora = world.lora(kind, "main")
    want = []
    for e in KINDS[kind]:
        ds = lora.deltas[e].values()
        alphas = {float(d.rank) for d in ds} if fmt == "diffusers_linear" else {d.alpha for d in ds}   # no alphas: rank
        want.append((len(ds), sorted({d.rank for d in ds}), sorted(alphas), [0, 1]))
    got = [(v["modules"], sorted(set(v["ranks"])), sorted(set(map(float, v["alphas"]))), sorted(set(v["blocks"])))
           for v in info["encoders"].values()]
    assert sorted(got) == sorted(want), (got, want)
    n_unet = sum(k.startswith(("lora_unet_", "unet.")) for k in load_file(str(f)))
    assert info["unet_keys"] == n_unet


def _cli(*args):
    from sdconv.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def test_cli_convert_with_two_loras(world, tmp_path):
    main, second = world.file("sd1", "main", "kohya"), world.file("sd1", "second", "diffusers_linear")
    out = tmp_path / "out"
    code, text = _cli("convert", world.ckpt["sd1"], "-o", out, "--to", "hf",
                      "--lora", f"{main}:0.8", "--lora", f"{second}:-1.5")
    assert code == 0, text
    check_encoder(world, "sd1", "clip_l", "hf", out, world.expected("sd1", (("main", 0.8), ("second", -1.5)))["clip_l"],
                  "CLI two LoRAs")
    code, text = _cli("convert", world.ckpt["sd1"], "-o", tmp_path / "bad", "--to", "hf",
                      "--lora", main, "--lora-from", "peft")
    assert code != 0 and not (tmp_path / "bad").exists(), text


def test_cli_verify_against_peft_merged_checkpoint(world, tmp_path):
    """verify --lora-a: the checkpoint plus sdconv's merge of the LoRA is the checkpoint PEFT merged
    (written by hand from merge_and_unload's tensors); without the LoRA they differ."""
    exp = world.expected("sd1", (("main", 0.8),))["clip_l"]
    merged = L.write_sd1(exp.sd, tmp_path / "peft_merged.safetensors")
    base, f = world.ckpt["sd1"], world.file("sd1", "main", "kohya")
    code, text = _cli("verify", base, merged, "--lora-a", f"{f}:0.8")
    assert code == 0, text
    code, text = _cli("verify", merged, base, "--lora-b", f"{f}:0.8")
    assert code == 0, text
    code, text = _cli("verify", base, merged)
    assert code == 1, text
    code, text = _cli("verify", base, merged, "--lora-a", f"{f}:0.5")
    assert code == 1, text


# --------------------------------------------------------------------------------------------
# 7. diffusers 0.42.1 as the consumer: right on what its converter reads right, and its faults
# --------------------------------------------------------------------------------------------
DIFFUSERS_RIGHT = {  # name: (kind, spec, fmt, lora_scale)
    "sd1_kohya_one_alpha": ("sd1", "uniform", "kohya", 1.0),
    "sdxl_kohya_one_alpha": ("sdxl", "uniform", "kohya", 1.0),
    "sd1_linear": ("sd1", "main", "diffusers_linear", 1.0),
    "sdxl_linear": ("sdxl", "main", "diffusers_linear", 1.0),
    "sd1_peft_metadata": ("sd1", "main", "diffusers_peft", 1.0),
    "sdxl_peft_metadata": ("sdxl", "main", "diffusers_peft", 1.0),
    "sdxl_peft_metadata_scale_half": ("sdxl", "main", "diffusers_peft", 0.5),
    "sdxl_peft_metadata_v4_names": ("sdxl", "main", "diffusers_peft_v4", 1.0),
    "sdxl_peft_no_metadata": ("sdxl", "main", "diffusers_peft_nometa", 1.0),
    "sdxl_training_script": ("sdxl", "main", "diffusers_train", 1.0),
    "sdxl_attn_procs": ("sdxl", "attn", "diffusers_attn_procs", 1.0),
    "sdxl_no_out_proj_linear": ("sdxl", "no_out", "diffusers_linear", 1.0),
    "sdxl_projection_rank_metadata": ("sdxl", "proj_rank", "diffusers_peft", 1.0),
}


@pytest.mark.parametrize("case", list(DIFFUSERS_RIGHT))
def test_diffusers_agrees_with_peft(world, case):
    kind, spec, fmt, scale = DIFFUSERS_RIGHT[case]
    fused = L.diffusers_fused(kind, world.enc[kind], world.file(kind, spec, fmt), scale=scale)
    exp = world.expected(kind, ((spec, scale),))
    for e, enc in world.enc[kind].items():
        L.assert_weights(fused[e], exp[e], enc.hf_sd, f"diffusers {case} {e}")


@pytest.mark.parametrize("fmt", ["kohya", "kohya_fp16"])
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_diffusers_fault_one_alpha(world, kind, fmt):
    """A kohya file whose alphas differ: diffusers gives every attention module (and, on transformers
    5's flat CLIPTextModel, every mlp module) the most common alpha, and a module without .alpha that
    alpha instead of its rank (lora.diffusers_kohya_alphas spells out why). Exactly that, to 1e-6."""
    lora, f = world.lora(kind, "main"), world.file(kind, "main", fmt)
    fused = L.diffusers_fused(kind, world.enc[kind], f)
    exp = world.expected(kind, (("main", 1.0),))
    for e, enc in world.enc[kind].items():
        with pytest.raises(AssertionError):
            L.assert_weights(fused[e], exp[e], enc.hf_sd, f"diffusers {kind} {e}")
        alphas = L.diffusers_kohya_alphas(lora, enc, L.kohya_alpha_modules(f, lora, e))
        wrong = {m: alphas[m] for m, d in lora.deltas[e].items() if alphas[m] != d.alpha}
        assert any(".self_attn." in m for m in wrong), wrong
        assert any(".mlp." in m for m in wrong) == (fmt == "kohya" or e == "clip_l"), (e, fmt, wrong)
        as_diffusers = {m: L.Delta(d.down, d.up, alphas[m]) for m, d in lora.deltas[e].items()}
        predicted = L.formula_merge(enc, [(as_diffusers, 1.0)])
        for k, v in fused[e].items():
            torch.testing.assert_close(v, predicted[k], atol=L.W_ATOL, rtol=0, msg=lambda m, k=k: f"{e} {k}: {m}")


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_diffusers_fault_drops_qkv_without_out_proj(world, kind):
    """kohya q/k/v + fc1, no out_proj: diffusers recognises its converted keys as the old format only
    by to_out_lora, so to_q/k/v_lora stay unconverted and match no module: q/k/v left as they were
    (bit for bit), fc1 merged right."""
    fused = L.diffusers_fused(kind, world.enc[kind], world.file(kind, "no_out", "kohya"))
    exp = world.expected(kind, (("no_out", 1.0),))
    for e, enc in world.enc[kind].items():
        for k in exp[e].touched:
            if ".self_attn." in k:
                assert torch.equal(fused[e][k], enc.hf_sd[k]), (e, k)
            else:
                torch.testing.assert_close(fused[e][k], exp[e].sd[k], atol=L.W_ATOL, rtol=0)
        assert any(".mlp.fc1." in k for k in exp[e].touched)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_diffusers_refuses_kohya_qkv_alone(world, kind):
    with pytest.raises(ValueError, match="Could not automatically infer state dict type"):
        L.diffusers_fused(kind, world.enc[kind], world.file(kind, "qkv", "kohya"))


@pytest.mark.parametrize("fmt", ["kohya", "diffusers_linear", "diffusers_peft_nometa"])
def test_diffusers_refuses_projection_of_another_rank(world, fmt):
    """bigG's text_projection at rank 2 beside rank-4 modules, without metadata: diffusers' text-encoder
    loader takes ranks from q/k/v/out/fc1/fc2 only, makes the projection's LoRA at the common rank,
    and loading its tensors fails on the size mismatch (with metadata it is right: see above)."""
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        L.diffusers_fused("sdxl", world.enc["sdxl"], world.file("sdxl", "proj_rank", fmt))


def test_diffusers_drops_dora_magnitude(world, tmp_path):
    """A kohya file with dora_scale: diffusers filters the magnitudes out (a warning) and merges the
    rest as a plain LoRA. What sdconv refuses, diffusers silently changes."""
    n = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    f = _kohya_main(world, tmp_path, "dora", lambda sd: {**sd, n + ".dora_scale": torch.full((128, 1), 3.0)})
    fused = L.diffusers_fused("sd1", world.enc["sd1"], f)["clip_l"]
    plain = L.diffusers_fused("sd1", world.enc["sd1"], world.file("sd1", "main", "kohya"))["clip_l"]
    assert all(torch.equal(fused[k], plain[k]) for k in fused)


def test_diffusers_files_hold_no_alpha(world, tmp_path):
    """diffusers 0.42.1 reads no alpha from a diffusers-format file's tensors: a bare `.alpha` key is
    refused (no "lora" in its name), a `.lora_linear_layer.alpha` one ignored. (Its alphas come from
    lora_adapter_metadata, or from a kohya file's own .alpha.)"""
    lora, f = world.lora("sd1", "main"), world.file("sd1", "main", "diffusers_linear")
    plain = L.diffusers_fused("sd1", world.enc["sd1"], f)["clip_l"]
    for suffix in (".alpha", ".lora_linear_layer.alpha"):
        g = L.rewrite(f, tmp_path / "with_alpha.safetensors", lambda sd: {
            **sd, **{f"text_encoder.{m}{suffix}": torch.tensor(d.alpha) for m, d in lora.deltas["clip_l"].items()}})
        if suffix == ".alpha":
            with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
                L.diffusers_fused("sd1", world.enc["sd1"], g)
        else:
            fused = L.diffusers_fused("sd1", world.enc["sd1"], g)["clip_l"]
            assert all(torch.equal(fused[k], plain[k]) for k in fused)


SDCONV_WHERE_DIFFUSERS_ERRS = {  # name: (kind, spec, fmt)
    "sd1_kohya_alphas": ("sd1", "main", "kohya"),
    "sdxl_kohya_alphas": ("sdxl", "main", "kohya"),
    "sdxl_kohya_attn_alphas": ("sdxl", "attn", "kohya"),
    "sd1_kohya_no_out_proj": ("sd1", "no_out", "kohya"),
    "sdxl_kohya_no_out_proj": ("sdxl", "no_out", "kohya"),
    "sdxl_kohya_qkv_alone": ("sdxl", "qkv", "kohya"),
    "sdxl_kohya_projection_rank": ("sdxl", "proj_rank", "kohya"),
    "sdxl_linear_projection_rank": ("sdxl", "proj_rank", "diffusers_linear"),
}


@pytest.mark.parametrize("case", list(SDCONV_WHERE_DIFFUSERS_ERRS))
def test_sdconv_right_where_diffusers_errs(world, tmp_path, case):
    kind, spec, fmt = SDCONV_WHERE_DIFFUSERS_ERRS[case]
    outs = run_convert(world, kind, tmp_path, "hf", [str(world.file(kind, spec, fmt))])
    exp = world.expected(kind, ((spec, 1.0),))
    for e in KINDS[kind]:
        check_encoder(world, kind, e, "hf", outs[e], exp[e], f"{case} {e}")
