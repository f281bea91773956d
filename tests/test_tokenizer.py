"""The built-in CLIP tokenizer gives exactly the ids of OpenAI clip's `clip.tokenize` and open_clip's
tokenizer, in both padding conventions, and its vocabulary is installed package data."""
import gzip
import hashlib
import json
from importlib import resources

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdconv import SdconvError, Tokenizer, UsageError, tokenize
from sdconv.tokenizer import EOT, SOT, VOCAB_FILE, VOCAB_SIZE, encode, get_tokenizer
from tests.helpers.prompts import PROMPTS, SPECIAL



@pytest.fixture(scope="module")
def oracles():
    import clip
    import open_clip
    return clip.tokenize, open_clip.get_tokenizer("ViT-L-14")


def _padded_with_eot(rows):
    out = rows.clone()
    for row in out:
        end = int(row.nonzero()[-1])                       # the row's end-of-text: its last id not 0
        row[end + 1:] = EOT
    return out


@pytest.mark.oracle
@pytest.mark.parametrize("context", [77, 16, 248])
def test_the_ids_of_openai_clip_and_open_clip(oracles, context):
    import torch
    clip_tokenize, oc = oracles
    ours = tokenize(PROMPTS, context)
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), context)
    assert torch.equal(ours, clip_tokenize(PROMPTS, context, truncate=True))
    assert torch.equal(tokenize(PROMPTS, context, flavor="open_clip"), oc(PROMPTS, context))
    same = [i for i, p in enumerate(PROMPTS) if p not in SPECIAL]
    assert torch.equal(ours[same], oc(PROMPTS, context)[same])       # the flavours differ on special-token text only
    special = [i for i, p in enumerate(PROMPTS) if p in SPECIAL]
    assert not torch.equal(ours[special], oc(PROMPTS, context)[special])
    # transformers' convention: end-of-text after the end, not 0
    assert torch.equal(tokenize(PROMPTS, context, pad="eot"), _padded_with_eot(ours))


@pytest.mark.oracle
def test_encode_and_decode_as_openai_clip():
    from clip.simple_tokenizer import SimpleTokenizer
    ref = SimpleTokenizer()
    tok = get_tokenizer()
    for p in PROMPTS:
        assert encode(p) == ref.encode(p), p
        assert tok.decode(tok.encode(p)) == ref.decode(ref.encode(p))


def test_truncation_keeps_end_of_text_and_padding():
    rows = tokenize(["word " * 100, "a cat", ""], 77)
    assert rows[0, 0] == SOT and rows[0, -1] == EOT and int((rows[0] == EOT).sum()) == 1
    assert rows[1, :4].tolist() == [SOT, 320, 2368, EOT] and rows[1, 4:].eq(0).all()
    assert rows[2, :2].tolist() == [SOT, EOT] and rows[2, 2:].eq(0).all()
    assert tokenize("a cat", 8, pad="eot")[0].tolist() == [SOT, 320, 2368] + [EOT] * 5
    exact = "word " * 75                                  # start + 75 + end = 77: fits, not cut
    assert tokenize(exact, truncate=False)[0, -1] == EOT
    with pytest.raises(UsageError, match="too long"):
        tokenize(exact + "word", truncate=False)
    assert tokenize([]).shape == (0, 77)
    assert Tokenizer().rows("a cat", 5) == [[SOT, 320, 2368, EOT, 0]]


@pytest.mark.parametrize("bad", [dict(pad="left"), dict(flavor="hf"), dict(context_length=1), dict(context_length="77")])
def test_bad_arguments_are_usage_errors(bad):
    with pytest.raises(UsageError) as e:
        tokenize("a cat", **bad)
    assert e.value.hint or "context_length" in e.value.message
    with pytest.raises(SdconvError, match="must be a string"):
        tokenize([b"bytes"])


@pytest.mark.oracle
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(st.text(max_size=120) | st.text(alphabet=st.sampled_from(" \t\n&;!?.'amp#lt<>|é東🐱Ã©â€"),
                                                   max_size=60), min_size=1, max_size=4))
def test_random_unicode_as_openai_clip_and_open_clip(texts):
    import clip
    import open_clip
    import torch
    try:
        want = clip.tokenize(texts, 77, truncate=True)
    except Exception as e:                              # whatever clip refuses, sdconv refuses too
        with pytest.raises(type(e)):
            tokenize(texts)
        return
    assert torch.equal(tokenize(texts), want), texts
    assert torch.equal(tokenize(texts, flavor="open_clip"), open_clip.tokenize(texts)), texts


def test_the_vocabulary_is_installed_package_data():
    files = resources.files("sdconv.tokenizer")
    data = files.joinpath(VOCAB_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert gzip.decompress(data).decode("utf-8").startswith("\"bpe_simple_vocab_16e6.txt#version: 0.2\ni n\n")
    notice = files.joinpath("NOTICE").read_text(encoding="utf-8")
    assert "github.com/openai/CLIP" in notice and "MIT License" in notice and hashlib.sha256(data).hexdigest() in notice
    from pathlib import Path
    import tomllib
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert set(pyproject["tool"]["setuptools"]["package-data"]["sdconv.tokenizer"]) == {VOCAB_FILE, "NOTICE"}
    assert {"ftfy", "regex"} <= {d.split(">")[0].split("=")[0] for d in pyproject["project"]["dependencies"]}
    tok = Tokenizer()
    assert tok.encode("<|startoftext|><|endoftext|>") == [SOT, EOT] == [VOCAB_SIZE - 2, VOCAB_SIZE - 1]


@pytest.mark.oracle
def test_verify_prompts_without_a_tokenizer_folder(tmp_path):
    from tests.helpers.clipref import reference_and_sd1
    from sdconv import convert
    from sdconv.cli import main
    reference_and_sd1(tmp_path)
    out = tmp_path / "clip-l.safetensors"
    convert(tmp_path / "sd1.ckpt", out, to="openai", from_="ldm", projection=tmp_path / "ViT-tiny.pt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nCafé &amp; 東京 🐱!!!\n" + "word " * 100 + "\n", encoding="utf-8")
    res = CliRunner().invoke(main, ["verify", str(out), str(tmp_path / "ViT-tiny.pt"), "--prompts", str(prompts),
                                    "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["tokenizer"] == "built-in" and rep["verdict"] == "identical"
    rows = [p for p in rep["probes"] if p["kind"] == "prompt"]
    assert [p["name"] for p in rows] == ["a photo of a cat", "Café &amp; 東京 🐱!!!", ("word " * 100).strip()]
    assert all(p["last_hidden"]["max_abs"] == 0.0 for p in rows)


def test_verify_prompts_refuses_another_vocabulary(tmp_path):
    from tests.helpers.fixtures import distinct_canonical, write_layout
    from sdconv.verification import verify
    a = write_layout(distinct_canonical(vocab=1000), tmp_path / "a.safetensors", "comfy")
    with pytest.raises(UsageError, match="49408-token vocabulary") as e:
        verify(a, a, prompts=["a cat"])
    assert "--tokenizer" in e.value.hint
