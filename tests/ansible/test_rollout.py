"""Staged rollouts with a health gate (edgeq.rollout), against real sshd "devices" with the device venv."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from edgeq.deploy import Outcome
from edgeq.errors import ModelError, UsageError
from edgeq.report import write_fleet_report
from edgeq.rollout import RolloutOptions, plan_batches, rollout
from tests.ansible.conftest import active, inventory_hosts, sha, write_inventory

pytestmark = pytest.mark.ssh


def test_plan_batches_canary_then_counts_and_percentages():
    names = [f"h{i}" for i in range(8)]
    assert plan_batches(names, 1, "25%") == (("h0",), ("h1", "h2"), ("h3", "h4"), ("h5", "h6"), ("h7",))
    assert plan_batches(names, 2, "3") == (("h0", "h1"), ("h2", "h3", "h4"), ("h5", "h6", "h7"))
    assert plan_batches(names, 0, None) == (tuple(names),)
    assert plan_batches(names[:3], 1, "1%") == (("h0",), ("h1",), ("h2",))  # at least one host per batch
    for bad in ("0", "0%", "150%", "x", "-1"):
        with pytest.raises(UsageError):
            plan_batches(names, 1, bad)


def test_canary_failing_its_gate_reverts_and_the_rollout_stops(fleet, tmp_path, device_python, model_a, model_b,
                                                                eval_b, fleet_opts, ledger):
    inv = write_inventory(fleet, tmp_path, 3, device_python)
    hosts = inventory_hosts(inv)
    fo = replace(fleet_opts, deploy=replace(fleet_opts.deploy, eval_data=str(eval_b)))
    gate = RolloutOptions(fleet=fo, canary=1, batch="1", gate_accuracy=0.9)

    # model_b passes its gate everywhere (accuracy 1.0 on its own labels).
    first = rollout(model_b, hosts, gate)
    assert [h.status for h in first.hosts] == ["ok", "ok", "ok"], [h.error for h in first.hosts]
    assert [h.batch for h in first.hosts] == [1, 2, 3] and [b.kind for b in first.batches] == ["canary", "batch",
                                                                                               "batch"]
    assert all(h.gate.passed and h.gate.accuracy == 1.0 for h in first.hosts)
    assert first.hosts[0].gate.path == f"{tmp_path / 'dev0'}/current/model.tflite"
    assert first.outcome is Outcome.OK

    # model_a fails the gate on the canary: it reverts, nothing else starts.
    second = rollout(model_a, hosts, gate)
    canary, rest = second.hosts[0], second.hosts[1:]
    assert canary.status == "reverted", canary.error
    assert "accuracy" in canary.error and "< 0.9" in canary.error and sha(model_b)[:12] in canary.error
    assert canary.revert.ok and canary.revert.active == sha(model_b)
    assert canary.result.activation["active"] == sha(model_a)  # it was activated before the gate ran
    assert active(tmp_path / "dev0") == sha(model_b)
    assert [h.status for h in rest] == ["not_started", "not_started"]
    assert [active(tmp_path / f"dev{i}") for i in (1, 2)] == [sha(model_b), sha(model_b)]
    assert second.stopped and "canary 1" in second.stop_reason and len(second.batches) == 1
    assert second.outcome is Outcome.GATE_FAILED
    ledger("fault", "canary fails its health gate: reverted, rollout stopped")
    ledger("model_kept", "canary fails its health gate")

    paths = write_fleet_report(second, tmp_path / "report")
    summary = json.loads(paths.summary_json.read_text())
    assert summary["counts"]["reverted"] == 1 and summary["counts"]["not_started"] == 2
    assert summary["rollout"]["stopped"] is True
    assert summary["rollout"]["batches"] == [{"index": 1, "kind": "canary", "hosts": ["pi0"],
                                              "seconds": summary["rollout"]["batches"][0]["seconds"],
                                              "counts": {"ok": 0, "failed": 0, "timeout": 0, "reverted": 1,
                                                         "gate_failed": 0, "revert_failed": 0}}]
    row = summary["hosts"][0]
    assert row["gate"]["passed"] is False and row["activation"]["active"] == sha(model_b)
    html = paths.summary_html.read_text()
    assert "reverted" in html and "not_started" in html


def test_a_revert_that_cannot_happen_is_reported_loudly(fleet, tmp_path, device_python, model_a, fleet_opts):
    """A fresh device has no previous model: the failing model cannot be reverted, and the result says so."""
    inv = write_inventory(fleet, tmp_path, 2, device_python)
    opts = RolloutOptions(fleet=fleet_opts, canary=1, gate_p99_ms=1e-6)  # no inference is that fast
    res = rollout(model_a, inventory_hosts(inv), opts)
    h = res.hosts[0]
    assert h.status == "revert_failed" and h.error.startswith("REVERT FAILED") and "p99" in h.error
    assert "no previous model" in h.revert.error
    assert res.hosts[1].status == "not_started" and active(tmp_path / "dev1") is None
    assert res.outcome is Outcome.REVERT_FAILED


def test_max_fail_lets_the_rollout_continue(fleet, tmp_path, device_python, model_a, model_b, eval_b, fleet_opts):
    """With --max-fail 100 a reverted canary does not stop the next batches; each host judges itself."""
    inv = write_inventory(fleet, tmp_path, 3, device_python)
    hosts = inventory_hosts(inv)
    fo = replace(fleet_opts, deploy=replace(fleet_opts.deploy, eval_data=str(eval_b)))
    assert rollout(model_b, hosts, RolloutOptions(fleet=fo)).ok
    res = rollout(model_a, hosts, RolloutOptions(fleet=fo, canary=1, batch="50%", max_fail_pct=100,
                                                 gate_accuracy=0.9))
    assert [h.status for h in res.hosts] == ["reverted", "reverted", "reverted"]
    assert not res.stopped and [b.hosts for b in res.batches] == [("pi0",), ("pi1",), ("pi2",)]
    assert [active(tmp_path / f"dev{i}") for i in range(3)] == [sha(model_b)] * 3


def test_gate_options_are_validated_before_anything_runs(fleet, tmp_path, device_python, model_a, fleet_opts):
    inv = write_inventory(fleet, tmp_path, 1, device_python)
    for bad in (RolloutOptions(fleet=fleet_opts, gate_accuracy=0.9),  # no --eval
                RolloutOptions(fleet=fleet_opts, gate_accuracy=90.0),
                RolloutOptions(fleet=fleet_opts, gate_p99_ms=-1.0),
                RolloutOptions(fleet=fleet_opts, max_fail_pct=150.0)):
        with pytest.raises(UsageError):
            rollout(model_a, inventory_hosts(inv), bad)
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ModelError):
        rollout(garbage, inventory_hosts(inv), RolloutOptions(fleet=fleet_opts, canary=1))
    assert not (tmp_path / "dev0").exists()
