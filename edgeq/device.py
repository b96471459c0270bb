"""The device client: the one place that talks the runner protocol.

Every call sends the runner's source on stdin (``python - MODE ...``; nothing on
the device is ever executed from a file), is bounded by a deadline, and every
answer is validated before anyone reads it: one JSON object on the last line,
no NaN or Infinity, bounded nesting and size, and the fields each mode promises
with the types it promises. Anything else is a ``DeviceProtocolError``.

The device lock is a context manager (``DeviceClient.locked``): taken
atomically, refreshed while held, released on the way out (not waited for over
a lost link: the next deploy from here recognises a lock left by a dead one).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import math
import os
import secrets
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from edgeq._device import protocol
from edgeq.errors import (ConnectError, DeviceBusy, DeviceError, DeviceProtocolError, RemoteCommandError,
                          RunnerCrashed, UsageError)
from edgeq.transport import Result, Transport

MAX_DOCUMENT_BYTES = 8 << 20  # a runner document larger than this is not one we asked for
MAX_DEPTH = 12
MAX_STRING = 64 << 10


def runner_source() -> bytes:
    """The program sent to the device: ``deploy/runner.py`` (shipped as ``edgeq._device``) behind the protocol
    and the device modules it imports, as one standalone source (``protocol.standalone``)."""
    device = resources.files("edgeq._device")
    modules = [(name, device.joinpath(name + ".py").read_text(encoding="utf-8")) for name in protocol.DEVICE_MODULES]
    return protocol.standalone(device.joinpath("runner.py").read_bytes(), modules)


def runner_program(args: Sequence[str]) -> bytes:
    """What goes on stdin for one call: ``EDGEQ_ARGS = [...]`` (an ASCII list literal), then the runner."""
    args = [str(a) for a in args]
    for a in args:
        if "\0" in a:
            raise UsageError(f"a runner argument contains a NUL byte: {a[:40]!r}")
    return b"EDGEQ_ARGS = " + ascii(args).encode("ascii") + b"\n" + runner_source()


# ---------------------------------------------------------------- validation
# A schema is a callable ``check(value, where) -> None`` raising _Bad. Small
# combinators keep each mode's promise readable next to its name.


class _Bad(Exception):
    pass


Check = Callable[[Any, str], None]


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


def num(lo: float = -math.inf, hi: float = math.inf, integer: bool = False) -> Check:
    def check(v: Any, where: str) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            raise _Bad(f"{where} is {_type_name(v)}, not {'an integer' if integer else 'a number'}")
        # An int is compared as an int: math.isfinite or float() on a huge one raises OverflowError.
        if isinstance(v, float) and not math.isfinite(v):
            raise _Bad(f"{where} is not a finite number")
        if not lo <= v <= hi or (isinstance(v, int) and abs(v) >= 10 ** protocol.MAX_INT_DIGITS):
            shown = repr(v) if isinstance(v, float) or abs(v) < 10 ** 24 else f"an integer of {v.bit_length()} bits"
            raise _Bad(f"{where} = {shown} is out of range [{lo:g}, {hi:g}]")
    return check


def integer(lo: float = -math.inf, hi: float = math.inf) -> Check:
    return num(lo, hi, integer=True)


def text(limit: int = MAX_STRING) -> Check:
    def check(v: Any, where: str) -> None:
        if not isinstance(v, str):
            raise _Bad(f"{where} is {_type_name(v)}, not a string")
        if len(v) > limit:
            raise _Bad(f"{where} is longer than {limit} characters")
    return check


def boolean(v: Any, where: str) -> None:
    if not isinstance(v, bool):
        raise _Bad(f"{where} is {_type_name(v)}, not a boolean")


def sha(v: Any, where: str) -> None:
    if not protocol.is_sha(v):
        raise _Bad(f"{where} is not a sha256")


def anything(v: Any, where: str) -> None:
    """Any JSON value (nesting and size are bounded for the whole document)."""


def optional(inner: Check) -> Check:
    def check(v: Any, where: str) -> None:
        if v is not None:
            inner(v, where)
    check.optional = True  # type: ignore[attr-defined]  # a missing key is fine too
    return check


def array(item: Check, max_len: int = 1 << 20, min_len: int = 0) -> Check:
    def check(v: Any, where: str) -> None:
        if not isinstance(v, list):
            raise _Bad(f"{where} is {_type_name(v)}, not a list")
        if not min_len <= len(v) <= max_len:
            raise _Bad(f"{where} has {len(v)} items (expected {min_len} to {max_len})")
        for i, x in enumerate(v):
            item(x, f"{where}[{i}]")
    return check


def mapping(value: Check, max_len: int = 4096) -> Check:
    def check(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(f"{where} is {_type_name(v)}, not an object")
        if len(v) > max_len:
            raise _Bad(f"{where} has more than {max_len} keys")
        for k, x in v.items():
            value(x, f"{where}[{k[:40]!r}]")
    return check


def obj(**fields: Check) -> Check:
    """An object with these keys (a key whose check is ``optional(...)`` may be missing); others pass."""
    def check(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(f"{where} is {_type_name(v)}, not an object")
        for key, inner in fields.items():
            if key not in v:
                if getattr(inner, "optional", False):
                    continue
                raise _Bad(f"{where}.{key} is missing")
            inner(v[key], f"{where}.{key}")
    return check


_SHA_OR_NONE = optional(sha)
ACTIVATION = obj(current=_SHA_OR_NONE, previous=_SHA_OR_NONE, foreign=optional(text(1024)))
TENSOR_INFO = obj(name=optional(text(4096)), shape=array(integer(-1, 1 << 31), 16), dtype=text(32),
                  quantization=array(num(), 2, 2))
ENCODED = obj(dtype=text(32), shape=array(integer(0, 1 << 31), 16), b64=text(MAX_DOCUMENT_BYTES))

PROBE = obj(runner_version=integer(1), hostname=text(256), arch=text(64), python=text(64),
            numpy=optional(text(64)), runtime=optional(obj(name=text(64), version=optional(text(64)))),
            remote_dir=optional(text(4096)), have=mapping(optional(sha)),
            activation=optional(ACTIVATION),
            disk=optional(obj(free_bytes=integer(0), total_bytes=integer(0), path=optional(text(4096)))),
            cpu_cores=optional(integer(0, 1 << 16)), mem_total_bytes=optional(integer(0)),
            emulation=optional(obj(emulated=boolean)))
LOCK = obj(remote_dir=text(4096), broke_stale=optional(mapping(anything, 64)), swept=integer(0))
BUSY = obj(owner=mapping(anything, 64))
ACTIVATE = obj(switched=boolean, active=sha, previous=_SHA_OR_NONE, pruned=optional(array(sha)))
ROLLBACK = obj(active=sha, previous=_SHA_OR_NONE, before=ACTIVATION)
STATE = obj(activation=ACTIVATION)
INSTALL = obj(installed=array(text(4096)))
EVAL = obj(samples=integer(0), seconds=num(0), accuracy=optional(num(0, 1)), mae=optional(num(0)),
           task=optional(text(32)), outputs=optional(ENCODED), outputs_truncated=optional(boolean),
           rows=optional(integer(0)), state_reset=optional(boolean), state_reload=optional(boolean),
           per_output=optional(array(obj(name=text(1024), tensor=optional(text(1024)), outputs=ENCODED), 256)))
RESIZED = array(obj(input=text(1024), shape=array(integer(1, 1 << 20), 16), source=optional(text(64))), 256)
LAYERS = obj(runtime=obj(name=text(64), version=optional(text(64))), samples=integer(0),
             tensors=array(obj(index=integer(0), name=text(1024), dtype=text(16),
                               shape=array(integer(0, 1 << 31), 16), quantization=array(num(), 2, 2),
                               b64=text(MAX_DOCUMENT_BYTES)), 1 << 16),
             ops=optional(array(obj(index=integer(0), op=text(64), outputs=array(integer(0), 64)), 100000)))


_COUNT = optional(integer(0, 1 << 31))
_DELEGATE_FIELDS = obj(requested=optional(text(32)), applied=optional(boolean), delegated_nodes=_COUNT,
                       nodes=_COUNT, partitions=_COUNT)


def DELEGATE(v: Any, where: str) -> None:
    """What a delegate really took (``applied`` null: the runtime does not say); counts consistent."""
    _DELEGATE_FIELDS(v, where)
    taken, nodes = v.get("delegated_nodes"), v.get("nodes")
    if taken is not None and nodes is not None and taken > nodes:
        raise _Bad(f"{where}.delegated_nodes = {taken} is more than the model's {nodes} nodes")
    if v.get("applied") is not None and taken is not None and v["applied"] != (taken > 0):
        raise _Bad(f"{where}.applied = {v['applied']} does not match {taken} delegated nodes")


def run_schema(max_samples: int) -> Check:
    return obj(runtime=obj(name=text(64), version=optional(text(64)), xnnpack=boolean,
                           xnnpack_active=optional(boolean)),
               python=text(64), numpy=text(64),
               inputs=array(TENSOR_INFO, 256), outputs=array(TENSOR_INFO, 256, 1),
               load_ms=num(0), first_inference_ms=num(0), warmup_runs=integer(0),
               samples_ms=array(num(0), max_samples), runtime_log=optional(text()),
               peak_rss_bytes=optional(integer(0)), eval=optional(EVAL), delegate=optional(DELEGATE),
               resized=optional(RESIZED))


def decode_encoded(enc: dict[str, Any], where: str = "outputs"):
    """An ``ENCODED`` array (validated: its byte count matches its shape) as a numpy array."""
    import numpy as np

    try:
        dtype = np.dtype(enc["dtype"]).newbyteorder("<")
        raw = base64.b64decode(enc["b64"], validate=True)
    except (TypeError, ValueError) as exc:
        raise DeviceProtocolError(f"{where} cannot be decoded: {exc}") from None
    shape = tuple(int(d) for d in enc["shape"])
    count = math.prod(shape)
    if dtype.kind not in "iufb" or len(raw) != count * dtype.itemsize:
        raise DeviceProtocolError(f"{where} holds {len(raw)} bytes, not the {count} {dtype.name} values of its "
                                  f"shape {list(shape)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


# -------------------------------------------------------------------- client

# Tokens of the deploys running in this process; a lock left by this controller
# whose token is not here (or whose process is gone) belongs to a dead deploy.
_LIVE_TOKENS: set[str] = set()
_LIVE_LOCK = threading.Lock()


def controller_id() -> str:
    """This machine and PID namespace (hostname + boot id + pid-namespace inode)."""
    boot = ""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        pass
    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = ""
    return hashlib.sha256(f"{socket.gethostname()}|{boot}|{ns}".encode()).hexdigest()[:16]


def _holder_gone(owner: dict[str, Any]) -> bool:
    """True when the lock holder ran on this controller and is no longer running."""
    if owner.get("controller_id") != controller_id():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 31:  # os.kill overflows past
        return False
    if pid == os.getpid():
        with _LIVE_LOCK:
            return owner.get("token") not in _LIVE_TOKENS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _forget(token: str) -> None:
    with _LIVE_LOCK:
        _LIVE_TOKENS.discard(token)


def _safe_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "?"


def _busy_message(host: str, owner: dict[str, Any]) -> str:
    who = str(owner.get("user") or "?")[:64]
    where = str(owner.get("controller") or "?")[:128]
    model = str(owner.get("model") or "?")[:12]
    age = owner.get("age_s")
    age_text = (f"{age:.0f} s ago" if isinstance(age, (int, float)) and not isinstance(age, bool)
                and -1e12 < age < 1e12 else "at an unknown time")
    return (f"{host} is busy: another deploy holds its lock (by {who} on {where}, pid "
            f"{str(owner.get('pid', '?'))[:16]}, model {model}, started {age_text})")


@dataclass(frozen=True)
class DeviceLock:
    """A held device lock: its token, and a stale lock it replaced (if any)."""

    token: str
    remote_dir: str
    broke_stale: Optional[dict[str, Any]]
    swept: int


class DeviceClient:
    """The runner protocol over one transport; every call bounded and every answer validated."""

    def __init__(self, tr: Transport, python: str) -> None:
        self.tr = tr
        self.python = python

    @property
    def host(self) -> str:
        return self.tr.host

    # -- the one call

    def call(self, mode: str, args: Sequence[str], timeout: float, what: str, schema: Check) -> dict[str, Any]:
        """Run one runner mode; return its validated document (``ok`` true or false).

        Only ``python - MODE`` goes on the command line: the arguments travel on
        stdin ahead of the runner (``EDGEQ_ARGS = [...]``), so a long argument list
        (``--layers`` on a large model) never meets an SSH server's command limit.
        """
        try:
            protocol.parse_args([mode, *args])  # what the runner accepts, checked before anything is sent
        except protocol.RunnerError as exc:
            raise UsageError(f"edgeq built runner arguments the runner does not accept for {what}: {exc}") from None
        res = self.tr.run([self.python, "-", mode], timeout, stdin=runner_program(args), check=False)
        return self.parse(res, what, schema)

    def parse(self, res: Result, what: str, schema: Check) -> dict[str, Any]:
        host = self.host
        if res.exit_status == 127:
            raise DeviceError(f"no Python at {self.python!r} on {host}",
                              hint="install python3 on the device or pass its interpreter with --python PATH",
                              host=host)
        if res.exit_status == 126:
            raise DeviceError(f"{self.python!r} on {host} is not executable",
                              hint="pass the device's Python interpreter with --python PATH", host=host)
        if res.signal:
            raise RunnerCrashed(
                f"the runner on {host} was killed by {res.signal} during {what}",
                hint=("it ran past its own time cap" if res.signal == "SIGALRM" else
                      "the model may be malformed (TFLite models are programs) or the device ran out of memory; "
                      "check `dmesg` on the device"), host=host)
        if getattr(res, "stdout_truncated", False):
            raise DeviceProtocolError(f"the runner on {host} wrote more output than edgeq keeps during {what}",
                                      hint="use fewer eval samples", host=host)
        lines = res.stdout.strip().splitlines()
        if not lines:
            raise RemoteCommandError(
                f"the runner on {host} gave no result during {what} (exit status {res.exit_status})"
                + (f": {res.tail(3)[:500]}" if res.tail(3) else ""),
                host=host, command=res.command, exit_status=res.exit_status, output_tail=res.tail()[-2000:])
        last = lines[-1]
        if len(last) > MAX_DOCUMENT_BYTES:
            raise DeviceProtocolError(f"the runner on {host} answered {what} with {len(last)} bytes "
                                      f"(more than {MAX_DOCUMENT_BYTES})", host=host)
        try:
            doc = protocol.loads(last)
        except RecursionError:
            raise DeviceProtocolError(f"the runner on {host} answered {what} with a document nested too deeply",
                                      host=host) from None
        except ValueError as exc:
            raise DeviceProtocolError(f"the runner on {host} answered {what} with invalid JSON: "
                                      f"{str(exc)[:200]}", host=host) from None
        try:
            if not isinstance(doc, dict):
                raise _Bad(f"the document is {_type_name(doc)}, not an object")
            if protocol.depth(doc, MAX_DEPTH) > MAX_DEPTH:
                raise _Bad(f"the document is nested deeper than {MAX_DEPTH}")
            boolean(doc.get("ok"), "ok")
            if doc["ok"]:
                schema(doc, "result")
            else:
                obj(error=text(8192), kind=optional(text(64)))(doc, "result")
        except _Bad as exc:
            raise DeviceProtocolError(f"the runner on {host} answered {what} with an invalid document: {exc}",
                                      hint="the device's Python or runtime misbehaves; check it with "
                                           "`edgeq deploy --no-activate`", host=host) from None
        return doc

    # -- modes

    def probe(self, remote_dir: str, have: Sequence[tuple[str, str]], timeout: float) -> dict[str, Any]:
        args = ["--dir", remote_dir, "--prepare"]
        for rel, digest in have:
            args += ["--have", rel, digest]
        doc = self.call("probe", args, timeout, "the probe", PROBE)
        if not doc["ok"]:
            # The probe's only file work is the remote directory: a failure there is fixed by choosing another.
            hint = {"unsafe": "fix the directory on the device as the message says, or pass another --remote-dir",
                    "io": f"pass a directory the device's user can create and write with --remote-dir PATH "
                          f"(this one was {remote_dir})"}.get(str(doc.get("kind")))
            raise DeviceError(f"the probe on {self.host} failed: {doc['error']}", hint=hint, host=self.host)
        if not doc.get("remote_dir"):
            raise DeviceProtocolError(f"the probe on {self.host} did not resolve the remote directory (remote_dir)",
                                      host=self.host)
        if doc.get("numpy") is None or doc.get("runtime") is None:
            py = doc.get("python", "?")
            need = "numpy and a TFLite runtime" if doc.get("numpy") is None else "a TFLite runtime"
            raise DeviceError(
                f"{self.host} has no {need} for {self.python} (Python {py}, numpy {doc.get('numpy') or 'missing'})",
                hint=(f"on the device run `{self.python} -m pip install ai-edge-litert` "
                      "(or `pip install tflite-runtime` with numpy<2 on Python <= 3.11), or pass --python for a "
                      "venv that has one"), host=self.host)
        return doc

    def install(self, items: Sequence[tuple[str, str, str]], timeout: float) -> None:
        args: list[str] = []
        for tmp, final, digest in items:
            args += ["--item", tmp, final, digest]
        doc = self.call("install", args, timeout, "the upload check", INSTALL)
        if not doc["ok"]:
            raise DeviceError(f"upload to {self.host} failed verification: {doc['error']}",
                              hint="retry the deploy; if it repeats, check the device's storage", host=self.host)

    def run(self, args: Sequence[str], timeout: float, what: str, max_samples: int) -> dict[str, Any]:
        # The runner kills itself a little before the host gives up, so a timed-out
        # run never outlives the lock it ran under.
        own = max(0.5, timeout - min(2.0, 0.1 * timeout))
        doc = self.call("run", [*args, "--deadline", repr(round(own, 3))], timeout, what,
                        run_schema(max_samples))
        if not doc["ok"]:
            kind = doc.get("kind")
            hint = {"model": "the runtime on the device rejects this model; check it with `edgeq check`",
                    "data": "fix the eval data: an .npz with one array per model input name (or x for one "
                            "input), samples on the first axis, labels y",
                    "eval_timeout": "use fewer eval samples (or a faster device)",
                    "no_runtime": "install ai-edge-litert or tflite-runtime on the device"}.get(kind or "")
            raise DeviceError(f"the runner on {self.host} failed on {what}: {doc['error']}", hint=hint,
                              host=self.host)
        if not doc["samples_ms"] and "--eval-only" not in args:
            raise DeviceProtocolError(f"the runner on {self.host} reported no timed runs for {what}",
                                      host=self.host)
        return doc

    def state(self, remote_dir: str, timeout: float) -> dict[str, Any]:
        """Which model is active now (read back after an activation that failed or timed out)."""
        doc = self.call("state", ["--dir", remote_dir], timeout, "reading the active model", STATE)
        if not doc["ok"]:
            raise DeviceError(f"cannot read the active model on {self.host}: {doc['error']}", host=self.host)
        return doc["activation"]

    def activate(self, lock: DeviceLock, digest: str, timeout: float, keep: Optional[int]) -> dict[str, Any]:
        args = ["--dir", lock.remote_dir, "--sha", digest, "--token", lock.token]
        if keep is not None:
            args += ["--keep", str(keep)]
        doc = self.call("activate", args, timeout, "activating the model", ACTIVATE)
        if not doc["ok"]:
            hint = _FOREIGN_HINT if doc.get("kind") == "foreign" else None
            raise DeviceError(f"activating {digest[:12]} on {self.host} failed: {doc['error']}", hint=hint,
                              host=self.host)
        return doc

    def rollback(self, lock: DeviceLock, timeout: float) -> dict[str, Any]:
        doc = self.call("rollback", ["--dir", lock.remote_dir, "--token", lock.token], timeout, "rolling back",
                        ROLLBACK)
        if not doc["ok"]:
            raise DeviceError(f"cannot roll back on {self.host}: {doc['error']}",
                              hint=_FOREIGN_HINT if doc.get("kind") == "foreign" else
                              "deploy a model first; rollback needs a previous one", host=self.host)
        return doc

    def layers(self, args: Sequence[str], timeout: float, what: str) -> dict[str, Any]:
        own = max(0.5, timeout - min(2.0, 0.1 * timeout))
        doc = self.call("layers", [*args, "--deadline", repr(round(own, 3))], timeout, what, LAYERS)
        if not doc["ok"]:
            raise DeviceError(f"the layer run on {self.host} failed: {doc['error']}", host=self.host)
        return doc

    # -- the lock

    def acquire(self, remote_dir: str, timeout: float, stale_after: float, ttl: float,
                model_sha: str = "") -> DeviceLock:
        """Take ``REMOTE_DIR/lock``, or raise ``DeviceBusy`` naming the holder."""
        token = secrets.token_hex(12)
        owner = {"user": _safe_user(), "controller": socket.gethostname(), "controller_id": controller_id(),
                 "pid": os.getpid(), "model": model_sha}
        with _LIVE_LOCK:
            _LIVE_TOKENS.add(token)
        base = ["--dir", remote_dir, "--token", token, "--owner", json.dumps(owner),
                "--stale-after", repr(float(stale_after)), "--ttl", repr(float(ttl))]

        try:
            doc = self.call("lock", base, timeout, "taking the device lock", LOCK)
            if not doc["ok"] and doc.get("kind") == "busy":
                _check_busy(doc, self.host)
                if _holder_gone(doc["owner"]):
                    doc = self.call("lock", base + ["--break-token", str(doc["owner"].get("token"))[:64]],
                                    timeout, "taking the device lock", LOCK)
            if not doc["ok"]:
                if doc.get("kind") == "busy":
                    _check_busy(doc, self.host)
                    raise DeviceBusy(_busy_message(self.host, doc["owner"]),
                                     hint="wait for it to finish and retry; a lock left by a killed deploy is "
                                          f"broken automatically after {stale_after:g} s (or its holder's own "
                                          "deadline, if longer)", host=self.host)
                raise DeviceError(f"cannot lock {remote_dir} on {self.host}: {doc['error']}",
                                  hint="check that --remote-dir is a directory of yours on the device",
                                  host=self.host)
        except (DeviceProtocolError, RemoteCommandError, RunnerCrashed):
            # The runner may have taken the lock before its answer went wrong: give ours back (by token only).
            self.release(DeviceLock(token, remote_dir, None, 0), timeout)
            raise
        except BaseException:
            _forget(token)
            raise
        return DeviceLock(token, doc["remote_dir"], doc.get("broke_stale"), int(doc["swept"]))

    def release(self, lock: DeviceLock, timeout: float) -> bool:
        """Best-effort unlock (bounded by ``timeout``); False if the device could not be told."""
        try:
            doc = self.call("unlock", ["--dir", lock.remote_dir, "--token", lock.token], timeout,
                            "releasing the device lock", obj())
            return bool(doc["ok"])
        except DeviceError:
            return False
        finally:
            _forget(lock.token)

    def refresh(self, lock: DeviceLock, timeout: float) -> None:
        """Heartbeat: keeps a long deploy's lock from being judged stale."""
        doc = self.call("refresh", ["--dir", lock.remote_dir, "--token", lock.token], timeout,
                        "refreshing the device lock", obj())
        if not doc["ok"]:
            raise DeviceError(f"{self.host}: {doc['error']}", hint="retry the deploy", host=self.host)

    @contextmanager
    def locked(self, remote_dir: str, timeout: float, stale_after: float, ttl: float, release_timeout: float,
               model_sha: str = "") -> Iterator[DeviceLock]:
        """The device lock for the ``with`` body; released on the way out, except over a lost link."""
        lock = self.acquire(remote_dir, timeout, stale_after, ttl, model_sha)
        try:
            yield lock
        except ConnectError:
            _forget(lock.token)
            self.tr.close()
            raise
        except BaseException:
            self.release(lock, release_timeout)
            raise
        else:
            self.release(lock, release_timeout)


_FOREIGN_HINT = ("edgeq switches only a `current` it made; move yours aside as the message says and deploy again, "
                 "or give edgeq its own --remote-dir")


def _check_busy(doc: dict[str, Any], host: str) -> None:
    try:
        BUSY(doc, "result")
    except _Bad as exc:
        raise DeviceProtocolError(f"the runner on {host} reported a busy lock with an invalid document: {exc}",
                                  host=host) from None


__all__ = ["DeviceClient", "DeviceLock", "controller_id", "decode_encoded", "runner_program", "runner_source"]
