"""`edgeq deploy` against a real sshd, with the device venv (numpy<2 + tflite-runtime 2.14) as the device."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.deploy import DeployOptions, deploy
from edgeq.errors import DeviceError, HostKeyError
from tests.deploy.conftest import tree
from tests.deploy.sshd_helper import free_port

FAST = dict(min_seconds=0.1, min_warmup_seconds=0.05, runs=20)


def _ssh_opts(sshd, ssh_options, device_python, remote: Path, **kw) -> DeployOptions:
    return DeployOptions(host=sshd.spec, python=device_python, remote_dir=str(remote), ssh=ssh_options, **FAST, **kw)


@pytest.mark.ssh
@pytest.mark.slow
def test_full_deploy_over_ssh_then_redeploy_sends_nothing(sshd, ssh_options, device_python, tmp_path,
                                                          digits_int8_tflite, digits_eval_npz):
    remote = tmp_path / "device"
    opts = _ssh_opts(sshd, ssh_options, device_python, remote, eval_data=str(digits_eval_npz))
    events = []
    first = deploy(digits_int8_tflite, opts, events.append)
    doc = first.to_dict()
    assert doc["runtime"]["name"] == "tflite_runtime" and doc["runtime"]["version"] == "2.14.0"
    assert doc["device"]["numpy"].startswith("1.")
    assert doc["transfer"]["model_bytes_sent"] == digits_int8_tflite.stat().st_size
    assert doc["latency_ms"]["count"] >= 20 and doc["latency_ms"]["p50"] > 0
    ag = doc["agreement"]
    assert ag["reference_runtime"] == "ai_edge_litert"
    # Device accuracy within 1 point of the host's int8 accuracy, and the outputs agree.
    assert abs(doc["accuracy"] - ag["host_accuracy"]) <= 0.01
    assert ag["top1"] >= 0.98
    assert {e.stage for e in events} >= {"probe", "upload", "measure"}
    sha = doc["model"]["sha256"]
    assert (remote / "models" / sha / "model.tflite").read_bytes() == digits_int8_tflite.read_bytes()
    assert not [p for p in tree(remote) if ".tmp-" in p]

    second = deploy(digits_int8_tflite, opts)
    assert second.transfer["model_bytes_sent"] == 0
    assert second.transfer["eval_bytes_sent"] == 0 and second.transfer["runner_bytes_sent"] == 0


@pytest.mark.ssh
@pytest.mark.slow
def test_injection_in_paths_and_names_does_nothing(sshd, ssh_options, device_python, tmp_path, digits_int8_tflite,
                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    pwned = Path("/tmp") / f"edgeq-pwned-{os.getpid()}"
    weird_model = tmp_path / "$(touch pwned).tflite"
    weird_model.write_bytes(digits_int8_tflite.read_bytes())
    remote = tmp_path / f"x; touch {pwned}; $(touch {pwned})"
    result = deploy(weird_model, _ssh_opts(sshd, ssh_options, device_python, remote))
    assert result.model["name"] == "$(touch pwned).tflite"
    assert not pwned.exists() and not (tmp_path / "pwned").exists() and not Path.home().joinpath("pwned").exists()
    assert (remote / "models" / result.model["sha256"] / "model.tflite").is_file()


def _cli(sshd, known_hosts, *args: str):
    return CliRunner().invoke(main, ["deploy", *args, "--identity", str(sshd.client_key),
                                     "--known-hosts", str(known_hosts), "--connect-timeout", "3"])


def _one_line_error(res, host: str) -> str:
    assert res.exit_code == 4, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    # Progress lines (stderr is not a terminal: "[host] stage ...") may come first; the error is one line, the last.
    assert all(l.startswith("[") for l in lines[:-1]) and lines[-1].startswith("error: "), res.output
    assert "Traceback" not in res.output
    assert host in lines[-1]
    return lines[-1]


@pytest.mark.ssh
def test_unknown_host_key_refused_nothing_written(sshd, tmp_path, fake_model, device_python):
    empty = tmp_path / "kh"
    empty.write_text("")
    remote = tmp_path / "device"
    res = _cli(sshd, empty, str(fake_model), "--host", sshd.spec, "--python", device_python,
               "--remote-dir", str(remote))
    line = _one_line_error(res, "127.0.0.1")
    assert "SHA256:" in line and "--accept-new-host-key" in line
    assert not remote.exists()


@pytest.mark.ssh
def test_connection_refused_cli(sshd, known_hosts, fake_model):
    port = free_port()
    line = _one_line_error(_cli(sshd, known_hosts, str(fake_model), "--host", f"root@127.0.0.1:{port}"),
                           f"127.0.0.1:{port}")
    assert "refused" in line


@pytest.mark.ssh
def test_timeout_cli(sshd, known_hosts, fake_model):
    import socket

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        res = CliRunner().invoke(main, ["deploy", str(fake_model), "--host", f"root@127.0.0.1:{port}",
                                        "--identity", str(sshd.client_key), "--known-hosts", str(known_hosts),
                                        "--connect-timeout", "1"])
    line = _one_line_error(res, f"127.0.0.1:{port}")
    assert "within 1 s" in line


@pytest.mark.ssh
def test_auth_failure_cli(sshd, known_hosts, fake_model):
    res = CliRunner().invoke(main, ["deploy", str(fake_model), "--host", sshd.spec, "--identity",
                                    str(sshd.wrong_key), "--known-hosts", str(known_hosts)])
    assert "authentication" in _one_line_error(res, sshd.spec)


@pytest.mark.ssh
def test_no_python_on_device(sshd, known_hosts, fake_model, tmp_path):
    res = _cli(sshd, known_hosts, str(fake_model), "--host", sshd.spec, "--python", "/nonexistent/python3",
               "--remote-dir", str(tmp_path / "d"))
    line = _one_line_error(res, sshd.spec)
    assert "no Python at '/nonexistent/python3'" in line and "--python" in line


@pytest.mark.ssh
def test_no_runtime_on_device_says_what_to_install(sshd, known_hosts, fake_model, tmp_path, no_runtime_python):
    remote = tmp_path / "d"
    res = _cli(sshd, known_hosts, str(fake_model), "--host", sshd.spec, "--python", no_runtime_python,
               "--remote-dir", str(remote))
    line = _one_line_error(res, sshd.spec)
    assert "pip install ai-edge-litert" in line and "tflite-runtime" in line
    assert tree(remote) == []


@pytest.mark.ssh
def test_malformed_model_is_a_clean_error(sshd, known_hosts, fake_model, tmp_path, device_python):
    remote = tmp_path / "d"
    res = _cli(sshd, known_hosts, str(fake_model), "--host", sshd.spec, "--python", device_python,
               "--remote-dir", str(remote))
    line = _one_line_error(res, sshd.spec)
    assert "could not load the model" in line or "killed by" in line
    assert not [p for p in tree(remote) if ".tmp-" in p]


@pytest.mark.ssh
def test_runner_killed_by_signal_is_reported(sshd, known_hosts, fake_model, tmp_path, device_python):
    # A device Python whose runner dies by SIGSEGV as soon as it starts measuring,
    # the way a malformed model can kill the interpreter.
    wrapper = tmp_path / "crashy-python"
    wrapper.write_text(f"""#!/bin/sh
if [ "$2" = run ]; then exec {device_python} -c 'import os, signal; os.kill(os.getpid(), signal.SIGSEGV)'; fi
exec {device_python} "$@"
""")
    wrapper.chmod(0o755)
    res = _cli(sshd, known_hosts, str(fake_model), "--host", sshd.spec, "--python", str(wrapper),
               "--remote-dir", str(tmp_path / "d"))
    assert "killed by SIGSEGV" in _one_line_error(res, sshd.spec)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs nearly filled up (root), else a directory we cannot write to."""
    mnt = tmp_path / "tinyfs"
    mnt.mkdir()
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
        if done.returncode == 0:
            (mnt / "filler").write_bytes(b"\0" * (56 * 1024))
            yield mnt
            subprocess.run(["umount", str(mnt)], check=False)
            return
    mnt.chmod(0o500)
    yield mnt
    mnt.chmod(0o700)


@pytest.mark.ssh
def test_full_disk_is_a_clean_error_and_leaves_no_partial_file(sshd, known_hosts, tmp_path, device_python, tiny_fs):
    model = tmp_path / "big.tflite"
    model.write_bytes(b"\x1c\x00\x00\x00TFL3" + os.urandom(40 * 1024))
    remote = tiny_fs / "edgeq"
    before = set(tree(tiny_fs))
    res = _cli(sshd, known_hosts, str(model), "--host", sshd.spec, "--python", device_python,
               "--remote-dir", str(remote))
    line = _one_line_error(res, sshd.spec)
    # Refused before the upload from the probe's free-space figure (without root: the directory is not writable).
    assert "not enough space" in line or "cannot write" in line or "cannot create" in line
    after = set(tree(tiny_fs)) - before
    assert not [p for p in after if ".tmp-" in p or p.endswith("model.tflite")], after


@pytest.mark.ssh
def test_changed_host_key_refused_by_deploy(sshd, tmp_path, fake_model, device_python, ssh_options):
    from tests.deploy.sshd_helper import keygen

    other = keygen(tmp_path / "k2")
    kh = tmp_path / "kh"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    opts = DeployOptions(host=sshd.spec, python=device_python, remote_dir=str(tmp_path / "d"),
                         ssh=replace(ssh_options, known_hosts=str(kh), accept_new_host_key=True))
    with pytest.raises(HostKeyError) as exc:
        deploy(fake_model, opts)
    assert isinstance(exc.value, DeviceError) and "CHANGED" in str(exc.value)
    assert not (tmp_path / "d").exists()
