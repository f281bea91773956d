from __future__ import annotations

import json

import click

from . import render
from .app import EXIT_CODES, main, registry, remote_options


@main.command(epilog=EXIT_CODES)
@remote_options
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--encoder", default=None, metavar="NAME", help="Only this encoder (clip_l, clip_g, ...); default: all.")
@click.option("--from", "from_", default=None, metavar="LAYOUT", help="Input layout (default: detect it).")
@click.option("--json", "as_json", is_flag=True, help="One object per encoder (file, encoder, digest, ...), "
                                                      "and with several inputs the groups of equal encoders.")
def fingerprint(inputs, encoder, from_, as_json):
    """The exact digest of each text encoder in INPUTS, from its weights alone.

    The same weights in the same dtype give the same digest in any layout, container or file;
    any changed value gives another. With several inputs, the encoders are grouped by digest.

    \b
    Examples:
      sdconv fingerprint sd15.safetensors clip-l-hf/ ViT-L-14.pt
      sdconv fingerprint sdxl.safetensors --encoder clip_g --json
    """
    from ..fingerprint import fingerprint as run, relate

    records = [r for path in inputs for r in run(path, encoder=encoder, from_=from_, registry=registry())]
    groups = relate(records) if len(inputs) > 1 else None
    if as_json:
        click.echo(json.dumps({"encoders": records, "groups": groups} if groups is not None else records, indent=2))
    else:
        click.echo(render.render_fingerprints(records, groups))
