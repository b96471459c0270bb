"""Rendering helpers shared by the subcommands (terminal only; the library never prints)."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import click

from edgeq.progress import ProgressCallback, ProgressEvent


def progress_printer(enabled: bool) -> Optional[ProgressCallback]:
    """A callback that shows progress on stderr, or None when piped or in ``--json`` mode."""
    if not enabled or not sys.stderr.isatty():
        return None

    def show(ev: ProgressEvent) -> None:
        where = f"[{ev.host}] " if ev.host else ""
        count = f" {ev.done}/{ev.total}" if ev.done is not None and ev.total else ""
        click.echo(f"\r\x1b[2K{where}{ev.stage}{count} {ev.message}".rstrip(), err=True, nl=False)
        if ev.total and ev.done == ev.total:
            click.echo("", err=True)

    return show


def clear_progress(enabled: bool) -> None:
    """Clear the progress line before printing a result."""
    if enabled and sys.stderr.isatty():
        click.echo("\r\x1b[2K", err=True, nl=False)


def echo_json(data: Any) -> None:
    """Print one JSON document on stdout."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))
