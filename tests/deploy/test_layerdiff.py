"""Where the device differs: every intermediate tensor on the device against the host's LiteRT. The local
device (tflite-runtime 2.14) agrees with the host; a device copy whose first convolution computes something
else is named, with its op and the user's layer name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.deploy import DeployOptions, deploy
from edgeq.device import DeviceClient
from edgeq.layerdiff import compare, host_layers, layers_args, op_outputs
from edgeq.transport import LocalTransport

FAST = dict(runs=5, warmup=0, min_seconds=0.05, min_warmup_seconds=0.0, reference=False)


def _perturb_first_conv_bias(model: Path, out: Path) -> tuple[int, str]:
    """A copy of ``model`` whose first CONV_2D bias is shifted (a kernel computing differently); returns the
    index and name of that op's output tensor."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model))
    interp.allocate_tensors()
    conv = next(op for op in interp._get_ops_details() if op["op_name"] == "CONV_2D")
    bias = interp.get_tensor(int(conv["inputs"][2]))
    raw = model.read_bytes()
    needle = bias.astype("<i4").tobytes()
    assert raw.count(needle) == 1, "the bias bytes are not unique in the file"
    shifted = bias.astype(np.int64)
    shifted[0] += 1 << 20  # far more than one quantization step at the output
    out.write_bytes(raw.replace(needle, shifted.astype("<i4").tobytes()))
    name = next(d["name"] for d in interp.get_tensor_details() if d["index"] == int(conv["outputs"][0]))
    return int(conv["outputs"][0]), name


def test_local_device_agrees_with_the_host_layer_by_layer(digits_int8_tflite, digits_eval_npz, device_python,
                                                         tmp_path):
    opts = DeployOptions(python=device_python, remote_dir=str(tmp_path / "device"), eval_data=str(digits_eval_npz),
                         layers=3, **FAST)
    res = deploy(digits_int8_tflite, opts)
    ld = res.to_dict()["layer_diff"]
    assert ld["first_divergence"] is None, ld["first_divergence"]
    assert ld["samples"] == 3 and ld["compared"] >= 5 and ld["device_runtime"]["name"] == "tflite_runtime"
    ops = [t["op"] for t in ld["tensors"]]
    assert "CONV_2D" in ops and "FULLY_CONNECTED" in ops
    assert any(t["layer"] and t["layer"].startswith("conv2d") for t in ld["tensors"])


def test_a_device_that_computes_a_layer_differently_is_named(digits_int8_tflite, digits_eval_npz, device_python,
                                                            tmp_path, ledger):
    perturbed = tmp_path / "device_copy.tflite"
    index, name = _perturb_first_conv_bias(digits_int8_tflite, perturbed)
    host = host_layers(digits_int8_tflite, digits_eval_npz, 2, 120)
    dev = DeviceClient(LocalTransport(), device_python)
    args = layers_args(str(perturbed), str(digits_eval_npz), 2) + ["--tensors", ",".join(map(str, op_outputs(host)))]
    device = dev.layers(args, 120, "the perturbed copy")
    diff = compare(device, host)
    first = diff.first_divergence
    assert first is not None and first.index == index and first.name == name
    assert first.op == "CONV_2D" and first.layer and first.layer.startswith("conv2d") and first.max_steps > 1
    # Everything before it agreed; the summary names it.
    before = diff.tensors[: diff.tensors.index(first)]
    assert all(not t.differs for t in before)
    assert "first divergence" in diff.summary_lines()[1] and "CONV_2D" in diff.summary_lines()[1]
    ledger("fault", "device kernel computes one layer differently")


def test_layer_diff_on_the_cli(digits_int8_tflite, digits_eval_npz, device_python, tmp_path, ledger):
    base = ["deploy", str(digits_int8_tflite), "--python", device_python, "--remote-dir", str(tmp_path / "d"),
            "--runs", "2", "--warmup", "0", "--no-activate"]
    res = CliRunner().invoke(main, [*base, "--eval", str(digits_eval_npz), "--layers", "2", "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "layer diff:" in res.output and "no tensor differs" in res.output
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert doc["layer_diff"]["first_divergence"] is None
    bad = CliRunner().invoke(main, [*base, "--layers", "2"])
    assert bad.exit_code == 2 and "--layers needs --eval" in bad.output and "Traceback" not in bad.output
    ledger("bad_input", "--layers without --eval")


@pytest.mark.parametrize("count", ["-1", "5000"])
def test_layer_count_out_of_range(count, digits_int8_tflite, digits_eval_npz, device_python, tmp_path, ledger):
    res = CliRunner().invoke(main, ["deploy", str(digits_int8_tflite), "--python", device_python, "--eval",
                                    str(digits_eval_npz), "--layers", count, "--remote-dir", str(tmp_path / "d")])
    assert res.exit_code == 2 and "--layers" in res.output and "Traceback" not in res.output
    ledger("bad_input", f"--layers {count}")
