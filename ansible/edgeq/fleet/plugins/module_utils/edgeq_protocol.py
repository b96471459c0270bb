"""The device protocol: what edgeq (the host), the runner (the device) and the Ansible collection share.

Standard library only, Python 3.8+. Nothing here touches a device, a file or a
model; it is the vocabulary the three sides speak:

- untrusted numbers: ``finite_number``, ``bounded_seconds``, ``is_sha``, and
  ``loads`` (JSON with finite numbers and bounded integers) / ``depth``;
- the runner's arguments: ``parser()`` / ``parse_args`` (the one definition of
  every mode's arguments, used by the runner and to check what the host builds),
  ``run_args`` (the argument list of a ``run``) and ``parse_shape``;
- the latency statistics (``latency``: numpy's percentiles, computed without numpy);
- the health-gate verdict (``gate_problems`` for the thresholds, ``gate_verdict``
  for a run against them);
- the report document (``report_document``: the dict that becomes report.json).

The collection embeds this file byte for byte (``module_utils/edgeq_protocol.py``);
on the device the host sends it on stdin ahead of the runner (``standalone``).
"""

import argparse
import importlib
import json
import math
import sys

SCHEMA_REPORT = "edgeq.deploy/1"
MAX_INT_DIGITS = 20  # 2**64 has 20 digits: any byte count, id or time in nanoseconds fits
RUNTIMES = ("ai_edge_litert", "tflite_runtime", "tensorflow")
# The timed run's defaults (benchmark_model's): at least `runs` and `min_seconds`, at most `max_runs`.
RUN_DEFAULTS = {"runs": 50, "warmup": 1, "min_seconds": 1.0, "min_warmup_seconds": 0.5, "max_runs": 10000}
MAX_SHAPE_DIM = 1 << 20


class RunnerError(Exception):
    """A failure the runner reports as its one document: ``{"ok": false, "error": ..., "kind": kind}``."""

    def __init__(self, message, kind="error"):
        Exception.__init__(self, message)
        self.kind = kind


# ------------------------------------------------------------ untrusted numbers

def finite_number(value):
    """A finite float from an untrusted JSON value, else None: for a string, a boolean, NaN/Infinity, or an
    integer too large for a float (``float`` raises OverflowError on those)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def bounded_seconds(value):
    """A time in seconds from an untrusted JSON value, else None (a huge number or a string is not a time)."""
    value = finite_number(value)
    return value if value is not None and -1e12 < value < 1e12 else None


def bounded_int(value, lo=0, hi=(1 << 63) - 1):
    """An int in [lo, hi] from an untrusted JSON value, else None (a boolean or a float is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        return None
    return value


def is_sha(text):
    """True for a sha256 as edgeq writes it: 64 lowercase hex digits."""
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def sha_or_none(value):
    return value if is_sha(value) else None


def _no_constants(name):
    raise ValueError("%s is not a number JSON allows" % name)


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("%s is out of range for a number" % text[:40])
    return value


def bounded_json_int(text):
    """``int(text)`` for ``json.loads(parse_int=...)``; ``ValueError`` past ``MAX_INT_DIGITS`` digits."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError("an integer of %d digits (%s...) is out of range" % (len(text.lstrip("-")), text[:20]))
    return int(text)


def loads(text):
    """``json.loads`` for JSON from elsewhere (a device's answer, a report someone else wrote): ``ValueError`` for
    invalid JSON, NaN/Infinity, a number that overflows to infinity (``1e999``) or an integer of more than
    ``MAX_INT_DIGITS`` digits, so every number it returns converts to a finite float. It may still raise
    ``RecursionError`` on absurd nesting (callers report "nested too deeply"); ``depth`` measures nesting."""
    return json.loads(text, parse_constant=_no_constants, parse_float=_finite_float, parse_int=bounded_json_int)


def depth(doc, limit):
    """How deeply ``doc`` nests (1 for a scalar), without recursion; stops counting once past ``limit``."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        value, d = stack.pop()
        deepest = max(deepest, d)
        if d > limit:
            return d
        if isinstance(value, dict):
            stack.extend((v, d + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, d + 1) for v in value)
    return deepest


# ------------------------------------------------------------ runner arguments

def parse_shape(text):
    """``"1x32x32x3"`` or ``"NAME=1x32x32x3"`` -> ``(name or "", [1, 32, 32, 3])``; ``ValueError`` otherwise."""
    label, _, dims = text.rpartition("=")
    try:
        shape = [int(s) for s in dims.lower().split("x")]
    except ValueError:
        shape = []
    if not shape or any(s < 1 or s > MAX_SHAPE_DIM for s in shape) or any(ord(c) < 32 for c in text):
        raise ValueError("--input-shape %r is not a shape like 1x32x32x3" % text)
    return label, shape


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting: a bad argument is one JSON document too."""

    def error(self, message):
        raise RunnerError("bad arguments: %s" % message, "usage")

    def exit(self, status=0, message=None):
        raise RunnerError("bad arguments: %s" % (message or "exit"), "usage")


def parser():
    """Every runner mode and its arguments (the runner parses with it; the host checks what it sends)."""
    p = _Parser(prog="runner.py", description="edgeq on-device runner", add_help=False)
    sub = p.add_subparsers(dest="mode", parser_class=_Parser)
    pr = sub.add_parser("probe", add_help=False)
    pr.add_argument("--dir")
    pr.add_argument("--have", nargs=2, action="append", metavar=("REL", "SHA256"))
    pr.add_argument("--prepare", action="store_true")
    ins = sub.add_parser("install", add_help=False)
    ins.add_argument("--item", nargs=3, action="append", metavar=("TMP", "FINAL", "SHA256"))
    lk = sub.add_parser("lock", add_help=False)
    lk.add_argument("--dir", required=True)
    lk.add_argument("--token", required=True)
    lk.add_argument("--owner")
    lk.add_argument("--stale-after", type=float)
    lk.add_argument("--break-token")
    lk.add_argument("--ttl", type=float)
    lk.add_argument("--race-hook", help=argparse.SUPPRESS)
    for mode in ("refresh", "unlock", "rollback"):
        m = sub.add_parser(mode, add_help=False)
        m.add_argument("--dir", required=True)
        m.add_argument("--token", required=True)
    st = sub.add_parser("state", add_help=False)
    st.add_argument("--dir", required=True)
    ac = sub.add_parser("activate", add_help=False)
    ac.add_argument("--dir", required=True)
    ac.add_argument("--sha", required=True)
    ac.add_argument("--token", required=True)
    ac.add_argument("--keep", type=int)
    r = sub.add_parser("run", add_help=False)
    r.add_argument("--model", required=True)
    r.add_argument("--eval")
    r.add_argument("--runs", type=int, default=RUN_DEFAULTS["runs"])
    r.add_argument("--warmup", type=int, default=RUN_DEFAULTS["warmup"])
    r.add_argument("--min-seconds", type=float, default=RUN_DEFAULTS["min_seconds"])
    r.add_argument("--min-warmup-seconds", type=float, default=RUN_DEFAULTS["min_warmup_seconds"])
    r.add_argument("--max-seconds", type=float, default=150.0)
    r.add_argument("--max-runs", type=int, default=RUN_DEFAULTS["max_runs"])
    r.add_argument("--threads", type=int)
    r.add_argument("--no-xnnpack", action="store_true")
    r.add_argument("--runtime", choices=RUNTIMES)
    r.add_argument("--eval-only", action="store_true")
    r.add_argument("--max-outputs", type=int, default=100000)
    r.add_argument("--max-eval-seconds", type=float)
    r.add_argument("--input-shape", action="append", help="NAME=1x32x32x3 (or 1x32x32x3): a dynamic input's shape")
    r.add_argument("--deadline", type=float, help="seconds after which the runner kills itself")
    r.add_argument("--dir")
    r.add_argument("--token")
    ly = sub.add_parser("layers", add_help=False)
    ly.add_argument("--model", required=True)
    ly.add_argument("--eval", required=True)
    ly.add_argument("--count", type=int, default=1)
    ly.add_argument("--runtime", choices=RUNTIMES)
    ly.add_argument("--max-bytes", type=int, default=512 * 1024)
    ly.add_argument("--tensors")
    ly.add_argument("--deadline", type=float)
    return p


def parse_args(argv):
    """The runner's arguments (``[MODE, ...]``) as a namespace; ``RunnerError`` (kind "usage") if they are not."""
    return parser().parse_args(list(argv))


def run_args(model, timed=True, runs=None, warmup=None, min_seconds=None, min_warmup_seconds=None, max_runs=None,
             eval_path=None, max_eval_seconds=None, input_shapes=(), threads=None, xnnpack=True, max_outputs=None,
             runtime=None, lock_dir=None, token=None):
    """The arguments of one ``run`` (after the mode): the measuring run (``timed``) or a load + first inference
    (+ evaluation) only. ``lock_dir``/``token``: the run refreshes that device lock's heartbeat."""
    argv = ["--model", model]
    if timed:
        given = {"runs": runs, "warmup": warmup, "min_seconds": min_seconds,
                 "min_warmup_seconds": min_warmup_seconds, "max_runs": max_runs}
        for key in ("runs", "warmup", "min_seconds", "min_warmup_seconds", "max_runs"):
            value = RUN_DEFAULTS[key] if given[key] is None else given[key]
            text = repr(float(value)) if isinstance(RUN_DEFAULTS[key], float) else str(int(value))
            argv += ["--" + key.replace("_", "-"), text]
    else:
        argv.append("--eval-only")
    if max_outputs is not None:
        argv += ["--max-outputs", str(int(max_outputs))]
    if eval_path:
        argv += ["--eval", eval_path]
        if max_eval_seconds is not None:
            argv += ["--max-eval-seconds", repr(float(max_eval_seconds))]
    else:
        for text in input_shapes:
            argv += ["--input-shape", text]
    if threads:
        argv += ["--threads", str(int(threads))]
    if not xnnpack:
        argv.append("--no-xnnpack")
    if runtime:
        argv += ["--runtime", runtime]
    if lock_dir is not None and token is not None:
        argv += ["--dir", lock_dir, "--token", token]
    parse_args(["run"] + argv)  # one definition of what a run accepts
    return argv


# ------------------------------------------------------------ latency statistics

def _lerp(a, b, t):
    # numpy's interpolation (numpy.lib.function_base._lerp): exact at both ends.
    return b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t


def percentile(ordered, q):
    """The ``q``-th percentile of sorted values, linear interpolation (``numpy.percentile``'s default)."""
    n = len(ordered)
    if not n:
        return 0.0
    pos = q / 100.0 * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    return float(_lerp(ordered[lo], ordered[hi], pos - lo))


def latency(samples, max_samples=None):
    """Statistics of per-run latencies in ms: min, p50, p90, p99, mean, std (population), max, count and the
    samples (evenly thinned to ``max_samples`` if given; the statistics use every run). Samples that are not
    finite numbers make the whole set count as none (count 0)."""
    vals = [finite_number(s) for s in samples] if isinstance(samples, (list, tuple)) else []
    if not vals or any(v is None for v in vals):
        return {"min": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0, "std": 0.0, "max": 0.0, "count": 0,
                "samples": []}
    ordered = sorted(vals)
    n = len(vals)
    mean = math.fsum(vals) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / n)
    kept = vals
    if max_samples is not None and n > max_samples:
        step = n / float(max_samples)
        kept = [vals[int(i * step)] for i in range(max_samples)]
    return {"min": ordered[0], "p50": percentile(ordered, 50), "p90": percentile(ordered, 90),
            "p99": percentile(ordered, 99), "mean": mean, "std": std, "max": ordered[-1], "count": n,
            "samples": list(kept)}


# ------------------------------------------------------------ health gate

def gate_problems(accuracy_min, p99_ms_max, has_eval, names=("--gate-accuracy", "--gate-p99-ms", "--eval DATA.npz")):
    """What is wrong with gate thresholds (empty: nothing); ``names`` are how the caller's user spells them."""
    problems = []
    if accuracy_min is not None:
        a = finite_number(accuracy_min)
        if a is None or not 0.0 <= a <= 1.0:
            problems.append("%s must be a fraction from 0 to 1 (as in report.json), got %s" % (names[0], accuracy_min))
        elif not has_eval:
            problems.append("%s needs %s (the accuracy is measured on the device)" % (names[0], names[2]))
    if p99_ms_max is not None:
        p = finite_number(p99_ms_max)
        if p is None or not p > 0:
            problems.append("%s must be a positive number of milliseconds, got %s" % (names[1], p99_ms_max))
    return problems


def gate_verdict(run_doc, accuracy_min=None, p99_ms_max=None, what="smoke run from current"):
    """Judge one runner ``run`` document against the gate: the model must have loaded and inferred (``ok``),
    reach ``accuracy_min`` (the runner's accuracy on the eval data, 0..1) and keep p99 of the timed runs at or
    under ``p99_ms_max``. Returns {passed, reasons, accuracy, p99_ms, runs, accuracy_min, p99_ms_max}."""
    verdict = {"passed": False, "reasons": [], "accuracy": None, "p99_ms": None, "runs": 0,
               "accuracy_min": accuracy_min, "p99_ms_max": p99_ms_max}
    if not isinstance(run_doc, dict) or not run_doc.get("ok"):
        error = run_doc.get("error") if isinstance(run_doc, dict) else None
        verdict["reasons"] = ["%s failed: %s" % (what, str(error)[:300])]
        return verdict
    ev = run_doc.get("eval") if isinstance(run_doc.get("eval"), dict) else {}
    accuracy = finite_number(ev.get("accuracy"))
    stats = latency(run_doc.get("samples_ms"))
    p99 = stats["p99"] if stats["count"] else None
    reasons = []
    if accuracy_min is not None:
        if accuracy is None:
            reasons.append("no accuracy measured on the device (labels missing or not a classifier)")
        elif accuracy < accuracy_min:
            reasons.append("accuracy %.4f < %g" % (accuracy, accuracy_min))
    if p99_ms_max is not None:
        if p99 is None:
            reasons.append("no latency samples from the gate run")
        elif p99 > p99_ms_max:
            reasons.append("p99 %.3f ms > %g ms" % (p99, p99_ms_max))
    verdict.update(passed=not reasons, reasons=reasons, accuracy=accuracy, p99_ms=p99, runs=stats["count"])
    return verdict


# ------------------------------------------------------------ report document

REPORT_FIELDS = ("edgeq_version", "host", "started_at", "duration_s", "model", "device", "runtime", "settings",
                 "latency_ms", "load_ms", "first_inference_ms", "peak_rss_bytes", "accuracy", "mae", "eval",
                 "agreement", "transfer", "activation", "layer_diff", "delegate", "gate", "outcome", "warnings")
DEVICE_FACTS_SKIPPED = ("ok", "mode", "have", "runner_version", "activation")


def device_facts(probe_doc):
    """The probe's device facts as a report keeps them (without the probe's own bookkeeping)."""
    return dict((k, v) for k, v in probe_doc.items() if k not in DEVICE_FACTS_SKIPPED)


def activation_record(remote_dir, active, previous, activated=False, switched=False):
    """The report's ``activation``: whether this deploy made its model ``REMOTE_DIR/current`` (``switched``: it
    was not already), what is active and previous now, and the path applications load."""
    return {"activated": bool(activated), "switched": bool(switched), "active": active, "previous": previous,
            "path": "%s/current/model.tflite" % remote_dir}


def report_document(**fields):
    """The deploy report (report.json), ``"schema": "edgeq.deploy/1"``: every field of ``REPORT_FIELDS``
    (missing ones null). Units: ``*_ms`` milliseconds, ``*_s``/``seconds`` seconds, ``*bytes*`` integer bytes,
    ``accuracy`` a fraction 0..1; numbers are numbers."""
    unknown = sorted(set(fields) - set(REPORT_FIELDS))
    if unknown:
        raise TypeError("report_document() got unknown fields: %s" % ", ".join(unknown))
    doc = {"schema": SCHEMA_REPORT}
    for key in REPORT_FIELDS:
        doc[key] = fields.get(key)
    doc["duration_s"] = round(float(doc["duration_s"] or 0.0), 3)
    rss = doc["peak_rss_bytes"]
    doc["peak_rss_bytes"] = rss if bounded_int(rss) is not None else None
    doc["warnings"] = list(doc["warnings"] or [])
    doc["outcome"] = doc["outcome"] or ("gate_failed" if isinstance(doc["gate"], dict)
                                        and not doc["gate"].get("passed") else "ok")
    return doc


# ------------------------------------------------------------ one program for the device

# The runner's device modules (deploy/<name>.py), each after those it imports: ``standalone`` installs them in
# this order as ``edgeq_<name>``, the collection embeds them as ``module_utils/edgeq_<name>.py``.
DEVICE_MODULES = ("facts", "tensorio", "device_state", "activation", "measure")


def device_module(name):
    """The device module ``name``: ``edgeq_<name>`` as ``standalone`` or the collection installed it, else
    ``edgeq._device.<name>`` (imported as part of edgeq), else ``<name>`` beside this file (deploy/, tests)."""
    for full in ("edgeq_" + name, "edgeq._device." + name, name):
        if full in sys.modules:
            return sys.modules[full]
        try:
            return importlib.import_module(full)
        except ImportError:
            continue
    raise ImportError("no device module %s" % name)


def module_source(module=None):
    """A module's source text (this module's by default; also from a zip, as Ansible ships module_utils)."""
    namespace = vars(module) if module is not None else globals()
    loader = namespace.get("__loader__")
    if loader is not None and hasattr(loader, "get_source"):
        try:
            src = loader.get_source(namespace["__name__"])
            if src:
                return src
        except Exception:
            pass
    with open(namespace["__file__"], "r") as f:
        return f.read()


def standalone(runner_source, modules):
    """One program for ``python -`` (bytes): ``sys.path`` cleaned, this module installed as ``edgeq_protocol``
    and each device module (``modules``: ``(name, source text)`` pairs in ``DEVICE_MODULES`` order) as
    ``edgeq_<name>``, then the runner, which imports them by those names.

    ``python -`` puts the working directory first on sys.path, and a json.py or numpy.py there would run
    instead of the real one: it goes before anything is imported. Not ``-I`` on the command line: that would
    also drop user site-packages and PYTHONPATH, where a device's TFLite runtime is often installed.
    """
    names = tuple(name for name, _ in modules)
    if names != DEVICE_MODULES:
        raise ValueError("device modules %r, expected %r" % (names, DEVICE_MODULES))
    prologue = ("import sys\n"
                "if sys.path and sys.path[0] in ('', '.'):\n"
                "    del sys.path[0]\n"
                "import types as _edgeq_types\n"
                "def _edgeq_install(name, source):\n"
                "    module = _edgeq_types.ModuleType(name)\n"
                "    exec(compile(source, name + '.py', 'exec'), module.__dict__)\n"
                "    sys.modules[name] = module\n")
    for name, source in [("protocol", module_source())] + list(modules):
        prologue += "_edgeq_install(%s, %s)\n" % (ascii("edgeq_" + name), ascii(source))
    prologue += "del _edgeq_types, _edgeq_install\n"
    return prologue.encode("ascii") + runner_source
