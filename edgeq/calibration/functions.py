"""The ``module:function`` source: user code that yields samples."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from edgeq.calibration.types import InputSpec, fmt_shape, no_samples
from edgeq.errors import DataError, EdgeqError

# A `module:function` source may yield forever; we read at most this many samples.
MAX_ITERABLE_SAMPLES = 10_000


def looks_like_function(src: str) -> bool:
    """Whether ``src`` is written ``module.path:function``."""
    if src.count(":") != 1:
        return False
    mod, fn = src.split(":")
    return bool(mod) and fn.isidentifier() and all(p.isidentifier() for p in mod.split("."))


def import_function(src: str, what: str, error: type[EdgeqError]) -> Callable[[], Any]:
    """The function named by ``module:function`` (user code, trusted), found as ``python -m`` finds modules.

    ``what`` starts each message (``"calibration data mod:fn"``); failures raise ``error``.
    """
    mod_name, fn_name = src.split(":")
    added = False
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: modules in the working directory are found
        added = True
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise error(f"{what}: cannot import module '{mod_name}' ({exc})",
                    "check the module name and that it is on PYTHONPATH") from None
    finally:
        if added:
            sys.path.remove("")
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise error(f"{what}: module '{mod_name}' has no function '{fn_name}'")
    return fn


def load_function(src: str, inputs: Sequence[InputSpec], role: str) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
    """Call ``module:function``; stack what it yields (at most MAX_ITERABLE_SAMPLES) per input, plus labels."""
    fn_name = src.split(":")[1]
    fn = import_function(src, f"{role} data {src}", DataError)
    try:
        produced = fn()
        iterator = iter(produced)
    except TypeError:
        raise DataError(f"{role} data {src}: {fn_name}() must return an iterable of samples") from None

    names = [s.name for s in inputs]
    columns: list[list[np.ndarray]] = [[] for _ in inputs]
    labels: list[Any] = []
    for n, item in enumerate(iterator):
        if n >= MAX_ITERABLE_SAMPLES:
            break
        label = None
        if isinstance(item, Mapping):
            missing = [k for k in names if k not in item]
            if missing:
                raise DataError(f"{role} data {src}: sample {n} has no value for input(s) {', '.join(missing)}")
            values = [item[k] for k in names]
            label = item.get("y")
        elif isinstance(item, (tuple, list)):
            if len(item) != len(inputs):
                raise DataError(
                    f"{role} data {src}: sample {n} has {len(item)} arrays, the model has {len(inputs)} inputs",
                    "yield one array per input, or a dict {input name: array}",
                )
            values = list(item)
        else:
            if len(inputs) != 1:
                raise DataError(f"{role} data {src}: sample {n} is one array, the model has {len(inputs)} inputs",
                                "yield a tuple or a dict {input name: array}")
            values = [item]
        for k, (spec, v) in enumerate(zip(inputs, values)):
            v = np.asarray(v)
            # A leading batch axis of 1 is what a Keras user naturally yields.
            if v.ndim == len(spec.sample_shape) + 1 and v.shape[0] == 1:
                v = v[0]
            columns[k].append(v)
        labels.append(label)
    if not columns[0]:
        raise no_samples(src, role)
    arrays = []
    for spec, col in zip(inputs, columns):
        shapes = {c.shape for c in col}
        if len(shapes) > 1:
            raise DataError(
                f"{role} data {src}: input '{spec.name}' samples have different shapes "
                f"({', '.join(fmt_shape(s) for s in sorted(shapes)[:3])})",
                f"expected {fmt_shape(spec.sample_shape)} for every sample",
            )
        try:
            arrays.append(np.stack(col))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{role} data {src}: input '{spec.name}' samples are not numeric arrays ({exc})") from None
    y = np.asarray(labels) if all(v is not None for v in labels) else None
    return arrays, y
