"""What a consumer needs beside the weights and config to run a CLIP on text and images: the
tokenizer's files (made from the built-in CLIP vocabulary) and the image processor's config.
Closed vocabularies of formats, like configs.py, that mapping files name: an encoder slot's
`tokenizer: {folder, format}` and a whole CLIP's `vision: processor: {file, format}`."""
from __future__ import annotations

import json
from functools import lru_cache

# the special tokens of CLIP's vocabulary, as transformers' CLIP tokenizers name them
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@lru_cache(maxsize=4)
def hf_clip_tokenizer(pad_token: str, context: int) -> tuple[tuple[str, str], ...]:
    """transformers' CLIPTokenizer files: vocab.json and merges.txt (CLIP's BPE vocabulary, as
    openai/clip-vit-large-patch14 ships them), the special tokens, and the context length.
    ((file name, text), ...)."""
    from ..tokenizer import vocabulary
    pieces, merges = vocabulary("openai")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": context, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": True}
    return (("vocab.json", json.dumps({p: i for i, p in enumerate(pieces)}, ensure_ascii=False) + "\n"),
            ("merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n"),
            ("special_tokens_map.json", json.dumps(special, indent=2) + "\n"),
            ("tokenizer_config.json", json.dumps(config, indent=2) + "\n"))


def hf_clip_image(size: int, mean: tuple, std: tuple) -> str:
    """transformers' CLIPImageProcessor config: resize the short side to `size` (bicubic), crop
    the centre, scale to [0, 1], normalise with CLIP's mean and std."""
    cfg = {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
           "do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
           "do_center_crop": True, "crop_size": {"height": size, "width": size},
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": list(mean), "image_std": list(std)}
    return json.dumps(cfg, indent=2) + "\n"


# tokenizer format -> (pad token, context length) -> ((file name, text), ...)
TOKENIZER_FORMATS = {"hf_clip": hf_clip_tokenizer}
# image processor format -> (image size, mean, std) -> text
PROCESSOR_FORMATS = {"hf_clip_image": hf_clip_image}


def tokenizer_files(spec, pad_token: str | None, arch: dict, make: bool = True) -> tuple[dict, str]:
    """({path in the output: text}, a note saying what is written or why not) for an encoder
    written to a slot whose tokenizer is `spec` (None: the slot has none: ({}, "")). With
    make=False only the note (plans are made before anything is written)."""
    if spec is None:
        return {}, ""
    from ..tokenizer import VOCAB_SIZE
    where = spec.folder or "the folder's root"
    if arch.get("vocab") != VOCAB_SIZE:
        return {}, (f"no tokenizer files: the encoder has {arch.get('vocab')} token embeddings, CLIP's tokenizer "
                    f"{VOCAB_SIZE} ids (copy the model's own tokenizer into {where})")
    pad = pad_token or EOS
    files = TOKENIZER_FORMATS[spec.format](pad, arch["context"]) if make else ()
    return ({spec.folder + name: text for name, text in files},
            f"tokenizer files in {where}: CLIP's vocabulary, context {arch['context']}, pad token {pad!r}")
