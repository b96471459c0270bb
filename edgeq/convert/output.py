"""Stage 6, write: the quantized ``.tflite`` and its report JSON (schema ``edgeq.convert/1``), atomically.

``report_for`` builds the ``ConvertResult`` before anything is written;
``write`` stages the model and the report in temporary files beside them and
renames both only when both are complete, so a failed conversion writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

from edgeq.calibration import DataOptions
from edgeq.convert.types import (Calibration, ConvertResult, FloatModel, LoadedModel, QuantizedModel, Validation,
                                 scheme_of)
from edgeq.errors import InputError
from edgeq.safeio import temp_beside


def default_report_path(output: str | Path) -> Path:
    """``out.tflite`` -> ``out.report.json`` (beside it)."""
    p = Path(output)
    return p.with_name((p.stem if p.suffix else p.name) + ".report.json")


def report_for(loaded: LoadedModel, float_model: FloatModel, calibration: Optional[Calibration],
               quantized: QuantizedModel, validation: Optional[Validation], output: str | Path,
               report_path: Optional[str | Path] = None, data: DataOptions = DataOptions(),
               timings: Optional[dict[str, float]] = None, extra_warnings: Sequence[str] = (),
               warn_drop: Optional[float] = None,
               input_shapes: Sequence[dict[str, Any]] = ()) -> ConvertResult:
    """The ``ConvertResult`` (and report) for one quantized model, before anything is written.

    With ``warn_drop``, a validation that lost more points than that adds a warning.
    """
    recipe = quantized.recipe
    out_path = Path(output)
    rpath = Path(report_path) if report_path else default_report_path(out_path)
    inputs, outputs = quantized.io()
    warns = list(quantized.warnings) + list(extra_warnings)
    if validation is not None:
        warns += list(validation.warnings)
        collapsed = validation.drop_warning(warn_drop) if warn_drop is not None else None
        if collapsed:
            warns.append(collapsed)
    calib = calibration.dataset.to_dict() if calibration is not None else {"samples": 0, "available": 0}
    scheme = scheme_of(recipe)
    return ConvertResult(
        output=str(out_path),
        report_path=str(rpath),
        model=loaded.path,
        model_format=loaded.fmt,
        loader=loaded.loader,
        scheme=scheme,
        input_type=quantized.input_type,
        output_type=quantized.output_type,
        per_channel=recipe.per_channel,
        calibration={**calib, "used": bool(calibration is not None and calibration.calibrated),
                     "seed": data.seed, "ranges": validation.ranges if validation else None,
                     "normalisation": {k: v for k, v in data.to_dict().items()
                                       if k in ("mean", "std", "scale") and v is not None}},
        float_bytes=float_model.size_bytes,
        float_bytes_source="converted",
        quant_bytes=quantized.size_bytes,
        ops=quantized.tflite.op_counts,
        static_shapes=quantized.static_shapes,
        inputs=inputs,
        outputs=outputs,
        fidelity=validation.fidelity if validation else None,
        evaluation=validation.evaluation if validation else None,
        worst_layers=validation.worst_layers if validation else (),
        warnings=tuple(dict.fromkeys(warns)),
        timings_s={k: round(v, 3) for k, v in (timings or {}).items()},
        sha256=quantized.tflite.sha256,
        recipe=recipe,
        input_shapes=tuple(input_shapes),
    )


def write(quantized: QuantizedModel, result: ConvertResult) -> ConvertResult:
    """Write the model and its report (``result.to_dict()``) atomically, or nothing at all."""
    return _write_files(result, [(Path(result.output), quantized.content)])


def write_report(result: ConvertResult) -> ConvertResult:
    """Rewrite just the report of ``result`` (e.g. after the CLI added a target check)."""
    return _write_files(result, [])


def with_check(result: ConvertResult, target: str, check: dict[str, Any], summary: Sequence[str],
               fits: bool) -> ConvertResult:
    """``result`` with a target check attached (and a warning when the model does not fit)."""
    warns = list(result.warnings)
    if not fits:
        warns.append(f"the converted model does not fit target {target} (see check)")
    return replace(result, target=target, check=check, check_summary=tuple(summary), warnings=tuple(warns))


def _write_files(result: ConvertResult, files: list[tuple[Path, bytes]]) -> ConvertResult:
    report_path = Path(result.report_path)
    payload = (json.dumps(result.to_dict(), indent=2, default=_json_value) + "\n").encode("utf-8")
    staged: list[tuple[Path, Path]] = []
    try:
        for final, data in [*files, (report_path, payload)]:
            tmp = temp_beside(final)
            staged.append((tmp, final))
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
        for tmp, final in staged:
            os.replace(tmp, final)
    except OSError as exc:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        where = getattr(exc, "filename", None) or report_path
        raise InputError(f"cannot write {where}: {exc.strerror or exc}",
                         "check free space and permissions, or choose another path") from None
    return result


def _json_value(value: Any) -> Any:
    """numpy scalars as JSON numbers (numbers stay numbers); anything else JSON cannot hold as text."""
    item = getattr(value, "item", None)
    if callable(item):
        with contextlib.suppress(TypeError, ValueError):
            out = item()
            if isinstance(out, (bool, int, float, str)):
                return out
    return str(value)
