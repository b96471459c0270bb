"""The command line as a whole: every command documented, errors as one line (--help imports: test_cli_vocabulary)."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from edgeq.cli import main
from edgeq.cli._exit import ExitCode


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


def test_debug_shows_traceback_and_plain_run_does_not(tmp_path):
    missing = str(tmp_path / "nope.tflite")
    plain = CliRunner().invoke(main, ["check", missing, "--target", "rpi4"])
    assert plain.exit_code == 1
    assert plain.output.strip().splitlines() == [f"error: {missing}: no such file; check the path to the .tflite model"]
    debug = subprocess.run([sys.executable, "-m", "edgeq", "--debug", "check", missing, "--target", "rpi4"],
                           capture_output=True, text=True, timeout=60)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and debug.stderr.strip().endswith("check the path to the .tflite model")


# ----------------------------------------------------------- the one error path


def _boom(exc: BaseException):
    def fail(*_args, **_kwargs):
        raise exc

    return fail


def test_unexpected_exception_is_one_line_and_exit_70(tmp_path, monkeypatch):
    import edgeq.tflite_file

    monkeypatch.setattr(edgeq.tflite_file, "read_tflite", _boom(RuntimeError("boom\x1b[2J\nsecond line")))
    res = CliRunner().invoke(main, ["check", str(tmp_path / "m.tflite"), "--target", "rpi4"])
    assert res.exit_code == ExitCode.INTERNAL == 70
    assert res.output.splitlines() == [
        "error: internal error: RuntimeError: boom\\x1b[2J second line; this is a bug in edgeq, "
        "please report it with the output of --debug"]
    assert "Traceback" not in res.output


def test_unexpected_exception_with_debug_shows_the_traceback(tmp_path, monkeypatch):
    import edgeq.tflite_file

    monkeypatch.setattr(edgeq.tflite_file, "read_tflite", _boom(KeyError("x")))
    res = CliRunner().invoke(main, ["--debug", "check", str(tmp_path / "m.tflite"), "--target", "rpi4"])
    assert res.exit_code == 70
    assert "Traceback (most recent call last)" in res.stderr and "KeyError" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: internal error: KeyError: 'x'; this is a bug")


def test_keyboard_interrupt_exits_130(tmp_path, monkeypatch):
    import edgeq.tflite_file

    monkeypatch.setattr(edgeq.tflite_file, "read_tflite", _boom(KeyboardInterrupt()))
    res = CliRunner().invoke(main, ["check", str(tmp_path / "m.tflite"), "--target", "rpi4"])
    assert res.exit_code == 130 and res.output.strip() == "error: interrupted"


def test_error_lines_escape_terminal_control_characters(tmp_path, ledger):
    name = tmp_path / "evil\x1b]0;pwned\x07\x1b[2J.tflite"
    res = CliRunner().invoke(main, ["check", str(name), "--target", "rpi4"])
    assert res.exit_code == 1
    assert "\x1b" not in res.output and "\x07" not in res.output
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J.tflite: no such file" in res.output
    ledger("bad_input", "escape sequences in a model file name")


def test_help_documents_every_exit_code():
    text = CliRunner().invoke(main, ["--help"]).output
    text = " ".join(text.split())
    for code, words in [(0, "ok"), (1, "error"), (2, "bad usage"), (3, "model does not fit"), (4, "device unreachable"),
                        (5, "no qualifying recipe"), (6, "accuracy budget not met"), (7, "a host failed its health gate"),
                        (8, "a host failed its gate and could not be reverted"), (70, "internal error"),
                        (130, "interrupted"), (141, "output pipe closed")]:
        assert f"{code} {words}" in text, (code, text)
    assert {int(c) for c in ExitCode} == {0, 1, 2, 3, 4, 5, 6, 7, 8, 70, 130, 141}


def test_echo_escapes_control_characters():
    import click

    from edgeq.cli._common import echo

    @click.command()
    def cmd():
        echo("tensor \x1b[31mred\x1b[0m\r\nnext")

    out = CliRunner().invoke(cmd).output
    assert out == "tensor \\x1b[31mred\\x1b[0m\\x0d\nnext\n"


# Commands that print only through edgeq.cli._common.echo (control characters escaped). The coordinator
# extends this list as the other command modules switch from click.echo (see the hostfiles report).
ECHO_HELPER_MODULES = ["check", "convert", "deploy", "repair", "sweep"]


def test_commands_print_through_the_escaping_echo():
    import re
    from pathlib import Path

    import edgeq.cli

    for name in ECHO_HELPER_MODULES:
        source = (Path(edgeq.cli.__file__).parent / f"{name}.py").read_text()
        assert not re.search(r"\bclick\.echo\(", source), f"edgeq/cli/{name}.py calls click.echo directly"
        assert re.search(r"\becho(_result)?\(", source), name  # echo_result prints through echo
