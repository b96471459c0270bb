"""What a sweep measured: its options, one ``RecipeOutcome`` per recipe, the ``SweepResult`` (``sweep.json``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from edgeq import __version__
from edgeq.calibration import DataOptions
from edgeq.check import CheckOptions
from edgeq.energy import EnergyEstimate
from edgeq.errors import DeviceError, NoRecipeQualifies, UsageError


OBJECTIVES = ("latency", "size", "energy")
DEFAULT_MAX_DROP = 1.0
TIE_TOLERANCE = 0.05  # latencies (and energies) within 5% of the lowest are a tie: run-to-run noise
SWEEP_JSON = "sweep.json"
SWEEP_HTML = "sweep.html"
SCHEMA = "edgeq.sweep/1"


class DeviceLost(DeviceError):
    """The device failed during the sweep (unreachable, lost link, every recipe failed there); ``result`` is
    the sweep with its host-side results (already written), the device's column marked failed. Exit code 4."""

    def __init__(self, message: str, hint: Optional[str], result: "SweepResult") -> None:
        super().__init__(message, hint)
        self.result = result


class NoQualifyingRecipe(NoRecipeQualifies):
    """No recipe qualified; ``result`` is the full sweep (already written), so the table can still be shown."""

    def __init__(self, message: str, hint: Optional[str], result: "SweepResult") -> None:
        super().__init__(message, hint)
        self.result = result


@dataclass(frozen=True)
class SweepOptions:
    """What to sweep and how to choose.

    ``device``: None for host-only; otherwise the ``DeployOptions`` of the device
    (``host=None`` is this machine). ``recipes``: names from the table (None: all).
    """

    output_dir: str = "sweep"
    recipes: Optional[tuple[str, ...]] = None
    recipe_file: Optional[str] = None
    max_drop: float = DEFAULT_MAX_DROP  # accuracy points (agreement points without labels)
    objective: str = "latency"
    data: DataOptions = DataOptions()  # calibration sampling
    eval_samples: Optional[int] = None  # None: every evaluation sample
    device: Any = None  # edgeq.deploy.DeployOptions or None
    inventory: Optional[str] = None  # an inventory file: the first host in it is the device
    check: CheckOptions = CheckOptions()
    unsafe_load: bool = False

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown objective '{self.objective}'", f"choose one of {', '.join(OBJECTIVES)}")
        if not (isinstance(self.max_drop, (int, float)) and math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise UsageError(f"--max-drop must be a number of points >= 0, got {self.max_drop!r}")
        if self.recipes is not None and not self.recipes:
            raise UsageError("--recipes names no recipe", "give names separated by commas, e.g. int8,fp16")


@dataclass(frozen=True)
class RecipeOutcome:
    """Everything measured for one recipe; ``to_dict()`` is one entry of sweep.json's ``recipes``."""

    name: str
    weights_bits: int
    activations: str
    granularity: str
    quantizer: str
    executable: bool
    description: str = ""
    size_bytes: Optional[int] = None  # the .tflite, or the compressed weights of a simulated recipe
    size_basis: str = "tflite"  # "tflite" | "compressed weights (simulated)"
    host: dict[str, Any] = field(default_factory=dict)  # accuracy, agreement, sqnr_db, samples
    check: Optional[dict[str, Any]] = None  # fits, accelerated, ... (None: not checked)
    latency_estimate_ms: Optional[float] = None
    energy: Optional[EnergyEstimate] = None
    device: Optional[dict[str, Any]] = None  # latency_ms {p50, p99}, peak_rss_bytes, accuracy, emulated
    device_error: Optional[str] = None
    error: Optional[str] = None  # the recipe could not be made (quantize/validate failed)
    file: Optional[str] = None  # DIR/<name>.tflite (executable recipes only)
    drop_points: Optional[float] = None  # accuracy (or agreement) points lost against float
    device_drop_points: Optional[float] = None  # the same, from the device's own run
    verdict: str = ""  # "recommended" or why it lost
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return bool(self.check and self.check.get("fits"))

    @property
    def accelerated(self) -> bool:
        return bool(self.check and self.check.get("accelerated"))

    @property
    def latency_ms(self) -> Optional[float]:
        """Device p50 when measured there, else the profile's estimate."""
        if self.device:
            return self.device["latency_ms"]["p50"]
        return self.latency_estimate_ms

    @property
    def latency_label(self) -> str:
        if self.device:
            return "emulated" if self.device.get("emulated") else "device"
        return "estimate"

    @property
    def energy_mj(self) -> Optional[float]:
        return self.energy.total_mj if self.energy else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "weights_bits": self.weights_bits,
            "activations": self.activations,
            "granularity": self.granularity,
            "quantizer": self.quantizer,
            "executable": self.executable,
            "size_bytes": self.size_bytes,
            "size_basis": self.size_basis,
            "host": dict(self.host),
            "check": dict(self.check) if self.check is not None else None,
            "latency_ms": {"value": self.latency_ms, "label": self.latency_label} if self.latency_ms is not None
            else None,
            "latency_estimate_ms": self.latency_estimate_ms,
            "energy_mj": self.energy_mj,
            "energy": self.energy.to_dict() if self.energy else None,
            "device": dict(self.device) if self.device is not None else None,
            "device_error": self.device_error,
            "error": self.error,
            "file": self.file,
            "drop_points": self.drop_points,
            "device_drop_points": self.device_drop_points,
            "verdict": self.verdict,
            "timings_s": dict(self.timings_s),
        }


@dataclass(frozen=True)
class SweepResult:
    """The whole sweep; ``to_dict()`` is ``sweep.json``."""

    model: str
    target: str
    target_kind: str
    objective: str
    max_drop: float
    budget_metric: str  # "accuracy" | "agreement"
    float_reference: dict[str, Any]
    recipes: tuple[RecipeOutcome, ...]
    recommended: Optional[str]
    reason: str
    output_dir: str
    json_path: str
    html_path: str
    recipe_table: str
    calibration: dict[str, Any]
    evaluation: dict[str, Any]
    device: Optional[dict[str, Any]] = None  # host, runtime, emulated
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def get(self, name: str) -> RecipeOutcome:
        for r in self.recipes:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "edgeq_version": __version__,
            "model": self.model,
            "target": self.target,
            "target_kind": self.target_kind,
            "objective": self.objective,
            "max_drop": self.max_drop,
            "budget_metric": self.budget_metric,
            "recommended": self.recommended,
            "reason": self.reason,
            "float": dict(self.float_reference),
            "recipes": [r.to_dict() for r in self.recipes],
            "recipe_table": self.recipe_table,
            "calibration": dict(self.calibration),
            "evaluation": dict(self.evaluation),
            "device": dict(self.device) if self.device is not None else None,
            "energy_note": "energy per inference is an estimate from published power figures of the target "
                           "(see the target profile's [power] comments), never a measurement",
            "timings_s": dict(self.timings_s),
            "warnings": list(self.warnings),
        }

    def sorted_recipes(self) -> list[RecipeOutcome]:
        """The recipes ordered by the objective: the recommendation first, simulated ones last."""
        return sorted(self.recipes, key=lambda r: order_key(r, self.objective, self.recommended))


def objective_value(r: RecipeOutcome, objective: str) -> Optional[float]:
    """The figure ``objective`` ranks by: latency (ms), size (bytes) or energy (mJ); None when unknown."""
    if objective == "latency":
        return r.latency_ms
    if objective == "size":
        return float(r.size_bytes) if r.size_bytes is not None else None
    return r.energy_mj


def order_key(r: RecipeOutcome, objective: str, recommended: Optional[str]) -> tuple:
    """Sort key: the recommendation first, then executable, made, measured recipes by the objective."""
    v = objective_value(r, objective)
    unmeasured = objective != "size" and r.device is None and r.device_error is not None
    return (r.name != recommended, not r.executable, r.error is not None, v is None, unmeasured,
            v if v is not None else 0.0, r.size_bytes or 0, r.name)
