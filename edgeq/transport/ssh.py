"""A device over SSH (paramiko): connect (direct, ProxyCommand or ProxyJump), run commands, upload files.

Every step has a deadline that fires, whatever the peer does: connecting,
opening a session, the answer to a command request, starting SFTP, every SFTP
request, the command itself. A command that outlives its timeout is killed on
the device (its process tree, found in /proc) and the message says "killed"
only when the device confirmed that all of it is gone.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import edgeq.transport.known_hosts as kh
from edgeq.errors import ConnectError, DeviceError, HostKeyError, InputError, RemoteCommandError, UsageError
from edgeq.progress import ProgressCallback
from edgeq.sandbox import BoundedBuffer
from edgeq.transport.base import Result, Transport, signal_name
from edgeq.transport.ssh_channel import ChannelFailed, Watchdog, pump
from edgeq.transport.ssh_config import SSHOptions, read_host_config
from edgeq.transport.ssh_connect import (ProxyCommand, handshake_error, host_key_policy, open_tcp, prefer_key_types,
                                         quiet_paramiko_logs)
from edgeq.transport.ssh_upload import Uploads
from edgeq.transport.wire import (PidMarker, check_command_length, kill_script, posix_command, run_script,
                                  short_command, wire_command)

_MAX_JUMPS = 8


class SSHTransport(Transport):
    """A device reached over SSH with paramiko; host keys verified, every step under a deadline.

    Honours from ~/.ssh/config: HostName, Port, User, IdentityFile,
    UserKnownHostsFile, GlobalKnownHostsFile, HostKeyAlias, HashKnownHosts,
    ProxyCommand (run with /bin/sh) and ProxyJump (one SSH connection per hop,
    each checked and authenticated like the device, the next hop reached
    through a direct-tcpip channel).
    """

    def __init__(self, host_spec: str, options: SSHOptions = SSHOptions(), *,
                 _via: Optional["SSHTransport"] = None, _depth: int = 0) -> None:
        import paramiko  # imported here so `edgeq --help` stays fast

        quiet_paramiko_logs()
        self._paramiko = paramiko
        self.options = options
        self.max_output_bytes = options.max_output_bytes
        conf = read_host_config(host_spec, options, jump=_depth > 0)
        self._conf = conf
        self.hostname = conf.hostname
        self.port = conf.port
        self.user = conf.user
        self.identities = list(conf.identities)
        #: Where a newly accepted host key is recorded.
        self.known_hosts = conf.user_known_hosts[0] if conf.user_known_hosts else Path(kh.USER_FILES[0]).expanduser()
        self.host = f"{self.user}@{conf.alias}" + (f":{self.port}" if self.port != 22 else "")
        self._via = _via
        self._depth = _depth
        if _depth > _MAX_JUMPS:
            raise UsageError(f"more than {_MAX_JUMPS} ProxyJump hops to reach {self.host}",
                             "is there a loop of ProxyJump lines in ~/.ssh/config?")
        self._jumps: list[SSHTransport] = []
        self._proxy: Optional[ProxyCommand] = None
        self._known: kh.KnownHosts = kh.KnownHosts(())
        self._client = None
        #: How files travel on this connection (SFTP, or ``cat`` over the exec channel).
        self.uploads = Uploads(self)
        self._cancelled = False
        # Commands in flight (their pid markers), so cancel() can kill them on the device.
        self._running: set[PidMarker] = set()
        self._running_lock = threading.Lock()
        #: How many connection attempts the last connect() took (retries included).
        self.connect_attempts = 0

    @property
    def known_hosts_name(self) -> str:
        """The name this host's key is recorded under (HostKeyAlias, ``host`` or ``[host]:port``)."""
        return kh.host_name(self.hostname, self.port, self._conf.host_key_alias)

    @property  # type: ignore[override]
    def transfer(self) -> Optional[str]:
        """``"sftp"`` or ``"exec"`` once a file went (see ``Transport.transfer``)."""
        return self.uploads.transfer

    # -- connection

    def connect(self) -> "SSHTransport":
        """Open the connection: TCP (or ProxyCommand, or ProxyJump hops), banner, host key check,
        authentication; each under connect_timeout.

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
        raise ConnectError(f"cannot connect to {self.host}", host=self.host)  # pragma: no cover

    def _connect_once(self) -> "SSHTransport":
        paramiko = self._paramiko
        opts = self.options
        t = opts.connect_timeout
        if self._cancelled:
            raise ConnectError(f"the deploy to {self.host} was cancelled", host=self.host)
        try:
            self._known = kh.KnownHosts.load([*self._conf.user_known_hosts, *self._conf.global_known_hosts])
        except InputError as exc:
            raise HostKeyError(exc.message, hint=exc.hint, host=self.host) from None
        sock = self._open_socket(t)
        client = paramiko.SSHClient()
        # No keys are loaded into paramiko: _verify_host_key (called through the
        # policy for every connection) is the one place host keys are judged.
        client.set_missing_host_key_policy(host_key_policy(self._verify_host_key))
        try:
            client.connect(
                # With our own socket the host name only names the host key: give
                # paramiko exactly the name we look up (port 22 adds no brackets).
                self.known_hosts_name, port=22, username=self.user, sock=sock,
                key_filename=self.identities or None, look_for_keys=not self.identities,
                allow_agent=opts.allow_agent, timeout=t, banner_timeout=t, auth_timeout=t,
                channel_timeout=t, passphrase=opts.passphrase, transport_factory=self._new_paramiko_transport,
            )
        except Exception as exc:
            client.close()
            error = (self._proxy.error() if self._proxy is not None else None) or handshake_error(
                exc, host=self.host, hostname=self.hostname, port=self.port, t=t, has_identity=bool(self.identities))
            self._close_proxy()
            raise error from None
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(opts.keepalive_s)
        self._client = client
        return self

    def _new_paramiko_transport(self, sock: Any, **kwargs: Any) -> Any:
        t = self._paramiko.Transport(sock, **kwargs)
        prefer_key_types(t, self._known.key_types(self.known_hosts_name))
        return t

    def _open_socket(self, t: float) -> Any:
        if self._via is not None or self._conf.proxy_jump:
            return self._jump_channel(t)
        if self._conf.proxy_command:
            self._proxy = ProxyCommand(self._conf.proxy_command, self.host, t)
            return self._proxy.sock
        return open_tcp(self.hostname, self.port, t, self.host, self.options.keepalive_s,
                        self.options.link_timeout_s)

    def _jump_host(self) -> "SSHTransport":
        """The connected hop in front of this host (building the ProxyJump chain on first use)."""
        if self._via is not None:
            return self._via
        if self._jumps and self._jumps[-1].alive():
            return self._jumps[-1]
        self._close_jumps()
        prev: Optional[SSHTransport] = None
        for spec in self._conf.proxy_jump:
            hop = SSHTransport(spec, self.options, _via=prev, _depth=self._depth + 1)
            self._jumps.append(hop)
            try:
                hop.connect()
            except DeviceError as exc:
                raise type(exc)(f"cannot reach {self.host} through ProxyJump {hop.host}: {exc.message}",
                                hint=exc.hint, host=self.host) from None
            prev = hop
        if prev is None:  # pragma: no cover - _conf.proxy_jump is never empty here
            raise ConnectError(f"no ProxyJump host for {self.host}", host=self.host)
        return prev

    def _jump_channel(self, t: float) -> Any:
        paramiko = self._paramiko
        hop = self._jump_host()
        try:
            tr = hop.paramiko_transport()
            return tr.open_channel("direct-tcpip", (self.hostname, self.port), ("127.0.0.1", 0), timeout=t)
        except paramiko.ChannelException as exc:
            raise ConnectError(f"jump host {hop.host} could not connect to {self.hostname}:{self.port}: {exc.text}",
                               hint="check HostName and Port as the jump host sees them, and AllowTcpForwarding "
                                    "on the jump host", host=self.host) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"jump host {hop.host} did not open a connection to {self.hostname}:{self.port} "
                               f"within {t:g} s ({exc or type(exc).__name__})",
                               hint="check the jump host, or raise --connect-timeout", host=self.host) from None

    def _close_proxy(self) -> None:
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            proxy.close()

    def _verify_host_key(self, key: Any) -> None:
        kh.verify_host_key(self._known, self.known_hosts_name, key, host=self.host,
                           user_files=self._conf.user_known_hosts, record_in=self.known_hosts,
                           accept_new=self.options.accept_new_host_key, hash_names=self._conf.hash_known_hosts)

    # -- lifetime

    def __enter__(self) -> "SSHTransport":
        if self._client is None:
            self.connect()
        return self

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Abandon the device from another thread: kill the commands still running there (best effort,
        on a background thread, about 10 s at most), then close; never reconnect."""
        self._cancelled = True
        for hop in self._jumps:
            hop._cancelled = True
        with self._running_lock:
            pids = [m.pid for m in self._running if m.pid is not None]
        if not pids or not self.alive():
            self.close()
            return

        def kill_then_close() -> None:
            try:
                for pid in pids:
                    self._kill_remote(pid, after_cancel=True)
            finally:
                self.close()

        threading.Thread(target=kill_then_close, name=f"edgeq-cancel-{self.host}", daemon=True).start()

    def close(self) -> None:
        self.uploads.drop_sftp()
        client, self._client = self._client, None
        if client is not None:
            client.close()
        self._close_proxy()
        self._close_jumps()

    def _close_jumps(self) -> None:
        for hop in reversed(self._jumps):
            try:
                hop.close()
            except Exception:
                pass
        self._jumps = []

    def paramiko_transport(self, after_cancel: bool = False) -> Any:
        """The connected ``paramiko.Transport`` (connecting on first use); ``ConnectError`` when the link is
        lost or the deploy was cancelled."""
        if self._cancelled and not after_cancel:
            raise ConnectError(f"the deploy to {self.host} was cancelled (no answer within its deadline)",
                               host=self.host)
        if self._client is None:
            self.connect()
        client = self._client
        tr = client.get_transport() if client is not None else None  # type: ignore[union-attr]
        if tr is None or not tr.is_active():
            raise ConnectError(f"the SSH connection to {self.host} was lost", hint="retry the deploy", host=self.host)
        return tr

    def alive(self) -> bool:
        """Whether the SSH connection is up."""
        client = self._client
        tr = client.get_transport() if client else None
        return bool(tr and tr.is_active())

    # -- commands

    def run(self, argv: Sequence[str], timeout: float, stdin: Optional[Any] = None, check: bool = True,
            on_sent: Optional[Callable[[int], None]] = None) -> Result:
        """``Transport.run``; ``stdin`` may be anything ``memoryview`` takes (an mmap of a file to upload), and
        ``on_sent`` hears how many bytes of it went so far."""
        command = posix_command(argv)
        res = self._execute(command, timeout, stdin, kill_on_timeout=True, on_sent=on_sent)
        return self._check(res, check)

    def _execute(self, command: str, timeout: float, stdin: Optional[Any], kill_on_timeout: bool,
                 after_cancel: bool = False, on_sent: Optional[Callable[[int], None]] = None) -> Result:
        """Run the POSIX ``command`` on the device under ``timeout`` (every step included).

        ``stdin`` is anything ``memoryview`` takes (bytes, an mmap); ``on_sent`` hears how much of it went.
        """
        paramiko = self._paramiko
        check_command_length(command, self.host)
        nonce = secrets.token_hex(8)
        wire = wire_command(run_script(command, nonce))
        deadline = time.monotonic() + timeout
        step = self.options.connect_timeout

        def left(cap: float = float("inf")) -> float:
            return max(0.05, min(cap, deadline - time.monotonic()))

        out = BoundedBuffer(self.max_output_bytes, keep_tail=False)
        err = BoundedBuffer(self.max_output_bytes, keep_tail=True)
        marker = PidMarker(nonce, err)
        tr = self.paramiko_transport(after_cancel)
        wait = left(step)
        try:
            chan = tr.open_session(timeout=wait)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if not self.alive():
                raise ConnectError(f"the SSH connection to {self.host} was lost before: {short_command(command)}",
                                   hint="check the link to the device and retry", host=self.host) from None
            raise RemoteCommandError(
                f"{self.host} did not open a session within {wait:g} s ({exc or type(exc).__name__}) "
                f"for: {short_command(command)}", hint="the device's sshd is overloaded or hung; check it, or raise "
                "--connect-timeout", host=self.host, command=command) from None
        try:
            chan.settimeout(left())
            wait = left(step)
            with Watchdog(wait, chan.close) as dog:
                try:
                    chan.exec_command(wire)
                except (paramiko.SSHException, OSError, EOFError) as exc:
                    if not dog.fired:
                        raise ChannelFailed(exc) from None
            if dog.fired:
                raise RemoteCommandError(
                    f"{self.host} did not answer the command request within {wait:g} s: {short_command(command)}",
                    hint="the device's sshd is overloaded or hung; check it, or raise --connect-timeout",
                    host=self.host, command=command)
            with self._running_lock:
                self._running.add(marker)
            try:
                finished = pump(chan, stdin if stdin is not None else b"", deadline, out, marker, on_sent)
            finally:
                with self._running_lock:
                    self._running.discard(marker)
            marker.flush()
            if self._cancelled and not after_cancel:
                raise ConnectError(f"the deploy to {self.host} was cancelled (no answer within its deadline) "
                                   f"during: {short_command(command)}", host=self.host)
            if not finished:
                killed = self._kill_remote(marker.pid) if kill_on_timeout else "it was not killed"
                raise self._timed_out(command, timeout, err, killed)
            # paramiko reports a closed channel as "exit status ready" with status -1.
            status = chan.recv_exit_status() if chan.exit_status_ready() else -1
            if status == -1:
                # No exit status: a dead link, or a shell killed by a signal. Give
                # paramiko a moment to notice which.
                wait_until = time.monotonic() + 1.0
                while self.alive() and time.monotonic() < wait_until:
                    time.sleep(0.05)
                if not self.alive():
                    raise ConnectError(f"the SSH connection to {self.host} was lost during: {short_command(command)}",
                                       hint="check the link to the device and retry", host=self.host)
        except ChannelFailed as failed:
            exc = failed.cause
            if self.alive():
                # The server said no to this command, and the link is fine: not a lost link.
                raise RemoteCommandError(
                    f"{self.host} refused the command request ({exc or type(exc).__name__}): {short_command(command)}",
                    hint="check the device's SSH server log", host=self.host, command=command) from None
            raise ConnectError(f"the SSH connection to {self.host} failed during {short_command(command)}: "
                               f"{exc or type(exc).__name__}", hint="check the link to the device and retry",
                               host=self.host) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"the SSH connection to {self.host} failed during {short_command(command)}: "
                               f"{exc or type(exc).__name__}", hint="check the link to the device and retry",
                               host=self.host) from None
        finally:
            chan.close()
        sig = None
        if status == -1:
            sig = "an unknown signal"
        elif 128 < status <= 128 + 64:
            sig = signal_name(status - 128)
        return self._result(command, status, out, err, sig)

    def _kill_remote(self, pid: Optional[int], after_cancel: bool = False) -> str:
        """Kill the timed-out command and everything it started on the device, check they are gone, and say
        what happened (for the message): "killed" only when the device confirmed it."""
        if pid is None or pid <= 1:
            return "it had not reported its process id, so nothing was killed; it may still be running on the device"
        try:
            # The script itself waits up to about 3 s for the processes to go; a loaded device is slow to
            # open a session.
            res = self._execute(kill_script(pid), max(10.0, min(30.0, self.options.connect_timeout)), None,
                                kill_on_timeout=False, after_cancel=after_cancel)
        except DeviceError as exc:
            return f"it may still be running on the device (pid {pid}): it could not be killed ({exc.message})"
        said = re.search(r"EDGEQ-KILLED (\d+)", res.stdout)
        if res.ok and said:
            more = int(said.group(1)) - 1
            started = f" and {more} process{'es' if more != 1 else ''} it started" if more > 0 else ""
            return f"it was killed on the device (pid {pid}{started}; checked gone)"
        left = re.search(r"EDGEQ-ALIVE ([\d ]+)", res.stdout)
        why = f"still alive after SIGKILL: pid {left.group(1).strip()[:200]}" if left else \
            f"the kill command ended with exit status {res.exit_status}"
        return f"it may still be running on the device (pid {pid}; {why})"

    # -- files

    def put(self, local: Path, remote: str, timeout: float, progress: Optional[ProgressCallback] = None,
            label: str = "") -> int:
        """Upload over SFTP; where the server has no SFTP, over the exec channel (``transfer`` says which).

        The choice is made once per transport: a server that refused SFTP is not asked again.
        """
        meter = self._meter(local, Path(local).stat().st_size, progress, label)
        sent = self.uploads.put(Path(local), remote, timeout, meter)
        meter(sent)  # an empty file too: the upload is complete
        return sent

    def remove(self, remote: str) -> None:
        self.uploads.remove(remote)
