"""What a deploy returns: the latency statistics, the deploy result (``to_dict()`` is report.json, built by
``protocol.report_document``), the rollback result, and the outcome the CLI maps to an exit code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Optional, Sequence

from edgeq import __version__
from edgeq._device import protocol


class Outcome(str, Enum):
    """How a deploy, a fleet deploy or a rollout ended; the CLI maps it to an exit code."""

    OK = "ok"
    DEVICE_FAILED = "device_failed"  # a host failed, timed out, was unreachable or not started
    GATE_FAILED = "gate_failed"  # a health gate failed (reverted, nothing to revert to, or not activated)
    REVERT_FAILED = "revert_failed"  # a gate failed and the revert failed too


@dataclass(frozen=True)
class LatencyStats:
    """Latency of the timed runs, in milliseconds (``samples`` are the raw per-run figures)."""

    min: float
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    max: float
    count: int
    samples: tuple[float, ...] = field(repr=False)

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> "LatencyStats":
        st = protocol.latency(list(samples))
        return cls(st["min"], st["p50"], st["p90"], st["p99"], st["mean"], st["std"], st["max"], st["count"],
                   tuple(st["samples"]))


@dataclass(frozen=True)
class DeployResult:
    """Everything measured in one deploy; ``to_dict()`` is ``report.json``."""

    host: str
    model: dict[str, Any]
    device: dict[str, Any]
    runtime: dict[str, Any]
    latency_ms: LatencyStats
    load_ms: float
    first_inference_ms: float
    peak_rss_bytes: Optional[int]
    accuracy: Optional[float]
    mae: Optional[float]
    evaluation: Optional[dict[str, Any]]
    agreement: Optional[dict[str, Any]]
    transfer: dict[str, Any]
    settings: dict[str, Any]
    started_at: str
    duration_s: float
    warnings: tuple[str, ...] = ()
    edgeq_version: str = __version__
    activation: Optional[dict[str, Any]] = None
    layer_diff: Optional[dict[str, Any]] = None
    # What the delegate really took on the device: requested, applied (None: the runtime does not say),
    # delegated_nodes of nodes, partitions.
    delegate: Optional[dict[str, Any]] = None
    # The single-host health gate's verdict (protocol.gate_verdict), None without a gate.
    gate: Optional[dict[str, Any]] = None

    @property
    def outcome(self) -> Outcome:
        return Outcome.GATE_FAILED if self.gate is not None and not self.gate.get("passed") else Outcome.OK

    def to_dict(self) -> dict[str, Any]:
        lat = asdict(self.latency_ms)
        lat["samples"] = list(self.latency_ms.samples)
        return protocol.report_document(
            edgeq_version=self.edgeq_version, host=self.host, started_at=self.started_at,
            duration_s=self.duration_s, model=dict(self.model), device=dict(self.device),
            runtime=dict(self.runtime), settings=dict(self.settings), latency_ms=lat, load_ms=self.load_ms,
            first_inference_ms=self.first_inference_ms, peak_rss_bytes=self.peak_rss_bytes,
            accuracy=self.accuracy, mae=self.mae, eval=self.evaluation, agreement=self.agreement,
            transfer=dict(self.transfer), activation=dict(self.activation) if self.activation is not None else None,
            layer_diff=self.layer_diff, delegate=dict(self.delegate) if self.delegate is not None else None,
            gate=dict(self.gate) if self.gate is not None else None, outcome=self.outcome.value,
            warnings=list(self.warnings))


ROLLBACK_SCHEMA = "edgeq.rollback/1"


@dataclass(frozen=True)
class RollbackResult:
    """The device's active and previous model after a rollback."""

    host: str
    remote_dir: str
    active: Optional[str]
    previous: Optional[str]
    rolled_back_from: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        """``edgeq rollback --json``: ``"schema": "edgeq.rollback/1"`` and the fields (sha256 or null)."""
        return {"schema": ROLLBACK_SCHEMA, **asdict(self)}
