"""Files to an SSH device: over SFTP, or, where the server has none (Dropbear without sftp-server), on the
stdin of ``cat`` over the exec channel. Either way under one deadline, with the size that landed checked."""

from __future__ import annotations

import errno
import mmap
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from edgeq.errors import ConnectError, DeviceError, RemoteCommandError
from edgeq.transport.base import CHUNK, Result, UploadMeter, write_error
from edgeq.transport.ssh_channel import Watchdog
from edgeq.transport.ssh_config import SSHOptions

#: Writes stdin to "$1", which must not exist yet (set -C), then prints the size that landed.
EXEC_PUT_SCRIPT = 'set -C; cat > "$1" || exit $?; wc -c < "$1"'


class SftpUnavailable(Exception):
    """The server has no SFTP (subsystem refused or gone at once) while the link is up."""


class Link(Protocol):
    """What uploads need of the SSH connection they travel on (``SSHTransport`` is one)."""

    host: str
    options: SSHOptions

    def run(self, argv: Sequence[str], timeout: float, stdin: Optional[Any] = None, check: bool = True,
            on_sent: Optional[Callable[[int], None]] = None) -> Result: ...

    def paramiko_transport(self) -> Any: ...

    def alive(self) -> bool: ...


class Uploads:
    """``put``/``remove`` for one SSH connection. The transfer is chosen once per connection: a server that
    refused SFTP is not asked again (``transfer`` says which: ``"sftp"`` or ``"exec"``)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.transfer: Optional[str] = None
        self._client: Any = None

    def sftp(self, seconds: float) -> Any:
        """The SFTP session, started within ``seconds`` (subsystem request and version exchange)."""
        if self._client is not None:
            return self._client
        import paramiko

        host = self.link.host
        tr = self.link.paramiko_transport()
        deadline = time.monotonic() + seconds
        try:
            chan = tr.open_session(timeout=seconds)
        except paramiko.ChannelException as exc:
            # The server said no (MaxSessions, "administratively prohibited") and the link is up.
            raise DeviceError(f"{host} refused a session for the upload: {exc.text or exc}",
                              hint="check the device's SSH server (MaxSessions) and its log", host=host) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"cannot open SFTP on {host}: no session within {seconds:g} s "
                               f"({exc or type(exc).__name__})", hint="check sshd on the device, or raise "
                               "--connect-timeout", host=host) from None
        try:
            chan.settimeout(seconds)
            with Watchdog(seconds, chan.close) as dog:
                try:
                    chan.invoke_subsystem("sftp")
                except (paramiko.SSHException, OSError, EOFError):
                    if not dog.fired:
                        raise
            if dog.fired:
                raise socket.timeout("no answer to the subsystem request")
            chan.settimeout(max(0.05, deadline - time.monotonic()))
            self._client = paramiko.SFTPClient(chan)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            chan.close()
            if isinstance(exc, (socket.timeout, TimeoutError)):
                raise ConnectError(f"{host} did not start SFTP within {seconds:g} s ({exc})",
                                   hint="the device's sshd is overloaded or hung; check it, or raise "
                                        "--connect-timeout", host=host) from None
            if self.link.alive():
                # The server refused the subsystem (OpenSSH without a Subsystem line), or started one
                # that is not there (Dropbear without sftp-server: the channel closes at once).
                raise SftpUnavailable(str(exc) or type(exc).__name__) from None
            raise ConnectError(f"the SSH connection to {host} was lost while starting SFTP: "
                               f"{exc or type(exc).__name__}", hint="check the link to the device and retry",
                               host=host) from None
        return self._client

    def drop_sftp(self) -> None:
        """Forget the SFTP session (closing its channel)."""
        # After a timeout the SFTP reply stream is out of step with our requests:
        # never reuse that session.
        sftp, self._client = self._client, None
        if sftp is not None:
            try:
                sftp.get_channel().close()
            except Exception:
                pass

    def put(self, local: Path, remote: str, timeout: float, meter: UploadMeter) -> int:
        """Upload over SFTP; where the server has no SFTP, over the exec channel."""
        deadline = time.monotonic() + timeout
        if self.transfer != "exec":
            try:
                self.sftp(min(self.link.options.connect_timeout, max(0.05, deadline - time.monotonic())))
            except SftpUnavailable:
                self.transfer = "exec"
            else:
                self.transfer = "sftp"
        if self.transfer == "exec":
            return self._put_exec(Path(local), remote, max(0.05, deadline - time.monotonic()), meter)
        return self._put_sftp(Path(local), remote, deadline, timeout, meter)

    def _put_exec(self, local: Path, remote: str, timeout: float, meter: UploadMeter) -> int:
        """Stream the file into ``cat`` on the device (POSIX sh; works with BusyBox); check the size landed.

        The caller verifies the sha256 on the device before renaming the file into place, as for SFTP.
        """
        host = self.link.host
        total = local.stat().st_size
        with open(local, "rb") as src:
            data: Any = mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) if total else b""
        try:
            res = self.link.run(["sh", "-c", EXEC_PUT_SCRIPT, "sh", remote], timeout, data, check=False,
                                on_sent=meter)
        except ConnectError as exc:
            # Over a lost link a removal would only wait; the next deploy sweeps temp files.
            raise ConnectError(f"upload of {remote} to {host} did not finish: {exc.message}", hint=exc.hint,
                               host=host) from None
        except RemoteCommandError as exc:
            if exc.exit_status is None and self.link.alive():  # timed out (and killed), the link is up
                self.remove(remote)
            raise
        finally:
            if isinstance(data, mmap.mmap):
                try:
                    data.close()
                except BufferError:  # pragma: no cover - a view still held; the GC closes it
                    pass
        # The last line: a login shell may print a greeting first.
        landed = (res.stdout.strip().splitlines() or [""])[-1].strip()
        if res.ok and landed.isdigit() and int(landed) == total:
            return total
        self.remove(remote)
        if res.ok:
            problem = OSError(f"the device stored only {landed[:20] or '?'} of {total} bytes")
            problem.errno = errno.ENOSPC
        else:
            problem = OSError(res.tail(2) or f"exit status {res.exit_status}")
        raise write_error(host, remote, problem)

    def _put_sftp(self, local: Path, remote: str, deadline: float, timeout: float, meter: UploadMeter) -> int:
        import paramiko

        host = self.link.host

        def left() -> float:
            return max(0.05, deadline - time.monotonic())

        def check_deadline(what: str) -> None:
            if time.monotonic() > deadline:
                raise socket.timeout(f"{what}: the upload took longer than {timeout:g} s")

        total = Path(local).stat().st_size
        sftp = self.sftp(min(self.link.options.connect_timeout, left()))
        chan = sftp.get_channel()
        sent = 0
        try:
            with open(local, "rb") as src:
                chan.settimeout(left())
                dst = sftp.open(remote, "wb")
                check_deadline("opening the file")
                try:
                    dst.set_pipelined(True)
                    while chunk := src.read(CHUNK):
                        # A silent link blocks a write until the channel timeout: keep that
                        # inside the phase deadline, not a full timeout per write.
                        chan.settimeout(left())
                        dst.write(chunk)
                        sent += len(chunk)
                        meter(sent)
                        check_deadline("writing")
                    chan.settimeout(left())
                    dst.flush()
                    check_deadline("flushing")
                finally:
                    chan.settimeout(left())
                    dst.close()  # paramiko's close() swallows a timeout: the deadline check below tells
            check_deadline("closing the file")
            chan.settimeout(left())
            # Pipelined SFTP writes drop error replies (ENOSPC among them); the size tells.
            landed = sftp.stat(remote).st_size
            check_deadline("checking the size")
            if landed != total:
                raise OSError(errno.ENOSPC, f"the device stored only {landed} of {total} bytes")
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self.drop_sftp()
            if isinstance(exc, (socket.timeout, TimeoutError)) or not self.link.alive():
                # Over a silent or cut link a removal would only wait; the next deploy sweeps temp files.
                raise ConnectError(f"upload of {remote} to {host} did not finish: {str(exc) or type(exc).__name__}",
                                   hint="check the link to the device and retry", host=host) from None
            self.remove(remote)
            raise write_error(host, remote, exc) from None
        return sent

    def remove(self, remote: str) -> None:
        """Best-effort removal of a device file, the way files travel on this connection."""
        if not self.link.alive():
            return
        seconds = min(5.0, self.link.options.connect_timeout)
        if self.transfer == "exec":
            try:
                self.link.run(["rm", "-f", "--", remote], seconds, check=False)
            except DeviceError:
                pass
            return
        try:
            sftp = self.sftp(seconds)
            sftp.get_channel().settimeout(seconds)
            sftp.remove(remote)
        except SftpUnavailable:
            self.transfer = "exec"
            self.remove(remote)
        except DeviceError:
            pass
        except Exception:
            self.drop_sftp()
