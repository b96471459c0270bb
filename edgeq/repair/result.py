"""The repair's options and what it reports: the diagnosis, every attempt, the choice (schema ``edgeq.repair/1``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from edgeq.errors import OverBudget, UsageError
from edgeq.units import fmt_bytes


SCHEMA = "edgeq.repair/1"  # the report of a budgeted conversion (edgeq convert --max-drop)
FIXES = ("calibration", "equalize", "mixed-int16", "float-fallback", "qat")
# A layer whose output channels span ranges this uneven leaves most channels a few int8 steps:
# with a ratio of 16 the median channel gets at most 256 / 16 = 16 levels.
OUTLIER_RATIO = 16.0
# RMS error of a layer's output in units of its quantization step; rounding alone gives about 0.29.
BAD_LAYER_STEPS = 1.0


@dataclass(frozen=True)
class RepairOptions:
    """The accuracy budget and what the repair may do."""

    max_drop: float  # points (percent) of accuracy, or of top-1 agreement without labels
    train_data: Optional[str] = None  # labelled data for quantization-aware training
    keep_best: bool = False  # write the best model even when no fix meets the budget
    fixes: tuple[str, ...] = FIXES  # which fixes to try, in this order of cost
    max_layers: int = 4  # at most this many diagnosed layers get int16 or float
    qat_epochs: int = 3
    qat_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_drop, (int, float)) or not math.isfinite(self.max_drop):
            raise UsageError(f"--max-drop must be a number of points, got {self.max_drop!r}")
        unknown = [f for f in self.fixes if f not in FIXES]
        if unknown:
            raise UsageError(f"unknown repair fix {', '.join(unknown)}", f"choose from {', '.join(FIXES)}")
        if self.max_layers < 1:
            raise UsageError("max_layers must be at least 1")


@dataclass(frozen=True)
class LayerDiagnosis:
    """Why one layer loses accuracy under int8."""

    layer: str
    ops: tuple[str, ...]
    error_steps: Optional[float]  # RMS error / quantization step of its output (quantization debugger)
    outlier_ratio: Optional[float]  # widest output channel range / median channel range (float model)
    outlier_channels: tuple[int, ...]  # channels wider than OUTLIER_RATIO x the median
    unsettled: bool  # its output range was still growing in the last half of the calibration samples
    findings: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "ops": list(self.ops), "error_steps": self.error_steps,
                "outlier_ratio": self.outlier_ratio, "outlier_channels": list(self.outlier_channels),
                "unsettled_range": self.unsettled, "findings": list(self.findings)}


@dataclass(frozen=True)
class Attempt:
    """One fix tried (or skipped, with the reason)."""

    fix: str
    status: str  # "meets budget" | "over budget" | "does not run on target" | "skipped" | "failed"
    detail: str
    accuracy: Optional[float] = None  # percent
    drop: Optional[float] = None  # points
    size_bytes: Optional[int] = None
    runs_on_target: Optional[bool] = None  # None without a target
    fast_kernels: Optional[bool] = None  # every compute op on the target's fast kernels
    kernel_note: str = ""
    layers: tuple[str, ...] = ()
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tried(self) -> bool:
        return self.accuracy is not None

    def to_dict(self) -> dict[str, Any]:
        return {"fix": self.fix, "status": self.status, "detail": self.detail,
                "accuracy": _r(self.accuracy), "drop": _r(self.drop), "size_bytes": self.size_bytes,
                "runs_on_target": self.runs_on_target, "fast_kernels": self.fast_kernels,
                "kernel_note": self.kernel_note or None, "layers": list(self.layers),
                "seconds": round(self.seconds, 3), **({"details": self.extra} if self.extra else {})}


@dataclass(frozen=True)
class RepairResult:
    """What the repair measured and chose; ``to_dict()`` is the report's ``repair`` section."""

    model: str
    metric: str  # "accuracy" | "agreement"
    float_accuracy: float
    baseline: Attempt
    max_drop: float
    target: Optional[str]
    diagnosis: tuple[LayerDiagnosis, ...]
    range_settling: Optional[dict[str, Any]]
    attempts: tuple[Attempt, ...]
    chosen: Optional[str]  # "baseline" or a fix name; None when no fix met the budget
    best: Attempt
    output: Optional[str]  # the model written (None when nothing was)
    report_path: Optional[str]
    sha256: Optional[str] = None
    seconds: float = 0.0

    @property
    def met(self) -> bool:
        return self.chosen is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "max_drop": self.max_drop,
            "target": self.target,
            "float_accuracy": _r(self.float_accuracy),
            "baseline": self.baseline.to_dict(),
            "baseline_drop": _r(self.baseline.drop),
            "diagnosis": [d.to_dict() for d in self.diagnosis],
            "range_settling": self.range_settling,
            "attempts": [a.to_dict() for a in self.attempts],
            "chosen": self.chosen,
            "met_budget": self.met,
            "best": {"fix": self.best.fix, "accuracy": _r(self.best.accuracy), "drop": _r(self.best.drop),
                     "over_budget_by": _r(max(0.0, (self.best.drop or 0.0) - self.max_drop))},
            "output": self.output,
            "seconds": round(self.seconds, 3),
        }

    def summary_lines(self) -> list[str]:
        """A few lines for the terminal."""
        what = "accuracy" if self.metric == "accuracy" else "top-1 agreement"
        b = self.baseline
        lines = []
        if self.output:
            lines += [f"wrote {self.output}  ({self.best.fix if self.met else 'best, over budget'})",
                      f"report {self.report_path}"]
        int8 = (f"int8 {b.accuracy:.1f}% (drop {b.drop:.1f} points," if b.tried
                else f"full int8 cannot be made ({b.detail.split(': ', 1)[-1]};")
        lines += [f"repair: float {what} {self.float_accuracy:.1f}%, {int8} budget {self.max_drop:g})"
                  + (f", target {self.target}" if self.target else "")]
        bad = [d for d in self.diagnosis if d.findings]
        for d in bad[:3]:
            lines.append(f"  layer {d.layer}: {d.findings[0]}")
        for a in self.attempts:
            if a.tried:
                kern = ""
                if a.fast_kernels is not None:
                    kern = ", fast kernels" if a.fast_kernels else ", NOT on fast kernels"
                lines.append(f"  {a.fix:<15} {a.accuracy:5.1f}%  drop {a.drop:5.1f}  {fmt_bytes(a.size_bytes)}{kern}"
                             f"  {a.seconds:.1f} s  {a.status}")
            else:
                lines.append(f"  {a.fix:<15} {a.status}: {a.detail}")
        if self.chosen == "baseline":
            lines.append("  plain int8 is within budget: no repair needed")
        elif self.chosen:
            lines.append(f"  chosen: {self.chosen} ({self.best.detail})")
        else:
            over = (self.best.drop or 0.0) - self.max_drop
            lines.append(f"  no fix met the budget: best {self.best.fix} at {self.best.accuracy:.1f}% "
                         f"({over:.1f} points over)")
        return lines


class BudgetNotMet(OverBudget):
    """No fix met ``--max-drop``; ``result`` holds every attempt (exit code 6)."""

    def __init__(self, message: str, hint: Optional[str], result: RepairResult) -> None:
        super().__init__(message, hint)
        self.result = result


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(float(x), 2)
