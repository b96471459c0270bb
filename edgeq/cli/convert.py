"""``edgeq convert``: a float model to a calibrated full-integer ``.tflite`` (parse, call, render)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from edgeq.calibration import DEFAULT_SAMPLES, DataOptions, parse_floats
from edgeq.cli import main
from edgeq.cli._common import clear_progress, echo_json, progress_printer

# Names only: edgeq.convert (and with it TensorFlow) is imported when the command runs.
_SCHEMES = ("int8", "int16x8")
_IO_TYPES = ("int8", "uint8", "int16", "float32")


def default_output(model: str, scheme: str) -> Path:
    """``models/net.keras`` -> ``./net_int8.tflite`` (in the working directory)."""
    p = Path(model.rstrip("/\\"))
    return Path(f"{p.stem if p.suffix else p.name}_{scheme}.tflite")


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--calib", "calib", required=True, metavar="DATA",
              help="Calibration data: .npy, .npz, a directory of images, or module:function.")
@click.option("--target", metavar="NAME|FILE", help="Target profile (e.g. rpi4, cortex-m4) or a profile TOML file.")
@click.option("--samples", type=click.IntRange(min=1), default=DEFAULT_SAMPLES, show_default=True,
              help="Calibration samples drawn (seeded) from DATA.")
@click.option("--scheme", type=click.Choice(_SCHEMES), default="int8", show_default=True,
              help="int8, or int16x8 (16-bit activations, 8-bit weights).")
@click.option("--input-type", type=click.Choice(_IO_TYPES),
              help="Model input type [default: int8; int16 with --scheme int16x8].")
@click.option("--output-type", type=click.Choice(_IO_TYPES),
              help="Model output type [default: int8; int16 with --scheme int16x8].")
@click.option("--eval", "eval_data", metavar="DATA",
              help="Held-out data (labels in 'y') to measure float vs quantized fidelity and the worst layers.")
@click.option("--mean", metavar="M[,M...]", help="Normalise samples as (x - mean) / std (one value or one per channel).")
@click.option("--std", metavar="S[,S...]", help="See --mean.")
@click.option("--scale", type=float, help="Normalise samples as x * scale (e.g. 0.00392 for 1/255).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for drawing samples.")
@click.option("-o", "--output", type=click.Path(path_type=str),
              help="Output .tflite [default: MODEL-STEM_SCHEME.tflite in the working directory].")
@click.option("--report", "report_path", type=click.Path(path_type=str),
              help="Report JSON [default: OUTPUT with .report.json].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def convert(model: str, calib: str, target: Optional[str], samples: int, scheme: str,
            input_type: Optional[str], output_type: Optional[str], eval_data: Optional[str],
            mean: Optional[str], std: Optional[str], scale: Optional[float], seed: int,
            output: Optional[str], report_path: Optional[str], as_json: bool) -> None:
    """Convert MODEL (.keras, .h5 or SavedModel dir) to a full-integer .tflite.

    Calibrates on samples of --calib, writes OUTPUT and OUTPUT.report.json
    (sizes, ops, input/output quantization; with --eval also float vs
    quantized fidelity and the layers that lost the most), and with --target
    checks the result against the target profile.
    """
    from edgeq.convert import ConvertOptions, convert as run_convert

    options = ConvertOptions(
        scheme=scheme,
        input_type=input_type,
        output_type=output_type,
        data=DataOptions(samples=samples, seed=seed, mean=parse_floats(mean, "--mean"),
                         std=parse_floats(std, "--std"), scale=scale),
        eval_data=eval_data,
        target=target,
        report_path=report_path,
    )
    out = output or str(default_output(model, scheme))
    show = not as_json
    result = run_convert(model, calib, out, options, progress=progress_printer(show))
    clear_progress(show)
    if as_json:
        echo_json(result.to_dict())
        return
    for line in summary_lines(result):
        click.echo(line)


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MB"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary_lines(result) -> list[str]:  # type: ignore[no-untyped-def]
    """A compact, readable terminal summary of a ``ConvertResult``."""
    r = result
    est = " (est.)" if r.float_bytes_source == "estimated" else ""
    lines = [
        f"wrote {r.output}  ({r.scheme}, {'per-channel' if r.per_channel else 'per-tensor'} weights, "
        f"{r.calibration['samples']} calibration samples)",
        f"report {r.report_path}",
        "",
        f"  size      float32 {_kb(r.float_bytes)}{est} -> {r.scheme} {_kb(r.quant_bytes)}  (x{r.size_ratio:.2f})",
        "  ops       " + ", ".join(f"{op} x{n}" for op, n in r.ops.items()),
    ]
    for kind, items in (("input", r.inputs), ("output", r.outputs)):
        for io in items:
            q = f"scale {io.scale:.6g} zero point {io.zero_point}" if io.scale is not None else "not quantized"
            shape = "x".join(str(d) for d in io.shape)
            lines.append(f"  {kind:<9} {io.name} {io.dtype}[{shape}] {q}")
    if r.fidelity is not None:
        lines.append("")
        lines.append(f"  fidelity on {r.evaluation['samples']} samples of {r.evaluation['source']}:")
        lines.append(f"    {'output':<16} {'top-1 agree':>11} {'acc float':>9} {'acc quant':>9} "
                     f"{'max |err|':>10} {'SQNR dB':>8}")
        for f in r.fidelity:
            sqnr = "inf" if f.sqnr_db is None else f"{f.sqnr_db:.1f}"
            lines.append(f"    {f.name:<16} {_pct(f.top1_agreement):>11} {_pct(f.accuracy_float):>9} "
                         f"{_pct(f.accuracy_quant):>9} {f.max_abs_error:>10.4g} {sqnr:>8}")
    ranges = r.calibration.get("ranges")
    if ranges:
        steps = ", ".join(f"{c['samples']}: {100 * c['coverage']:.0f}%" for c in ranges["checkpoints"])
        lines.append(f"  calibration ranges settle (least-covered activation vs its final range): {steps}")
    if r.worst_layers:
        lines.append("")
        lines.append("  worst layers (RMS error / quantization step; about 0.3 is rounding alone):")
        for w in r.worst_layers:
            lines.append(f"    {w.rmse_over_scale:>7.3f}  {w.layer or '-':<20} {w.op or '-':<16} {w.tensor[:60]}")
    if r.check_summary:
        lines.append("")
        lines.extend(f"  {s}" for s in r.check_summary)
    for w in r.warnings:
        lines.append(f"warning: {w}")
    return lines
