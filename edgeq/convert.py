"""Convert a float model to a quantized TFLite model, as stages, and report what quantization did.

The only module of edgeq that imports TensorFlow, and only inside functions, so
``edgeq --help``, ``check`` and ``deploy`` never pay for it.

The pipeline, one function per stage, each returning a frozen result::

    loaded     = load_model(path, LoadOptions())              # Keras 3, SavedModel, legacy .h5 (safely)
    float_m    = export_float(loaded, workdir)                # batch-1 SavedModel + float .tflite, once
    calibrated = calibrate(float_m, calib_dataset)            # activation ranges, once
    quantized  = quantize(float_m, calibrated, recipe, IoTypes())   # any recipe, reusing the ranges
    validation = validate(quantized, float_m, eval_dataset)   # accuracy, agreement, SQNR, worst layers
    result     = write(quantized, report_for(...))            # model + report, atomically

``convert()`` composes them for ``edgeq convert``; the sweep and the repair run
the same stages, exporting and calibrating once for many recipes. Static
recipes made by TensorFlow's converter are quantized from the recorded ranges
with ``mlir_quantize`` (int8) or the converter's own int16 quantizer, giving
the same tensors as ``TFLiteConverter.convert()`` with a representative dataset.
Nothing is written unless everything succeeded.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from edgeq import __version__
from edgeq.calibration import DataOptions, Dataset, InputSpec, load_dataset
from edgeq.errors import ConversionError, EdgeqError, InputError, ModelError, RecipeError, UsageError
from edgeq.isolate import StageCrashed, run_forked
from edgeq.recurrent import crash_error
from edgeq.progress import ProgressCallback, report
from edgeq.recipes import Recipe, RecipeTable, load_recipes, recipe_for_scheme
from edgeq.safeio import refuse_output_over_input, temp_beside
from edgeq.tflite_file import TfliteModel, parse_tflite

SCHEMES = ("int8", "int16x8")
IO_TYPES = ("int8", "uint8", "int16", "float32")
# Model input/output types each activation kind allows; the first is the default.
_IO_ALLOWED = {"int8": ("int8", "uint8", "float32"), "int16": ("int16", "float32")}
# Ops Flatten/Reshape add when the batch size is dynamic; microcontroller runtimes dislike them.
DYNAMIC_SHAPE_OPS = ("SHAPE", "STRIDED_SLICE", "PACK")
_SIGNATURE = "serving_default"
# Points of accuracy (or top-1 agreement) a conversion may lose before the result warns that it collapsed.
DEFAULT_WARN_DROP = 5.0


# ---------------------------------------------------------------- options and results


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model. ``unsafe_load`` lets a model run the Python code it carries (Lambda layers)."""

    unsafe_load: bool = False
    # PyTorch models (edgeq.torch_convert): "nchw" | "nhwc" inputs; None: the layout of ``layout_data``.
    layout: Optional[str] = None
    layout_data: Optional[str] = None


@dataclass(frozen=True)
class IoTypes:
    """Model input and output types; None picks the recipe's default (int8, int16 or float32)."""

    input: Optional[str] = None
    output: Optional[str] = None

    def resolve(self, recipe: Recipe, scheme_name: Optional[str] = None) -> tuple[str, str]:
        """(input type, output type) for ``recipe``; ``UsageError`` when a type does not go with it."""
        if recipe.full_integer:
            allowed = _IO_ALLOWED[recipe.activations]
        else:
            allowed = ("float32",)
        what = f"--scheme {scheme_name}" if scheme_name else f"recipe {recipe.name}"
        out = []
        for which, value in (("input", self.input), ("output", self.output)):
            value = value or allowed[0]
            if value not in allowed:
                raise UsageError(f"--{which}-type {value} does not go with {what}",
                                 f"choose one of {', '.join(allowed)}")
            out.append(value)
        return out[0], out[1]


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``convert`` needs besides the model, the calibration data and the output path."""

    scheme: str = "int8"  # "int8" | "int16x8": the older way to name recipe "int8" / "int16x8"
    input_type: Optional[str] = None  # None: the recipe's default (int8; int16 with int16x8; else float32)
    output_type: Optional[str] = None
    data: DataOptions = DataOptions()  # calibration sampling and normalisation
    eval_data: Optional[str] = None  # a data source with held-out samples (and labels)
    eval_samples: Optional[int] = None  # None: every evaluation sample
    # A target profile name or file: convert() applies its conversion constraints (per-channel,
    # schemes it runs); the check against it is composed by the caller (the CLI).
    target: Optional[str] = None
    per_channel: bool = True  # per-channel weights (ANCHORS: the TFLite int8 convention)
    report_path: Optional[str] = None  # default: OUT.report.json beside the model
    worst_layers: int = 5  # how many layers to list by quantization error (0: skip the debugger)
    recipe: Optional[str] = None  # a recipe name; None: from scheme and per_channel
    recipes_file: Optional[str] = None  # a user's recipe table; None: the shipped one
    load: LoadOptions = LoadOptions()
    warn_drop: float = DEFAULT_WARN_DROP  # warn when --eval shows more lost than this many points
    # Concrete shapes for inputs with unknown dims ((input name or None for the only input, shape));
    # without one, the calibration data's shape is used (edgeq.calibration.concrete_inputs).
    input_shapes: tuple[tuple[Optional[str], tuple[int, ...]], ...] = ()

    def resolved_recipe(self, table: Optional[RecipeTable] = None) -> Recipe:
        """The recipe these options ask for (``RecipeError`` for an unknown or simulated one)."""
        if self.scheme not in SCHEMES:
            raise UsageError(f"unknown scheme '{self.scheme}'", f"choose one of {', '.join(SCHEMES)}")
        table = table or load_recipes(self.recipes_file)
        if self.recipe is None:
            return table.get(recipe_for_scheme(self.scheme, self.per_channel))
        recipe = table.get(self.recipe)
        if not recipe.executable:
            runnable = ", ".join(r.name for r in table.executable())
            raise RecipeError(f"recipe '{recipe.name}' is simulated: no runtime here executes it, so it is "
                              f"never written as a .tflite", f"measure it with edgeq sweep, or choose one of {runnable}")
        return recipe

    def resolved_io(self, recipe: Optional[Recipe] = None) -> tuple[str, str]:
        """(input type, output type) after applying the recipe's defaults and checking them."""
        recipe = recipe or self.resolved_recipe()
        return IoTypes(self.input_type, self.output_type).resolve(recipe, None if self.recipe else self.scheme)


@dataclass(frozen=True)
class IoQuant:
    """A model input or output of the converted model."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    scale: Optional[float]
    zero_point: Optional[int]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "scale": self.scale, "zero_point": self.zero_point}


@dataclass(frozen=True)
class OutputFidelity:
    """Float vs quantized model on the evaluation data, for one output."""

    name: str
    samples: int
    max_abs_error: float
    sqnr_db: Optional[float]  # None when float and quantized outputs are identical
    top1_agreement: Optional[float] = None  # classifier and binary outputs only
    accuracy_float: Optional[float] = None  # with class-id labels (per pixel for segmentation)
    accuracy_quant: Optional[float] = None
    kind: str = "classifier"  # edgeq.fidelity.output_kind: classifier | segmentation | binary | regression
    mean_abs_error: Optional[float] = None
    pixel_agreement: Optional[float] = None  # segmentation: argmax over the last axis, per pixel
    mae_float: Optional[float] = None  # regression with labels: mean |output - label|
    mae_quant: Optional[float] = None
    labels: Optional[str] = None  # which labels were used ("y", "y_<output>") or None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "samples": self.samples, "labels": self.labels,
            "top1_agreement": self.top1_agreement, "pixel_agreement": self.pixel_agreement,
            "accuracy_float": self.accuracy_float, "accuracy_int": self.accuracy_quant,
            "mae_float": self.mae_float, "mae_int": self.mae_quant,
            "max_abs_error": self.max_abs_error, "mean_abs_error": self.mean_abs_error, "sqnr_db": self.sqnr_db,
        }


@dataclass(frozen=True)
class LayerError:
    """Quantization error of one layer's output, from the quantization debugger."""

    tensor: str
    layer: Optional[str]
    op: Optional[str]
    rmse_over_scale: float  # RMS error in units of the tensor's quantization step (about 0.29 is ideal)
    max_abs_error: float
    mean_squared_error: float

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "layer": self.layer, "op": self.op,
                "rmse_over_scale": self.rmse_over_scale, "max_abs_error": self.max_abs_error,
                "mean_squared_error": self.mean_squared_error}


@dataclass(frozen=True)
class LoadedModel:
    """A loaded float model: where it came from, its inputs and layer names, and how to export it.

    ``model`` is the Keras 3 or tf_keras model (the repair stages rewrite it), or
    the loaded SavedModel object.
    """

    path: str
    fmt: str  # "keras" | "h5" | "saved_model"
    loader: str  # "keras" | "tf_keras" | "saved_model"
    model_name: str
    inputs: tuple[InputSpec, ...]
    layer_names: tuple[str, ...]
    float_weight_bytes: int
    model: Any = field(repr=False, compare=False)
    # export(out_dir, inputs) writes a batch-1 SavedModel traced at ``inputs`` (``inputs``, made concrete).
    export: Callable[[str, Sequence[InputSpec]], None] = field(repr=False, compare=False)
    # PyTorch models: edgeq.torch_convert.TorchStages, whose export_float / calibrate / quantize /
    # reference replace the TensorFlow stages (no TensorFlow on that path). None for Keras and SavedModel.
    stages: Optional[Any] = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class FloatModel:
    """The batch-1 float model: a SavedModel directory (inside the caller's workdir) and its float ``.tflite``."""

    loaded: LoadedModel
    saved_model_dir: str
    content: bytes = field(repr=False)
    tflite: TfliteModel = field(repr=False)
    seconds: float = 0.0
    notes: tuple[str, ...] = ()  # what export changed on the way (e.g. recurrent layers unrolled)

    @property
    def size_bytes(self) -> int:
        return len(self.content)


@dataclass(frozen=True)
class Calibration:
    """Activation ranges recorded once on the calibration samples, reused by every static recipe.

    ``calibrated`` is the float ``.tflite`` with TensorFlow's recorded min/max;
    litert-quantizer's own ranges are recorded on first use and kept in ``_litert``.
    """

    dataset: Dataset = field(repr=False)
    calibrated: bytes = field(repr=False)
    seconds: float = 0.0
    _litert: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def samples(self) -> int:
        return len(self.dataset)


@dataclass(frozen=True)
class QuantizedModel:
    """One recipe applied: the ``.tflite`` bytes, parsed, and its I/O types."""

    recipe: Recipe
    content: bytes = field(repr=False)
    tflite: TfliteModel = field(repr=False)
    input_type: str
    output_type: str
    static_shapes: bool
    keys: dict[int, str] = field(default_factory=dict, repr=False, compare=False)  # tensor -> signature name
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def size_bytes(self) -> int:
        return len(self.content)

    @property
    def per_channel(self) -> bool:
        return self.recipe.per_channel

    def io(self) -> tuple[tuple[IoQuant, ...], tuple[IoQuant, ...]]:
        return _io(self.tflite, self.keys)


@dataclass(frozen=True)
class Validation:
    """Quantized against float on the evaluation data."""

    fidelity: tuple[OutputFidelity, ...]
    evaluation: dict[str, Any]
    worst_layers: tuple[LayerError, ...] = ()
    ranges: Optional[dict[str, Any]] = None  # how calibration ranges settle (with a Calibration)
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0

    def accuracy_drop(self) -> Optional[float]:
        """Points of accuracy lost (float - quantized, x100) on the first output with labels; else None."""
        for f in self.fidelity:
            if f.accuracy_float is not None and f.accuracy_quant is not None:
                return 100.0 * (f.accuracy_float - f.accuracy_quant)
        return None

    def drop_warning(self, threshold: float = DEFAULT_WARN_DROP) -> Optional[str]:
        """A warning when the quantized model lost more than ``threshold`` points (accuracy, else agreement)."""
        drop, metric = self.accuracy_drop(), "accuracy"
        if drop is None:
            drop, metric = self.agreement_drop(), "agreement with the float model"
        return collapse_warning(drop, metric, threshold)

    def agreement_drop(self) -> Optional[float]:
        """100 - top-1 (or per-pixel) agreement in points on the first class-scoring output; else None."""
        for f in self.fidelity:
            agreement = f.top1_agreement if f.top1_agreement is not None else f.pixel_agreement
            if agreement is not None:
                return 100.0 * (1.0 - agreement)
        return None


def collapse_warning(drop: Optional[float], metric: str, threshold: float = DEFAULT_WARN_DROP,
                     remedy: str = "re-run with --max-drop PTS to repair it, and see worst_layers in the report"
                     ) -> Optional[str]:
    """The warning for a quantized model that lost ``drop`` points of ``metric`` (None: within ``threshold``)."""
    if drop is None or not drop > threshold:
        return None
    return (f"the quantized model lost {drop:.1f} points of {metric} against float (more than {threshold:g}): "
            f"it has collapsed or nearly so; {remedy}")


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert`` wrote and measured; ``to_dict()`` is the report JSON."""

    output: str
    report_path: str
    model: str
    model_format: str  # "keras" | "h5" | "saved_model"
    loader: str  # "keras" | "tf_keras" | "saved_model"
    scheme: str
    input_type: str
    output_type: str
    per_channel: bool
    calibration: dict[str, Any]
    float_bytes: int
    float_bytes_source: str  # "converted" (measured) | "estimated" (from the float weights)
    quant_bytes: int
    ops: dict[str, int]
    static_shapes: bool
    inputs: tuple[IoQuant, ...]
    outputs: tuple[IoQuant, ...]
    fidelity: Optional[tuple[OutputFidelity, ...]] = None
    evaluation: Optional[dict[str, Any]] = None
    worst_layers: tuple[LayerError, ...] = ()
    target: Optional[str] = None
    check: Optional[dict[str, Any]] = None
    check_summary: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    timings_s: dict[str, float] = field(default_factory=dict)
    sha256: str = ""
    recipe: Optional[Recipe] = None
    # Inputs with unknown dims and the concrete shape the model was exported at (and where it came from).
    input_shapes: tuple[dict[str, Any], ...] = ()

    @property
    def size_ratio(self) -> float:
        return self.quant_bytes / self.float_bytes if self.float_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "edgeq_version": __version__,
            "model": {"path": self.model, "format": self.model_format, "loader": self.loader},
            "output": {"path": self.output, "sha256": self.sha256},
            "recipe": self.recipe.to_dict() if self.recipe is not None else None,
            "scheme": self.scheme,
            "input_type": self.input_type,
            "output_type": self.output_type,
            "per_channel": self.per_channel,
            "calibration": self.calibration,
            "size": {
                "float32_bytes": self.float_bytes,
                "float32_bytes_source": self.float_bytes_source,
                "quantized_bytes": self.quant_bytes,
                "ratio": round(self.size_ratio, 4),
            },
            "ops": self.ops,
            "static_shapes": self.static_shapes,
            "inputs": [i.to_dict() for i in self.inputs],
            "input_shapes": list(self.input_shapes),
            "outputs": [o.to_dict() for o in self.outputs],
            "evaluation": self.evaluation,
            "fidelity": [f.to_dict() for f in self.fidelity] if self.fidelity is not None else None,
            "worst_layers": [w.to_dict() for w in self.worst_layers],
            "target": self.target,
            "check": self.check,
            "warnings": list(self.warnings),
            "timings_s": self.timings_s,
        }


def default_report_path(output: str | Path) -> Path:
    """``out.tflite`` -> ``out.report.json`` (beside it)."""
    p = Path(output)
    return p.with_name((p.stem if p.suffix else p.name) + ".report.json")


def model_format(path: str | Path) -> str:
    """Classify a model path without TensorFlow: "keras", "h5", "saved_model", or for PyTorch "pt2" /
    "torch-function" (``module:function``) (or raise ModelError)."""
    from edgeq import torch_convert  # imports no torch

    if torch_convert.is_torch_model(path):
        return torch_convert.torch_format(path)
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: no such file or directory", "check the path to the model")
    if p.is_dir():
        if (p / "saved_model.pb").is_file() or (p / "saved_model.pbtxt").is_file():
            return "saved_model"
        raise ModelError(f"{p} is a directory without saved_model.pb, not a SavedModel",
                         "give a .keras or .h5 file, or a SavedModel directory")
    if not p.is_file():
        raise ModelError(f"{p} is not a regular file", "give a .keras or .h5 file, or a SavedModel directory")
    suffix = p.suffix.lower()
    if suffix == ".tflite":
        raise ModelError(f"{p} is already a .tflite model",
                         "edgeq convert takes the float model (.keras, .h5 or SavedModel directory)")
    if suffix not in (".keras", ".h5", ".hdf5"):
        raise ModelError(f"{p} is not a model edgeq can convert (unknown extension '{suffix or p.name}')",
                         "give a .keras or .h5 file, or a SavedModel directory")
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelError(f"{p}: cannot read ({exc.strerror})", "check the file's permissions") from None
    if suffix == ".keras" and not head.startswith(b"PK"):
        raise ModelError(f"{p} is not a Keras model (a .keras file is a zip archive)",
                         "save the model with model.save('model.keras')")
    if suffix in (".h5", ".hdf5") and not head.startswith(b"\x89HDF"):
        raise ModelError(f"{p} is not a Keras .h5 model (no HDF5 signature)",
                         "save the model with model.save('model.h5')")
    return "keras" if suffix == ".keras" else "h5"


# ---------------------------------------------------------------- TensorFlow, quietly


@contextlib.contextmanager
def quiet_tensorflow() -> Iterator[None]:
    """Keep TensorFlow's C++ and Python log lines away from the user.

    Native code writes straight to file descriptor 2, so that is pointed at a
    scratch file; Python's ``sys.stderr`` keeps writing to the real terminal so
    progress stays visible.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):
        pass
    try:
        is_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        is_fd2 = False
    saved = os.dup(2)
    scratch = tempfile.TemporaryFile()
    old_stderr = sys.stderr
    replacement = None
    try:
        os.dup2(scratch.fileno(), 2)
        if is_fd2:
            replacement = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
            sys.stderr = replacement
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        try:
            sys.stderr.flush()
        except (ValueError, OSError):
            pass
        sys.stderr = old_stderr
        os.dup2(saved, 2)
        os.close(saved)
        scratch.close()
        if replacement is not None:
            replacement.close()


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Make TensorFlow's own ``gc.collect()`` cheap during conversion.

    The SavedModel converter calls ``gc.collect()``, which walks every object
    TensorFlow and Keras have allocated (about 0.2 s, as long as converting a
    small model); frozen objects are skipped.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _tf() -> Any:
    """Import TensorFlow with its Python loggers turned down."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError:
        raise EdgeqError("edgeq convert needs TensorFlow", "pip install 'edgeq[convert]'") from None
    tf.get_logger().setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    return tf


# ---------------------------------------------------------------- stage 1: load


_UNSAFE_HINT = ("edgeq refuses to run code from a model file; if you trust this file, "
                "re-run with --unsafe-load (it lets the file run its code on this machine)")
# Keras 3's words when safe mode refuses to deserialize code ("... potential risk of arbitrary code
# execution ... safe_mode=False ..."): after that refusal edgeq never tries another loader.
_SAFE_MODE_REFUSAL = re.compile(r"safe_mode|arbitrary code execution", re.IGNORECASE)
_MAX_H5_CONFIG = 16 << 20  # bytes of model_config JSON we are willing to parse


def load_model(path: str | Path, options: LoadOptions = LoadOptions()) -> LoadedModel:
    """Load a ``.keras``, ``.h5`` or SavedModel for conversion; ``ModelError`` if it cannot be loaded safely.

    Keras models load in safe mode, and their whole config is walked first:
    any serialized function (a ``Lambda``, an RNN cell wrapper's ``residual_fn``,
    any ``*_type: "lambda"`` entry, marshalled bytecode anywhere) is refused (a
    one-line ``ModelError`` naming where) unless ``options.unsafe_load``; a
    ``.keras`` zip whose declared sizes are a bomb is refused in any case. A
    legacy ``.h5`` goes to ``tf_keras`` only when Keras 3 cannot parse it, and
    only after its config has been checked for code (``tf_keras`` runs the
    bytecode of an ``.h5`` Lambda even in safe mode). SavedModels are programs:
    loading one runs no Python, but its graph functions run when traced.
    """
    p = Path(path)
    fmt = model_format(p)
    if fmt in ("pt2", "torch-function"):
        from edgeq.torch_convert import load_torch

        return load_torch(path, fmt, options.unsafe_load, options.layout, options.layout_data)
    with quiet_tensorflow():
        tf = _tf()
        if fmt == "saved_model":
            return _load_saved_model(tf, p)
        return _load_keras(tf, p, fmt, options)


def _load_keras(tf: Any, path: Path, fmt: str, options: LoadOptions) -> LoadedModel:
    errors = []
    import keras

    if fmt == "h5" and not options.unsafe_load:
        _refuse_h5_code(path)  # before any loader parses the file
    if fmt == "keras":
        _check_keras_archive(path, options.unsafe_load)  # declared sizes, then code, before Keras opens it
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=not options.unsafe_load)
    except Exception as exc:  # noqa: BLE001 - any failure here means "try the legacy loader", unless refused
        if not options.unsafe_load and _SAFE_MODE_REFUSAL.search(str(exc)):
            raise ModelError(f"{path} carries Python code (a Lambda layer or an unsafe object) that Keras "
                             "refuses to load in safe mode", _UNSAFE_HINT) from None
        errors.append(f"Keras 3: {_first_line(exc)}")
    else:
        return _from_keras3(tf, keras, model, fmt, path)
    if fmt == "h5":
        try:
            import tf_keras
        except ImportError:
            errors.append("tf_keras is not installed (pip install tf-keras)")
        else:
            try:
                model = tf_keras.models.load_model(path, compile=False, safe_mode=not options.unsafe_load)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"tf_keras: {_first_line(exc)}")
            else:
                return _from_tf_keras(tf, model, path)
    raise ModelError(f"cannot load {path} as a Keras model ({'; '.join(errors)})",
                     "check that the file is a complete Keras model saved with model.save()")


def _refuse_h5_code(path: Path) -> None:
    """Refuse a legacy ``.h5`` whose model config holds Python code (Lambda layers, bytecode).

    ``tf_keras`` deserializes ``Lambda`` layers of an ``.h5`` from marshalled
    bytecode and runs them while rebuilding the model, whatever ``safe_mode``
    says (measured), so the config is read with h5py and checked first.
    """
    try:
        import h5py
    except ImportError:
        raise ModelError(f"cannot check {path} for embedded code: h5py is not installed",
                         "pip install h5py (it comes with tf-keras)") from None
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            if raw is None and "model_config" not in f.attrs:
                raise ModelError(f"{path} has no model_config: it holds weights only, not a model",
                                 "save the whole model with model.save('model.h5')")
            if isinstance(raw, bytes):
                raw = raw.decode("utf-8", "replace")
            if not isinstance(raw, str):
                raise ModelError(f"{path}: model_config is not JSON text")
            if len(raw) > _MAX_H5_CONFIG:
                raise ModelError(f"{path}: model_config is larger than {_MAX_H5_CONFIG >> 20} MiB")
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError, KeyError, ValueError for broken files
        raise ModelError(f"cannot read {path} as HDF5 ({_first_line(exc)})",
                         "check that the file is a complete Keras model saved with model.save()") from None
    _refuse_code_in(raw, path, "model_config")


# A .keras archive: what its members may declare once decompressed (a zip bomb is refused before Keras
# opens it). Edge models are megabytes; 2 GiB of weights is far past anything a microcontroller or a Pi runs.
MAX_KERAS_UNPACKED = 2 << 30
_MAX_KERAS_RATIO = 100  # weights barely compress; 100x over 64 MiB is a bomb, not a model
_KERAS_RATIO_FLOOR = 64 << 20


def _check_keras_archive(path: Path, unsafe_load: bool) -> None:
    """Refuse a ``.keras`` zip whose declared sizes are a bomb, or (unless ``unsafe_load``) whose config holds code.

    Keras 3's safe mode refuses ``Lambda`` and ``__lambda__`` objects and functions outside Keras;
    the same walk as for ``.h5`` also runs here, before Keras opens the archive.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            total = sum(max(0, i.file_size) for i in members)
            packed = sum(max(0, i.compress_size) for i in members)
            for info in members:
                if info.file_size > _KERAS_RATIO_FLOOR and info.file_size > _MAX_KERAS_RATIO * max(info.compress_size, 1):
                    raise ModelError(f"{path}: member {info.filename[:80]!r} expands from {info.compress_size} to "
                                     f"{info.file_size} bytes (a zip bomb?)",
                                     "save the model again with model.save('model.keras')")
            if total > MAX_KERAS_UNPACKED or (total > _KERAS_RATIO_FLOOR and total > _MAX_KERAS_RATIO * max(packed, 1)):
                raise ModelError(f"{path}: its members declare {total} bytes unpacked from {packed} "
                                 f"(limit {MAX_KERAS_UNPACKED} bytes, at most {_MAX_KERAS_RATIO}x)",
                                 "save the model again with model.save('model.keras'), or check where it came from")
            if unsafe_load:
                return
            try:
                info = z.getinfo("config.json")
            except KeyError:
                return  # Keras reports the missing config itself
            if info.file_size > _MAX_H5_CONFIG:
                raise ModelError(f"{path}: config.json declares {info.file_size} bytes "
                                 f"(more than {_MAX_H5_CONFIG >> 20} MiB)")
            with z.open(info) as f:
                raw = f.read(_MAX_H5_CONFIG + 1)
    except ModelError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise ModelError(f"cannot load {path} as a Keras model (its zip archive: {_first_line(exc)})",
                         "check that the file is a complete Keras model saved with model.save()") from None
    if len(raw) > _MAX_H5_CONFIG:
        raise ModelError(f"{path}: config.json is larger than {_MAX_H5_CONFIG >> 20} MiB")
    _refuse_code_in(raw, path, "config.json")


def _refuse_code_in(raw: Any, path: Path, what: str) -> None:
    """``ModelError`` when the model config text ``raw`` (``what`` in ``path``) is not JSON or carries code."""
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        raise ModelError(f"{path}: {what} is not valid JSON",
                         "check that the file is a complete Keras model saved with model.save()") from None
    found = _code_in_config(config)
    if found:
        raise ModelError(f"{path} carries Python code ({found}) that loading would run", _UNSAFE_HINT)


def _code_in_config(config: Any) -> Optional[str]:
    """Where ``config`` holds Python code, or None: the whole tree is walked, not a list of known layers.

    Code is a ``Lambda`` layer (Keras 2 or 3), a Keras 3 ``__lambda__`` object,
    any ``*_type: "lambda"`` entry (tf_keras marshals the function next to it:
    ``Lambda.function``, ``ResidualWrapper.residual_fn``, ``DropoutWrapper.dropout_fn``...),
    a ``*_type: "function"`` entry whose module is not Keras/TensorFlow (or is not given),
    or any string that decodes to marshalled Python bytecode. The walk is
    iterative and bounded in nodes and depth; a config past the bounds is refused.
    """
    stack: list[tuple[Any, Any, int]] = [(config, None, 0)]
    seen = 0
    while stack:
        node, where, level = stack.pop()
        seen += 1
        if seen > _MAX_CONFIG_NODES:
            return f"a model config of more than {_MAX_CONFIG_NODES} entries, too large to check"
        if level > _MAX_CONFIG_DEPTH:
            return f"a model config nested deeper than {_MAX_CONFIG_DEPTH}, too deep to check"
        if isinstance(node, dict):
            cls = node.get("class_name")
            if cls in ("Lambda", "__lambda__") or (isinstance(cls, str) and cls.endswith(">Lambda")):
                cfg = node.get("config") if isinstance(node.get("config"), dict) else {}
                name = cfg.get("name") if isinstance(cfg.get("name"), str) else "?"
                what = "a serialized lambda" if cls == "__lambda__" else f"Lambda layer '{name[:80]}'"
                return f"{what} at {_place(where)}"
            for key, value in node.items():
                if not isinstance(key, str):
                    continue
                if key.endswith("_type") and value == "lambda":
                    return f"a serialized function '{key[:-5][:80]}' at {_place((where, key[:-5]))}"
                if key.endswith("_type") and value == "function":
                    module = node.get(key[:-5] + "_module", node.get("module"))
                    if not _keras_module(module):
                        return (f"a function '{key[:-5][:80]}' from module '{str(module)[:80]}' "
                                f"at {_place((where, key[:-5]))}")
            stack.extend((v, (where, k), level + 1) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, (where, i), level + 1) for i, v in enumerate(node))
        elif isinstance(node, str) and _is_bytecode(node):
            return f"marshalled Python bytecode at {_place(where)}"
    return None


_MAX_CONFIG_NODES = 1_000_000
_MAX_CONFIG_DEPTH = 200  # Keras configs nest a few levels per layer; nested models add a few more
_BYTECODE_B64 = re.compile(r"[A-Za-z0-9+/=\s]{64,}")


def _keras_module(module: Any) -> bool:
    return isinstance(module, str) and module.split(".")[0] in ("keras", "tf_keras", "tensorflow")


def _is_bytecode(text: str) -> bool:
    """A base64 string whose bytes start like a marshalled code object (``func_dump``'s output)."""
    # Base64 of 0x63/0xE3 (a marshalled code object) starts with "Y" or "4", then one of these.
    if len(text) < 64 or text[0] not in "4Y" or text[1] not in "wxyz0123456789+/":
        return False
    if not _BYTECODE_B64.fullmatch(text[:4096]):
        return False
    import base64
    import binascii

    try:
        head = base64.b64decode("".join(text[:64].split())[:48])
    except (binascii.Error, ValueError):
        return False
    return len(head) >= 17 and head[0] in (0x63, 0xE3)


def _place(where: Any) -> str:
    """``config.layers[1].config.cell`` for a path kept as nested (parent, key) pairs (cut to 200 characters)."""
    parts: list[str] = []
    while where is not None:
        where, key = where
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    text = "".join(reversed(parts)).lstrip(".") or "the top level"
    return text if len(text) <= 200 else "…" + text[-199:]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _strip(name: str) -> str:
    return name.split(":")[0]


def _batch1(tf: Any, spec: InputSpec) -> Any:
    return tf.TensorSpec((1,) + tuple(spec.sample_shape), tf.as_dtype(spec.dtype), name=spec.name)


def _keras_inputs(model: Any) -> list[InputSpec]:
    try:
        tensors = list(model.inputs)
    except (AttributeError, ValueError, TypeError):
        tensors = []
    if not tensors:
        raise ModelError(f"Keras model '{model.name}' has no defined inputs (a subclassed model?)",
                         "build it as a functional/Sequential model, or export a SavedModel with model.export()")
    specs = []
    for t in tensors:
        dtype = t.dtype if isinstance(t.dtype, str) else t.dtype.name
        shape = tuple(None if d is None else int(d) for d in t.shape)
        specs.append(InputSpec(_strip(t.name), shape, dtype))
    return specs


def _weight_bytes(variables: Sequence[Any]) -> int:
    total = 0
    for v in variables:
        n = 1
        for d in v.shape:
            n *= int(d or 1)
        total += n * 4
    return total


def _from_keras3(tf: Any, keras: Any, model: Any, fmt: str, path: Path) -> LoadedModel:
    inputs = _keras_inputs(model)
    multi = len(inputs) > 1

    def export(out_dir: str, at: Sequence[InputSpec] = tuple(inputs)) -> None:
        specs = [_batch1(tf, s) for s in at]
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            _SIGNATURE, lambda *xs: model(list(xs) if multi else xs[0], training=False), specs
        )
        archive.write_out(out_dir, verbose=False)

    return LoadedModel(str(path), fmt, "keras", model.name, tuple(inputs),
                       tuple(layer.name for layer in model.layers), _weight_bytes(model.weights), model, export)


def _from_tf_keras(tf: Any, model: Any, path: Path) -> LoadedModel:
    inputs = _keras_inputs(model)
    multi = len(inputs) > 1

    def export(out_dir: str, at: Sequence[InputSpec] = tuple(inputs)) -> None:
        specs = [_batch1(tf, s) for s in at]
        serve = tf.function(lambda *xs: model(list(xs) if multi else xs[0], training=False),
                            input_signature=specs)
        tf.saved_model.save(model, out_dir, signatures={_SIGNATURE: serve.get_concrete_function()})

    return LoadedModel(str(path), "h5", "tf_keras", model.name, tuple(inputs),
                       tuple(layer.name for layer in model.layers), _weight_bytes(model.weights), model, export)


def _load_saved_model(tf: Any, path: Path) -> LoadedModel:
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load SavedModel {path} ({_first_line(exc)})",
                         "check that the directory is a complete SavedModel") from None
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if not signatures:
        raise ModelError(f"SavedModel {path} has no signatures",
                         "save it with tf.saved_model.save(..., signatures=...) or model.export()")
    key = _SIGNATURE if _SIGNATURE in signatures else sorted(signatures)[0]
    fn = signatures[key]
    kw = fn.structured_input_signature[1]
    names = sorted(kw)
    if not names:
        raise ModelError(f"SavedModel {path}: signature '{key}' takes no named inputs",
                         "export a signature with named tensor inputs")
    inputs = [
        InputSpec(n, tuple(None if d is None else int(d) for d in kw[n].shape), kw[n].dtype.name)
        for n in names
    ]

    def export(out_dir: str, at: Sequence[InputSpec] = tuple(inputs)) -> None:
        specs = [_batch1(tf, s) for s in at]

        def call(*xs: Any) -> Any:
            return fn(**dict(zip(names, xs)))

        wrapper = tf.Module()
        wrapper.model = loaded
        serve = tf.function(call, input_signature=specs)
        tf.saved_model.save(wrapper, out_dir, signatures={_SIGNATURE: serve.get_concrete_function()})

    variables = list(getattr(fn, "variables", ()))
    layer_names = sorted({_strip(v.name).split("/")[0] for v in variables})
    weights = _weight_bytes(variables)
    return LoadedModel(str(path), "saved_model", "saved_model", "", tuple(inputs), tuple(layer_names),
                       weights, loaded, export)


# ---------------------------------------------------------------- stage 2: the float model, once


def export_float(loaded: LoadedModel, workdir: str | Path,
                 progress: Optional[ProgressCallback] = None) -> FloatModel:
    """Export ``loaded`` with a batch size of 1 into ``workdir`` and convert it to a float ``.tflite``.

    Batch 1 keeps shapes static (no SHAPE/STRIDED_SLICE/PACK around Flatten); other unknown
    dims stay unknown unless ``loaded.inputs`` were made concrete (``edgeq.calibration.concrete_inputs``).
    The SavedModel stays in ``workdir`` (the caller owns its lifetime): fp16 and
    dynamic-range recipes are made from it.
    """
    if loaded.stages is not None:  # a PyTorch model: litert-torch, no SavedModel
        return loaded.stages.export_float(loaded, workdir, progress)
    t = time.perf_counter()
    saved = os.path.join(str(workdir), "saved_model")
    report(progress, "export", "batch-1 SavedModel and float .tflite")
    notes: tuple[str, ...] = ()
    with quiet_tensorflow():
        tf = _tf()
        if loaded.loader == "keras":
            # LayerNormalization and LSTM/GRU loops, rebuilt in forms TensorFlow quantizes to int8.
            from edgeq.rewrite import for_int8

            model, notes = for_int8(loaded.model)
            if notes:
                import keras

                loaded = replace(loaded, model=model,
                                 export=_from_keras3(tf, keras, model, loaded.fmt, Path(loaded.path)).export)
        try:
            loaded.export(saved, loaded.inputs)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"cannot trace {loaded.path} with a batch size of 1 ({_first_line(exc)})",
                             "check that the model runs on one sample: model(x[:1])") from None
        try:
            with _frozen_heap():
                content = tf.lite.TFLiteConverter.from_saved_model(saved).convert()
        except Exception as exc:  # noqa: BLE001 - the converter raises many kinds
            raise _converter_error(exc, "int8", loaded.layer_names, loaded.model_name) from exc
    return FloatModel(loaded, saved, content, parse_tflite(content, f"{loaded.path} (float)"),
                      time.perf_counter() - t, notes)


# ---------------------------------------------------------------- stage 3: calibrate, once


def calibrate(float_model: FloatModel, calib: Dataset,
              progress: Optional[ProgressCallback] = None) -> Calibration:
    """Record every activation's range on ``calib`` (TensorFlow's calibrator on the float ``.tflite``).

    The result is what ``TFLiteConverter`` records before it quantizes; every
    static recipe quantizes from it without running the samples again.
    """
    if float_model.loaded.stages is not None:  # a PyTorch model: litert-quantizer's calibrator
        return float_model.loaded.stages.calibrate(float_model, calib, progress)
    t = time.perf_counter()
    names = _float_input_names(float_model.content)  # in the model's tensor order
    if sorted(names) != sorted(calib.names):
        raise InputError(f"calibration data {calib.source} has inputs {', '.join(calib.names)} but the model "
                         f"takes {', '.join(names)}", "name the arrays after the model's inputs")
    total = len(calib)

    forked = _forks(float_model)

    def samples() -> Iterator[list[np.ndarray]]:
        # Positional lists in tensor order: with dicts the calibrator builds a deprecated tf.lite.Interpreter.
        for i in range(total):
            # Events from a forked child would not reach the caller's callback: there, only start and end.
            if not forked and (i % 16 == 0 or i == total - 1):
                report(progress, "calibrate", "samples", i + 1, total)
            sample = calib.sample(i)
            yield [sample[n] for n in names]

    with quiet_tensorflow():
        _tf()
        from tensorflow.lite.python.optimize import calibrator as tf_calibrator

        def record() -> bytes:
            with _frozen_heap():
                return bytes(tf_calibrator.Calibrator(
                    tf_calibrator.add_intermediate_tensors(float_model.content)).calibrate(samples))

        try:
            if forked:
                report(progress, "calibrate", "samples", 0, total)
            calibrated = _guarded("TensorFlow's calibrator", float_model, record)
            if forked:
                report(progress, "calibrate", "samples", total, total)
        except EdgeqError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"calibration failed: {_first_line(exc)}",
                                  "check that the calibration samples fit the model's inputs") from None
    return Calibration(calib, bytes(calibrated), time.perf_counter() - t)


def _forks(float_model: FloatModel) -> bool:
    """Whether TensorFlow's C++ stages run in a forked child for this model: when it has control flow.

    TensorFlow's calibrator segfaults on the WHILE loop of a Keras 3 LSTM/GRU
    (tensorflow#75140); a model with WHILE/IF bodies has more than one subgraph.
    Other models convert in this process: a fork of a process holding TensorFlow
    cost about 0.1 s on a busy 2-core host, a quarter of converting a small CNN
    (benchmarks/bench_convert.py: 1.26x with a fork for every model, 1.07x without).
    """
    return len(float_model.tflite.subgraphs) > 1


def _guarded(stage: str, float_model: FloatModel, make: Callable[[], bytes]) -> bytes:
    """``make()`` in a forked child when :func:`_forks` says so; a crash there is one ``ConversionError``."""
    if not _forks(float_model):
        return make()
    try:
        return run_forked(stage, make)
    except StageCrashed as crash:
        raise crash_error(crash, float_model) from None


def _float_input_names(content: bytes) -> list[str]:
    """Signature input names, ordered by tensor index (the calibrator's positional order)."""
    details = _runner(content).get_input_details()
    return [name for name, _ in sorted(details.items(), key=lambda kv: kv[1]["index"])]


# ---------------------------------------------------------------- stage 4: quantize, per recipe


def quantize(float_model: FloatModel, calibration: Optional[Calibration], recipe: Recipe,
             io_types: IoTypes = IoTypes(), progress: Optional[ProgressCallback] = None) -> QuantizedModel:
    """Apply ``recipe`` to the float model; static recipes use ``calibration`` (recorded once).

    Raises ``ConversionError`` naming the op and layer when the recipe cannot be
    made (e.g. an op left in float by a full-integer recipe), ``RecipeError``
    for a simulated recipe (see ``edgeq.quantize.simulate``).
    """
    if float_model.loaded.stages is not None:  # a PyTorch model: litert-quantizer, integer I/O
        return float_model.loaded.stages.quantize(float_model, calibration, recipe, io_types, progress)
    if not recipe.executable:
        raise RecipeError(f"recipe '{recipe.name}' is simulated and never written as a .tflite",
                          "use edgeq.quantize.simulate() to measure it")
    if recipe.needs_calibration and calibration is None:
        raise UsageError(f"recipe '{recipe.name}' has static activations and needs a calibration")
    input_type, output_type = io_types.resolve(recipe)
    loaded = float_model.loaded
    t = time.perf_counter()
    report(progress, "convert", f"quantizing ({recipe.name})")
    with quiet_tensorflow():
        try:
            if recipe.quantizer == "tflite-converter":
                content = _tflite_converter(float_model, calibration, recipe, input_type, output_type)
            else:
                from edgeq.quantize import litert_quantize

                content = litert_quantize(float_model.content, recipe,
                                          calibration.dataset if calibration else None,
                                          calibration._litert if calibration else None)
        except EdgeqError:
            raise
        except Exception as exc:  # noqa: BLE001 - the quantizers raise many kinds
            if recipe.quantizer == "litert-quantizer":
                raise ConversionError(f"litert-quantizer could not make recipe '{recipe.name}': {_first_line(exc)}",
                                      "choose another recipe, or run with --debug for the full message") from exc
            raise _converter_error(exc, _scheme_of(recipe), loaded.layer_names, loaded.model_name) from exc
    quant = parse_tflite(content, f"{recipe.name} model")
    if recipe.activations in ("int8", "int16"):
        # Every recipe that claims integer activations, whichever quantizer made it: litert-quantizer
        # leaves ops it has no integer kernel for in float without a word.
        floats = _float_ops(quant, input_type, output_type)
        if floats:
            raise _float_ops_error(floats, float_model, calibration, recipe)
    warns = list(float_model.notes)
    static = all(d > 0 for t_ in quant.inputs for d in t_.shape_signature) and not any(
        op in quant.op_counts for op in DYNAMIC_SHAPE_OPS
    )
    if not static:
        dyn = [op for op in DYNAMIC_SHAPE_OPS if op in quant.op_counts]
        warns.append("the model has dynamic shapes" + (f" ({', '.join(dyn)} ops)" if dyn else "")
                     + "; microcontroller runtimes may not support them")
    return QuantizedModel(recipe, content, quant, input_type, output_type, static, _signature_names(content),
                          tuple(warns), time.perf_counter() - t)


def _scheme_of(recipe: Recipe) -> str:
    if recipe.full_integer:
        return "int16x8" if recipe.activations == "int16" else "int8"
    return recipe.name


_INT8_ATTEMPTS = 4


def _tflite_converter(float_model: FloatModel, calibration: Optional[Calibration], recipe: Recipe,
                      input_type: str, output_type: str) -> bytes:
    tf = _tf()
    from tensorflow.lite.python import convert as tf_convert
    from tensorflow.lite.python import lite as tf_lite

    if recipe.activations == "float" and recipe.weights_bits == 32:
        return float_model.content
    if recipe.activations in ("float", "dynamic-int8"):
        conv = tf.lite.TFLiteConverter.from_saved_model(float_model.saved_model_dir)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if recipe.weights_bits == 16:
            conv.target_spec.supported_types = [tf.float16]
        with _frozen_heap():
            return bytes(conv.convert())
    if calibration is None:  # guarded by quantize(); here for the type checker
        raise UsageError("a static recipe needs a calibration")
    per_tensor = not recipe.per_channel
    calibrated = calibration.calibrated

    def int8() -> bytes:
        # What TFLiteConverter.convert() does after calibrating (lite.py, _quantize / _optimize_tflite_model).
        # The MLIR quantizer is not deterministic: on the same input it sometimes leaves an op
        # in float (measured: the first SPLIT of an unrolled LSTM, 3 runs in 12), so a result
        # with float ops is made again, a few times, before it is reported.
        for _ in range(_INT8_ATTEMPTS):
            content = bytes(tf_lite._deduplicate_readonly_buffers(tf_convert.mlir_quantize(
                calibrated, disable_per_channel=per_tensor,
                input_data_type=tf.as_dtype(input_type), output_data_type=tf.as_dtype(output_type),
                disable_per_channel_for_dense_layers=per_tensor)))
            if not _float_ops(parse_tflite(content), input_type, output_type):
                break
        return content

    def int16() -> bytes:
        # int16 activations: the converter's own (older) quantizer, on the recorded ranges.
        from tensorflow.lite.python.optimize import calibrator as tf_calibrator

        quantizer = tf_calibrator.Calibrator(calibrated)
        model = quantizer._calibrator.QuantizeModel(
            np.dtype(input_type).num, np.dtype(output_type).num, False,
            np.dtype(np.int16).num, np.dtype(np.int64).num, per_tensor, per_tensor)
        model = tf_lite._modify_model_io_type(model, tf.as_dtype(input_type), tf.as_dtype(output_type))
        return bytes(tf_lite._deduplicate_readonly_buffers(model))

    return _guarded("TensorFlow's quantizer", float_model, int8 if recipe.activations == "int8" else int16)


class FloatOpsLeft(ConversionError):
    """A recipe with integer activations left ops in float; ``layers`` names the Keras layers they belong to."""

    def __init__(self, message: str, hint: Optional[str] = None, layers: tuple[str, ...] = ()) -> None:
        super().__init__(message, hint)
        self.layers = layers


def _float_ops_error(floats: list[tuple[str, str]], float_model: FloatModel,
                     calibration: Optional[Calibration], recipe: Recipe) -> FloatOpsLeft:
    loaded = float_model.loaded
    names = []
    layers = []
    for op, tensor in floats:
        layer = _layer_of(tensor, loaded.layer_names, loaded.model_name)
        names.append(f"{op} (layer '{layer}')" if layer else f"{op} (at '{tensor.split(';')[0]}')")
        if layer:
            layers.append(layer)
    uniq = list(dict.fromkeys(names))
    hint = "replace the layer with ops that have integer kernels"
    scheme = _scheme_of(recipe)
    if recipe.activations == "int8" and calibration is not None:
        # Only suggest int16x8 when it really gives a full-integer model.
        try:
            i16 = replace(recipe, name="int16x8", activations="int16", granularity="per-channel")
            content = _tflite_converter(float_model, calibration, i16, "int16", "int16")
            if not _float_ops(parse_tflite(content), "int16", "int16"):
                hint = "--scheme int16x8 converts this model to full integer; or " + hint
        except Exception:  # noqa: BLE001 - any failure means "no"
            pass
    if recipe.quantizer == "tflite-converter" and recipe.activations == "int8" and layers:
        hint += "; or convert with --eval DATA --max-drop PTS to keep those layers in float (Linux targets)"
    who = "the converter" if recipe.quantizer == "tflite-converter" else recipe.quantizer
    return FloatOpsLeft(
        f"{', '.join(uniq)} cannot be quantized to {scheme}: "
        f"{who} left {'it' if len(uniq) == 1 else 'them'} in float32",
        hint, tuple(dict.fromkeys(layers)),
    )


# ---------------------------------------------------------------- stage 5: validate


def validate(quantized: QuantizedModel, float_model: FloatModel, eval_data: Dataset,
             calibration: Optional[Calibration] = None, worst_layers: int = 5,
             progress: Optional[ProgressCallback] = None) -> Validation:
    """Quantized vs float on ``eval_data``: accuracy, top-1 agreement, SQNR, max error; worst layers.

    With a ``calibration``, also how the calibration ranges settle and (for
    int8 recipes made by TensorFlow's converter) the layers with the largest
    quantization error, measured with TensorFlow's quantization debugger on a
    model quantized from the same recorded ranges.
    """
    t = time.perf_counter()
    warns: list[str] = []
    report(progress, "evaluate", "float reference")
    ref = _float_reference(float_model, eval_data, progress)
    got = _run_all(quantized.content, eval_data, progress, quantized.recipe.name)
    fidelity = _fidelity(ref, got, eval_data.labels, dict(eval_data.output_labels))
    ranges = None
    if calibration is not None:
        try:
            ranges = _range_settling(float_model.content, calibration.dataset)
        except Exception as exc:  # noqa: BLE001 - a diagnostic, never a failure
            warns.append(f"calibration range settling not available ({_first_line(exc)[:200]})")
    worst: tuple[LayerError, ...] = ()
    recipe = quantized.recipe
    if worst_layers > 0 and calibration is not None and recipe.quantizer == "tflite-converter" \
            and recipe.activations == "int8":
        report(progress, "evaluate", "per-layer quantization error")
        try:
            with quiet_tensorflow(), _frozen_heap():
                worst = _worst_layers(calibration, recipe, eval_data, worst_layers, quantized.tflite,
                                      float_model.loaded, quantized.keys)
        except Exception as exc:  # noqa: BLE001 - the debugger is best effort
            warns.append(f"per-layer error not available ({_first_line(exc)[:200]})")
    return Validation(fidelity, eval_data.to_dict(), worst, ranges, tuple(warns), time.perf_counter() - t)


def _float_reference(float_model: FloatModel, data: Dataset,
                     progress: Optional[ProgressCallback]) -> dict[str, np.ndarray]:
    """The float model's outputs on ``data``, computed once per (float model, dataset)."""
    cache = _REFERENCES.setdefault(id(float_model), {})
    key = (id(data), len(data))
    if key not in cache:
        stages = float_model.loaded.stages
        # A PyTorch model is judged against PyTorch's own outputs, not the float .tflite's.
        cache[key] = stages.reference(data) if stages is not None else _run_all(float_model.content, data,
                                                                               progress, "float")
    return cache[key]


# Float outputs per FloatModel (by id; a FloatModel is frozen and its content never changes). Small:
# one entry per evaluation set; dropped when the process ends or with forget_reference().
_REFERENCES: dict[int, dict[tuple[int, int], dict[str, np.ndarray]]] = {}


def forget_reference(float_model: FloatModel) -> None:
    """Drop the cached float outputs of ``float_model``."""
    _REFERENCES.pop(id(float_model), None)


# ---------------------------------------------------------------- stage 6: write


def report_for(loaded: LoadedModel, float_model: FloatModel, calibration: Optional[Calibration],
               quantized: QuantizedModel, validation: Optional[Validation], output: str | Path,
               report_path: Optional[str | Path] = None, data: DataOptions = DataOptions(),
               timings: Optional[dict[str, float]] = None, extra_warnings: Sequence[str] = (),
               warn_drop: Optional[float] = None,
               input_shapes: Sequence[dict[str, Any]] = ()) -> ConvertResult:
    """The ``ConvertResult`` (and report) for one quantized model, before anything is written.

    With ``warn_drop``, a validation that lost more points than that adds a warning.
    """
    recipe = quantized.recipe
    out_path = Path(output)
    rpath = Path(report_path) if report_path else default_report_path(out_path)
    inputs, outputs = quantized.io()
    warns = list(quantized.warnings) + list(extra_warnings)
    if validation is not None:
        warns += list(validation.warnings)
        collapsed = validation.drop_warning(warn_drop) if warn_drop is not None else None
        if collapsed:
            warns.append(collapsed)
    calib = calibration.dataset.to_dict() if calibration is not None else {"samples": 0, "available": 0}
    scheme = _scheme_of(recipe)
    return ConvertResult(
        output=str(out_path),
        report_path=str(rpath),
        model=loaded.path,
        model_format=loaded.fmt,
        loader=loaded.loader,
        scheme=scheme,
        input_type=quantized.input_type,
        output_type=quantized.output_type,
        per_channel=recipe.per_channel,
        calibration={**calib, "used": bool(calibration is not None and calibration.calibrated),
                     "seed": data.seed, "ranges": validation.ranges if validation else None,
                     "normalisation": {k: v for k, v in data.to_dict().items()
                                       if k in ("mean", "std", "scale") and v is not None}},
        float_bytes=float_model.size_bytes,
        float_bytes_source="converted",
        quant_bytes=quantized.size_bytes,
        ops=quantized.tflite.op_counts,
        static_shapes=quantized.static_shapes,
        inputs=inputs,
        outputs=outputs,
        fidelity=validation.fidelity if validation else None,
        evaluation=validation.evaluation if validation else None,
        worst_layers=validation.worst_layers if validation else (),
        warnings=tuple(dict.fromkeys(warns)),
        timings_s={k: round(v, 3) for k, v in (timings or {}).items()},
        sha256=quantized.tflite.sha256,
        recipe=recipe,
        input_shapes=tuple(input_shapes),
    )


def write(quantized: QuantizedModel, result: ConvertResult) -> ConvertResult:
    """Write the model and its report (``result.to_dict()``) atomically, or nothing at all."""
    return _write_files(result, [(Path(result.output), quantized.content)])


def write_report(result: ConvertResult) -> ConvertResult:
    """Rewrite just the report of ``result`` (e.g. after the CLI added a target check)."""
    return _write_files(result, [])


def with_check(result: ConvertResult, target: str, check: dict[str, Any], summary: Sequence[str],
               fits: bool) -> ConvertResult:
    """``result`` with a target check attached (and a warning when the model does not fit)."""
    warns = list(result.warnings)
    if not fits:
        warns.append(f"the converted model does not fit target {target} (see check)")
    return replace(result, target=target, check=check, check_summary=tuple(summary), warnings=tuple(warns))


def _write_files(result: ConvertResult, files: list[tuple[Path, bytes]]) -> ConvertResult:
    report_path = Path(result.report_path)
    payload = (json.dumps(result.to_dict(), indent=2, default=str) + "\n").encode("utf-8")
    staged: list[tuple[Path, Path]] = []
    try:
        for final, data in [*files, (report_path, payload)]:
            tmp = temp_beside(final)
            staged.append((tmp, final))
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
        for tmp, final in staged:
            os.replace(tmp, final)
    except OSError as exc:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        where = getattr(exc, "filename", None) or report_path
        raise InputError(f"cannot write {where}: {exc.strerror or exc}",
                         "check free space and permissions, or choose another path") from None
    return result



# ---------------------------------------------------------------- helpers


_TF_OP = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")
_SELECT_OPS = re.compile(r"TF Select ops: ([\w, ]+)")
_UNSUPPORTED = re.compile(r"not yet supported for op: '(\w+)'")
_LOC = re.compile(r'fused\["(\w+):", "([^"@]+)')


def _layer_of(tensor_name: str, layer_names: Sequence[str], model_name: str = "") -> Optional[str]:
    """The Keras layer a converted tensor came from, from its name scope (best effort).

    Keras 3 suffixes every scope of a re-traced model with the same ``_N``
    ("digits_1/conv2d_1" is layer "conv2d"), so the suffix is learnt from the
    model's own scope before layer names are matched.
    """
    known = set(layer_names)
    parts = [p for seg in tensor_name.split(";")[:1] for p in seg.split("/")]
    suffix = ""
    if parts and model_name:
        m = re.fullmatch(re.escape(model_name) + r"(_\d+)?", parts[0])
        if m:
            suffix = m.group(1) or ""
            parts = parts[1:]
    for p in parts:
        if suffix and p.endswith(suffix) and p[: -len(suffix)] in known:
            return p[: -len(suffix)]
        if p in known:
            return p
    for p in parts:
        base = re.sub(r"_\d+$", "", p)
        if base in known:
            return base
    return None


def _converter_error(exc: Exception, scheme: str, layer_names: Sequence[str], model_name: str) -> ConversionError:
    text = str(exc)
    ops = sorted(set(_TF_OP.findall(text)))
    m = _SELECT_OPS.search(text)
    if m:
        ops = sorted(set(ops) | {o.strip() for o in m.group(1).split(",") if o.strip()})
    if ops:
        layers = []
        for op, where in _LOC.findall(text):
            layer = _layer_of(where, layer_names, model_name)
            if op in ops and layer and layer not in layers:
                layers.append(layer)
        where = f" (layer {', '.join(repr(x) for x in layers)})" if layers else ""
        return ConversionError(
            f"op {', '.join(ops)}{where} has no TFLite builtin kernel, so the model cannot be "
            f"converted to full integer",
            "replace that layer with builtin ops (TF Select/Flex ops are float-only and absent on microcontrollers)",
        )
    m = _UNSUPPORTED.search(text)
    if m:
        return ConversionError(
            f"op {m.group(1)} cannot be quantized to {scheme} (TensorFlow has no {scheme} kernel for it)",
            "replace that layer with ops that have integer kernels",
        )
    first = next((ln.strip() for ln in text.splitlines() if "error" in ln.lower()), _first_line(exc))
    hint = "try --scheme int16x8" if scheme == "int8" else "try --scheme int8"
    return ConversionError(f"TensorFlow could not quantize the model: {first[:400]}",
                           f"{hint}, or run with --debug for the converter's full message")


def _float_ops(model: TfliteModel, input_type: str, output_type: str) -> list[tuple[str, str]]:
    """Ops that still compute in floating point: [(op, output tensor name)]."""
    sg = model.main
    allowed: set[int] = set()
    if input_type == "float32":
        allowed |= set(sg.inputs)
    if output_type == "float32":
        allowed |= set(sg.outputs)
    found = []
    for op in sg.operators:
        if op.op in ("QUANTIZE", "DEQUANTIZE"):
            continue
        tensors = [t for t in op.inputs + op.outputs if t >= 0]
        if any(sg.tensors[t].dtype in ("float32", "float16", "float64") and t not in allowed for t in tensors):
            out = sg.tensors[op.outputs[0]].name if op.outputs else ""
            found.append((op.op, out))
    return found


def _signature_names(content: bytes) -> dict[int, str]:
    """Tensor index -> signature key (``output_0``, input names) from the LiteRT interpreter."""
    try:
        runner = _runner(content)
        details = {**runner.get_input_details(), **runner.get_output_details()}
    except Exception:  # noqa: BLE001 - names are cosmetic; fall back to tensor names
        return {}
    return {int(d["index"]): k for k, d in details.items()}


def _io(model: TfliteModel, keys: Optional[dict[int, str]] = None) -> tuple[tuple[IoQuant, ...], tuple[IoQuant, ...]]:
    keys = keys or {}

    def conv(t: Any) -> IoQuant:
        q = t.quantization
        scale = q.scale[0] if q and q.scale else None
        zp = q.zero_point[0] if q and q.zero_point else None
        name = t.name.split(":")[0]
        if name.startswith(_SIGNATURE + "_"):
            name = name[len(_SIGNATURE) + 1 :]
        return IoQuant(keys.get(t.index, name), t.dtype, tuple(t.shape_signature), scale, zp)

    return tuple(conv(t) for t in model.inputs), tuple(conv(t) for t in model.outputs)


# ---------------------------------------------------------------- evaluation


def _runner(content: bytes) -> Any:
    """A signature runner with LiteRT's default delegate (XNNPACK), or built-in kernels if XNNPACK refuses.

    XNNPACK refuses some models LiteRT's own kernels run (measured: 2-bit
    blockwise weights, "unsupported datatype (INT2)"), and the refusal is an
    error at prepare time, not a fallback.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        # LiteRT logs "Created TensorFlow Lite XNNPACK delegate" to fd 2 from C++: not for the terminal.
        with quiet_tensorflow():
            interp = Interpreter(model_content=content)
            interp.allocate_tensors()  # applies the default delegate: a refusal surfaces here
        return interp.get_signature_runner(_SIGNATURE)
    except RuntimeError:
        interp = Interpreter(model_content=content,
                             experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        return interp.get_signature_runner(_SIGNATURE)


def _run_all(content: bytes, data: Dataset, progress: Optional[ProgressCallback], label: str) -> dict[str, np.ndarray]:
    """Run a model over every sample; outputs dequantized to float32, keyed by output name."""
    runner = _runner(content)
    in_details = runner.get_input_details()
    out_details = runner.get_output_details()
    results: dict[str, list[np.ndarray]] = {k: [] for k in out_details}
    # Samples are independent, but a fused LSTM (UNIDIRECTIONAL_SEQUENCE_LSTM) keeps its state in
    # variable tensors from one invocation to the next: reset them before every sample.
    reset_state = getattr(getattr(runner, "_interpreter", None), "reset_all_variables", None)
    n = len(data)
    for i in range(n):
        if reset_state is not None:
            reset_state()
        feed = {}
        for name, arr in data.sample(i).items():
            d = in_details[name]
            dtype = np.dtype(d["dtype"])
            scale, zp = d["quantization"]
            # Only a quantized input (a scale) takes float data through its scale; integer inputs that
            # are not quantized (token ids for an Embedding) pass through unchanged.
            if dtype.kind in "iu" and scale and arr.dtype.kind == "f":
                info = np.iinfo(dtype)
                arr = np.clip(np.round(arr / scale + zp), info.min, info.max).astype(dtype)
            feed[name] = arr.astype(dtype, copy=False)
        out = runner(**feed)
        for k, v in out.items():
            d = out_details[k]
            scale, zp = d["quantization"]
            if np.dtype(d["dtype"]).kind in "iu" and scale:
                v = (v.astype(np.float32) - zp) * scale
            results[k].append(np.asarray(v, dtype=np.float32))
        if progress is not None and (i % 32 == 0 or i == n - 1):
            report(progress, "evaluate", label, i + 1, n)
    return {k: np.concatenate(v, axis=0) for k, v in results.items()}


def _fidelity(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], labels: Optional[np.ndarray],
              per_output: Optional[dict[str, np.ndarray]] = None) -> tuple[OutputFidelity, ...]:
    """Float vs quantized per output, each judged by its kind (``edgeq.fidelity.output_kind``)."""
    from edgeq import fidelity

    assigned = fidelity.assign_labels({k: v.shape for k, v in ref.items()}, labels, per_output, ref)
    out = []
    for name in sorted(ref):
        where, y = assigned.get(name, (None, None))
        c = fidelity.compare(ref[name], got[name], y)
        seg = c.kind == fidelity.SEGMENTATION
        used = where if (c.accuracy_reference is not None or c.label_mae_reference is not None) else None
        out.append(OutputFidelity(
            name, c.samples, c.max_abs_error, c.sqnr_db,
            top1_agreement=None if seg else c.agreement,
            accuracy_float=c.accuracy_reference, accuracy_quant=c.accuracy_candidate, kind=c.kind,
            mean_abs_error=c.mean_abs_error, pixel_agreement=c.agreement if seg else None,
            mae_float=c.label_mae_reference, mae_quant=c.label_mae_candidate, labels=used))
    return tuple(out)


def _worst_layers(calibration: Calibration, recipe: Recipe, data: Dataset, limit: int,
                  quant: TfliteModel, loaded: LoadedModel, keys: dict[int, str]) -> tuple[LayerError, ...]:
    """Rank layer outputs by RMS quantization error in units of their quantization step."""
    tf = _tf()
    from tensorflow.lite.python import convert as tf_convert

    layer_names, model_name = loaded.layer_names, loaded.model_name
    n = min(len(data), 100)  # enough to rank layers; the full set is used for fidelity
    # The debugger feeds positional lists in the model's input order, not signature dicts.
    order = [io_.name for io_ in _io(quant)[0]]
    if sorted(order) != sorted(data.names):
        order = list(data.names)

    def dataset() -> Iterator[list[np.ndarray]]:
        for i in range(n):
            sample = data.sample(i)
            yield [sample[k] for k in order]

    # The debug model QuantizationDebugger(converter=...) would build, from the ranges already recorded.
    debug_model = tf_convert.mlir_quantize(calibration.calibrated, disable_per_channel=not recipe.per_channel,
                                           enable_numeric_verify=True)
    debugger = tf.lite.experimental.QuantizationDebugger(quant_debug_model_content=debug_model,
                                                         debug_dataset=dataset)
    debugger.run()
    # The debug model names tensors "NumericVerify/<name><digit>:<index>"; match on the name
    # without trailing digits, among activations (not weights or biases).
    def key(name: str) -> str:
        return re.sub(r"\d+$", "", name)

    by_name = {key(t.name): t for t in quant.main.tensors if not t.has_data and t.dtype in ("int8", "int16")}
    producers = {quant.main.tensors[t].index: op.op for op in quant.main.operators for t in op.outputs}
    rows = []
    for debug_name, stats in debugger.layer_statistics.items():
        tensor = by_name.get(key(re.sub(r":\d+$", "", debug_name.removeprefix("NumericVerify/"))))
        name = tensor.name if tensor is not None else debug_name
        mse = float(stats.get("mean_squared_error", float("nan")))
        scale = tensor.quantization.scale[0] if tensor is not None and tensor.quantization else None
        if not scale or math.isnan(mse):
            continue
        rows.append(LayerError(
            tensor=keys.get(tensor.index, name.split(";")[0]),
            layer=_layer_of(name, layer_names, model_name),
            op=producers.get(tensor.index) if tensor is not None else None,
            rmse_over_scale=round(math.sqrt(mse) / scale, 4),
            max_abs_error=float(stats.get("max_abs_error", float("nan"))),
            mean_squared_error=mse,
        ))
    rows.sort(key=lambda x: x.rmse_over_scale, reverse=True)
    return tuple(rows[:limit])


def _range_settling(float_content: bytes, calib: Dataset) -> Optional[dict[str, Any]]:
    """How much of its final calibrated range each activation has seen after the first N samples.

    Runs the float model over the calibration samples in order, tracking the
    running min/max of every activation (ANCHORS pain point 2: calibration set
    size behaves strangely). ``coverage`` is the smallest fraction of the final
    range any activation had reached at that point; 1.0 means settled.
    """
    from ai_edge_litert.interpreter import Interpreter

    model = parse_tflite(float_content)
    interp = Interpreter(model_content=float_content, experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    names = {d["name"].split(":")[0].removeprefix(_SIGNATURE + "_"): d for d in interp.get_input_details()}
    if sorted(names) != sorted(calib.names):
        return None
    watch = [t.index for t in model.main.tensors
             if t.dtype == "float32" and not t.has_data and t.index not in model.main.inputs]
    if not watch:
        return None
    n = len(calib)
    checkpoints = sorted({k for k in (10, 25, 50, 100, 200, 400, 800, 1600) if k < n} | {n})
    lo = np.full(len(watch), np.inf)
    hi = np.full(len(watch), -np.inf)
    seen: dict[int, np.ndarray] = {}
    for i in range(n):
        for name, arr in calib.sample(i).items():
            interp.set_tensor(names[name]["index"], arr)
        interp.invoke()
        for j, t in enumerate(watch):
            try:
                v = interp.get_tensor(t)
            except ValueError:  # a tensor the runtime never allocated (e.g. unused outputs of an unrolled RNN)
                continue
            if not v.size:
                continue
            lo[j] = min(lo[j], float(v.min()))
            hi[j] = max(hi[j], float(v.max()))
        if i + 1 in checkpoints:
            seen[i + 1] = hi - lo
    final = seen[n]
    live = final > 0
    rows = []
    for k in checkpoints:
        frac = np.where(live, seen[k] / np.where(live, final, 1), 1.0)
        rows.append({"samples": k, "coverage": round(float(frac.min()), 4), "mean_coverage": round(float(frac.mean()), 4)})
    settled = next((r["samples"] for r in rows if r["coverage"] >= 0.95), n)
    return {"activations": len(watch), "checkpoints": rows, "settled_at": settled}



# ---------------------------------------------------------------- the entry point


def _data_path(source: Any) -> Optional[Path]:
    """A data source that is a file or directory on disk (not ``module:function``), else None."""
    if not source or not isinstance(source, (str, Path)):
        return None
    p = Path(source)
    return p if p.exists() else None


def _check_output(path: Path, what: str) -> None:
    parent = path.parent
    if not parent.exists():
        raise InputError(f"{what} {path}: directory {parent} does not exist",
                         f"create it (mkdir -p {parent}) or choose another path")
    if not parent.is_dir():
        raise InputError(f"{what} {path}: {parent} is not a directory")
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory", "give a file name, e.g. out/model_int8.tflite")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{what} {path}: cannot write to {parent}", "choose a writable directory")


def resolve_for_target(options: ConvertOptions, table: Optional[RecipeTable] = None) -> tuple[Recipe, Any]:
    """The recipe ``options`` ask for, adjusted to ``options.target`` (loaded here), and the target.

    A target without per-channel kernels gets per-tensor int8; a scheme the
    target does not run is a ``UsageError`` before anything is converted.
    """
    table = table or load_recipes(options.recipes_file)
    recipe = options.resolved_recipe(table)
    if not options.target:
        return recipe, None
    try:
        from edgeq.targets import load_target
    except ImportError:
        from edgeq.errors import TargetError

        raise TargetError(f"cannot use target '{options.target}': target profiles are not installed",
                          "reinstall edgeq, or convert without --target") from None
    target = load_target(options.target)
    scheme = _scheme_of(recipe)
    if scheme in SCHEMES and not target.supports_scheme(scheme):
        raise UsageError(f"target {target.name} does not support --scheme {scheme}",
                         "use --scheme int8 for this target")
    if options.recipe is None and recipe.activations == "int8":
        recipe = table.get(recipe_for_scheme("int8", bool(target.per_channel)))
    return recipe, target


def convert(
    model: str | Path,
    calib: str | Path,
    output: str | Path,
    options: ConvertOptions = ConvertOptions(),
    progress: Optional[ProgressCallback] = None,
) -> ConvertResult:
    """Convert ``model`` with the chosen recipe (full int8 per-channel by default) to ``output``; write the report.

    Runs the stages: load, export_float, calibrate (static recipes), quantize,
    validate (with ``options.eval_data``), write. Raises ``ModelError`` /
    ``DataError`` / ``InputError`` for bad input, ``ConversionError`` when the
    recipe cannot be made, ``RecipeError`` for an unknown or simulated recipe,
    and ``UsageError`` / ``TargetError`` for options that do not go together.
    The check against ``options.target`` is not run here (the CLI composes it).
    Nothing is written unless the whole conversion succeeds.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    recipe, _target = resolve_for_target(options)
    io_types = IoTypes(options.input_type, options.output_type)
    io_types.resolve(recipe, None if options.recipe else options.scheme)
    model_path = Path(model)
    out_path = Path(output)
    report_path = Path(options.report_path) if options.report_path else default_report_path(out_path)

    model_format(model_path)
    _check_output(out_path, "output")
    _check_output(report_path, "report")
    if out_path.resolve() == report_path.resolve():
        raise UsageError("the report path is the model output path", "choose another --report")
    refuse_output_over_input([("output", out_path), ("report", report_path)],
                             [("model", model_path), ("calibration data", _data_path(calib)),
                              ("evaluation data", _data_path(options.eval_data))])

    with quiet_tensorflow():
        report(progress, "load", str(model_path))
        loaded = load_model(model_path, replace(options.load, layout_data=options.load.layout_data or str(calib)))
        timings["load"] = time.perf_counter() - t0

        loaded, calib_data, input_shapes = _concrete(loaded, calib, options)
        eval_data = None
        if options.eval_data:
            eval_data = load_dataset(options.eval_data, loaded.inputs,
                                     DataOptions(samples=options.eval_samples, seed=options.data.seed,
                                                 mean=options.data.mean, std=options.data.std,
                                                 scale=options.data.scale),
                                     role="evaluation")

        with tempfile.TemporaryDirectory(prefix="edgeq-convert-") as work:
            float_model = export_float(loaded, work, progress)
            timings["export"] = float_model.seconds
            calibration = None
            if recipe.needs_calibration:
                calibration = calibrate(float_model, calib_data, progress)
                timings["calibrate"] = calibration.seconds
            quantized = quantize(float_model, calibration, recipe, io_types, progress)
            timings["convert"] = quantized.seconds
            validation = None
            if eval_data is not None:
                validation = validate(quantized, float_model, eval_data, calibration, options.worst_layers,
                                      progress)
                forget_reference(float_model)
                timings["evaluate"] = validation.seconds
    if calibration is None:
        # The report still says which samples were given, even when the recipe needs no ranges.
        calibration_info = Calibration(calib_data, b"")
    else:
        calibration_info = calibration
    timings["total"] = time.perf_counter() - t0
    result = report_for(loaded, float_model, calibration_info, quantized, validation, out_path, report_path,
                        options.data, timings, warn_drop=options.warn_drop, input_shapes=input_shapes)
    return write(quantized, result)


def _concrete(loaded: LoadedModel, calib: str | Path,
              options: ConvertOptions) -> tuple[LoadedModel, Dataset, tuple[dict[str, Any], ...]]:
    """The calibration data, and ``loaded`` with unknown input dims set from ``--input-shape`` or that data.

    A model with ``None`` height and width would otherwise be exported, calibrated,
    checked and measured at a placeholder 1x1; the report's ``input_shapes`` says
    which shape was used and where it came from.
    """
    from edgeq.calibration import concrete_inputs

    inputs, given = concrete_inputs(loaded.inputs, options.input_shapes)
    calib_data = load_dataset(calib, inputs, options.data, role="calibration")
    inputs, found = concrete_inputs(inputs, (), calib_data)
    records = {r["name"]: r for r in found}
    records.update({r["name"]: r for r in given})
    # The model's own shapes in every record (the second pass saw the first pass's concrete ones).
    for spec in loaded.inputs:
        if spec.name in records:
            records[spec.name]["model_shape"] = [-1 if d is None else d for d in spec.shape]
    return replace(loaded, inputs=inputs), calib_data, tuple(records[s.name] for s in inputs if s.name in records)
