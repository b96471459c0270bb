"""When int8 hurts: diagnose the layers that lose accuracy and repair them, cheapest fix first.

``convert_with_budget`` converts a model to full int8 and measures it against
the float model on the evaluation data. If the accuracy (top-1 agreement when
there are no labels) drops by more than ``max_drop`` points it diagnoses the
layers, named by the user's Keras layer names, and tries, in order of cost:

1. ``calibration``: every calibration sample the data has (not only the drawn
   subset); activations whose ranges had not settled are named.
2. ``equalize``: cross-layer equalization (``edgeq.equalize``): the float
   function is unchanged and the model stays fully int8, so it keeps a
   microcontroller on its int8 kernels.
3. ``mixed-int16``: int16 activations only for the diagnosed layers, int8
   elsewhere (litert-quantizer regex scopes), only where the target's backend
   has fast int16 kernels for those ops (CMSIS-NN does; XNNPACK does not).
4. ``float-fallback``: the diagnosed layers stay float (litert-quantizer,
   ``no_quantize`` scopes); Linux targets only, refused on integer-only
   microcontroller targets.
5. ``qat``: quantization-aware training with the user's labelled training data
   (``edgeq.qat``).

It stops at the first fix that meets the budget and runs on the target (the
target check passes), writes that model and a report whose ``repair`` section
lists the baseline, the diagnosis and every attempt. If none does, it raises
``BudgetNotMet`` (exit code 6) naming the best result and how far it is from
the budget, and writes nothing unless ``keep_best``.

TensorFlow is imported only inside functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgeq import __version__
from edgeq.calibration import DataOptions, Dataset, load_dataset
from edgeq.errors import ConversionError, EdgeqError, InputError, OverBudget, UsageError
from edgeq.progress import ProgressCallback, report
from edgeq.safeio import refuse_output_over_input

FIXES = ("calibration", "equalize", "mixed-int16", "float-fallback", "qat")
# A layer whose output channels span ranges this uneven leaves most channels a few int8 steps:
# with a ratio of 16 the median channel gets at most 256 / 16 = 16 levels.
OUTLIER_RATIO = 16.0
# RMS error of a layer's output in units of its quantization step; rounding alone gives about 0.29.
BAD_LAYER_STEPS = 1.0
_MAX_CALIBRATION = 2000  # samples for the "calibration" fix (bounded: calibration runs the model per sample)


@dataclass(frozen=True)
class RepairOptions:
    """The accuracy budget and what the repair may do."""

    max_drop: float  # points (percent) of accuracy, or of top-1 agreement without labels
    train_data: Optional[str] = None  # labelled data for quantization-aware training
    keep_best: bool = False  # write the best model even when no fix meets the budget
    fixes: tuple[str, ...] = FIXES  # which fixes to try, in this order of cost
    max_layers: int = 4  # at most this many diagnosed layers get int16 or float
    qat_epochs: int = 3
    qat_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_drop, (int, float)) or not math.isfinite(self.max_drop):
            raise UsageError(f"--max-drop must be a number of points, got {self.max_drop!r}")
        unknown = [f for f in self.fixes if f not in FIXES]
        if unknown:
            raise UsageError(f"unknown repair fix {', '.join(unknown)}", f"choose from {', '.join(FIXES)}")
        if self.max_layers < 1:
            raise UsageError("max_layers must be at least 1")


@dataclass(frozen=True)
class LayerDiagnosis:
    """Why one layer loses accuracy under int8."""

    layer: str
    ops: tuple[str, ...]
    error_steps: Optional[float]  # RMS error / quantization step of its output (quantization debugger)
    outlier_ratio: Optional[float]  # widest output channel range / median channel range (float model)
    outlier_channels: tuple[int, ...]  # channels wider than OUTLIER_RATIO x the median
    unsettled: bool  # its output range was still growing in the last half of the calibration samples
    findings: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "ops": list(self.ops), "error_steps": self.error_steps,
                "outlier_ratio": self.outlier_ratio, "outlier_channels": list(self.outlier_channels),
                "unsettled_range": self.unsettled, "findings": list(self.findings)}


@dataclass(frozen=True)
class Attempt:
    """One fix tried (or skipped, with the reason)."""

    fix: str
    status: str  # "meets budget" | "over budget" | "does not run on target" | "skipped" | "failed"
    detail: str
    accuracy: Optional[float] = None  # percent
    drop: Optional[float] = None  # points
    size_bytes: Optional[int] = None
    runs_on_target: Optional[bool] = None  # None without a target
    fast_kernels: Optional[bool] = None  # every compute op on the target's fast kernels
    kernel_note: str = ""
    layers: tuple[str, ...] = ()
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tried(self) -> bool:
        return self.accuracy is not None

    def to_dict(self) -> dict[str, Any]:
        return {"fix": self.fix, "status": self.status, "detail": self.detail,
                "accuracy": _r(self.accuracy), "drop": _r(self.drop), "size_bytes": self.size_bytes,
                "runs_on_target": self.runs_on_target, "fast_kernels": self.fast_kernels,
                "kernel_note": self.kernel_note or None, "layers": list(self.layers),
                "seconds": round(self.seconds, 3), **({"details": self.extra} if self.extra else {})}


@dataclass(frozen=True)
class RepairResult:
    """What the repair measured and chose; ``to_dict()`` is the report's ``repair`` section."""

    model: str
    metric: str  # "accuracy" | "agreement"
    float_accuracy: float
    baseline: Attempt
    max_drop: float
    target: Optional[str]
    diagnosis: tuple[LayerDiagnosis, ...]
    range_settling: Optional[dict[str, Any]]
    attempts: tuple[Attempt, ...]
    chosen: Optional[str]  # "baseline" or a fix name; None when no fix met the budget
    best: Attempt
    output: Optional[str]  # the model written (None when nothing was)
    report_path: Optional[str]
    sha256: Optional[str] = None
    seconds: float = 0.0

    @property
    def met(self) -> bool:
        return self.chosen is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "max_drop": self.max_drop,
            "target": self.target,
            "float_accuracy": _r(self.float_accuracy),
            "baseline": self.baseline.to_dict(),
            "baseline_drop": _r(self.baseline.drop),
            "diagnosis": [d.to_dict() for d in self.diagnosis],
            "range_settling": self.range_settling,
            "attempts": [a.to_dict() for a in self.attempts],
            "chosen": self.chosen,
            "met_budget": self.met,
            "best": {"fix": self.best.fix, "accuracy": _r(self.best.accuracy), "drop": _r(self.best.drop),
                     "over_budget_by": _r(max(0.0, (self.best.drop or 0.0) - self.max_drop))},
            "output": self.output,
            "seconds": round(self.seconds, 3),
        }

    def summary_lines(self) -> list[str]:
        """A few lines for the terminal."""
        what = "accuracy" if self.metric == "accuracy" else "top-1 agreement"
        b = self.baseline
        lines = []
        if self.output:
            lines += [f"wrote {self.output}  ({self.best.fix if self.met else 'best, over budget'})",
                      f"report {self.report_path}"]
        int8 = (f"int8 {b.accuracy:.1f}% (drop {b.drop:.1f} points," if b.tried
                else f"full int8 cannot be made ({b.detail.split(': ', 1)[-1]};")
        lines += [f"repair: float {what} {self.float_accuracy:.1f}%, {int8} budget {self.max_drop:g})"
                  + (f", target {self.target}" if self.target else "")]
        bad = [d for d in self.diagnosis if d.findings]
        for d in bad[:3]:
            lines.append(f"  layer {d.layer}: {d.findings[0]}")
        for a in self.attempts:
            if a.tried:
                kern = ""
                if a.fast_kernels is not None:
                    kern = ", fast kernels" if a.fast_kernels else ", NOT on fast kernels"
                lines.append(f"  {a.fix:<15} {a.accuracy:5.1f}%  drop {a.drop:5.1f}  {_kb(a.size_bytes)}{kern}"
                             f"  {a.seconds:.1f} s  {a.status}")
            else:
                lines.append(f"  {a.fix:<15} {a.status}: {a.detail}")
        if self.chosen == "baseline":
            lines.append("  plain int8 is within budget: no repair needed")
        elif self.chosen:
            lines.append(f"  chosen: {self.chosen} ({self.best.detail})")
        else:
            over = (self.best.drop or 0.0) - self.max_drop
            lines.append(f"  no fix met the budget: best {self.best.fix} at {self.best.accuracy:.1f}% "
                         f"({over:.1f} points over)")
        return lines


class BudgetNotMet(OverBudget):
    """No fix met ``--max-drop``; ``result`` holds every attempt (exit code 6)."""

    def __init__(self, message: str, hint: Optional[str], result: RepairResult) -> None:
        super().__init__(message, hint)
        self.result = result


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(float(x), 2)


def _kb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 1024:.1f} KB"


# ---------------------------------------------------------------- the pipeline pieces


@dataclass
class _Work:
    """What every attempt shares: the float model, its calibration, the data, the target, the float score."""

    loaded: Any  # convert.LoadedModel
    float_model: Any  # convert.FloatModel
    calibration: Any  # convert.Calibration
    recipe: Any  # the plain int8 recipe (per-channel or per-tensor, as the target wants)
    io: Any  # convert.IoTypes
    workdir: str
    eval: Dataset
    train: Optional[Dataset]
    target: Optional[Any]
    data_options: DataOptions
    progress: Optional[ProgressCallback]
    metric: str = ""
    float_accuracy: float = 0.0


def _convert_module() -> Any:
    from edgeq import convert

    return convert


def _score(fidelity: Any) -> tuple[str, float, float]:
    """(metric, float value, quantized value) in percent from a validation's fidelity rows."""
    for f in fidelity:
        if f.accuracy_float is not None and f.accuracy_quant is not None:
            return "accuracy", 100 * f.accuracy_float, 100 * f.accuracy_quant
    for f in fidelity:
        if f.top1_agreement is not None:
            return "agreement", 100.0, 100 * f.top1_agreement
    raise UsageError("--max-drop needs a classification output (one score per class) to measure accuracy or "
                     "top-1 agreement", "drop --max-drop for this model")


def _quantized(work: _Work, content: bytes, name: str) -> Any:
    """A ``QuantizedModel`` for bytes made outside ``convert.quantize`` (scoped litert recipes, QAT)."""
    from edgeq.tflite_file import parse_tflite

    conv = _convert_module()
    input_type, output_type = work.io.resolve(work.recipe)
    tfl = parse_tflite(content, f"{name} model")
    types = {t.index: t.dtype for t in tfl.main.tensors}
    input_type = types.get(tfl.main.inputs[0], input_type) if tfl.main.inputs else input_type
    output_type = types.get(tfl.main.outputs[0], output_type) if tfl.main.outputs else output_type
    return conv.QuantizedModel(replace(work.recipe, name=name), content, tfl, input_type, output_type, True,
                               conv._signature_names(content))


def _measure(work: _Work, fix: str, quantized: Any, detail: str, started: float, max_drop: float,
             layers: tuple[str, ...] = (), extra: Optional[dict[str, Any]] = None) -> Attempt:
    conv = _convert_module()
    ref = conv._float_reference(work.float_model, work.eval, None)
    got = conv._run_all(quantized.content, work.eval, None, fix)
    if set(got) != set(ref) and len(got) == len(ref) == 1:
        # A model converted from Keras directly (QAT) names its output after the layer, not "output_0".
        got = {next(iter(ref)): next(iter(got.values()))}
    _, _, acc = _score(conv._fidelity(ref, got, work.eval.labels))
    drop = work.float_accuracy - acc
    runs, fast, note = _target_verdict(work, quantized.content)
    if runs is False:
        status = "does not run on target"
    elif drop <= max_drop + 1e-9:
        status = "meets budget"
    else:
        status = "over budget"
    return Attempt(fix, status, detail, acc, drop, len(quantized.content), runs, fast, note, layers,
                   time.perf_counter() - started, {**(extra or {}), "_content": quantized.content})


def _target_verdict(work: _Work, content: bytes) -> tuple[Optional[bool], Optional[bool], str]:
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


def _int8_from(work: _Work, loaded: Any, calib: Dataset, name: str) -> Any:
    """Export, calibrate and quantize ``loaded`` with the plain int8 recipe (in its own work folder)."""
    conv = _convert_module()
    folder = os.path.join(work.workdir, name)
    os.makedirs(folder, exist_ok=True)
    float_model = conv.export_float(loaded, folder)
    calibration = conv.calibrate(float_model, calib)
    return conv.quantize(float_model, calibration, work.recipe, work.io)


def _loaded_for(work: _Work, model: Any) -> Any:
    """A ``LoadedModel`` for a rewritten Keras model (the equalized copy), named after the user's file."""
    conv = _convert_module()
    tf = conv._tf()
    path = Path(work.loaded.path)
    if type(model).__module__.startswith("tf_keras"):
        return conv._from_tf_keras(tf, model, path)
    import keras

    return conv._from_keras3(tf, keras, model, work.loaded.fmt, path)


# ---------------------------------------------------------------- diagnosis


def _channel_ranges(work: _Work) -> dict[str, tuple[np.ndarray, np.ndarray, bool, str]]:
    """Per activation tensor of the float model: per-channel (min, max) over the calibration data, and
    whether its overall range still grew in the second half of the samples, and the layer it belongs to."""
    from ai_edge_litert.interpreter import Interpreter
    from edgeq.tflite_file import parse_tflite

    conv = _convert_module()
    calib = work.calibration.dataset
    model = parse_tflite(work.float_model.content)
    interp = Interpreter(model_content=work.float_model.content, experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    details = {d["name"].split(":")[0].removeprefix("serving_default_"): d for d in interp.get_input_details()}
    if sorted(details) != sorted(calib.names):
        return {}
    sg = model.main
    watch = {t: sg.tensors[t].name for t in sg.inputs if sg.tensors[t].dtype == "float32"}
    inputs = set(watch)
    outputs = set(sg.outputs)
    keys = conv._signature_names(work.float_model.content)
    watch.update({op.outputs[0]: sg.tensors[op.outputs[0]].name for op in sg.operators
                  if op.outputs and sg.tensors[op.outputs[0]].dtype == "float32"})
    lo: dict[int, np.ndarray] = {}
    hi: dict[int, np.ndarray] = {}
    half: dict[int, float] = {}
    n = len(calib)
    for i in range(n):
        for name, arr in calib.sample(i).items():
            interp.set_tensor(details[name]["index"], arr)
        interp.invoke()
        for t in watch:
            v = interp.get_tensor(t)
            v = v.reshape(-1, v.shape[-1]) if v.ndim > 1 else v.reshape(-1, 1)
            a, b = v.min(axis=0), v.max(axis=0)
            lo[t] = a if t not in lo else np.minimum(lo[t], a)
            hi[t] = b if t not in hi else np.maximum(hi[t], b)
        if i + 1 == max(1, n // 2):
            half = {t: float(hi[t].max() - lo[t].min()) for t in watch}
    out = {}
    for t, name in watch.items():
        full = float(hi[t].max() - lo[t].min())
        grew = full > 0 and half.get(t, full) < 0.95 * full
        if t in inputs:
            layer = "input " + name.split(":")[0].removeprefix("serving_default_")
        elif t in outputs:
            layer = f"output {keys.get(t, name.split(';')[0])}"  # the last op's tensor has no layer scope
        else:
            layer = conv._layer_of(name, work.loaded.layer_names, work.loaded.model_name) or name.split(";")[0]
        out[name] = (lo[t], hi[t], grew, layer)
    return out


def _diagnose(work: _Work, validation: Any, warns: list[str]) -> tuple[LayerDiagnosis, ...]:
    """Name the layers that lose accuracy: convert's worst layers (quantization debugger), outlier
    channels and unsettled ranges of the float activations."""
    conv = _convert_module()
    report(work.progress, "repair", "diagnosing layers")
    worst = validation.worst_layers
    ranges: dict[str, Any] = {}
    try:
        ranges = _channel_ranges(work)
    except Exception as exc:  # noqa: BLE001 - a diagnostic, never a failure
        warns.append(f"channel ranges not available ({conv._first_line(exc)[:200]})")

    layers: dict[str, dict[str, Any]] = {}
    order: list[str] = []

    def entry(name: str) -> dict[str, Any]:
        if name not in layers:
            layers[name] = {"ops": [], "error": None, "ratio": None, "channels": (), "unsettled": False,
                            "findings": []}
            order.append(name)
        return layers[name]

    for w in worst:
        if not w.layer:
            continue
        e = entry(w.layer)
        if w.op and w.op not in e["ops"]:
            e["ops"].append(w.op)
        if e["error"] is None or w.rmse_over_scale > e["error"]:
            e["error"] = float(w.rmse_over_scale)
    for name, (lo, hi, grew, layer) in ranges.items():
        span = hi - lo
        if span.size < 2 or not np.any(span > 0):
            ratio, channels = None, ()
        else:
            median = float(np.median(span))
            ratio = float(span.max() / median) if median > 0 else float("inf")
            channels = tuple(int(c) for c in np.nonzero(span > OUTLIER_RATIO * max(median, 1e-12))[0])
        e = entry(layer)
        if ratio is not None and (e["ratio"] is None or ratio > e["ratio"]):
            e["ratio"], e["channels"] = ratio, channels
            e["span"] = (float(span.max()), float(np.median(span)))
        e["unsettled"] = e["unsettled"] or grew
    result = []
    for name in order:
        e = layers[name]
        findings = []
        if e["ratio"] is not None and e["ratio"] >= OUTLIER_RATIO and e["channels"]:
            wide, median = e["span"]
            step = wide / 255
            what = "feature" if name.startswith("input ") else "output channel"
            findings.append(f"{what}{'s' if len(e['channels']) > 1 else ''} "
                            f"{', '.join(map(str, e['channels'][:4]))} span{'' if len(e['channels']) > 1 else 's'} "
                            f"{wide:.3g} while the median {what.split()[-1]} spans {median:.3g}: one int8 step of "
                            f"{step:.3g} leaves the median {what.split()[-1]} {median / step:.2g} levels")
        if e["error"] is not None and e["error"] > BAD_LAYER_STEPS:
            findings.append(f"output error {e['error']:.1f} quantization steps (rounding alone is about 0.3)")
        if name.startswith("input ") and e["ratio"] is not None and e["ratio"] >= OUTLIER_RATIO and e["channels"]:
            findings.append("the int8 input cannot hold such uneven features: normalise them (--mean/--std, "
                            "per feature) or scale them in the model's first layer")
        if e["unsettled"]:
            findings.append("its range was still growing in the second half of the calibration samples")
        result.append(LayerDiagnosis(name, tuple(e["ops"]), None if e["error"] is None else round(e["error"], 3),
                                     None if e["ratio"] is None else round(e["ratio"], 1), tuple(e["channels"]),
                                     bool(e["unsettled"]), tuple(findings)))
    known = set(work.loaded.layer_names)
    result = [d for d in result if d.findings or d.layer in known]
    # Root causes (outlier channels) first, then the layers whose output error they cause.
    result.sort(key=lambda d: (not d.findings, not d.outlier_channels, -(d.error_steps or 0.0)))
    return tuple(result)


def _named_layers(diagnosis: tuple[LayerDiagnosis, ...], layer_names: list[str], limit: int) -> tuple[str, ...]:
    """The layers to keep in higher precision: outlier layers, the layers they feed, and badly quantized ones."""
    chosen: list[str] = []
    for d in diagnosis:
        if d.layer.startswith(("input ", "output ")):
            continue  # model inputs and outputs keep their int8 type: no layer to scope
        if d.outlier_channels:
            chosen.append(d.layer)
            if d.layer in layer_names:  # its consumer reads the same activation
                i = layer_names.index(d.layer)
                nxt = next((n for n in layer_names[i + 1:] if any(x.layer == n for x in diagnosis)), None)
                if nxt:
                    chosen.append(nxt)
        elif d.error_steps is not None and d.error_steps > BAD_LAYER_STEPS:
            chosen.append(d.layer)
    return tuple(dict.fromkeys(chosen))[:limit]


# ---------------------------------------------------------------- fixes


def _fix_calibration(work: _Work, diagnosis: tuple[LayerDiagnosis, ...], max_drop: float) -> Attempt:
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
    quantized = _int8_from(work, work.loaded, calib, "calibration")
    detail = f"calibrated on {n} of {have} samples (was {used})"
    if unsettled:
        detail += f"; unsettled ranges: {', '.join(unsettled[:5])}"
    return _measure(work, "calibration", quantized, detail, t, max_drop, tuple(unsettled), {"samples": n})


def _fix_equalize(work: _Work, max_drop: float) -> Attempt:
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
    quantized = _int8_from(work, _loaded_for(work, eq.model), work.calibration.dataset, "equalized")
    top = max(eq.pairs, key=lambda p: p.imbalance_before)
    detail = (f"equalized {len(eq.pairs)} layer pair{'s' if len(eq.pairs) > 1 else ''} "
              f"({', '.join(f'{p.first}->{p.second}' for p in eq.pairs[:4])}); worst imbalance "
              f"{top.imbalance_before:.3g}x -> {top.imbalance_after:.3g}x; still full int8")
    return _measure(work, "equalize", quantized, detail, t, max_drop,
                    tuple(dict.fromkeys(x for p in eq.pairs for x in (p.first, p.second))), eq.to_dict())


def _scope_regex(work: _Work, layers: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """An anchored regex over the float model's op output names of ``layers``, and the ops it covers."""

    conv = _convert_module()
    sg = work.float_model.tflite.main
    names, ops = [], []
    for op in sg.operators:
        if not op.outputs:
            continue
        name = sg.tensors[op.outputs[0]].name
        if conv._layer_of(name, work.loaded.layer_names, work.loaded.model_name) in layers:
            names.append(re.escape(name))
            ops.append(op.op)
    # litert-quantizer's op scope is its output tensor names, each followed by ";".
    return ("^(?:" + "|".join(names) + ");?$" if names else ""), tuple(dict.fromkeys(ops))


def _litert_quantize(work: _Work, regex: str, mode: str) -> bytes:
    """Static int8 everywhere, and for ops matching ``regex`` int16 activations ("int16") or float ("float")."""
    from litert_quantizer import qtyping, quantizer, recipe_manager

    float_path = os.path.join(work.workdir, "float.tflite")
    if not os.path.exists(float_path):
        Path(float_path).write_bytes(work.float_model.content)
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
    from ai_edge_litert.interpreter import Interpreter

    signature = Interpreter(model_content=work.float_model.content).get_signature_list()["serving_default"]
    inputs = signature["inputs"]
    samples = []
    calib = work.calibration.dataset
    for i in range(len(calib)):
        s = calib.sample(i)
        samples.append({k: s[k] for k in inputs})
    with _quiet_stdout():
        ranges = q.calibrate({"serving_default": samples})
        result = q.quantize(ranges)
    out = os.path.join(work.workdir, f"litert-{mode}.tflite")
    with _quiet_stdout():
        result.export_model(out, overwrite=True)
    return Path(out).read_bytes()


@contextlib.contextmanager
def _quiet_stdout():
    """litert-quantizer prints progress bars and size tables on stdout/stderr: keep them off the terminal."""
    import io
    import sys

    saved = sys.stdout
    sys.stdout = io.StringIO()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        sys.stdout = saved


def _fix_mixed(work: _Work, layers: tuple[str, ...], max_drop: float) -> Attempt:
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
        quantized = _quantized(work, _litert_quantize(work, regex, "int16"), "int8+int16")
    except Exception as exc:  # noqa: BLE001 - litert-quantizer raises many kinds
        return Attempt("mixed-int16", "failed", f"litert-quantizer: {_first(exc)}", layers=layers,
                       seconds=time.perf_counter() - t)
    # litert-quantizer leaves ops it cannot quantize in float without a word: this fix claims integers.
    left = _convert_module()._float_ops(quantized.tflite, quantized.input_type, quantized.output_type)
    if left:
        ops_left = ", ".join(dict.fromkeys(op for op, _ in left))
        return Attempt("mixed-int16", "failed", f"litert-quantizer left {ops_left} in float32", layers=layers,
                       seconds=time.perf_counter() - t)
    detail = f"int16 activations for {', '.join(layers)} ({', '.join(ops)}), int8 elsewhere"
    return _measure(work, "mixed-int16", quantized, detail, t, max_drop, layers)


def _fix_fallback(work: _Work, layers: tuple[str, ...], max_drop: float) -> Attempt:
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
        quantized = _quantized(work, _litert_quantize(work, regex, "float"), "int8+float")
    except Exception as exc:  # noqa: BLE001
        return Attempt("float-fallback", "failed", f"litert-quantizer: {_first(exc)}", layers=layers,
                       seconds=time.perf_counter() - t)
    detail = f"{', '.join(layers)} ({', '.join(ops)}) kept in float32, int8 elsewhere"
    return _measure(work, "float-fallback", quantized, detail, t, max_drop, layers)


def _fix_qat(work: _Work, options: RepairOptions, max_drop: float) -> Attempt:
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
    return _measure(work, "qat", _quantized(work, q.content, "qat-int8"), detail, t, max_drop, (), q.to_dict())


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# ---------------------------------------------------------------- the entry point


def convert_with_budget(
    model: str | Path,
    calib: str | Path,
    output: str | Path,
    options: Any = None,
    repair: Optional[RepairOptions] = None,
    target: Any = None,
    progress: Optional[ProgressCallback] = None,
) -> RepairResult:
    """Convert ``model`` to full int8 within ``repair.max_drop`` points of the float accuracy, repairing if needed.

    ``options`` is a ``ConvertOptions`` (its ``eval_data`` is required: the
    budget is measured there); ``target`` a target name, path or profile
    (default ``options.target``). Returns the ``RepairResult`` of the model
    written to ``output``; raises ``BudgetNotMet`` (an ``OverBudget``, exit 6)
    when no fix meets the budget, after writing the best model only with
    ``repair.keep_best``.
    """
    conv = _convert_module()
    options = options or conv.ConvertOptions()
    if repair is None:
        raise UsageError("convert_with_budget needs RepairOptions(max_drop=...)")
    if not options.eval_data:
        raise UsageError("--max-drop needs --eval DATA to measure the accuracy drop",
                         "give held-out samples, with labels for accuracy (otherwise top-1 agreement is used)")
    t0 = time.perf_counter()
    if target is not None and not isinstance(target, (str, Path)):
        source = str(getattr(target, "source", "") or "")
        options = replace(options, target=source if source and Path(source).is_file() else target.name)
    elif target is not None:
        options = replace(options, target=str(target))
    recipe, target = conv.resolve_for_target(options)
    if recipe.quantizer != "tflite-converter" or recipe.activations != "int8":
        raise UsageError(f"--max-drop repairs full-int8 models, not recipe '{recipe.name}'",
                         "drop --recipe/--scheme, or drop --max-drop")
    io_types = conv.IoTypes(options.input_type, options.output_type)
    io_types.resolve(recipe)
    model_path, out_path = Path(model), Path(output)
    report_path = Path(options.report_path) if options.report_path else conv.default_report_path(out_path)
    conv.model_format(model_path)
    conv._check_output(out_path, "output")
    conv._check_output(report_path, "report")
    if out_path.resolve() == report_path.resolve():
        raise UsageError("the report path is the model output path", "choose another --report")
    refuse_output_over_input([("output", out_path), ("report", report_path)],
                             [("model", model_path), ("calibration data", conv._data_path(calib)),
                              ("evaluation data", conv._data_path(options.eval_data)),
                              ("training data", conv._data_path(repair.train_data))])

    with conv.quiet_tensorflow(), tempfile.TemporaryDirectory(prefix="edgeq-repair-") as workdir:
        report(progress, "load", str(model_path))
        # A PyTorch model takes the layout of the calibration data, as in convert().
        loaded = conv.load_model(model_path, replace(options.load,
                                                     layout_data=options.load.layout_data or str(calib)))
        calib_data = load_dataset(calib, loaded.inputs, options.data, role="calibration")
        eval_data = load_dataset(options.eval_data, loaded.inputs,
                                 DataOptions(samples=options.eval_samples, seed=options.data.seed,
                                             mean=options.data.mean, std=options.data.std, scale=options.data.scale),
                                 role="evaluation")
        train_data = None
        if repair.train_data and "qat" in repair.fixes:
            train_data = load_dataset(repair.train_data, loaded.inputs,
                                      DataOptions(samples=None, seed=options.data.seed, mean=options.data.mean,
                                                  std=options.data.std, scale=options.data.scale),
                                      role="training")
            if train_data.labels is None:
                raise InputError(f"training data {repair.train_data} has no labels",
                                 "give an .npz with the inputs and 'y' (the labels) for --train")
        float_model = conv.export_float(loaded, workdir, progress)
        calibration = conv.calibrate(float_model, calib_data, progress)
        work = _Work(loaded, float_model, calibration, recipe, io_types, workdir, eval_data, train_data, target,
                     options.data, progress)

        t = time.perf_counter()
        try:
            base_q = conv.quantize(float_model, calibration, recipe, io_types, progress)
        except conv.FloatOpsLeft as exc:
            # Full int8 cannot be made (e.g. an op without an int8 kernel): the fixes that keep those
            # layers out of int8 still can; the ones that keep the model full int8 cannot.
            base_q, base_error = None, exc
        contents: dict[str, bytes] = {}
        validation = None
        if base_q is not None:
            validation = conv.validate(base_q, float_model, eval_data, calibration, 10, progress)
            work.metric, work.float_accuracy, base_acc = _score(validation.fidelity)
            runs, fast, note = _target_verdict(work, base_q.content)
            drop = work.float_accuracy - base_acc
            baseline = Attempt("baseline", "meets budget" if drop <= repair.max_drop + 1e-9 else "over budget",
                               f"full int8 ({recipe.name}), no repair", base_acc, drop, base_q.size_bytes, runs,
                               fast, note, (), time.perf_counter() - t)
            if runs is False:
                baseline = replace(baseline, status="does not run on target")
            contents["baseline"] = base_q.content
        else:
            ref = conv._float_reference(float_model, eval_data, None)
            work.metric, work.float_accuracy, _ = _score(conv._fidelity(ref, ref, eval_data.labels))
            baseline = Attempt("baseline", "failed", f"full int8 ({recipe.name}) cannot be made: {base_error.message}",
                               layers=base_error.layers, seconds=time.perf_counter() - t)
        attempts: list[Attempt] = []
        diagnosis: tuple[LayerDiagnosis, ...] = ()
        warns: list[str] = list(validation.warnings) if validation is not None else []
        chosen: Optional[str] = "baseline" if baseline.status == "meets budget" else None
        if chosen is None:
            if validation is not None:
                diagnosis = _diagnose(work, validation, warns)
                layers = _named_layers(diagnosis, list(loaded.layer_names), repair.max_layers)
            else:
                layers = base_error.layers
            for fix in [f for f in FIXES if f in repair.fixes]:  # cheapest first, whatever order was given
                if validation is None and fix in ("calibration", "equalize", "qat"):
                    attempts.append(Attempt(fix, "skipped", "keeps the model full int8, which cannot be made "
                                            f"(layers {', '.join(layers) or '?'} have ops without int8 kernels)"))
                    continue
                if fix == "calibration":
                    a = _fix_calibration(work, diagnosis, repair.max_drop)
                elif fix == "equalize":
                    a = _fix_equalize(work, repair.max_drop)
                elif fix == "mixed-int16":
                    a = _fix_mixed(work, layers, repair.max_drop)
                elif fix == "float-fallback":
                    a = _fix_fallback(work, layers, repair.max_drop)
                else:
                    a = _fix_qat(work, repair, repair.max_drop)
                if a.tried:
                    contents[a.fix] = a.extra["_content"]
                a = replace(a, extra={k: v for k, v in a.extra.items() if not k.startswith("_")})
                attempts.append(a)
                if a.status == "meets budget":
                    chosen = a.fix
                    break
        tried = [a for a in [baseline, *attempts] if a.tried]
        if not tried:  # full int8 could not be made and no fix made anything else
            why = "; ".join(f"{a.fix}: {a.status} ({a.detail})" for a in attempts if a.status != "skipped")
            raise ConversionError(base_error.message, (base_error.hint or "") + (f"; --max-drop tried {why}"
                                                                                if why else ""))
        runnable = [a for a in tried if a.runs_on_target is not False] or tried
        best = next((a for a in tried if a.fix == chosen), None) or max(runnable, key=lambda a: a.accuracy or 0.0)
        write = chosen is not None or repair.keep_best
        result = RepairResult(str(model_path), work.metric, work.float_accuracy, baseline, float(repair.max_drop),
                              target.name if target is not None else None, diagnosis,
                              validation.ranges if validation is not None else None,
                              tuple(attempts), chosen, best, str(out_path) if write else None,
                              str(report_path) if write else None, seconds=time.perf_counter() - t0)
        if write:
            content = contents[best.fix]
            result = replace(result, sha256=hashlib.sha256(content).hexdigest())
            _write(out_path, report_path, content, result, calib_data, warns)
        if chosen is None:
            over = (best.drop or 0.0) - repair.max_drop
            what = "accuracy" if work.metric == "accuracy" else "top-1 agreement"
            raise BudgetNotMet(
                f"no repair brought the {what} drop within {repair.max_drop:g} points: the best was "
                f"{best.fix} at {best.accuracy:.1f}% ({best.drop:.1f} points below float, {over:.1f} over budget)"
                + (f"; wrote it to {out_path} (--keep-best)" if write else "; no model written"),
                None if write else ("raise --max-drop, give --train DATA for quantization-aware training, or "
                                    "--keep-best to write the best model"),
                result,
            )
        return result


def _write(out_path: Path, report_path: Path, content: bytes, result: RepairResult, calib: Dataset,
           warns: list[str]) -> None:
    from edgeq.safeio import atomic_write
    from edgeq.tflite_file import parse_tflite

    quant = parse_tflite(content, str(out_path))
    doc = {
        "edgeq_version": __version__,
        "model": {"path": result.model},
        "output": {"path": str(out_path), "sha256": result.sha256},
        "scheme": "int8" if result.best.fix != "float-fallback" else "int8 with float layers",
        "calibration": calib.to_dict(),
        "size": {"quantized_bytes": len(content)},
        "ops": quant.op_counts,
        "target": result.target,
        "repair": result.to_dict(),
        "warnings": warns,
    }
    atomic_write(out_path, content)
    atomic_write(report_path, (json.dumps(doc, indent=2, default=str) + "\n").encode())
