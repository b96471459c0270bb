"""Rebuild a Keras 3 model, same weights and same function, so TensorFlow quantizes all of it to int8.

Two layers are exported in a form TensorFlow's int8 quantizer handles:

- ``LayerNormalization`` (transformers, ConvNeXt): Keras 3 lowers it with a
  NEG that the quantizer leaves in float32, so a full-int8 recipe is refused.
  Rewritten as ``mean, x - mean, mean((x - mean)^2), rsqrt, mul, add``, every
  one of which has an int8 kernel in LiteRT and TFLite Micro.
- ``LSTM``/``GRU``/``SimpleRNN`` loops: the WHILE loop crashes TensorFlow's
  calibrator (``edgeq.recurrent``); with a fixed sequence length of at most
  ``MAX_UNROLL_STEPS`` they are rebuilt with ``unroll=True``.

The rebuilt model is used only when it gives the original's outputs on a
random sample; anything that cannot be rebuilt is exported as it is.
Conversion code only: imports Keras.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from edgeq.recurrent import ISSUE, MAX_UNROLL_STEPS, RECURRENT, cell_option, recurrent_layers, steps_of

_LAYER_NORM_CLASS: Optional[type] = None


def _layer_norm_class() -> type:
    """``LayerNormalization`` with the int8-friendly call (defined on first use: it needs Keras)."""
    global _LAYER_NORM_CLASS
    if _LAYER_NORM_CLASS is None:
        import keras
        from keras import ops

        class Int8FriendlyLayerNormalization(keras.layers.LayerNormalization):
            """Same weights and function; lowers to ops with int8 kernels (no NEG)."""

            def call(self, inputs: Any) -> Any:
                if self.rms_scaling:
                    return super().call(inputs)
                rank = len(inputs.shape)
                axes = self.axis if isinstance(self.axis, (list, tuple)) else [self.axis]
                axes = sorted(a % rank for a in axes)
                mean = ops.mean(inputs, axis=axes, keepdims=True)
                centred = ops.subtract(inputs, mean)
                variance = ops.mean(ops.multiply(centred, centred), axis=axes, keepdims=True)
                out = ops.multiply(centred, ops.rsqrt(ops.add(variance, self.epsilon)))
                shape = [1] * rank
                for a in axes:
                    shape[a] = inputs.shape[a]
                if self.scale:
                    out = ops.multiply(out, ops.reshape(ops.cast(self.gamma, out.dtype), shape))
                if self.center:
                    out = ops.add(out, ops.reshape(ops.cast(self.beta, out.dtype), shape))
                return ops.cast(out, self.compute_dtype)

        _LAYER_NORM_CLASS = Int8FriendlyLayerNormalization
    return _LAYER_NORM_CLASS


def _set_unroll(config: Any) -> None:
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class_name") in RECURRENT and isinstance(node.get("config"), dict):
                node["config"]["unroll"] = True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def for_int8(model: Any) -> tuple[Any, tuple[str, ...]]:
    """``model`` rebuilt for full-int8 export, and notes saying what changed; ``(model, ())`` if nothing did."""
    import keras

    norms = [layer.name for layer in getattr(model, "layers", ())
             if type(layer) is keras.layers.LayerNormalization and not layer.rms_scaling]
    loops = [(name, cls, layer) for name, cls, layer in recurrent_layers(model)
             if cell_option(layer, "unroll") is False and not cell_option(layer, "stateful")
             and (steps_of(layer) or MAX_UNROLL_STEPS + 1) <= MAX_UNROLL_STEPS]
    loops = [item for item in loops if item[0] in {layer.name for layer in model.layers}]  # top level only
    if not norms and not loops:
        return model, ()
    names = set(norms) | {name for name, _, _ in loops}

    def clone(layer: Any) -> Any:
        if layer.name not in names:
            return layer.__class__.from_config(layer.get_config())
        config = layer.get_config()
        if layer.name in norms:
            return _layer_norm_class().from_config(config)
        if "unroll" in config:
            config["unroll"] = True
        _set_unroll(config)  # the layers a Bidirectional wraps
        return layer.__class__.from_config(config)

    try:
        rebuilt = keras.models.clone_model(model, clone_function=clone)
        rebuilt.set_weights(model.get_weights())
        if rebuilt.name != model.name or not _same_outputs(model, rebuilt):
            return model, ()
    except Exception:  # noqa: BLE001 - a model that cannot be rebuilt is exported as it is
        return model, ()
    notes = []
    if norms:
        notes.append(f"LayerNormalization {', '.join(repr(n) for n in norms)} exported without NEG "
                     "(mean, sub, mul, mean, rsqrt: ops with int8 kernels) so it quantizes to int8; "
                     "the float function is unchanged")
    if loops:
        steps = max(steps_of(layer) or 0 for _, _, layer in loops)
        notes.append(f"recurrent layer{'s' if len(loops) > 1 else ''} "
                     f"{', '.join(f'{n!r} ({c})' for n, c, _ in loops)} exported unrolled ({steps} steps), "
                     f"as with unroll=True: TensorFlow's calibrator crashes on their loop ({ISSUE}); "
                     "the float function is unchanged")
    return rebuilt, tuple(notes)


def _same_outputs(a: Any, b: Any) -> bool:
    rng = np.random.default_rng(0)
    feeds = []
    for t in a.inputs:
        if any(d is None for d in t.shape[1:]):
            return False
        shape = (1,) + tuple(int(d) for d in t.shape[1:])
        dtype = t.dtype if isinstance(t.dtype, str) else t.dtype.name
        if np.dtype(dtype).kind in "iu":
            feeds.append(rng.integers(0, 2, shape).astype(dtype))
        else:
            feeds.append(rng.normal(size=shape).astype(dtype))
    x = feeds if len(feeds) > 1 else feeds[0]
    out_a, out_b = a(x, training=False), b(x, training=False)
    if isinstance(out_a, dict):
        flat_a, flat_b = [out_a[k] for k in sorted(out_a)], [out_b[k] for k in sorted(out_b)]
    else:
        flat_a = list(out_a) if isinstance(out_a, (list, tuple)) else [out_a]
        flat_b = list(out_b) if isinstance(out_b, (list, tuple)) else [out_b]
    return len(flat_a) == len(flat_b) and all(
        np.allclose(np.asarray(p), np.asarray(q), rtol=1e-4, atol=1e-5) for p, q in zip(flat_a, flat_b))
