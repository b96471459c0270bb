"""Quantization-aware training: fine-tune with fake quantization, then convert to full int8.

tensorflow-model-optimization only works on ``tf_keras`` (Keras 2) models, and
no Keras 3 QAT path exports to TFLite (ANCHORS). So a Keras 3 model is rebuilt
in ``tf_keras`` from its layer configs and weights (Sequential models and
functional chains of single-input layers; anything else is refused with the
reason), checked to compute the same float function, wrapped with
``tfmot.quantization.keras.quantize_model`` and trained for a few seeded
epochs on the user's labelled data. The trained model goes through
TensorFlow's ``TFLiteConverter`` with a representative dataset to a
full-integer model with int8 inputs and outputs (the documented route).

TensorFlow is imported only inside functions.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from edgeq.calibration import Dataset
from edgeq.convert.tfenv import first_line
from edgeq.errors import ConversionError, DataError, ModelError
from edgeq.progress import ProgressCallback, report
from edgeq.units import fmt_bytes


SCHEMA = "edgeq.qat/1"  # the report of `edgeq qat`


class QatError(ModelError):
    """The model cannot be trained with quantization-aware training (the message says why)."""


@dataclass(frozen=True)
class QatOptions:
    """How to fine-tune."""

    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 1e-4
    seed: int = 0
    input_type: str = "int8"
    output_type: str = "int8"
    warn_drop: float = 5.0  # warn when the QAT model loses more than this many points against float


@dataclass(frozen=True)
class QatModel:
    """The fine-tuned, converted model."""

    content: bytes  # the full-integer .tflite
    epochs: int
    train_samples: int
    final_loss: Optional[float]
    rebuilt: bool  # True when a Keras 3 model was rebuilt in tf_keras
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "train_samples": self.train_samples,
                "final_loss": None if self.final_loss is None else round(self.final_loss, 5),
                "rebuilt_in_tf_keras": self.rebuilt, "seconds": round(self.seconds, 3)}


def _is_tf_keras(model: Any) -> bool:
    return type(model).__module__.startswith("tf_keras")


def _chain(model: Any) -> list[Any]:
    """The model's layers in order, if it is a single chain of single-input layers (else QatError)."""
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise QatError(f"model '{model.name}' has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                       "edgeq rebuilds only single-input, single-output chains in tf_keras for QAT",
                       "train it with QAT in tf_keras yourself, or use the post-training fixes")
    previous = None
    for layer in layers:
        tensors = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        if len(tensors) != 1:
            raise QatError(f"layer '{layer.name}' takes {len(tensors)} inputs; edgeq rebuilds only chains of "
                           "single-input layers in tf_keras for QAT",
                           "train it with QAT in tf_keras yourself, or use the post-training fixes")
        producer = tensors[0]._keras_history[0]
        if previous is not None and producer.name != previous.name:
            raise QatError(f"layer '{layer.name}' does not follow '{previous.name}' (the model branches); edgeq "
                           "rebuilds only chains of layers in tf_keras for QAT",
                           "train it with QAT in tf_keras yourself, or use the post-training fixes")
        previous = layer
    return layers


_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'|Unrecognized keyword arguments?[^{]*\{'(\w+)'")
# Keras 3-only options that tf_keras layers do not take (a rebuilt float layer does not need them).
_KERAS3_ONLY = ("quantization_config", "lora_rank", "lora_alpha", "synchronized")


def _rebuild_layer(tf_keras: Any, layer: Any) -> Any:
    cls_name = type(layer).__name__
    cls = getattr(tf_keras.layers, cls_name, None)
    if cls is None:
        raise QatError(f"layer '{layer.name}' ({cls_name}) has no tf_keras counterpart, so the model cannot be "
                       "rebuilt for QAT", "replace it with built-in layers, or use the post-training fixes")
    config = dict(layer.get_config())
    config["dtype"] = "float32"
    for key in _KERAS3_ONLY:
        config.pop(key, None)
    for key in list(config):
        if key.endswith(("_initializer", "_regularizer", "_constraint")):
            del config[key]  # the weights are copied; training extras are not carried over
    for _ in range(8):
        try:
            return cls.from_config(config)
        except TypeError as exc:
            m = _UNEXPECTED.search(str(exc).replace("\n", " "))
            key = m and (m.group(1) or m.group(2))
            if not key or key not in config:
                raise QatError(f"layer '{layer.name}' ({cls_name}) cannot be rebuilt in tf_keras "
                               f"({first_line(exc)})", "use the post-training fixes") from None
            del config[key]  # a Keras 3-only option (e.g. quantization_config)
    raise QatError(f"layer '{layer.name}' ({cls_name}) cannot be rebuilt in tf_keras")


def to_tf_keras(model: Any, check: Optional[np.ndarray] = None) -> tuple[Any, bool]:
    """A tf_keras copy of Keras ``model`` with the same weights; (model, rebuilt?).

    A tf_keras model is returned as it is. With ``check`` (a few inputs) the
    rebuilt model must compute the same outputs, or QatError says so.
    """
    import tf_keras

    if _is_tf_keras(model):
        return model, False
    layers = _chain(model)
    spec = model.inputs[0]
    shape = tuple(None if d is None else int(d) for d in spec.shape[1:])
    name = spec.name.split(":")[0]
    inp = tf_keras.layers.Input(shape, name=name)
    rebuilt = [_rebuild_layer(tf_keras, layer) for layer in layers]
    copy = tf_keras.Sequential([inp] + rebuilt, name=model.name)
    for src, dst in zip(layers, rebuilt):
        weights = src.get_weights()
        try:
            dst.set_weights(weights)
        except ValueError as exc:
            raise QatError(f"layer '{src.name}': its weights do not fit the tf_keras layer ({first_line(exc)})",
                           "use the post-training fixes") from None
    if check is not None and len(check):
        want = np.asarray(model(check, training=False))
        got = np.asarray(copy(check, training=False))
        err = float(np.max(np.abs(want - got)))
        if not err <= 1e-4 * max(1.0, float(np.max(np.abs(want)))):
            raise QatError(f"model '{model.name}' rebuilt in tf_keras computes different outputs "
                           f"(max difference {err:.3g})", "use the post-training fixes")
    return copy, True


def _loss(tf_keras: Any, model: Any, labels: np.ndarray) -> Any:
    out_dim = int(model.outputs[0].shape[-1] or 1)
    last = model.layers[-1]
    act = getattr(getattr(last, "activation", None), "__name__", "linear")
    if type(last).__name__ == "Softmax":
        act = "softmax"
    if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer) and out_dim > 1:
        return tf_keras.losses.SparseCategoricalCrossentropy(from_logits=act != "softmax")
    if labels.ndim == 1 and out_dim == 1:
        return tf_keras.losses.BinaryCrossentropy(from_logits=act != "sigmoid")
    return tf_keras.losses.MeanSquaredError()


def quantization_aware_training(
    model: Any,
    train: Dataset,
    calib: Dataset,
    options: QatOptions = QatOptions(),
    progress: Optional[ProgressCallback] = None,
) -> QatModel:
    """Fine-tune Keras ``model`` with fake quantization on ``train`` and convert it to full int8.

    ``train`` needs labels. Raises QatError when the model cannot go through
    tensorflow-model-optimization, DataError without labels, ConversionError
    when the trained model does not convert to full integer.
    """
    t0 = time.perf_counter()
    if train.labels is None:
        raise DataError(f"training data {train.source} has no labels",
                        "give an .npz with the inputs and 'y' (the labels) for --train")
    if len(train.names) != 1:
        raise QatError("quantization-aware training supports single-input models only")
    import tensorflow as tf
    import tf_keras

    try:
        import tensorflow_model_optimization as tfmot
    except ImportError:
        raise QatError("quantization-aware training needs tensorflow-model-optimization",
                       "pip install 'edgeq[convert]'") from None
    x = np.asarray(train.arrays[0], dtype=np.float32)
    y = np.asarray(train.labels)
    base, rebuilt = to_tf_keras(model, check=np.asarray(calib.arrays[0][:8], dtype=np.float32))
    tf_keras.utils.set_random_seed(options.seed)
    report(progress, "qat", "wrapping with fake quantization")
    try:
        qmodel = tfmot.quantization.keras.quantize_model(base)
    except Exception as exc:  # noqa: BLE001 - tfmot raises ValueError/RuntimeError/TypeError for unsupported layers
        raise QatError(f"tensorflow-model-optimization cannot wrap model '{model.name}' for QAT "
                       f"({first_line(exc)})", "use the post-training fixes") from None
    qmodel.compile(optimizer=tf_keras.optimizers.Adam(options.learning_rate), loss=_loss(tf_keras, base, y))
    losses: list[float] = []

    class _Progress(tf_keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
            losses.append(float((logs or {}).get("loss", float("nan"))))
            report(progress, "qat", "epochs", epoch + 1, options.epochs)

    qmodel.fit(x, y, epochs=options.epochs, batch_size=options.batch_size, shuffle=True, verbose=0,
               callbacks=[_Progress()])

    report(progress, "qat", "converting to full int8")
    converter = tf.lite.TFLiteConverter.from_keras_model(qmodel)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.as_dtype(options.input_type)
    converter.inference_output_type = tf.as_dtype(options.output_type)
    calib_x = np.asarray(calib.arrays[0], dtype=np.float32)

    def representative() -> Iterator[list[np.ndarray]]:
        for i in range(len(calib_x)):
            yield [calib_x[i : i + 1]]

    converter.representative_dataset = representative
    try:
        content = converter.convert()
    except Exception as exc:  # noqa: BLE001 - the converter raises many kinds
        raise ConversionError(f"the QAT model does not convert to full int8 ({first_line(exc)})") from exc
    final = losses[-1] if losses and math.isfinite(losses[-1]) else None
    return QatModel(content, options.epochs, int(len(x)), final, rebuilt, time.perf_counter() - t0)


# ---------------------------------------------------------------- `edgeq qat`: PTQ and QAT side by side


@dataclass(frozen=True)
class QatResult:
    """Post-training and quantization-aware int8 on the same evaluation data; ``to_dict()`` is the report."""

    model: str
    output: str
    report_path: str
    metric: str  # "accuracy" | "agreement"
    float_accuracy: float  # percent
    ptq_accuracy: float
    qat_accuracy: float
    ptq_bytes: int
    qat_bytes: int
    training: QatModel
    full_integer: bool
    sha256: str
    seconds: float
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        from edgeq import __version__

        return {
            "schema": SCHEMA,
            "edgeq_version": __version__,
            "model": {"path": self.model},
            "output": {"path": self.output, "sha256": self.sha256},
            "scheme": "int8",
            "qat": {
                "metric": self.metric,
                "float": round(self.float_accuracy, 2),
                "ptq": {"accuracy": round(self.ptq_accuracy, 2), "size_bytes": self.ptq_bytes},
                "qat": {"accuracy": round(self.qat_accuracy, 2), "size_bytes": self.qat_bytes},
                "training": self.training.to_dict(),
                "full_integer": self.full_integer,
            },
            "seconds": round(self.seconds, 3),
            "warnings": list(self.warnings),
        }

    def summary_lines(self, warnings: bool = True) -> list[str]:
        what = "accuracy" if self.metric == "accuracy" else "top-1 agreement"
        t = self.training
        return [
            f"wrote {self.output}  (QAT int8, {t.epochs} epochs on {t.train_samples} samples"
            + (", rebuilt in tf_keras" if t.rebuilt else "") + ")",
            f"report {self.report_path}",
            "",
            f"  {what:<16} float {self.float_accuracy:5.1f}%   PTQ int8 {self.ptq_accuracy:5.1f}%   "
            f"QAT int8 {self.qat_accuracy:5.1f}%",
            f"  size             PTQ {fmt_bytes(self.ptq_bytes)}   QAT {fmt_bytes(self.qat_bytes)}",
        ] + ([f"warning: {w}" for w in self.warnings] if warnings else [])


def qat_convert(model: str, train: str, calib: str, eval_data: str, output: str,
                options: QatOptions = QatOptions(), data: Any = None,
                progress: Optional[ProgressCallback] = None, report_path: Optional[str] = None) -> QatResult:
    """Quantize ``model`` both ways: post-training int8 and QAT int8; write the QAT model and a report."""
    import hashlib
    import json
    from pathlib import Path

    from edgeq.calibration import DataOptions
    from edgeq.convert import (ConvertOptions, IoTypes, collapse_warning, default_report_path, model_format, prepare,
                               quantize, quiet_tensorflow, score, validate)
    from edgeq.convert.evaluate import score_model
    from edgeq.safeio import atomic_write
    from edgeq.tflite_file import parse_tflite

    t0 = time.perf_counter()
    out_path = Path(output)
    rpath = Path(report_path) if report_path else default_report_path(out_path)
    if model_format(model) == "saved_model":
        raise QatError(f"{model} is a SavedModel: quantization-aware training needs the Keras model "
                       "(.keras or .h5) with its layers")
    # Every evaluation sample (eval_samples None), as in the repair's QAT fix.
    convert_options = ConvertOptions(data=data or DataOptions(), eval_data=eval_data, eval_samples=None)
    outputs = (("output", out_path), ("report", rpath))
    with quiet_tensorflow(), prepare(model, calib, convert_options, outputs=outputs, train_data=train, purpose="qat",
                                     progress=progress) as p:
        recipe = convert_options.resolved_recipe()
        ptq = quantize(p.float_model, p.calibration, recipe, IoTypes(options.input_type, options.output_type),
                       progress)
        ptq_val = validate(ptq, p.float_model, p.eval, None, 0, progress)
        metric, float_acc, ptq_acc = score(ptq_val.fidelity)
        trained = quantization_aware_training(p.loaded.model, p.train, p.calib, options, progress)
        _, _, qat_acc = score_model(p.float_model, trained.content, p.eval, "qat")

    tfl = parse_tflite(trained.content, str(out_path))
    allowed = set(tfl.main.inputs) | set(tfl.main.outputs) if "float32" in (options.input_type,
                                                                           options.output_type) else set()
    floats = [t for t in tfl.main.tensors if t.dtype in ("float32", "float16") and t.index not in allowed]
    if floats:
        raise ConversionError(f"the QAT model still has {len(floats)} float tensors (e.g. {floats[0].name})",
                              "replace the layers TFLite cannot quantize")
    # A collapsed QAT model is not a success: say so, with the way out (the budgeted repair).
    collapsed = collapse_warning(float_acc - qat_acc, "accuracy" if metric == "accuracy"
                                 else "agreement with the float model", options.warn_drop,
                                 "train longer (--epochs, --learning-rate), or let edgeq convert --max-drop "
                                 "PTS choose among its repairs")
    result = QatResult(str(model), str(out_path), str(rpath), metric, float_acc, ptq_acc, qat_acc, ptq.size_bytes,
                       len(trained.content), trained, True, hashlib.sha256(trained.content).hexdigest(),
                       time.perf_counter() - t0, (collapsed,) if collapsed else ())
    atomic_write(out_path, trained.content)
    atomic_write(rpath, (json.dumps(result.to_dict(), indent=2) + "\n").encode())
    return result
