"""~/.ssh/config is honoured: ProxyJump, ProxyCommand, HostKeyAlias, UserKnownHostsFile; bad values are one line."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edgeq.errors import ConnectError, HostKeyError, UsageError
from edgeq.transport import SSHTransport
from tests.deploy.sshd_helper import free_port, ssh_opts, ssh_server  # noqa: F401 - pytest fixtures

pytestmark = pytest.mark.ssh

# A ProxyCommand: note that it ran (and what it was given), then relay stdin/stdout to HOST:PORT.
RELAY = r'''
import os, socket, sys, threading
host, port, note = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(note, "w") as f:
    f.write(f"{host} {port}\n")
    f.write("\n".join(sorted(k for k in os.environ)) + "\n")
s = socket.create_connection((host, port))
def up():
    while True:
        data = os.read(0, 65536)
        if not data:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(data)
threading.Thread(target=up, daemon=True).start()
while True:
    data = s.recv(65536)
    if not data:
        break
    os.write(1, data)
'''


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return path


def _device(sshd, extra: str = "") -> str:
    return (f"Host device\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
            f"  IdentityFile {sshd.client_key}\n{extra}")


def test_proxy_command_is_used(ssh_server, ssh_opts, tmp_path, monkeypatch):
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    note = tmp_path / "proxy_ran"
    monkeypatch.setenv("EDGEQ_SSH_PASSPHRASE", "do-not-leak")
    cfg = _config(tmp_path, _device(ssh_server, f"  ProxyCommand {sys.executable} {relay} %h %p {note}\n"))
    with SSHTransport("device", replace(ssh_opts, identity=None, ssh_config=str(cfg))) as tr:
        assert tr.run(["echo", "via proxy"], 10).stdout == "via proxy\n"
    lines = note.read_text().splitlines()
    assert lines[0] == f"127.0.0.1 {ssh_server.port}"
    assert "EDGEQ_SSH_PASSPHRASE" not in lines[1:]  # the ProxyCommand gets no secrets either
    assert "PATH" in lines[1:]


def test_proxy_command_that_fails_is_one_line_naming_it(ssh_server, ssh_opts, tmp_path, ledger):
    cfg = _config(tmp_path, _device(ssh_server, "  ProxyCommand sh -c 'echo no route to device >&2; exit 9'\n"))
    with pytest.raises(ConnectError) as exc:
        SSHTransport("device", replace(ssh_opts, identity=None, ssh_config=str(cfg), connect_retries=0)).connect()
    text = str(exc.value)
    assert "ProxyCommand" in text and "status 9" in text and "no route to device" in text
    assert "\n" not in text
    ledger("fault", "ssh-proxycommand-fails")


def test_proxy_jump_goes_through_the_jump_host(ssh_server, ssh_opts, tmp_path, ledger):
    cfg = _config(tmp_path, _device(ssh_server, "  ProxyJump bastion\n")
                  + f"Host bastion\n  HostName 127.0.0.1\n  Port {ssh_server.port}\n  User {ssh_server.user}\n"
                    f"  IdentityFile {ssh_server.client_key}\n")
    before = ssh_server.log.read_text().count("direct-tcpip")
    with SSHTransport("device", replace(ssh_opts, identity=None, ssh_config=str(cfg))) as tr:
        assert tr.run(["echo", "behind the bastion"], 10).stdout == "behind the bastion\n"
    # The sshd (as the jump host) was asked to forward a connection to the device.
    assert ssh_server.log.read_text().count("direct-tcpip") > before


def test_proxy_jump_chain_of_two_hops(ssh_server, ssh_opts, tmp_path):
    hop = f"{ssh_server.user}@127.0.0.1:{ssh_server.port}"
    cfg = _config(tmp_path, _device(ssh_server, f"  ProxyJump {hop},ssh://{hop}\n"))
    # No IdentityFile for the hops: they use the device's --identity.
    with SSHTransport("device", replace(ssh_opts, ssh_config=str(cfg))) as tr:
        assert tr.run(["echo", "two hops"], 10).stdout == "two hops\n"
        assert len(tr._jumps) == 2


def test_unreachable_jump_host_is_not_bypassed(ssh_server, ssh_opts, tmp_path, ledger):
    # The device itself is reachable directly; its config says to go through a bastion that is down.
    cfg = _config(tmp_path, _device(ssh_server, f"  ProxyJump {ssh_server.user}@127.0.0.1:{free_port()}\n"))
    with pytest.raises(ConnectError) as exc:
        SSHTransport("device", replace(ssh_opts, identity=None, ssh_config=str(cfg), connect_retries=0)).connect()
    assert "through ProxyJump" in str(exc.value) and "connection refused" in str(exc.value)
    ledger("fault", "ssh-proxyjump-down")


def test_jump_host_key_is_checked_too(ssh_server, ssh_opts, tmp_path):
    # Record the device under its HostKeyAlias only: the jump host (same server, no alias) is then unknown.
    kh = tmp_path / "kh_alias_only"
    kh.write_text(f"device-key {ssh_server.host_key_pub}\n")
    cfg = _config(tmp_path, _device(ssh_server, "  HostKeyAlias device-key\n  ProxyJump bastion\n")
                  + f"Host bastion\n  HostName 127.0.0.1\n  Port {ssh_server.port}\n  User {ssh_server.user}\n")
    with pytest.raises(HostKeyError, match="through ProxyJump .*unknown host key"):
        SSHTransport("device", replace(ssh_opts, identity=None, ssh_config=str(cfg), known_hosts=str(kh))).connect()


def test_host_key_alias_is_the_known_hosts_name(ssh_server, ssh_opts, tmp_path, ledger):
    kh = tmp_path / "kh_alias"
    kh.write_text(f"mypi-key {ssh_server.host_key_pub}\n")
    cfg = _config(tmp_path, _device(ssh_server, "  HostKeyAlias mypi-key\n"))
    opts = replace(ssh_opts, identity=None, ssh_config=str(cfg), known_hosts=str(kh))
    with SSHTransport("device", opts) as tr:
        assert tr.run(["true"], 10).ok
    # accept-new records under the alias, never as [127.0.0.1]:port
    kh2 = tmp_path / "kh_new"
    with SSHTransport("device", replace(opts, known_hosts=str(kh2), accept_new_host_key=True)) as tr:
        assert tr.run(["true"], 10).ok
    assert kh2.read_text() == f"mypi-key {ssh_server.host_key_pub}\n"


def test_user_known_hosts_file_from_config(ssh_server, ssh_opts, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.ssh/known_hosts does not know the device
    kh = tmp_path / "elsewhere" / "hosts"
    kh.parent.mkdir()
    kh.write_text(ssh_server.known_hosts_line())
    cfg = _config(tmp_path, _device(ssh_server, f"  UserKnownHostsFile /nonexistent/first {kh}\n"))
    with SSHTransport("device", replace(ssh_opts, identity=None, known_hosts=None, ssh_config=str(cfg))) as tr:
        assert tr.run(["true"], 10).ok
    assert not (tmp_path / "home" / ".ssh").exists()


def test_user_known_hosts_file_receives_new_keys(ssh_server, ssh_opts, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    kh = tmp_path / "cfg_known_hosts"
    cfg = _config(tmp_path, _device(ssh_server, f"  UserKnownHostsFile {kh}\n"))
    opts = replace(ssh_opts, identity=None, known_hosts=None, ssh_config=str(cfg), accept_new_host_key=True)
    with SSHTransport("device", opts) as tr:
        assert tr.run(["true"], 10).ok
    assert kh.read_text() == ssh_server.known_hosts_line()
    assert not (tmp_path / "home" / ".ssh" / "known_hosts").exists()


@pytest.mark.parametrize("line, what", [
    ("Port abc", "invalid Port 'abc'"),
    ("Port 70000", "invalid Port '70000'"),
    ("HostName bad;name", "invalid HostName"),
    ("ProxyJump user@", "invalid ProxyJump"),
    ("UserKnownHostsFile \"unterminated", "invalid userknownhostsfile"),
])
def test_bad_config_values_are_one_line_errors(ssh_server, ssh_opts, tmp_path, line, what, ledger):
    cfg = _config(tmp_path, f"Host device\n  {line}\n")
    with pytest.raises(UsageError) as exc:
        SSHTransport("device", replace(ssh_opts, ssh_config=str(cfg), known_hosts=None))
    assert what in str(exc.value) and str(cfg) in str(exc.value)
    assert "\n" not in str(exc.value)
    ledger("bad_input", f"ssh-config-{line.split()[0].lower()}-{line.split()[1][:8]}")


def test_proxy_command_and_proxy_jump_together_are_refused(ssh_opts, tmp_path, ledger):
    cfg = _config(tmp_path, "Host device\n  ProxyJump a\n  ProxyCommand nc %h %p\n")
    with pytest.raises(UsageError, match="both ProxyCommand and ProxyJump") as exc:
        SSHTransport("device", replace(ssh_opts, ssh_config=str(cfg)))
    assert "\n" not in str(exc.value)
    ledger("bad_input", "ssh-config ProxyCommand and ProxyJump together")


def test_cli_non_numeric_port_is_one_error_line(tmp_path, monkeypatch, ledger):
    from click.testing import CliRunner

    from edgeq.cli import main

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host mypi\n  Port twenty-two\n")
    monkeypatch.setenv("HOME", str(home))
    model = tmp_path / "m.tflite"
    model.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    res = CliRunner().invoke(main, ["deploy", str(model), "--host", "mypi"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error:") and "invalid Port 'twenty-two'" in lines[0]
    assert "Traceback" not in res.output
    ledger("bad_input", "ssh-config-port-cli")

