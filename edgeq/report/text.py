"""Reports as text: the terminal summary, tables that fit 100 columns, and ``report.md``.

Untrusted text goes through ``one_line`` (terminal) or ``md`` (Markdown);
numbers formatted here (``Fmt``) are the only text that skips escaping.
"""

from __future__ import annotations

import textwrap
from typing import Any, Sequence

from edgeq.escape import md, one_line
from edgeq.report.facts import (
    OUTPUT_HEADER,
    accuracy_label,
    delegate_text,
    deploy_verdict,
    device_facts,
    output_rows,
    resize_lines,
)
from edgeq.report.values import (
    Fmt,
    ReportLike,
    as_dict,
    as_list,
    doc_of,
    g,
    int_text,
    ms,
    nbytes,
    num,
    pct,
    term_text,
)

WIDTH = 100  # terminal tables and summary lines fit this many columns


def fit_table(rows: Sequence[Sequence[Any]], header: Sequence[Any], width: int = WIDTH) -> list[str]:
    """A plain-text table (header, rule, rows) at most ``width`` columns wide.

    Cells are put on one line with control characters escaped; when the table is
    too wide the widest column is cut (with an ellipsis) until it fits."""
    data = [[one_line(c, 200) for c in r] for r in [list(header), *rows]]
    n = len(header)
    widths = [max((len(r[i]) for r in data if i < len(r)), default=0) for i in range(n)]
    floor = [min(w, max(min(len(data[0][i]), 12), 4)) for i, w in enumerate(widths)]
    while sum(widths) + 2 * (n - 1) > width:
        i = max(range(n), key=lambda k: (widths[k] - floor[k] > 0, widths[k]))
        if widths[i] <= floor[i]:
            floor = [max(1, f - 1) for f in floor]  # every column at its header width: cut headers too
            continue
        widths[i] -= 1

    def cell(c: str, w: int, middle: bool) -> str:
        if len(c) <= w:
            return c.ljust(w)
        if middle and w >= 8:  # headers keep both ends: "model @ pi-v…name-2" stays told apart from "...-1"
            tail = (w - 1) // 3
            return c[:w - 1 - tail] + "…" + c[len(c) - tail:]
        return c[:max(0, w - 1)] + "…"

    lines = ["  ".join(cell(r[i] if i < len(r) else "", widths[i], k == 0) for i in range(n)).rstrip()
             for k, r in enumerate(data)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _wrap(line: str, width: int = WIDTH) -> list[str]:
    if len(line) <= width:
        return [line]
    indent = " " * (len(line) - len(line.lstrip()) + 2)
    return textwrap.wrap(line, width, subsequent_indent=indent, break_long_words=True, break_on_hyphens=False)


def verdict_line(result: ReportLike) -> str:
    """"verdict: PASS - m.tflite passes its health gate" (one line, untrusted text escaped)."""
    v = deploy_verdict(doc_of(result))
    return f"verdict: {v.word} - {v.title}"


def summary_lines(result: ReportLike) -> list[str]:
    """A short, readable summary of one report for the terminal (lines of at most 100 columns)."""
    doc = doc_of(result)
    lat = as_dict(doc.get("latency_ms"))
    rt = as_dict(doc.get("runtime"))
    model = as_dict(doc.get("model"))
    dev = as_dict(doc.get("device"))
    verdict = deploy_verdict(doc)
    lines = [
        one_line(f"{term_text(model.get('name', 'model'), 60)} on {term_text(doc.get('host'), 60)} "
                 f"({term_text(dev.get('arch', '?'), 40)}, {term_text(dev.get('cpu_model') or '?', 60)})", WIDTH),
        f"  verdict: {verdict.word} - {verdict.title}",
        f"  runtime {term_text(rt.get('name'), 40)} {term_text(rt.get('version'), 40)}, "
        f"XNNPACK {'requested' if rt.get('xnnpack') else 'off'}, "
        f"threads {term_text(rt.get('threads') or 'default', 20)}",
        f"  latency  p50 {ms(lat.get('p50'))}  p90 {ms(lat.get('p90'))}  p99 {ms(lat.get('p99'))}  "
        f"(min {ms(lat.get('min'))}, mean {ms(lat.get('mean'))} ± {ms(lat.get('std'))}, "
        f"{int_text(lat.get('count', 0))} runs)",
        f"  load {ms(doc.get('load_ms'))}, first inference {ms(doc.get('first_inference_ms'))}, "
        f"peak RSS {nbytes(doc.get('peak_rss_bytes'))}",
    ]
    if as_dict(dev.get("emulation")).get("emulated") is True:
        lines.append("  emulated device (qemu): accuracy carries over to real hardware, latency does not")
    ev = as_dict(doc.get("eval"))
    samples = int_text(ev.get("samples")) if ev.get("samples") is not None else "?"
    if num(ev.get("rows")) is not None and num(ev.get("samples")) is not None and ev["rows"] < ev["samples"]:
        samples = f"the first {int_text(ev['rows'])} of {samples}"
    lines += [f"  {line}" for line in resize_lines(doc)]
    if num(doc.get("accuracy")) is not None:
        lines.append(f"  accuracy {pct(doc['accuracy'])} {accuracy_label(doc)} on {samples} samples (on the device)")
    elif num(doc.get("mae")) is not None:
        lines.append(f"  MAE {g(doc['mae'], '.5g')} on {samples} samples (on the device)")
    for row in output_rows(doc):
        figures = ", ".join(f"{h} {v}" for h, v in zip(OUTPUT_HEADER[4:], row[4:]) if str(v) != "-")
        lines.append(f"  output {row[0]} ({row[1]}): {figures or 'no figures'}")
    ag = as_dict(doc.get("agreement"))
    if ag:
        if ag.get("error"):
            lines.append(f"  agreement with host: not measured ({term_text(ag['error'], 300)})")
        else:
            host_acc = (f", host accuracy {pct(ag.get('host_accuracy'))}"
                        if num(ag.get("host_accuracy")) is not None else "")
            top1 = f"top-1 {pct(ag.get('top1'))}, " if num(ag.get("top1")) is not None else ""
            lines.append(f"  agreement with host {term_text(ag.get('reference_runtime'), 40)} "
                         f"{term_text(ag.get('reference_version'), 40)}: {top1}max |diff| {g(ag.get('max_abs_diff'))}"
                         f"{host_acc}")
    tr = as_dict(doc.get("transfer"))
    sent = num(tr.get("model_bytes_sent")) or 0
    method = f" over {term_text(tr['method'], 16)}" if sent and isinstance(tr.get("method"), str) else ""
    lines.append(f"  sent {nbytes(sent)} of model{method}" + (" (already on the device)" if not sent else ""))
    lines.append(f"  delegate applied: {delegate_text(doc)}")
    for w in as_list(doc.get("warnings"))[:50]:
        lines.append(f"  warning: {term_text(w, 300)}")
    return [part for line in lines for part in _wrap(line)]


# -------------------------------------------------------------------- markdown


def _md(value: Any) -> str:
    return str(value) if isinstance(value, Fmt) else md(value)


def _md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(_md(c) for c in cells) + " |"


def render_markdown(result: ReportLike) -> str:
    """``report.md``: verdict, latency table, accuracy, device facts (every value made inert)."""
    doc = doc_of(result)
    lat = as_dict(doc.get("latency_ms"))
    model = as_dict(doc.get("model"))
    verdict = deploy_verdict(doc)
    out = [f"# edgeq deploy report: {md(model.get('name'))} on {md(doc.get('host'))}", "",
           f"**{verdict.word}**: {md(verdict.title)}", ""]
    out += [f"- {k}: {md(v)}" for k, v in verdict.items] + [""]
    out += [f"edgeq {md(doc.get('edgeq_version'))}, {md(doc.get('started_at'))}; model sha256 "
            f"{md(model.get('sha256'))} ({nbytes(model.get('bytes'))})", "",
            "## Latency", "", "| min | p50 | p90 | p99 | mean | std | runs | load | first inference | peak RSS |",
            "|---|---|---|---|---|---|---|---|---|---|",
            _md_row([ms(lat.get("min")), ms(lat.get("p50")), ms(lat.get("p90")), ms(lat.get("p99")),
                     ms(lat.get("mean")), ms(lat.get("std")), int_text(lat.get("count")), ms(doc.get("load_ms")),
                     ms(doc.get("first_inference_ms")), nbytes(doc.get("peak_rss_bytes"))]), ""]
    ev = as_dict(doc.get("eval"))
    if ev:
        ag = as_dict(doc.get("agreement"))
        out += ["## Accuracy on the device", "", "| metric | value |", "|---|---|",
                _md_row([Fmt("samples"), int_text(ev.get("samples"))])]
        if num(doc.get("accuracy")) is not None:
            out.append(_md_row([Fmt("top-1 accuracy (device)"), pct(doc.get("accuracy"))]))
        if num(doc.get("mae")) is not None:
            out.append(_md_row([Fmt("MAE (device)"), g(doc.get("mae"), ".5g")]))
        if num(ag.get("host_accuracy")) is not None:
            label = Fmt(f"top-1 accuracy (host {md(ag.get('reference_runtime'))})")
            out.append(_md_row([label, pct(ag.get("host_accuracy"))]))
        if num(ag.get("top1")) is not None:
            out.append(_md_row([Fmt("top-1 agreement device vs host"), pct(ag.get("top1"))]))
        if num(ag.get("max_abs_diff")) is not None:
            out.append(_md_row([Fmt("max abs output difference"), g(ag.get("max_abs_diff"))]))
        if ag.get("error"):
            out.append(_md_row([Fmt("agreement"), Fmt("not measured: " + md(ag["error"]))]))
        out.append("")
        rows = output_rows(doc)
        if rows:
            out += ["## Outputs", "", _md_row([Fmt(h) for h in OUTPUT_HEADER]),
                    "|" + "---|" * len(OUTPUT_HEADER)] + [_md_row(r) for r in rows] + [""]
    if resize_lines(doc):
        out += ["## Input shape", ""] + [f"- {md(line)}" for line in resize_lines(doc)] + [""]
    out += ["## Device", "", "| fact | value |", "|---|---|"]
    out += [_md_row([Fmt(k), v]) for k, v in device_facts(doc)]  # labels are ours, values the device's
    warnings = as_list(doc.get("warnings"))
    if warnings:
        out += ["", "## Warnings", ""] + [f"- {md(w)}" for w in warnings[:50]]
    return "\n".join(out) + "\n"
