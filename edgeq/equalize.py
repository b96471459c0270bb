"""Cross-layer equalization: even out per-channel weight ranges without changing the float function.

For two consecutive layers with a positively homogeneous activation between
them (``relu(x / s) = relu(x) / s`` for ``s > 0``), dividing output channel
``i`` of the first layer (kernel and bias) by ``s_i`` and multiplying input
channel ``i`` of the second layer by ``s_i`` computes the same function. With
``s_i = sqrt(r1_i / r2_i)`` (``r1_i``, ``r2_i``: the largest absolute weight of
channel ``i`` in each layer) both ranges become ``sqrt(r1_i * r2_i)``: an
outlier channel no longer stretches the per-tensor activation range that int8
shares between all channels, and the model stays fully int8 (Nagel et al.,
"Data-Free Quantization Through Weight Equalization and Bias Correction",
ICCV 2019; Qualcomm AIMET).

What sits between the two layers decides whether a pair is equalized:

- ReLU (as the first layer's activation or a ``ReLU`` layer), no activation,
  max pooling, dropout, zero padding and (between a Conv and a Dense layer)
  Flatten commute with a positive per-channel scale: equalized.
- ReLU6 (and ``ReLU(max_value=...)``) clips at a fixed value; rescaling would
  move the clip and change the float function, so such pairs are skipped and
  the skip is reported. So are any other activation, BatchNormalization (fold
  it into the convolution first), and a first layer whose output feeds more
  than one layer.

Works on Keras 3 and ``tf_keras`` models alike; the user's model is never
changed: ``equalize`` returns a new model with copied weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from edgeq.errors import ModelError

# Layers whose weights are equalized, by class name (Keras 3 and tf_keras share them).
_DENSE = "Dense"
_CONV = "Conv2D"
_CONV1D = "Conv1D"
_DEPTHWISE = "DepthwiseConv2D"
_WEIGHTED = (_DENSE, _CONV, _CONV1D, _DEPTHWISE)
# Layers that commute with a positive per-channel scale of their input (channels last).
_PASS_THROUGH = ("MaxPooling2D", "MaxPooling1D", "Dropout", "ZeroPadding2D", "ZeroPadding1D",
                 "SpatialDropout2D", "Activation", "ReLU", "Flatten")
_HOMOGENEOUS = ("relu", "linear")


@dataclass(frozen=True)
class EqualizeOptions:
    """How hard to equalize."""

    max_rounds: int = 20  # chains (A -> B -> C) are swept until the scales stop moving
    tolerance: float = 1e-4  # stop when every scale of a round is within 1 +- tolerance


@dataclass(frozen=True)
class EqualizedPair:
    """One pair of layers that was equalized."""

    first: str
    second: str
    via: tuple[str, ...]  # layers between them (ReLU, pooling, Flatten, ...)
    channels: int
    imbalance_before: float  # max over channels of max(r1/r2, r2/r1)
    imbalance_after: float
    largest_scale: float  # the s_i furthest from 1 (as a factor >= 1)

    def to_dict(self) -> dict[str, Any]:
        return {"first": self.first, "second": self.second, "via": list(self.via), "channels": self.channels,
                "imbalance_before": _round(self.imbalance_before), "imbalance_after": _round(self.imbalance_after),
                "largest_scale": _round(self.largest_scale)}


@dataclass(frozen=True)
class SkippedPair:
    """A pair of consecutive weighted layers that could not be equalized, and why."""

    first: str
    second: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"first": self.first, "second": self.second, "reason": self.reason}


@dataclass(frozen=True)
class EqualizeResult:
    """The equalized copy of the model and what was done to it."""

    model: Any  # a new Keras model (same library as the input); the input is unchanged
    pairs: tuple[EqualizedPair, ...]
    skipped: tuple[SkippedPair, ...]
    rounds: int

    @property
    def changed(self) -> bool:
        return bool(self.pairs)

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": [p.to_dict() for p in self.pairs], "skipped": [s.to_dict() for s in self.skipped],
                "rounds": self.rounds}


def _round(x: float) -> float:
    return float(f"{x:.4g}") if math.isfinite(x) else x


# ---------------------------------------------------------------- the layer graph


def _class(layer: Any) -> str:
    return type(layer).__name__


def _producers(layer: Any) -> list[str]:
    try:
        tensors = layer.input
    except (AttributeError, ValueError):
        return []
    if not isinstance(tensors, (list, tuple)):
        tensors = [tensors]
    out = []
    for t in tensors:
        history = getattr(t, "_keras_history", None)
        if history is not None:
            out.append(history[0].name)
    return out


def _activation_name(layer: Any) -> Optional[str]:
    act = getattr(layer, "activation", None)
    if act is None:
        return None
    return getattr(act, "__name__", type(act).__name__)


def _pass_through_problem(layer: Any) -> Optional[str]:
    """None when ``layer`` commutes with a positive per-channel scale, else why not."""
    cls = _class(layer)
    if cls == "ReLU":
        max_value = getattr(layer, "max_value", None)
        slope = float(getattr(layer, "negative_slope", 0.0) or 0.0)
        threshold = float(getattr(layer, "threshold", 0.0) or 0.0)
        if max_value is not None:
            return (f"'{layer.name}' is ReLU(max_value={float(max_value):g}): the clip would move with the "
                    "scale and change the float function")
        if threshold != 0.0:
            return f"'{layer.name}' is a ReLU with a threshold, which is not scale-invariant"
        if slope != 0.0:
            return None  # leaky ReLU is positively homogeneous too
        return None
    if cls == "Activation":
        name = _activation_name(layer)
        if name in _HOMOGENEOUS:
            return None
        return _activation_problem(layer.name, name)
    if cls in _PASS_THROUGH:
        return None
    if cls == "BatchNormalization":
        return f"'{layer.name}' is BatchNormalization: fold it into the layer before it first"
    return f"'{layer.name}' ({cls}) between them does not commute with a per-channel scale"


def _activation_problem(layer_name: str, act: Optional[str]) -> Optional[str]:
    if act in _HOMOGENEOUS or act is None:
        return None
    if act == "relu6":
        return (f"'{layer_name}' uses ReLU6, which clips at 6: rescaling would move the clip and change the "
                "float function")
    return f"'{layer_name}' uses activation '{act}', which is not positively homogeneous like ReLU"


@dataclass
class _Pair:
    first: Any
    second: Any
    via: list[Any]
    flatten_channels: Optional[int]  # channels before a Flatten between them (None: no Flatten)


def _find_pairs(model: Any) -> tuple[list[_Pair], list[SkippedPair]]:
    layers = {layer.name: layer for layer in model.layers}
    consumers: dict[str, list[str]] = {name: [] for name in layers}
    for layer in model.layers:
        for p in _producers(layer):
            if p in consumers and p != layer.name:
                consumers[p].append(layer.name)
    outputs = set()
    for t in model.outputs:
        history = getattr(t, "_keras_history", None)
        if history is not None:
            outputs.add(history[0].name)

    pairs: list[_Pair] = []
    skipped: list[SkippedPair] = []
    for layer in model.layers:
        if _class(layer) not in _WEIGHTED:
            continue
        if _class(layer) == _DEPTHWISE and int(getattr(layer, "depth_multiplier", 1)) != 1:
            continue
        problem = _activation_problem(layer.name, _activation_name(layer))
        via: list[Any] = []
        current = layer
        flatten_channels = None
        second = None
        while True:
            if current.name in outputs:
                break
            nxt = consumers.get(current.name, [])
            if len(nxt) != 1:
                if len(nxt) > 1 and problem is None:
                    problem = f"'{current.name}' feeds {len(nxt)} layers"
                break
            candidate = layers[nxt[0]]
            if _class(candidate) in _WEIGHTED:
                second = candidate
                break
            reason = _pass_through_problem(candidate)
            if reason is not None:
                # Only worth reporting when a weighted layer follows.
                follow = consumers.get(candidate.name, [])
                if problem is None and len(follow) == 1 and _class(layers[follow[0]]) in _WEIGHTED:
                    problem = reason
                    second = layers[follow[0]]
                break
            if _class(candidate) == "Flatten":
                shape = tuple(current.output.shape)
                flatten_channels = int(shape[-1])
            via.append(candidate)
            current = candidate
        if second is None:
            continue
        if problem is None and flatten_channels is not None and _class(second) != _DENSE:
            problem = "Flatten before a non-Dense layer"
        if problem is None and _class(second) == _DEPTHWISE and flatten_channels is not None:
            problem = "Flatten before a depthwise layer"
        if problem is not None:
            skipped.append(SkippedPair(layer.name, second.name, problem))
            continue
        pairs.append(_Pair(layer, second, via, flatten_channels))
    return pairs, skipped


# ---------------------------------------------------------------- ranges and scaling


def _out_ranges(layer: Any, kernel: np.ndarray) -> np.ndarray:
    """Largest |weight| per output channel of the first layer."""
    if _class(layer) == _DEPTHWISE:  # (kh, kw, channels, 1)
        return np.abs(kernel).max(axis=(0, 1, 3))
    return np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0)


def _in_ranges(layer: Any, kernel: np.ndarray, flatten_channels: Optional[int]) -> np.ndarray:
    """Largest |weight| per input channel of the second layer (channels of the first layer's output)."""
    cls = _class(layer)
    if cls == _DENSE:
        rows = np.abs(kernel).max(axis=1)  # (in,)
        if flatten_channels is not None:
            return rows.reshape(-1, flatten_channels).max(axis=0)
        return rows
    # Conv1D (k, in, out), Conv2D (kh, kw, in, out), DepthwiseConv2D (kh, kw, in, mult): input axis -2
    moved = np.moveaxis(np.abs(kernel), -2, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


def _scale_out(layer: Any, weights: list[np.ndarray], inv: np.ndarray) -> list[np.ndarray]:
    kernel = weights[0]
    if _class(layer) == _DEPTHWISE:
        kernel = kernel * inv[None, None, :, None]
    else:
        kernel = kernel * inv
    out = [kernel.astype(weights[0].dtype)]
    if len(weights) > 1:
        out.append((weights[1] * inv).astype(weights[1].dtype))
    return out + list(weights[2:])


def _scale_in(layer: Any, weights: list[np.ndarray], s: np.ndarray, flatten_channels: Optional[int]) -> list[np.ndarray]:
    kernel = weights[0]
    if _class(layer) == _DENSE:
        if flatten_channels is not None:
            s = np.tile(s, kernel.shape[0] // flatten_channels)
        kernel = kernel * s[:, None]
    else:
        shape = [1] * kernel.ndim
        shape[-2] = s.shape[0]
        kernel = kernel * s.reshape(shape)
    return [kernel.astype(weights[0].dtype)] + list(weights[1:])


def _imbalance(r1: np.ndarray, r2: np.ndarray) -> float:
    live = (r1 > 0) & (r2 > 0)
    if not live.any():
        return 1.0
    ratio = r1[live] / r2[live]
    return float(np.max(np.maximum(ratio, 1 / ratio)))


def _clone(model: Any) -> Any:
    module = type(model).__module__
    if module.startswith("tf_keras"):
        import tf_keras as lib
    else:
        import keras as lib
    try:
        copy = lib.models.clone_model(model)
    except Exception as exc:  # noqa: BLE001 - clone_model raises many kinds for custom models
        raise ModelError(f"cannot copy Keras model '{model.name}' for equalization ({str(exc).splitlines()[0][:200]})",
                         "equalization needs a Sequential or functional model of built-in layers") from None
    copy.set_weights(model.get_weights())
    return copy


def equalize(model: Any, options: EqualizeOptions = EqualizeOptions()) -> EqualizeResult:
    """Return an equalized copy of Keras ``model`` (Keras 3 or tf_keras) and the pairs it balanced.

    The float function is unchanged (up to float rounding); ``model`` itself is
    not modified.
    """
    copy = _clone(model)
    pairs, skipped = _find_pairs(copy)
    if not pairs:
        return EqualizeResult(copy, (), tuple(skipped), 0)
    before = []
    for p in pairs:
        w1, w2 = p.first.get_weights(), p.second.get_weights()
        before.append(_imbalance(_out_ranges(p.first, w1[0]), _in_ranges(p.second, w2[0], p.flatten_channels)))
    total_scale = [np.ones(1)] * len(pairs)
    rounds = 0
    for rounds in range(1, options.max_rounds + 1):
        moved = 0.0
        for k, p in enumerate(pairs):
            w1, w2 = p.first.get_weights(), p.second.get_weights()
            r1 = _out_ranges(p.first, w1[0]).astype(np.float64)
            r2 = _in_ranges(p.second, w2[0], p.flatten_channels).astype(np.float64)
            live = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[live] = np.sqrt(r1[live] / r2[live])
            p.first.set_weights(_scale_out(p.first, w1, 1.0 / s))
            p.second.set_weights(_scale_in(p.second, w2, s, p.flatten_channels))
            total_scale[k] = total_scale[k] * s
            moved = max(moved, float(np.max(np.abs(np.log(s)))))
        if moved < options.tolerance:
            break
    done = []
    for k, p in enumerate(pairs):
        w1, w2 = p.first.get_weights(), p.second.get_weights()
        after = _imbalance(_out_ranges(p.first, w1[0]), _in_ranges(p.second, w2[0], p.flatten_channels))
        s = total_scale[k]
        done.append(EqualizedPair(p.first.name, p.second.name, tuple(v.name for v in p.via),
                                  int(s.shape[0]), before[k], after, float(np.max(np.maximum(s, 1 / s)))))
    return EqualizeResult(copy, tuple(done), tuple(skipped), rounds)
