"""Long-context encoders (issue 14 item 4): a CLIP-L with 248 positions (Long-CLIP) converts to
every layout with its context, loads in transformers with `max_position_embeddings` 248 and the
same outputs, and is not written --into a 77-position checkpoint without --force."""
import json

import pytest
import torch
from click.testing import CliRunner

from sdconv import convert
from sdconv.clip_forward import encode
from sdconv.cli import main
from tests.helpers.fixtures import ALL_LAYOUTS, distinct_canonical, read_all, write_layout

pytestmark = pytest.mark.oracle          # transformers loads the hf output

CONTEXT = 248
PARAMS = {"heads": 2, "act": "quick_gelu", "encoder": "clip_l"}


def _long_canon():
    canon = distinct_canonical(vocab=1000, with_proj=False, with_logit_scale=False)
    g = torch.Generator().manual_seed(11)
    canon["pos_embd.weight"] = torch.randn(CONTEXT, canon["pos_embd.weight"].shape[1], generator=g) * 0.02
    return canon


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    canon = _long_canon()
    return canon, write_layout(canon, d / "long.safetensors", "openai", params=PARAMS)


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_every_layout_keeps_the_context_bitwise(long_clip, tmp_path, layout):
    canon, src = long_clip
    mid = tmp_path / ("mid" if layout in ("hf", "diffusers") else "mid.safetensors")
    convert(src, mid, to=layout, encoder="all")
    back = tmp_path / "back.safetensors"
    convert(mid, back, to="openai", params={"encoder": "clip_l"}, encoder="all")
    a, b = read_all(src), read_all(back)
    assert b["positional_embedding"].shape == (CONTEXT, 128)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    pid = [v for k, v in read_all(mid).items() if k.endswith("position_ids")]
    assert all(tuple(p.shape) == (1, CONTEXT) and torch.equal(p[0], torch.arange(CONTEXT)) for p in pid)


def test_hf_output_loads_with_its_context_and_gives_the_same_outputs(long_clip, tmp_path):
    from transformers import CLIPTextModel
    canon, src = long_clip
    out = tmp_path / "hf"
    convert(src, out, to="hf")
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == CONTEXT
    model = CLIPTextModel.from_pretrained(out).eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 900, (2, CONTEXT), generator=g)
    ids[:, 0] = 998
    ids[0, 200], ids[1, CONTEXT - 1] = 999, 999          # the end-of-text (largest id) past position 77
    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
    want = encode(canon, ids, PARAMS["heads"], PARAMS["act"])["last_hidden"]
    exact = encode({k: v.double() for k, v in canon.items()}, ids, PARAMS["heads"], PARAMS["act"])["last_hidden"]
    # fp32 rounding: with these weights both fp32 runs are ~2.5e-5 from the fp64 one (at every
    # position, the first 77 too), so they are held to 1e-4 of it, and to each other
    assert float((got.double() - exact).abs().max()) < 1e-4
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
    # negative control: a model that read only 77 positions (a loader that assumes CLIP's
    # context) gives other pooled outputs: row 0 ends at position 200
    pooled = model(input_ids=ids).pooler_output.detach()
    cut = encode({**canon, "pos_embd.weight": canon["pos_embd.weight"][:77]}, ids[:, :77], 2)["pooled"]
    assert not torch.allclose(pooled, cut, atol=1e-3)


def test_into_a_77_position_checkpoint_needs_force(long_clip, tmp_path):
    canon, src = long_clip
    short = {**canon, "pos_embd.weight": canon["pos_embd.weight"][:77].clone()}
    ck = write_layout(short, tmp_path / "sd1.safetensors", "ldm", params=PARAMS)
    r = CliRunner().invoke(main, ["convert", str(src), "--to", "ldm", "--into", str(ck), "-o",
                                  str(tmp_path / "new.safetensors")])
    assert r.exit_code == 2 and "248 positions" in r.output and "--force" in r.output, r.output
    assert not (tmp_path / "new.safetensors").exists()
    r = CliRunner().invoke(main, ["convert", str(src), "--to", "ldm", "--into", str(ck), "-o",
                                  str(tmp_path / "new.safetensors"), "--force"])
    assert r.exit_code == 0, r.output
    new = read_all(tmp_path / "new.safetensors")
    assert new["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"].shape == (CONTEXT, 128)
    assert new["cond_stage_model.transformer.text_model.embeddings.position_ids"].shape == (1, CONTEXT)
