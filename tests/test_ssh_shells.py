"""The command edgeq sends does not depend on the device user's login shell (fish, tcsh, sh, bash...).

sshd runs every command as ``$SHELL -c <string>``. The real servers here make
that shell fish or tcsh with ``ForceCommand`` (a wrapper that hands
``$SSH_ORIGINAL_COMMAND`` to the shell, exactly as a login shell would get it),
so no system user has to be created. Both shells reject the ``$?`` of POSIX sh.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from edgeq.errors import RemoteCommandError
from edgeq.transport import SSHOptions, SSHTransport, posix_command, wire_command
from tests.deploy.sshd_helper import Sshd, gone_within, serve_sshd

# Everything a quoting layer can get wrong, in one argument.
NASTY = ("x; touch /tmp/edgeq-pwned; $(id) `id` $? $status '\" \\ \\\\ end\\ \n line2 ! !! %s %% "
         "{a,b} * ~ é \t tab ' $HOME")
SHELLS = ["sh", "dash", "bash", "fish", "tcsh"]


def _shell(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run `make sysdeps` (scripts/system-deps.sh installs fish and tcsh)")
    return path


@pytest.mark.parametrize("shell", SHELLS)
def test_wire_command_means_the_same_in_every_login_shell(shell, tmp_path):
    script = posix_command(["printf", "%s|", NASTY, "a'b", "", "-n"]) + "\nexit $?"
    res = subprocess.run([_shell(shell), "-c", wire_command(script)], capture_output=True, timeout=30,
                         cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode() == f"{NASTY}|a'b||-n|"


@pytest.mark.parametrize("shell", SHELLS)
def test_wire_command_passes_the_exit_status(shell):
    res = subprocess.run([_shell(shell), "-c", wire_command("sh -c 'exit 7'\nexit $?")], timeout=30)
    assert res.returncode == 7


@pytest.fixture(scope="module", params=["fish", "tcsh"])
def shell_sshd(request, tmp_path_factory) -> Sshd:
    """A real sshd whose commands are interpreted by fish (or tcsh) instead of a POSIX shell."""
    shell = _shell(request.param)
    d = tmp_path_factory.mktemp(f"{request.param}_wrapper")
    wrapper = d / "login-shell"
    wrapper.write_text(f'#!/bin/sh\nexec {shell} -c "$SSH_ORIGINAL_COMMAND"\n')
    wrapper.chmod(0o755)
    yield from serve_sshd(tmp_path_factory, f"ForceCommand {wrapper}")


@pytest.fixture
def shell_opts(shell_sshd: Sshd, tmp_path: Path, monkeypatch) -> SSHOptions:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    kh = tmp_path / "known_hosts"
    kh.write_text(shell_sshd.known_hosts_line())
    return SSHOptions(identity=str(shell_sshd.client_key), known_hosts=str(kh), connect_timeout=5.0,
                      ssh_config=str(tmp_path / "no_config"), allow_agent=False, global_known_hosts=())


@pytest.mark.ssh
def test_run_through_a_non_posix_login_shell(shell_sshd, shell_opts, request, ledger):
    marker = Path("/tmp/edgeq-pwned")
    marker.unlink(missing_ok=True)
    with SSHTransport(shell_sshd.spec, shell_opts) as tr:
        assert tr.run(["printf", "%s", NASTY], 10).stdout == NASTY
        assert tr.run(["sh", "-c", "exit 7"], 10, check=False).exit_status == 7
        assert tr.run(["sh", "-c", "kill -KILL $$"], 10, check=False).signal == "SIGKILL"
        assert tr.run(["~/../../../bin/echo", "tilde"], 10).stdout == "tilde\n"
        with pytest.raises(RemoteCommandError, match="exit status 3"):
            tr.run(["sh", "-c", "echo boom >&2; exit 3"], 10)
    assert not marker.exists()
    ledger("fault", f"non-POSIX login shell ({request.node.callspec.params['shell_sshd']})")


@pytest.mark.ssh
def test_timeout_kill_works_through_a_non_posix_login_shell(shell_sshd, shell_opts, tmp_path):
    argv = ["sh", "-c", f"sleep 300 & echo $! > {tmp_path}/child; echo $$ > {tmp_path}/parent; wait"]
    with SSHTransport(shell_sshd.spec, replace(shell_opts)) as tr:
        with pytest.raises(RemoteCommandError, match="was killed"):
            tr.run(argv, timeout=1.5)
    pids = [int((tmp_path / n).read_text()) for n in ("parent", "child")]
    assert gone_within(pids, 5)
