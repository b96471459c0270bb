"""The pipeline: ``prepare()`` (what every caller shares before its first recipe) and ``convert()``.

``prepare`` runs the checks, loads the model and the data, exports the float
model and calibrates it, once; ``edgeq convert``, the repair
(``edgeq.repair``), QAT (``edgeq.qat``) and the sweep (``edgeq.sweep``) then
quantize and evaluate as many recipes as they need from what it prepared.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from edgeq.calibration import Dataset, concrete_inputs, load_dataset
from edgeq.convert.load import calibrate
from edgeq.convert.evaluate import forget_reference, validate
from edgeq.convert.load import export_float, load_model, model_format
from edgeq.convert.quantizers import quantize
from edgeq.convert.tfenv import quiet_tensorflow
from edgeq.convert.types import (SCHEMES, Calibration, ConvertOptions, ConvertResult, FloatModel, IoTypes,
                                 LoadedModel, scheme_of)
from edgeq.convert.output import default_report_path, report_for, write
from edgeq.errors import DataError, InputError, UsageError
from edgeq.progress import ProgressCallback, report
from edgeq.recipes import Recipe, RecipeTable, load_recipes, recipe_for_scheme
from edgeq.safeio import refuse_output_over_input


@dataclass(frozen=True)
class Prepared:
    """The loaded model, its data, the float model and its calibration: made once, shared by every recipe."""

    loaded: LoadedModel  # with unknown input dims made concrete (``input_shapes`` says how)
    float_model: FloatModel
    calib: Dataset
    eval: Optional[Dataset]
    train: Optional[Dataset]
    calibration: Optional[Calibration]  # None unless prepare(calibrate=True)
    workdir: str  # a temporary directory, removed when the ``with prepare(...)`` block ends
    input_shapes: tuple[dict[str, Any], ...] = ()
    timings: dict[str, float] = field(default_factory=dict)  # seconds: "load", "export", "calibrate"


@contextlib.contextmanager
def prepare(model: str | Path, calib: str | Path, options: ConvertOptions = ConvertOptions(), *,
            outputs: Sequence[tuple[str, str | Path]] = (), train_data: Optional[str | Path] = None,
            calibrate_now: bool = True, purpose: str = "convert",
            progress: Optional[ProgressCallback] = None) -> Iterator[Prepared]:
    """Checks, load, datasets, export and calibrate, once; yields the ``Prepared`` stages.

    Before any work: the model path is a model edgeq converts, and every output
    (``outputs``: ``(what, path)``) can be written, is not another output and
    does not overwrite an input (a ``UsageError`` naming both paths). Then the
    model is loaded (``options.load``; a PyTorch model takes the layout of
    ``calib``), the calibration data is read (unknown input dims come from
    ``options.input_shapes`` or the data's own shape), then the evaluation data
    (``options.eval_data``, ``options.eval_samples``) and the labelled
    ``train_data`` (a ``DataError`` without labels); the batch-1 float model is
    exported into a temporary work directory (``purpose`` names it), and with
    ``calibrate_now`` the activation ranges are recorded. The work directory is
    removed when the ``with`` block ends.
    """
    t0 = time.perf_counter()
    model_path = Path(model)
    model_format(model_path)
    outs = [(what, Path(path)) for what, path in outputs]
    for what, path in outs:
        check_output(path, what)
    refuse_output_over_input(outs, [("model", model_path), ("calibration data", data_path(calib)),
                                    ("evaluation data", data_path(options.eval_data)),
                                    ("training data", data_path(train_data))])
    timings: dict[str, float] = {}
    with quiet_tensorflow():
        report(progress, "load", str(model_path))
        loaded = load_model(model_path, replace(options.load, layout_data=options.load.layout_data or str(calib)))
        timings["load"] = time.perf_counter() - t0
        loaded, calib_data, input_shapes = _concrete(loaded, calib, options)
        eval_data = None
        if options.eval_data:
            eval_data = load_dataset(options.eval_data, loaded.inputs,
                                     replace(options.data, samples=options.eval_samples), role="evaluation")
        train = None
        if train_data:
            train = load_dataset(train_data, loaded.inputs, replace(options.data, samples=None), role="training")
            if train.labels is None:  # before the minutes of work below
                raise DataError(f"training data {train_data} has no labels",
                                "give an .npz with the inputs and 'y' (the labels) for --train")
    with tempfile.TemporaryDirectory(prefix=f"edgeq-{purpose}-") as work:
        float_model = export_float(loaded, work, progress)
        timings["export"] = float_model.seconds
        calibration = None
        if calibrate_now:
            calibration = calibrate(float_model, calib_data, progress)
            timings["calibrate"] = calibration.seconds
        yield Prepared(loaded, float_model, calib_data, eval_data, train, calibration, work, input_shapes, timings)


def data_path(source: Any) -> Optional[Path]:
    """A data source that is a file or directory on disk (not ``module:function``), else None."""
    if not source or not isinstance(source, (str, Path)):
        return None
    p = Path(source)
    return p if p.exists() else None


def check_output(path: Path, what: str) -> None:
    """``InputError`` unless ``path`` (the ``what`` edgeq writes) can be written: its directory exists."""
    parent = path.parent
    if not parent.exists():
        raise InputError(f"{what} {path}: directory {parent} does not exist",
                         f"create it (mkdir -p {parent}) or choose another path")
    if not parent.is_dir():
        raise InputError(f"{what} {path}: {parent} is not a directory")
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory", "give a file name, e.g. out/model_int8.tflite")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{what} {path}: cannot write to {parent}", "choose a writable directory")


def resolve_for_target(options: ConvertOptions, table: Optional[RecipeTable] = None) -> tuple[Recipe, Any]:
    """The recipe ``options`` ask for, adjusted to ``options.target`` (loaded here), and the target.

    A target without per-channel kernels gets per-tensor int8; a scheme the
    target does not run is a ``UsageError`` before anything is converted.
    """
    table = table or load_recipes(options.recipes_file)
    recipe = options.resolved_recipe(table)
    if not options.target:
        return recipe, None
    try:
        from edgeq.targets import load_target
    except ImportError:
        from edgeq.errors import TargetError

        raise TargetError(f"cannot use target '{options.target}': target profiles are not installed",
                          "reinstall edgeq, or convert without --target") from None
    target = load_target(options.target)
    scheme = scheme_of(recipe)
    if scheme in SCHEMES and not target.supports_scheme(scheme):
        raise UsageError(f"target {target.name} does not support --scheme {scheme}",
                         "use --scheme int8 for this target")
    if options.recipe is None and recipe.activations == "int8":
        recipe = table.get(recipe_for_scheme("int8", bool(target.per_channel)))
    return recipe, target


def convert(
    model: str | Path,
    calib: str | Path,
    output: str | Path,
    options: ConvertOptions = ConvertOptions(),
    progress: Optional[ProgressCallback] = None,
) -> ConvertResult:
    """Convert ``model`` with the chosen recipe (full int8 per-channel by default) to ``output``; write the report.

    Runs the stages: prepare (load, export_float, calibrate for static recipes),
    quantize, validate (with ``options.eval_data``), write. Raises ``ModelError`` /
    ``DataError`` / ``InputError`` for bad input, ``ConversionError`` when the
    recipe cannot be made, ``RecipeError`` for an unknown or simulated recipe,
    and ``UsageError`` / ``TargetError`` for options that do not go together.
    The check against ``options.target`` is not run here (the CLI composes it).
    Nothing is written unless the whole conversion succeeds.
    """
    t0 = time.perf_counter()
    recipe, _target = resolve_for_target(options)
    io_types = IoTypes(options.input_type, options.output_type)
    io_types.resolve(recipe, None if options.recipe else options.scheme)
    out_path = Path(output)
    report_path = Path(options.report_path) if options.report_path else default_report_path(out_path)
    with quiet_tensorflow(), prepare(model, calib, options, outputs=(("output", out_path), ("report", report_path)),
                                     calibrate_now=recipe.needs_calibration, progress=progress) as p:
        timings = dict(p.timings)
        quantized = quantize(p.float_model, p.calibration, recipe, io_types, progress)
        timings["convert"] = quantized.seconds
        validation = None
        if p.eval is not None:
            validation = validate(quantized, p.float_model, p.eval, p.calibration, options.worst_layers, progress)
            forget_reference(p.float_model)
            timings["evaluate"] = validation.seconds
    # The report still says which samples were given, even when the recipe needs no ranges.
    calibration = p.calibration if p.calibration is not None else Calibration(p.calib, b"")
    timings["total"] = time.perf_counter() - t0
    result = report_for(p.loaded, p.float_model, calibration, quantized, validation, out_path, report_path,
                        options.data, timings, warn_drop=options.warn_drop, input_shapes=p.input_shapes)
    return write(quantized, result)


def _concrete(loaded: LoadedModel, calib: str | Path,
              options: ConvertOptions) -> tuple[LoadedModel, Dataset, tuple[dict[str, Any], ...]]:
    """The calibration data, and ``loaded`` with unknown input dims set from ``--input-shape`` or that data.

    A model with ``None`` height and width would otherwise be exported, calibrated,
    checked and measured at a placeholder 1x1; the report's ``input_shapes`` says
    which shape was used and where it came from.
    """
    inputs, given = concrete_inputs(loaded.inputs, options.input_shapes)
    calib_data = load_dataset(calib, inputs, options.data, role="calibration")
    inputs, found = concrete_inputs(inputs, (), calib_data)
    records = {r["name"]: r for r in found}
    records.update({r["name"]: r for r in given})
    # The model's own shapes in every record (the second pass saw the first pass's concrete ones).
    for spec in loaded.inputs:
        if spec.name in records:
            records[spec.name]["model_shape"] = [-1 if d is None else d for d in spec.shape]
    return replace(loaded, inputs=inputs), calib_data, tuple(records[s.name] for s in inputs if s.name in records)
