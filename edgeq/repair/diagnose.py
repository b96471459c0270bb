"""Which layers lose accuracy under int8, and why: outlier channels, unsettled ranges, large errors.

The diagnosis names the user's own Keras layers (``edgeq.convert.quantizers.layer_of``);
``named_layers`` picks the few the mixed-precision fixes keep in int16 or float.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeq.convert.interpreter import signature_names
from edgeq.convert.quantizers import layer_of
from edgeq.convert.tfenv import first_line
from edgeq.progress import report
from edgeq.repair.result import BAD_LAYER_STEPS, OUTLIER_RATIO, LayerDiagnosis
from edgeq.repair.work import Work


def _channel_ranges(work: Work) -> dict[str, tuple[np.ndarray, np.ndarray, bool, str]]:
    """Per activation tensor of the float model: per-channel (min, max) over the calibration data, and
    whether its overall range still grew in the second half of the samples, and the layer it belongs to."""
    from ai_edge_litert.interpreter import Interpreter
    from edgeq.tflite_file import parse_tflite

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
    keys = signature_names(work.float_model.content)
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
            layer = layer_of(name, work.loaded.layer_names, work.loaded.model_name) or name.split(";")[0]
        out[name] = (lo[t], hi[t], grew, layer)
    return out


def diagnose(work: Work, validation: Any, warns: list[str]) -> tuple[LayerDiagnosis, ...]:
    """Name the layers that lose accuracy: convert's worst layers (quantization debugger), outlier
    channels and unsettled ranges of the float activations."""
    report(work.progress, "repair", "diagnosing layers")
    worst = validation.worst_layers
    ranges: dict[str, Any] = {}
    try:
        ranges = _channel_ranges(work)
    except Exception as exc:  # noqa: BLE001 - a diagnostic, never a failure
        warns.append(f"channel ranges not available ({first_line(exc)[:200]})")

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


def named_layers(diagnosis: tuple[LayerDiagnosis, ...], layer_names: list[str], limit: int) -> tuple[str, ...]:
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
