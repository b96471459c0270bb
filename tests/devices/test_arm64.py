"""The emulated Raspberry Pi (``testbed.sh``): a real aarch64 Debian bookworm userland over SSH.

The first group talks to the device with plain paramiko and proves the test bed
is what it claims. The second deploys with ``edgeq deploy`` and checks what a
user would read in the report.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import paramiko
import pytest

from tests.devices.conftest import EmulatedDevice

pytestmark = pytest.mark.arm64

TINY_INPUT = [[10, -20, 30, 127]]
# Runs one int8 inference with whichever runtime the venv has and prints the output as JSON.
TINY_RUN = """
import json, sys
import numpy as np
try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:
    from tflite_runtime.interpreter import Interpreter
it = Interpreter(model_path=sys.argv[1])
it.allocate_tensors()
inp, out = it.get_input_details()[0], it.get_output_details()[0]
it.set_tensor(inp["index"], np.array(json.loads(sys.argv[2]), dtype=np.int8))
it.invoke()
print(json.dumps({"module": Interpreter.__module__, "numpy": np.__version__,
                  "output": it.get_tensor(out["index"]).tolist()}))
"""


class Device:
    """One paramiko connection to the test bed, host key verified against the test bed's known_hosts."""

    def __init__(self, dev: EmulatedDevice) -> None:
        self.client = paramiko.SSHClient()
        self.client.load_host_keys(str(dev.known_hosts))
        self.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        # qemu makes the key exchange slow: generous banner and auth timeouts.
        self.client.connect(dev.addr, port=dev.port, username=dev.user, key_filename=str(dev.key),
                            allow_agent=False, look_for_keys=False, timeout=30, banner_timeout=60, auth_timeout=60)

    def run(self, command: str, timeout: float = 180.0) -> str:
        """Runs ``command`` and returns its stdout; fails the test on a non-zero exit."""
        _stdin, stdout, stderr = self.client.exec_command(command, timeout=timeout)
        out = stdout.read().decode()
        err = stderr.read().decode()
        status = stdout.channel.recv_exit_status()
        assert status == 0, f"{command!r} exited {status}: {err[-2000:]}"
        return out

    def put(self, local: Path, remote: str) -> None:
        sftp = self.client.open_sftp()
        try:
            sftp.put(str(local), remote)
        finally:
            sftp.close()


@pytest.fixture(scope="module")
def device(emulated_pi):
    conn = Device(emulated_pi)
    yield conn
    conn.client.close()


# ---------------------------------------------------------------- the device itself


def test_device_is_aarch64(device):
    assert device.run("uname -m").strip() == "aarch64"


def test_device_runs_debian_bookworm(device):
    release = dict(line.split("=", 1) for line in device.run("cat /etc/os-release").splitlines() if "=" in line)
    assert release["ID"] == "debian"
    assert release["VERSION_CODENAME"] == "bookworm"
    assert device.run("python3 -c 'import sys; print(sys.version_info[:2])'").strip() == "(3, 11)"


def test_cpuinfo_shows_an_arm_cortex_a72_and_admits_emulation(device, emulated_pi):
    cpuinfo = device.run("cat /proc/cpuinfo")
    assert "CPU implementer\t: 0x41" in cpuinfo  # Arm Ltd.
    assert "CPU part\t: 0xd08" in cpuinfo  # Cortex-A72, as on a Raspberry Pi 4
    assert "Raspberry Pi 4" in cpuinfo
    assert "qemu" in cpuinfo.lower()
    assert emulated_pi.cpu == "cortex-a72"
    # qemu-user itself: the handler that runs the device's binaries is visible to it.
    assert device.run("cat /proc/sys/fs/binfmt_misc/qemu-aarch64").startswith("enabled")


def test_device_is_a_separate_host(device, emulated_pi):
    assert device.run("hostname").strip() == emulated_pi.name != socket.gethostname()
    # Its own network namespace: only loopback and its end of the veth pair.
    interfaces = {line.split(":")[0].strip() for line in device.run("cat /proc/net/dev").splitlines()[2:]}
    assert interfaces == {"lo", f"eqtb{emulated_pi.name.removeprefix('edgeq-rpi')}d"}


@pytest.mark.parametrize(
    ("venv", "module", "numpy_major"),
    [("tflite", "tflite_runtime.interpreter", "1"), ("litert", "ai_edge_litert.interpreter", "2")],
)
def test_both_device_venvs_run_a_tiny_int8_model_like_the_host(device, emulated_pi, tiny_int8_tflite, venv, module,
                                                               numpy_major):
    from ai_edge_litert.interpreter import Interpreter

    host = Interpreter(model_path=str(tiny_int8_tflite))
    host.allocate_tensors()
    host.set_tensor(host.get_input_details()[0]["index"], np.array(TINY_INPUT, dtype=np.int8))
    host.invoke()
    expected = host.get_tensor(host.get_output_details()[0]["index"]).tolist()

    device.put(tiny_int8_tflite, "/tmp/tiny_int8.tflite")
    python = emulated_pi.python_tflite if venv == "tflite" else emulated_pi.python_litert
    script = TINY_RUN.replace("'", "'\\''")
    result = json.loads(device.run(f"{python} -c '{script}' /tmp/tiny_int8.tflite '{json.dumps(TINY_INPUT)}'"))
    assert result["module"] == module
    assert result["numpy"].split(".")[0] == numpy_major
    assert result["output"] == expected


# ---------------------------------------------------------------- edgeq deploy onto it


def deploy(args: list[str]) -> tuple[int, str]:
    """``edgeq deploy ARGS`` through click's runner: (exit code, output)."""
    from click.testing import CliRunner

    from edgeq.cli import main

    result = CliRunner().invoke(main, ["deploy", *args], catch_exceptions=False)
    return result.exit_code, result.output


def deploy_to(dev: EmulatedDevice, known_hosts: Path, model: Path, python: str, out: Path,
              extra: tuple[str, ...] = ()) -> tuple[int, str]:
    return deploy([str(model), "--host", dev.host, "--identity", str(dev.key), "--known-hosts", str(known_hosts),
                   "--python", python, "-o", str(out), "--json", *extra])


@pytest.fixture(scope="module")
def host_accuracy(tmp_path_factory):
    """Top-1 accuracy of a model on this (x86) machine, through the same runner: {model: accuracy}."""
    cache: dict[Path, float] = {}

    def measure(model: Path, eval_npz: Path) -> float:
        if model not in cache:
            out = tmp_path_factory.mktemp("host_report")
            remote = tmp_path_factory.mktemp("host_device")
            code, output = deploy([str(model), "--eval", str(eval_npz), "--runs", "5", "--no-activate",
                                   "--remote-dir", str(remote), "-o", str(out)])
            assert code == 0, output
            cache[model] = json.loads((out / "report.json").read_text())["accuracy"]
        return cache[model]

    return measure


def check_report(report: dict, runtime: str) -> None:
    device = report["device"]
    assert device["arch"] == "aarch64"
    assert "bookworm" in device["os"]
    assert device["emulation"]["emulated"] is True
    assert device["emulation"]["qemu_in_cpuinfo"] is True
    assert report["runtime"]["name"] == runtime


@pytest.mark.slow
def test_deploy_digits_with_ai_edge_litert(emulated_pi, device_known_hosts, digits_int8_tflite, digits_eval_npz,
                                           host_accuracy, tmp_path):
    pytest.importorskip("edgeq.deploy", reason="edgeq deploy is not there yet")
    code, output = deploy_to(emulated_pi, device_known_hosts, digits_int8_tflite, emulated_pi.python_litert,
                             tmp_path / "r", ("--eval", str(digits_eval_npz), "--runs", "20"))
    assert code == 0, output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    check_report(report, "ai_edge_litert")
    assert report["device"]["numpy"].startswith("2.")
    assert report["accuracy"] == host_accuracy(digits_int8_tflite, digits_eval_npz)


@pytest.mark.slow
def test_deploy_digits_with_tflite_runtime(emulated_pi, device_known_hosts, digits_int8_tflite, digits_eval_npz,
                                           host_accuracy, tmp_path):
    pytest.importorskip("edgeq.deploy", reason="edgeq deploy is not there yet")
    code, output = deploy_to(emulated_pi, device_known_hosts, digits_int8_tflite, emulated_pi.python_tflite,
                             tmp_path / "r", ("--eval", str(digits_eval_npz), "--runs", "20"))
    assert code == 0, output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    check_report(report, "tflite_runtime")
    assert report["runtime"]["version"] == "2.14.0"
    assert report["device"]["numpy"].startswith("1.")
    assert report["accuracy"] == host_accuracy(digits_int8_tflite, digits_eval_npz)


def test_per_channel_dense_crash_on_tflite_runtime_is_one_line_naming_host_and_signal(
        emulated_pi, device_known_hosts, tiny_int8_perchannel_tflite, tmp_path):
    # tflite-runtime 2.14's aarch64 gemmlowp path dereferences NULL for some small per-channel
    # FULLY_CONNECTED shapes (input depth 4, or 3 output units); x86 wheels use ruy and run them.
    pytest.importorskip("edgeq.deploy", reason="edgeq deploy is not there yet")
    code, output = deploy_to(emulated_pi, device_known_hosts, tiny_int8_perchannel_tflite, emulated_pi.python_tflite,
                             tmp_path / "r", ("--runs", "5"))
    assert code != 0
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert emulated_pi.addr in lines[0] and "SIGSEGV" in lines[0]
    assert not (tmp_path / "r" / "report.json").exists()


# ---------------------------------------------------------------- a fleet: two emulated Pis and one local sshd


@pytest.fixture
def local_sshd(tmp_path):
    """A real sshd on 127.0.0.1 (the deploy tests' helper) trusting a fresh key."""
    from tests.deploy.sshd_helper import SSHD, SshdProcess, keygen

    if not SSHD.exists():
        pytest.fail("/usr/sbin/sshd is missing; run `make sysdeps` (scripts/system-deps.sh)")
    keys = tmp_path / "keys"
    keys.mkdir()
    server = SshdProcess(tmp_path / "sshd", keygen(keys / "client"), keygen(keys / "wrong"))
    yield server.info
    server.stop()


def local_device_python() -> str:
    root = Path(__file__).resolve().parents[2]
    path = os.environ.get("EDGEQ_DEVICE_PYTHON") or str(root / ".venv-device" / "bin" / "python")
    if not Path(path).exists():
        pytest.fail(f"device python {path} is missing; run `make device-venv` or set EDGEQ_DEVICE_PYTHON")
    return path


def test_fleet_of_two_emulated_pis_and_a_local_sshd_from_one_inventory(emulated_pis, local_sshd, tiny_int8_tflite,
                                                                         tmp_path):
    pytest.importorskip("edgeq.fleet_deploy", reason="edgeq fleet deploy is not there yet")
    pi0, pi1 = emulated_pis
    hosts = {
        pi0.name: {"ansible_host": pi0.addr, "ansible_port": pi0.port, "ansible_user": pi0.user,
                   "ansible_ssh_private_key_file": str(pi0.key), "ansible_python_interpreter": pi0.python_litert},
        pi1.name: {"ansible_host": pi1.addr, "ansible_port": pi1.port, "ansible_user": pi1.user,
                   "ansible_ssh_private_key_file": str(pi1.key), "ansible_python_interpreter": pi1.python_tflite},
        "bench-pc": {"ansible_host": "127.0.0.1", "ansible_port": local_sshd.port, "ansible_user": local_sshd.user,
                     "ansible_ssh_private_key_file": str(local_sshd.client_key),
                     "ansible_python_interpreter": local_device_python(),
                     "edgeq_remote_dir": str(tmp_path / "bench-pc-device")},
    }
    inventory = tmp_path / "inventory.yml"
    # JSON is YAML: no hand-written indentation to get wrong.
    inventory.write_text(json.dumps({"all": {"children": {"emulated": {"hosts": {pi0.name: hosts[pi0.name],
                                                                                  pi1.name: hosts[pi1.name]}},
                                                          "bench": {"hosts": {"bench-pc": hosts["bench-pc"]}}}}}))
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(pi0.known_hosts.read_text() + pi1.known_hosts.read_text() + local_sshd.known_hosts_line())

    code, output = deploy([str(tiny_int8_tflite), "--inventory", str(inventory), "--known-hosts", str(known_hosts),
                           "--runs", "5", "-o", str(tmp_path / "fleet"), "--json"])
    summary = json.loads((tmp_path / "fleet" / "summary.json").read_text())
    assert code == 0, output
    assert summary["counts"] == {"hosts": 3, "ok": 3, "failed": 0, "timeout": 0, "gate_failed": 0}
    rows = {row["name"]: row for row in summary["hosts"]}
    assert rows[pi0.name]["device"]["arch"] == rows[pi1.name]["device"]["arch"] == "aarch64"
    assert rows["bench-pc"]["device"]["arch"] == "x86_64"
    assert rows[pi0.name]["device"]["hostname"] == pi0.name and rows[pi1.name]["device"]["hostname"] == pi1.name
    assert rows[pi0.name]["runtime"]["name"] == "ai_edge_litert"
    assert rows[pi1.name]["runtime"]["name"] == rows["bench-pc"]["runtime"]["name"] == "tflite_runtime"
    for name in rows:
        assert json.loads((tmp_path / "fleet" / name / "report.json").read_text())["model"]["sha256"] \
            == summary["model"]["sha256"]
