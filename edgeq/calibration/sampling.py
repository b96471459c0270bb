"""Seeded draws: which samples of a source a dataset takes (the same ones for the same seed)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from edgeq.calibration.types import DataOptions
from edgeq.errors import DataError


def draw(
    arrays: list[np.ndarray], labels: Optional[np.ndarray], options: DataOptions
) -> tuple[int, np.ndarray, list[np.ndarray], Optional[np.ndarray]]:
    """The same drawn samples of every array and the labels: (available, indices, arrays, labels)."""
    lengths = {a.shape[0] if a.ndim else 0 for a in arrays}
    available = min(lengths) if lengths else 0
    if len(lengths) > 1:
        raise DataError(f"the input arrays hold different numbers of samples ({sorted(lengths)})",
                        "give every input the same number of samples")
    idx = sample_indices(available, options)
    arrays = [a[idx] if a.ndim else a for a in arrays]
    if labels is not None and labels.ndim and labels.shape[0] == available:
        labels = labels[idx]
    return available, idx, arrays, labels


def sample_indices(available: int, options: DataOptions) -> np.ndarray:
    """Sorted indices of the samples to take out of ``available`` (all of them, or a seeded choice)."""
    if options.samples is None or options.samples >= available:
        return np.arange(available)
    rng = np.random.default_rng(options.seed)
    return np.sort(rng.choice(available, size=options.samples, replace=False))
