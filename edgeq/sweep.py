"""Try every quantization level on a target and choose one by measurement.

``sweep()`` runs the conversion stages of :mod:`edgeq.convert` once where they
can be shared (load, float export, calibration) and once per recipe where they
cannot (quantize, validate), checks each result against the target
(:func:`edgeq.check.check_model`: fits, fast kernels), estimates energy
(:mod:`edgeq.energy`) and, with a device, measures every executable recipe that
fits there in one session (:func:`edgeq.deploy.measure_models`). Simulated
recipes (levels no runtime here executes) only report accuracy and compressed
size; they are never written and never recommended.

The recommendation is the best qualifying recipe by the objective; every
other recipe carries the reason it lost. No TensorFlow at import: the
conversion stages import it when they run.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from edgeq import __version__
from edgeq.calibration import DataOptions
from edgeq.check import CheckOptions, CheckResult, check_model
from edgeq.energy import EnergyEstimate, estimate_energy
from edgeq.errors import (ConnectError, ConversionError, DeviceError, EdgeqError, InputError, NoRecipeQualifies,
                          RecipeError, UsageError)
from edgeq.progress import ProgressCallback, report
from edgeq.safeio import atomic_write
from edgeq.targets import TargetProfile, load_target

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
        return sorted(self.recipes, key=lambda r: _order_key(r, self.objective, self.recommended))


# --------------------------------------------------------------------------- choosing


def _objective_value(r: RecipeOutcome, objective: str) -> Optional[float]:
    if objective == "latency":
        return r.latency_ms
    if objective == "size":
        return float(r.size_bytes) if r.size_bytes is not None else None
    return r.energy_mj


def _order_key(r: RecipeOutcome, objective: str, recommended: Optional[str]) -> tuple:
    v = _objective_value(r, objective)
    unmeasured = objective != "size" and r.device is None and r.device_error is not None
    return (r.name != recommended, not r.executable, r.error is not None, v is None, unmeasured,
            v if v is not None else 0.0, r.size_bytes or 0, r.name)


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "?"
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MB"


def _fmt_objective(v: float, objective: str) -> str:
    if objective == "latency":
        return f"{v:.3g} ms"
    if objective == "size":
        return _fmt_bytes(v)
    return f"{v:.3g} mJ"


def choose(outcomes: Sequence[RecipeOutcome], objective: str, max_drop: float,
           measured_on_device: bool) -> tuple[tuple[RecipeOutcome, ...], Optional[str], str]:
    """Pick the best qualifying recipe and give every other one its reason.

    Qualifies: executable, made without error, fits the target, within
    ``max_drop`` points, and (with a device) measured there. Among those, the
    accelerated ones win over the rest; then the objective decides (ties: the
    smaller file, then the name).
    """
    def disqualified(r: RecipeOutcome) -> Optional[str]:
        if not r.executable:
            return "simulated: no runtime here executes this level (shown for its accuracy and size only)"
        if r.error:
            return f"could not be made: {r.error}"
        if not r.fits:
            codes = ", ".join(sorted({v["code"] for v in (r.check or {}).get("violations", [])})) or "check failed"
            return f"does not fit the target ({codes})"
        if r.drop_points is None:
            return "over budget: accuracy could not be measured"
        if r.drop_points > max_drop + 1e-9:
            return f"over budget: loses {r.drop_points:.2f} points (max {max_drop:g})"
        if measured_on_device and r.device is None:
            return f"failed on the device: {r.device_error or 'not measured'}"
        if r.device_drop_points is not None and r.device_drop_points > max_drop + 1e-9:
            return (f"over budget on the device: loses {r.device_drop_points:.2f} points there "
                    f"({r.drop_points:.2f} on the host): the device's runtime computes this recipe differently")
        if _objective_value(r, objective) is None:
            return f"no {objective} figure"
        return None

    reasons = {r.name: disqualified(r) for r in outcomes}
    candidates = [r for r in outcomes if reasons[r.name] is None]
    accelerated = [r for r in candidates if r.accelerated]
    for r in candidates:
        if accelerated and not r.accelerated:
            reasons[r.name] = (f"not accelerated: {r.check.get('macs_share_pct', 0) if r.check else 0}% of the MACs "
                               "run on the target's fast kernels, and an accelerated recipe qualifies")
    pool = accelerated or candidates
    best: Optional[RecipeOutcome] = None
    if pool:
        # Ties on the objective (estimates of recipes with the same MACs are equal): fewer points lost, then
        # the smaller file, then the name.
        # Latency and energy within TIE_TOLERANCE of the fastest count as a tie (timing noise); then fewer
        # points lost, then the smaller file, then the name decide.
        tol = 0.0 if objective == "size" else TIE_TOLERANCE
        lowest = min(_objective_value(r, objective) for r in pool)  # type: ignore[type-var]
        tied = [r for r in pool if _objective_value(r, objective) <= lowest * (1 + tol)]  # type: ignore[operator]
        best = min(tied, key=lambda r: (r.drop_points, r.size_bytes or 0, _objective_value(r, objective), r.name))
        bv = _objective_value(best, objective)
        for r in pool:
            if r is best:
                continue
            v = _objective_value(r, objective)
            if r in tied:
                same = {"latency": "as fast", "size": "as small", "energy": "same energy"}[objective]
                if tol:
                    same += f" within {tol:.0%}"
                if (r.drop_points or 0) > (best.drop_points or 0):
                    reasons[r.name] = (f"{same} ({_fmt_objective(v, objective)}) but less accurate: loses "
                                       f"{r.drop_points:.2f} points vs {best.drop_points:.2f}")
                elif (r.size_bytes or 0) > (best.size_bytes or 0):
                    reasons[r.name] = f"{same} ({_fmt_objective(v, objective)}) but a bigger file"
                else:
                    reasons[r.name] = f"{same} ({_fmt_objective(v, objective)}); tie broken by name"
            else:
                word = {"latency": "slower", "size": "bigger", "energy": "uses more energy"}[objective]
                reasons[r.name] = f"{word}: {_fmt_objective(v, objective)} vs {_fmt_objective(bv, objective)}"
        reasons[best.name] = None
    out = []
    for r in outcomes:
        verdict = "recommended" if best is not None and r.name == best.name else reasons[r.name] or ""
        out.append(replace(r, verdict=verdict))
    if best is None:
        why = "; ".join(f"{r.name}: {r.verdict}" for r in out if r.executable) or "no executable recipe was swept"
        return tuple(out), None, f"no executable recipe qualifies ({why})"
    basis = {"latency": "lowest " + ("measured p50 latency" if best.device else "estimated latency"),
             "size": "smallest file", "energy": "least energy per inference (estimate)"}[objective]
    drop = f"{best.drop_points:.2f}" if best.drop_points is not None else "?"
    return tuple(out), best.name, (f"{best.name}: {basis} ({_fmt_objective(_objective_value(best, objective), objective)})"
                                   f" among recipes that fit {'and are accelerated ' if accelerated else ''}"
                                   f"within {max_drop:g} points (loses {drop})")


# --------------------------------------------------------------------------- the pipeline


def _select(table: Any, names: Optional[Sequence[str]]) -> list[Any]:
    if names is None:
        return list(table.recipes)
    out = []
    for n in names:
        n = n.strip()
        if not n:
            continue
        try:
            r = table.get(n)
        except RecipeError as exc:
            raise RecipeError(f"{table.source}: {exc.message}", exc.hint) from None
        if r not in out:
            out.append(r)
    if not out:
        raise UsageError("--recipes names no recipe", f"choose from {', '.join(table.names())}")
    return out


def _runtime_finding(recipe: Any, target: TargetProfile) -> Optional[dict[str, Any]]:
    """A violation when the target's runtime is not among the runtimes that execute the recipe."""
    if target.runtime in recipe.runtimes:
        return None
    names = {"tflm": "TFLite Micro", "litert": "LiteRT"}
    return {"code": "runtime", "message": f"{names.get(target.runtime, target.runtime)} does not execute "
            f"{recipe.name} ({recipe.weights_bits}-bit weights, {recipe.activations} activations) on {target.name}",
            "hint": f"runtimes that execute it: {', '.join(recipe.runtimes) or 'none'}"}


def _check_dict(c: CheckResult, extra: Optional[dict[str, Any]]) -> dict[str, Any]:
    violations = [f.to_dict() for f in c.violations] + ([extra] if extra else [])
    a = c.acceleration or {}
    m = c.memory
    return {
        "fits": c.fits and extra is None,
        "accelerated": bool(a.get("accelerated")),
        "all_ops_accelerated": bool(a.get("all_ops")),
        "macs_share_pct": a.get("macs_share_pct"),
        "acceleration_basis": a.get("basis"),
        "off_fast_path": a.get("off_fast_path", []),
        "violations": violations,
        "warnings": [f.to_dict() for f in c.warnings],
        "scheme": c.scheme,
        "macs": c.macs.get("total"),
        "flash_needed_bytes": m.get("flash_needed_bytes"),
        "arena_bytes": m.get("arena_bytes"),
        "recommended_arena_bytes": m.get("recommended_arena_bytes"),
        "interpreter_bytes": m.get("interpreter_bytes"),
        "latency_estimate_ms": c.estimate.get("latency_ms"),
    }


def _device_dict(d: Any) -> dict[str, Any]:
    lat = d.latency_ms
    emulation = (d.device or {}).get("emulation") or {}
    return {
        "host": d.host,
        "latency_ms": {"p50": round(lat.p50, 6), "p90": round(lat.p90, 6), "p99": round(lat.p99, 6),
                       "runs": lat.count},
        "peak_rss_bytes": d.peak_rss_bytes,
        "accuracy": d.accuracy,
        "agreement_with_host": (d.agreement or {}).get("top1"),
        "runtime": {k: d.runtime.get(k) for k in ("name", "version", "xnnpack", "xnnpack_active", "threads")
                    if k in d.runtime},
        "arch": (d.device or {}).get("arch"),
        "emulated": bool(emulation.get("emulated")),
        "delegate": d.delegate,  # what the delegate really took on the device (applied, nodes)
    }


def sweep(model: str | Path, calib: str | Path, eval: str | Path, target: str | TargetProfile,
          options: SweepOptions = SweepOptions(), progress: Optional[ProgressCallback] = None) -> SweepResult:
    """Sweep the recipes for ``model`` on ``target``; write DIR/sweep.json, DIR/sweep.html, DIR/<recipe>.tflite.

    Raises ``NoRecipeQualifies`` (after writing the reports) when no executable
    recipe fits within the budget; ``RecipeError`` for unknown recipes or a bad
    recipe file; the conversion's and the device's errors as they are.
    """
    from edgeq import convert as stages  # the conversion stages (TensorFlow inside their functions)
    from edgeq.recipes import load_recipes

    options.validate()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    profile = target if isinstance(target, TargetProfile) else load_target(str(target))
    table = load_recipes(options.recipe_file)
    recipes = _select(table, options.recipes)
    out_dir = Path(options.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    device_opts = _device_options(options)
    warnings: list[str] = []

    with tempfile.TemporaryDirectory(prefix="edgeq-sweep-") as work:
        workdir = Path(work)
        t = time.perf_counter()
        report(progress, "load", f"loading {model}")
        # A PyTorch model takes the layout of the calibration data, as in convert().
        loaded = stages.load_model(model, stages.LoadOptions(unsafe_load=options.unsafe_load, layout_data=str(calib)))
        timings["load_s"] = time.perf_counter() - t

        t = time.perf_counter()
        report(progress, "export", "float model, batch 1")
        float_model = stages.export_float(loaded, workdir, progress)
        timings["export_float_s"] = time.perf_counter() - t

        from edgeq.calibration import load_dataset

        inputs = loaded.inputs
        calib_ds = load_dataset(calib, inputs, options.data, role="calibration")
        eval_opts = DataOptions(samples=options.eval_samples, seed=options.data.seed, mean=options.data.mean,
                                std=options.data.std, scale=options.data.scale)
        eval_ds = load_dataset(eval, inputs, eval_opts, role="evaluation")

        needs_calibration = any(getattr(r, "needs_calibration", False) for r in recipes if r.executable)
        calibration = None
        calibration_error: Optional[EdgeqError] = None
        if needs_calibration:
            t = time.perf_counter()
            report(progress, "calibrate", f"{len(calib_ds)} samples, once for every static recipe")
            try:
                calibration = stages.calibrate(float_model, calib_ds, progress)
            except ConversionError as exc:
                # E.g. TensorFlow's calibrator crashed: every static recipe fails with this reason,
                # the recipes with float activations are still made and measured.
                calibration_error = exc
            timings["calibrate_s"] = time.perf_counter() - t

        outcomes: list[RecipeOutcome] = []
        files: dict[str, Path] = {}
        float_ref: dict[str, Any] = {}
        for i, recipe in enumerate(recipes):
            report(progress, "quantize", recipe.name, done=i, total=len(recipes))
            outcome, path, ref = _one_recipe(stages, recipe, float_model, calibration, eval_ds, profile,
                                             options, workdir, calibration_error)
            float_ref = float_ref or ref
            outcomes.append(outcome)
            if path is not None:
                files[recipe.name] = path
        report(progress, "quantize", "done", done=len(recipes), total=len(recipes))
        timings["recipes_s"] = time.perf_counter() - t_start - sum(timings.values())

        budget_metric = "accuracy" if eval_ds.labels is not None else "agreement"
        outcomes = [_with_drop(o, float_ref, budget_metric) for o in outcomes]

        device_info = None
        device_lost: Optional[str] = None
        if device_opts is not None:
            t = time.perf_counter()
            eval_npz = workdir / "eval.npz"
            _write_eval_npz(eval_npz, eval_ds)
            device_opts = replace(device_opts, eval_data=str(eval_npz), activate=False)
            runnable = [o for o in outcomes if o.name in files and o.fits]
            measured, device_info, dev_warnings, device_lost = _measure(runnable, files, device_opts, progress)
            warnings.extend(dev_warnings)
            arch = (device_info or {}).get("arch")
            if arch and not str(arch).startswith(("aarch64", "arm")):
                warnings.append(f"the device is {arch}, not the {profile.name}'s Arm CPU: its latency (and the "
                                "energy estimated from it) ranks recipes on that machine, not on the target")
            outcomes = [_with_device_drop(measured.get(o.name, o), float_ref, budget_metric) for o in outcomes]
            timings["device_s"] = time.perf_counter() - t

        # Energy: from the device's latency when there was one, else the profile's estimate.
        outcomes = [_with_energy(o, profile) for o in outcomes]
        outcomes_t, recommended, reason = choose(outcomes, options.objective, options.max_drop,
                                                 device_opts is not None)

        # Write: every executable recipe that was made; never a simulated one.
        final: list[RecipeOutcome] = []
        for o in outcomes_t:
            if o.name in files and o.executable:
                dest = out_dir / f"{o.name}.tflite"
                atomic_write(dest, files[o.name].read_bytes())
                o = replace(o, file=str(dest))
            final.append(o)

    timings["total_s"] = time.perf_counter() - t_start
    result = SweepResult(
        model=str(model), target=profile.name, target_kind=profile.kind, objective=options.objective,
        max_drop=float(options.max_drop), budget_metric=budget_metric, float_reference=float_ref,
        recipes=tuple(final), recommended=recommended, reason=reason, output_dir=str(out_dir),
        json_path=str(out_dir / SWEEP_JSON), html_path=str(out_dir / SWEEP_HTML), recipe_table=table.source,
        calibration=calib_ds.to_dict() if needs_calibration else {"samples": 0, "note": "no static recipe"},
        evaluation=eval_ds.to_dict(), device=device_info,
        timings_s={k: round(v, 3) for k, v in timings.items()}, warnings=tuple(warnings))
    if device_lost is not None:
        result = replace(result, reason=f"the device failed: {device_lost}" if recommended is None else
                         f"{reason}; but the device failed before every recipe was measured: {device_lost}")
    write_outputs(result)
    if device_lost is not None:
        raise DeviceLost(f"the device failed during the sweep ({device_lost}); {result.json_path} and "
                         f"{result.html_path} keep the host-side results",
                         "check the device and run the sweep again, or sweep without --host/--local/--inventory "
                         "for the profile's estimates", result)
    if recommended is None:
        raise NoQualifyingRecipe(reason, f"see {result.html_path}; raise --max-drop, pick another target, or add "
                                         "recipes with --recipes/--recipe-file", result)
    return result


def write_outputs(result: SweepResult) -> None:
    """Write sweep.json and sweep.html (atomically) for ``result``."""
    from edgeq.sweep_report import render_html

    atomic_write(result.json_path, json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    atomic_write(result.html_path, render_html(result.to_dict()))


def _device_options(options: SweepOptions) -> Any:
    """The device's DeployOptions: ``options.device``, or the first host of ``options.inventory``."""
    if options.inventory is None:
        return options.device
    from edgeq.deploy import DeployOptions
    from edgeq.fleet_deploy import plan_fleet
    from edgeq.inventory import load_inventory

    hosts = load_inventory(options.inventory).select(None)
    first = plan_fleet(hosts[:1], options.device or DeployOptions())[0]
    return first.options


def _one_recipe(stages: Any, recipe: Any, float_model: Any, calibration: Any, eval_ds: Any,
                profile: TargetProfile, options: SweepOptions,
                workdir: Path, calibration_error: Optional[EdgeqError] = None,
                ) -> tuple[RecipeOutcome, Optional[Path], dict[str, Any]]:
    """Make, validate and check one recipe; a recipe that cannot be made is an outcome with ``error``."""
    base = RecipeOutcome(name=recipe.name, weights_bits=recipe.weights_bits, activations=recipe.activations,
                         granularity=recipe.granularity_label(), quantizer=recipe.quantizer,
                         executable=recipe.executable, description=recipe.description)
    if calibration_error is not None and recipe.executable and recipe.needs_calibration:
        return replace(base, error=str(calibration_error)), None, {}
    t0 = time.perf_counter()
    if not recipe.executable:
        from edgeq.quantize import simulate

        try:
            sim = simulate(float_model, recipe, eval_ds)
        except EdgeqError as exc:
            return replace(base, error=str(exc)), None, {}
        host = {"accuracy": sim.accuracy, "agreement": sim.top1_agreement, "sqnr_db": sim.sqnr_db,
                "samples": sim.samples}
        return (replace(base, size_bytes=sim.size_bytes, size_basis="float model with compressed weights "
                        "(simulated; never written)", host=host,
                        timings_s={"simulate_s": round(time.perf_counter() - t0, 3)}),
                None, {"accuracy": sim.accuracy_float} if sim.accuracy_float is not None else {})
    try:
        q = stages.quantize(float_model, calibration, recipe, stages.IoTypes())
        t1 = time.perf_counter()
        v = stages.validate(q, float_model, eval_ds, worst_layers=0)
        t2 = time.perf_counter()
    except EdgeqError as exc:
        return replace(base, error=str(exc), timings_s={"quantize_s": round(time.perf_counter() - t0, 3)}), None, {}
    path = workdir / f"{recipe.name}.tflite"
    path.write_bytes(q.content)
    from edgeq.tflite_file import read_tflite

    c = check_model(read_tflite(path), profile, options.check)
    t3 = time.perf_counter()
    chk = _check_dict(c, _runtime_finding(recipe, profile))
    fid = v.fidelity[0] if v.fidelity else None
    host = {"accuracy": fid.accuracy_quant if fid else None, "agreement": fid.top1_agreement if fid else None,
            "sqnr_db": fid.sqnr_db if fid else None, "samples": fid.samples if fid else 0}
    ref = {"accuracy": fid.accuracy_float} if fid is not None and fid.accuracy_float is not None else {}
    return (replace(base, size_bytes=len(q.content), host=host, check=chk,
                    latency_estimate_ms=chk["latency_estimate_ms"],
                    timings_s={"quantize_s": round(t1 - t0, 3), "validate_s": round(t2 - t1, 3),
                               "check_s": round(t3 - t2, 3)}),
            path, ref)


def _with_drop(o: RecipeOutcome, float_ref: dict[str, Any], metric: str) -> RecipeOutcome:
    if o.error:
        return o
    if metric == "accuracy":
        ref, got = float_ref.get("accuracy"), o.host.get("accuracy")
    else:
        ref, got = 1.0, o.host.get("agreement")
    if ref is None or got is None:
        return o
    return replace(o, drop_points=round(100.0 * (ref - got), 4))


def _with_device_drop(o: RecipeOutcome, float_ref: dict[str, Any], metric: str) -> RecipeOutcome:
    """Points lost in the device's own run: its accuracy against float, or its top-1 agreement with the host."""
    if not o.device:
        return o
    if metric == "accuracy" and float_ref.get("accuracy") is not None and o.device.get("accuracy") is not None:
        return replace(o, device_drop_points=round(100.0 * (float_ref["accuracy"] - o.device["accuracy"]), 4))
    agree = o.device.get("agreement_with_host")
    if agree is not None and o.drop_points is not None:
        return replace(o, device_drop_points=round(o.drop_points + 100.0 * (1.0 - agree), 4))
    return o


def _with_energy(o: RecipeOutcome, profile: TargetProfile) -> RecipeOutcome:
    if not o.executable or o.error:
        return o
    if o.device:
        source = "emulated-device" if o.device.get("emulated") else "device"
        return replace(o, energy=estimate_energy(profile, o.device["latency_ms"]["p50"], source))
    return replace(o, energy=estimate_energy(profile, o.latency_estimate_ms, "profile-estimate"))


def _write_eval_npz(path: Path, ds: Any) -> None:
    import numpy as np

    if len(ds.arrays) != 1:
        raise UsageError("measuring on a device takes single-input models",
                         "sweep without --host/--local, or deploy each model with `edgeq deploy`")
    arrays: dict[str, Any] = {"x": np.asarray(ds.arrays[0], dtype=np.float32)}
    if ds.labels is not None:
        arrays["y"] = np.asarray(ds.labels)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _measure(runnable: list[RecipeOutcome], files: dict[str, Path], device_opts: Any,
             progress: Optional[ProgressCallback]) -> tuple[dict[str, RecipeOutcome], Optional[dict[str, Any]],
                                                             list[str], Optional[str]]:
    """Measure the runnable recipes on the device in one session; a recipe the device cannot run fails alone.

    The last item is why the device failed as a whole (unreachable, lost link, every recipe failed), else None.
    """
    from edgeq.deploy import measure_models

    if not runnable:
        return {}, None, ["no executable recipe fits the target: nothing measured on the device"], None
    warnings: list[str] = []
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    lost: Optional[str] = None
    try:
        measured = measure_models([files[o.name] for o in runnable], device_opts, progress)
    except DeviceError as exc:  # connect, probe, lock or upload: no recipe was measured
        lost = str(exc)
        measured = tuple(exc for _o in runnable)
    for o, res in zip(runnable, measured):
        if isinstance(res, DeviceError):
            errors[o.name] = str(res)
            if isinstance(res, ConnectError):
                lost = str(res)
        else:
            results[o.name] = res
    if not results and errors and lost is None:
        lost = f"every recipe failed on the device (first: {errors[runnable[0].name]})"
    elif errors and lost is None:
        warnings.extend(f"the device could not run {name}; measured the others without it" for name in errors)
    out: dict[str, RecipeOutcome] = {}
    info = None
    for o in runnable:
        if o.name in results:
            d = _device_dict(results[o.name])
            out[o.name] = replace(o, device=d)
            if info is None:
                info = {"host": d["host"], "arch": d["arch"], "runtime": d["runtime"], "emulated": d["emulated"]}
        else:
            out[o.name] = replace(o, device_error=errors.get(o.name, "not measured"))
    if info is None:
        info = {"host": device_opts.host or "local", "error": "; ".join(sorted(set(errors.values())))[:500]}
    info = {**info, "status": "ok"} if lost is None else {**info, "status": "failed", "error": lost[:2000]}
    return out, info, warnings, lost
