from __future__ import annotations

import click

from ..converters.dtypes import CASTS
from . import render
from .app import main, registry


@main.command()
@click.argument("output", type=click.Path())
@click.option("--layout", default="ldm", show_default=True, help="Layout of the sample (a single-file layout).")
@click.option("--preset", default="tiny", show_default=True,
              help="Architecture: tiny (width 128, 2 layers), vit-l-14 (SD1.x, full size), vit-h-14, vit-bigg-14.")
@click.option("--dtype", type=click.Choice(CASTS), default="fp16", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--whole-clip", is_flag=True,
              help="A whole reference CLIP (openai, open_clip or hf layout; presets tiny, vit-l-14): text tower "
                   "(the same tensors as the sample of this preset and seed), projections, vision tower.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
def sample(output, layout, preset, dtype, seed, whole_clip, force):
    """Write a synthetic checkpoint with random weights and real keys.

    Good for trying sdconv without a model download. The default is a tiny SD1.x-style LDM
    checkpoint: the text encoder under its real SD1.x keys, plus UNet and VAE stand-ins.

    \b
    Examples:
      sdconv sample sd1-tiny.safetensors
      sdconv sample sd1-full.safetensors --preset vit-l-14
      sdconv sample clip-vit-l-14.pt --layout openai --preset vit-l-14 --whole-clip
    """
    from ..samples import sample as run

    info = run(output, layout=layout, preset=preset, dtype=dtype, seed=seed, force=force,
               whole_clip=whole_clip, registry=registry())
    click.echo(render.describe_sample(output, layout, preset, seed, info))
