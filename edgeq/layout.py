"""What layout conversions cost on a target: the TRANSPOSE ops a conversion left (for ``edgeq check``).

PyTorch images are NCHW and TFLite kernels NHWC, so a PyTorch model converted
by litert-torch (``edgeq.torch_convert``) can carry TRANSPOSE ops: pure data
movement, which the MAC-based latency estimate does not count. Standard
library and numpy only.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from edgeq.tflite_file import op_dtype
from edgeq.units import fmt_ms


def transpose_report(model: Any, target: Any) -> dict[str, Any]:
    """How many TRANSPOSE ops a model has and what they cost on ``target`` (an estimate).

    Layout conversions (PyTorch's NCHW to TFLite's NHWC) leave TRANSPOSE ops:
    pure data movement, which the MAC-based latency estimate does not count.
    Each moved element is costed as one element op at the profile's rate for
    its type (slowed by ``fallback_slowdown`` when the backend has no
    optimized TRANSPOSE for that type).
    """
    rows = []
    seconds = 0.0
    mpc = target.macs_per_cycle
    for sg in model.subgraphs:
        for op in sg.operators:
            if op.op != "TRANSPOSE" or not op.outputs:
                continue
            out = sg.tensors[op.outputs[0]]
            n = 1
            for d in out.shape:
                n *= max(int(d), 1)
            dtype = op_dtype(sg, op)
            key = "float32" if dtype.startswith("float") else ("int16" if dtype == "int16" else "int8")
            rate = (mpc.get(key) or min(mpc.values())) * target.clock_hz * target.threads
            fast = target.is_accelerated("TRANSPOSE", dtype)
            if not fast:
                rate /= target.fallback_slowdown
            seconds += n / rate
            rows.append({"tensor": out.name.split(";")[0][:120], "dtype": dtype, "elements": n,
                         "bytes": n * out_itemsize(dtype), "accelerated": fast})
    return {
        "count": len(rows),
        "elements": sum(r["elements"] for r in rows),
        "bytes_moved": sum(r["bytes"] for r in rows),
        "estimated_ms": round(seconds * 1000, 4),
        "ops": rows,
        "basis": f"one element op per moved element at the profile's rate ({target.clock_hz / 1e6:g} MHz), "
                 f"{target.fallback_slowdown:g}x slower without an optimized {target.backend} kernel; an estimate",
    }


def out_itemsize(dtype: str) -> int:
    """Bytes per element of ``dtype`` (1 for a type numpy does not know, e.g. int4)."""
    try:
        return int(np.dtype(dtype).itemsize)
    except TypeError:
        return 1


def transpose_summary(report_: dict[str, Any]) -> Optional[str]:
    """One summary line for ``edgeq check`` (None when the model has no TRANSPOSE)."""
    if not report_["count"]:
        return None
    return (f"layout: {report_['count']} TRANSPOSE op(s) move {report_['elements']} elements "
            f"(about {fmt_ms(report_['estimated_ms'])} on the target, estimated)")
