"""The sweep's Pareto charts: one point per recipe, the front as a step line, labels that never overlap.

Only the recommendation and the points on the Pareto front are labelled; each
label is placed at the first free spot around its point (boxes measured
conservatively for an 11 px sans-serif font) and dropped when none is free, so
no two texts touch. The legend table under the charts lists every point with the
same mark it has on the chart (``mark()`` draws both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from edgeq.escape import Html, html_join, tag

W, H = 520, 360
ML, MR, MT, MB = 64, 16, 20, 50
ZOOM_POINTS = 15.0  # accuracy points below the best shown to scale
CHAR_W, LABEL_H = 6.9, 15.0  # a conservative box for one character / one line of 11 px text

# status -> (colour, shape, meaning); shapes differ as well as colours (never colour alone)
MARKS: dict[str, tuple[str, str, str]] = {
    "recommended": ("#1a7f37", "diamond", "recommended"),
    "lost": ("#3d6fa8", "circle", "fits, not chosen (its verdict says why)"),
    "nofit": ("#c62828", "cross", "does not fit the target"),
    "simulated": ("#8a949e", "ring", "simulated (size only, never written)"),
}


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    name: str
    status: str


def mark(status: str, cx: float, cy: float, tip: Optional[str] = None) -> Html:
    """The shape of a point with ``status`` (the chart and the legend use this one function)."""
    colour, shape, _ = MARKS.get(status, MARKS["lost"])
    title = tag("title", tip) if tip else ""
    if shape == "diamond":
        r = 7.5
        pts = f"{cx:.1f},{cy - r:.1f} {cx + r:.1f},{cy:.1f} {cx:.1f},{cy + r:.1f} {cx - r:.1f},{cy:.1f}"
        return tag("polygon", title, points=pts, fill=colour, stroke="#fff", stroke_width="1")
    if shape == "cross":
        r = 5
        d = (f"M{cx - r:.1f},{cy - r:.1f} L{cx + r:.1f},{cy + r:.1f} "
             f"M{cx - r:.1f},{cy + r:.1f} L{cx + r:.1f},{cy - r:.1f}")
        return tag("path", title, d=d, stroke=colour, stroke_width="2.5", fill="none")
    if shape == "ring":
        return tag("circle", title, cx=f"{cx:.1f}", cy=f"{cy:.1f}", r="4.5", fill="#fff", stroke=colour,
                   stroke_width="2")
    return tag("circle", title, cx=f"{cx:.1f}", cy=f"{cy:.1f}", r="5", fill=colour)


def mark_icon(status: str) -> Html:
    """A 16x16 SVG of the mark, for legends and tables."""
    return tag("svg", mark(status, 8, 8), xmlns="http://www.w3.org/2000/svg", width="16", height="16",
               viewBox="0 0 16 16", class_="mark")


def pareto_front(points: list[Point]) -> list[Point]:
    """Points no other point beats on both axes (smaller x, higher y), by x."""
    front: list[Point] = []
    best_y = -math.inf
    for p in sorted(points, key=lambda p: (p.x, -p.y)):
        if p.y > best_y:
            front.append(p)
            best_y = p.y
    return front


def ticks(lo: float, hi: float, log: bool) -> list[float]:
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
    return [round(first + i * step, 10) for i in range(int((hi - first) / step) + 1)]


Box = tuple[float, float, float, float]  # left, top, right, bottom


def _hits(a: Box, b: Box, pad: float = 2.0) -> bool:
    return a[0] < b[2] + pad and b[0] < a[2] + pad and a[1] < b[3] + pad and b[1] < a[3] + pad


def place_label(label: str, cx: float, cy: float, taken: list[Box], marks: list[Box],
                area: Box) -> Optional[tuple[float, float, str, Box, bool]]:
    """(x, baseline y, text-anchor, box, far) of the first free spot for ``label`` next to (cx, cy), or None;
    ``far`` when the spot is not right beside the point (the chart draws a leader line)."""
    w = CHAR_W * len(label) + 2
    candidates = []
    for d in (1.0, 2.2, 3.4, 4.6):
        gap = 9 * d
        candidates += [(cx + gap, cy + 4, "start", d > 1), (cx - gap, cy + 4, "end", d > 1),
                       (cx, cy - gap, "middle", d > 1), (cx, cy + gap + 10, "middle", d > 1),
                       (cx + gap, cy - gap, "start", True), (cx + gap, cy + gap + 8, "start", True),
                       (cx - gap, cy - gap, "end", True), (cx - gap, cy + gap + 8, "end", True)]
    fallback = None
    for x, y, anchor, far in candidates:
        left = x if anchor == "start" else x - w if anchor == "end" else x - w / 2
        box = (left, y - 11.5, left + w, y - 11.5 + LABEL_H)
        if box[0] < area[0] or box[1] < area[1] or box[2] > area[2] or box[3] > area[3]:
            continue
        if any(_hits(box, t) for t in taken):
            continue
        if not any(_hits(box, m, 0.0) for m in marks):
            return x, y, anchor, box, far
        fallback = fallback or (x, y, anchor, box, far)  # covers a mark but no text: better than no label
    return fallback


def chart(title: str, xlabel: str, ylabel: str, points: list[Point], note: str, x_scale: float = 1.0) -> Html:
    """A scatter plot with the Pareto front as a step line; x values are shown times ``x_scale``."""
    if not points:
        return tag("div", tag("h3", title), tag("p", "no data for this chart", class_="note"), class_="chart")
    xs = [p.x for p in points]
    ys = [p.y for p in points]
    log = min(xs) > 0 and max(xs) / min(xs) > 20
    x_lo, x_hi = (min(xs) / 1.3, max(xs) * 1.3) if log else (0.0, max(xs) * 1.15 or 1.0)
    # Zoom on the useful band: recipes far below the best are pinned to the bottom edge (value in the label),
    # so one broken level does not squash the ones worth choosing between.
    top = max(ys)
    near = [y for y in ys if y >= top - ZOOM_POINTS]
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
        return ML + f * (W - ML - MR)

    def sy(y: float) -> float:
        return H - MB - (y - y_lo) / (y_hi - y_lo) * (H - MT - MB)

    parts: list[Html] = []
    last_right = -math.inf
    for v in ticks(x_lo, x_hi, log):
        x = sx(v)
        label = f"{v * x_scale:.4g}"
        half = CHAR_W * len(label) / 2
        if x - half < last_right + 6 or x - half < ML - 4 or x + half > W - 2:
            continue  # would touch the previous tick label or the y axis's labels, or leave the chart
        last_right = x + half
        parts.append(Html(f'<line x1="{x:.1f}" y1="{MT}" x2="{x:.1f}" y2="{H - MB}" stroke="#eef1f4"/>'))
        parts.append(tag("text", label, x=f"{x:.1f}", y=f"{H - MB + 16}", font_size="11",
                         text_anchor="middle", fill="#5b6875"))
    for v in ticks(y_lo, y_hi, False):
        y = sy(v)
        parts.append(Html(f'<line x1="{ML}" y1="{y:.1f}" x2="{W - MR}" y2="{y:.1f}" stroke="#eef1f4"/>'))
        parts.append(tag("text", f"{v:g}", x=f"{ML - 6}", y=f"{y + 4:.1f}", font_size="11", text_anchor="end",
                         fill="#5b6875"))
    parts.append(Html(f'<rect x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}" '
                      'fill="none" stroke="#c5ced8"/>'))
    parts.append(tag("text", xlabel, x=f"{(ML + W - MR) / 2:.0f}", y=f"{H - 12}", font_size="12",
                     text_anchor="middle", fill="#1d2630"))
    parts.append(tag("text", ylabel, x="16", y=f"{(MT + H - MB) / 2:.0f}", font_size="12", text_anchor="middle",
                     fill="#1d2630", transform=f"rotate(-90 16 {(MT + H - MB) / 2:.0f})"))
    front = pareto_front([p for p in points if p.status != "simulated"])
    if len(front) > 1:
        d = f"M{sx(front[0].x):.1f},{sy(front[0].y):.1f} " + " ".join(
            f"H{sx(p.x):.1f} V{sy(p.y):.1f}" for p in front[1:])
        parts.append(tag("path", d=d, fill="none", stroke="#1a7f37", stroke_width="1.5", stroke_dasharray="4 3"))
    on_front = {p.name for p in front}
    where = [(p, sx(p.x), sy(max(p.y, y_lo))) for p in points]
    marks = [(cx - 6, cy - 6, cx + 6, cy + 6) for _, cx, cy in where]
    # Marks first, the recommendation on top; then the labels: the recommendation, then the front by x.
    for p, cx, cy in sorted(where, key=lambda t: t[0].status == "recommended"):
        parts.append(mark(p.status, cx, cy, f"{p.name}: {p.x * x_scale:.4g}, {p.y:.2f}"))
    area = (ML + 2, MT + 2, W - MR - 2, H - MB - 2)
    taken: list[Box] = []
    leaders: list[Html] = []
    texts: list[Html] = []
    for p, cx, cy in sorted(where, key=lambda t: (t[0].status != "recommended", t[0].x)):
        if p.status != "recommended" and p.name not in on_front:
            continue
        label = p.name if p.y >= y_lo else f"{p.name} ({p.y:.1f}, below the axis)"
        spot = place_label(label, cx, cy, taken, marks, area)
        if spot is None:
            continue  # no free spot: the legend table names it
        x, y, anchor, box, far = spot
        taken.append(box)
        if far:  # a leader line from the point to the near edge of its label
            lx = box[0] if box[0] > cx else box[2] if box[2] < cx else cx
            ly = box[3] if box[3] < cy else box[1] if box[1] > cy else cy
            leaders.append(Html(f'<line x1="{cx:.1f}" y1="{cy:.1f}" x2="{lx:.1f}" y2="{ly:.1f}" '
                                'stroke="#7b8794" stroke-width="0.8"/>'))
        # A white halo keeps a label readable where it has to cross a mark or a leader line.
        texts.append(tag("text", label, x=f"{x:.1f}", y=f"{y:.1f}", font_size="11", text_anchor=anchor,
                         fill="#1d2630", font_weight="600" if p.status == "recommended" else None,
                         stroke="#fff", stroke_width="3", stroke_linejoin="round", paint_order="stroke"))
    parts += leaders + texts
    svg = Html(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
               f'role="img">{html_join(parts)}</svg>')
    note = f"{note}; labelled: the recommendation and the Pareto front (every point is in the table below)"
    if pinned:
        note = f"{note}; points more than {ZOOM_POINTS:g} points below the best sit on the bottom edge"
    return tag("div", tag("h3", title), svg, tag("p", note, class_="note"), class_="chart")
