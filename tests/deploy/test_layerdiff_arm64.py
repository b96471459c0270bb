"""The layer diff on the emulated Raspberry Pi (tests/devices/testbed.sh): the same LiteRT on aarch64 agrees
with the host tensor by tensor; a device copy whose first convolution differs is named."""

from __future__ import annotations

import pytest

from edgeq.deploy import DeployOptions, deploy
from edgeq.device import DeviceClient
from edgeq.layerdiff import compare, host_layers, layers_args, op_outputs
from edgeq.transport import SSHOptions, make_transport
from tests.deploy.test_layerdiff import _perturb_first_conv_bias
from tests.devices.conftest import device_known_hosts, emulated_pi  # noqa: F401 - fixtures

pytestmark = [pytest.mark.arm64, pytest.mark.slow]


def _opts(dev, known_hosts, tmp_path, eval_npz, **kw) -> DeployOptions:
    ssh = SSHOptions(identity=str(dev.key), known_hosts=str(known_hosts), connect_timeout=60.0,
                     ssh_config=str(tmp_path / "no_ssh_config"), allow_agent=False)
    return DeployOptions(host=dev.host, python=dev.python_litert, remote_dir="~/.edgeq-layers-test", ssh=ssh,
                         eval_data=str(eval_npz), runs=3, warmup=0, min_seconds=0.05, min_warmup_seconds=0.0,
                         reference=False, activate=False, probe_timeout=300.0, run_timeout=600.0, **kw)


def test_layer_diff_on_the_emulated_pi(emulated_pi, device_known_hosts, digits_int8_tflite, digits_eval_npz,
                                       tmp_path, ledger):
    opts = _opts(emulated_pi, device_known_hosts, tmp_path, digits_eval_npz, layers=2)
    res = deploy(digits_int8_tflite, opts)
    ld = res.layer_diff
    assert ld and "error" not in ld, ld
    assert ld["first_divergence"] is None, ld["first_divergence"]
    assert ld["compared"] >= 5 and res.device["arch"] == "aarch64"

    # A device copy that computes its first convolution differently, uploaded next to it (not activated).
    perturbed = tmp_path / "device_copy.tflite"
    index, name = _perturb_first_conv_bias(digits_int8_tflite, perturbed)
    copy = deploy(perturbed, replace_layers(opts))
    host = host_layers(digits_int8_tflite, digits_eval_npz, 2, 120)
    tr = make_transport(opts.host, opts.ssh)
    with tr:
        dev = DeviceClient(tr, opts.python)
        remote_eval = f"{copy.settings['remote_dir']}/data/{copy.evaluation['sha256']}/eval.npz"
        args = layers_args(copy.model["remote_path"], remote_eval, 2) + ["--tensors",
                                                                         ",".join(map(str, op_outputs(host)))]
        device = dev.layers(args, 600, "the perturbed copy")
    first = compare(device, host).first_divergence
    assert first is not None and first.index == index and first.name == name and first.op == "CONV_2D"
    ledger("fault", "emulated Pi: one layer computed differently")


def replace_layers(opts: DeployOptions) -> DeployOptions:
    from dataclasses import replace

    return replace(opts, layers=0)
