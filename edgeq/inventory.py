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
import re
import shlex
import string
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from edgeq.errors import InputError

# Variables edgeq reads from an inventory host (anything else is kept but unused).
KNOWN_VARS = (
    "ansible_host",
    "ansible_port",
    "ansible_user",
    "ansible_ssh_private_key_file",
    "ansible_python_interpreter",
    "edgeq_remote_dir",
)


@dataclass(frozen=True)
class InventoryHost:
    """One host with its merged variables and the groups it belongs to."""

    name: str
    vars: Mapping[str, Any]
    groups: tuple[str, ...]

    @property
    def address(self) -> str:
        return str(self.vars.get("ansible_host", self.name))

    @property
    def port(self) -> int | None:
        port = self.vars.get("ansible_port")
        return None if port is None else int(port)

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

    def group(self, name: str) -> _Group:
        if name not in self.groups:
            self.groups[name] = _Group(name)
        return self.groups[name]

    def add_host(self, group: str, name: str, hvars: Mapping[str, Any]) -> None:
        if name not in self.host_vars:
            self.host_order.append(name)
            self.host_vars[name] = {}
        self.host_vars[name].update(hvars)
        g = self.group(group)
        if name not in g.hosts:
            g.hosts.append(name)

    def build(self) -> Inventory:
        all_group = self.groups["all"]
        for name, g in self.groups.items():
            if name != "all" and not self._has_parent(name) and name not in all_group.children:
                all_group.children.append(name)
        # Hosts named in no group but `all`/`ungrouped` go to ungrouped, like Ansible.
        members = self._members()
        for h in self.host_order:
            in_named = any(h in members[g] for g in self.groups if g not in ("all", "ungrouped"))
            if not in_named and h not in self.groups["ungrouped"].hosts:
                self.groups["ungrouped"].hosts.append(h)
        members = self._members()
        depth = self._depths()
        hosts = []
        for h in self.host_order:
            mine = [g for g in self.groups if h in members[g]]
            merged: dict[str, Any] = {}
            for g in sorted(mine, key=lambda g: (depth.get(g, 0), g)):
                merged.update(self.groups[g].vars)
            merged.update(self.host_vars[h])
            hosts.append(
                InventoryHost(
                    name=h,
                    vars=MappingProxyType(merged),
                    groups=tuple(sorted(g for g in mine if g != "all")),
                )
            )
        return Inventory(
            source=self.source,
            hosts=tuple(hosts),
            groups=MappingProxyType({g: tuple(sorted(m)) for g, m in members.items()}),
        )

    def _has_parent(self, name: str) -> bool:
        return any(name in g.children for g in self.groups.values())

    def _members(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}

        def collect(name: str, seen: tuple[str, ...]) -> set[str]:
            if name in seen:
                raise InputError(
                    f"{self.source}: group {name!r} is its own child ({' -> '.join(seen + (name,))})"
                )
            g = self.groups[name]
            found = set(g.hosts)
            for c in g.children:
                found |= collect(c, seen + (name,))
            return found

        for name in self.groups:
            out[name] = collect(name, ())
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


def load_inventory(path: str | Path) -> Inventory:
    """Read an Ansible inventory file (INI, or YAML by extension or content)."""
    p = Path(path)
    try:
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


def expand_host_range(pattern: str) -> list[str]:
    """Expand Ansible host ranges: ``pi[01:03]`` -> pi01, pi02, pi03; ``[a:c]`` too."""
    m = _RANGE.match(pattern)
    if not m:
        return [pattern]
    head, start, end, step, tail = m.groups()
    stride = int(step or 1)
    if start.isdigit() and end.isdigit():
        width = len(start) if start.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(start), int(end) + 1, stride)]
    elif len(start) == 1 and len(end) == 1 and start in string.ascii_letters and end in string.ascii_letters:
        items = [chr(c) for c in range(ord(start), ord(end) + 1, stride)]
    else:
        raise InputError(f"bad host range {pattern!r}", "use [01:10] or [a:f]")
    return [name for item in items for name in expand_host_range(head + item + tail)]


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
            for name in expand_host_range(tokens[0]):
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
    if not isinstance(doc, dict):
        raise InputError(f"{source}: a YAML inventory is a mapping of groups (e.g. `all:`)")
    b = _Builder(source)

    def walk(name: str, body: Any, path: str) -> None:
        g = b.group(name)
        if body is None:
            return
        if not isinstance(body, dict):
            raise InputError(f"{source}:{path}: a group is a mapping with hosts, children or vars")
        for key in body:
            if key not in ("hosts", "children", "vars"):
                raise InputError(f"{source}:{path}.{key}: unknown key", "a group has hosts, children and vars")
        gvars = body.get("vars") or {}
        if not isinstance(gvars, dict):
            raise InputError(f"{source}:{path}.vars: must be a mapping")
        g.vars.update(gvars)
        for hpattern, hvars in (body.get("hosts") or {}).items():
            if hvars is not None and not isinstance(hvars, dict):
                raise InputError(f"{source}:{path}.hosts.{hpattern}: host variables must be a mapping")
            for hname in expand_host_range(str(hpattern)):
                b.add_host(name, hname, hvars or {})
        for child, cbody in (body.get("children") or {}).items():
            if child not in g.children:
                g.children.append(child)
            walk(child, cbody, f"{path}.children.{child}")

    for top, body in doc.items():
        walk(str(top), body, str(top))
    return b.build()


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
        rx = re.compile(term[1:])
        names = {h.name for h in inv.hosts if rx.search(h.name)}
        return names | {h for g, hs in inv.groups.items() if rx.search(g) for h in hs}
    names = {h.name for h in inv.hosts if fnmatch.fnmatchcase(h.name, term)}
    return names | {h for g, hs in inv.groups.items() if fnmatch.fnmatchcase(g, term) for h in hs}
