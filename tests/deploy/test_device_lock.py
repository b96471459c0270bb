"""The device lock and the activation links, exercised on the runner itself (the device side): breaking a
stale lock is atomic, a long deploy's lock is not stale, a full disk during activation keeps both links, the
temp-file sweep never follows a symlink."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeq.deploy import runner_source

RUNNER = Path(__file__).resolve().parents[2] / "deploy" / "runner.py"


def runner(python: str, *args: str) -> dict:
    out = subprocess.run([python, "-", *args], input=runner_source(), capture_output=True, timeout=60)
    return json.loads(out.stdout)


def _fake_lock(remote: Path, since: float, token: str = "t0", **extra) -> None:
    for sub in ("", "models", "data", "runner"):
        (remote / sub).mkdir(mode=0o700, exist_ok=True, parents=True)
    (remote / "lock").mkdir()
    (remote / "lock" / "owner.json").write_text(json.dumps({"token": token, "user": "ci", "since": since, **extra}))


def _lock_args(remote: Path, token: str, stale: float = 1800.0) -> list[str]:
    return ["lock", "--dir", str(remote), "--token", token, "--owner", "{}", "--stale-after", repr(stale)]


def test_two_deploys_breaking_one_stale_lock_never_both_hold_it(device_python, tmp_path, ledger):
    remote = tmp_path / "device"
    _fake_lock(remote, time.time() - 4000)
    # B reads the stale owner; before B moves it aside, A breaks the same stale lock and takes a fresh one.
    a_cmd = " ".join(shlex.quote(a) for a in [device_python, str(RUNNER), *_lock_args(remote, "A")])
    b = runner(device_python, *_lock_args(remote, "B"), "--race-hook", a_cmd)
    owner = json.loads((remote / "lock" / "owner.json").read_text())
    assert owner["token"] == "A", owner  # A's fresh lock is still A's
    assert b["ok"] is False and b["kind"] == "busy", b  # B saw that and backed off
    assert not [p for p in remote.iterdir() if p.name.startswith("lock.") and (p / "owner.json").exists()
                and json.loads((p / "owner.json").read_text()).get("token") == "A"]
    ledger("fault", "two deploys break one stale lock at once")


def test_a_lock_is_stale_only_after_its_holders_deadline_and_heartbeat(device_python, tmp_path, ledger):
    remote = tmp_path / "device"
    # Older than --stale-after, but its holder announced a 2 h deadline: a slow deploy, not a dead one.
    _fake_lock(remote, time.time() - 4000, ttl_s=7200)
    doc = runner(device_python, *_lock_args(remote, "B"))
    assert doc["ok"] is False and doc["kind"] == "busy", doc
    # A holder that keeps refreshing its lock is never stale, however long it runs.
    (remote / "lock" / "owner.json").write_text(json.dumps({"token": "t0", "since": time.time() - 9000}))
    assert runner(device_python, "refresh", "--dir", str(remote), "--token", "t0")["ok"]
    doc = runner(device_python, *_lock_args(remote, "B"))
    assert doc["ok"] is False and doc["kind"] == "busy", doc
    # Without a heartbeat or a deadline, the old rule still frees a dead deploy's lock.
    (remote / "lock" / "heartbeat").unlink()
    doc = runner(device_python, *_lock_args(remote, "B"))
    assert doc["ok"] and doc["broke_stale"]["token"] == "t0"
    ledger("fault", "a slow deploy outlives the stale-lock age")


def test_the_sweep_never_follows_a_symlinked_models_dir(device_python, tmp_path, ledger):
    remote = tmp_path / "device"
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "a.tmp-1").write_text("keep")
    (victim / "sub" / "b.tmp-2").write_text("keep")
    remote.mkdir(mode=0o700)
    (remote / "models").symlink_to(victim, target_is_directory=True)
    doc = runner(device_python, *_lock_args(remote, "A"))
    assert doc["ok"] is False and doc["kind"] == "unsafe" and "symlink" in doc["error"], doc
    assert (victim / "a.tmp-1").exists() and (victim / "sub" / "b.tmp-2").exists()
    ledger("bad_input", "models/ is a symlink to someone else's files")


@pytest.fixture
def rmod():
    spec = importlib.util.spec_from_file_location("edgeq_runner_lock_test", RUNNER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _device_with_models(remote: Path, rmod, shas: list[str]) -> None:
    import hashlib

    for sub in ("", "models", "data", "runner"):
        (remote / sub).mkdir(mode=0o700, exist_ok=True)
    real = []
    for i, _ in enumerate(shas):
        data = f"model {i}".encode()
        digest = hashlib.sha256(data).hexdigest()
        (remote / "models" / digest).mkdir()
        (remote / "models" / digest / "model.tflite").write_bytes(data)
        real.append(digest)
    shas[:] = real


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_full_disk_during_activation_keeps_current_and_previous(rmod, tmp_path, monkeypatch, fail_at, ledger):
    remote = tmp_path / "device"
    shas = ["", "", ""]
    _device_with_models(remote, rmod, shas)
    os.symlink(f"models/{shas[0]}", remote / "current")
    os.symlink(f"models/{shas[1]}", remote / "previous")
    (remote / "lock").mkdir()
    (remote / "lock" / "owner.json").write_text(json.dumps({"token": "T", "since": time.time()}))
    real_symlink = os.symlink
    calls = {"n": 0}

    def symlink(src, dst, *a, **k):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_symlink(src, dst, *a, **k)

    monkeypatch.setattr(rmod.os, "symlink", symlink)
    args = rmod.protocol.parse_args(["activate", "--dir", str(remote), "--sha", shas[2], "--token", "T"])
    with pytest.raises(rmod.RunnerError, match="No space left"):
        rmod.activation.activate(args)
    assert os.readlink(remote / "current") == f"models/{shas[0]}"
    assert os.readlink(remote / "previous") == f"models/{shas[1]}"  # the rollback target survives
    assert not [p for p in remote.iterdir() if ".tmp-" in p.name]
    ledger("fault", f"disk full at link {fail_at} of activation")
    ledger("model_kept", f"disk full at link {fail_at} of activation")


def test_runner_modes_refuse_without_the_lock(device_python, tmp_path, ledger):
    remote = tmp_path / "device"
    _fake_lock(remote, time.time(), token="someone")
    doc = runner(device_python, "activate", "--dir", str(remote), "--sha", "a" * 64, "--token", "me")
    assert doc["ok"] is False and doc["kind"] == "lock"
    doc = runner(device_python, "unlock", "--dir", str(remote), "--token", "me")
    assert doc["ok"] is False and (remote / "lock" / "owner.json").exists()
    ledger("bad_input", "activate/unlock without holding the lock")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
