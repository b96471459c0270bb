"""Run one TensorFlow stage in a forked child, so a crash in TensorFlow's C++ is an error, not a dead edgeq.

TensorFlow's calibrator dies with a segmentation fault on the WHILE loop a
Keras 3 LSTM or GRU becomes (tensorflow#75140), and its quantizers are C++
that edgeq cannot guard from Python. :func:`run_forked` calls the stage in a
``fork()`` of the current process: the child shares everything already
imported and loaded (no second TensorFlow import), sends the stage's result
back on a pipe, and exits without running any teardown. A signal in the
child becomes :class:`StageCrashed`. A fork of a process holding TensorFlow
still costs tens of milliseconds (up to 0.1 s on a busy host), so the
conversion stages fork only for models where TensorFlow is known to crash
(``edgeq.convert.quantizers.forks``). Only stages that run TensorFlow Lite and MLIR code
may be forked: TensorFlow's own runtime (``TFLiteConverter.convert()``) can
deadlock in a forked child (measured), because its thread pools do not survive
``fork``.

Unlike :mod:`edgeq.sandbox` (a fresh interpreter for untrusted ``.tflite``
files), this is for the conversion stages, whose inputs are edgeq's own
objects and whose results are large ``bytes``.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Optional

from edgeq import errors


class StageCrashed(Exception):
    """The child running a stage was killed by a signal or exited without a result."""

    def __init__(self, stage: str, signal_name: Optional[str], status: Optional[int]) -> None:
        how = f"was killed by {signal_name}" if signal_name else f"exited with status {status} without a result"
        super().__init__(f"{stage} {how}")
        self.stage = stage
        self.signal = signal_name
        self.status = status


class ChildFailure(Exception):
    """An exception raised by the stage in the child that cannot travel as itself: its type and text."""

    def __init__(self, type_name: str, text: str) -> None:
        super().__init__(text)
        self.type_name = type_name


def available() -> bool:
    """Whether stages run forked: on Linux (macOS system libraries are not safe to use after ``fork``),
    unless ``EDGEQ_NO_FORK=1`` (for debugging a stage in-process)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork") and os.environ.get("EDGEQ_NO_FORK", "") != "1"


def run_forked(stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a forked child; its result (picklable) or its exception, raised here.

    ``stage`` names the work in :class:`StageCrashed`. An ``EdgeqError`` raised
    in the child is raised again as the same class; any other exception as
    :class:`ChildFailure` carrying its text (converter messages are parsed for
    op names). Where ``fork`` is unavailable the stage runs in this process.
    """
    if not available():
        return fn(*args, **kwargs)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a threaded process may deadlock; the child only runs
        # TensorFlow Lite / MLIR code that creates its own threads, and then exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never return into the caller's stack
        status = 0
        try:
            os.close(read_fd)
            faulthandler.disable()  # a crash here is reported by the parent, as one line
            try:
                payload = pickle.dumps(("ok", fn(*args, **kwargs)), protocol=pickle.HIGHEST_PROTOCOL)
            except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
                payload = pickle.dumps(("err", _portable(exc)), protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(write_fd, "wb") as out:
                out.write(payload)
        except BaseException:  # noqa: BLE001 - the parent sees "no result"
            status = 1
        finally:
            os._exit(status)  # no atexit handlers, no destructors of the parent's objects
    os.close(write_fd)
    chunks = []
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            while True:
                chunk = pipe.read(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        data = b"".join(chunks)
        answer = _answer(data)
        if answer is not None:
            # The stage finished and said so: how the child's exit goes no longer matters, and
            # tearing down a copy of a TensorFlow process takes longer than the fork did.
            threading.Thread(target=_reap, args=(pid,), daemon=True).start()
            return _result(answer)
        _, wait_status = os.waitpid(pid, 0)
    except BaseException:
        # Interrupted: the child must not outlive us.
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        raise
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        raise StageCrashed(stage, name, None)
    raise StageCrashed(stage, None, os.WEXITSTATUS(wait_status))


def _answer(data: bytes) -> Optional[tuple[str, Any]]:
    """The child's complete answer, or None when it sent none (or only part of one)."""
    if not data:
        return None
    try:
        answer = pickle.loads(data)  # noqa: S301 - written by our own child a moment ago
    except Exception:  # noqa: BLE001 - a truncated answer: the child died while writing it
        return None
    return answer if isinstance(answer, tuple) and len(answer) == 2 else None


def _result(answer: tuple[str, Any]) -> Any:
    kind, value = answer
    if kind == "ok":
        return value
    raise _rebuild(value)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _portable(exc: BaseException) -> tuple[str, str, Optional[str], Optional[str]]:
    """(type name, text, message, hint): enough to raise the exception again in the parent."""
    if isinstance(exc, errors.EdgeqError):
        return type(exc).__name__, str(exc), exc.message, exc.hint
    return type(exc).__name__, str(exc), None, None


def _rebuild(value: tuple[str, str, Optional[str], Optional[str]]) -> BaseException:
    type_name, text, message, hint = value
    cls = getattr(errors, type_name, None)
    if message is not None and isinstance(cls, type) and issubclass(cls, errors.EdgeqError):
        return cls(message, hint)
    if type_name == "KeyboardInterrupt":
        return KeyboardInterrupt()
    return ChildFailure(type_name, text)
