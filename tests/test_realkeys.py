"""Full-size SD1.x text encoder built from the key list of real checkpoints (tests/data,
from arenasys/stable-diffusion-webui-model-toolkit): detection and architecture inference
must work on the keys real files hold, not only on our own fixtures."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdconv import convert, make_plan

pytestmark = pytest.mark.fullsize

DATA = Path(__file__).parent / "data"


def _keys(name):
    for line in (DATA / name).read_text().splitlines():
        key, shape = line.rsplit(" ", 1)
        yield key, [int(x) for x in shape.strip("[]").split(",")]


@pytest.fixture(scope="module")
def sd1_full(tmp_path_factory):
    p = tmp_path_factory.mktemp("full") / "sd15.safetensors"
    sd = {}
    for key, shape in _keys("CLIP-v1-SD.txt"):
        full = "cond_stage_model.transformer.text_model." + key
        sd[full] = (torch.arange(77).reshape(1, 77) if key.endswith("position_ids")
                    else torch.zeros(shape, dtype=torch.float16))
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(320, 4, 3, 3, dtype=torch.float16)
    save_file(sd, str(p))
    return p


def test_sd1_full_keys_detect_and_infer(sd1_full):
    plan = make_plan(sd1_full, to="openai")
    assert plan.read.layout.name == "ldm"
    a = plan.arch
    assert (a["width"], a["layers"], a["ffn"], a["vocab"], a["context"], a["proj"]) == (768, 12, 3072, 49408, 77, None)
    assert plan.params == {"heads": 12, "act": "quick_gelu"}
    assert len(plan.read.ops) == 196
    # 123,060,480 parameters in fp16, no projection (LAYOUTS.md §1)
    assert plan.read.bytes_to_read == 123_060_480 * 2 and plan.bytes_to_write == 123_060_480 * 2


def test_sd1_full_to_hf_config(sd1_full, tmp_path):
    convert(sd1_full, tmp_path / "te", to="hf")
    cfg = json.loads((tmp_path / "te" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"]) == \
        (768, 12, 12, 3072)
    assert cfg["hidden_act"] == "quick_gelu" and cfg["architectures"] == ["CLIPTextModel"]
    assert cfg["torch_dtype"] == "float16"
