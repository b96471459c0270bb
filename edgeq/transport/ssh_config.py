"""Where an SSH device is and how to reach it: ``[USER@]HOST[:PORT]`` specs, ``SSHOptions`` and ~/.ssh/config.

Read from ssh_config: HostName, Port, User, IdentityFile, UserKnownHostsFile,
GlobalKnownHostsFile, HostKeyAlias, HashKnownHosts, ProxyCommand (its tokens
expanded here, with the port and user this connection uses) and ProxyJump.
Every value is validated before it can reach a socket or a shell.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import edgeq.transport.known_hosts as kh
from edgeq.errors import UsageError
from edgeq.transport.base import DEFAULT_MAX_OUTPUT

# Host names, IPv4/IPv6 literals and ssh_config aliases; anything else cannot be a host.
HOST_RE = re.compile(r"^[A-Za-z0-9_.:%-]+$")
USER_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?$")


@dataclass(frozen=True)
class SSHOptions:
    """How to reach a device over SSH (all timeouts in seconds)."""

    identity: Optional[str] = None
    # Where new host keys are recorded and known ones read (default: ssh_config's
    # UserKnownHostsFile, else ~/.ssh/known_hosts and ~/.ssh/known_hosts2).
    known_hosts: Optional[str] = None
    accept_new_host_key: bool = False
    connect_timeout: float = 10.0
    ssh_config: Optional[str] = None  # default ~/.ssh/config
    allow_agent: bool = True
    keepalive_s: int = 10
    # How long unacknowledged data may sit before the kernel drops the link.
    link_timeout_s: float = 30.0
    # Transient failures while connecting (refused, reset) are retried this many
    # times with exponential backoff; timeouts, auth and host-key errors never are.
    connect_retries: int = 2
    retry_backoff_s: float = 0.5
    # Decrypts an encrypted --identity; never shown in repr, messages or reports.
    passphrase: Optional[str] = field(default=None, repr=False, compare=False)
    # System-wide known_hosts files read besides the user's (default: ssh_config's
    # GlobalKnownHostsFile, else /etc/ssh/ssh_known_hosts and ssh_known_hosts2).
    global_known_hosts: Optional[tuple[str, ...]] = None
    #: What run() keeps of each of stdout and stderr; the rest is read and dropped.
    max_output_bytes: int = DEFAULT_MAX_OUTPUT


def parse_host(spec: str) -> tuple[Optional[str], str, Optional[int]]:
    """``[USER@]HOST[:PORT]`` (IPv6 as ``[::1]:22``) -> (user, host, port); rejects what cannot be valid."""
    user: Optional[str] = None
    rest = spec.strip()
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
        if not USER_RE.match(user):
            raise UsageError(f"invalid user name in --host {spec!r}")
    port: Optional[int] = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise UsageError(f"invalid --host {spec!r}; use [USER@]HOST[:PORT]")
            port = _port(tail[1:], spec)
    elif rest.count(":") == 1:
        host, p = rest.split(":")
        port = _port(p, spec)
    else:
        host = rest
    if not host or not HOST_RE.match(host) or host.startswith("-"):
        raise UsageError(f"invalid host name in --host {spec!r}; use [USER@]HOST[:PORT]")
    return user, host, port


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UsageError(f"invalid port in --host {spec!r}")
    return int(text)


@dataclass(frozen=True)
class HostConfig:
    """What ~/.ssh/config (and the host spec) say about one host."""

    alias: str
    hostname: str
    port: int
    user: str
    identities: tuple[str, ...]
    user_known_hosts: tuple[Path, ...]
    global_known_hosts: tuple[Path, ...]
    host_key_alias: Optional[str]
    hash_known_hosts: bool
    proxy_command: Optional[str]
    proxy_jump: tuple[str, ...]


def read_host_config(host_spec: str, options: SSHOptions, jump: bool) -> HostConfig:
    """The validated settings for ``host_spec`` (``jump``: a ProxyJump hop, which keeps its own IdentityFile)."""
    user, alias, port = parse_host(host_spec)
    cfg_path = Path(options.ssh_config or "~/.ssh/config").expanduser()
    cfg: Any = {}
    if cfg_path.is_file():
        try:
            cfg = _raw_proxy_config_class().from_path(str(cfg_path)).lookup(alias)
        except Exception as exc:  # a broken ssh_config must not hide as a connect error
            raise UsageError(f"cannot read SSH config {cfg_path}: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                             "fix the line, or point --ssh-config elsewhere") from None
    where = f"for {alias} in {cfg_path}"
    hostname = str(cfg.get("hostname", alias))
    if not HOST_RE.match(hostname) or hostname.startswith("-"):
        raise UsageError(f"invalid HostName {hostname!r} {where}")
    if port is None:
        text = str(cfg.get("port", "22")).strip()
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise UsageError(f"invalid Port {text!r} {where}", "use a number from 1 to 65535")
        port = int(text)
    user = user or cfg.get("user") or _local_user()
    configured = [str(Path(p).expanduser()) for p in cfg.get("identityfile", [])]
    if options.identity and not jump:
        identities = [options.identity]
    else:  # a jump host uses its own IdentityFile, else the device's --identity
        identities = configured or ([options.identity] if options.identity else [])
    found = tuple(str(Path(p).expanduser()) for p in identities if Path(p).expanduser().is_file())
    if options.identity and not jump and not found:
        raise UsageError(f"identity file {options.identity} does not exist")

    def paths(key: str, default: Sequence[str]) -> tuple[Path, ...]:
        value = cfg.get(key)
        try:
            words = shlex.split(value) if value else list(default)
        except ValueError:
            raise UsageError(f"invalid {key} {value!r} {where}") from None
        return tuple(kh.files([_expand_tokens(w, hostname, port, user) for w in words]))

    user_files = (Path(options.known_hosts).expanduser(),) if options.known_hosts else \
        paths("userknownhostsfile", kh.USER_FILES)
    global_files = tuple(Path(p) for p in options.global_known_hosts) if options.global_known_hosts is not None \
        else paths("globalknownhostsfile", kh.GLOBAL_FILES)
    alias_name = cfg.get("hostkeyalias")
    if alias_name is not None and (not HOST_RE.match(alias_name) and not alias_name.startswith("[")):
        raise UsageError(f"invalid HostKeyAlias {alias_name!r} {where}")
    command = cfg.get("proxycommand")
    if command is not None and command.strip().lower() == "none":
        command = None
    if command:
        # Expanded here, not by paramiko: %p and %r are the port and user this connection uses
        # (--host user@host:PORT wins over the config), as OpenSSH does.
        if "%r" in command and not USER_RE.match(user):
            raise UsageError(f"invalid User {user!r} {where} (ProxyCommand uses %r)")
        command = _expand_proxy_tokens(command, alias, hostname, port, user)
    jumps_text = cfg.get("proxyjump")
    jumps: tuple[str, ...] = ()
    if jumps_text is not None and jumps_text.strip().lower() != "none":
        parsed = []
        for hop in jumps_text.split(","):
            hop = hop.strip()
            if hop.startswith("ssh://"):
                hop = hop[len("ssh://"):]
            try:
                parse_host(hop)
            except UsageError:
                raise UsageError(f"invalid ProxyJump {jumps_text!r} {where}",
                                 "use [USER@]HOST[:PORT], comma-separated") from None
            parsed.append(hop)
        jumps = tuple(parsed)
    if command and jumps:
        raise UsageError(f"both ProxyCommand and ProxyJump apply {where}", "keep one of them for this host")
    return HostConfig(alias, hostname, port, user, found, user_files, global_files, alias_name,
                      str(cfg.get("hashknownhosts", "no")).lower() == "yes", command, jumps)


def _expand_proxy_tokens(command: str, alias: str, hostname: str, port: int, user: str) -> str:
    """The ssh_config tokens OpenSSH allows in ProxyCommand: %% %h %n %p %r (the values already validated)."""
    values = {"h": hostname, "n": alias, "p": str(port), "r": user, "%": "%"}
    return re.sub(r"%(.)", lambda m: values.get(m.group(1), m.group(0)), command)


_RAW_PROXY_CONFIG: Optional[type] = None


def _raw_proxy_config_class() -> type:
    """paramiko's SSHConfig, except that ProxyCommand comes back unexpanded: paramiko would put the
    config's Port and User in it, not the ones given with --host (edgeq expands it itself)."""
    global _RAW_PROXY_CONFIG
    if _RAW_PROXY_CONFIG is None:
        import paramiko  # only when a config file is there to read, so `edgeq --help` stays fast

        tokens = dict(paramiko.SSHConfig.TOKENS_BY_CONFIG_KEY)
        tokens["proxycommand"] = []
        _RAW_PROXY_CONFIG = type("RawProxySSHConfig", (paramiko.SSHConfig,), {"TOKENS_BY_CONFIG_KEY": tokens})
    return _RAW_PROXY_CONFIG


def _expand_tokens(path: str, hostname: str, port: int, user: str) -> str:
    """The ssh_config tokens allowed in known-hosts paths: %d %u %h %p %r %%, and ~."""
    values = {"d": str(Path.home()), "u": _local_user(), "h": hostname, "p": str(port), "r": user, "%": "%"}
    return re.sub(r"%(.)", lambda m: values.get(m.group(1), m.group(0)), path)


def _local_user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:
        return "root"
