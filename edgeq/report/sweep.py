"""``sweep.html``: one self-contained page from a sweep.json document.

The page leads with the verdict (the recommendation, or why there is none) with
the sweep's warnings beside it ("the device is not the target"), then two
Pareto charts (accuracy against size, accuracy against latency), a legend
table of every point, and the full table. The document may be one someone else
wrote, so every value goes through :mod:`edgeq.escape` and numbers are re-checked
as numbers before they are placed on a chart. Latency is labelled by where it
came from: measured on the device, on an emulated device, or the profile's estimate.
"""

from __future__ import annotations

from typing import Any, Optional

from edgeq import units
from edgeq.escape import Html, html_join, tag
from edgeq.report.charts import time_unit
from edgeq.report.facts import Verdict
from edgeq.report.html import VERDICT_CSS, verdict_box
from edgeq.report.pareto import MARKS, Point, chart, mark_icon, pareto_front
from edgeq.report.values import as_dict, num

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2630;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px}
.sub{color:#5b6875;margin:0 0 12px}.charts{display:flex;flex-wrap:wrap;gap:18px}
.chart{border:1px solid #d8dee4;border-radius:6px;padding:8px 10px;background:#fff;width:540px}
.chart h3{font-size:14px;margin:2px 0 6px}.note{font-size:12px;color:#5b6875;margin:4px 0}
table{border-collapse:collapse;font-size:12.5px;width:100%}th,td{padding:4px 6px;border-bottom:1px solid #e5e9ed;
text-align:right;vertical-align:top}th{background:#f3f5f7;position:sticky;top:0}td.l,th.l{text-align:left}
tr.rec td{background:#e9f7ee;font-weight:600}td.verdict{text-align:left;min-width:230px}.scroll{overflow-x:auto}
tr.sim td{color:#6b7785}.why{color:#5b6875;font-weight:400}
.top{display:flex;flex-wrap:wrap;gap:14px;align-items:stretch}.top>.vbox{flex:2 1 520px;margin:0}
.warn{background:#fff6e0;border:1px solid #f0d48a;border-radius:6px;padding:8px 12px;font-size:13px}
.top>.warn{flex:1 1 300px}.warn b{display:block;margin-bottom:4px}
.legend span{margin-right:14px;font-size:12px;white-space:nowrap}svg.mark{vertical-align:-3px;margin-right:4px}
table.points{width:auto;margin-top:10px} td:not(.verdict):not(.l){white-space:nowrap}
.sub .warn{display:inline;border:0;padding:0;background:none;color:#a15c00;font-weight:600;font-size:inherit}
"""


def _d(x: Any) -> dict[str, Any]:
    return as_dict(x)


def _pct(x: Any) -> str:
    v = num(x)
    return units.fmt_pct(None if v is None else 100 * v)


def _fmt(x: Any, digits: int = 3, unit: str = "") -> str:
    v = num(x)
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
    if num(_d(dev.get("latency_ms")).get("p50")) is not None:
        return "emulated" if dev.get("emulated") is True else "device"
    return "estimate"


def _latency(r: dict[str, Any]) -> Optional[float]:
    dev = _d(r.get("device"))
    p50 = num(_d(dev.get("latency_ms")).get("p50"))
    return p50 if p50 is not None else num(r.get("latency_estimate_ms"))


def _quality(r: dict[str, Any], metric: str) -> Optional[float]:
    return num(_d(r.get("host")).get(metric))


def sweep_verdict(doc: dict[str, Any], recipes: list[dict[str, Any]], metric: str) -> Verdict:
    """The recommendation (precision, fits, p50/p99, accuracy drop against the budget, size) or why none."""
    rec = doc.get("recommended")
    metric_word = "accuracy" if metric == "accuracy" else "top-1 agreement with float"
    r = next((x for x in recipes if x.get("name") == rec), None) if rec else None
    device = doc.get("device")
    target = f"{doc.get('target', '?')} ({doc.get('target_kind', '?')})"
    where = "latency is the target profile's estimate (no device)"
    if isinstance(device, dict) and device.get("status") == "failed":
        where = f"the device {device.get('host', '?')} FAILED"
    elif isinstance(device, dict):
        where = (f"measured on {device.get('host', '?')} ({device.get('arch', '?')}"
                 f"{', emulated' if device.get('emulated') is True else ''})")
    items: list[tuple[str, str]] = [("target", f"{target}; {where}")]
    if r is None:
        failed = isinstance(device, dict) and device.get("status") == "failed"
        return Verdict(False, "DEVICE FAILED" if failed else "NONE",
                       "Device failed" if failed else "No recipe qualifies",
                       (*items, ("why", str(doc.get("reason", "")))))
    items.append(("precision", f"{_fmt(r.get('weights_bits'))}-bit weights ({r.get('granularity', '?')}), "
                               f"{r.get('activations', '?')} activations"))
    chk = _d(r.get("check"))
    items.append(("fits", ("yes" if chk.get("fits") is True else "no") + ", "
                  + ("accelerated" if chk.get("accelerated") is True else "not accelerated")
                  + f"; size {units.fmt_bytes(num(r.get('size_bytes')))}"))
    lat = _d(_d(r.get("device")).get("latency_ms"))
    if num(lat.get("p50")) is not None:
        latency = (f"p50 {units.fmt_ms(num(lat.get('p50')))}, p99 {units.fmt_ms(num(lat.get('p99')))} "
                   f"({latency_label(r)})")
    else:
        latency = f"{units.fmt_ms(_latency(r))} (estimate)"
    items.append(("latency", f"{latency}; objective {doc.get('objective', '?')}, no latency budget set"))
    drop = num(r.get("drop_points"))
    budget = num(doc.get("max_drop"))
    items.append((metric_word, f"{_pct(_quality(r, metric))}; "
                               f"drop {'-' if drop is None else f'{drop:.2f}'} points against float "
                               f"(budget {'none set' if budget is None else f'{budget:g} points'})"))
    items.append(("why", str(doc.get("reason", ""))))
    return Verdict(True, "RECOMMENDED", f"Recommended: {rec}", tuple(items))


def _points_table(recipes: list[dict[str, Any]], rec: Any, metric: str, size_front: set[str],
                  lat_front: set[str]) -> Html:
    """Every point of the charts with its mark: the key for the points the charts leave unlabelled."""
    rows = []
    for r in recipes:
        q = _quality(r, metric)
        if q is None:
            continue
        status = _status(r, rec)
        name = str(r.get("name", "?"))
        lat = _latency(r) if r.get("executable") is True else None
        fronts = [w for w, s in (("size", size_front), ("latency", lat_front)) if name in s]
        rows.append(tag("tr", tag("td", mark_icon(status), class_="l"), tag("td", name, class_="l"),
                        tag("td", units.fmt_bytes(num(r.get("size_bytes")))),
                        tag("td", units.fmt_ms(lat) + (f" ({latency_label(r)})" if lat is not None else "")),
                        tag("td", _pct(q)), tag("td", ", ".join(fronts) or "-"),
                        tag("td", MARKS[status][2], class_="l")))
    head = tag("tr", *[tag("th", h, class_="l" if i in (0, 1, 6) else None) for i, h in enumerate(
        ("mark", "recipe", "size", "latency", "accuracy" if metric == "accuracy" else "agreement",
         "on the Pareto front", "meaning"))])
    return tag("table", tag("thead", head), tag("tbody", *rows), class_="points")


def render_html(doc: dict[str, Any]) -> str:
    """The whole page for a sweep.json document (every value escaped)."""
    recipes = [r for r in doc.get("recipes", []) if isinstance(r, dict)] if isinstance(doc.get("recipes"), list) else []
    rec = doc.get("recommended")
    metric = "accuracy" if doc.get("budget_metric") == "accuracy" else "agreement"
    metric_word = "accuracy" if metric == "accuracy" else "top-1 agreement with float"

    size_pts: list[Point] = []
    lat_pts: list[Point] = []
    labels = set()
    has_device = isinstance(doc.get("device"), dict)
    left_out: list[str] = []
    sizes = [s for s in (num(r.get("size_bytes")) for r in recipes) if s is not None and s > 0]
    size_div, size_unit = (1024 * 1024, "MiB") if sizes and max(sizes) >= 1024 * 1024 else (1024, "KiB")
    lats = [v for v in (_latency(r) for r in recipes if r.get("executable") is True) if v is not None and v > 0]
    lat_factor, lat_unit = time_unit(max(lats) if lats else 1.0)
    for r in recipes:
        q = _quality(r, metric)
        if q is None:
            continue
        name = str(r.get("name", "?"))
        status = _status(r, rec)
        size = num(r.get("size_bytes"))
        if size is not None and size > 0:
            size_pts.append(Point(size / size_div, 100 * q, name, status))
        lat = _latency(r)
        if lat is not None and lat > 0 and r.get("executable") is True:
            if has_device and latency_label(r) == "estimate":
                left_out.append(name)  # measured and estimated latencies do not share an axis
                continue
            lat_pts.append(Point(lat * lat_factor, 100 * q, name, status))
            labels.add(latency_label(r))
    if not labels:
        lat_title, lat_note = f"{metric_word} vs latency", "no latency to show"
    elif labels == {"device"}:
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
    size_note = "simulated levels (hollow) show compressed weight size; they are never written or recommended"

    charts = tag("div",
                 chart(f"{metric_word} vs size", f"size ({size_unit})", f"{metric_word} (%)", size_pts, size_note),
                 chart(lat_title, f"latency ({lat_unit})", f"{metric_word} (%)", lat_pts, lat_note),
                 class_="charts")
    legend = tag("p", *[tag("span", mark_icon(status), meaning) for status, (_, _, meaning) in MARKS.items()],
                 tag("span", "dashed line: Pareto front"), class_="legend")
    size_front = {p.name for p in pareto_front([p for p in size_pts if p.status != "simulated"])}
    lat_front = {p.name for p in pareto_front([p for p in lat_pts if p.status != "simulated"])}
    points = _points_table(recipes, rec, metric, size_front, lat_front)

    head = [tag("th", h, class_="l" if i in (0, 14) else None) for i, h in enumerate(
        ("recipe", "weights", "activations", "size", metric_word, "agreement", "SQNR dB", "fits",
         "accelerated", "latency", "source", "p99", "peak RSS", "energy mJ (est.)", "verdict"))]
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
            tag("td", units.fmt_bytes(num(r.get("size_bytes"))) + ("*" if r.get("executable") is not True else "")),
            tag("td", _pct(host.get(metric))),
            tag("td", _pct(host.get("agreement"))),
            tag("td", _fmt(host.get("sqnr_db"), 3)),
            tag("td", fits),
            tag("td", acc),
            tag("td", units.fmt_ms(_latency(r)) if r.get("executable") is True else "-"),
            tag("td", latency_label(r) if r.get("executable") is True and _latency(r) is not None else "-"),
            tag("td", "failed", class_="warn", title=str(r.get("device_error"))[:500])
            if r.get("device_error") and not dev else tag("td", units.fmt_ms(num(p99))),
            tag("td", units.fmt_bytes(num(dev.get("peak_rss_bytes")))),
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
    verdict = sweep_verdict(doc, recipes, metric)
    warns = doc.get("warnings") if isinstance(doc.get("warnings"), list) else []
    warn_box = tag("div", tag("b", "Warnings"), *[tag("div", w) for w in warns], class_="warn") if warns else Html("")
    body = html_join([
        tag("h1", f"edgeq sweep: {doc.get('model', '?')} on {doc.get('target', '?')}"),
        tag("p", f"objective: {doc.get('objective', '?')}; budget: at most {_fmt(doc.get('max_drop'))} points of "
                 f"{metric_word} lost against float"
                 + (f" (float accuracy {_pct(fl.get('accuracy'))})" if num(fl.get("accuracy")) is not None else "")
                 + "; ", dev_line, class_="sub"),
        tag("div", verdict_box(verdict), warn_box, class_="top"),
        tag("h2", "Pareto charts"), legend, charts, points,
        tag("h2", "All recipes"), tag("div", table, class_="scroll"),
        tag("p", "* simulated: size of the compressed weights, not a .tflite. Energy per inference is an estimate "
                 "from the target profile's published power figures and the latency shown (never a measurement).",
            class_="note"),
        tag("p", f"edgeq {doc.get('edgeq_version', '')}; recipe table {doc.get('recipe_table', '')}", class_="note"),
    ])
    return ("<!DOCTYPE html>\n" + tag("html", tag("head", Html('<meta charset="utf-8">'),
                                                  tag("title", f"edgeq sweep: {doc.get('target', '')}"),
                                                  tag("style", Html(_CSS + VERDICT_CSS))),
                                      tag("body", body), lang="en") + "\n")
