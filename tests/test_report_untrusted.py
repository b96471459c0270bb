"""Reports are written atomically and render untrusted text inertly; a crafted report.json is a one-line error.

A report holds what a device said, and ``edgeq report`` reads report.json files
anyone may have written: every field is escaped by default in HTML, Markdown
and the terminal, and load_report checks the document's shape before use.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.errors import InputError, UsageError
from edgeq.report import (
    MAX_REPORT_BYTES,
    compare,
    fleet_rows,
    load_report,
    render_fleet_html,
    render_html,
    render_markdown,
    summary_lines,
    write_comparison,
    write_fleet_report,
    write_report,
)

PAYLOAD = '<script>alert(1)</script>\x1b]0;owned\x07\x1b[2J\n# heading | cell [x](javascript:y)'


def _doc() -> dict:
    """A report.json as `edgeq deploy` writes it (the fields the renderers read)."""
    return {
        "edgeq_version": "0.3.0", "host": "pi@10.0.0.7", "started_at": "2026-11-22T23:00:00Z", "duration_s": 3.2,
        "model": {"name": "m.tflite", "sha256": "ab" * 32, "bytes": 24576},
        "device": {"arch": "aarch64", "cpu_model": "Cortex-A72", "board": "Raspberry Pi 4", "os": "Debian 12",
                   "kernel": "6.1", "python": "3.11.2", "numpy": "1.24.4", "cpu_cores": 4,
                   "mem_total_bytes": 4 << 30, "mem_available_bytes": 3 << 30, "cpu_governor": "ondemand",
                   "vcgencmd_temp": None, "thermal_zones": [{"zone": "thermal_zone0", "type": "cpu", "celsius": 48.2}],
                   "throttling": {"raw": "0x0", "throttled_now": False}, "disk": {"free_bytes": 9 << 30},
                   "emulation": {"emulated": False}},
        "runtime": {"name": "tflite_runtime", "version": "2.14.0", "threads": 4, "xnnpack": True},
        "settings": {"runs": 100},
        "latency_ms": {"min": 1.1, "p50": 1.3, "p90": 1.6, "p99": 2.2, "mean": 1.35, "std": 0.2, "max": 2.9,
                       "count": 5, "samples": [1.1, 1.3, 1.2, 1.6, 2.9]},
        "load_ms": 12.0, "first_inference_ms": 4.0, "peak_rss_bytes": 48_000_000, "accuracy": 0.97, "mae": None,
        "eval": {"samples": 540},
        "agreement": {"reference_runtime": "ai_edge_litert", "reference_version": "2.3.0", "host_accuracy": 0.97,
                      "top1": 0.995, "max_abs_diff": 0.0039, "max_abs_diff_steps": 1.0, "samples": 540},
        "transfer": {"model_bytes_sent": 24576},
        "activation": {"active": "ab" * 32, "switched": True},
        "warnings": ["cpu governor is ondemand"],
    }


def _leaves(doc, path=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _leaves(v, path + (i,))
    else:
        yield path


def _with(doc: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(doc)
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return out


def _write_raw(directory: Path, text: str | bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    p = directory / "report.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return directory


def _assert_inert(doc: dict) -> None:
    page = render_html(doc)
    assert "<script" not in page
    text = render_markdown(doc)
    assert "<script" not in text and "\x1b" not in text and "\x07" not in text
    assert not any(line.startswith("# heading") for line in text.splitlines())
    for line in text.splitlines():
        if line.startswith("| ") and "heading" in line:  # a table row keeps its two or ten cells
            cells = line.replace("\\|", "").count("|") - 1
            assert cells in (2, 10), line
    for line in summary_lines(doc):
        assert "\x1b" not in line and "\x07" not in line and "\n" not in line


# ------------------------------------------------------------ escaping by default


def test_every_field_is_escaped_in_html_markdown_and_terminal(ledger):
    """Put the payload in every leaf of a report, strings and numbers alike: nothing gets through raw."""
    base = _doc()
    paths = list(_leaves(base))
    assert len(paths) > 60
    for path in paths:
        _assert_inert(_with(base, path, PAYLOAD))
    ledger("bad_input", "script/escape-sequence payload in every report field (html, md, terminal)")


def test_numeric_fields_cannot_inject_script():
    """The review's finding: model.bytes, latency count and bytes sent were interpolated without escaping."""
    doc = _doc()
    for path in (("model", "bytes"), ("latency_ms", "count"), ("transfer", "model_bytes_sent"),
                 ("agreement", "samples"), ("agreement", "max_abs_diff_steps")):
        page = render_html(_with(doc, path, "<script>alert(1)</script>"))
        assert "<script>alert(1)" not in page, path


def test_fleet_summary_escapes_every_field():
    summary = {"action": "<script>a</script>", "started_at": PAYLOAD, "seconds": "<b>", "forks": "<i>x</i>",
               "model": {"name": PAYLOAD, "sha256": PAYLOAD, "bytes": "<u>"},
               "counts": {"hosts": "<s>", "ok": "<s>", "failed": "<s>", "timeout": "<s>"},
               "hosts": [{"name": PAYLOAD, "status": "<script>", "error": PAYLOAD, "accuracy": "<em>",
                          "latency_ms": {"p50": "<script>", "p90": 1.0}, "runtime": {"name": PAYLOAD},
                          "device": {"arch": PAYLOAD}, "activation": {"active": PAYLOAD}}, "junk"]}
    page = render_fleet_html(summary)
    for raw in ("<script", "<b>", "<i>", "<u>", "<s>", "<em>"):
        assert raw not in page, raw
    for row in fleet_rows(summary):
        for cell in row:
            assert "\x1b" not in cell and "\n" not in cell


def test_markdown_device_strings_cannot_add_lines_or_cells():
    doc = _with(_doc(), ("device", "cpu_model"), "A72 | injected cell\n## Injected heading\n<img src=x onerror=y>")
    doc["warnings"] = ["plain", "two\n# lines", "[link](javascript:alert(1))"]
    text = render_markdown(doc)
    assert "## Injected heading" not in text.replace("\\#\\# Injected heading", "")
    assert not any(line.lstrip().startswith(("## Injected", "# lines")) for line in text.splitlines())
    board = next(line for line in text.splitlines() if line.startswith("| Board / CPU"))
    assert board.replace("\\|", "").count("|") == 3  # two cells, the device's pipe escaped
    assert "<img" not in text and "](javascript:" not in text


def test_terminal_summary_strips_escape_sequences():
    doc = _with(_doc(), ("runtime", "name"), "tflite\x1b[31m\x1b]0;title\x07")
    doc["warnings"] = ["disk \x1b[2K\rnearly full\x9b1m"]
    lines = summary_lines(doc)
    joined = "\n".join(lines)
    assert "\x1b" not in joined and "\x07" not in joined and "\x9b" not in joined and "\r" not in joined
    assert "tflite\\x1b[31m" in joined


# -------------------------------------------------------- atomic, symlink-safe


def test_write_report_replaces_planted_symlinks_and_never_writes_through_them(tmp_path, ledger):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "rep"
    out.mkdir()
    for name in ("report.json", "report.md", "report.html"):
        os.symlink(victim, out / f"{name}.tmp")  # the old fixed temp names
    os.symlink(victim, out / "report.html")  # and the final name itself
    with pytest.raises(UsageError, match="already holds a report"):
        write_report(_doc(), out)  # not replaced unless asked
    assert victim.read_text() == "precious"
    paths = write_report(_doc(), out, overwrite=True)
    assert victim.read_text() == "precious"
    for p in (paths.json, paths.markdown, paths.html):
        assert p.is_file() and not p.is_symlink()
    assert load_report(out)["host"] == "pi@10.0.0.7"
    assert sorted(p.name for p in out.iterdir() if not p.is_symlink()) == ["report.html", "report.json", "report.md"]
    ledger("bad_input", "symlink planted at a report file or its temp name")


def test_fleet_summary_is_written_atomically(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "fleet"
    out.mkdir()
    os.symlink(victim, out / "summary.html.tmp")
    os.symlink(victim, out / "summary.json.tmp")
    result = SimpleNamespace(hosts=[], to_dict=lambda: {"edgeq_version": "x", "action": "deploy", "hosts": [],
                                                        "counts": {"hosts": 0, "ok": 0}, "seconds": 1.0})
    paths = write_fleet_report(result, out)
    assert victim.read_text() == "precious"
    assert json.loads(paths.summary_json.read_text())["action"] == "deploy"
    assert "<h1>edgeq fleet deploy: 0 of 0 hosts ok</h1>" in paths.summary_html.read_text()


def test_write_comparison_replaces_a_symlink(tmp_path, ledger):
    one = tmp_path / "a"
    write_report(_doc(), one)
    two = tmp_path / "b"
    write_report(_with(_doc(), ("host", ), "pi5"), two)
    victim = tmp_path / "victim.html"
    victim.write_text("precious")
    target = tmp_path / "out" / "cmp.html"
    target.parent.mkdir()
    os.symlink(victim, target)
    with pytest.raises(UsageError, match="already exists"):
        write_comparison(compare([one, two]), target)  # not replaced unless asked
    written = write_comparison(compare([one, two]), target, overwrite=True)
    assert written == target and not target.is_symlink() and "<svg" in target.read_text()
    assert victim.read_text() == "precious"
    ledger("bad_input", "symlink planted at the --html output path")


def test_write_errors_are_usage_errors(tmp_path):
    """An output path that cannot be created is a one-line error naming it (edgeq.outdir), not a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="cannot create output directory .*file/sub"):
        write_report(_doc(), blocker / "sub")
    with pytest.raises(UsageError, match="cannot create directory .*file/x"):
        write_comparison(compare([write_report(_doc(), tmp_path / "ok").directory]), blocker / "x" / "c.html")


def test_nan_in_a_result_is_written_as_null(tmp_path):
    doc = _with(_doc(), ("latency_ms", "std"), float("nan"))
    paths = write_report(doc, tmp_path / "r")
    assert json.loads(paths.json.read_text())["latency_ms"]["std"] is None


# ------------------------------------------------------------- crafted report.json

BAD_DOCS = {
    "string where a number belongs": lambda d: _with(d, ("latency_ms", "p50"), "fast"),
    "html in a numeric field": lambda d: _with(d, ("model", "bytes"), "<script>alert(1)</script>"),
    "boolean as a number": lambda d: _with(d, ("peak_rss_bytes",), True),
    "object where a list belongs": lambda d: _with(d, ("latency_ms", "samples"), {"a": 1}),
    "string sample": lambda d: _with(d, ("latency_ms", "samples", 2), "1.0"),
    "list where an object belongs": lambda d: _with(d, ("device",), [1, 2]),
    "number where a string belongs": lambda d: _with(d, ("host",), 7),
    "number as a warning": lambda d: _with(d, ("warnings",), [1]),
    "string thermal zone": lambda d: _with(d, ("device", "thermal_zones"), ["hot"]),
    "float count": lambda d: _with(d, ("latency_ms", "count"), 2.5),
}


@pytest.mark.parametrize("name", sorted(BAD_DOCS))
def test_wrong_types_are_one_line_errors(tmp_path, name, ledger):
    d = _write_raw(tmp_path / "r", json.dumps(BAD_DOCS[name](_doc())))
    with pytest.raises(InputError, match="is not a valid edgeq report"):
        load_report(d)
    res = CliRunner().invoke(main, ["report", str(d), "--html", str(tmp_path / "o.html")])
    assert res.exit_code == 1, res.output
    assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("error: ")
    assert "report.json is not a valid edgeq report" in res.output and not (tmp_path / "o.html").exists()
    ledger("bad_input", f"report.json: {name}")


RAW_DOCS = {
    "NaN latency": lambda t: t.replace('"p50": 1.3', '"p50": NaN'),
    "Infinity latency": lambda t: t.replace('"p99": 2.2', '"p99": Infinity'),
    "overflowing number 1e999": lambda t: t.replace('"p90": 1.6', '"p90": 1e999'),
    "truncated JSON": lambda t: t[: len(t) // 2],
    "400-digit integer latency": lambda t: t.replace('"p50": 1.3', '"p50": 1' + "0" * 400),
    "5000-digit integer count": lambda t: t.replace('"count": 5', '"count": 1' + "0" * 5000),
    "top-level list": lambda t: "[" + t + "]",
    "deeply nested": lambda t: t[:-2] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}",
    "nested 40 levels": lambda t: t[:-2] + ', "x": ' + "[" * 40 + "]" * 40 + "}",
    "not UTF-8": lambda t: t.replace("Cortex-A72", "Cortex\udcff").encode("utf-8", "surrogateescape"),
}


@pytest.mark.parametrize("name", sorted(RAW_DOCS))
def test_crafted_report_json_is_a_one_line_error(tmp_path, name, ledger):
    text = json.dumps(_doc(), indent=1)
    d = _write_raw(tmp_path / "r", RAW_DOCS[name](text))
    with pytest.raises(InputError):
        load_report(d)
    res = CliRunner().invoke(main, ["report", str(d)])
    assert res.exit_code == 1, res.output
    assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("error: "), res.output
    ledger("bad_input", f"report.json: {name}")


def test_report_json_over_the_size_limit(tmp_path, ledger):
    doc = _doc()
    doc["latency_ms"]["samples"] = [1.25] * (MAX_REPORT_BYTES // 5)
    d = _write_raw(tmp_path / "r", json.dumps(doc, separators=(",", ":")))
    assert (d / "report.json").stat().st_size > MAX_REPORT_BYTES
    res = CliRunner().invoke(main, ["report", str(d)])
    assert res.exit_code == 1 and res.output.startswith("error: ") and "larger than 16 MiB" in res.output
    ledger("bad_input", "report.json over 16 MiB")


def test_valid_report_round_trips_through_the_cli(tmp_path):
    d = write_report(_doc(), tmp_path / "r").directory
    res = CliRunner().invoke(main, ["report", str(d)])
    assert res.exit_code == 0 and "p50 1.30 ms" in res.output and "accuracy 97.0 %" in res.output


ODD_VALUES = [None, True, [], {}, -1, 10**30, 10**400, float("nan"), float("inf"), -float("inf"), "x", [1, "a", None],
              {"p50": "x"}]


def test_renderers_never_raise_on_odd_values_and_check_report_says_why(ledger):
    """Every field of a report replaced by every odd JSON-ish value: rendering never raises, and check_report
    either accepts the document or names the field (what `edgeq report` shows as its one line)."""
    from edgeq.report import check_report

    base = _doc()
    paths = list(_leaves(base)) + [("device",), ("latency_ms",), ("agreement",), ("model",), ("warnings",)]
    refused = 0
    for path in paths:
        for value in ODD_VALUES:
            doc = _with(base, path, value)
            render_html(doc)
            render_markdown(doc)
            summary_lines(doc)
            fleet_rows({"hosts": [doc]})
            try:
                check_report(doc)
            except InputError as exc:
                refused += 1
                field = ".".join(str(p) for p in path if not isinstance(p, int))
                assert field.split(".")[0] in str(exc), (path, str(exc))
    assert refused > len(paths) * 3
    ledger("bad_input", "odd values (NaN, Infinity, huge ints, lists, objects) in every report field")
