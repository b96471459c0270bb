"""What kind of output a model has, and how close a quantized (or on-device) output is to its reference.

Standard library and numpy only: the host's validation (``edgeq.convert``) and
the device report (``edgeq.deploy``) use the same rule, so one output is never
a classifier on one side and a regression head on the other.

The rule (``output_kind``), from the output's shape, with labels and reference values when known:

* ``classifier``: ``(N, C)`` with ``C > 1`` (one score per class): top-1 agreement; accuracy
  with class-id labels (integers in ``[0, C)``, or one-hot rows);
* ``segmentation``: ``(N, H, W, C)`` with ``C > 1`` (class scores per pixel): per-pixel agreement
  (argmax over the last axis); pixel accuracy with ``(N, H, W)`` class-id labels;
* ``binary``: ``(N, 1)`` whose reference values are probabilities in ``[0, 1]`` and whose labels
  are all 0 or 1: agreement and accuracy at 0.5;
* ``regression``: everything else, e.g. ``(N, 1)`` without 0/1 labels: no "top-1"; the error
  statistics only (and the mean absolute error against labels of the same size).

Every kind gets max and mean absolute error and SQNR against the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

CLASSIFIER = "classifier"
SEGMENTATION = "segmentation"
BINARY = "binary"
REGRESSION = "regression"
KINDS = (CLASSIFIER, SEGMENTATION, BINARY, REGRESSION)


def output_kind(shape: Sequence[int], labels: Optional[np.ndarray] = None,
                reference: Optional[np.ndarray] = None) -> str:
    """The kind of an output of ``shape`` (batch axis first); see the module docstring for the rule."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 2 and shape[1] > 1:
        return CLASSIFIER
    if len(shape) == 4 and shape[3] > 1:
        return SEGMENTATION
    if len(shape) == 2 and shape[1] == 1 and labels is not None and _binary_labels(labels, shape[0]):
        if reference is None or (reference.size and float(np.min(reference)) >= 0.0
                                 and float(np.max(reference)) <= 1.0):
            return BINARY
    return REGRESSION


def _integral(labels: np.ndarray) -> bool:
    if labels.dtype.kind in "biu":
        return True
    if labels.dtype.kind != "f" or not labels.size:
        return False
    return bool(np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)))


def _binary_labels(labels: np.ndarray, n: int) -> bool:
    labels = np.asarray(labels)
    if labels.shape not in ((n,), (n, 1)) or not _integral(labels):
        return False
    return bool(np.all((labels == 0) | (labels == 1)))


def class_ids(labels: Optional[np.ndarray], kind: str, shape: Sequence[int]) -> Optional[np.ndarray]:
    """``labels`` as integer class ids for an output of ``kind`` and ``shape``; None when they are not."""
    if labels is None or kind == REGRESSION:
        return None
    labels = np.asarray(labels)
    shape = tuple(int(d) for d in shape)
    n = shape[0]
    if labels.ndim == 0 or labels.shape[0] != n:
        return None
    if kind == CLASSIFIER:
        c = shape[1]
        if labels.shape == (n, c) and _integral(labels) and np.all((labels == 0) | (labels == 1)) \
                and np.all(labels.sum(axis=1) == 1):
            return labels.argmax(axis=1)  # one-hot rows
        ids = labels.reshape(n) if labels.shape in ((n,), (n, 1)) else None
        return ids.astype(np.int64) if ids is not None and _integral(ids) and _in_range(ids, c) else None
    if kind == BINARY:
        return labels.reshape(n).astype(np.int64) if _binary_labels(labels, n) else None
    if kind == SEGMENTATION:
        hw, c = shape[1:3], shape[3]
        if labels.shape in ((n, *hw), (n, *hw, 1)) and _integral(labels) and _in_range(labels, c):
            return labels.reshape((n, *hw)).astype(np.int64)
    return None


def _in_range(ids: np.ndarray, classes: int) -> bool:
    return bool(ids.size and np.min(ids) >= 0 and np.max(ids) < classes)


def predictions(values: np.ndarray, kind: str) -> Optional[np.ndarray]:
    """Predicted class ids (per sample, or per pixel); None for a regression output."""
    if kind in (CLASSIFIER, SEGMENTATION):
        return values.argmax(axis=-1)
    if kind == BINARY:
        return (values.reshape(len(values)) > 0.5).astype(np.int64)
    return None


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> Optional[float]:
    """Signal-to-quantization-noise ratio in dB; None when the two are identical."""
    err = reference.astype(np.float64) - candidate.astype(np.float64)
    noise = float(np.sum(err**2))
    if noise == 0:
        return None
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return round(10 * math.log10(signal / noise), 2) if signal > 0 else float("-inf")


@dataclass(frozen=True)
class Comparison:
    """One output of a candidate (quantized model, device) against its reference (float model, host)."""

    kind: str
    samples: int
    max_abs_error: float
    mean_abs_error: float
    sqnr_db: Optional[float]
    agreement: Optional[float] = None  # top-1 (classifier, binary) or per-pixel (segmentation)
    accuracy_reference: Optional[float] = None  # with class-id labels
    accuracy_candidate: Optional[float] = None
    label_mae_reference: Optional[float] = None  # regression with labels of the output's size
    label_mae_candidate: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def compare(reference: np.ndarray, candidate: np.ndarray, labels: Optional[np.ndarray] = None,
            kind: Optional[str] = None) -> Comparison:
    """Compare ``candidate`` with ``reference`` (same shape, batch first); ``kind`` defaults to ``output_kind``."""
    if reference.shape != candidate.shape:
        raise ValueError(f"outputs differ in shape: {reference.shape} and {candidate.shape}")
    kind = kind or output_kind(reference.shape, labels, reference)
    f = reference.astype(np.float64)
    q = candidate.astype(np.float64)
    err = np.abs(f - q)
    n = int(f.shape[0]) if f.ndim else 1
    agree = acc_f = acc_q = mae_f = mae_q = None
    pf, pq = predictions(f, kind), predictions(q, kind)
    if pf is not None and pq is not None and pf.size:
        agree = float(np.mean(pf == pq))
        ids = class_ids(labels, kind, f.shape)
        if ids is not None:
            acc_f, acc_q = float(np.mean(pf == ids)), float(np.mean(pq == ids))
    elif labels is not None and f.ndim and np.asarray(labels).size == f.size \
            and np.asarray(labels).dtype.kind in "biuf":
        y = np.asarray(labels, dtype=np.float64).reshape(f.shape)
        mae_f, mae_q = float(np.mean(np.abs(f - y))), float(np.mean(np.abs(q - y)))
    return Comparison(kind, n, float(err.max()) if err.size else 0.0, float(err.mean()) if err.size else 0.0,
                      sqnr_db(f, q), agree, acc_f, acc_q, mae_f, mae_q)


def assign_labels(shapes: Mapping[str, Sequence[int]], labels: Optional[np.ndarray],
                  per_output: Optional[Mapping[str, np.ndarray]] = None,
                  references: Optional[Mapping[str, np.ndarray]] = None) -> dict[str, tuple[str, np.ndarray]]:
    """Which labels go with which output: ``{output name: (where they came from, labels)}``.

    Labels named after an output (``per_output[name]``, ``y_<name>`` in an
    ``.npz``) go to it. The shared ``y`` goes to the only output, or with
    several outputs to the first (by name) for which it holds class ids, so a
    classifier head gets it and a regression head beside it does not.
    """
    per_output = per_output or {}
    references = references or {}
    out: dict[str, tuple[str, np.ndarray]] = {}
    for name in sorted(shapes):
        if name in per_output:
            out[name] = (f"y_{name}", np.asarray(per_output[name]))
    if labels is None:
        return out
    free = [n for n in sorted(shapes) if n not in out]
    if len(shapes) == 1 and free:
        out[free[0]] = ("y", np.asarray(labels))
        return out
    for name in free:
        kind = output_kind(shapes[name], labels, references.get(name))
        if class_ids(labels, kind, shapes[name]) is not None:
            out[name] = ("y", np.asarray(labels))
            break
    return out
