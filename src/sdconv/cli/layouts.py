from __future__ import annotations

from pathlib import Path

import click

from .app import main, registry


@main.group(invoke_without_command=True)
@click.pass_context
def layouts(ctx):
    """List the layouts sdconv reads and writes, one line each, with where each comes from.

    A broken mapping file is flagged on its own line; the others still work. Add folders of
    your own layouts with --mappings DIR or SDCONV_MAPPINGS (see docs/adding-a-layout.md).

    \b
    Examples:
      sdconv layouts
      sdconv --mappings ./my-layouts layouts
      sdconv layouts show sgm
      sdconv layouts check ./my-layouts/mytrainer.yaml
    """
    if ctx.invoked_subcommand is not None:
        return
    reg = registry()
    for name, rl in reg.all_layouts():
        if hasattr(rl, "layout"):
            where = reg.origin(name)
            click.echo(f"{name:<10} {rl.layout.output:<6} {rl.layout.description}"
                       + ("" if where == "built-in" else f"  [{where}]"))
        else:
            click.echo(f"{name:<10} BROKEN {rl}")


@layouts.command()
@click.argument("name")
def show(name):
    """Print one layout: its mapping file and what it resolves to.

    \b
    Example:
      sdconv layouts show ldm
    """
    reg = registry()
    rl = reg.layout(name)
    lay = rl.layout
    click.echo(f"# {name}: {reg.origin(name)} ({lay.path})")
    for s in lay.slots.values():
        extra = f", also read at {', '.join(s.read_prefixes)}" if s.read_prefixes else ""
        click.echo(f"# encoder {s.name}: prefix {s.prefix or '(top level)'!r}, naming {s.naming}{extra}")
    click.echo(lay.path.read_text(), nl=False)


@layouts.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def check(file):
    """Validate a mapping file (layout, naming or family) and the files it refers to.

    Errors name the file and line, what is wrong, and the nearest valid field or transform.
    Exit 0 when valid, 2 otherwise.

    \b
    Example:
      sdconv layouts check ./my-layouts/mytrainer.yaml
    """
    from ..converters.registry import BUILTIN_DIR, Registry
    from ..converters.schema import parse_family, parse_naming
    from ..converters.yamlload import load_yaml
    from ..errors import MappingError

    path = Path(file)
    kind = load_yaml(path).get("kind")
    base = registry()
    if kind == "layout":
        reg = Registry((*base.dirs, path.parent))
        rl = reg.layout(path.stem)
        if rl.layout.path.resolve() != path.resolve():
            raise MappingError(path, 0, f"another file named {path.stem}.yaml wins: {rl.layout.path}")
        slots = "; ".join(f"{s.name} at {s.prefix or 'top level'!r} ({s.naming})" for s in rl.layout.slots.values())
        click.echo(f"ok: {path}: layout {rl.name}, family {rl.family.name}, encoders: {slots}")
    elif kind == "naming":
        errors = []
        for fam_file in sorted((BUILTIN_DIR / "family").glob("*.yaml")):
            try:
                n = parse_naming(path, parse_family(fam_file))
                click.echo(f"ok: {path}: naming {n.name} for family {fam_file.stem}, {len(n.entries)} entries")
                return
            except MappingError as e:
                errors.append(e)
        raise errors[0]
    elif kind == "family":
        f = parse_family(path)
        click.echo(f"ok: {path}: family {f.name}, {len(f.tensors)} tensors")
    else:
        raise MappingError(path, 1, f"unknown kind {kind!r}", "a mapping file says kind: layout, naming or family")
