"""Make the two tiny int8 models the fleet tests deploy (run once; the .tflite files are kept in data/).

    .venv/bin/python -m tests.fleet.make_models

Two models with the same shape and different weights, so a test can tell which
one is active. Each is a few KB: fault tests care about transfer and activation,
not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.tflite_models import int8_tflite

DATA = Path(__file__).resolve().parent / "data"


def make(seed: int) -> bytes:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential([tf.keras.layers.Input((16,)), tf.keras.layers.Dense(8, activation="relu"),
                                 tf.keras.layers.Dense(4)])
    return int8_tflite(model, np.random.default_rng(seed).random((32, 16), dtype=np.float32))


if __name__ == "__main__":
    DATA.mkdir(exist_ok=True)
    for name, seed in (("tiny_a.tflite", 1), ("tiny_b.tflite", 2)):
        (DATA / name).write_bytes(make(seed))
        print(name, (DATA / name).stat().st_size)
