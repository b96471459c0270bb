"""One SSH channel under a deadline: a watchdog for paramiko calls that block, and the loop that feeds a
command's stdin and drains its (bounded) output."""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Any, Callable, Optional

from edgeq.sandbox import BoundedBuffer
from edgeq.transport.base import CHUNK
from edgeq.transport.wire import PidMarker


class Watchdog:
    """Calls ``on_fire`` (closing a channel, which wakes paramiko's waiters) if the block outlives ``seconds``."""

    def __init__(self, seconds: float, on_fire: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._finished = False
        self.fired = False
        self._on_fire = on_fire
        self._timer = threading.Timer(max(0.0, seconds), self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.fired = True
        try:
            self._on_fire()
        except Exception:
            pass

    def __enter__(self) -> "Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._finished = True
        self._timer.cancel()


class ChannelFailed(Exception):
    """exec_command failed for a reason other than our watchdog."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def pump(chan: Any, stdin: Any, deadline: float, out: BoundedBuffer, err: PidMarker,
         on_sent: Optional[Callable[[int], None]] = None) -> bool:
    """Feed stdin and drain both streams (bounded) until the command ends; False on the deadline."""
    view = memoryview(stdin)
    pos = 0
    if not view:
        chan.shutdown_write()
    else:
        # A send waits at most this long for the peer to open its window (paramiko wakes it as soon as
        # the window adjust arrives): Dropbear's window is 24 KB, and polling for it capped uploads
        # over the exec channel at about 0.5 MB/s.
        chan.settimeout(0.05)
    ended_at: Optional[float] = None
    while True:
        moved = False
        if pos < len(view):
            before = pos
            try:
                pos += chan.send(view[pos:pos + CHUNK])
            except socket.timeout:
                pass  # the window stayed shut; the deadline check below still runs
            except OSError:
                pos = len(view)  # the command ended without reading all its input
            if on_sent and pos != before:
                on_sent(pos)
            if pos >= len(view):
                chan.shutdown_write()
            moved = True
        while chan.recv_ready():
            data = chan.recv(CHUNK)
            if not data:
                break
            out.add(data)
            moved = True
        while chan.recv_stderr_ready():
            data = chan.recv_stderr(CHUNK)
            if not data:
                break
            err.add(data)
            moved = True
        pending = chan.recv_ready() or chan.recv_stderr_ready()
        if not pending:
            if chan.closed:
                return True
            if chan.exit_status_ready():
                if chan.eof_received:
                    return True
                # Exited, but something it started still holds the output open.
                ended_at = ended_at or time.monotonic()
                if time.monotonic() > ended_at + 0.5:
                    return True
        if time.monotonic() > deadline:
            return False
        if not moved:
            select.select([chan], [], [], 0.05)
