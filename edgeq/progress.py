"""Progress events: the library reports, the CLI decides whether to show them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class ProgressEvent:
    """One step of long work: ``stage`` (e.g. "calibrate"), optional ``done``/``total`` and a message."""

    stage: str
    message: str = ""
    done: Optional[int] = None
    total: Optional[int] = None
    host: Optional[str] = None
    unit: str = ""  # "" for items (samples, recipes, runs); "bytes" for transfers


ProgressCallback = Callable[[ProgressEvent], None]


def report(callback: Optional[ProgressCallback], stage: str, message: str = "", done: Optional[int] = None,
           total: Optional[int] = None, host: Optional[str] = None, unit: str = "") -> None:
    """Send an event to ``callback`` if there is one (``unit="bytes"`` when done/total count bytes)."""
    if callback is not None:
        callback(ProgressEvent(stage, message, done, total, host, unit))
