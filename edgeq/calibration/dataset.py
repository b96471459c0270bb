"""``load_dataset``: read a source, draw samples and check them against the model's inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from edgeq.calibration.functions import load_function, looks_like_function
from edgeq.calibration.readers import load_images, load_npy, load_npz
from edgeq.calibration.sampling import draw
from edgeq.calibration.types import DataOptions, Dataset, InputSpec, fmt_shape, no_samples
from edgeq.errors import DataError


def load_dataset(
    source: str | Path,
    inputs: Sequence[InputSpec],
    options: DataOptions = DataOptions(),
    role: str = "calibration",
) -> Dataset:
    """Load ``source``, draw ``options.samples`` samples (seeded) and validate them against ``inputs``.

    ``role`` ("calibration" or "evaluation") only words the error messages.
    Raises ``DataError`` for anything that does not fit the model.
    """
    if not inputs:
        raise DataError("the model has no inputs to feed")
    output_labels: dict[str, np.ndarray] = {}
    src = str(source)
    path = Path(src)
    if path.is_dir():
        kind = "images"
        arrays, labels, available, indices = load_images(path, inputs, options, role)
    elif path.suffix.lower() == ".npy":
        kind = "npy"
        arrays, labels = load_npy(path, inputs, role)
        available, indices, arrays, labels = draw(arrays, labels, options)
    elif path.suffix.lower() == ".npz":
        kind = "npz"
        arrays, labels, output_labels = load_npz(path, inputs, role)
        for key, y in output_labels.items():
            if y.ndim == 0 or y.shape[0] != arrays[0].shape[0]:
                raise DataError(f"{role} data {src}: 'y_{key}' holds {y.shape[0] if y.ndim else 0} labels for "
                                f"{arrays[0].shape[0] if arrays[0].ndim else 0} samples",
                                "give one label per sample")
        available, indices, arrays, labels = draw(arrays, labels, options)
        output_labels = {k: y[indices] for k, y in output_labels.items()}
    elif looks_like_function(src) and not path.exists():
        kind = "function"
        arrays, labels = load_function(src, inputs, role)
        available, indices, arrays, labels = draw(arrays, labels, options)
    elif not path.exists():
        raise DataError(
            f"{role} data {src}: no such file or directory",
            "give a .npy, .npz, a directory of images or module:function",
        )
    else:
        raise DataError(
            f"{role} data {src}: unknown format '{path.suffix or path.name}'",
            "give a .npy, .npz, a directory of images or module:function",
        )

    checked = []
    for spec, arr in zip(inputs, arrays):
        arr = _check_array(arr, spec, src, role, len(inputs) > 1)
        arr = _normalise(arr, options, spec, src)
        _check_finite(arr, spec, src, role)
        arr = np.ascontiguousarray(arr)
        arr.setflags(write=False)
        checked.append(arr)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape[0] != checked[0].shape[0]:
            raise DataError(
                f"{role} data {src}: {labels.shape[0]} labels for {checked[0].shape[0]} samples",
                "give one label per sample in 'y'",
            )
        labels.setflags(write=False)
    for y in output_labels.values():
        y.setflags(write=False)
    return Dataset(
        source=src,
        kind=kind,
        names=tuple(s.name for s in inputs),
        arrays=tuple(checked),
        labels=labels,
        available=available,
        indices=tuple(int(i) for i in indices),
        output_labels=output_labels,
    )


# ---------------------------------------------------------------- checks


def _check_array(arr: np.ndarray, spec: InputSpec, src: str, role: str, multi: bool) -> np.ndarray:
    where = f"{role} data {src}" + (f" (input '{spec.name}')" if multi else "")
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise no_samples(src, role)
    expected = spec.sample_shape
    got = arr.shape[1:]
    fits = len(got) == len(expected) and all(e is None or e == g for e, g in zip(expected, got))
    if not fits:
        hint = f"each sample must have shape {fmt_shape(expected)} (first axis = samples)"
        if len(got) + 1 == len(expected) and expected[-1] == 1 and tuple(got) == tuple(expected[:-1]):
            hint = "add the channel axis, e.g. x[..., None]"
        elif tuple(arr.shape) == tuple(expected):
            hint = "add a leading samples axis, e.g. x[None]"
        raise DataError(
            f"{where}: expected samples of shape {fmt_shape(expected)} (rank {len(expected)}), "
            f"got {fmt_shape(got)} (rank {len(got)}) from an array of shape {fmt_shape(arr.shape)}",
            hint,
        )
    return _cast(arr, spec, where)


def _cast(arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    try:
        target = np.dtype(spec.dtype)
    except TypeError:
        raise DataError(f"{where}: the model input '{spec.name}' has dtype {spec.dtype}, which edgeq cannot feed") from None
    src = arr.dtype
    if src == target:
        return arr
    safe = (
        np.can_cast(src, target, casting="same_kind")
        or (src.kind in "biu" and target.kind == "f")
        or (src.kind == "b" and target.kind in "iu")
    )
    if src.kind in "iu" and target.kind in "iu" and arr.size:
        info = np.iinfo(target)
        safe = bool(arr.min() >= info.min and arr.max() <= info.max)
    if not safe:
        raise DataError(
            f"{where}: dtype {src} cannot be safely cast to the model's input dtype {target}",
            f"convert the data to {target} yourself if the values allow it",
        )
    with np.errstate(over="ignore", invalid="ignore"):
        return arr.astype(target)


def _normalise(arr: np.ndarray, options: DataOptions, spec: InputSpec, src: str) -> np.ndarray:
    if options.scale is None and options.mean is None and options.std is None:
        return arr
    if np.dtype(spec.dtype).kind in "biu":
        return arr  # an integer model input (token ids, indices) is data, not a signal to normalise
    if arr.dtype.kind != "f":
        raise DataError(f"--mean/--std/--scale need a float model input; '{spec.name}' is {arr.dtype}")
    out = arr.astype(np.float32)
    if options.scale is not None:
        return out * np.float32(options.scale)
    channels = arr.shape[-1] if arr.ndim > 1 else 1
    for values, option in ((options.mean, "--mean"), (options.std, "--std")):
        if values is not None and len(values) not in (1, channels):
            raise DataError(f"{option} has {len(values)} values but input '{spec.name}' has {channels} channels",
                            "give one value, or one per channel")
    if options.mean is not None:
        out = out - np.asarray(options.mean, dtype=np.float32)
    if options.std is not None:
        out = out / np.asarray(options.std, dtype=np.float32)
    return out


def _check_finite(arr: np.ndarray, spec: InputSpec, src: str, role: str) -> None:
    if arr.dtype.kind != "f":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(bad.sum()) - n_nan
        first = int(np.argwhere(bad.reshape(arr.shape[0], -1).any(axis=1))[0][0])
        what = " and ".join(p for p in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if p)
        raise DataError(
            f"{role} data {src}: input '{spec.name}' contains {what} values (first in sample {first})",
            "remove or repair those samples (Inf can also mean values too large for float32)",
        )


def iter_samples(data: Dataset) -> Iterable[dict[str, np.ndarray]]:
    """Every sample as ``{input name: array with a batch axis of 1}``."""
    for i in range(len(data)):
        yield data.sample(i)
