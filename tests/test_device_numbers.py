"""Untrusted numbers in device answers: an integer hundreds of digits long is a protocol error (one `error:` line,
exit 4, not an internal error), whichever answer carries it, and the deploy leaves no device lock behind."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq._device import protocol
from edgeq.cli import main
from edgeq.deploy import runner_source
from edgeq.device import _busy_message, integer, num
from tests.deploy.test_device_protocol import fake_python

MODEL = Path(__file__).resolve().parent / "fleet" / "data" / "tiny_a.tflite"
HUGE = 10 ** 400  # past the largest float: math.isfinite and float() raise OverflowError


def test_protocol_loads_bounds_integers():
    assert protocol.loads('{"a": [1, -5, 18446744073709551615, 0.5]}') == {"a": [1, -5, 2 ** 64 - 1, 0.5]}
    for text in (str(HUGE), "-" + str(HUGE), "[" + "9" * 21 + "]", "1" * 5000):
        with pytest.raises(ValueError, match="digits"):
            protocol.loads(text)


def test_schema_checks_never_overflow_on_a_huge_integer():
    from edgeq.device import _Bad

    for check in (num(), num(0), integer(0), integer(0, 1 << 31)):
        with pytest.raises(_Bad, match="out of range"):
            check(HUGE, "x")  # a document that bypassed protocol.loads still fails as a protocol error
    assert "unknown time" in _busy_message("pi", {"age_s": HUGE})


def _real(python: str, *args: str) -> dict:
    out = subprocess.run([python, "-", *args], input=runner_source(), capture_output=True, timeout=120)
    return json.loads(out.stdout)


def _with_huge(doc: dict, path: str) -> str:
    """``doc`` as JSON with the number at ``path`` (dotted) replaced by a 401-digit integer."""
    d = json.loads(json.dumps(doc))
    cur = d
    keys = path.split(".")
    for k in keys[:-1]:
        cur = cur[k]
    cur[keys[-1]] = HUGE
    return json.dumps(d)


def _answers(mode: str, python: str, remote: Path) -> tuple[str, str]:
    """(the device's crafted answer to ``mode``, whether the real runner runs first) for each case."""
    if mode == "probe":
        return _with_huge(_real(python, "probe", "--dir", str(remote), "--prepare"), "disk.free_bytes"), "run-real"
    if mode == "lock":
        # The lock is really taken, then the answer carries a huge integer: the lock must be given back.
        return json.dumps({"ok": True, "mode": "lock", "remote_dir": str(remote), "broke_stale": None,
                           "swept": HUGE}), "run-real"
    doc = _real(python, "run", "--model", str(MODEL), "--runs", "3", "--min-seconds", "0", "--warmup", "0",
                "--min-warmup-seconds", "0")
    return _with_huge(doc, "peak_rss_bytes"), ""


@pytest.mark.parametrize("mode", ["probe", "lock", "run"])
def test_a_huge_integer_in_a_device_answer_is_one_error_line_and_no_lock(mode, device_python, tmp_path, ledger):
    remote = tmp_path / "device"
    remote.mkdir(mode=0o700)
    text, after = _answers(mode, device_python, remote)
    fake = fake_python(tmp_path, device_python, mode, text, after=after)
    res = CliRunner().invoke(main, ["deploy", str(MODEL), "--python", fake, "--remote-dir", str(remote),
                                    "--runs", "3", "--warmup", "0"])
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 4, (res.exit_code, res.output, res.exception)
    assert len(errors) == 1 and "digits" in errors[0] and len(errors[0]) < 600, res.output
    assert "Traceback" not in res.output
    assert not (remote / "lock").exists(), "the device lock was left held"
    assert not (remote / "current").exists()  # nothing was activated on the strength of it
    ledger("bad_input", f"a 401-digit integer in the {mode} answer")
