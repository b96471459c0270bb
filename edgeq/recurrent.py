"""Recurrent layers (LSTM, GRU, SimpleRNN) and the TensorFlow bug that crashes on their loops.

A Keras 3 recurrent layer becomes a WHILE loop in TFLite, and TensorFlow's
calibrator dies with a segmentation fault on it (tensorflow#75140). The same
layer built with ``unroll=True`` becomes plain ops that convert to full int8:
``edgeq.rewrite`` rebuilds models that way when it can; :func:`crash_error`
turns a crashed stage into one line naming the fix when it cannot.
"""

from __future__ import annotations

from typing import Any, Optional

from edgeq.errors import ConversionError

RECURRENT = ("LSTM", "GRU", "SimpleRNN")
# Longer sequences are left as loops: every step becomes ~30 ops, and conversion time grows with them.
MAX_UNROLL_STEPS = 128
ISSUE = "tensorflow#75140"


def recurrent_layers(model: Any) -> list[tuple[str, str, Any]]:
    """[(layer name, class name, the recurrent layer)] of a Keras model, through Bidirectional wrappers."""
    found = []
    for layer in getattr(model, "layers", ()):
        cls = type(layer).__name__
        if cls in RECURRENT:
            found.append((layer.name, cls, layer))
        elif cls == "Bidirectional":
            inner = getattr(layer, "forward_layer", None)
            found.append((layer.name, f"Bidirectional({type(inner).__name__})", layer))
        elif hasattr(layer, "layers") and layer is not model:
            found.extend(recurrent_layers(layer))
    return found


def cell_option(layer: Any, name: str) -> Any:
    """An option of a recurrent layer (``unroll``, ``stateful``), looking inside a Bidirectional wrapper."""
    inner = getattr(layer, "forward_layer", None) if type(layer).__name__ == "Bidirectional" else layer
    return getattr(inner, name, None)


def steps_of(layer: Any) -> Optional[int]:
    """The fixed sequence length a recurrent layer runs over, or None when it is not fixed."""
    try:
        shape = layer.input.shape
    except (AttributeError, ValueError, TypeError):
        return None
    if len(shape) < 3 or shape[1] is None:
        return None
    return int(shape[1])


def crash_error(crash: Any, float_model: Any) -> ConversionError:
    """One line for a stage that crashed (an ``edgeq.isolate.StageCrashed``), with the fix when one is known."""
    how = f"crashed ({crash.signal})" if crash.signal else "died without a result"
    loaded = float_model.loaded
    ops = float_model.tflite.op_counts
    if "WHILE" in ops:
        layers = recurrent_layers(loaded.model) if loaded.loader in ("keras", "tf_keras") else []
        where = ", ".join(f"'{n}' ({c})" for n, c, _ in layers) or "a loop in the model"
        steps = [steps_of(lay) for _, _, lay in layers]
        longest = max((s for s in steps if s is not None), default=0)
        if any(cell_option(lay, "stateful") for _, _, lay in layers):
            fix = ("the layer is stateful=True, which edgeq does not rebuild: save the model with "
                   "stateful=False and unroll=True (a converted model runs one independent sequence per call)")
        elif steps and all(s is not None for s in steps) and longest > MAX_UNROLL_STEPS:
            fix = (f"edgeq unrolls recurrent layers itself up to {MAX_UNROLL_STEPS} steps and this model has "
                   f"{longest}: build them with unroll=True yourself "
                   "(e.g. keras.layers.LSTM(64, unroll=True)), or shorten the sequence")
        elif steps and all(s is not None for s in steps):
            fix = ("edgeq could not rebuild this model with the layers unrolled: build them with unroll=True "
                   "yourself (e.g. keras.layers.LSTM(64, unroll=True))")
        else:
            fix = ("give the model a fixed sequence length (e.g. keras.Input((50, 8))) so edgeq can unroll the "
                   "recurrent layers, or build them with unroll=True")
        return ConversionError(
            f"{crash.stage} {how} on the WHILE loop of {where}: a TensorFlow bug with Keras 3 "
            f"recurrent layers ({ISSUE})",
            f"{fix}; unrolled layers convert to full int8. Or keep float activations (--recipe fp16)")
    return ConversionError(f"{crash.stage} {how} while quantizing {loaded.path}: a TensorFlow bug, not edgeq's",
                           "try another recipe (e.g. --recipe dynamic-int8 or --scheme int16x8), "
                           "or run with --debug and report it with the model")
