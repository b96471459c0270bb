"""What every part of edgeq.calibration shares: the input signature, the options and the loaded dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from edgeq.defaults import DEFAULT_SAMPLES
from edgeq.errors import DataError, UsageError


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, shape (``None`` for unknown dims, batch first) and dtype name."""

    name: str
    shape: tuple[Optional[int], ...]
    dtype: str = "float32"

    @property
    def sample_shape(self) -> tuple[Optional[int], ...]:
        """The shape of one sample (without the batch axis)."""
        return tuple(self.shape[1:])


@dataclass(frozen=True)
class DataOptions:
    """How to draw and normalise samples.

    ``samples=None`` takes every sample (what evaluation wants). ``mean``/``std``
    (one value, or one per channel) or ``scale`` normalise the raw values:
    ``(x - mean) / std`` or ``x * scale``; they apply to every source kind.
    """

    samples: Optional[int] = DEFAULT_SAMPLES
    seed: int = 0
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    scale: Optional[float] = None

    def __post_init__(self) -> None:
        if self.samples is not None and self.samples < 1:
            raise UsageError(f"--samples must be at least 1, got {self.samples}")
        if self.scale is not None and (self.mean is not None or self.std is not None):
            raise UsageError("use either --scale or --mean/--std, not both")
        if self.std is not None and any(s == 0 for s in self.std):
            raise UsageError("--std must not be 0")

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "seed": self.seed,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "scale": self.scale,
        }


@dataclass(frozen=True)
class Dataset:
    """Validated samples for every model input (read-only arrays, batch axis first)."""

    source: str
    kind: str  # "npy" | "npz" | "images" | "function"
    names: tuple[str, ...]
    arrays: tuple[np.ndarray, ...] = field(repr=False)
    labels: Optional[np.ndarray] = field(default=None, repr=False)
    available: int = 0  # samples in the source before sampling
    indices: tuple[int, ...] = field(default=(), repr=False)  # which source samples were drawn
    # Labels for one output each (``y_<output name>`` in an .npz), drawn like ``labels``.
    output_labels: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.arrays[0].shape[0]) if self.arrays else 0

    def as_dict(self) -> dict[str, np.ndarray]:
        """``{input name: array}`` with all samples."""
        return dict(zip(self.names, self.arrays))

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Sample ``i`` as ``{input name: array with a batch axis of 1}``."""
        return {n: a[i : i + 1] for n, a in zip(self.names, self.arrays)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "samples": len(self),
            "available": self.available,
            "has_labels": self.labels is not None or bool(self.output_labels),
            **({"output_labels": sorted(self.output_labels)} if self.output_labels else {}),
            "inputs": {n: list(a.shape[1:]) for n, a in zip(self.names, self.arrays)},
        }


def fmt_shape(shape: Sequence[Optional[int]]) -> str:
    """``(?, 8, 8, 1)``: a shape for a message, ``?`` for an unknown dimension."""
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + (",)" if len(shape) == 1 else ")")


def no_samples(src: str, role: str) -> DataError:
    """The error for a source that holds no samples."""
    return DataError(f"{role} data {src} holds no samples", f"give at least one {role} sample")
