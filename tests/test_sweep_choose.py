"""The sweep's choice and its page, on hand-made outcomes (no TensorFlow, no device)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from edgeq.sweep import RecipeOutcome, choose
from edgeq.report.sweep import render_html


def _o(name: str, lat: float, size: int, drop: float = 0.0, fits: bool = True, accelerated: bool = True,
       executable: bool = True, device: bool = False, **kw) -> RecipeOutcome:
    check = {"fits": fits, "accelerated": accelerated, "macs_share_pct": 100.0 if accelerated else 0.0,
             "violations": [] if fits else [{"code": "flash", "message": "too big"}]}
    dev = {"latency_ms": {"p50": lat, "p99": lat * 1.2}, "peak_rss_bytes": 1 << 20, "accuracy": 0.9,
           "emulated": False} if device else None
    return RecipeOutcome(name=name, weights_bits=8, activations="int8", granularity="per-channel",
                         quantizer="tflite-converter", executable=executable, size_bytes=size,
                         host={"accuracy": 0.9 - drop / 100, "agreement": 1.0, "sqnr_db": 40.0},
                         check=check if executable else None, latency_estimate_ms=lat if executable else None,
                         device=dev, drop_points=drop, **kw)


def _verdicts(outcomes):
    return {o.name: o.verdict for o in outcomes}


def test_every_loser_says_why():
    outs = [
        _o("fast-but-lossy", 1.0, 5000, drop=3.0),
        _o("too-big", 1.0, 5000, fits=False),
        _o("int16", 2.0, 9000, accelerated=False),
        _o("slow", 4.0, 6000),
        _o("best", 2.0, 8000, drop=0.5),
        _o("sim", 0.0, 100, executable=False),
    ]
    got, rec, reason = choose(outs, "latency", 1.0, measured_on_device=False)
    v = _verdicts(got)
    assert rec == "best" and v["best"] == "recommended"
    assert v["fast-but-lossy"].startswith("over budget: loses 3.00 points (max 1)")
    assert v["too-big"].startswith("does not fit the target (flash)")
    assert v["int16"].startswith("not accelerated")
    assert v["slow"].startswith("slower: 4.00 ms vs 2.00 ms")  # edgeq.units.fmt_ms
    assert v["sim"].startswith("simulated")
    assert "best" in reason and "within 1 points" in reason


@pytest.mark.parametrize("objective, winner, word", [("size", "small", "bigger"), ("latency", "fast", "slower")])
def test_the_objective_decides(objective, winner, word):
    outs = [_o("small", 3.0, 4000), _o("fast", 1.0, 9000)]
    got, rec, _ = choose(outs, objective, 1.0, measured_on_device=False)
    assert rec == winner
    loser = next(o for o in got if o.name != winner)
    assert loser.verdict.startswith(word)


def test_latency_within_noise_is_a_tie_won_by_accuracy_then_size():
    outs = [_o("a", 1.00, 5000, drop=0.8), _o("b", 1.03, 6000, drop=0.1), _o("c", 1.04, 7000, drop=0.1)]
    got, rec, _ = choose(outs, "latency", 1.0, measured_on_device=False)
    v = _verdicts(got)
    assert rec == "b"
    assert v["a"].startswith("as fast within 5%") and "less accurate" in v["a"]
    assert "bigger file" in v["c"]


def test_with_a_device_an_unmeasured_recipe_cannot_win():
    outs = [_o("measured", 2.0, 5000, device=True), _o("failed", 0.5, 4000, device_error="op not found")]
    got, rec, _ = choose(outs, "latency", 1.0, measured_on_device=True)
    assert rec == "measured"
    assert _verdicts(got)["failed"] == "failed on the device: op not found"


def test_nothing_qualifies():
    outs = [_o("lossy", 1.0, 5000, drop=5.0), _o("sim", 0.0, 10, executable=False)]
    got, rec, reason = choose(outs, "latency", 1.0, measured_on_device=False)
    assert rec is None and reason.startswith("no executable recipe qualifies") and "lossy: over budget" in reason


def test_without_accelerated_candidates_the_rest_still_compete():
    outs = [_o("x", 2.0, 5000, accelerated=False), _o("y", 1.0, 5000, accelerated=False)]
    _, rec, _ = choose(outs, "latency", 1.0, measured_on_device=False)
    assert rec == "y"


def _doc(outcomes, rec, device=None):
    return {"model": "m.keras", "target": "rpi4", "objective": "latency", "max_drop": 1.0,
            "budget_metric": "accuracy", "recommended": rec, "reason": "because", "float": {"accuracy": 0.9},
            "recipes": [o.to_dict() for o in outcomes], "device": device, "warnings": []}


def test_page_escapes_every_value_and_labels_estimates():
    evil = "<script>alert(1)</script>"
    outs = [replace(_o("ok", 1.0, 5000), verdict="recommended"),
            replace(_o("x", 2.0, 6000), description=evil, verdict=evil), _o("sim", 0.0, 100, executable=False)]
    page = render_html(_doc(outs, "ok") | {"model": evil, "warnings": [evil]})
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "accuracy vs latency (estimate)" in page and "not a measurement" in page
    assert page.count("<svg") >= 2 and "Pareto" in page


def test_page_labels_device_and_emulated_latency():
    outs = [replace(_o("a", 1.0, 5000, device=True), verdict="recommended"), _o("b", 2.0, 6000, device=True)]
    page = render_html(_doc(outs, "a", {"host": "pi", "arch": "aarch64", "emulated": False}))
    assert "device-measured p50" in page and "(estimate)" not in page
    emu = [replace(o, device=dict(o.device, emulated=True)) for o in outs]
    page = render_html(_doc(emu, "a", {"host": "pi", "arch": "aarch64", "emulated": True}))
    assert "emulated device" in page and re.search(r"<td>emulated</td>", page)


def test_page_survives_a_crafted_document():
    # Numbers that are strings, NaN, missing fields: the page renders, nothing is trusted as markup.
    doc = {"recipes": [{"name": "<b>x</b>", "size_bytes": "1e9", "host": {"accuracy": float("nan")},
                        "executable": "yes", "check": "fits", "device": {"latency_ms": {"p50": "<i>"}}}, 7],
           "recommended": "<b>x</b>", "warnings": "not a list"}
    page = render_html(doc)
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
