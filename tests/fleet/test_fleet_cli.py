"""`edgeq deploy --inventory` against several real sshd instances (INI and YAML inventories)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.deploy import DeployOptions
from edgeq.errors import UsageError
from edgeq.fleet_deploy import plan_fleet
from edgeq.inventory import load_inventory
from tests.deploy.sshd_helper import free_port, keygen
from tests.faultproxy import FaultProxy
from tests.fleet.conftest import active, sha

pytestmark = pytest.mark.ssh


def _pythons(tmp_path: Path, device_python: str) -> list[str]:
    """A different interpreter path per host (symlinks to the device venv's python), like Pis with venvs."""
    out = []
    for i in range(3):
        venv = tmp_path / f"venv{i}"
        (venv / "bin").mkdir(parents=True)
        for f in Path(device_python).parent.parent.iterdir():
            if f.name != "bin":
                os.symlink(f, venv / f.name)
        os.symlink(Path(device_python).resolve(), venv / "bin" / "python")
        (venv / "pyvenv.cfg").unlink(missing_ok=True)
        os.symlink(Path(device_python).parent.parent / "pyvenv.cfg", venv / "pyvenv.cfg")
        out.append(str(venv / "bin" / "python"))
    return out


def _write_inventory(kind: str, tmp_path: Path, hosts: list[dict]) -> Path:
    if kind == "ini":
        lines = ["[pis]"]
        for h in hosts:
            lines.append(h["name"] + " " + " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                                                    for k, v in h.items() if k != "name"))
        lines += ["", "[fleet:children]", "pis", "", "[fleet:vars]", "ansible_user=" + os.environ.get("USER", "root")]
        path = tmp_path / "hosts.ini"
        path.write_text("\n".join(lines) + "\n")
    else:
        import yaml

        doc = {"all": {"children": {"pis": {"hosts": {h["name"]: {k: v for k, v in h.items() if k != "name"}
                                                       for h in hosts}}}}}
        path = tmp_path / "hosts.yml"
        path.write_text(yaml.safe_dump(doc))
    return path


def _cli(fleet, kh: Path, *args: str):
    return CliRunner().invoke(main, ["deploy", *args, "--identity", str(fleet.client_key), "--known-hosts", str(kh),
                                     "--connect-timeout", "2", "--runs", "5", "--warmup", "0"])


@pytest.mark.parametrize("kind", ["ini", "yaml"])
def test_deploy_inventory_three_hosts(fleet, tmp_path, device_python, model_a, model_b, kind):
    pythons = _pythons(tmp_path, device_python)
    user = fleet.servers[0].user
    hosts = [{"name": f"pi{i}", "ansible_host": "127.0.0.1", "ansible_port": s.port, "ansible_user": user,
              "ansible_python_interpreter": pythons[i], "edgeq_remote_dir": str(tmp_path / f"dev{i}")}
             for i, s in enumerate(fleet.servers)]
    inv = _write_inventory(kind, tmp_path, hosts)
    kh = fleet.known_hosts(tmp_path / "kh")
    out = tmp_path / "reports"
    res = _cli(fleet, kh, str(model_a), "--inventory", str(inv), "--forks", "3", "-o", str(out),
               "--python", "/nonexistent/python", "--remote-dir", "/nonexistent/dir")
    assert res.exit_code == 0, res.output
    assert "3 of 3 hosts ok" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"hosts": 3, "ok": 3, "failed": 0, "timeout": 0, "gate_failed": 0}
    assert summary["schema"] == "edgeq.fleet/1" and summary["outcome"] == "ok"
    for i, row in enumerate(summary["hosts"]):
        assert row["name"] == f"pi{i}" and row["status"] == "ok"
        assert row["runtime"]["name"] == "tflite_runtime" and row["latency_ms"]["p50"] > 0
        assert row["activation"]["active"] == sha(model_a)
        rep = json.loads((out / f"pi{i}" / "report.json").read_text())
        assert rep["settings"]["python"] == pythons[i]
        assert rep["settings"]["remote_dir"] == str(tmp_path / f"dev{i}")
        assert active(tmp_path / f"dev{i}") == sha(model_a)
    html = (out / "summary.html").read_text()
    assert "3 of 3 hosts ok" in html and "pi2" in html

    # --limit, then a fleet rollback.
    res = _cli(fleet, kh, str(model_b), "--inventory", str(inv), "--limit", "pi0:pi2", "-o", str(tmp_path / "r2"))
    assert res.exit_code == 0, res.output
    assert [active(tmp_path / f"dev{i}") for i in range(3)] == [sha(model_b), sha(model_a), sha(model_b)]
    res = CliRunner().invoke(main, ["rollback", "--inventory", str(inv), "--limit", "pi0", "--identity",
                                    str(fleet.client_key), "--known-hosts", str(kh)])
    assert res.exit_code == 0, res.output
    assert active(tmp_path / "dev0") == sha(model_a)


def test_fleet_with_dead_hung_and_changed_key_hosts(fleet, tmp_path, device_python, model_a, ledger):
    user = fleet.servers[0].user
    dead_port = free_port()
    with FaultProxy(fleet.servers[0].port, mode="blackhole") as hung:
        kh = fleet.known_hosts(tmp_path / "kh")
        # servers[2] is known under another key: its host key "changed".
        other = keygen(tmp_path / "other_host_key")
        lines = [l for l in kh.read_text().splitlines() if f"]:{fleet.servers[2].port} " not in l]
        lines.append(f"[127.0.0.1]:{fleet.servers[2].port} " + " ".join(Path(f"{other}.pub").read_text().split()[:2]))
        kh.write_text("\n".join(lines) + "\n")
        hosts = [
            {"name": "good0", "ansible_port": fleet.servers[0].port},
            {"name": "good1", "ansible_port": fleet.servers[1].port},
            {"name": "dead", "ansible_port": dead_port},
            {"name": "hung", "ansible_port": hung.port},
            {"name": "rekeyed", "ansible_port": fleet.servers[2].port},
        ]
        for h in hosts:
            h.update({"ansible_host": "127.0.0.1", "ansible_user": user, "edgeq_remote_dir": str(tmp_path / h["name"])})
        inv = _write_inventory("ini", tmp_path, hosts)
        out = tmp_path / "reports"
        t0 = time.monotonic()
        res = _cli(fleet, kh, str(model_a), "--inventory", str(inv), "--forks", "5", "--python", device_python,
                   "--host-timeout", "20", "-o", str(out))
        took = time.monotonic() - t0
    assert res.exit_code == 4, res.output
    assert took < 20, took
    rows = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["hosts"]}
    assert rows["good0"]["status"] == rows["good1"]["status"] == "ok"
    assert rows["dead"]["status"] == "failed" and "refused" in rows["dead"]["error"]
    assert rows["hung"]["status"] in ("failed", "timeout") and rows["hung"]["error_type"] in ("ConnectError", "Timeout")
    assert rows["rekeyed"]["status"] == "failed" and rows["rekeyed"]["error_type"] == "HostKeyError"
    assert "CHANGED" in rows["rekeyed"]["error"]
    assert not (tmp_path / "rekeyed").exists() and not (tmp_path / "dead").exists()
    assert json.loads((out / "dead" / "report.json").read_text())["status"] == "failed"
    assert active(tmp_path / "good0") == sha(model_a) and active(tmp_path / "good1") == sha(model_a)
    assert "refused" in res.output and "HostKeyError" not in res.output.split("\n")[0]
    for name in ("dead host", "hung host", "changed host key"):
        ledger("fault", f"fleet: {name}")


def test_fleet_deadline_cancels_a_host_that_hangs_after_connecting(fleet, tmp_path, device_python, model_big,
                                                                   ledger):
    """A link that goes silent mid-upload with a long phase deadline: the host deadline abandons it."""

    from edgeq.fleet_deploy import FleetOptions, deploy_fleet
    from edgeq.transport import SSHOptions

    server = fleet.servers[1]
    with FaultProxy(server.port) as proxy:
        kh = fleet.known_hosts(tmp_path / "kh", {proxy.port: server.port})
        inv = _write_inventory("ini", tmp_path, [
            {"name": "stalls", "ansible_host": "127.0.0.1", "ansible_port": proxy.port, "ansible_user": server.user,
             "edgeq_remote_dir": str(tmp_path / "dev-stalls")},
            {"name": "fine", "ansible_host": "127.0.0.1", "ansible_port": fleet.servers[0].port,
             "ansible_user": server.user, "edgeq_remote_dir": str(tmp_path / "dev-fine")}])
        base = DeployOptions(python=device_python, remote_dir=str(tmp_path / "dev"), runs=5, warmup=0,
                             min_seconds=0.05, min_warmup_seconds=0, reference=False, upload_timeout=300,
                             ssh=SSHOptions(identity=str(fleet.client_key), known_hosts=str(kh), connect_timeout=2,
                                            allow_agent=False, ssh_config=str(tmp_path / "none")))

        def progress(ev):
            if ev.host == "stalls" and ev.stage == "upload" and proxy.mode == "pass":
                proxy.arm("stall", 0)

        t0 = time.monotonic()
        result = deploy_fleet(model_big, load_inventory(inv).select(), FleetOptions(base, 2, 6.0), progress)
        took = time.monotonic() - t0
    by = {h.name: h for h in result.hosts}
    assert by["stalls"].status == "timeout", by["stalls"]
    assert by["fine"].status == "ok", by["fine"].error
    assert took < 12, took
    ledger("fault", "fleet: host stalls past its deadline")


def test_invalid_inventory_values_rejected_before_anything_runs(fleet, tmp_path, model_a, ledger):
    inv = tmp_path / "bad.ini"
    inv.write_text(f"""[pis]
ok ansible_host=127.0.0.1 ansible_port={fleet.servers[0].port} edgeq_remote_dir={tmp_path / 'never'}
badhost ansible_host="a;touch /tmp/x"
badpy ansible_host=127.0.0.1 ansible_python_interpreter="-c"
badkey ansible_host=127.0.0.1 ansible_ssh_private_key_file=/nonexistent/key
""")
    with pytest.raises(UsageError) as exc:
        plan_fleet(load_inventory(inv).select(), DeployOptions())
    text = str(exc.value)
    for name in ("badhost", "badpy", "badkey"):
        assert f"'{name}'" in text, text
    res = _cli(fleet, tmp_path / "kh", str(model_a), "--inventory", str(inv))
    assert res.exit_code == 2 and "nothing was run" in res.output
    assert not (tmp_path / "never").exists()
    # A port is checked when the inventory is read: one line naming the file and the host, nothing run.
    inv.write_text(inv.read_text() + "badport ansible_host=127.0.0.1 ansible_port=99999\n")
    res = _cli(fleet, tmp_path / "kh", str(model_a), "--inventory", str(inv))
    assert res.exit_code == 1 and "'badport'" in res.output and str(inv) in res.output, res.output
    assert not (tmp_path / "never").exists()
    from types import MappingProxyType

    from edgeq.inventory import InventoryHost

    for name, hvars in (("nl", {"edgeq_remote_dir": "a\nb"}), ("x/y", {}), ("..", {})):
        with pytest.raises(UsageError, match="nothing was run"):
            plan_fleet([InventoryHost(name, MappingProxyType(hvars), ())], DeployOptions())
    for name in ("port 99999", "host with ;", "interpreter -c", "missing key file", "remote dir with newline",
                 "host name with /", "host name .."):
        ledger("bad_input", f"inventory: {name}")
