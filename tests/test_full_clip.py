"""--with-vision: a whole CLIP for CLIPScore, loaded by clip.load, open_clip and transformers,
giving the reference's image and text features."""
import copy

import pytest
import torch

from tests.helpers import consumers as C
from tests.helpers.clipref import reference_and_sd1
from tests.helpers.fixtures import distinct_canonical, write_multi
from sdconv import UsageError, convert, make_plan

pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    m = reference_and_sd1(d)
    ids, img = C.token_ids(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = (m.encode_text(ids), m.encode_image(img))
        import clip
        m16 = copy.deepcopy(m)
        clip.model.convert_weights(m16)       # what clip.load does to the weights
        m16.float()
        want16 = (m16.encode_text(ids), m16.encode_image(img))
    return d, ids, img, want, want16


def test_openai_full_clip_loads_with_clip_load(world, tmp_path):
    import clip
    d, ids, img, _, want16 = world
    r = convert(d / "sd1.ckpt", tmp_path / "sd15-clip.pt", to="openai", with_vision=d / "ViT-tiny.pt")
    assert r.plan.fmt == "pt"
    model, _ = clip.load(str(tmp_path / "sd15-clip.pt"), device="cpu", jit=False)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids).float(), want16[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_image(img).float(), want16[1], atol=1e-5, rtol=0)
        assert float(model.logit_scale) == pytest.approx(4.6052, abs=1e-3)


def test_open_clip_full_clip_folder(world, tmp_path):
    import json

    import open_clip
    d, ids, img, want, _ = world
    convert(d / "sd1.ckpt", tmp_path / "oc", to="open_clip", with_vision=d / "ViT-tiny.pt")
    cfg = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["quick_gelu"] is True and cfg["model_cfg"]["embed_dim"] == 128
    model = open_clip.create_model("local-dir:" + str(tmp_path / "oc"))        # strict loading
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), want[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_image(img), want[1], atol=1e-5, rtol=0)


def test_hf_clipmodel_folder(world, tmp_path):
    from transformers import CLIPModel
    d, ids, img, want, _ = world
    convert(d / "sd1.ckpt", tmp_path / "hf", to="hf", with_vision=d / "ViT-tiny.pt")
    model, info = CLIPModel.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.eval()
    with torch.no_grad():
        t = model.get_text_features(input_ids=ids)
        i = model.get_image_features(pixel_values=img)
        t = getattr(t, "pooler_output", t)
        i = getattr(i, "pooler_output", i)
        torch.testing.assert_close(t, want[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(i, want[1], atol=1e-5, rtol=0)
        assert float(model.logit_scale) == pytest.approx(4.6052, abs=1e-4)


def test_reference_in_hf_layout_gives_the_same_clip(world, tmp_path):
    """The vision tower's naming is converted too: an hf CLIPModel reference -> open_clip folder."""
    import open_clip
    d, ids, img, want, _ = world
    convert(d / "sd1.ckpt", tmp_path / "hf", to="hf", with_vision=d / "ViT-tiny.pt")
    convert(d / "sd1.ckpt", tmp_path / "oc", to="open_clip", with_vision=tmp_path / "hf")
    model = open_clip.create_model("local-dir:" + str(tmp_path / "oc"))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(img), want[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(ids), want[0], atol=1e-5, rtol=0)


def test_gelu_tower_refused_for_openai(world, tmp_path):
    d = world[0]
    sd2 = write_multi(tmp_path / "sd2.safetensors", "ldm", {"clip_h": distinct_canonical(vocab=49408)})
    with pytest.raises(UsageError, match="QuickGELU"):
        make_plan(sd2, to="openai", with_vision=d / "ViT-tiny.pt", replace_projection=True, output=tmp_path / "x.pt")
    assert make_plan(sd2, to="openai", with_vision=d / "ViT-tiny.pt", replace_projection=True, force_activation=True,
                     output=tmp_path / "x.pt")


def test_reference_without_vision(world, tmp_path):
    d = world[0]
    with pytest.raises(UsageError, match="holds no vision tower|no complete ViT|no text projection to graft"):
        make_plan(d / "sd1.ckpt", to="hf", with_vision=d / "sd1.ckpt")


def test_torchscript_reference(world, tmp_path):
    """OpenAI's releases are TorchScript archives: valid as --with-vision / --projection references."""
    import clip
    import open_clip
    d, ids, img, want, _ = world
    m = clip.model.CLIP(embed_dim=128, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                        context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
                        transformer_layers=2).eval()
    m.load_state_dict(torch.load(d / "ViT-tiny.pt"))
    torch.jit.trace_module(m, {"encode_text": ids}, check_trace=False).save(str(tmp_path / "ViT-tiny-jit.pt"))
    convert(d / "sd1.ckpt", tmp_path / "oc", to="open_clip", with_vision=tmp_path / "ViT-tiny-jit.pt")
    model = open_clip.create_model("local-dir:" + str(tmp_path / "oc"))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(img), want[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(ids), want[0], atol=1e-5, rtol=0)
