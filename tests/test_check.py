"""edgeq check: ops, types, flash, RAM (measured by TFLite Micro), MACs, crashes as findings."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from edgeq.check import CheckOptions, check_model
from edgeq.targets import load_target
from edgeq.tflite_file import read_tflite
from tests import check_models
from tests.tflite_models import int8_tflite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big_int8(tmp_path_factory):
    return check_models.big_dense_int8(tmp_path_factory.mktemp("big") / "big_int8.tflite")


@pytest.fixture(scope="module")
def topk_float(tmp_path_factory):
    return check_models.topk_float(tmp_path_factory.mktemp("topk") / "topk.tflite")


@pytest.fixture(scope="module")
def crashing(tmp_path_factory, digits_int8_tflite):
    p = tmp_path_factory.mktemp("crash") / "crash.tflite"
    p.write_bytes(check_models.crashing_model(digits_int8_tflite.read_bytes()))
    return p


def _tflm_arena_directly(path) -> int:
    """Ask TFLite Micro for the arena without edgeq: its recording allocator prints to stderr."""
    code = (
        "from tflite_micro.python.tflite_micro import runtime\n"
        f"i = runtime.Interpreter.from_file({str(path)!r}, arena_size=1 << 22)\n"
        "i.print_allocations()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return int(re.search(r"Arena allocation total (\d+) bytes", out.stderr + out.stdout).group(1))


@pytest.mark.micro
def test_int8_digits_fit_cortex_m4_with_the_arena_tflm_records(digits_int8_tflite):
    r = check_model(read_tflite(digits_int8_tflite), load_target("cortex-m4"))
    assert r.fits, r.summary_lines()
    assert r.violations == ()
    assert r.memory["arena_bytes"] == _tflm_arena_directly(digits_int8_tflite)
    assert r.memory["recommended_arena_bytes"] >= r.memory["arena_bytes"] * 1.2
    assert r.memory["recommended_arena_bytes"] % 16 == 0
    assert "upper bound" in r.memory["arena_note"] and "64-bit" in r.memory["arena_note"]
    d = r.to_dict()
    assert {"fits", "violations", "warnings", "memory", "macs", "estimate"} <= set(d)
    assert d["estimate"]["label"] == "estimate" and d["estimate"]["latency_ms"] > 0


def test_int8_digits_fit_rpi4(digits_int8_tflite):
    r = check_model(read_tflite(digits_int8_tflite), load_target("rpi4"))
    assert r.fits, r.summary_lines()
    assert r.memory["interpreter_bytes"] > 0
    assert "arena_bytes" not in r.memory
    # int8 SOFTMAX is not in XNNPACK's quantized list: a warning, not a violation.
    assert any(w.code == "reference-kernel" and w.op == "SOFTMAX" for w in r.warnings)


def test_macs_match_a_hand_count(digits_int8_tflite):
    # conv 3x3x1->8 on 8x8: 8*8*8 * 9*1 = 4608; conv 3x3x8->16 on 4x4: 4*4*16 * 9*8 = 18432;
    # dense 256->10: 2560.
    r = check_model(read_tflite(digits_int8_tflite), load_target("cortex-m4"), CheckOptions(measure=False))
    per = [(o.op, o.macs) for o in r.per_op if o.macs]
    assert per == [("CONV_2D", 4608), ("CONV_2D", 18432), ("FULLY_CONNECTED", 2560)]
    assert r.macs["total"] == 4608 + 18432 + 2560
    assert r.macs["elementwise"] > 0  # pooling and softmax counted apart from MACs


def test_big_int8_model_does_not_fit_cortex_m4_flash(big_int8):
    r = check_model(read_tflite(big_int8), load_target("cortex-m4"), CheckOptions(invoke=False))
    assert not r.fits
    codes = [v.code for v in r.violations]
    assert codes == ["flash"]
    assert "flash" in r.violations[0].message and "768.0 KiB" in r.violations[0].message
    assert r.memory["flash_needed_bytes"] == big_int8.stat().st_size + load_target("cortex-m4").runtime_flash_bytes
    assert r.macs["total"] == 1024 * 2048 + 2048 * 10


def test_float_model_on_mcu_is_a_violation(digits_float_tflite):
    r = check_model(read_tflite(digits_float_tflite), load_target("cortex-m7"))
    assert not r.fits
    assert "float-tensors" in [v.code for v in r.violations]
    assert r.scheme == "float32"


def test_every_problem_is_reported_at_once(topk_float):
    r = check_model(read_tflite(topk_float), load_target("cortex-m4"))
    codes = {v.code for v in r.violations}
    assert {"unsupported-op", "float-tensors"} <= codes
    (op,) = [v for v in r.violations if v.code == "unsupported-op"]
    assert op.op == "TOPK_V2" and "TOPK_V2" in op.message
    # The same model is fine on a Pi: LiteRT has TOPK_V2 and float kernels.
    assert check_model(read_tflite(topk_float), load_target("rpi5")).fits


def test_unsupported_dtype_is_named(digits_int8_tflite, tmp_path):
    # A runtime whose SOFTMAX kernel takes float32 only: the int8 SOFTMAX must be named.
    from dataclasses import replace
    from types import MappingProxyType

    from edgeq.targets import OpSupport

    t = load_target("cortex-m4")
    ops = dict(t.ops)
    ops["SOFTMAX"] = OpSupport("SOFTMAX", "AddSoftmax", ("float32",))
    r = check_model(read_tflite(digits_int8_tflite), replace(t, ops=MappingProxyType(ops)),
                    CheckOptions(measure=False))
    (v,) = r.violations
    assert v.code == "unsupported-dtype" and v.op == "SOFTMAX" and "int8" in v.message


@pytest.mark.micro
def test_a_model_that_crashes_the_interpreter_is_a_finding(crashing):
    t0 = time.monotonic()
    r = check_model(read_tflite(crashing), load_target("cortex-m4"))
    assert time.monotonic() - t0 < 30
    assert not r.fits
    (v,) = [v for v in r.violations if v.code == "interpreter-crash"]
    assert "SIGFPE" in v.message


def test_check_does_not_import_tensorflow_and_is_fast(digits_int8_tflite):
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from edgeq.check import check_model\n"
        "from edgeq.targets import load_target\n"
        "from edgeq.tflite_file import read_tflite\n"
        f"r = check_model(read_tflite({str(digits_int8_tflite)!r}), load_target('rpi4'))\n"
        "assert r.fits\n"
        "print(time.perf_counter() - t)\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    seconds, imported = out.stdout.strip().splitlines()
    assert imported == "False False"
    assert float(seconds) < 5.0


@pytest.fixture(scope="module")
def digits_int16x8_tflite(tmp_path_factory, digits_keras, digits):
    """The digits CNN with int16 activations and int8 weights (TensorFlow's converter directly)."""
    import tensorflow as tf

    model = tf.keras.models.load_model(digits_keras)
    path = tmp_path_factory.mktemp("i16") / "model_int16x8.tflite"
    path.write_bytes(int8_tflite(model, digits["x_train"][:50], int16_activations=True))
    return path


def test_xnnpack_delegation_is_measured_int8_accelerated(digits_int8_tflite):
    r = check_model(read_tflite(digits_int8_tflite), load_target("rpi4"))
    a = r.acceleration
    assert a["measured"] and "delegation measured" in a["basis"]
    assert a["accelerated"] and a["macs_share"] == 1.0
    # LiteRT's XNNPACK delegate leaves the int8 SOFTMAX on built-in kernels (measured, not from the table).
    assert [e["op"] for e in a["off_fast_path"]] == ["SOFTMAX"] and not a["all_ops"]
    assert r.to_dict()["acceleration"] == a
    # The measurement decides, not the table: with an empty kernel table the delegate still took the convs.
    from dataclasses import replace
    from types import MappingProxyType

    blank = replace(load_target("rpi4"), accelerated=MappingProxyType({}))
    assert check_model(read_tflite(digits_int8_tflite), blank).acceleration["accelerated"]
    assert not check_model(read_tflite(digits_int8_tflite), blank, CheckOptions(measure=False)).acceleration["accelerated"]


def test_int16_activations_on_a_pi_are_not_accelerated(digits_int16x8_tflite):
    r = check_model(read_tflite(digits_int16x8_tflite), load_target("rpi4"))
    assert r.fits  # LiteRT runs it, on its built-in kernels
    a = r.acceleration
    assert a["measured"] and not a["accelerated"] and a["macs_share"] == 0.0
    assert {"CONV_2D", "FULLY_CONNECTED"} <= {e["op"] for e in a["off_fast_path"]}
    (w,) = [w for w in r.warnings if w.code == "not-accelerated"]
    assert "not accelerated" in w.message and "XNNPACK" in w.message
    assert "  fast kernels: 0% of the MACs on XNNPACK (NOT accelerated; measured)" in r.summary_lines()


def test_mcu_acceleration_comes_from_the_kernel_table(digits_int8_tflite, digits_int16x8_tflite,
                                                      digits_float_tflite):
    m4 = load_target("cortex-m4")
    a = check_model(read_tflite(digits_int8_tflite), m4, CheckOptions(measure=False)).acceleration
    assert a["accelerated"] and not a["measured"] and "kernel table" in a["basis"]
    # CMSIS-NN has int16 conv/FC kernels; ESP-NN has none (every MAC off the fast path).
    assert check_model(read_tflite(digits_int16x8_tflite), m4, CheckOptions(measure=False)).acceleration["accelerated"]
    esp = check_model(read_tflite(digits_int16x8_tflite), load_target("esp32-s3"), CheckOptions(measure=False))
    assert not esp.acceleration["accelerated"] and esp.acceleration["macs_share"] == 0.0
    f = check_model(read_tflite(digits_float_tflite), m4, CheckOptions(measure=False))
    assert not f.fits and not f.acceleration["accelerated"]


def test_delegated_nodes_walks_back_from_each_partition():
    from edgeq._device.measure import delegated_nodes

    # 0: a -> b, 1: b -> c (delegated together), 2: c -> d (not), 3: DELEGATE(a, w -> c)
    ops = [{"index": 0, "op_name": "CONV_2D", "inputs": [0, 5], "outputs": [1]},
           {"index": 1, "op_name": "MAX_POOL_2D", "inputs": [1], "outputs": [2]},
           {"index": 2, "op_name": "SOFTMAX", "inputs": [2], "outputs": [3]},
           {"index": 3, "op_name": "DELEGATE", "inputs": [0, 5], "outputs": [2]}]
    d = delegated_nodes(ops)
    assert d["delegated"] == [0, 1] and d["not_delegated"] == [[2, "SOFTMAX"]] and d["partitions"] == 1
