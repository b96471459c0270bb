"""Models users bring: Keras 3 LSTM/GRU, a legacy fused LSTM, transformer and ConvNeXt blocks.

Every test builds its tiny model here. The RNN command-line tests run edgeq in a
child process: the failure they guard against is a segmentation fault, which
would take pytest down with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import models_zoo

pytest.importorskip("tensorflow")

from edgeq.convert import ConvertOptions, convert  # noqa: E402
from edgeq.errors import ConversionError  # noqa: E402

pytestmark = pytest.mark.slow


def _edgeq(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeq", *args], capture_output=True, text=True, timeout=timeout)


def _int8_only(report: dict) -> None:
    assert "WHILE" not in report["ops"] and "NEG" not in report["ops"]
    assert report["input_type"] == report["output_type"] == "int8"


@pytest.mark.parametrize("kind,unroll", [("lstm", False), ("gru", False), ("lstm", True)])
def test_keras3_rnn_converts_to_full_int8_and_validates(tmp_path, kind, unroll):
    # Without the rewrite, TensorFlow's calibrator segfaults on the LSTM/GRU WHILE loop (tensorflow#75140).
    model = models_zoo.keras_rnn(tmp_path / f"{kind}.keras", kind, unroll=unroll)
    calib = models_zoo.data(tmp_path / "calib.npy", (10, 4), 32, 0)
    ev = models_zoo.data(tmp_path / "eval.npz", (10, 4), 64, 1, classes=3)
    result = convert(model, calib, tmp_path / "out.tflite", ConvertOptions(eval_data=str(ev)))
    report = json.loads(Path(result.report_path).read_text())
    _int8_only(report)
    assert report["ops"]["FULLY_CONNECTED"] >= 10  # one per step: unrolled
    assert any("exported unrolled" in w for w in result.warnings) is (not unroll)
    fid = result.fidelity[0]
    assert fid.top1_agreement >= 0.9 and fid.sqnr_db > 25  # untrained: near-ties between classes


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # -11 is the segfault this guards
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def long_lstm(tmp_path_factory) -> dict[str, Path]:
    """An LSTM over 200 steps: longer than edgeq unrolls, so the loop reaches the calibrator."""
    d = tmp_path_factory.mktemp("long")
    return {"model": models_zoo.keras_rnn(d / "long.keras", "lstm", steps=200),
            "calib": models_zoo.data(d / "calib.npy", (200, 4), 8, 0),
            "eval": models_zoo.data(d / "eval.npz", (200, 4), 16, 1, classes=3)}


@pytest.mark.parametrize("repair", [False, True], ids=["convert", "convert-max-drop"])
def test_rnn_calibrator_crash_is_one_error_line(tmp_path, long_lstm, repair, ledger):
    args = ["convert", str(long_lstm["model"]), "--calib", str(long_lstm["calib"]), "-o", str(tmp_path / "o.tflite")]
    if repair:
        args += ["--eval", str(long_lstm["eval"]), "--max-drop", "2"]
    line = _one_error_line(_edgeq(*args))
    assert "calibrator crashed (SIGSEGV)" in line and "'rnn' (LSTM)" in line and "tensorflow#75140" in line
    assert "unroll=True" in line and "200" in line
    assert not (tmp_path / "o.tflite").exists()
    ledger("fault", f"rnn-calibrator-segfault-{'repair' if repair else 'convert'}")


def test_rnn_calibrator_crash_in_sweep_keeps_float_recipes(tmp_path, long_lstm, ledger):
    out = tmp_path / "sweep"
    proc = _edgeq("sweep", str(long_lstm["model"]), "--calib", str(long_lstm["calib"]), "--eval",
                  str(long_lstm["eval"]), "--target", "rpi4", "--recipes", "fp16,int8", "--output", str(out))
    assert proc.returncode in (0, 5), (proc.returncode, proc.stderr[-2000:])
    doc = json.loads((out / "sweep.json").read_text())
    rows = {r["name"]: r for r in doc["recipes"]}
    assert "calibrator crashed (SIGSEGV)" in rows["int8"]["error"] and "unroll=True" in rows["int8"]["error"]
    assert not rows["fp16"].get("error") and rows["fp16"]["size_bytes"] > 0
    ledger("fault", "rnn-calibrator-segfault-sweep")


def test_legacy_fused_lstm_state_is_reset_between_samples(tmp_path):
    # UNIDIRECTIONAL_SEQUENCE_LSTM keeps its state in variable tensors: without a reset between
    # samples every sample after the first starts from the previous one's state.
    import tf_keras

    model = models_zoo.legacy_lstm_h5(tmp_path / "legacy.h5")
    calib = models_zoo.data(tmp_path / "calib.npy", (10, 4), 32, 0)
    x = np.random.default_rng(1).normal(size=(64, 10, 4)).astype(np.float32)
    keras_model = tf_keras.models.load_model(model, compile=False)
    labels = keras_model.predict(x, verbose=0).argmax(axis=1)  # what the model says, sample by sample
    np.savez(tmp_path / "eval.npz", x=x, y=labels)
    result = convert(model, calib, tmp_path / "out.tflite", ConvertOptions(eval_data=str(tmp_path / "eval.npz")))
    assert result.loader == "tf_keras" and "UNIDIRECTIONAL_SEQUENCE_LSTM" in result.ops
    fid = result.fidelity[0]
    assert fid.accuracy_float == 1.0  # the float .tflite, run sample by sample, is the Keras model
    assert fid.accuracy_quant >= 0.95 and fid.top1_agreement >= 0.95


@pytest.mark.parametrize("build,shape", [(models_zoo.transformer_block, (8, 16)),
                                         (models_zoo.convnext_block, (16, 16, 3))],
                         ids=["transformer", "convnext"])
def test_layer_norm_blocks_convert_to_full_int8(tmp_path, build, shape):
    # Keras 3 LayerNormalization lowers to a NEG the int8 quantizer leaves in float: refused before.
    model = build(tmp_path / "m.keras")
    calib = models_zoo.data(tmp_path / "calib.npy", shape, 64, 0)
    ev = models_zoo.data(tmp_path / "eval.npz", shape, 128, 1, classes=4)
    result = convert(model, calib, tmp_path / "out.tflite", ConvertOptions(eval_data=str(ev)))
    report = json.loads(Path(result.report_path).read_text())
    _int8_only(report)
    assert {"RSQRT", "GELU", "MEAN"} <= set(report["ops"])
    assert any("LayerNormalization" in w and "without NEG" in w for w in result.warnings)
    fid = result.fidelity[0]
    assert fid.top1_agreement >= 0.95 and fid.sqnr_db > 25


@pytest.fixture
def cos_model(tmp_path) -> dict[str, Path]:
    from tests import convert_models

    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.random((20, 8), dtype=np.float32))
    np.savez(tmp_path / "eval.npz", x=rng.random((64, 8), dtype=np.float32), y=rng.integers(0, 3, 64))
    return {"model": convert_models.cos_keras(tmp_path / "cos.keras"), "calib": tmp_path / "calib.npy",
            "eval": tmp_path / "eval.npz"}


def test_max_drop_reaches_float_fallback_when_int8_cannot_be_made(tmp_path, cos_model):
    from edgeq.repair import RepairOptions, convert_with_budget

    result = convert_with_budget(cos_model["model"], cos_model["calib"], tmp_path / "o.tflite",
                                 ConvertOptions(eval_data=str(cos_model["eval"])), RepairOptions(max_drop=2.0))
    assert result.baseline.status == "failed" and "COS" in result.baseline.detail
    assert result.chosen == "float-fallback" and (tmp_path / "o.tflite").is_file()
    mixed = next(a for a in result.attempts if a.fix == "mixed-int16")
    assert mixed.status == "failed" and "left COS in float32" in mixed.detail
    assert any(ln.startswith("repair: ") and "cannot be made" in ln for ln in result.summary_lines())


def test_litert_recipe_with_int8_activations_is_checked_for_float_ops(tmp_path, cos_model):
    with pytest.raises(ConversionError, match=r"COS \(layer 'weird'\).*litert-quantizer left it in float32"):
        convert(cos_model["model"], cos_model["calib"], tmp_path / "o.tflite", ConvertOptions(recipe="int4w-int8a"))
    assert not (tmp_path / "o.tflite").exists()
