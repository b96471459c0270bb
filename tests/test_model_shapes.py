"""Models whose inputs and outputs are not one float image -> class scores (real tiny models, real conversions).

Integer token inputs, several inputs and outputs (a class head beside a
regression head), segmentation maps, unknown height and width, and a model
int8 destroys (the collapsed-model warning).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.calibration import InputSpec, concrete_inputs, parse_input_shape
from edgeq.cli import main
from edgeq.errors import UsageError
from edgeq.fidelity import BINARY, CLASSIFIER, REGRESSION, SEGMENTATION, assign_labels, compare, output_kind
from edgeq.tflite_file import read_tflite


def _convert(*args: str):
    return CliRunner().invoke(main, ["convert", *args])


def _report(out) -> dict:
    return json.loads(out.with_name(out.stem + ".report.json").read_text())


def _float_tensors(path) -> list[str]:
    m = read_tflite(path)
    return [t.name for t in m.main.tensors if t.dtype in ("float32", "float16")]


# ---------------------------------------------------------------- the rule, without TensorFlow


def test_output_kind_rule():
    assert output_kind((10, 5)) == CLASSIFIER
    assert output_kind((10, 8, 8, 3)) == SEGMENTATION
    # (N, 1) is a regression head unless its labels are 0/1 and its values probabilities.
    assert output_kind((4, 1)) == REGRESSION
    assert output_kind((4, 1), np.array([0.5, 2.0, 3.1, 7.0])) == REGRESSION
    assert output_kind((4, 1), np.array([0, 1, 1, 0])) == BINARY
    assert output_kind((4, 1), np.array([0, 1, 1, 0]), np.array([[0.1], [3.0], [0.2], [0.9]])) == REGRESSION
    assert output_kind((4, 8, 8, 1)) == REGRESSION


def test_compare_judges_each_kind_by_its_own_metric():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 4))
    c = compare(scores, scores + 0.01, labels=scores.argmax(axis=1))
    assert c.kind == CLASSIFIER and c.agreement == 1.0 and c.accuracy_reference == 1.0
    # Labels that are not class ids of this output give no accuracy.
    assert compare(scores, scores, labels=np.full(50, 7)).accuracy_reference is None
    reg = rng.normal(size=(50, 1)) * 10
    c = compare(reg, reg + 0.5, labels=reg[:, 0] + 1.0)
    assert c.kind == REGRESSION and c.agreement is None and c.accuracy_reference is None
    assert c.label_mae_reference == pytest.approx(1.0) and c.label_mae_candidate == pytest.approx(0.5)
    assert c.max_abs_error == pytest.approx(0.5) and c.sqnr_db is not None
    seg = rng.normal(size=(3, 4, 4, 5))
    seg2 = seg.copy()
    seg2[0, 0, 0, (seg[0, 0, 0].argmax() + 1) % 5] = 100.0  # one pixel changes class
    c = compare(seg, seg2, labels=seg.argmax(axis=-1))
    assert c.kind == SEGMENTATION and c.agreement == pytest.approx(1 - 1 / 48) and c.accuracy_reference == 1.0


def test_shared_labels_go_to_the_head_they_are_class_ids_for():
    shapes = {"out_reg": (6, 1), "out_cls": (6, 3)}
    y = np.array([0, 1, 2, 0, 1, 2])
    assert {k: v[0] for k, v in assign_labels(shapes, y).items()} == {"out_cls": "y"}
    got = assign_labels(shapes, y, {"out_reg": np.arange(6.0)})
    assert got["out_reg"][0] == "y_out_reg" and got["out_cls"][0] == "y"


def test_input_shape_option_syntax_and_fit():
    assert parse_input_shape("image:1x32x32x3") == ("image", (1, 32, 32, 3))
    assert parse_input_shape("1X8x8x1") == (None, (1, 8, 8, 1))
    for bad in ("image:", "image:1x0x3", "2x8x8x3", "image:1xAx3", "1x70000x1x1", "", "1x\u00b2x1"):
        with pytest.raises(UsageError):
            parse_input_shape(bad)
    spec = InputSpec("image", (None, None, None, 3))
    specs, records = concrete_inputs([spec], [(None, (1, 16, 12, 3))])
    assert specs[0].shape == (1, 16, 12, 3) and records[0]["source"] == "--input-shape"
    for given in ([("image", (1, 16, 16, 4))], [("other", (1, 16, 16, 3))], [(None, (1, 16, 3))]):
        with pytest.raises(UsageError):
            concrete_inputs([spec], given)


# ---------------------------------------------------------------- real models


def _save(model, tmp_path, name):
    path = tmp_path / f"{name}.keras"
    model.save(path)
    return path


@pytest.mark.slow
def test_integer_token_inputs_pass_through_unquantized(tmp_path, ledger):
    """Embedding on int32 token ids: convert --eval used to divide by the input's zero scale and exit 70."""
    import keras

    keras.utils.set_random_seed(0)
    tokens = keras.Input((16,), dtype="int32", name="tokens")
    # Wide initial ranges, so the untrained model's class scores are decisive rather than near-ties.
    h = keras.layers.Embedding(50, 8, embeddings_initializer=keras.initializers.RandomUniform(-3, 3))(tokens)
    h = keras.layers.GlobalAveragePooling1D()(h)
    head = keras.layers.Dense(4, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(stddev=3))
    model = keras.Model(tokens, head(h))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, size=(120, 16)).astype(np.int32)
    y = model.predict(x, verbose=0).argmax(axis=1)
    path = _save(model, tmp_path, "embed")
    np.save(tmp_path / "calib.npy", x[:60])
    np.savez(tmp_path / "eval.npz", tokens=x[60:], y=y[60:])
    out = tmp_path / "embed_int8.tflite"
    r = _convert(str(path), "--calib", str(tmp_path / "calib.npy"), "--eval", str(tmp_path / "eval.npz"),
                 "--scale", "0.5", "-o", str(out))  # --scale normalises float inputs; token ids are left alone
    assert r.exit_code == 0, r.output
    report = _report(out)
    (inp,) = report["inputs"]
    assert inp["dtype"] == "int32" and not inp["scale"]
    assert "GATHER" in report["ops"] and _float_tensors(out) == []  # full int8 around the int32 ids
    (fid,) = report["fidelity"]
    assert fid["kind"] == "classifier" and fid["top1_agreement"] >= 0.9 and fid["accuracy_float"] == 1.0
    ledger("bad_input", "integer token inputs in convert --eval")


@pytest.mark.slow
def test_two_inputs_two_outputs_get_fidelity_per_output(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 1), name="image")
    meta = keras.Input((4,), name="meta")
    h = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, activation="relu")(image))
    h = keras.layers.Concatenate()([h, keras.layers.Dense(8, activation="relu")(meta)])
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(h)
    reg = keras.layers.Dense(1, name="reg")(h)
    model = keras.Model({"image": image, "meta": meta}, {"cls": cls, "reg": reg})
    rng = np.random.default_rng(1)
    xi = rng.uniform(0, 1, (80, 8, 8, 1)).astype(np.float32)
    xm = rng.uniform(-1, 1, (80, 4)).astype(np.float32)
    pred = model.predict({"image": xi, "meta": xm}, verbose=0)
    y = pred["cls"].argmax(axis=1)
    path = _save(model, tmp_path, "two")
    np.savez(tmp_path / "calib.npz", image=xi[:40], meta=xm[:40])
    out = tmp_path / "two_int8.tflite"
    # Labels for the class head in 'y'; the regression head's targets in y_<output name>.
    r = _convert(str(path), "--calib", str(tmp_path / "calib.npz"), "-o", str(out),
                 "--eval", str(_eval_npz(tmp_path, model, xi[40:], xm[40:], y[40:], pred["reg"][40:, 0] + 0.25)))
    assert r.exit_code == 0, r.output
    fid = {f["name"]: f for f in _report(out)["fidelity"]}
    assert len(fid) == 2
    c = next(f for f in fid.values() if f["kind"] == "classifier")
    g = next(f for f in fid.values() if f["kind"] == "regression")
    assert c["top1_agreement"] >= 0.8 and c["accuracy_float"] == 1.0 and c["labels"] == "y"
    # A regression head is not a binary classifier: no top-1, no accuracy; error statistics and MAE vs targets.
    assert g["top1_agreement"] is None and g["accuracy_float"] is None and g["pixel_agreement"] is None
    assert g["max_abs_error"] >= 0 and g["mean_abs_error"] is not None and g["sqnr_db"] is not None
    assert set(fid) == {"cls", "reg"} and g["labels"] == "y_reg"
    assert g["mae_float"] == pytest.approx(0.25, abs=1e-3)
    assert "agreement" in r.output and "regression" in r.output


def _eval_npz(tmp_path, model, xi, xm, y, targets):
    """An evaluation .npz: the inputs by name, class ids in 'y', the regression targets in 'y_reg'.

    A Keras model with dict outputs keeps their keys ("cls", "reg") as the converted model's output names.
    """
    path = tmp_path / "eval.npz"
    np.savez(path, image=xi, meta=xm, y=y, y_reg=targets)
    return path


@pytest.mark.slow
def test_segmentation_map_gets_per_pixel_agreement(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    x_in = keras.Input((8, 8, 3), name="image")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x_in)
    model = keras.Model(x_in, keras.layers.Conv2D(4, 1, activation="softmax")(h))
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (40, 8, 8, 3)).astype(np.float32)
    y = model.predict(x, verbose=0).argmax(axis=-1)
    path = _save(model, tmp_path, "seg")
    np.save(tmp_path / "calib.npy", x[:20])
    np.savez(tmp_path / "eval.npz", x=x[20:], y=y[20:])
    out = tmp_path / "seg_int8.tflite"
    r = _convert(str(path), "--calib", str(tmp_path / "calib.npy"), "--eval", str(tmp_path / "eval.npz"),
                 "-o", str(out))
    assert r.exit_code == 0, r.output
    (fid,) = _report(out)["fidelity"]
    assert fid["kind"] == "segmentation" and fid["top1_agreement"] is None
    assert fid["pixel_agreement"] >= 0.8 and fid["accuracy_float"] == 1.0


@pytest.mark.slow
def test_unknown_height_and_width_take_the_calibration_shape_or_input_shape(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    x_in = keras.Input((None, None, 3), name="image")
    h = keras.layers.Conv2D(4, 3, activation="relu")(x_in)
    model = keras.Model(x_in, keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(h)))
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (30, 16, 12, 3)).astype(np.float32)
    path = _save(model, tmp_path, "dyn")
    np.save(tmp_path / "calib.npy", x)
    out = tmp_path / "dyn_int8.tflite"
    r = _convert(str(path), "--calib", str(tmp_path / "calib.npy"), "--eval", str(tmp_path / "calib.npy"),
                 "-o", str(out))
    assert r.exit_code == 0, r.output
    report = _report(out)
    assert report["inputs"][0]["shape"] == [1, 16, 12, 3] and report["static_shapes"] is True
    assert report["input_shapes"] == [{"name": "image", "model_shape": [-1, -1, -1, 3], "shape": [1, 16, 12, 3],
                                       "source": "calibration data"}]
    assert "from calibration data" in r.output
    # --input-shape wins; calibration data of another size is then an error naming both.
    r = _convert(str(path), "--calib", str(tmp_path / "calib.npy"), "--input-shape", "image:1x8x8x3",
                 "-o", str(out))
    assert r.exit_code != 0 and "(8, 8, 3)" in r.output and "(16, 12, 3)" in r.output
    np.save(tmp_path / "calib8.npy", x[:, :8, :8])
    r = _convert(str(path), "--calib", str(tmp_path / "calib8.npy"), "--input-shape", "image:1x8x8x3",
                 "-o", str(out))
    assert r.exit_code == 0, r.output
    assert _report(out)["input_shapes"][0]["source"] == "--input-shape"
    assert _report(out)["inputs"][0]["shape"] == [1, 8, 8, 3]
    r = _convert(str(path), "--calib", str(tmp_path / "calib8.npy"), "--input-shape", "image:1x8x8", "-o", str(out))
    assert r.exit_code == 2 and "does not fit" in r.output


@pytest.mark.slow
def test_a_collapsed_conversion_warns_and_names_max_drop(tmp_path, digits_keras, digits, ledger):
    """One calibration sample with an outlier pixel stretches the input scale until int8 sees only zeros."""
    calib = digits["x_train"][:100].copy()
    calib[0, 0, 0, 0] = 1e4
    np.save(tmp_path / "calib.npy", calib)
    np.savez(tmp_path / "eval.npz", x=digits["x_test"][:200], y=digits["y_test"][:200])
    out = tmp_path / "digits_int8.tflite"
    r = CliRunner().invoke(main, ["convert", str(digits_keras), "--calib", str(tmp_path / "calib.npy"),
                                  "--eval", str(tmp_path / "eval.npz"), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = _report(out)
    fid = report["fidelity"][0]
    assert fid["accuracy_float"] - fid["accuracy_int"] > 0.3  # the premise: int8 destroyed it
    (warning,) = [w for w in report["warnings"] if "has collapsed" in w]
    assert "--max-drop" in warning and "points of accuracy" in warning
    assert "--max-drop" in r.stderr and json.loads(r.stdout)["warnings"] == report["warnings"]
    # The threshold is the user's: a loss within --warn-drop is not a warning.
    r = CliRunner().invoke(main, ["convert", str(digits_keras), "--calib", str(tmp_path / "calib.npy"),
                                  "--eval", str(tmp_path / "eval.npz"), "-o", str(out), "--warn-drop", "100"])
    assert r.exit_code == 0 and "has collapsed" not in r.output and "has collapsed" not in r.stderr
    ledger("fault", "collapsed int8 conversion is a warning")


@pytest.mark.slow
def test_a_collapsed_qat_model_warns_and_names_max_drop(tmp_path, ledger):
    """Fine-tuning at an absurd learning rate wrecks the model: edgeq qat says so instead of a quiet success."""
    import keras
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype("float32")
    y = d.target.astype("int64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Input((64,), name="pixels"), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:1200], y[:1200], epochs=5, batch_size=64, verbose=0)
    model.save(tmp_path / "tiny.keras")
    np.save(tmp_path / "calib.npy", x[:200])
    np.savez(tmp_path / "train.npz", x=x[:1200], y=y[:1200])
    np.savez(tmp_path / "eval.npz", x=x[1200:], y=y[1200:])
    out = tmp_path / "qat.tflite"
    r = CliRunner().invoke(main, ["qat", str(tmp_path / "tiny.keras"), "--train", str(tmp_path / "train.npz"),
                                  "--calib", str(tmp_path / "calib.npy"), "--eval", str(tmp_path / "eval.npz"),
                                  "-o", str(out), "--epochs", "1", "--learning-rate", "1000", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.with_name("qat.report.json").read_text())
    assert doc["qat"]["float"] - doc["qat"]["qat"]["accuracy"] > 20  # the premise: training wrecked it
    (warning,) = doc["warnings"]
    assert "has collapsed" in warning and "--max-drop" in warning
    # On stderr, so --json output stays one document and the warning is still seen.
    assert json.loads(r.stdout)["warnings"] == [warning]
    assert "warning: " in r.stderr and "--max-drop" in r.stderr
    r = CliRunner().invoke(main, ["qat", str(tmp_path / "tiny.keras"), "--train", str(tmp_path / "train.npz"),
                                  "--calib", str(tmp_path / "calib.npy"), "--eval", str(tmp_path / "eval.npz"),
                                  "-o", str(out), "--epochs", "1", "--learning-rate", "1000", "--warn-drop", "100"])
    assert r.exit_code == 0 and "warning:" not in r.output, r.output
    ledger("fault", "collapsed QAT model is a warning")
