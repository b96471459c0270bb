"""What every attempt of the repair shares (``Work``), and how an attempt is made and measured."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from edgeq.calibration import DataOptions, Dataset
from edgeq.convert import (Calibration, FloatModel, IoTypes, LoadedModel, QuantizedModel, calibrate, export_float,
                           quantize)
from edgeq.convert.evaluate import score_model
from edgeq.convert.interpreter import signature_names
from edgeq.progress import ProgressCallback
from edgeq.recipes import Recipe
from edgeq.repair.result import Attempt


@dataclass
class Work:
    """What every attempt shares: the float model, its calibration, the data, the target, the float score."""

    loaded: LoadedModel
    float_model: FloatModel
    calibration: Calibration
    recipe: Recipe  # the plain int8 recipe (per-channel or per-tensor, as the target wants)
    io: IoTypes
    workdir: str
    eval: Dataset
    train: Optional[Dataset]
    target: Optional[Any]
    data_options: DataOptions
    progress: Optional[ProgressCallback]
    metric: str = ""
    float_accuracy: float = 0.0


def quantized_from(work: Work, content: bytes, name: str) -> Any:
    """A ``QuantizedModel`` for bytes made outside ``convert.quantize`` (scoped litert recipes, QAT)."""
    from edgeq.tflite_file import parse_tflite

    input_type, output_type = work.io.resolve(work.recipe)
    tfl = parse_tflite(content, f"{name} model")
    types = {t.index: t.dtype for t in tfl.main.tensors}
    input_type = types.get(tfl.main.inputs[0], input_type) if tfl.main.inputs else input_type
    output_type = types.get(tfl.main.outputs[0], output_type) if tfl.main.outputs else output_type
    return QuantizedModel(replace(work.recipe, name=name), content, tfl, input_type, output_type, True,
                          signature_names(content))


def measure(work: Work, fix: str, quantized: Any, detail: str, started: float, max_drop: float,
             layers: tuple[str, ...] = (), extra: Optional[dict[str, Any]] = None) -> Attempt:
    _, _, acc = score_model(work.float_model, quantized.content, work.eval, fix)
    drop = work.float_accuracy - acc
    runs, fast, note = target_verdict(work, quantized.content)
    if runs is False:
        status = "does not run on target"
    elif drop <= max_drop + 1e-9:
        status = "meets budget"
    else:
        status = "over budget"
    return Attempt(fix, status, detail, acc, drop, len(quantized.content), runs, fast, note, layers,
                   time.perf_counter() - started, {**(extra or {}), "_content": quantized.content})


def target_verdict(work: Work, content: bytes) -> tuple[Optional[bool], Optional[bool], str]:
    if work.target is None:
        return None, None, ""
    from edgeq.check import CheckOptions, check_model
    from edgeq.tflite_file import read_tflite

    # The check measures RAM by loading the file in the target's runtime (a child process).
    path = Path(work.workdir) / f"candidate-{hashlib.sha256(content).hexdigest()[:12]}.tflite"
    path.write_bytes(content)
    result = check_model(read_tflite(path), work.target, CheckOptions(measure=True, invoke=False))
    slow = [w for w in result.warnings if w.code == "reference-kernel"]
    note = "; ".join(v.message for v in result.violations[:2]) or "; ".join(w.message for w in slow[:2])
    return result.fits, not slow and result.fits, note


def int8_from(work: Work, loaded: Any, calib: Dataset, name: str) -> Any:
    """Export, calibrate and quantize ``loaded`` with the plain int8 recipe (in its own work folder)."""
    folder = os.path.join(work.workdir, name)
    os.makedirs(folder, exist_ok=True)
    float_model = export_float(loaded, folder)
    calibration = calibrate(float_model, calib)
    return quantize(float_model, calibration, work.recipe, work.io)
