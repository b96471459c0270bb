"""The device's answers are data: every runner document is validated (types, finite numbers, lengths, size,
nesting), a violation is one DeviceProtocolError line, and nothing is activated on the strength of it. The
runner keeps its promise of one JSON document on every path."""

from __future__ import annotations

import importlib.util
import io
import json
import stat
import time
import subprocess
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path

import pytest

from edgeq.deploy import DeployOptions, deploy, runner_source
from edgeq.errors import DeviceError, DeviceProtocolError
from tests.fleet.conftest import active, sha

FAST = dict(runs=5, warmup=0, min_seconds=0.05, min_warmup_seconds=0.0, reference=False)
RUNNER = Path(__file__).resolve().parents[2] / "deploy" / "runner.py"


def fake_python(tmp_path: Path, real: str, mode: str, doc_text: str, after: str = "") -> str:
    """A device 'python' that answers ``mode`` with ``doc_text`` (after really running it when ``after`` is
    "run-real") and is the real interpreter for every other mode."""
    doc = tmp_path / f"doc-{mode}.json"
    doc.write_text(doc_text)
    script = tmp_path / f"fakepy-{mode}"
    real_first = f'"{real}" "$@" >/dev/null 2>&1 <"$tmp"' if after == "run-real" else ":"
    script.write_text(f"""#!/bin/sh
tmp=$(mktemp); cat >"$tmp"
for a in "$@"; do
  if [ "$a" = "{mode}" ]; then {real_first}; cat "{doc}"; rm -f "$tmp"; exit 0; fi
done
"{real}" "$@" <"$tmp"; st=$?; rm -f "$tmp"; exit $st
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


@pytest.fixture(scope="module")
def real_run_doc(device_python, tmp_path_factory) -> dict:
    model = Path(__file__).resolve().parents[1] / "fleet" / "data" / "tiny_b.tflite"
    out = subprocess.run([device_python, "-", "run", "--model", str(model), "--runs", "3", "--min-seconds", "0",
                          "--min-warmup-seconds", "0", "--warmup", "0"], input=runner_source(), capture_output=True,
                         timeout=120)
    return json.loads(out.stdout)


def _mut(doc: dict, path: str, value) -> str:
    d = json.loads(json.dumps(doc))
    keys = path.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur[k]
    if value is _DEL:
        del cur[keys[-1]]
    else:
        cur[keys[-1]] = value
    return json.dumps(d)


_DEL = object()
BAD_RUN = {
    "NaN in the timings": lambda d: _mut(d, "samples_ms", [1.0, float("nan")]),
    "Infinity in the timings": lambda d: _mut(d, "samples_ms", [1.0, float("inf")]),
    "a string where a number belongs": lambda d: _mut(d, "load_ms", "fast"),
    "a missing key": lambda d: _mut(d, "samples_ms", _DEL),
    "a negative latency": lambda d: _mut(d, "samples_ms", [1.0, -3.0]),
    "a boolean as a number": lambda d: _mut(d, "first_inference_ms", True),
    "more timings than asked for": lambda d: _mut(d, "samples_ms", [1.0] * 20000),
    "no timed runs": lambda d: _mut(d, "samples_ms", []),
    "runtime not an object": lambda d: _mut(d, "runtime", "tflite"),
    "outputs not a list": lambda d: _mut(d, "outputs", {"a": 1}),
    "accuracy above 1": lambda d: _mut(d, "eval", {"samples": 1, "seconds": 0.1, "accuracy": 3.0}),
    "deep nesting": lambda d: '{"ok": true, "x": ' + "[" * 50000 + "]" * 50000 + "}",
    "moderate nesting in a free field": lambda d: _mut(d, "runtime_log", None)[:-1] + ', "z": ' + "[" * 40
                                                  + "]" * 40 + "}",
    "not an object": lambda d: json.dumps([d]),
    "ok is a string": lambda d: _mut(d, "ok", "yes"),
    "not JSON": lambda d: "{'ok': True}",
    "a failure without an error message": lambda d: '{"ok": false}',
}


@pytest.mark.parametrize("case", sorted(BAD_RUN))
def test_invalid_run_documents_are_protocol_errors_and_activate_nothing(case, real_run_doc, tmp_path, device_python,
                                                                        model_a, model_b, ledger):
    remote = tmp_path / "device"
    opts = DeployOptions(python=device_python, remote_dir=str(remote), **FAST)
    deploy(model_a, opts)
    fake = fake_python(tmp_path, device_python, "run", BAD_RUN[case](real_run_doc))
    with pytest.raises(DeviceProtocolError) as exc:
        deploy(model_b, replace(opts, python=fake))
    text = str(exc.value)
    assert "\n" not in text and len(text) < 1000 and "the runner on local" in text, text
    assert active(remote) == sha(model_a)  # nothing switched on the strength of a bad answer
    assert not (remote / "lock").exists()
    ledger("bad_input", f"runner document: {case}")
    ledger("model_kept", f"runner document: {case}")


@pytest.mark.parametrize("field,value", [("hostname", 5), ("have", ["models/x"]), ("remote_dir", None),
                                         ("activation", {"current": "../../etc"})])
def test_invalid_probe_document_is_a_protocol_error(field, value, tmp_path, device_python, model_a, ledger):
    remote = tmp_path / "device"
    out = subprocess.run([device_python, "-", "probe", "--dir", str(remote)], input=runner_source(),
                         capture_output=True, timeout=120)
    fake = fake_python(tmp_path, device_python, "probe", _mut(json.loads(out.stdout), field, value))
    with pytest.raises(DeviceProtocolError, match=field):
        deploy(model_a, DeployOptions(python=fake, remote_dir=str(remote), **FAST))
    ledger("bad_input", f"probe document with a bad {field}")


def test_activation_that_switched_but_answered_garbage_says_so(tmp_path, device_python, model_a, model_b, ledger):
    remote = tmp_path / "device"
    opts = DeployOptions(python=device_python, remote_dir=str(remote), **FAST)
    deploy(model_a, opts)
    # The device really switches, then answers something that is not a runner document.
    fake = fake_python(tmp_path, device_python, "activate", "Segmentation fault", after="run-real")
    with pytest.raises(DeviceError) as exc:
        deploy(model_b, replace(opts, python=fake))
    text = str(exc.value)
    assert active(remote) == sha(model_b)
    assert "now runs it" in text and sha(model_b)[:12] in text and "rollback" in text, text
    ledger("fault", "activation switched but the answer was lost")


def test_activation_error_without_a_switch_says_unchanged(tmp_path, device_python, model_a, model_b, ledger):
    remote = tmp_path / "device"
    opts = DeployOptions(python=device_python, remote_dir=str(remote), **FAST)
    deploy(model_a, opts)
    fake = fake_python(tmp_path, device_python, "activate", json.dumps({"ok": False, "error": "disk on fire"}))
    with pytest.raises(DeviceError) as exc:
        deploy(model_b, replace(opts, python=fake))
    assert "unchanged" in str(exc.value) and sha(model_a)[:12] in str(exc.value)
    assert active(remote) == sha(model_a)
    ledger("fault", "activation refused by the device")
    ledger("model_kept", "activation refused by the device")


# --------------------------------------------------------- one JSON document


def _runner_out(device_python: str, *args: str, stdin_extra: bytes = b"") -> tuple[int, list[str]]:
    p = subprocess.run([device_python, "-", *args], input=runner_source() + stdin_extra, capture_output=True,
                       timeout=120)
    return p.returncode, p.stdout.decode().splitlines()


ONE_DOC = {
    "unknown mode": ["explode"],
    "no mode": [],
    "a non-numeric --runs": ["run", "--model", "{model}", "--runs", "many"],
    "a missing --model": ["run"],
    "an eval file that is not an npz": ["run", "--model", "{model}", "--eval", "{garbage}"],
    "an eval file with a pickled object": ["run", "--model", "{model}", "--eval", "{pickled}"],
    "an eval file without x": ["run", "--model", "{model}", "--eval", "{nox}"],
    "a model that does not exist": ["run", "--model", "/nonexistent/model.tflite"],
    "a lock with --owner that is not JSON": ["lock", "--dir", "{dir}", "--token", "t", "--owner", "{{"],
    "a --have outside the directory": ["probe", "--dir", "{dir}", "--have", "../../etc/passwd", "0" * 64],
}


@pytest.mark.parametrize("case", sorted(ONE_DOC))
def test_runner_answers_one_json_document_on_every_path(case, device_python, tmp_path, model_a, ledger):
    import numpy as np

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object))
    nox = tmp_path / "nox.npz"
    np.savez(nox, y=np.zeros(3))
    args = [a.format(model=model_a, garbage=garbage, pickled=pickled, nox=nox, dir=tmp_path / "d")
            for a in ONE_DOC[case]]
    code, lines = _runner_out(device_python, *args)
    assert len(lines) == 1, lines
    doc = json.loads(lines[0])
    assert doc["ok"] is False and isinstance(doc["error"], str) and doc["kind"] and code == 2
    assert "Traceback" not in doc["error"]
    ledger("bad_input", f"runner: {case}")


def _load_runner():
    spec = importlib.util.spec_from_file_location("edgeq_runner_under_test", RUNNER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _FailingInterpreter:
    """A runtime whose invoke() fails after ``ok`` successful calls (as a broken kernel does)."""

    ok = 0

    def __init__(self, **kwargs):
        self.calls = 0

    def allocate_tensors(self):
        pass

    def get_input_details(self):
        return [{"index": 0, "shape": [1, 2], "dtype": "float32", "quantization": (0.0, 0), "name": "in"}]

    def get_output_details(self):
        return [{"index": 1, "shape": [1, 2], "dtype": "float32", "quantization": (0.0, 0), "name": "out"}]

    def set_tensor(self, index, value):
        pass

    def get_tensor(self, index):
        import numpy as np
        return np.zeros((1, 2), np.float32)

    def invoke(self):
        self.calls += 1
        if self.calls > self.ok:
            raise RuntimeError("Node number 3 (FULLY_CONNECTED) failed to invoke.\nmore detail")


@pytest.mark.parametrize("ok_calls", [0, 1, 4])
def test_an_invoke_failure_is_one_json_document(ok_calls, tmp_path, model_a, monkeypatch, ledger):
    runner = _load_runner()
    interp = type("Interp", (_FailingInterpreter,), {"ok": ok_calls})
    monkeypatch.setattr(runner.facts, "find_runtime", lambda prefer=None: ("fake", interp, None, "0", {}))
    out = io.StringIO()
    with redirect_stdout(out):
        code = runner.main(["run", "--model", str(model_a), "--runs", "3", "--warmup", "2", "--min-seconds", "0",
                            "--min-warmup-seconds", "0"])
    lines = out.getvalue().splitlines()
    assert code == 2 and len(lines) == 1, lines
    doc = json.loads(lines[0])
    assert doc["ok"] is False and doc["kind"] == "model" and "failed to invoke" in doc["error"]
    ledger("fault", f"invoke() fails after {ok_calls} calls")


def test_a_rollback_whose_answer_is_lost_reports_what_is_active(tmp_path, device_python, model_a, model_b, ledger):
    from edgeq.deploy import rollback

    remote = tmp_path / "device"
    opts = DeployOptions(python=device_python, remote_dir=str(remote), **FAST)
    deploy(model_a, opts)
    deploy(model_b, opts)
    fake = fake_python(tmp_path, device_python, "rollback", "Killed", after="run-real")
    with pytest.raises(DeviceError) as exc:
        rollback(replace(opts, python=fake))
    assert active(remote) == sha(model_a)  # it did roll back...
    assert f"current = {sha(model_a)[:12]}" in str(exc.value)  # ...and the error says so
    ledger("fault", "rollback switched but the answer was lost")


def test_a_device_flooding_stdout_is_one_line_and_activates_nothing(tmp_path, device_python, model_a, model_b,
                                                                   real_run_doc, ledger):
    remote = tmp_path / "device"
    opts = DeployOptions(python=device_python, remote_dir=str(remote), **FAST)
    deploy(model_a, opts)
    flood = "x" * (5 << 20) + "\n" + json.dumps(real_run_doc)  # 5 MiB of noise, then a valid document
    fake = fake_python(tmp_path, device_python, "run", flood)
    with pytest.raises(DeviceProtocolError, match="more output than edgeq keeps") as exc:
        deploy(model_b, replace(opts, python=fake))
    assert len(str(exc.value)) < 1000
    assert active(remote) == sha(model_a)
    ledger("bad_input", "5 MiB on the runner's stdout")
    ledger("model_kept", "5 MiB on the runner's stdout")


def test_an_activation_that_times_out_after_switching_says_so(tmp_path, device_python, model_a, model_b, ledger):
    remote = tmp_path / "device"
    opts = DeployOptions(python=device_python, remote_dir=str(remote), probe_timeout=5.0, **FAST)
    deploy(model_a, opts)
    slow = tmp_path / "slowpy"
    slow.write_text(f"""#!/bin/sh
for a in "$@"; do
  if [ "$a" = activate ]; then "{device_python}" "$@" >/dev/null; sleep 30; exit 0; fi
done
exec "{device_python}" "$@"
""")
    slow.chmod(0o755)
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as exc:
        deploy(model_b, replace(opts, python=str(slow)))
    assert time.monotonic() - t0 < 25
    assert active(remote) == sha(model_b)
    assert "now runs it" in str(exc.value) and "timed out" in str(exc.value), str(exc.value)
    ledger("fault", "activation timed out after the switch")
