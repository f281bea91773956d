"""Repairs with an audit trail: position_ids, NAI keys; the provenance ledger of every tensor."""
import json

import torch
from click.testing import CliRunner
from safetensors import safe_open

from fixtures import distinct_canonical, read_all, write_layout, write_multi
from sdconv import convert
from sdconv.cli import main
from sdconv.converters.writers import write_safetensors
from sdconv.inspection import inspect

PID = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def _sd1(tmp_path, pid=None, nai=False):
    sd = read_all(write_multi(tmp_path / "good.safetensors", "ldm", {"clip_l": distinct_canonical(vocab=1000)}))
    if pid is not None:
        sd[PID] = pid
    if nai:
        sd = {k.replace("transformer.text_model.", "transformer."): v for k, v in sd.items()}
    p = tmp_path / "sd1.safetensors"
    write_safetensors(sd, p)
    return p


def _ledger(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["sdconv.ledger"])


def _drifted():
    ids = torch.arange(77, dtype=torch.float32)[None]
    ids[0, 76] = 75.9999
    ids[0, 5] = 4.9999
    return ids


def test_drifted_warns_and_fix_records_the_repair(tmp_path):
    src = _sd1(tmp_path, _drifted())
    assert inspect(src)["encoders"][0]["position_ids"]["status"] == "drifted"
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "a.safetensors"), "--to", "ldm"])
    assert r.exit_code == 0 and "warning: position_ids drifted" in r.output and "--fix-position-ids" in r.output
    out = read_all(tmp_path / "a.safetensors")
    assert out[PID].dtype == torch.int64 and torch.equal(out[PID], torch.arange(77)[None])
    assert _ledger(tmp_path / "a.safetensors")["tensors"][PID]["origin"] == "synthesized"
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "b.safetensors"), "--to", "ldm",
                                  "--fix-position-ids"])
    assert r.exit_code == 0 and "repaired: position_ids: drifted" in r.output
    led = _ledger(tmp_path / "b.safetensors")
    assert led["tensors"][PID]["origin"] == "repaired" and "wrong at [5, 76]" in led["tensors"][PID]["why"]
    assert any("drifted" in x for x in led["repairs"])
    assert inspect(tmp_path / "b.safetensors")["ledger"]["repairs"]


def test_corrupt_refused_without_fix(tmp_path):
    src = _sd1(tmp_path, torch.arange(77, dtype=torch.float32)[None] * 0.583)
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "a.safetensors"), "--to", "ldm"])
    assert r.exit_code == 3 and "corrupt" in r.output and not (tmp_path / "a.safetensors").exists()
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "a.safetensors"), "--to", "ldm",
                                  "--fix-position-ids"])
    assert r.exit_code == 0
    assert torch.equal(read_all(tmp_path / "a.safetensors")[PID], torch.arange(77)[None])
    assert _ledger(tmp_path / "a.safetensors")["tensors"][PID]["origin"] == "repaired"


def test_nai_keys_repair_is_recorded(tmp_path):
    src = _sd1(tmp_path, nai=True)
    r = convert(src, tmp_path / "a.safetensors", to="ldm")
    assert r.plan.encoders[0].repairs and "NAI-era" in r.plan.encoders[0].repairs[0]
    led = _ledger(tmp_path / "a.safetensors")
    entry = led["tensors"]["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    assert entry == {"origin": "checkpoint", "source": ["cond_stage_model.transformer.final_layer_norm.weight"],
                     "transform": "rename", "repaired": "NAI-era key without text_model."}


def test_ledger_covers_every_tensor(tmp_path):
    canon = distinct_canonical(vocab=1000)
    ref = write_layout(canon, tmp_path / "ref.safetensors", "openai")
    src = _sd1(tmp_path)
    convert(src, tmp_path / "a.safetensors", to="openai", projection=ref)
    led = _ledger(tmp_path / "a.safetensors")["tensors"]
    assert set(led) == set(read_all(tmp_path / "a.safetensors"))
    assert led["text_projection"]["origin"] == "grafted" and led["text_projection"]["key"] == "text_projection"
    assert led["transformer.resblocks.0.attn.in_proj_weight"] == {
        "origin": "checkpoint", "transform": "inverse of split_qkv",
        "source": [f"cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.{x}_proj.weight" for x in "qkv"]}


def test_sidecars_for_pt_and_folders(tmp_path):
    src = _sd1(tmp_path, _drifted())
    convert(src, tmp_path / "a.pt", to="ldm", fix_position_ids=True)
    side = json.loads((tmp_path / "a.pt.sdconv.json").read_text())
    assert side["ledger"]["tensors"][PID]["origin"] == "repaired" and side["source"] == "sd1.safetensors"
    convert(src, tmp_path / "h", to="hf", fix_position_ids=True)
    side = json.loads((tmp_path / "h" / "sdconv.json").read_text())
    assert side["ledger"]["repairs"] and inspect(tmp_path / "a.pt")["ledger"]["repairs"]
    # an existing sidecar is not overwritten without --force
    (tmp_path / "b.pt.sdconv.json").write_text("{}")
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "b.pt"), "--to", "ldm"])
    assert r.exit_code == 6 and not (tmp_path / "b.pt").exists()
