"""The quantizers besides TensorFlow's converter: Google's litert-quantizer, and simulated levels.

No TensorFlow here. ``litert_quantize`` makes what TensorFlow's converter
cannot (int4/int2 weights, blockwise scales, weight-only int8, static int4
weights with int8 activations) from the float ``.tflite``. ``simulate``
measures levels that no runtime here executes (2-bit weights on a
microcontroller, k-means weight clusters): it quantizes and dequantizes the
float model's weight buffers in place, runs that float model with LiteRT, and
reports the accuracy the level would keep and how small its weights would
compress. A simulated model is never written as a ``.tflite``.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from edgeq.calibration import Dataset
from edgeq.errors import ConversionError, RecipeError
from edgeq.recipes import Recipe
from edgeq.tflite_file import parse_tflite

_SIGNATURE = "serving_default"


# ---------------------------------------------------------------- litert-quantizer


def _litert_recipe(recipe: Recipe) -> Any:
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
    q = Quantizer(bytearray(float_content), _litert_recipe(recipe))
    qsvs = None
    if q.need_calibration:
        if calib is None:
            raise ConversionError(f"recipe '{recipe.name}' has static activations and needs calibration data")
        if cache is not None and "qsvs" in cache:
            qsvs = cache["qsvs"]
        else:
            samples = [calib.sample(i) for i in range(len(calib))]
            with _quiet():
                qsvs = q.calibrate({_SIGNATURE: samples}, num_threads=1)
            if cache is not None:
                cache["qsvs"] = qsvs
    with _quiet():
        result = q.quantize(qsvs, enable_progress_report=False)
    if result.quantized_model is None:
        raise ConversionError(f"litert-quantizer made no model for recipe '{recipe.name}'")
    return bytes(result.quantized_model)


@contextlib.contextmanager
def _quiet():  # type: ignore[no-untyped-def]
    """litert-quantizer prints progress (stdout, and tqdm bars on stderr); the library never prints."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# ---------------------------------------------------------------- simulated levels


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

    ``float_model`` is an ``edgeq.convert.FloatModel`` (or anything with the
    float ``.tflite`` bytes in ``content``). Only weights change: activations
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
    from edgeq.convert import _fidelity, _run_all

    ref = _run_all(content, eval_data, None, "float")
    got = _run_all(simulated, eval_data, None, recipe.name)
    fid = _fidelity(ref, got, eval_data.labels)[0]
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
