"""Compute of a model from its file: MACs per op, the quantization scheme, fast kernels and a latency estimate."""

from __future__ import annotations

from typing import Any, Optional

from edgeq.check.result import KERNEL_NAMES, OpMacs
from edgeq.targets import TargetProfile
from edgeq.tflite_file import Operator, Subgraph, TfliteModel


# Ops that only move or reinterpret data: no kernel worth accelerating.
DATA_MOVEMENT = frozenset({
    "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "SHAPE", "QUANTIZE", "DEQUANTIZE", "CONCATENATION", "PACK", "UNPACK",
    "SPLIT", "SPLIT_V", "SLICE", "STRIDED_SLICE", "GATHER", "GATHER_ND", "CAST", "FILL", "ZEROS_LIKE",
    "BROADCAST_TO", "BROADCAST_ARGS", "CALL_ONCE", "VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "IF", "WHILE",
})


FLOAT_TYPES = frozenset({"float32", "float16", "float64", "bfloat16"})


def _shape(sg: Subgraph, i: int) -> tuple[int, ...]:
    if 0 <= i < len(sg.tensors):
        return tuple(max(d, 1) for d in sg.tensors[i].shape)
    return ()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def op_compute(sg: Subgraph, op: Operator) -> tuple[int, int]:
    """(MACs, element ops) of one operator, from its tensor shapes."""
    ins = op.inputs
    out = _shape(sg, op.outputs[0]) if op.outputs else ()
    n_out = _numel(out) if out else 0
    name = op.op
    if name == "CONV_2D" and len(ins) >= 2:
        w = _shape(sg, ins[1])  # [out_c, kh, kw, in_c]
        return (n_out * _numel(w[1:]) if len(w) == 4 else 0), 0
    if name == "DEPTHWISE_CONV_2D" and len(ins) >= 2:
        w = _shape(sg, ins[1])  # [1, kh, kw, out_c]
        return (n_out * w[1] * w[2] if len(w) == 4 else 0), 0
    if name == "CONV_3D" and len(ins) >= 2:
        w = _shape(sg, ins[1])  # [kd, kh, kw, in_c, out_c]
        return (n_out * _numel(w[:4]) if len(w) == 5 else 0), 0
    if name == "FULLY_CONNECTED" and len(ins) >= 2:
        w = _shape(sg, ins[1])  # [units, in_features]
        return (n_out * w[-1] if w else 0), 0
    if name == "TRANSPOSE_CONV" and len(ins) >= 3:
        w = _shape(sg, ins[1])  # [out_c, kh, kw, in_c]; inputs: output_shape, weights, input
        x = _shape(sg, ins[2])
        return (_numel(x) * w[0] * w[1] * w[2] if len(w) == 4 else 0), 0
    if name == "BATCH_MATMUL" and len(ins) >= 2 and len(out) >= 2:
        a = _shape(sg, ins[0])
        m, n = out[-2], out[-1]
        batch = max(n_out // max(m * n, 1), 1)
        k = _numel(a) // max(batch * m, 1)
        return n_out * k, 0
    if name in ("AVERAGE_POOL_2D", "MAX_POOL_2D", "L2_POOL_2D", "MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN"):
        return 0, _numel(_shape(sg, ins[0])) if ins else 0
    if name in DATA_MOVEMENT:
        return 0, 0
    return 0, n_out


def model_scheme(model: TfliteModel) -> str:
    dtypes = {sg.tensors[i].dtype for sg in model.subgraphs for op in sg.operators for i in op.outputs
              if 0 <= i < len(sg.tensors)}
    if dtypes & FLOAT_TYPES:
        return "float32"
    if "int16" in dtypes:
        return "int16x8"
    return "int8"


def kernel_acceleration(per_op: list[OpMacs], target: TargetProfile,
                        delegation: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Do the ops that carry the work run on the target's fast kernels?

    ``accelerated`` is true when every op with multiply-accumulates (conv,
    depthwise, fully connected, matmul; every op with work when there are none)
    runs on the backend's kernels; ``all_ops`` when every op with any work does.
    """
    kernels = KERNEL_NAMES.get(target.backend, target.backend)
    measured = delegation is not None and target.backend == "xnnpack"
    work = [o for o in per_op if (o.macs or o.elementwise) and o.op not in DATA_MOVEMENT]
    heavy = [o for o in work if o.macs] or work
    total_macs = sum(o.macs for o in per_op)
    fast_macs = sum(o.macs for o in per_op if o.accelerated)
    off: dict[tuple[str, str], int] = {}
    for o in work:
        if not o.accelerated:
            off[(o.op, o.dtype)] = off.get((o.op, o.dtype), 0) + 1
    if target.backend == "reference":
        basis = "the target has no optimized kernels (reference backend)"
    elif measured:
        version = delegation.get("runtime") if delegation else None
        basis = (f"{kernels} delegation measured: ai-edge-litert{' ' + version if version else ''} on this host took "
                 f"{len(delegation['delegated'])} of {delegation['nodes']} nodes")  # type: ignore[index]
    else:
        basis = f"{kernels} kernel table of the {target.name} profile ({target.kernels_source.rsplit('/', 1)[-1]})"
    share = fast_macs / total_macs if total_macs else (1.0 if not off else 0.0)
    return {
        "backend": target.backend,
        "accelerated": target.backend != "reference" and all(o.accelerated for o in heavy),
        "all_ops": target.backend != "reference" and not off,
        "macs_share": round(share, 4),
        "macs_share_pct": round(100 * share, 1),
        "off_fast_path": [{"op": op, "dtype": dt, "count": n} for (op, dt), n in off.items()],
        "measured": measured,
        "basis": basis,
    }


def latency_estimate(per_op: list[OpMacs], target: TargetProfile) -> dict[str, Any]:
    mpc = target.macs_per_cycle
    # The profile's figure for a type the backend never accelerates is already a reference-kernel figure.
    fast_types = {d for dtypes in target.accelerated.values() for d in dtypes}
    seconds = 0.0
    for o in per_op:
        work = o.macs or o.elementwise
        if not work:
            continue
        key = "float32" if o.dtype in FLOAT_TYPES else ("int16" if o.dtype == "int16" else "int8")
        rate = mpc.get(key) or min(mpc.values())
        rate *= target.clock_hz * target.threads
        if not o.accelerated and o.dtype in fast_types:
            rate /= target.fallback_slowdown
        seconds += work / rate
    return {
        "latency_ms": round(seconds * 1000, 4),
        "label": "estimate",
        "basis": f"profile throughput at {target.clock_hz / 1e6:g} MHz x {target.threads} thread(s), "
                 f"{target.fallback_slowdown:g}x slower off {target.backend}",
        "note": "an estimate from MAC counts and the profile's MACs/cycle, not a measurement; "
                "run `edgeq deploy` to measure on the device",
    }
