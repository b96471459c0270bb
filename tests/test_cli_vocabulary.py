"""One CLI vocabulary: shared options, exit codes only in the CLI, quiet pipes, light --help, progress."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.cli._common import ProgressRenderer
from edgeq.cli._exit import ExitCode, exit_code_for, exit_code_for_outcome
from edgeq.cli._options import InputShape, SshArgs, shape_text
from edgeq.errors import (ConnectError, DataError, DeviceError, EdgeqError, InputError, NoRecipeQualifies, OverBudget,
                          UsageError)
from edgeq.progress import ProgressEvent

TINY = Path(__file__).resolve().parent / "fleet" / "data" / "tiny_a.tflite"

# Options that belong to a shared group: wherever they appear, they must be the same option.
SHARED = ("--target", "--calib", "--eval", "--train", "--samples", "--mean", "--std", "--scale", "--seed",
          "--input-shape", "--identity", "--port", "--known-hosts", "--accept-new-host-key", "--connect-timeout",
          "--python", "--remote-dir", "--inventory", "--json", "--force", "--probe-timeout", "--upload-timeout",
          "--run-timeout")


def _options():
    for name, cmd in main.commands.items():
        for p in cmd.params:
            if p.param_type_name == "option":
                yield name, p


def _signature(p) -> tuple:
    """What the user sees of an option: its spellings, type, range, default, metavar and help."""
    kind = (type(p.type).__name__, tuple(sorted((k, repr(v)) for k, v in vars(p.type).items())))
    return (tuple(sorted(p.opts)), kind, p.default, p.metavar, p.help, p.multiple, p.is_flag)


def test_shared_options_are_the_same_option_everywhere():
    seen: dict[str, dict[tuple, list[str]]] = {}
    for cmd, p in _options():
        long = next((o for o in p.opts if o.startswith("--")), None)
        if long in SHARED:
            seen.setdefault(long, {}).setdefault(_signature(p), []).append(cmd)
    assert {"--target", "--identity", "--connect-timeout", "--inventory", "--json"} <= set(seen)
    different = {opt: variants for opt, variants in seen.items() if len(variants) > 1}
    assert not different, json.dumps({k: list(v.values()) for k, v in different.items()})


def test_short_options_mean_one_thing():
    shorts: dict[str, set[str]] = {}
    for _cmd, p in _options():
        long = next((o for o in p.opts if o.startswith("--")), None)
        for o in p.opts:
            if len(o) == 2:
                shorts.setdefault(o, set()).add(long)
    assert shorts["-i"] == {"--identity"} and shorts["-I"] == {"--inventory"} and shorts["-p"] == {"--port"}
    assert shorts["-t"] == {"--target"} and shorts["-o"] == {"--output"}
    for cmd, p in _options():  # every command that takes a target takes -t
        if "--target" in p.opts:
            assert "-t" in p.opts, cmd


def test_output_help_says_file_or_directory():
    kinds = {}
    for cmd, p in _options():
        if "--output" in p.opts:
            kinds[cmd] = p.help.split(":")[0]
    assert kinds == {"convert": "Output file", "qat": "Output file", "export": "Output directory",
                     "deploy": "Output directory", "sweep": "Output directory", "report": "Output directory"}


def test_input_shape_one_parser_both_spellings():
    t = InputShape()
    assert t.convert("image:1x8x8x3", None, None) == t.convert("image=1x8x8x3", None, None) == ("image", (1, 8, 8, 3))
    assert t.convert("1x8x8x3", None, None) == (None, (1, 8, 8, 3))
    assert t.convert("serving_default_x:0=1x4", None, None) == ("serving_default_x:0", (1, 4))
    assert shape_text(("image", (1, 8, 8, 3))) == "image=1x8x8x3" and shape_text((None, (1, 4))) == "1x4"
    with pytest.raises(UsageError, match="--input-shape"):
        t.convert("image=8xx", None, None)


def test_port_applies_to_host():
    assert SshArgs(port=2222).host("pi@edge") == "pi@edge:2222"
    assert SshArgs(port=2222).host("[::1]") == "[::1]:2222"
    assert SshArgs(port=22).host("pi@edge:22") == "pi@edge:22"
    assert SshArgs().host("edge") == "edge"
    with pytest.raises(UsageError, match="port 2200 but -p says 22"):
        SshArgs(port=22).host("edge:2200")
    with pytest.raises(UsageError, match="-p/--port goes with --host"):
        SshArgs(port=22).host(None)


# ----------------------------------------------------------------- exit codes


def test_exit_codes_are_mapped_in_the_cli_only():
    assert not hasattr(EdgeqError, "exit_code") and not hasattr(DeviceError, "exit_code")
    assert exit_code_for(UsageError("x")) == ExitCode.USAGE == 2
    assert exit_code_for(InputError("x")) == exit_code_for(DataError("x")) == ExitCode.ERROR == 1
    assert exit_code_for(ConnectError("x")) == ExitCode.DEVICE == 4
    assert exit_code_for(NoRecipeQualifies("x")) == 5 and exit_code_for(OverBudget("x")) == 6
    assert exit_code_for(RuntimeError("x")) == ExitCode.INTERNAL == 70
    assert [exit_code_for_outcome(o) for o in ("ok", "device_failed", "gate_failed", "revert_failed")] == [0, 4, 7, 8]


def test_help_documents_every_exit_code():
    text = " ".join(main.help.split())
    for code in ExitCode:
        assert f"{int(code)} " in text, code


# ------------------------------------------------------------------ pipes, imports


def test_closed_pipe_ends_quietly():
    """`edgeq targets --json | head`: the reader is gone before edgeq writes; no traceback, no error line."""
    r, w = os.pipe()
    os.close(r)  # no reader at all: the first write fails with EPIPE, whatever the pipe's buffer
    try:
        proc = subprocess.run([sys.executable, "-m", "edgeq", "targets", "--json"], stdout=w,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w)
    assert proc.stderr == "" and proc.returncode == ExitCode.BROKEN_PIPE == 141


def test_head_of_a_pipeline():
    proc = subprocess.run(f"{sys.executable} -m edgeq targets | head -1", shell=True, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("NAME") and proc.stderr == ""


def test_help_imports_no_heavy_module():
    # Every command's --help: none may import TensorFlow (conversion code only) or numpy/paramiko (startup time).
    code = (
        "import sys\n"
        "from edgeq.cli import main\n"
        "for args in [['--help']] + [[name, '--help'] for name in main.commands]:\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), args\n"
        "print('HEAVY=' + ','.join(m for m in ('numpy', 'paramiko', 'tensorflow', 'keras', 'tf_keras', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="


# ------------------------------------------------------------------- targets


def test_near_miss_target_names():
    res = CliRunner().invoke(main, ["check", str(TINY), "-t", "rpi-4"])
    assert res.exit_code == 1 and "unknown target 'rpi-4'" in res.output and "did you mean rpi4?" in res.output
    res = CliRunner().invoke(main, ["check", str(TINY), "-t", "esp32s3"])
    assert "did you mean esp32-s3?" in res.output
    res = CliRunner().invoke(main, ["check", str(TINY), "-t", "quantum-toaster"])
    assert "did you mean" not in res.output and "known targets: " in res.output


def test_targets_table_fits_100_columns():
    res = CliRunner().invoke(main, ["targets"])
    assert res.exit_code == 0
    assert max(len(line) for line in res.output.splitlines()) <= 100
    assert "cortex-m4" in res.output and "rpi-zero-2w" in res.output


# --------------------------------------------------------- JSON documents


def test_json_documents_carry_a_schema(tmp_path):
    doc = json.loads(CliRunner().invoke(main, ["targets", "--json"]).stdout)
    assert doc["schema"] == "edgeq.targets/1" and all(isinstance(t["ram_bytes"], int) for t in doc["targets"])
    res = CliRunner().invoke(main, ["check", str(TINY), "-t", "cortex-m4", "--no-measure", "--json"])
    doc = json.loads(res.stdout)
    assert doc["schema"] == "edgeq.check/1"
    assert isinstance(doc["memory"]["flash_needed_bytes"], int) and isinstance(doc["estimate"]["latency_ms"], float)


# ------------------------------------------------------------------- check thresholds


def test_check_thresholds_fail_with_exit_3():
    base = ["check", str(TINY), "-t", "cortex-m4", "--no-measure"]
    assert CliRunner().invoke(main, base + ["--max-flash-pct", "50", "--max-latency-ms", "5"]).exit_code == 0
    res = CliRunner().invoke(main, base + ["--max-flash-pct", "1", "--json"])
    assert res.exit_code == ExitCode.DOES_NOT_FIT == 3
    doc = json.loads(res.stdout)
    assert doc["fits"] is False and [v["code"] for v in doc["violations"]] == ["threshold"]
    assert "over --max-flash-pct 1" in doc["violations"][0]["message"]
    res = CliRunner().invoke(main, base + ["--max-latency-ms", "0.000001"])
    assert res.exit_code == 3 and "over --max-latency-ms" in res.output and "DOES NOT FIT" in res.output
    # A limit on a figure the check does not have (RAM with --no-measure) fails: a gate passes on evidence.
    res = CliRunner().invoke(main, base + ["--max-ram-pct", "90"])
    assert res.exit_code == 3 and "RAM is not known" in res.output
    res = CliRunner().invoke(main, base + ["--max-ram-pct", "0"])
    assert res.exit_code == 2


# ------------------------------------------------------------------- output directories


def test_existing_report_directory_is_refused_before_deploying(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.json").write_text("{}")
    res = CliRunner().invoke(main, ["deploy", str(tmp_path / "missing.tflite"), "-o", str(out)])
    assert res.exit_code == 2 and "already holds a report" in res.output and "--force" in res.output
    assert (out / "report.json").read_text() == "{}"


def test_outdir_helpers(tmp_path):
    from edgeq.outdir import prepare_dir, prepare_file

    d = prepare_dir(tmp_path / "a" / "b")
    assert d.is_dir()
    (d / "sweep.json").write_text("{}")
    with pytest.raises(UsageError, match="already holds a report"):
        prepare_dir(d)
    assert prepare_dir(d, overwrite=True) == d
    f = prepare_file(tmp_path / "x" / "y" / "m.tflite")
    assert f.parent.is_dir() and not f.exists()
    f.write_text("m")
    assert prepare_file(f) == f
    with pytest.raises(UsageError, match="already exists"):
        prepare_file(f, overwrite=False)


# ------------------------------------------------------------------- progress


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_bar_with_eta_on_a_terminal():
    out, clock = io.StringIO(), _Clock()
    show = ProgressRenderer(out, tty=True, clock=clock, width=100)
    show(ProgressEvent("calibrate", "samples", 0, 200))
    clock.t = 2.0
    show(ProgressEvent("calibrate", "samples", 50, 200))
    last = out.getvalue().split("\r\x1b[2K")[-1]
    assert last.startswith("calibrate [" + "#" * 6 + "-" * 18 + "]  25 % 50/200 ETA 6.00 s samples")
    clock.t = 3.0
    show(ProgressEvent("upload", "model", 3 * 1024 * 1024, 10 * 1024 * 1024, host="pi", unit="bytes"))
    clock.t = 4.0
    show(ProgressEvent("upload", "model", 6 * 1024 * 1024, 10 * 1024 * 1024, host="pi", unit="bytes"))
    last = out.getvalue().split("\r\x1b[2K")[-1]
    assert "[pi] upload [" in last and "6.0 MiB/10.0 MiB" in last and "ETA 1.33 s" in last
    show(ProgressEvent("upload", "model", 10 * 1024 * 1024, 10 * 1024 * 1024, host="pi", unit="bytes"))
    assert out.getvalue().endswith("\n") and "ETA" not in out.getvalue().split("\r\x1b[2K")[-1]


def test_progress_lines_off_a_terminal_are_periodic():
    out, clock = io.StringIO(), _Clock()
    show = ProgressRenderer(out, tty=False, clock=clock, width=100)
    show(ProgressEvent("load", "model.keras"))
    clock.t = 0.5
    show(ProgressEvent("export", "SavedModel"))
    assert out.getvalue() == ""  # the first second is quiet: a quick command prints only its result or error
    for i in range(201):
        clock.t = 1 + i * 0.01
        show(ProgressEvent("calibrate", "", i, 200))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert len(lines) == 11 and lines[0].startswith("calibrate   0 % 0/200") and lines[-1].startswith(
        "calibrate 100 % 200/200")
    for i in range(100):  # a stage without a count: its first line, then one every 5 s
        clock.t = 10 + i * 0.1
        show(ProgressEvent("measure", f"run {i}"))
    measure = [line for line in out.getvalue().splitlines() if line.startswith("measure")]
    assert measure == ["measure run 0", "measure run 50"]


def test_progress_lines_reach_a_log(tmp_path):
    """A deploy whose stderr is a file (CI) shows its stages instead of nothing."""
    res = CliRunner().invoke(main, ["deploy", str(TINY), "--python", sys.executable, "--remote-dir",
                                    str(tmp_path / "dev"), "--runs", "1", "--warmup", "0", "--no-activate",
                                    "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert any(line.startswith("[local] ") for line in res.stderr.splitlines()), res.stderr


# ------------------------------------------------------------------- single-host gate


def test_single_host_gate_exit_7_and_not_activated(tmp_path, device_python):
    dev = tmp_path / "dev"
    base = ["deploy", str(TINY), "--python", device_python, "--remote-dir", str(dev), "--runs", "5", "--warmup", "0"]
    res = CliRunner().invoke(main, base + ["--gate-p99-ms", "0.000001", "-o", str(tmp_path / "r1")])
    assert res.exit_code == ExitCode.GATE_FAILED == 7, res.output
    assert "verdict: FAIL" in res.stdout and "fails its health gate" in res.stdout
    assert "was not activated" in res.stdout
    doc = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert doc["gate"]["passed"] is False and doc["outcome"] == "gate_failed"
    assert not (dev / "current").exists()

    res = CliRunner().invoke(main, base + ["--gate-p99-ms", "100000", "--json", "-o", str(tmp_path / "r2")])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["gate"]["passed"] is True and doc["outcome"] == "ok" and (dev / "current").exists()

    res = CliRunner().invoke(main, base + ["--gate-accuracy", "0.5"])
    assert res.exit_code == 2 and "--eval" in res.output


def test_sweep_table_fits_100_columns():
    from types import SimpleNamespace as NS

    from edgeq.cli.sweep import table_lines

    def recipe(name, verdict, **kw):
        base = dict(name=name, size_bytes=123_456, executable=True, host={"accuracy": 0.9812}, drop_points=0.31,
                    check={"accelerated": True}, fits=True, latency_ms=12.345, latency_label="estimate",
                    device={"latency_ms": {"p99": 15.5}}, energy_mj=1.234, verdict=verdict, error=None)
        base.update(kw)
        return NS(**base)

    long = "bigger than int8-per-tensor-with-a-long-name (" + "x" * 150 + ") and slower than the recommendation"
    recipes = [recipe("int8-per-tensor", "recommended"), recipe("fp32", long, size_bytes=4_000_000),
               recipe("int4-dynamic", "simulated", executable=False, latency_ms=None)]
    result = NS(budget_metric="accuracy", sorted_recipes=lambda: recipes)
    lines = table_lines(result)
    assert max(len(line) for line in lines) <= 100, "\n".join(lines)
    assert lines[0].startswith("recipe ") and "RECOMMENDED" in lines[2] and lines[3].startswith("fp32")
    assert "~12.3 ms" in lines[2] and "120.6 KiB" in lines[2] and "98.1 %" in lines[2]
    notes = lines[5:]
    assert notes[0].startswith("  fp32: bigger than") and "x" * 150 in "".join(n.strip() for n in notes)
    assert len(notes) > 1 and notes[-1].endswith("slower than the recommendation")
