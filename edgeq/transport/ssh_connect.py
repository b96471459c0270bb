"""Opening an SSH connection: the socket (TCP or a ProxyCommand), paramiko's failures as edgeq errors,
and the host-key hook.

paramiko is imported inside the functions that need it (never at import time: ``edgeq --help`` stays fast).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import tempfile
from typing import Any, Callable, Optional, Sequence

from edgeq.errors import AuthError, ConnectError, EdgeqError
from edgeq.escape import term
from edgeq.sandbox import child_env
from edgeq.transport.base import decode_output


def quiet_paramiko_logs() -> None:
    """paramiko logs a failed handshake (a peer that resets during the banner) as ERROR records with a
    traceback, one line each; with no logging configured Python prints them all on stderr. edgeq reports
    the failure itself, in one line: give paramiko's logger a NullHandler, as a library should. An
    application that configures logging still receives the records (they propagate)."""
    logger = logging.getLogger("paramiko")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


def transient(exc: ConnectError) -> ConnectError:
    """Mark a connect failure as worth retrying (refused, reset)."""
    exc.transient = True  # type: ignore[attr-defined]
    return exc


def tune_socket(sock: socket.socket, keepalive_s: int, link_timeout_s: float) -> None:
    """TCP keepalive + TCP_USER_TIMEOUT so a silent link (no FIN, no RST) is noticed."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", keepalive_s), ("TCP_KEEPINTVL", max(1, keepalive_s // 2)),
                        ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", int(link_timeout_s * 1000))):
        opt = getattr(socket, name, None)
        if opt is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)
            except OSError:
                pass


def open_tcp(hostname: str, port: int, t: float, host: str, keepalive_s: int, link_timeout_s: float) -> socket.socket:
    """A tuned TCP connection to ``hostname:port`` within ``t`` seconds; ``ConnectError`` naming ``host``."""
    try:
        sock = socket.create_connection((hostname, port), timeout=t)
    except ConnectionRefusedError:
        raise transient(ConnectError(f"connection refused by {hostname}:{port}",
                        hint="is sshd running on the device, and is the port right?", host=host)) from None
    except (ConnectionResetError, ConnectionAbortedError) as exc:
        raise transient(ConnectError(f"connection to {hostname}:{port} reset: {exc.strerror or exc}",
                        hint="check the network path to the device", host=host)) from None
    except socket.gaierror as exc:
        raise ConnectError(f"cannot resolve {hostname}: {exc.strerror}",
                           hint="check the host name or ~/.ssh/config", host=host) from None
    except (socket.timeout, TimeoutError):
        raise ConnectError(f"timed out after {t:g} s connecting to {hostname}:{port}",
                           hint="is the device on and reachable? raise --connect-timeout for slow links",
                           host=host) from None
    except OSError as exc:
        raise ConnectError(f"cannot connect to {hostname}:{port}: {exc.strerror or exc}",
                           hint="check the network path to the device", host=host) from None
    tune_socket(sock, keepalive_s, link_timeout_s)
    return sock


class ProxyCommand:
    """An ssh_config ProxyCommand run with /bin/sh (its own session, no edgeq secrets in its environment);
    ``sock`` is our end of the socket pair on its stdin and stdout."""

    def __init__(self, command: str, host: str, t: float) -> None:
        self.host = host
        ours, theirs = socket.socketpair()
        self._errors = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=theirs, stdout=theirs,
                                          stderr=self._errors, env=child_env(), start_new_session=True)
        except OSError as exc:
            ours.close()
            self._errors.close()
            raise ConnectError(f"cannot start the ProxyCommand for {host}: {exc.strerror or exc}",
                               hint="check ProxyCommand in ~/.ssh/config", host=host) from None
        finally:
            theirs.close()
        ours.settimeout(t)
        self.sock = ours

    def error(self) -> Optional[ConnectError]:
        """When the ProxyCommand died, a ConnectError saying so with its stderr (else None)."""
        proc = self._proc
        try:
            proc.wait(0.5)
        except subprocess.TimeoutExpired:
            return None
        try:
            self._errors.seek(0, os.SEEK_END)
            self._errors.seek(max(0, self._errors.tell() - 500))
            said = term(decode_output(self._errors.read()).strip())
        except OSError:
            said = ""
        return ConnectError(f"the ProxyCommand for {self.host} exited with status {proc.returncode}"
                            + (f": {said}" if said else ""),
                            hint="run the ProxyCommand from ~/.ssh/config by hand to see why", host=self.host)

    def close(self) -> None:
        """Stop the command (SIGTERM, then SIGKILL to its process group)."""
        proc = self._proc
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(2)
            except (ProcessLookupError, PermissionError):
                pass
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait(2)
        self._errors.close()


def handshake_error(exc: BaseException, *, host: str, hostname: str, port: int, t: float,
                    has_identity: bool) -> EdgeqError:
    """The edgeq error for a failed ``SSHClient.connect`` (host key, auth, timeout, reset...)."""
    import paramiko

    if isinstance(exc, EdgeqError):
        return exc
    if isinstance(exc, paramiko.PasswordRequiredException):
        return AuthError(f"authentication to {host} failed: the private key is encrypted",
                         hint="add it to ssh-agent (ssh-add KEY), or give its passphrase in the "
                              "EDGEQ_SSH_PASSPHRASE environment variable", host=host)
    if isinstance(exc, paramiko.AuthenticationException):
        return AuthError(f"authentication to {host} failed (no accepted key)",
                         hint="pass the right key with --identity, load it into ssh-agent, or add your public "
                              "key to ~/.ssh/authorized_keys on the device", host=host)
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, EOFError)):
        return transient(ConnectError(
            f"{hostname}:{port} closed the connection during the SSH handshake "
            f"({type(exc).__name__})", hint="check the network path and sshd on the device", host=host))
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return ConnectError(f"timed out after {t:g} s waiting for SSH on {hostname}:{port} "
                            f"({exc or 'no answer'})",
                            hint="is this an SSH server? raise --connect-timeout for slow links", host=host)
    if isinstance(exc, paramiko.SSHException):
        text = str(exc)
        low = text.lower()
        if has_identity and any(m in low for m in ("passphrase", "decrypt", "encrypted", "private key",
                                                   "invalid key")):
            return AuthError(f"cannot use the private key for {host}: wrong passphrase or unreadable key",
                             hint="check the passphrase in EDGEQ_SSH_PASSPHRASE, or load the key into ssh-agent",
                             host=host)
        if "reset" in low or "eof" in low:
            return transient(ConnectError(
                f"{hostname}:{port} reset the connection during the SSH handshake",
                hint="check the network path and sshd on the device", host=host))
        if any(m in low for m in ("banner", "no existing session", "timed out", "negotiation")):
            return ConnectError(f"no SSH answer (banner, key exchange) from {hostname}:{port} "
                                f"within {t:g} s", hint="is sshd (not another service) listening on that port?",
                                host=host)
        return ConnectError(f"SSH negotiation with {hostname}:{port} failed: {term(text)}", host=host)
    if isinstance(exc, (ValueError, TypeError)):
        # cryptography raises these for a wrong passphrase; its text is not shown on purpose.
        return AuthError(f"cannot use the private key for {host}: wrong passphrase or unreadable key",
                         hint="check the passphrase in EDGEQ_SSH_PASSPHRASE, or load the key into ssh-agent",
                         host=host)
    if isinstance(exc, OSError):
        return ConnectError(f"connection to {hostname}:{port} lost: {exc.strerror or exc}", host=host)
    return ConnectError(f"SSH connection to {hostname}:{port} failed: {type(exc).__name__}: "
                        f"{term(str(exc))}", host=host)


def prefer_key_types(paramiko_transport: Any, known_types: Sequence[str]) -> None:
    """Ask for the host key types known_hosts records for this host first (as ssh does), so a device with
    several keys shows the one we can check."""
    if not known_types:
        return
    sec = paramiko_transport.get_security_options()
    offered = list(sec.key_types)
    wanted: list[str] = []
    for kind in known_types:
        names = ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if kind == "ssh-rsa" else [kind]
        wanted += [n for n in names if n in offered and n not in wanted]
    if wanted:
        sec.key_types = wanted + [n for n in offered if n not in wanted]


def host_key_policy(verify: Callable[[Any], None]) -> Any:
    """A ``paramiko.MissingHostKeyPolicy`` that hands every offered host key to ``verify`` (paramiko holds
    no keys itself, so this is called for every connection)."""
    global _POLICY_CLASS
    if _POLICY_CLASS is None:
        import paramiko

        _POLICY_CLASS = type("HostKeyPolicy", (_HostKeyPolicyMixin, paramiko.MissingHostKeyPolicy), {})
    return _POLICY_CLASS(verify)


_POLICY_CLASS: Optional[type] = None


class _HostKeyPolicyMixin:
    def __init__(self, verify: Callable[[Any], None]) -> None:
        self.verify = verify

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:  # paramiko's policy interface
        self.verify(key)
