"""Device state after faults, on the runner itself (the device side): a crash at any step of a switch leaves the
old or the new (current, previous) pair, never a mix; a device with the older two-link layout keeps working; a
`current` edgeq did not make is never switched over; a lock written while the clock was ahead still goes stale."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from edgeq.deploy import runner_source

RUNNER = Path(__file__).resolve().parents[2] / "deploy" / "runner.py"


def runner(python: str, *args: str) -> dict:
    out = subprocess.run([python, "-", *args], input=runner_source(), capture_output=True, timeout=60)
    return json.loads(out.stdout)


def _device(remote: Path, n: int) -> list[str]:
    """A device directory with ``n`` verified models (no activation yet) and a lock held by token T."""
    for sub in ("", "models", "data", "runner"):
        (remote / sub).mkdir(mode=0o700, exist_ok=True)
    shas = []
    for i in range(n):
        data = f"model {i}".encode()
        digest = hashlib.sha256(data).hexdigest()
        (remote / "models" / digest).mkdir(mode=0o700)
        (remote / "models" / digest / "model.tflite").write_bytes(data)
        shas.append(digest)
    (remote / "lock").mkdir(mode=0o700)
    (remote / "lock" / "owner.json").write_text(json.dumps({"token": "T", "since": time.time()}))
    return shas


def _state(python: str, remote: Path) -> tuple:
    doc = runner(python, "state", "--dir", str(remote))
    return doc["activation"]["current"], doc["activation"]["previous"]


# Run the real runner in a child that dies (os._exit: no cleanup, no finally) at the N-th filesystem change of
# a switch: each symlink made, each rename. Every step of an activation is a place a power cut can land.
CRASH = r"""
import os, sys, importlib.util
spec = importlib.util.spec_from_file_location("runner_crash", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
crash_at, calls = int(sys.argv[2]), [0]
def dying(real):
    def call(*a, **k):
        calls[0] += 1
        if calls[0] == crash_at:
            os._exit(9)
        return real(*a, **k)
    return call
for name in ("symlink", "replace", "rename"):
    setattr(mod.os, name, dying(getattr(os, name)))
sys.exit(mod.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("crash_at", [1, 2, 3, 4, 5, 6])
def test_a_crash_at_any_step_of_a_switch_keeps_current_and_previous_together(device_python, tmp_path, crash_at,
                                                                            ledger):
    remote = tmp_path / "device"
    a, b, c = _device(remote, 3)
    for sha in (a, b):
        assert runner(device_python, "activate", "--dir", str(remote), "--sha", sha, "--token", "T")["ok"]
    assert _state(device_python, remote) == (b, a)
    p = subprocess.run([device_python, "-c", CRASH, str(RUNNER), str(crash_at), "activate", "--dir", str(remote),
                        "--sha", c, "--token", "T"], capture_output=True, timeout=60)
    crashed = p.returncode == 9
    after = _state(device_python, remote)
    # The old pair or the new pair: never current new with previous two models old.
    assert after in ((b, a), (c, b)), (crash_at, after, [x[:8] for x in (a, b, c)])
    assert os.readlink(remote / "current") == f"models/{after[0]}"  # what applications load agrees
    # Rollback goes to the model that really was active before the current one.
    back = runner(device_python, "rollback", "--dir", str(remote), "--token", "T")
    assert back["ok"] and back["active"] == after[1] and back["previous"] == after[0], back
    assert _state(device_python, remote) == (after[1], after[0])
    if crashed:
        ledger("fault", f"device crash at step {crash_at} of an activation")
        ledger("model_kept", f"device crash at step {crash_at} of an activation")


def test_a_device_with_the_older_two_link_layout_keeps_working(device_python, tmp_path, ledger):
    remote = tmp_path / "device"
    a, b, c = _device(remote, 3)
    # What an older edgeq left: two links, no previous record beside the models.
    os.symlink(f"models/{b}", remote / "current")
    os.symlink(f"models/{a}", remote / "previous")
    assert _state(device_python, remote) == (b, a)
    back = runner(device_python, "rollback", "--dir", str(remote), "--token", "T")
    assert back["ok"] and (back["active"], back["previous"]) == (a, b)
    doc = runner(device_python, "activate", "--dir", str(remote), "--sha", c, "--token", "T")
    assert doc["ok"] and (doc["active"], doc["previous"]) == (c, a)
    assert os.readlink(remote / "previous") == f"models/{a}"  # the link is still kept for older readers
    back = runner(device_python, "rollback", "--dir", str(remote), "--token", "T")
    assert back["ok"] and (back["active"], back["previous"]) == (a, c)
    ledger("fault", "device activated by an older edgeq (two-link layout)")


@pytest.mark.parametrize("kind", ["link outside models", "regular file"])
def test_a_current_edgeq_did_not_make_is_never_switched_over(device_python, tmp_path, kind, ledger):
    remote = tmp_path / "device"
    a, b = _device(remote, 2)
    assert runner(device_python, "activate", "--dir", str(remote), "--sha", a, "--token", "T")["ok"]
    (remote / "current").unlink()
    mine = tmp_path / "hand-made"
    mine.mkdir()
    (mine / "model.tflite").write_bytes(b"the user's own model")
    if kind == "regular file":
        (remote / "current").write_bytes(b"not a link")
    else:
        os.symlink(str(mine), remote / "current")
    doc = runner(device_python, "activate", "--dir", str(remote), "--sha", b, "--token", "T")
    assert doc["ok"] is False and doc["kind"] == "foreign", doc
    assert str(remote / "current") in doc["error"] and "move it aside" in doc["error"] and "\n" not in doc["error"]
    if kind == "regular file":
        assert (remote / "current").read_bytes() == b"not a link"
    else:
        assert os.readlink(remote / "current") == str(mine)
        assert str(mine) in doc["error"]
    state = runner(device_python, "state", "--dir", str(remote))["activation"]
    assert state["current"] is None and state["foreign"].startswith("a "), state  # reported, not hidden
    # A rollback would replace it too: refused the same way.
    back = runner(device_python, "rollback", "--dir", str(remote), "--token", "T")
    assert back["ok"] is False and back["kind"] == "foreign", back
    ledger("bad_input", f"current is a {kind} edgeq did not make")
    ledger("model_kept", f"current is a {kind} edgeq did not make")


def _boot() -> tuple[str, float, float]:
    """This boot's id, the uptime now, and an uptime far enough back to make a lock stale (with its age)."""
    up = float(Path("/proc/uptime").read_text().split()[0])
    assert up > 4, "the machine booted seconds ago"
    old = max(0.0, up - 4000)
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip(), up, old


def _lock(remote: Path, owner: dict) -> None:
    for sub in ("", "models", "data", "runner"):
        (remote / sub).mkdir(mode=0o700, exist_ok=True)
    (remote / "lock").mkdir(mode=0o700)
    (remote / "lock" / "owner.json").write_text(json.dumps(owner))


def _take(python: str, remote: Path, stale: float) -> dict:
    return runner(python, "lock", "--dir", str(remote), "--token", "B", "--owner", "{}", "--stale-after", repr(stale))


FUTURE = time.time() + 10 * 365 * 86400  # written while the device clock was ten years ahead


def test_a_lock_written_while_the_clock_was_ahead_goes_stale(device_python, tmp_path, ledger):
    boot, up, old = _boot()
    stale = (up - old) / 2
    # Same boot: the device's uptime dates the lock, whatever the wall clock said.
    remote = tmp_path / "same-boot"
    _lock(remote, {"token": "t0", "since": FUTURE, "boot_id": boot, "uptime_s": old})
    doc = _take(device_python, remote, stale)
    assert doc["ok"] and doc["broke_stale"]["token"] == "t0", doc
    # ...and a fresh one from the same clock is not stale.
    remote = tmp_path / "fresh"
    _lock(remote, {"token": "t0", "since": FUTURE, "boot_id": boot, "uptime_s": up})
    doc = _take(device_python, remote, stale)
    assert doc["ok"] is False and doc["kind"] == "busy", doc
    # A lock with no boot id (an older runner) from the future dates nothing: it is as old as this boot.
    remote = tmp_path / "legacy"
    _lock(remote, {"token": "t0", "since": FUTURE})
    doc = _take(device_python, remote, stale)
    assert doc["ok"] and doc["broke_stale"]["token"] == "t0", doc
    ledger("fault", "lock written while the device clock was ahead")


def test_a_heartbeat_from_a_clock_that_was_ahead_does_not_keep_a_lock_forever(device_python, tmp_path, ledger):
    boot, up, old = _boot()
    stale = (up - old) / 3
    remote = tmp_path / "device"
    _lock(remote, {"token": "t0", "since": time.time() - 4000, "boot_id": boot, "uptime_s": old})
    beat = remote / "lock" / "heartbeat"
    beat.write_text(json.dumps({"boot_id": boot, "uptime_s": old + stale}))
    os.utime(beat, (FUTURE, FUTURE))  # its file time says ten years from now
    doc = _take(device_python, remote, stale)
    assert doc["ok"] and doc["broke_stale"]["token"] == "t0", doc
    # A real refresh still keeps a lock alive however old it is.
    remote = tmp_path / "refreshed"
    _lock(remote, {"token": "t0", "since": time.time() - 9000, "boot_id": boot, "uptime_s": old})
    assert runner(device_python, "refresh", "--dir", str(remote), "--token", "t0")["ok"]
    doc = _take(device_python, remote, stale)
    assert doc["ok"] is False and doc["kind"] == "busy", doc
    ledger("fault", "heartbeat written while the device clock was ahead")
