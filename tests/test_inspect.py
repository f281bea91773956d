"""`sdconv inspect`: the right encoders, kinds and position_ids health, from headers alone."""
import json
import struct
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from fixtures import (distinct_canonical, holdable, read_all, realkeys, sparse_safetensors, target_slot, write_layout,
                      write_multi)
from sdconv.cli import main
from sdconv.converters.writers import write_safetensors
from sdconv.inspection import inspect
from sdconv.converters.synthetic import position_ids_health

UNET = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3, dtype=torch.float16),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3, dtype=torch.float16),
        "model_ema.decay": torch.tensor(0.9999), "embedding_manager.embedder.x": torch.zeros(3)}


def _canon(**kw):
    return distinct_canonical(vocab=1000, **kw)


def _one(report):
    (e,) = report["encoders"]
    return e


def _kinds(report):
    return {e["encoder"]: e for e in report["encoders"]}


def test_sd1_ldm(tmp_path):
    p = write_multi(tmp_path / "sd1.safetensors", "ldm", {"clip_l": _canon()}, UNET)
    r = inspect(p)
    e = _one(r)
    assert r["layout"] == "ldm" and e["encoder"] == "clip_l" and e["prefix"] == "cond_stage_model.transformer."
    assert (e["width"], e["layers"], e["heads"], e["act"], e["architecture"]) == (128, 2, 2, "quick_gelu", "custom")
    assert e["projection"] == {"present": False} and e["logit_scale"] is None
    assert e["position_ids"]["status"] == "exact"
    comps = r["components"]
    assert comps["unet"]["tensors"] == 1 and comps["vae"]["tensors"] == 1 and comps["ema"]["tensors"] == 1
    assert comps["textual_inversion"]["tensors"] == 1 and "unknown" not in comps


@pytest.mark.parametrize("layers", [3, 2])
def test_sd2_ldm(tmp_path, layers):
    p = write_multi(tmp_path / "sd2.safetensors", "ldm", {"clip_h": _canon(layers=layers)}, UNET)
    e = _one(inspect(p))
    assert e["encoder"] == "clip_h" and e["prefix"] == "cond_stage_model.model." and e["layers"] == layers
    assert e["act"] == "gelu" and e["projection"]["present"] and e["logit_scale"] is not None
    assert e["position_ids"]["status"] == "absent"


def test_sdxl_base_and_refiner(tmp_path):
    base = write_multi(tmp_path / "xl.safetensors", "sgm", {"clip_l": _canon(), "clip_g": _canon(seed=1)}, UNET)
    k = _kinds(inspect(base))
    assert set(k) == {"clip_l", "clip_g"}
    assert k["clip_l"]["prefix"] == "conditioner.embedders.0.transformer."
    assert k["clip_g"]["prefix"] == "conditioner.embedders.1.model." and k["clip_g"]["act"] == "gelu"
    assert k["clip_g"]["projection"]["present"] and not k["clip_l"]["projection"]["present"]
    # a refiner: bigG alone, at embedders.0.model.
    g = read_all(write_multi(tmp_path / "g.safetensors", "sgm", {"clip_g": _canon(seed=1)}))
    ref = {k.replace("embedders.1.", "embedders.0."): v for k, v in g.items()}
    write_safetensors({**ref, **UNET}, tmp_path / "refiner.safetensors")
    r = inspect(tmp_path / "refiner.safetensors")
    e = _one(r)
    assert r["layout"] == "sgm" and e["prefix"] == "conditioner.embedders.0.model."
    assert any("clip_g or clip_h" in n for n in e["notes"])       # tiny: width cannot tell them apart


def test_sd3_and_diffusers_sdxl(tmp_path):
    k = _kinds(inspect(write_multi(tmp_path / "sd3.safetensors", "sd3", {"clip_l": _canon(), "clip_g": _canon(seed=1)})))
    assert set(k) == {"clip_l", "clip_g"} and k["clip_g"]["prefix"] == "text_encoders.clip_g.transformer."
    k = _kinds(inspect(write_multi(tmp_path / "pipe", "diffusers", {"clip_l": _canon(), "clip_g": _canon(seed=1)})))
    assert set(k) == {"clip_l", "clip_g"} and k["clip_g"]["prefix"] == "text_encoder_2/"


def test_comfy_new_and_old(tmp_path):
    canon = _canon()
    canon["text_proj.weight"] = torch.eye(128)
    new = write_layout(canon, tmp_path / "clip_l.safetensors", "comfy")
    r = inspect(new)
    e = _one(r)
    assert r["layout"] == "comfy" and e["projection"]["looks_like"] == "identity"
    assert e["logit_scale"] == pytest.approx(float(canon["logit_scale"]))
    old = read_all(new)
    old["text_projection"] = old.pop("text_projection.weight").T.contiguous() * 2
    write_safetensors(old, tmp_path / "old.safetensors")
    r = inspect(tmp_path / "old.safetensors")
    e = _one(r)
    assert r["layout"] == "comfy" and e["projection"]["key"] == "text_projection"
    assert e["projection"]["looks_like"] == "trained"
    assert any("older spelling" in n for n in e["notes"])


def _with_position_ids(tmp_path, values):
    p = write_multi(tmp_path / "sd1.safetensors", "ldm", {"clip_l": _canon()})
    sd = read_all(p)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = values
    write_safetensors(sd, tmp_path / "pid.safetensors")
    return _one(inspect(tmp_path / "pid.safetensors"))["position_ids"]


def test_position_ids_health(tmp_path):
    ar = torch.arange(77).reshape(1, 77)
    assert _with_position_ids(tmp_path, ar)["status"] == "exact"
    drift = ar.float()
    drift[0, 5] = 4.9999
    drift[0, 76] = 75.99995
    h = _with_position_ids(tmp_path, drift)
    assert h["status"] == "drifted" and h["bad_indices"] == [5, 76] and h["dtype"] == "F32"
    merged = (ar.float() * 0.583)                       # a merge that multiplied the buffer
    h = _with_position_ids(tmp_path, merged)
    assert h["status"] == "corrupt" and h["bad_indices"][:3] == [2, 3, 4]     # round(0.583) is 1: right
    swapped = ar.clone()
    swapped[0, [3, 4]] = swapped[0, [4, 3]]
    assert _with_position_ids(tmp_path, swapped) == {
        "key": "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "status": "corrupt", "dtype": "I64", "bad_indices": [3, 4]}
    assert position_ids_health(struct.pack("<3e", 0.0, 1.0, 2.0), "F16", 3)["status"] == "drifted"


def test_full_size_real_keys_from_header_alone(tmp_path):
    """Real SDXL key names and shapes, 6.8 GB on paper: only the header and small tensors read."""
    keys = {**realkeys("CLIP-v1-SD.txt", "conditioner.embedders.0.transformer.text_model."),
            **realkeys("CLIP-XL-SD.txt", "conditioner.embedders.1.model."),
            "model.diffusion_model.stand_in": ([2_567_463_684], "F16")}
    p = sparse_safetensors(tmp_path / "xl.safetensors", keys, {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": struct.pack("<77q", *range(77)),
        "conditioner.embedders.1.model.logit_scale": struct.pack("<e", 4.6055)})
    k = _kinds(inspect(p))
    l, g = k["clip_l"], k["clip_g"]
    assert (l["architecture"], l["layers"], l["heads"], l["act"], l["parameters"]) == ("ViT-L/14", 12, 12, "quick_gelu",
                                                                                       123_060_480)
    assert (g["architecture"], g["layers"], g["heads"], g["act"]) == ("ViT-bigG/14", 32, 20, "gelu")
    assert g["parameters"] == 694_659_840 + 1 and g["projection"]["dim"] == 1280
    assert g["logit_scale"] == pytest.approx(4.6055, abs=1e-3) and l["position_ids"]["status"] == "exact"
    sd2 = sparse_safetensors(tmp_path / "sd2wd.safetensors", realkeys("CLIP-v2-WD.txt", "cond_stage_model.model."))
    e = _one(inspect(sd2))
    assert (e["encoder"], e["architecture"], e["layers"], e["heads"]) == ("clip_h", "ViT-H/14", 23, 16)
    assert e["absent_last_blocks"] == 1 and any("24 blocks" in n for n in e["notes"])


def test_cli_json_and_text(tmp_path):
    p = write_multi(tmp_path / "xl.safetensors", "sgm", {"clip_l": _canon(), "clip_g": _canon(seed=1)}, UNET)
    r = CliRunner().invoke(main, ["inspect", str(p), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["inspect_version"] == 1 and [e["encoder"] for e in rep["encoders"]] == ["clip_l", "clip_g"]
    r = CliRunner().invoke(main, ["inspect", str(p)])
    assert r.exit_code == 0 and "encoder clip_g" in r.output and "unet: 1 tensors" in r.output


def test_inspect_does_not_import_torch(tmp_path):
    p = write_multi(tmp_path / "xl.safetensors", "sgm", {"clip_l": _canon(), "clip_g": _canon(seed=1)}, UNET)
    code = f"""
import sys
from sdconv.cli import main
try:
    main(['inspect', {str(p)!r}, '--json'])
except SystemExit as e:
    assert not e.code, e.code
assert 'torch' not in sys.modules, 'torch was imported'
assert 'safetensors' not in sys.modules, 'safetensors was imported'
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"clip_g"' in r.stdout
