"""Stage 4, quantize: one recipe applied to the float model, by TensorFlow's converter or litert-quantizer.

``quantize()`` dispatches on ``recipe.quantizer``: TensorFlow's converter
quantizes static recipes from the ranges ``calibrate`` recorded (``mlir_quantize``
for int8, the converter's own quantizer for int16x8) and makes fp16 and
dynamic-range recipes from the SavedModel; litert-quantizer makes what the
converter cannot (int4/int2 weights, blockwise scales, weight-only int8) from the
float ``.tflite``, and the repair's scoped mixed-precision recipes
(``litert_quantize_scoped``). A recipe that claims integer activations but left
ops in float is a ``FloatOpsLeft`` naming the ops and the Keras layers. Simulated
recipes are never made here (``edgeq.convert.simulated``). ``guarded`` runs
TensorFlow's C++ stages (calibrator, quantizer) in a forked child for models
with control flow, where they segfault on some recurrent models.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from edgeq.calibration import Dataset
from edgeq.convert.interpreter import signature_names
from edgeq.convert.tfenv import first_line, frozen_heap, import_tensorflow, quiet_converters, quiet_tensorflow
from edgeq.convert.types import (DYNAMIC_SHAPE_OPS, SIGNATURE, Calibration, FloatModel, IoTypes, QuantizedModel,
                                 scheme_of)
from edgeq.errors import ConversionError, EdgeqError, RecipeError, UsageError
from edgeq.isolate import StageCrashed, run_forked
from edgeq.progress import ProgressCallback, report
from edgeq.recipes import Recipe
from edgeq.recurrent import crash_error
from edgeq.tflite_file import TfliteModel, parse_tflite


def quantize(float_model: FloatModel, calibration: Optional[Calibration], recipe: Recipe,
             io_types: IoTypes = IoTypes(), progress: Optional[ProgressCallback] = None) -> QuantizedModel:
    """Apply ``recipe`` to the float model; static recipes use ``calibration`` (recorded once).

    Raises ``ConversionError`` naming the op and layer when the recipe cannot be
    made (e.g. an op left in float by a full-integer recipe), ``RecipeError``
    for a simulated recipe (see ``edgeq.convert.simulated.simulate``).
    """
    if float_model.loaded.stages is not None:  # a PyTorch model: litert-quantizer, integer I/O
        return float_model.loaded.stages.quantize(float_model, calibration, recipe, io_types, progress)
    if not recipe.executable:
        raise RecipeError(f"recipe '{recipe.name}' is simulated and never written as a .tflite",
                          "use edgeq.convert.simulated.simulate() to measure it")
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
                content = litert_quantize(float_model.content, recipe,
                                          calibration.dataset if calibration else None,
                                          calibration.litert if calibration else None)
        except EdgeqError:
            raise
        except Exception as exc:  # noqa: BLE001 - the quantizers raise many kinds
            if recipe.quantizer == "litert-quantizer":
                raise ConversionError(f"litert-quantizer could not make recipe '{recipe.name}': {first_line(exc)}",
                                      "choose another recipe, or run with --debug for the full message") from exc
            raise converter_error(exc, scheme_of(recipe), loaded.layer_names, loaded.model_name) from exc
    quant = parse_tflite(content, f"{recipe.name} model")
    if recipe.activations in ("int8", "int16"):
        # Every recipe that claims integer activations, whichever quantizer made it: litert-quantizer
        # leaves ops it has no integer kernel for in float without a word.
        floats = float_ops(quant, input_type, output_type)
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
    return QuantizedModel(recipe, content, quant, input_type, output_type, static, signature_names(content),
                          tuple(warns), time.perf_counter() - t)


_INT8_ATTEMPTS = 4


def _tflite_converter(float_model: FloatModel, calibration: Optional[Calibration], recipe: Recipe,
                      input_type: str, output_type: str) -> bytes:
    tf = import_tensorflow()
    from tensorflow.lite.python import convert as tf_convert
    from tensorflow.lite.python import lite as tf_lite

    if recipe.activations == "float" and recipe.weights_bits == 32:
        return float_model.content
    if recipe.activations in ("float", "dynamic-int8"):
        conv = tf.lite.TFLiteConverter.from_saved_model(float_model.saved_model_dir)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if recipe.weights_bits == 16:
            conv.target_spec.supported_types = [tf.float16]
        with frozen_heap():
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
            if not float_ops(parse_tflite(content), input_type, output_type):
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

    return guarded("TensorFlow's quantizer", float_model, int8 if recipe.activations == "int8" else int16)


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
        layer = layer_of(tensor, loaded.layer_names, loaded.model_name)
        names.append(f"{op} (layer '{layer}')" if layer else f"{op} (at '{tensor.split(';')[0]}')")
        if layer:
            layers.append(layer)
    uniq = list(dict.fromkeys(names))
    hint = "replace the layer with ops that have integer kernels"
    scheme = scheme_of(recipe)
    if recipe.activations == "int8" and calibration is not None:
        # Only suggest int16x8 when it really gives a full-integer model.
        try:
            i16 = replace(recipe, name="int16x8", activations="int16", granularity="per-channel")
            content = _tflite_converter(float_model, calibration, i16, "int16", "int16")
            if not float_ops(parse_tflite(content), "int16", "int16"):
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


def float_ops(model: TfliteModel, input_type: str, output_type: str) -> list[tuple[str, str]]:
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


# ---------------------------------------------------------------- TensorFlow's C++ stages, in a child when needed


def forks(float_model: FloatModel) -> bool:
    """Whether TensorFlow's C++ stages run in a forked child for this model: when it has control flow.

    TensorFlow's calibrator segfaults on the WHILE loop of a Keras 3 LSTM/GRU
    (tensorflow#75140); a model with WHILE/IF bodies has more than one subgraph.
    Other models convert in this process: a fork of a process holding TensorFlow
    cost about 0.1 s on a busy 2-core host, a quarter of converting a small CNN
    (benchmarks/bench_convert.py: 1.26x with a fork for every model, 1.07x without).
    """
    return len(float_model.tflite.subgraphs) > 1


def guarded(stage: str, float_model: FloatModel, make: Callable[[], bytes]) -> bytes:
    """``make()`` in a forked child when :func:`forks` says so; a crash there is one ``ConversionError``."""
    if not forks(float_model):
        return make()
    try:
        return run_forked(stage, make)
    except StageCrashed as crash:
        raise crash_error(crash, float_model) from None


# ---------------------------------------------------------------- which layer, which op


_TF_OP = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")
_SELECT_OPS = re.compile(r"TF Select ops: ([\w, ]+)")
_UNSUPPORTED = re.compile(r"not yet supported for op: '(\w+)'")
_LOC = re.compile(r'fused\["(\w+):", "([^"@]+)')


def layer_of(tensor_name: str, layer_names: Sequence[str], model_name: str = "") -> Optional[str]:
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


def converter_error(exc: Exception, scheme: str, layer_names: Sequence[str], model_name: str) -> ConversionError:
    text = str(exc)
    ops = sorted(set(_TF_OP.findall(text)))
    m = _SELECT_OPS.search(text)
    if m:
        ops = sorted(set(ops) | {o.strip() for o in m.group(1).split(",") if o.strip()})
    if ops:
        layers = []
        for op, where in _LOC.findall(text):
            layer = layer_of(where, layer_names, model_name)
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
    first = next((ln.strip() for ln in text.splitlines() if "error" in ln.lower()), first_line(exc))
    hint = "try --scheme int16x8" if scheme == "int8" else "try --scheme int8"
    return ConversionError(f"TensorFlow could not quantize the model: {first[:400]}",
                           f"{hint}, or run with --debug for the converter's full message")


# ---------------------------------------------------------------- litert-quantizer


def litert_recipe(recipe: Recipe) -> Any:
    """litert-quantizer's recipe for ``recipe``: one config for every op it supports."""
    from litert_quantizer import qtyping, recipe_manager

    op = qtyping.TFLOperationName.ALL_SUPPORTED
    if recipe.granularity == "blockwise":
        granularity = qtyping.QuantGranularity(f"BLOCKWISE_{recipe.block_size}")
    elif recipe.granularity == "per-tensor":
        granularity = qtyping.QuantGranularity.TENSORWISE
    else:
        granularity = qtyping.QuantGranularity.CHANNELWISE
    rm = recipe_manager.RecipeManager()
    if recipe.activations == "float":
        rm.add_weight_only_config(".*", op, recipe.weights_bits, granularity)
    elif recipe.activations == "dynamic-int8":
        rm.add_dynamic_config(".*", op, recipe.weights_bits, granularity)
    else:
        rm.add_static_config(".*", op, 16 if recipe.activations == "int16" else 8, recipe.weights_bits, granularity)
    return rm.get_quantization_recipe()


def litert_quantize(float_content: bytes, recipe: Recipe, calib: Optional[Dataset] = None,
                    cache: Optional[dict[str, Any]] = None) -> bytes:
    """Apply ``recipe`` with litert-quantizer to a float ``.tflite`` (with a ``serving_default`` signature).

    Static recipes calibrate with litert-quantizer's own calibrator on
    ``calib``; the recorded ranges are kept in ``cache`` (a ``Calibration``'s)
    and reused by every later static recipe.
    """
    try:
        from litert_quantizer import Quantizer
    except ImportError:
        raise ConversionError(f"recipe '{recipe.name}' needs litert-quantizer",
                              "pip install 'edgeq[convert]' (litert-quantizer)") from None
    q = Quantizer(bytearray(float_content), litert_recipe(recipe))
    qsvs = None
    if q.need_calibration:
        if calib is None:
            raise ConversionError(f"recipe '{recipe.name}' has static activations and needs calibration data")
        if cache is not None and "qsvs" in cache:
            qsvs = cache["qsvs"]
        else:
            samples = [calib.sample(i) for i in range(len(calib))]
            with quiet_converters():
                qsvs = q.calibrate({SIGNATURE: samples}, num_threads=1)
            if cache is not None:
                cache["qsvs"] = qsvs
    with quiet_converters():
        result = q.quantize(qsvs, enable_progress_report=False)
    if result.quantized_model is None:
        raise ConversionError(f"litert-quantizer made no model for recipe '{recipe.name}'")
    return bytes(result.quantized_model)


def litert_quantize_scoped(float_content: bytes, calib: Dataset, regex: str, mode: str, workdir: str | Path) -> bytes:
    """Static int8 everywhere, and for ops whose output names match ``regex`` int16 activations
    (``mode`` "int16") or float (``mode`` "float"): the scoped recipes of the repair's mixed-precision fixes.

    litert-quantizer's op scope is its output tensor names (``edgeq.repair`` builds the regex from the
    diagnosed layers); ``workdir`` holds the float and quantized files it reads and writes.
    """
    from ai_edge_litert.interpreter import Interpreter
    from litert_quantizer import qtyping, quantizer, recipe_manager

    float_path = os.path.join(str(workdir), "float.tflite")
    if not os.path.exists(float_path):
        Path(float_path).write_bytes(float_content)
    manager = recipe_manager.RecipeManager()
    manager.add_static_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                              activation_num_bits=8, weight_num_bits=8)
    if mode == "int16":
        manager.add_static_config(regex=regex, operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                  activation_num_bits=16, weight_num_bits=8)
    else:
        manager.add_quantization_config(regex=regex, operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                        algorithm_key="no_quantize")
    q = quantizer.Quantizer(float_path)
    q.load_quantization_recipe(manager.get_quantization_recipe())
    inputs = Interpreter(model_content=float_content).get_signature_list()[SIGNATURE]["inputs"]
    samples = []
    for i in range(len(calib)):
        s = calib.sample(i)
        samples.append({k: s[k] for k in inputs})
    with quiet_converters():
        ranges = q.calibrate({SIGNATURE: samples})
        result = q.quantize(ranges)
    out = os.path.join(str(workdir), f"litert-{mode}.tflite")
    with quiet_converters():
        result.export_model(out, overwrite=True)
    return Path(out).read_bytes()
