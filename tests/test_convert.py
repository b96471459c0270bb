"""edgeq.convert with the real TensorFlow converter, checked with the real LiteRT interpreter."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from edgeq.calibration import DataOptions
from edgeq.convert import ConvertOptions, convert, default_report_path, model_format
from edgeq.errors import ConversionError, DataError, InputError, ModelError, UsageError
from edgeq.tflite_file import read_tflite
from tests import convert_models


def _interpreter(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    return it


def _dtypes(path: Path) -> set[str]:
    return {np.dtype(t["dtype"]).name for t in _interpreter(path).get_tensor_details()}


def _int8_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    it = _interpreter(path)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    scale, zp = inp["quantization"]
    hits = 0
    for xi, yi in zip(x, y):
        q = np.clip(np.round(xi[None] / scale + zp), -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], q)
        it.invoke()
        hits += int(it.get_tensor(out["index"])[0].argmax() == yi)
    return hits / len(y)


def _nothing_written(directory: Path) -> None:
    assert sorted(p.name for p in directory.iterdir()) == []


@pytest.fixture(scope="module")
def digits_converted(tmp_path_factory, digits_keras, calib_npy, digits_eval_npz):
    out = tmp_path_factory.mktemp("conv") / "digits_int8.tflite"
    events = []
    result = convert(digits_keras, calib_npy, out, ConvertOptions(eval_data=str(digits_eval_npz)),
                     progress=events.append)
    return result, out, events


# ---------------------------------------------------------------- fast: refused before TensorFlow


def test_missing_model(tmp_path):
    with pytest.raises(ModelError, match="nope.keras: no such file"):
        convert(tmp_path / "nope.keras", tmp_path / "c.npy", tmp_path / "o.tflite")
    _nothing_written(tmp_path)


def test_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.keras").write_text("not a zip")
    (tmp_path / "fake.h5").write_bytes(b"\x00" * 16)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "m.tflite").write_bytes(b"x")
    cases = {
        "notes.txt": "is not a model edgeq can convert",
        "fake.keras": "is not a Keras model",
        "fake.h5": "is not a Keras .h5 model",
        "empty_dir": "without saved_model.pb",
        "m.tflite": "is already a .tflite model",
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    for name, message in cases.items():
        with pytest.raises(ModelError, match=message):
            convert(tmp_path / name, tmp_path / "c.npy", tmp_path / "o.tflite")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_output_in_missing_directory(tmp_path, fake_keras):
    with pytest.raises(InputError, match=r"directory .*missing does not exist; create it"):
        convert(fake_keras, tmp_path / "c.npy", tmp_path / "missing" / "o.tflite")
    assert not (tmp_path / "missing").exists()


def test_options_that_do_not_go_together():
    with pytest.raises(UsageError, match="--input-type uint8 does not go with --scheme int16x8"):
        ConvertOptions(scheme="int16x8", input_type="uint8").resolved_io()
    with pytest.raises(UsageError, match="--output-type int16 does not go with --scheme int8"):
        ConvertOptions(output_type="int16").resolved_io()
    assert ConvertOptions(scheme="int16x8").resolved_io() == ("int16", "int16")


def test_model_format_and_report_path(tmp_path, fake_keras):
    assert model_format(fake_keras) == "keras"
    assert default_report_path("out/a.tflite") == Path("out/a.report.json")


# ---------------------------------------------------------------- slow: real conversions


@pytest.mark.slow
def test_digits_full_int8_and_accuracy_within_one_point(digits_converted, digits, digits_keras):
    import keras

    result, out, events = digits_converted
    assert _dtypes(out) <= {"int8", "int32"}
    float_acc = float(np.mean(
        keras.models.load_model(digits_keras).predict(digits["x_test"], verbose=0).argmax(1) == digits["y_test"]
    ))
    int8_acc = _int8_accuracy(out, digits["x_test"], digits["y_test"])
    assert abs(int8_acc - float_acc) <= 0.01, (float_acc, int8_acc)
    # The report's own figures agree with the independent measurement.
    fid = result.fidelity[0]
    assert fid.accuracy_quant == pytest.approx(int8_acc, abs=1e-9)
    assert fid.accuracy_float == pytest.approx(float_acc, abs=0.005)
    assert fid.top1_agreement > 0.97 and fid.sqnr_db > 20
    assert {e.stage for e in events} >= {"load", "calibrate", "convert", "evaluate"}


@pytest.mark.slow
def test_digits_report(digits_converted, calib_npy):
    result, out, _ = digits_converted
    report = json.loads(default_report_path(out).read_text())
    assert report == json.loads(json.dumps(result.to_dict()))
    assert report["schema"] == "edgeq.convert/1"
    # Numbers stay numbers: bytes as int bytes, timings as float seconds.
    assert isinstance(report["size"]["quantized_bytes"], int) and isinstance(report["size"]["float32_bytes"], int)
    assert report["timings_s"] and all(type(v) is float for v in report["timings_s"].values())
    assert report["size"]["float32_bytes_source"] == "converted"
    assert 0 < report["size"]["ratio"] < 0.6
    assert report["ops"]["CONV_2D"] == 2 and "FULLY_CONNECTED" in report["ops"]
    # Batch 1 is fixed, so Flatten is a plain RESHAPE: no shape arithmetic.
    assert report["static_shapes"] and not {"SHAPE", "STRIDED_SLICE", "PACK"} & set(report["ops"])
    assert report["inputs"][0]["name"] == "image" and report["inputs"][0]["dtype"] == "int8"
    assert report["inputs"][0]["scale"] > 0 and report["inputs"][0]["shape"] == [1, 8, 8, 1]
    assert report["calibration"]["samples"] == 200 and report["calibration"]["available"] == 400
    layers = report["worst_layers"]
    assert layers and layers[0]["rmse_over_scale"] >= layers[-1]["rmse_over_scale"]
    assert {w["op"] for w in layers} & {"CONV_2D", "FULLY_CONNECTED"}
    assert any(w["layer"] == "conv2d" for w in layers)
    assert not list(out.parent.glob(".*.tmp"))


@pytest.mark.slow
def test_int16x8_and_uint8_io(tmp_path, digits_keras, calib_npy):
    out16 = tmp_path / "d16.tflite"
    r16 = convert(digits_keras, calib_npy, out16, ConvertOptions(scheme="int16x8", data=DataOptions(samples=50)))
    assert r16.inputs[0].dtype == "int16"
    assert _dtypes(out16) <= {"int16", "int8", "int32", "int64"} and "int16" in _dtypes(out16)
    out_u8 = tmp_path / "du8.tflite"
    r8 = convert(digits_keras, calib_npy, out_u8, ConvertOptions(input_type="uint8", data=DataOptions(samples=50)))
    assert r8.inputs[0].dtype == "uint8" and r8.outputs[0].dtype == "int8"
    assert _dtypes(out_u8) <= {"int8", "int32", "uint8"}


@pytest.mark.slow
def test_legacy_h5_with_depthwise_conv(tmp_path, digits, calib_npy):
    h5 = convert_models.legacy_h5(tmp_path / "legacy.h5", digits["x_train"], digits["y_train"])
    out = tmp_path / "legacy_int8.tflite"
    result = convert(h5, calib_npy, out, ConvertOptions(data=DataOptions(samples=50)))
    # Keras 3 cannot read this DepthwiseConv2D config ("groups"), so tf_keras must have loaded it.
    assert result.model_format == "h5" and result.loader == "tf_keras"
    assert "DEPTHWISE_CONV_2D" in result.ops
    assert _dtypes(out) <= {"int8", "int32"}
    assert result.static_shapes


@pytest.mark.slow
def test_plain_saved_model_gets_batch_one(tmp_path, digits, calib_npy):
    sm = convert_models.plain_saved_model(tmp_path / "sm")
    np.savez(tmp_path / "calib.npz", pixels=digits["x_train"][:50])
    out = tmp_path / "sm_int8.tflite"
    result = convert(sm, tmp_path / "calib.npz", out)
    assert result.model_format == "saved_model"
    assert result.inputs[0].name == "pixels" and result.inputs[0].shape == (1, 8, 8, 1)
    assert result.outputs[0].name == "logits"
    assert result.static_shapes and not {"SHAPE", "STRIDED_SLICE", "PACK"} & set(result.ops)
    assert _dtypes(out) <= {"int8", "int32"}
    # The float model is always converted (once), so its size is measured, not estimated.
    assert result.float_bytes_source == "converted" and result.float_bytes > result.quant_bytes


@pytest.mark.slow
def test_two_input_model(tmp_path):
    model = convert_models.two_input_keras(tmp_path / "two.keras")
    rng = np.random.default_rng(0)
    image, extra = rng.random((60, 8, 8, 1), dtype=np.float32), rng.random((60, 4), dtype=np.float32)
    np.savez(tmp_path / "calib.npz", image=image, extra=extra)
    np.savez(tmp_path / "eval.npz", image=image[:20], extra=extra[:20], y=np.arange(20) % 3)
    out = tmp_path / "two_int8.tflite"
    result = convert(model, tmp_path / "calib.npz", out,
                     ConvertOptions(eval_data=str(tmp_path / "eval.npz"), worst_layers=0))
    assert sorted(i.name for i in result.inputs) == ["extra", "image"]
    assert _dtypes(out) <= {"int8", "int32"}
    assert result.fidelity[0].samples == 20 and result.fidelity[0].top1_agreement >= 0.8
    runner = _interpreter(out).get_signature_runner()
    got = runner(image=np.zeros((1, 8, 8, 1), np.int8), extra=np.zeros((1, 4), np.int8))
    assert next(iter(got.values())).shape == (1, 3)


# ---------------------------------------------------------------- slow: bad input, nothing written


@pytest.mark.slow
@pytest.mark.parametrize(
    "data, message",
    [
        (np.zeros((10, 8, 8), np.float32), r"expected samples of shape \(8, 8, 1\) \(rank 3\), got \(8, 8\) \(rank 2\)"),
        (np.zeros((10, 8, 8, 1), np.complex64), "complex64 cannot be safely cast"),
        (np.full((10, 8, 8, 1), np.nan, np.float32), "contains 640 NaN values"),
        (np.zeros((0, 8, 8, 1), np.float32), "holds no samples"),
    ],
    ids=["rank", "dtype", "nan", "empty"],
)
def test_bad_calibration_data(tmp_path, digits_keras, data, message):
    np.save(tmp_path / "calib.npy", data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(DataError, match=message):
        convert(digits_keras, tmp_path / "calib.npy", out_dir / "o.tflite")
    _nothing_written(out_dir)


@pytest.mark.slow
def test_unreadable_keras_file(tmp_path, calib_npy):
    (tmp_path / "broken.keras").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ModelError, match="cannot load .*broken.keras as a Keras model"):
        convert(tmp_path / "broken.keras", calib_npy, out_dir / "o.tflite")
    _nothing_written(out_dir)


@pytest.fixture(scope="module")
def vector_calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vec") / "calib.npy"
    np.save(path, np.random.default_rng(0).random((20, 8), dtype=np.float32))
    return path


@pytest.mark.slow
def test_op_without_integer_kernel_names_op_and_layer(tmp_path, vector_calib):
    model = convert_models.cos_keras(tmp_path / "cos.keras")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ConversionError) as err:
        convert(model, vector_calib, out_dir / "o.tflite")
    msg = str(err.value)
    assert "COS (layer 'weird') cannot be quantized to int8: the converter left it in float32" in msg
    # int16x8 has no COS kernel either, so it must not be suggested.
    assert "int16x8" not in msg and "replace the layer" in msg
    with pytest.raises(ConversionError, match="op COS cannot be quantized to int16x8"):
        convert(model, vector_calib, out_dir / "o.tflite", ConvertOptions(scheme="int16x8"))
    _nothing_written(out_dir)


@pytest.mark.slow
def test_op_without_builtin_kernel_names_op_and_layer(tmp_path, vector_calib):
    model = convert_models.cos_keras(tmp_path / "erf.keras", op="erf")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ConversionError, match=r"op Erf \(layer 'weird'\) has no TFLite builtin kernel"):
        convert(model, vector_calib, out_dir / "o.tflite")
    _nothing_written(out_dir)


# ---------------------------------------------------------------- targets


@pytest.mark.slow
def test_mcu_target_gets_full_integer_per_channel_and_no_check_inside(tmp_path, digits_keras, calib_npy):
    out = tmp_path / "m4.tflite"
    result = convert(digits_keras, calib_npy, out,
                     ConvertOptions(target="cortex-m4", data=DataOptions(samples=50)))
    assert result.per_channel and result.recipe.name == "int8"
    assert _dtypes(out) <= {"int8", "int32"}
    # The target check left convert(): the command line composes it (tests/test_cli_convert.py).
    assert result.target is None and result.check is None
    weights = [t for t in read_tflite(out).main.tensors
               if t.has_data and t.dtype == "int8" and t.quantization and t.quantization.is_per_channel]
    assert weights, "conv weights should carry one scale per output channel"


@pytest.mark.slow
def test_profile_without_per_channel_gets_per_tensor_weights(tmp_path, digits_keras, calib_npy):
    from edgeq.targets import load_target

    source = Path(load_target("cortex-m4").source).read_text()
    profile = tmp_path / "m4-per-tensor.toml"
    profile.write_text(source.replace('name = "cortex-m4"', 'name = "m4-per-tensor"')
                       .replace("per_channel = true", "per_channel = false"))
    out = tmp_path / "pt.tflite"
    result = convert(digits_keras, calib_npy, out, ConvertOptions(target=str(profile), data=DataOptions(samples=50)))
    assert not result.per_channel and result.recipe.name == "int8-per-tensor"
    # Read the file itself: the runtime may broadcast a per-tensor scale across channels.
    scales = [len(t.quantization.scale) for t in read_tflite(out).main.tensors if t.quantization]
    assert max(scales) == 1


def test_int16x8_refused_for_a_target_without_it(tmp_path, fake_keras):
    with pytest.raises(UsageError, match="target esp32-s3 does not support --scheme int16x8"):
        convert(fake_keras, tmp_path / "c.npy", tmp_path / "o.tflite",
                ConvertOptions(target="esp32-s3", scheme="int16x8"))
    _nothing_written(tmp_path)


# ---------------------------------------------------------------- untrusted model files (issue 11)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["h5", "h5-depthwise", "keras"])
def test_model_code_is_refused_without_unsafe_load(tmp_path, vector_calib, calib_npy, kind, ledger):
    from edgeq.convert import LoadOptions

    marker = tmp_path / "MARKER"
    if kind == "keras":
        model = convert_models.lambda_keras(tmp_path / "evil.keras", marker)
    else:
        model = convert_models.lambda_h5(tmp_path / "evil.h5", marker, depthwise=kind == "h5-depthwise")
    calib = calib_npy if kind == "h5-depthwise" else vector_calib
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ModelError, match=r"carries Python code .*--unsafe-load") as err:
        convert(model, calib, out_dir / "o.tflite")
    assert "\n" not in str(err.value)
    assert not marker.exists(), "loading the model ran the code it carries"
    _nothing_written(out_dir)
    # The explicit opt-in loads it (and so runs its code).
    result = convert(model, calib, out_dir / "o.tflite",
                     ConvertOptions(load=LoadOptions(unsafe_load=True), data=DataOptions(samples=10)))
    assert marker.exists() and result.outputs[0].shape == (1, 3)
    ledger("bad_input", f"{kind} with code")


def test_fifo_named_like_a_model_is_refused_without_blocking(tmp_path, ledger):
    fifo = tmp_path / "model.h5"
    os.mkfifo(fifo)
    with pytest.raises(ModelError, match="is not a regular file"):
        convert(fifo, tmp_path / "c.npy", tmp_path / "o.tflite")
    ledger("bad_input", "fifo as model")


@pytest.mark.slow
@pytest.mark.parametrize("config, message", [
    (None, "has no model_config: it holds weights only"),
    ("[" * 200_000 + "]" * 200_000, "model_config is not valid JSON"),
    ("{not json", "model_config is not valid JSON"),
], ids=["weights-only", "deep-nesting", "garbage"])
def test_hostile_h5_configs_are_one_line_errors(tmp_path, vector_calib, config, message, ledger):
    import h5py

    path = tmp_path / "hostile.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("w", data=np.zeros(3, np.float32))
        if config is not None:
            f.attrs["model_config"] = config
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ModelError, match=message) as err:
        convert(path, vector_calib, out_dir / "o.tflite")
    assert "\n" not in str(err.value)
    _nothing_written(out_dir)
    ledger("bad_input", f"h5 {message.split(':')[0]}")
