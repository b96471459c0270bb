"""Deploy options and the checks made before anything connects: the model, the eval data, the phase
timeouts, the disk space the probe saw, and the runner's arguments for a run."""

from __future__ import annotations

import hashlib
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from edgeq._device import protocol
from edgeq.device import DeviceLock
from edgeq.errors import DataError, DeviceBusy, DeviceError, InputError, ModelError, UsageError
from edgeq.transport import SSHOptions


DEFAULT_REMOTE_DIR = "~/.edgeq"


# The phase deadlines a user may set, and the option that sets each.
TIMEOUT_FLAGS = {"probe_timeout": "--probe-timeout", "upload_timeout": "--upload-timeout",
                 "run_timeout": "--run-timeout"}


MAX_TIMEOUT_S = 86400.0


# Eval outputs sent back at most (float32 values): well inside what the transport keeps of stdout.
MAX_OUTPUT_VALUES = 100_000


# Eval data edgeq loads at most (bytes their arrays declare); the runner refuses more too (NPZ_MAX_BYTES there,
# and at most half the device's available memory).
EVAL_MAX_BYTES = 1 << 30


_RUN = protocol.RUN_DEFAULTS


@dataclass(frozen=True)
class DeployOptions:
    """Where and how to deploy; timeouts are per phase, in seconds."""

    host: Optional[str] = None  # None or "local": this machine is the device
    python: Optional[str] = None  # device interpreter; "python3" over SSH, sys.executable locally
    remote_dir: str = DEFAULT_REMOTE_DIR
    eval_data: Optional[str] = None
    runs: int = _RUN["runs"]
    warmup: int = _RUN["warmup"]
    threads: Optional[int] = None
    xnnpack: bool = True
    min_seconds: float = _RUN["min_seconds"]
    min_warmup_seconds: float = _RUN["min_warmup_seconds"]
    max_runs: int = _RUN["max_runs"]
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
    # A single host's health gate, judged on the measured run before activation (protocol.gate_verdict): a
    # model that fails it is not activated. A staged rollout has its own (RolloutOptions).
    gate_accuracy: Optional[float] = None  # minimum on-device accuracy on the eval data, 0..1
    gate_p99_ms: Optional[float] = None  # maximum p99 latency of the timed runs, ms

    @property
    def gated(self) -> bool:
        return self.gate_accuracy is not None or self.gate_p99_ms is not None

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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_model(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"model file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise ModelError(f"{path} is not a .tflite file (no TFL3 identifier)",
                         hint="convert the model first with `edgeq convert`")


def check_eval(path: Path) -> dict[str, Any]:
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
    inputs = {k: a for k, a in arrays.items() if not is_label(k)}
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
    return {"samples": counts.pop(), "has_labels": any(is_label(k) for k in arrays),
            "inputs": {k: list(a.shape[1:]) for k, a in inputs.items()}}


def is_label(key: str) -> bool:
    return key == "y" or key.startswith("y_")


def eval_labels(path: Path) -> tuple[Any, dict[str, Any]]:
    """The labels in eval data: shared ``y`` and per-output ``y_<output name>`` (an .npy has none)."""
    import zipfile

    import numpy as np

    if not zipfile.is_zipfile(path):
        return None, {}
    with np.load(path, allow_pickle=False) as loaded:
        y = loaded["y"] if "y" in loaded.files else None
        return y, {k[2:]: loaded[k] for k in loaded.files if k.startswith("y_")}


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    try:
        name, shape = protocol.parse_shape(text)
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a shape", hint="write it as 1x32x32x3, or NAME=1x32x32x3 "
                         "for one input of several") from None
    return name, tuple(shape)


def check_inputs(model: Path, options: DeployOptions) -> None:
    """A model with a dynamic input (-1 beyond the batch axis) needs a shape: eval data or --input-shape."""
    from edgeq.tflite_file import read_tflite

    try:
        inputs = read_tflite(model).inputs
    except ModelError:
        return  # the runner says what is wrong with the file
    named = {n for n, _ in map(parse_input_shape, options.input_shapes)}
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
        parse_input_shape(text)
    if options.input_shapes and options.eval_data:
        raise UsageError("--input-shape with --eval: the eval data set the input shape",
                         hint="drop --input-shape (or --eval)")
    problems = protocol.gate_problems(options.gate_accuracy, options.gate_p99_ms, bool(options.eval_data))
    if problems:
        raise UsageError("; ".join(problems))
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


def run_args(options: DeployOptions, model: str, eval_path: Optional[str], lock: Optional[DeviceLock],
             timed: bool = True, max_outputs: int = MAX_OUTPUT_VALUES) -> list[str]:
    """The runner's ``run`` arguments for ``options`` (protocol.run_args); under ``lock`` the run refreshes
    the lock's heartbeat."""
    return protocol.run_args(
        model, timed=timed, runs=options.runs, warmup=options.warmup, min_seconds=options.min_seconds,
        min_warmup_seconds=options.min_warmup_seconds, max_runs=options.max_runs, eval_path=eval_path,
        max_eval_seconds=options.eval_cap() if eval_path else None, input_shapes=options.input_shapes,
        threads=options.threads, xnnpack=options.xnnpack, max_outputs=max_outputs,
        lock_dir=lock.remote_dir if lock is not None else None, token=lock.token if lock is not None else None)
