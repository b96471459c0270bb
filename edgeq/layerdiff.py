"""Where the device differs: every intermediate tensor on the device against the host's LiteRT, layer by layer.

The runner's ``layers`` mode runs N eval inputs with every intermediate tensor
kept (on the runtime's own kernels: a delegate fuses intermediates away) and
sends them back, bounded in bytes. The host runs the same runner with its
LiteRT in a child process (a crash there is a result, as for the host
reference). Tensors are compared in execution order; the first whose values
differ by more than one quantization step (for float tensors: by more than
``float_tolerance`` of the host's range) is named with its op and the user's
layer name, which is the thing to look at: every later tensor inherits its
difference.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from edgeq.device import DeviceClient, decode_encoded
from edgeq.errors import DeviceProtocolError
from edgeq.transport import LocalTransport

HOST_RUNTIME = "ai_edge_litert"
MAX_LAYER_BYTES = 512 * 1024  # what the runner may send back: well inside what the transport keeps
FLOAT_TOLERANCE = 1e-3

_SCOPE = re.compile(r"^[^/;:]+/([^/;:]+)/")


@dataclass(frozen=True)
class TensorDiff:
    """One intermediate tensor compared: in quantization steps when quantized, else in float units."""

    index: int
    name: str
    layer: Optional[str]
    op: Optional[str]
    dtype: str
    shape: tuple[int, ...]
    scale: float
    max_abs_diff: float
    max_steps: Optional[float]
    differs: bool

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "layer": self.layer, "op": self.op, "dtype": self.dtype,
                "shape": list(self.shape), "scale": self.scale, "max_abs_diff": self.max_abs_diff,
                "max_steps": self.max_steps, "differs": self.differs}


@dataclass(frozen=True)
class LayerDiff:
    """Every compared tensor in execution order, and the first that differs (None: the device agrees)."""

    samples: int
    tensors: tuple[TensorDiff, ...]
    first_divergence: Optional[TensorDiff]
    device_runtime: dict[str, Any]
    host_runtime: dict[str, Any]
    skipped: int = 0  # tensors only one side reported

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "compared": len(self.tensors), "skipped": self.skipped,
                "first_divergence": self.first_divergence.to_dict() if self.first_divergence else None,
                "device_runtime": dict(self.device_runtime), "host_runtime": dict(self.host_runtime),
                "tensors": [t.to_dict() for t in self.tensors]}

    def summary_lines(self) -> list[str]:
        return layer_diff_lines(self.to_dict())


def layer_diff_lines(doc: dict[str, Any]) -> list[str]:
    """The terminal lines for a ``LayerDiff.to_dict()`` (as kept in report.json)."""
    head = (f"layer diff: {doc.get('compared')} tensors over {doc.get('samples')} inputs, device "
            f"{(doc.get('device_runtime') or {}).get('name')} {(doc.get('device_runtime') or {}).get('version')} "
            f"vs host {(doc.get('host_runtime') or {}).get('name')} {(doc.get('host_runtime') or {}).get('version')}")
    f = doc.get("first_divergence")
    if not f:
        return [head, "  no tensor differs by more than one quantization step"]
    amount = f"{f['max_steps']:g} quantization steps" if f.get("max_steps") is not None \
        else f"{f.get('max_abs_diff'):.4g}"
    return [head, f"  first divergence: tensor {f['index']} {str(f['name'])[:200]!r} (layer {f.get('layer') or '?'}, "
                  f"op {f.get('op') or '?'}) differs by {amount}"]


def layer_name(tensor_name: str) -> Optional[str]:
    """The user's layer in a converter tensor name: ``model/dense_1/MatMul;...`` -> ``dense_1``."""
    m = _SCOPE.match(tensor_name.split(";")[0])
    return m.group(1) if m else None


def layers_args(model: str, eval_path: str, count: int, runtime: Optional[str] = None) -> list[str]:
    args = ["--model", model, "--eval", eval_path, "--count", str(int(count)), "--max-bytes", str(MAX_LAYER_BYTES)]
    if runtime:
        args += ["--runtime", runtime]
    return args


def host_layers(model_path: Path, eval_path: Path, count: int, timeout: float = 600.0) -> dict[str, Any]:
    """The host's LiteRT run of the same model with every intermediate kept, in a child process."""
    dev = DeviceClient(LocalTransport(), sys.executable)
    return dev.layers(layers_args(str(model_path), str(eval_path), count, HOST_RUNTIME), timeout,
                      f"{model_path.name} (host layers)")


def op_outputs(host_doc: dict[str, Any]) -> list[int]:
    """The tensors the ops write, in execution order: what is worth fetching from the device."""
    seen: list[int] = []
    for op in host_doc.get("ops") or []:
        for t in op.get("outputs") or []:
            if isinstance(t, int) and t not in seen:
                seen.append(t)
    return seen


def _arrays(doc: dict[str, Any], side: str) -> dict[int, tuple[dict[str, Any], Any]]:
    out = {}
    for t in doc["tensors"]:
        out[int(t["index"])] = (t, decode_encoded(t, f"{side} tensor {t['index']}"))
    return out


def compare(device_doc: dict[str, Any], host_doc: dict[str, Any],
            float_tolerance: float = FLOAT_TOLERANCE) -> LayerDiff:
    """Compare two validated ``layers`` documents tensor by tensor, in the host's execution order."""
    import numpy as np

    dev = _arrays(device_doc, "device")
    ref = _arrays(host_doc, "host")
    op_of: dict[int, str] = {}
    order: list[int] = []
    for op in host_doc.get("ops") or []:
        if not isinstance(op, dict) or not isinstance(op.get("outputs"), list):
            raise DeviceProtocolError("the host's op list is not a list of ops")
        for t in op["outputs"]:
            if isinstance(t, int) and t not in op_of:
                op_of[t] = str(op.get("op"))[:64]
                order.append(t)
    if not order:  # a runtime without an op list: every tensor, by index
        order = sorted(ref)
    diffs: list[TensorDiff] = []
    skipped = 0
    first = None
    for idx in order:
        if idx not in ref or idx not in dev:
            skipped += idx in ref or idx in dev
            continue
        info, h = ref[idx]
        _dinfo, d = dev[idx]
        if h.shape != d.shape or h.dtype != d.dtype:
            raise DeviceProtocolError(f"tensor {idx} is {d.dtype}{list(d.shape)} on the device but "
                                      f"{h.dtype}{list(h.shape)} on the host: not the same model")
        scale = float(info["quantization"][0])
        if h.dtype.kind in "iu" and scale > 0:
            steps = float(np.max(np.abs(d.astype(np.int64) - h.astype(np.int64)))) if h.size else 0.0
            max_abs = steps * scale
            differs = steps > 1
            max_steps: Optional[float] = steps
        else:
            hf, df = h.astype(np.float64), d.astype(np.float64)
            max_abs = float(np.max(np.abs(df - hf))) if h.size else 0.0
            span = float(np.max(np.abs(hf))) if h.size else 0.0
            differs = not math.isfinite(max_abs) or max_abs > float_tolerance * max(span, 1e-6)
            max_steps = None
        td = TensorDiff(idx, str(info.get("name") or ""), layer_name(str(info.get("name") or "")),
                        op_of.get(idx), h.dtype.name, tuple(h.shape), scale, max_abs, max_steps, differs)
        diffs.append(td)
        if differs and first is None:
            first = td
    return LayerDiff(int(device_doc["samples"]), tuple(diffs), first, dict(device_doc["runtime"]),
                     dict(host_doc["runtime"]), skipped)


__all__ = ["LayerDiff", "TensorDiff", "compare", "host_layers", "layer_diff_lines", "layer_name", "layers_args",
           "op_outputs"]
