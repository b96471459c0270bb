"""The SSH key passphrase (and the agent socket) never reach child processes that handle untrusted models."""

from __future__ import annotations

import pytest

from edgeq.sandbox import child_env, run_in_child
from edgeq.transport import LocalTransport

SECRETS = {"EDGEQ_SSH_PASSPHRASE": "hunter2-passphrase", "EDGEQ_SSH_FUTURE_TOKEN": "tok",
           "SSH_AUTH_SOCK": "/tmp/agent.sock"}


@pytest.fixture
def secrets_in_env(monkeypatch):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("EDGEQ_KEEP_ME", "kept")


def test_sandbox_child_does_not_get_the_passphrase(secrets_in_env):
    res = run_in_child("os", "getenv", {"key": "EDGEQ_SSH_PASSPHRASE"}, timeout=60)
    assert res.ok and res.value is None, res
    res = run_in_child("os", "getenv", {"key": "SSH_AUTH_SOCK"}, timeout=60)
    assert res.ok and res.value is None, res
    res = run_in_child("os", "getenv", {"key": "EDGEQ_KEEP_ME"}, timeout=60)
    assert res.ok and res.value == "kept"  # other settings do pass


def test_sandbox_scrubs_an_explicit_environment_too(monkeypatch):
    env = {"PATH": "/usr/bin:/bin", "EDGEQ_SSH_PASSPHRASE": "x", "PYTHONPATH": ":".join(__import__("sys").path)}
    res = run_in_child("os", "getenv", {"key": "EDGEQ_SSH_PASSPHRASE"}, timeout=60, env=env)
    assert res.ok and res.value is None, res


def test_local_transport_commands_do_not_get_the_passphrase(secrets_in_env):
    res = LocalTransport().run(["sh", "-c", 'printf "%s/%s/%s" "${EDGEQ_SSH_PASSPHRASE-unset}" '
                                '"${SSH_AUTH_SOCK-unset}" "${EDGEQ_KEEP_ME-unset}"'], 10)
    assert res.stdout == "unset/unset/kept"


def test_child_env_rule():
    env = child_env({"EDGEQ_SSH_PASSPHRASE": "a", "EDGEQ_SSH_X": "b", "SSH_AGENT_PID": "1", "SSH_AUTH_SOCK": "s",
                     "EDGEQ_DEVICE_PYTHON": "p", "HOME": "/root"})
    assert env == {"EDGEQ_DEVICE_PYTHON": "p", "HOME": "/root"}


def test_sandbox_child_output_is_bounded(ledger):
    # A child that prints 50 MB to stderr: the host keeps a bounded tail.
    res = run_in_child("tests.test_ssh_secrets", "_spew", {"n": 50_000_000}, timeout=120)
    assert res.ok and res.value == "done"
    assert len(res.stderr_tail) <= 4000
    ledger("fault", "sandbox-child-stderr-flood")


def _spew(n: int) -> str:
    import os

    chunk = b"e" * 1_000_000
    for _ in range(n // len(chunk)):
        os.write(2, chunk)
    return "done"
