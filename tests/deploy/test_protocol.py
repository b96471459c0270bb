"""deploy/protocol.py: what the host, the runner and the Ansible collection share, checked on its own and on the
device venv (the runner imports the protocol sent ahead of it)."""

from __future__ import annotations

import json
import random
import subprocess

import numpy as np
import pytest

from edgeq._device import protocol
from edgeq.deploy import DeployResult, LatencyStats
from edgeq.device import DeviceClient, runner_source
from edgeq.errors import UsageError
from edgeq.transport import LocalTransport


@pytest.mark.parametrize("n", [1, 2, 3, 7, 50, 101, 1000])
def test_latency_statistics_are_numpys_without_numpy(n):
    rng = random.Random(n)
    samples = [rng.lognormvariate(0, 1) for _ in range(n)]
    st = protocol.latency(samples)
    a = np.asarray(samples, dtype=np.float64)
    for key, want in zip(("p50", "p90", "p99"), np.percentile(a, [50, 90, 99])):
        assert st[key] == pytest.approx(float(want), rel=1e-12, abs=0), key
    assert (st["min"], st["max"], st["count"]) == (a.min(), a.max(), n)
    assert st["mean"] == pytest.approx(a.mean(), rel=1e-12) and st["std"] == pytest.approx(a.std(), rel=1e-9)
    assert LatencyStats.from_samples(samples).p99 == st["p99"]  # the host's figures are the protocol's


def test_untrusted_samples_make_no_statistics():
    for bad in ([1.0, float("nan")], [1.0, 10 ** 400], [1.0, True], "1,2", None):
        assert protocol.latency(bad)["count"] == 0


def test_the_gate_verdict():
    doc = {"ok": True, "samples_ms": [1.0] * 98 + [5.0, 9.0], "eval": {"accuracy": 0.91}}
    ok = protocol.gate_verdict(doc, 0.9, 10.0)
    assert ok["passed"] and ok["reasons"] == [] and ok["accuracy"] == 0.91 and ok["runs"] == 100
    bad = protocol.gate_verdict(doc, 0.95, 2.0)
    assert not bad["passed"] and bad["reasons"] == ["accuracy 0.9100 < 0.95", "p99 5.040 ms > 2 ms"]
    crashed = protocol.gate_verdict({"ok": False, "error": "boom"}, None, None)
    assert not crashed["passed"] and crashed["reasons"] == ["smoke run from current failed: boom"]
    none = protocol.gate_verdict({"ok": True, "samples_ms": [], "eval": {"accuracy": 10 ** 400}}, 0.5, 1.0)
    assert none["reasons"] == ["no accuracy measured on the device (labels missing or not a classifier)",
                               "no latency samples from the gate run"]


def test_the_report_document_has_a_schema_and_every_field():
    doc = DeployResult("h", {}, {}, {}, LatencyStats.from_samples([1.0]), 0.0, 0.0, 10 ** 30, None, None, None, None,
                       {}, {}, "", 1.23456).to_dict()
    assert doc["schema"] == "edgeq.deploy/1" and set(doc) == {"schema", *protocol.REPORT_FIELDS}
    assert doc["duration_s"] == 1.235 and doc["peak_rss_bytes"] is None  # an absurd byte count is no count
    assert doc["outcome"] == "ok" and doc["gate"] is None
    with pytest.raises(TypeError, match="unknown fields: bogus"):
        protocol.report_document(bogus=1)


def test_run_arguments_are_built_and_checked_by_one_definition(ledger):
    argv = protocol.run_args("/m.tflite", runs=7, eval_path="/e.npz", max_eval_seconds=3, threads=2, xnnpack=False,
                             lock_dir="/d", token="t")
    ns = protocol.parse_args(["run", *argv])
    assert (ns.runs, ns.min_seconds, ns.eval, ns.max_eval_seconds, ns.threads, ns.no_xnnpack, ns.dir) == \
        (7, 1.0, "/e.npz", 3.0, 2, True, "/d")
    assert "--runs" not in protocol.run_args("/m.tflite", timed=False) and \
        protocol.parse_args(["run", *protocol.run_args("/m.tflite", timed=False)]).eval_only
    with pytest.raises(protocol.RunnerError, match="invalid choice"):
        protocol.run_args("/m.tflite", runtime="bogus")

    class Refuses(LocalTransport):
        def run(self, *a, **k):  # pragma: no cover - must not be reached
            raise AssertionError("sent to the device")

    with pytest.raises(UsageError, match="does not accept"):
        DeviceClient(Refuses(), "python3").call("run", ["--model", "m", "--runs", "many"], 5, "a run", lambda d, w: None)
    ledger("bad_input", "runner arguments the runner does not accept, refused on the host")


def test_the_runner_on_the_device_venv_imports_the_protocol_sent_with_it(device_python, tmp_path):
    """One standalone program: the device venv has no edgeq, yet the runner uses the protocol; and the working
    directory is off sys.path before the protocol imports anything (a json.py or argparse.py there never runs)."""
    assert subprocess.run([device_python, "-c", "import edgeq"], capture_output=True, cwd=tmp_path).returncode != 0
    for name in ("json.py", "argparse.py", "math.py", "edgeq_protocol.py"):
        (tmp_path / name).write_text("raise SystemExit('shadowed " + name + "')\n")
    out = subprocess.run([device_python, "-", "run", "--model", str(tmp_path / "none.tflite"), "--runs", "many"],
                         input=runner_source(), capture_output=True, timeout=120, cwd=tmp_path)
    doc = json.loads(out.stdout)
    assert doc["kind"] == "usage" and "--runs: invalid int value" in doc["error"], out.stderr
    probe = subprocess.run([device_python, "-", "probe"], input=runner_source(), capture_output=True, timeout=120,
                           cwd=tmp_path)
    assert json.loads(probe.stdout)["ok"] is True, probe.stderr
