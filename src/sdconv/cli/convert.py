from __future__ import annotations

import sys

import click

from ..converters.dtypes import DTYPE_CHOICES
from ..errors import UsageError
from ..options import AUTO, FORMATS
from . import render
from .app import EXIT_CODES, main, parse_params, registry, remote_options


@main.command(epilog=EXIT_CODES)
@remote_options
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=False, dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Output file or folder; with several inputs (or a folder of checkpoints, a glob, or a path "
                   "ending in /) the folder the outputs go to.")
@click.option("--to", "to", required=True, metavar="LAYOUT", help="Target layout (see `sdconv layouts`).")
@click.option("--from", "from_", default=AUTO, show_default=True, metavar="LAYOUT|auto",
              help="Input layout; auto detects it from the file's keys.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Output container. Default: from the output's suffix (.pt/.ckpt/.bin/.pth -> pt), else safetensors.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="keep", show_default=True,
              help="Float dtype of the output tensors (integer buffers stay int64).")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Override what the weights cannot say: heads=N, act=quick_gelu|gelu. Repeatable.")
@click.option("--encoder", default=None, metavar="NAME|all",
              help="Which encoder of a checkpoint that holds several (SDXL: clip_l, clip_g), or all. With all, a "
                   "layout that holds one encoder gets one output each: OUTPUT's name + .<encoder> before the suffix.")
@click.option("--projection", "projection", type=click.Path(), default=None, metavar="REF",
              help="Graft the text projection (and logit_scale) of the reference CLIP REF (any layout) onto the "
                   "encoder, e.g. OpenAI ViT-L/14 for an SD1.x encoder. Widths must match.")
@click.option("--replace-projection", is_flag=True, help="Allow --projection to replace a projection the encoder has.")
@click.option("--allow-synthetic", is_flag=True,
              help="Accept a reference whose projection or logit_scale looks like a placeholder.")
@click.option("--with-vision", "with_vision", type=click.Path(), default=None, metavar="REF",
              help="Assemble a whole CLIP for CLIPScore: this text tower, REF's vision tower, visual projection and "
                   "logit_scale, and REF's text projection. --to openai (write .pt; clip.load), open_clip (a folder "
                   "for create_model('local-dir:...')) or hf (a CLIPModel folder).")
@click.option("--lora", "lora", multiple=True, metavar="FILE[:SCALE]",
              help="Merge this text-encoder LoRA (kohya, diffusers or PEFT) into the encoder(s) before writing; "
                   "SCALE 1.0 if left out; repeatable, applied in order (docs/lora.md).")
@click.option("--lora-from", "lora_from", default=None, metavar="FORMAT",
              help="The LoRAs' format (kohya, diffusers, peft); default: detect it.")
@click.option("--whole-clip", is_flag=True,
              help="INPUT is a whole CLIP (OpenAI .pt, open_clip, transformers CLIPModel): write both its towers, "
                   "its projections and logit_scale, as --with-vision INPUT does. In a batch, each input is its own.")
@click.option("--force-activation", is_flag=True,
              help="With --with-vision, write even if the target library would run the wrong activation.")
@click.option("--fix-position-ids", is_flag=True,
              help="Repair drifted or corrupt position_ids (merges turn them into floats): the output gets an int64 "
                   "arange, and the repair is recorded. Corrupt ones are refused without it.")
@click.option("--strict", is_flag=True, help="Turn warnings (e.g. drifted position_ids) into errors.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--dry-run", is_flag=True, help="Print the plan (layout, architecture, every tensor) and write nothing.")
@click.option("--into", "into", type=click.Path(exists=True, dir_okay=False), default=None, metavar="CHECKPOINT",
              help="Write the encoder(s) of INPUT back into CHECKPOINT (--to ldm, sgm or sd3), as a new "
                   ".safetensors checkpoint -o: every other tensor and the metadata kept byte for byte.")
@click.option("--continue-on-error", is_flag=True, help="Batch: go on after an input fails.")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Batch: write one JSON line per input (layout, encoders, outputs, sha256, warnings, error).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def convert(inputs, output, to, from_, fmt, dtype, params, encoder, projection, replace_projection, allow_synthetic,
            with_vision, whole_clip, force_activation, fix_position_ids, strict, force, dry_run, quiet, into,
            lora, lora_from,
            continue_on_error, report):
    """Convert the CLIP text encoder in INPUT to layout --to, written at OUTPUT.

    INPUT is a .safetensors, .ckpt/.pt/.pth/.bin file, or a model folder. Folder layouts
    (hf, diffusers) write a folder with config.json; the others write one file.

    Batch: several inputs, a folder of checkpoints or a glob convert into the folder -o,
    as <stem>.safetensors (.pt; a folder <stem> for folder layouts; <stem>.<encoder>... when
    --encoder all splits). Outputs that sdconv made with the same options and are newer than
    their input are skipped (--force redoes them); stale ones are replaced. A summary closes
    the run; --report writes JSON lines.

    \b
    Examples:
      sdconv convert v1-5.safetensors -o clip-l.safetensors --to openai
      sdconv convert v1-5.ckpt -o clip-l-hf --to hf --dtype fp16
      sdconv convert clip-l-hf -o clip-l.pt --to open_clip --format pt
      sdconv convert openclip-h.bin -o h --to hf --param act=gelu
      sdconv convert v1-5.safetensors -o x --to hf --dry-run
      sdconv convert v1-5.safetensors -o clip-l.safetensors --to openai --projection ViT-L-14.pt
      sdconv convert v1-5.safetensors -o sd15-clip.pt --to openai --with-vision ViT-L-14.pt
      sdconv convert ViT-L-14.pt -o clip-vit-l --to hf --whole-clip
      sdconv convert sdxl.safetensors -o te --to diffusers --encoder all --lora style.safetensors:0.8
      sdconv convert sdxl.safetensors -o te --to diffusers --encoder all
      sdconv convert sdxl.safetensors -o g.safetensors --to open_clip --encoder clip_g
      sdconv convert sdxl.safetensors -o clip.safetensors --to openai --encoder all
                                   (writes clip.clip_l.safetensors and clip.clip_g.safetensors)
      sdconv convert fixed-clip.safetensors --to ldm --into merge.safetensors -o merge-fixed.safetensors
      sdconv convert models/ -o encoders/ --to openai --encoder all --continue-on-error
      sdconv convert 'models/*.ckpt' -o encoders/ --to hf --report report.jsonl
    """
    from ..batch import expand
    from ..options import ConvertOptions

    paths, batch = expand(inputs)
    batch = batch or output.endswith(("/", "\\"))
    options = ConvertOptions(to=to, from_=from_, params=parse_params(params), fmt=fmt, dtype=dtype, encoder=encoder,
                             projection=projection, replace_projection=replace_projection,
                             allow_synthetic=allow_synthetic, with_vision=with_vision,
                             whole_clip=whole_clip, force_activation=force_activation, lora=lora, lora_from=lora_from,
                             fix_position_ids=fix_position_ids, strict=strict, force=force)
    reg = registry()
    if into and batch:
        raise UsageError("--into writes one encoder file into one checkpoint; several inputs were given",
                         "write back one input at a time")
    if batch:
        return _batch(paths, output, options, reg, continue_on_error, report, quiet, dry_run)
    (input,) = paths
    if into and dry_run:
        from ..writeback import plan_write_back
        wb = plan_write_back(input, into, output, options, registry=reg)
        click.echo(render.describe_plan(wb.plan))
        for line in render.describe_write_back(into, output, wb.records, planned=True):
            click.echo(line)
        click.echo("dry run: nothing written")
        return
    if into:
        from ..writeback import write_back
        plan, records = write_back(input, into, output, options, registry=reg)
        for w in plan.warnings:
            click.echo(render.warning(w), err=True)
        if not quiet:
            for line in render.describe_write_back(into, output, records):
                click.echo(line)
        return
    if dry_run:
        from ..converters.engine import make_plans
        for plan in make_plans(input, options, output=output, registry=reg):
            click.echo(render.describe_plan(plan))
        click.echo("dry run: nothing written")
        return
    from ..converters.engine import convert as run_convert
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(unit="B", unit_scale=True, desc="converting", leave=False, delay=1.0)
    try:
        res = run_convert(input, output, options, registry=reg, progress=bar)
    finally:
        if bar:
            bar.close()
    for line, is_warning in render.describe_result(input, res):
        if is_warning or not quiet:
            click.echo(line, err=is_warning)


def _batch(paths, output, options, reg, continue_on_error, report, quiet, dry_run):
    from pathlib import Path

    from ..batch import ReportFile, run_batch
    if dry_run:
        from ..converters.engine import make_plans
        for p in paths:
            for plan in make_plans(p, options, output=Path(output) / p.name, registry=reg):
                click.echo(render.describe_plan(plan))
        click.echo("dry run: nothing written")
        return
    out = ReportFile(report, paths, options.force) if report else None

    def show(rec):
        if out:
            out.write(rec)
        if not quiet:
            click.echo(render.describe_record(rec))
        for w in rec.warnings:
            click.echo(render.warning(w, rec.input), err=True)
    try:
        records = run_batch(paths, Path(output), options, continue_on_error=continue_on_error, registry=reg,
                            on_record=show)
        for rec in records[len([r for r in records if r.status != "not run"]):]:
            show(rec)
    except BaseException as e:
        if out:
            out.close(failed=e)
        raise
    if out:
        out.close()
    counts = {s: sum(r.status == s for r in records) for s in ("converted", "skipped", "failed", "not run")}
    if not quiet:
        click.echo("summary: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s != "not run"))
    failed = [r for r in records if r.status == "failed"]
    for r in failed:
        click.echo(f"  failed: {r.error}", err=True)
    if failed:
        sys.exit(failed[0].exit_code)
