"""Regenerates the two tiny full-int8 Dense(4 -> 3) models the arm64 tests push to the device.

``tiny_int8.tflite`` quantizes the dense layer per tensor; ``tiny_int8_perchannel.tflite``
per channel (the TensorFlow converter's default), which tflite-runtime 2.14 cannot run
on aarch64 at this small shape (see README.md). Both are checked in so the tests need no
TensorFlow; run ``.venv/bin/python tests/devices/make_tiny_model.py`` only if the recipe changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def convert(per_channel_dense: bool) -> bytes:
    """A seeded Dense(4 -> 3, relu) as full-int8 TFLite bytes."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.layers.Input((4,)), tf.keras.layers.Dense(3, activation="relu")])
    calib = np.random.default_rng(0).uniform(-1, 1, (64, 4)).astype("float32")
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([calib[i : i + 1]] for i in range(len(calib)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    # A private converter flag, but the only switch there is (TF 2.16 - 2.21).
    conv._experimental_disable_per_channel_quantization_for_dense_layers = not per_channel_dense
    return conv.convert()


def main() -> None:
    here = Path(__file__).parent
    for name, per_channel in (("tiny_int8.tflite", False), ("tiny_int8_perchannel.tflite", True)):
        out = here / name
        out.write_bytes(convert(per_channel))
        print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
