"""Rendering helpers shared by the subcommands (terminal only; the library never prints).

Text on its way to the terminal can hold strings from a model file, a device
or a report someone else wrote: every command prints through ``echo``, which
escapes terminal control characters (``edgeq.escape.term``), so a tensor name
or a device error cannot move the cursor, retitle the window or hide a line.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Optional

import click

from edgeq.escape import one_line, term
from edgeq.progress import ProgressCallback, ProgressEvent

_CLEAR_LINE = "\r\x1b[2K"  # our own control sequence; the only one edgeq writes


def echo(text: Any = "", err: bool = False, nl: bool = True) -> None:
    """Print text that may contain untrusted strings: control characters escaped, newlines kept."""
    click.echo(term(text), err=err, nl=nl)


def progress_printer(enabled: bool) -> Optional[ProgressCallback]:
    """A callback that shows progress on stderr, or None when piped or in ``--json`` mode."""
    if not enabled or not sys.stderr.isatty():
        return None

    def show(ev: ProgressEvent) -> None:
        where = f"[{one_line(ev.host, 80)}] " if ev.host else ""
        count = f" {ev.done}/{ev.total}" if ev.done is not None and ev.total else ""
        click.echo(_CLEAR_LINE + one_line(f"{where}{ev.stage}{count} {ev.message}".rstrip(), 300), err=True, nl=False)
        if ev.total and ev.done == ev.total:
            click.echo("", err=True)

    return show


def clear_progress(enabled: bool) -> None:
    """Clear the progress line before printing a result."""
    if enabled and sys.stderr.isatty():
        click.echo(_CLEAR_LINE, err=True, nl=False)


def redraw_block(lines: list[str], previous: int, width: int) -> None:
    """Redraw a live block of status lines on stderr: ours are the only control sequences written.

    Each line is made one escaped line of at most ``width - 1`` characters before the cursor-up and
    clear-line sequences are added, so text from a device cannot drive the terminal.
    """
    out = [f"\x1b[{previous}F"] if previous else []
    out += ["\x1b[2K" + one_line(line, max(1, width - 1)) + "\n" for line in lines]
    click.echo("".join(out), err=True, nl=False)


def echo_result(as_json: bool, data: Any, lines: Iterable[str]) -> None:
    """A command's result: one JSON document with ``--json``, else its summary lines (escaped)."""
    if as_json:
        echo_json(data)
        return
    for line in lines:
        echo(line)


def echo_json(data: Any) -> None:
    """Print one JSON document on stdout (``json.dumps`` escapes control characters as ``\\u00XX``)."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str, ensure_ascii=True))
