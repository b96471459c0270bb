"""Writing a deploy report directory: ``report.json``, ``report.md`` and ``report.html``.

Every file is written with ``edgeq.safeio.atomic_write`` (exclusive temp file,
then rename: a planted symlink is replaced, never written through), into a
directory prepared by ``edgeq.outdir.prepare_dir`` (an existing report is only
replaced when asked).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from edgeq.outdir import prepare_dir
from edgeq.report.html import render_html
from edgeq.report.text import render_markdown
from edgeq.report.values import ReportLike, as_dict, doc_of, safe_name
from edgeq.safeio import atomic_write


@dataclass(frozen=True)
class ReportPaths:
    """Where a report was written."""

    directory: Path
    json: Path
    markdown: Path
    html: Path


def json_text(doc: Any) -> str:
    """JSON without NaN/Infinity (which JSON does not have): they are written as null."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(doc), indent=2, default=str, allow_nan=False) + "\n"


def default_report_dir(result: ReportLike, base: str | Path = "reports") -> Path:
    """``reports/<time>-<host>-<model>/`` with only safe characters in the name."""
    doc = doc_of(result)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    host = safe_name(str(doc.get("host", "device")).split("@")[-1])
    model = safe_name(Path(str(as_dict(doc.get("model")).get("name", "model"))).stem)
    return Path(base) / f"{stamp}-{host}-{model}"


def write_report(result: ReportLike, out_dir: Optional[str | Path] = None, *, overwrite: bool = False) -> ReportPaths:
    """Write report.json, report.md and report.html into ``out_dir`` (created if needed; a directory that
    already holds a report is refused unless ``overwrite``)."""
    doc = doc_of(result)
    directory = prepare_dir(Path(out_dir) if out_dir else default_report_dir(doc), overwrite=overwrite)
    paths = ReportPaths(directory, directory / "report.json", directory / "report.md", directory / "report.html")
    atomic_write(paths.json, json_text(doc))
    atomic_write(paths.markdown, render_markdown(doc))
    atomic_write(paths.html, render_html(doc))
    return paths
