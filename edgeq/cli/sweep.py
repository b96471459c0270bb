"""``edgeq sweep``: try every quantization level on a target and choose by measurement (parse, call, render)."""

from __future__ import annotations

import os
from typing import Any, Optional

import click

from edgeq.calibration import DEFAULT_SAMPLES, DataOptions, parse_floats
from edgeq.cli import main
from edgeq.cli._common import clear_progress, echo_result, progress_printer
from edgeq.cli.deploy import timeout_options, timeouts

# Names only: edgeq.sweep imports the conversion stages (and TensorFlow) when the command runs.
_OBJECTIVES = ("latency", "size", "energy")
_PASSPHRASE_ENV = "EDGEQ_SSH_PASSPHRASE"


def _kb(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "-"
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MB"


def _pct(x: Any) -> str:
    return "-" if not isinstance(x, (int, float)) or isinstance(x, bool) else f"{100 * x:.1f}%"


def _num(x: Any, fmt: str = ".3g") -> str:
    return "-" if not isinstance(x, (int, float)) or isinstance(x, bool) else format(x, fmt)


def table_lines(result: Any) -> list[str]:
    """The sweep as a text table, sorted by the objective (the recommendation first)."""
    metric = "accuracy" if result.budget_metric == "accuracy" else "agreement"
    header = ("recipe", "bits", "activations", "size", metric[:8], "drop", "fits", "fast", "latency ms", "source",
              "p99 ms", "energy mJ", "verdict")
    rows = [header]
    for r in result.sorted_recipes():
        dev = r.device or {}
        chk = r.check or {}
        rows.append((
            r.name, str(r.weights_bits), r.activations,
            _kb(r.size_bytes) + ("*" if not r.executable else ""),
            _pct(r.host.get(metric)),
            _num(r.drop_points, ".2f"),
            "-" if r.check is None else ("yes" if r.fits else "no"),
            "-" if r.check is None else ("yes" if chk.get("accelerated") else "no"),
            _num(r.latency_ms) if r.executable else "-",
            r.latency_label if r.executable and r.latency_ms is not None else "-",
            _num((dev.get("latency_ms") or {}).get("p99")),
            _num(r.energy_mj),
            "RECOMMENDED" if r.verdict == "recommended" else (r.verdict or r.error or ""),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for i, row in enumerate(rows):
        cells = [c.rjust(widths[j]) if 1 <= j <= 11 and j != 2 and j != 9 else c.ljust(widths[j])
                 for j, c in enumerate(row[:-1])]
        verdict = row[-1] if len(row[-1]) <= 110 else row[-1][:109] + "…"
        lines.append("  ".join(cells + [verdict]).rstrip())
        if i == 0:
            lines.append("-" * min(160, len(lines[0])))
    return lines


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
    lines.append("* simulated level: compressed weight size, never written. Energy is an estimate from the "
                 "profile's published power figures.")
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
@click.option("--calib", required=True, metavar="DATA",
              help="Calibration data: .npy, .npz, a directory of images, or module:function.")
@click.option("--eval", "eval_data", required=True, metavar="DATA",
              help="Held-out data (labels in 'y') for accuracy; without labels, top-1 agreement with float.")
@click.option("--target", required=True, metavar="NAME|FILE", help="Target profile (e.g. rpi4, cortex-m4) or a TOML file.")
@click.option("--host", metavar="[USER@]HOST[:PORT]", help="Measure every recipe that fits on this device over SSH.")
@click.option("-i", "--inventory", type=click.Path(dir_okay=False, path_type=str),
              help="Ansible inventory: measure on its first host.")
@click.option("--local", is_flag=True, help="Measure on this machine as the device.")
@click.option("--recipes", metavar="A,B,...", help="Recipe names to sweep [default: every recipe in the table].")
@click.option("--recipe-file", type=click.Path(path_type=str), metavar="FILE",
              help="Your own recipe table (TOML, [[recipe]] tables) instead of the shipped one.")
@click.option("--max-drop", type=float, default=1.0, show_default=True, metavar="PTS",
              help="Accuracy points a recipe may lose against float (agreement points without labels).")
@click.option("--objective", type=click.Choice(_OBJECTIVES), default="latency", show_default=True,
              help="What the recommendation minimises among qualifying recipes.")
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(path_type=str), metavar="DIR",
              help="Directory for sweep.json, sweep.html and <recipe>.tflite files.")
@click.option("--samples", type=click.IntRange(min=1), default=DEFAULT_SAMPLES, show_default=True,
              help="Calibration samples drawn (seeded) from --calib.")
@click.option("--eval-samples", type=click.IntRange(min=1), help="Evaluation samples [default: all].")
@click.option("--mean", metavar="M[,M...]", help="Normalise samples as (x - mean) / std.")
@click.option("--std", metavar="S[,S...]", help="See --mean.")
@click.option("--scale", type=float, help="Normalise samples as x * scale.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for drawing samples.")
@click.option("--python", metavar="PATH", help="The device's Python interpreter.")
@click.option("--remote-dir", default="~/.edgeq", show_default=True, help="Working directory on the device.")
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs per recipe.")
@click.option("--min-seconds", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Time each recipe for at least this long.")
@click.option("--identity", metavar="FILE", help="SSH private key.")
@click.option("--known-hosts", metavar="FILE", help="known_hosts file [default: ~/.ssh/known_hosts].")
@click.option("--accept-new-host-key", is_flag=True, help="Trust an unknown host key (never a changed one).")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True, help="SSH connect timeout, seconds.")
@timeout_options
@click.option("--unsafe-load", is_flag=True, help="Let the model run the Python code it carries (Lambda layers).")
@click.option("--json", "as_json", is_flag=True, help="Print sweep.json on stdout.")
def sweep(model: str, calib: str, eval_data: str, target: str, host: Optional[str], inventory: Optional[str],
          local: bool, recipes: Optional[str], recipe_file: Optional[str], max_drop: float, objective: str,
          output_dir: str, samples: int, eval_samples: Optional[int], mean: Optional[str], std: Optional[str],
          scale: Optional[float], seed: int, python: Optional[str], remote_dir: str, runs: int, min_seconds: float,
          identity: Optional[str], known_hosts: Optional[str], accept_new_host_key: bool, connect_timeout: float,
          probe_timeout: Optional[float], upload_timeout: Optional[float], run_timeout: Optional[float],
          unsafe_load: bool, as_json: bool) -> None:
    """Try every quantization level of MODEL on a target and recommend one.

    \b
    Each recipe (fp32, fp16, dynamic int8, int8, int16x8, int4, ...) is made
    from one float export and one calibration, validated against float on
    --eval, checked against --target (fits, fast kernels) and, with --host,
    --inventory or --local, measured on the device. Writes DIR/sweep.json,
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
        from edgeq.transport import SSHOptions

        ssh = SSHOptions(identity=identity, known_hosts=known_hosts, accept_new_host_key=accept_new_host_key,
                         connect_timeout=connect_timeout, passphrase=os.environ.get(_PASSPHRASE_ENV) or None)
        device = DeployOptions(host=host, python=python, remote_dir=remote_dir, runs=runs, min_seconds=min_seconds,
                               ssh=ssh, activate=False, **timeouts(probe_timeout, upload_timeout, run_timeout))
        check_options(device)
    names = tuple(n.strip() for n in recipes.split(",") if n.strip()) if recipes is not None else None
    options = SweepOptions(
        output_dir=output_dir, recipes=names, recipe_file=recipe_file, max_drop=max_drop, objective=objective,
        data=DataOptions(samples=samples, seed=seed, mean=parse_floats(mean, "--mean"),
                         std=parse_floats(std, "--std"), scale=scale),
        eval_samples=eval_samples, device=device, inventory=inventory, unsafe_load=unsafe_load)
    show = not as_json
    try:
        result = run_sweep(model, calib, eval_data, target, options, progress_printer(show))
    except (NoQualifyingRecipe, DeviceLost) as exc:
        # The table says why each recipe lost; the error line (exit code 5, or 4 for the device) follows it.
        clear_progress(show)
        echo_result(as_json, exc.result.to_dict(), summary_lines(exc.result))
        raise
    clear_progress(show)
    echo_result(as_json, result.to_dict(), summary_lines(result))
