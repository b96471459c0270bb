"""The command line as a whole: every command documented, no TensorFlow for --help, errors as one line."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from edgeq.cli import main


def test_every_command_has_help_text():
    runner = CliRunner()
    assert set(main.commands) >= {"convert", "check", "targets", "export", "deploy", "report", "rollback"}
    for name, cmd in main.commands.items():
        assert cmd.help and len(cmd.help.strip()) > 20, name
        res = runner.invoke(main, [name, "--help"])
        assert res.exit_code == 0 and "Usage: " in res.output, name
        for param in cmd.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"{name} {param.opts[0]} has no help text"


def test_help_of_every_command_without_tensorflow():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from edgeq.cli import main\n"
        "for name in list(main.commands) + [None]:\n"
        "    args = [name, '--help'] if name else ['--help']\n"
        "    assert CliRunner().invoke(main, args).exit_code == 0, name\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'tf_keras') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_debug_shows_traceback_and_plain_run_does_not(tmp_path):
    missing = str(tmp_path / "nope.tflite")
    plain = CliRunner().invoke(main, ["check", missing, "--target", "rpi4"])
    assert plain.exit_code == 1
    assert plain.output.strip().splitlines() == [f"error: {missing}: no such file; check the path to the .tflite model"]
    debug = subprocess.run([sys.executable, "-m", "edgeq", "--debug", "check", missing, "--target", "rpi4"],
                           capture_output=True, text=True, timeout=60)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and debug.stderr.strip().endswith("check the path to the .tflite model")
