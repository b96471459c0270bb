"""``edgeq qat``: quantization-aware training on its own, PTQ and QAT accuracy side by side (parse, call, render).

The budgeted repair (``edgeq convert --max-drop``) lives in ``edgeq convert``;
both call the library (``edgeq.qat``, ``edgeq.repair``), which imports
TensorFlow only when the command runs.
"""

from __future__ import annotations

from typing import Optional

import click

from edgeq.cli import main
from edgeq.cli._common import clear_progress, echo, echo_result, progress_printer
from edgeq.cli._options import (DataArgs, calib_option, eval_option, json_option, output_file_option,
                                sampling_options, train_option)


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@train_option(required=True)
@calib_option(required=True)
@eval_option(required=True)
@output_file_option("the QAT model (.tflite)", required=True)
@click.option("--epochs", type=click.IntRange(min=1, max=1000), default=3, show_default=True,
              help="Epochs of quantization-aware fine-tuning.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Adam learning rate for the fine-tuning.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Training batch size.")
@sampling_options
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
              help="Report JSON [default: OUTPUT with .report.json].")
@click.option("--warn-drop", type=click.FloatRange(min=0), default=5.0, show_default=True, metavar="PTS",
              help="Warn when the QAT model loses more than PTS points of accuracy against float.")
@json_option
def qat(model: str, train_data: str, calib: str, eval_data: str, output: str, epochs: int, learning_rate: float,
        batch_size: int, data: DataArgs, report_path: Optional[str], warn_drop: float, as_json: bool) -> None:
    """Quantization-aware training: fine-tune MODEL with fake quantization, convert to full int8.

    Reports post-training (PTQ) and quantization-aware (QAT) int8 accuracy side
    by side on --eval. A Keras 3 model is rebuilt in tf_keras for
    tensorflow-model-optimization (single-input chains of built-in layers).
    """
    from edgeq.outdir import prepare_file
    from edgeq.qat import QatOptions, qat_convert

    options = data.options()
    prepare_file(output)
    if report_path:
        prepare_file(report_path)
    show = not as_json
    progress = progress_printer(show)
    result = qat_convert(model, train_data, calib, eval_data, output,
                         QatOptions(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                                    seed=data.seed, warn_drop=warn_drop),
                         options, progress, report_path)
    clear_progress(show)
    echo_result(as_json, result.to_dict(), result.summary_lines(warnings=False))
    for w in result.warnings:  # on stderr, as convert does: seen with --json and in pipelines too
        echo(f"warning: {w}", err=True)
