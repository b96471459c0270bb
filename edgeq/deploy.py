"""Deploy a ``.tflite`` to a device and measure it there: probe, upload, run, compare with the host.

The pipeline, one transport round trip per step:

Every step talks to the device through ``edgeq.device.DeviceClient``: the
runner's source goes on stdin (nothing on the device is executed from a file),
every call has a deadline and every answer is validated.

1. probe: device facts; the remote directory resolved, created 0700 and checked
   (no symlink, ours, not group/world-writable); the sha256 of each
   content-addressed file already there (a corrupt copy is re-sent);
2. lock: ``REMOTE_DIR/lock`` (a complete directory renamed into place)
   refuses a second deploy (``DeviceBusy``); a lock is stale after
   ``lock_stale_s`` without a heartbeat or its holder's own deadline, whichever
   is longer, or when left by a dead deploy of this controller; breaking it is
   atomic (only the deploy that moved the stale directory proceeds);
3. upload: whatever is missing goes to ``<final>.tmp-<random>``, is verified by
   sha256 *on the device* and only then renamed to its final path
   (``REMOTE_DIR/models/<sha256>/model.tflite``, ``data/<sha256>/eval.npz``);
4. run: the runner loads the model, times it and evaluates it (evaluation
   under its own cap; the runner kills itself before the host gives up); this
   is also the smoke inference that gates activation;
5. activate: ``REMOTE_DIR/current`` -> ``models/<sha256>`` switched by an
   atomic rename, the old target kept as ``REMOTE_DIR/previous``
   (``rollback()`` swaps them back); both new links are made before either is
   renamed, so a full disk changes neither; after a failure the active model
   is read back and reported; ``keep`` prunes old models; skipped with
   ``activate=False``;
6. reference: with eval data, the same runner runs the model on the host with
   the host's LiteRT in a child process, and the device outputs are compared
   with the host's.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from edgeq import __version__
from edgeq.device import DeviceClient, DeviceLock, decode_encoded, runner_source
from edgeq.errors import ConnectError, DataError, DeviceError, DeviceProtocolError, InputError, ModelError, UsageError
from edgeq.progress import ProgressCallback, report
from edgeq.transport import LocalTransport, SSHOptions, Transport, make_transport

DEFAULT_REMOTE_DIR = "~/.edgeq"
# The host's runtime for reference outputs (a dependency of edgeq).
HOST_RUNTIME = "ai_edge_litert"
# Eval outputs sent back at most (float32 values): well inside what the transport keeps of stdout.
MAX_OUTPUT_VALUES = 100_000


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
    eval_timeout: Optional[float] = None  # on-device evaluation cap; default half of run_timeout
    reference_timeout: Optional[float] = None  # host reference cap; default run_timeout
    keep: Optional[int] = None  # after activation keep the N newest models (plus current and previous)
    layers: int = 0  # compare every intermediate tensor of this many eval inputs with the host (0: off)

    def eval_cap(self) -> float:
        return self.eval_timeout if self.eval_timeout is not None else self.run_timeout / 2

    def reference_cap(self) -> float:
        return self.reference_timeout if self.reference_timeout is not None else self.run_timeout

    def session_deadline(self, models: int = 1) -> float:
        """The longest a session under the device lock may legitimately take: how long its lock stays fresh."""
        return 3 * self.probe_timeout + self.upload_timeout + models * self.run_timeout + self.cleanup_timeout + 60

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
    layer_diff: Optional[dict[str, Any]] = None

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
            "layer_diff": self.layer_diff,
            "warnings": list(self.warnings),
        }


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
            if not hasattr(data, "files"):
                raise DataError(f"eval data {path} is a single array, not an .npz with x (and y)",
                                hint="save it with numpy.savez(path, x=inputs, y=labels)")
            if "x" not in data.files:
                raise DataError(f"eval data {path} has no array 'x' (found: {', '.join(data.files) or 'nothing'})",
                                hint="save it with numpy.savez(path, x=inputs, y=labels)")
            return {"samples": int(data["x"].shape[0]), "has_labels": "y" in data.files}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read eval data {path} as .npz: {exc}") from None


def check_options(options: DeployOptions) -> None:
    """One-line errors for options that cannot be right, before anything connects."""
    rd = options.remote_dir
    if not isinstance(rd, str) or not rd.strip():
        raise UsageError("--remote-dir is empty", hint=f"give a directory on the device (default {DEFAULT_REMOTE_DIR})")
    if any(ord(c) < 32 or ord(c) == 127 for c in rd) or rd.startswith("-"):
        raise UsageError(f"--remote-dir {rd!r} cannot be a directory")
    if options.keep is not None and options.keep < 0:
        raise UsageError(f"--keep {options.keep}: must be 0 or more")
    if options.layers < 0 or options.layers > 1000:
        raise UsageError(f"--layers {options.layers}: must be from 1 to 1000 inputs")
    if options.layers and not options.eval_data:
        raise UsageError("--layers needs --eval DATA.npz (the inputs it runs)")
    for name in ("probe_timeout", "upload_timeout", "run_timeout", "cleanup_timeout", "lock_stale_s"):
        v = getattr(options, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise UsageError(f"{name}={v!r}: must be a positive number of seconds")


def _upload(dev: DeviceClient, items: list[tuple[str, Path, str, str]], remote_dir: str, options: DeployOptions,
            progress: Optional[ProgressCallback], disk_free: Optional[int]) -> dict[tuple[str, str], int]:
    """Upload ``(kind, local, rel, sha)`` items to temp names, verify on the device, rename into place."""
    tr = dev.tr
    sent: dict[tuple[str, str], int] = {}
    staged: list[tuple[str, str, str]] = []
    total = sum(local.stat().st_size for _, local, _, _ in items)
    done_before = 0
    deadline = time.monotonic() + options.upload_timeout
    try:
        for kind, local, rel, sha in items:
            final = f"{remote_dir}/{rel}"
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
        dev.install(staged, max(5.0, deadline - time.monotonic()))
    except BaseException as exc:
        # Over a lost link removal would only wait; the next deploy sweeps temp files.
        if not isinstance(exc, ConnectError):
            for tmp, _final, _sha in staged:
                tr.remove(tmp)
        raise
    return sent


def _run_args(options: DeployOptions, model: str, eval_path: Optional[str], lock: Optional[DeviceLock],
              eval_only: bool = False) -> list[str]:
    argv = ["--model", model, "--runs", str(options.runs), "--warmup", str(options.warmup),
            "--min-seconds", repr(float(options.min_seconds)),
            "--min-warmup-seconds", repr(float(options.min_warmup_seconds)),
            "--max-runs", str(options.max_runs), "--max-outputs", str(MAX_OUTPUT_VALUES)]
    if eval_path:
        argv += ["--eval", eval_path, "--max-eval-seconds", repr(float(options.eval_cap()))]
    if options.threads:
        argv += ["--threads", str(options.threads)]
    if not options.xnnpack:
        argv.append("--no-xnnpack")
    if eval_only:
        argv.append("--eval-only")
    if lock is not None:
        argv += ["--dir", lock.remote_dir, "--token", lock.token]  # the run refreshes the lock's heartbeat
    return argv


def _agreement(device_eval: dict[str, Any], host_doc: dict[str, Any], out_scale: float) -> dict[str, Any]:
    import numpy as np

    host_eval = host_doc.get("eval") or {}
    base = {"reference_runtime": host_doc.get("runtime", {}).get("name"),
            "reference_version": host_doc.get("runtime", {}).get("version"),
            "host_accuracy": host_eval.get("accuracy"), "host_mae": host_eval.get("mae")}
    try:
        dev = decode_encoded(device_eval["outputs"], "the device outputs") if device_eval.get("outputs") else None
        ref = decode_encoded(host_eval["outputs"], "the host outputs") if host_eval.get("outputs") else None
    except DeviceProtocolError as exc:
        return {**base, "top1": None, "max_abs_diff": None, "mean_abs_diff": None, "samples": 0, "error": str(exc)}
    if dev is None or ref is None or dev.shape != ref.shape or dev.ndim < 1:
        return {**base, "top1": None, "max_abs_diff": None, "mean_abs_diff": None, "samples": 0,
                "error": "device and host outputs differ in shape"}
    d = dev.reshape(len(dev), -1).astype(np.float64)
    r = ref.reshape(len(ref), -1).astype(np.float64)
    diff = np.abs(d - r)
    top1 = float(np.mean(np.argmax(d, axis=1) == np.argmax(r, axis=1))) if d.shape[1] > 1 and len(d) else None
    max_abs = float(diff.max()) if diff.size else 0.0
    if not math.isfinite(max_abs):
        return {**base, "top1": top1, "max_abs_diff": None, "mean_abs_diff": None, "samples": int(len(d)),
                "error": "the outputs hold non-finite values"}
    return {**base, "top1": top1, "max_abs_diff": max_abs,
            "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "max_abs_diff_steps": round(max_abs / out_scale, 3) if out_scale else None,
            "samples": int(len(d))}


def host_reference(model_path: Path, eval_path: Path, timeout: float = 600.0) -> dict[str, Any]:
    """Run the model on the host's LiteRT in a child process (a crash there is a result, not ours)."""
    dev = DeviceClient(LocalTransport(), sys.executable)
    args = ["--model", str(model_path), "--eval", str(eval_path), "--eval-only", "--runtime", HOST_RUNTIME,
            "--max-outputs", str(MAX_OUTPUT_VALUES)]
    return dev.run(args, timeout, f"{model_path.name} (host reference)", max_samples=0)


class _Reference:
    """One host reference computation; every waiter shares its result or its failure."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Optional[dict[str, Any]] = None
        self.error: Optional[DeviceError] = None
        self.created = time.monotonic()


_REFERENCES: dict[tuple[str, str], _Reference] = {}
_REFERENCES_LOCK = threading.Lock()
_FAILURE_TTL_S = 300.0


def _cached_reference(model: Path, model_sha: str, eval_path: Path, eval_sha: str, timeout: float) -> dict[str, Any]:
    """A fleet deploys one model with one eval set to many hosts: compute the host reference once.

    The first caller computes it (bounded by ``timeout``) while the others wait,
    each at most its own ``timeout``; a failure is cached like a result, so a
    reference that hangs or crashes costs one timeout, not one per host.
    """
    key = (model_sha, eval_sha)
    with _REFERENCES_LOCK:
        entry = _REFERENCES.get(key)
        # A failure is shared by the deploys running now (one fleet), not by every later deploy of this process.
        if entry is not None and entry.done.is_set() and entry.error is not None \
                and time.monotonic() - entry.created > _FAILURE_TTL_S:
            entry = None
        owner = entry is None
        if owner:
            entry = _REFERENCES[key] = _Reference()
            while len(_REFERENCES) > 16:
                _REFERENCES.pop(next(iter(_REFERENCES)))
    if owner:
        try:
            entry.value = host_reference(model, eval_path, timeout)
        except DeviceError as exc:
            entry.error = exc
        except Exception as exc:  # a bug here must not hang the waiters
            entry.error = DeviceError(f"the host reference failed: {exc!r}")
        finally:
            entry.done.set()
    elif not entry.done.wait(timeout):
        raise DeviceError(f"the host reference for {model.name} took longer than {timeout:g} s")
    if entry.error is not None or entry.value is None:
        raise entry.error or DeviceError(f"the host reference for {model.name} gave no result")
    return entry.value


# ------------------------------------------------------------------ device lock
# Kept for callers of the previous API (edgeq.rollout); the lock lives in edgeq.device.


def acquire_lock(tr: Transport, python: str, remote_dir: str, options: DeployOptions,
                 model_sha: str = "") -> DeviceLock:
    """Take ``REMOTE_DIR/lock`` on the device, or raise ``DeviceBusy`` naming the holder."""
    return DeviceClient(tr, python).acquire(remote_dir, options.probe_timeout, options.lock_stale_s,
                                            options.session_deadline(), model_sha)


def release_lock(tr: Transport, python: str, lock: DeviceLock, timeout: float) -> bool:
    """Best-effort unlock (bounded by ``timeout``); False if the device could not be told."""
    return DeviceClient(tr, python).release(lock, timeout)


def _activate(dev: DeviceClient, lock: DeviceLock, sha: str, options: DeployOptions,
              before: dict[str, Any]) -> dict[str, Any]:
    """Activate ``sha``; after any failure, read back what is active and say it (a switch is never hidden)."""
    try:
        doc = dev.activate(lock, sha, options.probe_timeout, options.keep)
    except ConnectError:
        raise
    except DeviceError as exc:
        try:
            now = dev.state(lock.remote_dir, min(options.probe_timeout, 30.0))
        except DeviceError as exc2:
            raise ActivationUnknown(
                f"activating {sha[:12]} on {dev.host} failed ({exc}) and the active model could not be read "
                f"back ({exc2}); it may or may not be active", hint="check with `edgeq deploy --no-activate` or "
                "`edgeq rollback`", host=dev.host) from None
        if now.get("current") == sha and before.get("current") != sha:
            raise ActivationUnknown(
                f"activating {sha[:12]} on {dev.host} reported an error ({exc}), but the device now runs it: "
                f"current is {sha[:12]}, previous {str(now.get('previous') or '-')[:12]}",
                hint="`edgeq rollback` switches back", host=dev.host, active=now) from None
        raise DeviceError(f"activating {sha[:12]} on {dev.host} failed: {exc.message}; the active model is "
                          f"unchanged ({str(now.get('current') or 'none')[:12]})", hint=exc.hint,
                          host=dev.host) from None
    act = {"activated": True, "switched": doc["switched"], "active": doc["active"], "previous": doc["previous"],
           "path": f"{lock.remote_dir}/current/model.tflite"}
    if options.keep is not None:
        act["pruned"] = doc.get("pruned") or []
    return act


class ActivationUnknown(DeviceError):
    """Activation failed or could not be confirmed; ``active`` is what the device reports now (if read)."""

    def __init__(self, message: str, hint: Optional[str] = None, host: Optional[str] = None,
                 active: Optional[dict[str, Any]] = None) -> None:
        super().__init__(message, hint, host)
        self.active = active


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
    check_options(options)
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

    # (kind, local, sha, rel): one entry per distinct file. The runner is never
    # uploaded: every call sends it on stdin.
    files: list[tuple[str, Path, str, str]] = []
    for model, sha in zip(models, shas):
        if sha not in {f[2] for f in files}:
            files.append(("model", model, sha, f"models/{sha}/model.tflite"))
    if eval_path and eval_sha:
        files.append(("eval", eval_path, eval_sha, f"data/{eval_sha}/eval.npz"))
    rel_of = {(k, sha): rel for k, _l, sha, rel in files}
    eval_rel = rel_of[("eval", eval_sha)] if eval_path else None

    host = transport.host
    report(progress, "connect", f"connecting to {host}", host=host)
    t0 = time.monotonic()
    run_docs: list[dict[str, Any]] = []
    activation: Optional[dict[str, Any]] = None
    with transport as tr:
        dev = DeviceClient(tr, python)
        report(progress, "probe", f"probing {host}", host=host)
        facts = dev.probe(options.remote_dir, [(rel, sha) for _k, _l, sha, rel in files], options.probe_timeout)
        remote_dir = facts["remote_dir"]
        before = facts.get("activation") or {}
        report(progress, "lock", f"locking {remote_dir}", host=host)
        with dev.locked(remote_dir, options.probe_timeout, options.lock_stale_s, options.session_deadline(len(models)),
                        options.cleanup_timeout, shas[0]) as lock:
            if lock.broke_stale:
                owner = lock.broke_stale
                warnings.append(f"broke a stale device lock ({str(owner.get('reason'))[:80]}; held by "
                                f"{str(owner.get('user', '?'))[:64]} on {str(owner.get('controller', '?'))[:128]}, "
                                f"pid {str(owner.get('pid', '?'))[:16]}, {str(owner.get('age_s', '?'))[:16]} s old)")
            # A file already there counts only if its sha256 matches: a corrupt copy is re-sent.
            missing = [(kind, local, rel, sha) for kind, local, sha, rel in files
                       if facts["have"].get(rel) != sha]
            disk = facts.get("disk") or {}
            sent_files = _upload(dev, missing, remote_dir, options, progress, disk.get("free_bytes")) \
                if missing else {}
            upload_s = time.monotonic() - t0
            for model, sha in zip(models, shas):
                report(progress, "measure", f"running {model.name} on {host}", host=host)
                run_docs.append(dev.run(
                    _run_args(options, f"{remote_dir}/{rel_of[('model', sha)]}",
                              f"{remote_dir}/{eval_rel}" if eval_rel else None, lock),
                    options.run_timeout, model.name, max_samples=max(options.max_runs, options.runs)))
            if eval_path and any("eval" not in d for d in run_docs):
                raise DeviceProtocolError(f"the runner on {host} returned no evaluation although eval data were "
                                          "given", host=host)
            layer_diffs: dict[str, Optional[dict[str, Any]]] = {}
            if options.layers and eval_path and eval_rel:
                for model, sha in zip(models, shas):
                    if sha not in layer_diffs:
                        report(progress, "layers", f"intermediate tensors of {model.name} on {host}", host=host)
                        layer_diffs[sha] = _layer_diff(dev, model, f"{remote_dir}/{rel_of[('model', sha)]}",
                                                       eval_path, f"{remote_dir}/{eval_rel}", options, warnings)
            if activate:
                report(progress, "activate", f"activating {shas[0][:12]} on {host}", host=host)
                activation = _activate(dev, lock, shas[0], options, before)

    results = []
    for i, (model, sha, run_doc) in enumerate(zip(models, shas, run_docs)):
        act = activation or {"activated": False, "switched": False, "active": before.get("current"),
                             "previous": before.get("previous"), "path": f"{remote_dir}/current/model.tflite"}
        # Bytes sent belong to the first model that needed them.
        first = shas.index(sha) == i
        sent = {"model": sent_files.get(("model", sha), 0) if first else 0}
        if i == 0:
            sent["eval"] = sent_files.get(("eval", eval_sha), 0) if eval_path and eval_sha else 0
            sent["runner"] = 0
        res = _result(model, sha, run_doc, facts, options, python, remote_dir, rel_of[("model", sha)],
                      eval_path, eval_sha, sent, upload_s, lock, transport, started_at, started,
                      list(warnings), act, progress)
        results.append(replace(res, layer_diff=layer_diffs.get(sha)) if layer_diffs else res)
    return results


def _layer_diff(dev: DeviceClient, model: Path, remote_model: str, eval_path: Path, remote_eval: str,
                options: DeployOptions, warnings: list[str]) -> Optional[dict[str, Any]]:
    """The first intermediate tensor where the device differs from the host (a finding, not a failure)."""
    from edgeq.layerdiff import compare, host_layers, layers_args, op_outputs

    try:
        host_doc = host_layers(model, eval_path, options.layers, options.reference_cap())
        wanted = op_outputs(host_doc)
        args = layers_args(remote_model, remote_eval, options.layers)
        if wanted:
            args += ["--tensors", ",".join(str(t) for t in wanted)]
        device_doc = dev.layers(args, options.run_timeout, f"the layer run of {model.name}")
        return compare(device_doc, host_doc).to_dict()
    except ConnectError:
        raise
    except DeviceError as exc:
        warnings.append(f"no layer diff: {exc}")
        return {"error": str(exc)}


def _result(model: Path, model_sha: str, run_doc: dict[str, Any], facts: dict[str, Any], options: DeployOptions,
            python: str, remote_dir: str, model_rel: str, eval_path: Optional[Path], eval_sha: Optional[str],
            sent: dict[str, int], upload_s: float, lock: DeviceLock, transport: Transport, started_at: str,
            started: float, warnings: list[str], activation: dict[str, Any],
            progress: Optional[ProgressCallback]) -> DeployResult:
    host = transport.host
    device_eval = run_doc.get("eval")
    agreement = None
    if eval_path and eval_sha and options.reference and device_eval:
        report(progress, "reference", "host reference outputs (LiteRT)", host=host)
        try:
            ref = _cached_reference(model, model_sha, eval_path, eval_sha, options.reference_cap())
            out_scale = run_doc["outputs"][0]["quantization"][0]
            agreement = _agreement(device_eval, ref, out_scale)
        except DeviceError as exc:
            warnings.append(f"no host reference: {exc}")
            agreement = {"error": str(exc), "top1": None, "max_abs_diff": None}

    evaluation = None
    if device_eval:
        evaluation = {k: v for k, v in device_eval.items() if k != "outputs"}
        evaluation.update({"data": str(eval_path), "sha256": eval_sha} if eval_path else {})
    device = {k: v for k, v in facts.items() if k not in ("ok", "mode", "have", "runner_version", "activation")}
    runtime = dict(run_doc["runtime"])
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
        latency_ms=LatencyStats.from_samples(run_doc["samples_ms"]),
        load_ms=float(run_doc["load_ms"]),
        first_inference_ms=float(run_doc["first_inference_ms"]),
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
    check_options(options)
    if transport is None:
        transport = make_transport(options.host, options.ssh)
    host = transport.host
    report(progress, "connect", f"connecting to {host}", host=host)
    with transport as tr:
        dev = DeviceClient(tr, options.device_python())
        report(progress, "lock", f"locking {options.remote_dir}", host=host)
        with dev.locked(options.remote_dir, options.probe_timeout, options.lock_stale_s,
                        options.probe_timeout * 3, options.cleanup_timeout) as lock:
            report(progress, "rollback", f"rolling back on {host}", host=host)
            try:
                doc = dev.rollback(lock, options.probe_timeout)
            except ConnectError:
                raise
            except DeviceError as exc:
                try:
                    now = dev.state(lock.remote_dir, min(options.probe_timeout, 30.0))
                    where = (f"the device now reports current = {str(now.get('current') or 'none')[:12]}, "
                             f"previous = {str(now.get('previous') or 'none')[:12]}")
                except DeviceError as exc2:
                    where = f"the active model could not be read back ({exc2.message})"
                raise DeviceError(f"{exc.message}; {where}", hint=exc.hint, host=host) from None
    return RollbackResult(host, lock.remote_dir, doc.get("active"), doc.get("previous"),
                          (doc.get("before") or {}).get("current"))


__all__ = ["DEFAULT_REMOTE_DIR", "ActivationUnknown", "DeployOptions", "DeployResult", "DeviceLock", "LatencyStats",
           "RollbackResult", "SSHOptions", "acquire_lock", "check_options", "deploy", "host_reference",
           "measure_models", "release_lock", "rollback", "runner_source"]
