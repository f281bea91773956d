from __future__ import annotations

import click

from . import main


@main.command()
def layouts():
    """List the layouts sdconv reads and writes, one line each.

    \b
    Example:
      sdconv layouts
    """
    from ..converters.registry import DEFAULT

    for name, rl in DEFAULT.all_layouts():
        if hasattr(rl, "layout"):
            lay = rl.layout
            click.echo(f"{name:<10} {lay.output:<6} {lay.description}")
        else:
            click.echo(f"{name:<10} BROKEN {rl}")
