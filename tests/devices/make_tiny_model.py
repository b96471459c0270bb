"""Regenerates the two tiny full-int8 Dense(4 -> 3) models the arm64 tests push to the device.

``tiny_int8.tflite`` quantizes the dense layer per tensor; ``tiny_int8_perchannel.tflite``
per channel (the TensorFlow converter's default), which tflite-runtime 2.14 cannot run
on aarch64 at this small shape (see docs/testbed.md). Both are checked in so the tests need no
TensorFlow; run ``.venv/bin/python -m tests.devices.make_tiny_model`` only if the recipe changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.tflite_models import int8_tflite


def convert(per_channel_dense: bool) -> bytes:
    """A seeded Dense(4 -> 3, relu) as full-int8 TFLite bytes."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.layers.Input((4,)), tf.keras.layers.Dense(3, activation="relu")])
    calib = np.random.default_rng(0).uniform(-1, 1, (64, 4)).astype("float32")
    return int8_tflite(model, calib, per_channel_dense=per_channel_dense)


def main() -> None:
    here = Path(__file__).parent
    for name, per_channel in (("tiny_int8.tflite", False), ("tiny_int8_perchannel.tflite", True)):
        out = here / name
        out.write_bytes(convert(per_channel))
        print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
