"""``edgeq qat``: quantization-aware training on its own, PTQ and QAT accuracy side by side (parse, call, render).

The budgeted repair (``edgeq convert --max-drop``) lives in ``edgeq convert``;
both call the library (``edgeq.qat``, ``edgeq.repair``), which imports
TensorFlow only when the command runs.
"""

from __future__ import annotations

from typing import Optional

import click

from edgeq.calibration import DEFAULT_SAMPLES, DataOptions, parse_floats
from edgeq.cli import main
from edgeq.cli._common import clear_progress, echo, echo_result, progress_printer


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--train", "train_data", required=True, metavar="DATA",
              help="Labelled training data (.npz with the inputs and 'y') to fine-tune on.")
@click.option("--calib", required=True, metavar="DATA", help="Calibration data for the int8 conversion.")
@click.option("--eval", "eval_data", required=True, metavar="DATA",
              help="Held-out data (labels in 'y') on which PTQ and QAT accuracy are measured.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Output .tflite (the QAT model).")
@click.option("--epochs", type=click.IntRange(min=1, max=1000), default=3, show_default=True,
              help="Epochs of quantization-aware fine-tuning.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Adam learning rate for the fine-tuning.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Training batch size.")
@click.option("--samples", type=click.IntRange(min=1), default=DEFAULT_SAMPLES, show_default=True,
              help="Calibration samples drawn (seeded) from --calib.")
@click.option("--mean", metavar="M[,M...]", help="Normalise samples as (x - mean) / std.")
@click.option("--std", metavar="S[,S...]", help="See --mean.")
@click.option("--scale", type=float, help="Normalise samples as x * scale.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling and training.")
@click.option("--report", "report_path", type=click.Path(path_type=str),
              help="Report JSON [default: OUTPUT with .report.json].")
@click.option("--warn-drop", type=click.FloatRange(min=0), default=5.0, show_default=True, metavar="PTS",
              help="Warn when the QAT model loses more than PTS points of accuracy against float.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def qat(model: str, train_data: str, calib: str, eval_data: str, output: str, epochs: int, learning_rate: float,
        batch_size: int, samples: int, mean: Optional[str], std: Optional[str], scale: Optional[float], seed: int,
        report_path: Optional[str], warn_drop: float, as_json: bool) -> None:
    """Quantization-aware training: fine-tune MODEL with fake quantization, convert to full int8.

    Reports post-training (PTQ) and quantization-aware (QAT) int8 accuracy side
    by side on --eval. A Keras 3 model is rebuilt in tf_keras for
    tensorflow-model-optimization (single-input chains of built-in layers).
    """
    from edgeq.qat import QatOptions, qat_convert

    data = DataOptions(samples=samples, seed=seed, mean=parse_floats(mean, "--mean"),
                       std=parse_floats(std, "--std"), scale=scale)
    show = not as_json
    progress = progress_printer(show)
    result = qat_convert(model, train_data, calib, eval_data, output,
                         QatOptions(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                                    warn_drop=warn_drop),
                         data, progress, report_path)
    clear_progress(show)
    echo_result(as_json, result.to_dict(), result.summary_lines(warnings=False))
    for w in result.warnings:  # on stderr, as convert does: seen with --json and in pipelines too
        echo(f"warning: {w}", err=True)
