"""The live per-host view of commands over many hosts (the table is edgeq.report.fleet_table)."""

from __future__ import annotations

import sys
import threading
from typing import Any

from edgeq.cli._common import echo, redraw_block, terminal_width
from edgeq.escape import one_line


class FleetView:
    """A live per-host view: one line per host, redrawn in place on a terminal.

    Off a terminal it prints one line per host as each finishes.
    """

    def __init__(self, names: list[str], enabled: bool) -> None:
        self.names = names
        self.live = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.state = {n: "waiting" for n in names}
        self.width = max((len(n) for n in names), default=4)
        self.lock = threading.Lock()
        self.drawn = False

    def __call__(self, ev: Any) -> None:
        if ev.host not in self.state:
            return
        count = f" {100 * ev.done // ev.total}%" if ev.done is not None and ev.total else ""
        line = f"{ev.stage}{count} {ev.message}".strip()
        with self.lock:
            self.state[ev.host] = line
            if self.live:
                self._draw()
            elif self.enabled and ev.stage in ("done", "failed", "timeout"):
                echo(one_line(f"{ev.host.ljust(self.width)}  {line}", 200), err=True)

    def _draw(self) -> None:
        cols = terminal_width()
        redraw_block([f"{n.ljust(self.width)}  {self.state[n]}" for n in self.names],
                     len(self.names) if self.drawn else 0, cols)
        self.drawn = True
