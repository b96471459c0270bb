"""edgeq check on models users bring: MobileNetV2 on microcontrollers, host-tool failures, unknown input dims.

A failure of the host's TFLite Micro on a model LiteRT runs is a warning naming
the tool, never "the device would crash"; a model both runtimes refuse (the
crafted SIGFPE model in test_check.py) stays a violation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq import check as check_mod
from edgeq.check import CheckOptions, check_model
from edgeq.cli import main
from edgeq.targets import load_target
from edgeq.tflite_file import read_tflite
from tests.tflite_models import int8_tflite

pytestmark = pytest.mark.slow


def _codes(findings) -> list[str]:
    return [f.code for f in findings]


@pytest.fixture(scope="module")
def mobilenet_v2(tmp_path_factory):
    """MobileNetV2 (alpha 0.35, 96x96) int8, untrained (weights=None), and the same with decisive logits."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), alpha=0.35, classes=10)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 96, 96, 3)).astype(np.float32)
    d = tmp_path_factory.mktemp("mnv2")
    untrained = d / "mnv2_untrained.tflite"
    untrained.write_bytes(int8_tflite(model, x))
    # An untrained MobileNetV2's activations fade to ~1e-6 by the last layer; a trained one's logits span
    # units. Scaling the classifier's weights gives the logits such a range, and nothing else changes.
    head = model.get_layer("predictions")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 1e6, bias])
    scaled = d / "mnv2.tflite"
    scaled.write_bytes(int8_tflite(model, x))
    return untrained, scaled


@pytest.fixture(scope="module")
def tiny_logits(tmp_path_factory):
    """Dense -> Softmax whose logits span ~1e-9: TFLite Micro's Softmax aborts in Prepare, LiteRT runs it."""
    import keras

    keras.utils.set_random_seed(0)
    x_in = keras.Input((8,))
    model = keras.Model(x_in, keras.layers.Dense(4, activation="softmax",
                                                 kernel_initializer=keras.initializers.RandomNormal(stddev=1e-9))(x_in))
    x = np.random.default_rng(0).uniform(-1, 1, (16, 8)).astype(np.float32)
    p = tmp_path_factory.mktemp("tiny") / "tiny_logits.tflite"
    p.write_bytes(int8_tflite(model, x))
    return p


@pytest.mark.micro
def test_mobilenet_v2_on_a_microcontroller_is_judged_not_blamed(mobilenet_v2, ledger):
    untrained, scaled = mobilenet_v2
    t = load_target("esp32-s3")
    r = check_model(read_tflite(untrained), t)
    # The host's TFLite Micro aborted here (SIGABRT) and check said "would crash the device".
    assert "interpreter-crash" not in _codes(r.violations)
    (v,) = [v for v in r.violations if v.code == "softmax-input-scale"]
    assert "untrained" in v.message and v.op == "SOFTMAX"
    assert r.memory["estimated_arena_bytes"] > 0 and r.memory.get("arena_bytes") is None
    # With logits of a trained model's range TFLite Micro loads it and measures the arena.
    r = check_model(read_tflite(scaled), t)
    assert r.violations == () or "interpreter-crash" not in _codes(r.violations)
    assert "softmax-input-scale" not in _codes(r.violations)
    assert r.memory["arena_bytes"] > 100_000, r.summary_lines()
    # The estimate is a floor of what TFLite Micro measures.
    assert check_mod.estimated_arena(read_tflite(scaled)) <= r.memory["arena_bytes"]
    ledger("fault", "MobileNetV2 on MCU: host TFLite Micro abort is not blamed on the device")


@pytest.mark.micro
def test_a_host_tool_failure_on_a_valid_model_is_a_warning_naming_the_tool(tiny_logits, monkeypatch, ledger):
    t = load_target("cortex-m4")
    r = check_model(read_tflite(tiny_logits), t)
    assert _codes(r.violations) == ["softmax-input-scale"]
    # Without the static diagnosis TFLite Micro really aborts in the child; LiteRT runs the model, so the
    # failure is the host tool's: a warning naming tflite-micro and its version, RAM judged on an estimate.
    monkeypatch.setattr(check_mod.model, "tflm_stops", lambda model: [])
    monkeypatch.setattr(check_mod.memory, "tflm_stops", lambda model: [])
    r = check_model(read_tflite(tiny_logits), t)
    assert r.fits and r.violations == ()
    (w,) = [w for w in r.warnings if w.code == "host-tool-failure"]
    assert "tflite-micro 0." in w.message and "SIGABRT" in w.message and "not a verdict on the device" in w.message
    assert r.memory["estimated_arena_bytes"] > 0
    assert any("estimated" in line for line in r.summary_lines())
    ledger("fault", "host TFLite Micro abort on a valid model is a warning")


@pytest.mark.micro
def test_a_model_both_runtimes_refuse_stays_a_violation(tmp_path, digits_int8_tflite):
    """The crafted model (a CONV_2D fed 2-D weights) kills TFLite Micro with SIGFPE; LiteRT refuses it too."""
    from tests import check_models

    p = tmp_path / "crafted.tflite"
    p.write_bytes(check_models.crashing_model(digits_int8_tflite.read_bytes()))
    r = check_model(read_tflite(p), load_target("cortex-m4"))
    (v,) = [v for v in r.violations if v.code == "interpreter-crash"]
    assert "SIGFPE" in v.message and "LiteRT also fails" in v.message and "malformed or crafted" in v.message
    assert "host-tool-failure" not in _codes(r.warnings)


@pytest.fixture(scope="module")
def dynamic_hw(tmp_path_factory):
    """A CNN with unknown batch, height and width (shape_signature -1x-1x-1x3), full int8."""
    import keras

    keras.utils.set_random_seed(0)
    x_in = keras.Input((None, None, 3), name="image")
    h = keras.layers.Conv2D(8, 3, activation="relu")(x_in)
    model = keras.Model(x_in, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(h)))
    x = np.random.default_rng(0).uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
    p = tmp_path_factory.mktemp("dyn") / "dyn.tflite"
    p.write_bytes(int8_tflite(model, x))
    return p


@pytest.mark.micro
def test_unknown_input_dims_are_checked_at_the_given_shape(dynamic_hw):
    m = read_tflite(dynamic_hw)
    assert list(m.inputs[0].shape_signature) == [-1, -1, -1, 3]
    t = load_target("cortex-m4")
    placeholder = check_model(m, t)
    (w,) = [w for w in placeholder.warnings if w.code == "dynamic-shape"]
    assert "placeholder" in w.message and "--input-shape image:" in (w.hint or "")
    assert placeholder.input_shapes[0]["source"] == "placeholder stored in the file"
    r = check_model(m, t, CheckOptions(input_shapes=(("image", (1, 32, 32, 3)),)))
    assert "dynamic-shape" not in _codes(r.warnings)
    assert r.input_shapes == ({"name": "image", "model_shape": [-1, -1, -1, 3], "shape": [1, 32, 32, 3],
                               "source": "--input-shape"},)
    conv = next(o for o in r.per_op if o.op == "CONV_2D")
    assert conv.macs == 30 * 30 * 8 * 3 * 3 * 3  # a 3x3x3 kernel at each of 30x30x8 outputs
    assert r.macs["total"] > 100 * placeholder.macs["total"]
    assert r.memory["arena_bytes"] > placeholder.memory["arena_bytes"] + 30 * 30 * 8  # measured at 32x32


@pytest.mark.micro
def test_check_cli_takes_input_shape(dynamic_hw, ledger):
    r = CliRunner().invoke(main, ["check", str(dynamic_hw), "--target", "cortex-m4", "--json",
                                  "--input-shape", "1x16x16x3"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["input_shapes"][0]["shape"] == [1, 16, 16, 3]
    for bad in ("image:1x16x16x4", "nope:1x16x16x3", "1x16x16"):
        r = CliRunner().invoke(main, ["check", str(dynamic_hw), "--target", "cortex-m4", "--input-shape", bad])
        assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
    ledger("bad_input", "check --input-shape that does not fit the model")
