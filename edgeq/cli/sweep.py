"""``edgeq sweep``: try every quantization level on a target and choose by measurement (parse, call, render)."""

from __future__ import annotations

import textwrap
from typing import Any, Optional

import click

from edgeq.cli import main
from edgeq.cli._common import clear_progress, echo_result, progress_printer
from edgeq.cli._options import (DataArgs, SshArgs, calib_option, eval_option, force_option, inventory_option,
                                json_option, output_dir_option, sampling_options, ssh_options, target_option,
                                timeout_options, timeouts)
from edgeq.escape import one_line
from edgeq.units import fmt_bytes, fmt_ms, fmt_pct

# Names only: edgeq.sweep imports the conversion stages (and TensorFlow) when the command runs.
_OBJECTIVES = ("latency", "size", "energy")


TABLE_WIDTH = 100
_LATENCY_MARK = {"estimate": "~", "emulated": "e ", "device": ""}


def table_lines(result: Any, width: int = TABLE_WIDTH) -> list[str]:
    """The sweep as a text table of at most ``width`` columns, sorted by the objective (the recommendation first).

    Latency is the device's measurement, or marked: ``~`` the profile's estimate, ``e`` measured on an emulator.
    A verdict too long for its column is cut there and follows the table in full.
    """
    from edgeq.report import fit_table

    metric = "accuracy" if result.budget_metric == "accuracy" else "agreement"
    header = ("recipe", "size", metric[:8], "drop", "fits", "fast", "latency", "p99", "energy", "verdict")
    rows = []
    for r in result.sorted_recipes():
        dev = r.device or {}
        latency = "-"
        if r.executable and r.latency_ms is not None:
            latency = _LATENCY_MARK.get(r.latency_label, "") + fmt_ms(r.latency_ms)
        rows.append((
            r.name,
            fmt_bytes(r.size_bytes) + ("*" if not r.executable else ""),
            _pct(r.host.get(metric)),
            fmt_num(r.drop_points, ".2f"),
            "-" if r.check is None else ("yes" if r.fits else "no"),
            "-" if r.check is None else ("yes" if (r.check or {}).get("accelerated") else "no"),
            latency,
            fmt_ms((dev.get("latency_ms") or {}).get("p99")),
            "-" if r.energy_mj is None else f"{fmt_num(r.energy_mj)} mJ",
            "RECOMMENDED" if r.verdict == "recommended" else (r.verdict or r.error or ""),
        ))
    lines = fit_table(rows, header, width)
    room = len(lines[1].rsplit("  ", 1)[-1])  # the rule under the verdict column
    cut = [(row[0], row[-1]) for row in rows if len(row[-1]) > room]
    for name, verdict in cut:
        lines.extend(textwrap.wrap(one_line(verdict, 600), width, initial_indent=f"  {one_line(name, 40)}: ",
                                   subsequent_indent="    "))
    return lines


def _pct(x: Any) -> str:
    return "-" if not isinstance(x, (int, float)) or isinstance(x, bool) else fmt_pct(100 * x)


def fmt_num(x: Any, fmt: str = ".3g") -> str:
    return "-" if not isinstance(x, (int, float)) or isinstance(x, bool) else format(x, fmt)


def summary_lines(result: Any) -> list[str]:
    """Table, recommendation, where the files are, and what the figures are."""
    lines = [f"sweep of {result.model} on {result.target}: {len(result.recipes)} recipes, objective "
             f"{result.objective}, max drop {result.max_drop:g} points of {result.budget_metric}"]
    if result.device and result.device.get("status") == "failed" and not result.device.get("runtime"):
        lines.append(f"device: {result.device.get('host')}: FAILED, nothing measured there "
                     f"({str(result.device.get('error'))[:300]})")
    elif result.device:
        dev = result.device
        rt = dev.get("runtime") or {}
        lines.append(f"device: {dev.get('host')} ({dev.get('arch', '?')}"
                     f"{', emulated: latency ranks recipes on the emulator, not the real chip' if dev.get('emulated') else ''}"
                     f"), {rt.get('name', '?')} {rt.get('version', '')}".rstrip())
    else:
        lines.append("no device: latency and energy are the target profile's estimates")
    lines.append("")
    lines.extend(table_lines(result))
    lines.append("")
    lines.append("* simulated level: compressed weight size, never written. ~ latency estimated from the profile; "
                 "e measured on an emulator. Energy is an estimate from the profile's published power figures.")
    if result.recommended:
        lines.append(f"recommended: {result.reason}")
        rec = result.get(result.recommended)
        if rec.file:
            lines.append(f"  model: {rec.file}")
    else:
        lines.append(f"no recipe qualifies: {result.reason}")
    for w in result.warnings:
        lines.append(f"warning: {w}")
    lines.append(f"wrote {result.json_path}, {result.html_path} and one .tflite per executable recipe in "
                 f"{result.output_dir}")
    return lines


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@calib_option(required=True)
@eval_option(required=True)
@target_option(required=True)
@click.option("--host", metavar="[USER@]HOST[:PORT]", help="Measure every recipe that fits on this device over SSH.")
@inventory_option
@click.option("--local", is_flag=True, help="Measure on this machine as the device.")
@click.option("--recipes", metavar="A,B,...", help="Recipe names to sweep [default: every recipe in the table].")
@click.option("--recipe-file", type=click.Path(path_type=str), metavar="FILE",
              help="Your own recipe table (TOML, [[recipe]] tables) instead of the shipped one.")
@click.option("--max-drop", type=float, default=1.0, show_default=True, metavar="PTS",
              help="Accuracy points a recipe may lose against float (agreement points without labels).")
@click.option("--objective", type=click.Choice(_OBJECTIVES), default="latency", show_default=True,
              help="What the recommendation minimises among qualifying recipes.")
@output_dir_option("sweep.json, sweep.html and one <recipe>.tflite per executable recipe", required=True)
@force_option
@sampling_options
@click.option("--eval-samples", type=click.IntRange(min=1), help="Evaluation samples [default: all].")
@ssh_options
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs per recipe.")
@click.option("--min-seconds", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Time each recipe for at least this long.")
@timeout_options
@click.option("--unsafe-load", is_flag=True, help="Let the model run the Python code it carries (Lambda layers).")
@json_option
def sweep(model: str, calib: str, eval_data: str, target: str, host: Optional[str], inventory: Optional[str],
          local: bool, recipes: Optional[str], recipe_file: Optional[str], max_drop: float, objective: str,
          output: str, force: bool, data: DataArgs, eval_samples: Optional[int], ssh: SshArgs, runs: int,
          min_seconds: float, probe_timeout: Optional[float], upload_timeout: Optional[float],
          run_timeout: Optional[float], unsafe_load: bool, as_json: bool) -> None:
    """Try every quantization level of MODEL on a target and recommend one.

    \b
    Each recipe (fp32, fp16, dynamic int8, int8, int16x8, int4, ...) is made
    from one float export and one calibration, validated against float on
    --eval, checked against --target (fits, fast kernels) and, with --host,
    --inventory (its first host) or --local, measured on the device. Writes DIR/sweep.json,
    DIR/sweep.html and DIR/<recipe>.tflite. Exit codes: 0 a recipe is
    recommended; 5 no recipe qualifies; 4 the device failed (unreachable,
    lost link, or every recipe failed there): sweep.json and sweep.html are
    still written with the host-side results and the device marked failed.
    """
    from edgeq.errors import UsageError
    from edgeq.sweep import DeviceLost, NoQualifyingRecipe, SweepOptions, sweep as run_sweep

    if sum(bool(x) for x in (host, inventory, local)) > 1:
        raise UsageError("--host, --inventory and --local do not go together", "choose one device")
    device = None
    if not (host or inventory or local) and timeouts(probe_timeout, upload_timeout, run_timeout):
        raise UsageError("--probe-timeout, --upload-timeout and --run-timeout need a device",
                         "add --host, --inventory or --local")
    if host or inventory or local:
        from edgeq.deploy import DeployOptions, check_options

        device = DeployOptions(host=ssh.host(host), python=ssh.python, remote_dir=ssh.remote_dir, runs=runs,
                               min_seconds=min_seconds, ssh=ssh.options(), activate=False,
                               **timeouts(probe_timeout, upload_timeout, run_timeout))
        check_options(device)
    elif ssh.port is not None:
        ssh.host(None)  # -p without --host: the one usage error
    names = tuple(n.strip() for n in recipes.split(",") if n.strip()) if recipes is not None else None
    options = SweepOptions(
        output_dir=output, recipes=names, recipe_file=recipe_file,
        max_drop=max_drop, objective=objective, data=data.options(), eval_samples=eval_samples, device=device,
        inventory=inventory, unsafe_load=unsafe_load)
    show = not as_json
    try:
        result = run_sweep(model, calib, eval_data, target, options, progress_printer(show), overwrite=force)
    except (NoQualifyingRecipe, DeviceLost) as exc:
        # The table says why each recipe lost; the error line (exit code 5, or 4 for the device) follows it.
        clear_progress(show)
        echo_result(as_json, exc.result.to_dict(), summary_lines(exc.result))
        raise
    clear_progress(show)
    echo_result(as_json, result.to_dict(), summary_lines(result))
