"""Train a small CNN on scikit-learn's digits and write what `edgeq convert` needs.

    python examples/digits/train.py --out examples/digits

writes ``model.keras`` (the float model), ``calib.npy`` (training samples for
calibration) and ``eval.npz`` (held-out ``x`` and labels ``y``). Seeded, a few
seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np


def load_digits_split(seed: int = 0) -> dict[str, np.ndarray]:
    """Digits as 8x8x1 float32 images in [0, 1], split 70/30 (seeded)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype("float32") / 16.0)[..., None]
    y = d.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n = int(len(x) * 0.7)
    return {"x_train": x[:n], "y_train": y[:n], "x_test": x[n:], "y_test": y[n:]}


def train(out: Path, epochs: int = 15, seed: int = 0) -> float:
    """Train, save the three files into ``out`` and return the held-out float accuracy."""
    import tensorflow as tf

    data = load_digits_split(seed)
    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Input((8, 8, 1), name="image"),
            tf.keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            tf.keras.layers.MaxPooling2D(),
            tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(10, activation="softmax"),
        ],
        name="digits",
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(data["x_train"], data["y_train"], epochs=epochs, batch_size=32, verbose=0)
    _, accuracy = model.evaluate(data["x_test"], data["y_test"], verbose=0)

    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    # Calibration wants representative inputs, not labels: training images suffice.
    np.save(out / "calib.npy", data["x_train"][:500])
    np.savez(out / "eval.npz", x=data["x_test"], y=data["y_test"])
    return float(accuracy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="directory for model.keras, calib.npy and eval.npz")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        from edgeq.convert import quiet_tensorflow  # keeps TensorFlow's log lines off the terminal
    except ImportError:
        import contextlib

        quiet_tensorflow = contextlib.nullcontext
    with quiet_tensorflow():
        accuracy = train(args.out, args.epochs, args.seed)
    print(f"wrote {args.out}/model.keras, calib.npy, eval.npz (float accuracy on held-out digits: {accuracy:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
