"""A sweep measured on the emulated Raspberry Pi (tests/devices/testbed.sh): latency labelled emulated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeq.calibration import DataOptions
from edgeq.sweep import SweepOptions, sweep
from tests.devices.conftest import device_facts, start_devices, stop_devices

pytestmark = [pytest.mark.arm64, pytest.mark.slow, pytest.mark.ssh]


@pytest.fixture(scope="module")
def pi():
    started = start_devices([0])
    yield device_facts(0)
    stop_devices(started)


def test_sweep_on_the_emulated_pi_labels_latency_emulated(pi, tmp_path, digits_keras, calib_npy, digits_eval_npz):
    from edgeq.deploy import DeployOptions
    from edgeq.transport import SSHOptions

    known = tmp_path / "known_hosts"
    known.write_text(pi.known_hosts.read_text())
    device = DeployOptions(host=pi.host, python=pi.python_litert, remote_dir="~/.edgeq-sweep-test", runs=5,
                           warmup=0, min_seconds=0.05, min_warmup_seconds=0.0, max_runs=50,
                           ssh=SSHOptions(identity=str(pi.key), known_hosts=str(known), connect_timeout=10.0,
                                          ssh_config=str(tmp_path / "no_ssh_config"), allow_agent=False))
    out = tmp_path / "out"
    result = sweep(digits_keras, calib_npy, digits_eval_npz, "rpi4",
                   SweepOptions(output_dir=str(out), recipes=("fp32", "int8", "int16x8"), device=device,
                                max_drop=5.0, data=DataOptions(samples=30), eval_samples=60))
    assert result.device["emulated"] is True and result.device["arch"] == "aarch64"
    for r in result.recipes:
        assert r.device is not None and r.device["emulated"] is True, r.device_error
        assert r.latency_label == "emulated" and r.energy.latency_source == "emulated-device"
        assert r.device["accuracy"] == r.host["accuracy"]  # accuracy carries over from the emulator
    assert not any("not the rpi4" in w for w in result.warnings)  # aarch64 is the target's architecture
    page = Path(result.html_path).read_text()
    assert "emulated device" in page and "device-measured p50" not in page
    assert json.loads(Path(result.json_path).read_text())["device"]["emulated"] is True
