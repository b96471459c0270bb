"""Tiny models for the check/export tests, made with TensorFlow's converter (test-side only)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from edgeq.tflite_file import Reader, parse_tflite
from tests.tflite_models import int8_tflite


def big_dense_int8(path: Path) -> Path:
    """A full-int8 MLP of about 2 MB (1024 -> 2048 -> 10): too big for a 1 MB-flash MCU."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([
        tf.keras.layers.Input((1024,)),
        tf.keras.layers.Dense(2048, activation="relu"),
        tf.keras.layers.Dense(10),
    ])
    x = np.random.default_rng(0).random((20, 1024), dtype=np.float32)
    path.write_bytes(int8_tflite(model, x))
    return path


def topk_float(path: Path) -> Path:
    """A float model with a TOPK_V2 op, which TFLite Micro has no kernel for."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 16], tf.float32)])
    def f(x):
        return tf.math.top_k(x * 2.0, k=3).values

    conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    path.write_bytes(conv.convert())
    return path


def rewire_input(data: bytes, op_index: int, slot: int, tensor: int) -> bytes:
    """Return a copy of a .tflite whose operator ``op_index`` reads input ``slot`` from ``tensor``.

    Used to make a model that is well-formed for the reader but breaks an
    interpreter (e.g. a CONV_2D fed a 2-D weight matrix).
    """
    r = Reader(data, "model")
    sg = r.tables(r.u32(0), 2)[0]
    op = r.tables(sg, 3)[op_index]
    start, n = r.vector(op, 1)
    if not 0 <= slot < n:
        raise IndexError(f"operator {op_index} has {n} inputs")
    out = bytearray(data)
    struct.pack_into("<i", out, start + 4 * slot, tensor)
    parse_tflite(bytes(out))  # still readable
    return bytes(out)


def crashing_model(int8_model: bytes) -> bytes:
    """The digits int8 CNN with its first CONV_2D fed the dense layer's 2-D weights.

    TFLite Micro (tflite-micro 0.dev20261023) dies with SIGFPE while preparing it.
    """
    m = parse_tflite(int8_model)
    ops = m.main.operators
    conv = next(o.index for o in ops if o.op == "CONV_2D")
    fc = next(o for o in ops if o.op == "FULLY_CONNECTED")
    return rewire_input(int8_model, conv, 0, fc.inputs[1])
