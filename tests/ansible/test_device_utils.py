"""The collection's device helpers (module_utils/edgeq_device.py) keep the same checks as edgeq's device client,
with the runner the collection embeds (deploy/runner.py): huge integers are not numbers, an activation that
fails reads back what is active, and removing the rollback target leaves no rollback target behind."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

from edgeq._device.protocol import DEVICE_MODULES
from tests.deploy.test_activation_state import _device as make_device_dir

ROOT = Path(__file__).resolve().parents[2]
UTILS = ROOT / "ansible" / "edgeq" / "fleet" / "plugins" / "module_utils"
PKG = "ansible_collections.edgeq.fleet.plugins.module_utils"


@pytest.fixture
def edev(monkeypatch):
    """edgeq_device imported as the collection imports it, over deploy/runner.py, deploy/protocol.py and the device
    modules (what the build embeds), each registered as ``edgeq_<name>`` as edgeq_device registers them."""
    parts = PKG.split(".")
    for i in range(1, len(parts) + 1):
        pkg = types.ModuleType(".".join(parts[:i]))
        pkg.__path__ = []
        monkeypatch.setitem(sys.modules, pkg.__name__, pkg)
    mods = {}
    device = ["protocol", *DEVICE_MODULES, "runner"]
    for name in device:
        monkeypatch.delitem(sys.modules, f"edgeq_{name}", raising=False)  # edgeq_device installs its own
    for name, path in [(f"edgeq_{n}", ROOT / "deploy" / f"{n}.py") for n in device] + \
            [("edgeq_device", UTILS / "edgeq_device.py")]:
        spec = importlib.util.spec_from_file_location(f"{PKG}.{name}", path)
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, mod)
        setattr(sys.modules[PKG], name, mod)
        spec.loader.exec_module(mod)
        if name != "edgeq_device":
            monkeypatch.setitem(sys.modules, name, mod)  # as edgeq_device's sys.modules.setdefault does
        mods[name] = mod
    return mods["edgeq_device"]


def _device(edev, remote: Path, n: int):
    shas = make_device_dir(remote, n)
    dev = edev.Device(str(remote))
    dev.token = "T"
    return dev, shas


def test_huge_integers_are_not_numbers(edev, ledger):
    finite = edev.protocol.finite_number
    assert finite(10 ** 400) is None and finite(True) is None and finite(3) == 3.0
    with pytest.raises(ValueError, match="digits"):
        edev.loads('{"ok": true, "peak_rss_bytes": ' + "9" * 300 + "}")
    assert edev.loads('{"n": 18446744073709551615}') == {"n": 2 ** 64 - 1}
    ledger("bad_input", "collection: a 300-digit integer in a runner document")


def test_activating_over_a_current_edgeq_did_not_make_is_refused_and_says_what_is_there(edev, tmp_path, ledger):
    remote = tmp_path / "device"
    dev, (a,) = _device(edev, remote, 1)
    mine = tmp_path / "hand-made"
    mine.mkdir()
    os.symlink(str(mine), remote / "current")
    with pytest.raises(edev.EdgeqModuleError) as exc:
        dev.activate(a)
    text = str(exc.value)
    assert "unchanged (current is a link to " + str(mine) in text and "move it aside" in text, text
    assert os.readlink(remote / "current") == str(mine)
    ledger("bad_input", "collection: current is a link edgeq did not make")


def test_removing_the_rollback_target_leaves_none(edev, tmp_path):
    remote = tmp_path / "device"
    dev, (a, b) = _device(edev, remote, 2)
    dev.activate(a)
    dev.activate(b)
    assert dev.activation() == {"current": b, "previous": a}
    dev.forget_previous(a)
    assert dev.activation() == {"current": b, "previous": None}
    assert not (remote / "previous").exists()


def test_the_collection_judges_and_reports_as_edgeq_does(edev, tmp_path):
    """One protocol: the collection's gate verdict, latency figures and report document are the host's for the
    same runner documents (the collection once had its own copies of each)."""
    from edgeq._device import protocol
    from edgeq.deploy import DeployResult, LatencyStats
    from edgeq.rollout import GateResult

    samples = [1.0 + (i % 17) * 0.25 for i in range(700)]
    run_doc = {"ok": True, "samples_ms": samples, "eval": {"accuracy": 0.875, "samples": 8, "seconds": 0.1},
               "runtime": {"name": "tflite_runtime"}, "load_ms": 2.0, "first_inference_ms": 3.0,
               "peak_rss_bytes": 1 << 20}
    for thresholds in ((0.9, None), (None, 4.0), (0.5, 10.0), (None, None)):
        theirs = edev.gate(run_doc, *thresholds, "/d/current/model.tflite", "a" * 64)
        ours = protocol.gate_verdict(run_doc, *thresholds)
        assert theirs == dict(ours, active="a" * 64, path="/d/current/model.tflite")
        host = GateResult(ours["passed"], tuple(ours["reasons"]), "a" * 64, ours["accuracy"], ours["p99_ms"],
                          ours["runs"], "/d/current/model.tflite").to_dict()
        assert {k: theirs[k] for k in host} == host
    dev = edev.Device(str(tmp_path / "d"))
    params = {"runs": 50, "warmup": 1, "min_seconds": 1.0, "max_runs": 10000, "threads": None}
    report = edev.build_report({"ok": True, "hostname": "pi"}, run_doc, params, dev,
                               {"name": "m.tflite", "sha256": "b" * 64, "bytes": 10}, None, {}, None,
                               "2026-01-01T00:00:00+00:00", 1.0, [], theirs)
    host_doc = DeployResult("h", {}, {}, {}, LatencyStats.from_samples(samples), 0.0, 0.0, None, None, None, None,
                            None, {}, {}, "", 0.0).to_dict()
    assert report["schema"] == host_doc["schema"] == "edgeq.deploy/1" and list(report) == list(host_doc)
    lat = report["latency_ms"]
    assert {k: lat[k] for k in ("p50", "p90", "p99", "mean", "count")} == \
        {k: host_doc["latency_ms"][k] for k in ("p50", "p90", "p99", "mean", "count")}
    assert len(lat["samples"]) == edev.MAX_SAMPLES  # the module result keeps evenly spaced samples
    assert report["gate"] == theirs and report["outcome"] == "ok" and report["device"] == {"hostname": "pi"}
