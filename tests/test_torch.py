"""PyTorch models in: real models built in the test (tests/torch_models.py), converted by litert-torch and
litert-quantizer to full int8 with int8 inputs and outputs, checked, deployed to this machine as the device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeq.calibration import DataOptions
from edgeq.convert import ConvertOptions, LoadOptions, convert
from edgeq.errors import ConversionError, DataError, ModelError
from edgeq.tflite_file import read_tflite

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DIGITS = "tests.torch_models:digits_cnn"


@pytest.fixture(scope="module", autouse=True)
def _run_from_root(monkeypatch_module):
    monkeypatch_module.chdir(ROOT)  # module:function names are imported like `python -m` (working directory)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory):
    from tests.torch_models import digits_split

    d = digits_split()
    out = tmp_path_factory.mktemp("torch-digits")
    np.save(out / "calib_nchw.npy", d["x_train"][:200])
    np.savez(out / "eval_nchw.npz", x=d["x_test"], y=d["y_test"])
    np.save(out / "calib_nhwc.npy", d["x_train"][:200].transpose(0, 2, 3, 1))
    np.savez(out / "eval_nhwc.npz", x=d["x_test"].transpose(0, 2, 3, 1), y=d["y_test"])
    return out


@pytest.fixture(scope="module")
def digits_int8(digits_data):
    out = digits_data / "digits_int8.tflite"
    result = convert(DIGITS, digits_data / "calib_nchw.npy", out,
                     ConvertOptions(eval_data=str(digits_data / "eval_nchw.npz")))
    return result, out


def test_digits_cnn_full_int8_with_int8_io_within_one_point_of_pytorch(digits_int8):
    result, out = digits_int8
    fid = result.fidelity[0]
    assert result.model_format == "torch-function" and result.loader == "litert-torch"
    assert (result.input_type, result.output_type) == ("int8", "int8")
    model = read_tflite(out)
    assert [t.dtype for t in model.inputs + model.outputs] == ["int8", "int8"]
    assert not [op.op for op in model.main.operators if op.op in ("QUANTIZE", "DEQUANTIZE")]
    # The reference is PyTorch's own output: its accuracy is the PyTorch model's.
    assert fid.accuracy_float > 0.9
    assert 100 * (fid.accuracy_float - fid.accuracy_quant) <= 1.0
    # Ranges are global min/max over the calibration samples: litert-quantizer's default moving average
    # clips activations (measured 18 dB here; the bare litert-torch PT2E route gets 41 dB).
    assert fid.sqnr_db > 35
    assert result.quant_bytes < 0.45 * result.float_bytes
    assert model.inputs[0].shape == (1, 1, 8, 8)  # NCHW data: NCHW inputs


def test_layout_follows_the_data_and_tensorflow_stays_out(digits_data):
    # A fresh interpreter: nothing else in it may have imported TensorFlow.
    code = (
        "import sys, json\n"
        "from edgeq.convert import convert, ConvertOptions\n"
        f"r = convert({DIGITS!r}, {str(digits_data / 'calib_nhwc.npy')!r}, {str(digits_data / 'nhwc.tflite')!r},"
        f" ConvertOptions(eval_data={str(digits_data / 'eval_nhwc.npz')!r}))\n"
        "print(json.dumps({'tf': 'tensorflow' in sys.modules, 'shape': r.inputs[0].shape,"
        " 'acc': [r.fidelity[0].accuracy_float, r.fidelity[0].accuracy_quant]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tf"] is False
    assert got["shape"] == [1, 8, 8, 1]  # NHWC data: NHWC inputs, the permutation folded into the graph
    assert 100 * (got["acc"][0] - got["acc"][1]) <= 1.0


def test_a_torch_model_loads_after_tensorflow_in_one_process(tmp_path):
    """PyPI's Linux torch wheels bring triton, which segfaults on import once TensorFlow is loaded (sweep, repair
    and the test suite load both). A user's build() that makes an optimizer imports it through torch._dynamo."""
    (tmp_path / "usernet.py").write_text(
        "import torch\n"
        "def build():\n"
        "    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),"
        " torch.nn.Linear(144, 3))\n"
        "    torch.optim.Adam(model.parameters())  # imports torch._dynamo (and triton, where installed)\n"
        "    return model.eval(), torch.zeros(1, 1, 8, 8)\n")
    code = ("import tensorflow\n"
            "from edgeq.convert import LoadOptions, load_model\n"
            "m = load_model('usernet:build', LoadOptions(layout='nchw'))\n"
            "print('inputs', [tuple(i.shape) for i in m.inputs])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "inputs [(1, 1, 8, 8)]" in proc.stdout, proc.stdout


def test_layout_that_contradicts_the_data_is_a_data_error(digits_data, tmp_path, ledger):
    with pytest.raises(DataError, match="calib_nhwc.npy"):
        convert(DIGITS, digits_data / "calib_nhwc.npy", tmp_path / "x.tflite",
                ConvertOptions(load=LoadOptions(layout="nchw")))
    assert not (tmp_path / "x.tflite").exists()
    ledger("bad_input", "torch layout contradicting the data")


def test_cli_layout_option_reaches_the_loader(digits_data, tmp_path, ledger):
    from click.testing import CliRunner

    from edgeq.cli import main

    res = CliRunner().invoke(main, ["convert", DIGITS, "--calib", str(digits_data / "calib_nhwc.npy"),
                                    "--layout", "nchw", "-o", str(tmp_path / "x.tflite")])
    assert res.exit_code != 0
    assert res.output.startswith("error: calibration data") and "(1, 8, 8)" in res.output, res.output
    assert "Traceback" not in res.output
    ledger("bad_input", "torch --layout contradicting the data (CLI)")


def test_check_reports_the_transposes_for_rpi4_and_cortex_m4(digits_int8):
    from edgeq.check import check_model
    from edgeq.targets import load_target

    _, out = digits_int8
    model = read_tflite(out)
    costs = {}
    for name in ("rpi4", "cortex-m4"):
        check = check_model(model, load_target(name))
        assert check.fits, check.violations
        layout = check.to_dict()["layout"]
        assert any(line.startswith("  layout: ") for line in check.summary_lines())
        assert layout["count"] == model.op_counts.get("TRANSPOSE", 0) >= 1  # flatten of NCHW features
        assert layout["elements"] > 0 and layout["estimated_ms"] > 0
        costs[name] = layout["estimated_ms"]
    assert costs["cortex-m4"] > 10 * costs["rpi4"]  # 64 MHz, one core vs 1.8 GHz, four


def test_deploy_the_torch_model_to_the_local_device(digits_int8, digits_data, device_python, tmp_path):
    from edgeq.deploy import DeployOptions, deploy

    result, out = digits_int8
    got = deploy(out, DeployOptions(python=device_python, remote_dir=str(tmp_path / "device"),
                                    eval_data=str(digits_data / "eval_nchw.npz"), runs=5, warmup=0,
                                    min_seconds=0.05, min_warmup_seconds=0.0))
    # tflite-runtime 2.14 on the device runs the litert-quantizer model to the host's accuracy.
    assert got.accuracy is not None
    assert abs(got.accuracy - result.fidelity[0].accuracy_quant) < 0.01


def test_max_drop_repairs_a_torch_model_through_the_float_tflite_fixes(digits_data, tmp_path):
    from edgeq.repair import RepairOptions, convert_with_budget

    result = convert_with_budget(DIGITS, digits_data / "calib_nchw.npy", tmp_path / "r.tflite",
                                 ConvertOptions(eval_data=str(digits_data / "eval_nchw.npz"),
                                                data=DataOptions(samples=100)),
                                 RepairOptions(max_drop=1.0), target="cortex-m4")
    assert result.chosen is not None and result.best.drop <= 1.0
    assert [t.dtype for t in read_tflite(tmp_path / "r.tflite").inputs] == ["int8"]


def test_mobilenet_v2_converts_to_full_int8(tmp_path):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).random((16, 3, 64, 64), dtype=np.float32))
    result = convert("tests.torch_models:mobilenet_v2", calib, tmp_path / "mnv2.tflite",
                     ConvertOptions(eval_data=str(calib), data=DataOptions(samples=16)))
    model = read_tflite(tmp_path / "mnv2.tflite")
    assert [t.dtype for t in model.inputs + model.outputs] == ["int8", "int8"]
    assert model.op_counts.get("CONV_2D", 0) >= 30 and model.op_counts.get("DEPTHWISE_CONV_2D", 0) >= 15
    assert not {t.dtype for t in model.main.tensors} & {"float32", "float16"}
    assert result.size_ratio < 0.35
    from edgeq.check import check_model
    from edgeq.targets import load_target

    assert check_model(model, load_target("rpi4")).fits


def test_two_inputs_take_forwards_parameter_names(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, image=rng.random((64, 3, 16, 16), dtype=np.float32), meta=rng.random((64, 4), dtype=np.float32))
    result = convert("tests.torch_models:two_inputs", data, tmp_path / "two.tflite",
                     ConvertOptions(eval_data=str(data)))
    assert sorted(i.name for i in result.inputs) == ["image", "meta"]
    assert {i.dtype for i in result.inputs} == {"int8"}
    assert result.fidelity[0].sqnr_db > 15  # against PyTorch's outputs


def test_untraceable_module_is_named_in_one_line(tmp_path, ledger):
    from click.testing import CliRunner

    from edgeq.cli import main

    np.save(tmp_path / "c.npy", np.random.default_rng(0).random((8, 4), dtype=np.float32))
    res = CliRunner().invoke(main, ["convert", "tests.torch_models:gated", "--calib", str(tmp_path / "c.npy"),
                                    "-o", str(tmp_path / "g.tflite")])
    assert res.exit_code != 0
    err = res.output.strip().splitlines()
    assert err[0].startswith("error: torch.export cannot trace module gate (Gate)"), res.output
    assert "Traceback" not in res.output and "torch.cond" in res.output
    ledger("bad_input", "torch model torch.export cannot trace")


def test_op_without_int8_kernel_is_named(tmp_path, ledger):
    np.save(tmp_path / "c.npy", np.random.default_rng(0).random((8, 4), dtype=np.float32))
    with pytest.raises(ConversionError, match=r"SIN \(module 'wave'\) cannot be quantized to int8"):
        convert("tests.torch_models:sine_net", tmp_path / "c.npy", tmp_path / "s.tflite")
    assert not (tmp_path / "s.tflite").exists()
    ledger("bad_input", "torch op without an int8 kernel")


def test_pt2_is_refused_unless_unsafe_load(tmp_path, ledger):
    import torch

    from tests.torch_models import two_inputs

    model, example = two_inputs()
    pt2 = tmp_path / "two.pt2"
    torch.export.save(torch.export.export(model, example), pt2)
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, image=rng.random((16, 3, 16, 16), dtype=np.float32), meta=rng.random((16, 4), dtype=np.float32))
    with pytest.raises(ModelError, match="--unsafe-load"):
        convert(pt2, data, tmp_path / "refused.tflite")
    assert not (tmp_path / "refused.tflite").exists()
    result = convert(pt2, data, tmp_path / "two.tflite", ConvertOptions(load=LoadOptions(unsafe_load=True)))
    assert result.model_format == "pt2"
    assert sorted(i.name for i in result.inputs) == ["image", "meta"]
    ledger("bad_input", "torch .pt2 without --unsafe-load")


def test_not_a_pt2_archive_is_refused_before_torch_runs(tmp_path, ledger):
    bad = tmp_path / "model.pt2"
    bad.write_bytes(b"\x80\x04not a zip")
    with pytest.raises(ModelError, match="not a torch.export program"):
        convert(bad, tmp_path / "none.npy", tmp_path / "x.tflite")
    ledger("bad_input", "torch .pt2 that is not a zip archive")


def test_sweep_runs_the_recipes_on_a_torch_model(digits_data, tmp_path):
    from edgeq.sweep import SweepOptions, sweep

    result = sweep(DIGITS, digits_data / "calib_nchw.npy", digits_data / "eval_nchw.npz", "cortex-m4",
                   SweepOptions(output_dir=str(tmp_path / "out"), recipes=("fp32", "int8", "int16x8", "fp16"),
                                data=DataOptions(samples=100), eval_samples=200))
    rows = {r.name: r for r in result.recipes}
    assert rows["int8"].error is None and rows["int8"].host["agreement"] >= 0.99
    assert rows["int16x8"].error is None and rows["int16x8"].host["agreement"] >= 0.99
    assert "SavedModel" in rows["fp16"].error  # TensorFlow's converter makes fp16 from a SavedModel


def test_max_drop_skips_the_keras_only_fixes_for_a_torch_model(digits_data, tmp_path):
    from edgeq.repair import BudgetNotMet, RepairOptions, convert_with_budget

    # A budget no model meets (int8 must beat PyTorch by a point) keeps the repair going; equalize and QAT
    # must then say why they do not apply, not crash on an nn.Module.
    with pytest.raises(BudgetNotMet) as info:
        convert_with_budget(DIGITS, digits_data / "calib_nchw.npy", tmp_path / "r.tflite",
                            ConvertOptions(eval_data=str(digits_data / "eval_nchw.npz"), data=DataOptions(samples=50)),
                            RepairOptions(max_drop=-1.0, fixes=("equalize", "qat"),
                                          train_data=str(digits_data / "eval_nchw.npz")))
    result = info.value.result
    assert result.baseline.status == "over budget"
    skipped = {a.fix: a.detail for a in result.attempts}
    assert skipped.keys() == {"equalize", "qat"} and all("PyTorch" in d for d in skipped.values()), skipped
