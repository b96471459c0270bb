"""The device directory is ours alone: the runner is never executed from disk, files count by hash, unsafe
directories are refused with one line, old models are pruned with --keep. This machine is the device."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.deploy import DeployOptions, deploy
from edgeq.deploy import runner_source
from edgeq.errors import DeviceError, UsageError
from tests.fleet.conftest import active, sha

FAST = dict(runs=5, warmup=0, min_seconds=0.05, min_warmup_seconds=0.0, reference=False)


@pytest.fixture
def opts(tmp_path, device_python) -> DeployOptions:
    return DeployOptions(python=device_python, remote_dir=str(tmp_path / "device"), **FAST)


def one_line_error(res) -> str:
    """The CLI failed with exactly one ``error:`` line and no traceback; return that line."""
    text = res.output
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


def test_a_planted_runner_is_never_executed(opts, model_a, model_b, tmp_path, ledger):
    remote = tmp_path / "device"
    deploy(model_a, opts)
    marker = tmp_path / "planted-ran"
    fake = ('import sys, json\nopen(%r, "w").write("x")\n'
            'print(json.dumps({"ok": True, "mode": "run", "samples_ms": [0.001]}))\n' % str(marker))
    # Where the previous version of edgeq kept (and ran) the runner, by its hash: plant a fake there.
    planted = remote / "runner" / hashlib.sha256(runner_source()).hexdigest() / "runner.py"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_text(fake)
    res = deploy(model_b, opts)
    assert not marker.exists(), "a runner file found on the device was executed"
    assert res.latency_ms.count >= 5 and active(remote) == sha(model_b)
    ledger("fault", "runner planted in REMOTE_DIR/runner")


def test_a_corrupt_model_already_on_the_device_is_sent_again(opts, model_a, model_b, tmp_path, ledger):
    remote = tmp_path / "device"
    deploy(model_a, opts)
    target = remote / "models" / sha(model_b) / "model.tflite"
    target.parent.mkdir(parents=True, mode=0o700)
    target.write_bytes(model_b.read_bytes()[:-7] + b"garbage")  # right name, wrong bytes
    res = deploy(model_b, opts)
    assert res.transfer["model_bytes_sent"] == model_b.stat().st_size
    assert target.read_bytes() == model_b.read_bytes() and active(remote) == sha(model_b)
    ledger("fault", "corrupt model file at its content address")
    ledger("model_kept", "corrupt model file at its content address")


def test_directories_are_created_0700(opts, model_a, tmp_path):
    remote = tmp_path / "device"
    deploy(model_a, opts)
    for d in (remote, remote / "models", remote / "data", remote / "runner", remote / "models" / sha(model_a)):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def _unsafe_symlink_root(remote: Path, victim: Path) -> Path:
    remote.parent.mkdir(parents=True, exist_ok=True)
    remote.symlink_to(victim, target_is_directory=True)
    return remote


def _group_writable_root(remote: Path, victim: Path) -> Path:
    remote.mkdir(parents=True)
    remote.chmod(0o775)
    return remote


def _world_writable_data(remote: Path, victim: Path) -> Path:
    (remote / "data").mkdir(parents=True)
    (remote / "data").chmod(0o777)
    return remote / "data"


def _symlinked_models(remote: Path, victim: Path) -> Path:
    remote.mkdir(parents=True)
    (remote / "models").symlink_to(victim, target_is_directory=True)
    return remote / "models"


def _symlinked_runner(remote: Path, victim: Path) -> Path:
    remote.mkdir(parents=True)
    (remote / "runner").symlink_to(victim, target_is_directory=True)
    return remote / "runner"


def _foreign_owner(remote: Path, victim: Path) -> Path:
    remote.mkdir(parents=True)
    os.chown(remote, 65534, 65534)
    return remote


def _symlinked_lock(remote: Path, victim: Path) -> Path:
    remote.mkdir(parents=True, mode=0o700)
    for sub in ("models", "data", "runner"):
        (remote / sub).mkdir(mode=0o700)
    (remote / "lock").symlink_to(victim, target_is_directory=True)
    return remote / "lock"


UNSAFE = {"symlinked REMOTE_DIR": (_unsafe_symlink_root, "symlink"),
          "group-writable REMOTE_DIR": (_group_writable_root, "writable by group or others"),
          "world-writable data/": (_world_writable_data, "writable by group or others"),
          "symlinked models/": (_symlinked_models, "symlink"),
          "symlinked runner/": (_symlinked_runner, "symlink"),
          "REMOTE_DIR owned by another user": (_foreign_owner, "owned by uid 65534"),
          "symlinked lock": (_symlinked_lock, "symlink")}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_device_directories_are_refused(case, tmp_path, model_a, device_python, ledger):
    if case == "REMOTE_DIR owned by another user" and os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    make, words = UNSAFE[case]
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.tmp-1").write_text("someone else's file")
    remote = tmp_path / "dev" / "edgeq"
    bad = make(remote, victim)
    res = CliRunner().invoke(main, ["deploy", str(model_a), "--python", device_python, "--remote-dir", str(remote),
                                    "--runs", "2", "--warmup", "0", "-o", str(tmp_path / "rep")])
    line = one_line_error(res)
    assert res.exit_code == 4, res.output
    assert str(bad) in line and words in line, line
    assert sorted(p.name for p in victim.iterdir()) == ["keep.tmp-1"]  # nothing written, nothing swept
    ledger("bad_input", f"unsafe device directory: {case}")


def test_empty_remote_dir_is_one_line_and_writes_nothing(tmp_path, model_a, device_python, monkeypatch, ledger):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    res = CliRunner().invoke(main, ["deploy", str(model_a), "--python", device_python, "--remote-dir", "",
                                    "-o", str(tmp_path / "rep")])
    assert "--remote-dir is empty" in one_line_error(res) and res.exit_code == 2
    assert list(home.iterdir()) == []
    with pytest.raises(UsageError):
        deploy(model_a, DeployOptions(python=device_python, remote_dir="  "))
    assert list(home.iterdir()) == []
    ledger("bad_input", "empty --remote-dir")


def _variant(base: Path, out: Path, n: int) -> Path:
    out.write_bytes(base.read_bytes() + bytes(n))  # the runtime ignores trailing bytes
    return out


def test_keep_prunes_old_models_but_never_current_or_previous(opts, model_a, model_b, tmp_path, ledger):
    remote = tmp_path / "device"
    models = [model_a, model_b, _variant(model_b, tmp_path / "c.tflite", 8), _variant(model_b, tmp_path / "d.tflite", 16)]
    for m in models[:3]:
        deploy(m, opts)
    assert len(list((remote / "models").iterdir())) == 3
    res = deploy(models[3], replace(opts, keep=1))
    on_device = sorted(p.name for p in (remote / "models").iterdir())
    assert on_device == sorted([sha(models[3]), sha(models[2])])  # newest (= current) and previous
    assert sorted(res.activation["pruned"]) == sorted([sha(model_a), sha(model_b)])
    assert active(remote) == sha(models[3])
    assert os.readlink(remote / "previous") == f"models/{sha(models[2])}"
    ledger("model_kept", "--keep 1 prunes old models")


def test_keep_via_cli_and_bad_keep(tmp_path, model_a, model_b, device_python, ledger):
    remote = tmp_path / "device"
    base = ["--python", device_python, "--remote-dir", str(remote), "--runs", "2", "--warmup", "0"]
    for m in (model_a, model_b, _variant(model_b, tmp_path / "c.tflite", 8)):
        res = CliRunner().invoke(main, ["deploy", str(m), *base, "--keep", "0", "-o", str(tmp_path / f"rep-{m.stem}")])
        assert res.exit_code == 0, res.output
    assert len(list((remote / "models").iterdir())) == 2  # current and previous survive --keep 0
    res = CliRunner().invoke(main, ["deploy", str(model_a), *base, "--keep", "-1"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    ledger("bad_input", "--keep -1")


def test_eval_has_its_own_time_cap(opts, model_a, tmp_path, ledger):
    import numpy as np

    from tests.fleet.conftest import active as act

    deploy(model_a, opts)
    shape = _input_shape(model_a)
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.random.default_rng(0).random((4000, *shape), dtype=np.float32))
    with pytest.raises(DeviceError, match="evaluation took longer than its cap") as exc:
        deploy(model_b_of(model_a), replace(opts, eval_data=str(data), eval_timeout=1e-6))
    assert "\n" not in str(exc.value)
    assert act(tmp_path / "device") == sha(model_a)
    ledger("fault", "on-device evaluation over its time cap")
    ledger("model_kept", "on-device evaluation over its time cap")


def model_b_of(model_a: Path) -> Path:
    return model_a.parent / "tiny_b.tflite"


def _input_shape(model: Path) -> tuple[int, ...]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model))
    return tuple(int(d) for d in interp.get_input_details()[0]["shape"][1:])
