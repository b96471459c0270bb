"""The runner on a Python 3.8 device (bullseye-era Raspberry Pi OS) with numpy 1.24 and tflite-runtime 2.14."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeq.deploy import DeployOptions, deploy

ROOT = Path(__file__).resolve().parents[2]
PY38 = Path(os.environ.get("EDGEQ_DEVICE_PYTHON38") or ROOT / ".venv-device38" / "bin" / "python")


@pytest.mark.slow
@pytest.mark.skipif(not PY38.exists(), reason=f"no Python 3.8 device venv at {PY38} (make device-venv-py38 "
                    "builds it when a python3.8 is on the machine; Debian bookworm packages none)")
def test_deploy_to_a_python38_device(digits_int8_tflite, digits_eval_npz, tmp_path):
    result = deploy(digits_int8_tflite, DeployOptions(python=str(PY38), remote_dir=str(tmp_path / "device"),
                                                      eval_data=str(digits_eval_npz), runs=50, min_seconds=0.1))
    doc = result.to_dict()
    assert doc["device"]["python"].startswith("3.8.")
    assert doc["runtime"]["name"] == "tflite_runtime" and doc["device"]["numpy"].startswith("1.")
    assert doc["latency_ms"]["count"] >= 50
    assert abs(doc["accuracy"] - doc["agreement"]["host_accuracy"]) <= 0.01
    assert doc["agreement"]["top1"] >= 0.98
