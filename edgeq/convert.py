"""Convert a float model to a full-integer TFLite model and report what quantization did.

The only module of edgeq that imports TensorFlow, and only inside functions, so
``edgeq --help``, ``check`` and ``deploy`` never pay for it.

Pipeline: load the model (Keras 3 ``.keras``, a SavedModel directory, or a legacy
Keras 2 ``.h5`` through ``tf_keras``), export it with a fixed batch size of 1
(static shapes: no SHAPE/STRIDED_SLICE/PACK ops around Flatten), calibrate with
the representative samples, convert with TensorFlow's TFLite converter, check
that every tensor really is integer, then (with ``eval_data``) measure float vs
quantized fidelity and the worst layers with TensorFlow's quantization
debugger. Nothing is written unless everything succeeded.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from edgeq import __version__
from edgeq.calibration import DataOptions, Dataset, InputSpec, load_dataset
from edgeq.errors import ConversionError, EdgeqError, InputError, ModelError, TargetError, UsageError
from edgeq.progress import ProgressCallback, report
from edgeq.tflite_file import TfliteModel, parse_tflite

SCHEMES = ("int8", "int16x8")
IO_TYPES = ("int8", "uint8", "int16", "float32")
_IO_ALLOWED = {"int8": ("int8", "uint8", "float32"), "int16x8": ("int16", "float32")}
_DEFAULT_IO = {"int8": "int8", "int16x8": "int16"}
# Ops Flatten/Reshape add when the batch size is dynamic; microcontroller runtimes dislike them.
DYNAMIC_SHAPE_OPS = ("SHAPE", "STRIDED_SLICE", "PACK")
_SIGNATURE = "serving_default"


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``convert`` needs besides the model, the calibration data and the output path."""

    scheme: str = "int8"  # "int8" | "int16x8" (16-bit activations, 8-bit weights)
    input_type: Optional[str] = None  # None: int8 (int16 with int16x8)
    output_type: Optional[str] = None
    data: DataOptions = DataOptions()  # calibration sampling and normalisation
    eval_data: Optional[str] = None  # a data source with held-out samples (and labels)
    eval_samples: Optional[int] = None  # None: every evaluation sample
    target: Optional[str] = None  # a target profile name or TOML file
    per_channel: bool = True  # per-channel weights (ANCHORS: the TFLite int8 convention)
    report_path: Optional[str] = None  # default: OUT.report.json beside the model
    worst_layers: int = 5  # how many layers to list by quantization error (0: skip the debugger)

    def resolved_io(self) -> tuple[str, str]:
        """(input type, output type) after applying the scheme's defaults and checking them."""
        if self.scheme not in SCHEMES:
            raise UsageError(f"unknown scheme '{self.scheme}'", f"choose one of {', '.join(SCHEMES)}")
        allowed = _IO_ALLOWED[self.scheme]
        out = []
        for which, value in (("input", self.input_type), ("output", self.output_type)):
            value = value or _DEFAULT_IO[self.scheme]
            if value not in allowed:
                raise UsageError(
                    f"--{which}-type {value} does not go with --scheme {self.scheme}",
                    f"choose one of {', '.join(allowed)}",
                )
            out.append(value)
        return out[0], out[1]


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

    @property
    def size_ratio(self) -> float:
        return self.quant_bytes / self.float_bytes if self.float_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "edgeq_version": __version__,
            "model": {"path": self.model, "format": self.model_format, "loader": self.loader},
            "output": {"path": self.output, "sha256": self.sha256},
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


# ---------------------------------------------------------------- loading


@dataclass
class _Loaded:
    fmt: str
    loader: str
    model_name: str
    inputs: list[InputSpec]
    layer_names: list[str]
    float_weight_bytes: int
    export: Callable[[str], None]  # writes a batch-1 SavedModel with signature "serving_default"


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


def _load_model(tf: Any, path: Path, fmt: str) -> _Loaded:
    if fmt == "saved_model":
        return _load_saved_model(tf, path)
    errors = []
    import keras

    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - any failure here means "try the legacy loader"
        errors.append(f"Keras 3: {_first_line(exc)}")
    else:
        return _from_keras3(tf, keras, model, fmt)
    if fmt == "h5":
        try:
            import tf_keras
        except ImportError:
            errors.append("tf_keras is not installed (pip install tf-keras)")
        else:
            try:
                model = tf_keras.models.load_model(path, compile=False)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"tf_keras: {_first_line(exc)}")
            else:
                return _from_tf_keras(tf, model)
    raise ModelError(f"cannot load {path} as a Keras model ({'; '.join(errors)})",
                     "check that the file is a complete Keras model saved with model.save()")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _from_keras3(tf: Any, keras: Any, model: Any, fmt: str) -> _Loaded:
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

    return _Loaded(fmt, "keras", model.name, inputs, [layer.name for layer in model.layers],
                   _weight_bytes(model.weights), export)


def _from_tf_keras(tf: Any, model: Any) -> _Loaded:
    inputs = _keras_inputs(model)
    multi = len(inputs) > 1

    def export(out_dir: str) -> None:
        specs = [_batch1(tf, s) for s in inputs]
        serve = tf.function(lambda *xs: model(list(xs) if multi else xs[0], training=False),
                            input_signature=specs)
        tf.saved_model.save(model, out_dir, signatures={_SIGNATURE: serve.get_concrete_function()})

    return _Loaded("h5", "tf_keras", model.name, inputs, [layer.name for layer in model.layers],
                   _weight_bytes(model.weights), export)


def _load_saved_model(tf: Any, path: Path) -> _Loaded:
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load SavedModel {path} ({_first_line(exc)})",
                         "check that the directory is a complete SavedModel") from None
    signatures = dict(loaded.signatures)
    if not signatures:
        raise ModelError(f"SavedModel {path} has no signatures",
                         "save it with tf.saved_model.save(..., signatures=...) or model.export()")
    key = _SIGNATURE if _SIGNATURE in signatures else sorted(signatures)[0]
    fn = signatures[key]
    kw = fn.structured_input_signature[1]
    names = sorted(kw)
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
    return _Loaded("saved_model", "saved_model", "", inputs, layer_names, weights, export)


# ---------------------------------------------------------------- conversion


def _make_converter(tf: Any, saved: str, scheme: str, io_types: Optional[tuple[str, str]],
                    per_channel: bool, calib: Optional[Dataset],
                    progress: Optional[ProgressCallback]) -> Any:
    conv = tf.lite.TFLiteConverter.from_saved_model(saved)
    if io_types is None:  # the float reference
        return conv
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if scheme == "int16x8":
        conv.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
    else:
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.as_dtype(io_types[0])
    conv.inference_output_type = tf.as_dtype(io_types[1])
    if not per_channel:
        # No public switch; TF's own tests set these. Dense layers have their own flag.
        conv._experimental_disable_per_channel = True
        conv._experimental_disable_per_channel_quantization_for_dense_layers = True
    if calib is None:
        raise ValueError("a quantizing converter needs calibration data")
    total = len(calib)

    def representative() -> Iterator[dict[str, np.ndarray]]:
        for i in range(total):
            if progress is not None and (i % 16 == 0 or i == total - 1):
                report(progress, "calibrate", "samples", i + 1, total)
            yield calib.sample(i)

    conv.representative_dataset = representative
    return conv


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


def _int16x8_is_full_integer(make: Callable[[], Any]) -> bool:
    try:
        with _frozen_heap():
            content = make().convert()
        return not _float_ops(parse_tflite(content), "int16", "int16")
    except Exception:  # noqa: BLE001 - any failure means "no"
        return False


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
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=content)
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


def _worst_layers(tf: Any, make_converter: Callable[[], Any], data: Dataset, limit: int,
                  quant: TfliteModel, layer_names: Sequence[str], model_name: str,
                  keys: dict[int, str]) -> tuple[LayerError, ...]:
    """Rank layer outputs by RMS quantization error in units of their quantization step."""
    n = min(len(data), 100)  # enough to rank layers; the full set is used for fidelity
    # The debugger feeds positional lists in the model's input order, not signature dicts.
    order = [io_.name for io_ in _io(quant)[0]]
    if sorted(order) != sorted(data.names):
        order = list(data.names)

    def dataset() -> Iterator[list[np.ndarray]]:
        for i in range(n):
            sample = data.sample(i)
            yield [sample[k] for k in order]

    debugger = tf.lite.experimental.QuantizationDebugger(converter=make_converter(), debug_dataset=dataset)
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


@dataclass(frozen=True)
class _Evaluation:
    float_bytes: int
    float_bytes_source: str = "estimated"
    fidelity: Optional[tuple[OutputFidelity, ...]] = None
    evaluation: Optional[dict[str, Any]] = None
    ranges: Optional[dict[str, Any]] = None
    worst_layers: tuple[LayerError, ...] = ()


def _evaluate(tf: Any, make: Callable[..., Any], content: bytes, quant: TfliteModel, keys: dict[int, str],
              loaded: _Loaded, calib: Dataset, data: Dataset, options: ConvertOptions,
              progress: Optional[ProgressCallback], warns: list[str], timings: dict[str, float]) -> _Evaluation:
    """Float reference vs quantized model on ``data``, range settling, and the worst layers."""
    t = time.perf_counter()
    report(progress, "evaluate", "float reference")
    with _frozen_heap():
        float_content = make(None).convert()
    ref = _run_all(float_content, data, progress, "float")
    got = _run_all(content, data, progress, options.scheme)
    fidelity = _fidelity(ref, got, data.labels)
    ranges = None
    try:
        ranges = _range_settling(float_content, calib)
    except Exception as exc:  # noqa: BLE001 - a diagnostic, never a failure
        warns.append(f"calibration range settling not available ({_first_line(exc)[:200]})")
    timings["evaluate"] = time.perf_counter() - t
    worst: tuple[LayerError, ...] = ()
    if options.worst_layers > 0:
        t = time.perf_counter()
        report(progress, "evaluate", "per-layer quantization error")
        try:
            with _frozen_heap():
                worst = _worst_layers(tf, lambda: make(prog=None), data, options.worst_layers,
                                      quant, loaded.layer_names, loaded.model_name, keys)
        except Exception as exc:  # noqa: BLE001 - the debugger is best effort
            warns.append(f"per-layer error not available ({_first_line(exc)[:200]})")
        timings["layers"] = time.perf_counter() - t
    return _Evaluation(len(float_content), "converted", fidelity, data.to_dict(), ranges, worst)


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


def _temp_beside(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def convert(
    model: str | Path,
    calib: str | Path,
    output: str | Path,
    options: ConvertOptions = ConvertOptions(),
    progress: Optional[ProgressCallback] = None,
) -> ConvertResult:
    """Convert ``model`` to a full-integer ``.tflite`` at ``output`` calibrated on ``calib``; write the report.

    Raises ``ModelError``/``DataError``/``InputError`` for bad input,
    ``ConversionError`` when the model cannot be made full-integer, and
    ``UsageError``/``TargetError`` for options that do not go together.
    Nothing is written unless the whole conversion succeeds.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    input_type, output_type = options.resolved_io()
    model_path = Path(model)
    out_path = Path(output)
    report_path = Path(options.report_path) if options.report_path else default_report_path(out_path)

    target = None
    per_channel = options.per_channel
    if options.target:
        try:
            from edgeq.targets import load_target
        except ImportError:
            raise TargetError(f"cannot use target '{options.target}': target profiles are not installed",
                              "reinstall edgeq, or convert without --target") from None
        target = load_target(options.target)
        if options.scheme != "int8" and not target.supports_scheme(options.scheme):
            raise UsageError(f"target {target.name} does not support --scheme {options.scheme}",
                             "use --scheme int8 for this target")
        if not target.supports_scheme(options.scheme):
            raise UsageError(f"target {target.name} does not support the {options.scheme} scheme")
        per_channel = bool(target.per_channel)

    fmt = model_format(model_path)
    _check_output(out_path, "output")
    _check_output(report_path, "report")
    if out_path.resolve() == report_path.resolve():
        raise UsageError("the report path is the model output path", "choose another --report")

    written: list[Path] = []
    try:
        with quiet_tensorflow():
            report(progress, "load", str(model_path))
            tf = _tf()
            loaded = _load_model(tf, model_path, fmt)
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
                saved = os.path.join(work, "saved_model")
                t = time.perf_counter()
                try:
                    loaded.export(saved)
                except Exception as exc:  # noqa: BLE001
                    raise ModelError(f"cannot trace {model_path} with a batch size of 1 ({_first_line(exc)})",
                                     "check that the model runs on one sample: model(x[:1])") from None
                timings["export"] = time.perf_counter() - t

                def make(io_types: Optional[tuple[str, str]] = (input_type, output_type),
                         prog: Optional[ProgressCallback] = progress) -> Any:
                    return _make_converter(tf, saved, options.scheme, io_types, per_channel, calib_data, prog)

                t = time.perf_counter()
                report(progress, "convert", "quantizing")
                try:
                    with _frozen_heap():
                        content = make().convert()
                except EdgeqError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the converter raises many kinds
                    raise _converter_error(exc, options.scheme, loaded.layer_names, loaded.model_name) from exc
                timings["convert"] = time.perf_counter() - t
                quant = parse_tflite(content, str(out_path))
                keys = _signature_names(content)

                floats = _float_ops(quant, input_type, output_type)
                if floats:
                    names = []
                    for op, tensor in floats:
                        layer = _layer_of(tensor, loaded.layer_names, loaded.model_name)
                        names.append(f"{op} (layer '{layer}')" if layer else f"{op} (at '{tensor.split(';')[0]}')")
                    uniq = list(dict.fromkeys(names))
                    hint = "replace the layer with ops that have integer kernels"
                    if options.scheme == "int8" and (target is None or target.supports_scheme("int16x8")):
                        # Only suggest int16x8 when it really gives a full-integer model.
                        if _int16x8_is_full_integer(lambda: _make_converter(
                                tf, saved, "int16x8", ("int16", "int16"), per_channel, calib_data, None)):
                            hint = "--scheme int16x8 converts this model to full integer; or " + hint
                    raise ConversionError(
                        f"{', '.join(uniq)} cannot be quantized to {options.scheme}: "
                        f"the converter left {'it' if len(uniq) == 1 else 'them'} in float32",
                        hint,
                    )

                warns = []
                static = all(d > 0 for t_ in quant.inputs for d in t_.shape_signature) and not any(
                    op in quant.op_counts for op in DYNAMIC_SHAPE_OPS
                )
                if not static:
                    dyn = [op for op in DYNAMIC_SHAPE_OPS if op in quant.op_counts]
                    warns.append("the model has dynamic shapes" + (f" ({', '.join(dyn)} ops)" if dyn else "")
                                 + "; microcontroller runtimes may not support them")

                float_bytes = loaded.float_weight_bytes + (quant.size_bytes - quant.weight_bytes)
                ev = _Evaluation(float_bytes=float_bytes)
                if eval_data is not None:
                    ev = _evaluate(tf, make, content, quant, keys, loaded, calib_data, eval_data, options,
                                   progress, warns, timings)

            tmp_model = _temp_beside(out_path)
            written.append(tmp_model)
            tmp_model.write_bytes(content)

            check = None
            check_summary: tuple[str, ...] = ()
            if target is not None:
                from edgeq.check import check_model
                from edgeq.tflite_file import read_tflite

                result = check_model(read_tflite(tmp_model), target)
                check = result.to_dict()
                check_summary = tuple(result.summary_lines())
                if not result.fits:
                    warns.append(f"the converted model does not fit target {target.name} (see check)")

            inputs, outputs = _io(quant, keys)
            timings["total"] = time.perf_counter() - t0
            result_obj = ConvertResult(
                output=str(out_path),
                report_path=str(report_path),
                model=str(model_path),
                model_format=fmt,
                loader=loaded.loader,
                scheme=options.scheme,
                input_type=input_type,
                output_type=output_type,
                per_channel=per_channel,
                calibration={**calib_data.to_dict(), "seed": options.data.seed, "ranges": ev.ranges,
                             "normalisation": {k: v for k, v in options.data.to_dict().items()
                                               if k in ("mean", "std", "scale") and v is not None}},
                float_bytes=int(ev.float_bytes),
                float_bytes_source=ev.float_bytes_source,
                quant_bytes=len(content),
                ops=quant.op_counts,
                static_shapes=static,
                inputs=inputs,
                outputs=outputs,
                fidelity=ev.fidelity,
                evaluation=ev.evaluation,
                worst_layers=ev.worst_layers,
                target=target.name if target is not None else None,
                check=check,
                check_summary=check_summary,
                warnings=tuple(warns),
                timings_s={k: round(v, 3) for k, v in timings.items()},
                sha256=quant.sha256,
            )
            tmp_report = _temp_beside(report_path)
            written.append(tmp_report)
            tmp_report.write_text(json.dumps(result_obj.to_dict(), indent=2, default=str) + "\n")
            os.replace(tmp_model, out_path)
            written[0] = out_path
            os.replace(tmp_report, report_path)
            written.clear()
            return result_obj
    finally:
        for p in written:
            with contextlib.suppress(OSError):
                p.unlink()

