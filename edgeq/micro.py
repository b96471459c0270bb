"""Measure what a model needs at run time, inside a sandboxed child process.

``tflm_arena`` and ``litert_memory`` are the child-side functions (they load the
model into an interpreter); ``measure_arena`` and ``measure_litert`` are what
the host calls: they run those through :mod:`edgeq.sandbox` and return a
:class:`Measurement`, never raising for what the model itself does.
Neither side imports TensorFlow.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

from edgeq.sandbox import ChildResult, run_in_child

# The host arena used for measuring; the recorded figure does not depend on it
# as long as the model fits (tflite-micro recording_micro_allocator).
MEASURE_ARENA_BYTES = 64 * 1024 * 1024

_TOTAL_RE = re.compile(r"Arena allocation total (\d+) bytes")
_HEAD_RE = re.compile(r"Arena allocation head (\d+) bytes")
_TAIL_RE = re.compile(r"Arena allocation tail (\d+) bytes")


@dataclass(frozen=True)
class Measurement:
    """What a child measured: ``values`` on success; otherwise how it failed."""

    ok: bool
    values: dict[str, Any] = field(default_factory=dict)
    available: bool = True  # False when the interpreter package is not installed
    crashed: bool = False
    signal: Optional[str] = None
    timed_out: bool = False
    error: str = ""
    log_tail: str = ""
    seconds: float = 0.0


def parse_allocations(text: str) -> dict[str, int]:
    """Parse ``RecordingMicroAllocator`` output into total/head/tail bytes."""
    out: dict[str, int] = {}
    for key, rx in (("total", _TOTAL_RE), ("head", _HEAD_RE), ("tail", _TAIL_RE)):
        m = rx.search(text)
        if m:
            out[key] = int(m.group(1))
    return out


class _CaptureStderr:
    """Send C-level stderr (fd 2) to a temporary file while active; ``text`` holds it after."""

    def __enter__(self) -> "_CaptureStderr":
        self._tmp = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode("utf-8", "replace")
        self._tmp.close()
        if exc[0] is not None:
            # Let the parent see what the runtime printed before the failure.
            os.write(2, self.text[-4000:].encode())


def tflm_arena(model_path: str, arena_size: int = MEASURE_ARENA_BYTES, invoke: bool = True) -> dict[str, Any]:
    """Child side: load the model in TFLite Micro and read the recording allocator's figures."""
    import numpy as np
    from tflite_micro.python.tflite_micro import runtime

    with _CaptureStderr() as cap:
        interp = runtime.Interpreter.from_file(model_path, arena_size=arena_size)
        os.write(2, b"\n")
        interp.print_allocations()
    alloc = parse_allocations(cap.text)
    if "total" not in alloc:
        raise RuntimeError("TFLite Micro printed no allocation record: " + cap.text.strip()[-500:])
    invoked = False
    if invoke:
        # One inference on zeros: kernels check types and shapes in Eval() too.
        with _CaptureStderr():
            for i in range(len(_details(interp))):
                d = interp.get_input_details(i)
                interp.set_input(np.zeros(d["shape"], dtype=d["dtype"]), i)
            interp.invoke()
        invoked = True
    return {"arena_bytes": alloc["total"], "head_bytes": alloc.get("head"), "tail_bytes": alloc.get("tail"),
            "invoked": invoked}


def _details(interp: Any) -> list[int]:
    n = 0
    while True:
        try:
            interp.get_input_details(n)
        except Exception:  # noqa: BLE001 - the wrapper raises on an index past the last input
            return list(range(n))
        n += 1
        if n > 64:
            return list(range(n))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def litert_memory(model_path: str, threads: int = 1, invoke: bool = True) -> dict[str, Any]:
    """Child side: resident memory the LiteRT interpreter adds for this model (after allocation and one run)."""
    import numpy as np
    import ai_edge_litert
    from ai_edge_litert.interpreter import Interpreter

    from edgeq._device.measure import delegated_nodes  # the device counts delegated nodes the same way

    before = _rss_bytes()
    with _CaptureStderr():
        interp = Interpreter(model_path=model_path, num_threads=threads)
        interp.allocate_tensors()
    allocated = _rss_bytes()
    if invoke:
        with _CaptureStderr():
            for d in interp.get_input_details():
                interp.set_tensor(d["index"], np.zeros(d["shape"], dtype=d["dtype"]))
            interp.invoke()
    after = _rss_bytes()
    return {"interpreter_bytes": max(after, allocated) - before, "allocated_bytes": allocated - before,
            "invoked": invoke, "delegation": delegated_nodes(interp._get_ops_details()),
            "runtime_version": str(getattr(ai_edge_litert, "__version__", ""))}


def litert_shapes(model_path: str, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Child side: resize the inputs (``{tensor index: shape}``) in LiteRT and read every tensor's shape after."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    with _CaptureStderr():
        # Without delegates: XNNPACK keeps the tensors inside its partitions at their old shapes (measured).
        interp = Interpreter(model_path=model_path,
                             experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        for index, shape in shapes.items():
            interp.resize_tensor_input(int(index), [int(d) for d in shape], strict=True)
        interp.allocate_tensors()
    return {"shapes": {str(int(d["index"])): [int(x) for x in d["shape"]] for d in interp.get_tensor_details()}}


def propagate_shapes(model_path: str, shapes: dict[int, tuple[int, ...]], timeout: float = 60.0) -> Measurement:
    """Every tensor's shape once the inputs take ``shapes``, as LiteRT propagates them (in a child)."""
    res = run_in_child("edgeq.micro", "litert_shapes",
                       {"model_path": str(model_path), "shapes": {str(k): list(v) for k, v in shapes.items()}},
                       timeout=timeout)
    return _from_child(res, "ai_edge_litert")


def with_tensor_shapes(data: bytes, shapes: dict[int, tuple[int, ...]]) -> bytes:
    """The ``.tflite`` bytes with the stored shapes of main-subgraph tensors rewritten in place.

    TFLite Micro cannot resize inputs; it plans with the shapes in the file,
    so a model with unknown dims is measured at a concrete shape by rewriting
    them (same rank, so every vector keeps its length). ``ValueError`` when a
    shape does not fit its vector.
    """
    import struct

    from edgeq.tflite_file import Reader

    r = Reader(data, "model")
    out = bytearray(data)
    written: dict[int, tuple[int, ...]] = {}
    root = r.u32(0)
    subgraphs = r.tables(root, 2)
    if not subgraphs:
        raise ValueError("no subgraphs")
    for i, t in enumerate(r.tables(subgraphs[0], 0)):
        if i not in shapes:
            continue
        vec = r.vector(t, 0)
        shape = tuple(int(d) for d in shapes[i])
        if vec is None or vec[1] != len(shape) or vec[0] + 4 * len(shape) > len(out):
            raise ValueError(f"tensor {i}: the new shape {shape} does not fit the stored one")
        if written.get(vec[0], shape) != shape:
            raise ValueError(f"tensor {i} shares its shape vector with another tensor of another shape")
        written[vec[0]] = shape
        struct.pack_into(f"<{len(shape)}i", out, vec[0], *shape)
    return bytes(out)


def package_version(name: str) -> Optional[str]:
    """An installed distribution's version (without importing it), or None."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _from_child(res: ChildResult, package: str) -> Measurement:
    if res.ok:
        return Measurement(True, values=dict(res.value), seconds=res.seconds, log_tail=res.stderr_tail)
    if res.error_type in ("ModuleNotFoundError", "ImportError") and package in (res.error or ""):
        return Measurement(False, available=False, error=res.error or "", seconds=res.seconds)
    return Measurement(
        False,
        crashed=res.crashed,
        signal=res.signal,
        timed_out=res.timed_out,
        error=res.describe(),
        log_tail=res.stderr_tail,
        seconds=res.seconds,
    )


def measure_arena(model_path: str, timeout: float = 120.0, invoke: bool = True) -> Measurement:
    """Tensor arena of ``model_path`` as TFLite Micro's recording allocator reports it (in a child)."""
    res = run_in_child("edgeq.micro", "tflm_arena", {"model_path": str(model_path), "invoke": invoke},
                       timeout=timeout)
    return _from_child(res, "tflite_micro")


def measure_litert(model_path: str, threads: int = 1, timeout: float = 120.0, invoke: bool = True) -> Measurement:
    """Memory the LiteRT interpreter needs for ``model_path`` on this host (in a child)."""
    res = run_in_child("edgeq.micro", "litert_memory",
                       {"model_path": str(model_path), "threads": threads, "invoke": invoke}, timeout=timeout)
    return _from_child(res, "ai_edge_litert")
