from __future__ import annotations

import json

import click

from ..options import AUTO
from . import render
from .app import EXIT_CODES, main, registry, remote_options


@main.command(epilog=EXIT_CODES)
@remote_options
@click.argument("input", type=click.Path())
@click.option("--from", "from_", default=AUTO, show_default=True, metavar="LAYOUT|auto",
              help="Input layout; auto detects it.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report (stable; fields in docs/inspect-and-verify.md).")
def inspect(input, from_, as_json):
    """Show the text encoder(s) in INPUT and what else the file holds.

    For each encoder: layout and prefix, architecture (ViT-L/14, ViT-H/14, ViT-bigG/14 or
    custom), layers, width, heads, activation, dtypes, size, projection (and whether it is an
    identity), logit_scale, and the health of position_ids. Then the rest of the checkpoint
    (UNet, VAE, EMA, unknown keys) by count and size. On .safetensors only the header and a
    few small tensors are read, and torch is not imported.

    \b
    Examples:
      sdconv inspect v1-5-pruned.safetensors
      sdconv inspect sd_xl_base_1.0.safetensors --json | jq '.encoders[].encoder'
    """
    from ..inspection import inspect as run

    report = run(input, None if from_ == AUTO else from_, registry=registry())
    click.echo(json.dumps(report, indent=2) if as_json else render.render_inspect(report))
