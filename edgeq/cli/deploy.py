"""``edgeq deploy`` and ``edgeq report``: parse, call the library, render."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from edgeq.cli import main
from edgeq.cli._common import clear_progress, echo, echo_json, progress_printer, redraw_block
from edgeq.escape import one_line


_PASSPHRASE_ENV = "EDGEQ_SSH_PASSPHRASE"


def _ssh_options(identity: Optional[str], known_hosts: Optional[str], accept_new_host_key: bool,
                 connect_timeout: float):
    import os

    from edgeq.transport import SSHOptions

    # Read from the environment, never from argv (visible in `ps`); never echoed.
    return SSHOptions(identity=identity, known_hosts=known_hosts, accept_new_host_key=accept_new_host_key,
                      connect_timeout=connect_timeout, passphrase=os.environ.get(_PASSPHRASE_ENV) or None)


class FleetView:
    """A live per-host view: one line per host, redrawn in place on a terminal.

    Off a terminal it prints one line per host as each finishes.
    """

    def __init__(self, names: list[str], enabled: bool) -> None:
        import sys
        import threading

        self.names = names
        self.live = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.state = {n: "waiting" for n in names}
        self.width = max((len(n) for n in names), default=4)
        self.lock = threading.Lock()
        self.drawn = False

    def __call__(self, ev) -> None:
        if ev.host not in self.state:
            return
        count = f" {100 * ev.done // ev.total}%" if ev.done is not None and ev.total else ""
        line = f"{ev.stage}{count} {ev.message}".strip()
        with self.lock:
            self.state[ev.host] = line
            if self.live:
                self._draw()
            elif self.enabled and ev.stage in ("done", "failed", "timeout"):
                echo(one_line(f"{ev.host.ljust(self.width)}  {line}", 200), err=True)

    def _draw(self) -> None:
        import shutil

        cols = shutil.get_terminal_size((100, 20)).columns
        redraw_block([f"{n.ljust(self.width)}  {self.state[n]}" for n in self.names],
                     len(self.names) if self.drawn else 0, cols)
        self.drawn = True


def _fleet_table(summary: dict) -> str:
    from edgeq.report import FLEET_HEADER, fleet_rows

    rows = [FLEET_HEADER] + fleet_rows(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(FLEET_HEADER) - 1)]
    lines = ["  ".join([c.ljust(widths[i]) for i, c in enumerate(r[:-1])] + [r[-1]]).rstrip() for r in rows]
    lines.insert(1, "-" * min(120, len(lines[0])))
    return "\n".join(lines)


def timeout_options(f):
    """``--probe-timeout``, ``--upload-timeout`` and ``--run-timeout`` (checked by ``check_options``: one line)."""
    for name, default, what in reversed((
            ("probe", 120, "the probe and every short device step (lock, activate)"),
            ("upload", 600, "the whole upload, verification on the device included"),
            ("run", 900, "each run of a model on the device (timing and evaluation)"))):
        f = click.option(f"--{name}-timeout", f"{name}_timeout", type=float, default=None, metavar="SECONDS",
                         help=f"Seconds for {what} [default: {default}; at most 86400]. An inventory's "
                              f"edgeq_{name}_timeout sets it per host.")(f)
    return f


def timeouts(probe_timeout: Optional[float], upload_timeout: Optional[float],
             run_timeout: Optional[float]) -> dict:
    """The timeouts given on the command line, as ``DeployOptions`` fields (the rest keep their defaults)."""
    given = {"probe_timeout": probe_timeout, "upload_timeout": upload_timeout, "run_timeout": run_timeout}
    return {k: v for k, v in given.items() if v is not None}


def _inventory_hosts(inventory: Path, limit: Optional[str]):
    from edgeq.inventory import load_inventory

    return load_inventory(inventory).select(limit)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--host", metavar="[USER@]HOST[:PORT]",
              help="Device to deploy to over SSH (names from ~/.ssh/config work). Default: this machine (`local`).")
@click.option("-i", "--inventory", type=click.Path(dir_okay=False, path_type=Path),
              help="Ansible inventory (INI or YAML): deploy to all its hosts in parallel.")
@click.option("--limit", metavar="PATTERN", help="With --inventory: only hosts matching this Ansible pattern.")
@click.option("--forks", default=5, show_default=True, type=click.IntRange(1, 256),
              help="With --inventory: hosts deployed at once.")
@click.option("--identity", type=click.Path(dir_okay=False),
              help="Private key file (default: ssh-agent, ~/.ssh/config). An encrypted key's passphrase is read "
                   "from EDGEQ_SSH_PASSPHRASE.")
@click.option("--known-hosts", type=click.Path(dir_okay=False), help="known_hosts file (default ~/.ssh/known_hosts).")
@click.option("--accept-new-host-key", is_flag=True,
              help="Record an unknown host key (like OpenSSH accept-new); a changed key is always refused.")
@click.option("--python", "python", metavar="PATH",
              help="Python on the device (default python3; for local, the current interpreter).")
@click.option("--remote-dir", default="~/.edgeq", show_default=True, help="Directory on the device for models and data.")
@click.option("--eval", "eval_data", type=click.Path(dir_okay=False), metavar="DATA.npz",
              help="Evaluation data for accuracy and agreement on the device: an .npz with one array per model "
                   "input (or x) and optional labels y (y_<output> per output), or an .npy for one input.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="[NAME=]1x32x32x3",
              help="Shape of a dynamic model input when there is no --eval (repeat for several inputs).")
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
@click.option("--connect-timeout", default=10.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds for each of connect, SSH banner and authentication.")
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
              help="Health gate: minimum on-device accuracy on --eval (a fraction, as in report.json), measured "
                   "from REMOTE_DIR/current after activation. A host below it reverts to its previous model.")
@click.option("--gate-p99-ms", type=click.FloatRange(0, min_open=True), metavar="MAX",
              help="Health gate: maximum p99 latency in ms of a run from REMOTE_DIR/current after activation.")
@click.option("-o", "--output", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Report directory (default reports/<time>-<host>-<model>/, or reports/<time>-fleet-<model>/).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json (summary.json with --inventory) on stdout.")
@click.pass_context
def deploy(ctx: click.Context, model: Path, host: Optional[str], inventory: Optional[Path], limit: Optional[str],
           forks: int, identity: Optional[str], known_hosts: Optional[str], accept_new_host_key: bool,
           python: Optional[str], remote_dir: str, eval_data: Optional[str], runs: int, warmup: int,
           threads: Optional[int], no_xnnpack: bool, no_activate: bool, layers: int, keep: Optional[int],
           input_shapes: tuple[str, ...], connect_timeout: float, probe_timeout: Optional[float],
           upload_timeout: Optional[float], run_timeout: Optional[float], host_timeout: Optional[float], canary: int,
           batch: Optional[str], max_fail: float,
           gate_accuracy: Optional[float], gate_p99_ms: Optional[float], report_dir: Optional[Path],
           as_json: bool) -> None:
    """Push MODEL.tflite to a device (or a fleet), measure latency and accuracy there, and write a report.

    The model becomes the device's active one (REMOTE_DIR/current) only after it
    was verified and ran there; `edgeq rollback` switches back.

    With --canary, --batch, --max-fail or a --gate-* option the fleet deploy is a
    staged rollout: batch by batch, each host checked from REMOTE_DIR/current
    after activation and reverted by itself if it fails its gate. Exit codes:
    0 all hosts ok, 4 a host failed or was unreachable, 7 a host failed its gate
    (reverted), 8 a host failed its gate and could NOT be reverted.
    """
    from edgeq.deploy import DeployOptions, check_options, deploy as run_deploy
    from edgeq.errors import ExitCode, UsageError
    from edgeq.report import summary_lines, write_report

    if inventory and host:
        raise UsageError("--host and --inventory do not go together", hint="put the host in the inventory")
    staged = bool(canary or batch or max_fail or gate_accuracy is not None or gate_p99_ms is not None)
    if not inventory and (limit or forks != 5 or host_timeout or staged):
        raise UsageError("--limit, --forks, --host-timeout, --canary, --batch, --max-fail and --gate-* need "
                         "--inventory", hint="put the host in an inventory of one")
    options = DeployOptions(
        host=host, python=python, remote_dir=remote_dir, eval_data=eval_data, runs=runs, warmup=warmup,
        threads=threads, xnnpack=not no_xnnpack, activate=not no_activate, keep=keep, layers=layers,
        input_shapes=tuple(input_shapes), ssh=_ssh_options(identity, known_hosts, accept_new_host_key, connect_timeout),
        **timeouts(probe_timeout, upload_timeout, run_timeout),
    )
    if keep is not None and no_activate:
        raise UsageError("--keep prunes after an activation; it does nothing with --no-activate")
    check_options(options)
    show = not as_json
    if inventory:
        import time

        from edgeq.fleet_deploy import FleetOptions, deploy_fleet
        from edgeq.report import write_fleet_report

        hosts = _inventory_hosts(inventory, limit)
        view = FleetView([h.name for h in hosts], show)
        if staged:
            from edgeq.rollout import RolloutOptions, exit_status, rollout

            staged_result = rollout(model, hosts, RolloutOptions(FleetOptions(options, forks, host_timeout), canary,
                                                                 batch, max_fail, gate_accuracy, gate_p99_ms), view)
            out = report_dir or Path("reports") / f"{time.strftime('%Y%m%d-%H%M%S')}-rollout-{model.stem[:40]}"
            paths = write_fleet_report(staged_result, out)
            summary = staged_result.to_dict()
            if as_json:
                echo_json(summary)
            else:
                echo(_fleet_table(summary))
                c = summary["counts"]
                echo(f"{c['ok']} of {c['hosts']} hosts ok in {len(summary['rollout']['batches'])} batches "
                           f"({c['failed']} failed, {c['timeout']} timed out, {c['reverted']} reverted, "
                           f"{c['gate_failed']} failed their gate, {c['not_started']} not started) "
                           f"in {staged_result.seconds:.1f} s; summary: {paths.summary_html}")
                if staged_result.stop_reason:
                    echo(staged_result.stop_reason)
                for h in staged_result.hosts:
                    if h.status == "revert_failed":
                        echo(f"error: {h.name}: {h.error}", err=True)
            code = exit_status(staged_result)
            if code:
                ctx.exit(code)
            return
        result = deploy_fleet(model, hosts, FleetOptions(options, forks, host_timeout), view)
        out = report_dir or Path("reports") / f"{time.strftime('%Y%m%d-%H%M%S')}-fleet-{model.stem[:40]}"
        paths = write_fleet_report(result, out)
        summary = result.to_dict()
        if as_json:
            echo_json(summary)
        else:
            echo(_fleet_table(summary))
            c = summary["counts"]
            echo(f"{c['ok']} of {c['hosts']} hosts ok ({c['failed']} failed, {c['timeout']} timed out) "
                       f"in {result.seconds:.1f} s; summary: {paths.summary_html}")
        if not result.ok:
            ctx.exit(int(ExitCode.DEVICE))
        return
    result = run_deploy(model, options, progress_printer(show))
    paths = write_report(result, report_dir)
    clear_progress(show)
    if as_json:
        echo_json(result.to_dict())
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


@main.command()
@click.option("--host", metavar="[USER@]HOST[:PORT]", help="Device to roll back (default: this machine).")
@click.option("-i", "--inventory", type=click.Path(dir_okay=False, path_type=Path),
              help="Ansible inventory: roll back all its hosts.")
@click.option("--limit", metavar="PATTERN", help="With --inventory: only hosts matching this pattern.")
@click.option("--forks", default=5, show_default=True, type=click.IntRange(1, 256), help="Hosts at once.")
@click.option("--identity", type=click.Path(dir_okay=False), help="Private key file.")
@click.option("--known-hosts", type=click.Path(dir_okay=False), help="known_hosts file (default ~/.ssh/known_hosts).")
@click.option("--python", "python", metavar="PATH", help="Python on the device (default python3).")
@click.option("--remote-dir", default="~/.edgeq", show_default=True, help="Directory on the device.")
@click.option("--connect-timeout", default=10.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds for each of connect, SSH banner and authentication.")
@click.option("--probe-timeout", "probe_timeout", type=float, default=None, metavar="SECONDS",
              help="Seconds for each step on the device (lock, rollback) [default: 120; at most 86400]. An "
                   "inventory's edgeq_probe_timeout sets it per host.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def rollback(ctx: click.Context, host: Optional[str], inventory: Optional[Path], limit: Optional[str], forks: int,
             identity: Optional[str], known_hosts: Optional[str], python: Optional[str], remote_dir: str,
             connect_timeout: float, probe_timeout: Optional[float], as_json: bool) -> None:
    """Make the previously active model (REMOTE_DIR/previous) the active one again."""
    from edgeq.deploy import DeployOptions, check_options, rollback as run_rollback
    from edgeq.errors import ExitCode, UsageError

    if inventory and host:
        raise UsageError("--host and --inventory do not go together")
    options = DeployOptions(host=host, python=python, remote_dir=remote_dir,
                            ssh=_ssh_options(identity, known_hosts, False, connect_timeout),
                            **timeouts(probe_timeout, None, None))
    check_options(options)
    if inventory:
        from edgeq.fleet_deploy import FleetOptions, rollback_fleet

        hosts = _inventory_hosts(inventory, limit)
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


@main.command("report")
@click.argument("dirs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write an HTML page (one report, or several side by side) to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--ansible", "ansible_results", type=click.Path(dir_okay=False, path_type=Path), metavar="RESULTS.json",
              help="Results saved by the edgeq.fleet.results callback of an Ansible run: write summary.json and "
                   "summary.html (as `edgeq deploy --inventory` does) into -o DIR.")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="With --ansible: the summary directory (default reports/<time>-ansible/).")
@click.option("-i", "--inventory", type=click.Path(dir_okay=False, path_type=Path),
              help="With --ansible: the play's inventory, so hosts never reached are listed as not started.")
@click.option("--limit", metavar="PATTERN", help="With --ansible and --inventory: the play's --limit.")
@click.pass_context
def report_cmd(ctx: click.Context, dirs: tuple[Path, ...], html_out: Optional[Path], as_json: bool,
               ansible_results: Optional[Path], out_dir: Optional[Path], inventory: Optional[Path],
               limit: Optional[str]) -> None:
    """Show one deploy report, or compare several side by side (int8 vs float, Pi 4 vs Pi 5).

    With --ansible, turn the results of an Ansible run (edgeq.fleet collection)
    into the fleet summary. Exit codes as for a staged `edgeq deploy`: 0 all
    hosts ok, 4 a host failed, 7 a host failed its gate (reverted), 8 a revert failed.
    """
    from edgeq.errors import UsageError
    from edgeq.report import compare, summary_lines, write_comparison

    if ansible_results:
        import time

        from edgeq.ansible_report import write_ansible_summary
        from edgeq.rollout import exit_status

        if dirs or html_out:
            raise UsageError("--ansible writes summary.html into -o DIR; it does not take report directories "
                             "or --html")
        names = [h.name for h in _inventory_hosts(inventory, limit)] if inventory else []
        out = out_dir or Path("reports") / f"{time.strftime('%Y%m%d-%H%M%S')}-ansible"
        result, paths = write_ansible_summary(ansible_results, out, names)
        summary = result.to_dict()
        if as_json:
            echo_json(summary)
        else:
            echo(_fleet_table(summary))
            c = summary["counts"]
            echo(f"{c['ok']} of {c['hosts']} hosts ok ({c['failed']} failed, {c['reverted']} reverted, "
                       f"{c['gate_failed']} failed their gate, {c['revert_failed']} could not revert, "
                       f"{c['not_started']} not started); summary: {paths.summary_html}")
        code = exit_status(result)
        if code:
            ctx.exit(code)
        return
    if not dirs:
        raise UsageError("give report directories, or --ansible RESULTS.json")
    if out_dir or inventory or limit:
        raise UsageError("-o, --inventory and --limit go with --ansible")
    comparison = compare(list(dirs))
    if html_out:
        write_comparison(comparison, html_out)
    if as_json:
        echo_json(comparison.to_dict())
    elif len(comparison.reports) == 1:
        for line in summary_lines(comparison.reports[0]):
            echo(line)
    else:
        echo(comparison.table())
    if html_out and not as_json:
        echo(f"html: {html_out}")
