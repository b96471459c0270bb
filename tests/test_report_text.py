"""Reports without a browser: one unit system (edgeq.units), terminal tables that fit 100 columns, fleet links."""

from __future__ import annotations

import pytest

from edgeq import units
from edgeq.report import compare, fleet_table, summary_lines, write_report
from tests.test_report_pages import deploy_doc, fleet_summary


@pytest.mark.parametrize("fn, value, text", [
    (units.fmt_bytes, 812, "812 B"), (units.fmt_bytes, 15.4 * 1024, "15.4 KiB"),
    (units.fmt_bytes, 3.2 * 1024 ** 2, "3.2 MiB"), (units.fmt_bytes, 1024 ** 2 - 1, "1.0 MiB"),
    (units.fmt_seconds, 850e-6, "850 µs"), (units.fmt_seconds, 0.0123, "12.3 ms"),
    (units.fmt_seconds, 1.52, "1.52 s"), (units.fmt_seconds, 0.9999, "1.00 s"),
    (units.fmt_seconds, 1.25e-6, "1.25 µs"),
    (units.fmt_ms, 12.34, "12.3 ms"), (units.fmt_ms, 0.85, "850 µs"),
    (units.fmt_pct, 98.4, "98.4 %"), (units.fmt_pct, 0.35, "0.35 %"), (units.fmt_ratio, 1.19, "1.19x"),
])
def test_units_choose_the_unit_by_magnitude(fn, value, text):
    assert fn(value) == text


@pytest.mark.parametrize("fn", [units.fmt_bytes, units.fmt_seconds, units.fmt_ms, units.fmt_pct, units.fmt_ratio])
@pytest.mark.parametrize("value", [None, float("nan"), float("inf"), True, "12", 10 ** 400])
def test_units_show_a_dash_for_what_is_not_a_number(fn, value):
    assert fn(value) == "-"


LONG = "pi-" + "very-long-host-name-" * 6


def test_fleet_table_fits_100_columns_and_lists_failures():
    summary = fleet_summary()
    summary["hosts"][0]["name"] = LONG
    lines = fleet_table(summary).splitlines()
    assert max(map(len, lines)) <= 100, "\n".join(lines)
    assert lines[2].startswith("pi-very-long-host-nam") and "…" in lines[2]
    assert any(line.startswith("failed pi-attic") and "connection refused" in line for line in lines)


def test_comparison_table_fits_100_columns(tmp_path):
    dirs = [write_report(deploy_doc(f"{LONG}{i}", p50=1.0 + i), tmp_path / str(i)).directory for i in range(3)]
    table = compare(dirs).table()
    assert max(map(len, table.splitlines())) <= 100, table
    assert "latency p50" in table and "2.00 ms" in table
    head = table.splitlines()[0]
    assert "(1)" in head and "(2)" in head, head  # labels are cut in the middle: still told apart
    assert "2.00x slower" in table


def test_deploy_summary_lines_fit_100_columns():
    doc = deploy_doc(LONG)
    doc["device"]["cpu_model"] = "Cortex-A72 " * 10
    doc["warnings"] = ["the cpu governor is ondemand: " + "latency varies with load " * 8]
    lines = summary_lines(doc)
    assert max(map(len, lines)) <= 100, "\n".join(lines)
    assert any("latency varies with load latency" in line for line in lines)  # wrapped, not cut
    assert lines[1].startswith("  verdict: MEASURED")


def test_fleet_summary_links_point_at_the_written_host_reports(tmp_path):
    """Every link in summary.html opens a file write_fleet_report wrote; the failed host is marked in words."""
    import re
    from types import SimpleNamespace

    from edgeq.report import write_fleet_report

    summary = fleet_summary()
    hosts = []
    for h in summary["hosts"]:
        ok = h["status"] == "ok"
        result = SimpleNamespace(latency_ms=h.get("latency_ms"), to_dict=lambda n=h["name"]: deploy_doc(n))
        row = {k: v for k, v in h.items() if k in ("name", "status", "error")}
        hosts.append(SimpleNamespace(name=h["name"], ok=ok, result=result if ok else None, summary=lambda r=row: r))
    paths = write_fleet_report(SimpleNamespace(hosts=hosts, to_dict=lambda: summary), tmp_path / "fleet")
    page = paths.summary_html.read_text()
    links = re.findall(r'<a href="([^"]+)"', page)
    assert len(links) == 4
    for link in links:
        assert (paths.directory / link).is_file(), link
    assert "✗ timeout" in page and '<tr class="fail">' in page
