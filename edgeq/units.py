"""One unit system for humans: every size, duration, percentage and ratio edgeq shows.

Terminal and HTML text use these; JSON documents keep raw numbers (bytes as int,
seconds as float seconds, percent as float). Binary sizes (KiB/MiB) and µs/ms/s are
chosen by magnitude. Anything that is not a finite number (None, NaN, a string from
an untrusted document) prints as "-", so a caller never shows a value it did not check.
"""
from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["fmt_bytes", "fmt_seconds", "fmt_ms", "fmt_pct", "fmt_ratio", "as_number"]

NONE = "-"


def as_number(v: Any) -> Optional[float]:
    """``v`` as a finite float, or None (bools, strings, NaN and infinities are not numbers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:  # an int beyond float range (JSON allows 400-digit integers)
        return None
    return f if math.isfinite(f) else None


def _sig(v: float) -> str:
    """Three significant figures without exponent: 1.52, 15.4, 154."""
    a = abs(v)
    if a >= 99.95:
        return f"{v:.0f}"
    if a >= 9.995:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_bytes(n: Any) -> str:
    """``812 B``, ``15.4 KiB``, ``3.20 MiB``: binary units chosen by magnitude."""
    v = as_number(n)
    if v is None:
        return NONE
    if abs(v) < 1024:
        return f"{v:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        v /= 1024
        if abs(v) < 1023.95 or unit == "GiB":
            return f"{v:.1f} {unit}"
    return f"{v:.1f} GiB"  # pragma: no cover - the loop always returns


def fmt_seconds(s: Any) -> str:
    """``850 µs``, ``12.3 ms``, ``1.52 s`` from a value in seconds."""
    v = as_number(s)
    if v is None:
        return NONE
    a = abs(v)
    if a == 0:
        return "0 µs"
    if a < 0.9995e-3:
        return f"{_sig(v * 1e6)} µs"
    if a < 0.9995:
        return f"{_sig(v * 1e3)} ms"
    return f"{_sig(v)} s"


def fmt_ms(ms: Any) -> str:
    """Same as :func:`fmt_seconds` for a value in milliseconds."""
    v = as_number(ms)
    return NONE if v is None else fmt_seconds(v / 1000.0)


def fmt_pct(p: Any) -> str:
    """``98.4 %`` from a value already in percent points (two decimals below 1 %)."""
    v = as_number(p)
    if v is None:
        return NONE
    return f"{v:.2f} %" if abs(v) < 1 else f"{v:.1f} %"


def fmt_ratio(r: Any) -> str:
    """``1.19x``, ``12.5x``."""
    v = as_number(r)
    if v is None:
        return NONE
    return f"{v:.2f}x" if abs(v) < 10 else f"{v:.1f}x"
