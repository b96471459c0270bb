"""The conversion's options and its frozen results, one per stage (no TensorFlow, no stage logic).

``LoadOptions`` / ``ConvertOptions`` / ``IoTypes`` say what to do; ``LoadedModel``
-> ``FloatModel`` -> ``Calibration`` -> ``QuantizedModel`` -> ``Validation`` ->
``ConvertResult`` are what the stages return (``edgeq.convert`` lists which
module runs which stage). ``ConvertResult.to_dict()`` is the report JSON
(schema ``edgeq.convert/1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from edgeq import __version__
from edgeq.calibration import DataOptions, Dataset, InputSpec
from edgeq.errors import RecipeError, UsageError
from edgeq.recipes import Recipe, RecipeTable, load_recipes, recipe_for_scheme
from edgeq.tflite_file import TfliteModel

SCHEMA = "edgeq.convert/1"

SCHEMES = ("int8", "int16x8")
IO_TYPES = ("int8", "uint8", "int16", "float32")
# Model input/output types each activation kind allows; the first is the default.
_IO_ALLOWED = {"int8": ("int8", "uint8", "float32"), "int16": ("int16", "float32")}
# Ops Flatten/Reshape add when the batch size is dynamic; microcontroller runtimes dislike them.
DYNAMIC_SHAPE_OPS = ("SHAPE", "STRIDED_SLICE", "PACK")
SIGNATURE = "serving_default"
# Points of accuracy (or top-1 agreement) a conversion may lose before the result warns that it collapsed.
DEFAULT_WARN_DROP = 5.0


# ---------------------------------------------------------------- options and results


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model. ``unsafe_load`` lets a model run the Python code it carries (Lambda layers)."""

    unsafe_load: bool = False
    # PyTorch models (edgeq.torch_convert): "nchw" | "nhwc" inputs; None: the layout of ``layout_data``.
    layout: Optional[str] = None
    layout_data: Optional[str] = None


@dataclass(frozen=True)
class IoTypes:
    """Model input and output types; None picks the recipe's default (int8, int16 or float32)."""

    input: Optional[str] = None
    output: Optional[str] = None

    def resolve(self, recipe: Recipe, scheme_name: Optional[str] = None) -> tuple[str, str]:
        """(input type, output type) for ``recipe``; ``UsageError`` when a type does not go with it."""
        if recipe.full_integer:
            allowed = _IO_ALLOWED[recipe.activations]
        else:
            allowed = ("float32",)
        what = f"--scheme {scheme_name}" if scheme_name else f"recipe {recipe.name}"
        out = []
        for which, value in (("input", self.input), ("output", self.output)):
            value = value or allowed[0]
            if value not in allowed:
                raise UsageError(f"--{which}-type {value} does not go with {what}",
                                 f"choose one of {', '.join(allowed)}")
            out.append(value)
        return out[0], out[1]


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``convert`` needs besides the model, the calibration data and the output path."""

    scheme: str = "int8"  # "int8" | "int16x8": the older way to name recipe "int8" / "int16x8"
    input_type: Optional[str] = None  # None: the recipe's default (int8; int16 with int16x8; else float32)
    output_type: Optional[str] = None
    data: DataOptions = DataOptions()  # calibration sampling and normalisation
    eval_data: Optional[str] = None  # a data source with held-out samples (and labels)
    eval_samples: Optional[int] = None  # None: every evaluation sample
    # A target profile name or file: convert() applies its conversion constraints (per-channel,
    # schemes it runs); the check against it is composed by the caller (the CLI).
    target: Optional[str] = None
    per_channel: bool = True  # per-channel weights (ANCHORS: the TFLite int8 convention)
    report_path: Optional[str] = None  # default: OUT.report.json beside the model
    worst_layers: int = 5  # how many layers to list by quantization error (0: skip the debugger)
    recipe: Optional[str] = None  # a recipe name; None: from scheme and per_channel
    recipes_file: Optional[str] = None  # a user's recipe table; None: the shipped one
    load: LoadOptions = LoadOptions()
    warn_drop: float = DEFAULT_WARN_DROP  # warn when --eval shows more lost than this many points
    # Concrete shapes for inputs with unknown dims ((input name or None for the only input, shape));
    # without one, the calibration data's shape is used (edgeq.calibration.concrete_inputs).
    input_shapes: tuple[tuple[Optional[str], tuple[int, ...]], ...] = ()

    def resolved_recipe(self, table: Optional[RecipeTable] = None) -> Recipe:
        """The recipe these options ask for (``RecipeError`` for an unknown or simulated one)."""
        if self.scheme not in SCHEMES:
            raise UsageError(f"unknown scheme '{self.scheme}'", f"choose one of {', '.join(SCHEMES)}")
        table = table or load_recipes(self.recipes_file)
        if self.recipe is None:
            return table.get(recipe_for_scheme(self.scheme, self.per_channel))
        recipe = table.get(self.recipe)
        if not recipe.executable:
            runnable = ", ".join(r.name for r in table.executable())
            raise RecipeError(f"recipe '{recipe.name}' is simulated: no runtime here executes it, so it is "
                              f"never written as a .tflite", f"measure it with edgeq sweep, or choose one of {runnable}")
        return recipe

    def resolved_io(self, recipe: Optional[Recipe] = None) -> tuple[str, str]:
        """(input type, output type) after applying the recipe's defaults and checking them."""
        recipe = recipe or self.resolved_recipe()
        return IoTypes(self.input_type, self.output_type).resolve(recipe, None if self.recipe else self.scheme)


@dataclass(frozen=True)
class IoQuant:
    """A model input or output of the converted model."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    scale: Optional[float]
    zero_point: Optional[int]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "scale": self.scale, "zero_point": self.zero_point}


@dataclass(frozen=True)
class OutputFidelity:
    """Float vs quantized model on the evaluation data, for one output."""

    name: str
    samples: int
    max_abs_error: float
    sqnr_db: Optional[float]  # None when float and quantized outputs are identical
    top1_agreement: Optional[float] = None  # classifier and binary outputs only
    accuracy_float: Optional[float] = None  # with class-id labels (per pixel for segmentation)
    accuracy_quant: Optional[float] = None
    kind: str = "classifier"  # edgeq.fidelity.output_kind: classifier | segmentation | binary | regression
    mean_abs_error: Optional[float] = None
    pixel_agreement: Optional[float] = None  # segmentation: argmax over the last axis, per pixel
    mae_float: Optional[float] = None  # regression with labels: mean |output - label|
    mae_quant: Optional[float] = None
    labels: Optional[str] = None  # which labels were used ("y", "y_<output>") or None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "samples": self.samples, "labels": self.labels,
            "top1_agreement": self.top1_agreement, "pixel_agreement": self.pixel_agreement,
            "accuracy_float": self.accuracy_float, "accuracy_int": self.accuracy_quant,
            "mae_float": self.mae_float, "mae_int": self.mae_quant,
            "max_abs_error": self.max_abs_error, "mean_abs_error": self.mean_abs_error, "sqnr_db": self.sqnr_db,
        }


@dataclass(frozen=True)
class LayerError:
    """Quantization error of one layer's output, from the quantization debugger."""

    tensor: str
    layer: Optional[str]
    op: Optional[str]
    rmse_over_scale: float  # RMS error in units of the tensor's quantization step (about 0.29 is ideal)
    max_abs_error: float
    mean_squared_error: float

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "layer": self.layer, "op": self.op,
                "rmse_over_scale": self.rmse_over_scale, "max_abs_error": self.max_abs_error,
                "mean_squared_error": self.mean_squared_error}


@dataclass(frozen=True)
class LoadedModel:
    """A loaded float model: where it came from, its inputs and layer names, and how to export it.

    ``model`` is the Keras 3 or tf_keras model (the repair stages rewrite it), or
    the loaded SavedModel object.
    """

    path: str
    fmt: str  # "keras" | "h5" | "saved_model"
    loader: str  # "keras" | "tf_keras" | "saved_model"
    model_name: str
    inputs: tuple[InputSpec, ...]
    layer_names: tuple[str, ...]
    float_weight_bytes: int
    model: Any = field(repr=False, compare=False)
    # export(out_dir, inputs) writes a batch-1 SavedModel traced at ``inputs`` (``inputs``, made concrete).
    export: Callable[[str, Sequence[InputSpec]], None] = field(repr=False, compare=False)
    # PyTorch models: edgeq.torch_convert.TorchStages, whose export_float / calibrate / quantize /
    # reference replace the TensorFlow stages (no TensorFlow on that path). None for Keras and SavedModel.
    stages: Optional[Any] = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class FloatModel:
    """The batch-1 float model: a SavedModel directory (inside the caller's workdir) and its float ``.tflite``."""

    loaded: LoadedModel
    saved_model_dir: str
    content: bytes = field(repr=False)
    tflite: TfliteModel = field(repr=False)
    seconds: float = 0.0
    notes: tuple[str, ...] = ()  # what export changed on the way (e.g. recurrent layers unrolled)

    @property
    def size_bytes(self) -> int:
        return len(self.content)


@dataclass(frozen=True)
class Calibration:
    """Activation ranges recorded once on the calibration samples, reused by every static recipe.

    ``calibrated`` is the float ``.tflite`` with TensorFlow's recorded min/max;
    litert-quantizer's own ranges are recorded on first use and kept in ``litert``.
    """

    dataset: Dataset = field(repr=False)
    calibrated: bytes = field(repr=False)
    seconds: float = 0.0
    litert: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def samples(self) -> int:
        return len(self.dataset)


@dataclass(frozen=True)
class QuantizedModel:
    """One recipe applied: the ``.tflite`` bytes, parsed, and its I/O types."""

    recipe: Recipe
    content: bytes = field(repr=False)
    tflite: TfliteModel = field(repr=False)
    input_type: str
    output_type: str
    static_shapes: bool
    keys: dict[int, str] = field(default_factory=dict, repr=False, compare=False)  # tensor -> signature name
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def size_bytes(self) -> int:
        return len(self.content)

    @property
    def per_channel(self) -> bool:
        return self.recipe.per_channel

    def io(self) -> tuple[tuple[IoQuant, ...], tuple[IoQuant, ...]]:
        return io_of(self.tflite, self.keys)


@dataclass(frozen=True)
class Validation:
    """Quantized against float on the evaluation data."""

    fidelity: tuple[OutputFidelity, ...]
    evaluation: dict[str, Any]
    worst_layers: tuple[LayerError, ...] = ()
    ranges: Optional[dict[str, Any]] = None  # how calibration ranges settle (with a Calibration)
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0

    def accuracy_drop(self) -> Optional[float]:
        """Points of accuracy lost (float - quantized, x100) on the first output with labels; else None."""
        for f in self.fidelity:
            if f.accuracy_float is not None and f.accuracy_quant is not None:
                return 100.0 * (f.accuracy_float - f.accuracy_quant)
        return None

    def drop_warning(self, threshold: float = DEFAULT_WARN_DROP) -> Optional[str]:
        """A warning when the quantized model lost more than ``threshold`` points (accuracy, else agreement)."""
        drop, metric = self.accuracy_drop(), "accuracy"
        if drop is None:
            drop, metric = self.agreement_drop(), "agreement with the float model"
        return collapse_warning(drop, metric, threshold)

    def agreement_drop(self) -> Optional[float]:
        """100 - top-1 (or per-pixel) agreement in points on the first class-scoring output; else None."""
        for f in self.fidelity:
            agreement = f.top1_agreement if f.top1_agreement is not None else f.pixel_agreement
            if agreement is not None:
                return 100.0 * (1.0 - agreement)
        return None


def collapse_warning(drop: Optional[float], metric: str, threshold: float = DEFAULT_WARN_DROP,
                     remedy: str = "re-run with --max-drop PTS to repair it, and see worst_layers in the report"
                     ) -> Optional[str]:
    """The warning for a quantized model that lost ``drop`` points of ``metric`` (None: within ``threshold``)."""
    if drop is None or not drop > threshold:
        return None
    return (f"the quantized model lost {drop:.1f} points of {metric} against float (more than {threshold:g}): "
            f"it has collapsed or nearly so; {remedy}")


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert`` wrote and measured; ``to_dict()`` is the report JSON."""

    output: str
    report_path: str
    model: str
    model_format: str  # "keras" | "h5" | "saved_model"
    loader: str  # "keras" | "tf_keras" | "saved_model"
    scheme: str
    input_type: str
    output_type: str
    per_channel: bool
    calibration: dict[str, Any]
    float_bytes: int
    float_bytes_source: str  # "converted" (measured) | "estimated" (from the float weights)
    quant_bytes: int
    ops: dict[str, int]
    static_shapes: bool
    inputs: tuple[IoQuant, ...]
    outputs: tuple[IoQuant, ...]
    fidelity: Optional[tuple[OutputFidelity, ...]] = None
    evaluation: Optional[dict[str, Any]] = None
    worst_layers: tuple[LayerError, ...] = ()
    target: Optional[str] = None
    check: Optional[dict[str, Any]] = None
    check_summary: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    timings_s: dict[str, float] = field(default_factory=dict)
    sha256: str = ""
    recipe: Optional[Recipe] = None
    # Inputs with unknown dims and the concrete shape the model was exported at (and where it came from).
    input_shapes: tuple[dict[str, Any], ...] = ()

    @property
    def size_ratio(self) -> float:
        return self.quant_bytes / self.float_bytes if self.float_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "edgeq_version": __version__,
            "model": {"path": self.model, "format": self.model_format, "loader": self.loader},
            "output": {"path": self.output, "sha256": self.sha256},
            "recipe": self.recipe.to_dict() if self.recipe is not None else None,
            "scheme": self.scheme,
            "input_type": self.input_type,
            "output_type": self.output_type,
            "per_channel": self.per_channel,
            "calibration": self.calibration,
            "size": {
                "float32_bytes": self.float_bytes,
                "float32_bytes_source": self.float_bytes_source,
                "quantized_bytes": self.quant_bytes,
                "ratio": round(self.size_ratio, 4),
            },
            "ops": self.ops,
            "static_shapes": self.static_shapes,
            "inputs": [i.to_dict() for i in self.inputs],
            "input_shapes": list(self.input_shapes),
            "outputs": [o.to_dict() for o in self.outputs],
            "evaluation": self.evaluation,
            "fidelity": [f.to_dict() for f in self.fidelity] if self.fidelity is not None else None,
            "worst_layers": [w.to_dict() for w in self.worst_layers],
            "target": self.target,
            "check": self.check,
            "warnings": list(self.warnings),
            "timings_s": self.timings_s,
        }


def scheme_of(recipe: Recipe) -> str:
    """The older ``--scheme`` name of a full-integer recipe ("int8" | "int16x8"); else the recipe's name."""
    if recipe.full_integer:
        return "int16x8" if recipe.activations == "int16" else "int8"
    return recipe.name


def io_of(model: TfliteModel, keys: Optional[dict[int, str]] = None) -> tuple[tuple[IoQuant, ...], tuple[IoQuant, ...]]:
    """The model's inputs and outputs, named by ``keys`` (tensor -> signature name) where given."""
    keys = keys or {}

    def conv(t: Any) -> IoQuant:
        q = t.quantization
        scale = q.scale[0] if q and q.scale else None
        zp = q.zero_point[0] if q and q.zero_point else None
        name = t.name.split(":")[0]
        if name.startswith(SIGNATURE + "_"):
            name = name[len(SIGNATURE) + 1 :]
        return IoQuant(keys.get(t.index, name), t.dtype, tuple(t.shape_signature), scale, zp)

    return tuple(conv(t) for t in model.inputs), tuple(conv(t) for t in model.outputs)
