"""The values of ``--mean``/``--std``/``--input-shape``, and concrete shapes for inputs with unknown dimensions."""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import numpy as np

from edgeq.calibration.types import Dataset, InputSpec, fmt_shape
from edgeq.errors import UsageError


def parse_floats(text: Optional[str], option: str) -> Optional[tuple[float, ...]]:
    """Parse ``"0.5"`` or ``"0.485,0.456,0.406"`` for ``--mean``/``--std``."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} takes numbers separated by commas, got '{text}'") from None
    if not values:
        raise UsageError(f"{option} takes numbers separated by commas, got '{text}'")
    if not all(np.isfinite(values)):
        raise UsageError(f"{option} takes finite numbers, got '{text}'", "nan and inf cannot normalise data")
    if option == "--std" and 0.0 in values:
        raise UsageError("--std cannot be 0 (it divides the data)", "use 1 to leave a channel's scale alone")
    return values


MAX_INPUT_DIM = 1 << 16  # one dimension of an --input-shape


def parse_input_shape(text: str) -> tuple[Optional[str], tuple[int, ...]]:
    """``"NAME:1x32x32x3"`` or ``"1x32x32x3"`` (the only input) for ``--input-shape``: (name or None, shape)."""
    name, _, dims = text.rpartition(":")
    parts = dims.lower().split("x")
    if not dims or not all(re.fullmatch(r"[0-9]{1,9}", p.strip()) for p in parts):
        raise UsageError(f"--input-shape takes NAME:1xHxWxC (or 1xHxWxC for a single-input model), got '{text}'",
                         "e.g. --input-shape image:1x96x96x3")
    shape = tuple(int(p) for p in parts)
    if not 1 <= len(shape) <= 8 or not all(1 <= d <= MAX_INPUT_DIM for d in shape):
        raise UsageError(f"--input-shape {text}: each of 1 to 8 dimensions must be between 1 and {MAX_INPUT_DIM}")
    if shape[0] != 1:
        raise UsageError(f"--input-shape {text}: the first (batch) dimension must be 1",
                         "edgeq exports and runs models with a batch of one sample")
    return (name.strip() or None), shape


def concrete_inputs(
    inputs: Sequence[InputSpec],
    given: Sequence[tuple[Optional[str], tuple[int, ...]]] = (),
    data: Optional[Dataset] = None,
) -> tuple[tuple[InputSpec, ...], tuple[dict[str, Any], ...]]:
    """Give inputs with unknown dims (other than the batch) a concrete shape, and say where it came from.

    ``given`` (``--input-shape``) comes first; else the shape of ``data``'s samples.
    Returns the specs (batch 1 where a shape was set) and one record per input
    that was made concrete: ``{"name", "model_shape", "shape", "source"}``.
    Raises ``UsageError`` for a shape that names no input or does not fit one.
    """
    by_name: dict[str, tuple[int, ...]] = {}
    for name, shape in given:
        if name is None:
            if len(inputs) != 1:
                raise UsageError(f"--input-shape {'x'.join(map(str, shape))} names no input, but the model has "
                                 f"{len(inputs)} ({', '.join(s.name for s in inputs)})", "write NAME:1xHxWxC")
            name = inputs[0].name
        if name not in {s.name for s in inputs}:
            raise UsageError(f"--input-shape names input '{name}', which the model does not have",
                             f"the inputs are {', '.join(s.name for s in inputs)}")
        by_name[name] = shape
    specs, records = [], []
    for spec in inputs:
        dynamic = any(d is None for d in spec.shape[1:])
        shape: Optional[tuple[int, ...]] = None
        source = ""
        if spec.name in by_name:
            shape, source = by_name[spec.name], "--input-shape"
            fits = len(shape) == len(spec.shape) and all(e is None or e == g for e, g in zip(spec.shape[1:], shape[1:]))
            if not fits:
                raise UsageError(f"--input-shape {spec.name}:{'x'.join(map(str, shape))} does not fit the model's "
                                 f"input {fmt_shape(spec.shape)}", "keep the model's known dimensions")
        elif dynamic and data is not None and spec.name in data.names:
            arr = data.arrays[data.names.index(spec.name)]
            shape, source = (1,) + tuple(int(d) for d in arr.shape[1:]), "calibration data"
        if shape is None or (not dynamic and source != "--input-shape"):
            specs.append(spec)
            continue
        specs.append(InputSpec(spec.name, shape, spec.dtype))
        if dynamic:
            records.append({"name": spec.name, "model_shape": [-1 if d is None else d for d in spec.shape],
                            "shape": list(shape), "source": source})
    return tuple(specs), tuple(records)
