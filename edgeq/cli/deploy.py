"""``edgeq deploy`` and ``edgeq report``: parse, call the library, render."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from edgeq.cli import main
from edgeq.cli._common import clear_progress, echo_json, progress_printer


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--host", metavar="[USER@]HOST[:PORT]",
              help="Device to deploy to over SSH (names from ~/.ssh/config work). Default: this machine (`local`).")
@click.option("--identity", type=click.Path(dir_okay=False), help="Private key file (default: ssh-agent, ~/.ssh/config).")
@click.option("--known-hosts", type=click.Path(dir_okay=False), help="known_hosts file (default ~/.ssh/known_hosts).")
@click.option("--accept-new-host-key", is_flag=True,
              help="Record an unknown host key (like OpenSSH accept-new); a changed key is always refused.")
@click.option("--python", "python", metavar="PATH",
              help="Python on the device (default python3; for local, the current interpreter).")
@click.option("--remote-dir", default="~/.edgeq", show_default=True, help="Directory on the device for models and data.")
@click.option("--eval", "eval_data", type=click.Path(dir_okay=False), metavar="DATA.npz",
              help="Evaluation data (.npz with x and y) for accuracy and agreement on the device.")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(1), help="Minimum timed runs (and at least 1 s).")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0), help="Warm-up runs before timing.")
@click.option("--threads", type=click.IntRange(1), help="Interpreter threads (default: the runtime's choice).")
@click.option("--no-xnnpack", is_flag=True, help="Disable the XNNPACK delegate (reference kernels).")
@click.option("--connect-timeout", default=10.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds for each of connect, SSH banner and authentication.")
@click.option("-o", "--output", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Report directory (default reports/<time>-<host>-<model>/).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json on stdout instead of the summary.")
def deploy(model: Path, host: Optional[str], identity: Optional[str], known_hosts: Optional[str],
           accept_new_host_key: bool, python: Optional[str], remote_dir: str, eval_data: Optional[str], runs: int,
           warmup: int, threads: Optional[int], no_xnnpack: bool, connect_timeout: float,
           report_dir: Optional[Path], as_json: bool) -> None:
    """Push MODEL.tflite to a device, measure latency and accuracy there, and write a report."""
    from edgeq.deploy import DeployOptions, deploy as run_deploy
    from edgeq.report import summary_lines, write_report
    from edgeq.transport import SSHOptions

    options = DeployOptions(
        host=host, python=python, remote_dir=remote_dir, eval_data=eval_data, runs=runs, warmup=warmup,
        threads=threads, xnnpack=not no_xnnpack,
        ssh=SSHOptions(identity=identity, known_hosts=known_hosts, accept_new_host_key=accept_new_host_key,
                       connect_timeout=connect_timeout),
    )
    show = not as_json
    result = run_deploy(model, options, progress_printer(show))
    paths = write_report(result, report_dir)
    clear_progress(show)
    if as_json:
        echo_json(result.to_dict())
        return
    for line in summary_lines(result):
        click.echo(line)
    click.echo(f"report: {paths.html} (also report.json, report.md in {paths.directory})")


@main.command("report")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write an HTML page (one report, or several side by side) to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def report_cmd(dirs: tuple[Path, ...], html_out: Optional[Path], as_json: bool) -> None:
    """Show one deploy report, or compare several side by side (int8 vs float, Pi 4 vs Pi 5)."""
    from edgeq.report import compare, summary_lines

    comparison = compare(list(dirs))
    if html_out:
        from edgeq.errors import InputError

        try:
            html_out.parent.mkdir(parents=True, exist_ok=True)
            html_out.write_text(comparison.html(), encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write {html_out}: {exc.strerror or exc}") from None
    if as_json:
        echo_json(comparison.to_dict())
    elif len(comparison.reports) == 1:
        for line in summary_lines(comparison.reports[0]):
            click.echo(line)
    else:
        click.echo(comparison.table())
    if html_out and not as_json:
        click.echo(f"html: {html_out}")
