"""Read Ansible inventories (INI and YAML), the way fleets are already described.

Supports what edgeq needs of Ansible's format: groups, ``:children`` and
``:vars`` sections (INI), ``hosts``/``children``/``vars`` (YAML), the implicit
``all`` and ``ungrouped`` groups, host ranges (``pi[01:08]``), and ``--limit``
patterns (names, groups, ``*`` wildcards, ``~regex``, ``!`` exclusion and ``&``
intersection). Variable precedence follows Ansible: ``all`` < parent groups <
child groups (by depth, then name) < host variables.

Ansible itself (ansible-core) reads these files too, but it is GPL-3.0 and a
large dependency for a handful of lines of format; YAML goes through PyYAML.
"""

from __future__ import annotations

import ast
import fnmatch
import math
import re
import shlex
import string
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from edgeq.errors import InputError

# An inventory is untrusted input: its size in hosts, groups and nesting is bounded,
# so a host range like pi[1:100000000] or YAML aliases reused many times are a
# one-line error instead of hours of work or all the memory.
MAX_HOSTS = 100_000
MAX_GROUPS = 10_000
MAX_DEPTH = 64  # nesting of groups (children of children ...)
MAX_INVENTORY_BYTES = 16 * 1024 * 1024
MAX_WORK = 2_000_000  # group bodies walked + host entries added (YAML aliases can repeat a subtree)

# Variables edgeq reads from an inventory host (anything else is kept but unused).
KNOWN_VARS = (
    "ansible_host",
    "ansible_port",
    "ansible_user",
    "ansible_ssh_private_key_file",
    "ansible_python_interpreter",
    "edgeq_remote_dir",
    "edgeq_probe_timeout",
    "edgeq_upload_timeout",
    "edgeq_run_timeout",
)
#: Per-host phase timeouts (seconds) an inventory may set, and the longest it may ask for.
TIMEOUT_VARS = {"edgeq_probe_timeout": "probe_timeout", "edgeq_upload_timeout": "upload_timeout",
                "edgeq_run_timeout": "run_timeout"}
MAX_TIMEOUT_S = 86400.0
_DIGITS = re.compile(r"^[0-9]{1,5}$")
_DECIMAL = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,9})?$")


@dataclass(frozen=True)
class InventoryHost:
    """One host with its merged variables and the groups it belongs to."""

    name: str
    vars: Mapping[str, Any]
    groups: tuple[str, ...]
    #: ``edgeq_probe_timeout`` / ``edgeq_upload_timeout`` / ``edgeq_run_timeout`` in seconds (None: not set).
    probe_timeout: float | None = None
    upload_timeout: float | None = None
    run_timeout: float | None = None

    @property
    def address(self) -> str:
        return str(self.vars.get("ansible_host", self.name))

    @property
    def port(self) -> int | None:
        """``ansible_port``, checked when the inventory was read (an integer from 1 to 65535)."""
        port = self.vars.get("ansible_port")
        if port is None or (isinstance(port, int) and not isinstance(port, bool)):
            return port
        if isinstance(port, str) and _DIGITS.match(port.strip()):
            return int(port.strip())
        raise ValueError(f"ansible_port={_show(port)} is not a port number")

    @property
    def user(self) -> str | None:
        user = self.vars.get("ansible_user")
        return None if user is None else str(user)


@dataclass(frozen=True)
class Inventory:
    """All hosts of an inventory, in file order."""

    source: str
    hosts: tuple[InventoryHost, ...]
    groups: Mapping[str, tuple[str, ...]] = field(repr=False)

    def select(self, pattern: str | None = None) -> tuple[InventoryHost, ...]:
        """Hosts matching an Ansible ``--limit`` pattern (all hosts when None)."""
        if not pattern:
            return self.hosts
        names = _select(self, pattern)
        chosen = tuple(h for h in self.hosts if h.name in names)
        if not chosen:
            raise InputError(
                f"{self.source}: --limit {pattern!r} matches no host",
                f"hosts are: {', '.join(h.name for h in self.hosts) or '(none)'}",
            )
        return chosen


class _Group:
    def __init__(self, name: str) -> None:
        self.name = name
        self.hosts: list[str] = []
        self.children: list[str] = []
        self.vars: dict[str, Any] = {}


class _Builder:
    def __init__(self, source: str) -> None:
        self.source = source
        self.groups: dict[str, _Group] = {"all": _Group("all"), "ungrouped": _Group("ungrouped")}
        self.host_order: list[str] = []
        self.host_vars: dict[str, dict[str, Any]] = {}
        self.work = 0

    def spend(self, units: int = 1) -> None:
        self.work += units
        if self.work > MAX_WORK:
            raise InputError(f"{self.source}: the inventory expands to more than {MAX_WORK} group and host "
                             f"entries (YAML aliases reused many times?)",
                             "write the groups out, or split the inventory")

    def group(self, name: str) -> _Group:
        if name not in self.groups:
            if len(self.groups) >= MAX_GROUPS:
                raise InputError(f"{self.source}: more than {MAX_GROUPS} groups", "split the inventory")
            self.groups[name] = _Group(name)
        return self.groups[name]

    def add_host(self, group: str, name: str, hvars: Mapping[str, Any]) -> None:
        self.spend()
        if name not in self.host_vars:
            if len(self.host_order) >= MAX_HOSTS:
                raise InputError(f"{self.source}: more than {MAX_HOSTS} hosts", "split the inventory, or use --limit "
                                 "on a smaller one")
            self.host_order.append(name)
            self.host_vars[name] = {}
        self.host_vars[name].update(hvars)
        g = self.group(group)
        if name not in g.hosts:
            g.hosts.append(name)

    def build(self) -> Inventory:
        all_group = self.groups["all"]
        has_parent = {c for g in self.groups.values() for c in g.children}
        for name in self.groups:
            if name != "all" and name not in has_parent and name not in all_group.children:
                all_group.children.append(name)
        # Hosts named in no group but `all`/`ungrouped` go to ungrouped, like Ansible.
        members = self._members()
        named = set().union(*(m for g, m in members.items() if g not in ("all", "ungrouped")))
        ungrouped = self.groups["ungrouped"]
        already = set(ungrouped.hosts)
        for h in self.host_order:
            if h not in named and h not in already:
                ungrouped.hosts.append(h)
                already.add(h)
        members = self._members()
        depth = self._depths()
        hosts = []
        groups_of: dict[str, list[str]] = {h: [] for h in self.host_order}
        for g in self.groups:
            for h in members[g]:
                groups_of[h].append(g)
        for h in self.host_order:
            mine = groups_of[h]
            merged: dict[str, Any] = {}
            for g in sorted(mine, key=lambda g: (depth.get(g, 0), g)):
                merged.update(self.groups[g].vars)
            merged.update(self.host_vars[h])
            hosts.append(_checked_host(self.source, h, merged, tuple(sorted(g for g in mine if g != "all"))))
        return Inventory(
            source=self.source,
            hosts=tuple(hosts),
            groups=MappingProxyType({g: tuple(sorted(m)) for g, m in members.items()}),
        )

    def _members(self) -> dict[str, set[str]]:
        memo: dict[str, frozenset[str]] = {}  # each group once: shared children cost nothing extra

        def collect(name: str, seen: tuple[str, ...]) -> frozenset[str]:
            if name in seen:
                raise InputError(
                    f"{self.source}: group {name!r} is its own child ({' -> '.join(seen + (name,))})"
                )
            if name in memo:
                return memo[name]
            if len(seen) >= MAX_DEPTH:
                raise InputError(f"{self.source}: groups nested more than {MAX_DEPTH} levels deep "
                                 f"({' -> '.join(seen[:3])} -> ...)", "flatten the group hierarchy")
            g = self.groups[name]
            found = set(g.hosts)
            for c in g.children:
                found |= collect(c, seen + (name,))
            self.spend(len(found) + 1)  # memberships are bounded too (many groups holding many hosts)
            memo[name] = frozenset(found)
            return memo[name]

        out = {name: set(collect(name, ())) for name in self.groups}
        out["all"] = set(self.host_order)
        return out

    def _depths(self) -> dict[str, int]:
        depth = {"all": 0}
        frontier = ["all"]
        while frontier:
            nxt = []
            for g in frontier:
                for c in self.groups[g].children:
                    if depth.get(c, -1) < depth[g] + 1:
                        depth[c] = depth[g] + 1
                        nxt.append(c)
            frontier = nxt
        return depth


def _port(value: Any, source: str, host: str) -> int:
    """An ``ansible_port`` as given: a YAML/INI integer or a string of digits; never a float (22.9, 1e400, inf)."""
    if isinstance(value, int) and not isinstance(value, bool):
        port = value
    elif isinstance(value, str) and _DIGITS.match(value.strip()):
        port = int(value.strip())
    else:
        raise InputError(f"{source}: host {host!r}: ansible_port={_show(value)} is not a port number",
                         "write the port as a whole number from 1 to 65535")
    if not 0 < port < 65536:
        raise InputError(f"{source}: host {host!r}: ansible_port={_show(value)} is out of range",
                         "write the port as a whole number from 1 to 65535")
    return port


def _timeout(key: str, value: Any, source: str, host: str) -> float:
    """A per-host timeout: positive, finite seconds, at most ``MAX_TIMEOUT_S``."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value) if (isinstance(value, float) or abs(value) < 10 ** 12) else math.inf
    elif isinstance(value, str) and _DECIMAL.match(value.strip()):
        seconds = float(value.strip())
    if seconds is None or not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT_S:
        raise InputError(f"{source}: host {host!r}: {key}={_show(value)} is not a timeout",
                         f"give a number of seconds above 0 and at most {MAX_TIMEOUT_S:g} (24 hours)")
    return seconds


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _checked_host(source: str, name: str, merged: dict[str, Any], groups: tuple[str, ...]) -> InventoryHost:
    """The host record, its edgeq-relevant values validated (a one-line error naming file and host)."""
    if merged.get("ansible_port") is not None:
        merged["ansible_port"] = _port(merged["ansible_port"], source, name)
    timeouts = {field_name: _timeout(key, merged[key], source, name)
                for key, field_name in TIMEOUT_VARS.items() if merged.get(key) is not None}
    return InventoryHost(name=name, vars=MappingProxyType(merged), groups=groups, **timeouts)


def load_inventory(path: str | Path) -> Inventory:
    """Read an Ansible inventory file (INI, or YAML by extension or content)."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_INVENTORY_BYTES:
            raise InputError(f"{p}: larger than {MAX_INVENTORY_BYTES // (1024 * 1024)} MiB; not an inventory edgeq reads")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{p}: no such inventory file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read inventory ({exc})") from None
    is_yaml = p.suffix.lower() in (".yml", ".yaml") or text.lstrip().startswith(("---", "all:"))
    return _parse_yaml(text, str(p)) if is_yaml else _parse_ini(text, str(p))


def _value(raw: str) -> Any:
    """INI values are Python literals where they parse as one (Ansible does the same)."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _parse_kv(tokens: list[str], where: str) -> dict[str, Any]:
    out = {}
    for tok in tokens:
        if "=" not in tok:
            raise InputError(f"{where}: expected key=value, got {tok!r}")
        key, _, raw = tok.partition("=")
        out[key] = _value(raw)
    return out


_RANGE = re.compile(r"^(.*?)\[([^:\]]+):([^:\]]+)(?::(\d+))?\](.*)$")


def _range_items(pattern: str) -> tuple[str, range, int, bool, str] | None:
    m = _RANGE.match(pattern)
    if not m:
        return None
    head, start, end, step, tail = m.groups()
    stride = int(step or 1)
    if stride < 1:
        raise InputError(f"bad host range {pattern!r}: the step must be at least 1", "use [01:10] or [01:10:2]")
    if start.isdigit() and end.isdigit():
        if len(start) > 9 or len(end) > 9:
            raise InputError(f"bad host range {pattern!r}: numbers of at most 9 digits", "use [01:10]")
        width = len(start) if start.startswith("0") else 0
        return head, range(int(start), int(end) + 1, stride), width, False, tail
    if len(start) == 1 and len(end) == 1 and start in string.ascii_letters and end in string.ascii_letters:
        return head, range(ord(start), ord(end) + 1, stride), 0, True, tail
    raise InputError(f"bad host range {pattern!r}", "use [01:10] or [a:f]")


def host_range_size(pattern: str) -> int:
    """How many names ``pattern`` expands to, without expanding it."""
    total = 1
    rest = pattern
    while (parts := _range_items(rest)) is not None:
        head, items, _, _, tail = parts
        if not items:
            raise InputError(f"bad host range {pattern!r}: the start is after the end", "use [01:10], not [10:01]")
        total *= len(items)
        if total > MAX_HOSTS:
            return total
        rest = head + tail
    return total


def expand_host_range(pattern: str) -> list[str]:
    """Expand Ansible host ranges: ``pi[01:03]`` -> pi01, pi02, pi03; ``[a:c]`` too (at most MAX_HOSTS names)."""
    n = host_range_size(pattern)
    if n > MAX_HOSTS:
        raise InputError(f"host range {pattern!r} expands to more than {MAX_HOSTS} hosts",
                         "use a smaller range; edgeq deploys to at most 100000 hosts from one inventory")
    return _expand(pattern)


def _expand(pattern: str) -> list[str]:
    parts = _range_items(pattern)
    if parts is None:
        return [pattern]
    head, items, width, letters, tail = parts
    names = [chr(i) if letters else str(i).zfill(width) for i in items]
    return [name for item in names for name in _expand(head + item + tail)]


def _split_host_port(token: str) -> tuple[str, int | None]:
    # "host:2222" is a host with a port; a bare IPv6 address has several colons.
    if token.count(":") == 1 and not token.startswith("["):
        host, _, port = token.partition(":")
        if port.isdigit():
            return host, int(port)
    return token, None


def _parse_ini(text: str, source: str) -> Inventory:
    b = _Builder(source)
    section, kind = "ungrouped", "hosts"
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        where = f"{source}:{lineno}"
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise InputError(f"{where}: unterminated section header {line!r}")
            name = line[1:-1].strip()
            section, _, kind = name.partition(":")
            kind = kind or "hosts"
            if kind not in ("hosts", "vars", "children"):
                raise InputError(f"{where}: unknown section kind {kind!r}", "use [group], [group:vars] or [group:children]")
            b.group(section)
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:
            raise InputError(f"{where}: {exc}") from None
        if not tokens:
            continue
        if kind == "hosts":
            hvars = _parse_kv(tokens[1:], where)
            try:
                names = expand_host_range(tokens[0])
            except InputError as exc:
                raise InputError(f"{where}: {exc.message}", exc.hint) from None
            for name in names:
                host, port = _split_host_port(name)
                if port is not None:
                    hvars = {**hvars, "ansible_port": hvars.get("ansible_port", port)}
                b.add_host(section, host, hvars)
        elif kind == "vars":
            key, sep, rawval = line.partition("=")
            if not sep:
                raise InputError(f"{where}: expected key=value in [{section}:vars]")
            b.group(section).vars[key.strip()] = _value(rawval.strip())
        else:
            child = tokens[0]
            b.group(child)
            if child not in b.group(section).children:
                b.group(section).children.append(child)
    return b.build()


def _parse_yaml(text: str, source: str) -> Inventory:
    import yaml  # only needed for YAML inventories

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: not valid YAML ({exc})") from None
    except RecursionError:
        raise InputError(f"{source}: YAML nested too deeply", "an inventory is a few levels of groups") from None
    if not isinstance(doc, dict):
        raise InputError(f"{source}: a YAML inventory is a mapping of groups (e.g. `all:`)")
    b = _Builder(source)

    def mapping(value: Any, where: str, example: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise InputError(f"{source}:{where}: must be a mapping, not a {_yaml_kind(value)}",
                             f"write it as {example}")
        return value

    def walk(name: str, body: Any, path: str, stack: tuple[int, ...]) -> None:
        b.spend()
        g = b.group(name)
        if body is None:
            return
        if not isinstance(body, dict):
            raise InputError(f"{source}:{path}: a group is a mapping with hosts, children or vars")
        if id(body) in stack:
            raise InputError(f"{source}:{path}: the group contains itself (a recursive YAML alias)",
                             "replace the alias with the group's name under children")
        if len(stack) >= MAX_DEPTH:
            raise InputError(f"{source}:{path}: groups nested more than {MAX_DEPTH} levels deep",
                             "flatten the group hierarchy")
        for key in body:
            if key not in ("hosts", "children", "vars"):
                raise InputError(f"{source}:{path}.{key}: unknown key", "a group has hosts, children and vars")
        gvars = mapping(body.get("vars"), f"{path}.vars", "`vars: {ansible_user: pi}`")
        g.vars.update({str(k): v for k, v in gvars.items()})
        hosts = mapping(body.get("hosts"), f"{path}.hosts", "`hosts: {pi1: {}, pi2: {}}` (names as keys)")
        for hpattern, hvars in hosts.items():
            if hvars is not None and not isinstance(hvars, dict):
                raise InputError(f"{source}:{path}.hosts.{hpattern}: host variables must be a mapping")
            try:
                names = expand_host_range(str(hpattern))
            except InputError as exc:
                raise InputError(f"{source}:{path}.hosts: {exc.message}", exc.hint) from None
            for hname in names:
                b.add_host(name, hname, {str(k): v for k, v in (hvars or {}).items()})
        children = mapping(body.get("children"), f"{path}.children", "`children: {pis: {hosts: ...}}`")
        for child, cbody in children.items():
            child = str(child)
            if child not in g.children:
                g.children.append(child)
            walk(child, cbody, f"{path}.children.{child}", stack + (id(body),))

    for top, body in doc.items():
        walk(str(top), body, str(top), ())
    return b.build()


def _yaml_kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value),
                                                                                             type(value).__name__)


def _select(inv: Inventory, pattern: str) -> set[str]:
    parts = [p.strip() for p in re.split(r"[,:](?![^\[]*\])", pattern) if p.strip()]
    chosen: set[str] = set()
    intersect: list[set[str]] = []
    exclude: set[str] = set()
    for part in parts:
        if part.startswith("!"):
            exclude |= _match(inv, part[1:])
        elif part.startswith("&"):
            intersect.append(_match(inv, part[1:]))
        else:
            chosen |= _match(inv, part)
    for s in intersect:
        chosen &= s
    return chosen - exclude


def _match(inv: Inventory, term: str) -> set[str]:
    if term in ("all", "*"):
        return {h.name for h in inv.hosts}
    if term in inv.groups:
        return set(inv.groups[term])
    if term.startswith("~"):
        try:
            rx = re.compile(term[1:])
        except (re.error, RecursionError, OverflowError) as exc:
            raise InputError(f"--limit {term!r}: not a valid regular expression ({exc})",
                             "after ~ comes a Python regular expression, e.g. --limit '~^pi0[1-4]$'") from None
        names = {h.name for h in inv.hosts if rx.search(h.name)}
        return names | {h for g, hs in inv.groups.items() if rx.search(g) for h in hs}
    names = {h.name for h in inv.hosts if fnmatch.fnmatchcase(h.name, term)}
    return names | {h for g, hs in inv.groups.items() if fnmatch.fnmatchcase(g, term) for h in hs}
