"""``deploy --eval`` on models that are not "one float image -> class scores": several inputs and outputs,
token-id inputs, dynamic input shapes, stateful (fused) LSTMs, and an eval .npz bomb.

Every model is built here and run by the device venv (tflite-runtime 2.14) on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.deploy import DeployOptions, deploy
from edgeq.errors import DeviceError, UsageError
from edgeq.report import render_html, render_markdown, summary_lines

RUNNER = Path(__file__).resolve().parents[2] / "deploy" / "runner.py"
FAST = {"runs": 3, "min_seconds": 0.0, "min_warmup_seconds": 0.0}


def _int8(model, dataset, float_io: bool = False) -> bytes:
    """Full-int8 TFLite from a Keras model; ``dataset`` yields what the converter feeds (a dict per sample)."""
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = dataset
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if not float_io:
        conv.inference_input_type = conv.inference_output_type = tf.int8
    return conv.convert()


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory) -> Path:
    """Inputs 'alpha' (6) and 'beta' (4); outputs a 3-class softmax head and a one-value regression head."""
    import keras

    keras.utils.set_random_seed(0)
    a = keras.layers.Input((6,), name="alpha")
    b = keras.layers.Input((4,), name="beta")
    h = keras.layers.Concatenate()([keras.layers.Dense(8, activation="relu")(a),
                                    keras.layers.Dense(8, activation="relu")(b)])
    model = keras.Model([a, b], [keras.layers.Dense(3, activation="softmax", name="cls")(h),
                                 keras.layers.Dense(1, name="reg")(h)])
    rng = np.random.default_rng(0)
    xa, xb = rng.random((40, 6), dtype=np.float32), rng.random((40, 4), dtype=np.float32)
    path = tmp_path_factory.mktemp("two_heads") / "two_heads.tflite"
    path.write_bytes(_int8(model, lambda: ({"alpha": xa[i:i + 1], "beta": xb[i:i + 1]} for i in range(40))))
    return path


def _options(tmp_path: Path, device_python: str, **kw) -> DeployOptions:
    return DeployOptions(python=device_python, remote_dir=str(tmp_path / "device"), **{**FAST, **kw})


@pytest.mark.slow
def test_two_inputs_two_outputs_per_output_fidelity(two_heads, tmp_path, device_python, ledger):
    rng = np.random.default_rng(1)
    data = tmp_path / "eval.npz"
    # Arrays named after the inputs, in another order than the model's tensors; labels for the class head.
    np.savez(data, beta=rng.random((30, 4), dtype=np.float32), alpha=rng.random((30, 6), dtype=np.float32),
             y=rng.integers(0, 3, 30), y_output_1=rng.random((30, 1), dtype=np.float32))
    res = deploy(two_heads, _options(tmp_path, device_python, eval_data=str(data), layers=2))
    assert res.layer_diff and "error" not in res.layer_diff  # the layer diff feeds both inputs too
    outs = {o["name"]: o for o in res.evaluation["outputs"]}
    assert set(outs) == {"output_0", "output_1"}
    cls, reg = outs["output_0"], outs["output_1"]
    assert cls["kind"] == "classifier" and cls["labels"] == "y" and cls["samples"] == 30
    assert 0 <= cls["accuracy"] <= 1 and cls["host_accuracy"] is not None and cls["agreement"] >= 0.9
    assert reg["kind"] == "regression" and reg["labels"] == "y_output_1"
    assert reg["accuracy"] is None and reg["agreement"] is None and reg["label_mae"] > 0
    assert reg["max_abs_diff"] is not None and reg["max_abs_diff"] < 0.1
    assert res.accuracy == cls["accuracy"] and res.agreement["output"] == "output_0"
    doc = res.to_dict()
    md = render_markdown(doc)
    assert "## Outputs" in md and md.count("| classifier |") == 1 and md.count("| regression |") == 1
    assert "Outputs" in render_html(doc)
    lines = "\n".join(summary_lines(doc))
    assert "top-1 of output output_0" in lines and "output output_1 (regression)" in lines

    # A missing input, an extra array, a mis-shaped input: one line each, naming the array.
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = {"missing beta": ({"alpha": np.zeros((3, 6), np.float32)}, "'beta'"),
             "extra gamma": ({"alpha": np.zeros((3, 6)), "beta": np.zeros((3, 4)), "gamma": np.zeros((3, 1))},
                             "'gamma'"),
             "alpha of 5": ({"alpha": np.zeros((3, 5)), "beta": np.zeros((3, 4))}, "[5]")}
    for name, (arrays, needle) in cases.items():
        path = bad / (name.replace(" ", "_") + ".npz")
        np.savez(path, **arrays)
        with pytest.raises(DeviceError) as exc:
            deploy(two_heads, _options(tmp_path, device_python, eval_data=str(path), activate=False))
        assert needle in str(exc.value) and "\n" not in str(exc.value) and "eval" in str(exc.value), name
        ledger("bad_input", f"deploy --eval: {name}")


@pytest.mark.slow
def test_token_id_inputs_pass_through(tmp_path, device_python, ledger):
    import keras

    keras.utils.set_random_seed(0)
    ids = keras.layers.Input((5,), dtype="int32", name="ids")
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 8)(ids))
    model = keras.Model(ids, keras.layers.Dense(4, activation="softmax")(h))
    x = np.random.default_rng(0).integers(0, 50, (20, 5)).astype(np.int32)
    path = tmp_path / "emb.tflite"
    path.write_bytes(_int8(model, lambda: ([x[i:i + 1]] for i in range(20))))

    # No eval data: the timing input of a not-quantized int32 input is valid ids (random -128..127 are not: the
    # GATHER of a 50-word table fails on them).
    res = deploy(path, _options(tmp_path, device_python))
    assert res.latency_ms.count >= 3
    # Ids (int64 in the file) reach the model as they are: device and host agree (to one step of the
    # int8 output: tflite-runtime 2.14 on the device, ai-edge-litert on the host).
    data = tmp_path / "ids.npz"
    np.savez(data, x=x.astype(np.int64) + 0, y=np.arange(20) % 4)
    res = deploy(path, _options(tmp_path, device_python, eval_data=str(data)))
    assert res.settings["inputs"][0]["dtype"] == "int32"
    assert res.agreement["max_abs_diff_steps"] <= 1 and res.agreement["top1"] >= 0.9
    assert res.evaluation["outputs"][0]["kind"] == "classifier"
    # Ids that are not integers are refused in one line, never truncated or scaled.
    frac = tmp_path / "frac.npz"
    np.savez(frac, x=x + 0.5)
    with pytest.raises(DeviceError, match="takes integers"):
        deploy(path, _options(tmp_path, device_python, eval_data=str(frac), activate=False))
    ledger("bad_input", "deploy --eval: fractional token ids")


@pytest.mark.slow
def test_dynamic_input_shape(tmp_path, device_python, ledger):
    import keras

    keras.utils.set_random_seed(0)
    img = keras.layers.Input((None, None, 3), name="img")
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu")(img))
    model = keras.Model(img, keras.layers.Dense(3, activation="softmax")(h))
    x = np.random.default_rng(0).random((10, 32, 32, 3), dtype=np.float32)
    path = tmp_path / "dyn.tflite"
    path.write_bytes(_int8(model, lambda: ([x[i:i + 1]] for i in range(10))))

    with pytest.raises(UsageError) as exc:  # before anything connects
        deploy(path, _options(tmp_path, device_python))
    assert "dynamic shape" in str(exc.value) and "--input-shape 1x32x32x3" in exc.value.hint
    ledger("bad_input", "deploy: dynamic input shape without --eval or --input-shape")

    data = tmp_path / "eval.npz"
    np.savez(data, x=x[:6], y=np.arange(6) % 3)
    res = deploy(path, _options(tmp_path, device_python, eval_data=str(data)))
    assert res.settings["inputs"][0]["shape"] == [1, 32, 32, 3]
    assert res.settings["resized"][0]["shape"] == [1, 32, 32, 3]
    assert res.agreement["top1"] == 1.0 and res.evaluation["samples"] == 6
    assert "input 'img' resized to 1x32x32x3 from the eval data" in render_markdown(res.to_dict())
    # An .npy is the one input of a single-input model (no labels): here at another size again.
    npy = tmp_path / "x.npy"
    np.save(npy, x[:2, :20, :28])
    res = deploy(path, _options(tmp_path, device_python, eval_data=str(npy)))
    assert res.settings["resized"][0]["shape"] == [1, 20, 28, 3] and res.evaluation["samples"] == 2
    assert res.accuracy is None and res.evaluation["outputs"][0]["labels"] is None

    res = deploy(path, _options(tmp_path, device_python, input_shapes=("img=1x24x24x3",)))
    assert res.settings["inputs"][0]["shape"] == [1, 24, 24, 3]
    assert "resized to 1x24x24x3 from --input-shape" in "\n".join(summary_lines(res.to_dict()))


LSTM_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np, tensorflow as tf, tf_keras as K
    tf.random.set_seed(0)
    stateful = sys.argv[2] == "stateful"
    # fused: a tf_keras LSTM at a fixed batch converts to one UNIDIRECTIONAL_SEQUENCE_LSTM whose state lives in
    # variable tensors, int8 inside. stateful: stateful=True keeps the state in resource variables (VAR_HANDLE);
    # float, as TensorFlow's int8 calibrator crashes on it.
    m = K.Sequential([K.layers.LSTM(8, stateful=stateful, batch_input_shape=(1, 4, 3)), K.layers.Dense(2)])
    x = np.random.RandomState(0).rand(10, 4, 3).astype("float32")
    conv = tf.lite.TFLiteConverter.from_keras_model(m)
    if not stateful:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([x[j:j + 1]] for j in range(10))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    open(sys.argv[1], "wb").write(conv.convert())
""")


def _runner_eval(device_python: str, model: Path, data: Path) -> tuple[np.ndarray, dict]:
    p = subprocess.run([device_python, str(RUNNER), "run", "--model", str(model), "--eval", str(data),
                        "--eval-only"], capture_output=True, text=True, timeout=120)
    doc = json.loads(p.stdout)
    assert doc["ok"], doc
    from edgeq.device import decode_encoded

    return decode_encoded(doc["eval"]["per_output"][0]["outputs"]), doc["eval"]


@pytest.mark.slow
@pytest.mark.parametrize("kind, op", [("fused", "UNIDIRECTIONAL_SEQUENCE_LSTM"), ("stateful", "VAR_HANDLE")])
def test_lstm_state_reset_between_samples(kind, op, tmp_path, device_python):
    path = tmp_path / "lstm.tflite"
    subprocess.run([sys.executable, "-c", LSTM_SCRIPT, str(path), kind], check=True, capture_output=True,
                   timeout=300)
    from edgeq.tflite_file import read_tflite

    assert op in read_tflite(path).op_counts
    x = np.random.default_rng(2).random((6, 4, 3), dtype=np.float32)
    forward, backward = tmp_path / "fwd.npz", tmp_path / "bwd.npz"
    np.savez(forward, x=x)
    np.savez(backward, x=x[::-1])
    a, ev = _runner_eval(device_python, path, forward)
    b, _ = _runner_eval(device_python, path, backward)
    # Each sample alone: the same output whatever ran before it (without the reset both drift).
    assert np.array_equal(a, b[::-1])
    assert ev["state_reload"] is (kind == "stateful")
    res = deploy(path, _options(tmp_path, device_python, eval_data=str(forward)))
    assert res.evaluation["state_reset"] is True and res.agreement["max_abs_diff"] < 0.05


def _npz_bomb(path: Path, declared: int) -> None:
    """An .npz whose one array declares ``declared`` bytes of zeros, compressed to a few hundred KB."""
    header = ("{'descr': '<f4', 'fortran_order': False, 'shape': (%d,), }" % (declared // 4)).encode("latin1")
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    chunk = bytes(1 << 22)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            f.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)
            for _ in range(declared // len(chunk)):
                f.write(chunk)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    _npz_bomb(path, 600 << 20)
    return path


def test_eval_npz_bomb_refused_on_the_host(bomb, fake_model, tmp_path, ledger):
    assert bomb.stat().st_size < 2 << 20
    res = CliRunner().invoke(main, ["deploy", str(fake_model), "--host", "local", "--eval", str(bomb),
                                    "--remote-dir", str(tmp_path / "device")])
    assert res.exit_code != 0 and "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(bomb) in lines[0] and "629145" in lines[0]
    assert not (tmp_path / "device").exists()  # refused before anything connected
    ledger("bad_input", "deploy --eval: .npz bomb (host)")


def test_eval_npz_bomb_refused_by_the_runner(bomb, device_python, two_heads_free_model, ledger):
    # Under a 400 MiB address-space limit (a run needs less): loading the 600 MB would fail as "out of memory";
    # the header check refuses the file before numpy allocates anything, and says why.
    p = subprocess.run(["/bin/sh", "-c", 'ulimit -v 409600; exec "$@"', "sh", device_python, str(RUNNER), "run",
                        "--model", str(two_heads_free_model), "--eval", str(bomb), "--eval-only"],
                       capture_output=True, text=True, timeout=120)
    doc = json.loads(p.stdout)
    assert doc["ok"] is False and doc["kind"] == "data", doc
    assert "declare" in doc["error"] and "629145600" in doc["error"]
    ledger("bad_input", "runner --eval: .npz bomb")


@pytest.fixture
def two_heads_free_model(model_a) -> Path:
    """A valid tiny model (checked in), so the runner gets as far as the eval data."""
    return model_a


PY38 = Path(os.environ.get("EDGEQ_DEVICE_PYTHON38") or RUNNER.parents[1] / ".venv-device38" / "bin" / "python")


@pytest.mark.slow
@pytest.mark.skipif(not PY38.exists(), reason=f"no Python 3.8 device venv at {PY38} (make device-venv-py38 "
                    "builds it when a python3.8 is on the machine; Debian bookworm packages none)")
def test_two_inputs_on_a_python38_device(two_heads, tmp_path):
    data = tmp_path / "eval.npz"
    rng = np.random.default_rng(3)
    np.savez(data, alpha=rng.random((5, 6), dtype=np.float32), beta=rng.random((5, 4), dtype=np.float32),
             y=rng.integers(0, 3, 5))
    res = deploy(two_heads, DeployOptions(python=str(PY38), remote_dir=str(tmp_path / "device"),
                                          eval_data=str(data), **FAST))
    assert res.device["python"].startswith("3.8.") and res.evaluation["state_reset"] is True
    assert [o["kind"] for o in res.evaluation["outputs"]] == ["classifier", "regression"]
