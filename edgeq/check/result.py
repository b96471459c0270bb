"""What a check found: options, findings, the result (its JSON and terminal summary) and CI thresholds."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

from edgeq.units import fmt_bytes, fmt_ms


# Recommended arena = measured arena x (1 + margin), rounded up to 16 bytes.
# The margin covers optimized kernels (CMSIS-NN, ESP-NN) asking for scratch
# buffers the host's reference kernels do not.
DEFAULT_ARENA_MARGIN = 0.20


KERNEL_NAMES = {"xnnpack": "XNNPACK", "cmsis-nn": "CMSIS-NN", "esp-nn": "ESP-NN"}


CHECK_SCHEMA = "edgeq.check/1"


@dataclass(frozen=True)
class Thresholds:
    """Limits stricter than "fits" (a CI gate): percent of the target's RAM and flash budgets, estimated latency."""

    max_ram_pct: Optional[float] = None
    max_flash_pct: Optional[float] = None
    max_latency_ms: Optional[float] = None


@dataclass(frozen=True)
class CheckOptions:
    """How thoroughly to check."""

    measure: bool = True  # load the model in the target's runtime (child process) for RAM
    invoke: bool = True  # and run one inference on zeros there
    timeout_s: float = 120.0
    arena_margin: float = DEFAULT_ARENA_MARGIN
    # Shapes for inputs with unknown dims (shape_signature -1): (input name or None for the only input, shape).
    # Without them a model with unknown dims is checked at the placeholder shape stored in the file.
    input_shapes: tuple[tuple[Optional[str], tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class Finding:
    """One violation or warning."""

    code: str
    message: str
    op: Optional[str] = None
    tensor: Optional[str] = None
    hint: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"code": self.code, "message": self.message}
        for k in ("op", "tensor", "hint"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        return d


@dataclass(frozen=True)
class OpMacs:
    """Compute of one operator: multiply-accumulates, or element operations for the rest."""

    index: int
    subgraph: int
    op: str
    dtype: str
    macs: int
    elementwise: int
    accelerated: bool


@dataclass(frozen=True)
class CheckResult:
    """Outcome of ``check_model``. ``fits`` is true when there are no violations."""

    model: str
    sha256: str
    target: str
    target_kind: str
    runtime: str
    backend: str
    fits: bool
    violations: tuple[Finding, ...]
    warnings: tuple[Finding, ...]
    ops: dict[str, int]
    scheme: str
    memory: dict[str, Any]
    macs: dict[str, Any]
    per_op: tuple[OpMacs, ...] = field(repr=False)
    estimate: dict[str, Any] = field(default_factory=dict)
    acceleration: dict[str, Any] = field(default_factory=dict)
    # Inputs with unknown dims: the shape the figures are at, and where it came from.
    input_shapes: tuple[dict[str, Any], ...] = ()
    # TRANSPOSE ops (left by NCHW -> NHWC layout conversions) and their estimated cost on the target
    # (edgeq.layout.transpose_report).
    layout: dict[str, Any] = field(default_factory=dict)

    @property
    def arena_bytes(self) -> Optional[int]:
        return self.memory.get("arena_bytes")

    @property
    def recommended_arena_bytes(self) -> Optional[int]:
        return self.memory.get("recommended_arena_bytes")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": CHECK_SCHEMA,
            "model": self.model,
            "sha256": self.sha256,
            "target": self.target,
            "target_kind": self.target_kind,
            "runtime": self.runtime,
            "backend": self.backend,
            "fits": self.fits,
            "violations": [f.to_dict() for f in self.violations],
            "warnings": [f.to_dict() for f in self.warnings],
            "ops": self.ops,
            "scheme": self.scheme,
            "memory": self.memory,
            "macs": self.macs,
            "estimate": self.estimate,
            "acceleration": self.acceleration,
            "input_shapes": list(self.input_shapes),
            "layout": self.layout,
        }

    def summary_lines(self) -> list[str]:
        """A short human summary (no colours, no trailing newlines)."""
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines = [f"check against {self.target} ({self.runtime}/{self.backend}): {verdict}"]
        for f in self.violations:
            lines.append(f"  violation [{f.code}] {f.message}" + (f" ({f.hint})" if f.hint else ""))
        for f in self.warnings:
            lines.append(f"  warning [{f.code}] {f.message}")
        for r in self.input_shapes:
            lines.append(f"  input {r['name']} has unknown dims: figures at {'x'.join(str(d) for d in r['shape'])} "
                         f"({r['source']})")
        m = self.memory
        lines.append(f"  flash: {fmt_bytes(m['flash_needed_bytes'])} needed (model {fmt_bytes(m['model_bytes'])}"
                     f" + runtime {fmt_bytes(m['runtime_flash_bytes'])}) of {fmt_bytes(m['flash_budget_bytes'])}")
        if m.get("arena_bytes") is not None:
            lines.append(f"  RAM: arena {fmt_bytes(m['arena_bytes'])} measured by TFLite Micro, recommend "
                         f"{fmt_bytes(m['recommended_arena_bytes'])} (+{round(m['arena_margin'] * 100)}%) of "
                         f"{fmt_bytes(m['ram_budget_bytes'])}")
        elif m.get("estimated_arena_bytes") is not None:
            lines.append(f"  RAM: arena not measured; the activations alone need about "
                         f"{fmt_bytes(m['estimated_arena_bytes'])} (estimated) of {fmt_bytes(m['ram_budget_bytes'])}")
        elif m.get("interpreter_bytes") is not None:
            lines.append(f"  RAM: interpreter {fmt_bytes(m['interpreter_bytes'])} on this host of "
                         f"{fmt_bytes(m['ram_budget_bytes'])}")
        else:
            lines.append(f"  RAM: not measured; budget {fmt_bytes(m['ram_budget_bytes'])}")
        lines.append(f"  compute: {fmt_count(self.macs['total'])} MACs"
                     + (f" + {fmt_count(self.macs['elementwise'])} element ops" if self.macs["elementwise"] else ""))
        a = self.acceleration
        if a and a.get("backend") != "reference":
            kernels = KERNEL_NAMES.get(a["backend"], a["backend"])
            lines.append(f"  fast kernels: {a['macs_share_pct']:g}% of the MACs on {kernels}"
                         f" ({'accelerated' if a['accelerated'] else 'NOT accelerated'}; "
                         f"{'measured' if a['measured'] else 'from the kernel table'})")
        if self.estimate.get("latency_ms") is not None:
            lines.append(f"  latency estimate: ~{fmt_ms(self.estimate['latency_ms'])} "
                         f"({self.estimate['basis']}; not a measurement)")
        if self.layout.get("count"):
            lines.append(f"  layout: {self.layout['count']} TRANSPOSE op(s) move {fmt_count(self.layout['elements'])} "
                         f"elements, ~{fmt_ms(self.layout['estimated_ms'])} on the target (estimate)")
        return lines


def ram_needed_bytes(memory: dict[str, Any]) -> tuple[Optional[int], str]:
    """The RAM figure a check has (measured arena, estimated arena, or interpreter memory) and what it is."""
    for key, what in (("arena_bytes", "the measured arena"), ("estimated_arena_bytes", "the estimated arena"),
                      ("interpreter_bytes", "the interpreter's memory")):
        if memory.get(key) is not None:
            return memory[key], what
    return None, "not measured"


def apply_thresholds(result: CheckResult, limits: Thresholds) -> CheckResult:
    """``result`` with one ``threshold`` violation per limit it misses (``fits`` false if any).

    A limit whose figure the check does not have (RAM not measured, no latency estimate) is missed too:
    a gate passes on evidence, not on a missing number.
    """
    found: list[Finding] = []
    m = result.memory

    def pct_limit(flag: str, limit: Optional[float], what: str, used: Optional[int], budget: Optional[int],
                  basis: str, hint: str) -> None:
        if limit is None:
            return
        if used is None or not budget:
            found.append(Finding("threshold", f"{flag} {limit:g}: {what} is not known ({basis})", hint=hint))
            return
        pct = 100.0 * used / budget
        if pct > limit:
            found.append(Finding("threshold", f"{what}: {fmt_bytes(used)} is {pct:.1f}% of the "
                                              f"{fmt_bytes(budget)} budget, over {flag} {limit:g}"))

    ram, basis = ram_needed_bytes(m)
    pct_limit("--max-ram-pct", limits.max_ram_pct, "RAM", ram, m.get("ram_budget_bytes"), basis,
              "check without --no-measure, with the target's runtime installed")
    pct_limit("--max-flash-pct", limits.max_flash_pct, "flash", m.get("flash_needed_bytes"),
              m.get("flash_budget_bytes"), "the profile has no flash budget", "use a target with flash_bytes")
    if limits.max_latency_ms is not None:
        est = result.estimate.get("latency_ms")
        if est is None:
            found.append(Finding("threshold", f"--max-latency-ms {limits.max_latency_ms:g}: the target profile "
                                              f"gives no latency estimate", hint="measure with `edgeq deploy "
                                                                                 "--gate-p99-ms` instead"))
        elif est > limits.max_latency_ms:
            found.append(Finding("threshold", f"latency estimate ~{est:.3g} ms is over --max-latency-ms "
                                              f"{limits.max_latency_ms:g}"))
    if not found:
        return result
    return replace(result, fits=False, violations=result.violations + tuple(found))


def fmt_count(n: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
