"""Deploy reports: ``report.json``, ``report.md`` and a self-contained ``report.html`` (inline SVG).

``compare()`` puts several reports side by side (int8 vs float, Pi 4 vs Pi 5).
Everything here returns text or writes files; nothing prints.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from edgeq.errors import InputError

ReportLike = Union[dict, "Any"]  # a report.json document or a DeployResult

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ReportPaths:
    """Where a report was written."""

    directory: Path
    json: Path
    markdown: Path
    html: Path


def _doc(result: ReportLike) -> dict:
    return result if isinstance(result, dict) else result.to_dict()


def _safe(text: str, limit: int = 40) -> str:
    return (_SAFE.sub("_", text).strip("._-") or "x")[:limit]


def default_report_dir(result: ReportLike, base: str | Path = "reports") -> Path:
    """``reports/<time>-<host>-<model>/`` with only safe characters in the name."""
    doc = _doc(result)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    host = _safe(str(doc.get("host", "device")).split("@")[-1])
    model = _safe(Path(str(doc.get("model", {}).get("name", "model"))).stem)
    return Path(base) / f"{stamp}-{host}-{model}"


def write_report(result: ReportLike, out_dir: str | Path | None = None) -> ReportPaths:
    """Write report.json, report.md and report.html into ``out_dir`` (created if needed)."""
    doc = _doc(result)
    directory = Path(out_dir) if out_dir else default_report_dir(doc)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        paths = ReportPaths(directory, directory / "report.json", directory / "report.md", directory / "report.html")
        _atomic_write(paths.json, json.dumps(doc, indent=2) + "\n")
        _atomic_write(paths.markdown, render_markdown(doc))
        _atomic_write(paths.html, render_html(doc))
    except OSError as exc:
        raise InputError(f"cannot write the report to {directory}: {exc.strerror or exc}",
                         hint="choose another directory with -o") from None
    return paths


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def load_report(directory: str | Path) -> dict:
    """Read ``report.json`` from a report directory (or the file itself)."""
    path = Path(directory)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise InputError(f"no report.json in {directory}", hint="pass a directory written by `edgeq deploy`")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if isinstance(doc, dict) and doc.get("status") in ("failed", "timeout"):
        raise InputError(f"{path}: the deploy to {doc.get('name', '?')} {doc['status']}: {doc.get('error')}")
    if not isinstance(doc, dict) or "latency_ms" not in doc:
        raise InputError(f"{path} is not an edgeq deploy report (no latency_ms)")
    return doc


# ------------------------------------------------------------------ formatting


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v < 0.1:
        return f"{v * 1000:.1f} µs"
    if v < 10:
        return f"{v:.3f} ms"
    return f"{v:.1f} ms"


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 100:.2f} %"


def _bytes(v: Optional[float]) -> str:
    if v is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return str(v)


def _temp(dev: dict) -> str:
    if dev.get("vcgencmd_temp"):
        return str(dev["vcgencmd_temp"]).replace("temp=", "")
    zones = dev.get("thermal_zones") or []
    return ", ".join(f"{z['celsius']:.1f} °C ({z.get('type') or z.get('zone')})" for z in zones[:2]) or "-"


def _throttle(dev: dict) -> str:
    t = dev.get("throttling")
    if not t:
        return "-"
    flags = [k for k, v in t.items() if v is True]
    return f"{t.get('raw', '')} " + (", ".join(flags) if flags else "none")


def device_facts(doc: dict) -> list[tuple[str, str]]:
    """The device facts table rows (label, value)."""
    dev = doc.get("device", {})
    rt = doc.get("runtime", {})
    emu = dev.get("emulation") or {}
    return [
        ("Host", str(doc.get("host", "-"))),
        ("Board / CPU", " / ".join(str(v) for v in (dev.get("board"), dev.get("cpu_model")) if v) or "-"),
        ("Architecture", f"{dev.get('arch', '-')}" + (" (emulated)" if emu.get("emulated") else "")),
        ("Cores", str(dev.get("cpu_cores", "-"))),
        ("OS", f"{dev.get('os', '-')} (kernel {dev.get('kernel', '-')})"),
        ("Python / numpy", f"{dev.get('python', '-')} / {dev.get('numpy', '-')}"),
        ("Runtime", f"{rt.get('name', '-')} {rt.get('version', '')}"),
        ("Threads / XNNPACK", f"{rt.get('threads') or 'default'} / {'on' if rt.get('xnnpack') else 'off'}"),
        ("Memory", f"{_bytes(dev.get('mem_available_bytes'))} free of {_bytes(dev.get('mem_total_bytes'))}"),
        ("CPU governor", str(dev.get("cpu_governor") or "-")),
        ("Temperature", _temp(dev)),
        ("Throttling", _throttle(dev)),
        ("Disk free", _bytes((dev.get("disk") or {}).get("free_bytes"))),
    ]


def summary_lines(result: ReportLike) -> list[str]:
    """A short, readable summary of one report for the terminal."""
    doc = _doc(result)
    lat = doc.get("latency_ms", {})
    rt = doc.get("runtime", {})
    model = doc.get("model", {})
    dev = doc.get("device", {})
    lines = [
        f"{model.get('name', 'model')} on {doc.get('host')} ({dev.get('arch', '?')}, {dev.get('cpu_model') or '?'}): "
        f"{rt.get('name')} {rt.get('version')}, XNNPACK {'on' if rt.get('xnnpack') else 'off'}, "
        f"threads {rt.get('threads') or 'default'}",
        f"  latency  p50 {_ms(lat.get('p50'))}  p90 {_ms(lat.get('p90'))}  p99 {_ms(lat.get('p99'))}  "
        f"(min {_ms(lat.get('min'))}, mean {_ms(lat.get('mean'))} ± {_ms(lat.get('std'))}, {lat.get('count', 0)} runs)",
        f"  load {_ms(doc.get('load_ms'))}, first inference {_ms(doc.get('first_inference_ms'))}, "
        f"peak RSS {_bytes(doc.get('peak_rss_bytes'))}",
    ]
    if (dev.get("emulation") or {}).get("emulated"):
        lines.append("  emulated device (qemu): accuracy carries over to real hardware, latency does not")
    ev = doc.get("eval") or {}
    if doc.get("accuracy") is not None:
        lines.append(f"  accuracy {_pct(doc['accuracy'])} top-1 on {ev.get('samples', '?')} samples (on the device)")
    elif doc.get("mae") is not None:
        lines.append(f"  MAE {doc['mae']:.5g} on {ev.get('samples', '?')} samples (on the device)")
    ag = doc.get("agreement")
    if ag:
        if ag.get("error"):
            lines.append(f"  agreement with host: not measured ({ag['error']})")
        else:
            host_acc = f", host accuracy {_pct(ag.get('host_accuracy'))}" if ag.get("host_accuracy") is not None else ""
            top1 = f"top-1 {_pct(ag.get('top1'))}, " if ag.get("top1") is not None else ""
            lines.append(f"  agreement with host {ag.get('reference_runtime')} {ag.get('reference_version')}: "
                         f"{top1}max |diff| {ag.get('max_abs_diff'):.4g}{host_acc}")
    tr = doc.get("transfer", {})
    lines.append(f"  sent {_bytes(tr.get('model_bytes_sent', 0))} of model"
                 + (" (already on the device)" if not tr.get("model_bytes_sent") else ""))
    for w in doc.get("warnings", []):
        lines.append(f"  warning: {w}")
    return lines


def render_markdown(result: ReportLike) -> str:
    """``report.md``: summary, latency table, accuracy, device facts."""
    doc = _doc(result)
    lat = doc.get("latency_ms", {})
    model = doc.get("model", {})
    out = [f"# edgeq deploy report: {model.get('name')} on {doc.get('host')}", "",
           f"edgeq {doc.get('edgeq_version')}, {doc.get('started_at')}; model sha256 `{model.get('sha256')}` "
           f"({model.get('bytes')} bytes)", "",
           "## Latency", "", "| min | p50 | p90 | p99 | mean | std | runs | load | first inference | peak RSS |",
           "|---|---|---|---|---|---|---|---|---|---|",
           f"| {_ms(lat.get('min'))} | {_ms(lat.get('p50'))} | {_ms(lat.get('p90'))} | {_ms(lat.get('p99'))} | "
           f"{_ms(lat.get('mean'))} | {_ms(lat.get('std'))} | {lat.get('count')} | {_ms(doc.get('load_ms'))} | "
           f"{_ms(doc.get('first_inference_ms'))} | {_bytes(doc.get('peak_rss_bytes'))} |", ""]
    ev = doc.get("eval")
    if ev:
        ag = doc.get("agreement") or {}
        out += ["## Accuracy on the device", "", "| metric | value |", "|---|---|",
                f"| samples | {ev.get('samples')} |"]
        if doc.get("accuracy") is not None:
            out.append(f"| top-1 accuracy (device) | {_pct(doc.get('accuracy'))} |")
        if doc.get("mae") is not None:
            out.append(f"| MAE (device) | {doc.get('mae'):.5g} |")
        if ag.get("host_accuracy") is not None:
            out.append(f"| top-1 accuracy (host {ag.get('reference_runtime')}) | {_pct(ag.get('host_accuracy'))} |")
        if ag.get("top1") is not None:
            out.append(f"| top-1 agreement device vs host | {_pct(ag.get('top1'))} |")
        if ag.get("max_abs_diff") is not None:
            out.append(f"| max abs output difference | {ag.get('max_abs_diff'):.4g} |")
        if ag.get("error"):
            out.append(f"| agreement | not measured: {ag['error']} |")
        out.append("")
    out += ["## Device", "", "| fact | value |", "|---|---|"]
    out += [f"| {k} | {v.replace('|', '/')} |" for k, v in device_facts(doc)]
    if doc.get("warnings"):
        out += ["", "## Warnings", ""] + [f"- {w}" for w in doc["warnings"]]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------- charts

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px;color:#333}
.sub{color:#667;font-size:13px;margin-bottom:16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #dde2ea;border-radius:8px;padding:10px 14px;min-width:120px;background:#f7f9fc}
.card b{display:block;font-size:20px;color:#1f5fbf} .card span{font-size:12px;color:#667}
table{border-collapse:collapse;font-size:13px} td,th{border-bottom:1px solid #e4e8ef;padding:4px 10px;text-align:left}
th{background:#f1f4f9} .charts{display:flex;flex-wrap:wrap;gap:18px} svg{background:#fbfcfe;border:1px solid #e4e8ef}
.warn{color:#a15c00}
"""


def _svg_histogram(samples: Sequence[float], width: int = 520, height: int = 240) -> str:
    if not samples:
        return "<p>no samples</p>"
    s = sorted(samples)
    lo = s[0]
    hi = s[min(len(s) - 1, int(len(s) * 0.995))]
    if hi <= lo:
        hi = lo + max(lo * 0.01, 1e-6)
    nb = 30
    counts = [0] * nb
    for v in samples:
        i = int((v - lo) / (hi - lo) * nb)
        counts[min(max(i, 0), nb - 1)] += 1
    top = max(counts) or 1
    pl, pb, pt = 50, 30, 20
    w, h = width - pl - 10, height - pb - pt
    bw = w / nb
    bars = "".join(
        f'<rect x="{pl + i * bw:.1f}" y="{pt + h - c / top * h:.1f}" width="{bw - 1:.1f}" '
        f'height="{c / top * h:.1f}" fill="#3b7dd8"><title>{c} runs</title></rect>'
        for i, c in enumerate(counts))
    axis = (f'<line x1="{pl}" y1="{pt + h}" x2="{pl + w}" y2="{pt + h}" stroke="#889"/>'
            f'<text x="{pl}" y="{height - 8}" font-size="11">{html.escape(_ms(lo))}</text>'
            f'<text x="{pl + w}" y="{height - 8}" font-size="11" text-anchor="end">{html.escape(_ms(hi))}</text>'
            f'<text x="{pl - 6}" y="{pt + 10}" font-size="11" text-anchor="end">{top}</text>'
            f'<text x="{pl + w / 2}" y="{height - 8}" font-size="11" text-anchor="middle">latency (runs above p99.5 '
            f'in the last bin)</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="latency histogram"><text x="{pl}" y="14" font-size="12" font-weight="600">Latency '
            f'distribution</text>{bars}{axis}</svg>')


def _svg_series(samples: Sequence[float], width: int = 520, height: int = 240) -> str:
    if not samples:
        return "<p>no samples</p>"
    n = len(samples)
    buckets = min(n, 400)
    pts = []
    for b in range(buckets):
        chunk = sorted(samples[b * n // buckets:(b + 1) * n // buckets] or [samples[-1]])
        pts.append(chunk[len(chunk) // 2])
    lo = min(pts)
    hi = max(pts)
    if hi <= lo:
        hi = lo + max(lo * 0.01, 1e-6)
    pl, pb, pt = 50, 30, 20
    w, h = width - pl - 10, height - pb - pt
    xy = " ".join(f"{pl + i / max(buckets - 1, 1) * w:.1f},{pt + h - (v - lo) / (hi - lo) * h:.1f}"
                  for i, v in enumerate(pts))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="latency over the run"><text x="{pl}" y="14" font-size="12" font-weight="600">Latency over '
            f'the run (median per bucket of {max(n // buckets, 1)} runs)</text>'
            f'<polyline fill="none" stroke="#d8613b" stroke-width="1.5" points="{xy}"/>'
            f'<line x1="{pl}" y1="{pt + h}" x2="{pl + w}" y2="{pt + h}" stroke="#889"/>'
            f'<text x="{pl - 4}" y="{pt + 10}" font-size="11" text-anchor="end">{html.escape(_ms(hi))}</text>'
            f'<text x="{pl - 4}" y="{pt + h}" font-size="11" text-anchor="end">{html.escape(_ms(lo))}</text>'
            f'<text x="{pl}" y="{height - 8}" font-size="11">run 1</text>'
            f'<text x="{pl + w}" y="{height - 8}" font-size="11" text-anchor="end">run {n}</text></svg>')


def _svg_bars(items: Sequence[tuple[str, float]], title: str, width: int = 520) -> str:
    rows = [(k, v) for k, v in items if v is not None and not math.isnan(v)]
    if not rows:
        return ""
    height = 30 + 28 * len(rows)
    pl = 250
    w = width - pl - 60
    body = "".join(
        f'<text x="{pl - 8}" y="{40 + i * 28}" font-size="12" text-anchor="end">{html.escape(k)}</text>'
        f'<rect x="{pl}" y="{27 + i * 28}" width="{max(v, 0) * w:.1f}" height="18" fill="#2e9e6a"/>'
        f'<rect x="{pl}" y="{27 + i * 28}" width="{w}" height="18" fill="none" stroke="#ccd"/>'
        f'<text x="{pl + w + 6}" y="{40 + i * 28}" font-size="12">{v * 100:.1f} %</text>'
        for i, (k, v) in enumerate(rows))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{html.escape(title)}"><text x="10" y="16" font-size="12" font-weight="600">'
            f'{html.escape(title)}</text>{body}</svg>')


def _table(rows: Sequence[Sequence[str]], header: Optional[Sequence[str]] = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def render_html(result: ReportLike) -> str:
    """A self-contained ``report.html``: cards, latency charts, accuracy/agreement, device facts."""
    doc = _doc(result)
    lat = doc.get("latency_ms", {})
    model = doc.get("model", {})
    samples = lat.get("samples") or []
    ag = doc.get("agreement") or {}
    cards = [("p50", _ms(lat.get("p50"))), ("p90", _ms(lat.get("p90"))), ("p99", _ms(lat.get("p99"))),
             ("load", _ms(doc.get("load_ms"))), ("first inference", _ms(doc.get("first_inference_ms"))),
             ("peak RSS", _bytes(doc.get("peak_rss_bytes")))]
    if doc.get("accuracy") is not None:
        cards.append(("top-1 accuracy", _pct(doc.get("accuracy"))))
    if ag.get("top1") is not None:
        cards.append(("agreement with host", _pct(ag.get("top1"))))
    cards_html = "".join(f'<div class="card"><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>'
                         for k, v in cards)
    acc_chart = _svg_bars([("accuracy on the device", doc.get("accuracy")),
                           (f"accuracy on the host ({ag.get('reference_runtime') or '-'})", ag.get("host_accuracy")),
                           ("top-1 agreement device/host", ag.get("top1"))], "Accuracy and agreement")
    stats = _table([[_ms(lat.get(k)) for k in ("min", "p50", "p90", "p99", "mean", "std", "max")]
                    + [str(lat.get("count", len(samples)))]],
                   ["min", "p50", "p90", "p99", "mean", "std", "max", "runs"])
    extra = ""
    if ag and ag.get("max_abs_diff") is not None:
        extra = (f"<p>Largest output difference device vs host: {ag['max_abs_diff']:.4g}"
                 + (f" ({ag['max_abs_diff_steps']} quantization steps)" if ag.get("max_abs_diff_steps") is not None
                    else "") + f" over {ag.get('samples')} samples.</p>")
    elif ag.get("error"):
        extra = f"<p class=\"warn\">Agreement not measured: {html.escape(ag['error'])}</p>"
    warns = "".join(f'<p class="warn">warning: {html.escape(w)}</p>' for w in doc.get("warnings", []))
    body = (
        f"<h1>{html.escape(str(model.get('name')))} on {html.escape(str(doc.get('host')))}</h1>"
        f"<div class=\"sub\">edgeq {html.escape(str(doc.get('edgeq_version')))} · {html.escape(str(doc.get('started_at')))}"
        f" · sha256 {html.escape(str(model.get('sha256', ''))[:16])}… · {model.get('bytes')} bytes · model bytes sent "
        f"{(doc.get('transfer') or {}).get('model_bytes_sent', 0)}</div>"
        f"<div class=\"cards\">{cards_html}</div>{warns}"
        f"<h2>Latency</h2>{stats}<div class=\"charts\">{_svg_histogram(samples)}{_svg_series(samples)}</div>"
        + (f"<h2>Accuracy</h2>{acc_chart}{extra}" if acc_chart or extra else "")
        + f"<h2>Device</h2>{_table(device_facts(doc))}"
    )
    return _page(f"edgeq report: {model.get('name')} on {doc.get('host')}", body)


# ------------------------------------------------------------------ comparison


@dataclass(frozen=True)
class Comparison:
    """Several reports side by side: one column per report, one row per measure."""

    directories: tuple[str, ...]
    labels: tuple[str, ...]
    rows: tuple[tuple[str, tuple[str, ...]], ...]
    reports: tuple[dict, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"directories": list(self.directories), "labels": list(self.labels),
                "rows": [{"measure": k, "values": list(v)} for k, v in self.rows]}

    def table(self) -> str:
        """A plain-text table for the terminal."""
        head = ("", *self.labels)
        data = [head] + [(k, *v) for k, v in self.rows]
        widths = [max(len(str(r[i])) for r in data) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in data]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def html(self) -> str:
        """A self-contained HTML page comparing the reports."""
        if len(self.reports) == 1:
            return render_html(self.reports[0])
        pct = [(lab, r.get("latency_ms", {})) for lab, r in zip(self.labels, self.reports)]
        svg = _percentile_bars(pct, label_width=200, label_chars=30, aria="latency comparison",
                               title="Latency percentiles")
        table = _table([[k, *v] for k, v in self.rows], ["", *self.labels])
        body = f"<h1>edgeq: {len(self.reports)} reports side by side</h1>{table}<h2>Latency</h2>{svg}"
        return _page("edgeq comparison", body)


def _percentile_bars(items: Sequence[tuple[str, dict]], label_width: int, label_chars: int, aria: str,
                     title: str | None = None) -> str:
    """An inline SVG with p50/p90/p99 bars per labelled latency summary, on one shared scale."""
    top = max((lat.get("p99") or 0) for _, lat in items) or 1.0
    width, pl = 640, label_width
    w = width - pl - 90
    parts = []
    if title:
        parts.append(f'<text x="10" y="16" font-size="12" font-weight="600">{html.escape(title)}</text>')
    y = 30
    for label, lat in items:
        for k, color in (("p50", "#3b7dd8"), ("p90", "#7aa6e6"), ("p99", "#b8cff2")):
            v = lat.get(k) or 0
            parts.append(f'<text x="{pl - 8}" y="{y + 12}" font-size="11" text-anchor="end">'
                         f'{html.escape(str(label)[:label_chars])} {k}</text><rect x="{pl}" y="{y}" '
                         f'width="{v / top * w:.1f}" height="14" fill="{color}"/><text '
                         f'x="{pl + v / top * w + 4:.1f}" y="{y + 12}" font-size="11">{html.escape(_ms(v))}</text>')
            y += 18
        y += 8
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 10}" role="img" '
            f'aria-label="{html.escape(aria)}">{"".join(parts)}</svg>')

def compare(report_dirs: Sequence[str | Path]) -> Comparison:
    """Load one or more report directories and line them up."""
    if not report_dirs:
        raise InputError("no report directories given")
    docs = tuple(load_report(d) for d in report_dirs)
    labels = []
    for d, doc in zip(report_dirs, docs):
        name = f"{doc.get('model', {}).get('name', '?')} @ {str(doc.get('host', '?')).split('@')[-1]}"
        labels.append(name if name not in labels else f"{name} ({Path(d).name})")

    def col(fn) -> tuple[str, ...]:
        out = []
        for doc in docs:
            try:
                out.append(fn(doc))
            except (KeyError, TypeError, ValueError):
                out.append("-")
        return tuple(out)

    rows = [
        ("model sha256", col(lambda d: d["model"]["sha256"][:12])),
        ("model size", col(lambda d: _bytes(d["model"]["bytes"]))),
        ("device", col(lambda d: f"{d['device'].get('arch', '-')} {d['device'].get('cpu_model') or ''}".strip())),
        ("runtime", col(lambda d: f"{d['runtime']['name']} {d['runtime']['version']}")),
        ("threads / XNNPACK", col(lambda d: f"{d['runtime'].get('threads') or 'default'} / "
                                            f"{'on' if d['runtime'].get('xnnpack') else 'off'}")),
        *[(f"latency {k}", col(lambda d, k=k: _ms(d["latency_ms"][k]))) for k in ("p50", "p90", "p99", "mean")],
        ("runs", col(lambda d: str(d["latency_ms"].get("count", len(d["latency_ms"].get("samples", [])))))),
        ("load", col(lambda d: _ms(d["load_ms"]))),
        ("first inference", col(lambda d: _ms(d["first_inference_ms"]))),
        ("peak RSS", col(lambda d: _bytes(d["peak_rss_bytes"]))),
        ("accuracy", col(lambda d: _pct(d.get("accuracy")))),
        ("agreement top-1", col(lambda d: _pct((d.get("agreement") or {}).get("top1")))),
        ("temperature", col(lambda d: _temp(d["device"]))),
        ("governor", col(lambda d: str(d["device"].get("cpu_governor") or "-"))),
    ]
    return Comparison(tuple(str(d) for d in report_dirs), tuple(labels), tuple(rows), docs)


# ----------------------------------------------------------------------- fleets


@dataclass(frozen=True)
class FleetReportPaths:
    """Where a fleet report was written: one directory per host plus the summary."""

    directory: Path
    summary_json: Path
    summary_html: Path
    hosts: tuple[Path, ...]


def write_fleet_report(result: Any, out_dir: str | Path) -> FleetReportPaths:
    """Write ``<host>/report.json`` (+ md/html) per host and ``summary.json`` + ``summary.html``.

    ``result`` is an ``edgeq.fleet_deploy.FleetResult``; a failed host's
    ``report.json`` holds its status and reason instead of measurements.
    """
    directory = Path(out_dir)
    summary = result.to_dict()
    host_dirs = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for host in result.hosts:
            d = directory / host.name  # names were validated by plan_fleet
            host_dirs.append(d)
            if host.ok and hasattr(host.result, "latency_ms"):
                doc = host.result.to_dict()
                doc["name"] = host.name
                doc["status"] = "ok"
                write_report(doc, d)
            else:
                d.mkdir(parents=True, exist_ok=True)
                doc = {"edgeq_version": summary["edgeq_version"], **host.summary(), "model": summary.get("model")}
                _atomic_write(d / "report.json", json.dumps(doc, indent=2, default=str) + "\n")
        paths = FleetReportPaths(directory, directory / "summary.json", directory / "summary.html", tuple(host_dirs))
        _atomic_write(paths.summary_json, json.dumps(summary, indent=2, default=str) + "\n")
        _atomic_write(paths.summary_html, render_fleet_html(summary))
    except OSError as exc:
        raise InputError(f"cannot write the fleet report to {directory}: {exc.strerror or exc}",
                         hint="choose another directory with -o") from None
    return paths


def fleet_rows(summary: dict) -> list[list[str]]:
    """One row per host: name, status, p50, p90, p99, accuracy, runtime, device, active model, reason."""
    rows = []
    for h in summary.get("hosts", []):
        lat = h.get("latency_ms") or {}
        rt = h.get("runtime") or {}
        dev = h.get("device") or {}
        act = h.get("activation") or {}
        active = act.get("active") or h.get("active")
        rows.append([
            str(h.get("name")), str(h.get("status")),
            _ms(lat.get("p50")) if lat else "-", _ms(lat.get("p90")) if lat else "-",
            _ms(lat.get("p99")) if lat else "-", _pct(h.get("accuracy")),
            f"{rt.get('name')} {rt.get('version')}" if rt else "-",
            f"{dev.get('arch') or '-'} py{dev.get('python') or '?'}" if dev else "-",
            str(active)[:12] if active else "-",
            str(h.get("error") or "")[:160],
        ])
    return rows


FLEET_HEADER = ["host", "status", "p50", "p90", "p99", "accuracy", "runtime", "device", "active", "reason"]


def render_fleet_html(summary: dict) -> str:
    """A self-contained page comparing the hosts of a fleet deploy."""
    counts = summary.get("counts", {})
    model = summary.get("model") or {}
    rows = fleet_rows(summary)
    table = _table(rows, FLEET_HEADER)
    ok = [(h["name"], h.get("latency_ms") or {}) for h in summary.get("hosts", []) if h.get("latency_ms")]
    svg = ""
    if ok:
        svg = "<h2>Latency by host</h2>" + _percentile_bars(ok, label_width=160, label_chars=24,
                                                            aria="latency by host")
    head = (f"<h1>edgeq fleet {html.escape(str(summary.get('action', 'deploy')))}: "
            f"{counts.get('ok', 0)} of {counts.get('hosts', 0)} hosts ok</h1>"
            f"<p>model {html.escape(str(model.get('name', '-')))} sha256 "
            f"{html.escape(str(model.get('sha256', '-'))[:16])}, {html.escape(_bytes(model.get('bytes')))}; "
            f"{counts.get('failed', 0)} failed, {counts.get('timeout', 0)} timed out; "
            f"{summary.get('seconds', 0):.1f} s with {summary.get('forks')} forks; "
            f"started {html.escape(str(summary.get('started_at', '')))}</p>")
    return _page("edgeq fleet summary", head + table + svg)


__all__ = ["ReportPaths", "Comparison", "write_report", "load_report", "compare", "render_html",
           "render_markdown", "summary_lines", "device_facts", "default_report_dir", "FleetReportPaths",
           "write_fleet_report", "render_fleet_html", "fleet_rows", "FLEET_HEADER"]
