"""How edgeq talks to a device: run a command, upload a file. SSH (paramiko) or the local machine.

Both transports run argument vectors, never shell strings built from user input:
``SSHTransport`` quotes every argument with ``shlex.quote`` before it reaches the
remote shell, ``LocalTransport`` runs the vector with no shell at all. Every
operation has an explicit timeout; failures raise ``edgeq.errors`` classes that
name the host. Nothing secret (key material, passphrases) is ever put in a
message.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from edgeq.errors import AuthError, ConnectError, DeviceError, HostKeyError, RemoteCommandError, UsageError

ByteProgress = Callable[[int, int], None]

_CHUNK = 64 * 1024
# Host names, IPv4/IPv6 literals and ssh_config aliases; anything else cannot be a host.
_HOST_RE = re.compile(r"^[A-Za-z0-9_.:%-]+$")
_USER_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?$")


@dataclass(frozen=True)
class Result:
    """The outcome of one command on the device."""

    command: str
    exit_status: int
    stdout: str
    stderr: str
    signal: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def tail(self, lines: int = 8) -> str:
        """The last lines of stderr (or stdout when stderr is empty), for error messages."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return "\n".join(text[-lines:])


def signal_name(number: int) -> str:
    """``11`` -> ``"SIGSEGV"``; unknown numbers as ``"signal 77"``."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Transport(ABC):
    """A device edgeq can run commands on and upload files to."""

    #: Name used in messages and reports (``user@host:port`` or ``local``); never secret.
    host: str

    @abstractmethod
    def run(self, argv: Sequence[str], timeout: float, stdin: Optional[bytes] = None,
            check: bool = True) -> Result:
        """Run ``argv`` on the device; raise ``RemoteCommandError`` on timeout, or on failure if ``check``."""

    @abstractmethod
    def put(self, local: Path, remote: str, timeout: float, progress: Optional[ByteProgress] = None) -> int:
        """Write ``local`` to the device path ``remote`` (flushed); return bytes sent."""

    @abstractmethod
    def remove(self, remote: str) -> None:
        """Best-effort removal of a device file (cleanup after a failed upload)."""

    def makedirs(self, remote: str, timeout: float) -> None:
        """Create a directory (and parents) on the device."""
        res = self.run(["mkdir", "-p", "--", remote], timeout, check=False)
        if not res.ok:
            raise DeviceError(f"cannot create directory {remote}: {res.tail(2) or 'exit ' + str(res.exit_status)}",
                              hint="choose a writable --remote-dir", host=self.host)

    def close(self) -> None:
        """Release the connection."""

    def cancel(self) -> None:
        """Abandon the device from another thread (a hung host): close, and never reconnect."""
        self.close()

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, res: Result, check: bool) -> Result:
        if check and not res.ok:
            what = f"killed by {res.signal}" if res.signal else f"exit status {res.exit_status}"
            raise RemoteCommandError(
                f"command failed on {self.host} ({what}): {res.command}" + (f": {res.tail(3)}" if res.tail(3) else ""),
                host=self.host, command=res.command, exit_status=res.exit_status, output_tail=res.tail(),
            )
        return res


def _write_error(host: str, remote: str, exc: BaseException) -> DeviceError:
    code = getattr(exc, "errno", None)
    text = str(exc) or type(exc).__name__
    if code in (errno.ENOSPC, errno.EDQUOT) or "space" in text.lower() or text.strip() == "Failure":
        return DeviceError(f"cannot write {remote} on {host}: {text} (is the device's disk full?)",
                           hint="free space on the device or choose another --remote-dir", host=host)
    return DeviceError(f"cannot write {remote} on {host}: {text}",
                       hint="check that --remote-dir is writable on the device", host=host)


# --------------------------------------------------------------------- local


class LocalTransport(Transport):
    """The local machine is the device: commands run as child processes, files are copied."""

    def __init__(self) -> None:
        self.host = "local"

    def run(self, argv: Sequence[str], timeout: float, stdin: Optional[bytes] = None,
            check: bool = True) -> Result:
        argv = [os.path.expanduser(argv[0]), *argv[1:]]
        command = shlex.join(argv)
        try:
            proc = subprocess.run(argv, input=stdin or b"", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=timeout, check=False)
        except FileNotFoundError:
            return self._check(Result(command, 127, "", f"{argv[0]}: not found"), check)
        except PermissionError:
            return self._check(Result(command, 126, "", f"{argv[0]}: permission denied"), check)
        except subprocess.TimeoutExpired as exc:
            raise RemoteCommandError(f"command timed out after {timeout:g} s on {self.host}: {command}",
                                     hint="raise the timeout or check the device load", host=self.host,
                                     command=command, exit_status=None,
                                     output_tail=_decode(exc.stderr or b"")[-2000:]) from None
        sig = signal_name(-proc.returncode) if proc.returncode < 0 else None
        res = Result(command, proc.returncode, _decode(proc.stdout), _decode(proc.stderr), sig)
        return self._check(res, check)

    def put(self, local: Path, remote: str, timeout: float, progress: Optional[ByteProgress] = None) -> int:
        total = Path(local).stat().st_size
        sent = 0
        deadline = time.monotonic() + timeout
        try:
            with open(local, "rb") as src, open(remote, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    sent += len(chunk)
                    if progress:
                        progress(sent, total)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"upload took longer than {timeout:.1f} s")
                dst.flush()
                os.fsync(dst.fileno())
        except OSError as exc:
            self.remove(remote)
            raise _write_error(self.host, remote, exc) from None
        return sent

    def remove(self, remote: str) -> None:
        try:
            os.unlink(remote)
        except OSError:
            pass


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "replace")


# ----------------------------------------------------------------------- SSH


@dataclass(frozen=True)
class SSHOptions:
    """How to reach a device over SSH (all timeouts in seconds)."""

    identity: Optional[str] = None
    known_hosts: Optional[str] = None
    accept_new_host_key: bool = False
    connect_timeout: float = 10.0
    ssh_config: Optional[str] = None  # default ~/.ssh/config
    allow_agent: bool = True
    keepalive_s: int = 10
    # How long unacknowledged data may sit before the kernel drops the link.
    link_timeout_s: float = 30.0
    # Transient failures while connecting (refused, reset) are retried this many
    # times with exponential backoff; timeouts, auth and host-key errors never are.
    connect_retries: int = 2
    retry_backoff_s: float = 0.5
    # Decrypts an encrypted --identity; never shown in repr, messages or reports.
    passphrase: Optional[str] = field(default=None, repr=False, compare=False)


def parse_host(spec: str) -> tuple[Optional[str], str, Optional[int]]:
    """``[USER@]HOST[:PORT]`` (IPv6 as ``[::1]:22``) -> (user, host, port); rejects what cannot be valid."""
    user: Optional[str] = None
    rest = spec.strip()
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
        if not _USER_RE.match(user):
            raise UsageError(f"invalid user name in --host {spec!r}")
    port: Optional[int] = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise UsageError(f"invalid --host {spec!r}; use [USER@]HOST[:PORT]")
            port = _port(tail[1:], spec)
    elif rest.count(":") == 1:
        host, p = rest.split(":")
        port = _port(p, spec)
    else:
        host = rest
    if not host or not _HOST_RE.match(host) or host.startswith("-"):
        raise UsageError(f"invalid host name in --host {spec!r}; use [USER@]HOST[:PORT]")
    return user, host, port


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UsageError(f"invalid port in --host {spec!r}")
    return int(text)


def fingerprint(key: object) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of a paramiko public key."""
    digest = hashlib.sha256(key.asbytes()).digest()  # type: ignore[attr-defined]
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _quote_program(program: str) -> str:
    # `~/venv/bin/python` is common on a Pi; quoting would stop the shell
    # expanding `~`, so spell it as "$HOME"/<quoted rest>.
    if program.startswith("~/"):
        return '"$HOME"/' + shlex.quote(program[2:])
    return shlex.quote(program)


class SSHTransport(Transport):
    """A device reached over SSH with paramiko; host keys verified, every step under a timeout."""

    def __init__(self, host_spec: str, options: SSHOptions = SSHOptions()) -> None:
        import paramiko  # imported here so `edgeq --help` stays fast

        self._paramiko = paramiko
        self.options = options
        user, alias, port = parse_host(host_spec)
        cfg_path = Path(options.ssh_config or "~/.ssh/config").expanduser()
        cfg: dict = {}
        if cfg_path.is_file():
            try:
                cfg = paramiko.SSHConfig.from_path(str(cfg_path)).lookup(alias)
            except Exception as exc:  # a broken ssh_config must not hide as a connect error
                raise UsageError(f"cannot read SSH config {cfg_path}: {exc}") from None
        self.hostname = cfg.get("hostname", alias)
        if not _HOST_RE.match(self.hostname):
            raise UsageError(f"invalid HostName {self.hostname!r} for {alias} in {cfg_path}")
        self.port = port or int(cfg.get("port", 22))
        self.user = user or cfg.get("user") or _local_user()
        identities = [options.identity] if options.identity else list(cfg.get("identityfile", []))
        self.identities = [str(Path(p).expanduser()) for p in identities if Path(p).expanduser().is_file()]
        if options.identity and not self.identities:
            raise UsageError(f"identity file {options.identity} does not exist")
        known = options.known_hosts or "~/.ssh/known_hosts"
        self.known_hosts = Path(known).expanduser()
        self.host = f"{self.user}@{alias}" + (f":{self.port}" if self.port != 22 else "")
        self._client = None
        self._sftp_client = None
        self._cancelled = False
        #: How many connection attempts the last connect() took (retries included).
        self.connect_attempts = 0

    # -- connection

    def connect(self) -> "SSHTransport":
        """Open the connection: TCP, banner, host key check, authentication; each under connect_timeout.

        Refused or reset connections are retried ``connect_retries`` times with
        exponential backoff (0.5 s, 1 s, ...); timeouts, authentication and
        host-key failures are not retried.
        """
        attempts = 1 + max(0, self.options.connect_retries)
        self.connect_attempts = 0
        for i in range(attempts):
            self.connect_attempts += 1
            try:
                return self._connect_once()
            except ConnectError as exc:
                if not getattr(exc, "transient", False) or i == attempts - 1 or self._cancelled:
                    if getattr(exc, "transient", False) and i:
                        exc.message += f" (after {i + 1} attempts)"
                    raise
            time.sleep(self.options.retry_backoff_s * (2 ** i))
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect_once(self) -> "SSHTransport":
        paramiko = self._paramiko
        opts = self.options
        t = opts.connect_timeout
        if self._cancelled:
            raise ConnectError(f"the deploy to {self.host} was cancelled", host=self.host)
        try:
            sock = socket.create_connection((self.hostname, self.port), timeout=t)
        except ConnectionRefusedError:
            raise _transient(ConnectError(f"connection refused by {self.hostname}:{self.port}",
                             hint="is sshd running on the device, and is the port right?", host=self.host)) from None
        except (ConnectionResetError, ConnectionAbortedError) as exc:
            raise _transient(ConnectError(f"connection to {self.hostname}:{self.port} reset: {exc.strerror or exc}",
                             hint="check the network path to the device", host=self.host)) from None
        except socket.gaierror as exc:
            raise ConnectError(f"cannot resolve {self.hostname}: {exc.strerror}",
                               hint="check the host name or ~/.ssh/config", host=self.host) from None
        except (socket.timeout, TimeoutError):
            raise ConnectError(f"timed out after {t:g} s connecting to {self.hostname}:{self.port}",
                               hint="is the device on and reachable? raise --connect-timeout for slow links",
                               host=self.host) from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self.hostname}:{self.port}: {exc.strerror or exc}",
                               hint="check the network path to the device", host=self.host) from None
        _tune_socket(sock, opts.keepalive_s, opts.link_timeout_s)

        client = paramiko.SSHClient()
        if self.known_hosts.is_file():
            try:
                client.get_host_keys().load(str(self.known_hosts))
            except Exception as exc:
                sock.close()
                raise HostKeyError(f"cannot read known hosts file {self.known_hosts}: {exc}", host=self.host) from None
        client.set_missing_host_key_policy(
            _host_key_policy_class()(self.known_hosts, opts.accept_new_host_key, self.host,
                           _known_hosts_name(self.hostname, self.port)))
        try:
            client.connect(
                self.hostname, port=self.port, username=self.user, sock=sock,
                key_filename=self.identities or None, look_for_keys=not self.identities,
                allow_agent=opts.allow_agent, timeout=t, banner_timeout=t, auth_timeout=t,
                channel_timeout=t, passphrase=opts.passphrase,
            )
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(
                f"host key for {self.host} has CHANGED: {self.known_hosts} has {fingerprint(exc.expected_key)}, "
                f"the device offered {exc.key.get_name()} {fingerprint(exc.key)}; refusing to connect",
                hint=("if the device was reinstalled, check the new fingerprint on it and remove the old key with "
                      f"ssh-keygen -f {shlex.quote(str(self.known_hosts))} -R "
                      f"{shlex.quote(_known_hosts_name(self.hostname, self.port))}"),
                host=self.host) from None
        except paramiko.PasswordRequiredException:
            client.close()
            raise AuthError(f"authentication to {self.host} failed: the private key is encrypted",
                            hint="add it to ssh-agent (ssh-add KEY), or give its passphrase in the "
                                 "EDGEQ_SSH_PASSPHRASE environment variable", host=self.host) from None
        except paramiko.AuthenticationException:
            client.close()
            raise AuthError(f"authentication to {self.host} failed (no accepted key)",
                            hint="pass the right key with --identity, load it into ssh-agent, or add your public "
                                 "key to ~/.ssh/authorized_keys on the device", host=self.host) from None
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, EOFError) as exc:
            client.close()
            raise _transient(ConnectError(
                f"{self.hostname}:{self.port} closed the connection during the SSH handshake "
                f"({type(exc).__name__})", hint="check the network path and sshd on the device",
                host=self.host)) from None
        except (socket.timeout, TimeoutError) as exc:
            client.close()
            raise ConnectError(f"timed out after {t:g} s waiting for SSH on {self.hostname}:{self.port} ({exc or 'no answer'})",
                               hint="is this an SSH server? raise --connect-timeout for slow links",
                               host=self.host) from None
        except paramiko.SSHException as exc:
            client.close()
            text = str(exc)
            if self.identities and any(m in text.lower() for m in ("passphrase", "decrypt", "encrypted", "private key",
                                                               "invalid key")):
                raise AuthError(f"cannot use the private key for {self.host}: wrong passphrase or unreadable key",
                                hint="check the passphrase in EDGEQ_SSH_PASSPHRASE, or load the key into ssh-agent",
                                host=self.host) from None
            if "reset" in text.lower() or "eof" in text.lower():
                raise _transient(ConnectError(
                    f"{self.hostname}:{self.port} reset the connection during the SSH handshake",
                    hint="check the network path and sshd on the device", host=self.host)) from None
            if any(m in text.lower() for m in ("banner", "no existing session", "timed out", "negotiation")):
                raise ConnectError(f"no SSH answer (banner, key exchange) from {self.hostname}:{self.port} within {t:g} s",
                                   hint="is sshd (not another service) listening on that port?",
                                   host=self.host) from None
            raise ConnectError(f"SSH negotiation with {self.hostname}:{self.port} failed: {text}",
                               host=self.host) from None
        except (ValueError, TypeError):
            # cryptography raises these for a wrong passphrase; its text is not shown on purpose.
            client.close()
            raise AuthError(f"cannot use the private key for {self.host}: wrong passphrase or unreadable key",
                            hint="check the passphrase in EDGEQ_SSH_PASSPHRASE, or load the key into ssh-agent",
                            host=self.host) from None
        except OSError as exc:
            client.close()
            raise ConnectError(f"connection to {self.hostname}:{self.port} lost: {exc.strerror or exc}",
                               host=self.host) from None
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(opts.keepalive_s)
        self._client = client
        return self

    def __enter__(self) -> "SSHTransport":
        if self._client is None:
            self.connect()
        return self

    def cancel(self) -> None:
        self._cancelled = True
        self.close()

    def close(self) -> None:
        if self._sftp_client is not None:
            try:
                self._sftp_client.close()
            except Exception:
                pass
            self._sftp_client = None
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _transport(self):
        if self._cancelled:
            raise ConnectError(f"the deploy to {self.host} was cancelled (no answer within its deadline)",
                               host=self.host)
        if self._client is None:
            self.connect()
        client = self._client
        tr = client.get_transport() if client is not None else None  # type: ignore[union-attr]
        if tr is None or not tr.is_active():
            raise ConnectError(f"the SSH connection to {self.host} was lost", hint="retry the deploy", host=self.host)
        return tr

    # -- commands

    def run(self, argv: Sequence[str], timeout: float, stdin: Optional[bytes] = None,
            check: bool = True) -> Result:
        if not argv:
            raise UsageError("empty command")
        command = " ".join([_quote_program(argv[0]), *(shlex.quote(a) for a in argv[1:])])
        # Not letting the shell exec the program makes a death by signal visible
        # as status 128+N (paramiko ignores the SSH exit-signal message).
        wire = command + "; exit $?"
        try:
            chan = self._transport().open_session(timeout=self.options.connect_timeout)
            chan.settimeout(timeout)
            chan.exec_command(wire)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            while True:
                while chan.recv_ready():
                    out += chan.recv(_CHUNK)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(_CHUNK)
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if chan.closed and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if time.monotonic() > deadline:
                    chan.close()
                    raise RemoteCommandError(
                        f"command timed out after {timeout:g} s on {self.host}: {command}",
                        hint="raise the timeout or check the device (load, a hung runtime)", host=self.host,
                        command=command, exit_status=None, output_tail=_decode(bytes(err))[-2000:])
                select.select([chan], [], [], 0.1)
            # paramiko reports a closed channel as "exit status ready" with status -1.
            status = chan.recv_exit_status() if chan.exit_status_ready() else -1
            if status == -1:
                # No exit status: a dead link, or a shell killed by a signal. Give
                # paramiko a moment to notice which.
                wait_until = time.monotonic() + 1.0
                while self._alive() and time.monotonic() < wait_until:
                    time.sleep(0.05)
                if not self._alive():
                    raise ConnectError(f"the SSH connection to {self.host} was lost during: {command}",
                                       hint="check the link to the device and retry", host=self.host)
            chan.close()
        except (RemoteCommandError, ConnectError):
            raise
        except (self._paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"the SSH connection to {self.host} failed during {command}: {exc or type(exc).__name__}",
                               hint="check the link to the device and retry", host=self.host) from None
        sig = None
        if status == -1:
            sig = "an unknown signal"
        elif 128 < status <= 128 + 64:
            sig = signal_name(status - 128)
        return self._check(Result(command, status, _decode(bytes(out)), _decode(bytes(err)), sig), check)

    # -- files

    def _sftp(self):
        if self._sftp_client is None:
            try:
                self._sftp_client = self._client.open_sftp() if self._client else None  # type: ignore[union-attr]
                if self._sftp_client is None:
                    self._transport()
                    self._sftp_client = self._client.open_sftp()  # type: ignore[union-attr]
            except (self._paramiko.SSHException, OSError, EOFError) as exc:
                raise ConnectError(f"cannot open SFTP on {self.host}: {exc}",
                                   hint="is the sftp subsystem enabled in the device's sshd_config?",
                                   host=self.host) from None
        return self._sftp_client

    def put(self, local: Path, remote: str, timeout: float, progress: Optional[ByteProgress] = None) -> int:
        sftp = self._sftp()
        sftp.get_channel().settimeout(timeout)
        total = Path(local).stat().st_size
        sent = 0
        deadline = time.monotonic() + timeout
        try:
            with open(local, "rb") as src:
                with sftp.open(remote, "wb") as dst:
                    dst.set_pipelined(True)
                    while chunk := src.read(_CHUNK):
                        # A silent link blocks a write until the channel timeout: keep that
                        # inside the phase deadline, not a full timeout per write.
                        sftp.get_channel().settimeout(max(0.1, deadline - time.monotonic()))
                        dst.write(chunk)
                        sent += len(chunk)
                        if progress:
                            progress(sent, total)
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"upload took longer than {timeout:.1f} s")
                    sftp.get_channel().settimeout(max(0.1, deadline - time.monotonic()))
                    dst.flush()
            # paramiko's close() swallows a timeout: check the deadline ourselves.
            if time.monotonic() > deadline:
                raise TimeoutError(f"upload took longer than {timeout:.1f} s")
            sftp.get_channel().settimeout(max(0.1, deadline - time.monotonic()))
            # Pipelined SFTP writes drop error replies (ENOSPC among them); the size tells.
            landed = sftp.stat(remote).st_size
            if landed != total:
                raise OSError(errno.ENOSPC, f"the device stored only {landed} of {total} bytes")
        except (OSError, EOFError, self._paramiko.SSHException) as exc:
            if isinstance(exc, (socket.timeout, TimeoutError, EOFError)) or not self._alive():
                # Over a silent or cut link a removal would only wait; the next deploy sweeps temp files.
                raise ConnectError(f"upload of {remote} to {self.host} did not finish: {str(exc) or type(exc).__name__}",
                                   hint="check the link to the device and retry", host=self.host) from None
            self.remove(remote)
            raise _write_error(self.host, remote, exc) from None
        return sent

    def _alive(self) -> bool:
        client = self._client
        tr = client.get_transport() if client else None
        return bool(tr and tr.is_active())

    def remove(self, remote: str) -> None:
        if not self._alive():
            return
        try:
            self._sftp().remove(remote)
        except Exception:
            pass


def _transient(exc: ConnectError) -> ConnectError:
    """Mark a connect failure as worth retrying (refused, reset)."""
    exc.transient = True  # type: ignore[attr-defined]
    return exc


def _local_user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:
        return "root"


def _tune_socket(sock: socket.socket, keepalive_s: int, link_timeout_s: float) -> None:
    """TCP keepalive + TCP_USER_TIMEOUT so a silent link (no FIN, no RST) is noticed."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", keepalive_s), ("TCP_KEEPINTVL", max(1, keepalive_s // 2)),
                        ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", int(link_timeout_s * 1000))):
        opt = getattr(socket, name, None)
        if opt is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)
            except OSError:
                pass


def _host_key_policy_class() -> type:
    """Our ``paramiko.MissingHostKeyPolicy`` (built on first use so paramiko is imported lazily)."""
    global _POLICY_CLASS
    if _POLICY_CLASS is None:
        import paramiko

        _POLICY_CLASS = type("HostKeyPolicy", (_HostKeyPolicyMixin, paramiko.MissingHostKeyPolicy), {})
    return _POLICY_CLASS


_POLICY_CLASS: Optional[type] = None


class _HostKeyPolicyMixin:
    """Refuse unknown host keys, or record them (OpenSSH ``accept-new``); changed keys never get here."""

    def __init__(self, known_hosts: Path, accept_new: bool, display: str, entry: str) -> None:
        self.known_hosts = known_hosts
        self.accept_new = accept_new
        self.display = display
        self.entry = entry

    def missing_host_key(self, client, hostname: str, key) -> None:  # paramiko's policy interface
        fp = fingerprint(key)
        recorded = client.get_host_keys().lookup(hostname)
        if recorded:
            # The host is known under another key type: treat like a changed key.
            kinds = ", ".join(sorted(recorded.keys()))
            raise HostKeyError(
                f"{self.display} offered a {key.get_name()} host key {fp}, but {self.known_hosts} records "
                f"only {kinds} for {hostname}; refusing to connect",
                hint=f"check the device, then remove the old entry with ssh-keygen -f {shlex.quote(str(self.known_hosts))} "
                     f"-R {shlex.quote(hostname)}", host=self.display)
        if not self.accept_new:
            raise HostKeyError(
                f"unknown host key for {self.display}: {key.get_name()} {fp} is not in {self.known_hosts}",
                hint=("compare it with `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` on the device, then re-run "
                      "with --accept-new-host-key to record it"), host=self.display)
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        try:
            self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(line)
        except OSError as exc:
            raise HostKeyError(f"cannot record the host key of {self.display} in {self.known_hosts}: {exc.strerror}",
                               host=self.display) from None
        client.get_host_keys().add(hostname, key.get_name(), key)


def make_transport(host: Optional[str], ssh: SSHOptions = SSHOptions()) -> Transport:
    """``None`` or ``"local"`` -> ``LocalTransport``; anything else -> ``SSHTransport`` (not yet connected)."""
    if host is None or host == "local":
        return LocalTransport()
    return SSHTransport(host, ssh)


__all__ = ["Result", "Transport", "LocalTransport", "SSHTransport", "SSHOptions", "make_transport", "parse_host",
           "fingerprint", "signal_name"]
