"""Target profiles: what a device offers (memory, ops, kernels, speed), as validated data.

Profiles are TOML files in ``targets/`` (shipped as package ``edgeq._targets``) or
a user's own file. Op tables shared by several profiles live beside them in
``_<runtime>-ops.toml`` and ``_<backend>-kernels.toml`` and are picked by the
profile's ``runtime`` and ``backend``. Every problem in a file is a
``TargetError`` naming ``file:key``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from edgeq.errors import TargetError
from edgeq.safeio import load_toml

KINDS = ("linux", "mcu")
RUNTIMES = ("litert", "tflm")
BACKENDS = ("xnnpack", "cmsis-nn", "esp-nn", "reference")
SCHEMES = ("int8", "int16x8", "float32")
# Tensor types an op table may name (TFLite TensorType names).
DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool", "uint16", "uint32")
# Which activation type a quantization scheme runs on.
SCHEME_DTYPE = {"int8": "int8", "int16x8": "int16", "float32": "float32"}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB)\s*$")
_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class OpSupport:
    """One op a runtime can run: how to register it and the input types its kernels take."""

    op: str
    add_method: str | None  # TFLite Micro's MicroMutableOpResolver method, e.g. "AddConv2D"
    dtypes: tuple[str, ...] | None  # None: any type

    def supports(self, dtype: str) -> bool:
        return self.dtypes is None or dtype in self.dtypes


@dataclass(frozen=True)
class PowerFigures:
    """Published power figures of a board, for energy *estimates* only.

    Linux boards: whole-board watts when idle and under load on every core.
    Microcontrollers: supply voltage and run-mode current at the profile's clock.
    """

    idle_w: float | None = None
    load_w: float | None = None
    voltage_v: float | None = None
    run_ma: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("idle_w", self.idle_w), ("load_w", self.load_w), ("voltage_v", self.voltage_v),
                                  ("run_ma", self.run_ma)) if v is not None}


@dataclass(frozen=True)
class TargetProfile:
    """A validated target profile (see ``targets/*.toml``)."""

    name: str
    source: str
    kind: str
    runtime: str
    backend: str
    requires_full_integer: bool
    per_channel: bool
    description: str
    schemes: tuple[str, ...]
    cpu: str
    cores: int
    clock_hz: int
    ram_bytes: int
    ram_available_bytes: int
    flash_bytes: int
    flash_available_bytes: int
    runtime_flash_bytes: int
    psram_bytes: int | None
    threads: int
    macs_per_cycle: Mapping[str, float]
    fallback_slowdown: float
    ops: Mapping[str, OpSupport] = field(repr=False)
    accelerated: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    ops_source: str = ""
    kernels_source: str = ""
    power: PowerFigures | None = None  # None: the profile has no [power] table (no energy estimate)

    def supports_scheme(self, scheme: str) -> bool:
        """Whether models quantized with ``scheme`` ("int8", "int16x8", "float32") are offered."""
        return scheme in self.schemes

    def op_support(self, op: str) -> OpSupport | None:
        """How the runtime supports builtin ``op``, or None if it does not."""
        return self.ops.get(op)

    def is_accelerated(self, op: str, dtype: str) -> bool:
        """Whether the backend has an optimized kernel for ``op`` on ``dtype`` inputs."""
        return dtype in self.accelerated.get(op, ())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "kind": self.kind,
            "runtime": self.runtime,
            "backend": self.backend,
            "cpu": self.cpu,
            "cores": self.cores,
            "clock_hz": self.clock_hz,
            "ram_bytes": self.ram_bytes,
            "ram_available_bytes": self.ram_available_bytes,
            "flash_bytes": self.flash_bytes,
            "flash_available_bytes": self.flash_available_bytes,
            "runtime_flash_bytes": self.runtime_flash_bytes,
            "psram_bytes": self.psram_bytes,
            "requires_full_integer": self.requires_full_integer,
            "per_channel": self.per_channel,
            "schemes": list(self.schemes),
            "threads": self.threads,
            "macs_per_cycle": dict(self.macs_per_cycle),
            "power": self.power.to_dict() if self.power else None,
            "source": self.source,
        }


# --------------------------------------------------------------------------- validation


class _Table:
    """Typed, key-checked access to one TOML table; errors name ``file:key``."""

    def __init__(self, data: dict, where: str, prefix: str = "") -> None:
        self.data = data
        self.where = where
        self.prefix = prefix
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}:{self.prefix}{name}"

    def error(self, name: str, problem: str, hint: str | None = None) -> TargetError:
        return TargetError(f"{self.key(name)}: {problem}", hint)

    def get(self, name: str, required: bool = True) -> Any:
        self.used.add(name)
        if name not in self.data:
            if required:
                raise self.error(name, "missing", "add it to the profile (see the shipped targets/*.toml)")
            return None
        return self.data[name]

    def string(self, name: str, choices: tuple[str, ...] | None = None, required: bool = True) -> str | None:
        v = self.get(name, required)
        if v is None:
            return None
        if not isinstance(v, str) or not v.strip():
            raise self.error(name, f"expected a non-empty string, got {v!r}")
        if choices is not None and v not in choices:
            raise self.error(name, f"{v!r} is not one of {', '.join(choices)}")
        return v

    def boolean(self, name: str) -> bool:
        v = self.get(name)
        if not isinstance(v, bool):
            raise self.error(name, f"expected true or false, got {v!r}")
        return v

    def integer(self, name: str, lo: int, hi: int) -> int:
        v = self.get(name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(name, f"expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise self.error(name, f"{v} is out of range ({lo}..{hi})")
        return v

    def number(self, name: str, lo: float, hi: float, value: Any = None, required: bool = True) -> float | None:
        v = self.get(name, required) if value is None else value
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.error(name, f"expected a number, got {v!r}")
        if not lo <= float(v) <= hi:
            raise self.error(name, f"{v} is out of range ({lo}..{hi})")
        return float(v)

    def size(self, name: str, required: bool = True) -> int | None:
        v = self.get(name, required)
        if v is None:
            return None
        m = _SIZE_RE.match(v) if isinstance(v, str) else None
        if m is None:
            raise self.error(name, f"expected a size like \"256 KiB\" or \"1 GiB\", got {v!r}",
                             "units: B, KiB, MiB, GiB")
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
        if n <= 0:
            raise self.error(name, f"{v!r} must be more than 0")
        return n

    def string_list(self, name: str, choices: tuple[str, ...], value: Any = None) -> tuple[str, ...]:
        v = self.get(name) if value is None else value
        if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
            raise self.error(name, f"expected a non-empty list of strings, got {v!r}")
        for x in v:
            if x not in choices:
                raise self.error(name, f"{x!r} is not one of {', '.join(choices)}")
        return tuple(v)

    def sub(self, name: str) -> "_Table":
        v = self.get(name)
        if not isinstance(v, dict):
            raise self.error(name, f"expected a table [{self.prefix}{name}], got {v!r}")
        return _Table(v, self.where, f"{self.prefix}{name}.")

    def done(self) -> None:
        extra = sorted(set(self.data) - self.used)
        if extra:
            raise self.error(extra[0], "unknown key", "check the spelling against the shipped targets/*.toml")


_MAX_PROFILE_BYTES = 1 << 20  # a profile or op table is a few KB; anything near this is not one


def _read_toml(path: Path, label: str) -> dict:
    return load_toml(path, _MAX_PROFILE_BYTES, label, TargetError,
                     "give a shipped target name or the path of a .toml profile")


def _shipped_dir() -> Path:
    return Path(str(resources.files("edgeq._targets")))


def _load_ops(runtime: str) -> tuple[Mapping[str, OpSupport], str]:
    path = _shipped_dir() / f"_{runtime}-ops.toml"
    label = path.name
    t = _Table(_read_toml(path, label), label)
    t.string("kind", ("ops",))
    t.string("runtime", (runtime,))
    ops: dict[str, OpSupport] = {}
    if "all_builtins" in t.data and t.boolean("all_builtins"):
        from edgeq.tflite_file import BUILTIN_OP_NAMES

        unsupported = set(t.string_list("unsupported", BUILTIN_OP_NAMES))
        prefixes = t.get("unsupported_prefixes")
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise t.error("unsupported_prefixes", "expected a list of strings")
        for op in BUILTIN_OP_NAMES:
            if op not in unsupported and not op.startswith(tuple(prefixes)):
                ops[op] = OpSupport(op, None, None)
    if "ops" in t.data:
        table = t.sub("ops")
        for op in list(table.data):
            entry = table.sub(op)
            add = entry.string("add")
            raw = entry.get("dtypes")
            dtypes = None if raw == "any" else entry.string_list("dtypes", DTYPES)
            entry.done()
            ops[op] = OpSupport(op, add, dtypes)
        table.done()
    t.done()
    return MappingProxyType(ops), str(path)


def _load_kernels(backend: str) -> tuple[Mapping[str, tuple[str, ...]], str]:
    if backend == "reference":
        return MappingProxyType({}), ""
    path = _shipped_dir() / f"_{backend}-kernels.toml"
    label = path.name
    t = _Table(_read_toml(path, label), label)
    t.string("kind", ("kernels",))
    t.string("backend", (backend,))
    acc = t.sub("accelerated")
    out = {op: acc.string_list(op, DTYPES) for op in list(acc.data)}
    acc.done()
    t.done()
    return MappingProxyType(out), str(path)


def parse_profile(data: dict, where: str, source: str) -> TargetProfile:
    """Validate the contents of one profile file (``where`` is used in error messages)."""
    t = _Table(data, where)
    name = t.string("name")
    if not _NAME_RE.match(name):
        raise t.error("name", f"{name!r} must be lower case letters, digits, '.', '_' or '-'")
    description = t.string("description", required=False) or name
    kind = t.string("kind", KINDS)
    runtime = t.string("runtime", RUNTIMES)
    backend = t.string("backend", BACKENDS)
    requires_full_integer = t.boolean("requires_full_integer")
    per_channel = t.boolean("per_channel")
    schemes = t.string_list("schemes", SCHEMES)
    if requires_full_integer and "float32" in schemes:
        raise t.error("schemes", "lists float32 but requires_full_integer is true")
    if kind == "mcu" and runtime != "tflm":
        raise t.error("runtime", f"{runtime!r} does not run on kind 'mcu'", "microcontrollers use runtime = \"tflm\"")
    if kind == "linux" and runtime != "litert":
        raise t.error("runtime", f"{runtime!r} does not run on kind 'linux'", "Linux boards use runtime = \"litert\"")

    cpu = t.sub("cpu")
    cpu_model = cpu.string("model")
    cores = cpu.integer("cores", 1, 256)
    clock_mhz = cpu.number("clock_mhz", 1, 10_000)
    cpu.done()

    mem = t.sub("memory")
    ram = mem.size("ram")
    ram_available = mem.size("ram_available")
    flash = mem.size("flash")
    flash_available = mem.size("flash_available")
    runtime_flash = mem.size("runtime_flash")
    psram = mem.size("psram", required=False)
    if ram_available > ram:
        raise mem.error("ram_available", "is larger than ram")
    if flash_available > flash:
        raise mem.error("flash_available", "is larger than flash")
    if runtime_flash >= flash_available:
        raise mem.error("runtime_flash", "leaves no flash for the model (>= flash_available)")
    mem.done()

    comp = t.sub("compute")
    threads = comp.integer("threads", 1, 256)
    if threads > cores:
        raise comp.error("threads", f"{threads} is more than the {cores} cores of [cpu]")
    mpc_raw = comp.get("macs_per_cycle")
    if not isinstance(mpc_raw, dict) or not mpc_raw:
        raise comp.error("macs_per_cycle", "expected a table like { int8 = 0.5, float32 = 0.1 }")
    mpc: dict[str, float] = {}
    for k, v in mpc_raw.items():
        if k not in ("int8", "int16", "float32"):
            raise comp.error(f"macs_per_cycle.{k}", "unknown key", "use int8, int16 or float32")
        mpc[k] = comp.number(f"macs_per_cycle.{k}", 1e-6, 1e4, value=v)  # type: ignore[assignment]
    slowdown = comp.number("fallback_slowdown", 1.0, 1000.0)
    comp.done()
    power = _parse_power(t, kind) if "power" in t.data else None
    t.done()

    ops, ops_source = _load_ops(runtime)
    accelerated, kernels_source = _load_kernels(backend)
    return TargetProfile(
        name=name,
        source=source,
        kind=kind,
        runtime=runtime,
        backend=backend,
        requires_full_integer=requires_full_integer,
        per_channel=per_channel,
        description=description,
        schemes=schemes,
        cpu=cpu_model,
        cores=cores,
        clock_hz=int(clock_mhz * 1_000_000),
        ram_bytes=ram,
        ram_available_bytes=ram_available,
        flash_bytes=flash,
        flash_available_bytes=flash_available,
        runtime_flash_bytes=runtime_flash,
        psram_bytes=psram,
        threads=threads,
        macs_per_cycle=MappingProxyType(mpc),
        fallback_slowdown=float(slowdown),  # type: ignore[arg-type]
        ops=ops,
        accelerated=accelerated,
        ops_source=ops_source,
        kernels_source=kernels_source,
        power=power,
    )


def _parse_power(t: _Table, kind: str) -> PowerFigures:
    """``[power]``: idle_w/load_w on Linux boards, voltage_v/run_ma on microcontrollers."""
    p = t.sub("power")
    if kind == "linux":
        idle = p.number("idle_w", 0.01, 1000.0)
        load = p.number("load_w", 0.01, 1000.0)
        if load < idle:  # type: ignore[operator]
            raise p.error("load_w", f"{load:g} W is less than idle_w ({idle:g} W)")
        hint = "a Linux board gives idle_w and load_w (watts)"
        figures = PowerFigures(idle_w=idle, load_w=load)
    else:
        volts = p.number("voltage_v", 0.5, 12.0)
        run_ma = p.number("run_ma", 0.001, 5000.0)
        hint = "a microcontroller gives voltage_v and run_ma (run-mode current at the profile's clock)"
        figures = PowerFigures(voltage_v=volts, run_ma=run_ma)
    extra = sorted(set(p.data) - p.used)
    if extra:
        raise p.error(extra[0], f"unknown key for kind {kind!r}", hint)
    return figures


def _load_file(path: Path) -> TargetProfile:
    return parse_profile(_read_toml(path, str(path)), path.name if path.parent == _shipped_dir() else str(path),
                         str(path))


def shipped_names() -> list[str]:
    """Names of the profiles shipped with edgeq, sorted."""
    return sorted(p.stem for p in _shipped_dir().glob("*.toml") if not p.name.startswith("_"))


def load_target(name_or_path: str) -> TargetProfile:
    """Load a shipped profile by name (``rpi4``) or a profile file by path; raise ``TargetError``."""
    text = str(name_or_path)
    looks_like_path = text.endswith(".toml") or "/" in text or "\\" in text
    if looks_like_path or (Path(text).is_file() and not _NAME_RE.match(text)):
        return _load_file(Path(text))
    path = _shipped_dir() / f"{text}.toml"
    if text.startswith("_") or not _NAME_RE.match(text) or not path.is_file():
        names = shipped_names()
        near = difflib.get_close_matches(text[:64].lower(), names, n=1, cutoff=0.6)
        guess = f"did you mean {near[0]}? " if near else ""
        raise TargetError(f"unknown target {text!r}",
                          f"{guess}known targets: {', '.join(names)}; or give the path of a .toml profile")
    profile = _load_file(path)
    if profile.name != text:
        raise TargetError(f"{path.name}:name: {profile.name!r} does not match the file name {text!r}")
    return profile


def list_targets() -> list[TargetProfile]:
    """Every shipped profile, sorted by name."""
    return [load_target(n) for n in shipped_names()]
