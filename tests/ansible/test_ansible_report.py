"""edgeq.report.ansible on results files from elsewhere: bounded, validated, one-line errors."""

from __future__ import annotations

import json

import pytest

from edgeq.report.ansible import AnsibleResultsError, load_ansible_results, write_ansible_summary


def _doc(results: dict, hosts: list[str]) -> dict:
    return {"format": "edgeq.fleet.results/1", "started_at": "2026-01-01T00:00:00+00:00", "seconds": 1.0,
            "forks": 5, "plays": [{"name": "p", "hosts": hosts, "serial": ["1", "25%"], "max_fail_percentage": 0,
                                   "results": results, "batches": [{"index": 1, "hosts": list(results)}]}]}


BAD = {
    "not json": "{",
    "wrong format": json.dumps({"format": "something/else", "plays": []}),
    "no model results": json.dumps(_doc({}, ["a"])),
    "path in a host name": json.dumps(_doc({"../../etc": {"status": "ok", "result": {}}}, [])),
    "host name not a string": json.dumps(_doc({"a": {"status": "ok", "result": {}}}, [["a"]])),
    "deep nesting": "[" * 100000 + "]" * 100000,
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_results_files_are_one_line_errors(tmp_path, kind, ledger):
    path = tmp_path / "results.json"
    path.write_text(BAD[kind])
    with pytest.raises(AnsibleResultsError) as info:
        write_ansible_summary(path, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "etc").exists()
    ledger("bad_input", f"ansible results file: {kind}")


def test_untrusted_values_are_dropped_not_trusted(tmp_path):
    """Wrong types and non-finite numbers in a module result become missing values, never a traceback."""
    report = {"latency_ms": {"samples": [1.0, "x", float("inf")], "p99": "fast"}, "accuracy": float("nan"),
              "model": {"name": "m", "sha256": "0" * 64, "bytes": 10}, "warnings": "not a list",
              "peak_rss_bytes": True, "activation": ["x"]}
    results = {"a": {"status": "ok", "batch": 1, "result": {"report": report, "gate": {"passed": "yes"}}},
               "b": {"status": "failed", "batch": 1, "result": {"msg": "x" * 10000, "reverted": True,
                                                                "active": "not-a-sha"}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_doc(results, ["a", "b", "c"])))
    res = load_ansible_results(path, ["d"])
    assert [h.status for h in res.hosts] == ["ok", "reverted", "not_started", "not_started"]
    a = res.hosts[0].result
    assert a.latency_ms.count == 1 and a.accuracy is None and a.peak_rss_bytes is None and a.activation is None
    assert res.hosts[0].gate is None and res.hosts[1].revert.active is None and len(res.hosts[1].error) <= 2000
    assert res.stopped and res.to_dict()["counts"]["not_started"] == 2
