"""Simulated recipes: levels no runtime here executes, measured but never written as a ``.tflite``.

``simulate`` measures levels like 2-bit weights on a microcontroller or k-means
weight clusters: it quantizes and dequantizes the float model's weight buffers
in place, runs that float model with LiteRT, and reports the accuracy the level
would keep and how small its weights would compress. No TensorFlow here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from edgeq.calibration import Dataset
from edgeq.convert.evaluate import compare_outputs
from edgeq.convert.interpreter import run_all
from edgeq.errors import ConversionError, RecipeError
from edgeq.recipes import Recipe
from edgeq.tflite_file import parse_tflite


@dataclass(frozen=True)
class SimulatedResult:
    """What a simulated (non-executable) level would keep and weigh."""

    recipe: Recipe
    accuracy_float: Optional[float]
    accuracy: Optional[float]
    top1_agreement: Optional[float]
    sqnr_db: Optional[float]
    weights: int  # weight tensors quantized
    float_weight_bytes: int
    compressed_weight_bytes: int  # packed codes + scales (or codebooks)
    size_bytes: int  # the float model's size with its weights compressed (an estimate)
    samples: int
    seconds: float = 0.0
    executable: bool = field(default=False, init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe.name, "executable": False, "simulated": True,
                "accuracy_float": self.accuracy_float, "accuracy": self.accuracy,
                "top1_agreement": self.top1_agreement, "sqnr_db": self.sqnr_db,
                "weights": self.weights, "float_weight_bytes": self.float_weight_bytes,
                "compressed_weight_bytes": self.compressed_weight_bytes, "size_bytes": self.size_bytes,
                "samples": self.samples}


# Ops whose constant input 1 is a weight matrix/kernel (input 2 is the bias, left in float).
_WEIGHT_OPS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0, "TRANSPOSE_CONV": 0}


def simulate(float_model: Any, recipe: Recipe, eval_data: Dataset) -> SimulatedResult:
    """Quantize-dequantize the float model's weights as ``recipe`` says and measure it on ``eval_data``.

    ``float_model`` is a ``FloatModel`` (or anything with the float ``.tflite``
    bytes in ``content``). Only weights change: activations
    stay float, so for ``sim-int2-mcu`` the figure is the weights' share of the
    loss (an upper bound on the accuracy full integer would keep).
    """
    if recipe.executable:
        raise RecipeError(f"recipe '{recipe.name}' is executable: convert it instead of simulating it")
    t = time.perf_counter()
    content = bytes(float_model.content)
    model = parse_tflite(content, "float model")
    buf = bytearray(content)
    sg = model.main
    n_weights = 0
    float_bytes = 0
    packed = 0
    done: set[int] = set()
    for op in sg.operators:
        axis = _WEIGHT_OPS.get(op.op)
        if axis is None or len(op.inputs) < 2 or op.inputs[1] < 0:
            continue
        tensor = sg.tensors[op.inputs[1]]
        if tensor.index in done or not tensor.has_data or tensor.dtype != "float32":
            continue
        done.add(tensor.index)
        offset, nbytes = _buffer_span(content, model, tensor)
        w = np.frombuffer(content, dtype="<f4", count=nbytes // 4, offset=offset).reshape(tensor.shape)
        q, size = _fake_quant(w, recipe, axis)
        buf[offset: offset + nbytes] = q.astype("<f4").tobytes()
        n_weights += 1
        float_bytes += nbytes
        packed += size
    simulated = bytes(buf)
    ref = run_all(content, eval_data, None, "float")
    got = run_all(simulated, eval_data, None, recipe.name)
    fid = compare_outputs(ref, got, eval_data.labels)[0]
    return SimulatedResult(recipe, fid.accuracy_float, fid.accuracy_quant, fid.top1_agreement, fid.sqnr_db,
                           n_weights, float_bytes, packed, len(content) - float_bytes + packed, len(eval_data),
                           time.perf_counter() - t)


def _buffer_span(content: bytes, model: Any, tensor: Any) -> tuple[int, int]:
    """(offset, length) of ``tensor``'s data inside the flatbuffer, found via the LiteRT schema."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.Model.GetRootAsModel(content, 0)
    sg = m.Subgraphs(0)
    t = sg.Tensors(tensor.index)
    b = m.Buffers(t.Buffer())
    if b.Offset() > 1:  # data stored after the flatbuffer (models > 2 GB): not in the table
        return int(b.Offset()), int(b.Size())
    n = b.DataLength()
    if n == 0:
        raise ConversionError(f"weight tensor {tensor.name} has no data to simulate")
    start = b._tab.Vector(b._tab.Offset(4))
    return int(start), int(n)


def _fake_quant(w: np.ndarray, recipe: Recipe, axis: int) -> tuple[np.ndarray, int]:
    """Quantized-dequantized weights and the bytes they would take compressed."""
    w64 = w.astype(np.float64)
    if recipe.method == "kmeans":
        centers, labels = _kmeans_1d(w64.ravel(), recipe.centroids)
        q = centers[labels].reshape(w.shape)
        bits = max(1, math.ceil(math.log2(recipe.centroids)))
        return q.astype(np.float32), math.ceil(w.size * bits / 8) + 4 * recipe.centroids
    bits = recipe.weights_bits
    qmax = 2 ** (bits - 1) - 1 if bits > 2 else 1  # 2-bit symmetric: {-1, 0, 1} x scale
    moved = np.moveaxis(w64, axis, 0).reshape(w.shape[axis], -1)
    if recipe.granularity == "per-tensor":
        scale = np.full((moved.shape[0], 1), np.abs(moved).max() / qmax if moved.size else 1.0)
        groups = 1
    else:
        scale = (np.abs(moved).max(axis=1, keepdims=True) / qmax)
        groups = moved.shape[0]
    scale = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.round(moved / scale), -qmax - (0 if bits <= 2 else 1), qmax) * scale
    out = np.moveaxis(q.reshape(np.moveaxis(w64, axis, 0).shape), 0, axis)
    return out.astype(np.float32), math.ceil(w.size * bits / 8) + 4 * groups


def _kmeans_1d(x: np.ndarray, k: int, iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars, seeded with quantiles (deterministic)."""
    if x.size == 0:
        return np.zeros(k), np.zeros(0, dtype=np.int64)
    centers = np.quantile(x, (np.arange(k) + 0.5) / k)
    labels = np.zeros(x.size, dtype=np.int64)
    for _ in range(iters):
        edges = (centers[1:] + centers[:-1]) / 2
        labels = np.searchsorted(edges, x)
        new = np.array([x[labels == j].mean() if np.any(labels == j) else centers[j] for j in range(k)])
        new.sort()
        if np.allclose(new, centers):
            centers = new
            break
        centers = new
    edges = (centers[1:] + centers[:-1]) / 2
    return centers, np.searchsorted(edges, x)
