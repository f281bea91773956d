"""CLIPScore with a model's own text encoder, in torchmetrics.

    sdconv convert sd15.safetensors -o sd15-clip-hf --to hf --with-vision ViT-L-14.pt
    python examples/clipscore.py sd15-clip-hf --prompt "a photo of a cat" --image cat.png

FOLDER is a whole-CLIP transformers folder as `sdconv convert --to hf --with-vision` writes it
(weights, config.json, tokenizer files, preprocessor_config.json): everything is read from it.
Needs torchmetrics and transformers, which sdconv itself does not (`pip install torchmetrics
transformers`); tested with torchmetrics 1.9.0 and transformers 5.24.0 (docs/clipscore.md).

Prompts and images are scored in pairs, in order (one image with several prompts, or one prompt
with several images, is repeated). Without --image, one synthetic image (seeded noise at the
model's input size) stands in, to try the route.

The route, and why:
- `CLIPScore(model_name_or_path=...)` takes a string only when it names one of the hub models it
  lists (openai/..., jinaai/..., zer0int/...); any other string is a ValueError. A local folder
  goes in as a callable that returns (model, processor).
- With transformers 5, `CLIPModel.get_text_features` / `get_image_features` return a model
  output (the projected features in `.pooler_output`), and torchmetrics 1.9.0 divides by
  `features.norm(...)`, an AttributeError (Lightning-AI/torchmetrics#3407, fixed by #3408 after
  1.9.0). `Features` below is the model torchmetrics is given: the same two methods, returning
  the tensors. (With transformers 4.x they are tensors already, and it passes them on.)
- The processor truncates prompts to the context (77 tokens), keeping the end-of-text token.
  Left to torchmetrics, an over-long prompt's token ids are cut after 77 with a warning and no
  end-of-text token, and the embedding is pooled at the start token instead: every over-long
  prompt then gets the same embedding.
- torchmetrics' CLIPScore is max(mean over pairs of 100 * cos(image, text), 0): the mean is
  clamped, not each pair.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


class Features(torch.nn.Module):
    """A transformers CLIPModel as torchmetrics 1.9.0 calls it: features as tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config          # torchmetrics reads text_config.max_position_embeddings

    def get_text_features(self, *args, **kwargs):
        out = self.model.get_text_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        out = self.model.get_image_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_score_metric(folder):
    """torchmetrics' CLIPScore computed with the whole CLIP in `folder` (model and processor)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load():
        model = CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()    # fp16 weights computed in fp32
        context = model.config.text_config.max_position_embeddings
        # long prompts cut as clip.tokenize(truncate=True) cuts them, end-of-text token kept
        processor = CLIPProcessor.from_pretrained(folder, truncation=True, max_length=context)
        return Features(model), processor

    return CLIPScore(model_name_or_path=load)


def import_torchvision():
    """Import torchvision (transformers' CLIP image processor and torchmetrics import it). A
    torchvision wheel built for another torch variant (as sdconv's test set-up pins: torchvision
    0.28.0 beside the CPU torch 2.13.0) fails at import, registering a compiled op that did not
    load ("operator torchvision::nms does not exist"). Then it is imported once more without
    those registrations: CLIPScore uses none of the compiled ops. Returns whether that was needed."""
    import types
    try:
        import torchvision  # noqa: F401
        return False
    except ModuleNotFoundError as e:
        if e.name == "torchvision":
            return False        # not installed: transformers then processes images without it
        raise
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torchvision  # noqa: F401,F811
    return True


def image_tensor(path):
    """An image file as a uint8 [3, H, W] tensor, the form torchmetrics takes."""
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def synthetic_image(folder, seed: int = 0):
    """Seeded noise at the model's input size (its processor's crop size): a stand-in image."""
    from transformers import CLIPImageProcessor

    crop = CLIPImageProcessor.from_pretrained(folder).crop_size
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, crop["height"], crop["width"]), dtype=torch.uint8, generator=g)


def pairs(images: list, prompts: list) -> tuple[list, list]:
    if len(images) == 1 and len(prompts) > 1:
        images = images * len(prompts)
    if len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    if len(images) != len(prompts):
        raise SystemExit(f"clipscore.py: {len(images)} images and {len(prompts)} prompts: give as many of each")
    return images, prompts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="a whole-CLIP transformers folder (sdconv convert --to hf --with-vision REF)")
    ap.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    ap.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    a = ap.parse_args(argv)
    try:
        stubbed = import_torchvision()
        import torchmetrics
        import transformers
    except ImportError as e:
        print(f"clipscore.py needs torchmetrics and transformers ({e}): pip install torchmetrics transformers",
              file=sys.stderr)
        return 2
    transformers.utils.logging.disable_progress_bar()
    lacks = [f for f in ("config.json", "preprocessor_config.json", "tokenizer_config.json")
             if not os.path.isfile(os.path.join(a.folder, f))]
    if lacks:
        print(f"clipscore.py: {a.folder} is not a scorer-ready CLIP folder: no {', '.join(lacks)} "
              "(make it with: sdconv convert CHECKPOINT -o FOLDER --to hf --with-vision REFERENCE)", file=sys.stderr)
        return 2
    missing = [p for p in a.image if not os.path.isfile(p)]
    if missing:
        print(f"clipscore.py: no such image file: {missing[0]}", file=sys.stderr)
        return 2
    if stubbed:
        print("note: torchvision's compiled ops do not match this torch; imported without them (CLIPScore "
              "uses none)", file=sys.stderr)
    if a.image:
        images, what = [image_tensor(p) for p in a.image], ", ".join(a.image)
    else:
        images = [synthetic_image(a.folder)]
        what = f"a synthetic {images[0].shape[1]}x{images[0].shape[2]} noise image"
    images, prompts = pairs(images, a.prompt)
    metric = clip_score_metric(a.folder)
    with torch.no_grad():
        metric.update(images, prompts)
        score = float(metric.compute())
        mean = float(metric.score) / int(metric.n_samples)       # the mean before the clamp at 0
    clamped = f" (the mean of 100 cos is {mean:.4f}, clamped at 0)" if mean < 0 else ""
    print(f"CLIPScore {score:.4f}: {a.folder}, {len(prompts)} pair(s), image(s): {what} "
          f"(torchmetrics {torchmetrics.__version__}, transformers {transformers.__version__}){clamped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
