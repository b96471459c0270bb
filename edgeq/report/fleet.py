"""The fleet summary: ``summary.json`` + ``summary.html`` beside one report directory per host.

The page leads with the verdict (how many hosts are ok, which failed and why),
links every host's own report, and marks failed hosts with a colour and a word.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from edgeq.escape import one_line, tag
from edgeq.outdir import prepare_dir
from edgeq.report.charts import percentile_bars
from edgeq.report.facts import Verdict
from edgeq.report.html import page, table, verdict_box
from edgeq.report.text import fit_table
from edgeq.report.values import as_dict, as_list, int_text, ms, nbytes, num, pct, term_text
from edgeq.report.write import json_text, write_report
from edgeq.safeio import atomic_write

HOST_SCHEMA = "edgeq.deploy/1"  # a failed host's report.json (status and reason instead of measurements)


@dataclass(frozen=True)
class FleetReportPaths:
    """Where a fleet report was written: one directory per host plus the summary."""

    directory: Path
    summary_json: Path
    summary_html: Path
    hosts: tuple[Path, ...]


def write_fleet_report(result: Any, out_dir: str | Path, *, overwrite: bool = False) -> FleetReportPaths:
    """Write ``<host>/report.json`` (+ md/html) per host and ``summary.json`` + ``summary.html``.

    ``result`` is an ``edgeq.fleet_deploy.FleetResult`` (or a ``RolloutResult``); a
    failed host's ``report.json`` holds its status and reason instead of
    measurements. A directory that already holds a report is refused unless ``overwrite``.
    """
    directory = prepare_dir(out_dir, overwrite=overwrite)
    summary = result.to_dict()
    host_dirs = []
    for host in result.hosts:
        d = directory / host.name  # names were validated by plan_fleet / the Ansible results loader
        host_dirs.append(d)
        if host.ok and hasattr(host.result, "latency_ms"):
            doc = host.result.to_dict()
            doc["name"] = host.name
            doc["status"] = "ok"
            write_report(doc, d, overwrite=overwrite)
        else:
            prepare_dir(d, overwrite=overwrite)
            doc = {"schema": HOST_SCHEMA, "edgeq_version": summary.get("edgeq_version"), **host.summary(),
                   "model": summary.get("model")}
            atomic_write(d / "report.json", json_text(doc))
    paths = FleetReportPaths(directory, directory / "summary.json", directory / "summary.html", tuple(host_dirs))
    atomic_write(paths.summary_json, json_text(summary))
    atomic_write(paths.summary_html, render_fleet_html(summary))
    return paths


FLEET_HEADER = ["host", "status", "p50", "p90", "p99", "accuracy", "runtime", "device", "active", "reason"]


def fleet_rows(summary: dict) -> list[list[str]]:
    """One row per host (``FLEET_HEADER``): name, status, p50, p90, p99, accuracy, runtime, device, active
    model, reason. Cells are on one line with control characters escaped (safe for a terminal; HTML escapes
    them again)."""
    rows = []
    for h in _hosts(summary):
        lat = as_dict(h.get("latency_ms"))
        rt = as_dict(h.get("runtime"))
        dev = as_dict(h.get("device"))
        act = as_dict(h.get("activation"))
        active = act.get("active") or h.get("active")
        rows.append([
            term_text(h.get("name"), 60), term_text(h.get("status"), 20),
            ms(lat.get("p50")) if lat else "-", ms(lat.get("p90")) if lat else "-",
            ms(lat.get("p99")) if lat else "-", pct(h.get("accuracy")),
            term_text(f"{rt.get('name')} {rt.get('version')}", 60) if rt else "-",
            term_text(f"{dev.get('arch') or '-'} py{dev.get('python') or '?'}", 60) if dev else "-",
            term_text(str(active)[:12], 12) if active else "-",
            one_line(h.get("error") or "", 160),
        ])
    return rows


_TERMINAL_COLUMNS = (0, 1, 2, 4, 5, 6, 7)  # host, status, p50, p99, accuracy, runtime, device


def fleet_table(summary: dict, width: int = 100) -> str:
    """The hosts as a terminal table at most ``width`` columns wide, then one line per host that did not
    succeed with its reason (long names and reasons cut with "…"; p90 and the active model are in the HTML)."""
    rows = fleet_rows(summary)
    lines = fit_table([[r[i] for i in _TERMINAL_COLUMNS] for r in rows], [FLEET_HEADER[i] for i in _TERMINAL_COLUMNS],
                      width)
    for h, r in zip(_hosts(summary), rows):
        if _failed(h):
            lines.append(one_line(f"{r[1]} {r[0]}: {r[9] or 'no reason given'}", width))
    return "\n".join(lines)


def _hosts(summary: dict) -> list[dict]:
    return [as_dict(h) for h in as_list(as_dict(summary).get("hosts"))]


def _failed(h: dict) -> bool:
    return h.get("status") != "ok"


def host_link(name: Any, has_report: bool) -> str:
    """The relative link to a host's report (its name percent-encoded: never a scheme or another directory)."""
    return f"{quote(str(name), safe='')}/{'report.html' if has_report else 'report.json'}"


def fleet_verdict(summary: dict) -> Verdict:
    """All hosts ok or not; the failed hosts and why; latency and accuracy across the ok hosts vs the gate."""
    hosts = _hosts(summary)
    failed = [h for h in hosts if _failed(h)]
    ok = [h for h in hosts if not _failed(h)]
    gate = as_dict(as_dict(summary.get("rollout")).get("gate"))
    items: list[tuple[str, str]] = []
    model = as_dict(summary.get("model"))
    items.append(("model", f"{term_text(model.get('name'), 80)} ({nbytes(model.get('bytes'))})"))
    p50 = [v for v in (num(as_dict(h.get("latency_ms")).get("p50")) for h in ok) if v is not None]
    p99 = [v for v in (num(as_dict(h.get("latency_ms")).get("p99")) for h in ok) if v is not None]
    if p50:
        budget = num(gate.get("p99_ms_max"))
        items.append(("latency", f"p50 {ms(min(p50))} to {ms(max(p50))}, worst p99 {ms(max(p99) if p99 else None)}; "
                                 + ("no latency budget set" if budget is None else f"p99 budget {ms(budget)}")))
    acc = [v for v in (num(h.get("accuracy")) for h in ok) if v is not None]
    if acc:
        minimum = num(gate.get("accuracy_min"))
        items.append(("accuracy", f"{pct(min(acc))} to {pct(max(acc))} on the devices; "
                                  + ("no accuracy budget set" if minimum is None else f"minimum {pct(minimum)}")))
    for h in failed[:20]:
        items.append((f"{term_text(h.get('status'), 20).upper()} {term_text(h.get('name'), 60)}",
                      term_text(h.get("error") or "no reason given", 300)))
    if len(failed) > 20:
        items.append(("more", f"{len(failed) - 20} more hosts failed (see the table)"))
    title = f"{len(ok)} of {len(hosts)} hosts ok" + (f"; {len(failed)} did not succeed" if failed else "")
    if not hosts:
        return Verdict(None, "NO HOSTS", title, tuple(items))
    return Verdict(not failed, "ALL OK" if not failed else "FAILURES", title, tuple(items))


def render_fleet_html(summary: dict) -> str:
    """A self-contained page comparing the hosts of a fleet deploy, each host linked to its own report."""
    counts = as_dict(summary.get("counts"))
    model = as_dict(summary.get("model"))
    hosts = _hosts(summary)
    rows: list[list[Any]] = []
    classes = []
    for h, row in zip(hosts, fleet_rows(summary)):
        bad = _failed(h)
        link = tag("a", row[0], href=host_link(h.get("name"), bool(h.get("latency_ms")) and not bad))
        status = tag("span", f"✗ {row[1]}" if bad else f"✓ {row[1]}", class_="status-fail" if bad else None)
        rows.append([link, status, *row[2:]])
        classes.append("fail" if bad else None)
    host_table = table(rows, FLEET_HEADER, classes, class_="hosts")
    ok = [(term_text(h.get("name"), 60), as_dict(h.get("latency_ms"))) for h in hosts if h.get("latency_ms")]
    parts: list[Any] = []
    if ok:
        parts = [tag("h2", "Latency by host"),
                 percentile_bars(ok, label_width=200, label_chars=24, aria="latency by host",
                                 title="p50, p90 and p99 by host")]
    seconds = num(summary.get("seconds")) or 0.0
    # Staged rollouts (edgeq.rollout, edgeq.report.ansible) add these statuses.
    extra = "".join(f", {int_text(counts.get(k))} {label}" for k, label in
                    (("reverted", "reverted"), ("gate_failed", "failed their gate"),
                     ("revert_failed", "could NOT revert"), ("not_started", "not started")) if counts.get(k))
    head = [tag("h1", f"edgeq fleet {summary.get('action', 'deploy')}: {int_text(counts.get('ok', 0))} of "
                      f"{int_text(counts.get('hosts', 0))} hosts ok"),
            verdict_box(fleet_verdict(summary)),
            tag("p", f"model {model.get('name', '-')} sha256 {str(model.get('sha256', '-'))[:16]}, "
                     f"{nbytes(model.get('bytes'))}; {int_text(counts.get('failed', 0))} failed, "
                     f"{int_text(counts.get('timeout', 0))} timed out{extra}; {seconds:.1f} s with "
                     f"{int_text(summary.get('forks'))} forks; started {summary.get('started_at', '')}", class_="sub")]
    rollout = as_dict(summary.get("rollout"))
    if rollout:
        gate = as_dict(rollout.get("gate"))
        limits = [f"accuracy >= {gate['accuracy_min']}" for _ in [0] if gate.get("accuracy_min") is not None]
        limits += [f"p99 <= {gate['p99_ms_max']} ms" for _ in [0] if gate.get("p99_ms_max") is not None]
        batch_rows = [[int_text(b.get("index")), term_text(b.get("kind"), 20),
                       term_text(", ".join(map(str, as_list(b.get("hosts")))), 400),
                       term_text(", ".join(f"{k} {v}" for k, v in as_dict(b.get("counts")).items() if v), 200)]
                      for b in map(as_dict, as_list(rollout.get("batches")))]
        gates = [[term_text(h.get("name"), 60), "passed" if as_dict(h.get("gate")).get("passed") else "FAILED",
                  term_text("; ".join(map(str, as_list(as_dict(h.get("gate")).get("reasons")))), 300)]
                 for h in hosts if h.get("gate")]
        parts = [tag("h2", "Rollout"),
                 tag("p", f"canary {rollout.get('canary')}, batch {rollout.get('batch') or 'all'}, max fail "
                          f"{rollout.get('max_fail_pct')} %; health gate from REMOTE_DIR/current: smoke run"
                          + "".join(f", {x}" for x in limits)
                          + (f". {rollout.get('stop_reason')}" if rollout.get("stop_reason") else "")),
                 table(batch_rows, ["batch", "kind", "hosts", "outcome"]),
                 *([tag("h2", "Health gate"), table(gates, ["host", "gate", "reasons"])] if gates else []),
                 *parts]
    return page("edgeq fleet summary", *head, tag("h2", "Hosts"), host_table, *parts)
