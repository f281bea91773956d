"""Every folder sdconv writes is complete for its consumer: hf folders carry CLIPTokenizer files
(padded as the encoder's family ships them), diffusers folders a tokenizer/ (tokenizer_2/) beside
each text encoder as a pipeline has them, a whole CLIP in hf its image processor config, and an
open_clip whole CLIP the settings get_tokenizer and create_model_and_transforms read."""
import json
import shutil

import pytest
import torch

from sdconv import convert, make_plan, tokenize
from sdconv.tokenizer import EOT
from tests.helpers import consumers as C
from tests.helpers.clipref import reference_and_sd1
from tests.helpers.fixtures import distinct_canonical, write_layout, write_multi
from tests.helpers.prompts import PROMPTS

TOKENIZER_FILES = {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
# transformers' CLIPTokenizer (5.x: the `tokenizers` one) lowercases and splits as CLIP does but
# does not run ftfy's fix_text or unescape HTML as OpenAI clip and open_clip do: it gives other
# ids for these prompts (entities, curly quotes, mojibake, control characters, case-folding
# corners that ftfy normalises first).
TRANSFORMERS_DIFFERS = {p for p in PROMPTS if any(s in p for s in ("&amp;", "“", "Ã©", "\x00", "İstanbul"))}


def _hf_ids(tok, prompts, context=77):
    return tok(prompts, padding="max_length", max_length=context, truncation=True, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("complete")
    return {
        "sd1": write_layout(distinct_canonical(vocab=49408), d / "sd1.safetensors", "ldm"),
        "sd2": write_multi(d / "sd2.safetensors", "ldm", {"clip_h": distinct_canonical(vocab=49408)}),
        "sdxl": write_multi(d / "sdxl.safetensors", "sgm", {"clip_l": distinct_canonical(vocab=49408, seed=1),
                                                            "clip_g": distinct_canonical(vocab=49408, seed=2)}),
    }


def test_written_files_and_the_plan_says_so(tiny, tmp_path):
    r = convert(tiny["sd1"], tmp_path / "hf", to="hf")
    assert TOKENIZER_FILES <= {p.name for p in (tmp_path / "hf").iterdir()}
    assert TOKENIZER_FILES <= {p.name for p in r.files}
    assert any("tokenizer files in the folder's root" in n and "'<|endoftext|>'" in n for n in r.plan.notes)
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 77 and cfg["pad_token"] == "<|endoftext|>"
    vocab = json.loads((tmp_path / "hf" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == EOT and vocab["!"] == 0 and vocab["!!!</w>"] == 995
    # file layouts get none; neither do encoders of another vocabulary (a note says why)
    plan = make_plan(write_layout(distinct_canonical(vocab=1000), tmp_path / "v.safetensors", "ldm"), to="hf")
    assert any("no tokenizer files: the encoder has 1000 token embeddings" in n for n in plan.notes)
    convert(tmp_path / "v.safetensors", tmp_path / "v", to="hf")
    assert not TOKENIZER_FILES & {p.name for p in (tmp_path / "v").iterdir()}


@pytest.mark.oracle
def test_clip_l_folder_tokenizes_as_openai_clip_large(tiny, tmp_path):
    """Pad <|endoftext|> (49407), as openai/clip-vit-large-patch14 and SD1's tokenizer/ have it."""
    from transformers import AutoTokenizer, CLIPTokenizer
    convert(tiny["sd1"], tmp_path / "hf", to="hf")
    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (tok.pad_token, tok.pad_token_id, tok.model_max_length) == ("<|endoftext|>", EOT, 77)
    assert type(AutoTokenizer.from_pretrained(str(tmp_path / "hf"))).__name__.startswith("CLIPTokenizer")
    same = [p for p in PROMPTS if p not in TRANSFORMERS_DIFFERS]
    assert torch.equal(_hf_ids(tok, same), tokenize(same, pad="eot"))
    differs = sorted(TRANSFORMERS_DIFFERS)
    assert len(differs) == 5
    for p in differs:                                       # named above: transformers lacks ftfy and html
        assert not torch.equal(_hf_ids(tok, [p]), tokenize([p], pad="eot")), p


@pytest.mark.oracle
@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_openclip_families_pad_as_sdxl_tokenizer_2(tiny, tmp_path, kind):
    """ViT-H and bigG folders pad with "!" (id 0) as SD2's tokenizer/ and SDXL's tokenizer_2/ do:
    the ids equal open_clip's zero padding, but transformers then takes "!" as a special token,
    so a run of "!" is split into single "!"s (0 0 0) instead of CLIP's merged "!!!" (995)."""
    from transformers import CLIPTokenizer
    convert(tiny[kind], tmp_path / "hf", to="hf", encoder="clip_g" if kind == "sdxl" else None)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (tok.pad_token, tok.pad_token_id) == ("!", 0)
    same = [p for p in PROMPTS if p not in TRANSFORMERS_DIFFERS and "!" not in p]
    assert torch.equal(_hf_ids(tok, same), tokenize(same, pad="zero"))
    assert _hf_ids(tok, ["wow!!!"], 8).tolist() == [[49406, 2781, 0, 0, 0, EOT, 0, 0]]
    assert tokenize(["wow!!!"], 8).tolist() == [[49406, 2781, 995, EOT, 0, 0, 0, 0]]


@pytest.mark.oracle
def test_sdxl_diffusers_folder_has_both_tokenizers(tiny, tmp_path):
    from transformers import CLIPTokenizer
    convert(tiny["sdxl"], tmp_path / "d", to="diffusers", encoder="all")
    assert {p.name for p in (tmp_path / "d").iterdir()} >= {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}
    one = CLIPTokenizer.from_pretrained(str(tmp_path / "d"), subfolder="tokenizer")
    two = CLIPTokenizer.from_pretrained(str(tmp_path / "d"), subfolder="tokenizer_2")
    assert (one.pad_token_id, two.pad_token_id) == (EOT, 0)


@pytest.mark.oracle
def test_a_pipeline_loads_the_encoder_and_its_tokenizer_from_the_folder(tmp_path):
    """Put sdconv's text_encoder/ and tokenizer/ into a tiny SD1 pipeline folder: the pipeline
    loads both from there and encodes a prompt as the encoder does on the built-in tokenizer's ids."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel
    reference_and_sd1(tmp_path)
    convert(tmp_path / "sd1.ckpt", tmp_path / "out", to="diffusers")
    te = CLIPTextModel.from_pretrained(str(tmp_path / "out" / "text_encoder")).eval()
    C.tiny_pipeline(te).save_pretrained(str(tmp_path / "pipe"))
    for part in ("text_encoder", "tokenizer"):
        shutil.rmtree(tmp_path / "pipe" / part)
        shutil.copytree(tmp_path / "out" / part, tmp_path / "pipe" / part)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(C.PROMPT, device="cpu", num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)
        want = te(input_ids=tokenize([C.PROMPT], pad="eot")).last_hidden_state
    torch.testing.assert_close(embeds, want, atol=0, rtol=0)


@pytest.mark.oracle
def test_hf_whole_clip_loads_as_a_processor(tmp_path):
    """CLIPProcessor.from_pretrained(folder): CLIP's tokenizer, and images resized to the vision
    tower's size (32 px here: 2x2 patches of 16), centre-cropped, normalised with CLIP's mean/std."""
    from transformers import CLIPModel, CLIPProcessor
    reference_and_sd1(tmp_path)
    convert(tmp_path / "sd1.ckpt", tmp_path / "hf", to="hf", with_vision=tmp_path / "ViT-tiny.pt")
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
    proc = CLIPProcessor.from_pretrained(str(tmp_path / "hf"))
    CLIPModel.from_pretrained(str(tmp_path / "hf"))
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = proc(text=["a photo of a cat", "a dog"], images=list(img), return_tensors="pt", padding="max_length")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    torch.testing.assert_close(out["pixel_values"], (img / 255 - mean) / std, atol=1e-5, rtol=0)
    assert torch.equal(out["input_ids"], tokenize(["a photo of a cat", "a dog"], pad="eot"))
    bigger = proc(images=[torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)], return_tensors="pt")
    assert bigger["pixel_values"].shape == (1, 3, 32, 32)


@pytest.mark.oracle
def test_open_clip_whole_clip_tokenizer_and_transforms(tmp_path):
    import open_clip
    reference_and_sd1(tmp_path)
    convert(tmp_path / "sd1.ckpt", tmp_path / "oc", to="open_clip", with_vision=tmp_path / "ViT-tiny.pt")
    where = "local-dir:" + str(tmp_path / "oc")
    tok = open_clip.get_tokenizer(where)
    assert tok.context_length == 77
    assert torch.equal(tok(PROMPTS), tokenize(PROMPTS, flavor="open_clip"))
    _, _, preprocess = open_clip.create_model_and_transforms(where)
    cfg = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert cfg["mean"] == [0.48145466, 0.4578275, 0.40821073] and cfg["interpolation"] == "bicubic"
    from PIL import Image
    x = preprocess(Image.new("RGB", (64, 48), (255, 0, 0)))
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x[:, 0, 0], (torch.tensor([1.0, 0, 0]) - torch.tensor(cfg["mean"])) /
                               torch.tensor(cfg["std"]), atol=1e-5, rtol=0)


@pytest.mark.oracle
def test_a_long_context_encoder_gets_a_tokenizer_of_its_context(tmp_path):
    """A 248-position CLIP-L (Long-CLIP): model_max_length 248, so prompts past 77 tokens are kept."""
    from transformers import CLIPTokenizer
    canon = distinct_canonical(with_proj=False, with_logit_scale=False)
    canon["pos_embd.weight"] = torch.randn(248, canon["pos_embd.weight"].shape[1]) * 0.02
    src = write_layout(canon, tmp_path / "long.safetensors", "openai", params={"heads": 2, "act": "quick_gelu"})
    convert(src, tmp_path / "hf", to="hf")
    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.model_max_length == 248
    prompt = "a photo of a cat " * 30                    # 150 tokens
    ids = tok([prompt], padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, tokenize([prompt], 248, pad="eot"))
