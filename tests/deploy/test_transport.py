"""Transports against real processes and a real sshd: commands, quoting, host keys, connect errors."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest

from edgeq.errors import AuthError, ConnectError, HostKeyError, RemoteCommandError, UsageError
from edgeq.transport import LocalTransport, SSHOptions, SSHTransport, fingerprint, parse_host
from tests.deploy.sshd_helper import free_port, keygen


def test_parse_host_forms():
    assert parse_host("pi") == (None, "pi", None)
    assert parse_host("pi@raspberrypi.local:2222") == ("pi", "raspberrypi.local", 2222)
    assert parse_host("[::1]:22") == (None, "::1", 22)


@pytest.mark.parametrize("bad", ["pi;reboot", "a b", "-oProxyCommand=x", "pi@", "host:99999", "$(id)@h"])
def test_parse_host_rejects_what_cannot_be_valid(bad, ledger):
    with pytest.raises(UsageError) as exc:
        parse_host(bad)
    assert "\n" not in str(exc.value) and "--host" in str(exc.value)
    ledger("bad_input", f"--host {bad}")


@pytest.mark.parametrize("argv", [[], ["echo", "a\0b"]])
def test_commands_that_cannot_be_sent_are_refused(argv, ledger):
    with pytest.raises(UsageError) as exc:
        SSHTransport("pi@127.0.0.1:1", SSHOptions(ssh_config="/nonexistent")).run(argv, 5)
    assert "\n" not in str(exc.value)
    ledger("bad_input", "empty command" if not argv else "NUL byte in a command argument")


def test_local_run_captures_status_and_output(tmp_path):
    res = LocalTransport().run(["sh", "-c", "echo out; echo err >&2; exit 3"], 5, check=False)
    assert (res.exit_status, res.stdout.strip(), res.stderr.strip()) == (3, "out", "err")
    with pytest.raises(RemoteCommandError) as exc:
        LocalTransport().run(["sh", "-c", "echo boom >&2; exit 3"], 5)
    assert exc.value.exit_status == 3 and "boom" in exc.value.output_tail


def test_local_run_times_out():
    with pytest.raises(RemoteCommandError, match="timed out after 0.3 s"):
        LocalTransport().run(["sleep", "5"], 0.3)


def test_local_run_reports_signal():
    res = LocalTransport().run(["sh", "-c", "kill -SEGV $$"], 5, check=False)
    assert res.signal == "SIGSEGV"


@pytest.mark.ssh
def test_ssh_run_quotes_every_argument(sshd, ssh_options, tmp_path):
    marker = tmp_path / "pwned"
    nasty = f"x; touch {marker}; $(touch {marker}) `touch {marker}` '\""
    with SSHTransport(sshd.spec, ssh_options) as tr:
        res = tr.run(["printf", "%s", nasty], 10)
        assert res.stdout == nasty
        res = tr.run(["sh", "-c", "kill -KILL $$"], 10, check=False)
        assert res.signal == "SIGKILL"
        with pytest.raises(RemoteCommandError, match="timed out"):
            tr.run(["sleep", "10"], 0.5)
        # The connection still works after a timed-out command.
        assert tr.run(["echo", "ok"], 10).stdout.strip() == "ok"
    assert not marker.exists()


@pytest.mark.ssh
def test_unknown_host_key_refused_with_fingerprint(sshd, ssh_options, tmp_path):
    empty = tmp_path / "kh_empty"
    empty.write_text("")
    opts = replace(ssh_options, known_hosts=str(empty))
    with pytest.raises(HostKeyError) as exc:
        SSHTransport(sshd.spec, opts).connect()
    import paramiko

    expected = fingerprint(paramiko.PKey.from_type_string(*_split(sshd.host_key_pub)))
    assert expected in str(exc.value) and "--accept-new-host-key" in str(exc.value)
    assert empty.read_text() == ""


@pytest.mark.ssh
def test_accept_new_host_key_records_it(sshd, ssh_options, tmp_path):
    kh = tmp_path / "sub" / "known_hosts"  # parent created like OpenSSH does
    opts = replace(ssh_options, known_hosts=str(kh), accept_new_host_key=True)
    with SSHTransport(sshd.spec, opts) as tr:
        assert tr.run(["true"], 10).ok
    assert sshd.host_key_pub.split()[1] in kh.read_text()
    assert f"[127.0.0.1]:{sshd.port}" in kh.read_text()
    # Now known: a plain connect (no accept-new) works.
    with SSHTransport(sshd.spec, replace(opts, accept_new_host_key=False)) as tr:
        assert tr.run(["true"], 10).ok


@pytest.mark.ssh
@pytest.mark.parametrize("accept_new", [False, True])
def test_changed_host_key_always_refused(sshd, ssh_options, tmp_path, accept_new):
    other = keygen(tmp_path / "other_host_key")
    kh = tmp_path / "kh_changed"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    before = kh.read_text()
    with pytest.raises(HostKeyError, match="CHANGED") as exc:
        SSHTransport(sshd.spec, replace(ssh_options, known_hosts=str(kh), accept_new_host_key=accept_new)).connect()
    assert "ssh-keygen" in str(exc.value)
    assert kh.read_text() == before


@pytest.mark.ssh
def test_connection_refused(ssh_options):
    with pytest.raises(ConnectError, match="connection refused"):
        SSHTransport(f"root@127.0.0.1:{free_port()}", ssh_options).connect()


@pytest.mark.ssh
def test_silent_server_times_out(ssh_options):
    with socket.socket() as srv:  # accepts (kernel backlog) but never says a word
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        with pytest.raises(ConnectError, match="banner|timed out"):
            SSHTransport(f"root@127.0.0.1:{port}", replace(ssh_options, connect_timeout=1.0)).connect()


@pytest.mark.ssh
def test_wrong_key_is_an_auth_error(sshd, ssh_options):
    with pytest.raises(AuthError) as exc:
        SSHTransport(sshd.spec, replace(ssh_options, identity=str(sshd.wrong_key))).connect()
    assert "BEGIN" not in str(exc.value)  # no key material in messages


@pytest.mark.ssh
def test_ssh_config_alias(sshd, ssh_options, tmp_path):
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host mypi\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
                   f"  IdentityFile {sshd.client_key}\n")
    with SSHTransport("mypi", replace(ssh_options, identity=None, ssh_config=str(cfg))) as tr:
        assert tr.run(["echo", "hi"], 10).stdout.strip() == "hi"


def _split(pub: str):
    import base64

    kind, b64 = pub.split()[:2]
    return kind, base64.b64decode(b64)
