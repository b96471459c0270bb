"""Does a model fit and run on a target? Every problem at once, before anything is flashed.

``check_model`` looks at the ``.tflite`` (read without TensorFlow) against a
``TargetProfile``: ops and op x dtype support, kernels that fall back to slow
reference code, float tensors on full-integer targets, flash and RAM budgets
(RAM measured by the target's own runtime in a sandboxed child), MACs and a
latency estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from edgeq.micro import Measurement, measure_arena, measure_litert, package_version
from edgeq.targets import TargetProfile
from edgeq.tflite_file import Operator, Subgraph, TfliteModel

# TFLite Micro's int8 Softmax stops in Prepare (a TFLITE_CHECK: abort() on the host and on the device)
# unless beta x input scale x 2^26 > 1 (softmax_common.cc: PreprocessSoftmaxScaling with 5 integer bits,
# then QuantizeMultiplierGreaterThanOne). Keras' Softmax converts with beta = 1.
TFLM_SOFTMAX_MIN_SCALE = 1.0 / (1 << 26)

# Recommended arena = measured arena x (1 + margin), rounded up to 16 bytes.
# The margin covers optimized kernels (CMSIS-NN, ESP-NN) asking for scratch
# buffers the host's reference kernels do not.
DEFAULT_ARENA_MARGIN = 0.20

_KERNEL_NAMES = {"xnnpack": "XNNPACK", "cmsis-nn": "CMSIS-NN", "esp-nn": "ESP-NN"}

# Ops that only move or reinterpret data: no kernel worth accelerating.
_DATA_MOVEMENT = frozenset({
    "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "SHAPE", "QUANTIZE", "DEQUANTIZE", "CONCATENATION", "PACK", "UNPACK",
    "SPLIT", "SPLIT_V", "SLICE", "STRIDED_SLICE", "GATHER", "GATHER_ND", "CAST", "FILL", "ZEROS_LIKE",
    "BROADCAST_TO", "BROADCAST_ARGS", "CALL_ONCE", "VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "IF", "WHILE",
})
_FLOAT_TYPES = frozenset({"float32", "float16", "float64", "bfloat16"})


@dataclass(frozen=True)
class CheckOptions:
    """How thoroughly to check."""

    measure: bool = True  # load the model in the target's runtime (child process) for RAM
    invoke: bool = True  # and run one inference on zeros there
    timeout_s: float = 120.0
    arena_margin: float = DEFAULT_ARENA_MARGIN
    # Shapes for inputs with unknown dims (shape_signature -1): (input name or None for the only input, shape).
    # Without them a model with unknown dims is checked at the placeholder shape stored in the file.
    input_shapes: tuple[tuple[Optional[str], tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class Finding:
    """One violation or warning."""

    code: str
    message: str
    op: Optional[str] = None
    tensor: Optional[str] = None
    hint: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"code": self.code, "message": self.message}
        for k in ("op", "tensor", "hint"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        return d


@dataclass(frozen=True)
class OpMacs:
    """Compute of one operator: multiply-accumulates, or element operations for the rest."""

    index: int
    subgraph: int
    op: str
    dtype: str
    macs: int
    elementwise: int
    accelerated: bool


@dataclass(frozen=True)
class CheckResult:
    """Outcome of ``check_model``. ``fits`` is true when there are no violations."""

    model: str
    sha256: str
    target: str
    target_kind: str
    runtime: str
    backend: str
    fits: bool
    violations: tuple[Finding, ...]
    warnings: tuple[Finding, ...]
    ops: dict[str, int]
    scheme: str
    memory: dict[str, Any]
    macs: dict[str, Any]
    per_op: tuple[OpMacs, ...] = field(repr=False)
    estimate: dict[str, Any] = field(default_factory=dict)
    acceleration: dict[str, Any] = field(default_factory=dict)
    # Inputs with unknown dims: the shape the figures are at, and where it came from.
    input_shapes: tuple[dict[str, Any], ...] = ()
    # TRANSPOSE ops (left by NCHW -> NHWC layout conversions) and their estimated cost on the target
    # (edgeq.torch_convert.transpose_report).
    layout: dict[str, Any] = field(default_factory=dict)

    @property
    def arena_bytes(self) -> Optional[int]:
        return self.memory.get("arena_bytes")

    @property
    def recommended_arena_bytes(self) -> Optional[int]:
        return self.memory.get("recommended_arena_bytes")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "sha256": self.sha256,
            "target": self.target,
            "target_kind": self.target_kind,
            "runtime": self.runtime,
            "backend": self.backend,
            "fits": self.fits,
            "violations": [f.to_dict() for f in self.violations],
            "warnings": [f.to_dict() for f in self.warnings],
            "ops": self.ops,
            "scheme": self.scheme,
            "memory": self.memory,
            "macs": self.macs,
            "estimate": self.estimate,
            "acceleration": self.acceleration,
            "input_shapes": list(self.input_shapes),
            "layout": self.layout,
        }

    def summary_lines(self) -> list[str]:
        """A short human summary (no colours, no trailing newlines)."""
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines = [f"check against {self.target} ({self.runtime}/{self.backend}): {verdict}"]
        for f in self.violations:
            lines.append(f"  violation [{f.code}] {f.message}" + (f" ({f.hint})" if f.hint else ""))
        for f in self.warnings:
            lines.append(f"  warning [{f.code}] {f.message}")
        for r in self.input_shapes:
            lines.append(f"  input {r['name']} has unknown dims: figures at {'x'.join(str(d) for d in r['shape'])} "
                         f"({r['source']})")
        m = self.memory
        lines.append(f"  flash: {_fmt_bytes(m['flash_needed_bytes'])} needed (model {_fmt_bytes(m['model_bytes'])}"
                     f" + runtime {_fmt_bytes(m['runtime_flash_bytes'])}) of {_fmt_bytes(m['flash_budget_bytes'])}")
        if m.get("arena_bytes") is not None:
            lines.append(f"  RAM: arena {_fmt_bytes(m['arena_bytes'])} measured by TFLite Micro, recommend "
                         f"{_fmt_bytes(m['recommended_arena_bytes'])} (+{round(m['arena_margin'] * 100)}%) of "
                         f"{_fmt_bytes(m['ram_budget_bytes'])}")
        elif m.get("estimated_arena_bytes") is not None:
            lines.append(f"  RAM: arena not measured; the activations alone need about "
                         f"{_fmt_bytes(m['estimated_arena_bytes'])} (estimated) of {_fmt_bytes(m['ram_budget_bytes'])}")
        elif m.get("interpreter_bytes") is not None:
            lines.append(f"  RAM: interpreter {_fmt_bytes(m['interpreter_bytes'])} on this host of "
                         f"{_fmt_bytes(m['ram_budget_bytes'])}")
        else:
            lines.append(f"  RAM: not measured; budget {_fmt_bytes(m['ram_budget_bytes'])}")
        lines.append(f"  compute: {_fmt_count(self.macs['total'])} MACs"
                     + (f" + {_fmt_count(self.macs['elementwise'])} element ops" if self.macs["elementwise"] else ""))
        a = self.acceleration
        if a and a.get("backend") != "reference":
            kernels = _KERNEL_NAMES.get(a["backend"], a["backend"])
            lines.append(f"  fast kernels: {a['macs_share_pct']:g}% of the MACs on {kernels}"
                         f" ({'accelerated' if a['accelerated'] else 'NOT accelerated'}; "
                         f"{'measured' if a['measured'] else 'from the kernel table'})")
        if self.estimate.get("latency_ms") is not None:
            lines.append(f"  latency estimate: ~{self.estimate['latency_ms']:.3g} ms "
                         f"({self.estimate['basis']}; not a measurement)")
        if self.layout.get("count"):
            lines.append(f"  layout: {self.layout['count']} TRANSPOSE op(s) move {_fmt_count(self.layout['elements'])} "
                         f"elements, ~{self.layout['estimated_ms']:.3g} ms on the target (estimate)")
        return lines


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _fmt_count(n: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


# --------------------------------------------------------------------------- ops


def op_dtype(sg: Subgraph, op: Operator) -> str:
    """The type an op computes on: its first non-constant input (or its first output)."""
    for i in op.inputs:
        if 0 <= i < len(sg.tensors) and not sg.tensors[i].has_data:
            return sg.tensors[i].dtype
    for i in op.outputs:
        if 0 <= i < len(sg.tensors):
            return sg.tensors[i].dtype
    return "unknown"


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
    if name in _DATA_MOVEMENT:
        return 0, 0
    return 0, n_out


def _scheme(model: TfliteModel) -> str:
    dtypes = {sg.tensors[i].dtype for sg in model.subgraphs for op in sg.operators for i in op.outputs
              if 0 <= i < len(sg.tensors)}
    if dtypes & _FLOAT_TYPES:
        return "float32"
    if "int16" in dtypes:
        return "int16x8"
    return "int8"


def check_model(model: TfliteModel, target: TargetProfile, options: Optional[CheckOptions] = None) -> CheckResult:
    """Check ``model`` against ``target`` and report every violation and warning at once.

    A model with unknown input dims (shape_signature -1) is checked at
    ``options.input_shapes`` (shapes propagated by LiteRT in a child, the file's
    stored shapes rewritten for TFLite Micro), or else at the placeholder
    shape stored in the file, with a warning saying so.
    """
    opts = options or CheckOptions()
    # An unknown batch alone is not worth a word: edgeq and the devices run one sample at a time.
    dynamic = [t for t in model.inputs if any(d < 0 for d in t.shape_signature[1:])]
    given = _match_input_shapes(model, opts.input_shapes)
    notes: list[Finding] = []
    records = []
    for t in dynamic:
        if t.index not in given:
            stored = "x".join(str(d) for d in t.shape)
            notes.append(Finding("dynamic-shape", f"input {_input_name(t.name)} has unknown dims "
                                 f"({_dims(t.shape_signature)}): MACs and memory are at the placeholder shape "
                                 f"{stored} stored in the file, not at a real input size", tensor=t.name,
                                 hint=f"give --input-shape {_input_name(t.name)}:1xHxWxC"))
            records.append({"name": _input_name(t.name), "model_shape": list(t.shape_signature),
                            "shape": list(t.shape), "source": "placeholder stored in the file"})
    if not dynamic or not given:
        result = _check_model(model, target, opts, model.path, notes, tuple(records))
    else:
        result = _check_resized(model, target, opts, given, notes, tuple(records))
    # Layout (h8, PyTorch models): how many TRANSPOSE ops the conversion left and what they cost here.
    from edgeq.torch_convert import transpose_report  # imports no torch

    result.layout.update(transpose_report(model, target))
    return result


def _input_name(name: str) -> str:
    """``serving_default_image:0`` -> ``image`` (the name users know from the Keras model and the report)."""
    name = name.split(":")[0]
    return name[len("serving_default_"):] if name.startswith("serving_default_") else name


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join("?" if d < 0 else str(d) for d in shape)


def _match_input_shapes(model: TfliteModel,
                        given: tuple[tuple[Optional[str], tuple[int, ...]], ...]) -> dict[int, tuple[int, ...]]:
    """``--input-shape`` values as {input tensor index: shape}; ``UsageError`` for one that fits no input."""
    from edgeq.errors import UsageError

    out: dict[int, tuple[int, ...]] = {}
    inputs = model.inputs
    for name, shape in given:
        if name is None:
            if len(inputs) != 1:
                raise UsageError(f"--input-shape {_dims(shape)} names no input, but the model has {len(inputs)} "
                                 f"({', '.join(_input_name(t.name) for t in inputs)})", "write NAME:1xHxWxC")
            t = inputs[0]
        else:
            found = [t for t in inputs if name in (t.name, t.name.split(":")[0], _input_name(t.name))]
            if not found:
                raise UsageError(f"--input-shape names input '{name}', which the model does not have",
                                 f"the inputs are {', '.join(_input_name(t.name) for t in inputs)}")
            t = found[0]
        sig = t.shape_signature
        if len(shape) != len(sig) or any(d >= 0 and d != g for d, g in zip(sig, shape)):
            raise UsageError(f"--input-shape {_input_name(t.name)}:{_dims(shape)} does not fit the model's input "
                             f"{_dims(sig)}", "keep the model's known dimensions")
        out[t.index] = tuple(shape)
    return out


def _check_resized(model: TfliteModel, target: TargetProfile, opts: CheckOptions, given: dict[int, tuple[int, ...]],
                   placeholder_notes: list[Finding], placeholder_records: tuple[dict[str, Any], ...]) -> CheckResult:
    """Check ``model`` at the input shapes ``given``: LiteRT propagates them, the file is rewritten to match."""
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    from edgeq.micro import propagate_shapes, with_tensor_shapes

    records = tuple({"name": _input_name(model.main.tensors[i].name),
                     "model_shape": list(model.main.tensors[i].shape_signature), "shape": list(s),
                     "source": "--input-shape"} for i, s in given.items()
                    if any(d < 0 for d in model.main.tensors[i].shape_signature[1:]))
    m = propagate_shapes(model.path, given, timeout=opts.timeout_s)
    notes = list(placeholder_notes)
    if m.ok:
        shapes = {int(k): tuple(v) for k, v in m.values.get("shapes", {}).items()}
        try:
            data = with_tensor_shapes(Path(model.path).read_bytes(), shapes)
        except (ValueError, OSError) as exc:
            notes.append(Finding("dynamic-shape", f"cannot rewrite the model at the given input shape ({exc}); "
                                 "figures are at the placeholder shape stored in the file"))
        else:
            sg = model.main
            tensors = tuple(replace(t, shape=shapes.get(t.index, t.shape)) for t in sg.tensors)
            resized = replace(model, subgraphs=(replace(sg, tensors=tensors),) + model.subgraphs[1:])
            with tempfile.TemporaryDirectory(prefix="edgeq-check-") as work:
                path = Path(work) / "resized.tflite"
                path.write_bytes(data)
                return _check_model(resized, target, opts, str(path), notes, records + placeholder_records)
    else:
        notes.append(Finding("dynamic-shape", f"LiteRT could not resize the inputs to the given shape ({m.error}); "
                             "figures are at the placeholder shape stored in the file",
                             hint="check --input-shape against the model's inputs"))
    return _check_model(model, target, opts, model.path, notes,
                        tuple(dict(r, source="placeholder stored in the file") for r in records)
                        + placeholder_records)


def _check_model(model: TfliteModel, target: TargetProfile, opts: CheckOptions, measure_path: str,
                 notes: list[Finding], input_shapes: tuple[dict[str, Any], ...]) -> CheckResult:
    violations: list[Finding] = []
    warnings: list[Finding] = list(notes)

    # ---- ops, op x dtype, fallbacks (grouped so each problem is said once)
    unsupported: dict[str, int] = {}
    bad_dtype: dict[tuple[str, str], int] = {}
    per_op: list[OpMacs] = []
    for s, sg in enumerate(model.subgraphs):
        for op in sg.operators:
            dtype = op_dtype(sg, op)
            macs, elem = op_compute(sg, op)
            support = target.op_support(op.op)
            accelerated = target.is_accelerated(op.op, dtype)
            per_op.append(OpMacs(op.index, s, op.op, dtype, macs, elem, accelerated))
            if support is None:
                unsupported[op.op] = unsupported.get(op.op, 0) + 1
            elif not support.supports(dtype):
                bad_dtype[(op.op, dtype)] = bad_dtype.get((op.op, dtype), 0) + 1

    runtime_name = "TFLite Micro" if target.runtime == "tflm" else "LiteRT"
    for name, n in unsupported.items():
        what = f"custom op {name.split(':', 1)[1]}" if name.startswith("CUSTOM:") else name
        violations.append(Finding("unsupported-op", f"{what} ({n}x) is not supported by {runtime_name} on {target.name}",
                                  op=name, hint="replace the layer with supported builtin ops"))
    for (name, dtype), n in bad_dtype.items():
        support = target.op_support(name)
        have = ", ".join(support.dtypes or ()) if support else ""
        violations.append(Finding("unsupported-dtype",
                                  f"{name} on {dtype} ({n}x) is not supported by {runtime_name} "
                                  f"(its kernel takes {have})", op=name,
                                  hint="convert to full-integer int8" if dtype in _FLOAT_TYPES else None))

    # ---- quantization the target requires
    scheme = _scheme(model)
    if target.requires_full_integer:
        floats = [t for sg in model.subgraphs for t in sg.tensors if t.dtype in _FLOAT_TYPES]
        if floats:
            names = ", ".join(t.name for t in floats[:3]) + (", ..." if len(floats) > 3 else "")
            violations.append(Finding("float-tensors",
                                      f"{len(floats)} float tensors ({names}) but {target.name} runs "
                                      "full-integer models only", tensor=floats[0].name,
                                      hint=f"convert with `edgeq convert --target {target.name}`"))
    if not target.supports_scheme(scheme) and not (scheme == "float32" and target.requires_full_integer):
        violations.append(Finding("scheme", f"the model is {scheme} but {target.name} offers "
                                  f"{', '.join(target.schemes)}", hint="convert with --scheme int8"))

    # ---- flash
    flash_needed = model.size_bytes + target.runtime_flash_bytes
    memory: dict[str, Any] = {
        "model_bytes": model.size_bytes,
        "runtime_flash_bytes": target.runtime_flash_bytes,
        "flash_needed_bytes": flash_needed,
        "flash_budget_bytes": target.flash_available_bytes,
        "ram_budget_bytes": target.ram_available_bytes,
    }
    if flash_needed > target.flash_available_bytes:
        violations.append(Finding(
            "flash",
            f"flash: model {_fmt_bytes(model.size_bytes)} + runtime allowance "
            f"{_fmt_bytes(target.runtime_flash_bytes)} = {_fmt_bytes(flash_needed)} is over the "
            f"{_fmt_bytes(target.flash_available_bytes)} flash budget of {target.name}",
            hint="use a smaller model (fewer or narrower layers) or a target with more flash"))

    if target.runtime == "tflm":
        violations.extend(tflm_stops(model))

    # ---- RAM, measured by the target's runtime in a child process (on LiteRT also which nodes XNNPACK took)
    delegation: Optional[dict[str, Any]] = None
    if opts.measure and not unsupported:
        if target.runtime == "tflm":
            _ram_tflm(model, target, opts, memory, violations, warnings, measure_path)
        else:
            delegation = _ram_litert(model, target, opts, memory, violations, warnings, measure_path)
    elif opts.measure:
        memory["ram_note"] = "not measured: the model has ops the runtime does not support"

    # ---- fast kernels: measured delegation on LiteRT when we have it, else the profile's kernel table
    if delegation is not None and target.backend == "xnnpack":
        taken = set(delegation["delegated"])
        per_op = [OpMacs(o.index, o.subgraph, o.op, o.dtype, o.macs, o.elementwise,
                         o.subgraph == 0 and o.index in taken) for o in per_op]
    acceleration = _acceleration(per_op, target, delegation)
    kernels = _KERNEL_NAMES.get(target.backend, target.backend)
    slower = "LiteRT's built-in kernels" if target.runtime == "litert" else "reference kernels"
    how = "was not delegated to" if acceleration["measured"] else "has no"
    for entry in acceleration["off_fast_path"]:
        warnings.append(Finding("reference-kernel",
                                f"{entry['op']} on {entry['dtype']} ({entry['count']}x) {how} {kernels}"
                                + (" kernel" if not acceleration["measured"] else "") + f" and runs on {slower}",
                                op=entry["op"]))
    if not acceleration["accelerated"] and target.backend != "reference":
        warnings.append(Finding("not-accelerated",
                                f"not accelerated: {acceleration['macs_share_pct']}% of the MACs run on {kernels} "
                                f"({acceleration['basis']})", op=acceleration["off_fast_path"][0]["op"]
                                if acceleration["off_fast_path"] else None,
                                hint="int8 is the level these kernels accelerate" if scheme != "int8" else None))

    # ---- compute
    total = sum(o.macs for o in per_op)
    elementwise = sum(o.elementwise for o in per_op)
    macs = {
        "total": total,
        "elementwise": elementwise,
        "per_op": [{"index": o.index, "subgraph": o.subgraph, "op": o.op, "dtype": o.dtype, "macs": o.macs,
                    "elementwise": o.elementwise, "accelerated": o.accelerated} for o in per_op],
    }
    estimate = _estimate(per_op, target)

    return CheckResult(
        model=model.path,
        sha256=model.sha256,
        target=target.name,
        target_kind=target.kind,
        runtime=target.runtime,
        backend=target.backend,
        fits=not violations,
        violations=tuple(violations),
        warnings=tuple(warnings),
        ops=model.op_counts,
        scheme=scheme,
        memory=memory,
        macs=macs,
        per_op=tuple(per_op),
        estimate=estimate,
        acceleration=acceleration,
        input_shapes=input_shapes,
    )


def _crash_finding(m: Measurement, runtime: str) -> Finding:
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


def _judge_tflm_failure(model: TfliteModel, m: Measurement, opts: CheckOptions,
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
        return _crash_finding(m, f"TFLite Micro ({tool})"), True
    lite = measure_litert(measure_path, timeout=opts.timeout_s, invoke=True)
    if lite.ok:
        version = lite.values.get("runtime_version") or package_version("ai-edge-litert") or ""
        return Finding(
            "host-tool-failure",
            f"the host's {tool} {m.error} while measuring the arena, but LiteRT {version} loads and runs the "
            "model: a failure of the measuring tool on this host, not a verdict on the device; the RAM "
            "figure is an estimate from the activations' sizes",
            hint="measure the arena on the board (edgeq export, then its own build), or try another tflite-micro"), False
    finding = _crash_finding(m, "TFLite Micro")
    if lite.available:
        why = lite.error or "fails"
        finding = Finding(finding.code, f"{finding.message}; LiteRT also fails on it ({why}): the model is "
                          "malformed or crafted", hint=finding.hint)
    return finding, True


def _estimate_ram(model: TfliteModel, target: TargetProfile, memory: dict[str, Any], violations: list[Finding],
                  why: str) -> None:
    """Judge RAM on the activations' sizes when TFLite Micro cannot measure the arena."""
    estimate = estimated_arena(model)
    memory.update({"estimated_arena_bytes": estimate,
                   "arena_note": f"not measured ({why}); estimated as the peak of the activations alive at "
                                 "once: a floor, the real arena adds persistent buffers and scratch"})
    if estimate > target.ram_available_bytes:
        violations.append(Finding("ram", f"RAM: the activations alone need about {_fmt_bytes(estimate)} "
                                  f"(estimated), over the {_fmt_bytes(target.ram_available_bytes)} RAM budget "
                                  f"of {target.name}", hint="use a smaller model (smaller input or fewer channels)"))


def _ram_tflm(model: TfliteModel, target: TargetProfile, opts: CheckOptions, memory: dict[str, Any],
              violations: list[Finding], warnings: list[Finding], measure_path: Optional[str] = None) -> None:
    measure_path = measure_path or model.path
    if tflm_stops(model):
        # Known in advance (check_model reported it): measuring would only abort the child.
        _estimate_ram(model, target, memory, violations, "TFLite Micro stops on the model, see violations")
        return
    m = measure_arena(measure_path, timeout=opts.timeout_s, invoke=opts.invoke)
    memory["measured_by"] = "tflite-micro RecordingMicroAllocator (child process)"
    if not m.available:
        warnings.append(Finding("arena-not-measured", "tensor arena not measured: the tflite-micro package is "
                                "not installed", hint="pip install 'edgeq[micro]'"))
        return
    if not m.ok:
        finding, model_at_fault = _judge_tflm_failure(model, m, opts, measure_path)
        if model_at_fault:
            violations.append(finding)
        else:
            warnings.append(finding)
            _estimate_ram(model, target, memory, violations, "the host's TFLite Micro failed")
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
            hint = f"the arena would fit in the {_fmt_bytes(target.psram_bytes)} PSRAM (slower); or " + hint
        violations.append(Finding("ram", f"RAM: tensor arena {_fmt_bytes(arena)} is over the "
                                  f"{_fmt_bytes(target.ram_available_bytes)} RAM budget of {target.name}",
                                  hint=hint))
    elif recommended > target.ram_available_bytes:
        warnings.append(Finding("ram-margin", f"the arena fits ({_fmt_bytes(arena)}) but the recommended "
                                f"{_fmt_bytes(recommended)} with margin does not fit "
                                f"{_fmt_bytes(target.ram_available_bytes)}"))


def _ram_litert(model: TfliteModel, target: TargetProfile, opts: CheckOptions, memory: dict[str, Any],
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
        violations.append(_crash_finding(m, "LiteRT"))
        return None
    used = int(m.values["interpreter_bytes"])
    memory["interpreter_bytes"] = used
    memory["interpreter_note"] = "resident memory the interpreter added on this host (x86/aarch64 differ a little)"
    if used > target.ram_available_bytes:
        violations.append(Finding("ram", f"RAM: the interpreter needs {_fmt_bytes(used)}, over the "
                                  f"{_fmt_bytes(target.ram_available_bytes)} RAM budget of {target.name}",
                                  hint="use a smaller model or a board with more memory"))
    delegation = m.values.get("delegation")
    if isinstance(delegation, dict):
        delegation = dict(delegation, runtime=m.values.get("runtime_version"))
        return delegation
    return None


def _acceleration(per_op: list[OpMacs], target: TargetProfile, delegation: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Do the ops that carry the work run on the target's fast kernels?

    ``accelerated`` is true when every op with multiply-accumulates (conv,
    depthwise, fully connected, matmul; every op with work when there are none)
    runs on the backend's kernels; ``all_ops`` when every op with any work does.
    """
    kernels = _KERNEL_NAMES.get(target.backend, target.backend)
    measured = delegation is not None and target.backend == "xnnpack"
    work = [o for o in per_op if (o.macs or o.elementwise) and o.op not in _DATA_MOVEMENT]
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


def _estimate(per_op: list[OpMacs], target: TargetProfile) -> dict[str, Any]:
    mpc = target.macs_per_cycle
    # The profile's figure for a type the backend never accelerates is already a reference-kernel figure.
    fast_types = {d for dtypes in target.accelerated.values() for d in dtypes}
    seconds = 0.0
    for o in per_op:
        work = o.macs or o.elementwise
        if not work:
            continue
        key = "float32" if o.dtype in _FLOAT_TYPES else ("int16" if o.dtype == "int16" else "int8")
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
