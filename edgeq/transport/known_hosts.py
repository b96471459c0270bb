"""known_hosts files read and written the way OpenSSH does, and the host-key decision of ``edgeq.transport``.

OpenSSH's format has more than ``host type key`` lines: comma-separated
patterns with ``*``/``?`` wildcards and ``!`` negation, hashed names
(``|1|salt|hmac``), ``@revoked`` keys that must never be accepted even when
also listed plainly, and ``@cert-authority`` lines for host certificates. A
line edgeq cannot use is skipped (as ``ssh`` does), never a reason to refuse
the whole file. The user's files and the system-wide ones
(``/etc/ssh/ssh_known_hosts``) are read together; a new key goes into the
first user file, hashed when that file already hashes its names, by an atomic
rewrite under a lock (parallel fleet connects each record their own host).
``verify_host_key`` is the one place an offered host key is judged: known keys
pass, unknown ones are refused unless the user opted into accept-new, changed,
other-type and revoked keys are always refused, each with the fix in the hint.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import fcntl
import fnmatch
import hashlib
import hmac
import os
import shlex
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from edgeq.errors import HostKeyError, InputError
from edgeq.safeio import atomic_write

#: OpenSSH's defaults when ssh_config names no GlobalKnownHostsFile.
GLOBAL_FILES = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
#: OpenSSH's defaults when ssh_config names no UserKnownHostsFile.
USER_FILES = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")

_MAX_FILE_BYTES = 64 * 1024 * 1024  # a known_hosts file larger than this is not one
_WRITE_LOCK = threading.Lock()


class Verdict(enum.Enum):
    """What the known_hosts files say about a host's offered key."""

    KNOWN = "known"
    UNKNOWN = "unknown"
    CHANGED = "changed"  # a different key of the same type is recorded
    OTHER_TYPE = "other-type"  # only keys of other types are recorded
    REVOKED = "revoked"


@dataclass(frozen=True)
class Entry:
    """One usable known_hosts line."""

    path: Path
    lineno: int
    marker: Optional[str]  # None, "revoked" or "cert-authority"
    patterns: tuple[str, ...]
    key_type: str
    blob: bytes

    @property
    def where(self) -> str:
        return f"{self.path}:{self.lineno}"

    def matches(self, name: str) -> bool:
        """OpenSSH's rule: some pattern matches and no negated pattern does."""
        name = name.lower()
        hit = False
        for pattern in self.patterns:
            negated = pattern.startswith("!")
            if negated:
                pattern = pattern[1:]
            if _pattern_matches(pattern, name):
                if negated:
                    return False
                hit = True
        return hit


@dataclass(frozen=True)
class Check:
    """The verdict for one offered key, and the entry it rests on (for messages)."""

    verdict: Verdict
    entry: Optional[Entry] = None
    known_types: tuple[str, ...] = ()
    cert_authority: bool = False  # a @cert-authority line covers the host (edgeq cannot check certificates)


@dataclass(frozen=True)
class KnownHosts:
    """Every usable entry of some known_hosts files, plus what was skipped and why."""

    entries: tuple[Entry, ...]
    skipped: tuple[str, ...] = ()  # "file:line: reason"

    @classmethod
    def load(cls, paths: Iterable[Path | str]) -> "KnownHosts":
        """Read ``paths`` in order; missing files are fine, unreadable ones raise ``InputError``."""
        entries: list[Entry] = []
        skipped: list[str] = []
        for raw in paths:
            path = Path(raw).expanduser()
            text = _read(path)
            if text is None:
                continue
            for lineno, line in enumerate(text.splitlines(), 1):
                entry, reason = parse_line(line, path, lineno)
                if entry is not None:
                    entries.append(entry)
                elif reason:
                    skipped.append(f"{path}:{lineno}: {reason}")
        return cls(tuple(entries), tuple(skipped))

    def for_name(self, name: str) -> list[Entry]:
        return [e for e in self.entries if e.matches(name)]

    def key_types(self, name: str) -> tuple[str, ...]:
        """Key types recorded for ``name`` (plain lines only), in file order, for algorithm preference."""
        seen: list[str] = []
        for e in self.for_name(name):
            if e.marker is None and e.key_type not in seen:
                seen.append(e.key_type)
        return tuple(seen)

    def check(self, name: str, key_type: str, blob: bytes) -> Check:
        """Judge the key ``(key_type, blob)`` a host called ``name`` offered."""
        mine = self.for_name(name)
        for e in mine:
            if e.marker == "revoked" and e.blob == blob:
                return Check(Verdict.REVOKED, e)
        plain = [e for e in mine if e.marker is None]
        types = tuple(dict.fromkeys(e.key_type for e in plain))
        for e in plain:
            if e.blob == blob:
                return Check(Verdict.KNOWN, e, types)
        same = [e for e in plain if e.key_type == key_type]
        if same:
            return Check(Verdict.CHANGED, same[0], types)
        if plain:
            return Check(Verdict.OTHER_TYPE, plain[0], types)
        ca = any(e.marker == "cert-authority" for e in mine)
        return Check(Verdict.UNKNOWN, None, (), cert_authority=ca)


def parse_line(line: str, path: Path, lineno: int) -> tuple[Optional[Entry], Optional[str]]:
    """One known_hosts line -> (entry, None), (None, reason it is unusable) or (None, None) for blanks/comments."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None, None
    fields = text.split()
    marker: Optional[str] = None
    if fields[0].startswith("@"):
        marker = fields[0][1:].lower()
        if marker not in ("revoked", "cert-authority"):
            return None, f"unknown marker {fields[0]!r}"
        fields = fields[1:]
    if len(fields) < 3:
        return None, "expected HOSTS KEYTYPE KEY"
    hosts, key_type, b64 = fields[:3]
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None, "the key is not base64"
    if _blob_type(blob) != key_type:
        return None, f"the key does not match its type {key_type!r}"
    patterns = tuple(p for p in hosts.split(",") if p)
    if not patterns:
        return None, "no host names"
    return Entry(path, lineno, marker, patterns, key_type, blob), None


def host_name(host: str, port: int, alias: Optional[str] = None) -> str:
    """The name a key is recorded under: ``HostKeyAlias`` verbatim, else ``host`` or ``[host]:port``."""
    if alias:
        return alias
    return host if port == 22 else f"[{host}]:{port}"


def hash_name(name: str, salt: Optional[bytes] = None) -> str:
    """OpenSSH's hashed form ``|1|base64(salt)|base64(HMAC-SHA1(salt, name))``."""
    salt = salt if salt is not None else os.urandom(20)
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def record(path: Path, name: str, key_type: str, key_b64: str, hash_names: bool = False) -> Path:
    """Add ``name key_type key`` to the user file ``path``; return the file written.

    The name is hashed when ``hash_names`` (ssh_config ``HashKnownHosts yes``) or
    when the file already holds hashed names. The file is rewritten atomically
    with its mode kept (0600 when new); a symlinked file is written at its
    target; a path that is not a regular file (``/dev/null``) is left alone.
    ``InputError`` on failure.
    """
    path = Path(path).expanduser()
    with _locked(path.parent):
        target = Path(os.path.realpath(path))
        if target.exists() and not target.is_file():
            # UserKnownHostsFile /dev/null: nothing is kept, as with ssh (and never replace a device node).
            return target
        old = _read(target) or ""
        hashed = hash_names or any(line.lstrip().startswith("|1|") for line in old.splitlines())
        entry = f"{hash_name(name) if hashed else name} {key_type} {key_b64}\n"
        if old and not old.endswith("\n"):
            old += "\n"
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = 0o600
        except OSError as exc:
            raise InputError(f"cannot read {target}: {exc.strerror or exc}") from None
        return atomic_write(target, old + entry, mode=mode)


def fingerprint(key: object) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of a paramiko public key (or of a key blob)."""
    blob = key if isinstance(key, bytes) else key.asbytes()  # type: ignore[attr-defined]
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def verify_host_key(known: KnownHosts, name: str, key: Any, *, host: str, user_files: Sequence[Path],
                    record_in: Path, accept_new: bool, hash_names: bool) -> None:
    """Accept the paramiko ``key`` a host offered if ``known`` lists it under ``name``; record it in
    ``record_in`` under accept-new; else raise ``HostKeyError`` naming ``host`` and the fix."""
    kind = key.get_name()
    fp = fingerprint(key)
    check = known.check(name, kind, key.asbytes())
    files = ", ".join(str(p) for p in user_files) or str(record_in)
    remove_hint = (f"ssh-keygen -f {shlex.quote(str(check.entry.path))} -R {shlex.quote(name)}"
                   if check.entry is not None else "")
    entry = check.entry
    where = entry.where if entry is not None else files
    if check.verdict is Verdict.KNOWN:
        return
    if check.verdict is Verdict.REVOKED:
        raise HostKeyError(
            f"{host} offered a REVOKED host key {kind} {fp} (marked @revoked at {where}); "
            "refusing to connect", hint="the device's host key must be replaced; ask whoever runs it",
            host=host)
    if check.verdict is Verdict.CHANGED:
        recorded = fingerprint(entry.blob) if entry is not None else "another key"
        raise HostKeyError(
            f"host key for {host} has CHANGED: {where} has {recorded}, "
            f"the device offered {kind} {fp}; refusing to connect",
            hint=f"if the device was reinstalled, check the new fingerprint on it and remove the old key with "
                 f"{remove_hint}", host=host)
    if check.verdict is Verdict.OTHER_TYPE:
        raise HostKeyError(
            f"{host} offered a {kind} host key {fp}, but known_hosts records only "
            f"{', '.join(check.known_types)} for {name} ({where}); refusing to connect",
            hint=f"check the device, then remove the old entry with {remove_hint}", host=host)
    if not accept_new:
        ca = (" (a @cert-authority line covers this host, but edgeq does not check host certificates: "
              "record the host key itself)") if check.cert_authority else ""
        raise HostKeyError(
            f"unknown host key for {host}: {kind} {fp} is not in {files} under {name}{ca}",
            hint=("compare it with `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` on the device, then re-run "
                  "with --accept-new-host-key to record it"), host=host)
    try:
        record(record_in, name, key_type=kind, key_b64=key.get_base64(), hash_names=hash_names)
    except InputError as exc:
        raise HostKeyError(f"cannot record the host key of {host}: {exc.message}", host=host) from None


# ------------------------------------------------------------------ internals


def _read(path: Path) -> Optional[str]:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is then refused as not a file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None  # /dev/null as UserKnownHostsFile: nothing recorded
            data = f.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"cannot read known hosts file {path}: {exc.strerror or exc}",
                         "fix its permissions, or point --known-hosts elsewhere") from None
    if len(data) > _MAX_FILE_BYTES:
        raise InputError(f"known hosts file {path} is larger than {_MAX_FILE_BYTES >> 20} MiB",
                         "is it really a known_hosts file?")
    return data.decode("utf-8", "replace")


def _blob_type(blob: bytes) -> Optional[str]:
    # An SSH public key blob starts with its type as a length-prefixed string.
    if len(blob) < 4:
        return None
    n = int.from_bytes(blob[:4], "big")
    if n > 64 or len(blob) < 4 + n:
        return None
    try:
        return blob[4:4 + n].decode("ascii")
    except UnicodeDecodeError:
        return None


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        parts = pattern.split("|")
        if len(parts) != 4:
            return False
        try:
            salt = base64.b64decode(parts[2], validate=True)
            want = base64.b64decode(parts[3], validate=True)
        except (binascii.Error, ValueError):
            return False
        got = hmac.new(salt, name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(got, want)
    # ssh's match_pattern: only * and ? are special (no [] classes).
    translated = pattern.lower().replace("[", "[[]") if "[" in pattern else pattern.lower()
    return fnmatch.fnmatchcase(name, translated)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialize writers: threads of this process, and other edgeq processes (flock on the directory)."""
    with _WRITE_LOCK:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create {directory}: {exc.strerror or exc}") from None
        fd = None
        try:
            fd = os.open(directory, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without flock: the in-process lock still holds
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)


def files(paths: Sequence[str]) -> list[Path]:
    """Expand ``~`` in configured paths; ``none`` (ssh_config's way to say no file) drops a path."""
    return [Path(p).expanduser() for p in paths if p and p.lower() != "none"]


__all__ = ["KnownHosts", "Entry", "Check", "Verdict", "parse_line", "host_name", "hash_name", "record", "files",
           "fingerprint", "verify_host_key", "GLOBAL_FILES", "USER_FILES"]
