"""``edgeq sweep`` on the command line: one-line errors naming file:key, a user's recipe file, exit code 5."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeq.cli import main

MY_RECIPES = '''
[[recipe]]
name = "my-int8"
description = "my full integer int8"
weights_bits = 8
activations = "int8"
granularity = "per-channel"
quantizer = "tflite-converter"
executable = true
runtimes = ["litert", "tflite-runtime", "tflm"]
accelerated_on = ["xnnpack", "cmsis-nn"]

[[recipe]]
name = "my-fp32"
weights_bits = 32
activations = "float"
granularity = "per-tensor"
quantizer = "tflite-converter"
executable = true
runtimes = ["litert", "tflite-runtime"]
'''


def _run(*args: str):
    return CliRunner().invoke(main, ["sweep", *args], catch_exceptions=False)


def _one_error_line(result) -> str:
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def _args(model, tmp_path, *extra):
    return (str(model), "--calib", "c.npy", "--eval", "e.npz", "--target", "rpi4", "-o", str(tmp_path / "o"), *extra)


def test_unknown_recipe_name_is_one_line_naming_the_table(fake_keras, tmp_path, ledger):
    res = _run(*_args(fake_keras, tmp_path, "--recipes", "int8,int3-magic"))
    assert res.exit_code == 1
    line = _one_error_line(res)
    assert "_recipes.toml: unknown recipe 'int3-magic'" in line and "int8" in line  # lists the known names
    ledger("bad_input", "sweep --recipes with an unknown name")


@pytest.mark.parametrize("edit, key", [
    (("weights_bits = 8", "weights_bits = 3"), "my-int8.weights_bits"),
    (('activations = "int8"', 'activations = "int9"'), "my-int8.activations"),
    (('executable = true\nruntimes = ["litert", "tflite-runtime", "tflm"]',
      'executable = true\nruntimes = ["litert", "coreml"]'), "my-int8.runtimes"),
    (('granularity = "per-channel"', 'granularity = "per-channel"\ncolour = "red"'), "my-int8.colour"),
])
def test_bad_recipe_file_is_one_line_naming_file_and_key(fake_keras, tmp_path, edit, key, ledger):
    old, new = edit
    assert old in MY_RECIPES
    f = tmp_path / "mine.toml"
    f.write_text(MY_RECIPES.replace(old, new, 1))
    res = _run(*_args(fake_keras, tmp_path, "--recipe-file", str(f)))
    assert res.exit_code == 1
    assert f"{f}:{key}" in _one_error_line(res)
    ledger("bad_input", f"recipe file with a bad {key.split('.')[-1]}")


def test_recipe_file_that_is_not_toml(fake_keras, tmp_path, ledger):
    f = tmp_path / "mine.toml"
    f.write_text("[[recipe]\nname = ")
    res = _run(*_args(fake_keras, tmp_path, "--recipe-file", str(f)))
    assert res.exit_code == 1 and f"{f}: not valid TOML" in _one_error_line(res)
    ledger("bad_input", "recipe file that is not TOML")


def test_device_options_do_not_mix(fake_keras, tmp_path, ledger):
    res = _run(*_args(fake_keras, tmp_path, "--local", "--host", "pi@10.0.0.9"))
    assert res.exit_code == 2 and "do not go together" in _one_error_line(res)
    res = _run(*_args(fake_keras, tmp_path, "--max-drop", "-1"))
    assert res.exit_code == 2 and "--max-drop" in _one_error_line(res)
    ledger("bad_input", "sweep --local with --host; negative --max-drop")


@pytest.mark.slow
def test_users_recipe_file_is_swept_and_the_table_printed(digits_keras, calib_npy, digits_eval_npz, tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(MY_RECIPES)
    out = tmp_path / "out"
    res = _run(str(digits_keras), "--calib", str(calib_npy), "--eval", str(digits_eval_npz), "--target", "rpi4",
               "--recipe-file", str(f), "--samples", "30", "--eval-samples", "100", "--objective", "size",
               "--max-drop", "5", "-o", str(out))
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in doc["recipes"]] == ["my-int8", "my-fp32"]
    assert doc["recommended"] == "my-int8" and doc["objective"] == "size"
    assert doc["recipe_table"] == str(f)
    assert sorted(p.name for p in out.glob("*.tflite")) == ["my-fp32.tflite", "my-int8.tflite"]
    lines = res.output.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("recipe "))
    # Sorted by the objective: the recommendation first, then the bigger one with its reason.
    assert lines[header + 2].startswith("my-int8") and "RECOMMENDED" in lines[header + 2]
    assert lines[header + 3].startswith("my-fp32") and "bigger" in lines[header + 3]
    assert "estimate" in res.output  # no device: latency and energy are estimates, and say so


@pytest.mark.slow
def test_no_recipe_qualifies_exits_5_after_the_table(digits_keras, calib_npy, digits_eval_npz, tmp_path):
    out = tmp_path / "out"
    res = _run(str(digits_keras), "--calib", str(calib_npy), "--eval", str(digits_eval_npz), "--target",
               "cortex-m4", "--recipes", "fp32", "--samples", "20", "--eval-samples", "50", "-o", str(out))
    assert res.exit_code == 5, res.output
    assert "does not fit the target (float-tensors)" in res.output
    assert res.output.rstrip().splitlines()[-1].startswith("error: no executable recipe qualifies")
    assert json.loads((out / "sweep.json").read_text())["recommended"] is None
    assert (out / "fp32.tflite").is_file()  # every executable recipe is written, qualifying or not


@pytest.mark.slow
def test_sweep_measures_on_the_first_inventory_host(digits_keras, calib_npy, digits_eval_npz, device_python,
                                                    tmp_path):
    inv = tmp_path / "hosts.ini"
    inv.write_text(f"[pis]\nbench ansible_connection=local ansible_python_interpreter={device_python} "
                   f"edgeq_remote_dir={tmp_path / 'device'}\n")
    out = tmp_path / "out"
    res = _run(str(digits_keras), "--calib", str(calib_npy), "--eval", str(digits_eval_npz), "--target", "rpi4",
               "--inventory", str(inv), "--recipes", "int8,fp32", "--samples", "20", "--eval-samples", "60",
               "--runs", "5", "--min-seconds", "0.05", "--max-drop", "5", "-o", str(out))
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["device"]["host"] == "local" and doc["device"]["runtime"]["name"] == "tflite_runtime"
    assert all(r["device"]["latency_ms"]["p50"] > 0 for r in doc["recipes"])
    assert (tmp_path / "device").is_dir()  # the inventory's edgeq_remote_dir was used
    import platform

    arch = platform.machine()
    assert f"device: local ({arch}" in res.output
    # This machine as the device for a Pi target: the sweep says whose latency it ranked.
    assert (f"warning: the device is {arch}, not the rpi4's Arm CPU" in res.output) == (
        not arch.startswith(("aarch64", "arm")))


@pytest.mark.slow
def test_runtime_log_lines_stay_off_the_terminal(digits_keras, calib_npy, digits_eval_npz, tmp_path):
    """LiteRT writes "INFO: Created TensorFlow Lite XNNPACK delegate" to file descriptor 2 from C++, which
    CliRunner cannot see: run the real command and read its stderr."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "edgeq", "sweep", str(digits_keras), "--calib", str(calib_npy),
                        "--eval", str(digits_eval_npz), "--target", "rpi4", "--recipes", "int8,fp32",
                        "--samples", "20", "--eval-samples", "50", "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "recommended:" in p.stdout
    assert "XNNPACK delegate" not in p.stderr + p.stdout and "INFO:" not in p.stderr, p.stderr[-2000:]
