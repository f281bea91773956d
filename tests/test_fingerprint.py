"""Encoder fingerprints (issue 17, item 1, the exact digest): equal across every lossless layout
and container conversion of one encoder, different for a one-ulp change in any tensor or
another dtype; never read back from metadata."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from sdconv import convert, fingerprint
from sdconv.cli import main
from tests.helpers.fixtures import distinct_canonical, write_layout

LAYOUTS = ["ldm", "sgm", "sd3", "comfy", "openai", "open_clip", "hf", "diffusers"]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp")
    return write_layout(distinct_canonical(vocab=1000), d / "sd1.safetensors", "ldm")


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_the_same_digest_in_every_layout_and_container(sd1, tmp_path, fmt):
    (want,) = fingerprint(sd1)
    for to in LAYOUTS:
        out = tmp_path / (to if to in ("hf", "diffusers") else f"{to}.{'pt' if fmt == 'pt' else 'safetensors'}")
        convert(sd1, out, to=to, fmt=fmt, params={"encoder": "clip_l"})
        (got,) = fingerprint(out)
        assert got["digest"] == want["digest"], (to, fmt)
    # and from one layout to another and back
    convert(tmp_path / "hf", tmp_path / "back.safetensors", to="ldm")
    assert fingerprint(tmp_path / "back.safetensors")[0]["digest"] == want["digest"]


def test_one_ulp_anywhere_changes_it_and_so_does_the_dtype(sd1, tmp_path):
    (want,) = fingerprint(sd1)
    t = load_file(str(sd1))
    keys = [k for k in t if k.startswith("cond_stage_model.") and t[k].is_floating_point()]
    for k in (keys[0], keys[len(keys) // 2], keys[-1]):
        changed = dict(t)
        v = changed[k].clone().reshape(-1)
        v[-1] = torch.nextafter(v[-1], torch.tensor(float("inf"), dtype=v.dtype))
        changed[k] = v.reshape(t[k].shape)
        save_file(changed, str(tmp_path / "ulp.safetensors"))
        assert fingerprint(tmp_path / "ulp.safetensors")[0]["digest"] != want["digest"], k
    convert(sd1, tmp_path / "half.safetensors", to="ldm", dtype="fp16")
    assert fingerprint(tmp_path / "half.safetensors")[0]["digest"] != want["digest"]
    # the metadata does not count: a file whose metadata claims another encoder digests the same
    save_file(t, str(tmp_path / "meta.safetensors"), {"sdconv.encoders": json.dumps({"clip_l": {}}), "x": "y"})
    assert fingerprint(tmp_path / "meta.safetensors")[0]["digest"] == want["digest"]


def test_cli_json_and_groups(sd1, tmp_path):
    convert(sd1, tmp_path / "oc.safetensors", to="open_clip", params={"encoder": "clip_l"})
    convert(sd1, tmp_path / "h.safetensors", to="ldm", dtype="fp16")
    r = CliRunner().invoke(main, ["fingerprint", str(sd1), str(tmp_path / "oc.safetensors"),
                                  str(tmp_path / "h.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert [set(e) >= {"file", "encoder", "digest"} for e in doc["encoders"]] == [True] * 3
    assert [g["count"] for g in doc["groups"]] == [2, 1]
    r = CliRunner().invoke(main, ["fingerprint", str(sd1), str(tmp_path / "oc.safetensors")])
    assert r.exit_code == 0 and "1 distinct encoder(s) among 2" in r.output and "same weights:" in r.output, r.output
