"""The command group, its error handling and exit codes, and what every command shares: the
registry of this run and --param parsing.

Exit codes: 0 success · 1 verification failed · 2 usage · 3 unreadable or malformed input ·
4 refused as unsafe · 5 layout detection failed or ambiguous, or the file does not match
--from · 6 output refused (exists, or is the input).
"""
from __future__ import annotations

import gc
import os
import sys
import traceback
import warnings

import click

from .. import errors
from ..converters import leases
from ..errors import SdconvError
from ..version import __version__

EXIT_CODES = "\b\nExit codes:\n" + "\n".join(f"  {code:<3} {what}" for code, what in errors.EXIT_CODES.items())


def _terminate(signum, frame):
    # SIGTERM (a batch job killed, a container stopped) unwinds like Ctrl-C, so the temporary
    # output is removed and nothing partial is left
    raise KeyboardInterrupt


class _Group(click.Group):
    def invoke(self, ctx):
        import signal
        signal.signal(signal.SIGTERM, _terminate)
        # No cyclic garbage collection during a command: sdconv's data has no reference cycles
        # worth collecting (tensors are freed by reference counting), while each full collection
        # rescans the ~170,000 objects torch brings (~0.07 s), and importing torch triggers
        # several. Those pauses were a tenth of a small conversion's wall time. Restored after,
        # for callers that run commands in-process.
        was_enabled = gc.isenabled()
        gc.disable()
        quiet = warnings.catch_warnings()
        quiet.__enter__()
        if not ctx.params.get("debug"):
            # libraries' own warnings (torch's "Failed to initialize NumPy", deprecations) are
            # not the user's business; sdconv's warnings are printed lines, not Python warnings
            warnings.simplefilter("ignore")
        try:
            return super().invoke(ctx)
        except SdconvError as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            msg = e.message + (f" — {e.hint}" if e.hint else "")
            click.echo(f"sdconv: error: {msg}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("sdconv: interrupted; nothing was written", err=True)
            sys.exit(errors.INTERRUPTED)
        finally:
            leases.release_all()
            quiet.__exit__(None, None, None)
            if was_enabled:
                gc.enable()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="sdconv")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.option("--mappings", "mappings", multiple=True, type=click.Path(), metavar="DIR",
              help="A folder of extra mapping files (layouts); repeatable. Also SDCONV_MAPPINGS (a path list).")
@click.pass_context
def main(ctx, debug, mappings):
    """Extract and convert the CLIP text encoder of Stable Diffusion checkpoints.

    \b
    Examples:
      sdconv layouts
      sdconv inspect model.safetensors
      sdconv convert model.safetensors -o clip-l.safetensors --to openai
      sdconv convert model.ckpt -o text_encoder_hf --to hf --dry-run
      sdconv verify clip-l.safetensors ViT-L-14.pt
    """
    ctx.ensure_object(dict)["debug"] = debug
    ctx.obj["mappings"] = mappings


def run():
    """The `sdconv` program (console script and `python -m sdconv`): main(), then leave without
    tearing the interpreter down. Once torch is loaded, that teardown (freeing its modules and
    objects one by one) takes ~0.4 s here, a quarter of a small conversion, and does nothing the
    operating system does not do at exit: outputs are closed and renamed into place before a
    command returns, and the standard streams are flushed here. An unexpected exception still
    leaves through Python, with its traceback."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe (`sdconv layouts | head -1`): nothing to add
            pass
    os._exit(code)


def _transfer(ctx, param, value):
    """Each remote option, as it is parsed, sets this run's transfer settings (remote_sources)."""
    from ..converters import remote_sources
    remote_sources.configure(**{param.name: value, "show_progress": sys.stderr.isatty()})
    return value


def remote_options(command):
    """--timeout, --retries and --download: how URL and hf:// inputs are fetched."""
    for opt in reversed([
        click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True, metavar="SECONDS",
                     expose_value=False, callback=_transfer,
                     help="URL and hf:// inputs: seconds to wait to connect, and between two reads."),
        click.option("--retries", type=click.IntRange(min=0), default=5, show_default=True, expose_value=False,
                     callback=_transfer, help="URL and hf:// inputs: attempts after the first, per range, on "
                                              "connection errors, 429 and 5xx (with backoff; a range resumes)."),
        click.option("--download", is_flag=True, expose_value=False, callback=_transfer,
                     help="URL inputs that cannot be read by byte ranges (a server that ignores Range, a legacy "
                          "torch pickle, a TorchScript archive): fetch the whole file to a temporary file first."),
    ]):
        command = opt(command)
    return command


def registry():
    """The registry for this run: built-in mappings plus --mappings and SDCONV_MAPPINGS folders."""
    from ..converters.registry import Registry
    ctx = click.get_current_context()
    return Registry.with_user_dirs(ctx.find_root().obj.get("mappings", ()))


def parse_params(values, option: str = "--param") -> dict:
    """NAME=VALUE pairs (--param heads=16 act=gelu) as a dict; the engine checks the names."""
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k or not val:
            raise click.BadParameter(f"{v!r} is not NAME=VALUE (e.g. heads=16 or act=gelu)", param_hint=option)
        out[k.strip()] = val.strip()
    return out
