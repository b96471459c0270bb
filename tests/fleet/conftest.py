"""Fixtures for the fleet and fault tests: several real sshd instances, tiny models, a fault ledger."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeq.deploy import DeployOptions
from edgeq.transport import SSHOptions
from tests.deploy.sshd_helper import SSHD, Sshd, SshdProcess, keygen

DATA = Path(__file__).resolve().parent / "data"
PASSPHRASE = "correct horse battery staple 7f3c"
N_SSHD = 3

# Options that keep a deploy to a tiny model well under a second of measuring.
FAST = dict(runs=5, warmup=0, min_seconds=0.05, min_warmup_seconds=0.0, reference=False,
            probe_timeout=20.0, upload_timeout=20.0, run_timeout=30.0, cleanup_timeout=5.0)


@dataclass(frozen=True)
class Fleet:
    """Several sshd instances trusting one client key (and a passphrase-protected one)."""

    servers: tuple[Sshd, ...]
    client_key: Path
    wrong_key: Path
    passphrase_key: Path

    def known_hosts(self, path: Path, port_map: dict[int, int] | None = None) -> Path:
        """A known_hosts file trusting every server (``port_map`` adds proxy ports with a server's key)."""
        lines = [s.known_hosts_line() for s in self.servers]
        by_port = {s.port: s for s in self.servers}
        for proxy_port, upstream in (port_map or {}).items():
            lines.append(f"[127.0.0.1]:{proxy_port} {by_port[upstream].host_key_pub}\n")
        path.write_text("".join(lines))
        return path


@pytest.fixture(scope="session")
def fleet(tmp_path_factory) -> Fleet:
    if not SSHD.exists():
        pytest.fail("/usr/sbin/sshd is missing; run `make sysdeps` (scripts/system-deps.sh)")
    keys = tmp_path_factory.mktemp("fleet-keys")
    client, wrong = keygen(keys / "client_key"), keygen(keys / "wrong_key")
    locked = keygen(keys / "locked_key", passphrase=PASSPHRASE)
    procs = []
    try:
        for i in range(N_SSHD):
            procs.append(SshdProcess(tmp_path_factory.mktemp(f"sshd{i}"), client, wrong, (locked,)))
    except RuntimeError as exc:
        for p in procs:
            p.stop()
        pytest.fail(str(exc))
    yield Fleet(tuple(p.info for p in procs), client, wrong, locked)
    for p in procs:
        p.stop()


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.delenv("EDGEQ_SSH_PASSPHRASE", raising=False)


@pytest.fixture
def ssh_opts(fleet, tmp_path) -> SSHOptions:
    return SSHOptions(identity=str(fleet.client_key), known_hosts=str(fleet.known_hosts(tmp_path / "known_hosts")),
                      connect_timeout=3.0, ssh_config=str(tmp_path / "no_ssh_config"), allow_agent=False)


@pytest.fixture
def opts(fleet, ssh_opts, device_python, tmp_path) -> DeployOptions:
    """Deploy options for fleet.servers[0] with a fresh remote dir."""
    return DeployOptions(host=fleet.servers[0].spec, python=device_python, remote_dir=str(tmp_path / "device"),
                         ssh=ssh_opts, **FAST)


@pytest.fixture(scope="session")
def model_a() -> Path:
    return DATA / "tiny_a.tflite"


@pytest.fixture(scope="session")
def model_b() -> Path:
    return DATA / "tiny_b.tflite"


@pytest.fixture(scope="session")
def model_big(tmp_path_factory, model_b) -> Path:
    """tiny_b padded to ~1 MiB (the runtime ignores trailing bytes): an upload that takes many writes."""
    path = tmp_path_factory.mktemp("big") / "tiny_b_padded.tflite"
    path.write_bytes(model_b.read_bytes() + bytes(1 << 20))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def active(remote: Path) -> str | None:
    """The sha256 REMOTE_DIR/current points at, after checking the file really has that hash."""
    cur = remote / "current"
    if not cur.is_symlink():
        return None
    digest = os.readlink(cur).split("/")[-1]
    data = (cur / "model.tflite").read_bytes()
    assert hashlib.sha256(data).hexdigest() == digest, "the active model file does not match its name"
    return digest


def partial_files(remote: Path) -> list[str]:
    """Files at a final path that are not what their name promises, plus leftover temp files."""
    bad = []
    for p in (remote / "models").glob("*/model.tflite") if (remote / "models").exists() else []:
        if hashlib.sha256(p.read_bytes()).hexdigest() != p.parent.name:
            bad.append(str(p))
    return bad
