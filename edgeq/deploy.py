"""Deploy a ``.tflite`` to a device and measure it there: probe, upload, run, compare with the host.

The pipeline, one transport round trip per step:

1. probe: the runner (sent on stdin) reports device facts, resolves the remote
   directory and which content-addressed files are already there;
2. upload: whatever is missing goes to ``<final>.tmp-<random>``, is verified by
   sha256 *on the device* and only then renamed to its final path
   (``REMOTE_DIR/models/<sha256>/model.tflite``, ``data/<sha256>/eval.npz``,
   ``runner/<sha256>/runner.py``);
3. lock: ``REMOTE_DIR/lock`` (an atomic ``mkdir``) refuses a second deploy to
   the same device (``DeviceBusy``); a lock older than ``lock_stale_s``, or
   left by a deploy of this controller that is no longer running, is stale
   and broken (said in the report's warnings);
4. run: the uploaded runner loads the model, times it and evaluates it (this is
   also the smoke inference that gates activation);
5. activate: ``REMOTE_DIR/current`` -> ``models/<sha256>`` switched by an
   atomic rename, the old target kept as ``REMOTE_DIR/previous``
   (``rollback()`` swaps them back); skipped with ``activate=False``;
6. reference: with eval data, the same runner runs the model on the host with
   the host's LiteRT in a child process, and the device outputs are compared
   with the host's.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
import secrets
import socket
import sys
import threading
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

from edgeq import __version__
from edgeq.errors import (ConnectError, DataError, DeviceBusy, DeviceError, InputError, ModelError, RemoteCommandError,
                          RunnerCrashed, UsageError)
from edgeq.progress import ProgressCallback, report
from edgeq.transport import LocalTransport, Result, SSHOptions, Transport, make_transport

DEFAULT_REMOTE_DIR = "~/.edgeq"
# The host's runtime for reference outputs (a dependency of edgeq).
HOST_RUNTIME = "ai_edge_litert"


@dataclass(frozen=True)
class DeployOptions:
    """Where and how to deploy; timeouts are per phase, in seconds."""

    host: Optional[str] = None  # None or "local": this machine is the device
    python: Optional[str] = None  # device interpreter; "python3" over SSH, sys.executable locally
    remote_dir: str = DEFAULT_REMOTE_DIR
    eval_data: Optional[str] = None
    runs: int = 50
    warmup: int = 1
    threads: Optional[int] = None
    xnnpack: bool = True
    min_seconds: float = 1.0
    min_warmup_seconds: float = 0.5
    max_runs: int = 10000
    ssh: SSHOptions = field(default_factory=SSHOptions)
    probe_timeout: float = 120.0  # importing full TensorFlow on a Pi takes a while
    upload_timeout: float = 600.0
    run_timeout: float = 900.0
    reference: bool = True  # compare device outputs with the host's LiteRT
    activate: bool = True  # make the model REMOTE_DIR/current after a successful run
    lock_stale_s: float = 1800.0  # a device lock older than this is treated as left by a dead deploy
    cleanup_timeout: float = 10.0  # unlock / temp-file removal after a failure

    def device_python(self) -> str:
        if self.python:
            return self.python
        return sys.executable if self.is_local else "python3"

    @property
    def is_local(self) -> bool:
        return self.host is None or self.host == "local"


@dataclass(frozen=True)
class LatencyStats:
    """Latency of the timed runs, in milliseconds (``samples`` are the raw per-run figures)."""

    min: float
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    max: float
    count: int
    samples: tuple[float, ...] = field(repr=False)

    @classmethod
    def from_samples(cls, samples: list[float]) -> "LatencyStats":
        import numpy as np

        if not samples:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, ())
        a = np.asarray(samples, dtype=np.float64)
        p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
        return cls(float(a.min()), p50, p90, p99, float(a.mean()), float(a.std()), float(a.max()), len(a),
                   tuple(float(s) for s in samples))


@dataclass(frozen=True)
class DeployResult:
    """Everything measured in one deploy; ``to_dict()`` is ``report.json``."""

    host: str
    model: dict[str, Any]
    device: dict[str, Any]
    runtime: dict[str, Any]
    latency_ms: LatencyStats
    load_ms: float
    first_inference_ms: float
    peak_rss_bytes: Optional[int]
    accuracy: Optional[float]
    mae: Optional[float]
    evaluation: Optional[dict[str, Any]]
    agreement: Optional[dict[str, Any]]
    transfer: dict[str, Any]
    settings: dict[str, Any]
    started_at: str
    duration_s: float
    warnings: tuple[str, ...] = ()
    edgeq_version: str = __version__
    activation: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        lat = asdict(self.latency_ms)
        lat["samples"] = list(self.latency_ms.samples)
        return {
            "edgeq_version": self.edgeq_version,
            "host": self.host,
            "started_at": self.started_at,
            "duration_s": round(self.duration_s, 3),
            "model": dict(self.model),
            "device": dict(self.device),
            "runtime": dict(self.runtime),
            "settings": dict(self.settings),
            "latency_ms": lat,
            "load_ms": self.load_ms,
            "first_inference_ms": self.first_inference_ms,
            "peak_rss_bytes": self.peak_rss_bytes,
            "accuracy": self.accuracy,
            "mae": self.mae,
            "eval": self.evaluation,
            "agreement": self.agreement,
            "transfer": dict(self.transfer),
            "activation": dict(self.activation) if self.activation is not None else None,
            "warnings": list(self.warnings),
        }


def runner_source() -> bytes:
    """The on-device runner's source (``deploy/runner.py``, shipped as ``edgeq._device``)."""
    return resources.files("edgeq._device").joinpath("runner.py").read_bytes()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_model(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"model file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise ModelError(f"{path} is not a .tflite file (no TFL3 identifier)",
                         hint="convert the model first with `edgeq convert`")


def _check_eval(path: Path) -> dict[str, Any]:
    import numpy as np

    if not path.is_file():
        raise InputError(f"eval data {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files:
                raise DataError(f"eval data {path} has no array 'x' (found: {', '.join(data.files) or 'nothing'})",
                                hint="save it with numpy.savez(path, x=inputs, y=labels)")
            return {"samples": int(data["x"].shape[0]), "has_labels": "y" in data.files}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read eval data {path} as .npz: {exc}") from None


def _parse_runner(res: Result, host: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else None
    except (json.JSONDecodeError, IndexError):
        doc = None
    if not isinstance(doc, dict):
        raise RemoteCommandError(
            f"the runner on {host} gave no result during {what} (exit status {res.exit_status})"
            + (f": {res.tail(3)}" if res.tail(3) else ""),
            host=host, command=res.command, exit_status=res.exit_status, output_tail=res.tail())
    return doc


def _no_python(res: Result, python: str, host: str) -> Optional[DeviceError]:
    if res.exit_status == 127:
        return DeviceError(f"no Python at {python!r} on {host}",
                           hint="install python3 on the device or pass its interpreter with --python PATH", host=host)
    if res.exit_status == 126:
        return DeviceError(f"{python!r} on {host} is not executable",
                           hint="pass the device's Python interpreter with --python PATH", host=host)
    return None


def _probe(tr: Transport, python: str, remote_dir: str, have: list[str], timeout: float) -> dict[str, Any]:
    argv = [python, "-", "probe", "--dir", remote_dir]
    for rel in have:
        argv += ["--have", rel]
    res = tr.run(argv, timeout, stdin=runner_source(), check=False)
    err = _no_python(res, python, tr.host)
    if err:
        raise err
    if res.signal:
        raise RunnerCrashed(f"the probe on {tr.host} was killed by {res.signal}", host=tr.host)
    doc = _parse_runner(res, tr.host, "the probe")
    if not doc.get("ok"):
        raise DeviceError(f"the probe on {tr.host} failed: {doc.get('error')}", host=tr.host)
    if doc.get("numpy") is None or doc.get("runtime") is None:
        py = doc.get("python", "?")
        if doc.get("numpy") is None:
            need = "numpy and a TFLite runtime"
        else:
            need = "a TFLite runtime"
        raise DeviceError(
            f"{tr.host} has no {need} for {python} (Python {py}, numpy {doc.get('numpy') or 'missing'})",
            hint=(f"on the device run `{python} -m pip install ai-edge-litert` "
                  "(or `pip install tflite-runtime` with numpy<2 on Python <= 3.11), or pass --python for a venv "
                  "that has one"), host=tr.host)
    return doc


def _upload(tr: Transport, items: list[tuple[str, Path, str, str]], python: str, remote_dir: str,
            options: DeployOptions, progress: Optional[ProgressCallback],
            disk_free: Optional[int]) -> dict[tuple[str, str], int]:
    """Upload ``(kind, local, rel, sha)`` items to temp names, verify on the device, rename into place."""
    sent: dict[tuple[str, str], int] = {}
    staged: list[tuple[str, str, str]] = []
    total = sum(local.stat().st_size for _, local, _, _ in items)
    done_before = 0
    deadline = time.monotonic() + options.upload_timeout
    try:
        for kind, local, rel, sha in items:
            final = f"{remote_dir}/{rel}"
            tr.makedirs(final.rsplit("/", 1)[0], timeout=max(1.0, deadline - time.monotonic()))
            tmp = f"{final}.tmp-{secrets.token_hex(6)}"
            staged.append((tmp, final, sha))

            def show(n: int, _t: int, _kind: str = kind, _base: int = done_before) -> None:
                report(progress, "upload", _kind, _base + n, total, tr.host)

            try:
                sent[(kind, sha)] = tr.put(local, tmp, timeout=max(1.0, deadline - time.monotonic()), progress=show)
            except DeviceError as exc:
                if disk_free is not None and "disk full" in str(exc):
                    exc.message += f"; {disk_free} bytes were free under {remote_dir} before the upload"
                raise
            done_before += local.stat().st_size
        report(progress, "verify", "sha256 on the device", total, total, tr.host)
        argv = [python, "-", "install"]
        for tmp, final, sha in staged:
            argv += ["--item", tmp, final, sha]
        res = tr.run(argv, max(5.0, deadline - time.monotonic()), stdin=runner_source(), check=False)
        doc = _parse_runner(res, tr.host, "the upload check")
        if not doc.get("ok"):
            raise DeviceError(f"upload to {tr.host} failed verification: {doc.get('error')}",
                              hint="retry the deploy; if it repeats, check the device's storage", host=tr.host)
    except BaseException as exc:
        # Over a lost link removal would only wait; the next deploy sweeps temp files.
        if not isinstance(exc, ConnectError):
            for tmp, _final, _sha in staged:
                tr.remove(tmp)
        raise
    return sent


def _run_args(options: DeployOptions, model: str, eval_path: Optional[str]) -> list[str]:
    argv = ["run", "--model", model, "--runs", str(options.runs), "--warmup", str(options.warmup),
            "--min-seconds", repr(float(options.min_seconds)),
            "--min-warmup-seconds", repr(float(options.min_warmup_seconds)),
            "--max-runs", str(options.max_runs)]
    if eval_path:
        argv += ["--eval", eval_path]
    if options.threads:
        argv += ["--threads", str(options.threads)]
    if not options.xnnpack:
        argv.append("--no-xnnpack")
    return argv


def _run_result(res: Result, host: str, model_name: str) -> dict[str, Any]:
    if res.signal:
        raise RunnerCrashed(
            f"the runner on {host} was killed by {res.signal} while running {model_name}",
            hint="the model may be malformed (TFLite models are programs) or the device ran out of memory; "
                 "check `dmesg` on the device", host=host)
    doc = _parse_runner(res, host, f"the run of {model_name}")
    if not doc.get("ok"):
        kind = doc.get("kind")
        hint = {"model": "the runtime on the device rejects this model; check it with `edgeq check`",
                "data": "fix the eval data (.npz with x shaped like the model input, y labels)",
                "no_runtime": "install ai-edge-litert or tflite-runtime on the device"}.get(kind or "")
        raise DeviceError(f"the runner on {host} failed on {model_name}: {doc.get('error')}", hint=hint, host=host)
    return doc


def _decode(arr: Optional[dict[str, Any]]):
    import numpy as np

    if not arr:
        return None
    return np.frombuffer(base64.b64decode(arr["b64"]), dtype="<f4").reshape(arr["shape"])


def _agreement(device_eval: dict[str, Any], host_doc: dict[str, Any], out_scale: float) -> dict[str, Any]:
    import numpy as np

    host_eval = host_doc.get("eval") or {}
    dev = _decode(device_eval.get("outputs"))
    ref = _decode(host_eval.get("outputs"))
    base = {"reference_runtime": host_doc.get("runtime", {}).get("name"),
            "reference_version": host_doc.get("runtime", {}).get("version"),
            "host_accuracy": host_eval.get("accuracy"), "host_mae": host_eval.get("mae")}
    if dev is None or ref is None or dev.shape != ref.shape:
        return {**base, "top1": None, "max_abs_diff": None, "mean_abs_diff": None, "samples": 0,
                "error": "device and host outputs differ in shape"}
    d = dev.reshape(len(dev), -1)
    r = ref.reshape(len(ref), -1)
    diff = np.abs(d - r)
    top1 = float(np.mean(np.argmax(d, axis=1) == np.argmax(r, axis=1))) if d.shape[1] > 1 and len(d) else None
    max_abs = float(diff.max()) if diff.size else 0.0
    return {**base, "top1": top1, "max_abs_diff": max_abs,
            "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "max_abs_diff_steps": round(max_abs / out_scale, 3) if out_scale else None,
            "samples": int(len(d))}


def host_reference(model_path: Path, eval_path: Path, timeout: float = 600.0) -> dict[str, Any]:
    """Run the model on the host's LiteRT in a child process (a crash there is a result, not ours)."""
    argv = [sys.executable, "-", "run", "--model", str(model_path), "--eval", str(eval_path), "--eval-only",
            "--runtime", HOST_RUNTIME]
    res = LocalTransport().run(argv, timeout, stdin=runner_source(), check=False)
    return _run_result(res, "the host (reference)", model_path.name)


_REFERENCES: dict[tuple[str, str], dict[str, Any]] = {}
_REFERENCES_LOCK = threading.Lock()


def _cached_reference(model: Path, model_sha: str, eval_path: Path, timeout: float) -> dict[str, Any]:
    # A fleet deploys one model with one eval set to many hosts: compute the host reference once.
    key = (model_sha, _sha256_file(eval_path))
    with _REFERENCES_LOCK:
        if key not in _REFERENCES:
            _REFERENCES[key] = host_reference(model, eval_path, timeout)
            while len(_REFERENCES) > 8:
                _REFERENCES.pop(next(iter(_REFERENCES)))
        return _REFERENCES[key]


# ------------------------------------------------------------------ device lock

# Tokens of the deploys running in this process; a lock left by this controller
# whose token is not here (or whose process is gone) belongs to a dead deploy.
_LIVE_TOKENS: set[str] = set()
_LIVE_LOCK = threading.Lock()


def _controller_id() -> str:
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
    if owner.get("controller_id") != _controller_id():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int):
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


@dataclass(frozen=True)
class DeviceLock:
    """A held device lock: its token, and a stale lock it replaced (if any)."""

    token: str
    remote_dir: str
    broke_stale: Optional[dict[str, Any]]
    swept: int


def _busy_message(host: str, owner: dict[str, Any]) -> str:
    who = owner.get("user") or "?"
    where = owner.get("controller") or "?"
    model = str(owner.get("model") or "?")[:12]
    age = owner.get("age_s")
    age_text = f"{age:.0f} s ago" if isinstance(age, (int, float)) else "at an unknown time"
    return (f"{host} is busy: another deploy holds its lock (by {who} on {where}, pid {owner.get('pid', '?')}, "
            f"model {model}, started {age_text})")


def acquire_lock(tr: Transport, python: str, remote_dir: str, options: DeployOptions,
                 model_sha: str = "") -> DeviceLock:
    """Take ``REMOTE_DIR/lock`` on the device, or raise ``DeviceBusy`` naming the holder."""
    token = secrets.token_hex(12)
    owner = {"user": _safe_user(), "controller": socket.gethostname(), "controller_id": _controller_id(),
             "pid": os.getpid(), "model": model_sha}
    with _LIVE_LOCK:
        _LIVE_TOKENS.add(token)
    base = [python, "-", "lock", "--dir", remote_dir, "--token", token, "--owner", json.dumps(owner),
            "--stale-after", repr(float(options.lock_stale_s))]
    try:
        doc = _runner_call(tr, python, base, options.probe_timeout, "taking the device lock")
        if not doc.get("ok") and doc.get("kind") == "busy" and _holder_gone(doc.get("owner") or {}):
            doc = _runner_call(tr, python, base + ["--break-token", str(doc["owner"].get("token"))],
                               options.probe_timeout, "taking the device lock")
        if not doc.get("ok"):
            if doc.get("kind") == "busy":
                raise DeviceBusy(_busy_message(tr.host, doc.get("owner") or {}),
                                 hint="wait for it to finish and retry; a lock left by a killed deploy is broken "
                                      f"automatically after {options.lock_stale_s:g} s", host=tr.host)
            raise DeviceError(f"cannot lock {remote_dir} on {tr.host}: {doc.get('error')}",
                              hint="check that --remote-dir is writable on the device", host=tr.host)
    except BaseException:
        _forget(token)
        raise
    return DeviceLock(token, doc.get("remote_dir", remote_dir), doc.get("broke_stale"), int(doc.get("swept", 0)))


def release_lock(tr: Transport, python: str, lock: DeviceLock, timeout: float) -> bool:
    """Best-effort unlock (bounded by ``timeout``); False if the device could not be told."""
    try:
        doc = _runner_call(tr, python, [python, "-", "unlock", "--dir", lock.remote_dir, "--token", lock.token],
                           timeout, "releasing the device lock")
        return bool(doc.get("ok"))
    except DeviceError:
        return False
    finally:
        _forget(lock.token)


def _forget(token: str) -> None:
    with _LIVE_LOCK:
        _LIVE_TOKENS.discard(token)


def _safe_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "?"


def _runner_call(tr: Transport, python: str, argv: list[str], timeout: float, what: str) -> dict[str, Any]:
    res = tr.run(argv, timeout, stdin=runner_source(), check=False)
    err = _no_python(res, python, tr.host)
    if err:
        raise err
    if res.signal:
        raise RunnerCrashed(f"the runner on {tr.host} was killed by {res.signal} while {what}", host=tr.host)
    return _parse_runner(res, tr.host, what)


def _activate(tr: Transport, python: str, lock: DeviceLock, sha: str, timeout: float) -> dict[str, Any]:
    doc = _runner_call(tr, python, [python, "-", "activate", "--dir", lock.remote_dir, "--sha", sha,
                                    "--token", lock.token], timeout, "activating the model")
    if not doc.get("ok"):
        raise DeviceError(f"activating {sha[:12]} on {tr.host} failed: {doc.get('error')}; "
                          "the previously active model is unchanged", host=tr.host)
    return {"activated": True, "switched": doc["switched"], "active": doc["active"], "previous": doc["previous"],
            "path": f"{lock.remote_dir}/current/model.tflite"}


# ----------------------------------------------------------------------- deploy


def deploy(model_path: str | Path, options: DeployOptions = DeployOptions(),
           progress: Optional[ProgressCallback] = None, transport: Optional[Transport] = None) -> DeployResult:
    """Push ``model_path`` to the device in ``options``, measure it there and return what was measured.

    With ``options.activate`` the model becomes ``REMOTE_DIR/current`` once it is
    verified and ran on the device. ``transport`` lets a caller (the fleet) keep
    a handle to cancel a hung host; by default one is made from ``options``.
    """
    return _session([Path(model_path)], options, progress, transport, options.activate)[0]


def measure_models(model_paths: Sequence[str | Path], options: DeployOptions = DeployOptions(),
                   progress: Optional[ProgressCallback] = None,
                   transport: Optional[Transport] = None) -> tuple[DeployResult, ...]:
    """Measure several models on one device without activating any of them.

    One connection, one probe, one device lock; each model (and the eval data)
    is uploaded once, content-addressed, and run in turn. One ``DeployResult``
    per model, in the order given (``activation.activated`` is False).
    """
    paths = [Path(p) for p in model_paths]
    if not paths:
        raise UsageError("measure_models needs at least one model")
    return tuple(_session(paths, options, progress, transport, activate=False))


def _session(models: list[Path], options: DeployOptions, progress: Optional[ProgressCallback],
             transport: Optional[Transport], activate: bool) -> list[DeployResult]:
    started = time.monotonic()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if transport is None:
        transport = make_transport(options.host, options.ssh)  # validates the host before anything runs
    for model in models:
        _check_model(model)
    eval_path = Path(options.eval_data) if options.eval_data else None
    eval_sha = None
    if eval_path:
        _check_eval(eval_path)
        eval_sha = _sha256_file(eval_path)
    shas = [_sha256_file(m) for m in models]
    python = options.device_python()
    warnings: list[str] = []

    with tempfile.TemporaryDirectory(prefix="edgeq-deploy-") as staging:
        runner_local = Path(staging) / "runner.py"
        runner_local.write_bytes(runner_source())
        # (kind, local, sha, rel); one entry per distinct file.
        files: list[tuple[str, Path, str, str]] = [
            ("runner", runner_local, _sha256_file(runner_local), "")]
        seen: set[str] = set()
        for model, sha in zip(models, shas):
            if sha not in seen:
                seen.add(sha)
                files.append(("model", model, sha, ""))
        if eval_path:
            files.append(("eval", eval_path, eval_sha, ""))
        folder = {"runner": "runner", "model": "models", "eval": "data"}
        name = {"runner": "runner.py", "model": "model.tflite", "eval": "eval.npz"}
        files = [(k, loc, sha, f"{folder[k]}/{sha}/{name[k]}") for k, loc, sha, _r in files]
        rel_of = {(k, sha): rel for k, _l, sha, rel in files}
        runner_rel = files[0][3]
        eval_rel = rel_of[("eval", eval_sha)] if eval_path else None

        host = transport.host
        report(progress, "connect", f"connecting to {host}", host=host)
        t0 = time.monotonic()
        run_docs: list[dict[str, Any]] = []
        activation: Optional[dict[str, Any]] = None
        with transport as tr:
            report(progress, "probe", f"probing {host}", host=host)
            facts = _probe(tr, python, options.remote_dir, [f[3] for f in files], options.probe_timeout)
            remote_dir = facts["remote_dir"]
            report(progress, "lock", f"locking {remote_dir}", host=host)
            lock = acquire_lock(tr, python, remote_dir, options, shas[0])
            if lock.broke_stale:
                owner = lock.broke_stale
                warnings.append(f"broke a stale device lock ({owner.get('reason')}; held by "
                                f"{owner.get('user', '?')} on {owner.get('controller', '?')}, pid "
                                f"{owner.get('pid', '?')}, {owner.get('age_s', '?')} s old)")
            link_lost = False
            try:
                missing = [(kind, local, rel, sha) for kind, local, sha, rel in files
                           if not facts.get("have", {}).get(rel)]
                disk = facts.get("disk") or {}
                sent_files = _upload(tr, missing, python, remote_dir, options, progress, disk.get("free_bytes")) \
                    if missing else {}
                upload_s = time.monotonic() - t0
                for model, sha in zip(models, shas):
                    report(progress, "measure", f"running {model.name} on {host}", host=host)
                    res = tr.run([python, f"{remote_dir}/{runner_rel}",
                                  *_run_args(options, f"{remote_dir}/{rel_of[('model', sha)]}",
                                             f"{remote_dir}/{eval_rel}" if eval_rel else None)],
                                 options.run_timeout, check=False)
                    err = _no_python(res, python, host)
                    if err:
                        raise err
                    run_docs.append(_run_result(res, host, model.name))
                before = facts.get("activation") or {}
                if activate:
                    report(progress, "activate", f"activating {shas[0][:12]} on {host}", host=host)
                    activation = _activate(tr, python, lock, shas[0], options.probe_timeout)
            except ConnectError:
                link_lost = True
                raise
            finally:
                # Over a lost link the unlock would only wait for its timeout; the
                # next deploy from here recognises the lock as left by a dead deploy.
                if not link_lost:
                    release_lock(tr, python, lock, options.cleanup_timeout)
                else:
                    _forget(lock.token)
                    tr.close()

    results = []
    for i, (model, sha, run_doc) in enumerate(zip(models, shas, run_docs)):
        if activation is None:
            act = {"activated": False, "switched": False, "active": before.get("current"),
                   "previous": before.get("previous"), "path": f"{remote_dir}/current/model.tflite"}
        else:
            act = activation
        # Bytes sent belong to the first model that needed them.
        first = shas.index(sha) == i
        sent = {"model": sent_files.get(("model", sha), 0) if first else 0}
        if i == 0:
            sent["eval"] = sent_files.get(("eval", eval_sha), 0) if eval_path else 0
            sent["runner"] = sent_files.get(("runner", files[0][2]), 0)
        results.append(_result(model, sha, run_doc, facts, options, python, remote_dir, rel_of[("model", sha)],
                               eval_path, eval_sha, sent, upload_s, lock, transport, started_at, started,
                               list(warnings), act, progress))
    return results


def _result(model: Path, model_sha: str, run_doc: dict[str, Any], facts: dict[str, Any], options: DeployOptions,
            python: str, remote_dir: str, model_rel: str, eval_path: Optional[Path], eval_sha: Optional[str],
            sent: dict[str, int], upload_s: float, lock: "DeviceLock", transport: Transport, started_at: str,
            started: float, warnings: list[str], activation: dict[str, Any],
            progress: Optional[ProgressCallback]) -> DeployResult:
    host = transport.host
    device_eval = run_doc.get("eval")
    agreement = None
    if eval_path and options.reference and device_eval:
        report(progress, "reference", "host reference outputs (LiteRT)", host=host)
        try:
            ref = _cached_reference(model, model_sha, eval_path, options.run_timeout)
            out_scale = (run_doc.get("outputs") or [{}])[0].get("quantization", [0.0, 0])[0]
            agreement = _agreement(device_eval, ref, out_scale)
        except DeviceError as exc:
            warnings.append(f"no host reference: {exc}")
            agreement = {"error": str(exc), "top1": None, "max_abs_diff": None}

    evaluation = None
    if device_eval:
        evaluation = {k: v for k, v in device_eval.items() if k != "outputs"}
        evaluation.update({"data": str(eval_path), "sha256": eval_sha} if eval_path else {})
    device = {k: v for k, v in facts.items() if k not in ("ok", "mode", "have", "runner_version", "activation")}
    runtime = dict(run_doc.get("runtime", {}))
    runtime["threads"] = options.threads
    settings = {"runs": options.runs, "warmup": options.warmup, "min_seconds": options.min_seconds,
                "max_runs": options.max_runs, "warmup_runs_done": run_doc.get("warmup_runs"),
                "python": python, "remote_dir": remote_dir, "inputs": run_doc.get("inputs"),
                "outputs": run_doc.get("outputs")}
    if runtime.get("xnnpack") and runtime.get("xnnpack_active") is False:
        warnings.append("XNNPACK was requested but the runtime did not report applying it")
    return DeployResult(
        host=host,
        model={"name": model.name, "sha256": model_sha, "bytes": model.stat().st_size,
               "remote_path": f"{remote_dir}/{model_rel}"},
        device=device,
        runtime=runtime,
        latency_ms=LatencyStats.from_samples(run_doc.get("samples_ms", [])),
        load_ms=float(run_doc.get("load_ms", 0.0)),
        first_inference_ms=float(run_doc.get("first_inference_ms", 0.0)),
        peak_rss_bytes=run_doc.get("peak_rss_bytes"),
        accuracy=(device_eval or {}).get("accuracy"),
        mae=(device_eval or {}).get("mae"),
        evaluation=evaluation,
        agreement=agreement,
        transfer={"model_bytes_sent": sent.get("model", 0), "eval_bytes_sent": sent.get("eval", 0),
                  "runner_bytes_sent": sent.get("runner", 0), "seconds": round(upload_s, 3),
                  "uploaded": sorted(k for k, v in sent.items() if v),
                  "connect_attempts": getattr(transport, "connect_attempts", None),
                  "stale_temp_files_removed": lock.swept},
        settings=settings,
        started_at=started_at,
        duration_s=time.monotonic() - started,
        warnings=tuple(warnings),
        activation=activation,
    )


@dataclass(frozen=True)
class RollbackResult:
    """The device's active and previous model after a rollback."""

    host: str
    remote_dir: str
    active: Optional[str]
    previous: Optional[str]
    rolled_back_from: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rollback(options: DeployOptions = DeployOptions(), progress: Optional[ProgressCallback] = None,
             transport: Optional[Transport] = None) -> RollbackResult:
    """Make ``REMOTE_DIR/previous`` the active model again (under the device lock)."""
    if transport is None:
        transport = make_transport(options.host, options.ssh)
    python = options.device_python()
    host = transport.host
    report(progress, "connect", f"connecting to {host}", host=host)
    with transport as tr:
        report(progress, "lock", f"locking {options.remote_dir}", host=host)
        lock = acquire_lock(tr, python, options.remote_dir, options)
        try:
            report(progress, "rollback", f"rolling back on {host}", host=host)
            doc = _runner_call(tr, python, [python, "-", "rollback", "--dir", lock.remote_dir, "--token", lock.token],
                               options.probe_timeout, "rolling back")
            if not doc.get("ok"):
                raise DeviceError(f"cannot roll back on {host}: {doc.get('error')}",
                                  hint="deploy a model first; rollback needs a previous one", host=host)
        finally:
            release_lock(tr, python, lock, options.cleanup_timeout)
    return RollbackResult(host, lock.remote_dir, doc.get("active"), doc.get("previous"),
                          (doc.get("before") or {}).get("current"))


__all__ = ["DEFAULT_REMOTE_DIR", "DeployOptions", "DeployResult", "DeviceLock", "LatencyStats", "RollbackResult",
           "SSHOptions", "acquire_lock", "deploy", "host_reference", "measure_models", "release_lock", "rollback", "runner_source"]
