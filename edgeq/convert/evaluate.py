"""Stage 5, evaluate: the quantized model against the float model on held-out data.

``validate`` runs both with the LiteRT interpreter (``edgeq.convert.interpreter``),
compares each output by its kind (accuracy, top-1 agreement, SQNR, errors:
``edgeq.fidelity``), ranks the layers by quantization error (TensorFlow's
quantization debugger) and says how the calibration ranges settled. ``score``
is the one number the repair and QAT judge a model by.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from edgeq.calibration import Dataset
from edgeq.convert.interpreter import run_all
from edgeq.convert.quantizers import layer_of
from edgeq.convert.tfenv import first_line, frozen_heap, import_tensorflow, quiet_tensorflow
from edgeq.convert.types import (SIGNATURE, Calibration, FloatModel, LayerError, LoadedModel, OutputFidelity,
                                 QuantizedModel, Validation, io_of)
from edgeq.errors import UsageError
from edgeq.progress import ProgressCallback, report
from edgeq.recipes import Recipe
from edgeq.tflite_file import TfliteModel, parse_tflite


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
    ref = float_reference(float_model, eval_data, progress)
    got = run_all(quantized.content, eval_data, progress, quantized.recipe.name)
    fidelity = compare_outputs(ref, got, eval_data.labels, dict(eval_data.output_labels))
    ranges = None
    if calibration is not None:
        try:
            ranges = _range_settling(float_model.content, calibration.dataset)
        except Exception as exc:  # noqa: BLE001 - a diagnostic, never a failure
            warns.append(f"calibration range settling not available ({first_line(exc)[:200]})")
    worst: tuple[LayerError, ...] = ()
    recipe = quantized.recipe
    if worst_layers > 0 and calibration is not None and recipe.quantizer == "tflite-converter" \
            and recipe.activations == "int8":
        report(progress, "evaluate", "per-layer quantization error")
        try:
            with quiet_tensorflow(), frozen_heap():
                worst = _worst_layers(calibration, recipe, eval_data, worst_layers, quantized.tflite,
                                      float_model.loaded, quantized.keys)
        except Exception as exc:  # noqa: BLE001 - the debugger is best effort
            warns.append(f"per-layer error not available ({first_line(exc)[:200]})")
    return Validation(fidelity, eval_data.to_dict(), worst, ranges, tuple(warns), time.perf_counter() - t)


def float_reference(float_model: FloatModel, data: Dataset,
                    progress: Optional[ProgressCallback] = None) -> dict[str, np.ndarray]:
    """The float model's outputs on ``data``, computed once per (float model, dataset)."""
    cache = _REFERENCES.setdefault(id(float_model), {})
    key = (id(data), len(data))
    if key not in cache:
        stages = float_model.loaded.stages
        # A PyTorch model is judged against PyTorch's own outputs, not the float .tflite's.
        cache[key] = stages.reference(data) if stages is not None else run_all(float_model.content, data,
                                                                               progress, "float")
    return cache[key]


# Float outputs per FloatModel (by id; a FloatModel is frozen and its content never changes). Small:
# one entry per evaluation set; dropped when the process ends or with forget_reference().
_REFERENCES: dict[int, dict[tuple[int, int], dict[str, np.ndarray]]] = {}


def forget_reference(float_model: FloatModel) -> None:
    """Drop the cached float outputs of ``float_model``."""
    _REFERENCES.pop(id(float_model), None)


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], labels: Optional[np.ndarray],
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
    tf = import_tensorflow()
    from tensorflow.lite.python import convert as tf_convert

    layer_names, model_name = loaded.layer_names, loaded.model_name
    n = min(len(data), 100)  # enough to rank layers; the full set is used for fidelity
    # The debugger feeds positional lists in the model's input order, not signature dicts.
    order = [io_.name for io_ in io_of(quant)[0]]
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
            layer=layer_of(name, layer_names, model_name),
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
    names = {d["name"].split(":")[0].removeprefix(SIGNATURE + "_"): d for d in interp.get_input_details()}
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


# ---------------------------------------------------------------- the score the repair and QAT share


def score(fidelity: Sequence[OutputFidelity]) -> tuple[str, float, float]:
    """(metric, float value, quantized value) in percent from a validation's fidelity rows.

    Accuracy on the first output with labels, else top-1 agreement with the
    float model (float is 100 %); ``UsageError`` for a model with neither.
    """
    for f in fidelity:
        if f.accuracy_float is not None and f.accuracy_quant is not None:
            return "accuracy", 100 * f.accuracy_float, 100 * f.accuracy_quant
    for f in fidelity:
        if f.top1_agreement is not None:
            return "agreement", 100.0, 100 * f.top1_agreement
    raise UsageError("--max-drop needs a classification output (one score per class) to measure accuracy or "
                     "top-1 agreement", "drop --max-drop for this model")


def score_model(float_model: FloatModel, content: bytes, data: Dataset, label: str) -> tuple[str, float, float]:
    """``score`` of a ``.tflite`` made outside ``quantize()`` (QAT, a repair's fix) against the float model."""
    ref = float_reference(float_model, data)
    got = run_all(content, data, None, label)
    if set(got) != set(ref) and len(got) == len(ref) == 1:
        # A model converted from Keras directly (QAT) names its output after the layer, not "output_0".
        got = {next(iter(ref)): next(iter(got.values()))}
    return score(compare_outputs(ref, got, data.labels))
