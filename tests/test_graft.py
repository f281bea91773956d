"""--projection: graft a reference CLIP's text projection (and logit_scale) onto an SD encoder."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from tests.helpers import consumers as C
from tests.helpers.clipref import reference_and_sd1
from tests.helpers.fixtures import distinct_canonical, read_all, write_layout, write_multi
from sdconv import InputError, UsageError, convert, make_plan
from sdconv.converters.hashing import sha256_of


@pytest.fixture(scope="module")
def ref_and_sd1(tmp_path_factory):
    """A tiny OpenAI CLIP (the reference) and an SD1.x checkpoint holding the same text tower."""
    d = tmp_path_factory.mktemp("graft")
    return d, reference_and_sd1(d)


@pytest.mark.oracle
def test_graft_gives_the_reference_clip_text_features(ref_and_sd1, tmp_path):
    d, m = ref_and_sd1
    r = convert(d / "sd1.ckpt", tmp_path / "clip-l.safetensors", to="openai", from_="ldm",
                projection=d / "ViT-tiny.pt")
    ids = C.token_ids()
    got = C.load_openai_clip(tmp_path / "clip-l.safetensors", has_proj=True, has_logit_scale=True).forward(ids)
    with torch.no_grad():
        want = m.encode_text(ids)
    torch.testing.assert_close(got[2], want, atol=1e-5, rtol=0)
    # the final layer norm is the checkpoint's, the projection the reference's, and it is recorded
    out = read_all(tmp_path / "clip-l.safetensors")
    assert torch.equal(out["text_projection"], m.text_projection.detach())
    with safe_open(str(tmp_path / "clip-l.safetensors"), "pt") as f:
        g = json.loads(f.metadata()["sdconv.encoders"])["clip_l"]["grafted"]
    assert g["text_proj.weight"] == {"file": "ViT-tiny.pt", "key": "text_projection", "layout": "open_clip",
                                     "sha256": sha256_of([d / "ViT-tiny.pt"])} or \
        g["text_proj.weight"]["layout"] == "openai"
    assert g["logit_scale"]["key"] == "logit_scale"
    assert any("grafted text_proj.weight, logit_scale" in n for n in r.plan.notes)


@pytest.mark.oracle
def test_graft_from_a_transformers_reference_transposes_by_itself(ref_and_sd1, tmp_path):
    d, m = ref_and_sd1
    convert(d / "ViT-tiny.pt", tmp_path / "ref-hf", to="hf")              # text_projection.weight [P, W]
    convert(d / "sd1.ckpt", tmp_path / "a.safetensors", to="openai", projection=tmp_path / "ref-hf")
    assert torch.equal(read_all(tmp_path / "a.safetensors")["text_projection"], m.text_projection.detach())
    convert(d / "sd1.ckpt", tmp_path / "h", to="hf", projection=d / "ViT-tiny.pt")
    got = C.load_transformers(tmp_path / "h", True).forward(C.token_ids())
    with torch.no_grad():
        torch.testing.assert_close(got[2], m.encode_text(C.token_ids()), atol=1e-5, rtol=0)


@pytest.mark.oracle
def test_width_mismatch_names_the_widths(ref_and_sd1, tmp_path):
    d, _ = ref_and_sd1
    other = write_layout(distinct_canonical(vocab=1000, width=64), tmp_path / "w64.safetensors", "openai")
    with pytest.raises(UsageError, match=r"no encoder of width 128 .*widths found: 64"):
        make_plan(d / "sd1.ckpt", to="openai", projection=other)


@pytest.mark.oracle
def test_existing_projection_needs_replace(ref_and_sd1, tmp_path):
    """Another file's projection replaces the encoder's own only when asked (the input itself as
    --projection keeps its own: tests/test_whole_clip.py)."""
    d, _ = ref_and_sd1
    other = tmp_path / "other.pt"
    shutil.copy(d / "ViT-tiny.pt", other)
    with pytest.raises(UsageError, match="already has a text projection"):
        make_plan(d / "ViT-tiny.pt", to="hf", projection=other)
    assert make_plan(d / "ViT-tiny.pt", to="hf", projection=other, replace_projection=True)


def test_bigg_graft_warns(tmp_path):
    xl = write_multi(tmp_path / "xl.safetensors", "sgm", {"clip_g": distinct_canonical(vocab=1000)})
    ref = write_layout(distinct_canonical(vocab=1000, seed=3), tmp_path / "ref.safetensors", "openai")
    plan = make_plan(xl, to="hf", projection=ref, replace_projection=True)
    assert any("trained and used by SDXL" in n for n in plan.notes)


@pytest.mark.oracle
def test_placeholder_reference_refused(ref_and_sd1, tmp_path):
    d, _ = ref_and_sd1
    canon = distinct_canonical(vocab=1000)
    canon["text_proj.weight"] = torch.eye(128)
    fake = write_layout(canon, tmp_path / "fake.safetensors", "comfy")
    with pytest.raises(InputError, match="identity") as e:
        make_plan(d / "sd1.ckpt", to="openai", projection=fake)
    assert "--allow-synthetic" in str(e.value)
    assert make_plan(d / "sd1.ckpt", to="openai", projection=fake, allow_synthetic=True)
