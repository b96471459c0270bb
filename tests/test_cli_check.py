"""The CLI of targets/check/export: exit codes, JSON, readable output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.units import fmt_bytes
from tests import check_models


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_targets_lists_profiles():
    r = _run("targets")
    assert r.exit_code == 0
    for name in ("rpi4", "cortex-m4", "esp32-s3"):
        assert name in r.output
    assert "cmsis-nn" in r.output and fmt_bytes(256 * 1024) in r.output
    doc = json.loads(_run("targets", "--json").output)
    assert doc["schema"] == "edgeq.targets/1"
    m4 = next(t for t in doc["targets"] if t["name"] == "cortex-m4")
    assert m4["kind"] == "mcu" and m4["ram_bytes"] == 256 * 1024 and m4["backend"] == "cmsis-nn"


def test_help_texts():
    for cmd in ("targets", "check", "export"):
        r = _run(cmd, "--help")
        assert r.exit_code == 0 and len(r.output) > 100


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rpi4", "cortex-m4"])
def test_demo_checks_exit_zero(digits_int8_tflite, target):
    r = _run("check", str(digits_int8_tflite), "--target", target)
    assert r.exit_code == 0, r.output
    assert f"check against {target}" in r.output and "fits" in r.output
    assert "MACs" in r.output and "estimate" in r.output


@pytest.mark.slow
def test_check_json(digits_int8_tflite):
    r = _run("check", str(digits_int8_tflite), "--target", "cortex-m4", "--json")
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["fits"] is True and d["memory"]["arena_bytes"] > 0 and d["macs"]["total"] == 25600


@pytest.mark.slow
def test_float_model_on_mcu_exits_3(digits_float_tflite):
    r = _run("check", str(digits_float_tflite), "--target", "cortex-m4")
    assert r.exit_code == 3
    assert "DOES NOT FIT" in r.output and "float-tensors" in r.output


@pytest.mark.slow
def test_big_model_exits_3_naming_flash(tmp_path):
    path = check_models.big_dense_int8(tmp_path / "big.tflite")
    r = _run("check", str(path), "--target", "cortex-m4", "--json")
    assert r.exit_code == 3
    d = json.loads(r.output)
    assert [v["code"] for v in d["violations"]] == ["flash"]
    assert "flash" in d["violations"][0]["message"]


@pytest.mark.slow
def test_crashing_model_is_reported_not_fatal(tmp_path, digits_int8_tflite):
    path = tmp_path / "crash.tflite"
    path.write_bytes(check_models.crashing_model(digits_int8_tflite.read_bytes()))
    r = _run("check", str(path), "--target", "cortex-m4")
    assert r.exit_code == 3
    assert "interpreter-crash" in r.output and "SIGFPE" in r.output


def test_errors_are_one_line(tmp_path):
    r = _run("check", str(tmp_path / "missing.tflite"), "--target", "rpi4")
    assert r.exit_code == 1 and r.output.startswith("error: ") and "no such file" in r.output
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a model at all")
    r = _run("check", str(bad), "--target", "rpi4")
    assert r.exit_code == 1 and "not a valid .tflite" in r.output
    r = _run("check", str(bad), "--target", "no-such-board")
    assert r.exit_code == 1 and "unknown target 'no-such-board'" in r.output
    assert "Traceback" not in r.output


@pytest.mark.slow
def test_export_cli(tmp_path, digits_int8_tflite):
    out = tmp_path / "c"
    r = _run("export", str(digits_int8_tflite), "--target", "cortex-m4", "--format", "c", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "kTensorArenaSize" in r.output and (out / "model_data.cc").is_file()
    r = _run("export", str(digits_int8_tflite), "--target", "rpi4", "-o", str(tmp_path / "d"))
    assert r.exit_code == 2 and not (tmp_path / "d").exists()


@pytest.mark.slow
def test_edgeq_check_process_never_imports_tensorflow(digits_int8_tflite):
    code = (
        "import sys\n"
        "from edgeq.cli import main\n"
        "try:\n"
        f"    main(['check', {str(digits_int8_tflite)!r}, '--target', 'cortex-m4'])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print('TF', 'tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "TF False" in out.stdout


@pytest.mark.slow
def test_tensor_names_cannot_drive_the_terminal(digits_float_tflite, tmp_path, ledger):
    """A tensor name is text from the model file: escape sequences in it reach the terminal escaped."""
    data = digits_float_tflite.read_bytes()
    name = b"serving_default_image:0"
    assert data.count(name) == 1
    evil = b"\x1b]0;pwned\x07\x1b[2J\r\x9b"
    crafted = tmp_path / "crafted.tflite"
    crafted.write_bytes(data.replace(name, evil + b"x" * (len(name) - len(evil))))
    r = _run("check", str(crafted), "--target", "cortex-m4", "--no-measure")
    assert r.exit_code == 3, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output and "\r" not in r.output
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x0d" in r.output
    ledger("bad_input", "escape sequences in a tensor name (edgeq check)")
