"""``sweep.html``: one self-contained page from a sweep.json document.

Two Pareto charts (inline SVG: accuracy against size, accuracy against
latency) and the full table. The document may be one someone else wrote, so
every value goes through :mod:`edgeq.escape` (``tag`` escapes children and
attributes; numbers are re-checked as numbers before they are placed on a chart).
Latency is labelled by where it came from: measured on the device, measured on
an emulated device, or the profile's estimate.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from edgeq.escape import Html, html_join, tag

_W, _H = 520, 360
_ML, _MR, _MT, _MB = 60, 20, 20, 50
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2630;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px}
.sub{color:#5b6875;margin:0 0 16px}.charts{display:flex;flex-wrap:wrap;gap:18px}
.chart{border:1px solid #d8dee4;border-radius:6px;padding:8px 10px;background:#fff;width:540px}
.chart h3{font-size:14px;margin:2px 0 6px}.note{font-size:12px;color:#5b6875;margin:4px 0}
table{border-collapse:collapse;font-size:12.5px;width:100%}th,td{padding:4px 6px;border-bottom:1px solid #e5e9ed;
text-align:right;vertical-align:top}th{background:#f3f5f7;position:sticky;top:0}td.l,th.l{text-align:left}
tr.rec td{background:#e9f7ee;font-weight:600}td.verdict{text-align:left;min-width:230px}.scroll{overflow-x:auto}tr.sim td{color:#6b7785}.why{color:#5b6875;font-weight:400}
.rec-box{background:#e9f7ee;border:1px solid #9fd8b2;border-radius:6px;padding:10px 12px}
.warn{background:#fff6e0;border:1px solid #f0d48a;border-radius:6px;padding:8px 12px;font-size:13px}
.legend span{margin-right:14px;font-size:12px}
"""
_ZOOM_POINTS = 15.0  # accuracy points below the best shown to scale
_COLORS = {"recommended": "#1a9c4a", "qualifies": "#2f6fb3", "lost": "#8aa4c0", "nofit": "#d0453a",
           "simulated": "#9aa3ad"}


def _num(x: Any) -> Optional[float]:
    """A finite number, or None (booleans and strings from a crafted file are not numbers)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def _d(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _pct(x: Any) -> str:
    v = _num(x)
    return "-" if v is None else f"{100 * v:.1f}%"


def _kb(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "-"
    return f"{v / 1024:.1f} KB" if v < 1024 * 1024 else f"{v / 1024 / 1024:.2f} MB"


def _fmt(x: Any, digits: int = 3, unit: str = "") -> str:
    v = _num(x)
    return "-" if v is None else f"{v:.{digits}g}{unit}"


def _status(r: dict[str, Any], recommended: Any) -> str:
    if r.get("name") == recommended:
        return "recommended"
    if r.get("executable") is not True:
        return "simulated"
    if not _d(r.get("check")).get("fits"):
        return "nofit"
    return "lost"


def latency_label(r: dict[str, Any]) -> str:
    """Where a recipe's latency came from: "device", "emulated" or "estimate"."""
    dev = _d(r.get("device"))
    if _num(_d(dev.get("latency_ms")).get("p50")) is not None:
        return "emulated" if dev.get("emulated") is True else "device"
    return "estimate"


def _latency(r: dict[str, Any]) -> Optional[float]:
    dev = _d(r.get("device"))
    p50 = _num(_d(dev.get("latency_ms")).get("p50"))
    return p50 if p50 is not None else _num(r.get("latency_estimate_ms"))


def _quality(r: dict[str, Any], metric: str) -> Optional[float]:
    return _num(_d(r.get("host")).get(metric))


def _pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points no other point beats on both axes (smaller x, higher y), by x."""
    front = []
    best_y = -math.inf
    for x, y, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best_y:
            front.append((x, y, name))
            best_y = y
    return front


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        out = []
        e = math.floor(math.log10(lo))
        while 10 ** e <= hi * 1.0001:
            for m in (1, 2, 5):
                v = m * 10 ** e
                if lo * 0.999 <= v <= hi * 1.001:
                    out.append(v)
            e += 1
        return out or [lo, hi]
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / 4
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _chart(title: str, xlabel: str, ylabel: str, pts: list[tuple[float, float, str, str]], note: str) -> Html:
    """A scatter plot with the Pareto front drawn as a step line; ``pts`` = (x, y, name, status)."""
    if not pts:
        return tag("div", tag("h3", title), tag("p", "no data for this chart", class_="note"), class_="chart")
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    log = min(xs) > 0 and max(xs) / min(xs) > 20
    x_lo, x_hi = (min(xs) / 1.3, max(xs) * 1.3) if log else (0.0, max(xs) * 1.15 or 1.0)
    # Zoom on the useful band: recipes far below the best are pinned to the bottom edge (value in the label),
    # so one broken level does not squash the ones worth choosing between.
    top = max(ys)
    near = [y for y in ys if y >= top - _ZOOM_POINTS]
    y_lo, y_hi = min(near), top
    pad = max((y_hi - y_lo) * 0.15, 0.5)
    y_lo, y_hi = max(0.0, y_lo - pad), (min(100.0, y_hi + pad) if y_hi <= 100 else y_hi + pad)
    if y_hi <= y_lo:
        y_hi = y_lo + 1
    pinned = any(y < y_lo for y in ys)

    def sx(x: float) -> float:
        if log:
            f = (math.log10(x) - math.log10(x_lo)) / (math.log10(x_hi) - math.log10(x_lo))
        else:
            f = (x - x_lo) / (x_hi - x_lo)
        return _ML + f * (_W - _ML - _MR)

    def sy(y: float) -> float:
        return _H - _MB - (y - y_lo) / (y_hi - y_lo) * (_H - _MT - _MB)

    parts: list[Html] = []
    for v in _ticks(x_lo, x_hi, log):
        x = sx(v)
        parts.append(Html(f'<line x1="{x:.1f}" y1="{_MT}" x2="{x:.1f}" y2="{_H - _MB}" stroke="#eef1f4"/>'))
        parts.append(tag("text", f"{v:.4g}", x=f"{x:.1f}", y=f"{_H - _MB + 16}", font_size="11",
                         text_anchor="middle", fill="#5b6875"))
    for v in _ticks(y_lo, y_hi, False):
        y = sy(v)
        parts.append(Html(f'<line x1="{_ML}" y1="{y:.1f}" x2="{_W - _MR}" y2="{y:.1f}" stroke="#eef1f4"/>'))
        parts.append(tag("text", f"{v:g}", x=f"{_ML - 6}", y=f"{y + 4:.1f}", font_size="11", text_anchor="end",
                         fill="#5b6875"))
    parts.append(Html(f'<rect x="{_ML}" y="{_MT}" width="{_W - _ML - _MR}" height="{_H - _MT - _MB}" '
                      'fill="none" stroke="#c5ced8"/>'))
    parts.append(tag("text", xlabel, x=f"{(_ML + _W - _MR) / 2:.0f}", y=f"{_H - 12}", font_size="12",
                     text_anchor="middle", fill="#1d2630"))
    parts.append(tag("text", ylabel, x="14", y=f"{(_MT + _H - _MB) / 2:.0f}", font_size="12", text_anchor="middle",
                     fill="#1d2630", transform=f"rotate(-90 14 {(_MT + _H - _MB) / 2:.0f})"))
    front = _pareto([(x, y, n) for x, y, n, s in pts if s != "simulated"])
    if len(front) > 1:
        d = f"M{sx(front[0][0]):.1f},{sy(front[0][1]):.1f} " + " ".join(
            f"H{sx(x):.1f} V{sy(y):.1f}" for x, y, _n in front[1:])
        parts.append(tag("path", d=d, fill="none", stroke="#1a9c4a", stroke_width="1.5", stroke_dasharray="4 3"))
    placed: list[tuple[float, float, float]] = []  # label boxes (x0, x1, y) already drawn
    for x, y, name, status in sorted(pts, key=lambda p: (p[3] != "recommended", p[0], -p[1])):
        shown_y = max(y, y_lo)
        cx, cy = sx(x), sy(shown_y)
        color = _COLORS.get(status, "#2f6fb3")
        tip = tag("title", f"{name}: {x:.4g}, {y:.2f}")
        label = name if y >= y_lo else f"{name} ({y:.1f}, below the axis)"
        lx, width = cx + 8, 6.2 * len(label)
        for dy in (-6, 12, -18, 24, -30, 36, -42, 48):
            ly = cy + dy
            if _MT + 8 <= ly <= _H - _MB - 2 and not any(
                    lx < bx1 and bx0 < lx + width and abs(ly - by) < 11 for bx0, bx1, by in placed):
                break
        else:
            ly = cy - 6
        placed.append((lx, lx + width, ly))
        if status == "simulated":
            parts.append(tag("circle", tip, cx=f"{cx:.1f}", cy=f"{cy:.1f}", r="5", fill="#fff", stroke=color,
                             stroke_width="2"))
        else:
            parts.append(tag("circle", tip, cx=f"{cx:.1f}", cy=f"{cy:.1f}", r="6" if status == "recommended" else "5",
                             fill=color))
        parts.append(tag("text", label, x=f"{lx:.1f}", y=f"{ly:.1f}", font_size="11", fill="#1d2630"))
    svg = Html(f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
               f'role="img">{html_join(parts)}</svg>')
    if pinned:
        note = f"{note}; points more than {_ZOOM_POINTS:g} points below the best sit on the bottom edge"
    return tag("div", tag("h3", title), svg, tag("p", note, class_="note"), class_="chart")


def render_html(doc: dict[str, Any]) -> str:
    """The whole page for a sweep.json document (every value escaped)."""
    recipes = [r for r in doc.get("recipes", []) if isinstance(r, dict)] if isinstance(doc.get("recipes"), list) else []
    rec = doc.get("recommended")
    metric = "accuracy" if doc.get("budget_metric") == "accuracy" else "agreement"
    metric_word = "accuracy" if metric == "accuracy" else "top-1 agreement with float"

    size_pts, lat_pts = [], []
    labels = set()
    has_device = isinstance(doc.get("device"), dict)
    left_out: list[str] = []
    for r in recipes:
        q = _quality(r, metric)
        if q is None:
            continue
        name = str(r.get("name", "?"))
        status = _status(r, rec)
        size = _num(r.get("size_bytes"))
        if size is not None and size > 0:
            size_pts.append((size / 1024, 100 * q, name, status))
        lat = _latency(r)
        if lat is not None and lat > 0 and r.get("executable") is True:
            if has_device and latency_label(r) == "estimate":
                left_out.append(name)  # measured and estimated latencies do not share an axis
                continue
            lat_pts.append((lat, 100 * q, name, status))
            labels.add(latency_label(r))
    if labels == {"device"}:
        lat_title, lat_note = f"{metric_word} vs latency (device-measured p50)", "latency measured on the device (p50)"
    elif labels == {"emulated"}:
        lat_title = f"{metric_word} vs latency (emulated device: p50 under emulation)"
        lat_note = ("latency measured on an emulated device (qemu): it ranks recipes on that emulator, "
                    "not on the real chip")
    elif labels == {"estimate"}:
        lat_title = f"{metric_word} vs latency (estimate)"
        lat_note = "latency is the target profile's estimate from MAC counts, not a measurement"
    else:
        lat_title = f"{metric_word} vs latency (mixed: " + ", ".join(sorted(labels)) + ")"
        lat_note = "each point's latency source is in the table"
    if left_out:
        lat_note += f"; not measured on the device, so not shown: {', '.join(left_out)}"
    size_note = ("simulated levels (hollow) show compressed weight size; they are never written or recommended")

    charts = tag("div",
                 _chart(f"{metric_word} vs size", "size (KB)", f"{metric_word} (%)", size_pts, size_note),
                 _chart(lat_title, "latency (ms)", f"{metric_word} (%)", lat_pts, lat_note),
                 class_="charts")
    legend = tag("p", *[tag("span", Html(f'<svg width="10" height="10"><circle cx="5" cy="5" r="5" fill="{c}"/></svg> '),
                               label) for label, c in (("recommended", _COLORS["recommended"]),
                                                      ("qualifies / lost on the objective", _COLORS["lost"]),
                                                      ("does not fit", _COLORS["nofit"]),
                                                      ("simulated", _COLORS["simulated"]))],
                 tag("span", "dashed line: Pareto front"), class_="legend")

    head = [tag("th", h, class_="l" if i in (0, 14) else None) for i, h in enumerate(
        ("recipe", "weights", "activations", "size", metric_word, "agreement", "SQNR dB", "fits",
         "accelerated", "latency ms", "source", "p99 ms", "peak RSS", "energy mJ (est.)", "verdict"))]
    rows = []
    for r in sorted(recipes, key=lambda r: (r.get("name") != rec, r.get("executable") is not True)):
        host = _d(r.get("host"))
        chk = r.get("check")
        chk = chk if isinstance(chk, dict) else None
        dev = _d(r.get("device"))
        p99 = _d(dev.get("latency_ms")).get("p99")
        fits = "-" if chk is None else ("yes" if chk.get("fits") is True else "no")
        acc = "-" if chk is None else ("yes" if chk.get("accelerated") is True else
                                       f"no ({_fmt(chk.get('macs_share_pct'), 3)}% MACs)")
        cls = "rec" if r.get("name") == rec else ("sim" if r.get("executable") is not True else None)
        verdict = r.get("verdict") or r.get("error") or ""
        cells = [
            tag("td", tag("b", r.get("name", "?")), class_="l", title=r.get("description", "")),
            tag("td", f"{_fmt(r.get('weights_bits'))}-bit ", tag("span", r.get("granularity", ""), class_="why")),
            tag("td", r.get("activations", "")),
            tag("td", _kb(r.get("size_bytes")) + ("*" if r.get("executable") is not True else "")),
            tag("td", _pct(host.get(metric))),
            tag("td", _pct(host.get("agreement"))),
            tag("td", _fmt(host.get("sqnr_db"), 3)),
            tag("td", fits),
            tag("td", acc),
            tag("td", _fmt(_latency(r), 3) if r.get("executable") is True else "-"),
            tag("td", latency_label(r) if r.get("executable") is True and _latency(r) is not None else "-"),
            tag("td", "failed", class_="warn", title=str(r.get("device_error"))[:500])
            if r.get("device_error") and not dev else tag("td", _fmt(p99, 3)),
            tag("td", _kb(dev.get("peak_rss_bytes"))),
            tag("td", _fmt(r.get("energy_mj"), 3)),
            tag("td", verdict, class_="verdict why" if r.get("name") != rec else "verdict"),
        ]
        rows.append(tag("tr", *cells, class_=cls))
    table = tag("table", tag("thead", tag("tr", *head)), tag("tbody", *rows))

    fl = _d(doc.get("float"))
    device = doc.get("device")
    dev_line: Any = "no device: latency and energy are the profile's estimates"
    device_failed = isinstance(device, dict) and device.get("status") == "failed"
    if device_failed and not _d(device.get("runtime")):
        dev_line = tag("span", f"device {device.get('host', '?')}: FAILED, nothing measured there: ",
                       str(device.get("error", ""))[:2000], class_="warn")
    elif isinstance(device, dict):
        rt = _d(device.get("runtime"))
        dev_line = (f"device {device.get('host', '?')} ({device.get('arch', '?')}"
                    f"{', emulated (qemu)' if device.get('emulated') is True else ''}), runtime "
                    f"{rt.get('name', '?')} {rt.get('version', '')}")
        if device_failed:
            dev_line = html_join([dev_line, tag("span", "; FAILED during the sweep: ",
                                                str(device.get("error", ""))[:2000], class_="warn")])
    if rec:
        rec_box = tag("div", tag("b", f"Recommended: {rec}"), Html(" &mdash; "), doc.get("reason", ""),
                      class_="rec-box")
    else:
        rec_box = tag("div", tag("b", "Device failed" if device_failed else "No recipe qualifies"),
                      Html(" &mdash; "), doc.get("reason", ""), class_="warn")
    warns = doc.get("warnings") if isinstance(doc.get("warnings"), list) else []
    warn_box = tag("div", *[tag("div", w) for w in warns], class_="warn") if warns else Html("")
    body = html_join([
        tag("h1", f"edgeq sweep: {doc.get('model', '?')} on {doc.get('target', '?')}"),
        tag("p", f"objective: {doc.get('objective', '?')}; budget: at most {_fmt(doc.get('max_drop'))} points of "
                 f"{metric_word} lost against float"
                 + (f" (float accuracy {_pct(fl.get('accuracy'))})" if _num(fl.get("accuracy")) is not None else "")
                 + f"; {dev_line}", class_="sub"),
        rec_box,
        tag("h2", "Pareto charts"), legend, charts,
        tag("h2", "All recipes"), tag("div", table, class_="scroll"),
        tag("p", "* simulated: size of the compressed weights, not a .tflite. Energy per inference is an estimate "
                 "from the target profile's published power figures and the latency shown (never a measurement).",
            class_="note"),
        warn_box,
        tag("p", f"edgeq {doc.get('edgeq_version', '')}; recipe table {doc.get('recipe_table', '')}", class_="note"),
    ])
    return ("<!DOCTYPE html>\n" + tag("html", tag("head", Html('<meta charset="utf-8">'),
                                                  tag("title", f"edgeq sweep: {doc.get('target', '')}"),
                                                  tag("style", Html(_CSS))),
                                      tag("body", body), lang="en") + "\n")
