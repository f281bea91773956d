"""Whole-CLIP configs read from inputs (open_clip_config.json, a CLIPModel's config.json) with
their libraries' own defaults, and the --whole-clip option. No consumer library needed."""
import pytest

from sdconv import ConvertOptions, UsageError
from sdconv.converters import configs
from sdconv.converters.untrusted import Value
from sdconv.errors import MalformedInputError


def _v(doc):
    return Value(doc, "open_clip_config.json")


def test_open_clip_text_reads_the_flag_and_heads():
    doc = {"model_cfg": {"embed_dim": 768, "quick_gelu": True,
                         "text_cfg": {"width": 768, "heads": 12, "layers": 12, "context_length": 77}}}
    assert configs.read_open_clip_text(_v(doc)) == {"params": {"act": "quick_gelu", "heads": 12},
                                                    "declared": {"width": 768, "layers": 12, "context": 77}}


def test_open_clip_defaults_are_open_clips():
    """No quick_gelu flag: open_clip builds exact GELU (CLIP(quick_gelu=False)); no text heads:
    CLIPTextCfg's 8; no head width: CLIPVisionCfg's 64. A file without model_cfg is read whole."""
    doc = {"embed_dim": 512, "text_cfg": {"width": 512}, "vision_cfg": {"width": 768, "image_size": [224, 224]}}
    assert configs.read_open_clip_text(_v(doc))["params"] == {"act": "gelu", "heads": 8}
    vision = configs.read_open_clip_vision(_v(doc))
    assert vision == {"params": {"act": "gelu", "head_width": 64}, "declared": {"width": 768}}


def test_open_clip_flag_must_be_a_boolean():
    with pytest.raises(MalformedInputError, match="quick_gelu must be true or false"):
        configs.read_open_clip_text(_v({"model_cfg": {"quick_gelu": "yes", "text_cfg": {}}}))


def test_hf_clip_vision_reads_the_vision_half():
    doc = {"text_config": {"hidden_act": "gelu"},
           "vision_config": {"hidden_act": "quick_gelu", "num_attention_heads": 16, "hidden_size": 1024,
                             "patch_size": 14, "image_size": 224, "projection_dim": 512}}
    assert configs.read_hf_clip_vision(Value(doc, "config.json")) == {
        "params": {"heads": 16, "act": "quick_gelu"},
        "declared": {"width": 1024, "patch": 14, "image": 224}}      # a sub-config's projection_dim is not used
    assert configs.read_hf_clip_vision(Value({"text_config": {}}, "config.json")) == {"params": {}, "declared": {}}


def test_every_whole_clip_config_is_read_too():
    assert configs.CLIP_READERS.keys() == configs.CLIP_FORMATS.keys()


def test_whole_clip_option():
    with pytest.raises(UsageError, match="pass one of them"):
        ConvertOptions(to="hf", whole_clip=True, with_vision="ref.pt")
    assert ConvertOptions(to="hf", whole_clip=True).record()["whole_clip"] is True
    # off, it is left out of a batch's record: outputs made before the option existed are up to date
    assert "whole_clip" not in ConvertOptions(to="hf").record()
