"""Rendering helpers shared by the subcommands (terminal only; the library never prints).

Text on its way to the terminal can hold strings from a model file, a device
or a report someone else wrote: every command prints through ``echo``, which
escapes terminal control characters (``edgeq.escape.term``), so a tensor name
or a device error cannot move the cursor, retitle the window or hide a line.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Optional

import click

from edgeq.escape import one_line, term
from edgeq.progress import ProgressCallback, ProgressEvent
from edgeq.units import fmt_bytes, fmt_seconds

_CLEAR_LINE = "\r\x1b[2K"  # our own control sequence; the only one edgeq writes


def echo(text: Any = "", err: bool = False, nl: bool = True) -> None:
    """Print text that may contain untrusted strings: control characters escaped, newlines kept."""
    click.echo(term(text), err=err, nl=nl)


BAR_WIDTH = 24
PLAIN_EVERY_PCT = 10  # off a terminal: a line at each 10 % step of a counted stage ...
PLAIN_EVERY_S = 5.0  # ... or after this many seconds, whichever comes first
PLAIN_QUIET_S = 1.0  # and nothing in the first second: a command that ends (or fails) at once prints only that


class ProgressRenderer:
    """Shows ``ProgressEvent``s on ``stream``: a bar with ETA on a terminal, plain periodic lines otherwise.

    On a terminal the current line is redrawn in place; a counted stage (done/total) gets a bar, its count
    (sizes for ``unit="bytes"``) and an ETA from the rate since the stage began. Off a terminal (a log, CI)
    a line is written when a stage begins, at every ``PLAIN_EVERY_PCT`` % step, at the end of a counted
    stage, and otherwise at most every ``PLAIN_EVERY_S`` seconds; none in the first ``PLAIN_QUIET_S``
    seconds (then the current state), so a quick command's output is only its result or its error line.
    """

    def __init__(self, stream: Any = None, tty: Optional[bool] = None, clock: Callable[[], float] = time.monotonic,
                 width: Optional[int] = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.width = width
        self.stage: Optional[tuple[Optional[str], str]] = None
        self.began = 0.0
        self.first_done = 0
        self.last_line = 0.0
        self.last_step = -1
        self.created = clock()
        self.quiet = True
        import threading  # uploads report from the transport's thread

        self.lock = threading.Lock()

    def __call__(self, ev: ProgressEvent) -> None:
        with self.lock:
            self._show(ev)

    def _show(self, ev: ProgressEvent) -> None:
        now = self.clock()
        key = (ev.host, ev.stage)
        new_stage = key != self.stage or (ev.done is not None and ev.done < self.first_done)
        if new_stage:
            self.stage, self.began, self.first_done, self.last_step = key, now, ev.done or 0, -1
        counted = ev.done is not None and bool(ev.total)
        if self.tty:
            self._write(_CLEAR_LINE + self._clip(self.line(ev, now, bar=True)))
            if counted and ev.done >= ev.total:  # type: ignore[operator]
                self._write("\n")
            return
        step = min(100, 100 * ev.done // ev.total) // PLAIN_EVERY_PCT if counted else -1  # type: ignore[operator]
        finished = counted and ev.done >= ev.total  # type: ignore[operator]
        if self.quiet:
            if now - self.created < PLAIN_QUIET_S:
                return
            self.quiet, new_stage = False, True
        if new_stage or finished or step > self.last_step or now - self.last_line >= PLAIN_EVERY_S:
            self.last_step, self.last_line = max(step, self.last_step), now
            self._write(self._clip(self.line(ev, now, bar=False)) + "\n")

    def line(self, ev: ProgressEvent, now: float, bar: bool) -> str:
        """One progress line (untrusted text escaped)."""
        where = f"[{one_line(ev.host, 80)}] " if ev.host else ""
        parts = [f"{where}{one_line(ev.stage, 40)}"]
        if ev.done is not None and ev.total:
            frac = max(0.0, min(1.0, ev.done / ev.total))
            if bar:
                filled = int(round(frac * BAR_WIDTH))
                parts.append("[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]")
            parts.append(f"{100 * frac:3.0f} %")
            if ev.unit == "bytes":
                parts.append(f"{fmt_bytes(ev.done)}/{fmt_bytes(ev.total)}")
            else:
                parts.append(f"{ev.done}/{ev.total}")
            eta = self._eta(ev, now)
            if eta is not None:
                parts.append(f"ETA {fmt_seconds(eta)}")
        if ev.message:
            parts.append(one_line(ev.message, 300))
        return " ".join(parts)

    def _eta(self, ev: ProgressEvent, now: float) -> Optional[float]:
        progressed = (ev.done or 0) - self.first_done
        elapsed = now - self.began
        if progressed <= 0 or elapsed <= 0 or not ev.total or ev.done is None or ev.done >= ev.total:
            return None
        left = (ev.total - ev.done) * elapsed / progressed
        return float(round(left)) if left >= 10 else left

    def _clip(self, text: str) -> str:
        width = self.width or terminal_width()
        return text if len(text) < width else text[: max(1, width - 2)] + "…"

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def terminal_width() -> int:
    """Columns of the terminal on stderr (100 when it cannot be told)."""
    import shutil  # not on the `--help` path (it imports zlib, bz2 and lzma)

    return shutil.get_terminal_size((100, 20)).columns


def progress_printer(enabled: bool) -> Optional[ProgressCallback]:
    """A callback that shows progress on stderr (bar on a terminal, lines otherwise), or None for ``--json``."""
    if not enabled:
        return None
    return ProgressRenderer(click.get_text_stream("stderr"))


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
    import json  # not on the `--help` path

    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str, ensure_ascii=True))
