"""A TCP proxy for deterministic fault injection in tests (like toxiproxy's ``limit_data``).

It listens on 127.0.0.1 and forwards to an upstream port. After ``limit`` bytes
have gone upstream (client -> server) it applies a fault:

- ``"cut"``: closes both sides at once (a reset link);
- ``"stall"``: stops forwarding in both directions but keeps the sockets open,
  so the client sees a silent link (no FIN, no RST) and must time out;
- ``"blackhole"`` (limit ignored): accepts connections and never answers.

``fail_first=N`` resets the first N connections right after accepting them
(a transient failure during connect); ``cut_now()`` resets every open
connection at once (a link that drops mid-command); ``connections`` counts
accepted connections.

Only loopback addresses are used.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from typing import Optional


class FaultProxy:
    """Forward 127.0.0.1:<port> to 127.0.0.1:<upstream_port>, with one fault armed."""

    def __init__(self, upstream_port: int, mode: str = "pass", limit: Optional[int] = None,
                 fail_first: int = 0) -> None:
        if mode not in ("pass", "cut", "stall", "blackhole"):
            raise ValueError(f"unknown fault mode {mode!r}")
        self.upstream_port = upstream_port
        self.mode = mode
        self.limit = limit
        self.bytes_up = 0
        self.fail_first = fail_first
        self.connections = 0
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self.tripped = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def arm(self, mode: str, limit: Optional[int] = None) -> None:
        """Change the fault for connections made from now on (and the current byte budget)."""
        with self._lock:
            self.mode = mode
            self.limit = limit
            self.bytes_up = 0
            self.tripped.clear()

    def cut_now(self) -> None:
        """Reset every connection open now (new ones still pass, per the armed mode)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            self._close(a, b, reset=True)
        self.tripped.set()

    def close(self) -> None:
        self._stop.set()
        try:
            self._server.close()
        except OSError:
            pass
        for s in self._held:
            try:
                s.close()
            except OSError:
                pass
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self._server], [], [], 0.1)
            if not r:
                continue
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self._held.append(client)
            self.connections += 1
            if self.connections <= self.fail_first:
                self._close(client, client, reset=True)
                continue
            if self.mode == "blackhole":
                self.tripped.set()
                continue
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._held.append(upstream)
        with self._lock:
            self._pairs.append((client, upstream))
        stalled = False
        try:
            while not self._stop.is_set():
                r, _, _ = select.select([client, upstream], [], [], 0.1)
                if stalled:
                    continue
                for src in r:
                    data = src.recv(65536)
                    if not data:
                        return self._close(client, upstream)
                    if src is client:
                        with self._lock:
                            mode, limit = self.mode, self.limit
                            if limit is not None and mode in ("cut", "stall") and self.bytes_up + len(data) > limit:
                                allowed = max(limit - self.bytes_up, 0)
                                self.bytes_up += allowed
                                if allowed:
                                    upstream.sendall(data[:allowed])
                                self.tripped.set()
                                if mode == "cut":
                                    return self._close(client, upstream, reset=True)
                                stalled = True
                                break
                            self.bytes_up += len(data)
                        upstream.sendall(data)
                    else:
                        client.sendall(data)
        except OSError:
            self._close(client, upstream)

    @staticmethod
    def _close(a: socket.socket, b: socket.socket, reset: bool = False) -> None:
        for s in (a, b):
            try:
                if reset:
                    # SO_LINGER 0 makes close() send RST, like a link that drops.
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            except OSError:
                pass
