"""summary.html of a staged rollout shows its batches, gate results, reverted and not-started hosts.

Needs /tmp/readme/ansible-report-html.patch in edgeq/report.py (render_fleet_html).
"""

from __future__ import annotations

from edgeq.report import write_fleet_report
from edgeq.rollout import GateResult, RevertResult, RolloutBatch, RolloutHost, RolloutOptions, RolloutResult

A, B = "a" * 64, "b" * 64


def test_summary_html_shows_batches_gates_reverted_and_not_started(tmp_path):
    gate = GateResult(False, ("accuracy 0.1094 < 0.9", "<script>x</script>"), A, 0.1094, None, 0,
                      "/d/current/model.tflite")
    hosts = (RolloutHost("pi0", "pi0", "reverted", 1, "failed its gate; reverted", "GateFailed", 1.0, None, gate,
                         RevertResult(True, B, A, None)),
             RolloutHost("pi1", "pi1", "not_started", None, "not started: stopped after canary 1", None))
    result = RolloutResult({"name": "m.tflite", "sha256": A, "bytes": 10}, hosts,
                           (RolloutBatch(1, "canary", ("pi0",), 1.0),),
                           RolloutOptions(canary=1, batch="25%", gate_accuracy=0.9), True,
                           "stopped after canary 1: 1 of 1 hosts failed", 2.0, "2026-01-01T00:00:00+00:00")
    page = write_fleet_report(result, tmp_path).summary_html.read_text()
    assert "1 reverted" in page and "1 not started" in page
    assert "Rollout" in page and "canary 1, batch 25%" in page and "stopped after canary 1" in page
    assert "Health gate" in page and "accuracy 0.1094 &lt; 0.9" in page
    assert "<script>x</script>" not in page and "&lt;script&gt;" in page
