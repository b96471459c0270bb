"""Fixtures for the rollout and Ansible tests: the fleet's real sshd servers, two tiny models, eval data.

The servers come from tests/fleet/conftest.py (imported, so this folder starts its own three sshd).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from edgeq.deploy import DeployOptions
from edgeq.fleet_deploy import FleetOptions
from edgeq.inventory import load_inventory
from edgeq.transport import SSHOptions
from tests.fleet.conftest import FAST, Fleet, active, fleet, model_a, model_b, sha  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.delenv("EDGEQ_SSH_PASSPHRASE", raising=False)


def host_outputs(model: Path, x: np.ndarray) -> np.ndarray:
    """The model's float outputs on the host (LiteRT), one sample at a time."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    scale, zero = inp["quantization"]
    oscale, ozero = out["quantization"]
    ys = []
    for row in x:
        q = np.clip(np.round(row[None] / scale + zero), -128, 127).astype(inp["dtype"])
        it.set_tensor(inp["index"], q)
        it.invoke()
        ys.append((it.get_tensor(out["index"]).astype(np.float32) - ozero) * oscale)
    return np.concatenate(ys)


@pytest.fixture(scope="session")
def eval_b(tmp_path_factory, model_b, model_a) -> Path:
    """Eval data labelled by model_b's own predictions: model_b scores 1.0 on it, model_a much less."""
    x = np.random.default_rng(7).random((64, 16), dtype=np.float32)
    y = np.argmax(host_outputs(model_b, x), axis=1).astype(np.int64)
    acc_a = float(np.mean(np.argmax(host_outputs(model_a, x), axis=1) == y))
    assert acc_a < 0.8, f"model_a must fail a 0.9 accuracy gate on this data (it scores {acc_a})"
    path = tmp_path_factory.mktemp("eval") / "eval_b.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture
def known_hosts(fleet, tmp_path) -> Path:
    return fleet.known_hosts(tmp_path / "known_hosts")


@pytest.fixture
def ssh_opts(fleet, known_hosts, tmp_path) -> SSHOptions:
    return SSHOptions(identity=str(fleet.client_key), known_hosts=str(known_hosts), connect_timeout=3.0,
                      ssh_config=str(tmp_path / "no_ssh_config"), allow_agent=False)


def write_inventory(fleet: Fleet, tmp_path: Path, n: int, python: str, group: str = "pis") -> Path:
    """``n`` hosts spread over the fleet's sshd servers, each with its own device directory."""
    hosts = {}
    for i in range(n):
        s = fleet.servers[i % len(fleet.servers)]
        hosts[f"pi{i}"] = {"ansible_host": "127.0.0.1", "ansible_port": s.port, "ansible_user": s.user,
                           "ansible_python_interpreter": python, "edgeq_remote_dir": str(tmp_path / f"dev{i}")}
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump({"all": {"children": {group: {"hosts": hosts}}}}))
    return path


@pytest.fixture
def fleet_opts(ssh_opts, device_python) -> FleetOptions:
    return FleetOptions(DeployOptions(python=device_python, ssh=ssh_opts, **FAST), forks=3)


def inventory_hosts(path: Path):
    return load_inventory(path).select(None)


__all__ = ["ROOT", "active", "host_outputs", "inventory_hosts", "sha", "write_inventory"]
