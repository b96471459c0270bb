"""known_hosts as OpenSSH writes it: markers, hashed names, wildcards, the global file; new keys written safely."""

from __future__ import annotations

import base64
import os
import stat
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from edgeq.transport import known_hosts as kh
from edgeq.errors import HostKeyError
from edgeq.transport import SSHTransport
from tests.deploy.sshd_helper import keygen, ssh_opts, ssh_server  # noqa: F401 - pytest fixtures


@pytest.fixture(scope="module")
def other_key(tmp_path_factory) -> str:
    """``ssh-ed25519 AAAA...`` of a key no server here uses."""
    path = keygen(tmp_path_factory.mktemp("other") / "key")
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


def _blob(pub: str) -> bytes:
    return base64.b64decode(pub.split()[1])


# ------------------------------------------------------------------ parsing


def test_marker_lines_and_garbage_do_not_make_the_file_unreadable(tmp_path, other_key, ledger):
    path = tmp_path / "known_hosts"
    path.write_text(
        "# comment\n\n"
        f"@cert-authority *.example.org {other_key}\n"
        f"@revoked * {other_key}\n"
        f"@future-marker host {other_key}\n"
        "garbage\n"
        "host ssh-ed25519 !!!notbase64!!!\n"
        f"host ssh-rsa {other_key.split()[1]}\n"  # type does not match the key
        f"pi.local,10.0.0.5 {other_key} comment words\n")
    known = kh.KnownHosts.load([path])
    assert [e.marker for e in known.entries] == ["cert-authority", "revoked", None]
    assert len(known.skipped) == 4 and all(s.startswith(f"{path}:") for s in known.skipped)
    ledger("bad_input", "known-hosts-marker-and-garbage-lines")


def test_patterns_wildcards_negation_and_hashes(tmp_path, other_key):
    path = tmp_path / "known_hosts"
    path.write_text(f"*.lab,!secret.lab {other_key}\n"
                    f"{kh.hash_name('[10.1.1.1]:2222')} {other_key}\n"
                    f"[192.168.?.7]:22,PI {other_key}\n")
    known = kh.KnownHosts.load([path])
    assert known.for_name("a.lab") and not known.for_name("secret.lab")
    assert known.for_name("[10.1.1.1]:2222") and not known.for_name("10.1.1.1")
    assert known.for_name("[192.168.3.7]:22") and known.for_name("pi")  # names are case-insensitive


def test_revoked_key_wins_over_a_plain_entry(tmp_path, other_key):
    path = tmp_path / "known_hosts"
    path.write_text(f"pi {other_key}\n@revoked pi {other_key}\n")
    check = kh.KnownHosts.load([path]).check("pi", other_key.split()[0], _blob(other_key))
    assert check.verdict is kh.Verdict.REVOKED and check.entry.lineno == 2


def test_unreadable_file_is_one_error(tmp_path, ledger):
    from edgeq.errors import InputError

    d = tmp_path / "dir_not_file"
    d.mkdir()
    with pytest.raises(InputError, match="cannot read known hosts file") as exc:
        kh.KnownHosts.load([d])
    assert "\n" not in str(exc.value)
    ledger("bad_input", "known_hosts is a directory")


# ------------------------------------------------------------------ against a real sshd


@pytest.mark.ssh
def test_cert_authority_line_does_not_break_the_connection(ssh_server, ssh_opts, other_key, ledger):
    path = Path(ssh_opts.known_hosts)
    path.write_text(f"@cert-authority * {other_key}\n" + path.read_text() + "@revoked nothing.example ssh-rsa AAAA\n")
    with SSHTransport(ssh_server.spec, ssh_opts) as tr:
        assert tr.run(["true"], 10).ok
    ledger("bad_input", "known-hosts-cert-authority-line")


@pytest.mark.ssh
@pytest.mark.parametrize("accept_new", [False, True])
def test_revoked_host_key_is_refused_even_if_listed(ssh_server, ssh_opts, accept_new, ledger):
    path = Path(ssh_opts.known_hosts)
    path.write_text(path.read_text() + f"@revoked * {ssh_server.host_key_pub}\n")
    before = path.read_text()
    with pytest.raises(HostKeyError, match="REVOKED") as exc:
        SSHTransport(ssh_server.spec, replace(ssh_opts, accept_new_host_key=accept_new)).connect()
    assert f"{path}:2" in str(exc.value)
    assert path.read_text() == before
    ledger("fault", "ssh-revoked-host-key")


@pytest.mark.ssh
def test_global_known_hosts_file_is_read(ssh_server, ssh_opts, tmp_path):
    user = tmp_path / "user_kh"
    user.write_text("")
    system = tmp_path / "ssh_known_hosts"
    system.write_text(ssh_server.known_hosts_line())
    opts = replace(ssh_opts, known_hosts=str(user), global_known_hosts=(str(system),))
    with SSHTransport(ssh_server.spec, opts) as tr:
        assert tr.run(["true"], 10).ok
    assert user.read_text() == ""  # known from the global file: nothing recorded


@pytest.mark.ssh
def test_global_file_default_is_etc_ssh(ssh_server, ssh_opts):
    tr = SSHTransport(ssh_server.spec, replace(ssh_opts, global_known_hosts=None))
    assert [str(p) for p in tr._conf.global_known_hosts] == ["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"]


@pytest.mark.ssh
def test_changed_key_names_the_file_and_line(ssh_server, ssh_opts, other_key):
    path = Path(ssh_opts.known_hosts)
    path.write_text(f"# first line\n[127.0.0.1]:{ssh_server.port} {other_key}\n")
    with pytest.raises(HostKeyError, match="CHANGED") as exc:
        SSHTransport(ssh_server.spec, replace(ssh_opts, accept_new_host_key=True)).connect()
    assert f"{path}:2" in str(exc.value) and "ssh-keygen -f" in str(exc.value)


@pytest.mark.ssh
def test_new_key_is_hashed_in_a_hashed_file(ssh_server, ssh_opts, other_key, ledger):
    path = Path(ssh_opts.known_hosts)
    path.write_text(f"{kh.hash_name('other.example')} {other_key}\n")
    path.chmod(0o640)
    with SSHTransport(ssh_server.spec, replace(ssh_opts, accept_new_host_key=True)) as tr:
        assert tr.run(["true"], 10).ok
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("|1|")
    assert "127.0.0.1" not in path.read_text()  # the name is not written in clear
    assert kh.KnownHosts.load([path]).for_name(f"[127.0.0.1]:{ssh_server.port}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the file keeps its mode
    # and the hashed entry is good for the next connection
    with SSHTransport(ssh_server.spec, ssh_opts) as tr:
        assert tr.run(["true"], 10).ok


@pytest.mark.ssh
def test_hash_known_hosts_option_hashes_a_new_file(ssh_server, ssh_opts, tmp_path):
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host *\n  HashKnownHosts yes\n")
    path = tmp_path / "new" / "known_hosts"
    opts = replace(ssh_opts, ssh_config=str(cfg), known_hosts=str(path), accept_new_host_key=True)
    with SSHTransport(ssh_server.spec, opts) as tr:
        assert tr.run(["true"], 10).ok
    assert path.read_text().startswith("|1|")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700


# ------------------------------------------------------------------ writing


def test_record_is_atomic_and_keeps_every_concurrent_entry(tmp_path, other_key):
    path = tmp_path / "known_hosts"
    path.write_text("existing ssh-ed25519 " + other_key.split()[1])  # no final newline
    kind, b64 = other_key.split()
    threads = [threading.Thread(target=kh.record, args=(path, f"host{i}", kind, b64)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = sorted(line.split()[0] for line in path.read_text().splitlines())
    assert names == sorted(["existing", *(f"host{i}" for i in range(16))])
    assert not [p for p in tmp_path.iterdir() if p.name != "known_hosts"]  # no temp files left


def test_record_through_a_symlink_writes_its_target(tmp_path, other_key):
    real = tmp_path / "dotfiles" / "known_hosts"
    real.parent.mkdir()
    real.write_text("")
    link = tmp_path / "known_hosts"
    link.symlink_to(real)
    kh.record(link, "pi", *other_key.split())
    assert link.is_symlink() and real.read_text() == f"pi {other_key}\n"


@pytest.mark.ssh
def test_known_hosts_that_cannot_be_written_is_one_error(ssh_server, ssh_opts, tmp_path, ledger):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where ~/.ssh should be")
    opts = replace(ssh_opts, known_hosts=str(blocker / "known_hosts"), accept_new_host_key=True)
    with pytest.raises(HostKeyError, match="cannot (read|record) .*not_a_dir") as exc:
        SSHTransport(ssh_server.spec, opts).connect()
    assert "\n" not in str(exc.value)
    ledger("bad_input", "known-hosts-unwritable")


def test_record_into_something_that_is_not_a_file_leaves_it_alone(tmp_path, other_key):
    # UserKnownHostsFile /dev/null (here a FIFO, which is safe to make): never replaced by a regular file.
    fifo = tmp_path / "null"
    os.mkfifo(fifo)
    kh.record(fifo, "pi", *other_key.split())
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name != "null"]


def test_loading_a_fifo_does_not_wait_for_a_writer(tmp_path, other_key):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = threading.Event()
    result: list[kh.KnownHosts] = []
    threading.Thread(target=lambda: (result.append(kh.KnownHosts.load([fifo])), done.set()), daemon=True).start()
    assert done.wait(5), "reading a FIFO as known_hosts blocked"
    assert result[0].entries == ()
