"""Tiny real models for the conversion tests (built in seconds, weights mostly untrained)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def legacy_h5(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """A Keras 2 (tf_keras) ``.h5`` with a DepthwiseConv2D, briefly trained on digits."""
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Input((8, 8, 1), name="image"),
            tf_keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem"),
            tf_keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="depthwise"),
            tf_keras.layers.Flatten(name="flatten"),
            tf_keras.layers.Dense(10, activation="softmax", name="head"),
        ],
        name="legacy",
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "HDF5 is legacy": that is the point here
        model.save(path, save_format="h5")
    return path


def plain_saved_model(path: Path) -> Path:
    """A SavedModel written by ``tf.saved_model.save`` from a ``tf.Module`` (no Keras), dynamic batch."""
    import tensorflow as tf

    rng = np.random.default_rng(0)

    class Net(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = tf.Variable(rng.normal(0, 0.3, (3, 3, 1, 4)).astype("float32"))
            self.dense = tf.Variable(rng.normal(0, 0.1, (8 * 8 * 4, 10)).astype("float32"))
            self.bias = tf.Variable(np.zeros(10, "float32"))

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32, name="pixels")])
        def __call__(self, pixels: tf.Tensor) -> dict:
            h = tf.nn.relu(tf.nn.conv2d(pixels, self.kernel, 1, "SAME"))
            h = tf.reshape(h, [tf.shape(h)[0], -1])
            return {"logits": tf.matmul(h, self.dense) + self.bias}

    net = Net()
    tf.saved_model.save(net, str(path), signatures={"serving_default": net.__call__.get_concrete_function()})
    return path


def two_input_keras(path: Path) -> Path:
    """A Keras 3 model with two named inputs: an 8x8 image and a 4-vector."""
    import keras

    keras.utils.set_random_seed(0)
    image = keras.layers.Input((8, 8, 1), name="image")
    extra = keras.layers.Input((4,), name="extra")
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(image)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Concatenate(name="concat")([h, keras.layers.Dense(4, name="extra_dense")(extra)])
    out = keras.layers.Dense(3, activation="softmax", name="probs")(h)
    keras.Model([image, extra], out, name="twoin").save(path)
    return path


def cos_keras(path: Path, op: str = "cos") -> Path:
    """A ``.keras`` model with a layer named "weird" computing ``keras.ops.<op>``.

    TFLite has a COS kernel only for float, and no builtin ERF at all. The layer
    is a registered class, so the file loads without unsafe lambdas.
    """
    import keras

    @keras.saving.register_keras_serializable(package="edgeq_tests")
    class Elementwise(keras.layers.Layer):
        def __init__(self, op: str = "cos", **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(**kwargs)
            self.op = op

        def call(self, t):  # type: ignore[no-untyped-def]
            return getattr(keras.ops, self.op)(t)

        def get_config(self):  # type: ignore[no-untyped-def]
            return {**super().get_config(), "op": self.op}

    keras.utils.set_random_seed(0)
    x = keras.layers.Input((8,), name="x")
    h = keras.layers.Dense(8, name="dense_in")(x)
    h = Elementwise(op, name="weird")(h)
    out = keras.layers.Dense(3, name="head")(h)
    keras.Model(x, out, name="cosnet").save(path)
    return path


def _touching_lambda(marker: Path):  # type: ignore[no-untyped-def]
    """A lambda whose bytecode creates ``marker`` when it runs (as a hostile model file would run code)."""
    return eval(f"lambda t: (__import__('pathlib').Path({str(marker)!r}).touch(), t)[1]")  # noqa: S307


def lambda_h5(path: Path, marker: Path, depthwise: bool = False) -> Path:
    """A legacy ``.h5`` (tf_keras) with a Lambda layer that creates ``marker`` when the model is rebuilt.

    With ``depthwise``, a DepthwiseConv2D comes first: Keras 3 then fails on its
    legacy config before it reaches the Lambda, so only a check of the file
    itself stands between the bytecode and tf_keras.
    """
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    if depthwise:
        head = [tf_keras.layers.Input((8, 8, 1), name="image"),
                tf_keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise"),
                tf_keras.layers.Flatten(name="flatten")]
    else:
        head = [tf_keras.layers.Input((8,), name="x"), tf_keras.layers.Dense(8, name="dense_in")]
    model = tf_keras.Sequential(
        head + [
            tf_keras.layers.Lambda(_touching_lambda(marker), name="evil"),
            tf_keras.layers.Dense(3, name="head"),
        ],
        name="lambdanet",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.save(path, save_format="h5")
    if marker.exists():  # building the model above ran the lambda once, here, on purpose
        marker.unlink()
    return path


def lambda_keras(path: Path, marker: Path) -> Path:
    """A Keras 3 ``.keras`` with the same Lambda layer (Keras 3's safe mode refuses it)."""
    import keras

    keras.utils.set_random_seed(0)
    x = keras.layers.Input((8,), name="x")
    h = keras.layers.Dense(8, name="dense_in")(x)
    h = keras.layers.Lambda(_touching_lambda(marker), name="evil")(h)
    keras.Model(x, keras.layers.Dense(3, name="head")(h), name="lambdanet").save(path)
    if marker.exists():
        marker.unlink()
    return path
