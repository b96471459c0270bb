"""How edgeq talks to a device: run a command, upload a file. SSH (paramiko) or the local machine.

Both transports run argument vectors, never shell strings built from user
input; every step has a deadline; device output is untrusted (each stream
bounded, error messages carry a tail of a few KB); failures raise
``edgeq.errors`` classes that name the host; nothing secret (key material,
passphrases) is put in a message or in a child process's environment.

Layout (import the public names from ``edgeq.transport``):

- ``base``: the ``Transport`` interface, ``Result``, upload progress (``UploadMeter``).
- ``local``: ``LocalTransport``, the local machine as the device (child processes, no shell).
- ``wire``: the shell wire format: quoting, ``wire_command``, ``MAX_COMMAND_BYTES``, the scripts run
  around a command on the device (pid marker, kill of a process tree).
- ``ssh_config``: ``[USER@]HOST[:PORT]``, ``SSHOptions``, ~/.ssh/config (ProxyCommand, ProxyJump, ...).
- ``known_hosts``: known_hosts files as OpenSSH reads and writes them; the one host-key decision.
- ``ssh_connect``: the socket (TCP or ProxyCommand), paramiko's failures as edgeq errors.
- ``ssh_channel``: one channel under a deadline (watchdog, stdin in, bounded output out).
- ``ssh``: ``SSHTransport``: connection, commands, kill on timeout.
- ``ssh_upload``: files over SFTP, or ``cat`` over the exec channel where the server has no SFTP.

paramiko is imported only when an SSH connection is made or an ssh_config read.
"""

from __future__ import annotations

from typing import Optional

from edgeq.transport.base import DEFAULT_MAX_OUTPUT, Result, Transport, UploadMeter, signal_name
from edgeq.transport.known_hosts import fingerprint
from edgeq.transport.local import LocalTransport
from edgeq.transport.ssh import SSHTransport
from edgeq.transport.ssh_config import SSHOptions, parse_host
from edgeq.transport.wire import MAX_COMMAND_BYTES, check_command_length, posix_command, wire_command


def make_transport(host: Optional[str], ssh: SSHOptions = SSHOptions()) -> Transport:
    """``None`` or ``"local"`` -> ``LocalTransport``; anything else -> ``SSHTransport`` (not yet connected)."""
    if host is None or host == "local":
        return LocalTransport()
    return SSHTransport(host, ssh)


__all__ = ["Result", "Transport", "LocalTransport", "SSHTransport", "SSHOptions", "make_transport", "parse_host",
           "MAX_COMMAND_BYTES", "check_command_length", "UploadMeter",
           "fingerprint", "signal_name", "posix_command", "wire_command", "DEFAULT_MAX_OUTPUT"]
