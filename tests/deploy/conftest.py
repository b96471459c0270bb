"""Fixtures for the deploy tests: a real OpenSSH server on 127.0.0.1 and the separate device venv."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeq.transport import SSHOptions

ROOT = Path(__file__).resolve().parents[2]
SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "edgeq-test", "-f", str(path)], check=True)
    return path


@dataclass(frozen=True)
class Sshd:
    """A running sshd: where it listens and the keys that go with it."""

    port: int
    user: str
    host_key_pub: str  # "ssh-ed25519 AAAA..."
    client_key: Path
    wrong_key: Path
    log: Path

    @property
    def spec(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key_pub}\n"


@pytest.fixture(scope="session")
def device_python() -> str:
    """The device side: a venv with only numpy<2 and tflite-runtime (``make device-venv``)."""
    path = os.environ.get("EDGEQ_DEVICE_PYTHON") or str(ROOT / ".venv-device" / "bin" / "python")
    if not Path(path).exists():
        pytest.fail(f"device python {path} is missing; run `make device-venv` or set EDGEQ_DEVICE_PYTHON")
    return path


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> Sshd:
    """A real ``/usr/sbin/sshd -D`` with a private config, generated keys, killed after the session."""
    if not SSHD.exists():
        pytest.fail("/usr/sbin/sshd is missing; run `make sysdeps` (scripts/system-deps.sh)")
    d = tmp_path_factory.mktemp("sshd")
    host_key = keygen(d / "ssh_host_ed25519_key")
    client = keygen(d / "client_key")
    wrong = keygen(d / "wrong_key")
    (d / "authorized_keys").write_text(Path(f"{client}.pub").read_text())
    port = free_port()
    cfg = d / "sshd_config"
    cfg.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'}
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
LogLevel VERBOSE
""")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
    log = d / "sshd.log"
    proc = subprocess.Popen([str(SSHD), "-D", "-f", str(cfg), "-E", str(log)])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"sshd did not start: {log.read_text() if log.exists() else ''}")
            time.sleep(0.05)
    pub = Path(f"{host_key}.pub").read_text().split()
    yield Sshd(port, getpass.getuser(), f"{pub[0]} {pub[1]}", client, wrong, log)
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def known_hosts(tmp_path, sshd) -> Path:
    """A known_hosts file that already trusts the test sshd."""
    path = tmp_path / "known_hosts"
    path.write_text(sshd.known_hosts_line())
    return path


@pytest.fixture
def ssh_options(sshd, known_hosts, tmp_path) -> SSHOptions:
    """SSH options that use only test files (no ~/.ssh, no agent)."""
    return SSHOptions(identity=str(sshd.client_key), known_hosts=str(known_hosts), connect_timeout=5.0,
                      ssh_config=str(tmp_path / "no_ssh_config"), allow_agent=False)


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch):
    # The developer's ssh-agent must not change what a test sees.
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


@pytest.fixture
def fake_model(tmp_path) -> Path:
    """Bytes with a .tflite identifier but no valid model: the runtime must reject it."""
    path = tmp_path / "broken.tflite"
    path.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(range(256)) * 8)
    return path


@pytest.fixture(scope="session")
def no_runtime_python(tmp_path_factory) -> str:
    """A Python with neither numpy nor a TFLite runtime (a bare venv of the system Python)."""
    base = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    return str(venv / "bin" / "python")


def tree(path: Path) -> list[str]:
    """Every file under ``path`` (relative), for 'nothing written' / 'no partial file' checks."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
