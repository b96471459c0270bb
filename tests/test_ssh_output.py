"""Device output is bounded, and a command that times out is killed on the device (real sshd, real processes)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace

import pytest

from edgeq.errors import ConnectError, RemoteCommandError
from edgeq.transport import DEFAULT_MAX_OUTPUT, LocalTransport, SSHTransport
from tests.deploy.sshd_helper import gone_within, ssh_opts, ssh_server  # noqa: F401 - pytest fixtures

CAP = 64 * 1024
# 3 MB on each stream: more than the cap, and more than paramiko's 2 MB window,
# so the remote would block if the host stopped reading at the cap.
FLOOD = ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' o; head -c 3000000 /dev/zero | tr '\\0' e >&2"]
# One 5 MB line on stderr, then failure: the error message must stay a few KB.
ONE_HUGE_LINE = ["sh", "-c", "head -c 5000000 /dev/zero | tr '\\0' x >&2; exit 3"]


def _transports(ssh_server, ssh_opts):
    return {"ssh": lambda: SSHTransport(ssh_server.spec, replace(ssh_opts, max_output_bytes=CAP)),
            "local": lambda: LocalTransport(max_output_bytes=CAP)}


@pytest.mark.ssh
@pytest.mark.parametrize("kind", ["ssh", "local"])
def test_each_stream_is_capped_and_drained(ssh_server, ssh_opts, kind, ledger):
    with _transports(ssh_server, ssh_opts)[kind]() as tr:
        res = tr.run(FLOOD, timeout=60)
    assert res.ok  # the command finished: the host kept reading past the cap
    assert res.stdout == "o" * CAP and res.stdout_truncated
    assert res.stderr == "e" * CAP and res.stderr_truncated
    ledger("fault", f"{kind}-output-flood")


@pytest.mark.ssh
@pytest.mark.parametrize("kind", ["ssh", "local"])
def test_error_message_is_bounded_and_says_it_was_cut(ssh_server, ssh_opts, kind, ledger):
    with _transports(ssh_server, ssh_opts)[kind]() as tr:
        with pytest.raises(RemoteCommandError) as exc:
            tr.run(ONE_HUGE_LINE, timeout=60)
    text = str(exc.value)
    assert exc.value.exit_status == 3
    assert len(text) < 4000, len(text)
    assert len(exc.value.output_tail) <= 2100
    assert "stderr was cut to its end" in text
    ledger("fault", f"{kind}-huge-error-line")


@pytest.mark.ssh
def test_default_cap_is_one_mib(ssh_server, ssh_opts):
    with SSHTransport(ssh_server.spec, ssh_opts) as tr:
        res = tr.run(["sh", "-c", "head -c 1500000 /dev/zero | tr '\\0' o"], timeout=60)
    assert DEFAULT_MAX_OUTPUT == 1024 * 1024
    assert len(res.stdout) == DEFAULT_MAX_OUTPUT and res.stdout_truncated and not res.stderr_truncated


@pytest.mark.ssh
def test_small_output_is_whole_and_not_flagged(ssh_server, ssh_opts):
    with SSHTransport(ssh_server.spec, ssh_opts) as tr:
        res = tr.run(["sh", "-c", "echo out; echo err >&2"], timeout=20)
    assert (res.stdout, res.stderr, res.stdout_truncated, res.stderr_truncated) == ("out\n", "err\n", False, False)


# ------------------------------------------------------------------ kill on timeout

# The command records its own pid and a background child's, then waits: both must be gone after the timeout.
def _sleeper(tmp_path):
    return ["sh", "-c", f"sleep 300 & echo $! > {tmp_path}/child; echo $$ > {tmp_path}/parent; wait"]


def _pids(tmp_path) -> list[int]:
    return [int((tmp_path / name).read_text()) for name in ("parent", "child")]


@pytest.mark.ssh
def test_ssh_timeout_kills_the_remote_process_group(ssh_server, ssh_opts, tmp_path, ledger):
    with SSHTransport(ssh_server.spec, ssh_opts) as tr:
        with pytest.raises(RemoteCommandError, match="timed out after 1.5 s") as exc:
            tr.run(_sleeper(tmp_path), timeout=1.5)
        assert "was killed" in str(exc.value)
        assert gone_within(_pids(tmp_path), 5), "the timed-out command still runs on the device"
        # The connection still works after a timed-out command.
        assert tr.run(["echo", "ok"], 10).stdout == "ok\n"
    ledger("fault", "ssh-command-timeout-killed")


def test_local_timeout_kills_the_process_group(tmp_path, ledger):
    with pytest.raises(RemoteCommandError, match="timed out after 1.5 s"):
        LocalTransport().run(_sleeper(tmp_path), timeout=1.5)
    assert gone_within(_pids(tmp_path), 5), "the timed-out command (or its child) still runs"
    ledger("fault", "local-command-timeout-killed")


@pytest.mark.ssh
def test_ssh_stdin_larger_than_the_window_while_output_flows(ssh_server, ssh_opts):
    # 5 MB in, echoed back out: the host must feed stdin and drain stdout at the same time.
    data = b"0123456789abcdef" * 320_000
    with SSHTransport(ssh_server.spec, replace(ssh_opts, max_output_bytes=8 << 20)) as tr:
        res = tr.run(["cat"], timeout=60, stdin=data)
    assert res.stdout == data.decode() and not res.stdout_truncated


@pytest.mark.ssh
def test_cancel_kills_the_command_running_on_the_device(ssh_server, ssh_opts, tmp_path, ledger):
    # A fleet cancels a host that overran its deadline from another thread: what runs there is killed too.
    tr = SSHTransport(ssh_server.spec, ssh_opts).connect()
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            tr.run(_sleeper(tmp_path), timeout=120)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    deadline = time.monotonic() + 10
    while not all((tmp_path / n).exists() and (tmp_path / n).read_text() for n in ("parent", "child")):
        assert time.monotonic() < deadline, "the command did not start"
        time.sleep(0.05)
    tr.cancel()
    th.join(15)
    assert not th.is_alive(), "run() did not return after cancel()"
    assert isinstance(outcome.get("error"), ConnectError) and "cancelled" in str(outcome["error"])
    assert gone_within(_pids(tmp_path), 5), "the cancelled command still runs on the device"
    ledger("fault", "ssh-cancelled-mid-command")


def test_kill_falls_back_to_the_shell_and_its_children_without_a_process_group(tmp_path):
    # An sshd that does not start each session as a process group: the shell's pid names no group.
    import subprocess

    from edgeq.transport.wire import kill_script

    shell = subprocess.Popen(["sh", "-c", f"sleep 300 & echo $! > {tmp_path}/child; wait"])
    deadline = time.monotonic() + 10
    while not ((tmp_path / "child").exists() and (tmp_path / "child").read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert os.getpgid(shell.pid) != shell.pid
    subprocess.run(["sh", "-c", kill_script(shell.pid)], timeout=10, check=True)
    shell.wait(5)
    assert gone_within([shell.pid, int((tmp_path / "child").read_text())], 5)
