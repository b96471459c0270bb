"""Fixtures for the deploy tests: a real OpenSSH server on 127.0.0.1 and the separate device venv."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edgeq.transport import SSHOptions
from tests.deploy.sshd_helper import SSHD, Sshd, SshdProcess, keygen


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> Sshd:
    """A real ``/usr/sbin/sshd -D`` with a private config, generated keys, killed after the session."""
    if not SSHD.exists():
        pytest.fail("/usr/sbin/sshd is missing; run `make sysdeps` (scripts/system-deps.sh)")
    d = tmp_path_factory.mktemp("sshd")
    try:
        server = SshdProcess(d, keygen(d / "client_key"), keygen(d / "wrong_key"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server.info
    server.stop()


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


FLEET_DATA = Path(__file__).resolve().parent.parent / "fleet" / "data"


@pytest.fixture(scope="session")
def model_a() -> Path:
    """A tiny valid int8 model (checked in)."""
    return FLEET_DATA / "tiny_a.tflite"


@pytest.fixture(scope="session")
def model_b() -> Path:
    """Another tiny valid int8 model, different bytes."""
    return FLEET_DATA / "tiny_b.tflite"
