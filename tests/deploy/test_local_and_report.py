"""Local deploy (this machine is the device), the CLI, report.json's shape, and the HTML in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.deploy import DeployOptions, deploy
from edgeq.report import compare, load_report, render_html, write_report

REQUIRED = {
    "model": {"sha256", "bytes"},
    "runtime": {"name", "version", "threads", "xnnpack"},
    "latency_ms": {"min", "p50", "p90", "p99", "mean", "std", "samples"},
    "transfer": {"model_bytes_sent"},
}
TOP = {"model", "device", "runtime", "latency_ms", "load_ms", "first_inference_ms", "peak_rss_bytes", "accuracy",
       "agreement", "transfer", "edgeq_version"}


@pytest.fixture(scope="module")
def local_reports(tmp_path_factory, digits_int8_tflite, digits_float_tflite, digits_eval_npz, device_python):
    """Two real local deploys (int8 on the device venv, float with XNNPACK off) written as reports."""
    base = tmp_path_factory.mktemp("reports")
    remote = base / "device"
    int8 = deploy(digits_int8_tflite, DeployOptions(python=device_python, remote_dir=str(remote),
                                                    eval_data=str(digits_eval_npz), min_seconds=0.2))
    f32 = deploy(digits_float_tflite, DeployOptions(python=device_python, remote_dir=str(remote), xnnpack=False,
                                                    threads=1, eval_data=str(digits_eval_npz), min_seconds=0.2))
    return write_report(int8, base / "int8").directory, write_report(f32, base / "f32").directory


@pytest.mark.slow
def test_report_json_golden_shape(local_reports):
    doc = json.loads((local_reports[0] / "report.json").read_text())
    assert TOP <= set(doc)
    for key, fields in REQUIRED.items():
        assert fields <= set(doc[key]), key
    assert doc["runtime"]["name"] == "tflite_runtime" and doc["runtime"]["xnnpack"] is True
    assert isinstance(doc["accuracy"], float) and 0.8 < doc["accuracy"] <= 1.0
    assert len(doc["latency_ms"]["samples"]) == doc["latency_ms"]["count"] >= 50
    assert doc["latency_ms"]["min"] <= doc["latency_ms"]["p50"] <= doc["latency_ms"]["p90"] <= doc["latency_ms"]["p99"]
    assert doc["agreement"]["top1"] >= 0.98 and doc["peak_rss_bytes"] > 1_000_000
    assert {"arch", "os", "python", "numpy", "cpu_cores", "mem_total_bytes", "emulation", "disk"} <= set(doc["device"])
    f32 = load_report(local_reports[1])
    assert f32["runtime"]["xnnpack"] is False and f32["runtime"]["threads"] == 1
    for d in local_reports:
        assert (d / "report.md").read_text().startswith("# edgeq deploy report")
        html = (d / "report.html").read_text()
        assert "<svg" in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")


@pytest.mark.slow
def test_compare_and_report_cli(local_reports, tmp_path):
    cmp = compare(local_reports)
    assert len(cmp.labels) == 2 and any(r[0] == "latency p50" for r in cmp.rows)
    out = tmp_path / "cmp.html"
    res = CliRunner().invoke(main, ["report", *map(str, local_reports), "--html", str(out)])
    assert res.exit_code == 0, res.output
    assert "latency p99" in res.output and "tflite_runtime" in res.output
    assert "<svg" in out.read_text()
    one = CliRunner().invoke(main, ["report", str(local_reports[0])])
    assert one.exit_code == 0 and "p50" in one.output and "accuracy" in one.output


@pytest.mark.slow
def test_deploy_cli_local(digits_int8_tflite, digits_eval_npz, device_python, tmp_path):
    out = tmp_path / "rep"
    res = CliRunner().invoke(main, ["deploy", str(digits_int8_tflite), "--eval", str(digits_eval_npz), "--python",
                                    device_python, "--remote-dir", str(tmp_path / "dev"), "--runs", "10",
                                    "--warmup", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "p50" in res.output and "accuracy" in res.output and str(out) in res.output
    res = CliRunner().invoke(main, ["deploy", str(digits_int8_tflite), "--python", device_python, "--remote-dir",
                                    str(tmp_path / "dev"), "--json", "-o", str(tmp_path / "rep2")])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["transfer"]["model_bytes_sent"] == 0 and doc["accuracy"] is None and doc["agreement"] is None


def test_cli_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(main, ["deploy", str(tmp_path / "missing.tflite")])
    assert res.exit_code == 1 and res.output.startswith("error: ") and "missing.tflite" in res.output
    bad = tmp_path / "not_a_model.tflite"
    bad.write_bytes(b"hello world, not flatbuffers")
    res = CliRunner().invoke(main, ["deploy", str(bad)])
    assert res.exit_code == 1 and "TFL3" in res.output
    res = CliRunner().invoke(main, ["deploy", str(bad), "--host", "pi;reboot"])
    assert res.exit_code == 2 and "invalid host" in res.output
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code == 1 and "no report.json" in res.output


def test_deploy_and_report_do_not_import_tensorflow():
    code = ("import sys; import edgeq.cli, edgeq.deploy, edgeq.report, edgeq.transport; "
            "from click.testing import CliRunner; CliRunner().invoke(edgeq.cli.main, ['deploy', '--help']); "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.browser
@pytest.mark.slow
def test_report_html_renders_in_chromium(local_reports, tmp_path):
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is missing; run `make sysdeps`"
    png = tmp_path / "shot.png"
    html = (local_reports[0] / "report.html").resolve()
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,900",
                    html.as_uri()], check=True, capture_output=True, timeout=120)
    img = Image.open(png).convert("RGB")
    assert img.size == (1200, 900)
    colours = img.getcolors(maxcolors=1 << 20) or []
    non_white = sum(n for n, c in colours if c != (255, 255, 255))
    assert len(colours) > 20 and non_white > 0.02 * 1200 * 900


def test_render_html_escapes_untrusted_text():
    doc = {"host": "<script>alert(1)</script>", "model": {"name": "<img src=x>.tflite", "sha256": "0" * 64,
           "bytes": 1}, "latency_ms": {"samples": [1.0, 2.0, 3.0], "p50": 2.0}, "device": {}, "runtime": {}}
    html = render_html(doc)
    assert "<script>alert" not in html and "<img src=x>" not in html


def test_summary_says_when_the_device_is_emulated():
    from edgeq.report import summary_lines

    doc = {"host": "pi", "model": {"name": "m.tflite"}, "latency_ms": {"p50": 1.0}, "runtime": {},
           "device": {"arch": "aarch64", "emulation": {"emulated": True}}}
    assert any("emulated device (qemu)" in line for line in summary_lines(doc))
    doc["device"]["emulation"]["emulated"] = False
    assert not any("emulated" in line for line in summary_lines(doc))
