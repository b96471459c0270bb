"""``check_model``: a model against a target, every problem at once (ops, types, flash, RAM, compute)."""

from __future__ import annotations

from typing import Any, Optional

from edgeq.check.compute import FLOAT_TYPES, kernel_acceleration, latency_estimate, model_scheme, op_compute
from edgeq.check.memory import ram_litert, ram_tflm, tflm_stops
from edgeq.check.result import KERNEL_NAMES, CheckOptions, CheckResult, Finding, OpMacs
from edgeq.targets import TargetProfile
from edgeq.tflite_file import TfliteModel, op_dtype
from edgeq.units import fmt_bytes


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
    from edgeq.layout import transpose_report

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
                                  hint="convert to full-integer int8" if dtype in FLOAT_TYPES else None))

    # ---- quantization the target requires
    scheme = model_scheme(model)
    if target.requires_full_integer:
        floats = [t for sg in model.subgraphs for t in sg.tensors if t.dtype in FLOAT_TYPES]
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
            f"flash: model {fmt_bytes(model.size_bytes)} + runtime allowance "
            f"{fmt_bytes(target.runtime_flash_bytes)} = {fmt_bytes(flash_needed)} is over the "
            f"{fmt_bytes(target.flash_available_bytes)} flash budget of {target.name}",
            hint="use a smaller model (fewer or narrower layers) or a target with more flash"))

    if target.runtime == "tflm":
        violations.extend(tflm_stops(model))

    # ---- RAM, measured by the target's runtime in a child process (on LiteRT also which nodes XNNPACK took)
    delegation: Optional[dict[str, Any]] = None
    if opts.measure and not unsupported:
        if target.runtime == "tflm":
            ram_tflm(model, target, opts, memory, violations, warnings, measure_path)
        else:
            delegation = ram_litert(model, target, opts, memory, violations, warnings, measure_path)
    elif opts.measure:
        memory["ram_note"] = "not measured: the model has ops the runtime does not support"

    # ---- fast kernels: measured delegation on LiteRT when we have it, else the profile's kernel table
    if delegation is not None and target.backend == "xnnpack":
        taken = set(delegation["delegated"])
        per_op = [OpMacs(o.index, o.subgraph, o.op, o.dtype, o.macs, o.elementwise,
                         o.subgraph == 0 and o.index in taken) for o in per_op]
    acceleration = kernel_acceleration(per_op, target, delegation)
    kernels = KERNEL_NAMES.get(target.backend, target.backend)
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
    estimate = latency_estimate(per_op, target)

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
