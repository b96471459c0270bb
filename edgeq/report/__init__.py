"""Reports: what a deploy, a fleet, a comparison and a sweep measured, for people and for programs.

* ``load``    - read and validate a ``report.json`` from anywhere (bounded, shape-checked)
* ``values``  - read document values safely; format them (units from ``edgeq.units``)
* ``facts``   - the verdict and the device facts, shared by text and HTML
* ``text``    - terminal summary and tables (100 columns), ``report.md``
* ``html``, ``charts`` - ``report.html`` and what every page shares (style, verdict box)
* ``write``   - ``write_report``: report.json + report.md + report.html
* ``compare`` - several reports side by side, with ratios against the first
* ``fleet``   - the fleet summary (``summary.json`` + ``summary.html``)
* ``sweep``, ``pareto`` - ``sweep.html`` and its Pareto charts
* ``ansible`` - saved Ansible results into the fleet summary (imported on its own: it needs edgeq.rollout)

Everything here returns text or writes files; nothing prints. Values from a
document are untrusted: escaped for HTML and Markdown, made inert for the terminal.
"""

from edgeq.report.compare import Comparison, compare, write_comparison
from edgeq.report.facts import Verdict, deploy_verdict, device_facts
from edgeq.report.fleet import (
    FLEET_HEADER,
    FleetReportPaths,
    fleet_rows,
    fleet_table,
    fleet_verdict,
    render_fleet_html,
    write_fleet_report,
)
from edgeq.report.html import render_html
from edgeq.report.load import MAX_REPORT_BYTES, check_report, load_report
from edgeq.report.text import fit_table, render_markdown, summary_lines, verdict_line
from edgeq.report.write import ReportPaths, default_report_dir, write_report

__all__ = ["ReportPaths", "Comparison", "write_report", "load_report", "check_report", "compare", "write_comparison",
           "render_html", "render_markdown", "summary_lines", "verdict_line", "device_facts", "default_report_dir",
           "FleetReportPaths", "write_fleet_report", "render_fleet_html", "fleet_rows", "fleet_table", "FLEET_HEADER",
           "fleet_verdict", "deploy_verdict", "Verdict", "fit_table", "MAX_REPORT_BYTES"]
