"""``edgeq deploy`` and ``edgeq rollback``: parse, call the library, render."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import click

from edgeq.cli import main
from edgeq.cli._common import clear_progress, echo, echo_json, progress_printer
from edgeq.cli._exit import ExitCode, exit_code_for_outcome
from edgeq.cli._fleet import FleetView
from edgeq.cli._options import (SshArgs, eval_option, force_option, input_shape_option, inventory_option,
                                json_option, output_dir_option, probe_timeout_option, shape_text, ssh_options,
                                timeout_options, timeouts)


def inventory_hosts(inventory: str, limit: Optional[str]) -> Any:
    """The inventory's hosts matching ``--limit``."""
    from edgeq.inventory import load_inventory

    return load_inventory(Path(inventory)).select(limit)


def _exit_with(ctx: click.Context, outcome: Any) -> None:
    code = exit_code_for_outcome(outcome)
    if code:
        ctx.exit(int(code))


def _default_dir(kind: str, model: Path) -> Path:
    return Path("reports") / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{model.stem[:40]}"


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--host", metavar="[USER@]HOST[:PORT]",
              help="Device to deploy to over SSH (names from ~/.ssh/config work). Default: this machine (`local`).")
@inventory_option
@click.option("--limit", metavar="PATTERN", help="With --inventory: only hosts matching this Ansible pattern.")
@click.option("--forks", default=5, show_default=True, type=click.IntRange(1, 256),
              help="With --inventory: hosts deployed at once.")
@ssh_options
@eval_option()
@input_shape_option
@click.option("--runs", default=50, show_default=True, type=click.IntRange(1), help="Minimum timed runs (and at least 1 s).")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0), help="Warm-up runs before timing.")
@click.option("--threads", type=click.IntRange(1), help="Interpreter threads (default: the runtime's choice).")
@click.option("--no-xnnpack", is_flag=True, help="Disable the XNNPACK delegate (reference kernels).")
@click.option("--no-activate", is_flag=True,
              help="Measure only: leave REMOTE_DIR/current pointing at the model that was active.")
@click.option("--layers", "layers", default=0, type=int, metavar="N",
              help="Run N eval inputs on the device keeping every intermediate tensor, compare each with the "
                   "host's LiteRT, and name the first tensor (op, layer) that differs by more than one "
                   "quantization step. Needs --eval.")
@click.option("--keep", type=int, metavar="N",
              help="After activating, delete all but the N newest models on the device (the active and the "
                   "previous model are always kept).")
@timeout_options
@click.option("--host-timeout", type=click.FloatRange(1.0),
              help="With --inventory: seconds after which a host that has not finished is abandoned "
                   "(default: the sum of the phase deadlines).")
@click.option("--canary", default=0, show_default=True, type=click.IntRange(0), metavar="N",
              help="With --inventory: deploy to the first N hosts first, as their own batch (a staged rollout).")
@click.option("--batch", metavar="N|PCT%",
              help="With --inventory: hosts per batch after the canaries (a count, or a percentage of all hosts "
                   "like Ansible's serial). Default: all the rest at once.")
@click.option("--max-fail", "max_fail", default=0.0, show_default=True, type=click.FloatRange(0, 100),
              metavar="PCT", help="With --inventory: stop before the next batch when more than PCT% of the hosts "
                                  "started so far failed (failed, unreachable, or failed their gate).")
@click.option("--gate-accuracy", type=click.FloatRange(0, 1), metavar="MIN",
              help="Health gate: minimum on-device accuracy on --eval (a fraction, as in report.json). One host: "
                   "judged on the measured run, the model is activated only if it passes (exit 7 if not). "
                   "With --inventory: judged from REMOTE_DIR/current after activation; a host below it reverts.")
@click.option("--gate-p99-ms", type=click.FloatRange(0, min_open=True), metavar="MAX",
              help="Health gate: maximum p99 latency in ms of the measured run (as --gate-accuracy).")
@output_dir_option("report.json, report.md and report.html (summary.json and summary.html with --inventory)",
                   default="reports/<time>-<host>-<model>/, or reports/<time>-fleet-<model>/")
@force_option
@json_option
@click.pass_context
def deploy(ctx: click.Context, model: Path, host: Optional[str], inventory: Optional[str], limit: Optional[str],
           forks: int, ssh: SshArgs, eval_data: Optional[str], input_shapes: tuple, runs: int, warmup: int,
           threads: Optional[int], no_xnnpack: bool, no_activate: bool, layers: int, keep: Optional[int],
           probe_timeout: Optional[float], upload_timeout: Optional[float], run_timeout: Optional[float],
           host_timeout: Optional[float], canary: int, batch: Optional[str], max_fail: float,
           gate_accuracy: Optional[float], gate_p99_ms: Optional[float], output: Optional[str], force: bool,
           as_json: bool) -> None:
    """Push MODEL.tflite to a device (or every host of --inventory, in parallel), measure latency and accuracy
    there, and write a report.

    The model becomes the device's active one (REMOTE_DIR/current) only after it
    was verified and ran there (and passed --gate-* if given); `edgeq rollback`
    switches back.

    With --inventory and --canary, --batch, --max-fail or a --gate-* option the
    fleet deploy is a staged rollout: batch by batch, each host checked from
    REMOTE_DIR/current after activation and reverted by itself if it fails its
    gate. Exit codes: 0 all hosts ok, 4 a host failed or was unreachable, 7 a
    host failed its gate (one host: not activated; fleet: reverted), 8 a host
    failed its gate and could NOT be reverted.
    """
    from edgeq.deploy import DeployOptions, check_options, deploy as run_deploy
    from edgeq.errors import UsageError
    from edgeq.outdir import prepare_dir

    if inventory and host:
        raise UsageError("--host and --inventory do not go together", hint="put the host in the inventory")
    gated = gate_accuracy is not None or gate_p99_ms is not None
    staged = bool(canary or batch or max_fail) or (bool(inventory) and gated)
    if not inventory and (limit or forks != 5 or host_timeout or staged):
        raise UsageError("--limit, --forks, --host-timeout, --canary, --batch and --max-fail need --inventory",
                         hint="put the host in an inventory of one")
    options = DeployOptions(
        host=ssh.host(host), python=ssh.python, remote_dir=ssh.remote_dir, eval_data=eval_data, runs=runs,
        warmup=warmup, threads=threads, xnnpack=not no_xnnpack, activate=not no_activate, keep=keep, layers=layers,
        input_shapes=tuple(shape_text(s) for s in input_shapes), ssh=ssh.options(),
        # One host: the gate is judged before activation (DeployOptions); a fleet: by the rollout after it.
        gate_accuracy=None if inventory else gate_accuracy, gate_p99_ms=None if inventory else gate_p99_ms,
        **timeouts(probe_timeout, upload_timeout, run_timeout),
    )
    if keep is not None and no_activate:
        raise UsageError("--keep prunes after an activation; it does nothing with --no-activate")
    check_options(options)
    if output:  # refused before anything is deployed, not after
        prepare_dir(output, overwrite=force)
    show = not as_json
    if inventory:
        _deploy_fleet(ctx, model, inventory, limit, forks, options, host_timeout, staged, canary, batch, max_fail,
                      gate_accuracy, gate_p99_ms, output, force, show, as_json)
        return
    from edgeq.report import summary_lines, write_report

    result = run_deploy(model, options, progress_printer(show))
    paths = write_report(result, output, overwrite=force)
    clear_progress(show)
    if as_json:
        echo_json(result.to_dict())
        _exit_with(ctx, result.outcome)
        return
    for line in summary_lines(result):
        echo(line)
    if result.layer_diff and "error" not in result.layer_diff:
        from edgeq.layerdiff import layer_diff_lines

        for line in layer_diff_lines(result.layer_diff):
            echo(line)
    act = result.activation or {}
    if act.get("activated"):
        echo(f"active model: {act['active'][:12]} ({'switched' if act.get('switched') else 'already active'}; "
             f"previous {str(act.get('previous') or '-')[:12]})")
        if act.get("pruned"):
            echo(f"pruned {len(act['pruned'])} old model(s) from the device (--keep {keep})")
    echo(f"report: {paths.html} (also report.json, report.md in {paths.directory})")
    _exit_with(ctx, result.outcome)


def _deploy_fleet(ctx: click.Context, model: Path, inventory: str, limit: Optional[str], forks: int, options: Any,
                  host_timeout: Optional[float], staged: bool, canary: int, batch: Optional[str], max_fail: float,
                  gate_accuracy: Optional[float], gate_p99_ms: Optional[float], output: Optional[str], force: bool,
                  show: bool, as_json: bool) -> None:
    from edgeq.fleet_deploy import FleetOptions, deploy_fleet
    from edgeq.report import fleet_table, write_fleet_report

    hosts = inventory_hosts(inventory, limit)
    view = FleetView([h.name for h in hosts], show)
    fleet = FleetOptions(options, forks, host_timeout)
    if staged:
        from edgeq.rollout import RolloutOptions, rollout

        result = rollout(model, hosts, RolloutOptions(fleet, canary, batch, max_fail, gate_accuracy, gate_p99_ms),
                         view)
        paths = write_fleet_report(result, output or _default_dir("rollout", model), overwrite=force)
    else:
        result = deploy_fleet(model, hosts, fleet, view)
        paths = write_fleet_report(result, output or _default_dir("fleet", model), overwrite=force)
    summary = result.to_dict()
    if as_json:
        echo_json(summary)
        _exit_with(ctx, result.outcome)
        return
    echo(fleet_table(summary))
    c = summary["counts"]
    if staged:
        echo(f"{c['ok']} of {c['hosts']} hosts ok in {len(summary['rollout']['batches'])} batches "
             f"({c['failed']} failed, {c['timeout']} timed out, {c['reverted']} reverted, "
             f"{c['gate_failed']} failed their gate, {c['not_started']} not started) "
             f"in {result.seconds:.1f} s; summary: {paths.summary_html}")
        if result.stop_reason:
            echo(result.stop_reason)
        for h in result.hosts:
            if h.status == "revert_failed":
                echo(f"error: {h.name}: {h.error}", err=True)
    else:
        echo(f"{c['ok']} of {c['hosts']} hosts ok ({c['failed']} failed, {c['timeout']} timed out) "
             f"in {result.seconds:.1f} s; summary: {paths.summary_html}")
    _exit_with(ctx, result.outcome)


@main.command()
@click.option("--host", metavar="[USER@]HOST[:PORT]", help="Device to roll back (default: this machine).")
@inventory_option
@click.option("--limit", metavar="PATTERN", help="With --inventory: only hosts matching this Ansible pattern.")
@click.option("--forks", default=5, show_default=True, type=click.IntRange(1, 256),
              help="With --inventory: hosts rolled back at once.")
@ssh_options
@probe_timeout_option
@json_option
@click.pass_context
def rollback(ctx: click.Context, host: Optional[str], inventory: Optional[str], limit: Optional[str], forks: int,
             ssh: SshArgs, probe_timeout: Optional[float], as_json: bool) -> None:
    """Make the previously active model (REMOTE_DIR/previous) the active one again (on --host, this machine,
    or every host of --inventory)."""
    from edgeq.deploy import DeployOptions, check_options, rollback as run_rollback
    from edgeq.errors import UsageError

    if inventory and host:
        raise UsageError("--host and --inventory do not go together")
    options = DeployOptions(host=ssh.host(host), python=ssh.python, remote_dir=ssh.remote_dir, ssh=ssh.options(),
                            **timeouts(probe_timeout))
    check_options(options)
    if inventory:
        from edgeq.fleet_deploy import FleetOptions, rollback_fleet

        hosts = inventory_hosts(inventory, limit)
        result = rollback_fleet(hosts, FleetOptions(options, forks), FleetView([h.name for h in hosts], not as_json))
        summary = result.to_dict()
        if as_json:
            echo_json(summary)
        else:
            for h in summary["hosts"]:
                what = f"active {str(h.get('active'))[:12]}" if h["status"] == "ok" else h.get("error")
                echo(f"{h['name']}: {h['status']}: {what}")
        if not result.ok:
            ctx.exit(int(ExitCode.DEVICE))
        return
    res = run_rollback(options)
    if as_json:
        echo_json(res.to_dict())
    else:
        echo(f"{res.host}: active model is now {str(res.active)[:12]} (was {str(res.rolled_back_from)[:12]})")
