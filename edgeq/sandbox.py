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
from typing import Any, Optional

_TAIL_LINES = 20


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

    ``kwargs`` and the return value must be JSON-serialisable.
    """
    read_fd, write_fd = os.pipe()
    request = json.dumps({"module": module, "function": function, "kwargs": kwargs, "fd": write_fd})
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from edgeq.sandbox import _child_main; _child_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(write_fd,),
            env=child_env,
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
    chunks: list[bytes] = []
    # Drain the result pipe alongside stderr so a large result cannot block the child.
    drain = threading.Thread(target=_drain, args=(read_fd, chunks), daemon=True)
    drain.start()
    timed_out = False
    try:
        _, err = proc.communicate(request.encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        _, err = proc.communicate()
    drain.join(timeout=5)
    payload = b"".join(chunks)
    seconds = time.monotonic() - t0
    tail = "\n".join(err.decode("utf-8", "replace").strip().splitlines()[-_TAIL_LINES:])
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


def _drain(fd: int, chunks: list[bytes]) -> None:
    with os.fdopen(fd, "rb") as reader:
        while True:
            data = reader.read(65536)
            if not data:
                return
            chunks.append(data)


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
