"""Start real Dropbear servers on 127.0.0.1 for tests: a BusyBox-ish device, with or without SFTP.

Dropbear runs an SFTP session by executing the sftp-server at a path compiled
into it (``/usr/lib/sftp-server`` in Debian's build, a link to OpenSSH's
``/usr/lib/openssh/sftp-server``). To have one server with SFTP and one without
on the same machine, each Dropbear runs in a private mount namespace
(``unshare -m``, so root is needed) in which bind mounts change what it sees,
and nothing outside (the OpenSSH tests use ``internal-sftp`` anyway):

- without SFTP, an empty directory hides ``/usr/lib/openssh``: the sftp-server
  link dangles and the subsystem ends at once, as on a Yocto or OpenWrt image
  that has no sftp-server;
- ``/etc/passwd`` gives the login user a home in the test directory (its
  ``.ssh/authorized_keys``) and BusyBox ``ash`` as login shell;
- ``sh`` is BusyBox's and ``pkill`` is gone (``/dev/null`` over it), as on a
  BusyBox device.

The namespace has its own mounts only: processes are this machine's, so a test
can check in ``/proc`` that what the device ran is gone.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from edgeq.transport import SSHOptions
from tests.deploy.sshd_helper import Server, free_port, keygen

DROPBEAR = Path("/usr/sbin/dropbear")
BUSYBOX = Path("/usr/bin/busybox")


@dataclass(frozen=True)
class Dropbear(Server):
    """A running Dropbear."""

    sftp: bool
    home: Path  # the login user's home on the "device"
    log: Path

    def options(self, tmp_path: Path, **kw) -> SSHOptions:
        """SSH options that use only test files (this server's key in a fresh known_hosts, no agent)."""
        kh = tmp_path / f"known_hosts_dropbear_{self.port}"
        kh.write_text(self.known_hosts_line())
        return SSHOptions(identity=str(self.client_key), known_hosts=str(kh), connect_timeout=5.0,
                          ssh_config=str(tmp_path / "no_ssh_config"), allow_agent=False, global_known_hosts=(),
                          **kw)


def missing() -> str:
    """Why Dropbear servers cannot be started here ("" when they can)."""
    if not DROPBEAR.exists() or not shutil.which("dropbearkey"):
        return "Dropbear is missing; run `make sysdeps` (scripts/system-deps.sh installs dropbear-bin)"
    if not BUSYBOX.exists():
        return "BusyBox is missing; run `make sysdeps` (scripts/system-deps.sh installs busybox)"
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "the Dropbear tests run Dropbear in a private mount namespace (unshare -m): run them as root"
    return ""


class DropbearProcess:
    """``dropbear -F -E`` in its own mount namespace; ``stop()`` ends it (by its own pid)."""

    def __init__(self, d: Path, client_key: Path, sftp: bool) -> None:
        why = missing()
        if why:
            raise RuntimeError(why)
        d.mkdir(parents=True, exist_ok=True)
        host_key = d / "dropbear_ed25519_host_key"
        subprocess.run(["dropbearkey", "-t", "ed25519", "-f", str(host_key)], check=True, capture_output=True)
        pub = subprocess.run(["dropbearkey", "-y", "-f", str(host_key)], check=True, capture_output=True,
                             text=True).stdout
        host_key_pub = " ".join(next(line for line in pub.splitlines() if line.startswith("ssh-")).split()[:2])
        home = d / "home"
        (home / ".ssh").mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o700)
        os.chmod(home / ".ssh", 0o700)
        auth = home / ".ssh" / "authorized_keys"
        auth.write_text(Path(f"{client_key}.pub").read_text())
        os.chmod(auth, 0o600)
        bindir = d / "bin"
        bindir.mkdir(exist_ok=True)
        ash = bindir / "ash"
        if not ash.exists():
            ash.symlink_to(BUSYBOX)  # BusyBox picks the applet from argv[0]
        passwd = d / "passwd"
        lines = []
        for line in Path("/etc/passwd").read_text().splitlines():
            f = line.split(":")
            if len(f) == 7 and f[2] == "0":
                f[5], f[6] = str(home), str(ash)
            lines.append(":".join(f))
        passwd.write_text("\n".join(lines) + "\n")
        shells = d / "shells"
        shells.write_text(Path("/etc/shells").read_text() + f"{ash}\n")
        empty = d / "empty"
        empty.mkdir(exist_ok=True)
        port = free_port()
        log = d / "dropbear.log"
        sh_real = os.path.realpath("/bin/sh")
        binds = [(passwd, "/etc/passwd"), (shells, "/etc/shells"), (BUSYBOX, sh_real)]
        pkill = shutil.which("pkill")
        if pkill:
            binds.append((Path("/dev/null"), os.path.realpath(pkill)))
        if not sftp:
            binds.append((empty, "/usr/lib/openssh"))
        script = "set -e\n" + "".join(f"mount --bind {shlex.quote(str(a))} {shlex.quote(str(b))}\n"
                                      for a, b in binds)
        script += (f"exec {DROPBEAR} -F -E -s -m -r {shlex.quote(str(host_key))} -p 127.0.0.1:{port} "
                   f"-P {shlex.quote(str(d / 'dropbear.pid'))}\n")
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"dropbear did not start: {log.read_text() if log.exists() else ''}")
                time.sleep(0.05)
        self.info = Dropbear(port, "root", host_key_pub, client_key, sftp, home, log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def serve_dropbear(tmp_path_factory, sftp: bool) -> Iterator[Dropbear]:
    why = missing()
    if why:
        pytest.fail(why)
    d = tmp_path_factory.mktemp("dropbear-sftp" if sftp else "dropbear")
    try:
        server = DropbearProcess(d, keygen(d / "client_key"), sftp)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield server.info
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dropbear(tmp_path_factory) -> Iterator[Dropbear]:
    """A Dropbear device without SFTP (BusyBox sh, no pkill), for the whole test session."""
    yield from serve_dropbear(tmp_path_factory, sftp=False)


@pytest.fixture(scope="session")
def dropbear_sftp(tmp_path_factory) -> Iterator[Dropbear]:
    """A Dropbear device with an sftp-server (BusyBox sh, no pkill)."""
    yield from serve_dropbear(tmp_path_factory, sftp=True)
