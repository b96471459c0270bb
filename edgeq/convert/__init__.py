"""Convert a float model to a quantized TFLite model, as stages, and report what quantization did.

The only package of edgeq that imports TensorFlow, and only inside functions, so
``edgeq --help``, ``check`` and ``deploy`` never pay for it.

The pipeline, one function per stage, each returning a frozen result (``types.py``)::

    loaded     = load_model(path, LoadOptions())              # Keras 3, SavedModel, legacy .h5 (safely)
    float_m    = export_float(loaded, workdir)                # batch-1 SavedModel + float .tflite, once
    calibrated = calibrate(float_m, calib_dataset)            # activation ranges, once
    quantized  = quantize(float_m, calibrated, recipe, IoTypes())   # any recipe, reusing the ranges
    validation = validate(quantized, float_m, eval_dataset)   # accuracy, agreement, SQNR, worst layers
    result     = write(quantized, report_for(...))            # model + report, atomically

``prepare()`` runs the first three once (after checking every path, and with
the datasets loaded) for ``convert()``, the repair, QAT and the sweep::

    with prepare(model, calib, ConvertOptions(eval_data=...)) as p:
        quantized = quantize(p.float_model, p.calibration, recipe)

Where each stage lives (a module is named after what it holds, not after the
function the package re-exports, so ``edgeq.convert.quantize`` is the function):

===================  ======================================================================================
``types.py``         options (``ConvertOptions``, ``LoadOptions``, ``IoTypes``) and the frozen results
``tfenv.py``         TensorFlow, quietly: ``import_tensorflow``, ``quiet_tensorflow``
``untrusted.py``     refusing code and zip bombs in a model file before any loader opens it
``load.py``          ``load_model`` (Keras, .h5, SavedModel; PyTorch via ``edgeq.torch_convert``),
                     ``export_float`` (the float model) and ``calibrate`` (its activation ranges), once
``quantizers.py``    ``quantize``: TensorFlow's converter and litert-quantizer, the repair's scoped recipes
``simulated.py``     ``simulate``: levels no runtime executes, measured, never written
``interpreter.py``   running a ``.tflite`` with LiteRT on a dataset
``evaluate.py``      ``validate``: fidelity, worst layers, range settling; ``score`` for repair and QAT
``output.py``        ``report_for``, ``write``: the ``.tflite`` and its report (schema ``edgeq.convert/1``)
``pipeline.py``      ``prepare`` (shared by convert, repair, qat, sweep) and ``convert``
===================  ======================================================================================

Static recipes made by TensorFlow's converter are quantized from the recorded
ranges with ``mlir_quantize`` (int8) or the converter's own int16 quantizer,
giving the same tensors as ``TFLiteConverter.convert()`` with a representative
dataset. Nothing is written unless everything succeeded.
"""

from edgeq.convert.evaluate import forget_reference, score, validate
from edgeq.convert.load import calibrate, export_float, load_model, model_format
from edgeq.convert.output import default_report_path, report_for, with_check, write, write_report
from edgeq.convert.pipeline import Prepared, convert, prepare, resolve_for_target
from edgeq.convert.quantizers import FloatOpsLeft, quantize
from edgeq.convert.simulated import SimulatedResult, simulate
from edgeq.convert.tfenv import quiet_tensorflow
from edgeq.convert.types import (DEFAULT_WARN_DROP, IO_TYPES, SCHEMA, SCHEMES, Calibration, ConvertOptions,
                                 ConvertResult, FloatModel, IoQuant, IoTypes, LayerError, LoadedModel, LoadOptions,
                                 OutputFidelity, QuantizedModel, Validation, collapse_warning)

__all__ = [
    "DEFAULT_WARN_DROP", "IO_TYPES", "SCHEMA", "SCHEMES", "Calibration", "ConvertOptions", "ConvertResult",
    "FloatModel", "FloatOpsLeft", "IoQuant", "IoTypes", "LayerError", "LoadOptions", "LoadedModel",
    "OutputFidelity", "Prepared", "QuantizedModel", "SimulatedResult", "Validation", "calibrate",
    "collapse_warning", "convert", "default_report_path", "export_float", "forget_reference", "load_model",
    "model_format", "prepare", "quantize", "quiet_tensorflow", "report_for", "resolve_for_target", "score",
    "simulate", "validate", "with_check", "write", "write_report",
]
