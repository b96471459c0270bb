"""Deploy one model to many devices from an Ansible inventory.

Each inventory host becomes a ``DeployOptions`` (inventory variables override
the command-line defaults), every value is validated before anything runs, and
the hosts are deployed in parallel with ``edgeq.fleet.run_fleet``: at most
``forks`` at once, each within its own deadline; a host that overruns it has
its transport cancelled (closed) and is reported as ``timeout``.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from edgeq import __version__
from edgeq.deploy import (TIMEOUT_FLAGS, DeployOptions, DeployResult, Outcome, RollbackResult, check_model,
                          check_timeout, deploy, rollback, sha256_file)
from edgeq.device import DeviceClient
from edgeq.errors import InputError, UsageError
from edgeq.fleet import run_fleet
from edgeq.inventory import InventoryHost
from edgeq.progress import ProgressCallback, ProgressEvent, report
from edgeq.transport import Transport, make_transport, parse_host

# An inventory name becomes a report directory name: no separators, no dot-files.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SCHEMA = "edgeq.fleet/1"


@dataclass(frozen=True)
class FleetOptions:
    """Defaults for every host (``deploy``), parallelism and the per-host deadline in seconds."""

    deploy: DeployOptions = field(default_factory=DeployOptions)
    forks: int = 5
    host_deadline_s: Optional[float] = None  # default: the sum of the phase deadlines plus slack

    def host_deadline(self, targets: Sequence["FleetTarget"] = ()) -> float:
        """The per-host deadline: given, or the longest the phase deadlines of any target (its own
        inventory timeouts included) allow."""
        if self.host_deadline_s is not None:
            return self.host_deadline_s
        return max([_phases_deadline(t.options) for t in targets] or [_phases_deadline(self.deploy)])


def _phases_deadline(d: DeployOptions) -> float:
    connect = d.ssh.connect_timeout * 3 * (1 + max(0, d.ssh.connect_retries))
    backoff = sum(d.ssh.retry_backoff_s * 2 ** i for i in range(max(0, d.ssh.connect_retries)))
    # probe, lock, activate and unlock use probe_timeout / cleanup_timeout.
    return connect + backoff + 3 * d.probe_timeout + d.upload_timeout + d.run_timeout + d.cleanup_timeout + 30


@dataclass(frozen=True)
class FleetTarget:
    """One inventory host resolved into the options its deploy runs with."""

    name: str
    options: DeployOptions

    @property
    def target(self) -> str:
        return self.options.host or "local"


@dataclass(frozen=True)
class FleetHost:
    """One host's outcome: ``status`` is ``ok``, ``failed``, ``timeout`` or ``gate_failed`` (a deploy whose
    health gate, given in its DeployOptions, failed: measured, reported, not activated); ``result`` when ok or
    gate_failed."""

    name: str
    target: str
    status: str
    error: Optional[str]
    error_type: Optional[str]
    seconds: float
    result: Any = None  # DeployResult for deploys, RollbackResult for rollbacks
    # After a timeout during activation: what the device reports as active (read back), else None.
    active_after: Optional[dict[str, Any]] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def summary(self) -> dict[str, Any]:
        """The host's row in ``summary.json``."""
        row: dict[str, Any] = {"name": self.name, "target": self.target, "status": self.status,
                               "error": self.error, "error_type": self.error_type, "seconds": round(self.seconds, 3)}
        if self.active_after is not None:
            row["active_after_timeout"] = dict(self.active_after)
        res = self.result
        if isinstance(res, DeployResult):
            lat = res.latency_ms
            dev = res.device
            row.update({
                "latency_ms": {"p50": lat.p50, "p90": lat.p90, "p99": lat.p99, "mean": lat.mean, "min": lat.min,
                               "count": lat.count},
                "load_ms": res.load_ms,
                "first_inference_ms": res.first_inference_ms,
                "peak_rss_bytes": res.peak_rss_bytes,
                "accuracy": res.accuracy,
                "mae": res.mae,
                "agreement_top1": (res.agreement or {}).get("top1"),
                "runtime": {"name": res.runtime.get("name"), "version": res.runtime.get("version"),
                            "threads": res.runtime.get("threads"), "xnnpack": res.runtime.get("xnnpack")},
                "device": {k: dev.get(k) for k in ("hostname", "arch", "os", "cpu_model", "board", "cpu_cores",
                                                   "mem_total_bytes", "python", "numpy", "cpu_governor",
                                                   "vcgencmd_temp")},
                "activation": res.activation,
                "gate": res.gate,
                "transfer": res.transfer,
                "warnings": list(res.warnings),
                "report": f"{self.name}/report.json",
            })
        elif isinstance(res, RollbackResult):
            row.update({k: v for k, v in res.to_dict().items() if k != "schema"})
        return row


@dataclass(frozen=True)
class FleetResult:
    """Every host's outcome in inventory order; ``to_dict()`` is ``summary.json``."""

    action: str  # "deploy" or "rollback"
    model: Optional[dict[str, Any]]
    hosts: tuple[FleetHost, ...]
    seconds: float
    forks: int
    started_at: str
    edgeq_version: str = __version__

    @property
    def ok(self) -> bool:
        return all(h.ok for h in self.hosts)

    @property
    def failed(self) -> tuple[FleetHost, ...]:
        return tuple(h for h in self.hosts if not h.ok)

    @property
    def outcome(self) -> Outcome:
        """A gate failed (worst), a host failed or timed out, or all ok."""
        if any(h.status == "gate_failed" for h in self.hosts):
            return Outcome.GATE_FAILED
        return Outcome.OK if self.ok else Outcome.DEVICE_FAILED

    def to_dict(self) -> dict[str, Any]:
        counts = {s: sum(1 for h in self.hosts if h.status == s) for s in ("ok", "failed", "timeout", "gate_failed")}
        return {"schema": SCHEMA, "outcome": self.outcome.value,
                "edgeq_version": self.edgeq_version, "action": self.action, "started_at": self.started_at,
                "seconds": round(self.seconds, 3), "forks": self.forks, "model": self.model,
                "counts": {"hosts": len(self.hosts), **counts}, "hosts": [h.summary() for h in self.hosts]}


def _bad_text(value: str) -> bool:
    return not value or bool(_CONTROL.search(value)) or value.startswith("-")


def _host_timeouts(h: InventoryHost, opts: DeployOptions) -> DeployOptions:
    """The host's own phase timeouts (inventory ``edgeq_probe_timeout`` etc.) over ``opts``, bounded."""
    given = {}
    for name in TIMEOUT_FLAGS:
        value = getattr(h, name)  # edgeq.inventory reads (and bounds) edgeq_<name> from the host variables
        if value is not None:
            check_timeout(value, f"edgeq_{name}")
            given[name] = float(value)
    return replace(opts, **given) if given else opts


def plan_fleet(hosts: Sequence[InventoryHost], base: DeployOptions) -> tuple[FleetTarget, ...]:
    """Resolve inventory hosts into per-host options; every invalid value is reported at once, before anything runs.

    Inventory variables override ``base``: ``ansible_host``, ``ansible_port``,
    ``ansible_user``, ``ansible_ssh_private_key_file``, ``ansible_python_interpreter``,
    ``edgeq_remote_dir``, ``edgeq_probe_timeout``, ``edgeq_upload_timeout``, ``edgeq_run_timeout``;
    ``ansible_connection=local`` makes this machine the device.
    """
    if not hosts:
        raise InputError("the inventory selects no host", hint="check the file and --limit")
    problems: list[str] = []
    targets: list[FleetTarget] = []
    for h in hosts:
        where = f"inventory host {h.name!r}"
        if not _NAME_RE.match(h.name) or h.name in (".", ".."):
            problems.append(f"{where}: not a valid host name (letters, digits, . _ - :)")
            continue
        v = h.vars
        opts = base
        try:
            python = v.get("ansible_python_interpreter")
            if python is not None:
                python = str(python)
                if _bad_text(python):
                    raise UsageError(f"ansible_python_interpreter={python!r} cannot be an interpreter path")
                opts = replace(opts, python=python)
            remote = v.get("edgeq_remote_dir")
            if remote is not None:
                remote = str(remote)
                if _bad_text(remote):
                    raise UsageError(f"edgeq_remote_dir={remote!r} cannot be a directory")
                opts = replace(opts, remote_dir=remote)
            elif _bad_text(opts.remote_dir):
                raise UsageError(f"--remote-dir {opts.remote_dir!r} cannot be a directory")
            opts = _host_timeouts(h, opts)
            key = v.get("ansible_ssh_private_key_file")
            ssh = opts.ssh
            if key is not None:
                key = str(key)
                if _bad_text(key) or not Path(key).expanduser().is_file():
                    raise UsageError(f"ansible_ssh_private_key_file={key!r} is not a file")
                ssh = replace(ssh, identity=key)
            if str(v.get("ansible_connection", "ssh")) == "local":
                opts = replace(opts, host="local", ssh=ssh)
            else:
                address = h.address
                if _bad_text(address) or "@" in address or "/" in address:
                    raise UsageError(f"ansible_host={address!r} is not a host name or address")
                try:
                    port = h.port
                except (TypeError, ValueError):
                    raise UsageError(f"ansible_port={v.get('ansible_port')!r} is not a port number") from None
                if port is not None and not 0 < port < 65536:
                    raise UsageError(f"ansible_port={port} is out of range (1-65535)")
                host_part = f"[{address}]" if ":" in address else address
                user = h.user
                spec = (f"{user}@" if user else "") + host_part + (f":{port}" if port else "")
                parse_host(spec)  # user, host and port syntax
                opts = replace(opts, host=spec, ssh=ssh)
                make_transport(opts.host, opts.ssh)  # identity files, ssh_config HostName
        except UsageError as exc:
            problems.append(f"{where}: {exc.message}")
            continue
        targets.append(FleetTarget(h.name, opts))
    names = [t.name for t in targets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"host names repeated: {', '.join(dupes)}")
    if problems:
        raise UsageError("invalid inventory values, nothing was run:\n  " + "\n  ".join(problems),
                         hint="fix these host variables (or --limit them out)")
    return tuple(targets)


class HostJob:
    """Work on one host in flight; the transport is kept so a hung host can be cancelled from outside."""

    what = "the deploy to"  # for the message when a cancelled job tries to connect

    def __init__(self, target: FleetTarget) -> None:
        self.target = target
        self.transport: Optional[Transport] = None
        self.lock = threading.Lock()
        self.cancelled = False

    def make_transport(self) -> Transport:
        with self.lock:
            if self.cancelled:
                from edgeq.errors import ConnectError

                raise ConnectError(f"{self.what} {self.target.name} was cancelled", host=self.target.name)
            self.transport = make_transport(self.target.options.host, self.target.options.ssh)
            return self.transport

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            tr = self.transport
        if tr is not None:
            tr.cancel()


class _Job(HostJob):
    """A host's deploy in flight, with the last progress stage seen (where a timeout struck)."""

    def __init__(self, target: FleetTarget) -> None:
        super().__init__(target)
        self.stage = "queued"


def _relabel(progress: Optional[ProgressCallback], job: "_Job") -> ProgressCallback:
    name = job.target.name

    def relay(ev: ProgressEvent) -> None:
        job.stage = ev.stage
        if progress is not None:
            progress(ProgressEvent(ev.stage, ev.message, ev.done, ev.total, name))

    return relay


def _read_back(jobs: Sequence[_Job], forks: int) -> dict[str, Any]:
    """What each host reports as active, read over a fresh connection (bounded); errors as text."""
    def work(job: _Job) -> dict[str, Any]:
        o = job.target.options
        tr = make_transport(o.host, o.ssh)
        with tr:
            return DeviceClient(tr, o.device_python()).state(o.remote_dir, min(o.probe_timeout, 30.0))

    if not jobs:
        return {}
    o = jobs[0].target.options
    deadline = o.ssh.connect_timeout * 3 + min(o.probe_timeout, 30.0) + 5
    run = run_fleet(list(jobs), lambda j: j.target.name, work, forks=forks, deadline_s=deadline,
                    cancel=lambda j: None)
    return {out.host: (out.result if out.ok else (out.error or out.status)) for out in run.outcomes}


def _run(targets: Sequence[FleetTarget], options: FleetOptions, progress: Optional[ProgressCallback],
         work: Callable[[FleetTarget, Transport, Optional[ProgressCallback]], Any], action: str,
         model: Optional[dict[str, Any]]) -> FleetResult:
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    deadline = options.host_deadline(targets)

    def do(job: _Job) -> Any:
        name = job.target.name
        report(progress, "queued", "starting", host=name)
        try:
            value = work(job.target, job.make_transport(), _relabel(progress, job))
        except Exception as exc:
            report(progress, "failed", str(exc), host=name)
            raise
        report(progress, "done", "ok", host=name)
        return value

    def cancel(job: _Job) -> None:
        report(progress, "timeout", f"no answer within {deadline:g} s; abandoned", host=job.target.name)
        job.cancel()

    jobs = [_Job(t) for t in targets]
    run = run_fleet(jobs, lambda j: j.target.name, do, forks=options.forks, deadline_s=deadline, cancel=cancel)
    by_name = {o.host: o for o in run.outcomes}
    # A host abandoned while switching models may have switched: never report that as a plain timeout.
    switching = [j for j in jobs if by_name[j.target.name].status == "timeout" and j.stage in ("activate", "rollback")]
    active_now = _read_back(switching, options.forks)
    hosts = []
    for t in targets:
        o = by_name[t.name]
        error, after = o.error, None
        if t.name in active_now:
            now = active_now[t.name]
            if isinstance(now, dict):
                after = now
                cur = str(now.get("current") or "none")[:12]
                moved = model is not None and now.get("current") == model.get("sha256")
                error = (f"{error}; it timed out while switching models: the device now reports current = {cur}"
                         + (" (the new model IS active)" if moved else "") + ", previous = "
                         + str(now.get("previous") or "none")[:12])
            else:
                error = f"{error}; it timed out while switching models and the active model could not be read " \
                        f"back ({str(now)[:200]}): it may have switched"
        status = o.status
        if isinstance(o.result, DeployResult) and o.result.outcome is Outcome.GATE_FAILED:
            why = "; ".join((o.result.gate or {}).get("reasons") or [])
            status, error = "gate_failed", f"failed its health gate ({why}); not activated"
        hosts.append(FleetHost(t.name, t.target, status, error, o.error_type, o.seconds, o.result, after))
    return FleetResult(action, model, tuple(hosts), run.seconds, options.forks, started_at)


def deploy_fleet(model_path: str | Path, hosts: Sequence[InventoryHost], options: FleetOptions = FleetOptions(),
                 progress: Optional[ProgressCallback] = None) -> FleetResult:
    """Deploy ``model_path`` to every host in parallel; every host gets a status within its deadline."""
    model = Path(model_path)
    check_model(model)
    targets = plan_fleet(hosts, options.deploy)
    info = {"name": model.name, "sha256": sha256_file(model), "bytes": model.stat().st_size}

    def work(t: FleetTarget, tr: Transport, prog: Optional[ProgressCallback]) -> DeployResult:
        return deploy(model, t.options, prog, transport=tr)

    return _run(targets, options, progress, work, "deploy", info)


def rollback_fleet(hosts: Sequence[InventoryHost], options: FleetOptions = FleetOptions(),
                   progress: Optional[ProgressCallback] = None) -> FleetResult:
    """Switch every host back to its previous model, in parallel."""
    targets = plan_fleet(hosts, options.deploy)

    def work(t: FleetTarget, tr: Transport, prog: Optional[ProgressCallback]) -> RollbackResult:
        return rollback(t.options, prog, transport=tr)

    return _run(targets, options, progress, work, "rollback", None)


__all__ = ["SCHEMA", "FleetHost", "FleetOptions", "FleetResult", "FleetTarget", "deploy_fleet", "plan_fleet",
           "rollback_fleet"]
