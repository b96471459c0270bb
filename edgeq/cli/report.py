"""``edgeq report``: show or compare deploy reports, or turn an Ansible run into the fleet summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import click

from edgeq.cli import main
from edgeq.cli._common import echo, echo_json
from edgeq.cli._exit import exit_code_for_outcome
from edgeq.cli._options import force_option, inventory_option, json_option, output_dir_option


@main.command("report")
@click.argument("dirs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write an HTML page (one report, or several side by side) to this file (missing directories "
                   "are created; an existing file is replaced only with --force).")
@json_option
@click.option("--ansible", "ansible_results", type=click.Path(dir_okay=False, path_type=Path), metavar="RESULTS.json",
              help="Results saved by the edgeq.fleet.results callback of an Ansible run: write summary.json and "
                   "summary.html (as `edgeq deploy --inventory` does) into -o DIR.")
@output_dir_option("with --ansible, summary.json and summary.html", default="reports/<time>-ansible/")
@force_option
@inventory_option
@click.option("--limit", metavar="PATTERN", help="With --ansible and --inventory: the play's --limit.")
@click.pass_context
def report_cmd(ctx: click.Context, dirs: tuple[Path, ...], html_out: Optional[Path], as_json: bool,
               ansible_results: Optional[Path], output: Optional[str], force: bool, inventory: Optional[str],
               limit: Optional[str]) -> None:
    """Show one deploy report, or compare several side by side (int8 vs float, Pi 4 vs Pi 5).

    With --ansible, turn the results of an Ansible run (edgeq.fleet collection)
    into the fleet summary (with --inventory, the play's inventory: hosts never
    reached are listed as not started). Exit codes as for a staged `edgeq deploy`: 0 all
    hosts ok, 4 a host failed, 7 a host failed its gate (reverted), 8 a revert failed.
    """
    from edgeq.errors import UsageError
    from edgeq.report import compare, fleet_table, summary_lines, write_comparison

    if ansible_results:
        from edgeq.report.ansible import write_ansible_summary
        from edgeq.cli.deploy import inventory_hosts

        if dirs or html_out:
            raise UsageError("--ansible writes summary.html into -o DIR; it does not take report directories "
                             "or --html")
        names = [h.name for h in inventory_hosts(inventory, limit)] if inventory else []
        out = output or Path("reports") / f"{time.strftime('%Y%m%d-%H%M%S')}-ansible"
        result, paths = write_ansible_summary(ansible_results, out, names, overwrite=force)
        summary = result.to_dict()
        if as_json:
            echo_json(summary)
        else:
            echo(fleet_table(summary))
            c = summary["counts"]
            echo(f"{c['ok']} of {c['hosts']} hosts ok ({c['failed']} failed, {c['reverted']} reverted, "
                 f"{c['gate_failed']} failed their gate, {c['revert_failed']} could not revert, "
                 f"{c['not_started']} not started); summary: {paths.summary_html}")
        code = exit_code_for_outcome(result.outcome)
        if code:
            ctx.exit(int(code))
        return
    if not dirs:
        raise UsageError("give report directories, or --ansible RESULTS.json")
    if output or inventory or limit:
        raise UsageError("-o, --inventory and --limit go with --ansible")
    if force and not html_out:
        raise UsageError("--force replaces an existing -o DIR (--ansible) or --html FILE; give one of them")
    comparison = compare(list(dirs))
    if html_out:
        write_comparison(comparison, html_out, overwrite=force)
    if as_json:
        echo_json(comparison.to_dict())
    elif len(comparison.reports) == 1:
        for line in summary_lines(comparison.reports[0]):
            echo(line)
    else:
        echo(comparison.table())
    if html_out and not as_json:
        echo(f"html: {html_out}")
