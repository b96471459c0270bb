"""What every transport shares: the ``Transport`` interface, the ``Result`` of a command, upload progress."""

from __future__ import annotations

import errno
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from edgeq.errors import DeviceError, RemoteCommandError
from edgeq.escape import term
from edgeq.progress import ProgressCallback, report
from edgeq.sandbox import BoundedBuffer
from edgeq.transport.wire import short_command

#: How much a transport reads or writes at a time.
CHUNK = 64 * 1024
#: What ``run()`` keeps of each output stream by default; the rest is read and dropped.
DEFAULT_MAX_OUTPUT = 1024 * 1024
#: At most this much device output goes into an error message.
_TAIL_CHARS = 2000
#: Upload progress events are at most this often (seconds between two), besides the first and the last.
PROGRESS_INTERVAL_S = 0.1


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


class UploadMeter:
    """Turns "bytes sent so far" into ``upload`` progress events (``unit="bytes"``) for one file.

    The first count is always reported (the first bytes that went), then at most one every ``interval``
    seconds, and the count that reaches ``total``: a bar moves smoothly without a callback per 64 KiB chunk.
    """

    def __init__(self, callback: Optional[ProgressCallback], host: str, label: str, total: int,
                 interval: float = PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.callback = callback
        self.host = host
        self.label = label
        self.total = total
        self.interval = interval
        self._clock = clock
        self._last_at: Optional[float] = None
        self._last_sent = -1

    def __call__(self, sent: int) -> None:
        if self.callback is None or sent == self._last_sent:
            return
        now = self._clock()
        if sent < self.total and self._last_at is not None and now - self._last_at < self.interval:
            return
        self._last_at, self._last_sent = now, sent
        report(self.callback, "upload", self.label, sent, self.total, self.host, unit="bytes")


class Transport(ABC):
    """A device edgeq can run commands on and upload files to."""

    #: Name used in messages and reports (``user@host:port`` or ``local``); never secret.
    host: str
    #: What ``run()`` keeps of each of stdout and stderr.
    max_output_bytes: int = DEFAULT_MAX_OUTPUT
    #: How ``put()`` sends files on this connection: ``"sftp"``, ``"exec"`` (the bytes on the stdin of a
    #: ``cat`` on the device, when the server has no SFTP), ``"local"``; None before the first ``put()``.
    transfer: Optional[str] = None

    @property
    def cancelled(self) -> bool:
        """True once ``cancel()`` abandoned this device (a fleet gave up on it); never reconnects then."""
        return False

    @abstractmethod
    def run(self, argv: Sequence[str], timeout: float, stdin: Optional[bytes] = None,
            check: bool = True) -> Result:
        """Run ``argv`` on the device; raise ``RemoteCommandError`` on timeout (after killing the command),
        or on failure if ``check``."""

    @abstractmethod
    def put(self, local: Path, remote: str, timeout: float, progress: Optional[ProgressCallback] = None,
            label: str = "") -> int:
        """Write ``local`` to the device path ``remote`` (flushed); return bytes sent.

        ``progress`` hears ``upload`` events in bytes of this file (``unit="bytes"``, ``message`` the
        ``label`` or the file's name): the first once bytes went, then at most ten a second, and, when the
        upload succeeded, one at the file's size.
        """

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

    def _meter(self, local: Path, total: int, progress: Optional[ProgressCallback], label: str) -> UploadMeter:
        return UploadMeter(progress, self.host, label or Path(local).name, total)

    def _result(self, command: str, status: int, out: BoundedBuffer, err: BoundedBuffer, sig: Optional[str]) -> Result:
        return Result(command, status, decode_output(out.data()), decode_output(err.data()), sig, out.truncated,
                      err.truncated)

    def _check(self, res: Result, check: bool) -> Result:
        if check and not res.ok:
            what = f"killed by {res.signal}" if res.signal else f"exit status {res.exit_status}"
            tail = res.tail(3)
            raise RemoteCommandError(
                f"command failed on {self.host} ({what}): {short_command(res.command)}" + (f": {tail}" if tail else "")
                + res.truncation_note(),
                host=self.host, command=res.command, exit_status=res.exit_status, output_tail=res.tail(),
            )
        return res

    def _timed_out(self, command: str, timeout: float, err: BoundedBuffer, killed: str) -> RemoteCommandError:
        tail = Result(command, -1, "", decode_output(err.data())).tail()
        return RemoteCommandError(
            f"command timed out after {timeout:g} s on {self.host}: {short_command(command)}; {killed}",
            hint="raise the timeout or check the device (load, a hung runtime)", host=self.host,
            command=command, exit_status=None, output_tail=tail)


def write_error(host: str, remote: str, exc: BaseException) -> DeviceError:
    """The ``DeviceError`` for a failed write of ``remote`` (a full disk says so)."""
    code = getattr(exc, "errno", None)
    text = str(exc) or type(exc).__name__
    if code in (errno.ENOSPC, errno.EDQUOT) or "space" in text.lower() or text.strip() == "Failure":
        return DeviceError(f"cannot write {remote} on {host}: {text} (is the device's disk full?)",
                           hint="free space on the device or choose another --remote-dir", host=host)
    return DeviceError(f"cannot write {remote} on {host}: {text}",
                       hint="check that --remote-dir is writable on the device", host=host)


def decode_output(data: bytes) -> str:
    """Device output as text (undecodable bytes replaced)."""
    return data.decode("utf-8", "replace")
