"""SSH peers that accept the connection, authenticate, and then never answer: every step must time out.

The peer is a real SSH server (paramiko's server side, on 127.0.0.1) that
stalls at one chosen point: opening a session, the command request, the SFTP
subsystem request, the SFTP version, or one SFTP request (open, write, close,
stat). Each test runs the client call on a thread and fails, rather than
hangs, when the call does not come back in time.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import paramiko
import pytest

from edgeq.errors import ConnectError, RemoteCommandError
from edgeq.transport import SSHOptions, SSHTransport
from tests.deploy.sshd_helper import keygen

pytestmark = pytest.mark.ssh

# SFTP packet types (draft-ietf-secsh-filexfer-02, the version paramiko speaks)
_INIT, _VERSION, _OPEN, _CLOSE, _WRITE, _LSTAT, _REMOVE, _STAT = 1, 2, 3, 4, 6, 7, 13, 17
_STATUS, _HANDLE, _ATTRS = 101, 102, 105
_STAGES = {_OPEN: "open", _WRITE: "write", _CLOSE: "close", _STAT: "stat", _LSTAT: "stat", _REMOVE: "remove"}


class _Server(paramiko.ServerInterface):
    """Accepts any public key; stalls (until released) at ``stall``."""

    def __init__(self, stall: str, release: threading.Event) -> None:
        self.stall = stall
        self.release = release

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: Any) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if self.stall == "session":
            self.release.wait(60)
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: Any, command: bytes) -> bool:
        if self.stall == "exec":
            self.release.wait(60)  # the answer to the exec request never comes
            return False
        channel.send_exit_status(0)
        return True

    def check_channel_subsystem_request(self, channel: Any, name: str) -> bool:
        if self.stall == "subsystem":
            self.release.wait(60)
            return False
        return super().check_channel_subsystem_request(channel, name)


class _MiniSftp(paramiko.SubsystemHandler):
    """Just enough of an SFTP server for an upload, silent from the request ``stall`` on."""

    def __init__(self, channel: Any, name: str, server: _Server, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, name, server)
        self.stall = server.stall
        self.release = server.release

    def start_subsystem(self, name: str, transport: Any, channel: Any) -> None:
        size = 0
        while not self.release.is_set():
            try:
                packet = _recv_packet(channel)
            except EOFError:
                return
            kind, body = packet[0], packet[1:]
            if kind == _INIT:
                if self.stall == "version":
                    self.release.wait(60)
                    return
                _send_packet(channel, _VERSION, struct.pack(">I", 3))
                continue
            req = body[:4]
            if _STAGES.get(kind) == self.stall:
                self.release.wait(60)
                return
            if kind == _OPEN:
                _send_packet(channel, _HANDLE, req + _string(b"h"))
            elif kind == _WRITE:
                handle_len = struct.unpack(">I", body[4:8])[0]
                offset = struct.unpack(">Q", body[8 + handle_len:16 + handle_len])[0]
                data_len = struct.unpack(">I", body[16 + handle_len:20 + handle_len])[0]
                size = max(size, offset + data_len)
                _send_packet(channel, _STATUS, req + struct.pack(">I", 0) + _string(b"") + _string(b""))
            elif kind in (_STAT, _LSTAT):
                _send_packet(channel, _ATTRS, req + struct.pack(">IQ", 1, size))
            else:
                _send_packet(channel, _STATUS, req + struct.pack(">I", 0) + _string(b"") + _string(b""))


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _recv_exact(channel: Any, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = channel.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _recv_packet(channel: Any) -> bytes:
    (length,) = struct.unpack(">I", _recv_exact(channel, 4))
    return _recv_exact(channel, length)


def _send_packet(channel: Any, kind: int, body: bytes) -> None:
    channel.sendall(struct.pack(">IB", len(body) + 1, kind) + body)


@dataclass
class Stalling:
    port: int
    options: SSHOptions

    @property
    def spec(self) -> str:
        return f"edgeq@127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def host_key() -> Any:
    return paramiko.ECDSAKey.generate()


@pytest.fixture(scope="module")
def client_key(tmp_path_factory) -> Path:
    return keygen(tmp_path_factory.mktemp("stall_keys") / "id")


@pytest.fixture
def stalling(request, tmp_path, host_key, client_key) -> Iterator[Callable[[str], Stalling]]:
    """``stalling(point)`` starts a server that stalls at ``point``; all are released and closed afterwards."""
    release = threading.Event()
    listeners: list[socket.socket] = []
    transports: list[Any] = []

    def start(stall: str) -> Stalling:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        listeners.append(srv)
        port = srv.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            t = paramiko.Transport(conn)
            transports.append(t)
            t.add_server_key(host_key)
            t.set_subsystem_handler("sftp", _MiniSftp)
            try:
                t.start_server(server=_Server(stall, release))
            except (paramiko.SSHException, EOFError, OSError):
                return

        threading.Thread(target=serve, daemon=True).start()
        kh = tmp_path / f"known_hosts_{port}"
        kh.write_text(f"[127.0.0.1]:{port} {host_key.get_name()} {host_key.get_base64()}\n")
        opts = SSHOptions(identity=str(client_key), known_hosts=str(kh), connect_timeout=1.0,
                          ssh_config=str(tmp_path / "no_config"), allow_agent=False, connect_retries=0,
                          **_no_global())
        return Stalling(port, opts)

    yield start
    release.set()
    for t in transports:
        t.close()
    for s in listeners:
        s.close()


def _no_global() -> dict[str, Any]:
    # Keep the machine's /etc/ssh/ssh_known_hosts out of the test.
    fields = SSHOptions.__dataclass_fields__
    return {"global_known_hosts": ()} if "global_known_hosts" in fields else {}


def _within(seconds: float, fn: Callable[[], Any]) -> BaseException | Any:
    """Run ``fn`` on a thread; return what it raised or returned, or fail the test if it hangs."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["value"] = exc

    th = threading.Thread(target=call, daemon=True)
    start = time.monotonic()
    th.start()
    th.join(seconds)
    if th.is_alive():
        pytest.fail(f"the call was still blocked after {seconds:g} s (no deadline fired)")
    box["elapsed"] = time.monotonic() - start
    return box["value"]


def test_command_request_never_answered_times_out(stalling, ledger):
    server = stalling("exec")
    tr = SSHTransport(server.spec, server.options).connect()
    try:
        err = _within(15, lambda: tr.run(["true"], timeout=60))
    finally:
        tr.close()
    assert isinstance(err, RemoteCommandError), err
    assert "did not answer the command request within 1 s" in str(err)
    assert err.host == tr.host and "--connect-timeout" in str(err)
    ledger("fault", "ssh-exec-request-unanswered")


def test_session_open_never_answered_times_out(stalling, ledger):
    server = stalling("session")
    tr = SSHTransport(server.spec, server.options).connect()
    try:
        err = _within(15, lambda: tr.run(["true"], timeout=60))
    finally:
        tr.close()
    assert isinstance(err, RemoteCommandError) and "did not open a session within 1 s" in str(err), err
    ledger("fault", "ssh-session-open-unanswered")


def test_sftp_subsystem_request_never_answered_times_out(stalling, tmp_path, ledger):
    server = stalling("subsystem")
    src = tmp_path / "model.tflite"
    src.write_bytes(b"x" * 1000)
    tr = SSHTransport(server.spec, server.options).connect()
    try:
        err = _within(15, lambda: tr.put(src, "/tmp/never", timeout=60))
    finally:
        tr.close()
    assert isinstance(err, ConnectError), err
    assert "did not start SFTP within 1 s" in str(err)
    ledger("fault", "ssh-sftp-subsystem-unanswered")


def test_sftp_version_never_sent_times_out(stalling, tmp_path, ledger):
    server = stalling("version")
    src = tmp_path / "model.tflite"
    src.write_bytes(b"x" * 1000)
    tr = SSHTransport(server.spec, server.options).connect()
    try:
        err = _within(15, lambda: tr.put(src, "/tmp/never", timeout=60))
    finally:
        tr.close()
    assert isinstance(err, ConnectError), err
    assert "did not start SFTP within 1 s" in str(err)
    ledger("fault", "ssh-sftp-version-unanswered")


@pytest.mark.parametrize("stage", ["open", "write", "close", "stat"])
def test_sftp_request_never_answered_times_out(stalling, tmp_path, stage, ledger):
    server = stalling(stage)
    src = tmp_path / "model.tflite"
    src.write_bytes(b"x" * 300_000)
    tr = SSHTransport(server.spec, server.options).connect()
    try:
        err = _within(15, lambda: tr.put(src, "/tmp/upload", timeout=2.0))
    finally:
        tr.close()
    assert isinstance(err, ConnectError), err
    assert "did not finish" in str(err)
    ledger("fault", f"ssh-sftp-{stage}-unanswered")


def test_upload_works_against_the_stalling_server_when_it_does_not_stall(stalling, tmp_path):
    # The mini SFTP server itself is sound: the stalls above are what the other tests measure.
    server = stalling("nothing")
    src = tmp_path / "model.tflite"
    src.write_bytes(b"x" * 300_000)
    with SSHTransport(server.spec, server.options) as tr:
        assert tr.put(src, "/tmp/upload", timeout=10) == 300_000
