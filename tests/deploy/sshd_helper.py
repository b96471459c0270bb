"""Start real OpenSSH servers on 127.0.0.1 for tests (shared by tests/deploy and tests/fleet)."""

from __future__ import annotations

import getpass
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from edgeq.transport import SSHOptions

SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, kind: str = "ed25519", passphrase: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", "edgeq-test", "-f", str(path)],
                   check=True)
    return path


@dataclass(frozen=True)
class Server:
    """An SSH server a test started on 127.0.0.1: where it listens and the keys that go with it."""

    port: int
    user: str
    host_key_pub: str  # "ssh-ed25519 AAAA..."
    client_key: Path

    @property
    def spec(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key_pub}\n"


@dataclass(frozen=True)
class Sshd(Server):
    """A running OpenSSH sshd."""

    wrong_key: Path
    log: Path


class SshdProcess:
    """An ``sshd -D`` child with a private config; ``stop()`` ends it (by its own pid)."""

    def __init__(self, d: Path, client_key: Path, wrong_key: Path, extra_authorized: tuple[Path, ...] = (),
                 extra_config: str = "") -> None:
        """``extra_config`` lines go first: sshd keeps the first value of a keyword, so they win."""
        if not SSHD.exists():
            raise RuntimeError("/usr/sbin/sshd is missing; run `make sysdeps` (scripts/system-deps.sh)")
        d.mkdir(parents=True, exist_ok=True)
        host_key = keygen(d / "ssh_host_ed25519_key")
        keys = [Path(f"{client_key}.pub").read_text()] + [Path(f"{k}.pub").read_text() for k in extra_authorized]
        (d / "authorized_keys").write_text("".join(keys))
        port = free_port()
        cfg = d / "sshd_config"
        cfg.write_text(extra_config.strip() + "\n" + f"""Port {port}
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
MaxStartups 64
LogLevel VERBOSE
""")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
        log = d / "sshd.log"
        self.proc = subprocess.Popen([str(SSHD), "-D", "-f", str(cfg), "-E", str(log)])
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise RuntimeError(f"sshd did not start: {log.read_text() if log.exists() else ''}")
                time.sleep(0.05)
        pub = Path(f"{host_key}.pub").read_text().split()
        self.info = Sshd(port, getpass.getuser(), f"{pub[0]} {pub[1]}", client_key, wrong_key, log)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# ------------------------------------------------ fixtures for tests outside tests/deploy
# (tests/test_ssh_*.py import these; tests/deploy and tests/fleet have their own in conftest.py)


@pytest.fixture(scope="module")
def ssh_server(tmp_path_factory) -> Iterator[Sshd]:
    """A real ``/usr/sbin/sshd -D`` on 127.0.0.1 for one test module (LogLevel DEBUG1: the log shows requests)."""
    yield from serve_sshd(tmp_path_factory, "LogLevel DEBUG1")


def serve_sshd(tmp_path_factory, extra_config: str = "") -> Iterator[Sshd]:
    """Run an sshd (``extra_config`` first in its config) for as long as the generator is open."""
    if not SSHD.exists():
        pytest.fail("/usr/sbin/sshd is missing; run `make sysdeps` (scripts/system-deps.sh)")
    d = tmp_path_factory.mktemp("sshd")
    try:
        server = SshdProcess(d, keygen(d / "client_key"), keygen(d / "wrong_key"), extra_config=extra_config)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield server.info
    finally:
        server.stop()


@pytest.fixture
def ssh_opts(ssh_server: Sshd, tmp_path: Path, monkeypatch) -> SSHOptions:
    """Options that use only test files: this server's key in a fresh known_hosts, no ~/.ssh, no agent,
    no system-wide known_hosts."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    kh = tmp_path / "known_hosts"
    kh.write_text(ssh_server.known_hosts_line())
    return SSHOptions(identity=str(ssh_server.client_key), known_hosts=str(kh), connect_timeout=5.0,
                      ssh_config=str(tmp_path / "no_ssh_config"), allow_agent=False, global_known_hosts=())


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone_within(pids: list[int], seconds: float) -> bool:
    """True when none of ``pids`` is alive, waiting up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
