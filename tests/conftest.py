"""Shared fixtures: real, tiny models and data made in the test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def digits() -> dict[str, np.ndarray]:
    """scikit-learn's digits as 8x8x1 float32 images in [0, 1], split 70/30 (seeded)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype("float32") / 16.0)[..., None]
    y = d.target.astype("int64")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    n = int(len(x) * 0.7)
    return {"x_train": x[:n], "y_train": y[:n], "x_test": x[n:], "y_test": y[n:]}


@pytest.fixture(scope="session")
def digits_keras(tmp_path_factory, digits) -> Path:
    """A small CNN trained on digits for a few seconds, saved as ``.keras``."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Input((8, 8, 1), name="image"),
            tf.keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            tf.keras.layers.MaxPooling2D(),
            tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(digits["x_train"], digits["y_train"], epochs=15, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("digits") / "model.keras"
    model.save(path)
    return path


@pytest.fixture(scope="session")
def digits_int8_tflite(tmp_path_factory, digits_keras, digits) -> Path:
    """The digits CNN as a full-int8 ``.tflite``, made with TensorFlow's converter directly."""
    import tensorflow as tf

    from tests.tflite_models import int8_tflite

    model = tf.keras.models.load_model(digits_keras)
    path = tmp_path_factory.mktemp("digits_int8") / "model_int8.tflite"
    path.write_bytes(int8_tflite(model, digits["x_train"][:200]))
    return path


@pytest.fixture(scope="session")
def digits_float_tflite(tmp_path_factory, digits_keras) -> Path:
    """The digits CNN as a float32 ``.tflite`` (no quantization)."""
    import tensorflow as tf

    model = tf.keras.models.load_model(digits_keras)
    path = tmp_path_factory.mktemp("digits_f32") / "model_f32.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


@pytest.fixture(scope="session")
def digits_eval_npz(tmp_path_factory, digits) -> Path:
    """Held-out digits as ``eval.npz`` with ``x`` (float32) and ``y`` labels."""
    path = tmp_path_factory.mktemp("digits_eval") / "eval.npz"
    np.savez(path, x=digits["x_test"], y=digits["y_test"])
    return path


@pytest.fixture(scope="session")
def calib_npy(tmp_path_factory, digits) -> Path:
    """400 training digits as a calibration ``.npy`` (first axis = samples)."""
    path = tmp_path_factory.mktemp("calib") / "calib.npy"
    np.save(path, digits["x_train"][:400])
    return path


@pytest.fixture
def fake_keras(tmp_path_factory) -> Path:
    """Passes the cheap format check (a zip header) but is no model: for errors raised before loading."""
    path = tmp_path_factory.mktemp("fake") / "fake.keras"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 28)
    return path


@pytest.fixture(scope="session")
def device_python() -> str:
    """The device side: a venv with only numpy<2 and tflite-runtime (``make device-venv``)."""
    path = os.environ.get("EDGEQ_DEVICE_PYTHON") or str(ROOT / ".venv-device" / "bin" / "python")
    if not Path(path).exists():
        pytest.fail(f"device python {path} is missing; run `make device-venv` or set EDGEQ_DEVICE_PYTHON")
    return path


# ------------------------------------------------------------------ the ledger

_RECORDS: list[tuple[str, str, str]] = []  # (nodeid, kind, name)
_FAILED: set[str] = set()


@pytest.fixture
def ledger(request):
    """Record what a test injected: ``ledger("fault", name)``, ``ledger("bad_input", name)``,
    ``ledger("model_kept", name)`` after checking the active model survived.

    Call it only after the test's own assertions ran (or at the top: a test that then fails is
    counted as not survived / not handled). A bad input is "handled" when the test that tried it
    passed, and such tests assert the one-line ``error:`` (no traceback) themselves, so a
    failed bad-input test counts as a traceback."""

    def record(kind: str, name: str) -> None:
        _RECORDS.append((request.node.nodeid, kind, name))

    return record


def pytest_runtest_logreport(report):
    if report.failed:
        _FAILED.add(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    if not _RECORDS:
        return

    def count(kind: str, passed: bool | None = None) -> int:
        return sum(1 for node, k, _ in _RECORDS if k == kind and (passed is None or (node not in _FAILED) == passed))

    def kinds(kind: str) -> list[str]:
        return sorted({name for _, k, name in _RECORDS if k == kind})

    # A fault test that failed may have left a device without its active model: count it as lost,
    # so the ledger can only under-report survival, never over-report it.
    lost = len({node for node, k, _ in _RECORDS if k == "fault" and node in _FAILED})
    doc = {"faults_injected": count("fault"), "faults_survived": count("fault", passed=True),
           "fault_kinds": kinds("fault"),
           "bad_inputs_tried": count("bad_input"), "bad_inputs_handled": count("bad_input", passed=True),
           "bad_input_kinds": kinds("bad_input"),
           "tracebacks": count("bad_input", passed=False),
           "active_model_checks_passed": count("model_kept", passed=True), "models_lost": lost}
    terminalreporter.write_sep("-", "edgeq reliability ledger")
    terminalreporter.write_line(json.dumps(doc, indent=1))
    out = os.environ.get("EDGEQ_RELIABILITY_OUT")
    if out:
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")
