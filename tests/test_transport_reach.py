"""Reaching devices the way users do: ProxyCommand tokens follow --host, a peer that resets during the SSH banner
is one line (no paramiko tracebacks)."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from edgeq.errors import ConnectError
from edgeq.transport import SSHTransport
from tests.deploy.sshd_helper import ssh_opts, ssh_server  # noqa: F401 - pytest fixtures
from tests.test_ssh_config import RELAY

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fleet" / "data" / "tiny_a.tflite"


@pytest.mark.ssh
def test_proxy_command_gets_the_port_given_with_host(ssh_server, ssh_opts, tmp_path):
    # The config names a wrong port; --host device:PORT is what the connection uses, and so must %p.
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    note = tmp_path / "proxy_ran"
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host device\n  HostName 127.0.0.1\n  Port 1\n  User nobody\n  IdentityFile {ssh_server.client_key}\n"
                   f"  ProxyCommand {sys.executable} {relay} %h %p {note}\n")
    spec = f"{ssh_server.user}@device:{ssh_server.port}"
    with SSHTransport(spec, replace(ssh_opts, identity=None, ssh_config=str(cfg))) as tr:
        assert tr.run(["echo", "via proxy"], 10).stdout == "via proxy\n"
    assert note.read_text().splitlines()[0] == f"127.0.0.1 {ssh_server.port}"


def test_proxy_command_tokens_are_the_ones_this_connection_uses(tmp_path):
    # %r is the user given with --host, %n the alias, %% a literal percent sign (as in OpenSSH).
    note = tmp_path / "tokens"
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host device\n  HostName 127.0.0.1\n  Port 1\n  User nobody\n"
                   f"  ProxyCommand echo %h %p %r %n %%p > {note}; exit 9\n")
    opts_ = SSHTransport("pi@device:2022", _no_files(tmp_path, cfg))
    with pytest.raises(ConnectError, match="ProxyCommand"):
        opts_.connect()
    assert note.read_text().split() == ["127.0.0.1", "2022", "pi", "device", "%p"]


def _no_files(tmp_path: Path, cfg: Path):
    from edgeq.transport import SSHOptions

    return SSHOptions(known_hosts=str(tmp_path / "kh"), ssh_config=str(cfg), allow_agent=False,
                      global_known_hosts=(), connect_retries=0, connect_timeout=5.0)


class _ResettingServer:
    """Accepts TCP connections on 127.0.0.1 and resets each one (SO_LINGER 0) a moment later, mid-banner."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            time.sleep(0.2)  # paramiko is now waiting for the banner
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_a_peer_that_resets_during_the_banner_is_one_line(tmp_path, ledger):
    server = _ResettingServer()
    try:
        res = subprocess.run([str(ROOT / ".venv" / "bin" / "edgeq") if (ROOT / ".venv" / "bin" / "edgeq").exists()
                              else "edgeq", "deploy", str(MODEL), "--host", f"127.0.0.1:{server.port}",
                              "--known-hosts", str(tmp_path / "kh")],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path,
                             env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    finally:
        server.close()
    assert server.accepted >= 1
    assert res.returncode == 4, res.stderr
    assert "Traceback" not in res.stderr and "paramiko" not in res.stderr, res.stderr
    # Progress lines ("[host] connect ...") may come first; paramiko's own records must not.
    lines = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("error:") and "reset" in lines[0], res.stderr
    ledger("fault", "peer resets during the SSH banner (one line, no paramiko tracebacks)")


def test_local_commands_obey_the_same_length_limit_as_ssh(ledger):
    # A command that works with --host local must not fail on a Dropbear device: one limit for both.
    from edgeq.errors import CommandTooLong
    from edgeq.transport import MAX_COMMAND_BYTES, LocalTransport

    tr = LocalTransport()
    assert tr.run(["echo", "a" * (MAX_COMMAND_BYTES - 200)], 10).ok
    with pytest.raises(CommandTooLong, match=f"limit of {MAX_COMMAND_BYTES}"):
        tr.run(["echo", "a" * MAX_COMMAND_BYTES], 10)
    ledger("bad_input", "local command over the device command length limit")


def test_local_timeout_says_killed_only_after_checking(tmp_path):
    from edgeq.errors import RemoteCommandError
    from edgeq.transport import LocalTransport

    with pytest.raises(RemoteCommandError, match=r"was killed \(checked gone\)"):
        LocalTransport().run(["sh", "-c", "sleep 300 & wait"], timeout=1.0)
