"""``edgeq targets``, ``edgeq check`` and ``edgeq export`` (parse, call one library function, render)."""

from __future__ import annotations

from typing import Optional

import click

from edgeq.cli import main
from edgeq.cli._common import echo, echo_json
from edgeq.errors import ExitCode


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def targets(as_json: bool) -> None:
    """List the shipped target profiles (name, kind, RAM, flash, backend)."""
    from edgeq.targets import list_targets

    profiles = list_targets()
    if as_json:
        echo_json([p.to_dict() for p in profiles])
        return
    rows = [("NAME", "KIND", "RAM", "FLASH", "RUNTIME", "BACKEND", "DESCRIPTION")]
    for p in profiles:
        ram = _size(p.ram_bytes) + (f" (+{_size(p.psram_bytes)} PSRAM)" if p.psram_bytes else "")
        rows.append((p.name, p.kind, ram, _size(p.flash_bytes), p.runtime, p.backend, p.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--target", "-t", "target_name", required=True, metavar="NAME|FILE",
              help="Target profile (see `edgeq targets`) or a profile TOML file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--no-measure", is_flag=True, help="Skip loading the model in the target's runtime (no RAM figure).")
@click.option("--timeout", type=click.FloatRange(min=1), default=120, show_default=True,
              help="Seconds the runtime child may take to load and run the model.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:1xHxWxC",
              help="Shape for an input with unknown dims (e.g. image:1x96x96x3; the name may be left out for a "
                   "single input): MACs and memory are computed there [default: the placeholder in the file]. "
                   "Repeatable.")
def check(model: str, target_name: str, as_json: bool, no_measure: bool, timeout: float,
          input_shapes: tuple[str, ...]) -> None:
    """Check whether MODEL (.tflite) fits and runs on a target.

    Reports every problem at once: unsupported ops and op x type pairs, slow
    fallback kernels, float tensors on integer-only targets, flash and RAM
    over budget; plus MACs and a latency estimate. Exit 0 fits, 3 does not fit.
    """
    from edgeq.calibration import parse_input_shape
    from edgeq.check import CheckOptions, check_model
    from edgeq.targets import load_target
    from edgeq.tflite_file import read_tflite

    shapes = tuple(parse_input_shape(t) for t in input_shapes)
    profile = load_target(target_name)
    result = check_model(read_tflite(model), profile,
                         CheckOptions(measure=not no_measure, timeout_s=timeout, input_shapes=shapes))
    if as_json:
        echo_json(result.to_dict())
    else:
        for line in result.summary_lines():
            echo(line)
    if not result.fits:
        click.get_current_context().exit(int(ExitCode.DOES_NOT_FIT))


@main.command(name="export")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--target", "-t", "target_name", required=True, metavar="NAME|FILE",
              help="A microcontroller target profile (e.g. cortex-m4).")
@click.option("--format", "fmt", type=click.Choice(["c"]), default="c", show_default=True,
              help="c: model_data.h/.cc and op_resolver.h for TFLite Micro.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=str),
              help="Directory to write the files into (created if missing).")
@click.option("--margin", type=click.FloatRange(min=0, max=10), default=0.20, show_default=True,
              help="Arena margin added to the measured arena for kTensorArenaSize.")
@click.option("--force", is_flag=True, help="Overwrite existing files in the output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def export_cmd(model: str, target_name: str, fmt: str, out_dir: str, margin: float, force: bool,
               as_json: bool) -> None:
    """Export MODEL (.tflite) as C sources for a TFLite Micro project."""
    from edgeq.export import ExportOptions, export_c
    from edgeq.targets import load_target

    profile = load_target(target_name)
    result = export_c(model, profile, out_dir, ExportOptions(format=fmt, arena_margin=margin, force=force))
    if as_json:
        echo_json(result.to_dict())
        return
    for f in result.files:
        echo(f"wrote {f}")
    echo(f"ops: {', '.join(result.ops)} (MicroMutableOpResolver<{len(result.ops)}>)")
    echo(f"kTensorArenaSize = {result.tensor_arena_size} (measured {result.arena_bytes} bytes "
               f"+ {round(result.arena_margin * 100)}%)")
