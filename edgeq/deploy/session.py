"""The deploy session: connect, probe, lock, upload, measure (and gate), activate, then the host reference --
the pipeline ``edgeq.deploy`` describes, for one model (``deploy``) or several (``measure_models``)."""

from __future__ import annotations

import secrets
import shlex
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from edgeq._device import protocol
from edgeq.deploy.activation import activate_model
from edgeq.deploy.options import (MAX_OUTPUT_VALUES, DeployOptions, check_disk_space, check_eval, check_inputs,
                                  check_model, check_options, eval_labels, run_args, sha256_file, timeout_hint)
from edgeq.deploy.reference import agreement_of, cached_reference, output_figures
from edgeq.deploy.results import DeployResult, LatencyStats
from edgeq.device import DeviceClient, DeviceLock
from edgeq.errors import ConnectError, DeviceError, DeviceProtocolError, UsageError
from edgeq.escape import one_line
from edgeq.progress import ProgressCallback, ProgressEvent, report
from edgeq.transport import Transport, make_transport
from edgeq.units import fmt_ms


def deploy(model_path: str | Path, options: DeployOptions = DeployOptions(),
           progress: Optional[ProgressCallback] = None, transport: Optional[Transport] = None) -> DeployResult:
    """Push ``model_path`` to the device in ``options``, measure it there and return what was measured.

    With ``options.activate`` the model becomes ``REMOTE_DIR/current`` once it is
    verified and ran on the device. ``transport`` lets a caller (the fleet) keep
    a handle to cancel a hung host; by default one is made from ``options``.
    """
    return _session([Path(model_path)], options, progress, transport, options.activate)[0]


def measure_models(model_paths: Sequence[str | Path], options: DeployOptions = DeployOptions(),
                   progress: Optional[ProgressCallback] = None,
                   transport: Optional[Transport] = None) -> tuple[DeployResult | DeviceError, ...]:
    """Measure several models on one device without activating any of them.

    One connection, one probe, one device lock; each model (and the eval data)
    is uploaded once, content-addressed, and run in turn. One entry per model,
    in the order given: its ``DeployResult`` (``activation.activated`` is
    False), or the ``DeviceError`` it failed with. A model the device cannot
    run does not stop the others; a lost link ends the session, and the models
    not yet run carry that ``ConnectError``. A failure before any model runs
    (connect, probe, lock, upload) is raised.
    """
    paths = [Path(p) for p in model_paths]
    if not paths:
        raise UsageError("measure_models needs at least one model")
    return tuple(_session(paths, options, progress, transport, activate=False, keep_going=True))


@contextmanager
def _lock_left_note(remote_dir: str, options: DeployOptions, models: int) -> Iterator[None]:
    """Over a lost link the device lock cannot be released (a failure with the link up always releases it):
    the error then says that the device stays locked, until when, and how to clear it."""
    try:
        yield
    except ConnectError as exc:
        # Another deploy judges the lock stale after its own lock_stale_s or this session's deadline (the
        # lock's ttl), whichever is longer, counted from the last heartbeat, which was no later than now.
        stale = max(options.lock_stale_s, options.session_deadline(models))
        until = datetime.now(timezone.utc) + timedelta(seconds=stale)
        lock_dir = shlex.quote(f"{remote_dir}/lock")
        exc.message += (f"; the device stays locked ({remote_dir}/lock) until {until:%Y-%m-%d %H:%M} UTC at the "
                        f"latest ({stale:.0f} s after its last heartbeat, when other deploys treat it as stale; a new "
                        f"deploy from this machine takes it over without waiting); to clear it sooner, make sure no deploy is "
                        f"running and remove it on the device: rm -rf {lock_dir}")
        raise


def _session(models: list[Path], options: DeployOptions, progress: Optional[ProgressCallback],
             transport: Optional[Transport], activate: bool, keep_going: bool = False) -> list[Any]:
    """The deploy pipeline for ``models`` in one session. With ``keep_going`` a model that fails its run
    gets its ``DeviceError`` in the returned list instead of stopping the session (see ``measure_models``)."""
    started = time.monotonic()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    check_options(options)
    if transport is None:
        transport = make_transport(options.host, options.ssh)  # validates the host before anything runs
    for model in models:
        check_model(model)
        check_inputs(model, options)
    eval_path = Path(options.eval_data) if options.eval_data else None
    eval_sha = None
    if eval_path:
        check_eval(eval_path)
        eval_sha = sha256_file(eval_path)
    shas = [sha256_file(m) for m in models]
    python = options.device_python()
    warnings: list[str] = []

    # (kind, local, sha, rel): one entry per distinct file. The runner is never
    # uploaded: every call sends it on stdin.
    files: list[tuple[str, Path, str, str]] = []
    for model, sha in zip(models, shas):
        if sha not in {f[2] for f in files}:
            files.append(("model", model, sha, f"models/{sha}/model.tflite"))
    if eval_path and eval_sha:
        files.append(("eval", eval_path, eval_sha, f"data/{eval_sha}/eval.npz"))
    rel_of = {(k, sha): rel for k, _l, sha, rel in files}
    eval_rel = rel_of[("eval", eval_sha)] if eval_path else None

    host = transport.host
    report(progress, "connect", f"connecting to {host}", host=host)
    t0 = time.monotonic()
    run_docs: list[Any] = []  # a run document, or (keep_going) the DeviceError that model failed with
    activation: Optional[dict[str, Any]] = None
    lost: Optional[ConnectError] = None  # the link was lost after some models ran (keep_going only)
    layer_diffs: dict[str, Optional[dict[str, Any]]] = {}
    gates: dict[str, dict[str, Any]] = {}  # the single-host gate's verdict per model (options.gated)
    skipped: Optional[str] = None  # why activation was skipped
    try:
        with transport as tr:
            dev = DeviceClient(tr, python)
            report(progress, "probe", f"probing {host}", host=host)
            with timeout_hint(options, "probe_timeout"):
                facts = dev.probe(options.remote_dir, [(rel, sha) for _k, _l, sha, rel in files],
                                  options.probe_timeout)
            remote_dir = facts["remote_dir"]
            before = facts.get("activation") or {}
            check_disk_space(facts, [(local, rel, sha) for _k, local, sha, rel in files], host)
            report(progress, "lock", f"locking {remote_dir}", host=host)
            with dev.locked(remote_dir, options.probe_timeout, options.lock_stale_s,
                            options.session_deadline(len(models)), options.cleanup_timeout, shas[0]) as lock, \
                    _lock_left_note(remote_dir, options, len(models)):
                if lock.broke_stale:
                    owner = lock.broke_stale
                    warnings.append(f"broke a stale device lock ({str(owner.get('reason'))[:80]}; held by "
                                    f"{str(owner.get('user', '?'))[:64]} on {str(owner.get('controller', '?'))[:128]}"
                                    f", pid {str(owner.get('pid', '?'))[:16]}, {str(owner.get('age_s', '?'))[:16]} s "
                                    "old)")
                # A file already there counts only if its sha256 matches: a corrupt copy is re-sent.
                missing = [(kind, local, rel, sha) for kind, local, sha, rel in files
                           if facts["have"].get(rel) != sha]
                disk = facts.get("disk") or {}
                sent_files: dict[tuple[str, str], int] = {}
                if missing:
                    with timeout_hint(options, "upload_timeout"):
                        sent_files = _upload(dev, missing, remote_dir, options, progress, disk.get("free_bytes"))
                upload_s = time.monotonic() - t0
                for n, (model, sha) in enumerate(zip(models, shas)):
                    report(progress, "measure", f"running {model.name} on {host}", n, len(models), host)
                    try:
                        with timeout_hint(options, "run_timeout"):
                            doc = dev.run(
                                run_args(options, f"{remote_dir}/{rel_of[('model', sha)]}",
                                         f"{remote_dir}/{eval_rel}" if eval_rel else None, lock),
                                options.run_timeout, model.name, max_samples=max(options.max_runs, options.runs))
                        if eval_path and "eval" not in doc:
                            raise DeviceProtocolError(f"the runner on {host} returned no evaluation for {model.name} "
                                                      "although eval data were given", host=host)
                        run_docs.append(doc)
                        if options.gated:
                            gates[sha] = protocol.gate_verdict(doc, options.gate_accuracy, options.gate_p99_ms,
                                                               "the measured run")
                        stats = protocol.latency(doc.get("samples_ms"))
                        report(progress, "measure", f"measured {model.name} on {host}: p50 {fmt_ms(stats['p50'])}, "
                               f"p99 {fmt_ms(stats['p99'])} over {stats['count']} runs", n + 1, len(models), host)
                    except ConnectError as exc:
                        if not (keep_going and run_docs):
                            raise
                        lost = exc  # the lock's context closes the link; the models run so far are kept
                        raise
                    except DeviceError as exc:
                        if not keep_going:
                            raise
                        run_docs.append(exc)
                if options.layers and eval_path and eval_rel:
                    for model, sha, doc in zip(models, shas, run_docs):
                        if sha not in layer_diffs and not isinstance(doc, DeviceError):
                            report(progress, "layers", f"intermediate tensors of {model.name} on {host}", host=host)
                            layer_diffs[sha] = _layer_diff(dev, model, f"{remote_dir}/{rel_of[('model', sha)]}",
                                                           eval_path, f"{remote_dir}/{eval_rel}", options, warnings)
                failed_gate = gates.get(shas[0], {}).get("passed") is False
                if activate and failed_gate:
                    why = "; ".join(gates[shas[0]]["reasons"])
                    warnings.append(f"the health gate failed ({why}): {shas[0][:12]} was not activated; the active "
                                    f"model is unchanged ({str(before.get('current') or 'none')[:12]})")
                    skipped = f"gate failed: {why}"
                elif activate:
                    report(progress, "activate", f"activating {shas[0][:12]} on {host}", host=host)
                    activation = activate_model(dev, lock, shas[0], options, before)
    except ConnectError as exc:
        if exc is not lost:
            raise

    results: list[Any] = []
    for i, (model, sha, run_doc) in enumerate(zip(models, shas, run_docs)):
        if isinstance(run_doc, DeviceError):
            results.append(run_doc)
            continue
        act = activation or protocol.activation_record(remote_dir, before.get("current"), before.get("previous"))
        if skipped is not None and activation is None:
            act["skipped"] = skipped
        # Bytes sent belong to the first model that needed them.
        first = shas.index(sha) == i
        sent = {"model": sent_files.get(("model", sha), 0) if first else 0}
        if i == 0:
            sent["eval"] = sent_files.get(("eval", eval_sha), 0) if eval_path and eval_sha else 0
            sent["runner"] = 0
        res = _result(model, sha, run_doc, facts, options, python, remote_dir, rel_of[("model", sha)],
                      eval_path, eval_sha, sent, upload_s, lock, transport, started_at, started,
                      list(warnings), act, progress)
        results.append(replace(res, layer_diff=layer_diffs.get(sha), gate=gates.get(sha)))
    if lost is not None:
        results += [lost] * (len(models) - len(results))
    return results


def _upload(dev: DeviceClient, items: list[tuple[str, Path, str, str]], remote_dir: str, options: DeployOptions,
            progress: Optional[ProgressCallback], disk_free: Optional[int]) -> dict[tuple[str, str], int]:
    """Upload ``(kind, local, rel, sha)`` items to temp names, verify on the device, rename into place."""
    tr = dev.tr
    sent: dict[tuple[str, str], int] = {}
    staged: list[tuple[str, str, str]] = []
    total = sum(local.stat().st_size for _, local, _, _ in items)
    done_before = 0
    deadline = time.monotonic() + options.upload_timeout
    try:
        for kind, local, rel, sha in items:
            final = f"{remote_dir}/{rel}"
            tmp = f"{final}.tmp-{secrets.token_hex(6)}"
            staged.append((tmp, final, sha))

            def shift(ev: ProgressEvent, _base: int = done_before) -> None:
                # One bar over every file: the transport counts the bytes of this one.
                report(progress, "upload", ev.message, _base + (ev.done or 0), total, tr.host, unit="bytes")

            try:
                sent[(kind, sha)] = tr.put(local, tmp, timeout=max(1.0, deadline - time.monotonic()),
                                           progress=shift if progress is not None else None, label=kind)
            except DeviceError as exc:
                if disk_free is not None and "disk full" in str(exc):
                    exc.message += f"; {disk_free} bytes were free under {remote_dir} before the upload"
                raise
            done_before += local.stat().st_size
        report(progress, "verify", "sha256 on the device", total, total, tr.host, unit="bytes")
        dev.install(staged, max(5.0, deadline - time.monotonic()))
    except BaseException as exc:
        # Over a lost link removal would only wait; the next deploy sweeps temp files.
        if not isinstance(exc, ConnectError):
            for tmp, _final, _sha in staged:
                tr.remove(tmp)
        raise
    return sent


def _layer_diff(dev: DeviceClient, model: Path, remote_model: str, eval_path: Path, remote_eval: str,
                options: DeployOptions, warnings: list[str]) -> Optional[dict[str, Any]]:
    """The first intermediate tensor where the device differs from the host (a finding, not a failure)."""
    from edgeq.layerdiff import compare, host_layers, layers_args, op_outputs

    try:
        host_doc = host_layers(model, eval_path, options.layers, options.reference_cap())
        wanted = op_outputs(host_doc)
        args = layers_args(remote_model, remote_eval, options.layers)
        if wanted:
            args += ["--tensors", ",".join(str(t) for t in wanted)]
        with timeout_hint(options, "run_timeout"):
            device_doc = dev.layers(args, options.run_timeout, f"the layer run of {model.name}")
        return compare(device_doc, host_doc).to_dict()
    except ConnectError:
        raise
    except DeviceError as exc:
        warnings.append(f"no layer diff: {exc}")
        return {"error": str(exc)}


def _result(model: Path, model_sha: str, run_doc: dict[str, Any], facts: dict[str, Any], options: DeployOptions,
            python: str, remote_dir: str, model_rel: str, eval_path: Optional[Path], eval_sha: Optional[str],
            sent: dict[str, int], upload_s: float, lock: DeviceLock, transport: Transport, started_at: str,
            started: float, warnings: list[str], activation: dict[str, Any],
            progress: Optional[ProgressCallback]) -> DeployResult:
    host = transport.host
    device_eval = run_doc.get("eval")
    agreement = None
    ref = None
    if eval_path and eval_sha and options.reference and device_eval:
        report(progress, "reference", "host reference outputs (LiteRT)", host=host)
        try:
            ref = cached_reference(model, model_sha, eval_path, eval_sha, options.reference_cap())
        except DeviceError as exc:
            warnings.append(f"no host reference: {exc}")
            agreement = {"error": str(exc), "top1": None, "max_abs_diff": None}

    evaluation = None
    accuracy = mae = None
    if device_eval:
        # One rule for every output (edgeq.fidelity), applied here on the host to what the device returned.
        evaluation = {k: v for k, v in device_eval.items()
                      if k not in ("outputs", "per_output", "accuracy", "mae", "task")}
        evaluation.update({"data": str(eval_path), "sha256": eval_sha} if eval_path else {})
        try:
            labels, output_labels = eval_labels(eval_path) if eval_path else (None, {})
            figures = output_figures(device_eval, ref, labels, output_labels, run_doc.get("outputs") or [])
        except (DeviceProtocolError, ValueError, TypeError) as exc:  # outputs or labels that do not fit
            figures = []
            warnings.append(f"no per-output figures: {one_line(exc, 300)}")
            agreement = {"error": one_line(exc, 300), "top1": None, "max_abs_diff": None}
        evaluation["outputs"] = figures
        if ref is not None and agreement is None:
            agreement = agreement_of(figures, ref)
        accuracy = next((f["accuracy"] for f in figures if f.get("accuracy") is not None), None)
        mae = next((f["label_mae"] for f in figures if f.get("label_mae") is not None), None)
        if not figures:  # a runner without per-output results
            accuracy, mae = device_eval.get("accuracy"), device_eval.get("mae")
        rows = device_eval.get("rows")
        if isinstance(rows, int) and rows < device_eval["samples"]:
            warnings.append(f"output figures are on the first {rows} of {device_eval['samples']} eval samples "
                            f"(edgeq brings back at most {MAX_OUTPUT_VALUES} output values)")
    device = {k: v for k, v in facts.items() if k not in ("ok", "mode", "have", "runner_version", "activation")}
    runtime = dict(run_doc["runtime"])
    runtime["threads"] = options.threads
    settings = {"runs": options.runs, "warmup": options.warmup, "min_seconds": options.min_seconds,
                "max_runs": options.max_runs, "warmup_runs_done": run_doc.get("warmup_runs"),
                "python": python, "remote_dir": remote_dir, "inputs": run_doc.get("inputs"),
                "outputs": run_doc.get("outputs"), "resized": run_doc.get("resized") or None}
    delegate = run_doc.get("delegate")
    if delegate is not None:
        delegate = dict(delegate)
    if runtime.get("xnnpack") and delegate and delegate.get("applied") is False:
        warnings.append(f"XNNPACK was requested but took none of the model's {delegate.get('nodes')} nodes on the "
                        f"device: {runtime.get('name')} {runtime.get('version') or ''} ran it on its built-in kernels"
                        " (this runtime's XNNPACK does not take these ops or types)")
    elif runtime.get("xnnpack") and (delegate or {}).get("applied") is None and runtime.get("xnnpack_active") is False:
        warnings.append("XNNPACK was requested but the runtime did not report applying it")
    return DeployResult(
        host=host,
        model={"name": model.name, "sha256": model_sha, "bytes": model.stat().st_size,
               "remote_path": f"{remote_dir}/{model_rel}"},
        device=device,
        runtime=runtime,
        latency_ms=LatencyStats.from_samples(run_doc["samples_ms"]),
        load_ms=float(run_doc["load_ms"]),
        first_inference_ms=float(run_doc["first_inference_ms"]),
        peak_rss_bytes=run_doc.get("peak_rss_bytes"),
        accuracy=accuracy,
        mae=mae,
        evaluation=evaluation,
        agreement=agreement,
        transfer={"model_bytes_sent": sent.get("model", 0), "eval_bytes_sent": sent.get("eval", 0),
                  "runner_bytes_sent": sent.get("runner", 0), "seconds": round(upload_s, 3),
                  "uploaded": sorted(k for k, v in sent.items() if v),
                  "connect_attempts": getattr(transport, "connect_attempts", None),
                  "stale_temp_files_removed": lock.swept,
                  # sftp, exec (over the command channel) or local; None when nothing was sent.
                  "method": getattr(transport, "transfer", None) if any(sent.values()) else None},
        settings=settings,
        started_at=started_at,
        duration_s=time.monotonic() - started,
        warnings=tuple(warnings),
        activation=activation,
        delegate=delegate,
    )
