"""``edgeq targets``, ``edgeq check`` and ``edgeq export`` (parse, call one library function, render)."""

from __future__ import annotations

from typing import Optional

import click

from edgeq.cli import main
from edgeq.cli._common import echo, echo_json
from edgeq.cli._exit import ExitCode
from edgeq.cli._options import (force_option, input_shape_option, json_option, output_dir_option,
                                target_option)
from edgeq.units import fmt_bytes

TARGETS_SCHEMA = "edgeq.targets/1"
TABLE_WIDTH = 100  # terminal tables fit this many columns


def targets_table(profiles: list, width: int = TABLE_WIDTH) -> list[str]:
    """``edgeq targets`` as lines of at most ``width`` columns (a long description wraps in its column)."""
    import textwrap

    rows = [("NAME", "KIND", "RAM", "PSRAM", "FLASH", "RUNTIME", "BACKEND", "DESCRIPTION")]
    for p in profiles:
        rows.append((p.name, p.kind, fmt_bytes(p.ram_bytes), fmt_bytes(p.psram_bytes) if p.psram_bytes else "-",
                     fmt_bytes(p.flash_bytes), p.runtime, p.backend, p.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        head = "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  "
        room = max(20, width - len(head))
        wrapped = textwrap.wrap(r[-1], room) or [""]
        lines.append((head + wrapped[0]).rstrip())
        lines.extend(" " * len(head) + more for more in wrapped[1:])
    return lines


@main.command()
@json_option
def targets(as_json: bool) -> None:
    """List the shipped target profiles (name, kind, RAM, flash, backend)."""
    from edgeq.targets import list_targets

    profiles = list_targets()
    if as_json:
        echo_json({"schema": TARGETS_SCHEMA, "targets": [p.to_dict() for p in profiles]})
        return
    for line in targets_table(profiles):
        echo(line)


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@target_option()
@json_option
@click.option("--no-measure", is_flag=True, help="Skip loading the model in the target's runtime (no RAM figure).")
@click.option("--timeout", type=click.FloatRange(min=1), default=120, show_default=True,
              help="Seconds the runtime child may take to load and run the model.")
@input_shape_option
@click.option("--max-ram-pct", type=click.FloatRange(0, 100, min_open=True), metavar="PCT",
              help="Fail (exit 3) when the model needs more than PCT % of the target's RAM budget.")
@click.option("--max-flash-pct", type=click.FloatRange(0, 100, min_open=True), metavar="PCT",
              help="Fail (exit 3) when the model needs more than PCT % of the target's flash budget.")
@click.option("--max-latency-ms", type=click.FloatRange(0, min_open=True), metavar="MS",
              help="Fail (exit 3) when the latency estimate is over MS milliseconds.")
def check(model: str, target: str, as_json: bool, no_measure: bool, timeout: float,
          input_shapes: tuple, max_ram_pct: Optional[float], max_flash_pct: Optional[float],
          max_latency_ms: Optional[float]) -> None:
    """Check whether MODEL (.tflite) fits and runs on a target.

    Reports every problem at once: unsupported ops and op x type pairs, slow
    fallback kernels, float tensors on integer-only targets, flash and RAM
    over budget; plus MACs and a latency estimate. With --max-* the model
    must also stay within those limits (a CI gate). Exit 0 fits, 3 does not fit.
    """
    from edgeq.check import CheckOptions, Thresholds, apply_thresholds, check_model
    from edgeq.targets import load_target
    from edgeq.tflite_file import read_tflite

    profile = load_target(target)
    result = check_model(read_tflite(model), profile,
                         CheckOptions(measure=not no_measure, timeout_s=timeout, input_shapes=tuple(input_shapes)))
    result = apply_thresholds(result, Thresholds(max_ram_pct, max_flash_pct, max_latency_ms))
    if as_json:
        echo_json(result.to_dict())
    else:
        for line in result.summary_lines():
            echo(line)
    if not result.fits:
        click.get_current_context().exit(int(ExitCode.DOES_NOT_FIT))


@main.command(name="export")
@click.argument("model", type=click.Path(path_type=str))
@target_option()
@click.option("--format", "fmt", type=click.Choice(["c"]), default="c", show_default=True,
              help="c: model_data.h/.cc and op_resolver.h for TFLite Micro.")
@output_dir_option("model_data.h, model_data.cc and op_resolver.h", required=True)
@click.option("--margin", type=click.FloatRange(min=0, max=10), default=0.20, show_default=True,
              help="Arena margin added to the measured arena for kTensorArenaSize.")
@force_option
@json_option
def export_cmd(model: str, target: str, fmt: str, output: str, margin: float, force: bool,
               as_json: bool) -> None:
    """Export MODEL (.tflite) as C sources for a TFLite Micro project (a microcontroller target)."""
    from edgeq.export import ExportOptions, export_c
    from edgeq.targets import load_target

    profile = load_target(target)
    result = export_c(model, profile, output, ExportOptions(format=fmt, arena_margin=margin, force=force))
    if as_json:
        echo_json(result.to_dict())
        return
    for f in result.files:
        echo(f"wrote {f}")
    echo(f"ops: {', '.join(result.ops)} (MicroMutableOpResolver<{len(result.ops)}>)")
    echo(f"kTensorArenaSize = {result.tensor_arena_size} (measured {fmt_bytes(result.arena_bytes)} "
         f"+ {round(result.arena_margin * 100)} %)")
