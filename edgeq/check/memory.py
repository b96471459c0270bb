"""RAM on the target: measured by its own runtime in a child process (TFLite Micro's arena, LiteRT's interpreter),
or estimated from the activations when it cannot be measured; what TFLite Micro is known to stop on."""

from __future__ import annotations

import math
from typing import Any, Optional

from edgeq.check.result import CheckOptions, Finding
from edgeq.micro import Measurement, measure_arena, measure_litert, package_version
from edgeq.targets import TargetProfile
from edgeq.tflite_file import TfliteModel
from edgeq.units import fmt_bytes


# TFLite Micro's int8 Softmax stops in Prepare (a TFLITE_CHECK: abort() on the host and on the device)
# unless beta x input scale x 2^26 > 1 (softmax_common.cc: PreprocessSoftmaxScaling with 5 integer bits,
# then QuantizeMultiplierGreaterThanOne). Keras' Softmax converts with beta = 1.
TFLM_SOFTMAX_MIN_SCALE = 1.0 / (1 << 26)


def crash_finding(m: Measurement, runtime: str) -> Finding:
    last = m.log_tail.strip().splitlines()[-1:] if m.log_tail.strip() else []
    if m.timed_out:
        return Finding("interpreter-timeout", f"{runtime} {m.error} while loading and running the model",
                       hint="the model may loop or be far too large for this target")
    if m.crashed:
        return Finding("interpreter-crash",
                       f"{runtime} {m.error} while loading the model" + (f": {last[0]}" if last else ""),
                       hint="the model would crash the device too; check its ops, shapes and size")
    return Finding("interpreter-error", f"{runtime} cannot run the model: {m.error}"
                   + (f" ({last[0]})" if last and last[0] not in m.error else ""),
                   hint="see the runtime's message; an op, type or shape is not supported")


def tflm_stops(model: TfliteModel) -> list[Finding]:
    """What TFLite Micro's kernels are known to stop on (an abort in Prepare, on the device too), read from the file."""
    low: list[float] = []
    for sg in model.subgraphs:
        for op in sg.operators:
            if op.op != "SOFTMAX" or not op.inputs or not 0 <= op.inputs[0] < len(sg.tensors):
                continue
            t = sg.tensors[op.inputs[0]]
            q = t.quantization
            if t.dtype in ("int8", "uint8") and q and q.scale and q.scale[0] <= TFLM_SOFTMAX_MIN_SCALE:
                low.append(q.scale[0])
    if not low:
        return []
    return [Finding(
        "softmax-input-scale",
        f"SOFTMAX ({len(low)}x) has an int8 input scale of {min(low):.3g}, below the {TFLM_SOFTMAX_MIN_SCALE:.3g} "
        "TFLite Micro's Softmax accepts: its Prepare stops the program (abort), on the device as on this host. "
        "The logits have almost no range: an untrained model (e.g. weights=None), or calibration samples "
        "that do not excite it", op="SOFTMAX",
        hint="convert a trained model with real calibration samples; LiteRT targets run it as it is")]


def estimated_arena(model: TfliteModel) -> int:
    """Bytes of the activations alive at once in the main subgraph (a floor for TFLite Micro's arena).

    Each non-constant tensor lives from the op that makes it (or the start, for
    inputs) to the last op that reads it (or the end, for outputs); the peak
    of the live bytes is what any memory plan needs at least. Persistent
    buffers, scratch and alignment come on top.
    """
    sg = model.main
    n_ops = len(sg.operators)
    first: dict[int, int] = {i: 0 for i in sg.inputs}
    last: dict[int, int] = {i: n_ops for i in sg.outputs}
    for k, op in enumerate(sg.operators):
        for i in op.outputs:
            if 0 <= i < len(sg.tensors):
                first.setdefault(i, k)
        for i in op.inputs:
            if 0 <= i < len(sg.tensors):
                last[i] = max(last.get(i, k), k)
    peak = 0
    live = [(first.get(i, 0), last.get(i, first.get(i, 0)), t.nbytes) for i, t in enumerate(sg.tensors)
            if not t.has_data and not t.is_variable and (i in first or i in last)]
    for k in range(n_ops + 1):
        peak = max(peak, sum(b for lo, hi, b in live if lo <= k <= hi))
    return int(peak)


def judge_tflm_failure(model: TfliteModel, m: Measurement, opts: CheckOptions,
                       measure_path: str) -> tuple[Finding, bool]:
    """(finding, the model is at fault) for a TFLite Micro child that crashed or raised.

    The rule: a model is valid when LiteRT (a second, independent
    implementation of the same format, with its own checks) loads it and runs
    it once on zeros in a child process. TFLite Micro failing on a valid model
    is a failure of the host's measuring tool: a warning that names the tool,
    never "the device would crash". When LiteRT fails too (a crafted model fed
    a tensor of the wrong rank, say), or cannot be asked, the model is at fault.
    """
    tool = f"tflite-micro {package_version('tflite-micro') or '(version unknown)'}"
    if m.timed_out:
        return crash_finding(m, f"TFLite Micro ({tool})"), True
    lite = measure_litert(measure_path, timeout=opts.timeout_s, invoke=True)
    if lite.ok:
        version = lite.values.get("runtime_version") or package_version("ai-edge-litert") or ""
        return Finding(
            "host-tool-failure",
            f"the host's {tool} {m.error} while measuring the arena, but LiteRT {version} loads and runs the "
            "model: a failure of the measuring tool on this host, not a verdict on the device; the RAM "
            "figure is an estimate from the activations' sizes",
            hint="measure the arena on the board (edgeq export, then its own build), or try another tflite-micro"), False
    finding = crash_finding(m, "TFLite Micro")
    if lite.available:
        why = lite.error or "fails"
        finding = Finding(finding.code, f"{finding.message}; LiteRT also fails on it ({why}): the model is "
                          "malformed or crafted", hint=finding.hint)
    return finding, True


def estimate_ram(model: TfliteModel, target: TargetProfile, memory: dict[str, Any], violations: list[Finding],
                 why: str) -> None:
    """Judge RAM on the activations' sizes when TFLite Micro cannot measure the arena."""
    estimate = estimated_arena(model)
    memory.update({"estimated_arena_bytes": estimate,
                   "arena_note": f"not measured ({why}); estimated as the peak of the activations alive at "
                                 "once: a floor, the real arena adds persistent buffers and scratch"})
    if estimate > target.ram_available_bytes:
        violations.append(Finding("ram", f"RAM: the activations alone need about {fmt_bytes(estimate)} "
                                  f"(estimated), over the {fmt_bytes(target.ram_available_bytes)} RAM budget "
                                  f"of {target.name}", hint="use a smaller model (smaller input or fewer channels)"))


def ram_tflm(model: TfliteModel, target: TargetProfile, opts: CheckOptions, memory: dict[str, Any],
             violations: list[Finding], warnings: list[Finding], measure_path: Optional[str] = None) -> None:
    measure_path = measure_path or model.path
    if tflm_stops(model):
        # Known in advance (check_model reported it): measuring would only abort the child.
        estimate_ram(model, target, memory, violations, "TFLite Micro stops on the model, see violations")
        return
    m = measure_arena(measure_path, timeout=opts.timeout_s, invoke=opts.invoke)
    memory["measured_by"] = "tflite-micro RecordingMicroAllocator (child process)"
    if not m.available:
        warnings.append(Finding("arena-not-measured", "tensor arena not measured: the tflite-micro package is "
                                "not installed", hint="pip install 'edgeq[micro]'"))
        return
    if not m.ok:
        finding, model_at_fault = judge_tflm_failure(model, m, opts, measure_path)
        if model_at_fault:
            violations.append(finding)
        else:
            warnings.append(finding)
            estimate_ram(model, target, memory, violations, "the host's TFLite Micro failed")
        return
    arena = int(m.values["arena_bytes"])
    recommended = int(math.ceil(arena * (1 + opts.arena_margin) / 16.0) * 16)
    memory.update({
        "arena_bytes": arena,
        "arena_head_bytes": m.values.get("head_bytes"),
        "arena_tail_bytes": m.values.get("tail_bytes"),
        "arena_margin": opts.arena_margin,
        "recommended_arena_bytes": recommended,
        "arena_note": ("measured on this 64-bit host: an upper bound for a 32-bit microcontroller "
                       "(pointers and structs are smaller there); the recommended arena adds "
                       f"{round(opts.arena_margin * 100)}% for optimized-kernel scratch buffers"),
    })
    if arena > target.ram_available_bytes:
        hint = "use a smaller model (smaller input or fewer channels)"
        if target.psram_bytes and arena <= target.psram_bytes:
            hint = f"the arena would fit in the {fmt_bytes(target.psram_bytes)} PSRAM (slower); or " + hint
        violations.append(Finding("ram", f"RAM: tensor arena {fmt_bytes(arena)} is over the "
                                  f"{fmt_bytes(target.ram_available_bytes)} RAM budget of {target.name}",
                                  hint=hint))
    elif recommended > target.ram_available_bytes:
        warnings.append(Finding("ram-margin", f"the arena fits ({fmt_bytes(arena)}) but the recommended "
                                f"{fmt_bytes(recommended)} with margin does not fit "
                                f"{fmt_bytes(target.ram_available_bytes)}"))


def ram_litert(model: TfliteModel, target: TargetProfile, opts: CheckOptions, memory: dict[str, Any],
               violations: list[Finding], warnings: list[Finding],
               measure_path: Optional[str] = None) -> Optional[dict[str, Any]]:
    m = measure_litert(measure_path or model.path, threads=target.threads, timeout=opts.timeout_s,
                       invoke=opts.invoke)
    memory["measured_by"] = "ai-edge-litert Interpreter RSS after allocate_tensors and one run (child process)"
    if not m.available:
        warnings.append(Finding("ram-not-measured", "interpreter memory not measured: ai-edge-litert is not "
                                "installed", hint="pip install ai-edge-litert"))
        return None
    if not m.ok:
        violations.append(crash_finding(m, "LiteRT"))
        return None
    used = int(m.values["interpreter_bytes"])
    memory["interpreter_bytes"] = used
    memory["interpreter_note"] = "resident memory the interpreter added on this host (x86/aarch64 differ a little)"
    if used > target.ram_available_bytes:
        violations.append(Finding("ram", f"RAM: the interpreter needs {fmt_bytes(used)}, over the "
                                  f"{fmt_bytes(target.ram_available_bytes)} RAM budget of {target.name}",
                                  hint="use a smaller model or a board with more memory"))
    delegation = m.values.get("delegation")
    if isinstance(delegation, dict):
        delegation = dict(delegation, runtime=m.values.get("runtime_version"))
        return delegation
    return None
