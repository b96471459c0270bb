"""Run a ``.tflite`` with the LiteRT interpreter: its signature's names, and its outputs on a dataset.

Validation, the simulated recipes, the repair and QAT all measure models this
way; quantized inputs are fed through their scale and quantized outputs are
dequantized, so every output compares as float32.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from edgeq.calibration import Dataset
from edgeq.convert.tfenv import quiet_tensorflow
from edgeq.convert.types import SIGNATURE
from edgeq.progress import ProgressCallback, report


def signature_names(content: bytes) -> dict[int, str]:
    """Tensor index -> signature key (``output_0``, input names) from the LiteRT interpreter."""
    try:
        runner = signature_runner(content)
        details = {**runner.get_input_details(), **runner.get_output_details()}
    except Exception:  # noqa: BLE001 - names are cosmetic; fall back to tensor names
        return {}
    return {int(d["index"]): k for k, d in details.items()}


def signature_runner(content: bytes) -> Any:
    """A signature runner with LiteRT's default delegate (XNNPACK), or built-in kernels if XNNPACK refuses.

    XNNPACK refuses some models LiteRT's own kernels run (measured: 2-bit
    blockwise weights, "unsupported datatype (INT2)"), and the refusal is an
    error at prepare time, not a fallback.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        # LiteRT logs "Created TensorFlow Lite XNNPACK delegate" to fd 2 from C++: not for the terminal.
        with quiet_tensorflow():
            interp = Interpreter(model_content=content)
            interp.allocate_tensors()  # applies the default delegate: a refusal surfaces here
        return interp.get_signature_runner(SIGNATURE)
    except RuntimeError:
        interp = Interpreter(model_content=content,
                             experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        return interp.get_signature_runner(SIGNATURE)


def run_all(content: bytes, data: Dataset, progress: Optional[ProgressCallback], label: str) -> dict[str, np.ndarray]:
    """Run a model over every sample; outputs dequantized to float32, keyed by output name."""
    runner = signature_runner(content)
    in_details = runner.get_input_details()
    out_details = runner.get_output_details()
    results: dict[str, list[np.ndarray]] = {k: [] for k in out_details}
    # Samples are independent, but a fused LSTM (UNIDIRECTIONAL_SEQUENCE_LSTM) keeps its state in
    # variable tensors from one invocation to the next: reset them before every sample.
    reset_state = getattr(getattr(runner, "_interpreter", None), "reset_all_variables", None)
    n = len(data)
    for i in range(n):
        if reset_state is not None:
            reset_state()
        feed = {}
        for name, arr in data.sample(i).items():
            d = in_details[name]
            dtype = np.dtype(d["dtype"])
            scale, zp = d["quantization"]
            # Only a quantized input (a scale) takes float data through its scale; integer inputs that
            # are not quantized (token ids for an Embedding) pass through unchanged.
            if dtype.kind in "iu" and scale and arr.dtype.kind == "f":
                info = np.iinfo(dtype)
                arr = np.clip(np.round(arr / scale + zp), info.min, info.max).astype(dtype)
            feed[name] = arr.astype(dtype, copy=False)
        out = runner(**feed)
        for k, v in out.items():
            d = out_details[k]
            scale, zp = d["quantization"]
            if np.dtype(d["dtype"]).kind in "iu" and scale:
                v = (v.astype(np.float32) - zp) * scale
            results[k].append(np.asarray(v, dtype=np.float32))
        if progress is not None and (i % 32 == 0 or i == n - 1):
            report(progress, "evaluate", label, i + 1, n)
    return {k: np.concatenate(v, axis=0) for k, v in results.items()}


def float_input_names(content: bytes) -> list[str]:
    """Signature input names, ordered by tensor index (the calibrator's positional order)."""
    details = signature_runner(content).get_input_details()
    return [name for name, _ in sorted(details.items(), key=lambda kv: kv[1]["index"])]
