"""PyTorch models, stages 3 and 4: calibrate and quantize the float ``.tflite`` with litert-quantizer.

No TensorFlow here. ``edgeq.torch_convert.TorchStages`` calls these in place of
``edgeq.convert``'s TensorFlow stages: static recipes get int8 (or int16) inputs
and outputs, and ops a full-integer recipe left in float are named by their
PyTorch module (``module_of``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Optional, Sequence

from edgeq.calibration import Dataset
from edgeq.convert.interpreter import float_input_names, signature_names
from edgeq.convert.quantizers import float_ops, litert_quantize, litert_recipe
from edgeq.convert.tfenv import first_line, quiet_converters
from edgeq.convert.types import SIGNATURE, Calibration, QuantizedModel
from edgeq.errors import ConversionError, EdgeqError, InputError, RecipeError, UsageError
from edgeq.progress import ProgressCallback, report
from edgeq.recipes import Recipe
from edgeq.tflite_file import parse_tflite


def calibrate(float_model: Any, calib: Dataset, progress: Optional[ProgressCallback] = None) -> Any:
    """Record activation ranges once with litert-quantizer (kept for every static recipe)."""
    t = time.perf_counter()
    names = float_input_names(float_model.content)
    if sorted(names) != sorted(calib.names):
        raise InputError(f"calibration data {calib.source} has inputs {', '.join(calib.names)} but the model "
                         f"takes {', '.join(names)}", "name the arrays after the model's inputs (forward's parameters)")
    report(progress, "calibrate", f"{len(calib)} samples (litert-quantizer)")
    try:
        from litert_quantizer import Quantizer
    except ImportError:
        raise ConversionError("calibrating a PyTorch model needs litert-quantizer",
                              "pip install 'edgeq[convert]'") from None
    from litert_quantizer import calibrator as lq_calibrator
    from litert_quantizer.utils import qsv_utils

    int8 = Recipe("int8", 8, "int8", "per-channel", 0, "litert-quantizer", True, (), ())
    try:
        with quiet_converters():
            q = Quantizer(bytearray(float_model.content), litert_recipe(int8))
            # Global min/max over every sample, as TensorFlow's calibrator records for Keras models.
            # litert-quantizer's default is a moving average, which clips the activations of samples
            # with large values (measured on the digits CNN: 18 dB SQNR against PyTorch, 41 dB here).
            cal = lq_calibrator.Calibrator(bytes(float_model.content), num_threads=1,
                                           qsv_update_func=qsv_utils.min_max_update)
            cal.calibrate({SIGNATURE: [calib.sample(i) for i in range(len(calib))]}, q._recipe_manager)
            qsvs = cal.get_model_qsvs()
    except EdgeqError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ConversionError(f"calibration failed: {first_line(exc, 400)}",
                              "check that the calibration samples fit the model's inputs") from None
    # ``calibrated`` holds TensorFlow's calibrated model for Keras; here the ranges live in ``litert``.
    return Calibration(calib, float_model.content, time.perf_counter() - t, {"qsvs": qsvs})


# The shipped recipes TensorFlow's converter makes, as litert-quantizer makes them for a PyTorch model.
_AS_LITERT = {"int8", "int8-per-tensor", "int16x8", "dynamic-int8", "fp32"}


def quantize(float_model: Any, calibration: Any, recipe: Recipe, io_types: Any,
             progress: Optional[ProgressCallback] = None) -> Any:
    """Apply ``recipe`` with litert-quantizer; static recipes get integer inputs and outputs."""
    if not recipe.executable:
        raise RecipeError(f"recipe '{recipe.name}' is simulated and never written as a .tflite",
                          "use edgeq.convert.simulated.simulate() to measure it")
    if recipe.quantizer == "tflite-converter" and recipe.name not in _AS_LITERT \
            and not (recipe.activations in ("int8", "int16") and recipe.weights_bits == 8):
        raise RecipeError(f"recipe '{recipe.name}' is made by TensorFlow's converter from a SavedModel, which a "
                          "PyTorch model does not have", "choose int8, int16x8, dynamic-int8 or int8-weight-only")
    full_integer = recipe.activations in ("int8", "int16")
    if full_integer and calibration is None:
        raise UsageError(f"recipe '{recipe.name}' has static activations and needs a calibration")
    integer_io = "int16" if recipe.activations == "int16" else "int8"
    wanted = (io_types.input or (integer_io if full_integer else "float32"),
              io_types.output or (integer_io if full_integer else "float32"))
    if full_integer and wanted != (integer_io, integer_io):
        raise UsageError(f"a PyTorch model quantized with {recipe.name} takes and returns {integer_io} "
                         f"(litert-quantizer makes integer inputs and outputs)",
                         f"leave --input-type/--output-type at {integer_io}")
    if not full_integer and wanted != ("float32", "float32"):
        raise UsageError(f"--input-type/--output-type do not go with recipe {recipe.name}",
                         "leave them at float32")
    made = replace(recipe, quantizer="litert-quantizer")
    t = time.perf_counter()
    report(progress, "convert", f"quantizing ({recipe.name}, litert-quantizer)")
    if recipe.activations == "float" and recipe.weights_bits == 32:
        content = float_model.content
    elif recipe.activations == "float" and recipe.weights_bits == 16:
        raise RecipeError("recipe 'fp16' is made by TensorFlow's converter from a SavedModel",
                          "choose int8-weight-only or dynamic-int8 for a PyTorch model")
    else:
        try:
            with quiet_converters():
                content = litert_quantize(float_model.content, made,
                                          calibration.dataset if calibration else None,
                                          calibration.litert if calibration else None)
        except EdgeqError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"litert-quantizer could not make recipe '{recipe.name}': {first_line(exc, 400)}",
                                  "choose another recipe, or run with --debug for the full message") from exc
    quant = parse_tflite(content, f"{recipe.name} model")
    if full_integer:
        floats = float_ops(quant, wanted[0], wanted[1])
        if floats:
            raise no_int_kernel_error(floats, recipe, [n for n, _ in float_model.loaded.stages.module.named_modules() if n])
        io_dtypes = {t.dtype for t in quant.inputs + quant.outputs if t.dtype.startswith("float")}
        if io_dtypes:
            raise ConversionError(f"litert-quantizer left the model's inputs or outputs in {', '.join(io_dtypes)}",
                                  "run with --debug, or choose another recipe")
    warns = []
    static = all(d > 0 for t_ in quant.inputs for d in t_.shape_signature)
    if not static:
        warns.append("the model has dynamic shapes; microcontroller runtimes may not support them")
    return QuantizedModel(made, content, quant, wanted[0], wanted[1], static, signature_names(content),
                          tuple(warns), time.perf_counter() - t)


def no_int_kernel_error(floats: list[tuple[str, str]], recipe: Recipe, module_names: Sequence[str]) -> ConversionError:
    """Name the ops (and PyTorch modules, from litert-torch's tensor names) a full-integer recipe left in float."""
    names = []
    for op, tensor in floats:
        module = module_of(tensor, module_names)
        names.append(f"{op} (module '{module}')" if module else f"{op} (at '{tensor.split(';')[0][:120]}')")
    uniq = list(dict.fromkeys(names))
    return ConversionError(
        f"{', '.join(uniq)} cannot be quantized to {recipe.name}: litert-quantizer left "
        f"{'it' if len(uniq) == 1 else 'them'} in float32 (no integer kernel)",
        "replace that module with ops that have integer kernels, or choose a recipe that keeps it in float")


def module_of(tensor: str, module_names: Sequence[str]) -> Optional[str]:
    """The deepest PyTorch module a litert-torch tensor name points at, or None.

    litert-torch names a tensor after its module stack, ``Root/pkg.Class_attr/pkg.Class_attr;...``
    (several such locations separated by ``;`` for fused ops); ``module_names`` are the
    ``named_modules()`` paths of the exported (wrapped) module.
    """
    known = set(module_names)
    best = None
    for loc in tensor.split(";"):
        path = ""
        for part in loc.split("/")[1:]:
            children = [n for n in known if n.rsplit(".", 1)[0] == path or (not path and "." not in n)]
            match = [c for c in children if part.endswith("_" + c.rsplit(".", 1)[-1])]
            if not match:
                break
            path = max(match, key=len)
        if path and (best is None or path.count(".") > best.count(".")):
            best = path
    if best is None:
        return None
    return best.removeprefix("inner.") if best != "inner" else None
