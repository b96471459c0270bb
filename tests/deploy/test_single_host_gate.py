"""`deploy --gate-accuracy/--gate-p99-ms` for a single host (CI gates), at the library level: a real local deploy
on the device venv. A failed gate returns a result (the report is written), does not activate the new model, and
says so; the verdict is the device protocol's, the same the rollout and the Ansible collection give."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from edgeq.deploy import DeployOptions, Outcome, check_options, deploy
from edgeq.errors import UsageError
from edgeq.report import write_report

pytestmark = pytest.mark.slow


def _active(remote) -> str | None:
    link = remote / "current"
    return link.resolve().name if link.is_symlink() else None


def test_a_failed_single_host_gate_writes_the_report_and_does_not_activate(digits_int8_tflite, digits_float_tflite,
                                                                          digits_eval_npz, device_python, tmp_path,
                                                                          ledger):
    remote = tmp_path / "device"
    base = DeployOptions(python=device_python, remote_dir=str(remote), eval_data=str(digits_eval_npz), runs=5,
                         min_seconds=0.05, reference=False)
    first = deploy(digits_float_tflite, base)
    assert first.gate is None and first.outcome is Outcome.OK and first.to_dict()["gate"] is None
    before = _active(remote)
    assert before == first.model["sha256"]

    failed = deploy(digits_int8_tflite, replace(base, gate_accuracy=0.5,
                                                 gate_p99_ms=1e-6))  # no inference is that fast
    assert failed.outcome is Outcome.GATE_FAILED
    assert failed.gate["passed"] is False and failed.gate["accuracy"] > 0.5
    assert [r.split(" ")[0] for r in failed.gate["reasons"]] == ["p99"]
    assert failed.gate["p99_ms"] == failed.latency_ms.p99 and failed.gate["runs"] == failed.latency_ms.count
    assert failed.activation["activated"] is False and failed.activation["skipped"].startswith("gate failed: p99")
    assert _active(remote) == before  # the model that was active stays active
    assert any("health gate failed" in w and "not activated" in w for w in failed.warnings)
    doc = json.loads(write_report(failed, tmp_path / "rep").json.read_text())
    assert doc["schema"] == "edgeq.deploy/1" and doc["outcome"] == "gate_failed"
    assert doc["gate"]["reasons"] == failed.gate["reasons"] and doc["gate"]["p99_ms_max"] == 1e-6

    passed = deploy(digits_int8_tflite, replace(base, gate_accuracy=0.5,
                                                 gate_p99_ms=1e4))
    assert passed.outcome is Outcome.OK and passed.gate["passed"] is True and passed.gate["reasons"] == []
    assert passed.activation["activated"] is True and _active(remote) == passed.model["sha256"]
    ledger("fault", "single-host deploy failing its health gate")


@pytest.mark.parametrize("opts,match", [
    ({"gate_accuracy": 0.9}, "needs --eval"),
    ({"gate_accuracy": 90.0, "eval_data": "x.npz"}, "fraction from 0 to 1"),
    ({"gate_accuracy": float("nan"), "eval_data": "x.npz"}, "fraction from 0 to 1"),
    ({"gate_p99_ms": 0.0}, "positive number of milliseconds"),
    ({"gate_p99_ms": float("inf")}, "positive number of milliseconds"),
])
def test_single_host_gate_options_are_checked_before_anything_connects(opts, match, ledger):
    with pytest.raises(UsageError, match=match):
        check_options(DeployOptions(**opts))
    ledger("bad_input", "deploy: an impossible single-host gate threshold")


def test_the_cli_exits_with_the_gate_code_and_writes_the_report(digits_int8_tflite, digits_eval_npz, device_python,
                                                                tmp_path):
    from click.testing import CliRunner

    from edgeq.cli import main

    out, remote = tmp_path / "rep", tmp_path / "device"
    res = CliRunner().invoke(main, ["deploy", str(digits_int8_tflite), "--eval", str(digits_eval_npz), "--python",
                                    device_python, "--remote-dir", str(remote), "--runs", "5", "--gate-p99-ms",
                                    "0.000001", "-o", str(out)])
    assert res.exit_code == 7, res.output
    doc = json.loads((out / "report.json").read_text())
    assert doc["outcome"] == "gate_failed" and doc["activation"]["activated"] is False
    assert _active(remote) is None  # nothing was active before, and nothing is now
