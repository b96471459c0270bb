"""The repair's fixes, cheapest first: more calibration, equalization, int16 or float layers, QAT.

Each returns an ``Attempt`` (measured, or skipped with the reason); the search
(``edgeq.repair.budget``) stops at the first that meets the budget on the target.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace

from edgeq.calibration import load_dataset
from edgeq.convert.load import loaded_from_keras
from edgeq.convert.quantizers import float_ops, layer_of, litert_quantize_scoped
from edgeq.convert.tfenv import first_line
from edgeq.errors import EdgeqError
from edgeq.progress import report
from edgeq.repair.result import Attempt, LayerDiagnosis, RepairOptions
from edgeq.repair.work import Work, int8_from, measure, quantized_from


_MAX_CALIBRATION = 2000  # samples for the "calibration" fix (bounded: calibration runs the model per sample)


def fix_calibration(work: Work, diagnosis: tuple[LayerDiagnosis, ...], max_drop: float) -> Attempt:
    t = time.perf_counter()
    unsettled = [d.layer for d in diagnosis if d.unsettled]
    have, used = work.calibration.dataset.available, len(work.calibration.dataset)
    if have <= used:
        why = f"all {used} calibration samples are already used"
        if unsettled:
            why += f"; ranges still growing at the end: {', '.join(unsettled[:5])} (give more calibration data)"
        return Attempt("calibration", "skipped", why, layers=tuple(unsettled))
    n = min(have, _MAX_CALIBRATION)
    report(work.progress, "repair", f"calibration: {n} samples")
    calib = load_dataset(work.calibration.dataset.source, work.loaded.inputs,
                         replace(work.data_options, samples=n), role="calibration")
    quantized = int8_from(work, work.loaded, calib, "calibration")
    detail = f"calibrated on {n} of {have} samples (was {used})"
    if unsettled:
        detail += f"; unsettled ranges: {', '.join(unsettled[:5])}"
    return measure(work, "calibration", quantized, detail, t, max_drop, tuple(unsettled), {"samples": n})


def fix_equalize(work: Work, max_drop: float) -> Attempt:
    t = time.perf_counter()
    if work.loaded.loader == "saved_model":
        return Attempt("equalize", "skipped", "needs a Keras model (.keras or .h5); a SavedModel has no layers "
                       "to rescale")
    if work.loaded.stages is not None:  # a PyTorch model (edgeq.torch_convert)
        return Attempt("equalize", "skipped", "needs a Keras model (.keras or .h5); PyTorch models get the "
                       "fixes that apply to the float .tflite (calibration, mixed int16, float fallback)")
    from edgeq.equalize import equalize

    report(work.progress, "repair", "cross-layer equalization")
    try:
        eq = equalize(work.loaded.model)
    except EdgeqError as exc:
        return Attempt("equalize", "skipped", str(exc))
    if not eq.changed:
        why = "no pair of layers can be equalized"
        if eq.skipped:
            why += ": " + "; ".join(f"{s.first}->{s.second}: {s.reason}" for s in eq.skipped[:3])
        return Attempt("equalize", "skipped", why, extra=eq.to_dict())
    quantized = int8_from(work, loaded_from_keras(eq.model, work.loaded.fmt, work.loaded.path),
                           work.calibration.dataset, "equalized")
    top = max(eq.pairs, key=lambda p: p.imbalance_before)
    detail = (f"equalized {len(eq.pairs)} layer pair{'s' if len(eq.pairs) > 1 else ''} "
              f"({', '.join(f'{p.first}->{p.second}' for p in eq.pairs[:4])}); worst imbalance "
              f"{top.imbalance_before:.3g}x -> {top.imbalance_after:.3g}x; still full int8")
    return measure(work, "equalize", quantized, detail, t, max_drop,
                    tuple(dict.fromkeys(x for p in eq.pairs for x in (p.first, p.second))), eq.to_dict())


def _scope_regex(work: Work, layers: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """An anchored regex over the float model's op output names of ``layers``, and the ops it covers."""
    sg = work.float_model.tflite.main
    names, ops = [], []
    for op in sg.operators:
        if not op.outputs:
            continue
        name = sg.tensors[op.outputs[0]].name
        if layer_of(name, work.loaded.layer_names, work.loaded.model_name) in layers:
            names.append(re.escape(name))
            ops.append(op.op)
    # litert-quantizer's op scope is its output tensor names, each followed by ";".
    return ("^(?:" + "|".join(names) + ");?$" if names else ""), tuple(dict.fromkeys(ops))


def _litert_quantize(work: Work, regex: str, mode: str) -> bytes:
    """Static int8 everywhere, and for ops matching ``regex`` int16 activations ("int16") or float ("float")."""
    return litert_quantize_scoped(work.float_model.content, work.calibration.dataset, regex, mode, work.workdir)


def fix_mixed(work: Work, layers: tuple[str, ...], max_drop: float) -> Attempt:
    t = time.perf_counter()
    if not layers:
        return Attempt("mixed-int16", "skipped", "the diagnosis names no layer to keep in int16")
    regex, ops = _scope_regex(work, layers)
    if not regex:
        return Attempt("mixed-int16", "skipped", f"no ops found for layers {', '.join(layers)}")
    target = work.target
    if target is not None:
        if not target.supports_scheme("int16x8"):
            return Attempt("mixed-int16", "skipped", f"{target.name} offers no int16 activations", layers=layers)
        slow = [op for op in ops if not target.is_accelerated(op, "int16")]
        if slow:
            backend = {"xnnpack": "XNNPACK", "cmsis-nn": "CMSIS-NN", "esp-nn": "ESP-NN"}.get(target.backend,
                                                                                            target.backend)
            note = f"{backend} has no int16 kernel for {', '.join(slow)}"
            if target.backend == "xnnpack":
                note = ("XNNPACK does not accelerate int16 activations: LiteRT would run "
                        f"{', '.join(slow)} on its built-in kernels (about 10x slower)")
            return Attempt("mixed-int16", "skipped", note, layers=layers, kernel_note=note)
    report(work.progress, "repair", f"int16 activations for {', '.join(layers)}")
    try:
        quantized = quantized_from(work, _litert_quantize(work, regex, "int16"), "int8+int16")
    except Exception as exc:  # noqa: BLE001 - litert-quantizer raises many kinds
        return Attempt("mixed-int16", "failed", f"litert-quantizer: {first_line(exc)}", layers=layers,
                       seconds=time.perf_counter() - t)
    # litert-quantizer leaves ops it cannot quantize in float without a word: this fix claims integers.
    left = float_ops(quantized.tflite, quantized.input_type, quantized.output_type)
    if left:
        ops_left = ", ".join(dict.fromkeys(op for op, _ in left))
        return Attempt("mixed-int16", "failed", f"litert-quantizer left {ops_left} in float32", layers=layers,
                       seconds=time.perf_counter() - t)
    detail = f"int16 activations for {', '.join(layers)} ({', '.join(ops)}), int8 elsewhere"
    return measure(work, "mixed-int16", quantized, detail, t, max_drop, layers)


def fix_fallback(work: Work, layers: tuple[str, ...], max_drop: float) -> Attempt:
    t = time.perf_counter()
    if not layers:
        return Attempt("float-fallback", "skipped", "the diagnosis names no layer to keep in float")
    target = work.target
    if target is not None and (target.requires_full_integer or target.kind != "linux"):
        return Attempt("float-fallback", "skipped",
                       f"refused: {target.name} runs full-integer models only ({target.runtime}/{target.backend} "
                       "integer kernels); a float layer would not run there", layers=layers)
    regex, ops = _scope_regex(work, layers)
    if not regex:
        return Attempt("float-fallback", "skipped", f"no ops found for layers {', '.join(layers)}")
    report(work.progress, "repair", f"float fallback for {', '.join(layers)}")
    try:
        quantized = quantized_from(work, _litert_quantize(work, regex, "float"), "int8+float")
    except Exception as exc:  # noqa: BLE001
        return Attempt("float-fallback", "failed", f"litert-quantizer: {first_line(exc)}", layers=layers,
                       seconds=time.perf_counter() - t)
    detail = f"{', '.join(layers)} ({', '.join(ops)}) kept in float32, int8 elsewhere"
    return measure(work, "float-fallback", quantized, detail, t, max_drop, layers)


def fix_qat(work: Work, options: RepairOptions, max_drop: float) -> Attempt:
    t = time.perf_counter()
    if work.train is None:
        return Attempt("qat", "skipped", "needs --train DATA (inputs and labels) for quantization-aware training")
    if work.loaded.loader == "saved_model":
        return Attempt("qat", "skipped", "needs a Keras model (.keras or .h5)")
    if work.loaded.stages is not None:  # a PyTorch model: PT2E QAT needs the user's own training loop
        return Attempt("qat", "skipped", "needs a Keras model (.keras or .h5); for a PyTorch model, train with "
                       "PT2E QAT (prepare_qat_pt2e) in your own training loop")
    from edgeq.qat import QatError, QatOptions, quantization_aware_training

    report(work.progress, "repair", "quantization-aware training")
    try:
        input_type, output_type = work.io.resolve(work.recipe)
        q = quantization_aware_training(work.loaded.model, work.train, work.calibration.dataset,
                                        QatOptions(epochs=options.qat_epochs, seed=options.qat_seed,
                                                   input_type=input_type, output_type=output_type),
                                        work.progress)
    except QatError as exc:
        return Attempt("qat", "skipped", str(exc))
    except EdgeqError as exc:
        return Attempt("qat", "failed", str(exc), seconds=time.perf_counter() - t)
    detail = f"{q.epochs} epochs of quantization-aware training on {q.train_samples} samples, full int8"
    return measure(work, "qat", quantized_from(work, q.content, "qat-int8"), detail, t, max_drop, (), q.to_dict())
