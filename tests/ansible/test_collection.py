"""The edgeq.fleet collection: built, installed and run with real ansible-playbook against real sshd devices.

The devices' Python is the device venv (numpy + tflite-runtime only).
"""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

from edgeq._device.protocol import DEVICE_MODULES
from edgeq.report.ansible import write_ansible_summary
from edgeq.cli import main
from edgeq.deploy import DeployResult, LatencyStats
from edgeq.rollout import RolloutOptions, rollout
from tests.ansible.ansible_helper import ROOT, SOURCE, build_and_install, run_playbook, write_inventory
from tests.ansible.conftest import active, inventory_hosts, sha

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

ROLLOUT = "edgeq.fleet.rollout"
FAST = ["-e", "edgeq_runs=5", "-e", "edgeq_min_seconds=0.05"]


@pytest.fixture(scope="module")
def collections(tmp_path_factory):
    return build_and_install(tmp_path_factory.mktemp("collection"))


@pytest.mark.parametrize("embedded,original", [(f"edgeq_{name}.py", f"{name}.py")
                                               for name in ("runner", "protocol", *DEVICE_MODULES)])
def test_modules_run_the_same_runner_and_protocol_as_edgeq_deploy(embedded, original):
    """One implementation: the runner, the protocol and the device modules embedded in module_utils are
    deploy/runner.py, deploy/protocol.py and deploy/<name>.py byte for byte."""
    copy = SOURCE / "plugins" / "module_utils" / embedded
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == \
        hashlib.sha256((ROOT / "deploy" / original).read_bytes()).hexdigest(), \
        f"deploy/{original} changed: run scripts/ansible-build.sh (it embeds it) and commit the copy"


def _dummy_result() -> DeployResult:
    return DeployResult("h", {}, {}, {}, LatencyStats.from_samples([1.0]), 0.0, 0.0, None, None, None, None, None, {},
                        {}, "", 0.0)


def test_playbook_three_devices_idempotent_and_check_mode(fleet, tmp_path, device_python, known_hosts, collections,
                                                          model_a, model_b):
    inv = write_inventory(fleet, tmp_path, 3, device_python, known_hosts)
    run = run_playbook(collections, tmp_path, inv, ROLLOUT, "-e", f"edgeq_model={model_b}", *FAST)
    assert run.returncode == 0, run.output
    assert [active(tmp_path / f"dev{i}") for i in range(3)] == [sha(model_b)] * 3
    assert {h: c["changed"] for h, c in run.recap().items()} == {"pi0": 1, "pi1": 1, "pi2": 1}
    saved = run.saved()["plays"][-1]
    assert [b["hosts"] for b in saved["batches"]] == [["pi0"], ["pi1"], ["pi2"]]  # serial: [1, "25%"]
    res = saved["results"]["pi0"]["result"]
    assert res["active"] == sha(model_b) and res["gate"]["passed"] is True
    # The module returns the document edgeq deploy writes as report.json.
    assert set(res["report"]) - {"name"} == set(_dummy_result().to_dict())
    assert res["report"]["runtime"]["name"] == "tflite_runtime" and res["report"]["latency_ms"]["count"] >= 5
    result, paths = write_ansible_summary(run.results, tmp_path / "summary")
    summary = json.loads(paths.summary_json.read_text())
    assert summary["counts"]["ok"] == 3 and summary["action"] == "ansible"
    assert [r["activation"]["active"] for r in summary["hosts"]] == [sha(model_b)] * 3
    assert "pi2" in paths.summary_html.read_text()

    again = run_playbook(collections, tmp_path, inv, ROLLOUT, "-e", f"edgeq_model={model_b}", *FAST)
    assert again.returncode == 0, again.output
    assert {h: c["changed"] for h, c in again.recap().items()} == {"pi0": 0, "pi1": 0, "pi2": 0}

    check = run_playbook(collections, tmp_path, inv, ROLLOUT, "--check", "-e", f"edgeq_model={model_a}", *FAST)
    assert check.returncode == 0, check.output
    assert {h: c["changed"] for h, c in check.recap().items()} == {"pi0": 1, "pi1": 1, "pi2": 1}
    assert [active(tmp_path / f"dev{i}") for i in range(3)] == [sha(model_b)] * 3
    assert not any((tmp_path / f"dev{i}" / "models" / sha(model_a)).exists() for i in range(3))


def test_playbook_canary_fails_gate_reverts_and_play_stops(fleet, tmp_path, device_python, known_hosts, collections,
                                                           fleet_opts, model_a, model_b, eval_b, ledger):
    inv = write_inventory(fleet, tmp_path, 3, device_python, known_hosts)
    assert rollout(model_b, inventory_hosts(inv), RolloutOptions(fleet=fleet_opts)).ok  # every device runs model_b
    run = run_playbook(collections, tmp_path, inv, ROLLOUT, "-e", f"edgeq_model={model_a}",
                       "-e", f"edgeq_eval={eval_b}", "-e", "edgeq_gate_accuracy=0.9", *FAST)
    assert run.returncode != 0
    assert "failed its health gate (accuracy" in run.output and "reverted to" in run.output, run.output
    assert "Traceback" not in run.output
    assert [active(tmp_path / f"dev{i}") for i in range(3)] == [sha(model_b)] * 3
    assert not any((tmp_path / f"dev{i}" / "models" / sha(model_a)).exists() for i in (1, 2))
    assert set(run.recap()) == {"pi0"}  # the play stopped before the next batch
    ledger("fault", "canary fails its health gate under ansible-playbook: reverted, play stopped")
    ledger("model_kept", "canary fails its health gate under ansible-playbook")

    result, paths = write_ansible_summary(run.results, tmp_path / "summary")
    assert [h.status for h in result.hosts] == ["reverted", "not_started", "not_started"]
    assert result.hosts[0].gate.accuracy < 0.9 and result.hosts[0].revert.active == sha(model_b)
    summary = json.loads(paths.summary_json.read_text())
    assert summary["counts"]["reverted"] == 1 and summary["counts"]["not_started"] == 2
    assert summary["rollout"]["stopped"] is True

    # The same through the command line (exit 7: a host failed its gate and was reverted).
    cli = CliRunner().invoke(main, ["report", "--ansible", str(run.results), "-o", str(tmp_path / "cli")])
    assert cli.exit_code == 7, cli.output
    assert "0 of 3 hosts ok" in cli.output and "1 reverted" in cli.output and "2 not started" in cli.output
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["counts"] == summary["counts"]

    # edgeq.fleet.rollback: pi0 kept model_a as its previous model; pi1 never had another one.
    book = tmp_path / "rollback.yml"
    book.write_text(json.dumps([{"hosts": "pi0:pi1", "gather_facts": False, "tasks": [
        {"name": "check", "edgeq.fleet.rollback": {"remote_dir": "{{ edgeq_remote_dir }}"}, "check_mode": True,
         "ignore_errors": True},
        {"name": "roll back", "edgeq.fleet.rollback": {"remote_dir": "{{ edgeq_remote_dir }}"},
         "ignore_errors": True, "register": "rb"},
        {"name": "facts", "edgeq.fleet.facts": {"remote_dir": "{{ edgeq_remote_dir }}"}},
        {"name": "show", "ansible.builtin.debug": {"msg": "ACTIVE={{ ansible_facts.edgeq.active }}"}}]}]))
    back = run_playbook(collections, tmp_path, inv, str(book))
    assert back.returncode == 0, back.output
    assert "there is no previous model" in back.output and "Traceback" not in back.output
    assert active(tmp_path / "dev0") == sha(model_a) and active(tmp_path / "dev1") == sha(model_b)
    assert f"ACTIVE={sha(model_a)}" in back.output and f"ACTIVE={sha(model_b)}" in back.output
    assert back.recap()["pi1"]["ignored"] == 2 and back.recap()["pi0"]["changed"] == 2  # check mode, then real


BAD = [
    ({"state": "bogus"}, "value of state must be one of: present, active, absent, got: bogus"),
    ({"bogus_option": 1}, "Unsupported parameters for (edgeq.fleet.model) module: bogus_option"),
    ({"runs": "many"}, "argument 'runs' is of type"),
    ({"model_tmp": "/etc/passwd"}, "model_tmp is set by the action plugin; do not pass it"),
    ({"gate_accuracy": 90}, "gate_accuracy must be a fraction from 0 to 1"),
]


def test_bad_module_parameters_fail_the_ansible_way(fleet, tmp_path, device_python, known_hosts, collections, model_a,
                                                    ledger):
    inv = write_inventory(fleet, tmp_path, 1, device_python, known_hosts)
    tasks = []
    for args, _msg in BAD:
        tasks.append({"name": f"bad {sorted(args)}", "edgeq.fleet.model": {"src": str(model_a), **args},
                      "ignore_errors": True, "register": f"r{len(tasks)}"})
    tasks.append({"name": "no src", "edgeq.fleet.model": {"state": "active"}, "ignore_errors": True})
    book = tmp_path / "bad.yml"
    book.write_text(json.dumps([{"hosts": "all", "gather_facts": False, "tasks": tasks}]))
    run = run_playbook(collections, tmp_path, inv, str(book))
    assert run.returncode == 0, run.output  # every failure was expected (ignore_errors)
    for _args, msg in BAD:
        assert msg in run.output, run.output
    assert "state is active but any of the following are missing: src, sha256" in run.output
    assert "Traceback" not in run.output and "MODULE FAILURE" not in run.output
    assert run.recap()["pi0"]["failed"] == 0 and run.recap()["pi0"]["ignored"] == len(BAD) + 1
    assert not (tmp_path / "dev0").exists()
    for _ in BAD:
        ledger("bad_input", "bad edgeq.fleet.model parameter")
