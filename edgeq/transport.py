"""How edgeq talks to a device: run a command, upload a file. SSH (paramiko) or the local machine.

Both transports run argument vectors, never shell strings built from user input.
``SSHTransport`` quotes every argument for a POSIX ``sh`` and hands the remote
login shell one command that means the same in sh, bash, zsh, fish and csh
(``exec sh -c '...'`` whose body is spelled with printf escapes), so a device
user whose shell is fish gets the same command as one whose shell is sh.
``LocalTransport`` runs the vector with no shell at all.

Every step has a deadline that fires, whatever the peer does: connecting,
opening a session, the answer to a command request, starting SFTP, every SFTP
request, the command itself. A command that outlives its timeout is killed on
the device (its process group and every descendant, found in /proc: Dropbear
does not make a session its own group and BusyBox has no pkill), and the
message says "killed" only when the device confirmed that all of it is gone.
Commands are at most ``MAX_COMMAND_BYTES`` on the wire (Dropbear drops longer
ones with the connection). Files go over SFTP, or, where the server has none
(Dropbear without sftp-server), on the stdin of ``cat`` over the exec channel.
Device output is untrusted: each stream keeps at most ``max_output_bytes``
(1 MiB; the rest is read and dropped so the device never blocks), and error
messages carry a tail of a few KB. Failures raise ``edgeq.errors`` classes that
name the host. Nothing secret (key material, passphrases) is ever put in a
message or in a child process's environment.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import mmap
import os
import re
import secrets
import select
import selectors
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from edgeq import known_hosts as kh
from edgeq.errors import (AuthError, CommandTooLong, ConnectError, DeviceError, EdgeqError, HostKeyError,
                          InputError, RemoteCommandError, UsageError)
from edgeq.escape import term
from edgeq.sandbox import BoundedBuffer, child_env

ByteProgress = Callable[[int, int], None]

_CHUNK = 64 * 1024
#: What ``run()`` keeps of each output stream by default; the rest is read and dropped.
DEFAULT_MAX_OUTPUT = 1024 * 1024
#: At most this much device output goes into an error message.
_TAIL_CHARS = 2000
# Host names, IPv4/IPv6 literals and ssh_config aliases; anything else cannot be a host.
_HOST_RE = re.compile(r"^[A-Za-z0-9_.:%-]+$")
_USER_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?$")
_MAX_JUMPS = 8
#: The longest command string edgeq sends to a device's SSH server (the wire string, after quoting and
#: octal escaping by ``wire_command``). Dropbear drops exec requests over 9,000 bytes (its MAX_CMD_LEN) and
#: the failure looks like a lost link; longer data travel on the command's stdin.
MAX_COMMAND_BYTES = 8000


@dataclass(frozen=True)
class Result:
    """The outcome of one command on the device.

    Device output is bounded: ``stdout`` keeps its first ``max_output_bytes``
    (where an answer starts), ``stderr`` its last (where the error is); the
    ``*_truncated`` flags say when more was produced and dropped.
    """

    command: str
    exit_status: int
    stdout: str
    stderr: str
    signal: Optional[str] = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def tail(self, lines: int = 8, max_chars: int = _TAIL_CHARS) -> str:
        """The last lines of stderr (or stdout when stderr is empty), at most ``max_chars``, control
        characters escaped: for error messages."""
        text = self.stderr.strip() or self.stdout.strip()
        cut = len(text) > max_chars
        picked = "\n".join(text[-max_chars:].splitlines()[-lines:])
        if len(picked) > max_chars:
            picked, cut = picked[-max_chars:], True
        return term(("…" if cut else "") + picked)

    def truncation_note(self) -> str:
        """`` (stdout was cut ...)`` when device output was dropped, else ``""``."""
        parts = [text for flag, text in ((self.stdout_truncated, "stdout was cut to its beginning"),
                                         (self.stderr_truncated, "stderr was cut to its end")) if flag]
        return f" ({'; '.join(parts)}: the device printed more than edgeq keeps)" if parts else ""


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
    #: What ``run()`` keeps of each of stdout and stderr.
    max_output_bytes: int = DEFAULT_MAX_OUTPUT
    #: How ``put()`` sends files on this connection: ``"sftp"``, ``"exec"`` (the bytes on the stdin of a
    #: ``cat`` on the device, when the server has no SFTP), ``"local"``; None before the first ``put()``.
    transfer: Optional[str] = None

    @abstractmethod
    def run(self, argv: Sequence[str], timeout: float, stdin: Optional[bytes] = None,
            check: bool = True) -> Result:
        """Run ``argv`` on the device; raise ``RemoteCommandError`` on timeout (after killing the command),
        or on failure if ``check``."""

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

    def _result(self, command: str, status: int, out: BoundedBuffer, err: BoundedBuffer, sig: Optional[str]) -> Result:
        return Result(command, status, _decode(out.data()), _decode(err.data()), sig, out.truncated, err.truncated)

    def _check(self, res: Result, check: bool) -> Result:
        if check and not res.ok:
            what = f"killed by {res.signal}" if res.signal else f"exit status {res.exit_status}"
            tail = res.tail(3)
            raise RemoteCommandError(
                f"command failed on {self.host} ({what}): {_short(res.command)}" + (f": {tail}" if tail else "")
                + res.truncation_note(),
                host=self.host, command=res.command, exit_status=res.exit_status, output_tail=res.tail(),
            )
        return res

    def _timed_out(self, command: str, timeout: float, err: BoundedBuffer, killed: str) -> RemoteCommandError:
        tail = Result(command, -1, "", _decode(err.data())).tail()
        return RemoteCommandError(
            f"command timed out after {timeout:g} s on {self.host}: {_short(command)}; {killed}",
            hint="raise the timeout or check the device (load, a hung runtime)", host=self.host,
            command=command, exit_status=None, output_tail=tail)


def _short(command: str, limit: int = 300) -> str:
    """A command for a message: long argument lists are cut (the full one is on the error object)."""
    return command if len(command) <= limit else command[: limit - 1] + "…"


def check_command_length(command: str, host: str) -> str:
    """The wire string for the POSIX ``command``; ``CommandTooLong`` if it exceeds ``MAX_COMMAND_BYTES``."""
    wire = wire_command(_run_script(command, "0" * 16))
    if len(wire) > MAX_COMMAND_BYTES:
        raise CommandTooLong(
            f"the command for {host} is {len(wire)} bytes once quoted for the SSH server, over edgeq's limit of "
            f"{MAX_COMMAND_BYTES} (Dropbear drops exec requests over 9,000 bytes); not sent: {_short(command, 120)}",
            hint="pass fewer or shorter arguments; long data must travel on the command's stdin", host=host)
    return wire


def _write_error(host: str, remote: str, exc: BaseException) -> DeviceError:
    code = getattr(exc, "errno", None)
    text = str(exc) or type(exc).__name__
    if code in (errno.ENOSPC, errno.EDQUOT) or "space" in text.lower() or text.strip() == "Failure":
        return DeviceError(f"cannot write {remote} on {host}: {text} (is the device's disk full?)",
                           hint="free space on the device or choose another --remote-dir", host=host)
    return DeviceError(f"cannot write {remote} on {host}: {text}",
                       hint="check that --remote-dir is writable on the device", host=host)


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "replace")


# --------------------------------------------------------------------- local


class LocalTransport(Transport):
    """The local machine is the device: commands run as child processes, files are copied.

    Each command leads its own process group, which is killed on a timeout (or
    an interrupt), so nothing it started outlives it; its environment has no
    edgeq secrets (``edgeq.sandbox.child_env``).
    """

    def __init__(self, max_output_bytes: int = DEFAULT_MAX_OUTPUT) -> None:
        self.host = "local"
        self.max_output_bytes = max_output_bytes

    def run(self, argv: Sequence[str], timeout: float, stdin: Optional[bytes] = None,
            check: bool = True) -> Result:
        if not argv:
            raise UsageError("empty command")
        check_command_length(posix_command(argv), self.host)  # the same limit as over SSH
        argv = [os.path.expanduser(argv[0]), *argv[1:]]
        command = shlex.join(argv)
        out = BoundedBuffer(self.max_output_bytes, keep_tail=False)
        err = BoundedBuffer(self.max_output_bytes, keep_tail=True)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=child_env(), start_new_session=True)
        except FileNotFoundError:
            err.add(f"{argv[0]}: not found".encode())
            return self._check(self._result(command, 127, out, err, None), check)
        except PermissionError:
            err.add(f"{argv[0]}: permission denied".encode())
            return self._check(self._result(command, 126, out, err, None), check)
        deadline = time.monotonic() + timeout
        try:
            finished = _pump_local(proc, stdin or b"", deadline, out, err)
            if finished:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    finished = False
        except BaseException:
            _kill_group(proc)
            raise
        if not finished:
            _kill_group(proc)
            left = _group_members(proc.pid)
            raise self._timed_out(command, timeout, err, f"its process group {proc.pid} was killed (checked gone)"
                                  if not left else f"it may still be running (pids {' '.join(map(str, left[:10]))} "
                                  f"of its process group {proc.pid} outlived SIGKILL)")
        sig = signal_name(-proc.returncode) if proc.returncode < 0 else None
        return self._check(self._result(command, proc.returncode, out, err, sig), check)

    def put(self, local: Path, remote: str, timeout: float, progress: Optional[ByteProgress] = None) -> int:
        total = Path(local).stat().st_size
        sent = 0
        deadline = time.monotonic() + timeout
        self.transfer = "local"
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


def _pump_local(proc: subprocess.Popen, stdin: bytes, deadline: float, out: BoundedBuffer, err: BoundedBuffer) -> bool:
    """Feed stdin and drain stdout/stderr until both close; False when the deadline passed first."""
    sel = selectors.DefaultSelector()
    streams = {proc.stdout: out, proc.stderr: err}
    for f in streams:
        sel.register(f, selectors.EVENT_READ)
    view = memoryview(stdin)
    pos = 0
    if proc.stdin is not None:
        if view:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
    exited_at: Optional[float] = None
    try:
        while any(key.fileobj in streams for key in sel.get_map().values()):
            now = time.monotonic()
            if now > deadline:
                return False
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now > exited_at + 0.5:
                break  # a background child holds the pipes open: the command itself has ended
            for key, _ in sel.select(min(0.1, max(0.0, deadline - now))):
                f = key.fileobj
                if f is proc.stdin:
                    try:
                        pos += os.write(f.fileno(), view[pos:pos + _CHUNK])  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    except OSError:
                        pos = len(view)  # the command ended without reading all its input
                    if pos >= len(view):
                        sel.unregister(f)
                        f.close()  # type: ignore[union-attr]
                    continue
                data = os.read(f.fileno(), _CHUNK)  # type: ignore[union-attr]
                if data:
                    streams[f].add(data)
                else:
                    sel.unregister(f)
        return True
    finally:
        sel.close()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


def _group_members(pgid: int, wait_s: float = 3.0) -> list[int]:
    """Processes of group ``pgid`` still alive (zombies count as gone) after up to ``wait_s``; [] without /proc."""
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        try:
            names = [n for n in os.listdir("/proc") if n.isdigit()]
        except OSError:
            return []
        for name in names:
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] not in (b"Z", b"X"):
                left.append(int(name))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _kill_group(proc: subprocess.Popen) -> None:
    # The command leads its own session, so this reaches only what it started.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


# ----------------------------------------------------------------------- SSH


@dataclass(frozen=True)
class SSHOptions:
    """How to reach a device over SSH (all timeouts in seconds)."""

    identity: Optional[str] = None
    # Where new host keys are recorded and known ones read (default: ssh_config's
    # UserKnownHostsFile, else ~/.ssh/known_hosts and ~/.ssh/known_hosts2).
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
    # System-wide known_hosts files read besides the user's (default: ssh_config's
    # GlobalKnownHostsFile, else /etc/ssh/ssh_known_hosts and ssh_known_hosts2).
    global_known_hosts: Optional[tuple[str, ...]] = None
    #: What run() keeps of each of stdout and stderr; the rest is read and dropped.
    max_output_bytes: int = DEFAULT_MAX_OUTPUT


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
    """OpenSSH-style ``SHA256:...`` fingerprint of a paramiko public key (or of a key blob)."""
    blob = key if isinstance(key, bytes) else key.asbytes()  # type: ignore[attr-defined]
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# -- the command on the wire

# Characters that mean themselves, unquoted, in sh, bash, zsh, fish, csh and tcsh.
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _./,:=+@-")


def _quote_program(program: str) -> str:
    # `~/venv/bin/python` is common on a Pi; quoting would stop the shell
    # expanding `~`, so spell it as "$HOME"/<quoted rest>.
    if program.startswith("~/"):
        return '"$HOME"/' + shlex.quote(program[2:])
    return shlex.quote(program)


def posix_command(argv: Sequence[str]) -> str:
    """``argv`` as one POSIX sh command, every argument quoted (``~/`` in the program kept expandable)."""
    if not argv:
        raise UsageError("empty command")
    for arg in argv:
        if "\0" in arg:
            raise UsageError(f"a command argument contains a NUL byte: {arg[:40]!r}")
    return " ".join([_quote_program(argv[0]), *(shlex.quote(a) for a in argv[1:])])


def wire_command(script: str) -> str:
    """The command string sent to the device's login shell to run the POSIX sh ``script``.

    sshd runs it as ``$SHELL -c <string>``, and login shells disagree on
    quoting (fish treats ``\\`` inside single quotes, csh newlines, ``$?`` means
    something else to both). So the string uses one construct they all read
    alike, ``exec sh -c '...'``, and inside the single quotes only characters
    that are literal everywhere: the script is spelled as a printf format with
    every other character as an octal escape, decoded and run by ``sh`` itself.
    """
    spelled = "".join(c if c in _SAFE else "".join(f"\\{b:03o}" for b in c.encode("utf-8")) for c in script)
    return "exec sh -c 'eval \"$(printf \"" + spelled + "\")\"'"


def _run_script(command: str, nonce: str) -> str:
    # $$ is this sh: sshd made it a session and process-group leader (setsid), and
    # `exec sh` kept that pid, so the host can kill the group -$$ on a timeout.
    # The command is not exec'd: its death by signal then shows as status 128+N
    # (paramiko ignores the SSH exit-signal message).
    return f"printf 'EDGEQ-PID:%s:{nonce}\\n' \"$$\" >&2\n{command}\nexit $?"


def _kill_script(pid: int) -> str:
    # Kill everything the command started, then check it is gone. The tree is
    # found in /proc (every descendant of the session shell, plus its process
    # group where the shell leads one, as under OpenSSH): Dropbear does not make
    # the session shell a group leader and BusyBox has no pkill. Each round stops
    # (SIGSTOP) what it found, so nothing forks while the tree is walked again;
    # then all of it is killed. Exit 0 when every process is gone (a zombie
    # counts as gone); otherwise exit 3 with "EDGEQ-ALIVE <pids>" on stdout.
    if pid <= 1:  # the walk below would take in every process on the device
        raise ValueError(f"refusing to kill the process tree of pid {pid}")
    return f"""root={pid}
all=" $root "
alive() {{
  if [ -r /proc/$1/stat ]; then
    {{ read -r line < /proc/$1/stat; }} 2>/dev/null || return 1
    set -- ${{line##*") "}}
    [ "$1" != Z ] && [ "$1" != X ]
  else
    [ -d /proc/self ] && return 1
    kill -0 "$1" 2>/dev/null
  fi
}}
i=0
while [ $i -lt 50 ]; do
  new=""
  for f in /proc/[0-9]*/stat; do
    p=${{f#/proc/}}; p=${{p%/stat}}
    case "$all" in *" $p "*) continue;; esac
    {{ read -r line < "$f"; }} 2>/dev/null || continue
    set -- ${{line##*") "}}
    case "$all" in *" $2 "*) new="$new $p "; continue;; esac
    [ "$3" = "$root" ] && new="$new $p "
  done
  kill -s STOP $all 2>/dev/null || kill -STOP $all 2>/dev/null
  [ -z "$new" ] && break
  all="$all$new"
  i=$((i + 1))
done
kill -s KILL -- -$root 2>/dev/null || kill -KILL -$root 2>/dev/null
kill -s KILL $all 2>/dev/null || kill -KILL $all 2>/dev/null
kill -s CONT $all 2>/dev/null || kill -CONT $all 2>/dev/null
n=0
while :; do
  left=""
  for p in $all; do alive "$p" && left="$left $p"; done
  if [ -z "$left" ]; then set -- $all; echo "EDGEQ-KILLED $#"; exit 0; fi
  n=$((n + 1))
  [ $n -gt 30 ] && break
  sleep 0.1 2>/dev/null || sleep 1
done
echo "EDGEQ-ALIVE$left"
exit 3"""


class _PidMarker:
    """Finds (and removes) the ``EDGEQ-PID:<pid>:<nonce>`` line the wire script prints first on stderr."""

    _LIMIT = 64 * 1024  # login-shell noise before the marker; more than this and we stop looking

    def __init__(self, nonce: str, err: BoundedBuffer) -> None:
        self.pattern = re.compile(rb"EDGEQ-PID:(\d+):" + nonce.encode() + rb"\n")
        self.err = err
        self.pid: Optional[int] = None
        self._pending = bytearray()
        self._done = False

    def add(self, data: bytes) -> None:
        if self._done:
            self.err.add(data)
            return
        self._pending += data
        m = self.pattern.search(self._pending)
        if m:
            self.pid = int(m.group(1))
            rest = bytes(self._pending[: m.start()] + self._pending[m.end():])
            self._pending.clear()
            self._done = True
            if rest:
                self.err.add(rest)
        elif len(self._pending) > self._LIMIT:
            self.flush()

    def flush(self) -> None:
        if not self._done:
            self._done = True
            if self._pending:
                self.err.add(bytes(self._pending))
            self._pending.clear()


class _Watchdog:
    """Calls ``on_fire`` (closing a channel, which wakes paramiko's waiters) if the block outlives ``seconds``."""

    def __init__(self, seconds: float, on_fire: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._finished = False
        self.fired = False
        self._on_fire = on_fire
        self._timer = threading.Timer(max(0.0, seconds), self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.fired = True
        try:
            self._on_fire()
        except Exception:
            pass

    def __enter__(self) -> "_Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._finished = True
        self._timer.cancel()


# -- ssh_config


@dataclass(frozen=True)
class _HostConfig:
    """What ~/.ssh/config (and the host spec) say about one host."""

    alias: str
    hostname: str
    port: int
    user: str
    identities: tuple[str, ...]
    user_known_hosts: tuple[Path, ...]
    global_known_hosts: tuple[Path, ...]
    host_key_alias: Optional[str]
    hash_known_hosts: bool
    proxy_command: Optional[str]
    proxy_jump: tuple[str, ...]


def _read_host_config(host_spec: str, options: SSHOptions, jump: bool) -> _HostConfig:
    user, alias, port = parse_host(host_spec)
    cfg_path = Path(options.ssh_config or "~/.ssh/config").expanduser()
    cfg: Any = {}
    if cfg_path.is_file():
        try:
            cfg = _raw_proxy_config_class().from_path(str(cfg_path)).lookup(alias)
        except Exception as exc:  # a broken ssh_config must not hide as a connect error
            raise UsageError(f"cannot read SSH config {cfg_path}: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                             "fix the line, or point --ssh-config elsewhere") from None
    where = f"for {alias} in {cfg_path}"
    hostname = str(cfg.get("hostname", alias))
    if not _HOST_RE.match(hostname) or hostname.startswith("-"):
        raise UsageError(f"invalid HostName {hostname!r} {where}")
    if port is None:
        text = str(cfg.get("port", "22")).strip()
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise UsageError(f"invalid Port {text!r} {where}", "use a number from 1 to 65535")
        port = int(text)
    user = user or cfg.get("user") or _local_user()
    configured = [str(Path(p).expanduser()) for p in cfg.get("identityfile", [])]
    if options.identity and not jump:
        identities = [options.identity]
    else:  # a jump host uses its own IdentityFile, else the device's --identity
        identities = configured or ([options.identity] if options.identity else [])
    found = tuple(str(Path(p).expanduser()) for p in identities if Path(p).expanduser().is_file())
    if options.identity and not jump and not found:
        raise UsageError(f"identity file {options.identity} does not exist")

    def paths(key: str, default: Sequence[str]) -> tuple[Path, ...]:
        value = cfg.get(key)
        try:
            words = shlex.split(value) if value else list(default)
        except ValueError:
            raise UsageError(f"invalid {key} {value!r} {where}") from None
        return tuple(kh.files([_expand_tokens(w, hostname, port, user) for w in words]))

    user_files = (Path(options.known_hosts).expanduser(),) if options.known_hosts else \
        paths("userknownhostsfile", kh.USER_FILES)
    global_files = tuple(Path(p) for p in options.global_known_hosts) if options.global_known_hosts is not None \
        else paths("globalknownhostsfile", kh.GLOBAL_FILES)
    alias_name = cfg.get("hostkeyalias")
    if alias_name is not None and (not _HOST_RE.match(alias_name) and not alias_name.startswith("[")):
        raise UsageError(f"invalid HostKeyAlias {alias_name!r} {where}")
    command = cfg.get("proxycommand")
    if command is not None and command.strip().lower() == "none":
        command = None
    if command:
        # Expanded here, not by paramiko: %p and %r are the port and user this connection uses
        # (--host user@host:PORT wins over the config), as OpenSSH does.
        if "%r" in command and not _USER_RE.match(user):
            raise UsageError(f"invalid User {user!r} {where} (ProxyCommand uses %r)")
        command = _expand_proxy_tokens(command, alias, hostname, port, user)
    jumps_text = cfg.get("proxyjump")
    jumps: tuple[str, ...] = ()
    if jumps_text is not None and jumps_text.strip().lower() != "none":
        parsed = []
        for hop in jumps_text.split(","):
            hop = hop.strip()
            if hop.startswith("ssh://"):
                hop = hop[len("ssh://"):]
            try:
                parse_host(hop)
            except UsageError:
                raise UsageError(f"invalid ProxyJump {jumps_text!r} {where}",
                                 "use [USER@]HOST[:PORT], comma-separated") from None
            parsed.append(hop)
        jumps = tuple(parsed)
    if command and jumps:
        raise UsageError(f"both ProxyCommand and ProxyJump apply {where}", "keep one of them for this host")
    return _HostConfig(alias, hostname, port, user, found, user_files, global_files, alias_name,
                       str(cfg.get("hashknownhosts", "no")).lower() == "yes", command, jumps)


def _expand_proxy_tokens(command: str, alias: str, hostname: str, port: int, user: str) -> str:
    """The ssh_config tokens OpenSSH allows in ProxyCommand: %% %h %n %p %r (the values already validated)."""
    values = {"h": hostname, "n": alias, "p": str(port), "r": user, "%": "%"}
    return re.sub(r"%(.)", lambda m: values.get(m.group(1), m.group(0)), command)


_RAW_PROXY_CONFIG: Optional[type] = None


def _raw_proxy_config_class() -> type:
    """paramiko's SSHConfig, except that ProxyCommand comes back unexpanded: paramiko would put the
    config's Port and User in it, not the ones given with --host (edgeq expands it itself)."""
    global _RAW_PROXY_CONFIG
    if _RAW_PROXY_CONFIG is None:
        import paramiko

        tokens = dict(paramiko.SSHConfig.TOKENS_BY_CONFIG_KEY)
        tokens["proxycommand"] = []
        _RAW_PROXY_CONFIG = type("RawProxySSHConfig", (paramiko.SSHConfig,), {"TOKENS_BY_CONFIG_KEY": tokens})
    return _RAW_PROXY_CONFIG


def _expand_tokens(path: str, hostname: str, port: int, user: str) -> str:
    """The ssh_config tokens allowed in known-hosts paths: %d %u %h %p %r %%, and ~."""
    values = {"d": str(Path.home()), "u": _local_user(), "h": hostname, "p": str(port), "r": user, "%": "%"}
    return re.sub(r"%(.)", lambda m: values.get(m.group(1), m.group(0)), path)


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

        _quiet_paramiko_logs()
        self._paramiko = paramiko
        self.options = options
        self.max_output_bytes = options.max_output_bytes
        conf = _read_host_config(host_spec, options, jump=_depth > 0)
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
        self._proxy: Optional[tuple[subprocess.Popen, Any]] = None
        self._known: kh.KnownHosts = kh.KnownHosts(())
        self._client = None
        self._sftp_client = None
        self._cancelled = False
        # Commands in flight (their pid markers), so cancel() can kill them on the device.
        self._running: set[_PidMarker] = set()
        self._running_lock = threading.Lock()
        #: How many connection attempts the last connect() took (retries included).
        self.connect_attempts = 0

    @property
    def known_hosts_name(self) -> str:
        """The name this host's key is recorded under (HostKeyAlias, ``host`` or ``[host]:port``)."""
        return kh.host_name(self.hostname, self.port, self._conf.host_key_alias)

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
        client.set_missing_host_key_policy(_host_key_policy_class()(self))
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
            error = self._proxy_error() or self._handshake_error(exc, t)
            self._close_proxy()
            raise error from None
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(opts.keepalive_s)
        self._client = client
        return self

    def _new_paramiko_transport(self, sock: Any, **kwargs: Any) -> Any:
        # Ask for the host key types known_hosts records for this host first (as
        # ssh does), so a device with several keys shows the one we can check.
        t = self._paramiko.Transport(sock, **kwargs)
        known = self._known.key_types(self.known_hosts_name)
        if known:
            sec = t.get_security_options()
            offered = list(sec.key_types)
            wanted: list[str] = []
            for kind in known:
                names = ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if kind == "ssh-rsa" else [kind]
                wanted += [n for n in names if n in offered and n not in wanted]
            if wanted:
                sec.key_types = wanted + [n for n in offered if n not in wanted]
        return t

    def _open_socket(self, t: float) -> Any:
        if self._via is not None or self._conf.proxy_jump:
            return self._jump_channel(t)
        if self._conf.proxy_command:
            return self._proxy_socket(t)
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
        _tune_socket(sock, self.options.keepalive_s, self.options.link_timeout_s)
        return sock

    def _jump_host(self) -> "SSHTransport":
        """The connected hop in front of this host (building the ProxyJump chain on first use)."""
        if self._via is not None:
            return self._via
        if self._jumps and self._jumps[-1]._alive():
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
            tr = hop._transport()
            return tr.open_channel("direct-tcpip", (self.hostname, self.port), ("127.0.0.1", 0), timeout=t)
        except paramiko.ChannelException as exc:
            raise ConnectError(f"jump host {hop.host} could not connect to {self.hostname}:{self.port}: {exc.text}",
                               hint="check HostName and Port as the jump host sees them, and AllowTcpForwarding "
                                    "on the jump host", host=self.host) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"jump host {hop.host} did not open a connection to {self.hostname}:{self.port} "
                               f"within {t:g} s ({exc or type(exc).__name__})",
                               hint="check the jump host, or raise --connect-timeout", host=self.host) from None

    def _proxy_socket(self, t: float) -> socket.socket:
        command = self._conf.proxy_command or ""
        ours, theirs = socket.socketpair()
        errors = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=theirs, stdout=theirs, stderr=errors,
                                    env=child_env(), start_new_session=True)
        except OSError as exc:
            ours.close()
            errors.close()
            raise ConnectError(f"cannot start the ProxyCommand for {self.host}: {exc.strerror or exc}",
                               hint="check ProxyCommand in ~/.ssh/config", host=self.host) from None
        finally:
            theirs.close()
        self._proxy = (proc, errors)
        ours.settimeout(t)
        return ours

    def _proxy_error(self) -> Optional[ConnectError]:
        """When the ProxyCommand died, a ConnectError saying so with its stderr (else None)."""
        if self._proxy is None:
            return None
        proc, errors = self._proxy
        try:
            proc.wait(0.5)
        except subprocess.TimeoutExpired:
            return None
        try:
            errors.seek(0, os.SEEK_END)
            errors.seek(max(0, errors.tell() - 500))
            said = term(_decode(errors.read()).strip())
        except OSError:
            said = ""
        return ConnectError(f"the ProxyCommand for {self.host} exited with status {proc.returncode}"
                            + (f": {said}" if said else ""),
                            hint="run the ProxyCommand from ~/.ssh/config by hand to see why", host=self.host)

    def _close_proxy(self) -> None:
        if self._proxy is None:
            return
        proc, errors = self._proxy
        self._proxy = None
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(2)
            except (ProcessLookupError, PermissionError):
                pass
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait(2)
        errors.close()

    def _handshake_error(self, exc: BaseException, t: float) -> EdgeqError:
        """The edgeq error for a failed ``SSHClient.connect`` (host key, auth, timeout, reset...)."""
        paramiko = self._paramiko
        if isinstance(exc, EdgeqError):
            return exc
        if isinstance(exc, paramiko.PasswordRequiredException):
            return AuthError(f"authentication to {self.host} failed: the private key is encrypted",
                             hint="add it to ssh-agent (ssh-add KEY), or give its passphrase in the "
                                  "EDGEQ_SSH_PASSPHRASE environment variable", host=self.host)
        if isinstance(exc, paramiko.AuthenticationException):
            return AuthError(f"authentication to {self.host} failed (no accepted key)",
                             hint="pass the right key with --identity, load it into ssh-agent, or add your public "
                                  "key to ~/.ssh/authorized_keys on the device", host=self.host)
        if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, EOFError)):
            return _transient(ConnectError(
                f"{self.hostname}:{self.port} closed the connection during the SSH handshake "
                f"({type(exc).__name__})", hint="check the network path and sshd on the device", host=self.host))
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return ConnectError(f"timed out after {t:g} s waiting for SSH on {self.hostname}:{self.port} "
                                f"({exc or 'no answer'})",
                                hint="is this an SSH server? raise --connect-timeout for slow links", host=self.host)
        if isinstance(exc, paramiko.SSHException):
            text = str(exc)
            low = text.lower()
            if self.identities and any(m in low for m in ("passphrase", "decrypt", "encrypted", "private key",
                                                           "invalid key")):
                return AuthError(f"cannot use the private key for {self.host}: wrong passphrase or unreadable key",
                                 hint="check the passphrase in EDGEQ_SSH_PASSPHRASE, or load the key into ssh-agent",
                                 host=self.host)
            if "reset" in low or "eof" in low:
                return _transient(ConnectError(
                    f"{self.hostname}:{self.port} reset the connection during the SSH handshake",
                    hint="check the network path and sshd on the device", host=self.host))
            if any(m in low for m in ("banner", "no existing session", "timed out", "negotiation")):
                return ConnectError(f"no SSH answer (banner, key exchange) from {self.hostname}:{self.port} "
                                    f"within {t:g} s", hint="is sshd (not another service) listening on that port?",
                                    host=self.host)
            return ConnectError(f"SSH negotiation with {self.hostname}:{self.port} failed: {term(text)}",
                                host=self.host)
        if isinstance(exc, (ValueError, TypeError)):
            # cryptography raises these for a wrong passphrase; its text is not shown on purpose.
            return AuthError(f"cannot use the private key for {self.host}: wrong passphrase or unreadable key",
                             hint="check the passphrase in EDGEQ_SSH_PASSPHRASE, or load the key into ssh-agent",
                             host=self.host)
        if isinstance(exc, OSError):
            return ConnectError(f"connection to {self.hostname}:{self.port} lost: {exc.strerror or exc}",
                                host=self.host)
        return ConnectError(f"SSH connection to {self.hostname}:{self.port} failed: {type(exc).__name__}: "
                            f"{term(str(exc))}", host=self.host)

    # -- host keys

    def _verify_host_key(self, key: Any) -> None:
        """Accept ``key`` if known_hosts lists it for this host, record it under accept-new, else raise."""
        name = self.known_hosts_name
        kind = key.get_name()
        fp = fingerprint(key)
        check = self._known.check(name, kind, key.asbytes())
        files = ", ".join(str(p) for p in self._conf.user_known_hosts) or str(self.known_hosts)
        remove_hint = (f"ssh-keygen -f {shlex.quote(str(check.entry.path))} -R {shlex.quote(name)}"
                       if check.entry is not None else "")
        entry = check.entry
        where = entry.where if entry is not None else files
        if check.verdict is kh.Verdict.KNOWN:
            return
        if check.verdict is kh.Verdict.REVOKED:
            raise HostKeyError(
                f"{self.host} offered a REVOKED host key {kind} {fp} (marked @revoked at {where}); "
                "refusing to connect", hint="the device's host key must be replaced; ask whoever runs it",
                host=self.host)
        if check.verdict is kh.Verdict.CHANGED:
            recorded = fingerprint(entry.blob) if entry is not None else "another key"
            raise HostKeyError(
                f"host key for {self.host} has CHANGED: {where} has {recorded}, "
                f"the device offered {kind} {fp}; refusing to connect",
                hint=f"if the device was reinstalled, check the new fingerprint on it and remove the old key with "
                     f"{remove_hint}", host=self.host)
        if check.verdict is kh.Verdict.OTHER_TYPE:
            raise HostKeyError(
                f"{self.host} offered a {kind} host key {fp}, but known_hosts records only "
                f"{', '.join(check.known_types)} for {name} ({where}); refusing to connect",
                hint=f"check the device, then remove the old entry with {remove_hint}", host=self.host)
        if not self.options.accept_new_host_key:
            ca = (" (a @cert-authority line covers this host, but edgeq does not check host certificates: "
                  "record the host key itself)") if check.cert_authority else ""
            raise HostKeyError(
                f"unknown host key for {self.host}: {kind} {fp} is not in {files} under {name}{ca}",
                hint=("compare it with `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` on the device, then re-run "
                      "with --accept-new-host-key to record it"), host=self.host)
        try:
            kh.record(self.known_hosts, name, kind, key.get_base64(), hash_names=self._conf.hash_known_hosts)
        except InputError as exc:
            raise HostKeyError(f"cannot record the host key of {self.host}: {exc.message}", host=self.host) from None

    # -- lifetime

    def __enter__(self) -> "SSHTransport":
        if self._client is None:
            self.connect()
        return self

    def cancel(self) -> None:
        """Abandon the device from another thread: kill the commands still running there (best effort,
        on a background thread, about 10 s at most), then close; never reconnect."""
        self._cancelled = True
        for hop in self._jumps:
            hop._cancelled = True
        with self._running_lock:
            pids = [m.pid for m in self._running if m.pid is not None]
        if not pids or not self._alive():
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
        self._drop_sftp()
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

    def _transport(self, after_cancel: bool = False) -> Any:
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

    def _alive(self) -> bool:
        client = self._client
        tr = client.get_transport() if client else None
        return bool(tr and tr.is_active())

    # -- commands

    def run(self, argv: Sequence[str], timeout: float, stdin: Optional[bytes] = None,
            check: bool = True) -> Result:
        command = posix_command(argv)
        res = self._execute(command, timeout, stdin, kill_on_timeout=True)
        return self._check(res, check)

    def _execute(self, command: str, timeout: float, stdin: Optional[Any], kill_on_timeout: bool,
                 after_cancel: bool = False, on_sent: Optional[Callable[[int], None]] = None) -> Result:
        """Run the POSIX ``command`` on the device under ``timeout`` (every step included).

        ``stdin`` is anything ``memoryview`` takes (bytes, an mmap); ``on_sent`` hears how much of it went.
        """
        paramiko = self._paramiko
        check_command_length(command, self.host)
        nonce = secrets.token_hex(8)
        wire = wire_command(_run_script(command, nonce))
        deadline = time.monotonic() + timeout
        step = self.options.connect_timeout

        def left(cap: float = float("inf")) -> float:
            return max(0.05, min(cap, deadline - time.monotonic()))

        out = BoundedBuffer(self.max_output_bytes, keep_tail=False)
        err = BoundedBuffer(self.max_output_bytes, keep_tail=True)
        marker = _PidMarker(nonce, err)
        tr = self._transport(after_cancel)
        wait = left(step)
        try:
            chan = tr.open_session(timeout=wait)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if not self._alive():
                raise ConnectError(f"the SSH connection to {self.host} was lost before: {_short(command)}",
                                   hint="check the link to the device and retry", host=self.host) from None
            raise RemoteCommandError(
                f"{self.host} did not open a session within {wait:g} s ({exc or type(exc).__name__}) "
                f"for: {_short(command)}", hint="the device's sshd is overloaded or hung; check it, or raise "
                "--connect-timeout", host=self.host, command=command) from None
        try:
            chan.settimeout(left())
            wait = left(step)
            with _Watchdog(wait, chan.close) as dog:
                try:
                    chan.exec_command(wire)
                except (paramiko.SSHException, OSError, EOFError) as exc:
                    if not dog.fired:
                        raise _ChannelFailed(exc) from None
            if dog.fired:
                raise RemoteCommandError(
                    f"{self.host} did not answer the command request within {wait:g} s: {_short(command)}",
                    hint="the device's sshd is overloaded or hung; check it, or raise --connect-timeout",
                    host=self.host, command=command)
            with self._running_lock:
                self._running.add(marker)
            try:
                finished = self._pump(chan, stdin if stdin is not None else b"", deadline, out, marker, on_sent)
            finally:
                with self._running_lock:
                    self._running.discard(marker)
            marker.flush()
            if self._cancelled and not after_cancel:
                raise ConnectError(f"the deploy to {self.host} was cancelled (no answer within its deadline) "
                                   f"during: {_short(command)}", host=self.host)
            if not finished:
                killed = self._kill_remote(marker.pid) if kill_on_timeout else "it was not killed"
                raise self._timed_out(command, timeout, err, killed)
            # paramiko reports a closed channel as "exit status ready" with status -1.
            status = chan.recv_exit_status() if chan.exit_status_ready() else -1
            if status == -1:
                # No exit status: a dead link, or a shell killed by a signal. Give
                # paramiko a moment to notice which.
                wait_until = time.monotonic() + 1.0
                while self._alive() and time.monotonic() < wait_until:
                    time.sleep(0.05)
                if not self._alive():
                    raise ConnectError(f"the SSH connection to {self.host} was lost during: {_short(command)}",
                                       hint="check the link to the device and retry", host=self.host)
        except _ChannelFailed as failed:
            exc = failed.cause
            if self._alive():
                # The server said no to this command, and the link is fine: not a lost link.
                raise RemoteCommandError(
                    f"{self.host} refused the command request ({exc or type(exc).__name__}): {_short(command)}",
                    hint="check the device's SSH server log", host=self.host, command=command) from None
            raise ConnectError(f"the SSH connection to {self.host} failed during {_short(command)}: "
                               f"{exc or type(exc).__name__}", hint="check the link to the device and retry",
                               host=self.host) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"the SSH connection to {self.host} failed during {_short(command)}: "
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

    def _pump(self, chan: Any, stdin: Any, deadline: float, out: BoundedBuffer, err: _PidMarker,
              on_sent: Optional[Callable[[int], None]] = None) -> bool:
        """Feed stdin and drain both streams (bounded) until the command ends; False on the deadline."""
        view = memoryview(stdin)
        pos = 0
        if not view:
            chan.shutdown_write()
        else:
            # A send waits at most this long for the peer to open its window (paramiko wakes it as soon as
            # the window adjust arrives): Dropbear's window is 24 KB, and polling for it capped uploads
            # over the exec channel at about 0.5 MB/s.
            chan.settimeout(0.05)
        ended_at: Optional[float] = None
        while True:
            moved = False
            if pos < len(view):
                before = pos
                try:
                    pos += chan.send(view[pos:pos + _CHUNK])
                except socket.timeout:
                    pass  # the window stayed shut; the deadline check below still runs
                except OSError:
                    pos = len(view)  # the command ended without reading all its input
                if on_sent and pos != before:
                    on_sent(pos)
                if pos >= len(view):
                    chan.shutdown_write()
                moved = True
            while chan.recv_ready():
                data = chan.recv(_CHUNK)
                if not data:
                    break
                out.add(data)
                moved = True
            while chan.recv_stderr_ready():
                data = chan.recv_stderr(_CHUNK)
                if not data:
                    break
                err.add(data)
                moved = True
            pending = chan.recv_ready() or chan.recv_stderr_ready()
            if not pending:
                if chan.closed:
                    return True
                if chan.exit_status_ready():
                    if chan.eof_received:
                        return True
                    # Exited, but something it started still holds the output open.
                    ended_at = ended_at or time.monotonic()
                    if time.monotonic() > ended_at + 0.5:
                        return True
            if time.monotonic() > deadline:
                return False
            if not moved:
                select.select([chan], [], [], 0.05)

    def _kill_remote(self, pid: Optional[int], after_cancel: bool = False) -> str:
        """Kill the timed-out command and everything it started on the device, check they are gone, and say
        what happened (for the message): "killed" only when the device confirmed it."""
        if pid is None or pid <= 1:
            return "it had not reported its process id, so nothing was killed; it may still be running on the device"
        try:
            # The script itself waits up to about 3 s for the processes to go; a loaded device is slow to
            # open a session.
            res = self._execute(_kill_script(pid), max(10.0, min(30.0, self.options.connect_timeout)), None,
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

    def _sftp(self, seconds: float) -> Any:
        """The SFTP session, started within ``seconds`` (subsystem request and version exchange)."""
        if self._sftp_client is not None:
            return self._sftp_client
        paramiko = self._paramiko
        tr = self._transport()
        deadline = time.monotonic() + seconds
        try:
            chan = tr.open_session(timeout=seconds)
        except paramiko.ChannelException as exc:
            # The server said no (MaxSessions, "administratively prohibited") and the link is up.
            raise DeviceError(f"{self.host} refused a session for the upload: {exc.text or exc}",
                              hint="check the device's SSH server (MaxSessions) and its log", host=self.host) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"cannot open SFTP on {self.host}: no session within {seconds:g} s "
                               f"({exc or type(exc).__name__})", hint="check sshd on the device, or raise "
                               "--connect-timeout", host=self.host) from None
        try:
            chan.settimeout(seconds)
            with _Watchdog(seconds, chan.close) as dog:
                try:
                    chan.invoke_subsystem("sftp")
                except (paramiko.SSHException, OSError, EOFError):
                    if not dog.fired:
                        raise
            if dog.fired:
                raise socket.timeout("no answer to the subsystem request")
            chan.settimeout(max(0.05, deadline - time.monotonic()))
            self._sftp_client = paramiko.SFTPClient(chan)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            chan.close()
            if isinstance(exc, (socket.timeout, TimeoutError)):
                raise ConnectError(f"{self.host} did not start SFTP within {seconds:g} s ({exc})",
                                   hint="the device's sshd is overloaded or hung; check it, or raise "
                                        "--connect-timeout", host=self.host) from None
            if self._alive():
                # The server refused the subsystem (OpenSSH without a Subsystem line), or started one
                # that is not there (Dropbear without sftp-server: the channel closes at once).
                raise _SftpUnavailable(str(exc) or type(exc).__name__) from None
            raise ConnectError(f"the SSH connection to {self.host} was lost while starting SFTP: "
                               f"{exc or type(exc).__name__}", hint="check the link to the device and retry",
                               host=self.host) from None
        return self._sftp_client

    def _drop_sftp(self) -> None:
        # After a timeout the SFTP reply stream is out of step with our requests:
        # never reuse that session.
        sftp, self._sftp_client = self._sftp_client, None
        if sftp is not None:
            try:
                sftp.get_channel().close()
            except Exception:
                pass

    def put(self, local: Path, remote: str, timeout: float, progress: Optional[ByteProgress] = None) -> int:
        """Upload over SFTP; where the server has no SFTP, over the exec channel (``transfer`` says which).

        The choice is made once per transport: a server that refused SFTP is not asked again.
        """
        deadline = time.monotonic() + timeout
        if self.transfer != "exec":
            try:
                self._sftp(min(self.options.connect_timeout, max(0.05, deadline - time.monotonic())))
            except _SftpUnavailable:
                self.transfer = "exec"
            else:
                self.transfer = "sftp"
        if self.transfer == "exec":
            return self._put_exec(Path(local), remote, max(0.05, deadline - time.monotonic()), progress)
        return self._put_sftp(Path(local), remote, deadline, timeout, progress)

    def _put_exec(self, local: Path, remote: str, timeout: float, progress: Optional[ByteProgress]) -> int:
        """Stream the file into ``cat`` on the device (POSIX sh; works with BusyBox); check the size landed.

        The caller verifies the sha256 on the device before renaming the file into place, as for SFTP.
        """
        total = local.stat().st_size
        with open(local, "rb") as src:
            data: Any = mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) if total else b""
        try:
            res = self._execute(posix_command(["sh", "-c", _EXEC_PUT_SCRIPT, "sh", remote]), timeout, data,
                                kill_on_timeout=True,
                                on_sent=(lambda n: progress(n, total)) if progress else None)
        except ConnectError as exc:
            # Over a lost link a removal would only wait; the next deploy sweeps temp files.
            raise ConnectError(f"upload of {remote} to {self.host} did not finish: {exc.message}", hint=exc.hint,
                               host=self.host) from None
        except RemoteCommandError as exc:
            if exc.exit_status is None and self._alive():  # timed out (and killed), the link is up
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
        raise _write_error(self.host, remote, problem)

    def _put_sftp(self, local: Path, remote: str, deadline: float, timeout: float,
                  progress: Optional[ByteProgress]) -> int:
        def left() -> float:
            return max(0.05, deadline - time.monotonic())

        def check_deadline(what: str) -> None:
            if time.monotonic() > deadline:
                raise socket.timeout(f"{what}: the upload took longer than {timeout:g} s")

        total = Path(local).stat().st_size
        sftp = self._sftp(min(self.options.connect_timeout, left()))
        chan = sftp.get_channel()
        sent = 0
        try:
            with open(local, "rb") as src:
                chan.settimeout(left())
                dst = sftp.open(remote, "wb")
                check_deadline("opening the file")
                try:
                    dst.set_pipelined(True)
                    while chunk := src.read(_CHUNK):
                        # A silent link blocks a write until the channel timeout: keep that
                        # inside the phase deadline, not a full timeout per write.
                        chan.settimeout(left())
                        dst.write(chunk)
                        sent += len(chunk)
                        if progress:
                            progress(sent, total)
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
        except (OSError, EOFError, self._paramiko.SSHException) as exc:
            self._drop_sftp()
            if isinstance(exc, (socket.timeout, TimeoutError)) or not self._alive():
                # Over a silent or cut link a removal would only wait; the next deploy sweeps temp files.
                raise ConnectError(f"upload of {remote} to {self.host} did not finish: {str(exc) or type(exc).__name__}",
                                   hint="check the link to the device and retry", host=self.host) from None
            self.remove(remote)
            raise _write_error(self.host, remote, exc) from None
        return sent

    def remove(self, remote: str) -> None:
        if not self._alive():
            return
        seconds = min(5.0, self.options.connect_timeout)
        if self.transfer == "exec":
            try:
                self._execute(posix_command(["rm", "-f", "--", remote]), seconds, None, kill_on_timeout=True)
            except DeviceError:
                pass
            return
        try:
            sftp = self._sftp(seconds)
            sftp.get_channel().settimeout(seconds)
            sftp.remove(remote)
        except _SftpUnavailable:
            self.transfer = "exec"
            self.remove(remote)
        except DeviceError:
            pass
        except Exception:
            self._drop_sftp()


#: Writes stdin to "$1", which must not exist yet (set -C), then prints the size that landed.
_EXEC_PUT_SCRIPT = 'set -C; cat > "$1" || exit $?; wc -c < "$1"'


class _SftpUnavailable(Exception):
    """The server has no SFTP (subsystem refused or gone at once) while the link is up (internal)."""


class _ChannelFailed(Exception):
    """exec_command failed for a reason other than our watchdog (internal)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _quiet_paramiko_logs() -> None:
    """paramiko logs a failed handshake (a peer that resets during the banner) as ERROR records with a
    traceback, one line each; with no logging configured Python prints them all on stderr. edgeq reports
    the failure itself, in one line: give paramiko's logger a NullHandler, as a library should. An
    application that configures logging still receives the records (they propagate)."""
    logger = logging.getLogger("paramiko")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


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
    """Hands every offered host key to ``SSHTransport._verify_host_key`` (paramiko holds no keys itself)."""

    def __init__(self, transport: SSHTransport) -> None:
        self.transport = transport

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:  # paramiko's policy interface
        self.transport._verify_host_key(key)


def make_transport(host: Optional[str], ssh: SSHOptions = SSHOptions()) -> Transport:
    """``None`` or ``"local"`` -> ``LocalTransport``; anything else -> ``SSHTransport`` (not yet connected)."""
    if host is None or host == "local":
        return LocalTransport()
    return SSHTransport(host, ssh)


__all__ = ["Result", "Transport", "LocalTransport", "SSHTransport", "SSHOptions", "make_transport", "parse_host",
           "MAX_COMMAND_BYTES", "check_command_length",
           "fingerprint", "signal_name", "posix_command", "wire_command", "DEFAULT_MAX_OUTPUT"]
