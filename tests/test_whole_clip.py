"""Whole CLIPs in every layout (issue 14, item 3): a full CLIP read from an OpenAI state dict or
TorchScript archive, open_clip (a folder or a state-dict file) or a transformers CLIPModel folder
is written as openai, open_clip or hf with both towers, exactly. Each output gives the source's
image and text features in its own library (fp32), and converting it back gives the source's
tensors bit for bit. `--with-vision INPUT` (the input naming itself) or `--whole-clip` does it
with no other flag; `inspect` describes the vision tower."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from sdconv import ConvertOptions, UsageError, convert, inspect, make_plan
from sdconv.cli import main
from tests.helpers import consumers as C
from tests.helpers import wholeclip as W
from tests.helpers.clipref import reference_and_sd1

pytestmark = pytest.mark.oracle

TARGETS = ("openai", "open_clip", "hf")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("whole")
    m = reference_and_sd1(d)
    sources = W.write_whole_clips(d, m)
    ids, img = C.token_ids(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    want = {name: W.features(W.HOME[name], p, ids, img) for name, p in sources.items()}
    with torch.no_grad():       # the libraries agree on the source itself
        ref = (m.encode_text(ids), m.encode_image(img))
    for name, got in want.items():
        assert_features(got, ref, exact=False)
    return d, sources, ids, img, want


@pytest.fixture(scope="module")
def gelu(world):
    d, _, ids, img, _ = world
    folder = W.gelu_open_clip_folder(d)
    return folder, W.features("open_clip", folder, ids, img)


def out_path(d, name: str, layout: str):
    """openai whole CLIPs are state dicts for clip.load (.pt); open_clip and hf are folders."""
    return d / f"{name}.pt" if layout == "openai" else d / name


def assert_features(got, want, exact: bool):
    """(text, image) features: the same bits when the same library runs the same weights, else
    within 1e-5 (transformers and nn.MultiheadAttention order their sums differently)."""
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        if exact:
            assert torch.equal(g, w), float((g - w).abs().max())
        else:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", list(W.HOME))
def test_whole_clip_in_every_layout(world, tmp_path, source, target):
    d, sources, ids, img, want = world
    out = out_path(tmp_path, "out", target)
    r = convert(sources[source], out, to=target, whole_clip=True)
    assert r.plan.vision.source is r.plan.source and not r.plan.encoders[0].grafts
    assert_features(W.features(target, out, ids, img), want[source], exact=target == W.HOME[source])
    back = out_path(tmp_path, "back", W.HOME[source])
    convert(out, back, to=W.HOME[source], whole_clip=True)
    assert W.bitwise_differences(W.state_dict(sources[source]), W.state_dict(back)) == []


CHAINS = [("openai", "open_clip", "hf", "openai"), ("hf", "openai", "open_clip", "hf"),
          ("open_clip", "hf", "openai", "open_clip")]
START = {"openai": "openai_pt", "hf": "hf", "open_clip": "open_clip_folder"}


@pytest.mark.parametrize("chain", CHAINS, ids="-".join)
def test_round_trip_through_every_layout(world, tmp_path, chain):
    d, sources, ids, img, want = world
    first = START[chain[0]]
    cur = sources[first]
    for i, layout in enumerate(chain[1:]):
        nxt = out_path(tmp_path, f"hop{i}", layout)
        convert(cur, nxt, to=layout, whole_clip=True)
        assert_features(W.features(layout, nxt, ids, img), want[first], exact=False)
        cur = nxt
    assert W.bitwise_differences(W.state_dict(sources[first]), W.state_dict(cur)) == []
    assert inspect(cur)["ledger"]["origins"] == {"checkpoint": len(W.state_dict(cur))}     # nothing grafted


@pytest.mark.parametrize("target", TARGETS)
def test_with_vision_naming_the_input_needs_no_other_flag(world, tmp_path, target):
    """The issue's command: it used to ask for --replace-projection."""
    d, sources, ids, img, want = world
    src = sources["openai_pt"]
    out = out_path(tmp_path, "cli", target)
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--to", target, "--with-vision", str(src)])
    assert r.exit_code == 0, r.output
    assert "logit_scale written with the vision tower" in r.output
    assert_features(W.features(target, out, ids, img), want["openai_pt"], exact=target == "openai")


def test_the_input_named_another_way_is_still_the_input(world, tmp_path):
    """A folder and its weights file, a symlink, a hard link: the same files, so nothing is grafted."""
    d, sources, *_ = world
    hf = sources["hf"]
    p = make_plan(hf, to="open_clip", with_vision=hf / "model.safetensors", output=tmp_path / "a")
    assert p.vision.source is p.source and not p.encoders[0].grafts
    link, hard = tmp_path / "link.pt", tmp_path / "hard.pt"
    link.symlink_to(sources["openai_pt"])
    os.link(sources["openai_pt"], hard)
    for other in (link, hard):
        p = make_plan(sources["openai_pt"], to="hf", with_vision=other, output=tmp_path / "b")
        assert p.vision.source is p.source and not p.encoders[0].grafts


def test_another_reference_is_grafted_as_before(world, tmp_path):
    """A copy of the input is another file: its projection replaces the input's only when asked."""
    d, sources, *_ = world
    src = sources["openai_pt"]
    copy = tmp_path / "copy.pt"
    shutil.copy(src, copy)
    with pytest.raises(UsageError, match="already has a text projection.*--replace-projection"):
        make_plan(src, to="hf", with_vision=copy, output=tmp_path / "a")
    p = make_plan(src, to="hf", with_vision=copy, replace_projection=True, output=tmp_path / "a")
    assert set(p.encoders[0].grafts) == {"text_proj.weight"} and p.vision.source is not p.source


def test_projection_naming_the_input_keeps_its_own(world, tmp_path):
    d, sources, *_ = world
    src = sources["openai_pt"]
    convert(src, tmp_path / "own.safetensors", to="openai", projection=src)
    convert(src, tmp_path / "plain.safetensors", to="openai")
    own, plain = load_file(tmp_path / "own.safetensors"), load_file(tmp_path / "plain.safetensors")
    assert W.bitwise_differences(own, plain) == [] and "text_projection" in own and "logit_scale" in own
    with pytest.raises(UsageError, match="no text projection"):
        make_plan(d / "sd1.ckpt", to="openai", projection=d / "sd1.ckpt")


def test_whole_clip_refusals(world, tmp_path):
    d, sources, *_ = world
    with pytest.raises(UsageError, match="--whole-clip.*--with-vision"):
        ConvertOptions(to="hf", whole_clip=True, with_vision=sources["openai_pt"])
    r = CliRunner().invoke(main, ["convert", str(sources["hf"]), "-o", str(tmp_path / "x"), "--to", "hf",
                                  "--whole-clip", "--with-vision", str(sources["openai_pt"])])
    assert r.exit_code == 2 and "pass one of them" in r.output, r.output
    for opts in ({"whole_clip": True}, {"with_vision": d / "sd1.ckpt"}):
        with pytest.raises(UsageError, match="the input holds no vision tower \\(ldm clip_l\\)"):
            make_plan(d / "sd1.ckpt", to="hf", output=tmp_path / "y", **opts)
    with pytest.raises(UsageError, match="not diffusers"):
        make_plan(sources["hf"], to="diffusers", whole_clip=True, output=tmp_path / "z")
    assert not (tmp_path / "x").exists()


def test_whole_clip_batch(world, tmp_path):
    """--whole-clip in a batch: each input is its own reference; a re-run skips them all."""
    d, sources, ids, img, want = world
    names = ["openai_pt", "hf", "open_clip_folder"]
    args = ["convert", *(str(sources[n]) for n in names), "-o", str(tmp_path / "out"), "--to", "hf", "--whole-clip"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "3 converted" in r.output, r.output
    for n in names:
        p = sources[n]
        out = tmp_path / "out" / (p.name if p.is_dir() else p.stem)
        assert_features(W.features("hf", out, ids, img), want[n], exact=n == "hf")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "3 skipped" in r.output, r.output


@pytest.mark.parametrize("target", ["open_clip", "hf"])
def test_gelu_whole_clip(world, gelu, tmp_path, target):
    """open_clip's config leaves quick_gelu out: exact GELU in both towers, and so in the output."""
    _, _, ids, img, _ = world
    folder, want = gelu
    out = out_path(tmp_path, "out", target)
    p = convert(folder, out, to=target, whole_clip=True).plan
    assert p.params["act"] == p.vision.params["act"] == "gelu"
    assert p.param_origin["act"] == p.vision.origin["act"] == "open_clip_config.json"
    assert_features(W.features(target, out, ids, img), want, exact=target == "open_clip")
    if target == "open_clip":
        assert W.open_clip_config(out)["quick_gelu"] is False
    else:
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["text_config"]["hidden_act"] == cfg["vision_config"]["hidden_act"] == "gelu"
    back = out_path(tmp_path, "back", "open_clip")
    convert(out, back, to="open_clip", whole_clip=True)
    assert W.bitwise_differences(W.state_dict(folder), W.state_dict(back)) == []


def test_gelu_whole_clip_refused_for_openai(world, gelu, tmp_path):
    """OpenAI's clip runs QuickGELU: written anyway only with --force-activation, and then clip
    computes another model (which is why it is refused)."""
    _, _, ids, img, _ = world
    folder, want = gelu
    with pytest.raises(UsageError, match="QuickGELU"):
        make_plan(folder, to="openai", whole_clip=True, output=tmp_path / "x.pt")
    convert(folder, tmp_path / "x.pt", to="openai", whole_clip=True, force_activation=True)
    got = W.features("openai", tmp_path / "x.pt", ids, img)
    assert all(float((g - w).abs().max()) > 1e-3 for g, w in zip(got, want))


def test_gelu_file_takes_the_activation_given_for_both_towers(world, gelu, tmp_path):
    """A state-dict file has no config: --param act=gelu says it, and the vision tower follows."""
    _, _, ids, img, _ = world
    folder, want = gelu
    f = tmp_path / "gelu.bin"
    torch.save(W.state_dict(folder), f)
    p = convert(f, tmp_path / "hf", to="hf", whole_clip=True, params={"act": "gelu"}).plan
    assert p.vision.params["act"] == "gelu" and p.vision.origin["act"] == "as the text tower: --param"
    assert_features(W.features("hf", tmp_path / "hf", ids, img), want, exact=False)


def test_a_tampered_vision_weight_is_caught(world, tmp_path):
    """Negative control: one changed vision weight fails both the feature and the bit checks."""
    d, sources, ids, img, want = world
    out = tmp_path / "oc"
    convert(sources["openai_pt"], out, to="open_clip", whole_clip=True)
    w = out / "open_clip_model.safetensors"
    sd = load_file(w)
    sd["visual.transformer.resblocks.0.mlp.c_fc.weight"][0, 0] += 0.5
    save_file(sd, w)
    got = W.features("open_clip", out, ids, img)
    assert torch.equal(got[0], want["openai_pt"][0])            # the text tower is untouched
    with pytest.raises(AssertionError):
        assert_features(got[1:], want["openai_pt"][1:], exact=False)
    back = tmp_path / "back.pt"
    convert(out, back, to="openai", whole_clip=True)
    diff = W.bitwise_differences(W.state_dict(sources["openai_pt"]), W.state_dict(back))
    assert diff == ["visual.transformer.resblocks.0.mlp.c_fc.weight"]


@pytest.mark.parametrize("source, origin", [("openai_pt", "as the text tower"), ("torchscript", "as the text tower"),
                                            ("open_clip_file", "as the text tower"),
                                            ("open_clip_folder", "open_clip_config.json"), ("hf", "config.json")])
def test_inspect_describes_the_vision_tower(world, source, origin):
    d, sources, *_ = world
    r = CliRunner().invoke(main, ["inspect", str(sources[source]), "--json"])
    assert r.exit_code == 0, r.output
    v = json.loads(r.output)["vision"]
    assert (v["width"], v["layers"], v["ffn"], v["heads"], v["act"], v["patch_size"], v["image_size"],
            v["projection_dim"], v["channels"]) == (64, 1, 256, 1, "quick_gelu", 16, 32, 128, 3)
    assert v["param_origin"]["act"].startswith(origin) and v["logit_scale"] == pytest.approx(4.6052, abs=1e-4)
    assert v["parameters"] == sum(t.numel() for k, t in W.state_dict(sources["openai_pt"]).items()
                                  if k.startswith("visual.") or k == "logit_scale")
    r = CliRunner().invoke(main, ["inspect", str(sources[source])])
    assert r.exit_code == 0
    assert "vision tower" in r.output and "width 64, layers 1, ffn 256, heads 1" in r.output
    assert "image 32, patch 16, 3 channels, projection 128" in r.output


def test_inspect_of_a_gelu_clip_and_of_a_text_encoder(world, gelu):
    d = world[0]
    v = inspect(gelu[0])["vision"]
    assert v["act"] == "gelu" and v["param_origin"] == {"act": "open_clip_config.json",
                                                        "heads": "width 64 / open_clip_config.json's head width 64"}
    assert inspect(d / "sd1.ckpt")["vision"] is None


def test_inspect_of_a_whole_clip_does_not_import_torch(world, tmp_path):
    d, sources, *_ = world
    out = tmp_path / "hf"
    convert(sources["openai_pt"], out, to="hf", whole_clip=True)
    code = f"""
import sys
from sdconv.cli import main
try:
    main(['inspect', {str(out)!r}, '--json'])
except SystemExit as e:
    assert not e.code, e.code
assert 'torch' not in sys.modules, 'torch was imported'
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["vision"]["patch_size"] == 16


def test_an_incomplete_vision_tower_is_said(world, tmp_path):
    """visual.* keys that are not a whole ViT tower (a ResNet CLIP's, or one lost): refused for a
    whole CLIP, and a note (not a crash) in inspect."""
    d, sources, *_ = world
    sd = W.state_dict(sources["openai_pt"])
    del sd["visual.conv1.weight"]
    f = tmp_path / "broken.pt"
    torch.save(sd, f)
    with pytest.raises(UsageError, match="no complete ViT vision tower"):
        make_plan(f, to="hf", whole_clip=True, output=tmp_path / "x")
    r = inspect(f)
    assert r["vision"] is None and any("its vision tower is not read" in n for n in r["encoders"][0]["notes"])


@pytest.mark.parametrize("width, head_width", [(1280, 80), (1664, 104)])
def test_openclip_h_and_bigg_vision_heads_without_a_config(tmp_path, width, head_width):
    """OpenCLIP's ViT-H/14 and ViT-bigG/14 towers have 16 heads (head widths 80 and 104), not
    width / 64: a state dict without a config is read with the known tower's heads, and the
    output computes the same image features as open_clip."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    vcfg = CLIPVisionCfg(layers=1, width=width, head_width=head_width, patch_size=14, image_size=28)
    tcfg = CLIPTextCfg(context_length=C.CONTEXT, vocab_size=C.VOCAB, width=C.WIDTH, heads=C.HEADS, layers=C.LAYERS)
    m = CLIP(C.PROJ, vcfg, tcfg, quick_gelu=False).eval()
    C.seeded_randn_(m, 3)
    with torch.no_grad():
        m.logit_scale.fill_(4.6052)
    torch.save(m.state_dict(), tmp_path / "oc-h.bin")
    plan = make_plan(tmp_path / "oc-h.bin", to="hf", whole_clip=True, params={"act": "gelu"})
    assert plan.vision.params["heads"] == 16, plan.vision.params
    convert(tmp_path / "oc-h.bin", tmp_path / "hf", to="hf", whole_clip=True, params={"act": "gelu"})
    img = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m.encode_image(img)
    _, got = W.features("hf", tmp_path / "hf", C.token_ids(), img)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
