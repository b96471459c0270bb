"""Load, export and calibrate: the model, its float ``.tflite`` and activation ranges, made once.

``load_model`` reads a ``.keras``, legacy ``.h5`` or SavedModel (or, through
``edgeq.torch_convert``, a PyTorch model) into a ``LoadedModel``; ``export_float``
makes its batch-1 SavedModel and float ``.tflite``; ``calibrate`` records every
activation's range once on the calibration samples, which every static recipe
then quantizes from (``edgeq.convert.quantizers``).

Model files are checked for code and zip bombs first (``edgeq.convert.untrusted``).
TensorFlow is imported inside the functions only.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from edgeq.calibration import Dataset, InputSpec
from edgeq.convert.interpreter import float_input_names
from edgeq.convert.quantizers import converter_error, forks, guarded
from edgeq.convert.tfenv import first_line, frozen_heap, import_tensorflow, quiet_tensorflow
from edgeq.convert.types import SIGNATURE, Calibration, FloatModel, LoadedModel, LoadOptions
from edgeq.convert.untrusted import UNSAFE_HINT, check_keras_archive, refuse_h5_code
from edgeq.errors import ConversionError, EdgeqError, InputError, ModelError
from edgeq.progress import ProgressCallback, report
from edgeq.tflite_file import parse_tflite


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


# Keras 3's words when safe mode refuses to deserialize code ("... potential risk of arbitrary code
# execution ... safe_mode=False ..."): after that refusal edgeq never tries another loader.
_SAFE_MODE_REFUSAL = re.compile(r"safe_mode|arbitrary code execution", re.IGNORECASE)


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
        tf = import_tensorflow()
        if fmt == "saved_model":
            return _load_saved_model(tf, p)
        return _load_keras(tf, p, fmt, options)


def _load_keras(tf: Any, path: Path, fmt: str, options: LoadOptions) -> LoadedModel:
    errors = []
    import keras

    if fmt == "h5" and not options.unsafe_load:
        refuse_h5_code(path)  # before any loader parses the file
    if fmt == "keras":
        check_keras_archive(path, options.unsafe_load)  # declared sizes, then code, before Keras opens it
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=not options.unsafe_load)
    except Exception as exc:  # noqa: BLE001 - any failure here means "try the legacy loader", unless refused
        if not options.unsafe_load and _SAFE_MODE_REFUSAL.search(str(exc)):
            raise ModelError(f"{path} carries Python code (a Lambda layer or an unsafe object) that Keras "
                             "refuses to load in safe mode", UNSAFE_HINT) from None
        errors.append(f"Keras 3: {first_line(exc)}")
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
                errors.append(f"tf_keras: {first_line(exc)}")
            else:
                return _from_tf_keras(tf, model, path)
    raise ModelError(f"cannot load {path} as a Keras model ({'; '.join(errors)})",
                     "check that the file is a complete Keras model saved with model.save()")


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
            SIGNATURE, lambda *xs: model(list(xs) if multi else xs[0], training=False), specs
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
        tf.saved_model.save(model, out_dir, signatures={SIGNATURE: serve.get_concrete_function()})

    return LoadedModel(str(path), "h5", "tf_keras", model.name, tuple(inputs),
                       tuple(layer.name for layer in model.layers), _weight_bytes(model.weights), model, export)


def loaded_from_keras(model: Any, fmt: str, path: str | Path) -> LoadedModel:
    """A ``LoadedModel`` for a Keras 3 or tf_keras model built in memory (e.g. a rewritten copy of the
    user's model), named after the user's file ``path`` of format ``fmt``."""
    tf = import_tensorflow()
    if type(model).__module__.startswith("tf_keras"):
        return _from_tf_keras(tf, model, Path(path))
    import keras

    return _from_keras3(tf, keras, model, fmt, Path(path))


def _load_saved_model(tf: Any, path: Path) -> LoadedModel:
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load SavedModel {path} ({first_line(exc)})",
                         "check that the directory is a complete SavedModel") from None
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if not signatures:
        raise ModelError(f"SavedModel {path} has no signatures",
                         "save it with tf.saved_model.save(..., signatures=...) or model.export()")
    key = SIGNATURE if SIGNATURE in signatures else sorted(signatures)[0]
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
        tf.saved_model.save(wrapper, out_dir, signatures={SIGNATURE: serve.get_concrete_function()})

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
        tf = import_tensorflow()
        if loaded.loader == "keras":
            # LayerNormalization and LSTM/GRU loops, rebuilt in forms TensorFlow quantizes to int8.
            from edgeq.rewrite import for_int8

            model, notes = for_int8(loaded.model)
            if notes:
                loaded = replace(loaded, model=model, export=loaded_from_keras(model, loaded.fmt, loaded.path).export)
        try:
            loaded.export(saved, loaded.inputs)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"cannot trace {loaded.path} with a batch size of 1 ({first_line(exc)})",
                             "check that the model runs on one sample: model(x[:1])") from None
        try:
            with frozen_heap():
                content = tf.lite.TFLiteConverter.from_saved_model(saved).convert()
        except Exception as exc:  # noqa: BLE001 - the converter raises many kinds
            raise converter_error(exc, "int8", loaded.layer_names, loaded.model_name) from exc
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
    names = float_input_names(float_model.content)  # in the model's tensor order
    if sorted(names) != sorted(calib.names):
        raise InputError(f"calibration data {calib.source} has inputs {', '.join(calib.names)} but the model "
                         f"takes {', '.join(names)}", "name the arrays after the model's inputs")
    total = len(calib)

    forked = forks(float_model)

    def samples() -> Iterator[list[np.ndarray]]:
        # Positional lists in tensor order: with dicts the calibrator builds a deprecated tf.lite.Interpreter.
        for i in range(total):
            # Events from a forked child would not reach the caller's callback: there, only start and end.
            if not forked and (i % 16 == 0 or i == total - 1):
                report(progress, "calibrate", "samples", i + 1, total)
            sample = calib.sample(i)
            yield [sample[n] for n in names]

    with quiet_tensorflow():
        import_tensorflow()
        from tensorflow.lite.python.optimize import calibrator as tf_calibrator

        def record() -> bytes:
            with frozen_heap():
                return bytes(tf_calibrator.Calibrator(
                    tf_calibrator.add_intermediate_tensors(float_model.content)).calibrate(samples))

        try:
            if forked:
                report(progress, "calibrate", "samples", 0, total)
            calibrated = guarded("TensorFlow's calibrator", float_model, record)
            if forked:
                report(progress, "calibrate", "samples", total, total)
        except EdgeqError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"calibration failed: {first_line(exc)}",
                                  "check that the calibration samples fit the model's inputs") from None
    return Calibration(calib, bytes(calibrated), time.perf_counter() - t)
