"""Activation, rollback and the device lock, against a real sshd with the device venv."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.deploy import deploy, rollback
from edgeq.errors import DeviceBusy, DeviceError
from tests.fleet.conftest import active, sha

pytestmark = pytest.mark.ssh


def test_deploy_activates_and_keeps_previous_then_rollback(opts, model_a, model_b, fleet, tmp_path, device_python,
                                                           ledger):
    remote = tmp_path / "device"
    first = deploy(model_a, opts)
    assert first.activation == {"activated": True, "switched": True, "active": sha(model_a), "previous": None,
                                "path": f"{remote}/current/model.tflite"}
    assert active(remote) == sha(model_a)
    second = deploy(model_b, opts)
    doc = second.to_dict()
    assert doc["activation"]["active"] == sha(model_b) and doc["activation"]["previous"] == sha(model_a)
    # What an application on the device loads:
    assert (remote / "current" / "model.tflite").read_bytes() == model_b.read_bytes()
    assert os.readlink(remote / "current") == f"models/{sha(model_b)}"
    assert os.readlink(remote / "previous") == f"models/{sha(model_a)}"
    # Re-deploying the active model switches nothing.
    again = deploy(model_b, opts)
    assert again.activation["switched"] is False and again.transfer["model_bytes_sent"] == 0

    back = rollback(opts)
    assert (back.active, back.previous, back.rolled_back_from) == (sha(model_a), sha(model_b), sha(model_b))
    assert back.to_dict()["schema"] == "edgeq.rollback/1" and back.to_dict()["active"] == sha(model_a)
    assert active(remote) == sha(model_a)
    assert not (remote / "lock").exists()

    # The CLI rolls forward again (rollback swaps current and previous).
    res = CliRunner().invoke(main, ["rollback", "--host", fleet.servers[0].spec, "--identity", str(fleet.client_key),
                                    "--known-hosts", opts.ssh.known_hosts, "--python", device_python,
                                    "--remote-dir", str(remote), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["active"] == sha(model_b) and active(remote) == sha(model_b)
    ledger("model_kept", "rollback")


def test_rollback_without_previous_is_a_clean_error(opts, model_a, tmp_path):
    deploy(model_a, opts)
    with pytest.raises(DeviceError, match="no previous model"):
        rollback(opts)
    assert active(tmp_path / "device") == sha(model_a)


def test_no_activate_measures_without_switching(opts, model_a, model_b, tmp_path, ledger):
    deploy(model_a, opts)
    res = deploy(model_b, replace(opts, activate=False))
    assert res.activation["activated"] is False and res.activation["active"] == sha(model_a)
    assert res.latency_ms.count >= 5
    assert active(tmp_path / "device") == sha(model_a)
    assert (tmp_path / "device" / "models" / sha(model_b) / "model.tflite").is_file()
    ledger("model_kept", "no-activate")


def test_concurrent_deploy_to_one_device_gets_busy(opts, model_a, model_b, tmp_path, ledger):
    remote = tmp_path / "device"
    deploy(model_a, opts)
    second: dict = {}

    def during(ev):
        # While the first deploy holds the lock and measures, a second one starts.
        if ev.stage == "measure" and "error" not in second:
            try:
                deploy(model_a, opts)
                second["error"] = None
            except DeviceBusy as exc:
                second["error"] = exc

    first = deploy(model_b, opts, during)
    err = second["error"]
    assert isinstance(err, DeviceBusy), err
    text = str(err)
    assert "busy" in text and "another deploy holds its lock" in text and str(os.getpid()) in text
    assert first.activation["active"] == sha(model_b) and active(remote) == sha(model_b)
    assert not (remote / "lock").exists()
    ledger("fault", "concurrent deploy")


def _fake_lock(remote, since: float, controller_id: str = "another-controller", pid: int = 1) -> None:
    (remote / "lock").mkdir(parents=True)
    (remote / "lock" / "owner.json").write_text(json.dumps(
        {"token": "t0", "user": "ci", "controller": "elsewhere", "controller_id": controller_id, "pid": pid,
         "model": "ab" * 32, "since": since}))


def test_fresh_lock_of_another_controller_is_busy_and_stale_one_is_broken(opts, model_a, tmp_path, ledger):
    remote = tmp_path / "device"
    _fake_lock(remote, time.time())
    with pytest.raises(DeviceBusy, match="by ci on elsewhere"):
        deploy(model_a, opts)
    assert (remote / "lock" / "owner.json").is_file()  # someone else's lock is left alone
    (remote / "lock" / "owner.json").unlink()
    (remote / "lock").rmdir()
    _fake_lock(remote, time.time() - 4000)  # older than lock_stale_s (1800 s)
    res = deploy(model_a, opts)
    assert any("stale device lock" in w and "older than" in w for w in res.warnings), res.warnings
    assert active(remote) == sha(model_a)
    ledger("fault", "stale lock")
