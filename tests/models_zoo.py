"""Tiny real models of the architectures users bring (RNNs, transformer and ConvNeXt blocks), built in seconds."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def keras_rnn(path: Path, kind: str = "lstm", steps: int = 10, unroll: bool = False) -> Path:
    """Input((steps, 4)) -> LSTM/GRU(8) -> Dense(3, softmax), Keras 3, untrained."""
    import keras

    keras.utils.set_random_seed(0)
    x = keras.layers.Input((steps, 4), name="seq")
    layer = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}[kind]
    h = layer(8, unroll=unroll, name="rnn")(x)
    keras.Model(x, keras.layers.Dense(3, activation="softmax", name="head")(h), name=kind).save(path)
    return path


def legacy_lstm_h5(path: Path) -> Path:
    """A tf_keras LSTM saved as .h5: Keras 3 cannot load it, tf_keras converts it to a fused LSTM op."""
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([tf_keras.layers.Input((10, 4), name="seq"), tf_keras.layers.LSTM(8, name="rnn"),
                                 tf_keras.layers.Dense(3, activation="softmax", name="head")], name="legacy_lstm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "HDF5 is legacy": that is the point here
        model.save(path, save_format="h5")
    return path


def transformer_block(path: Path) -> Path:
    """Tokens (8 x 16) -> MultiHeadAttention, LayerNormalization, Dense(gelu) feed-forward -> 4 classes."""
    import keras

    L = keras.layers
    keras.utils.set_random_seed(0)
    x = L.Input((8, 16), name="tokens")
    a = L.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(x, x)
    h = L.LayerNormalization(name="ln1")(L.Add(name="res1")([x, a]))
    f = L.Dense(16, name="ff2")(L.Dense(32, activation="gelu", name="ff1")(h))
    h = L.LayerNormalization(name="ln2")(L.Add(name="res2")([h, f]))
    h = L.GlobalAveragePooling1D(name="pool")(h)
    keras.Model(x, L.Dense(4, activation="softmax", name="head")(h), name="tblock").save(path)
    return path


def convnext_block(path: Path) -> Path:
    """Image (16x16x3) -> patchify stem, DepthwiseConv2D 7x7, LayerNormalization, Dense(gelu), Dense -> 4 classes."""
    import keras

    L = keras.layers
    keras.utils.set_random_seed(0)
    x = L.Input((16, 16, 3), name="image")
    s = L.Conv2D(16, 4, strides=4, name="stem")(x)
    y = L.DepthwiseConv2D(7, padding="same", name="dw")(s)
    y = L.LayerNormalization(epsilon=1e-6, name="ln")(y)
    y = L.Dense(16, name="pw2")(L.Dense(64, activation="gelu", name="pw1")(y))
    h = L.GlobalAveragePooling2D(name="pool")(L.Add(name="res")([s, y]))
    keras.Model(x, L.Dense(4, activation="softmax", name="head")(h), name="convnext").save(path)
    return path


def data(path: Path, shape: tuple[int, ...], n: int, seed: int, classes: int = 0) -> Path:
    """Normal samples of ``shape`` in an .npy, or an .npz with ``y`` labels when ``classes``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    if classes:
        np.savez(path, x=x, y=rng.integers(0, classes, n))
    else:
        np.save(path, x)
    return path
