"""The ``edgeq`` command line: parse, call one library function, render.

Subcommands live in modules beside this one (one per pipeline stage), built
from the shared option groups of ``_options``; this module owns the group,
``--debug`` and the one catch-all: an ``EdgeqError`` is one ``error:`` line
with the exit code ``_exit`` maps its class to, anything else is a bug in edgeq
and becomes one ``error: internal error`` line with exit code 70 (the
traceback only with ``--debug``); a closed stdout (``| head``) ends quietly.
"""

from __future__ import annotations

import errno
import os
import sys

import click

from edgeq import __version__
from edgeq.cli._exit import ExitCode, exit_code_for
from edgeq.errors import EdgeqError
from edgeq.escape import one_line

# An error line is bounded: a message can carry device output or a file name.
ERROR_LINE_LIMIT = 2000


def error_line(exc: BaseException) -> str:
    """The one ``error: ...`` line for an exception (control characters escaped, length bounded)."""
    if isinstance(exc, EdgeqError):
        return "error: " + one_line(str(exc), ERROR_LINE_LIMIT)
    detail = one_line(f"{type(exc).__name__}: {exc}", ERROR_LINE_LIMIT)
    return (f"error: internal error: {detail}; this is a bug in edgeq, please report it with the output "
            f"of --debug")


class EdgeqGroup(click.Group):
    """Turns every exception into a one-line ``error: ...`` and its exit code."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # click's own control flow: usage errors (exit 2), ctx.exit(n)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(int(ExitCode.INTERRUPTED))
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                self._fail(ctx, exc)
            # `edgeq ... | head`: the reader has gone. Stop quietly, as a tool killed by SIGPIPE would; stdout
            # now points at /dev/null so flushing at exit cannot raise again.
            _silence_stdout()
            ctx.exit(int(ExitCode.BROKEN_PIPE))
        except Exception as exc:  # noqa: BLE001 - the one catch-all of the command line
            self._fail(ctx, exc)

    @staticmethod
    def _fail(ctx: click.Context, exc: BaseException) -> None:
        if ctx.obj and ctx.obj.get("debug"):
            import traceback

            traceback.print_exc()
        click.echo(error_line(exc), err=True)
        ctx.exit(int(exit_code_for(exc)))


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (e.g. CliRunner's buffer)
        pass


@click.group(cls=EdgeqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeq")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Take a trained model to an edge device and prove it works there.

    \b
    Exit codes: 0 ok, 1 error, 2 bad usage, 3 model does not fit the target,
    4 device unreachable or failed, 5 no qualifying recipe (sweep),
    6 accuracy budget not met (convert --max-drop), 7 a host failed its
    health gate and was reverted (one host: not activated), 8 a host failed
    its gate and could not be reverted (staged rollouts), 70 internal error
    (a bug in edgeq; rerun with --debug), 130 interrupted, 141 output pipe
    closed (e.g. | head).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register() -> None:
    # Each module adds its commands to `main`; imported here (not lazily) so
    # `edgeq --help` lists them, which is why none of them may import TensorFlow.
    import importlib

    for name in ("convert", "check", "deploy", "report", "sweep", "repair"):
        try:
            importlib.import_module(f"edgeq.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"edgeq.cli.{name}":
                raise


_register()
