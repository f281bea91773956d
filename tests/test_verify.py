"""`sdconv verify`: the seed experiment, done right.

A tiny OpenAI CLIP is the reference; an SD1.x checkpoint holds the same text tower. Extracting
it with the reference's projection grafted on must give the reference back: identical in
fp32, equal up to fp16 rounding when the checkpoint is stored in fp16, and a fine-tuned layer
must be pointed at."""
import json

import pytest
import torch
from click.testing import CliRunner

from clipref import reference_and_sd1
from sdconv import convert
from sdconv.cli import main
from sdconv.verification import verify


def _extract(d, tmp_path, name="clip-l.safetensors"):
    convert(d / "sd1.ckpt", tmp_path / name, to="openai", from_="ldm", projection=d / "ViT-tiny.pt")
    return tmp_path / name


def test_identical_in_fp32(tmp_path):
    reference_and_sd1(tmp_path)
    r = verify(_extract(tmp_path, tmp_path), tmp_path / "ViT-tiny.pt")
    assert r["verdict"] == "identical" and r["exit_code"] == 0 and r["max_abs"] == 0.0
    for p in r["probes"]:
        for out in ("last_hidden", "pooled", "projected"):
            assert p[out] == {"cosine": pytest.approx(1.0, abs=1e-12), "max_abs": 0.0}


def test_equal_up_to_fp16_rounding(tmp_path):
    reference_and_sd1(tmp_path, dtype=torch.float16)
    r = verify(_extract(tmp_path, tmp_path), tmp_path / "ViT-tiny.pt")
    assert r["verdict"] == "equal up to float16 rounding" and r["exit_code"] == 0
    assert r["weights"]["rounding"] == "float16" and not r["weights"]["identical"]
    assert 0 < r["max_abs"] < 1e-2                      # the figures: what fp16 rounding costs
    assert min(p["projected"]["cosine"] for p in r["probes"]) > 0.9999


def test_fine_tuned_layer_is_pointed_at(tmp_path):
    def tweak(hf):
        g = torch.Generator().manual_seed(3)
        w = hf["text_model.encoder.layers.1.mlp.fc1.weight"]
        hf["text_model.encoder.layers.1.mlp.fc1.weight"] = w + 0.01 * torch.randn(w.shape, generator=g)
    reference_and_sd1(tmp_path, tweak=tweak)
    r = verify(_extract(tmp_path, tmp_path), tmp_path / "ViT-tiny.pt")
    assert r["verdict"] == "different weights" and r["exit_code"] == 1
    parts = sorted(r["weights"]["parts"], key=lambda p: -p["relative_drift"])
    assert parts[0]["part"] == "block 1" and parts[0]["relative_drift"] > 1e-3
    assert all(p["relative_drift"] == 0 for p in parts[1:])


def test_different_activation_is_a_difference(tmp_path):
    reference_and_sd1(tmp_path)
    r = verify(_extract(tmp_path, tmp_path), tmp_path / "ViT-tiny.pt", params_b={"act": "gelu"})
    assert r["verdict"].startswith("different settings") and r["exit_code"] == 1 and r["max_abs"] > 1e-4


def test_cli_text_json_and_exit_codes(tmp_path):
    reference_and_sd1(tmp_path)
    out = _extract(tmp_path, tmp_path)
    res = CliRunner().invoke(main, ["verify", str(out), str(tmp_path / "ViT-tiny.pt")])
    assert res.exit_code == 0 and "verdict: identical" in res.output and "short_pad0" in res.output
    res = CliRunner().invoke(main, ["verify", str(out), str(tmp_path / "ViT-tiny.pt"), "--json"])
    rep = json.loads(res.output)
    assert rep["verdict"] == "identical" and len(rep["probes"]) == 6
    res = CliRunner().invoke(main, ["verify", str(out), str(tmp_path / "ViT-tiny.pt"), "--param-b", "act=gelu"])
    assert res.exit_code == 1 and "different settings" in res.output


def test_prompts_with_a_tokenizer(tmp_path):
    import consumers as C
    reference_and_sd1(tmp_path)
    tok_dir = tmp_path / "tok"
    C.clip_tokenizer().save_pretrained(tok_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nan astronaut riding a horse, oil painting\n")
    res = CliRunner().invoke(main, ["verify", str(_extract(tmp_path, tmp_path)), str(tmp_path / "ViT-tiny.pt"),
                                    "--prompts", str(prompts), "--tokenizer", str(tok_dir), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert [p["name"] for p in rep["probes"] if p["kind"] == "prompt"] == ["a photo of a cat",
                                                                           "an astronaut riding a horse, oil painting"]


def test_verify_reports_synthetic_weights(tmp_path):
    from fixtures import distinct_canonical, write_layout
    canon = distinct_canonical(vocab=1000)
    fake = dict(canon, **{"text_proj.weight": torch.eye(128)})
    a = write_layout(canon, tmp_path / "a.safetensors", "comfy")
    b = write_layout(fake, tmp_path / "b.safetensors", "comfy")
    r = verify(a, b)
    assert r["a"]["synthetic"] == [] and "identity" in r["b"]["synthetic"][0]
    assert r["verdict"] == "different weights" and r["exit_code"] == 1
