"""Deploy reports: ``report.json``, ``report.md`` and a self-contained ``report.html`` (inline SVG).

``compare()`` puts several reports side by side (int8 vs float, Pi 4 vs Pi 5).
Everything here returns text or writes files; nothing prints.

A report holds strings and numbers from a device, and a ``report.json`` given
to ``edgeq report`` may come from anyone, so:

* every file is written with ``edgeq.safeio.atomic_write`` (exclusive temp
  file, then rename: a planted symlink is replaced, never written through);
* HTML is built only with ``edgeq.escape.tag``/``html`` (escaped unless it is
  markup built here), Markdown cells go through ``md``, and terminal lines
  through ``one_line`` (numbers formatted here are the only text that skips
  escaping, marked by the ``_Fmt`` type);
* ``load_report`` bounds the file size, refuses NaN/Infinity and checks the
  type of every field the renderers read, so a crafted file is a one-line
  ``InputError``, not a traceback.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from edgeq.errors import InputError
from edgeq import jsondoc
from edgeq.escape import Html, html_join, md, one_line, tag
from edgeq.safeio import atomic_write

ReportLike = Union[dict, "Any"]  # a report.json document or a DeployResult

MAX_REPORT_BYTES = 16 * 1024 * 1024  # a report of 100k latency samples is ~2 MiB
MAX_DEPTH = 32  # nesting of a report document (real ones are 4 deep)

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ReportPaths:
    """Where a report was written."""

    directory: Path
    json: Path
    markdown: Path
    html: Path


# -------------------------------------------------------- reading values safely


def _doc(result: ReportLike) -> dict:
    doc = result if isinstance(result, dict) else result.to_dict()
    return doc if isinstance(doc, dict) else {}


def _d(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _num(value: Any) -> Optional[float]:
    """A finite real number, or None (bools, strings, NaN and infinities are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range (JSON allows 400-digit integers)
        return None
    return number if math.isfinite(number) else None


def _text(value: Any, limit: int = 200) -> str:
    """Untrusted text for the terminal: one line, control characters escaped, bounded."""
    return "-" if value is None else one_line(value, limit)


def _safe(text: str, limit: int = 40) -> str:
    return (_SAFE.sub("_", text).strip("._-") or "x")[:limit]


# ------------------------------------------------------------------ validation

_NUM, _INT, _STR, _BOOL = "number", "integer", "string", "boolean"

# The fields the renderers read, with their types; None is allowed everywhere,
# other keys may hold any JSON. ``[T]`` is a list of T.
_SCHEMA: dict[str, Any] = {
    "host": _STR, "name": _STR, "status": _STR, "error": _STR, "edgeq_version": _STR, "started_at": _STR,
    "duration_s": _NUM,
    "model": {"name": _STR, "sha256": _STR, "bytes": _INT},
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
    "warnings": [_STR],
}


def _type_ok(value: Any, kind: str) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _BOOL:
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if _num(value) is None:  # NaN, infinities, integers beyond float range
        return False
    return kind == _NUM or isinstance(value, int)


def _validate(value: Any, schema: Any, where: str, problems: list[str]) -> None:
    if value is None or len(problems) >= 5:
        return
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object, got {type(value).__name__}")
            return
        for key, sub in schema.items():
            _validate(value.get(key), sub, f"{where}.{key}" if where else key, problems)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _validate(item, schema[0], f"{where}[{i}]", problems)
            if len(problems) >= 5:
                return
    elif not _type_ok(value, schema):
        problems.append(f"{where}: expected {'a' if schema != _INT else 'an'} {schema}, got {_kind(value)}")


def _kind(value: Any) -> str:
    return {bool: "a boolean", str: "a string", dict: "an object", list: "a list", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


def check_report(doc: Any, where: str = "report.json") -> dict:
    """Check the shape of a report document; raise ``InputError`` naming the first bad fields."""
    if not isinstance(doc, dict):
        raise InputError(f"{where} is not an edgeq report (a JSON object), it holds {_kind(doc)}",
                         "pass a directory written by `edgeq deploy`")
    if jsondoc.depth(doc, MAX_DEPTH) > MAX_DEPTH:
        raise InputError(f"{where} is nested more than {MAX_DEPTH} levels deep; it is not an edgeq report")
    problems: list[str] = []
    _validate(doc, _SCHEMA, "", problems)
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
        doc = jsondoc.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; it is not an edgeq report") from None
    except RecursionError:
        raise InputError(f"{path} is nested too deeply; it is not an edgeq report") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity
        raise InputError(f"cannot read {path}: {one_line(exc, 200)}") from None
    check_report(doc, str(path))
    if doc.get("status") in ("failed", "timeout"):
        raise InputError(f"{path}: the deploy to {_text(doc.get('name'), 80)} {doc['status']}: "
                         f"{_text(doc.get('error'), 500)}")
    if "latency_ms" not in doc:
        raise InputError(f"{path} is not an edgeq deploy report (no latency_ms)")
    return doc


# --------------------------------------------------------------------- writing


def _json_text(doc: Any) -> str:
    """JSON without NaN/Infinity (which JSON does not have): they are written as null."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(doc), indent=2, default=str, allow_nan=False) + "\n"


def _mkdir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the report directory {directory}: {exc.strerror or exc}",
                         hint="choose another directory with -o") from None


def default_report_dir(result: ReportLike, base: str | Path = "reports") -> Path:
    """``reports/<time>-<host>-<model>/`` with only safe characters in the name."""
    doc = _doc(result)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    host = _safe(str(doc.get("host", "device")).split("@")[-1])
    model = _safe(Path(str(_d(doc.get("model")).get("name", "model"))).stem)
    return Path(base) / f"{stamp}-{host}-{model}"


def write_report(result: ReportLike, out_dir: str | Path | None = None) -> ReportPaths:
    """Write report.json, report.md and report.html into ``out_dir`` (created if needed)."""
    doc = _doc(result)
    directory = Path(out_dir) if out_dir else default_report_dir(doc)
    _mkdir(directory)
    paths = ReportPaths(directory, directory / "report.json", directory / "report.md", directory / "report.html")
    atomic_write(paths.json, _json_text(doc))
    atomic_write(paths.markdown, render_markdown(doc))
    atomic_write(paths.html, render_html(doc))
    return paths


# ------------------------------------------------------------------ formatting


class _Fmt(str):
    """Text composed here from constants and checked numbers: the only text that skips escaping."""

    __slots__ = ()


def _ms(v: Any) -> _Fmt:
    v = _num(v)
    if v is None:
        return _Fmt("-")
    if v < 0.1:
        return _Fmt(f"{v * 1000:.1f} µs")
    if v < 10:
        return _Fmt(f"{v:.3f} ms")
    return _Fmt(f"{v:.1f} ms")


def _pct(v: Any) -> _Fmt:
    v = _num(v)
    return _Fmt("-" if v is None else f"{v * 100:.2f} %")


def _bytes(v: Any) -> _Fmt:
    v = _num(v)
    if v is None:
        return _Fmt("-")
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return _Fmt(f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}")
        v /= 1024
    return _Fmt(str(v))


def _g(v: Any, spec: str = ".4g") -> _Fmt:
    v = _num(v)
    return _Fmt("-" if v is None else format(v, spec))


def _int(v: Any) -> _Fmt:
    v = _num(v)
    return _Fmt("-" if v is None else str(int(v)))


def _temp(dev: dict) -> str:
    if dev.get("vcgencmd_temp"):
        return str(dev["vcgencmd_temp"]).replace("temp=", "")
    zones = [z for z in _list(dev.get("thermal_zones"))[:2] if isinstance(z, dict) and _num(z.get("celsius")) is not None]
    return ", ".join(f"{_num(z['celsius']):.1f} °C ({z.get('type') or z.get('zone')})" for z in zones) or "-"


def _throttle(dev: dict) -> str:
    t = _d(dev.get("throttling"))
    if not t:
        return "-"
    flags = [str(k) for k, v in t.items() if v is True]
    return f"{t.get('raw', '')} " + (", ".join(flags) if flags else "none")


def device_facts(doc: dict) -> list[tuple[str, str]]:
    """The device facts table rows (label, value); values are untrusted text."""
    dev = _d(doc.get("device"))
    rt = _d(doc.get("runtime"))
    emu = _d(dev.get("emulation"))
    return [
        ("Host", str(doc.get("host", "-"))),
        ("Board / CPU", " / ".join(str(v) for v in (dev.get("board"), dev.get("cpu_model")) if v) or "-"),
        ("Architecture", f"{dev.get('arch', '-')}" + (" (emulated)" if emu.get("emulated") is True else "")),
        ("Cores", str(dev.get("cpu_cores", "-"))),
        ("OS", f"{dev.get('os', '-')} (kernel {dev.get('kernel', '-')})"),
        ("Python / numpy", f"{dev.get('python', '-')} / {dev.get('numpy', '-')}"),
        ("Runtime", f"{rt.get('name', '-')} {rt.get('version', '')}"),
        ("Threads / XNNPACK", f"{rt.get('threads') or 'default'} / {'requested' if rt.get('xnnpack') else 'off'}"),
        ("Memory", f"{_bytes(dev.get('mem_available_bytes'))} free of {_bytes(dev.get('mem_total_bytes'))}"),
        ("CPU governor", str(dev.get("cpu_governor") or "-")),
        ("Temperature", _temp(dev)),
        ("Throttling", _throttle(dev)),
        ("Disk free", _bytes(_d(dev.get("disk")).get("free_bytes"))),
        ("Delegate applied", delegate_text(doc)),
        ("Transfer", transfer_text(doc)),
    ]


def delegate_text(doc: dict) -> str:
    """What the delegate really took on the device (not the requested setting)."""
    dg = _d(doc.get("delegate"))
    if not dg:
        return "not reported (older runner)"
    requested = _text(dg.get("requested") or "none", 32)
    applied = dg.get("applied")
    if applied is None:
        return f"{requested} requested; unknown (the runtime does not list its nodes)"
    taken, nodes = _int(dg.get("delegated_nodes")), _int(dg.get("nodes"))
    if applied is True:
        return f"{requested}: yes, {taken} of {nodes} nodes"
    return f"{requested} requested: no, 0 of {nodes} nodes (built-in kernels)" if dg.get("requested") else \
        f"none: {nodes} nodes on built-in kernels"


def transfer_text(doc: dict) -> str:
    """How the files travelled (sftp, exec channel, local copy) and how much."""
    tr = _d(doc.get("transfer"))
    method = tr.get("method")
    sent = _num(tr.get("model_bytes_sent")) or 0
    how = _text(method, 16) if isinstance(method, str) else "nothing sent"
    return f"{how}; model {_bytes(sent)} sent" + ("" if sent else " (already on the device)")


OUTPUT_HEADER = ["output", "kind", "samples", "labels", "accuracy (device)", "accuracy (host)",
                 "agreement device/host", "MAE vs labels", "max |diff| vs host", "SQNR dB"]


def _outputs(doc: dict) -> list[dict]:
    return [o for o in _list(_d(doc.get("eval")).get("outputs"))[:256] if isinstance(o, dict)]


def output_rows(doc: dict) -> list[list[Any]]:
    """One row per model output (``OUTPUT_HEADER``): its kind and figures; only when a model has several
    outputs or one that is not a classifier (a classifier alone is the accuracy line)."""
    outs = _outputs(doc)
    if not outs or (len(outs) == 1 and outs[0].get("kind") == "classifier"):
        return []
    return [[_text(o.get("name"), 80), _text(o.get("kind"), 20), _int(o.get("samples")), _text(o.get("labels"), 80),
             _pct(o.get("accuracy")), _pct(o.get("host_accuracy")), _pct(o.get("agreement")),
             _g(o.get("label_mae"), ".5g"), _g(o.get("max_abs_diff")), _g(o.get("sqnr_db"), ".3g")] for o in outs]


def resize_lines(doc: dict) -> list[str]:
    """"input 'img' resized to 1x32x32x3 from the eval data" for each dynamic input the device resized."""
    lines = []
    for r in _list(_d(doc.get("settings")).get("resized"))[:16]:
        if isinstance(r, dict):
            shape = "x".join(str(_int(d)) for d in _list(r.get("shape"))[:16])
            lines.append(f"input '{_text(r.get('input'), 80)}' resized to {shape} from {_text(r.get('source'), 40)}")
    return lines


def _accuracy_label(doc: dict) -> str:
    """What the top-level accuracy is: "top-1" of the class head, or "pixel" accuracy, naming the output when
    the model has several."""
    outs = _outputs(doc)
    main = next((o for o in outs if _num(o.get("accuracy")) is not None), None)
    if main is None:
        return "top-1"
    what = "pixel" if main.get("kind") == "segmentation" else "top-1"
    return what + (f" of output {_text(main.get('name'), 80)}" if len(outs) > 1 else "")


def summary_lines(result: ReportLike) -> list[str]:
    """A short, readable summary of one report for the terminal (untrusted text on one line each)."""
    doc = _doc(result)
    lat = _d(doc.get("latency_ms"))
    rt = _d(doc.get("runtime"))
    model = _d(doc.get("model"))
    dev = _d(doc.get("device"))
    lines = [
        f"{_text(model.get('name', 'model'), 120)} on {_text(doc.get('host'), 120)} ({_text(dev.get('arch', '?'), 40)}, "
        f"{_text(dev.get('cpu_model') or '?', 80)}): {_text(rt.get('name'), 40)} {_text(rt.get('version'), 40)}, "
        f"XNNPACK {'requested' if rt.get('xnnpack') else 'off'}, threads {_text(rt.get('threads') or 'default', 20)}",
        f"  latency  p50 {_ms(lat.get('p50'))}  p90 {_ms(lat.get('p90'))}  p99 {_ms(lat.get('p99'))}  "
        f"(min {_ms(lat.get('min'))}, mean {_ms(lat.get('mean'))} ± {_ms(lat.get('std'))}, "
        f"{_int(lat.get('count', 0))} runs)",
        f"  load {_ms(doc.get('load_ms'))}, first inference {_ms(doc.get('first_inference_ms'))}, "
        f"peak RSS {_bytes(doc.get('peak_rss_bytes'))}",
    ]
    if _d(dev.get("emulation")).get("emulated") is True:
        lines.append("  emulated device (qemu): accuracy carries over to real hardware, latency does not")
    ev = _d(doc.get("eval"))
    samples = _int(ev.get("samples")) if ev.get("samples") is not None else "?"
    if _num(ev.get("rows")) is not None and _num(ev.get("samples")) is not None and ev["rows"] < ev["samples"]:
        samples = f"the first {_int(ev['rows'])} of {samples}"
    lines += [f"  {line}" for line in resize_lines(doc)]
    if _num(doc.get("accuracy")) is not None:
        lines.append(f"  accuracy {_pct(doc['accuracy'])} {_accuracy_label(doc)} on {samples} samples (on the device)")
    elif _num(doc.get("mae")) is not None:
        lines.append(f"  MAE {_g(doc['mae'], '.5g')} on {samples} samples (on the device)")
    for row in output_rows(doc):
        figures = ", ".join(f"{h} {v}" for h, v in zip(OUTPUT_HEADER[4:], row[4:]) if str(v) != "-")
        lines.append(f"  output {row[0]} ({row[1]}): {figures or 'no figures'}")
    ag = _d(doc.get("agreement"))
    if ag:
        if ag.get("error"):
            lines.append(f"  agreement with host: not measured ({_text(ag['error'], 300)})")
        else:
            host_acc = f", host accuracy {_pct(ag.get('host_accuracy'))}" if _num(ag.get("host_accuracy")) is not None else ""
            top1 = f"top-1 {_pct(ag.get('top1'))}, " if _num(ag.get("top1")) is not None else ""
            lines.append(f"  agreement with host {_text(ag.get('reference_runtime'), 40)} "
                         f"{_text(ag.get('reference_version'), 40)}: {top1}max |diff| {_g(ag.get('max_abs_diff'))}"
                         f"{host_acc}")
    tr = _d(doc.get("transfer"))
    sent = _num(tr.get("model_bytes_sent")) or 0
    method = f" over {_text(tr['method'], 16)}" if sent and isinstance(tr.get("method"), str) else ""
    lines.append(f"  sent {_bytes(sent)} of model{method}" + (" (already on the device)" if not sent else ""))
    lines.append(f"  delegate applied: {delegate_text(doc)}")
    for w in _list(doc.get("warnings"))[:50]:
        lines.append(f"  warning: {_text(w, 300)}")
    return lines


# -------------------------------------------------------------------- markdown


def _md(value: Any) -> str:
    return str(value) if isinstance(value, _Fmt) else md(value)


def _md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(_md(c) for c in cells) + " |"


def render_markdown(result: ReportLike) -> str:
    """``report.md``: summary, latency table, accuracy, device facts (every value made inert)."""
    doc = _doc(result)
    lat = _d(doc.get("latency_ms"))
    model = _d(doc.get("model"))
    out = [f"# edgeq deploy report: {md(model.get('name'))} on {md(doc.get('host'))}", "",
           f"edgeq {md(doc.get('edgeq_version'))}, {md(doc.get('started_at'))}; model sha256 "
           f"{md(model.get('sha256'))} ({_int(model.get('bytes'))} bytes)", "",
           "## Latency", "", "| min | p50 | p90 | p99 | mean | std | runs | load | first inference | peak RSS |",
           "|---|---|---|---|---|---|---|---|---|---|",
           _md_row([_ms(lat.get("min")), _ms(lat.get("p50")), _ms(lat.get("p90")), _ms(lat.get("p99")),
                    _ms(lat.get("mean")), _ms(lat.get("std")), _int(lat.get("count")), _ms(doc.get("load_ms")),
                    _ms(doc.get("first_inference_ms")), _bytes(doc.get("peak_rss_bytes"))]), ""]
    ev = _d(doc.get("eval"))
    if ev:
        ag = _d(doc.get("agreement"))
        out += ["## Accuracy on the device", "", "| metric | value |", "|---|---|",
                _md_row([_Fmt("samples"), _int(ev.get("samples"))])]
        if _num(doc.get("accuracy")) is not None:
            out.append(_md_row([_Fmt("top-1 accuracy (device)"), _pct(doc.get("accuracy"))]))
        if _num(doc.get("mae")) is not None:
            out.append(_md_row([_Fmt("MAE (device)"), _g(doc.get("mae"), ".5g")]))
        if _num(ag.get("host_accuracy")) is not None:
            label = _Fmt(f"top-1 accuracy (host {md(ag.get('reference_runtime'))})")
            out.append(_md_row([label, _pct(ag.get("host_accuracy"))]))
        if _num(ag.get("top1")) is not None:
            out.append(_md_row([_Fmt("top-1 agreement device vs host"), _pct(ag.get("top1"))]))
        if _num(ag.get("max_abs_diff")) is not None:
            out.append(_md_row([_Fmt("max abs output difference"), _g(ag.get("max_abs_diff"))]))
        if ag.get("error"):
            out.append(_md_row([_Fmt("agreement"), _Fmt("not measured: " + md(ag["error"]))]))
        out.append("")
        rows = output_rows(doc)
        if rows:
            out += ["## Outputs", "", _md_row([_Fmt(h) for h in OUTPUT_HEADER]),
                    "|" + "---|" * len(OUTPUT_HEADER)] + [_md_row(r) for r in rows] + [""]
    if resize_lines(doc):
        out += ["## Input shape", ""] + [f"- {md(line)}" for line in resize_lines(doc)] + [""]
    out += ["## Device", "", "| fact | value |", "|---|---|"]
    out += [_md_row([_Fmt(k), v]) for k, v in device_facts(doc)]  # labels are ours, values the device's
    warnings = _list(doc.get("warnings"))
    if warnings:
        out += ["", "## Warnings", ""] + [f"- {md(w)}" for w in warnings[:50]]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------ HTML

_CSS = Html("""
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px;color:#333}
.sub{color:#667;font-size:13px;margin-bottom:16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #dde2ea;border-radius:8px;padding:10px 14px;min-width:120px;background:#f7f9fc}
.card b{display:block;font-size:20px;color:#1f5fbf} .card span{font-size:12px;color:#667}
table{border-collapse:collapse;font-size:13px} td,th{border-bottom:1px solid #e4e8ef;padding:4px 10px;text-align:left}
th{background:#f1f4f9} .charts{display:flex;flex-wrap:wrap;gap:18px} svg{background:#fbfcfe;border:1px solid #e4e8ef}
.warn{color:#a15c00}
""")

_SVG_NS = "http://www.w3.org/2000/svg"


def _svg(width: Any, height: Any, aria: str, *children: Any) -> Html:
    return tag("svg", *children, xmlns=_SVG_NS, width=width, height=height, role="img", aria_label=aria)


def _text_el(x: Any, y: Any, content: Any, size: int = 11, anchor: Optional[str] = None,
             weight: Optional[str] = None) -> Html:
    return tag("text", content, x=x, y=y, font_size=size, text_anchor=anchor, font_weight=weight)


def _f1(v: float) -> str:
    return f"{v:.1f}"


def _samples(lat: dict) -> list[float]:
    return [v for v in (_num(s) for s in _list(lat.get("samples"))) if v is not None]


def _svg_histogram(samples: Sequence[float], width: int = 520, height: int = 240) -> Html:
    if not samples:
        return tag("p", "no samples")
    s = sorted(samples)
    lo = s[0]
    hi = s[min(len(s) - 1, int(len(s) * 0.995))]
    if hi <= lo:
        hi = lo + max(abs(lo) * 0.01, 1e-6)
    nb = 30
    counts = [0] * nb
    for v in samples:
        i = int((v - lo) / (hi - lo) * nb) if math.isfinite((v - lo) / (hi - lo) * nb) else nb - 1
        counts[min(max(i, 0), nb - 1)] += 1
    top = max(counts) or 1
    pl, pb, pt = 50, 30, 20
    w, h = width - pl - 10, height - pb - pt
    bw = w / nb
    bars = [tag("rect", tag("title", f"{c} runs"), x=_f1(pl + i * bw), y=_f1(pt + h - c / top * h),
                width=_f1(bw - 1), height=_f1(c / top * h), fill="#3b7dd8") for i, c in enumerate(counts)]
    return _svg(width, height, "latency histogram",
                _text_el(pl, 14, "Latency distribution", 12, weight="600"), *bars,
                tag("line", x1=pl, y1=pt + h, x2=pl + w, y2=pt + h, stroke="#889"),
                _text_el(pl, height - 8, _ms(lo)), _text_el(pl + w, height - 8, _ms(hi), anchor="end"),
                _text_el(pl - 6, pt + 10, top, anchor="end"),
                _text_el(pl + w / 2, height - 8, "latency (runs above p99.5 in the last bin)", anchor="middle"))


def _svg_series(samples: Sequence[float], width: int = 520, height: int = 240) -> Html:
    if not samples:
        return tag("p", "no samples")
    n = len(samples)
    buckets = min(n, 400)
    pts = []
    for b in range(buckets):
        chunk = sorted(samples[b * n // buckets:(b + 1) * n // buckets] or [samples[-1]])
        pts.append(chunk[len(chunk) // 2])
    lo, hi = min(pts), max(pts)
    if hi <= lo:
        hi = lo + max(abs(lo) * 0.01, 1e-6)
    pl, pb, pt = 50, 30, 20
    w, h = width - pl - 10, height - pb - pt
    xy = " ".join(f"{pl + i / max(buckets - 1, 1) * w:.1f},{pt + h - (v - lo) / (hi - lo) * h:.1f}"
                  for i, v in enumerate(pts))
    return _svg(width, height, "latency over the run",
                _text_el(pl, 14, f"Latency over the run (median per bucket of {max(n // buckets, 1)} runs)", 12,
                         weight="600"),
                tag("polyline", fill="none", stroke="#d8613b", stroke_width="1.5", points=xy),
                tag("line", x1=pl, y1=pt + h, x2=pl + w, y2=pt + h, stroke="#889"),
                _text_el(pl - 4, pt + 10, _ms(hi), anchor="end"), _text_el(pl - 4, pt + h, _ms(lo), anchor="end"),
                _text_el(pl, height - 8, "run 1"), _text_el(pl + w, height - 8, f"run {n}", anchor="end"))


def _svg_bars(items: Sequence[tuple[str, Any]], title: str, width: int = 520) -> Html:
    rows = [(k, _num(v)) for k, v in items if _num(v) is not None]
    if not rows:
        return Html("")
    height = 30 + 28 * len(rows)
    pl = 250
    w = width - pl - 60
    body = []
    for i, (k, v) in enumerate(rows):
        body += [_text_el(pl - 8, 40 + i * 28, k, 12, anchor="end"),
                 tag("rect", x=pl, y=27 + i * 28, width=_f1(min(max(v, 0), 1) * w), height=18, fill="#2e9e6a"),
                 tag("rect", x=pl, y=27 + i * 28, width=w, height=18, fill="none", stroke="#ccd"),
                 _text_el(pl + w + 6, 40 + i * 28, _pct(v), 12)]
    return _svg(width, height, title, _text_el(10, 16, title, 12, weight="600"), *body)


def _table(rows: Sequence[Sequence[Any]], header: Optional[Sequence[Any]] = None) -> Html:
    head = [tag("tr", *[tag("th", h) for h in header])] if header else []
    body = [tag("tr", *[tag("td", c) for c in r]) for r in rows]
    return tag("table", *head, *body)


def _page(title: str, *body: Any) -> str:
    head = tag("head", Html('<meta charset="utf-8">'), tag("title", title), tag("style", _CSS))
    return "<!DOCTYPE html>" + tag("html", head, tag("body", *body), lang="en") + "\n"


def render_html(result: ReportLike) -> str:
    """A self-contained ``report.html``: cards, latency charts, accuracy/agreement, device facts."""
    doc = _doc(result)
    lat = _d(doc.get("latency_ms"))
    model = _d(doc.get("model"))
    samples = _samples(lat)
    ag = _d(doc.get("agreement"))
    cards = [("p50", _ms(lat.get("p50"))), ("p90", _ms(lat.get("p90"))), ("p99", _ms(lat.get("p99"))),
             ("load", _ms(doc.get("load_ms"))), ("first inference", _ms(doc.get("first_inference_ms"))),
             ("peak RSS", _bytes(doc.get("peak_rss_bytes")))]
    if _num(doc.get("accuracy")) is not None:
        cards.append(("top-1 accuracy", _pct(doc.get("accuracy"))))
    if _num(ag.get("top1")) is not None:
        cards.append(("agreement with host", _pct(ag.get("top1"))))
    card_els = [tag("div", tag("b", v), tag("span", k), class_="card") for k, v in cards]
    acc_chart = _svg_bars([("accuracy on the device", doc.get("accuracy")),
                           (f"accuracy on the host ({ag.get('reference_runtime') or '-'})", ag.get("host_accuracy")),
                           ("top-1 agreement device/host", ag.get("top1"))], "Accuracy and agreement")
    stats = _table([[_ms(lat.get(k)) for k in ("min", "p50", "p90", "p99", "mean", "std", "max")]
                    + [_int(lat.get("count", len(samples)))]],
                   ["min", "p50", "p90", "p99", "mean", "std", "max", "runs"])
    extra: Any = ""
    if _num(ag.get("max_abs_diff")) is not None:
        steps = _num(ag.get("max_abs_diff_steps"))
        extra = tag("p", f"Largest output difference device vs host: {_g(ag['max_abs_diff'])}"
                    + (f" ({_g(steps)} quantization steps)" if steps is not None else "")
                    + f" over {_int(ag.get('samples'))} samples.")
    elif ag.get("error"):
        extra = tag("p", "Agreement not measured: ", ag["error"], class_="warn")
    warns = [tag("p", "warning: ", w, class_="warn") for w in _list(doc.get("warnings"))[:50]]
    sub = html_join([f"edgeq {doc.get('edgeq_version')} · {doc.get('started_at')} · sha256 "
                     f"{str(model.get('sha256', ''))[:16]}… · {_int(model.get('bytes'))} bytes · model bytes sent "
                     f"{_int(_d(doc.get('transfer')).get('model_bytes_sent', 0))}"])
    body = [tag("h1", f"{model.get('name')} on {doc.get('host')}"), tag("div", sub, class_="sub"),
            tag("div", *card_els, class_="cards"), *warns,
            tag("h2", "Latency"), stats, tag("div", _svg_histogram(samples), _svg_series(samples), class_="charts")]
    if acc_chart or extra:
        body += [tag("h2", "Accuracy"), acc_chart, extra]
    if output_rows(doc):
        body += [tag("h2", "Outputs"), _table(output_rows(doc), OUTPUT_HEADER)]
    if resize_lines(doc):
        body += [tag("h2", "Input shape"), *[tag("p", line) for line in resize_lines(doc)]]
    body += [tag("h2", "Device"), _table(device_facts(doc))]
    return _page(f"edgeq report: {model.get('name')} on {doc.get('host')}", *body)


# ------------------------------------------------------------------ comparison


@dataclass(frozen=True)
class Comparison:
    """Several reports side by side: one column per report, one row per measure."""

    directories: tuple[str, ...]
    labels: tuple[str, ...]
    rows: tuple[tuple[str, tuple[str, ...]], ...]
    reports: tuple[dict, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"directories": list(self.directories), "labels": list(self.labels),
                "rows": [{"measure": k, "values": list(v)} for k, v in self.rows]}

    def table(self) -> str:
        """A plain-text table for the terminal (cells on one line, control characters escaped)."""
        head = ("", *self.labels)
        data = [tuple(one_line(c, 80) for c in r) for r in [head] + [(k, *v) for k, v in self.rows]]
        widths = [max(len(r[i]) for r in data) for i in range(len(head))]
        lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in data]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def html(self) -> str:
        """A self-contained HTML page comparing the reports."""
        if len(self.reports) == 1:
            return render_html(self.reports[0])
        pct = [(lab, _d(r.get("latency_ms"))) for lab, r in zip(self.labels, self.reports)]
        svg = _percentile_bars(pct, label_width=200, label_chars=30, aria="latency comparison",
                               title="Latency percentiles")
        table = _table([[k, *v] for k, v in self.rows], ["", *self.labels])
        return _page("edgeq comparison", tag("h1", f"edgeq: {len(self.reports)} reports side by side"), table,
                     tag("h2", "Latency"), svg)


def _percentile_bars(items: Sequence[tuple[str, dict]], label_width: int, label_chars: int, aria: str,
                     title: str | None = None) -> Html:
    """An inline SVG with p50/p90/p99 bars per labelled latency summary, on one shared scale."""
    top = max((max(_num(lat.get(k)) or 0.0 for k in ("p50", "p90", "p99")) for _, lat in items), default=0.0) or 1.0
    width, pl = 640, label_width
    w = width - pl - 90
    parts: list[Html] = []
    if title:
        parts.append(_text_el(10, 16, title, 12, weight="600"))
    y = 30
    for label, lat in items:
        for k, color in (("p50", "#3b7dd8"), ("p90", "#7aa6e6"), ("p99", "#b8cff2")):
            v = max(_num(lat.get(k)) or 0.0, 0.0)
            parts += [_text_el(pl - 8, y + 12, f"{str(label)[:label_chars]} {k}", anchor="end"),
                      tag("rect", x=pl, y=y, width=_f1(v / top * w), height=14, fill=color),
                      _text_el(_f1(pl + v / top * w + 4), y + 12, _ms(v))]
            y += 18
        y += 8
    return _svg(width, y + 10, aria, *parts)


def compare(report_dirs: Sequence[str | Path]) -> Comparison:
    """Load one or more report directories and line them up."""
    if not report_dirs:
        raise InputError("no report directories given")
    docs = tuple(load_report(d) for d in report_dirs)
    labels: list[str] = []
    for d, doc in zip(report_dirs, docs):
        name = one_line(f"{_d(doc.get('model')).get('name', '?')} @ {str(doc.get('host', '?')).split('@')[-1]}", 60)
        labels.append(name if name not in labels else f"{name} ({one_line(Path(d).name, 40)})")

    def col(fn) -> tuple[str, ...]:
        out = []
        for doc in docs:
            try:
                out.append(one_line(fn(doc), 80))
            except (KeyError, TypeError, ValueError, AttributeError):
                out.append("-")
        return tuple(out)

    rows = [
        ("model sha256", col(lambda d: d["model"]["sha256"][:12])),
        ("model size", col(lambda d: _bytes(d["model"]["bytes"]))),
        ("device", col(lambda d: f"{d['device'].get('arch', '-')} {d['device'].get('cpu_model') or ''}".strip())),
        ("runtime", col(lambda d: f"{d['runtime']['name']} {d['runtime']['version']}")),
        ("threads / XNNPACK", col(lambda d: f"{d['runtime'].get('threads') or 'default'} / "
                                            f"{'on' if d['runtime'].get('xnnpack') else 'off'}")),
        *[(f"latency {k}", col(lambda d, k=k: _ms(d["latency_ms"][k]))) for k in ("p50", "p90", "p99", "mean")],
        ("runs", col(lambda d: _int(d["latency_ms"].get("count", len(_list(d["latency_ms"].get("samples"))))))),
        ("load", col(lambda d: _ms(d["load_ms"]))),
        ("first inference", col(lambda d: _ms(d["first_inference_ms"]))),
        ("peak RSS", col(lambda d: _bytes(d["peak_rss_bytes"]))),
        ("accuracy", col(lambda d: _pct(d.get("accuracy")))),
        ("agreement top-1", col(lambda d: _pct(_d(d.get("agreement")).get("top1")))),
        ("temperature", col(lambda d: _temp(d["device"]))),
        ("governor", col(lambda d: str(d["device"].get("cpu_governor") or "-"))),
    ]
    return Comparison(tuple(str(d) for d in report_dirs), tuple(labels), tuple(rows), docs)


def write_comparison(comparison: Comparison, path: str | Path) -> Path:
    """Write ``comparison.html()`` to ``path`` atomically (parent directories created)."""
    target = Path(path)
    if str(target.parent):
        _mkdir(target.parent)
    return atomic_write(target, comparison.html())


# ----------------------------------------------------------------------- fleets


@dataclass(frozen=True)
class FleetReportPaths:
    """Where a fleet report was written: one directory per host plus the summary."""

    directory: Path
    summary_json: Path
    summary_html: Path
    hosts: tuple[Path, ...]


def write_fleet_report(result: Any, out_dir: str | Path) -> FleetReportPaths:
    """Write ``<host>/report.json`` (+ md/html) per host and ``summary.json`` + ``summary.html``.

    ``result`` is an ``edgeq.fleet_deploy.FleetResult``; a failed host's
    ``report.json`` holds its status and reason instead of measurements.
    """
    directory = Path(out_dir)
    summary = result.to_dict()
    host_dirs = []
    _mkdir(directory)
    for host in result.hosts:
        d = directory / host.name  # names were validated by plan_fleet
        host_dirs.append(d)
        if host.ok and hasattr(host.result, "latency_ms"):
            doc = host.result.to_dict()
            doc["name"] = host.name
            doc["status"] = "ok"
            write_report(doc, d)
        else:
            _mkdir(d)
            doc = {"edgeq_version": summary["edgeq_version"], **host.summary(), "model": summary.get("model")}
            atomic_write(d / "report.json", _json_text(doc))
    paths = FleetReportPaths(directory, directory / "summary.json", directory / "summary.html", tuple(host_dirs))
    atomic_write(paths.summary_json, _json_text(summary))
    atomic_write(paths.summary_html, render_fleet_html(summary))
    return paths


def fleet_rows(summary: dict) -> list[list[str]]:
    """One row per host: name, status, p50, p90, p99, accuracy, runtime, device, active model, reason.

    Cells are on one line with control characters escaped (safe for a terminal; HTML escapes them again)."""
    rows = []
    for h in _list(_d(summary).get("hosts")):
        h = _d(h)
        lat = _d(h.get("latency_ms"))
        rt = _d(h.get("runtime"))
        dev = _d(h.get("device"))
        act = _d(h.get("activation"))
        active = act.get("active") or h.get("active")
        rows.append([
            _text(h.get("name"), 60), _text(h.get("status"), 20),
            _ms(lat.get("p50")) if lat else "-", _ms(lat.get("p90")) if lat else "-",
            _ms(lat.get("p99")) if lat else "-", _pct(h.get("accuracy")),
            _text(f"{rt.get('name')} {rt.get('version')}", 60) if rt else "-",
            _text(f"{dev.get('arch') or '-'} py{dev.get('python') or '?'}", 60) if dev else "-",
            _text(str(active)[:12], 12) if active else "-",
            one_line(h.get("error") or "", 160),
        ])
    return rows


FLEET_HEADER = ["host", "status", "p50", "p90", "p99", "accuracy", "runtime", "device", "active", "reason"]


def render_fleet_html(summary: dict) -> str:
    """A self-contained page comparing the hosts of a fleet deploy."""
    counts = _d(summary.get("counts"))
    model = _d(summary.get("model"))
    table = _table(fleet_rows(summary), FLEET_HEADER)
    ok = [(_text(h.get("name"), 60), _d(h.get("latency_ms"))) for h in map(_d, _list(summary.get("hosts")))
          if h.get("latency_ms")]
    parts: list[Any] = []
    if ok:
        parts = [tag("h2", "Latency by host"),
                 _percentile_bars(ok, label_width=160, label_chars=24, aria="latency by host")]
    seconds = _num(summary.get("seconds")) or 0.0
    # Staged rollouts (edgeq.rollout, edgeq.ansible_report) add these statuses.
    extra = "".join(f", {_int(counts.get(k))} {label}" for k, label in
                    (("reverted", "reverted"), ("gate_failed", "failed their gate"),
                     ("revert_failed", "could NOT revert"), ("not_started", "not started")) if counts.get(k))
    head = [tag("h1", f"edgeq fleet {summary.get('action', 'deploy')}: {_int(counts.get('ok', 0))} of "
                      f"{_int(counts.get('hosts', 0))} hosts ok"),
            tag("p", f"model {model.get('name', '-')} sha256 {str(model.get('sha256', '-'))[:16]}, "
                     f"{_bytes(model.get('bytes'))}; {_int(counts.get('failed', 0))} failed, "
                     f"{_int(counts.get('timeout', 0))} timed out{extra}; {seconds:.1f} s with "
                     f"{_int(summary.get('forks'))} forks; started {summary.get('started_at', '')}")]
    rollout = _d(summary.get("rollout"))
    if rollout:
        gate = _d(rollout.get("gate"))
        limits = [f"accuracy >= {gate['accuracy_min']}" for _ in [0] if gate.get("accuracy_min") is not None]
        limits += [f"p99 <= {gate['p99_ms_max']} ms" for _ in [0] if gate.get("p99_ms_max") is not None]
        rows = [[_int(b.get("index")), _text(b.get("kind"), 20), _text(", ".join(map(str, _list(b.get("hosts")))), 400),
                 _text(", ".join(f"{k} {v}" for k, v in _d(b.get("counts")).items() if v), 200)]
                for b in map(_d, _list(rollout.get("batches")))]
        gates = [[_text(h.get("name"), 60), "passed" if _d(h.get("gate")).get("passed") else "FAILED",
                  _text("; ".join(map(str, _list(_d(h.get("gate")).get("reasons")))), 300)]
                 for h in map(_d, _list(summary.get("hosts"))) if h.get("gate")]
        parts = [tag("h2", "Rollout"),
                 tag("p", f"canary {rollout.get('canary')}, batch {rollout.get('batch') or 'all'}, max fail "
                          f"{rollout.get('max_fail_pct')} %; health gate from REMOTE_DIR/current: smoke run"
                          + "".join(f", {x}" for x in limits)
                          + (f". {rollout.get('stop_reason')}" if rollout.get("stop_reason") else "")),
                 _table(rows, ["batch", "kind", "hosts", "outcome"]),
                 *([tag("h2", "Health gate"), _table(gates, ["host", "gate", "reasons"])] if gates else []),
                 *parts]
    return _page("edgeq fleet summary", *head, table, *parts)


__all__ = ["ReportPaths", "Comparison", "write_report", "load_report", "check_report", "compare", "write_comparison",
           "render_html", "render_markdown", "summary_lines", "device_facts", "default_report_dir",
           "FleetReportPaths", "write_fleet_report", "render_fleet_html", "fleet_rows", "FLEET_HEADER",
           "MAX_REPORT_BYTES"]
