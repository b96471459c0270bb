"""The local machine as the device: commands run as child processes (no shell), files are copied."""

from __future__ import annotations

import os
import selectors
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

from edgeq.errors import UsageError
from edgeq.progress import ProgressCallback
from edgeq.sandbox import BoundedBuffer, child_env
from edgeq.transport.base import CHUNK, DEFAULT_MAX_OUTPUT, Result, Transport, signal_name, write_error
from edgeq.transport.wire import check_command_length, posix_command


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

    def put(self, local: Path, remote: str, timeout: float, progress: Optional[ProgressCallback] = None,
            label: str = "") -> int:
        total = Path(local).stat().st_size
        meter = self._meter(local, total, progress, label)
        sent = 0
        deadline = time.monotonic() + timeout
        self.transfer = "local"
        try:
            with open(local, "rb") as src, open(remote, "wb") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    sent += len(chunk)
                    meter(sent)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"upload took longer than {timeout:.1f} s")
                dst.flush()
                os.fsync(dst.fileno())
        except OSError as exc:
            self.remove(remote)
            raise write_error(self.host, remote, exc) from None
        meter(sent)  # an empty file too: the upload is complete
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
                        pos += os.write(f.fileno(), view[pos:pos + CHUNK])  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    except OSError:
                        pos = len(view)  # the command ended without reading all its input
                    if pos >= len(view):
                        sel.unregister(f)
                        f.close()  # type: ignore[union-attr]
                    continue
                data = os.read(f.fileno(), CHUNK)  # type: ignore[union-attr]
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
