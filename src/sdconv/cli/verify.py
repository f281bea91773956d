from __future__ import annotations

import json
import sys

import click

from . import render
from .app import EXIT_CODES, main, parse_params, registry, remote_options


@main.command(epilog=EXIT_CODES)
@remote_options
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--encoder", default=None, metavar="NAME", help="Which encoder, when a file holds several.")
@click.option("--from-a", default=None, metavar="LAYOUT", help="Layout of A (default: detect).")
@click.option("--from-b", default=None, metavar="LAYOUT", help="Layout of B (default: detect).")
@click.option("--param-a", multiple=True, metavar="NAME=VALUE", help="heads=N / act=... / encoder=... for A.")
@click.option("--param-b", multiple=True, metavar="NAME=VALUE", help="heads=N / act=... / encoder=... for B.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A text file, one prompt a line, to run besides the built-in probes "
                   "(tokenized by the built-in CLIP tokenizer, or --tokenizer).")
@click.option("--tokenizer", type=click.Path(exists=True), default=None,
              help="Tokenize --prompts with this transformers CLIP tokenizer folder (vocab.json + "
                   "merges.txt) instead of the built-in one; needs the transformers package.")
@click.option("--lora-a", multiple=True, metavar="FILE[:SCALE]", help="Merge this LoRA into A first; repeatable.")
@click.option("--lora-b", multiple=True, metavar="FILE[:SCALE]", help="Merge this LoRA into B first; repeatable.")
@click.option("--lora-from", default=None, metavar="FORMAT", help="The LoRAs' format (default: detect it).")
@click.option("--atol", type=float, default=1e-5, show_default=True,
              help="Largest output difference accepted when the weights differ.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def verify(a, b, encoder, from_a, from_b, param_a, param_b, prompts, tokenizer, lora_a, lora_b, lora_from, atol,
           as_json):
    """Compare two text encoders numerically: are A and B the same model?

    Both run through sdconv's reference CLIP forward pass (plain torch, fp32) on fixed probe
    sequences (end-of-text early, mid-way and last; both padding conventions). Reports, per
    probe, cosine and max-abs of the last hidden state, pooled and projected outputs, and a
    verdict: identical; equal up to a dtype's rounding (fp16, bf16); or different weights,
    with the relative drift of each block so a fine-tuned layer stands out.

    Exit 0 when identical, equal up to rounding, or within --atol; 1 otherwise.

    \b
    Examples:
      sdconv verify clip-l.safetensors ViT-L-14.pt
      sdconv verify sd15.safetensors sd15-finetuned.safetensors --json
      sdconv verify xl.safetensors xl-merge.safetensors --encoder clip_g
      sdconv verify clip-l.safetensors ViT-L-14.pt --prompts prompts.txt
      sdconv verify sd15.safetensors sd15.safetensors --lora-b style.safetensors   (a LoRA's effect, per block)
    """
    from ..verification import verify as run

    lines = None
    if prompts:
        lines = [ln.strip() for ln in open(prompts, encoding="utf-8") if ln.strip()]
    report = run(a, b, encoder=encoder, from_a=from_a, from_b=from_b, params_a=parse_params(param_a, "--param-a"),
                 params_b=parse_params(param_b, "--param-b"), prompts=lines, tokenizer=tokenizer, atol=atol,
                 lora_a=lora_a, lora_b=lora_b, lora_from=lora_from, registry=registry())
    click.echo(json.dumps(report, indent=2) if as_json else render.render_verify(report))
    sys.exit(report["exit_code"])
