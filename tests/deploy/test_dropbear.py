"""Devices that are not a stock OpenSSH Debian: real Dropbear servers with BusyBox sh, no pkill, with and without
an sftp-server (see tests/deploy/dropbear_helper.py), and the device venv (numpy<2 + tflite-runtime 2.14)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

import edgeq.transport as transport_mod
import edgeq.transport.ssh_upload as upload_mod
from edgeq.deploy import DeployOptions, deploy
from edgeq.errors import CommandTooLong, ConnectError, DeviceError, RemoteCommandError
from edgeq.transport import MAX_COMMAND_BYTES, SSHTransport, posix_command, wire_command
from edgeq.transport.wire import run_script
from tests.deploy.conftest import tree
from tests.deploy.dropbear_helper import Dropbear, dropbear, dropbear_sftp  # noqa: F401 - fixtures
from tests.deploy.sshd_helper import gone_within

FAST = dict(min_seconds=0.05, min_warmup_seconds=0.02, runs=5, reference=False)


def _opts(server: Dropbear, device_python: str, tmp_path: Path, remote: Path, **kw) -> DeployOptions:
    return DeployOptions(host=server.spec, python=device_python, remote_dir=str(remote),
                         ssh=server.options(tmp_path), **FAST, **kw)


def _leftovers(remote: Path) -> list[str]:
    """The lock and temp files a deploy must not leave behind after a failure with the link up."""
    return [p for p in tree(remote) if ".tmp-" in p or p.startswith("lock")] + \
        [p.name for p in remote.glob("lock*")] if remote.exists() else []


@pytest.mark.ssh
def test_deploy_to_dropbear_without_sftp_sends_over_the_exec_channel(dropbear, device_python, tmp_path, model_a,
                                                                     ledger):
    remote = tmp_path / "device"
    opts = _opts(dropbear, device_python, tmp_path, remote)
    tr = SSHTransport(dropbear.spec, opts.ssh)
    events = []
    res = deploy(model_a, opts, events.append, transport=tr)
    assert tr.transfer == "exec"
    doc = res.to_dict()
    assert doc["runtime"]["name"] == "tflite_runtime" and doc["latency_ms"]["count"] >= 5
    assert doc["transfer"]["model_bytes_sent"] == model_a.stat().st_size
    assert (remote / "models" / res.model["sha256"] / "model.tflite").read_bytes() == model_a.read_bytes()
    # Progress was reported for the exec transfer too, ending at the full size.
    ups = [e for e in events if e.stage == "upload"]
    assert ups and ups[-1].done == model_a.stat().st_size
    assert _leftovers(remote) == []  # no lock, no temp file
    ledger("fault", "device without SFTP (Dropbear, no sftp-server): exec-channel transfer")


@pytest.mark.ssh
def test_deploy_to_dropbear_with_sftp_uses_sftp(dropbear_sftp, device_python, tmp_path, model_a):
    remote = tmp_path / "device"
    opts = _opts(dropbear_sftp, device_python, tmp_path, remote)
    tr = SSHTransport(dropbear_sftp.spec, opts.ssh)
    res = deploy(model_a, opts, transport=tr)
    assert tr.transfer == "sftp"
    assert (remote / "models" / res.model["sha256"] / "model.tflite").read_bytes() == model_a.read_bytes()
    assert _leftovers(remote) == []


@pytest.mark.ssh
def test_sftp_refusal_is_remembered_per_connection(dropbear, tmp_path):
    # After the server refused SFTP once, later files go straight over exec (and removal works without SFTP).
    src = tmp_path / "blob"
    src.write_bytes(b"x" * 1000)
    calls = []
    with SSHTransport(dropbear.spec, dropbear.options(tmp_path)) as tr:
        real = tr.uploads.sftp

        def counting(seconds):
            calls.append(seconds)
            return real(seconds)

        tr.uploads.sftp = counting
        assert tr.transfer is None
        for i in range(3):
            assert tr.put(src, str(tmp_path / f"out{i}"), 20) == 1000
        assert tr.transfer == "exec" and len(calls) == 1
        tr.remove(str(tmp_path / "out0"))
    assert not (tmp_path / "out0").exists() and (tmp_path / "out1").read_bytes() == b"x" * 1000


@pytest.mark.ssh
def test_a_corrupted_exec_transfer_is_caught_by_sha256(dropbear, device_python, tmp_path, model_a, monkeypatch,
                                                       ledger):
    # The device writes something else than it was sent (a bad storage driver, a broken cat): every zero
    # byte becomes 1, so the size still matches and only the sha256 on the device can tell.
    monkeypatch.setattr(upload_mod, "EXEC_PUT_SCRIPT",
                        "set -C; tr '\\000' '\\001' > \"$1\" || exit $?; wc -c < \"$1\"")
    remote = tmp_path / "device"
    with pytest.raises(DeviceError, match="failed verification") as exc:
        deploy(model_a, _opts(dropbear, device_python, tmp_path, remote))
    assert not isinstance(exc.value, ConnectError)
    assert not (remote / "models").exists() or not list((remote / "models").rglob("model.tflite"))
    assert _leftovers(remote) == []
    ledger("fault", "exec-channel transfer corrupted on the device (caught by sha256)")


@pytest.mark.ssh
def test_a_transfer_refused_with_the_link_up_leaves_no_lock_and_no_temp_files(dropbear, device_python, tmp_path,
                                                                              model_a, monkeypatch, ledger):
    # The server has no SFTP and refuses the write as well: the link is up, so the deploy cleans up
    # after itself (lock released, temp file removed) instead of leaving the device locked.
    monkeypatch.setattr(upload_mod, "EXEC_PUT_SCRIPT", "echo 'write refused' >&2; exit 1")
    remote = tmp_path / "device"
    with pytest.raises(DeviceError, match="write refused") as exc:
        deploy(model_a, _opts(dropbear, device_python, tmp_path, remote))
    assert not isinstance(exc.value, ConnectError)
    assert (remote / "models").exists()  # the probe ran: the device directory is there
    assert _leftovers(remote) == []
    ledger("fault", "transfer refused with the link up (no lock or temp file left)")


@pytest.mark.ssh
def test_a_timed_out_command_is_killed_under_dropbear_and_busybox(dropbear, tmp_path, ledger):
    # Dropbear does not make the session shell a process group leader and BusyBox has no pkill.
    argv = ["sh", "-c", f"sleep 300 & echo $! > {tmp_path}/child; sleep 301 & echo $! > {tmp_path}/child2; "
                        f"echo $$ > {tmp_path}/parent; wait"]
    with SSHTransport(dropbear.spec, dropbear.options(tmp_path)) as tr:
        with pytest.raises(RemoteCommandError, match="timed out after 1.5 s") as exc:
            tr.run(argv, timeout=1.5)
        pids = [int((tmp_path / n).read_text()) for n in ("parent", "child", "child2")]
        # The device is this machine: what it ran must be gone, and the message says so only then.
        try:
            assert gone_within(pids, 1), "the timed-out command still runs on the device"
        finally:
            for pid in pids:  # whatever survived a failed kill is this test's to end
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        assert "was killed on the device" in str(exc.value) and "checked gone" in str(exc.value)
        assert tr.run(["echo", "ok"], 10).stdout == "ok\n"
    ledger("fault", "command timed out under Dropbear/BusyBox (killed, checked gone)")


def test_the_kill_message_says_may_still_be_running_unless_the_device_confirmed(monkeypatch):
    # "killed" only on the device's word that every process is gone; otherwise the pid that may still run.
    from edgeq.transport import Result

    tr = SSHTransport.__new__(SSHTransport)
    tr.host, tr.options = "dev", transport_mod.SSHOptions()
    answers = {"ok": Result("k", 0, "EDGEQ-KILLED 3\n", ""), "alive": Result("k", 3, "EDGEQ-ALIVE 4242\n", ""),
               "odd": Result("k", 0, "", "")}
    for key, expected in (("ok", "was killed on the device (pid 77 and 2 processes it started; checked gone)"),
                          ("alive", "may still be running on the device (pid 77; still alive after SIGKILL: pid 4242)"),
                          ("odd", "may still be running on the device (pid 77")):
        monkeypatch.setattr(tr, "_execute", lambda *a, _r=answers[key], **k: _r, raising=False)
        assert expected in tr._kill_remote(77)
    assert "may still be running" in tr._kill_remote(None)


@pytest.mark.ssh
def test_a_command_over_the_length_limit_is_refused_before_it_is_sent(dropbear, tmp_path, ledger):
    def argv(n: int) -> list[str]:
        return ["sh", "-c", "exit 0", "sh", "a" * n]

    overhead = len(wire_command(run_script(posix_command(argv(1)), "0" * 16))) - 1
    with SSHTransport(dropbear.spec, dropbear.options(tmp_path)) as tr:
        assert tr.run(argv(MAX_COMMAND_BYTES - overhead), 20).ok  # exactly at the limit: runs
        with pytest.raises(CommandTooLong, match=f"over edgeq's limit of {MAX_COMMAND_BYTES}"):
            tr.run(argv(MAX_COMMAND_BYTES - overhead + 1), 20)
        # Dropbear itself drops a request over 9,000 bytes; edgeq never sends one. Characters that are
        # not safe on the wire count four times (octal escapes).
        with pytest.raises(CommandTooLong):
            tr.run(["echo", "é" * 1100], 20)
        assert tr.run(["echo", "ok"], 10).stdout == "ok\n"  # the connection is fine
    ledger("bad_input", "device command over the Dropbear length limit")


@pytest.mark.ssh
def test_a_link_lost_mid_exec_upload_says_the_device_stays_locked_until_when_and_how_to_clear(
        dropbear, device_python, tmp_path, model_b, ledger):
    from tests.faultproxy import FaultProxy

    big = tmp_path / "big.tflite"
    big.write_bytes(model_b.read_bytes() + bytes(1 << 20))  # the runtime ignores trailing bytes
    remote = tmp_path / "device"
    with FaultProxy(dropbear.port) as proxy:
        kh = tmp_path / "kh_proxy"
        kh.write_text(f"[127.0.0.1]:{proxy.port} {dropbear.host_key_pub}\n")
        opts = replace(_opts(dropbear, device_python, tmp_path, remote), host=f"root@127.0.0.1:{proxy.port}")
        opts = replace(opts, ssh=replace(opts.ssh, known_hosts=str(kh)), upload_timeout=20.0)

        def cut_on_upload(ev) -> None:
            if ev.stage == "upload" and ev.done and not proxy.tripped.is_set():
                proxy.arm("cut", 0)

        with pytest.raises(ConnectError) as exc:
            deploy(big, opts, cut_on_upload)
        text = str(exc.value)
        # Only a lost link leaves the lock, and the message says so: until when, and how to clear it.
        assert proxy.tripped.is_set()
        assert (remote / "lock").is_dir()
        assert "the device stays locked" in text and " UTC at the latest" in text
        assert f"rm -rf {remote}/lock" in text and "\n" not in text
        # A new deploy from this machine takes the dead deploy's lock over and sweeps its temp file.
        proxy.arm("pass")
        res = deploy(big, opts)
    assert any("stale device lock" in w for w in res.warnings), res.warnings
    assert _leftovers(remote) == []
    ledger("fault", "link cut mid exec-channel upload (lock left, message says until when and how to clear)")


@pytest.mark.ssh
def test_an_exec_upload_past_its_timeout_is_killed_and_cleaned_up(dropbear, device_python, tmp_path, model_a,
                                                                   monkeypatch, ledger):
    # A device that stops reading (a hung disk): the upload phase deadline fires, the writer is killed, and
    # with the link up the lock and the temp file are gone afterwards.
    marker = tmp_path / "writer_pid"
    monkeypatch.setattr(upload_mod, "EXEC_PUT_SCRIPT",
                        f"echo $$ > {marker}; sleep 120; cat > \"$1\"; wc -c < \"$1\"")
    remote = tmp_path / "device"
    t0 = time.monotonic()
    with pytest.raises(RemoteCommandError, match="timed out after") as exc:
        deploy(model_a, _opts(dropbear, device_python, tmp_path, remote, upload_timeout=2.0))
    assert time.monotonic() - t0 < 20
    assert "was killed on the device" in str(exc.value)
    assert gone_within([int(marker.read_text())], 2)
    assert _leftovers(remote) == []
    ledger("fault", "exec-channel upload past its timeout (writer killed, lock released)")
