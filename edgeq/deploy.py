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
import shlex
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from edgeq import __version__
from edgeq.device import DeviceClient, DeviceLock, decode_encoded, runner_source
from edgeq.errors import (ConnectError, DataError, DeviceBusy, DeviceError, DeviceProtocolError, InputError, ModelError,
                          UsageError)
from edgeq.escape import one_line
from edgeq.progress import ProgressCallback, report
from edgeq.transport import LocalTransport, SSHOptions, Transport, make_transport

DEFAULT_REMOTE_DIR = "~/.edgeq"
# The phase deadlines a user may set, and the option that sets each.
TIMEOUT_FLAGS = {"probe_timeout": "--probe-timeout", "upload_timeout": "--upload-timeout",
                 "run_timeout": "--run-timeout"}
MAX_TIMEOUT_S = 86400.0
# The host's runtime for reference outputs (a dependency of edgeq).
HOST_RUNTIME = "ai_edge_litert"
# Eval outputs sent back at most (float32 values): well inside what the transport keeps of stdout.
MAX_OUTPUT_VALUES = 100_000
# Eval data edgeq loads at most (bytes their arrays declare); the runner refuses more too (NPZ_MAX_BYTES there,
# and at most half the device's available memory).
EVAL_MAX_BYTES = 1 << 30


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
    input_shapes: tuple[str, ...] = ()  # "1x32x32x3" or "NAME=1x32x32x3": dynamic inputs' shapes without eval data

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
    # What the delegate really took on the device: requested, applied (None: the runtime does not say),
    # delegated_nodes of nodes, partitions.
    delegate: Optional[dict[str, Any]] = None

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
            "delegate": dict(self.delegate) if self.delegate is not None else None,
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
    """Eval data: an .npz with one array per model input (or ``x``) and optional labels ``y`` / ``y_<output>``,
    or an .npy for a single-input model; sizes checked from the headers before anything is loaded."""
    import numpy as np

    if not path.is_file():
        raise InputError(f"eval data {path} does not exist")
    from edgeq.calibration import check_numpy_sizes

    hint = "save it with numpy.savez(path, x=inputs, y=labels), one array per input name for several inputs"
    check_numpy_sizes(path, "evaluation", limit=EVAL_MAX_BYTES)  # from the headers, before numpy allocates
    try:
        loaded = np.load(path, allow_pickle=False)
        if hasattr(loaded, "files"):
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
        else:
            arrays = {"x": np.asarray(loaded)}
    except Exception as exc:
        raise DataError(f"cannot read eval data {path} as .npz or .npy: {exc}", hint=hint) from None
    inputs = {k: a for k, a in arrays.items() if not _is_label(k)}
    if not inputs:
        raise DataError(f"eval data {path} hold no input arrays (found: {', '.join(arrays) or 'nothing'})", hint=hint)
    counts = set()
    for k, a in arrays.items():
        if a.ndim < 1 or a.dtype.kind not in "biuf":
            raise DataError(f"eval array {k!r} in {path} is not a numeric array with samples on the first axis",
                            hint=hint)
        if k in inputs:
            counts.add(int(a.shape[0]))
    if len(counts) != 1 or not min(counts):
        raise DataError(f"eval data {path}: the input arrays hold {' and '.join(map(str, sorted(counts)))} samples",
                        hint="give every input the same number of samples (first axis)")
    return {"samples": counts.pop(), "has_labels": any(_is_label(k) for k in arrays),
            "inputs": {k: list(a.shape[1:]) for k, a in inputs.items()}}


def _is_label(key: str) -> bool:
    return key == "y" or key.startswith("y_")


def _eval_labels(path: Path) -> tuple[Any, dict[str, Any]]:
    """The labels in eval data: shared ``y`` and per-output ``y_<output name>`` (an .npy has none)."""
    import zipfile

    import numpy as np

    if not zipfile.is_zipfile(path):
        return None, {}
    with np.load(path, allow_pickle=False) as loaded:
        y = loaded["y"] if "y" in loaded.files else None
        return y, {k[2:]: loaded[k] for k in loaded.files if k.startswith("y_")}


def _parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 or d > 1 << 20 for d in shape) or any(ord(c) < 32 for c in text):
        raise UsageError(f"--input-shape {text!r} is not a shape", hint="write it as 1x32x32x3, or NAME=1x32x32x3 "
                         "for one input of several")
    return name, shape


def _check_inputs(model: Path, options: DeployOptions) -> None:
    """A model with a dynamic input (-1 beyond the batch axis) needs a shape: eval data or --input-shape."""
    from edgeq.tflite_file import read_tflite

    try:
        inputs = read_tflite(model).inputs
    except ModelError:
        return  # the runner says what is wrong with the file
    named = {n for n, _ in map(_parse_input_shape, options.input_shapes)}
    for t in inputs:
        if any(d < 0 for d in t.shape_signature[1:]) and not options.eval_data:
            short = t.name.split(":")[0].removeprefix("serving_default_")
            if not ("" in named and len(inputs) == 1) and short not in named and t.name not in named:
                example = "x".join(str(d if d > 0 else 32) for d in (1, *t.shape_signature[1:]))
                raise UsageError(f"{model.name}: input {short!r} has a dynamic shape "
                                 f"{list(t.shape_signature)}; the device needs one to run it",
                                 hint=f"give --eval DATA.npz (its samples set the shape) or --input-shape {example}")


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
    for text in options.input_shapes:
        _parse_input_shape(text)
    if options.input_shapes and options.eval_data:
        raise UsageError("--input-shape with --eval: the eval data set the input shape",
                         hint="drop --input-shape (or --eval)")
    for name in TIMEOUT_FLAGS:
        check_timeout(getattr(options, name), TIMEOUT_FLAGS[name])
    for name in ("cleanup_timeout", "lock_stale_s"):
        v = getattr(options, name)
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise UsageError(f"{name}={v!r}: must be a positive number of seconds")


def check_timeout(value: Any, label: str) -> None:
    """A phase timeout: a positive number of seconds, at most a day (``label`` names where it came from)."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UsageError(f"{label} {value!r}: must be a positive number of seconds")
    if value > MAX_TIMEOUT_S:
        raise UsageError(f"{label} {value!r}: must be at most {MAX_TIMEOUT_S:g} s (a day)")


@contextmanager
def timeout_hint(options: DeployOptions, name: str) -> Iterator[None]:
    """Name the option to raise when a device step fails because it ran out of its ``name`` seconds.

    A step that fails once its time is (nearly) used up timed out: the
    transport's deadline, or the runner's own, set a little earlier.
    """
    seconds = getattr(options, name)
    start = time.monotonic()
    try:
        yield
    except DeviceError as exc:
        if not isinstance(exc, DeviceBusy) and time.monotonic() - start >= 0.85 * seconds:
            exc.hint = (f"it ran out of its {seconds:g} s: raise it with {TIMEOUT_FLAGS[name]} (or the inventory "
                        f"variable edgeq_{name}), or check the device (load, a hung runtime)")
        raise


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


def check_disk_space(facts: dict[str, Any], files: Sequence[tuple[Path, str, str]], host: str) -> None:
    """Refuse, before anything is sent, an upload larger than the free space the probe saw under REMOTE_DIR.

    ``files`` are ``(local, rel, sha256)``; those already on the device with the
    right sha256 need no space. Without a free-space figure nothing is refused.
    """
    disk = facts.get("disk") or {}
    free = disk.get("free_bytes")
    if free is None:
        return
    needed = sum(local.stat().st_size for local, rel, sha in files if (facts.get("have") or {}).get(rel) != sha)
    if needed > free:
        raise DeviceError(f"not enough space on {host} for the upload: {needed} bytes needed, {free} bytes free "
                          f"under {facts.get('remote_dir')}",
                          hint="free space on the device, or pass --remote-dir on a filesystem with room", host=host)


def _run_args(options: DeployOptions, model: str, eval_path: Optional[str], lock: Optional[DeviceLock],
              eval_only: bool = False) -> list[str]:
    argv = ["--model", model, "--runs", str(options.runs), "--warmup", str(options.warmup),
            "--min-seconds", repr(float(options.min_seconds)),
            "--min-warmup-seconds", repr(float(options.min_warmup_seconds)),
            "--max-runs", str(options.max_runs), "--max-outputs", str(MAX_OUTPUT_VALUES)]
    if eval_path:
        argv += ["--eval", eval_path, "--max-eval-seconds", repr(float(options.eval_cap()))]
    else:
        for text in options.input_shapes:
            argv += ["--input-shape", text]
    if options.threads:
        argv += ["--threads", str(options.threads)]
    if not options.xnnpack:
        argv.append("--no-xnnpack")
    if eval_only:
        argv.append("--eval-only")
    if lock is not None:
        argv += ["--dir", lock.remote_dir, "--token", lock.token]  # the run refreshes the lock's heartbeat
    return argv


def _eval_outputs(ev: dict[str, Any], where: str) -> dict[str, Any]:
    """``{output name: values}`` (first axis = samples) from a runner's eval document."""
    out = {}
    for item in ev.get("per_output") or []:
        out[str(item["name"])] = decode_encoded(item["outputs"], f"{where} ({one_line(item['name'], 80)})")
    if not out and ev.get("outputs"):  # a runner from before per-output results
        out["output_0"] = decode_encoded(ev["outputs"], where)
    return out


def _finite(v: Optional[float]) -> Optional[float]:
    return v if v is None or math.isfinite(v) else None


def _fidelity(device_eval: dict[str, Any], host_doc: Optional[dict[str, Any]], labels: Any,
              output_labels: dict[str, Any], run_outputs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per output: its kind (``edgeq.fidelity``: classifier, segmentation, binary, regression), the device's
    figures against the labels, and how far the device is from the host reference (when there is one)."""
    from edgeq import fidelity

    dev = _eval_outputs(device_eval, "the device outputs")
    ref = _eval_outputs((host_doc or {}).get("eval") or {}, "the host outputs") if host_doc else {}
    scales = {str(o.get("name")): float(o["quantization"][0]) for o in run_outputs}
    tensors = {str(i["name"]): str(i.get("tensor")) for i in device_eval.get("per_output") or []}
    rows = {name: len(v) for name, v in dev.items()}
    sliced = {k: v[:rows[k]] for k, v in output_labels.items() if k in rows and getattr(v, "ndim", 0)}
    n = min(rows.values()) if rows else 0
    assigned = fidelity.assign_labels({k: v.shape for k, v in dev.items()},
                                      labels[:n] if labels is not None and labels.ndim else None, sliced,
                                      {k: ref.get(k, v) for k, v in dev.items()})
    figures = []
    for name, d in dev.items():
        h = ref.get(name)
        if h is not None and h.shape != d.shape:
            h = None
        source, y = assigned.get(name, (None, None))
        kind = fidelity.output_kind(d.shape, y, h if h is not None else d)
        entry: dict[str, Any] = {"name": name, "kind": kind, "shape": [int(s) for s in d.shape[1:]],
                                 "samples": int(len(d)), "labels": source}
        if h is not None:
            c = fidelity.compare(h.astype("float64"), d.astype("float64"), y, kind)
            scale = scales.get(tensors.get(name, ""), 0.0)
            entry.update(accuracy=c.accuracy_candidate, label_mae=c.label_mae_candidate,
                         host_accuracy=c.accuracy_reference, host_label_mae=c.label_mae_reference,
                         agreement=c.agreement, max_abs_diff=_finite(c.max_abs_error),
                         mean_abs_diff=_finite(c.mean_abs_error), sqnr_db=_finite(c.sqnr_db),
                         max_abs_diff_steps=round(c.max_abs_error / scale, 3) if scale and
                         math.isfinite(c.max_abs_error) else None)
        else:
            c = fidelity.compare(d.astype("float64"), d.astype("float64"), y, kind)
            entry.update(accuracy=c.accuracy_candidate, label_mae=c.label_mae_candidate)
        figures.append(entry)
    return figures


def _agreement(figures: list[dict[str, Any]], host_doc: dict[str, Any]) -> dict[str, Any]:
    """The device against the host reference, for the primary output (the first with class labels, else the
    first); every output's figures are in ``eval.outputs``."""
    base = {"reference_runtime": (host_doc.get("runtime") or {}).get("name"),
            "reference_version": (host_doc.get("runtime") or {}).get("version")}
    compared = [f for f in figures if "max_abs_diff" in f]
    if not compared:
        return {**base, "top1": None, "max_abs_diff": None, "mean_abs_diff": None, "samples": 0,
                "error": "device and host outputs differ in shape"}
    main = next((f for f in compared if f.get("accuracy") is not None), compared[0])
    if main.get("max_abs_diff") is None:
        return {**base, "top1": None, "max_abs_diff": None, "mean_abs_diff": None, "samples": main["samples"],
                "error": "the outputs hold non-finite values"}
    return {**base, "output": main["name"], "host_accuracy": main.get("host_accuracy"),
            "host_mae": main.get("host_label_mae"),
            "top1": main.get("agreement") if main["kind"] != "segmentation" else None,
            "pixel_agreement": main.get("agreement") if main["kind"] == "segmentation" else None,
            "max_abs_diff": main["max_abs_diff"], "mean_abs_diff": main.get("mean_abs_diff"),
            "max_abs_diff_steps": main.get("max_abs_diff_steps"), "sqnr_db": main.get("sqnr_db"),
            "samples": main["samples"]}


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


def _read_back(options: DeployOptions, python: str, remote_dir: str) -> dict[str, Any]:
    """What the device reports as active, over a new connection (bounded): the old one is gone."""
    with make_transport(options.host, options.ssh) as tr:
        return DeviceClient(tr, python).state(remote_dir, min(options.probe_timeout, 30.0))


def _release_over_new_link(options: DeployOptions, python: str, lock: DeviceLock) -> None:
    """Best effort: give back this deploy's lock over a new connection (the next deploy need not break it)."""
    try:
        with make_transport(options.host, options.ssh) as tr:
            DeviceClient(tr, python).release(lock, options.cleanup_timeout)
    except DeviceError:
        pass


def _where(now: dict[str, Any], sha: str) -> str:
    cur = now.get("current")
    text = (f"current = {str(cur or 'none')[:12]}" + (" (the new model IS active)" if cur == sha else "")
            + f", previous = {str(now.get('previous') or 'none')[:12]}")
    if now.get("foreign"):
        text += f" (current is {str(now['foreign'])[:200]})"
    return text


def _link_lost(dev: DeviceClient, lock: DeviceLock, sha: str, options: DeployOptions,
               exc: ConnectError) -> ActivationUnknown:
    """The link went down while ``activate`` ran: the switch may have happened. Reconnect, read back, say it."""
    host = dev.host
    try:
        now = _read_back(options, dev.python, lock.remote_dir)
    except DeviceError as exc2:
        return ActivationLinkDown(
            f"the link to {host} was lost while activating {sha[:12]} ({exc.message}) and the active model could "
            f"not be read back ({exc2.message}): {sha[:12]} may be active", host=host,
            hint="check with `edgeq deploy --no-activate` (it reports the active model) or `edgeq rollback`")
    _release_over_new_link(options, dev.python, lock)
    if now.get("current") == sha:
        return ActivationUnknown(
            f"the link to {host} was lost while activating {sha[:12]}; on reconnecting the device reports "
            f"{_where(now, sha)}", hint="`edgeq rollback` switches back", host=host, active=now)
    return ActivationUnknown(
        f"the link to {host} was lost while activating {sha[:12]}; on reconnecting the device reports "
        f"{_where(now, sha)}: {sha[:12]} is not active", hint="check the link and deploy again", host=host,
        active=now)


def _activate(dev: DeviceClient, lock: DeviceLock, sha: str, options: DeployOptions,
              before: dict[str, Any]) -> dict[str, Any]:
    """Activate ``sha``; after any failure, read back what is active and say it (a switch is never hidden)."""
    try:
        doc = dev.activate(lock, sha, options.probe_timeout, options.keep)
    except ConnectError as exc:
        if getattr(dev.tr, "_cancelled", False):
            raise  # a fleet gave up on this host; it reads back what is active itself
        raise _link_lost(dev, lock, sha, options, exc) from None
    except DeviceError as exc:
        try:
            now = dev.state(lock.remote_dir, min(options.probe_timeout, 30.0))
        except ConnectError as exc2:
            raise _link_lost(dev, lock, sha, options, exc2) from None
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
        unchanged = str(now.get("current") or "none")[:12]
        if now.get("foreign"):
            unchanged = f"current is {str(now['foreign'])[:200]}"
        raise DeviceError(f"{exc.message}; the active model is unchanged ({unchanged})", hint=exc.hint,
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


class ActivationLinkDown(ActivationUnknown, ConnectError):
    """The link went down while switching models and did not come back: what is active is unknown, and the
    device lock could not be given back either (so it is also a ``ConnectError``)."""


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
                   transport: Optional[Transport] = None) -> tuple[DeployResult | DeviceError, ...]:
    """Measure several models on one device without activating any of them.

    One connection, one probe, one device lock; each model (and the eval data)
    is uploaded once, content-addressed, and run in turn. One entry per model,
    in the order given: its ``DeployResult`` (``activation.activated`` is
    False), or the ``DeviceError`` it failed with. A model the device cannot
    run does not stop the others; a lost link ends the session, and the models
    not yet run carry that ``ConnectError``. A failure before any model runs
    (connect, probe, lock, upload) is raised.
    """
    paths = [Path(p) for p in model_paths]
    if not paths:
        raise UsageError("measure_models needs at least one model")
    return tuple(_session(paths, options, progress, transport, activate=False, keep_going=True))


@contextmanager
def _lock_left_note(remote_dir: str, options: DeployOptions, models: int) -> Iterator[None]:
    """Over a lost link the device lock cannot be released (a failure with the link up always releases it):
    the error then says that the device stays locked, until when, and how to clear it."""
    try:
        yield
    except ConnectError as exc:
        # Another deploy judges the lock stale after its own lock_stale_s or this session's deadline (the
        # lock's ttl), whichever is longer, counted from the last heartbeat, which was no later than now.
        stale = max(options.lock_stale_s, options.session_deadline(models))
        until = datetime.now(timezone.utc) + timedelta(seconds=stale)
        lock_dir = shlex.quote(f"{remote_dir}/lock")
        exc.message += (f"; the device stays locked ({remote_dir}/lock) until {until:%Y-%m-%d %H:%M} UTC at the "
                        f"latest ({stale:.0f} s after its last heartbeat, when other deploys treat it as stale; a new "
                        f"deploy from this machine takes it over without waiting); to clear it sooner, make sure no deploy is "
                        f"running and remove it on the device: rm -rf {lock_dir}")
        raise


def _session(models: list[Path], options: DeployOptions, progress: Optional[ProgressCallback],
             transport: Optional[Transport], activate: bool, keep_going: bool = False) -> list[Any]:
    """The deploy pipeline for ``models`` in one session. With ``keep_going`` a model that fails its run
    gets its ``DeviceError`` in the returned list instead of stopping the session (see ``measure_models``)."""
    started = time.monotonic()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    check_options(options)
    if transport is None:
        transport = make_transport(options.host, options.ssh)  # validates the host before anything runs
    for model in models:
        _check_model(model)
        _check_inputs(model, options)
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
    run_docs: list[Any] = []  # a run document, or (keep_going) the DeviceError that model failed with
    activation: Optional[dict[str, Any]] = None
    lost: Optional[ConnectError] = None  # the link was lost after some models ran (keep_going only)
    layer_diffs: dict[str, Optional[dict[str, Any]]] = {}
    try:
        with transport as tr:
            dev = DeviceClient(tr, python)
            report(progress, "probe", f"probing {host}", host=host)
            with timeout_hint(options, "probe_timeout"):
                facts = dev.probe(options.remote_dir, [(rel, sha) for _k, _l, sha, rel in files],
                                  options.probe_timeout)
            remote_dir = facts["remote_dir"]
            before = facts.get("activation") or {}
            check_disk_space(facts, [(local, rel, sha) for _k, local, sha, rel in files], host)
            report(progress, "lock", f"locking {remote_dir}", host=host)
            with dev.locked(remote_dir, options.probe_timeout, options.lock_stale_s,
                            options.session_deadline(len(models)), options.cleanup_timeout, shas[0]) as lock, \
                    _lock_left_note(remote_dir, options, len(models)):
                if lock.broke_stale:
                    owner = lock.broke_stale
                    warnings.append(f"broke a stale device lock ({str(owner.get('reason'))[:80]}; held by "
                                    f"{str(owner.get('user', '?'))[:64]} on {str(owner.get('controller', '?'))[:128]}"
                                    f", pid {str(owner.get('pid', '?'))[:16]}, {str(owner.get('age_s', '?'))[:16]} s "
                                    "old)")
                # A file already there counts only if its sha256 matches: a corrupt copy is re-sent.
                missing = [(kind, local, rel, sha) for kind, local, sha, rel in files
                           if facts["have"].get(rel) != sha]
                disk = facts.get("disk") or {}
                sent_files: dict[tuple[str, str], int] = {}
                if missing:
                    with timeout_hint(options, "upload_timeout"):
                        sent_files = _upload(dev, missing, remote_dir, options, progress, disk.get("free_bytes"))
                upload_s = time.monotonic() - t0
                for model, sha in zip(models, shas):
                    report(progress, "measure", f"running {model.name} on {host}", host=host)
                    try:
                        with timeout_hint(options, "run_timeout"):
                            doc = dev.run(
                                _run_args(options, f"{remote_dir}/{rel_of[('model', sha)]}",
                                          f"{remote_dir}/{eval_rel}" if eval_rel else None, lock),
                                options.run_timeout, model.name, max_samples=max(options.max_runs, options.runs))
                        if eval_path and "eval" not in doc:
                            raise DeviceProtocolError(f"the runner on {host} returned no evaluation for {model.name} "
                                                      "although eval data were given", host=host)
                        run_docs.append(doc)
                    except ConnectError as exc:
                        if not (keep_going and run_docs):
                            raise
                        lost = exc  # the lock's context closes the link; the models run so far are kept
                        raise
                    except DeviceError as exc:
                        if not keep_going:
                            raise
                        run_docs.append(exc)
                if options.layers and eval_path and eval_rel:
                    for model, sha, doc in zip(models, shas, run_docs):
                        if sha not in layer_diffs and not isinstance(doc, DeviceError):
                            report(progress, "layers", f"intermediate tensors of {model.name} on {host}", host=host)
                            layer_diffs[sha] = _layer_diff(dev, model, f"{remote_dir}/{rel_of[('model', sha)]}",
                                                           eval_path, f"{remote_dir}/{eval_rel}", options, warnings)
                if activate:
                    report(progress, "activate", f"activating {shas[0][:12]} on {host}", host=host)
                    activation = _activate(dev, lock, shas[0], options, before)
    except ConnectError as exc:
        if exc is not lost:
            raise

    results: list[Any] = []
    for i, (model, sha, run_doc) in enumerate(zip(models, shas, run_docs)):
        if isinstance(run_doc, DeviceError):
            results.append(run_doc)
            continue
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
    if lost is not None:
        results += [lost] * (len(models) - len(results))
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
        with timeout_hint(options, "run_timeout"):
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
    ref = None
    if eval_path and eval_sha and options.reference and device_eval:
        report(progress, "reference", "host reference outputs (LiteRT)", host=host)
        try:
            ref = _cached_reference(model, model_sha, eval_path, eval_sha, options.reference_cap())
        except DeviceError as exc:
            warnings.append(f"no host reference: {exc}")
            agreement = {"error": str(exc), "top1": None, "max_abs_diff": None}

    evaluation = None
    accuracy = mae = None
    if device_eval:
        # One rule for every output (edgeq.fidelity), applied here on the host to what the device returned.
        evaluation = {k: v for k, v in device_eval.items()
                      if k not in ("outputs", "per_output", "accuracy", "mae", "task")}
        evaluation.update({"data": str(eval_path), "sha256": eval_sha} if eval_path else {})
        try:
            labels, output_labels = _eval_labels(eval_path) if eval_path else (None, {})
            figures = _fidelity(device_eval, ref, labels, output_labels, run_doc.get("outputs") or [])
        except (DeviceProtocolError, ValueError, TypeError) as exc:  # outputs or labels that do not fit
            figures = []
            warnings.append(f"no per-output figures: {one_line(exc, 300)}")
            agreement = {"error": one_line(exc, 300), "top1": None, "max_abs_diff": None}
        evaluation["outputs"] = figures
        if ref is not None and agreement is None:
            agreement = _agreement(figures, ref)
        accuracy = next((f["accuracy"] for f in figures if f.get("accuracy") is not None), None)
        mae = next((f["label_mae"] for f in figures if f.get("label_mae") is not None), None)
        if not figures:  # a runner without per-output results
            accuracy, mae = device_eval.get("accuracy"), device_eval.get("mae")
        rows = device_eval.get("rows")
        if isinstance(rows, int) and rows < device_eval["samples"]:
            warnings.append(f"output figures are on the first {rows} of {device_eval['samples']} eval samples "
                            f"(edgeq brings back at most {MAX_OUTPUT_VALUES} output values)")
    device = {k: v for k, v in facts.items() if k not in ("ok", "mode", "have", "runner_version", "activation")}
    runtime = dict(run_doc["runtime"])
    runtime["threads"] = options.threads
    settings = {"runs": options.runs, "warmup": options.warmup, "min_seconds": options.min_seconds,
                "max_runs": options.max_runs, "warmup_runs_done": run_doc.get("warmup_runs"),
                "python": python, "remote_dir": remote_dir, "inputs": run_doc.get("inputs"),
                "outputs": run_doc.get("outputs"), "resized": run_doc.get("resized") or None}
    delegate = run_doc.get("delegate")
    if delegate is not None:
        delegate = dict(delegate)
    if runtime.get("xnnpack") and delegate and delegate.get("applied") is False:
        warnings.append(f"XNNPACK was requested but took none of the model's {delegate.get('nodes')} nodes on the "
                        f"device: {runtime.get('name')} {runtime.get('version') or ''} ran it on its built-in kernels"
                        " (this runtime's XNNPACK does not take these ops or types)")
    elif runtime.get("xnnpack") and (delegate or {}).get("applied") is None and runtime.get("xnnpack_active") is False:
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
        accuracy=accuracy,
        mae=mae,
        evaluation=evaluation,
        agreement=agreement,
        transfer={"model_bytes_sent": sent.get("model", 0), "eval_bytes_sent": sent.get("eval", 0),
                  "runner_bytes_sent": sent.get("runner", 0), "seconds": round(upload_s, 3),
                  "uploaded": sorted(k for k, v in sent.items() if v),
                  "connect_attempts": getattr(transport, "connect_attempts", None),
                  "stale_temp_files_removed": lock.swept,
                  # sftp, exec (over the command channel) or local; None when nothing was sent.
                  "method": getattr(transport, "transfer", None) if any(sent.values()) else None},
        settings=settings,
        started_at=started_at,
        duration_s=time.monotonic() - started,
        warnings=tuple(warnings),
        activation=activation,
        delegate=delegate,
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
            except ConnectError as exc:
                if getattr(tr, "_cancelled", False):
                    raise  # a fleet gave up on this host; it reads back what is active itself
                try:
                    now = _read_back(options, dev.python, lock.remote_dir)
                except DeviceError as exc2:
                    raise ActivationLinkDown(
                        f"the link to {host} was lost while rolling back ({exc.message}) and the active model "
                        f"could not be read back ({exc2.message}): the rollback may have happened", host=host,
                        hint="check with `edgeq deploy --no-activate` (it reports the active model)") from None
                _release_over_new_link(options, dev.python, lock)
                raise ActivationUnknown(f"the link to {host} was lost while rolling back; on reconnecting the "
                                        f"device reports {_where(now, '')}", host=host, active=now,
                                        hint="run `edgeq rollback` again if this is not the model you want") from None
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


__all__ = ["DEFAULT_REMOTE_DIR", "ActivationLinkDown", "ActivationUnknown", "DeployOptions", "DeployResult",
           "DeviceLock", "LatencyStats", "RollbackResult", "SSHOptions", "acquire_lock", "check_options", "deploy", "host_reference",
           "measure_models", "release_lock", "rollback", "runner_source"]
