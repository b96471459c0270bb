"""Calibration and evaluation data: load, sample, validate (no TensorFlow here).

A data source is one of:

* ``.npy``: one array, first axis = samples (single-input models);
* ``.npz``: one array per model input name, or ``x`` (single input), plus an
  optional ``y`` with labels and optional ``y_<output name>`` with labels for
  one output of a model with several (``edgeq.fidelity.assign_labels``);
* a directory of images (``.png``, ``.jpg``, ...), resized to the model input
  with Pillow; images in sub-directories get the sorted sub-directory index as
  their label;
* ``module:function``: a function returning an iterable of samples, each an
  array (single input), a tuple/list of arrays (in input order) or a dict
  ``{input name: array}`` (a ``"y"`` key is taken as the label).

Samples are drawn reproducibly (seeded) and checked against the model's input
signature; every problem is a ``DataError`` naming the source and input.

Where each part lives (the package re-exports the public names)::

    types.py      InputSpec, DataOptions, Dataset (frozen), fmt_shape, no_samples
    sampling.py   the seeded draw of samples (sample_indices, draw)
    readers.py    .npy / .npz / image directories; check_numpy_sizes and the image-size bound
    functions.py  module:function sources (import_function, also used for PyTorch model factories)
    options.py    --mean/--std/--input-shape values; concrete_inputs for unknown dimensions
    dataset.py    load_dataset (read, draw, check, normalise), iter_samples
"""

from edgeq.calibration.dataset import iter_samples, load_dataset
from edgeq.calibration.functions import MAX_ITERABLE_SAMPLES, import_function
from edgeq.calibration.options import MAX_INPUT_DIM, concrete_inputs, parse_floats, parse_input_shape
from edgeq.calibration.readers import (
    IMAGE_SUFFIXES,
    MAX_DATA_BYTES,
    MAX_IMAGE_PIXELS,
    NPZ_BOMB_FLOOR,
    NPZ_MAX_RATIO,
    check_numpy_sizes,
)
from edgeq.calibration.types import DataOptions, Dataset, InputSpec

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_DATA_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_INPUT_DIM",
    "MAX_ITERABLE_SAMPLES",
    "NPZ_BOMB_FLOOR",
    "NPZ_MAX_RATIO",
    "DataOptions",
    "Dataset",
    "InputSpec",
    "check_numpy_sizes",
    "concrete_inputs",
    "import_function",
    "iter_samples",
    "load_dataset",
    "parse_floats",
    "parse_input_shape",
]
