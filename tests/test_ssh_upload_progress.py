"""Upload progress in bytes: over SFTP (OpenSSH, Dropbear with sftp-server), over the exec channel (Dropbear
without SFTP) and to the local machine: events start with the first bytes sent, end at the file's size, and
come at a bounded rate."""

from __future__ import annotations

import os
import time

import pytest

from edgeq.transport import LocalTransport, SSHTransport
from edgeq.transport.base import PROGRESS_INTERVAL_S
from tests.deploy.dropbear_helper import dropbear, dropbear_sftp  # noqa: F401 - pytest fixtures
from tests.deploy.sshd_helper import ssh_opts, ssh_server  # noqa: F401 - pytest fixtures

# 8 MiB: 128 SFTP writes of 64 KiB, several hundred sends into Dropbear's 24 KB window.
SIZE = 8 * 1024 * 1024


@pytest.fixture
def blob(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(os.urandom(SIZE))
    return path


def _put_and_check(tr, blob, dest, transfer: str) -> None:
    seen: list[tuple[float, object]] = []
    started = time.monotonic()
    sent = tr.put(blob, str(dest), timeout=120, progress=lambda ev: seen.append((time.monotonic(), ev)),
                  label="model")
    took = time.monotonic() - started
    assert sent == SIZE and dest.read_bytes() == blob.read_bytes() and tr.transfer == transfer
    events = [ev for _, ev in seen]
    assert all((ev.stage, ev.unit, ev.total, ev.host, ev.message) == ("upload", "bytes", SIZE, tr.host, "model")
               for ev in events), events[:3]
    done = [ev.done for ev in events]
    assert 0 < done[0] < SIZE and done[-1] == SIZE and done == sorted(done) and len(set(done)) == len(done)
    # Bounded rate: between the first and the last event, at most one per PROGRESS_INTERVAL_S.
    times = [t for t, _ in seen[1:-1]]
    assert all(b - a >= PROGRESS_INTERVAL_S * 0.99 for a, b in zip(times, times[1:])), times
    assert len(events) <= 3 + took / PROGRESS_INTERVAL_S, (len(events), took)


@pytest.mark.ssh
def test_sftp_upload_reports_bytes_at_a_bounded_rate(ssh_server, ssh_opts, blob, tmp_path):
    with SSHTransport(ssh_server.spec, ssh_opts) as tr:
        _put_and_check(tr, blob, tmp_path / "sftp.out", "sftp")


@pytest.mark.ssh
def test_dropbear_sftp_upload_reports_bytes_at_a_bounded_rate(dropbear_sftp, blob, tmp_path):
    with SSHTransport(dropbear_sftp.spec, dropbear_sftp.options(tmp_path)) as tr:
        _put_and_check(tr, blob, tmp_path / "dropbear-sftp.out", "sftp")


@pytest.mark.ssh
def test_exec_channel_upload_reports_bytes_at_a_bounded_rate(dropbear, blob, tmp_path):
    # No sftp-server: the bytes go on the stdin of `cat` over the exec channel, a few KB per send.
    with SSHTransport(dropbear.spec, dropbear.options(tmp_path)) as tr:
        _put_and_check(tr, blob, tmp_path / "exec.out", "exec")


def test_local_upload_reports_bytes_at_a_bounded_rate(blob, tmp_path):
    _put_and_check(LocalTransport(), blob, tmp_path / "local.out", "local")


@pytest.mark.ssh
@pytest.mark.parametrize("kind", ["local", "exec"])
def test_an_empty_file_reports_its_end_at_zero_of_zero(kind, dropbear, tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    events = []
    with (LocalTransport() if kind == "local" else SSHTransport(dropbear.spec, dropbear.options(tmp_path))) as tr:
        assert tr.put(empty, str(tmp_path / "out"), 10, progress=events.append) == 0
        assert tr.transfer == kind
    assert (tmp_path / "out").read_bytes() == b""
    assert [(e.done, e.total, e.message, e.unit) for e in events] == [(0, 0, "empty", "bytes")]
