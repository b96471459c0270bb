"""`edgeq deploy --inventory F --canary 1 --gate-accuracy MIN` (needs /tmp/readme/ansible-cli.patch applied)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from tests.ansible.conftest import active, sha, write_inventory

pytestmark = pytest.mark.ssh


def _deploy(fleet, known_hosts, *args: str):
    return CliRunner().invoke(main, ["deploy", *args, "--identity", str(fleet.client_key), "--known-hosts",
                                     str(known_hosts), "--connect-timeout", "3", "--runs", "5", "--warmup", "0"])


def test_cli_canary_reverts_and_stops(fleet, tmp_path, device_python, known_hosts, model_a, model_b, eval_b):
    inv = write_inventory(fleet, tmp_path, 3, device_python)
    common = ["--inventory", str(inv), "--eval", str(eval_b), "--canary", "1", "--batch", "50%",
              "--gate-accuracy", "0.9"]
    res = _deploy(fleet, known_hosts, str(model_b), *common, "-o", str(tmp_path / "r1"))
    assert res.exit_code == 0, res.output
    assert "3 of 3 hosts ok in 3 batches" in res.output

    res = _deploy(fleet, known_hosts, str(model_a), *common, "-o", str(tmp_path / "r2"))
    assert res.exit_code == 7, res.output
    assert "stopped after canary 1" in res.output
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert [h["status"] for h in summary["hosts"]] == ["reverted", "not_started", "not_started"]
    assert [active(tmp_path / f"dev{i}") for i in range(3)] == [sha(model_b)] * 3


def test_cli_rollout_options_need_an_inventory(model_a):
    res = CliRunner().invoke(main, ["deploy", str(model_a), "--canary", "1"])
    assert res.exit_code == 2 and "need --inventory" in res.output
