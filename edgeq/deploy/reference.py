"""The host side of a measured run: the device's outputs judged per output (``edgeq.fidelity``) and compared
with the host's own LiteRT run of the same model on the same eval data (computed once per model and eval set)."""

from __future__ import annotations

import math
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from edgeq.device import DeviceClient, decode_encoded
from edgeq.errors import DeviceError
from edgeq.escape import one_line
from edgeq.deploy.options import MAX_OUTPUT_VALUES
from edgeq.transport import LocalTransport


# The host's runtime for reference outputs (a dependency of edgeq).
HOST_RUNTIME = "ai_edge_litert"


def _eval_outputs(ev: dict[str, Any], where: str) -> dict[str, Any]:
    """``{output name: values}`` (first axis = samples) from a runner's eval document."""
    out = {}
    for item in ev.get("per_output") or []:
        out[str(item["name"])] = decode_encoded(item["outputs"], f"{where} ({one_line(item['name'], 80)})")
    if not out and ev.get("outputs"):  # a runner from before per-output results
        out["output_0"] = decode_encoded(ev["outputs"], where)
    return out


def _finite(v: Optional[float]) -> Optional[float]:
    return v if v is None or math.isfinite(v) else None


def output_figures(device_eval: dict[str, Any], host_doc: Optional[dict[str, Any]], labels: Any,
              output_labels: dict[str, Any], run_outputs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per output: its kind (``edgeq.fidelity``: classifier, segmentation, binary, regression), the device's
    figures against the labels, and how far the device is from the host reference (when there is one)."""
    from edgeq import fidelity

    dev = _eval_outputs(device_eval, "the device outputs")
    ref = _eval_outputs((host_doc or {}).get("eval") or {}, "the host outputs") if host_doc else {}
    scales = {str(o.get("name")): float(o["quantization"][0]) for o in run_outputs}
    tensors = {str(i["name"]): str(i.get("tensor")) for i in device_eval.get("per_output") or []}
    rows = {name: len(v) for name, v in dev.items()}
    sliced = {k: v[:rows[k]] for k, v in output_labels.items() if k in rows and getattr(v, "ndim", 0)}
    n = min(rows.values()) if rows else 0
    assigned = fidelity.assign_labels({k: v.shape for k, v in dev.items()},
                                      labels[:n] if labels is not None and labels.ndim else None, sliced,
                                      {k: ref.get(k, v) for k, v in dev.items()})
    figures = []
    for name, d in dev.items():
        h = ref.get(name)
        if h is not None and h.shape != d.shape:
            h = None
        source, y = assigned.get(name, (None, None))
        kind = fidelity.output_kind(d.shape, y, h if h is not None else d)
        entry: dict[str, Any] = {"name": name, "kind": kind, "shape": [int(s) for s in d.shape[1:]],
                                 "samples": int(len(d)), "labels": source}
        if h is not None:
            c = fidelity.compare(h.astype("float64"), d.astype("float64"), y, kind)
            scale = scales.get(tensors.get(name, ""), 0.0)
            entry.update(accuracy=c.accuracy_candidate, label_mae=c.label_mae_candidate,
                         host_accuracy=c.accuracy_reference, host_label_mae=c.label_mae_reference,
                         agreement=c.agreement, max_abs_diff=_finite(c.max_abs_error),
                         mean_abs_diff=_finite(c.mean_abs_error), sqnr_db=_finite(c.sqnr_db),
                         max_abs_diff_steps=round(c.max_abs_error / scale, 3) if scale and
                         math.isfinite(c.max_abs_error) else None)
        else:
            c = fidelity.compare(d.astype("float64"), d.astype("float64"), y, kind)
            entry.update(accuracy=c.accuracy_candidate, label_mae=c.label_mae_candidate)
        figures.append(entry)
    return figures


def agreement_of(figures: list[dict[str, Any]], host_doc: dict[str, Any]) -> dict[str, Any]:
    """The device against the host reference, for the primary output (the first with class labels, else the
    first); every output's figures are in ``eval.outputs``."""
    base = {"reference_runtime": (host_doc.get("runtime") or {}).get("name"),
            "reference_version": (host_doc.get("runtime") or {}).get("version")}
    compared = [f for f in figures if "max_abs_diff" in f]
    if not compared:
        return {**base, "top1": None, "max_abs_diff": None, "mean_abs_diff": None, "samples": 0,
                "error": "device and host outputs differ in shape"}
    main = next((f for f in compared if f.get("accuracy") is not None), compared[0])
    if main.get("max_abs_diff") is None:
        return {**base, "top1": None, "max_abs_diff": None, "mean_abs_diff": None, "samples": main["samples"],
                "error": "the outputs hold non-finite values"}
    return {**base, "output": main["name"], "host_accuracy": main.get("host_accuracy"),
            "host_mae": main.get("host_label_mae"),
            "top1": main.get("agreement") if main["kind"] != "segmentation" else None,
            "pixel_agreement": main.get("agreement") if main["kind"] == "segmentation" else None,
            "max_abs_diff": main["max_abs_diff"], "mean_abs_diff": main.get("mean_abs_diff"),
            "max_abs_diff_steps": main.get("max_abs_diff_steps"), "sqnr_db": main.get("sqnr_db"),
            "samples": main["samples"]}


def host_reference(model_path: Path, eval_path: Path, timeout: float = 600.0) -> dict[str, Any]:
    """Run the model on the host's LiteRT in a child process (a crash there is a result, not ours)."""
    dev = DeviceClient(LocalTransport(), sys.executable)
    args = ["--model", str(model_path), "--eval", str(eval_path), "--eval-only", "--runtime", HOST_RUNTIME,
            "--max-outputs", str(MAX_OUTPUT_VALUES)]
    return dev.run(args, timeout, f"{model_path.name} (host reference)", max_samples=0)


class _Reference:
    """One host reference computation; every waiter shares its result or its failure."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Optional[dict[str, Any]] = None
        self.error: Optional[DeviceError] = None
        self.created = time.monotonic()


_REFERENCES: dict[tuple[str, str], _Reference] = {}


_REFERENCES_LOCK = threading.Lock()


_FAILURE_TTL_S = 300.0


def cached_reference(model: Path, model_sha: str, eval_path: Path, eval_sha: str, timeout: float) -> dict[str, Any]:
    """A fleet deploys one model with one eval set to many hosts: compute the host reference once.

    The first caller computes it (bounded by ``timeout``) while the others wait,
    each at most its own ``timeout``; a failure is cached like a result, so a
    reference that hangs or crashes costs one timeout, not one per host.
    """
    key = (model_sha, eval_sha)
    with _REFERENCES_LOCK:
        entry = _REFERENCES.get(key)
        # A failure is shared by the deploys running now (one fleet), not by every later deploy of this process.
        if entry is not None and entry.done.is_set() and entry.error is not None \
                and time.monotonic() - entry.created > _FAILURE_TTL_S:
            entry = None
        owner = entry is None
        if owner:
            entry = _REFERENCES[key] = _Reference()
            while len(_REFERENCES) > 16:
                _REFERENCES.pop(next(iter(_REFERENCES)))
    if owner:
        try:
            entry.value = host_reference(model, eval_path, timeout)
        except DeviceError as exc:
            entry.error = exc
        except Exception as exc:  # a bug here must not hang the waiters
            entry.error = DeviceError(f"the host reference failed: {exc!r}")
        finally:
            entry.done.set()
    elif not entry.done.wait(timeout):
        raise DeviceError(f"the host reference for {model.name} took longer than {timeout:g} s")
    if entry.error is not None or entry.value is None:
        raise entry.error or DeviceError(f"the host reference for {model.name} gave no result")
    return entry.value
