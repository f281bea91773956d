"""Placeholder weights as users meet them (issue 13): kohya's int64 logit_scale, ComfyUI
CLIPSave's uninitialised CLIP-L projection, an all-ones projection or a copied block. Each is
named; what was never a weight is not written; what is carried is said; scoring outputs refuse."""
import json

import torch
from click.testing import CliRunner
from safetensors import safe_open

from sdconv.cli import main
from sdconv.converters.writers import write_safetensors
from tests.helpers.fixtures import distinct_canonical, read_all, write_layout


def _run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys()), f.metadata()


def _sd2_kohya(tmp_path):
    """An SD2 (ViT-H-style) ldm file as kohya saves it: logit_scale an int64 1."""
    p = write_layout(distinct_canonical(vocab=1000), tmp_path / "enc.safetensors", "ldm",
                     params={"heads": 2, "act": "gelu", "encoder": "clip_h"})
    sd = read_all(p)
    sd["cond_stage_model.model.logit_scale"] = torch.tensor(1, dtype=torch.int64)
    sd["model.diffusion_model.out.0.weight"] = torch.zeros(4)
    write_safetensors(sd, tmp_path / "kohya-sd2.safetensors", {"format": "pt"})
    return tmp_path / "kohya-sd2.safetensors"


def test_kohya_int64_logit_scale_is_a_placeholder_not_a_damaged_file(tmp_path):
    src = _sd2_kohya(tmp_path)
    out = tmp_path / "o.safetensors"
    code, text = _run("convert", src, "-o", out, "--to", "openai", "--param", "encoder=clip_h")
    assert code == 0, text
    assert "sdconv: warning: cond_stage_model.model.logit_scale holds the I64 value 1, not a float: a placeholder, " \
           "not written" in text
    keys, meta = _keys(out)
    assert "logit_scale" not in keys and "text_projection" in keys
    assert any("logit_scale" in w for w in json.loads(meta["sdconv.ledger"])["warnings"])
    code, text = _run("convert", src, "-o", tmp_path / "s.safetensors", "--to", "openai", "--param", "encoder=clip_h",
                      "--strict")
    assert code == 3 and "--strict" in text and not (tmp_path / "s.safetensors").exists()


def _uninitialised(shape, seed=0):
    """What torch.empty hands out when the memory held something else: every magnitude at once
    (here without NaN, so that it could be written on request)."""
    g = torch.Generator().manual_seed(seed)
    exp = torch.randint(-38, 37, shape, generator=g).double()
    sign = torch.randint(0, 2, shape, generator=g).double() * 2 - 1
    return (sign * torch.pow(10.0, exp)).float()


def _clipsave(tmp_path, proj):
    canon = distinct_canonical(vocab=1000, with_logit_scale=False)
    canon["text_proj.weight"] = proj
    return write_layout(canon, tmp_path / "clip_l.safetensors", "comfy",
                        params={"heads": 2, "act": "quick_gelu", "encoder": "clip_l"})


def test_clipsave_uninitialised_projection_is_named_and_not_written(tmp_path):
    src = _clipsave(tmp_path, _uninitialised((128, 128)))
    code, text = _run("inspect", src, "--json")
    assert code == 0, text
    enc = json.loads(text)["encoders"][0]
    assert enc["projection"]["looks_like"] == "uninitialised"
    assert any("uninitialised memory" in s for s in enc["synthetic"])
    out = tmp_path / "o.safetensors"
    code, text = _run("convert", src, "-o", out, "--to", "openai")
    assert code == 0 and "uninitialised memory" in text and "not written" in text, text
    assert "text_projection" not in _keys(out)[0]
    code, text = _run("convert", src, "-o", tmp_path / "a.safetensors", "--to", "openai", "--allow-synthetic")
    assert code == 0 and "written as it is" in text, text
    assert "text_projection" in _keys(tmp_path / "a.safetensors")[0]


def test_a_trained_projection_is_left_alone(tmp_path):
    """Negative control: a projection of one scale is trained; it is written without a word."""
    src = _clipsave(tmp_path, torch.randn(128, 128, generator=torch.Generator().manual_seed(3)) * 0.02)
    code, text = _run("convert", src, "-o", tmp_path / "o.safetensors", "--to", "openai")
    assert code == 0 and "warning" not in text, text
    assert "text_projection" in _keys(tmp_path / "o.safetensors")[0]


def test_carried_placeholders_are_said_and_scoring_outputs_refuse_them(tmp_path):
    canon = distinct_canonical(vocab=1000)
    canon["text_proj.weight"] = torch.ones(128, 128)
    for k in [k for k in canon if k.startswith("blk.1.")]:           # block 1 a copy of block 0
        canon[k] = canon[k.replace("blk.1.", "blk.0.")].clone()
    src = write_layout(canon, tmp_path / "ones.safetensors", "openai")
    code, text = _run("convert", src, "-o", tmp_path / "o", "--to", "hf")
    assert code == 0, text
    assert "all ones: a placeholder" in text and "block 1 repeats block 0" in text and "written as it is" in text
    ledger = json.loads(_keys(tmp_path / "o" / "model.safetensors")[1]["sdconv.ledger"])
    assert any("block 1 repeats block 0" in w for w in ledger["warnings"])
    ref = write_layout(distinct_canonical(vocab=1000, seed=4), tmp_path / "ref.safetensors", "openai")
    code, text = _run("convert", src, "-o", tmp_path / "s.safetensors", "--to", "openai", "--projection", ref,
                      "--replace-projection")
    assert code == 3 and "block 1 repeats block 0" in text and "--allow-synthetic" in text, text
    assert not (tmp_path / "s.safetensors").exists()
    code, text = _run("convert", src, "-o", tmp_path / "s.safetensors", "--to", "openai", "--projection", ref,
                      "--replace-projection", "--allow-synthetic")
    assert code == 0, text


def test_position_ids_that_are_nan_inf_or_unsigned_are_one_line(tmp_path):
    """NaN, Inf or U32 position_ids used to end in a traceback: they are classified like any
    other (corrupt: refused without --fix-position-ids; repaired with it)."""
    base = write_layout(distinct_canonical(vocab=1000), tmp_path / "b.safetensors", "ldm",
                        params={"heads": 2, "act": "quick_gelu", "encoder": "clip_l"})
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    cases = {"nan": torch.full((1, 77), float("nan")), "inf": torch.full((1, 77), float("inf")),
             "u32": torch.arange(77, dtype=torch.int64).to(torch.uint32)[None]}
    for name, pid in cases.items():
        sd = read_all(base)
        sd[key] = pid
        src = tmp_path / f"{name}.safetensors"
        write_safetensors(sd, src, {"format": "pt"})
        code, text = _run("inspect", src)
        assert code == 0 and "Traceback" not in text, (name, text)
        code, text = _run("convert", src, "-o", tmp_path / f"{name}-o.safetensors", "--to", "openai",
                          "--fix-position-ids")
        assert code == 0 and "Traceback" not in text, (name, text)
