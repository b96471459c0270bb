"""Reading values from a report document safely, and formatting them for people.

A report document may come from anyone, so every renderer reads it through
these helpers: ``as_dict``/``as_list`` give an empty value for the wrong type,
``num`` a finite number or None. The formatters return ``Fmt``: text composed
here from constants and checked numbers, the only text the Markdown renderer
passes without escaping. Units come from :mod:`edgeq.units` (one unit system for
the terminal and HTML).
"""

from __future__ import annotations

import re
from typing import Any, Optional, Union

from edgeq import units
from edgeq.escape import one_line

ReportLike = Union[dict, Any]  # a report.json document or a DeployResult

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def doc_of(result: ReportLike) -> dict:
    """The report document of ``result`` (a dict, or anything with ``to_dict()``)."""
    doc = result if isinstance(result, dict) else result.to_dict()
    return doc if isinstance(doc, dict) else {}


def as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else []


def num(value: Any) -> Optional[float]:
    """A finite real number, or None (bools, strings, NaN, infinities and integers beyond float range)."""
    return units.as_number(value)


def term_text(value: Any, limit: int = 200) -> str:
    """Untrusted text for the terminal: one line, control characters escaped, bounded."""
    return "-" if value is None else one_line(value, limit)


def safe_name(value: str, limit: int = 40) -> str:
    """``value`` with only ``[A-Za-z0-9._-]`` (for a directory name)."""
    return (_SAFE.sub("_", value).strip("._-") or "x")[:limit]


class Fmt(str):
    """Text composed here from constants and checked numbers: the only text that skips Markdown escaping."""

    __slots__ = ()


def ms(v: Any) -> Fmt:
    """A duration given in milliseconds, in µs/ms/s by magnitude."""
    return Fmt(units.fmt_ms(num(v)))


def pct(v: Any) -> Fmt:
    """A fraction (0..1) as a percentage."""
    v = num(v)
    return Fmt(units.fmt_pct(None if v is None else v * 100))


def nbytes(v: Any) -> Fmt:
    return Fmt(units.fmt_bytes(num(v)))


def g(v: Any, spec: str = ".4g") -> Fmt:
    v = num(v)
    return Fmt("-" if v is None else format(v, spec))


def int_text(v: Any) -> Fmt:
    v = num(v)
    return Fmt("-" if v is None else str(int(v)))


def points(v: Any) -> Fmt:
    """An accuracy difference in percentage points (a fraction difference times 100)."""
    v = num(v)
    return Fmt("-" if v is None else f"{v * 100:.2f} points")
