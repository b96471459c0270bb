"""``measure_models``: several models measured on one device in one session, none activated (for the sweep)."""

from __future__ import annotations

import pytest

from edgeq.deploy import DeployOptions, deploy, measure_models
from edgeq.errors import UsageError
from tests.fleet.conftest import active, sha

FAST = dict(runs=5, warmup=0, min_seconds=0.05, min_warmup_seconds=0.0, reference=True)


def test_measure_models_one_session_no_activation(tmp_path, device_python, model_a, model_b, digits_int8_tflite,
                                                  digits_eval_npz):
    remote = tmp_path / "device"
    opts = DeployOptions(python=device_python, remote_dir=str(remote), **FAST)
    deploy(model_a, opts)  # the active model, which measuring must leave alone
    events = []
    results = measure_models([model_b, digits_int8_tflite, model_b], opts, events.append)
    assert [r.model["sha256"] for r in results] == [sha(model_b), sha(digits_int8_tflite), sha(model_b)]
    assert active(remote) == sha(model_a)
    assert all(r.activation["activated"] is False and r.activation["active"] == sha(model_a) for r in results)
    # One probe and one lock for the whole batch; each distinct model uploaded once.
    stages = [e.stage for e in events]
    assert stages.count("probe") == 1 and stages.count("lock") == 1
    # Each model's run: a start and an end event, counted in models.
    assert [(e.done, e.total) for e in events if e.stage == "measure"] == [(0, 3), (1, 3), (1, 3), (2, 3), (2, 3),
                                                                          (3, 3)]
    assert sum(1 for e in events if e.stage == "measure" and e.message.startswith("measured ")) == 3
    assert results[0].transfer["model_bytes_sent"] == model_b.stat().st_size
    assert results[2].transfer["model_bytes_sent"] == 0
    for r in results:
        d = r.to_dict()
        assert d["latency_ms"]["p50"] > 0 and d["latency_ms"]["p99"] >= d["latency_ms"]["p50"]
        assert d["peak_rss_bytes"] > 0 and "accuracy" in d
    assert not (remote / "lock").exists()


def test_measure_models_with_eval_reports_accuracy(tmp_path, device_python, digits_int8_tflite, digits_eval_npz):
    opts = DeployOptions(python=device_python, remote_dir=str(tmp_path / "device"),
                         eval_data=str(digits_eval_npz), **FAST)
    (res,) = measure_models([digits_int8_tflite], opts)
    d = res.to_dict()
    assert 0.8 < d["accuracy"] <= 1.0 and d["agreement"]["top1"] >= 0.98
    assert d["transfer"]["eval_bytes_sent"] == digits_eval_npz.stat().st_size


def test_measure_models_needs_a_model(device_python, tmp_path, ledger):
    with pytest.raises(UsageError, match="at least one model"):
        measure_models([], DeployOptions(python=device_python, remote_dir=str(tmp_path / "d")))
    ledger("bad_input", "measure_models with no model")
