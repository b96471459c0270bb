"""A sweep that loses its device keeps its host-side results: sweep.json and sweep.html are written with the
device column marked failed and the reason, and the command exits 4 (the device-error code). Underneath,
``measure_models`` returns one entry per model: a model the device cannot run fails alone, a lost link keeps
the models measured before it."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.deploy import DeployOptions, DeployResult, measure_models
from edgeq.errors import ConnectError, DeviceError
from edgeq.transport import LocalTransport

FLEET_DATA = Path(__file__).resolve().parent / "fleet" / "data"
FAST = dict(runs=3, warmup=0, min_seconds=0.0, min_warmup_seconds=0.0, reference=False)


def _closed_port() -> int:
    """A port on 127.0.0.1 nobody listens on (bound, then closed: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sweep(model, calib, evaluation, out, *device_args):
    return CliRunner().invoke(main, ["sweep", str(model), "--calib", str(calib), "--eval", str(evaluation),
                                     "--target", "rpi4", "--recipes", "int8,fp32", "--samples", "20",
                                     "--eval-samples", "60", "--runs", "3", "--min-seconds", "0.01",
                                     "--max-drop", "5", "-o", str(out), *device_args])


def _assert_kept_and_marked(res, out: Path, reason: str) -> dict:
    assert res.exit_code == 4, res.output
    assert "Traceback" not in res.output
    last = res.output.rstrip().splitlines()[-1]
    assert last.startswith("error: the device failed during the sweep") and reason in last, last
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["device"]["status"] == "failed" and reason in doc["device"]["error"]
    assert doc["recommended"] is None and doc["reason"].startswith("the device failed")
    for r in doc["recipes"]:
        assert r["host"]["accuracy"] > 0.5 and r["size_bytes"] > 0  # the host-side results are kept
        assert r["device"] is None and reason in r["device_error"]
        assert r["verdict"].startswith("failed on the device")
    html = (out / "sweep.html").read_text()
    assert "FAILED, nothing measured there" in html and "Device failed" in html
    assert html.count(">failed</td>") == len(doc["recipes"])
    assert (out / "int8.tflite").is_file() and (out / "fp32.tflite").is_file()
    return doc


@pytest.mark.slow
def test_sweep_with_an_unreachable_device_keeps_host_results_and_exits_4(digits_keras, calib_npy,
                                                                         digits_eval_npz, tmp_path, ledger):
    out = tmp_path / "out"
    port = _closed_port()
    res = _sweep(digits_keras, calib_npy, digits_eval_npz, out, "--host", f"127.0.0.1:{port}",
                 "--known-hosts", str(tmp_path / "kh"), "--connect-timeout", "2")
    _assert_kept_and_marked(res, out, "refused")
    assert "device: 127.0.0.1" in res.output and "FAILED" in res.output
    ledger("fault", "sweep: device refuses connections")


@pytest.mark.slow
def test_sweep_with_a_missing_device_python_keeps_host_results_and_exits_4(digits_keras, calib_npy,
                                                                           digits_eval_npz, tmp_path, ledger):
    out = tmp_path / "out"
    res = _sweep(digits_keras, calib_npy, digits_eval_npz, out, "--local", "--python",
                 str(tmp_path / "no" / "python"), "--remote-dir", str(tmp_path / "device"))
    _assert_kept_and_marked(res, out, "no Python at")
    ledger("fault", "sweep: the device python does not exist")


# ----------------------------------------------------------- measure_models


class LinkLostAtRun(LocalTransport):
    """The local device, whose link is 'lost' at the n-th run (a ConnectError, as the SSH transport raises)."""

    def __init__(self, lose_at: int) -> None:
        super().__init__()
        self.lose_at = lose_at
        self.runs = 0
        self.probes = 0

    def run(self, argv, timeout, stdin=None, check=True):
        mode = argv[2] if len(argv) > 2 else ""
        self.probes += mode == "probe"
        if mode == "run":
            self.runs += 1
            if self.runs == self.lose_at:
                raise ConnectError("the SSH connection to test was lost during: run", host=self.host)
        return super().run(argv, timeout, stdin=stdin, check=check)


def test_a_model_the_device_cannot_run_fails_alone(tmp_path, device_python, ledger):
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(range(256)) * 8)
    tr = LinkLostAtRun(lose_at=0)
    got = measure_models([FLEET_DATA / "tiny_a.tflite", broken, FLEET_DATA / "tiny_b.tflite"],
                         DeployOptions(python=device_python, remote_dir=str(tmp_path / "d"), **FAST),
                         transport=tr)
    assert isinstance(got[0], DeployResult) and isinstance(got[2], DeployResult)
    assert isinstance(got[1], DeviceError) and "broken.tflite" in str(got[1])
    assert tr.probes == 1  # one session: no second probe to measure the rest
    assert not (tmp_path / "d" / "lock").exists()
    ledger("bad_input", "measure_models: one model the runtime rejects")


def test_a_lost_link_keeps_the_models_measured_before_it(tmp_path, device_python, ledger):
    tr = LinkLostAtRun(lose_at=2)
    got = measure_models([FLEET_DATA / "tiny_a.tflite", FLEET_DATA / "tiny_b.tflite", FLEET_DATA / "tiny_a.tflite"],
                         DeployOptions(python=device_python, remote_dir=str(tmp_path / "d"), **FAST),
                         transport=tr)
    assert isinstance(got[0], DeployResult) and got[0].latency_ms.count >= 3
    assert isinstance(got[1], ConnectError) and got[2] is got[1]
    assert "was lost during" in str(got[1])
    ledger("fault", "measure_models: link lost after the first model")


def test_a_lost_link_before_any_run_is_raised(tmp_path, device_python):
    tr = LinkLostAtRun(lose_at=1)
    with pytest.raises(ConnectError):
        measure_models([FLEET_DATA / "tiny_a.tflite"],
                       DeployOptions(python=device_python, remote_dir=str(tmp_path / "d"), **FAST), transport=tr)
