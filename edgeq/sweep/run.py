"""Running the sweep: prepare once, make/validate/check every recipe, measure on the device, choose, write."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

from edgeq.check import CheckResult, check_model
from edgeq.energy import estimate_energy
from edgeq.errors import ConnectError, ConversionError, DeviceError, EdgeqError, RecipeError, UsageError
from edgeq.progress import ProgressCallback, report
from edgeq.safeio import atomic_write
from edgeq.sweep.recommend import choose
from edgeq.sweep.result import (SWEEP_HTML, SWEEP_JSON, DeviceLost, NoQualifyingRecipe, RecipeOutcome, SweepOptions,
                                SweepResult)
from edgeq.targets import TargetProfile, load_target


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
          options: SweepOptions = SweepOptions(), progress: Optional[ProgressCallback] = None, *,
          overwrite: bool = False) -> SweepResult:
    """Sweep the recipes for ``model`` on ``target``; write DIR/sweep.json, DIR/sweep.html, DIR/<recipe>.tflite.

    ``options.output_dir`` is created if missing; one that already holds a
    report is refused (``UsageError``) unless ``overwrite``. Raises
    ``NoRecipeQualifies`` (after writing the reports) when no executable
    recipe fits within the budget; ``RecipeError`` for unknown recipes or a bad
    recipe file; the conversion's and the device's errors as they are.
    """
    from edgeq import convert as stages  # the conversion stages (TensorFlow inside their functions)
    from edgeq.outdir import prepare_dir
    from edgeq.recipes import load_recipes

    options.validate()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    profile = target if isinstance(target, TargetProfile) else load_target(str(target))
    table = load_recipes(options.recipe_file)
    recipes = _select(table, options.recipes)
    out_dir = prepare_dir(options.output_dir, overwrite=overwrite)
    device_opts = _device_options(options)
    warnings: list[str] = []

    data = stages.ConvertOptions(data=options.data, eval_data=str(eval), eval_samples=options.eval_samples,
                                 load=stages.LoadOptions(unsafe_load=options.unsafe_load))
    # Calibration is the sweep's own step: when it fails, the recipes with float activations are still made.
    with stages.prepare(model, calib, data, calibrate_now=False, purpose="sweep", progress=progress) as prepared:
        workdir = Path(prepared.workdir)
        timings["load_s"] = prepared.timings["load"]
        timings["export_float_s"] = prepared.timings["export"]
        float_model, calib_ds, eval_ds = prepared.float_model, prepared.calib, prepared.eval

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
    from edgeq.report.sweep import render_html

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
        from edgeq.convert.simulated import simulate

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
