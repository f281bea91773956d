"""`sdconv sample --whole-clip`: a reference CLIP with random weights whose text tower is the SD
sample's own (same preset and seed), written through --with-vision's write path, so that an SD
sample and its reference pair up as a real SD1.x checkpoint and OpenAI's ViT-L/14 do.
(Its loading in clip, open_clip and transformers is checked in tests/test_clipscore.py.)"""
import pytest
from safetensors import safe_open

from sdconv import UsageError, convert, sample, verify
from sdconv.converters.configs import image_geometry
from sdconv.converters.registry import DEFAULT
from sdconv.cli import main
from click.testing import CliRunner


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("samples")
    sample(d / "sd1.safetensors", preset="tiny", seed=3)
    return d / "sd1.safetensors"


@pytest.mark.parametrize("layout,name", [("openai", "ref.pt"), ("open_clip", "ref-oc"), ("hf", "ref-hf")])
def test_whole_clip_sample_is_a_reference_for_the_sd_sample(sd1, tmp_path, layout, name):
    ref = tmp_path / name
    info = sample(ref, layout=layout, preset="tiny", seed=3, whole_clip=True)
    assert info["vision"] == {"heads": 1, "act": "quick_gelu", "image": 32}
    # the SD sample's encoder is the reference's text tower: identical weights and outputs
    report = verify(sd1, ref)
    assert report["exit_code"] == 0 and report["verdict"].startswith("identical"), report["verdict"]
    # and the SD sample converts with it into a whole CLIP
    r = convert(sd1, tmp_path / "out-hf", to="hf", with_vision=ref)
    assert r.plan.vision is not None and (tmp_path / "out-hf" / "config.json").is_file()


def test_the_converted_whole_clip_is_the_reference(sd1, tmp_path):
    """Text tower from the SD sample, projections, vision tower and logit_scale from the reference:
    since the towers are the same tensors, the output is the reference CLIP, key for key, bit for bit."""
    sample(tmp_path / "ref-hf", layout="hf", preset="tiny", seed=3, whole_clip=True)
    convert(sd1, tmp_path / "out", to="hf", with_vision=tmp_path / "ref-hf")
    want, got = _tensors(tmp_path / "ref-hf" / "model.safetensors"), _tensors(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(want)
    assert any(k.startswith("vision_model.") for k in got) and "text_projection.weight" in got
    different = [k for k in want if not (got[k].dtype == want[k].dtype and got[k].equal(want[k]))]
    assert not different, different


def test_another_seed_is_another_model(sd1, tmp_path):
    """Negative control: the text tower follows the seed, so verify tells the two apart."""
    sample(tmp_path / "ref.pt", layout="openai", preset="tiny", seed=4, whole_clip=True)
    assert verify(sd1, tmp_path / "ref.pt")["exit_code"] != 0


def test_the_sd_sample_is_unchanged_by_the_projection(tmp_path):
    """The reference's text projection is drawn after the whole tower, so adding it changes no
    tensor of the tower (the SD sample's bytes are held by tests/test_golden.py too)."""
    from sdconv.samples import canonical_sample
    fam = DEFAULT.layout("ldm").family
    p = fam.presets["tiny"]
    plain, with_proj = canonical_sample(fam, p, 5), canonical_sample(fam, {**p, "proj": 128}, 5)
    assert set(with_proj) - set(plain) == {"text_proj.weight"}
    assert all(plain[k].equal(with_proj[k]) for k in plain)


def test_vision_presets():
    vfam = DEFAULT.vision(DEFAULT.layout("openai")).family
    assert image_geometry(vfam.presets["vit-l-14"]) == (224, 14)        # OpenAI ViT-L/14
    assert image_geometry(vfam.presets["tiny"]) == (32, 16)
    assert vfam.presets["vit-l-14"]["proj"] == 768 and vfam.presets["tiny"]["proj"] == 128


def test_refusals(tmp_path):
    with pytest.raises(UsageError, match="holds a text encoder only"):
        sample(tmp_path / "x.safetensors", layout="ldm", whole_clip=True)
    with pytest.raises(UsageError, match="no vision tower for preset 'vit-h-14'"):
        sample(tmp_path / "x.pt", layout="openai", preset="vit-h-14", whole_clip=True)
    assert not list(tmp_path.iterdir())


def test_command_line(tmp_path):
    r = CliRunner().invoke(main, ["sample", str(tmp_path / "ref.pt"), "--layout", "openai", "--whole-clip"])
    assert r.exit_code == 0, r.output
    assert "openai whole CLIP sample (text and vision towers), preset tiny" in r.output
    assert "32 px images" in r.output and "random weights, seed 0" in r.output
    r = CliRunner().invoke(main, ["sample", str(tmp_path / "x.safetensors"), "--whole-clip"])
    assert r.exit_code == 2 and "choose --layout hf or open_clip or openai" in r.output
