"""Turn saved Ansible results (edgeq.fleet.model, via the edgeq.fleet.results callback) into the fleet summary.

The callback writes one JSON file per playbook run; ``load_ansible_results``
reads it (bounded, validated: it is a file from elsewhere) into the same
``RolloutResult`` a native staged rollout returns, and ``write_ansible_summary``
hands that to ``edgeq.report.fleet.write_fleet_report``, so ``summary.json`` and
``summary.html`` look the same whichever tool ran the rollout.

Host statuses: ``ok``; ``reverted`` (failed its health gate and went back);
``revert_failed``; ``gate_failed`` (failed its gate with nothing to revert to);
``failed`` (any other failure, or unreachable); ``not_started`` (in the play,
or in the given inventory, but never reached: the play stopped first).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from edgeq._device import protocol
from edgeq.deploy import DeployResult, LatencyStats
from edgeq.errors import InputError
from edgeq.fleet_deploy import FleetOptions
from edgeq.report.fleet import FleetReportPaths, write_fleet_report
from edgeq.rollout import GateResult, RevertResult, RolloutBatch, RolloutHost, RolloutOptions, RolloutResult
from edgeq.safeio import read_bounded

FORMAT = "edgeq.fleet.results/1"
MAX_BYTES = 256 << 20  # a results file for thousands of hosts with latency samples stays well under this
MAX_HOSTS = 100_000
_MAX_TEXT = 2000
# The callback's document nests about ten levels (plays, results, host, result, report, eval, ...).
MAX_DEPTH = 64
_MAX_INT = 1 << 53  # a count, a batch index or a byte size past this is not one
# A host name becomes a report directory name: the same rule as edgeq.fleet_deploy (no separators, no dot-files).
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")


class AnsibleResultsError(InputError):
    """A saved Ansible results file is missing, too large or not shaped as edgeq.fleet.results writes it."""


def _text(value: Any, limit: int = _MAX_TEXT) -> Optional[str]:
    if value is None:
        return None
    return str(value)[:limit]


def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int) and abs(value) > _MAX_INT:
        return None  # 10**400 is not a measurement (and would not fit a float)
    if not math.isfinite(value):
        return None
    return float(value)


def _int(value: Any, low: int = 0, high: int = _MAX_INT) -> Optional[int]:
    """An int in [low, high], or None (bool, float, out of range, or anything else)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return None
    return value


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _sha(value: Any) -> Optional[str]:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value
    return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def deploy_result(doc: dict[str, Any], name: str) -> DeployResult:
    """A ``DeployResult`` from a module's ``report`` (the document ``edgeq deploy`` writes as report.json)."""
    lat = _dict(doc.get("latency_ms"))
    samples = [v for v in (_num(s) for s in _list(lat.get("samples"))[:1_000_000]) if v is not None]
    # The module computes the statistics on the device from every run and keeps a subsample of the runs.
    stats = LatencyStats(*(_num(lat.get(k)) or 0.0 for k in ("min", "p50", "p90", "p99", "mean", "std", "max")),
                         _int(lat.get("count")) or len(samples), tuple(samples))
    return DeployResult(
        host=name,
        model=_dict(doc.get("model")),
        device=_dict(doc.get("device")),
        runtime=_dict(doc.get("runtime")),
        latency_ms=stats,
        load_ms=_num(doc.get("load_ms")) or 0.0,
        first_inference_ms=_num(doc.get("first_inference_ms")) or 0.0,
        peak_rss_bytes=_int(doc.get("peak_rss_bytes")),
        accuracy=_num(doc.get("accuracy")),
        mae=_num(doc.get("mae")),
        evaluation=doc.get("eval") if isinstance(doc.get("eval"), dict) else None,
        agreement=doc.get("agreement") if isinstance(doc.get("agreement"), dict) else None,
        transfer=_dict(doc.get("transfer")),
        settings=_dict(doc.get("settings")),
        started_at=_text(doc.get("started_at"), 64) or "",
        duration_s=_num(doc.get("duration_s")) or 0.0,
        warnings=tuple(_text(w, 500) or "" for w in _list(doc.get("warnings"))[:100]),
        edgeq_version=_text(doc.get("edgeq_version"), 64) or "?",
        activation=doc.get("activation") if isinstance(doc.get("activation"), dict) else None,
        layer_diff=doc.get("layer_diff") if isinstance(doc.get("layer_diff"), dict) else None,
    )


def _gate(doc: Any) -> Optional[GateResult]:
    if not isinstance(doc, dict) or not isinstance(doc.get("passed"), bool):
        return None
    reasons = _list(doc.get("reasons"))
    return GateResult(doc["passed"], tuple(_text(r, 300) or "" for r in reasons[:20]), _sha(doc.get("active")),
                      _num(doc.get("accuracy")), _num(doc.get("p99_ms")), _int(doc.get("runs")) or 0,
                      _text(doc.get("path"), 1000) or "")


def _host(name: str, rec: dict[str, Any]) -> RolloutHost:
    res = _dict(rec.get("result"))
    batch = _int(rec.get("batch"), 0, 1_000_000)
    report = res.get("report") if isinstance(res.get("report"), dict) else None
    deployed = deploy_result(report, name) if report else None
    gate = _gate(res.get("gate"))
    msg = _text(res.get("msg"))
    status = str(rec.get("status"))
    revert = None
    if status == "ok" and not res.get("failed"):
        return RolloutHost(name, name, "ok", batch, None, None, 0.0, deployed, gate)
    if status == "unreachable":
        return RolloutHost(name, name, "failed", batch, f"unreachable: {msg}", "Unreachable", 0.0, deployed, gate)
    if res.get("reverted") is True:
        revert = RevertResult(True, _sha(res.get("active")), _sha(res.get("previous")), None)
        kind = "reverted"
    elif res.get("revert_failed") is True:
        revert = RevertResult(False, _sha(res.get("active")), _sha(res.get("previous")), msg)
        kind = "revert_failed"
    elif gate is not None and not gate.passed:
        kind = "gate_failed"
    else:
        kind = "failed"
    return RolloutHost(name, name, kind, batch, msg, "GateFailed" if gate and not gate.passed else "ModuleFailed",
                       0.0, deployed, gate, revert)


def load_ansible_results(path: str | Path, inventory_hosts: Sequence[str] = ()) -> RolloutResult:
    """Read the file the edgeq.fleet.results callback wrote; hosts never reached are ``not_started``.

    ``inventory_hosts`` adds the hosts the play was meant for when the callback
    could not list them (they are merged, in order, after the play's own list).
    """
    p = Path(path)
    raw = read_bounded(p, MAX_BYTES, str(p), AnsibleResultsError,
                       "enable the edgeq.fleet.results callback (EDGEQ_ANSIBLE_RESULTS=FILE)")
    try:
        # NaN and Infinity are kept here (the values that hold them are dropped one by one, below);
        # integers are bounded as for every other document from elsewhere.
        doc = json.loads(raw.decode("utf-8"), parse_int=protocol.bounded_json_int)
    except RecursionError:
        raise AnsibleResultsError(f"{p} is not an edgeq.fleet.results file: nested too deeply") from None
    except ValueError as exc:  # invalid JSON or UTF-8, NaN, or a number out of range
        raise AnsibleResultsError(f"{p} is not JSON: {str(exc)[:200]}") from None
    if protocol.depth(doc, MAX_DEPTH) > MAX_DEPTH:
        raise AnsibleResultsError(f"{p} is not an edgeq.fleet.results file: nested deeper than {MAX_DEPTH}")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("plays"), list):
        raise AnsibleResultsError(f"{p} is not an edgeq.fleet.results file (format {FORMAT})")
    plays = [pl for pl in doc["plays"] if isinstance(pl, dict) and isinstance(pl.get("results"), dict)
             and pl["results"]]
    if not plays:
        raise AnsibleResultsError(f"{p} holds no edgeq.fleet.model result",
                                  hint="the playbook must run the edgeq.fleet.model module")
    play = plays[-1]
    results = play["results"]
    names: list[str] = []
    for n in [*_list(play.get("hosts")), *inventory_hosts, *results]:
        if not isinstance(n, str) or not _NAME_RE.match(n) or n in (".", ".."):
            raise AnsibleResultsError(f"{p}: {str(n)[:80]!r} is not a valid host name (letters, digits, . _ - :)")
        if n not in names:
            names.append(n)
    if len(names) > MAX_HOSTS:
        raise AnsibleResultsError(f"{p} names more than {MAX_HOSTS} hosts")
    hosts = []
    for n in names:
        rec = results.get(n)
        if isinstance(rec, dict):
            hosts.append(_host(n, rec))
        else:
            hosts.append(RolloutHost(n, n, "not_started", None, "not started: the play stopped before this host",
                                     None))
    raw_batches = [b for b in _list(play.get("batches"))[:MAX_HOSTS]
                   if isinstance(b, dict) and _int(b.get("index"), 0, MAX_HOSTS) is not None]
    serial = [_text(s, 20) or "" for s in _list(play.get("serial"))[:10]]
    batches = tuple(RolloutBatch(b["index"], "canary" if b["index"] == 1 and len(serial) > 1 else "batch",
                                 tuple(_text(h, 128) or "" for h in _list(b.get("hosts"))[:MAX_HOSTS]), 0.0)
                    for b in raw_batches)
    failed = [h for h in hosts if h.status not in ("ok", "not_started")]
    not_started = [h for h in hosts if h.status == "not_started"]
    stopped = bool(failed and not_started)
    mfp = _num(play.get("max_fail_percentage"))
    reason = (f"the play stopped after batch {len(batches)}: {len(failed)} host(s) failed"
              + (f" (max_fail_percentage {mfp:g})" if mfp is not None else "")) if stopped else None
    first = next((h for h in hosts if h.result is not None), None)
    model = dict(first.result.model) if first else {}
    model = {k: model.get(k) for k in ("name", "sha256", "bytes")}
    args = _dict(_dict(_dict(next(iter(results.values()))).get("result")).get("invocation")).get("module_args")
    args = _dict(args)
    forks = _int(doc.get("forks"), 1, 10_000) or 1
    options = RolloutOptions(fleet=FleetOptions(forks=forks), canary=0, batch=",".join(serial) or None,
                             max_fail_pct=mfp if mfp is not None else 0.0,
                             gate_accuracy=_num(args.get("gate_accuracy")), gate_p99_ms=_num(args.get("gate_p99_ms")))
    return RolloutResult(model, tuple(hosts), batches, options, stopped, reason, _num(doc.get("seconds")) or 0.0,
                         _text(doc.get("started_at"), 64) or "", action="ansible")


def write_ansible_summary(path: str | Path, out_dir: str | Path, inventory_hosts: Sequence[str] = (), *,
                          overwrite: bool = False) -> tuple[RolloutResult, FleetReportPaths]:
    """``summary.json`` + ``summary.html`` (and per-host reports) from saved Ansible results, as a native rollout
    (a directory that already holds a report is refused unless ``overwrite``)."""
    result = load_ansible_results(path, inventory_hosts)
    return result, write_fleet_report(result, out_dir, overwrite=overwrite)


__all__ = ["AnsibleResultsError", "deploy_result", "load_ansible_results", "write_ansible_summary"]
