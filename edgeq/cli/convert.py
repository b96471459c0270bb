"""``edgeq convert``: a float model to a quantized ``.tflite`` by recipe (parse, call, render).

The command composes the library: ``edgeq.convert.convert`` (the stages), then
with ``--target`` the check (``edgeq.check.check_model``) on what was written;
with ``--max-drop`` the repair loop (``edgeq.repair.convert_with_budget``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import click

from edgeq.cli import main
from edgeq.cli._common import clear_progress, echo, echo_result, progress_printer
from edgeq.cli._options import (DataArgs, calib_option, eval_option, input_shape_option, json_option,
                                output_file_option, sampling_options, target_option, train_option)
from edgeq.units import fmt_bytes, fmt_pct, fmt_ratio

if TYPE_CHECKING:  # names only: edgeq.convert (and with it TensorFlow) is imported when the command runs
    from edgeq.convert import ConvertOptions, ConvertResult
    from edgeq.progress import ProgressCallback

# Names only: edgeq.convert (and with it TensorFlow) is imported when the command runs.
_SCHEMES = ("int8", "int16x8")
_IO_TYPES = ("int8", "uint8", "int16", "float32")
TABLE_WIDTH = 100


def default_output(model: str, scheme: str) -> Path:
    """``models/net.keras`` -> ``./net_int8.tflite`` (in the working directory; ``scheme`` or recipe name)."""
    p = Path(model.rstrip("/\\"))
    return Path(f"{p.stem if p.suffix else p.name}_{scheme}.tflite")


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@calib_option(required=True)
@target_option(required=False)
@sampling_options
@click.option("--scheme", type=click.Choice(_SCHEMES), default="int8", show_default=True,
              help="int8, or int16x8 (16-bit activations, 8-bit weights).")
@click.option("--input-type", type=click.Choice(_IO_TYPES),
              help="Model input type [default: int8; int16 with --scheme int16x8].")
@click.option("--output-type", type=click.Choice(_IO_TYPES),
              help="Model output type [default: int8; int16 with --scheme int16x8].")
@eval_option()
@output_file_option("the quantized .tflite", default="MODEL-STEM_SCHEME.tflite in the working directory")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
              help="Report JSON [default: OUTPUT with .report.json].")
@json_option
@click.option("--recipe", metavar="NAME",
              help="Quantization recipe (e.g. int8, int8-per-tensor, int16x8, fp16, dynamic-int8, int4-dynamic); "
                   "see targets/_recipes.toml [default: int8, or --scheme].")
@click.option("--recipe-file", "recipes_file", metavar="FILE", type=click.Path(path_type=str),
              help="Your own recipe table (TOML) instead of the shipped one.")
@click.option("--layout", type=click.Choice(("nchw", "nhwc")),
              help="PyTorch models: the input layout of the converted model [default: the calibration data's].")
@click.option("--unsafe-load", is_flag=True,
              help="Let the model file run the Python code it carries (Lambda layers). Only for files you trust.")
@click.option("--max-drop", type=click.FloatRange(min=0), metavar="PTS",
              help="Accuracy budget: repair the model until it loses at most PTS points against float "
                   "(needs --eval; exit 6 if no repair meets it).")
@train_option()
@click.option("--keep-best", is_flag=True, help="With --max-drop: write the best model even when over budget.")
@click.option("--warn-drop", type=click.FloatRange(min=0), default=5.0, show_default=True, metavar="PTS",
              help="With --eval: warn when the quantized model loses more than PTS points of accuracy "
                   "(or top-1 agreement) against float.")
@input_shape_option
def convert(model: str, calib: str, target: Optional[str], data: DataArgs, scheme: str,
            input_type: Optional[str], output_type: Optional[str], eval_data: Optional[str],
            output: Optional[str], report_path: Optional[str], as_json: bool, recipe: Optional[str],
            recipes_file: Optional[str], unsafe_load: bool, max_drop: Optional[float],
            train_data: Optional[str], keep_best: bool, warn_drop: float, input_shapes: tuple,
            layout: Optional[str] = None) -> None:
    """Convert MODEL (.keras, .h5, SavedModel dir; PyTorch: .pt2 or module:function) to a quantized .tflite.

    Calibrates on samples of --calib, writes OUTPUT and OUTPUT.report.json
    (recipe, sizes, ops, input/output quantization; with --eval also float vs
    quantized fidelity and the layers that lost the most), and with --target
    checks the result against the target profile. Model files are programs:
    code inside a .keras/.h5 is refused unless --unsafe-load; a SavedModel and
    a module:function data source run their code.
    """
    from edgeq.convert import ConvertOptions, LoadOptions
    from edgeq.errors import UsageError
    from edgeq.outdir import prepare_file

    if recipe is not None and scheme != "int8":
        raise UsageError("give either --recipe or --scheme, not both")
    if (train_data or keep_best) and max_drop is None:
        raise UsageError("--train and --keep-best go with --max-drop")
    if max_drop is not None and not eval_data:
        raise UsageError("--max-drop needs --eval DATA to measure the accuracy drop")
    options = ConvertOptions(
        scheme=scheme,
        input_type=input_type,
        output_type=output_type,
        data=data.options(),
        eval_data=eval_data,
        target=target,
        report_path=report_path,
        recipe=recipe,
        recipes_file=recipes_file,
        load=LoadOptions(unsafe_load=unsafe_load, layout=layout, layout_data=calib),
        warn_drop=warn_drop,
        input_shapes=tuple(input_shapes),
    )
    out = str(prepare_file(output or default_output(model, recipe or scheme)))
    if report_path:
        prepare_file(report_path)
    show = not as_json
    progress = progress_printer(show)
    if max_drop is not None:
        _convert_with_budget(model, calib, out, options, max_drop, train_data, keep_best, target, progress,
                             show, as_json)
        return
    result = _convert_and_check(model, calib, out, options, progress)
    clear_progress(show)
    echo_result(as_json, result.to_dict(), summary_lines(result, warnings=False))
    for w in result.warnings:  # on stderr, so they are seen with --json and in pipelines too
        echo(f"warning: {w}", err=True)


def _convert_and_check(model: str, calib: str, out: str, options: ConvertOptions,
                       progress: Optional[ProgressCallback]) -> ConvertResult:
    """Convert (the stages), then check what was written against the target, if any."""
    from edgeq.convert import convert as run_convert, resolve_for_target, with_check, write_report

    # The target is loaded (and its constraints applied) before anything is converted.
    _recipe, target = resolve_for_target(options)
    result = run_convert(model, calib, out, options, progress=progress)
    if target is None:
        return result
    from edgeq.check import check_model
    from edgeq.tflite_file import read_tflite

    checked = check_model(read_tflite(result.output), target)
    result = with_check(result, target.name, checked.to_dict(), checked.summary_lines(), checked.fits)
    return write_report(result)


def _convert_with_budget(model: str, calib: str, out: str, options: ConvertOptions, max_drop: float,
                         train_data: Optional[str], keep_best: bool, target: Optional[str],
                         progress: Optional[ProgressCallback], show: bool, as_json: bool) -> None:
    try:
        from edgeq.repair import BudgetNotMet, RepairOptions, convert_with_budget
    except ImportError:
        from edgeq.errors import EdgeqError

        raise EdgeqError("--max-drop needs edgeq.repair, which this installation lacks",
                         "reinstall edgeq, or convert without --max-drop") from None
    try:
        result = convert_with_budget(model, calib, out, options,
                                     RepairOptions(max_drop=max_drop, train_data=train_data, keep_best=keep_best),
                                     target=target, progress=progress)
    except BudgetNotMet as exc:
        # Every attempt is worth seeing before the one-line error says none met the budget.
        clear_progress(show)
        echo_result(as_json, exc.result.to_dict(), exc.result.summary_lines())
        raise
    clear_progress(show)
    echo_result(as_json, result.to_dict(), result.summary_lines())


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else fmt_pct(100 * x)


def summary_lines(result: ConvertResult, warnings: bool = True) -> list[str]:
    """A compact, readable terminal summary of a ``ConvertResult`` (its warnings last, unless not ``warnings``)."""
    r = result
    est = " (est.)" if r.float_bytes_source == "estimated" else ""
    recipe = r.recipe
    if recipe is not None and recipe.name not in ("int8", "int16x8", "int8-per-tensor"):
        what = f"recipe {recipe.name}: " + (recipe.description or
                                            f"{recipe.weights_bits}-bit weights, {recipe.activations} activations")
    else:
        what = f"{r.scheme}, {'per-channel' if r.per_channel else 'per-tensor'} weights"
    calib_note = (f", {r.calibration['samples']} calibration samples" if r.calibration.get("used", True)
                  else ", no calibration needed")
    lines = [
        f"wrote {r.output}  ({what}{calib_note})",
        f"report {r.report_path}",
        "",
        f"  size      float32 {fmt_bytes(r.float_bytes)}{est} -> {recipe.name if recipe else r.scheme} "
        f"{fmt_bytes(r.quant_bytes)}  ({fmt_ratio(r.float_bytes / r.quant_bytes) if r.quant_bytes else '-'} "
        "smaller)",
        *textwrap.wrap(", ".join(f"{op} x{n}" for op, n in r.ops.items()), TABLE_WIDTH,
                       initial_indent="  ops       ", subsequent_indent=" " * 12),
    ]
    for kind, items in (("input", r.inputs), ("output", r.outputs)):
        for io in items:
            q = f"scale {io.scale:.6g} zero point {io.zero_point}" if io.scale is not None else "not quantized"
            shape = "x".join(str(d) for d in io.shape)
            lines.append(f"  {kind:<9} {io.name} {io.dtype}[{shape}] {q}")
    if r.fidelity is not None:
        lines.append("")
        lines.append(f"  fidelity on {r.evaluation['samples']} samples of {r.evaluation['source']}:")
        lines.append(f"    {'output':<16} {'kind':<12} {'agreement':>9} {'acc float':>9} {'acc quant':>9} "
                     f"{'max |err|':>10} {'SQNR dB':>8}")
        for f in r.fidelity:
            sqnr = "inf" if f.sqnr_db is None else f"{f.sqnr_db:.1f}"
            agree = f.top1_agreement if f.top1_agreement is not None else f.pixel_agreement
            lines.append(f"    {f.name:<16} {f.kind:<12} {_pct(agree):>9} {_pct(f.accuracy_float):>9} "
                         f"{_pct(f.accuracy_quant):>9} {f.max_abs_error:>10.4g} {sqnr:>8}"
                         + (f"  MAE vs labels {f.mae_float:.4g} -> {f.mae_quant:.4g}"
                            if f.mae_float is not None and f.mae_quant is not None else ""))
    for shape in r.input_shapes:
        lines.append(f"  input {shape['name']} has unknown dims; converted at "
                     f"{'x'.join(str(d) for d in shape['shape'])} (from {shape['source']})")
    ranges = r.calibration.get("ranges")
    if ranges:
        steps = ", ".join(f"{c['samples']}: {100 * c['coverage']:.0f}%" for c in ranges["checkpoints"])
        lines.append(f"  calibration ranges settle (least-covered activation vs its final range): {steps}")
    if r.worst_layers:
        lines.append("")
        lines.append("  worst layers (RMS error / quantization step; about 0.3 is rounding alone):")
        for w in r.worst_layers:
            lines.append(f"    {w.rmse_over_scale:>7.3f}  {w.layer or '-':<20} {w.op or '-':<16} {w.tensor[:48]}")
    if r.check_summary:
        lines.append("")
        lines.extend(f"  {s}" for s in r.check_summary)
    if warnings:
        lines.extend(f"warning: {w}" for w in r.warnings)
    return lines
