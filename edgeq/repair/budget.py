"""The search: convert to full int8, and when the drop is over budget, diagnose and try the fixes in order."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from edgeq import __version__
from edgeq.calibration import Dataset
from edgeq.convert import (ConvertOptions, FloatOpsLeft, IoTypes, default_report_path, prepare, quantize,
                           quiet_tensorflow, resolve_for_target, score, validate)
from edgeq.convert.evaluate import compare_outputs, float_reference
from edgeq.errors import ConversionError, UsageError
from edgeq.progress import ProgressCallback
from edgeq.repair.diagnose import diagnose, named_layers
from edgeq.repair.fixes import fix_calibration, fix_equalize, fix_fallback, fix_mixed, fix_qat
from edgeq.repair.result import FIXES, SCHEMA, Attempt, BudgetNotMet, LayerDiagnosis, RepairOptions, RepairResult
from edgeq.repair.work import Work, target_verdict


def convert_with_budget(
    model: str | Path,
    calib: str | Path,
    output: str | Path,
    options: Any = None,
    repair: Optional[RepairOptions] = None,
    target: Any = None,
    progress: Optional[ProgressCallback] = None,
) -> RepairResult:
    """Convert ``model`` to full int8 within ``repair.max_drop`` points of the float accuracy, repairing if needed.

    ``options`` is a ``ConvertOptions`` (its ``eval_data`` is required: the
    budget is measured there); ``target`` a target name, path or profile
    (default ``options.target``). Returns the ``RepairResult`` of the model
    written to ``output``; raises ``BudgetNotMet`` (an ``OverBudget``, exit 6)
    when no fix meets the budget, after writing the best model only with
    ``repair.keep_best``.
    """
    options = options or ConvertOptions()
    if repair is None:
        raise UsageError("convert_with_budget needs RepairOptions(max_drop=...)")
    if not options.eval_data:
        raise UsageError("--max-drop needs --eval DATA to measure the accuracy drop",
                         "give held-out samples, with labels for accuracy (otherwise top-1 agreement is used)")
    t0 = time.perf_counter()
    if target is not None and not isinstance(target, (str, Path)):
        source = str(getattr(target, "source", "") or "")
        options = replace(options, target=source if source and Path(source).is_file() else target.name)
    elif target is not None:
        options = replace(options, target=str(target))
    recipe, target = resolve_for_target(options)
    if recipe.quantizer != "tflite-converter" or recipe.activations != "int8":
        raise UsageError(f"--max-drop repairs full-int8 models, not recipe '{recipe.name}'",
                         "drop --recipe/--scheme, or drop --max-drop")
    io_types = IoTypes(options.input_type, options.output_type)
    io_types.resolve(recipe)
    model_path, out_path = Path(model), Path(output)
    report_path = Path(options.report_path) if options.report_path else default_report_path(out_path)
    train = repair.train_data if "qat" in repair.fixes else None
    outputs = (("output", out_path), ("report", report_path))

    with quiet_tensorflow(), prepare(model_path, calib, options, outputs=outputs, train_data=train, purpose="repair",
                                     progress=progress) as p:
        loaded, float_model, calibration, eval_data = p.loaded, p.float_model, p.calibration, p.eval
        work = Work(loaded, float_model, calibration, recipe, io_types, p.workdir, eval_data, p.train, target,
                     options.data, progress)

        t = time.perf_counter()
        try:
            base_q = quantize(float_model, calibration, recipe, io_types, progress)
        except FloatOpsLeft as exc:
            # Full int8 cannot be made (e.g. an op without an int8 kernel): the fixes that keep those
            # layers out of int8 still can; the ones that keep the model full int8 cannot.
            base_q, base_error = None, exc
        contents: dict[str, bytes] = {}
        validation = None
        if base_q is not None:
            validation = validate(base_q, float_model, eval_data, calibration, 10, progress)
            work.metric, work.float_accuracy, base_acc = score(validation.fidelity)
            runs, fast, note = target_verdict(work, base_q.content)
            drop = work.float_accuracy - base_acc
            baseline = Attempt("baseline", "meets budget" if drop <= repair.max_drop + 1e-9 else "over budget",
                               f"full int8 ({recipe.name}), no repair", base_acc, drop, base_q.size_bytes, runs,
                               fast, note, (), time.perf_counter() - t)
            if runs is False:
                baseline = replace(baseline, status="does not run on target")
            contents["baseline"] = base_q.content
        else:
            ref = float_reference(float_model, eval_data)
            work.metric, work.float_accuracy, _ = score(compare_outputs(ref, ref, eval_data.labels))
            baseline = Attempt("baseline", "failed", f"full int8 ({recipe.name}) cannot be made: {base_error.message}",
                               layers=base_error.layers, seconds=time.perf_counter() - t)
        attempts: list[Attempt] = []
        diagnosis: tuple[LayerDiagnosis, ...] = ()
        warns: list[str] = list(validation.warnings) if validation is not None else []
        chosen: Optional[str] = "baseline" if baseline.status == "meets budget" else None
        if chosen is None:
            if validation is not None:
                diagnosis = diagnose(work, validation, warns)
                layers = named_layers(diagnosis, list(loaded.layer_names), repair.max_layers)
            else:
                layers = base_error.layers
            for fix in [f for f in FIXES if f in repair.fixes]:  # cheapest first, whatever order was given
                if validation is None and fix in ("calibration", "equalize", "qat"):
                    attempts.append(Attempt(fix, "skipped", "keeps the model full int8, which cannot be made "
                                            f"(layers {', '.join(layers) or '?'} have ops without int8 kernels)"))
                    continue
                if fix == "calibration":
                    a = fix_calibration(work, diagnosis, repair.max_drop)
                elif fix == "equalize":
                    a = fix_equalize(work, repair.max_drop)
                elif fix == "mixed-int16":
                    a = fix_mixed(work, layers, repair.max_drop)
                elif fix == "float-fallback":
                    a = fix_fallback(work, layers, repair.max_drop)
                else:
                    a = fix_qat(work, repair, repair.max_drop)
                if a.tried:
                    contents[a.fix] = a.extra["_content"]
                a = replace(a, extra={k: v for k, v in a.extra.items() if not k.startswith("_")})
                attempts.append(a)
                if a.status == "meets budget":
                    chosen = a.fix
                    break
        tried = [a for a in [baseline, *attempts] if a.tried]
        if not tried:  # full int8 could not be made and no fix made anything else
            why = "; ".join(f"{a.fix}: {a.status} ({a.detail})" for a in attempts if a.status != "skipped")
            raise ConversionError(base_error.message, (base_error.hint or "") + (f"; --max-drop tried {why}"
                                                                                if why else ""))
        runnable = [a for a in tried if a.runs_on_target is not False] or tried
        best = next((a for a in tried if a.fix == chosen), None) or max(runnable, key=lambda a: a.accuracy or 0.0)
        write = chosen is not None or repair.keep_best
        result = RepairResult(str(model_path), work.metric, work.float_accuracy, baseline, float(repair.max_drop),
                              target.name if target is not None else None, diagnosis,
                              validation.ranges if validation is not None else None,
                              tuple(attempts), chosen, best, str(out_path) if write else None,
                              str(report_path) if write else None, seconds=time.perf_counter() - t0)
        if write:
            content = contents[best.fix]
            result = replace(result, sha256=hashlib.sha256(content).hexdigest())
            _write(out_path, report_path, content, result, p.calib, warns)
        if chosen is None:
            over = (best.drop or 0.0) - repair.max_drop
            what = "accuracy" if work.metric == "accuracy" else "top-1 agreement"
            raise BudgetNotMet(
                f"no repair brought the {what} drop within {repair.max_drop:g} points: the best was "
                f"{best.fix} at {best.accuracy:.1f}% ({best.drop:.1f} points below float, {over:.1f} over budget)"
                + (f"; wrote it to {out_path} (--keep-best)" if write else "; no model written"),
                None if write else ("raise --max-drop, give --train DATA for quantization-aware training, or "
                                    "--keep-best to write the best model"),
                result,
            )
        return result


def _write(out_path: Path, report_path: Path, content: bytes, result: RepairResult, calib: Dataset,
           warns: list[str]) -> None:
    from edgeq.safeio import atomic_write
    from edgeq.tflite_file import parse_tflite

    quant = parse_tflite(content, str(out_path))
    doc = {
        "schema": SCHEMA,
        "edgeq_version": __version__,
        "model": {"path": result.model},
        "output": {"path": str(out_path), "sha256": result.sha256},
        "scheme": "int8" if result.best.fix != "float-fallback" else "int8 with float layers",
        "calibration": calib.to_dict(),
        "size": {"quantized_bytes": len(content)},
        "ops": quant.op_counts,
        "target": result.target,
        "repair": result.to_dict(),
        "warnings": warns,
    }
    atomic_write(out_path, content)
    atomic_write(report_path, (json.dumps(doc, indent=2, default=str) + "\n").encode())
