"""JSON from elsewhere (a device's answer, a report file someone else wrote): finite numbers, bounded nesting.

``loads`` is ``json.loads`` that refuses ``NaN``, ``Infinity``, numbers that overflow to infinity
(``1e999``) and integers longer than ``MAX_INT_DIGITS`` digits (``10**400``: no count, size or time edgeq
reads is that long, and such an integer overflows every float conversion after it), so every number it returns
converts to a finite float; it may still raise ``RecursionError`` on absurd nesting, which callers report as
"nested too deeply". ``depth`` measures nesting without recursion.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_INT_DIGITS = 20  # 2**64 has 20 digits: any byte count, id or time in nanoseconds fits


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range for a number")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits ({text[:20]}...) is out of range")
    return int(text)


def loads(text: str | bytes) -> Any:
    """Parse JSON text; ``ValueError`` for invalid JSON, NaN/Infinity, a number that is not finite or an integer
    of more than ``MAX_INT_DIGITS`` digits."""
    return json.loads(text, parse_constant=_no_constants, parse_float=_finite_float, parse_int=_bounded_int)


def depth(doc: Any, limit: int) -> int:
    """How deeply ``doc`` nests (1 for a scalar); stops counting once past ``limit``."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        value, d = stack.pop()
        deepest = max(deepest, d)
        if d > limit:
            return d
        if isinstance(value, dict):
            stack.extend((v, d + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, d + 1) for v in value)
    return deepest
