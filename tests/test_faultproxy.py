"""The fault-injection proxy itself behaves as the fault tests rely on."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.faultproxy import FaultProxy


@pytest.fixture
def echo_port():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            def loop(c=c):
                with c:
                    try:
                        while data := c.recv(4096):
                            c.sendall(data)
                    except OSError:
                        pass  # the proxy reset the link: that is the point
            threading.Thread(target=loop, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def _roundtrip(port: int, payload: bytes, timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        return got


def test_pass_forwards(echo_port):
    with FaultProxy(echo_port) as p:
        assert _roundtrip(p.port, b"hello") == b"hello"


def test_cut_after_limit(echo_port):
    with FaultProxy(echo_port, "cut", limit=3) as p:
        got = _try(p.port, b"hello world")
        # At most the 3 allowed bytes come back before the reset.
        assert got in (b"", b"h", b"he", b"hel")
        assert p.tripped.is_set()


def test_stall_is_silent(echo_port):
    with FaultProxy(echo_port, "stall", limit=0) as p:
        with pytest.raises(socket.timeout):
            _roundtrip(p.port, b"hello", timeout=0.5)
        assert p.tripped.is_set()


def test_blackhole_never_answers(echo_port):
    with FaultProxy(echo_port, "blackhole") as p:
        with pytest.raises(socket.timeout):
            _roundtrip(p.port, b"x", timeout=0.5)


def _try(port: int, payload: bytes) -> bytes:
    try:
        return _roundtrip(port, payload)
    except OSError:
        return b""
