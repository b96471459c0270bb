"""Reading a ``report.json`` someone else may have written: bounded, shape-checked, a one-line error if not.

``load_report`` bounds the file size, refuses NaN/Infinity and checks the type
of every field the renderers read, so a crafted file is a one-line
``InputError``, not a traceback. Reports carry ``"schema": "edgeq.deploy/1"``;
older reports without the field are read as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeq._device import protocol
from edgeq.errors import InputError
from edgeq.escape import one_line
from edgeq.report.values import num, term_text

MAX_REPORT_BYTES = 16 * 1024 * 1024  # a report of 100k latency samples is ~2 MiB
MAX_DEPTH = 32  # nesting of a report document (real ones are 4 deep)
SCHEMA_FAMILY = "edgeq.deploy/"  # report.json's "schema"; any version of it is read

_NUM, _INT, _STR, _BOOL = "number", "integer", "string", "boolean"

# The fields the renderers read, with their types; None is allowed everywhere,
# other keys may hold any JSON. ``[T]`` is a list of T.
_FIELDS: dict[str, Any] = {
    "schema": _STR, "outcome": _STR,
    "host": _STR, "name": _STR, "status": _STR, "error": _STR, "edgeq_version": _STR, "started_at": _STR,
    "duration_s": _NUM,
    "model": {"name": _STR, "sha256": _STR, "bytes": _INT, "precision": _STR},
    "latency_ms": {**{k: _NUM for k in ("min", "p50", "p90", "p99", "mean", "std", "max")}, "count": _INT,
                   "samples": [_NUM]},
    "load_ms": _NUM, "first_inference_ms": _NUM, "peak_rss_bytes": _NUM, "accuracy": _NUM, "mae": _NUM,
    "eval": {"samples": _INT, "rows": _INT,
             "outputs": [{"name": _STR, "kind": _STR, "samples": _INT, "labels": _STR, "accuracy": _NUM,
                          "host_accuracy": _NUM, "agreement": _NUM, "label_mae": _NUM, "max_abs_diff": _NUM,
                          "sqnr_db": _NUM}]},
    "settings": {"resized": [{"input": _STR, "shape": [_INT], "source": _STR}]},
    "agreement": {"top1": _NUM, "host_accuracy": _NUM, "max_abs_diff": _NUM, "max_abs_diff_steps": _NUM,
                  "samples": _INT, "reference_runtime": _STR, "reference_version": _STR, "error": _STR},
    "device": {**{k: _STR for k in ("arch", "cpu_model", "board", "os", "kernel", "python", "numpy",
                                    "cpu_governor", "vcgencmd_temp")},
               "cpu_cores": _INT, "mem_total_bytes": _NUM, "mem_available_bytes": _NUM,
               "thermal_zones": [{"celsius": _NUM, "type": _STR}], "throttling": {"raw": _STR},
               "disk": {"free_bytes": _NUM}, "emulation": {"emulated": _BOOL}},
    "runtime": {"name": _STR, "version": _STR, "threads": _INT, "xnnpack": _BOOL},
    "transfer": {"model_bytes_sent": _NUM, "method": _STR},
    "delegate": {"requested": _STR, "applied": _BOOL, "delegated_nodes": _INT, "nodes": _INT},
    "activation": {"active": _STR},
    "gate": {"passed": _BOOL, "reasons": [_STR], "accuracy": _NUM, "p99_ms": _NUM, "runs": _INT,
             "accuracy_min": _NUM, "p99_ms_max": _NUM},
    "warnings": [_STR],
}


def _type_ok(value: Any, kind: str) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _BOOL:
        return isinstance(value, bool)
    if num(value) is None:  # bools, strings, NaN, infinities, integers beyond float range
        return False
    return kind == _NUM or isinstance(value, int)


def _validate(value: Any, fields: Any, where: str, problems: list[str]) -> None:
    if value is None or len(problems) >= 5:
        return
    if isinstance(fields, dict):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object, got {type(value).__name__}")
            return
        for key, sub in fields.items():
            _validate(value.get(key), sub, f"{where}.{key}" if where else key, problems)
    elif isinstance(fields, list):
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _validate(item, fields[0], f"{where}[{i}]", problems)
            if len(problems) >= 5:
                return
    elif not _type_ok(value, fields):
        problems.append(f"{where}: expected {'a' if fields != _INT else 'an'} {fields}, got {_kind(value)}")


def _kind(value: Any) -> str:
    return {bool: "a boolean", str: "a string", dict: "an object", list: "a list", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


def check_report(doc: Any, where: str = "report.json") -> dict:
    """Check the shape of a report document; raise ``InputError`` naming the first bad fields."""
    if not isinstance(doc, dict):
        raise InputError(f"{where} is not an edgeq report (a JSON object), it holds {_kind(doc)}",
                         "pass a directory written by `edgeq deploy`")
    if protocol.depth(doc, MAX_DEPTH) > MAX_DEPTH:
        raise InputError(f"{where} is nested more than {MAX_DEPTH} levels deep; it is not an edgeq report")
    schema = doc.get("schema")
    if isinstance(schema, str) and not schema.startswith(SCHEMA_FAMILY):
        raise InputError(f"{where} is an {one_line(schema, 60)} document, not an edgeq deploy report "
                         f"({SCHEMA_FAMILY}N)", "pass a directory written by `edgeq deploy`")
    problems: list[str] = []
    _validate(doc, _FIELDS, "", problems)
    if problems:
        raise InputError(f"{where} is not a valid edgeq report: " + "; ".join(one_line(p, 200) for p in problems),
                         "regenerate it with `edgeq deploy`")
    return doc


def load_report(directory: str | Path) -> dict:
    """Read and validate ``report.json`` from a report directory (or the file itself)."""
    path = Path(directory)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise InputError(f"no report.json in {directory}", hint="pass a directory written by `edgeq deploy`")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_REPORT_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_REPORT_BYTES:
        raise InputError(f"{path} is larger than {MAX_REPORT_BYTES // (1024 * 1024)} MiB; it is not an edgeq report")
    try:
        doc = protocol.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; it is not an edgeq report") from None
    except RecursionError:
        raise InputError(f"{path} is nested too deeply; it is not an edgeq report") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity
        raise InputError(f"cannot read {path}: {one_line(exc, 200)}") from None
    check_report(doc, str(path))
    if doc.get("status") in ("failed", "timeout"):
        raise InputError(f"{path}: the deploy to {term_text(doc.get('name'), 80)} {doc['status']}: "
                         f"{term_text(doc.get('error'), 500)}")
    if "latency_ms" not in doc:
        raise InputError(f"{path} is not an edgeq deploy report (no latency_ms)")
    return doc
