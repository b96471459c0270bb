"""Inline SVG charts for the report pages: latency histogram and series, bars, percentile bars.

Every text node goes through ``edgeq.escape.tag``; numbers are checked before
they are placed. Durations are shown in one unit per chart (µs, ms or s, chosen
by magnitude), and every axis says its unit.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from edgeq.escape import Html, tag
from edgeq.report.values import as_list, ms, num, pct

SVG_NS = "http://www.w3.org/2000/svg"
P50_COLOUR, P99_COLOUR = "#1a7f37", "#c2410c"


def svg(width: Any, height: Any, aria: str, *children: Any) -> Html:
    return tag("svg", *children, xmlns=SVG_NS, width=width, height=height, viewBox=f"0 0 {width} {height}",
               role="img", aria_label=aria)


def text_el(x: Any, y: Any, content: Any, size: int = 11, anchor: Optional[str] = None,
            weight: Optional[str] = None, fill: Optional[str] = None, transform: Optional[str] = None) -> Html:
    return tag("text", content, x=x, y=y, font_size=size, text_anchor=anchor, font_weight=weight, fill=fill,
               transform=transform)


def f1(v: float) -> str:
    return f"{v:.1f}"


def samples_of(lat: dict) -> list[float]:
    """The finite latency samples (ms) of a ``latency_ms`` object."""
    return [v for v in (num(s) for s in as_list(lat.get("samples"))) if v is not None]


def time_unit(top_ms: float) -> tuple[float, str]:
    """(factor from ms, unit) for an axis whose largest value is ``top_ms``."""
    if top_ms < 1:
        return 1000.0, "µs"
    if top_ms >= 10_000:
        return 0.001, "s"
    return 1.0, "ms"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (about ``count`` of them)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def tick_text(v: float) -> str:
    return f"{v:.4g}"


def latency_histogram(samples: Sequence[float], p50: Any = None, p99: Any = None, width: int = 520,
                      height: int = 260) -> Html:
    """Runs per latency bin, with p50 and p99 marked by labelled vertical lines; both axes labelled."""
    if not samples:
        return tag("p", "no samples")
    s = sorted(samples)
    lo, hi = s[0], s[min(len(s) - 1, int(len(s) * 0.995))]
    p50, p99 = num(p50), num(p99)
    hi = max([hi] + [v for v in (p99,) if v is not None and v <= s[-1]])
    if hi <= lo:
        hi = lo + max(abs(lo) * 0.01, 1e-6)
    factor, unit = time_unit(hi)
    nb = 30
    counts = [0] * nb
    for v in samples:
        i = int((v - lo) / (hi - lo) * nb) if math.isfinite((v - lo) / (hi - lo) * nb) else nb - 1
        counts[min(max(i, 0), nb - 1)] += 1
    top = max(counts) or 1
    pl, pr, pt, pb = 56, 14, 52, 44
    w, h = width - pl - pr, height - pt - pb

    def sx(v: float) -> float:
        return pl + (v - lo) / (hi - lo) * w

    bw = w / nb
    parts: list[Html] = [text_el(pl, 16, "Latency distribution", 12, weight="600")]
    parts += [tag("rect", tag("title", f"{c} runs"), x=f1(pl + i * bw), y=f1(pt + h - c / top * h),
                  width=f1(max(bw - 1, 0.5)), height=f1(c / top * h), fill="#3b7dd8") for i, c in enumerate(counts)]
    parts.append(tag("line", x1=pl, y1=pt + h, x2=pl + w, y2=pt + h, stroke="#889"))
    parts.append(tag("line", x1=pl, y1=pt, x2=pl, y2=pt + h, stroke="#889"))
    ticks = [t for t in nice_ticks(lo * factor, hi * factor) if lo * factor - 1e-9 <= t <= hi * factor + 1e-9]
    last_right = -1e9
    for t in ticks:
        x = sx(t / factor)
        label = tick_text(t)
        half = 3.5 * len(label)
        if x - half < last_right + 6:
            continue  # would touch the previous tick label
        last_right = x + half
        parts += [tag("line", x1=f1(x), y1=pt + h, x2=f1(x), y2=pt + h + 4, stroke="#889"),
                  text_el(f1(x), pt + h + 16, label, 10, anchor="middle", fill="#445")]
    for t in (0, top):
        y = pt + h - t / top * h
        parts.append(text_el(pl - 6, f1(y + 4), t, 10, anchor="end", fill="#445"))
    parts.append(text_el(pl + w / 2, height - 6, f"latency ({unit}); runs above p99.5 in the last bin", 11,
                         anchor="middle"))
    parts.append(text_el(14, pt + h / 2, "runs", 11, anchor="middle", transform=f"rotate(-90 14 {pt + h / 2:.0f})"))
    for row, (name, v, colour) in enumerate((("p50", p50, P50_COLOUR), ("p99", p99, P99_COLOUR))):
        if v is None or not lo <= v <= hi:
            continue
        x = sx(v)
        label = f"{name} {ms(v)}"
        y = 30 + row * 15
        anchor = "start" if x + 4 + 6.5 * len(label) <= width - 2 else "end"
        parts += [tag("line", x1=f1(x), y1=y + 3, x2=f1(x), y2=pt + h, stroke=colour, stroke_width="2",
                      stroke_dasharray="5 3"),
                  text_el(f1(x + 4 if anchor == "start" else x - 4), y, label, 11, anchor=anchor, weight="600",
                          fill=colour)]
    return svg(width, height, "latency histogram with p50 and p99", *parts)


def latency_series(samples: Sequence[float], width: int = 520, height: int = 260) -> Html:
    """The median latency of consecutive buckets of runs, in run order (warm-up and throttling show here)."""
    if not samples:
        return tag("p", "no samples")
    n = len(samples)
    buckets = min(n, 400)
    pts = []
    for b in range(buckets):
        chunk = sorted(samples[b * n // buckets:(b + 1) * n // buckets] or [samples[-1]])
        pts.append(chunk[len(chunk) // 2])
    lo, hi = min(pts), max(pts)
    if hi <= lo:
        hi = lo + max(abs(lo) * 0.01, 1e-6)
    factor, unit = time_unit(hi)
    pl, pr, pt, pb = 56, 14, 52, 44
    w, h = width - pl - pr, height - pt - pb
    xy = " ".join(f"{pl + i / max(buckets - 1, 1) * w:.1f},{pt + h - (v - lo) / (hi - lo) * h:.1f}"
                  for i, v in enumerate(pts))
    return svg(width, height, "latency over the run",
               text_el(pl, 16, "Latency over the run", 12, weight="600"),
               text_el(pl, 32, f"median per bucket of {max(n // buckets, 1)} runs", 11, fill="#556"),
               tag("polyline", fill="none", stroke="#d8613b", stroke_width="1.5", points=xy),
               tag("line", x1=pl, y1=pt + h, x2=pl + w, y2=pt + h, stroke="#889"),
               tag("line", x1=pl, y1=pt, x2=pl, y2=pt + h, stroke="#889"),
               text_el(pl - 6, pt + 4, tick_text(hi * factor), 10, anchor="end", fill="#445"),
               text_el(pl - 6, pt + h + 4, tick_text(lo * factor), 10, anchor="end", fill="#445"),
               text_el(pl, pt + h + 16, "1", 10, anchor="middle", fill="#445"),
               text_el(pl + w, pt + h + 16, n, 10, anchor="end", fill="#445"),
               text_el(pl + w / 2, height - 6, "run", 11, anchor="middle"),
               text_el(14, pt + h / 2, f"latency ({unit})", 11, anchor="middle",
                       transform=f"rotate(-90 14 {pt + h / 2:.0f})"))


def fraction_bars(items: Sequence[tuple[str, Any]], title: str, width: int = 520) -> Html:
    """Horizontal bars for fractions (accuracy, agreement) on a 0-100 % scale; empty when none is a number."""
    rows = [(k, num(v)) for k, v in items if num(v) is not None]
    if not rows:
        return Html("")
    height = 30 + 28 * len(rows)
    pl = 250
    w = width - pl - 70
    body = []
    for i, (k, v) in enumerate(rows):
        body += [text_el(pl - 8, 40 + i * 28, k, 12, anchor="end"),
                 tag("rect", x=pl, y=27 + i * 28, width=f1(min(max(v, 0), 1) * w), height=18, fill="#2e9e6a"),
                 tag("rect", x=pl, y=27 + i * 28, width=w, height=18, fill="none", stroke="#ccd"),
                 text_el(pl + w + 6, 40 + i * 28, pct(v), 12)]
    return svg(width, height, title, text_el(10, 16, title, 12, weight="600"), *body)


def percentile_bars(items: Sequence[tuple[str, dict]], label_width: int, label_chars: int, aria: str,
                    title: Optional[str] = None, width: int = 640) -> Html:
    """p50/p90/p99 bars per labelled latency summary, on one shared scale."""
    top = max((max(num(lat.get(k)) or 0.0 for k in ("p50", "p90", "p99")) for _, lat in items), default=0.0) or 1.0
    pl = label_width
    w = width - pl - 80
    parts: list[Html] = []
    if title:
        parts.append(text_el(10, 16, title, 12, weight="600"))
    label_chars = min(label_chars, int((pl - 14) / 6.6) - 4)  # "<label> p99" must fit left of the bars
    y = 30
    for label, lat in items:
        short = str(label) if len(str(label)) <= label_chars else str(label)[:label_chars - 1] + "…"
        for k, color in (("p50", "#3b7dd8"), ("p90", "#7aa6e6"), ("p99", "#b8cff2")):
            v = max(num(lat.get(k)) or 0.0, 0.0)
            parts += [text_el(pl - 8, y + 12, f"{short} {k}", anchor="end"),
                      tag("rect", x=pl, y=y, width=f1(v / top * w), height=14, fill=color),
                      text_el(f1(pl + v / top * w + 4), y + 12, ms(v))]
            y += 18
        y += 8
    return svg(width, y + 10, aria, *parts)
