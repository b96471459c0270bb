"""Run a function in a child Python process, so a crash there is a result, not a crash of edgeq.

Untrusted ``.tflite`` files are programs: interpreters have aborted or segfaulted
on malformed or merely unusual models. Anything that loads a model into an
interpreter goes through :func:`run_in_child`: a fresh ``sys.executable``
imports ``module``, calls ``function(**kwargs)`` with JSON arguments, and
sends a JSON result back on a private pipe. A signal, a non-zero exit or the
time limit become fields of :class:`ChildResult`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

_TAIL_LINES = 20
_TAIL_CHARS = 4000
# What a child may send back: a result document and the end of its stderr. A
# model that makes the runtime print forever must not fill the host's memory.
_MAX_RESULT_BYTES = 16 * 1024 * 1024
_MAX_STDERR_BYTES = 256 * 1024
# Secrets edgeq itself reads from the environment: the SSH key passphrase (and
# any future EDGEQ_SSH_* setting), and the ssh-agent socket that would let a
# child sign in to devices as the user. A child that parses an untrusted model
# has no use for them.
_SECRET_PREFIXES = ("EDGEQ_SSH_",)
_SECRET_NAMES = frozenset({"SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_ASKPASS"})


# The child's first statement, before it imports anything: ``python -c`` puts the working directory
# first on sys.path (a json.py or numpy.py beside a downloaded model would run), so that entry goes;
# the directory edgeq itself was imported from (argv[1]) is put back at the end, after the standard
# library and site-packages. Not ``-I``: it would also drop user site-packages and PYTHONPATH, where
# edgeq, TensorFlow or a runtime may legitimately be installed.
_CHILD_BOOTSTRAP = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')] + sys.argv[1:2]; "
                    "from edgeq.sandbox import _child_main; _child_main()")


def _edgeq_root() -> str:
    """The sys.path entry edgeq was imported from (site-packages, or a source checkout)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) without secrets: what every child process edgeq starts gets."""
    source = os.environ if base is None else base
    return {k: v for k, v in source.items()
            if k not in _SECRET_NAMES and not k.startswith(_SECRET_PREFIXES)}


@dataclass(frozen=True)
class ChildResult:
    """How a child call ended. ``value`` is the function's JSON result when ``ok``."""

    ok: bool
    value: Any = None
    error_type: Optional[str] = None  # exception class name raised in the child
    error: Optional[str] = None  # its message
    returncode: Optional[int] = None
    signal: Optional[str] = None  # e.g. "SIGABRT" when the child was killed by a signal
    timed_out: bool = False
    stderr_tail: str = ""
    seconds: float = 0.0

    @property
    def crashed(self) -> bool:
        """The child died (signal, time limit or exit without a result) rather than raising."""
        return not self.ok and self.error_type is None

    def describe(self) -> str:
        """One line saying how the child ended."""
        if self.ok:
            return "finished"
        if self.timed_out:
            return f"did not finish within the time limit ({self.seconds:.0f} s)"
        if self.signal:
            return f"was killed by {self.signal}"
        if self.error_type:
            return f"raised {self.error_type}: {self.error}"
        return f"exited with status {self.returncode} without a result"


def run_in_child(module: str, function: str, kwargs: dict[str, Any], timeout: float = 120.0,
                 env: Optional[dict[str, str]] = None) -> ChildResult:
    """Call ``module.function(**kwargs)`` in a child process with a time limit.

    ``kwargs`` and the return value must be JSON-serialisable. The child's
    environment is ``env`` (default ``os.environ``) without secrets (see
    :func:`child_env`); its result is capped at 16 MiB, its stderr tail at 256 KiB.
    """
    read_fd, write_fd = os.pipe()
    request = json.dumps({"module": module, "function": function, "kwargs": kwargs, "fd": write_fd})
    environment = child_env(env)
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_BOOTSTRAP, _edgeq_root()],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(write_fd,),
            env=environment,
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
    result = BoundedBuffer(_MAX_RESULT_BYTES, keep_tail=False)
    errors = BoundedBuffer(_MAX_STDERR_BYTES, keep_tail=True)
    # Drain the result pipe and stderr on threads so neither can block the child,
    # and keep only a bounded part of each.
    drains = [threading.Thread(target=_drain, args=(os.fdopen(read_fd, "rb"), result), daemon=True),
              threading.Thread(target=_drain, args=(proc.stderr, errors), daemon=True)]
    for t in drains:
        t.start()
    timed_out = False
    try:
        try:
            if proc.stdin is not None:
                proc.stdin.write(request.encode())
                proc.stdin.close()
        except OSError:
            pass  # the child died before reading its request: its exit status tells
        try:
            proc.wait(timeout=max(0.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            proc.wait()
    except BaseException:
        # Interrupted (Ctrl-C): the child leads its own session and would outlive us.
        _kill_group(proc)
        proc.wait()
        raise
    for t in drains:
        t.join(timeout=5)
    payload = result.data() if not result.truncated else b""
    err = errors.data()
    if result.truncated:
        err += f"\n(the child's result was larger than {_MAX_RESULT_BYTES >> 20} MiB and was dropped)".encode()
    seconds = time.monotonic() - t0
    tail = "\n".join(err.decode("utf-8", "replace").strip().splitlines()[-_TAIL_LINES:])[-_TAIL_CHARS:]
    rc = proc.returncode
    sig = None
    if rc is not None and rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
    if timed_out:
        return ChildResult(False, returncode=rc, signal=None, timed_out=True, stderr_tail=tail, seconds=seconds)
    message: Any = None
    if payload:
        try:
            message = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            message = None
    if rc == 0 and isinstance(message, dict) and "value" in message:
        return ChildResult(True, value=message["value"], returncode=0, stderr_tail=tail, seconds=seconds)
    if isinstance(message, dict) and "error_type" in message:
        return ChildResult(False, error_type=str(message["error_type"]), error=str(message.get("error", "")),
                           returncode=rc, signal=sig, stderr_tail=tail, seconds=seconds)
    return ChildResult(False, returncode=rc, signal=sig, stderr_tail=tail, seconds=seconds)


class BoundedBuffer:
    """One output stream, bounded: keeps the first ``cap`` bytes, or the last ``cap`` bytes.

    Shared by the sandbox's children and the transports' commands: everything read is counted,
    only ``cap`` bytes are kept, so a flood of output costs time, never memory.
    """

    def __init__(self, cap: int, keep_tail: bool) -> None:
        self.cap = max(0, cap)
        self.keep_tail = keep_tail
        self.total = 0
        self._buf = bytearray()

    def add(self, data: bytes) -> None:
        self.total += len(data)
        if self.keep_tail:
            self._buf += data
            if len(self._buf) > 2 * self.cap + 65536:
                del self._buf[: len(self._buf) - self.cap]
        elif len(self._buf) < self.cap:
            self._buf += data[: self.cap - len(self._buf)]

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def data(self) -> bytes:
        if self.keep_tail and len(self._buf) > self.cap:
            return bytes(self._buf[len(self._buf) - self.cap:])
        return bytes(self._buf)


def _drain(reader: Any, sink: BoundedBuffer) -> None:
    with reader:
        while True:
            data = reader.read1(65536) if hasattr(reader, "read1") else reader.read(65536)
            if not data:
                return
            sink.add(data)


def _kill_group(proc: subprocess.Popen) -> None:
    # The child leads its own session, so this reaches only what it started.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _child_main() -> None:
    """Entry point of the child: read the request on stdin, answer on the private fd."""
    import importlib

    request = json.loads(sys.stdin.read())
    out = os.fdopen(int(request["fd"]), "w", encoding="utf-8")
    try:
        fn = getattr(importlib.import_module(request["module"]), request["function"])
        value = fn(**request["kwargs"])
        message: dict[str, Any] = {"value": value}
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the parent
        message = {"error_type": type(exc).__name__, "error": str(exc)}
    out.write(json.dumps(message, default=str))
    out.flush()
    out.close()
    sys.stdout.flush()
    # Skip interpreter teardown: some runtimes crash in their destructors.
    os._exit(0 if "value" in message else 1)
