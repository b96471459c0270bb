"""`edgeq convert` on the command line (CliRunner against real files and real conversions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.cli.convert import default_output



def _run(*args: str):
    return CliRunner().invoke(main, ["convert", *args])


def test_help_does_not_import_tensorflow():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from edgeq.cli import main\n"
        "for args in (['--help'], ['convert', '--help']):\n"
        "    r = CliRunner().invoke(main, args)\n"
        "    assert r.exit_code == 0, r.output\n"
        "bad = [m for m in ('tensorflow', 'keras', 'tf_keras') if m in sys.modules]\n"
        "print('imported:', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "imported: []" in proc.stdout


def test_convert_help_lists_the_options():
    r = CliRunner().invoke(main, ["convert", "--help"])
    assert r.exit_code == 0
    for opt in ("--calib", "--target", "--samples", "--input-type", "--output-type", "--scheme", "--eval",
                "--mean", "--std", "--scale", "--report", "--json", "--seed", "--recipe", "--recipe-file",
                "--unsafe-load", "--max-drop", "--train", "--keep-best"):
        assert opt in r.output


def test_default_output_name():
    assert default_output("models/net.keras", "int8") == Path("net_int8.tflite")
    assert default_output("exported/saved_model_dir/", "int16x8") == Path("saved_model_dir_int16x8.tflite")


def test_missing_model_is_one_error_line(tmp_path):
    r = _run(str(tmp_path / "nope.keras"), "--calib", "c.npy", "-o", str(tmp_path / "o.tflite"))
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [f"error: {tmp_path / 'nope.keras'}: no such file or directory; "
                                             "check the path to the model"]
    assert list(tmp_path.iterdir()) == []


def test_bad_choice_is_a_usage_error(tmp_path):
    r = _run("m.keras", "--calib", "c.npy", "--scheme", "int4")
    assert r.exit_code == 2 and "int4" in r.output


def test_incompatible_io_type_is_a_usage_error(tmp_path, fake_keras):
    r = _run(str(fake_keras), "--calib", "c.npy", "--scheme", "int16x8", "--input-type", "uint8",
             "-o", str(tmp_path / "o.tflite"))
    assert r.exit_code == 2
    assert "error: --input-type uint8 does not go with --scheme int16x8" in r.output
    assert list(tmp_path.iterdir()) == []


def test_output_in_missing_directory(tmp_path, fake_keras):
    """-o FILE in a missing directory: the directory is created (as for every -o), the error is the model's."""
    r = _run(str(fake_keras), "--calib", "calib.npy", "-o", str(tmp_path / "no" / "o.tflite"))
    assert r.exit_code == 1
    assert "does not exist" not in r.output and "error: cannot load" in r.output
    assert (tmp_path / "no").is_dir() and list((tmp_path / "no").iterdir()) == []


@pytest.mark.slow
def test_convert_writes_model_report_and_summary(tmp_path, digits_keras, calib_npy, digits_eval_npz):
    out = tmp_path / "d.tflite"
    r = _run(str(digits_keras), "--calib", str(calib_npy), "--eval", str(digits_eval_npz), "-o", str(out),
             "--samples", "100")
    assert r.exit_code == 0, r.output
    assert out.is_file() and (tmp_path / "d.report.json").is_file()
    text = r.output
    for needle in ("wrote", "size", "float32", "ops", "CONV_2D", "input", "zero point", "fidelity",
                   "agreement", "classifier", "worst layers"):
        assert needle in text, needle
    # Quiet: no TensorFlow log lines, no progress when not on a terminal.
    assert "tensorflow" not in text.lower().replace("tensorflow's", "")
    assert "I0000" not in text and "W0000" not in text
    report = json.loads((tmp_path / "d.report.json").read_text())
    assert report["calibration"]["samples"] == 100


@pytest.mark.slow
def test_json_prints_the_report(tmp_path, digits_keras, calib_npy):
    out = tmp_path / "d.tflite"
    report_path = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["convert", str(digits_keras), "--calib", str(calib_npy), "-o", str(out),
                                  "--report", str(report_path), "--json", "--samples", "50"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data == json.loads(report_path.read_text())
    assert data["output"]["path"] == str(out) and data["fidelity"] is None
    assert not (tmp_path / "d.report.json").exists()


@pytest.mark.slow
def test_bad_calibration_shape_exits_1_and_writes_nothing(tmp_path, digits_keras):
    np.save(tmp_path / "calib.npy", np.zeros((5, 64), np.float32))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = _run(str(digits_keras), "--calib", str(tmp_path / "calib.npy"), "-o", str(out_dir / "o.tflite"))
    assert r.exit_code == 1
    assert "error: calibration data" in r.output
    assert "expected samples of shape (8, 8, 1) (rank 3), got (64,) (rank 1)" in r.output
    assert "Traceback" not in r.output
    assert list(out_dir.iterdir()) == []


@pytest.mark.slow
def test_target_rpi4(tmp_path, digits_keras, calib_npy):
    out = tmp_path / "d.tflite"
    r = _run(str(digits_keras), "--calib", str(calib_npy), "--target", "rpi4", "-o", str(out), "--samples", "50")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "d.report.json").read_text())
    assert report["target"] == "rpi4"
    assert set(report["check"]) >= {"fits", "violations", "warnings"}
    assert "check against rpi4" in r.output


def test_unknown_target_is_an_error_before_converting(tmp_path, fake_keras):
    r = _run(str(fake_keras), "--calib", "calib.npy", "--target", "no-such-board", "-o",
             str(tmp_path / "o.tflite"))
    assert r.exit_code == 1 and "error: unknown target 'no-such-board'" in r.output
    assert list(tmp_path.iterdir()) == []


def test_int16x8_refused_for_a_target_without_it(tmp_path, fake_keras):
    from edgeq.targets import list_targets

    without = [t for t in list_targets() if not t.supports_scheme("int16x8")]
    if not without:
        pytest.fail("expected at least one shipped target profile without int16x8 support")
    name = without[0].name
    r = _run(str(fake_keras), "--calib", "calib.npy", "--target", name, "--scheme", "int16x8",
             "-o", str(tmp_path / "o.tflite"))
    assert r.exit_code == 2
    assert f"target {name} does not support --scheme int16x8" in r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_h5_with_code_is_one_line_and_unsafe_load_opts_in(tmp_path, calib_npy, ledger):
    from tests import convert_models

    marker = tmp_path / "MARKER"
    model = convert_models.lambda_h5(tmp_path / "evil.h5", marker, depthwise=True)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = _run(str(model), "--calib", str(calib_npy), "-o", str(out_dir / "o.tflite"), "--samples", "10")
    assert r.exit_code == 1
    # Progress lines (stderr, not a terminal) may come first; the error is one line, the last.
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error")]
    assert r.stdout == "" and len(lines) == 1 and r.stderr.strip().splitlines()[-1] == lines[0]
    assert lines[0].startswith("error: ") and "Lambda layer 'evil'" in lines[0]
    assert "--unsafe-load" in lines[0] and "Traceback" not in r.output
    assert not marker.exists() and list(out_dir.iterdir()) == []
    r = _run(str(model), "--calib", str(calib_npy), "-o", str(out_dir / "o.tflite"), "--samples", "10",
             "--unsafe-load")
    assert r.exit_code == 0, r.output
    assert marker.exists() and (out_dir / "o.tflite").is_file()
    ledger("bad_input", "h5 with code")


@pytest.mark.slow
def test_recipe_option_and_report(tmp_path, digits_keras, calib_npy, digits_eval_npz):
    out = tmp_path / "d.tflite"
    r = _run(str(digits_keras), "--calib", str(calib_npy), "--recipe", "int4-dynamic", "-o", str(out),
             "--eval", str(digits_eval_npz), "--samples", "20")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "d.report.json").read_text())
    assert report["recipe"]["name"] == "int4-dynamic" and report["recipe"]["weights_bits"] == 4
    assert report["input_type"] == "float32" and report["calibration"]["used"] is False
    assert "recipe int4-dynamic: int4 weights per channel" in r.output and "no calibration needed" in r.output
    assert report["fidelity"][0]["top1_agreement"] > 0.8


def test_unknown_recipe_is_one_line_listing_the_known(tmp_path, fake_keras, ledger):
    r = _run(str(fake_keras), "--calib", "c.npy", "--recipe", "int3", "-o", str(tmp_path / "o.tflite"))
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown recipe 'int3'; choose one of fp32, fp16")
    assert list(tmp_path.iterdir()) == []
    ledger("bad_input", "unknown recipe name")


def test_simulated_recipe_is_refused(tmp_path, fake_keras):
    r = _run(str(fake_keras), "--calib", "c.npy", "--recipe", "sim-kmeans4", "-o", str(tmp_path / "o.tflite"))
    assert r.exit_code == 1
    assert "recipe 'sim-kmeans4' is simulated" in r.output and "never written as a .tflite" in r.output
    assert list(tmp_path.iterdir()) == []


def test_bad_recipe_file_names_file_and_key(tmp_path, fake_keras, ledger):
    bad = tmp_path / "mine.toml"
    bad.write_text('[[recipe]]\nname = "x8"\nweights_bits = 8\nactivations = "int8"\ngranularity = "per-channel"\n'
                   'quantizer = "tflite-converter"\nexecutable = true\nspeed = "fast"\n')
    r = _run(str(fake_keras), "--calib", "c.npy", "--recipe-file", str(bad), "--recipe", "x8",
             "-o", str(tmp_path / "o.tflite"))
    assert r.exit_code == 1
    assert r.output.strip() == f"error: {bad}:x8.speed: unknown key; known keys: " + ", ".join(sorted(
        ["name", "description", "weights_bits", "activations", "granularity", "block_size", "quantizer",
         "executable", "runtimes", "accelerated_on", "method", "centroids"]))
    ledger("bad_input", "recipe file with an unknown key")


def test_max_drop_needs_eval_and_train_needs_max_drop(tmp_path, fake_keras):
    r = _run(str(fake_keras), "--calib", "c.npy", "--max-drop", "1", "-o", str(tmp_path / "o.tflite"))
    assert r.exit_code == 2 and "--max-drop needs --eval" in r.output
    r = _run(str(fake_keras), "--calib", "c.npy", "--keep-best", "-o", str(tmp_path / "o.tflite"))
    assert r.exit_code == 2 and "--train and --keep-best go with --max-drop" in r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_target_check_is_composed_by_the_cli(tmp_path, digits_keras, calib_npy):
    out = tmp_path / "m4.tflite"
    r = _run(str(digits_keras), "--calib", str(calib_npy), "--target", "cortex-m4", "-o", str(out),
             "--samples", "50")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "m4.report.json").read_text())
    assert report["target"] == "cortex-m4" and report["check"]["fits"] is True
    assert "check against cortex-m4" in r.output
