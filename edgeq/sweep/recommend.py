"""Choosing the recipe: the best qualifying one by the objective, and why every other one lost."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

from edgeq.sweep.result import TIE_TOLERANCE, RecipeOutcome, objective_value
from edgeq.units import fmt_bytes, fmt_ms


def _fmt_objective(v: Optional[float], objective: str) -> str:
    if objective == "latency":
        return fmt_ms(v)
    if objective == "size":
        return fmt_bytes(v)
    return f"{v:.3g} mJ" if v is not None else "-"


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
        if objective_value(r, objective) is None:
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
        lowest = min(objective_value(r, objective) for r in pool)  # type: ignore[type-var]
        tied = [r for r in pool if objective_value(r, objective) <= lowest * (1 + tol)]  # type: ignore[operator]
        best = min(tied, key=lambda r: (r.drop_points, r.size_bytes or 0, objective_value(r, objective), r.name))
        bv = objective_value(best, objective)
        for r in pool:
            if r is best:
                continue
            v = objective_value(r, objective)
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
    return tuple(out), best.name, (f"{best.name}: {basis} ({_fmt_objective(objective_value(best, objective), objective)})"
                                   f" among recipes that fit {'and are accelerated ' if accelerated else ''}"
                                   f"within {max_drop:g} points (loses {drop})")
