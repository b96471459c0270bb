"""JSON from elsewhere (a device's answer, a report file someone else wrote): finite numbers, bounded nesting.

``loads`` is ``json.loads`` that refuses ``NaN``, ``Infinity`` and numbers that overflow to infinity
(``1e999``), so every float it returns is finite; it may still raise ``RecursionError`` on absurd nesting,
which callers report as "nested too deeply". ``depth`` measures nesting without recursion.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range for a number")
    return value


def loads(text: str | bytes) -> Any:
    """Parse JSON text; ``ValueError`` for invalid JSON, NaN/Infinity or a number that is not finite."""
    return json.loads(text, parse_constant=_no_constants, parse_float=_finite_float)


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
