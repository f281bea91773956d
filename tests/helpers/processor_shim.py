"""TEMPORARY SHIM (issue 14): the tokenizer and image-processor files of a whole-CLIP hf folder.

`sdconv convert --to hf --with-vision REF` is to write these itself (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json, preprocessor_config.json), so that
`CLIPProcessor.from_pretrained(folder)` needs nothing else; that change is being made on main.
Until it lands, the CLIPScore tests (tests/test_clipscore.py) add the files with this module,
and the tests otherwise read the folder alone, as the final product will be read.

Once convert writes them: delete this module and every call of `add_processor_files`
(`grep -rn processor_shim tests`). Meanwhile, a folder that already holds all of the files is
left as it is (so the tests then check sdconv's own files), and one that holds only some of them
is an error.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from sdconv.tokenizer import MERGES, byte_symbols, vocab_bytes

FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json")
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def add_processor_files(folder) -> bool:
    """Write CLIP's tokenizer (sdconv's vocabulary; transformers' `<|endoftext|>` padding) and
    CLIP's image processor (OpenAI mean/std, bicubic resize of the shorter side, centre crop, at
    the vision tower's image size) into `folder`. Returns False if the folder had them already."""
    folder = Path(folder)
    have = [f for f in FILES if (folder / f).exists()]
    if len(have) == len(FILES):
        return False
    assert not have, f"{folder} holds only some of the processor files: {have}"
    merges = gzip.decompress(vocab_bytes()).decode("utf-8").split("\n")[1:MERGES + 1]
    symbols = list(byte_symbols().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                              "model_max_length": 77, **special}))
    size = json.loads((folder / "config.json").read_text())["vision_config"]["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": OPENAI_MEAN, "image_std": OPENAI_STD,
        "do_convert_rgb": True}))
    return True
