"""Several deploy reports side by side (int8 vs float, Pi 4 vs Pi 5), with ratios against the first."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from edgeq import units
from edgeq.errors import InputError
from edgeq.escape import one_line, tag
from edgeq.outdir import prepare_file
from edgeq.report.charts import percentile_bars
from edgeq.report.facts import Verdict, target_text, temperature_text
from edgeq.report.html import page, render_html, table, verdict_box
from edgeq.report.load import load_report
from edgeq.report.text import fit_table
from edgeq.report.values import as_dict, as_list, int_text, ms, nbytes, num, pct
from edgeq.safeio import atomic_write

SCHEMA = "edgeq.comparison/1"


@dataclass(frozen=True)
class Ratio:
    """One report against the first: how much faster (p50), smaller (model bytes), and the accuracy change."""

    label: str
    speedup: Optional[float]  # first p50 / this p50: above 1 is faster
    size_ratio: Optional[float]  # first bytes / this bytes: above 1 is smaller
    accuracy_delta_points: Optional[float]  # this accuracy minus the first's, in percentage points

    def text(self) -> str:
        """"1.19x faster, 2.3x smaller, accuracy -0.20 points" (what is known of it)."""
        parts = []
        for r, better, worse in ((self.speedup, "faster", "slower"), (self.size_ratio, "smaller", "larger")):
            if r is not None:
                parts.append(f"{units.fmt_ratio(r)} {better}" if r >= 1 else f"{units.fmt_ratio(1 / r)} {worse}")
        if self.accuracy_delta_points is not None:
            parts.append(f"accuracy {self.accuracy_delta_points:+.2f} points")
        return ", ".join(parts) or "nothing to compare"


def _ratio(a: Any, b: Any) -> Optional[float]:
    a, b = num(a), num(b)
    return a / b if a is not None and b is not None and a > 0 and b > 0 else None


def ratios(labels: Sequence[str], docs: Sequence[dict]) -> tuple[Ratio, ...]:
    """Every report after the first, relative to the first."""
    if not docs:
        return ()
    first = docs[0]
    out = []
    for label, doc in zip(labels[1:], docs[1:]):
        acc0, acc = num(first.get("accuracy")), num(doc.get("accuracy"))
        p50s = (as_dict(first.get("latency_ms")).get("p50"), as_dict(doc.get("latency_ms")).get("p50"))
        out.append(Ratio(label, _ratio(*p50s),
                         _ratio(as_dict(first.get("model")).get("bytes"), as_dict(doc.get("model")).get("bytes")),
                         None if acc0 is None or acc is None else (acc - acc0) * 100))
    return tuple(out)


@dataclass(frozen=True)
class Comparison:
    """Several reports side by side: one column per report, one row per measure."""

    directories: tuple[str, ...]
    labels: tuple[str, ...]
    rows: tuple[tuple[str, tuple[str, ...]], ...]
    reports: tuple[dict, ...]

    @property
    def ratios(self) -> tuple[Ratio, ...]:
        return ratios(self.labels, self.reports)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "directories": list(self.directories), "labels": list(self.labels),
                "rows": [{"measure": k, "values": list(v)} for k, v in self.rows],
                "relative_to": self.labels[0] if self.labels else None,
                "ratios": [{"label": r.label, "speedup_p50": r.speedup, "size_ratio": r.size_ratio,
                            "accuracy_delta_points": r.accuracy_delta_points} for r in self.ratios]}

    def table(self) -> str:
        """A plain-text table for the terminal, at most 100 columns wide (long labels cut with an ellipsis)."""
        return "\n".join(fit_table([(k, *v) for k, v in self.rows], ("", *self.labels)))

    def verdict(self) -> Verdict:
        """Which report is fastest and smallest, and each one against the first."""
        def best(key: Callable[[dict], Optional[float]]) -> Optional[int]:
            known = [(v, i) for i, d in enumerate(self.reports) if (v := key(d)) is not None]
            return min(known)[1] if known else None

        fastest = best(lambda d: num(as_dict(d.get("latency_ms")).get("p50")))
        smallest = best(lambda d: num(as_dict(d.get("model")).get("bytes")))
        title = ", ".join(f"{what}: {self.labels[i]}" for what, i in (("fastest (p50)", fastest),
                                                                      ("smallest", smallest)) if i is not None)
        rel = {r.label: r.text() for r in self.ratios}
        items = []
        for i, (label, d) in enumerate(zip(self.labels, self.reports)):
            lat = as_dict(d.get("latency_ms"))
            acc = f"; accuracy {pct(d.get('accuracy'))}" if num(d.get("accuracy")) is not None else ""
            vs = "the reference" if i == 0 else f"{rel.get(label)} than the first"
            items.append((label, f"{target_text(d)}; p50 {ms(lat.get('p50'))}, p99 {ms(lat.get('p99'))}{acc}; "
                                 f"{vs}; no budget set"))
        return Verdict(None, "COMPARE", title or f"{len(self.reports)} reports", tuple(items))

    def html(self) -> str:
        """A self-contained HTML page comparing the reports (one report: its own page)."""
        if len(self.reports) == 1:
            return render_html(self.reports[0])
        pct_rows = [(lab, as_dict(r.get("latency_ms"))) for lab, r in zip(self.labels, self.reports)]
        svg = percentile_bars(pct_rows, label_width=220, label_chars=30, aria="latency comparison",
                              title="Latency percentiles")
        rel = [[r.label, r.text()] for r in self.ratios]
        return page("edgeq comparison", tag("h1", f"edgeq: {len(self.reports)} reports side by side"),
                    verdict_box(self.verdict()),
                    tag("h2", f"Against {self.labels[0]}"), table(rel, ["report", "relative to the first"]),
                    tag("h2", "Measures"), table([[k, *v] for k, v in self.rows], ["", *self.labels]),
                    tag("h2", "Latency"), svg)


def compare(report_dirs: Sequence[str | Path]) -> Comparison:
    """Load one or more report directories and line them up (ratios are against the first)."""
    if not report_dirs:
        raise InputError("no report directories given")
    docs = tuple(load_report(d) for d in report_dirs)
    labels: list[str] = []
    for d, doc in zip(report_dirs, docs):
        host = str(doc.get("host", "?")).split("@")[-1]
        name = one_line(f"{as_dict(doc.get('model')).get('name', '?')} @ {host}", 60)
        labels.append(name if name not in labels else f"{name} ({one_line(Path(d).name, 40)})")

    def col(fn: Callable[[dict], Any]) -> tuple[str, ...]:
        out = []
        for doc in docs:
            try:
                out.append(one_line(fn(doc), 80))
            except (KeyError, TypeError, ValueError, AttributeError):
                out.append("-")
        return tuple(out)

    rel = {r.label: r for r in ratios(labels, docs)}
    rows = [
        ("model sha256", col(lambda d: d["model"]["sha256"][:12])),
        ("model size", col(lambda d: nbytes(d["model"]["bytes"]))),
        ("device", col(lambda d: f"{d['device'].get('arch', '-')} {d['device'].get('cpu_model') or ''}".strip())),
        ("runtime", col(lambda d: f"{d['runtime']['name']} {d['runtime']['version']}")),
        ("threads / XNNPACK", col(lambda d: f"{d['runtime'].get('threads') or 'default'} / "
                                            f"{'on' if d['runtime'].get('xnnpack') else 'off'}")),
        *[(f"latency {k}", col(lambda d, k=k: ms(d["latency_ms"][k]))) for k in ("p50", "p90", "p99", "mean")],
        ("runs", col(lambda d: int_text(d["latency_ms"].get("count", len(as_list(d["latency_ms"].get("samples"))))))),
        ("load", col(lambda d: ms(d["load_ms"]))),
        ("first inference", col(lambda d: ms(d["first_inference_ms"]))),
        ("peak RSS", col(lambda d: nbytes(d["peak_rss_bytes"]))),
        ("accuracy", col(lambda d: pct(d.get("accuracy")))),
        ("agreement top-1", col(lambda d: pct(as_dict(d.get("agreement")).get("top1")))),
        ("temperature", col(temperature_text)),
        ("governor", col(lambda d: str(d["device"].get("cpu_governor") or "-"))),
    ]
    if len(docs) > 1:
        rows.append(("vs the first", ("reference", *[rel[lab].text() for lab in labels[1:]])))
    return Comparison(tuple(str(d) for d in report_dirs), tuple(labels), tuple(rows), docs)


def write_comparison(comparison: Comparison, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``comparison.html()`` to ``path`` atomically (parent directories created; an existing file is
    refused unless ``overwrite``)."""
    return atomic_write(prepare_file(path, overwrite=overwrite), comparison.html())
