"""Faults injected deterministically against a real sshd: silent and cut links, killed runners, corrupt
uploads, malformed models, a full disk, transient connect failures. After each: the active model is
intact, no partial file sits at a final path, and the next deploy completes."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.deploy import deploy
from edgeq.errors import AuthError, ConnectError, DeviceError, RunnerCrashed
from tests.faultproxy import FaultProxy
from tests.fleet.conftest import PASSPHRASE, active, partial_files, sha

pytestmark = pytest.mark.ssh


@pytest.fixture
def proxied(fleet, opts, tmp_path):
    """(proxy, options) with the deploy going through a FaultProxy in front of servers[0]."""
    server = fleet.servers[0]
    with FaultProxy(server.port) as proxy:
        kh = fleet.known_hosts(tmp_path / "kh_proxy", {proxy.port: server.port})
        yield proxy, replace(opts, host=f"{server.user}@127.0.0.1:{proxy.port}",
                             ssh=replace(opts.ssh, known_hosts=str(kh)))


def _arm_on_upload(proxy: FaultProxy, mode: str):
    """Arm ``mode`` the first time the model upload reports progress (the link fails mid-upload)."""
    def on(ev):
        if ev.stage == "upload" and ev.message == "model" and not proxy.tripped.is_set() and proxy.mode == "pass":
            proxy.arm(mode, 0)
    return on


@pytest.mark.parametrize("mode", ["stall", "cut"])
def test_link_fails_mid_upload(proxied, model_a, model_big, tmp_path, mode, ledger):
    proxy, opts = proxied
    remote = tmp_path / "device"
    deploy(model_a, opts)
    upload_deadline = 3.0
    t0 = time.monotonic()
    with pytest.raises(ConnectError) as exc:
        deploy(model_big, replace(opts, upload_timeout=upload_deadline), _arm_on_upload(proxy, mode))
    took = time.monotonic() - t0
    assert proxy.tripped.is_set()
    # A silent link is noticed within the upload phase deadline (plus the phases before it).
    assert took < upload_deadline + 3.0, took
    assert opts.host.split("@")[1] in str(exc.value) or "127.0.0.1" in str(exc.value)
    assert active(remote) == sha(model_a)
    assert not (remote / "models" / sha(model_big) / "model.tflite").exists()
    assert partial_files(remote) == []
    # The next deploy breaks the dead deploy's lock, sweeps its temp file and completes.
    proxy.arm("pass")
    res = deploy(model_big, opts)
    assert res.activation["active"] == sha(model_big) and active(remote) == sha(model_big)
    assert any("stale device lock" in w and "holder is gone" in w for w in res.warnings), res.warnings
    assert res.transfer["stale_temp_files_removed"] >= 1
    assert not [p for p in remote.rglob("*") if ".tmp-" in p.name]
    ledger("fault", f"{mode} mid-upload")
    ledger("model_kept", f"{mode} mid-upload")


def test_cut_mid_run(proxied, model_a, model_b, tmp_path, ledger):
    proxy, opts = proxied
    remote = tmp_path / "device"
    deploy(model_a, opts)

    def on(ev):
        if ev.stage == "measure":
            threading.Timer(0.4, proxy.cut_now).start()

    with pytest.raises(ConnectError):
        deploy(model_b, replace(opts, min_seconds=3.0, max_runs=10**8), on)
    assert proxy.tripped.is_set()
    assert active(remote) == sha(model_a)
    res = deploy(model_b, opts)
    assert active(remote) == sha(model_b) and res.activation["previous"] == sha(model_a)
    ledger("fault", "cut mid-run")
    ledger("model_kept", "cut mid-run")


def _runner_pids(marker: str) -> list[int]:
    """Runners in ``run`` mode (``python - run``; their arguments travel on stdin) that mapped a model under
    ``marker`` (the runtime maps the model file)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
                if cmd[1:3] != [b"-", b"run"]:
                    continue
                maps = (d / "maps").read_bytes()
            except OSError:
                continue
            if marker.encode() in maps:
                pids.append(int(d.name))
    return pids


def test_killed_runner(opts, model_a, model_b, tmp_path, ledger):
    remote = tmp_path / "device"
    deploy(model_a, opts)
    killed = []

    def kill_runner():
        deadline = time.monotonic() + 60  # generous: a loaded machine can be slow to start the runner
        while not killed and time.monotonic() < deadline:
            for pid in _runner_pids(str(remote)):
                os.kill(pid, signal.SIGKILL)  # the device-side runner this test's deploy started
                killed.append(pid)
            time.sleep(0.02)

    def on(ev):
        if ev.stage == "measure":
            threading.Thread(target=kill_runner, daemon=True).start()

    with pytest.raises(RunnerCrashed, match="SIGKILL"):
        deploy(model_b, replace(opts, min_seconds=30.0, max_runs=10**8, run_timeout=90.0), on)
    assert killed
    assert active(remote) == sha(model_a)
    assert not (remote / "lock").exists()  # the link was fine: the lock was released
    assert active(remote) == sha(model_a)
    deploy(model_b, opts)
    assert active(remote) == sha(model_b)
    ledger("fault", "runner killed")
    ledger("model_kept", "runner killed")


def test_corrupt_upload_detected_by_checksum(opts, model_a, model_b, tmp_path, ledger):
    remote = tmp_path / "device"
    deploy(model_a, opts)

    def corrupt(ev):
        # Between the upload and the on-device check, flip a byte of the staged file (bad storage, a bad copy).
        if ev.stage == "verify":
            for p in (remote / "models").rglob("*.tmp-*"):
                data = bytearray(p.read_bytes())
                data[len(data) // 2] ^= 0x01
                p.write_bytes(bytes(data))

    with pytest.raises(DeviceError, match="checksum mismatch"):
        deploy(model_b, opts, corrupt)
    assert not (remote / "models" / sha(model_b) / "model.tflite").exists()
    assert not [p for p in remote.rglob("*") if ".tmp-" in p.name]
    assert active(remote) == sha(model_a)
    deploy(model_b, opts)
    assert active(remote) == sha(model_b)
    ledger("fault", "corrupt upload")
    ledger("model_kept", "corrupt upload")


def _malformed(model: Path, kind: str) -> bytes:
    data = model.read_bytes()
    if kind == "truncated-half":
        return data[: len(data) // 2]
    if kind == "truncated-200":
        return data[:200]
    if kind == "garbage":
        return b"\x1c\x00\x00\x00TFL3" + bytes(range(256)) * 8
    offset = int(kind.split("-")[-1])  # bit-flipped at offset (0: root table offset, crashes the runtime)
    flipped = bytearray(data)
    flipped[offset] ^= 0xFF
    return bytes(flipped)


@pytest.mark.parametrize("kind", ["truncated-half", "truncated-200", "garbage", "flipped-0", "flipped-16",
                                  "flipped-800"])
def test_malformed_model_reported_and_previous_stays_active(opts, model_a, model_b, tmp_path, kind, ledger):
    remote = tmp_path / "device"
    deploy(model_a, opts)
    bad = tmp_path / f"{kind}.tflite"
    bad.write_bytes(_malformed(model_b, kind))
    with pytest.raises(DeviceError) as exc:
        deploy(bad, opts)
    text = str(exc.value)
    assert "killed by SIG" in text or "could not load" in text or "failed on" in text, text
    if kind == "flipped-0":
        assert isinstance(exc.value, RunnerCrashed) and "SIGSEGV" in text
    assert active(remote) == sha(model_a)
    assert not (remote / "lock").exists()
    ledger("bad_input", kind)
    ledger("model_kept", kind)


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tinyfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("the full-disk test mounts a tmpfs and needs root (CI runs as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_active_model_and_next_deploy_completes(opts, model_a, model_big, tiny_fs, ledger):
    remote = tiny_fs / "edgeq"
    o = replace(opts, remote_dir=str(remote))
    deploy(model_a, o)
    with pytest.raises(DeviceError, match="disk full|cannot write|space"):
        deploy(model_big, o)  # 1 MiB into a 512 KiB filesystem
    assert active(remote) == sha(model_a)
    assert partial_files(remote) == []
    assert not list((remote / "models" / sha(model_big)).glob("model.tflite*"))  # neither final nor temp file
    assert not (remote / "models" / sha(model_big) / "model.tflite").exists()
    assert not [p for p in remote.rglob("*") if ".tmp-" in p.name]
    subprocess.run(["mount", "-o", "remount,size=4m", str(tiny_fs)], check=True)
    deploy(model_big, o)
    assert active(remote) == sha(model_big)
    ledger("fault", "full disk")
    ledger("model_kept", "full disk")


def test_transient_connect_failures_are_retried_auth_is_not(fleet, opts, model_a, tmp_path, ledger):
    server = fleet.servers[0]
    with FaultProxy(server.port, fail_first=2) as proxy:
        kh = fleet.known_hosts(tmp_path / "kh", {proxy.port: server.port})
        o = replace(opts, host=f"{server.user}@127.0.0.1:{proxy.port}",
                    ssh=replace(opts.ssh, known_hosts=str(kh), retry_backoff_s=0.1))
        res = deploy(model_a, o)
        assert res.transfer["connect_attempts"] == 3 and proxy.connections >= 3
    with FaultProxy(server.port) as proxy:
        kh = fleet.known_hosts(tmp_path / "kh2", {proxy.port: server.port})
        o = replace(opts, host=f"{server.user}@127.0.0.1:{proxy.port}",
                    ssh=replace(opts.ssh, known_hosts=str(kh), identity=str(fleet.wrong_key)))
        with pytest.raises(AuthError):
            deploy(model_a, o)
        assert proxy.connections == 1  # an authentication failure is never retried
    with FaultProxy(server.port, fail_first=10) as proxy:
        kh = fleet.known_hosts(tmp_path / "kh3", {proxy.port: server.port})
        o = replace(opts, host=f"{server.user}@127.0.0.1:{proxy.port}",
                    ssh=replace(opts.ssh, known_hosts=str(kh), retry_backoff_s=0.05))
        with pytest.raises(ConnectError, match="after 3 attempts"):
            deploy(model_a, o)
        assert proxy.connections == 3  # bounded: 1 try + 2 retries
    ledger("fault", "connection reset during connect")


def test_hung_host_is_bounded(fleet, opts, model_a, tmp_path, ledger):
    with FaultProxy(fleet.servers[0].port, mode="blackhole") as proxy:
        o = replace(opts, host=f"{fleet.servers[0].user}@127.0.0.1:{proxy.port}",
                    ssh=replace(opts.ssh, connect_timeout=1.0))
        t0 = time.monotonic()
        with pytest.raises(ConnectError, match="no SSH answer|timed out"):
            deploy(model_a, o)
        assert time.monotonic() - t0 < 4.0
    ledger("fault", "hung host")


@pytest.mark.parametrize("debug", [False, True])
def test_passphrase_never_shown(fleet, opts, model_a, tmp_path, monkeypatch, debug, ledger):
    server = fleet.servers[0]
    out = tmp_path / "report"
    base = (["--debug"] if debug else []) + [
        "deploy", str(model_a), "--host", server.spec, "--identity", str(fleet.passphrase_key),
        "--known-hosts", opts.ssh.known_hosts, "--python", opts.python, "--remote-dir", str(tmp_path / "device"),
        "--runs", "5", "--warmup", "0", "--connect-timeout", "3", "-o", str(out)]
    monkeypatch.setenv("EDGEQ_SSH_PASSPHRASE", "wrong " + PASSPHRASE[::-1])
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 4, res.output
    assert "wrong passphrase" in res.output or "authentication" in res.output
    assert PASSPHRASE[::-1] not in res.output and PASSPHRASE not in res.output
    monkeypatch.setenv("EDGEQ_SSH_PASSPHRASE", PASSPHRASE)
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 0, res.output
    assert PASSPHRASE not in res.output
    for p in out.rglob("*"):
        if p.is_file():
            assert PASSPHRASE not in p.read_text(errors="replace"), p
    assert PASSPHRASE not in server.log.read_text(errors="replace")
    ledger("bad_input", "wrong key passphrase")
