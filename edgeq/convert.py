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
from edgeq.progress import ProgressCallback, report
from edgeq.recipes import Recipe, RecipeTable, load_recipes, recipe_for_scheme
from edgeq.safeio import temp_beside
from edgeq.tflite_file import TfliteModel, parse_tflite

SCHEMES = ("int8", "int16x8")
IO_TYPES = ("int8", "uint8", "int16", "float32")
# Model input/output types each activation kind allows; the first is the default.
_IO_ALLOWED = {"int8": ("int8", "uint8", "float32"), "int16": ("int16", "float32")}
# Ops Flatten/Reshape add when the batch size is dynamic; microcontroller runtimes dislike them.
DYNAMIC_SHAPE_OPS = ("SHAPE", "STRIDED_SLICE", "PACK")
_SIGNATURE = "serving_default"


# ---------------------------------------------------------------- options and results


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model. ``unsafe_load`` lets a model run the Python code it carries (Lambda layers)."""

    unsafe_load: bool = False


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
    top1_agreement: Optional[float] = None  # classification-like outputs only
    accuracy_float: Optional[float] = None  # with labels
    accuracy_quant: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "samples": self.samples, "top1_agreement": self.top1_agreement,
            "accuracy_float": self.accuracy_float, "accuracy_int": self.accuracy_quant,
            "max_abs_error": self.max_abs_error, "sqnr_db": self.sqnr_db,
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
    export: Callable[[str], None] = field(repr=False, compare=False)  # writes a batch-1 SavedModel


@dataclass(frozen=True)
class FloatModel:
    """The batch-1 float model: a SavedModel directory (inside the caller's workdir) and its float ``.tflite``."""

    loaded: LoadedModel
    saved_model_dir: str
    content: bytes = field(repr=False)
    tflite: TfliteModel = field(repr=False)
    seconds: float = 0.0

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

    def agreement_drop(self) -> Optional[float]:
        """100 - top-1 agreement (in points) on the first classification output; else None."""
        for f in self.fidelity:
            if f.top1_agreement is not None:
                return 100.0 * (1.0 - f.top1_agreement)
        return None


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
    """Classify a model path without TensorFlow: "keras", "h5" or "saved_model" (or raise ModelError)."""
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

    Keras models load in safe mode: a ``Lambda`` layer carrying Python bytecode
    is refused (a one-line ``ModelError``) unless ``options.unsafe_load``. A
    legacy ``.h5`` goes to ``tf_keras`` only when Keras 3 cannot parse it, and
    only after its config has been checked for code (``tf_keras`` runs the
    bytecode of an ``.h5`` Lambda even in safe mode). SavedModels are programs:
    loading one runs no Python, but its graph functions run when traced.
    """
    p = Path(path)
    fmt = model_format(p)
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
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        raise ModelError(f"{path}: model_config is not valid JSON",
                         "check that the file is a complete Keras model saved with model.save()") from None
    found = _code_in_config(config)
    if found:
        raise ModelError(f"{path} carries Python code ({found}) that loading would run", _UNSAFE_HINT)


def _code_in_config(config: Any) -> Optional[str]:
    """The first layer whose config holds code (a Lambda, or a marshalled function), or None."""
    stack = [config]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > 1_000_000:
            return "a model config too large to check"
        if isinstance(node, dict):
            cls = node.get("class_name")
            cfg = node.get("config") if isinstance(node.get("config"), dict) else {}
            name = cfg.get("name") if isinstance(cfg.get("name"), str) else "?"
            if cls == "Lambda" or (isinstance(cls, str) and cls.endswith(">Lambda")):
                return f"Lambda layer '{name[:80]}'"
            if node.get("function_type") == "lambda" or node.get("output_shape_type") == "lambda":
                return f"a marshalled function in '{name[:80]}'"
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


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

    def export(out_dir: str) -> None:
        specs = [_batch1(tf, s) for s in inputs]
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

    def export(out_dir: str) -> None:
        specs = [_batch1(tf, s) for s in inputs]
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

    def export(out_dir: str) -> None:
        specs = [_batch1(tf, s) for s in inputs]

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

    Batch 1 keeps shapes static (no SHAPE/STRIDED_SLICE/PACK around Flatten).
    The SavedModel stays in ``workdir`` (the caller owns its lifetime): fp16 and
    dynamic-range recipes are made from it.
    """
    t = time.perf_counter()
    saved = os.path.join(str(workdir), "saved_model")
    report(progress, "export", "batch-1 SavedModel and float .tflite")
    with quiet_tensorflow():
        tf = _tf()
        try:
            loaded.export(saved)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"cannot trace {loaded.path} with a batch size of 1 ({_first_line(exc)})",
                             "check that the model runs on one sample: model(x[:1])") from None
        try:
            with _frozen_heap():
                content = tf.lite.TFLiteConverter.from_saved_model(saved).convert()
        except Exception as exc:  # noqa: BLE001 - the converter raises many kinds
            raise _converter_error(exc, "int8", loaded.layer_names, loaded.model_name) from exc
    return FloatModel(loaded, saved, content, parse_tflite(content, f"{loaded.path} (float)"),
                      time.perf_counter() - t)


# ---------------------------------------------------------------- stage 3: calibrate, once


def calibrate(float_model: FloatModel, calib: Dataset,
              progress: Optional[ProgressCallback] = None) -> Calibration:
    """Record every activation's range on ``calib`` (TensorFlow's calibrator on the float ``.tflite``).

    The result is what ``TFLiteConverter`` records before it quantizes; every
    static recipe quantizes from it without running the samples again.
    """
    t = time.perf_counter()
    names = _float_input_names(float_model.content)  # in the model's tensor order
    if sorted(names) != sorted(calib.names):
        raise InputError(f"calibration data {calib.source} has inputs {', '.join(calib.names)} but the model "
                         f"takes {', '.join(names)}", "name the arrays after the model's inputs")
    total = len(calib)

    def samples() -> Iterator[list[np.ndarray]]:
        # Positional lists in tensor order: with dicts the calibrator builds a deprecated tf.lite.Interpreter.
        for i in range(total):
            if i % 16 == 0 or i == total - 1:
                report(progress, "calibrate", "samples", i + 1, total)
            sample = calib.sample(i)
            yield [sample[n] for n in names]

    with quiet_tensorflow():
        _tf()
        from tensorflow.lite.python.optimize import calibrator as tf_calibrator

        try:
            with _frozen_heap():
                calibrated = tf_calibrator.Calibrator(
                    tf_calibrator.add_intermediate_tensors(float_model.content)).calibrate(samples)
        except EdgeqError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"calibration failed: {_first_line(exc)}",
                                  "check that the calibration samples fit the model's inputs") from None
    return Calibration(calib, bytes(calibrated), time.perf_counter() - t)


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
    if recipe.full_integer:
        floats = _float_ops(quant, input_type, output_type)
        if floats:
            raise _float_ops_error(floats, float_model, calibration, recipe)
    warns = []
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
    if recipe.activations == "int8":
        # What TFLiteConverter.convert() does after calibrating (lite.py, _quantize / _optimize_tflite_model).
        model = tf_convert.mlir_quantize(
            calibration.calibrated, disable_per_channel=per_tensor,
            input_data_type=tf.as_dtype(input_type), output_data_type=tf.as_dtype(output_type),
            disable_per_channel_for_dense_layers=per_tensor)
        return bytes(tf_lite._deduplicate_readonly_buffers(model))
    # int16 activations: the converter's own (older) quantizer, on the recorded ranges.
    from tensorflow.lite.python.optimize import calibrator as tf_calibrator

    quantizer = tf_calibrator.Calibrator(calibration.calibrated)
    model = quantizer._calibrator.QuantizeModel(
        np.dtype(input_type).num, np.dtype(output_type).num, False,
        np.dtype(np.int16).num, np.dtype(np.int64).num, per_tensor, per_tensor)
    model = tf_lite._modify_model_io_type(model, tf.as_dtype(input_type), tf.as_dtype(output_type))
    return bytes(tf_lite._deduplicate_readonly_buffers(model))


def _float_ops_error(floats: list[tuple[str, str]], float_model: FloatModel,
                     calibration: Optional[Calibration], recipe: Recipe) -> ConversionError:
    loaded = float_model.loaded
    names = []
    for op, tensor in floats:
        layer = _layer_of(tensor, loaded.layer_names, loaded.model_name)
        names.append(f"{op} (layer '{layer}')" if layer else f"{op} (at '{tensor.split(';')[0]}')")
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
    return ConversionError(
        f"{', '.join(uniq)} cannot be quantized to {scheme}: "
        f"the converter left {'it' if len(uniq) == 1 else 'them'} in float32",
        hint,
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
    fidelity = _fidelity(ref, got, eval_data.labels)
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
        cache[key] = _run_all(float_model.content, data, progress, "float")
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
               timings: Optional[dict[str, float]] = None, extra_warnings: Sequence[str] = ()) -> ConvertResult:
    """The ``ConvertResult`` (and report) for one quantized model, before anything is written."""
    recipe = quantized.recipe
    out_path = Path(output)
    rpath = Path(report_path) if report_path else default_report_path(out_path)
    inputs, outputs = quantized.io()
    warns = list(quantized.warnings) + list(extra_warnings)
    if validation is not None:
        warns += list(validation.warnings)
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
    n = len(data)
    for i in range(n):
        feed = {}
        for name, arr in data.sample(i).items():
            d = in_details[name]
            dtype = np.dtype(d["dtype"])
            if dtype.kind in "iu":
                scale, zp = d["quantization"]
                info = np.iinfo(dtype)
                arr = np.clip(np.round(arr / scale + zp), info.min, info.max).astype(dtype)
            feed[name] = arr.astype(dtype, copy=False)
        out = runner(**feed)
        for k, v in out.items():
            d = out_details[k]
            if np.dtype(d["dtype"]).kind in "iu":
                scale, zp = d["quantization"]
                v = (v.astype(np.float32) - zp) * scale
            results[k].append(np.asarray(v, dtype=np.float32))
        if progress is not None and (i % 32 == 0 or i == n - 1):
            report(progress, "evaluate", label, i + 1, n)
    return {k: np.concatenate(v, axis=0) for k, v in results.items()}


def _fidelity(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], labels: Optional[np.ndarray]) -> tuple[OutputFidelity, ...]:
    out = []
    for name in sorted(ref):
        f = ref[name].astype(np.float64)
        q = got[name].astype(np.float64)
        err = f - q
        noise = float(np.sum(err**2))
        signal = float(np.sum(f**2))
        sqnr = None if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else float("-inf"))
        agree = acc_f = acc_q = None
        if f.ndim == 2 and f.shape[1] > 1:
            pf, pq = f.argmax(axis=1), q.argmax(axis=1)
            agree = float(np.mean(pf == pq))
            if labels is not None and labels.ndim == 1 and labels.shape[0] == f.shape[0]:
                acc_f = float(np.mean(pf == labels))
                acc_q = float(np.mean(pq == labels))
        elif f.ndim == 2 and f.shape[1] == 1 and labels is not None and labels.ndim == 1:
            pf, pq = (f[:, 0] > 0.5).astype(int), (q[:, 0] > 0.5).astype(int)
            agree = float(np.mean(pf == pq))
            acc_f = float(np.mean(pf == labels))
            acc_q = float(np.mean(pq == labels))
        out.append(OutputFidelity(name, int(f.shape[0]), float(np.max(np.abs(err))) if err.size else 0.0,
                                  None if sqnr is None else round(sqnr, 2), agree, acc_f, acc_q))
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
            v = interp.get_tensor(t)
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

    with quiet_tensorflow():
        report(progress, "load", str(model_path))
        loaded = load_model(model_path, options.load)
        timings["load"] = time.perf_counter() - t0

        calib_data = load_dataset(calib, loaded.inputs, options.data, role="calibration")
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
                        options.data, timings)
    return write(quantized, result)
