"""Devices as users have them: long runner arguments under an SSH server's command limit, phase timeouts
as options, the delegate really applied, the transfer method, a remote directory that cannot be made, a
disk too small for the model."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.deploy import DeployOptions, check_options, deploy
from edgeq.device import DeviceClient
from edgeq.errors import DeviceError, UsageError
from edgeq.transport import MAX_COMMAND_BYTES, LocalTransport, check_command_length, make_transport
from tests.deploy.conftest import tree

FAST = dict(runs=3, warmup=0, min_seconds=0.0, min_warmup_seconds=0.0, reference=False)


class Recording:
    """A transport wrapper that keeps every Result (and so every command sent)."""

    def __init__(self, tr) -> None:
        self.tr = tr
        self.results = []
        self.host = tr.host

    def run(self, argv, timeout, stdin=None, check=True):
        res = self.tr.run(argv, timeout, stdin=stdin, check=check)
        self.results.append(res)
        return res


def _long_have(n: int = 120) -> list[tuple[str, str]]:
    return [(f"models/{i:064x}/model-with-a-long-name-{'x' * 40}.tflite", f"{i:064x}") for i in range(n)]


def _assert_short(results) -> None:
    assert results
    for res in results:
        # Dropbear drops an exec request over 9,000 bytes; the transport refuses one over MAX_COMMAND_BYTES.
        wire = check_command_length(res.command, "test")
        assert len(wire.encode()) < MAX_COMMAND_BYTES / 10, (len(wire), res.command[:200])


def test_long_runner_arguments_travel_on_stdin_locally(tmp_path, device_python):
    have = _long_have()
    assert sum(len(r) + len(s) + 8 for r, s in have) > 10_000
    rec = Recording(LocalTransport())
    doc = DeviceClient(rec, device_python).probe(str(tmp_path / "d"), have, 60)
    assert doc["ok"] and len(doc["have"]) == len(have) and all(v is None for v in doc["have"].values())
    _assert_short(rec.results)
    assert "--have" not in rec.results[0].command


@pytest.mark.ssh
def test_long_runner_arguments_over_ssh_stay_under_the_command_limit(sshd, ssh_options, tmp_path, device_python):
    have = _long_have()
    with make_transport(sshd.spec, ssh_options) as tr:
        rec = Recording(tr)
        doc = DeviceClient(rec, device_python).probe(str(tmp_path / "d"), have, 60)
    assert doc["ok"] and len(doc["have"]) == len(have)
    _assert_short(rec.results)


def test_runner_still_takes_arguments_on_the_command_line(tmp_path, device_python):
    # The Ansible collection calls the runner `python - MODE ARGS...` with the plain runner on stdin.
    from edgeq.device import runner_source

    out = subprocess.run([device_python, "-", "probe", "--dir", str(tmp_path / "d"), "--prepare"],
                         input=runner_source(), capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert (tmp_path / "d" / "models").is_dir()


def test_runner_refuses_edgeq_args_that_are_not_strings(device_python, ledger):
    from edgeq.device import runner_source

    out = subprocess.run([device_python, "-", "probe"], input=b"EDGEQ_ARGS = [1, 2]\n" + runner_source(),
                         capture_output=True, timeout=120)
    assert out.returncode == 2 and b'"kind": "usage"' in out.stdout
    ledger("bad_input", "runner: EDGEQ_ARGS that are not strings")


# ---------------------------------------------------------------- timeouts

MODEL = Path(__file__).resolve().parents[1] / "fleet" / "data" / "tiny_a.tflite"


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _error_line(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    return lines[0]


@pytest.mark.parametrize("flag,value", [("--probe-timeout", "0"), ("--upload-timeout", "-5"),
                                        ("--run-timeout", "100000"), ("--run-timeout", "nan"),
                                        ("--probe-timeout", "inf")])
def test_timeouts_are_bounded(flag, value, tmp_path, ledger):
    for cmd in (["deploy", str(MODEL)], ["rollback"]):
        if cmd[0] == "rollback" and flag != "--probe-timeout":
            continue
        res = _cli(*cmd, flag, value, "--remote-dir", str(tmp_path / "d"))
        assert res.exit_code == 2, res.output
        line = _error_line(res)
        assert flag in line and ("positive" in line or "at most 86400" in line)
    assert not (tmp_path / "d").exists()
    ledger("bad_input", f"deploy {flag} {value}")


def test_sweep_timeouts_are_bounded_and_need_a_device(tmp_path, ledger):
    base = ["sweep", str(MODEL), "--calib", "c.npy", "--eval", "e.npz", "--target", "rpi4", "-o", str(tmp_path / "o")]
    res = _cli(*base, "--local", "--run-timeout", "0")
    assert res.exit_code == 2 and "--run-timeout" in _error_line(res)
    res = _cli(*base, "--probe-timeout", "30")
    assert res.exit_code == 2 and "need a device" in _error_line(res)
    assert not (tmp_path / "o").exists()
    ledger("bad_input", "sweep --run-timeout 0; a timeout without a device")


def test_a_probe_timeout_names_its_option(tmp_path, device_python, ledger):
    res = _cli("deploy", str(MODEL), "--python", device_python, "--remote-dir", str(tmp_path / "d"),
               "--probe-timeout", "0.05", "-o", str(tmp_path / "r"))
    assert res.exit_code == 4, res.output
    line = _error_line(res)
    assert "timed out" in line and "it ran out of its 0.05 s: raise it with --probe-timeout" in line, line
    assert "raise the timeout" not in line
    ledger("fault", "probe slower than --probe-timeout")


def test_a_run_timeout_names_its_option(tmp_path, device_python, ledger):
    # 5 s of warm-up cannot finish in 1 s: the runner's own deadline (a little earlier than the host's) ends it.
    opts = DeployOptions(python=device_python, remote_dir=str(tmp_path / "d"), run_timeout=1.0,
                         **{**FAST, "min_warmup_seconds": 5.0})
    with pytest.raises(DeviceError) as exc:
        deploy(MODEL, opts)
    assert "it ran out of its 1 s: raise it with --run-timeout" in str(exc.value), str(exc.value)
    ledger("fault", "run longer than --run-timeout")


def test_a_long_enough_run_timeout_passes(tmp_path, device_python):
    opts = DeployOptions(python=device_python, remote_dir=str(tmp_path / "d"), run_timeout=120, probe_timeout=60,
                         upload_timeout=60, **FAST)
    check_options(opts)
    assert deploy(MODEL, opts).latency_ms.count >= 3


# ------------------------------------------------------- delegate and transfer

HOST_PYTHON = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python")  # has ai-edge-litert


def _report_texts(result, tmp_path) -> tuple[dict, str, str]:
    from edgeq.report import write_report

    paths = write_report(result, tmp_path / "report")
    import json

    return (json.loads(Path(paths.json).read_text()), Path(paths.markdown).read_text(),
            Path(paths.html).read_text())


def test_delegate_not_applied_on_tflite_runtime_214_is_reported(tmp_path, device_python):
    # tflite-runtime 2.14's XNNPACK takes float models but none of this int8 model's nodes: the report says
    # so instead of echoing the requested setting.
    res = deploy(MODEL, DeployOptions(python=device_python, remote_dir=str(tmp_path / "d"), **FAST))
    assert res.runtime["name"] == "tflite_runtime" and res.runtime["xnnpack"] is True
    assert res.delegate == {"requested": "xnnpack", "applied": False, "delegated_nodes": 0, "nodes": 2,
                            "partitions": 0}
    assert any("took none of the model's 2 nodes" in w for w in res.warnings)
    assert res.transfer["method"] == "local"
    doc, md, html = _report_texts(res, tmp_path)
    assert doc["delegate"]["applied"] is False and doc["transfer"]["method"] == "local"
    assert "xnnpack requested: no, 0 of 2 nodes" in md and "xnnpack requested: no, 0 of 2 nodes" in html
    assert "| Transfer | local; model" in md and "local; model" in html


def test_delegate_applied_on_ai_edge_litert_is_reported(tmp_path):
    res = deploy(MODEL, DeployOptions(python=HOST_PYTHON, remote_dir=str(tmp_path / "d"), **FAST))
    assert res.runtime["name"] == "ai_edge_litert"
    assert res.delegate["applied"] is True and res.delegate["delegated_nodes"] == res.delegate["nodes"] == 2
    assert not any("XNNPACK" in w for w in res.warnings)
    doc, md, html = _report_texts(res, tmp_path)
    assert "xnnpack: yes, 2 of 2 nodes" in md and "xnnpack: yes, 2 of 2 nodes" in html
    # Nothing sent the second time: no transfer method to report.
    again = deploy(MODEL, DeployOptions(python=HOST_PYTHON, remote_dir=str(tmp_path / "d"), **FAST))
    assert again.transfer["model_bytes_sent"] == 0 and again.transfer["method"] is None


def test_delegate_off_with_no_xnnpack(tmp_path):
    res = deploy(MODEL, DeployOptions(python=HOST_PYTHON, remote_dir=str(tmp_path / "d"), xnnpack=False, **FAST))
    assert res.delegate["requested"] is None and res.delegate["applied"] is False


def test_a_runtime_that_lists_no_nodes_is_unknown_not_false(device_python):
    # Run the runner's own function on an interpreter without _get_ops_details (older or trimmed runtimes).
    import importlib.util

    spec = importlib.util.spec_from_file_location("edgeq_runner_h2", Path(__file__).resolve().parents[2]
                                                  / "deploy" / "runner.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)

    class Bare:
        pass

    assert runner.measure._delegation(Bare(), "xnnpack") == {"requested": "xnnpack", "applied": None,
                                                     "delegated_nodes": None, "nodes": None, "partitions": None}


@pytest.mark.parametrize("bad", [{"requested": "xnnpack", "applied": True, "delegated_nodes": 0, "nodes": 2},
                                 {"requested": "xnnpack", "applied": False, "delegated_nodes": 3, "nodes": 2},
                                 {"requested": 7, "applied": None},
                                 "yes"])
def test_an_invalid_delegate_document_is_refused(bad, ledger):
    from edgeq.device import DELEGATE, _Bad

    with pytest.raises(_Bad):
        DELEGATE(bad, "result.delegate")
    ledger("bad_input", f"runner delegate document {bad!r}"[:80])


# ------------------------------------------- the remote directory and its disk


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a small tmpfs (tests here run as root, as CI does); unmounted afterwards."""
    mounted = []

    def make(name: str, size: str, readonly: bool = False) -> Path:
        mnt = tmp_path / name
        mnt.mkdir()
        if os.geteuid() != 0:
            pytest.fail("this test mounts a tmpfs and needs root (CI runs as root)")
        opts = f"size={size}" + (",ro" if readonly else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True)
        if done.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_default_remote_dir_that_cannot_be_created_names_remote_dir(tmp_path, device_python, mount_tmpfs,
                                                                     monkeypatch, ledger):
    home = mount_tmpfs("home", "64k", readonly=True)  # a read-only home: ~/.edgeq cannot be made
    monkeypatch.setenv("HOME", str(home))
    res = _cli("deploy", str(MODEL), "--python", device_python, "-o", str(tmp_path / "r"))
    assert res.exit_code == 4, res.output
    line = _error_line(res)
    assert f"cannot create {home}/.edgeq" in line and "--remote-dir PATH" in line, line
    ledger("fault", "default remote dir cannot be created (read-only home)")


def test_default_remote_dir_that_is_a_file_names_remote_dir(tmp_path, device_python, monkeypatch, ledger):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".edgeq").write_text("not a directory")
    monkeypatch.setenv("HOME", str(home))
    res = _cli("deploy", str(MODEL), "--python", device_python, "-o", str(tmp_path / "r"))
    assert res.exit_code == 4, res.output
    line = _error_line(res)
    assert "is not a directory" in line and "--remote-dir" in line, line
    assert (home / ".edgeq").read_text() == "not a directory"
    ledger("bad_input", "default remote dir is a file")


def test_a_disk_too_small_is_refused_before_the_upload(tmp_path, device_python, mount_tmpfs, ledger):
    small = mount_tmpfs("small", "64k")
    model = tmp_path / "big.tflite"
    model.write_bytes(MODEL.read_bytes() + os.urandom(200 * 1024))  # 200 KiB of trailing bytes: still TFL3
    remote = small / "edgeq"
    with pytest.raises(DeviceError) as exc:
        deploy(model, DeployOptions(python=device_python, remote_dir=str(remote), **FAST))
    text = str(exc.value)
    size = model.stat().st_size
    free = os.statvfs(remote).f_bavail * os.statvfs(remote).f_frsize
    assert f"not enough space on local for the upload: {size} bytes needed, {free} bytes free under {remote}" \
        in text, text
    assert "--remote-dir" in text
    # Refused before the lock and the upload: nothing but the empty layout the probe made.
    assert tree(remote) == []
    assert not (remote / "lock").exists()
    ledger("fault", "remote disk smaller than the model")


# -------------------------------------------------- per-host timeouts (inventory)


def test_inventory_timeouts_reach_each_hosts_options(tmp_path, device_python):
    from edgeq.fleet_deploy import FleetOptions, plan_fleet
    from edgeq.inventory import load_inventory

    inv = tmp_path / "hosts.ini"
    inv.write_text(f"[pis]\nslow ansible_connection=local ansible_python_interpreter={device_python} "
                   f"edgeq_run_timeout=2000 edgeq_probe_timeout=300 edgeq_upload_timeout=1200\n"
                   f"fast ansible_connection=local ansible_python_interpreter={device_python}\n")
    base = DeployOptions(run_timeout=900)
    slow, fast = plan_fleet(load_inventory(inv).select(None), base)
    assert (slow.options.run_timeout, slow.options.probe_timeout, slow.options.upload_timeout) == (2000, 300, 1200)
    assert (fast.options.run_timeout, fast.options.probe_timeout, fast.options.upload_timeout) == (900, 120, 600)
    # The fleet waits for its slowest host's own deadlines before abandoning it.
    fleet = FleetOptions(base)
    assert fleet.host_deadline([slow, fast]) > fleet.host_deadline([fast]) + 1100 + 2 * 180 + 600 - 1


def test_an_inventory_probe_timeout_names_its_option_and_variable(tmp_path, device_python, ledger):
    import json

    inv = tmp_path / "hosts.ini"
    inv.write_text(f"[pis]\nbench ansible_connection=local ansible_python_interpreter={device_python} "
                   f"edgeq_remote_dir={tmp_path / 'd'} edgeq_probe_timeout=0.05\n")
    res = _cli("deploy", str(MODEL), "--inventory", str(inv), "--json", "-o", str(tmp_path / "r"))
    assert res.exit_code == 4, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    (host,) = summary["hosts"]
    assert host["status"] == "failed"
    assert "raise it with --probe-timeout (or the inventory variable edgeq_probe_timeout)" in host["error"]
    ledger("fault", "inventory edgeq_probe_timeout shorter than the probe")


@pytest.mark.ssh
def test_an_upload_timeout_names_its_option(sshd, ssh_options, tmp_path, device_python, ledger):
    from edgeq.device import runner_program
    from tests.faultproxy import FaultProxy

    model = tmp_path / "big.tflite"
    model.write_bytes(MODEL.read_bytes() + os.urandom(2 << 20))
    # The probe and the lock each send the runner on stdin; the link stalls 1 MB into the upload after them.
    limit = 2 * len(runner_program(["--dir", str(tmp_path / "d")] * 8)) + (1 << 20)
    with FaultProxy(sshd.port, mode="stall", limit=limit) as proxy:
        kh = tmp_path / "kh_proxy"
        kh.write_text(f"[127.0.0.1]:{proxy.port} {sshd.host_key_pub}\n")
        opts = DeployOptions(host=f"{sshd.user}@127.0.0.1:{proxy.port}", python=device_python,
                             remote_dir=str(tmp_path / "d"), upload_timeout=3.0, probe_timeout=60.0,
                             ssh=replace(ssh_options, known_hosts=str(kh)), **FAST)
        with pytest.raises(DeviceError) as exc:
            deploy(model, opts)
        assert proxy.tripped.is_set()
    text = str(exc.value)
    assert "upload" in text and "it ran out of its 3 s: raise it with --upload-timeout" in text, text
    ledger("fault", "link stalls mid-upload past --upload-timeout")
