"""Cross-layer equalization: the float function is unchanged, channel ranges are balanced, the input is untouched."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from edgeq.equalize import _in_ranges, _out_ranges, equalize  # noqa: E402


def _outlier(model, first: str, second: str, factor: float = 1000.0, channel: int = 0) -> None:
    """Scale one output channel of ``first`` up and the matching input of Dense ``second`` down."""
    w1 = model.get_layer(first).get_weights()
    w2 = model.get_layer(second).get_weights()
    w1[0][..., channel] *= factor
    w1[1][channel] *= factor
    w2[0][channel, :] /= factor
    model.get_layer(first).set_weights(w1)
    model.get_layer(second).set_weights(w2)


def _ranges(model, first: str, second: str):
    a, b = model.get_layer(first), model.get_layer(second)
    return _out_ranges(a, a.get_weights()[0]), _in_ranges(b, b.get_weights()[0], None)


def _dense_net(lib, activation: str = "relu"):
    lib.utils.set_random_seed(1)
    return lib.Sequential([
        lib.layers.Input((16,), name="x"),
        lib.layers.Dense(12, activation=activation, name="a"),
        lib.layers.Dense(8, activation="relu", name="b"),
        lib.layers.Dense(4, name="c"),
    ], name="dense_net")


@pytest.fixture(scope="module")
def x16():
    return np.random.default_rng(0).normal(size=(64, 16)).astype("float32")


def test_dense_outlier_is_balanced_and_float_function_unchanged(x16):
    import keras

    model = _dense_net(keras)
    _outlier(model, "a", "b")
    before = model.predict(x16, verbose=0)
    original = [w.copy() for w in model.get_weights()]
    r1, r2 = _ranges(model, "a", "b")
    assert (r1 / r2).max() > 1e5  # the outlier is there

    result = equalize(model)

    after = result.model.predict(x16, verbose=0)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    e1, e2 = _ranges(result.model, "a", "b")
    np.testing.assert_allclose(e1, e2, rtol=1e-3)  # balanced: r1_i == r2_i == sqrt(r1_i * r2_i)
    np.testing.assert_allclose(e1, np.sqrt(r1 * r2), rtol=0.2)
    assert [(p.first, p.second) for p in result.pairs] == [("a", "b"), ("b", "c")]
    assert result.pairs[0].imbalance_before > 1e5 and result.pairs[0].imbalance_after < 1.01
    # the user's model is untouched
    for w, o in zip(model.get_weights(), original):
        np.testing.assert_array_equal(w, o)
    assert result.model is not model


def test_conv_pool_depthwise_flatten_dense_unchanged():
    import keras

    keras.utils.set_random_seed(2)
    model = keras.Sequential([
        keras.layers.Input((8, 8, 2), name="image"),
        keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c1"),
        keras.layers.MaxPooling2D(name="pool"),
        keras.layers.DepthwiseConv2D(3, padding="same", name="dw"),
        keras.layers.ReLU(name="relu"),
        keras.layers.Conv2D(5, 1, activation="relu", name="c2"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(3, name="head"),
    ])
    w = model.get_layer("c1").get_weights()
    w[0][..., 2] *= 300.0
    w[1][2] *= 300.0
    model.get_layer("c1").set_weights(w)
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 2)).astype("float32")
    before = model.predict(x, verbose=0)

    result = equalize(model)

    after = result.model.predict(x, verbose=0)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    pairs = {(p.first, p.second): p for p in result.pairs}
    assert set(pairs) == {("c1", "dw"), ("dw", "c2"), ("c2", "head")}
    assert pairs[("c1", "dw")].via == ("pool",)
    assert pairs[("c2", "head")].via == ("flat",)
    assert all(p.imbalance_after < 1.01 for p in result.pairs)
    assert pairs[("c1", "dw")].imbalance_before > 100


def test_relu6_and_other_activations_are_skipped_with_the_reason(x16):
    import keras

    model = _dense_net(keras, activation="relu6")
    before = model.predict(x16, verbose=0)
    result = equalize(model)
    skipped = {(s.first, s.second): s.reason for s in result.skipped}
    assert "ReLU6" in skipped[("a", "b")] and "clip" in skipped[("a", "b")]
    assert [(p.first, p.second) for p in result.pairs] == [("b", "c")]
    np.testing.assert_allclose(result.model.predict(x16, verbose=0), before, rtol=1e-4, atol=1e-5)

    model = _dense_net(keras, activation="tanh")
    skipped = {(s.first, s.second): s.reason for s in equalize(model).skipped}
    assert "tanh" in skipped[("a", "b")]


def test_a_layer_feeding_two_layers_is_not_equalized():
    import keras

    keras.utils.set_random_seed(3)
    x = keras.layers.Input((6,))
    a = keras.layers.Dense(5, activation="relu", name="a")(x)
    b = keras.layers.Dense(3, name="b")(a)
    c = keras.layers.Dense(3, name="c")(a)
    model = keras.Model(x, [b, c])
    result = equalize(model)
    assert not result.pairs  # scaling a's channels would change c's input as well


def test_tf_keras_model(x16):
    import tf_keras

    model = _dense_net(tf_keras)
    _outlier(model, "a", "b", factor=500.0, channel=3)
    before = model.predict(x16, verbose=0)
    result = equalize(model)
    assert type(result.model).__module__.startswith("tf_keras")
    np.testing.assert_allclose(result.model.predict(x16, verbose=0), before, rtol=1e-4,
                               atol=1e-4 * np.abs(before).max())
    e1, e2 = _ranges(result.model, "a", "b")
    np.testing.assert_allclose(e1, e2, rtol=1e-3)
