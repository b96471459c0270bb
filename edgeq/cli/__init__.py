"""The ``edgeq`` command line: parse, call one library function, render.

Subcommands live in modules beside this one (one per pipeline stage); this
module owns the group, ``--debug`` and the one place where errors become exit
codes.
"""

from __future__ import annotations

import sys
import traceback

import click

from edgeq import __version__
from edgeq.errors import EdgeqError, ExitCode


class EdgeqGroup(click.Group):
    """Turns ``EdgeqError`` into a one-line ``error: ...`` and its exit code."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except EdgeqError as exc:
            debug = bool(ctx.obj and ctx.obj.get("debug"))
            if debug:
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            ctx.exit(int(exc.exit_code))
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(int(ExitCode.INTERRUPTED))


@click.group(cls=EdgeqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeq")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Take a trained model to an edge device and prove it works there.

    \b
    Exit codes: 0 ok, 1 error, 2 bad usage, 3 model does not fit the target,
    4 device unreachable or failed, 130 interrupted.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register() -> None:
    # Each module adds its commands to `main`; imported here (not lazily) so
    # `edgeq --help` lists them, which is why none of them may import TensorFlow.
    import importlib

    for name in ("convert", "check", "deploy", "sweep", "repair"):
        try:
            importlib.import_module(f"edgeq.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"edgeq.cli.{name}":
                raise


_register()


def stderr_is_terminal() -> bool:
    """Progress goes to stderr only when a person is watching."""
    return sys.stderr.isatty()
