"""Build and install the edgeq.fleet collection, and run real ansible-playbook against the test sshd devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "ansible" / "edgeq" / "fleet"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: install the controller with `pip install -e '.[ansible]'`")
    return str(path)


def build_and_install(tmp: Path) -> Path:
    """``ansible-galaxy collection build`` the source as it is, then ``collection install`` it; returns the path."""
    dist, colls = tmp / "dist", tmp / "collections"
    subprocess.run([tool("ansible-galaxy"), "collection", "build", str(SOURCE), "--output-path", str(dist), "--force"],
                   check=True, capture_output=True, text=True)
    tarball = next(dist.glob("edgeq-fleet-*.tar.gz"))
    subprocess.run([tool("ansible-galaxy"), "collection", "install", str(tarball), "-p", str(colls), "--force"],
                   check=True, capture_output=True, text=True)
    return colls


@dataclass
class PlaybookRun:
    returncode: int
    output: str
    results: Path

    def recap(self) -> dict[str, dict[str, int]]:
        """host -> {ok, changed, unreachable, failed, ...} from the PLAY RECAP lines."""
        out = {}
        for line in self.output.split("PLAY RECAP", 1)[-1].splitlines()[1:]:
            if ":" not in line or "=" not in line:
                continue
            host, counts = line.split(":", 1)
            out[host.strip()] = {k: int(v) for k, v in (kv.split("=") for kv in counts.split())}
        return out

    def saved(self) -> dict:
        return json.loads(self.results.read_text())


def write_inventory(fleet, tmp_path: Path, n: int, python: str, known_hosts: Path) -> Path:
    """An Ansible inventory of ``n`` hosts over the fleet's sshd servers, each with its own device directory."""
    hosts = {}
    for i in range(n):
        s = fleet.servers[i % len(fleet.servers)]
        hosts[f"pi{i}"] = {
            "ansible_host": "127.0.0.1", "ansible_port": s.port, "ansible_user": s.user,
            "ansible_python_interpreter": python, "ansible_ssh_private_key_file": str(fleet.client_key),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes "
                                       "-o IdentitiesOnly=yes",
            "edgeq_remote_dir": str(tmp_path / f"dev{i}")}
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump({"all": {"children": {"pis": {"hosts": hosts}}}}))
    return path


def run_playbook(collections: Path, tmp_path: Path, inventory: Path, playbook: str, *args: str,
                 timeout: float = 300) -> PlaybookRun:
    home = Path(tempfile.mkdtemp(prefix="ans-", dir="/tmp"))  # short: ssh ControlPath sockets have a length limit
    cfg = tmp_path / "ansible.cfg"
    cfg.write_text("[defaults]\n")
    results = tmp_path / f"results-{len(list(tmp_path.glob('results-*.json')))}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_") and k != "SSH_AUTH_SOCK"}
    env.update(ANSIBLE_CONFIG=str(cfg), ANSIBLE_COLLECTIONS_PATH=str(collections), ANSIBLE_HOME=str(home),
               ANSIBLE_LOCAL_TEMP=str(home / "tmp"), ANSIBLE_REMOTE_TMP=str(home / "remote"),
               ANSIBLE_SSH_CONTROL_PATH_DIR=str(home / "cp"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
               ANSIBLE_CALLBACKS_ENABLED="edgeq.fleet.results", EDGEQ_ANSIBLE_RESULTS=str(results),
               ANSIBLE_RETRY_FILES_ENABLED="0", PATH=f"{BIN}:{env.get('PATH', '')}")
    p = subprocess.run([tool("ansible-playbook"), "-i", str(inventory), playbook, *args], env=env,
                       capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    return PlaybookRun(p.returncode, p.stdout + p.stderr, results)
