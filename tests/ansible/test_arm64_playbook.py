"""edgeq.fleet against the emulated Raspberry Pi (arm64 bookworm under qemu-user, its own sshd and netns)."""

from __future__ import annotations

import json
import uuid

import pytest
import yaml

from tests.ansible.ansible_helper import build_and_install, run_playbook
from tests.devices.conftest import device_known_hosts, emulated_pi, tiny_int8_tflite  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.arm64, pytest.mark.slow]


def test_playbook_on_the_emulated_pi(tmp_path, emulated_pi, device_known_hosts, tiny_int8_tflite):
    d = emulated_pi
    inv = tmp_path / "hosts.yml"
    inv.write_text(yaml.safe_dump({"all": {"hosts": {"pi": {
        "ansible_host": d.addr, "ansible_port": d.port, "ansible_user": d.user,
        "ansible_ssh_private_key_file": str(d.key), "ansible_python_interpreter": d.python_tflite,
        "ansible_ssh_common_args": f"-o UserKnownHostsFile={device_known_hosts} -o StrictHostKeyChecking=yes",
        # The emulated Pi outlives test runs (its /tmp too): a fresh directory per run, or the first run of a
        # second `make test` finds the model already active and changes nothing.
        "edgeq_remote_dir": f"/tmp/edgeq-ansible-{uuid.uuid4().hex[:12]}"}}}}))
    book = tmp_path / "pi.yml"
    book.write_text(json.dumps([{"hosts": "all", "gather_facts": False, "tasks": [
        {"edgeq.fleet.model": {"src": str(tiny_int8_tflite), "remote_dir": "{{ edgeq_remote_dir }}", "runs": 5,
                               "min_seconds": 0.05, "min_warmup_seconds": 0.0}},
        {"edgeq.fleet.facts": {"remote_dir": "{{ edgeq_remote_dir }}"}}]}]))
    colls = build_and_install(tmp_path / "collection")
    first = run_playbook(colls, tmp_path, inv, str(book), timeout=900)
    assert first.returncode == 0, first.output
    assert first.recap()["pi"]["changed"] == 1
    res = first.saved()["plays"][-1]["results"]["pi"]["result"]
    assert res["report"]["device"]["arch"] == "aarch64" and res["report"]["runtime"]["name"] == "tflite_runtime"
    assert res["active"] == res["sha256"]
    again = run_playbook(colls, tmp_path, inv, str(book), timeout=900)
    assert again.returncode == 0 and again.recap()["pi"]["changed"] == 0, again.output
