"""--into: an encoder written back into a full checkpoint; everything else byte for byte."""
import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from tests.helpers.fixtures import distinct_canonical, read_all, write_layout, write_multi
from sdconv import UsageError, convert
from sdconv.converters.writers import write_safetensors
from sdconv.writeback import write_back

UNET = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3).half(),
        "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3),
        "model_ema.decay": torch.tensor(0.9999), "alphas_cumprod": torch.rand(10, dtype=torch.float64)}


def _hashes(path):
    """sha256 of every tensor's bytes, read without torch's help (the raw file ranges)."""
    from sdconv.converters.folders import open_source
    src = open_source(path)
    return {k: hashlib.sha256(src.raw(k)).hexdigest() for k in src.keys()}


def _ckpt(tmp_path, layout="ldm", encoders=None, meta=None):
    p = write_multi(tmp_path / "base.safetensors", layout, encoders or {"clip_l": distinct_canonical(vocab=1000)}, UNET)
    sd = read_all(p)
    write_safetensors(sd, tmp_path / "ck.safetensors", meta or {"format": "pt", "modelspec.title": "my merge"})
    return tmp_path / "ck.safetensors"


def test_replaced_encoder_and_nothing_else(tmp_path):
    ck = _ckpt(tmp_path)
    new = {k: v for k, v in distinct_canonical(vocab=1000, seed=9).items() if k not in ("text_proj.weight", "logit_scale")}
    enc = write_layout(new, tmp_path / "enc.safetensors", "openai", params={"heads": 2, "act": "quick_gelu",
                                                                            "encoder": "clip_l"})
    write_back(enc, ck, tmp_path / "new.safetensors", to="ldm")
    a, b = _hashes(ck), _hashes(tmp_path / "new.safetensors")
    assert set(a) == set(b)
    enc_keys = {k for k in a if k.startswith("cond_stage_model.")}
    assert all(a[k] == b[k] for k in a if k not in enc_keys)                       # bit-identical
    assert all(a[k] != b[k] for k in enc_keys if not k.endswith("position_ids"))   # all replaced
    with safe_open(str(ck), "pt") as f1, safe_open(str(tmp_path / "new.safetensors"), "pt") as f2:
        m1, m2 = f1.metadata(), f2.metadata()
    assert all(m2[k] == v for k, v in m1.items())                                  # metadata kept
    assert json.loads(m2["sdconv.into"])["encoders"]["clip_l"]["removed"] == 37
    # converting the replaced encoder back out gives back the encoder that was put in
    convert(tmp_path / "new.safetensors", tmp_path / "out.safetensors", to="openai")
    got, put = read_all(tmp_path / "out.safetensors"), read_all(enc)
    assert set(got) == set(put) and all(torch.equal(got[k], put[k]) for k in put)


def test_architecture_mismatch_refused(tmp_path):
    ck = _ckpt(tmp_path)
    enc = write_layout(distinct_canonical(vocab=1000, layers=3, with_proj=False, with_logit_scale=False),
                       tmp_path / "enc.safetensors", "openai",
                       params={"heads": 2, "act": "quick_gelu", "encoder": "clip_l"})
    with pytest.raises(UsageError, match="layers 2 -> 3"):
        write_back(enc, ck, tmp_path / "new.safetensors", to="ldm")
    assert not (tmp_path / "new.safetensors").exists()


def test_sdxl_one_encoder_replaced_and_refiner_prefix_kept(tmp_path):
    l, g = distinct_canonical(vocab=1000, seed=1), distinct_canonical(vocab=1000, seed=2)
    ck = _ckpt(tmp_path, "sgm", {"clip_l": l, "clip_g": g})
    g2 = write_multi(tmp_path / "g2.safetensors", "sgm", {"clip_g": distinct_canonical(vocab=1000, seed=3)})
    write_back(g2, ck, tmp_path / "new.safetensors", to="sgm", encoder="clip_g")
    a, b = _hashes(ck), _hashes(tmp_path / "new.safetensors")
    assert all(a[k] == b[k] for k in a if not k.startswith("conditioner.embedders.1."))
    assert any(a[k] != b[k] for k in a if k.startswith("conditioner.embedders.1."))
    # a refiner keeps its bigG at embedders.0.model.
    sd = {k.replace("embedders.1.", "embedders.0."): v for k, v in read_all(g2).items()}
    write_safetensors({**sd, **UNET}, tmp_path / "refiner.safetensors")
    write_back(g2, tmp_path / "refiner.safetensors", tmp_path / "refiner2.safetensors", to="sgm")
    assert all(k.startswith(("conditioner.embedders.0.model.", "model.", "model_ema.", "first_stage", "alphas")) for k in
               read_all(tmp_path / "refiner2.safetensors"))


def test_cli_into(tmp_path):
    from click.testing import CliRunner

    from sdconv.cli import main
    ck = _ckpt(tmp_path)
    enc = write_layout(distinct_canonical(vocab=1000, seed=4), tmp_path / "enc.safetensors", "openai",
                       params={"heads": 2, "act": "quick_gelu", "encoder": "clip_l"})
    r = CliRunner().invoke(main, ["convert", str(enc), "--to", "ldm", "--into", str(ck), "-o", str(tmp_path / "n.safetensors")])
    assert r.exit_code == 0 and "replaced clip_l" in r.output, r.output
    r = CliRunner().invoke(main, ["convert", str(enc), "--to", "ldm", "--into", str(ck), "-o", str(ck), "--force"])
    assert r.exit_code == 6


def test_dry_run_writes_nothing_and_says_what_it_would_replace(tmp_path):
    from click.testing import CliRunner

    from sdconv.cli import main
    ck = _ckpt(tmp_path)
    enc = write_layout({k: v for k, v in distinct_canonical(vocab=1000, seed=9).items()
                        if k not in ("text_proj.weight", "logit_scale")},
                       tmp_path / "enc.safetensors", "openai", params={"heads": 2, "act": "quick_gelu", "encoder": "clip_l"})
    before = sorted(p.name for p in tmp_path.iterdir())
    r = CliRunner().invoke(main, ["convert", str(enc), "--to", "ldm", "--into", str(ck), "-o",
                                  str(tmp_path / "new.safetensors"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "would replace clip_l" in r.output and "dry run: nothing written" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # negative control: the same command without --dry-run writes the checkpoint
    r = CliRunner().invoke(main, ["convert", str(enc), "--to", "ldm", "--into", str(ck), "-o",
                                  str(tmp_path / "new.safetensors")])
    assert r.exit_code == 0 and (tmp_path / "new.safetensors").is_file()


def test_into_with_several_inputs_is_refused(tmp_path):
    from click.testing import CliRunner

    from sdconv.cli import main
    ck = _ckpt(tmp_path)
    r = CliRunner().invoke(main, ["convert", str(ck), str(ck), "--to", "ldm", "--into", str(ck), "-o",
                                  str(tmp_path / "out") + "/"])
    assert r.exit_code == 2 and "one checkpoint" in r.output
    assert not (tmp_path / "out").exists()


def test_unsigned_tensors_of_the_checkpoint_are_copied_as_they_are(tmp_path):
    """A U16 tensor in the checkpoint used to end in a traceback (no torch dtype for it)."""
    ck = _ckpt(tmp_path)
    sd = read_all(ck)
    sd["model.diffusion_model.u16"] = torch.arange(10, dtype=torch.int64).to(torch.uint16)
    write_safetensors(sd, tmp_path / "u16.safetensors", {"format": "pt"})
    enc = tmp_path / "enc.safetensors"
    convert(tmp_path / "u16.safetensors", enc, to="openai")
    write_back(enc, tmp_path / "u16.safetensors", tmp_path / "new.safetensors", to="ldm")
    a, b = _hashes(tmp_path / "u16.safetensors"), _hashes(tmp_path / "new.safetensors")
    assert a["model.diffusion_model.u16"] == b["model.diffusion_model.u16"]
