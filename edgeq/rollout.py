"""Staged rollouts with a health gate: canaries first, then batches; a host that fails its gate reverts by itself.

The stages, for each batch in turn (the canaries are batch 1):

1. deploy: ``edgeq.fleet_deploy.deploy_fleet`` on the batch's hosts (upload,
   verify, measure, activate; every host within its deadline);
2. gate: on each host that deployed, under the device lock, the model is run
   from ``REMOTE_DIR/current/model.tflite`` -- the path an application loads --
   and must load, infer, reach ``gate_accuracy`` on the eval data and stay
   under ``gate_p99_ms``;
3. revert: a host that fails its gate switches back to the model that was
   active before this rollout (``current`` <-> ``previous``), in the same run,
   and reports ``reverted`` with the reason; a revert that fails is reported
   as ``revert_failed``;
4. stop: when the hosts that failed so far (failed, timed out, reverted, gate
   failed) exceed ``max_fail_pct`` of the hosts started so far, no further
   batch starts; the remaining hosts are ``not_started``.

Statuses: ``ok``, ``failed``, ``timeout`` (the deploy), ``reverted``,
``gate_failed`` (the gate failed and there was nothing to revert to: the model
was already active before the rollout), ``revert_failed``, ``not_started``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from edgeq import __version__
from edgeq._device import protocol
from edgeq.deploy import DeployOptions, DeployResult, Outcome, run_args, timeout_hint
from edgeq.device import DeviceClient, DeviceLock
from edgeq.errors import ConnectError, DeviceError, UsageError
from edgeq.fleet import run_fleet
from edgeq.fleet_deploy import FleetHost, FleetOptions, FleetTarget, HostJob, deploy_fleet, plan_fleet
from edgeq.inventory import InventoryHost
from edgeq.progress import ProgressCallback, ProgressEvent, report
from edgeq.transport import Transport

SCHEMA = "edgeq.rollout/1"
FAILED_STATUSES = ("failed", "timeout", "reverted", "gate_failed", "revert_failed")
_BATCH_RE = re.compile(r"^\s*(\d+)\s*(%?)\s*$")


@dataclass(frozen=True)
class RolloutOptions:
    """How to stage a rollout: ``canary`` hosts first, then batches of ``batch`` (a count or ``"25%"``)."""

    fleet: FleetOptions = field(default_factory=FleetOptions)
    canary: int = 0
    batch: Optional[str] = None  # "N" hosts or "P%" of all hosts (floor, at least 1); None: all the rest at once
    max_fail_pct: float = 0.0  # stop when failed hosts exceed this share of the hosts started so far
    gate_accuracy: Optional[float] = None  # minimum on-device accuracy on the eval data, 0..1
    gate_p99_ms: Optional[float] = None  # maximum p99 latency of the gate run, ms

    @property
    def gated(self) -> bool:
        """Every rollout has the smoke gate (load + infer from ``current``); these add thresholds."""
        return self.gate_accuracy is not None or self.gate_p99_ms is not None


@dataclass(frozen=True)
class GateResult:
    """The health gate on one host: what ran from ``current`` and whether it passed."""

    passed: bool
    reasons: tuple[str, ...]
    active: Optional[str]  # sha256 that ``current`` pointed at when the gate ran
    accuracy: Optional[float]
    p99_ms: Optional[float]
    runs: int
    path: str

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": list(self.reasons), "active": self.active,
                "accuracy": self.accuracy, "p99_ms": self.p99_ms, "runs": self.runs, "path": self.path}


@dataclass(frozen=True)
class RevertResult:
    """What a revert after a failed gate did: ``ok`` and the model active afterwards."""

    ok: bool
    active: Optional[str]
    previous: Optional[str]
    error: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "active": self.active, "previous": self.previous, "error": self.error}


@dataclass(frozen=True)
class RolloutHost:
    """One host's outcome in the rollout (``result`` is its ``DeployResult`` when the deploy got that far)."""

    name: str
    target: str
    status: str
    batch: Optional[int]
    error: Optional[str] = None
    error_type: Optional[str] = None
    seconds: float = 0.0
    result: Optional[DeployResult] = None
    gate: Optional[GateResult] = None
    revert: Optional[RevertResult] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def summary(self) -> dict[str, Any]:
        """The host's row in ``summary.json``: the fleet row plus batch, gate and revert."""
        row = FleetHost(self.name, self.target, self.status, self.error, self.error_type, self.seconds,
                        self.result).summary()
        row["status"] = self.status
        row["batch"] = self.batch
        row["gate"] = self.gate.to_dict() if self.gate else None
        row["revert"] = self.revert.to_dict() if self.revert else None
        if self.revert is not None and self.revert.ok:
            row["activation"] = {**(row.get("activation") or {}), "active": self.revert.active,
                                 "previous": self.revert.previous, "reverted": True}
        return row


@dataclass(frozen=True)
class RolloutBatch:
    """One batch: its hosts and what happened to them."""

    index: int
    kind: str  # "canary" or "batch"
    hosts: tuple[str, ...]
    seconds: float


@dataclass(frozen=True)
class RolloutResult:
    """Every host's outcome in inventory order; ``to_dict()`` is ``summary.json``."""

    model: dict[str, Any]
    hosts: tuple[RolloutHost, ...]
    batches: tuple[RolloutBatch, ...]
    options: RolloutOptions
    stopped: bool
    stop_reason: Optional[str]
    seconds: float
    started_at: str
    edgeq_version: str = __version__
    action: str = "rollout"

    @property
    def ok(self) -> bool:
        return all(h.ok for h in self.hosts)

    @property
    def outcome(self) -> Outcome:
        """How the rollout ended, worst first: a revert failed, a gate failed, a host failed, or all ok."""
        if self.count("revert_failed"):
            return Outcome.REVERT_FAILED
        if self.count("reverted") or self.count("gate_failed"):
            return Outcome.GATE_FAILED
        return Outcome.OK if self.ok else Outcome.DEVICE_FAILED

    @property
    def forks(self) -> int:
        return self.options.fleet.forks

    def count(self, status: str) -> int:
        return sum(1 for h in self.hosts if h.status == status)

    def to_dict(self) -> dict[str, Any]:
        statuses = ("ok", "failed", "timeout", "reverted", "gate_failed", "revert_failed", "not_started")
        o = self.options
        return {
            "schema": SCHEMA, "outcome": self.outcome.value,
            "edgeq_version": self.edgeq_version, "action": self.action, "started_at": self.started_at,
            "seconds": round(self.seconds, 3), "forks": self.forks, "model": self.model,
            "counts": {"hosts": len(self.hosts), **{s: self.count(s) for s in statuses}},
            "rollout": {
                "canary": o.canary, "batch": o.batch, "max_fail_pct": o.max_fail_pct,
                "gate": {"accuracy_min": o.gate_accuracy, "p99_ms_max": o.gate_p99_ms, "smoke": True,
                         "path": "REMOTE_DIR/current/model.tflite"},
                "stopped": self.stopped, "stop_reason": self.stop_reason,
                "batches": [{"index": b.index, "kind": b.kind, "hosts": list(b.hosts), "seconds": round(b.seconds, 3),
                             "counts": {s: sum(1 for h in self.hosts if h.batch == b.index and h.status == s)
                                        for s in statuses if s != "not_started"}}
                            for b in self.batches],
            },
            "hosts": [h.summary() for h in self.hosts],
        }


# ----------------------------------------------------------------- planning


def parse_batch(value: Optional[str | int], total: int) -> Optional[int]:
    """``"3"`` -> 3 hosts, ``"25%"`` -> a quarter of ``total`` (rounded down, at least 1, as Ansible's ``serial``)."""
    if value is None:
        return None
    m = _BATCH_RE.match(str(value))
    if not m:
        raise UsageError(f"--batch {value!r} is neither a host count nor a percentage", hint="use e.g. 2 or 25%")
    n = int(m.group(1))
    if m.group(2):
        if not 0 < n <= 100:
            raise UsageError(f"--batch {value!r}: a percentage must be 1-100%")
        return max(1, int(n / 100.0 * total))
    if n < 1:
        raise UsageError(f"--batch {value!r}: at least 1 host per batch")
    return n


def plan_batches(names: Sequence[str], canary: int, batch: Optional[str | int]) -> tuple[tuple[str, ...], ...]:
    """Split hosts (in order) into the canary batch and the batches after it."""
    if canary < 0:
        raise UsageError(f"--canary {canary}: cannot be negative")
    names = list(names)
    size = parse_batch(batch, len(names))
    out: list[tuple[str, ...]] = []
    if canary:
        out.append(tuple(names[:canary]))
        names = names[canary:]
    step = size or len(names) or 1
    for i in range(0, len(names), step):
        out.append(tuple(names[i:i + step]))
    return tuple(b for b in out if b)


def _validate(options: RolloutOptions) -> None:
    d = options.fleet.deploy
    if not d.activate:
        raise UsageError("a rollout activates the model; --no-activate does not go with --canary, --batch or a gate")
    if d.gated:
        raise UsageError("a rollout's health gate goes in RolloutOptions (gate_accuracy, gate_p99_ms), not in the "
                         "deploy options (those gate a single host before activation)")
    problems = protocol.gate_problems(options.gate_accuracy, options.gate_p99_ms, bool(d.eval_data))
    if problems:
        raise UsageError("; ".join(problems))
    if not (0.0 <= options.max_fail_pct <= 100.0):
        raise UsageError(f"--max-fail {options.max_fail_pct}: a percentage from 0 to 100")


# --------------------------------------------------------------------- gate


def check_gate(dev: DeviceClient, lock: DeviceLock, expected: str, eval_remote: Optional[str],
               options: RolloutOptions, host_options: Optional[DeployOptions] = None) -> GateResult:
    """Run the model from ``REMOTE_DIR/current`` and judge it against the gate (under ``lock``).

    ``host_options``: the host's own options (its inventory timeouts); default the fleet's.
    """
    d = host_options or options.fleet.deploy
    path = f"{lock.remote_dir}/current/model.tflite"
    active = protocol.sha_or_none(dev.state(lock.remote_dir, d.probe_timeout).get("current"))
    if active != expected:
        return GateResult(False, (f"current is {str(active)[:12]}, not the deployed {expected[:12]} "
                                  "(another deploy switched it)",), active, None, None, 0, path)
    # Without a latency threshold: load + first inference (+ eval), no timing loop needed.
    args = run_args(d, path, eval_remote, lock, timed=options.gate_p99_ms is not None, max_outputs=0)
    try:
        with timeout_hint(d, "run_timeout"):
            doc = dev.run(args, d.run_timeout, "the health gate", max_samples=max(d.max_runs, d.runs))
    except ConnectError:
        raise
    except DeviceError as exc:  # the model does not load or infer from current: that is the gate failing
        return GateResult(False, (f"smoke run from current failed: {str(exc)[:300]}",), active, None, None, 0,
                          path)
    v = protocol.gate_verdict(doc, options.gate_accuracy, options.gate_p99_ms)
    return GateResult(v["passed"], tuple(v["reasons"]), active, v["accuracy"], v["p99_ms"], v["runs"], path)


def revert(dev: DeviceClient, lock: DeviceLock, timeout: float) -> RevertResult:
    """Swap ``current`` and ``previous`` back (under ``lock``); never raises: a failed revert is a result."""
    try:
        doc = dev.rollback(lock, timeout)
    except DeviceError as exc:
        return RevertResult(False, None, None, str(exc)[:500])
    return RevertResult(True, protocol.sha_or_none(doc.get("active")), protocol.sha_or_none(doc.get("previous")),
                        None)


@dataclass(frozen=True)
class _GateOutcome:
    gate: Optional[GateResult]
    revert: Optional[RevertResult]
    status: str
    error: Optional[str]


def _gate_host(target: FleetTarget, result: DeployResult, options: RolloutOptions, tr: Transport,
               progress: Optional[ProgressCallback]) -> _GateOutcome:
    d = target.options
    remote_dir = str(result.settings.get("remote_dir") or d.remote_dir)
    sha = str(result.model["sha256"])
    ev = result.evaluation or {}
    eval_remote = f"{remote_dir}/data/{ev['sha256']}/eval.npz" if ev.get("sha256") else None
    switched = bool((result.activation or {}).get("switched"))
    name = target.name
    ttl = 3 * d.probe_timeout + d.run_timeout + d.cleanup_timeout + 60
    with tr:
        dev = DeviceClient(tr, d.device_python())
        report(progress, "gate", f"health gate from {remote_dir}/current", host=name)
        with dev.locked(remote_dir, d.probe_timeout, d.lock_stale_s, ttl, d.cleanup_timeout, sha) as lock:
            gate = check_gate(dev, lock, sha, eval_remote, options, d)
            if gate.passed:
                return _GateOutcome(gate, None, "ok", None)
            why = "; ".join(gate.reasons)
            if gate.active != sha:
                return _GateOutcome(gate, None, "failed", f"gate not run: {why}")
            if not switched:
                return _GateOutcome(gate, None, "gate_failed",
                                    f"failed its gate ({why}); it was already active before this rollout, "
                                    "so there is nothing to revert to")
            report(progress, "revert", f"gate failed ({why}); reverting", host=name)
            rev = revert(dev, lock, d.probe_timeout)
            if rev.ok:
                return _GateOutcome(gate, rev, "reverted",
                                    f"failed its gate ({why}); reverted to {str(rev.active)[:12]}")
            return _GateOutcome(gate, rev, "revert_failed",
                                f"REVERT FAILED: failed its gate ({why}) and could not revert ({rev.error}); "
                                f"the failing model {sha[:12]} may still be active: run `edgeq rollback` "
                                "on this host")


class _GateJob(HostJob):
    what = "the gate on"

    def __init__(self, target: FleetTarget, result: DeployResult) -> None:
        super().__init__(target)
        self.result = result


def _gate_deadline(options: RolloutOptions, targets: Sequence[FleetTarget] = ()) -> float:
    """How long a host's gate may take: the longest its phase timeouts allow (inventory timeouts included)."""
    def one(d: Any) -> float:
        connect = d.ssh.connect_timeout * 3 * (1 + max(0, d.ssh.connect_retries))
        return connect + 4 * d.probe_timeout + d.run_timeout + d.cleanup_timeout + 30
    return max([one(t.options) for t in targets] or [one(options.fleet.deploy)])


def _gate_batch(deployed: Sequence[tuple[FleetTarget, DeployResult]], options: RolloutOptions,
                progress: Optional[ProgressCallback]) -> dict[str, tuple[str, Optional[str], Optional[str], Any]]:
    """Gate every deployed host of a batch in parallel: name -> (status, error, error_type, _GateOutcome)."""
    jobs = [_GateJob(t, r) for t, r in deployed]

    def work(job: _GateJob) -> _GateOutcome:
        return _gate_host(job.target, job.result, options, job.make_transport(), progress)

    run = run_fleet(jobs, lambda j: j.target.name, work, forks=options.fleet.forks,
                    deadline_s=_gate_deadline(options, [t for t, _r in deployed]), cancel=lambda j: j.cancel())
    out: dict[str, tuple[str, Optional[str], Optional[str], Any]] = {}
    for o in run.outcomes:
        if o.ok:
            g = o.result
            out[o.host] = (g.status, g.error, "GateFailed" if g.status != "ok" else None, g)
        else:
            # The gate could not be checked: the model stays active but is not proven healthy.
            out[o.host] = ("failed" if o.status == "failed" else "timeout",
                           f"health gate not checked: {o.error}", o.error_type, None)
    return out


# ------------------------------------------------------------------ rollout


def _deploy_stage(progress: Optional[ProgressCallback]) -> Optional[ProgressCallback]:
    """A deployed host is not done until its gate ran: its "done" becomes "deployed"."""
    if progress is None:
        return None

    def relay(ev: ProgressEvent) -> None:
        progress(replace(ev, stage="deployed") if ev.stage == "done" else ev)

    return relay


def rollout(model_path: str | Path, hosts: Sequence[InventoryHost], options: RolloutOptions = RolloutOptions(),
            progress: Optional[ProgressCallback] = None) -> RolloutResult:
    """Deploy ``model_path`` batch by batch, gate every host, revert the ones that fail, stop when too many fail."""
    started = time.monotonic()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    model = Path(model_path)
    _validate(options)
    targets = {t.name: t for t in plan_fleet(hosts, options.fleet.deploy)}  # every value checked before anything runs
    by_name = {h.name: h for h in hosts}
    order = [h.name for h in hosts]
    batches = plan_batches(order, options.canary, options.batch)
    info: dict[str, Any] = {}  # name, sha256, bytes: from the first batch's deploy, which checks the model first

    outcome: dict[str, RolloutHost] = {}
    done_batches: list[RolloutBatch] = []
    stopped = False
    stop_reason: Optional[str] = None
    for index, names in enumerate(batches, start=1):
        kind = "canary" if options.canary and index == 1 else "batch"
        t0 = time.monotonic()
        for n in names:
            report(progress, "batch", f"{kind} {index} of {len(batches)}", host=n)
        fleet = deploy_fleet(model, [by_name[n] for n in names], options.fleet, _deploy_stage(progress))
        info = info or dict(fleet.model or {})
        deployed = [(targets[h.name], h.result) for h in fleet.hosts if h.ok]
        gates = _gate_batch(deployed, options, progress) if deployed else {}
        for h in fleet.hosts:
            if not h.ok:
                outcome[h.name] = RolloutHost(h.name, h.target, h.status, index, h.error, h.error_type, h.seconds)
                continue
            status, error, etype, g = gates[h.name]
            outcome[h.name] = RolloutHost(h.name, h.target, status, index, error, etype, h.seconds, h.result,
                                          g.gate if g else None, g.revert if g else None)
            if progress is not None:
                report(progress, "done" if status == "ok" else "failed", error or "ok, gate passed", host=h.name)
        done_batches.append(RolloutBatch(index, kind, tuple(names), time.monotonic() - t0))
        started_n = len(outcome)
        failed_n = sum(1 for r in outcome.values() if r.status in FAILED_STATUSES)
        pct = 100.0 * failed_n / started_n if started_n else 0.0
        if index < len(batches) and failed_n and pct > options.max_fail_pct:
            stopped = True
            stop_reason = (f"stopped after {kind} {index}: {failed_n} of {started_n} hosts failed "
                           f"({pct:.0f}% > --max-fail {options.max_fail_pct:g}%)")
            break
    for n in order:
        if n not in outcome:
            outcome[n] = RolloutHost(n, targets[n].target, "not_started", None,
                                     stop_reason and f"not started: {stop_reason}", None)
            report(progress, "not_started", "not started (rollout stopped)", host=n)
    return RolloutResult(info, tuple(outcome[n] for n in order), tuple(done_batches), options, stopped, stop_reason,
                         time.monotonic() - started, started_at)


__all__ = ["FAILED_STATUSES", "GateResult", "RevertResult", "RolloutBatch", "RolloutHost", "RolloutOptions",
           "RolloutResult", "SCHEMA", "check_gate", "parse_batch", "plan_batches", "revert", "rollout"]
