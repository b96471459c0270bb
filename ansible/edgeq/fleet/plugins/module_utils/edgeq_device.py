# -*- coding: utf-8 -*-
# Copyright: edgeq contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The device side of the edgeq.fleet modules: edgeq's own runner, called as ``edgeq deploy`` calls it.

Light steps (probe, install, lock, activate, rollback) call the runner's own
``main()`` in this process and read its one JSON document. Anything that loads
a model (``run``) goes to a child process that gets the runner's source on
stdin, exactly as ``edgeq deploy`` does over SSH: a model that crashes the
runtime kills the child, not the module, and no runner file on the device is
ever executed.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time

from ansible_collections.edgeq.fleet.plugins.module_utils import edgeq_runner as runner

COLLECTION_VERSION = "0.1.0"
MAX_DOC_BYTES = 16 * 1024 * 1024
REPORT_NAME = "edgeq-report.json"
MAX_SAMPLES = 500  # latency samples kept in a module result
MAX_INT_DIGITS = 20  # as edgeq.jsondoc: no count, size or time in a runner document is longer

# Shared by the module (device side) and the action plugin (controller side): one spec, one set of messages.
MODEL_ARGSPEC = dict(
    src=dict(type="path"),
    sha256=dict(type="str"),
    remote_dir=dict(type="str", default="~/.edgeq"),
    state=dict(type="str", default="active", choices=["present", "active", "absent"]),
    eval=dict(type="path"),
    gate_accuracy=dict(type="float"),
    gate_p99_ms=dict(type="float"),
    runs=dict(type="int", default=50),
    warmup=dict(type="int", default=1),
    min_seconds=dict(type="float", default=1.0),
    min_warmup_seconds=dict(type="float", default=0.5),
    max_runs=dict(type="int", default=10000),
    threads=dict(type="int"),
    xnnpack=dict(type="bool", default=True),
    run_timeout=dict(type="float", default=900.0),
    lock_stale_s=dict(type="float", default=1800.0),
    model_tmp=dict(type="str"),
    eval_tmp=dict(type="str"),
    eval_sha256=dict(type="str"),
    model_name=dict(type="str"),
)
MODEL_REQUIRED_IF = [["state", "present", ["src", "sha256"], True], ["state", "active", ["src", "sha256"], True],
                     ["state", "absent", ["src", "sha256"], True]]

ROLLBACK_ARGSPEC = dict(
    remote_dir=dict(type="str", default="~/.edgeq"),
    lock_stale_s=dict(type="float", default=1800.0),
)

FACTS_ARGSPEC = dict(
    remote_dir=dict(type="str", default="~/.edgeq"),
)


class EdgeqModuleError(Exception):
    """A failure to report as the module's ``msg``; ``extra`` goes into the result."""

    def __init__(self, message, **extra):
        Exception.__init__(self, message)
        self.extra = extra


def is_sha(text):
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def call(argv):
    """Run one light runner mode in this process; return its JSON document."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runner.main(list(argv))
    text = out.getvalue().strip()
    try:
        doc = loads(text.splitlines()[-1]) if text else None
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        raise EdgeqModuleError("the runner gave no result for %s" % argv[0])
    return doc


def runner_source():
    """The runner's source text, to send to a child interpreter on stdin."""
    loader = getattr(runner, "__loader__", None)
    src = None
    if loader is not None and hasattr(loader, "get_source"):
        try:
            src = loader.get_source(runner.__name__)
        except Exception:
            src = None
    if src is None:
        with open(runner.__file__, "r") as f:
            src = f.read()
    return src.encode("utf-8")


def run_child(argv, timeout):
    """``python - run ...`` with the runner on stdin; a crash or a timeout is a result, not an exception."""
    cmd = [sys.executable, "-"] + list(argv)
    try:
        p = subprocess.run(cmd, input=runner_source(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "kind": "timeout", "error": "the run did not finish within %g s" % timeout}
    if p.returncode < 0:
        return {"ok": False, "kind": "crash",
                "error": "the runner was killed by signal %d (the model may crash the runtime)" % -p.returncode}
    text = p.stdout[-MAX_DOC_BYTES:].decode("utf-8", "replace").strip()
    try:
        doc = loads(text.splitlines()[-1]) if text else None
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        tail = p.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        return {"ok": False, "kind": "protocol",
                "error": "the runner gave no result (exit status %d): %s" % (p.returncode, " | ".join(tail))}
    return doc


def finite(value):
    """A finite float, or None: for a string, a boolean, NaN/Infinity, or an integer too large for a float."""
    return runner.finite_number(value)


def _bounded_int(text):
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError("an integer of %d digits is out of range" % len(text.lstrip("-")))
    return int(text)


def loads(text):
    """The runner's document: ``json.loads`` with integers bounded as edgeq bounds them (edgeq.jsondoc)."""
    return json.loads(text, parse_int=_bounded_int)


class Device:
    """One device directory: paths, the lock, and each step of a deploy."""

    def __init__(self, remote_dir):
        self.dir = os.path.abspath(os.path.expanduser(remote_dir))
        self.token = None

    def model_rel(self, sha):
        return "models/%s/model.tflite" % sha

    def path(self, rel):
        return os.path.join(self.dir, rel)

    def probe(self, have=(), prepare=False):
        """The runner's probe; ``have`` is ((rel, sha256), ...); ``prepare`` makes the safe 0700 layout."""
        argv = ["probe", "--dir", self.dir]
        if prepare:
            argv.append("--prepare")
        for rel, sha in have:
            argv += ["--have", rel, sha]
        doc = call(argv)
        if not doc["ok"]:
            raise EdgeqModuleError("the probe failed: %s" % doc.get("error"))
        return doc

    def activation(self):
        return runner.activation_state(self.dir) if os.path.isdir(self.dir) else {"current": None, "previous": None}

    def has(self, rel, sha):
        """True when ``rel`` is a regular file with this sha256 (a corrupt file is re-sent, never trusted)."""
        return runner._file_sha(self.path(rel)) == sha

    @contextlib.contextmanager
    def locked(self, model_sha, stale_after, ttl):
        token = os.urandom(12).hex()
        owner = {"user": os.environ.get("USER") or "?", "controller": "ansible (edgeq.fleet) on %s" % socket.gethostname(),
                 "pid": os.getpid(), "model": model_sha or "", "tool": "edgeq.fleet"}
        doc = call(["lock", "--dir", self.dir, "--token", token, "--owner", json.dumps(owner),
                    "--stale-after", repr(float(stale_after)), "--ttl", repr(float(ttl))])
        if not doc["ok"]:
            if doc.get("kind") == "busy":
                o = doc.get("owner") if isinstance(doc.get("owner"), dict) else {}
                raise EdgeqModuleError("the device is busy: another deploy holds %s/lock (by %s on %s, pid %s)"
                                       % (self.dir, o.get("user", "?"), o.get("controller", "?"), o.get("pid", "?")))
            raise EdgeqModuleError("cannot lock %s: %s" % (self.dir, doc.get("error")))
        self.token = token
        try:
            yield doc
        finally:
            try:
                call(["unlock", "--dir", self.dir, "--token", token])
            except Exception:
                pass
            self.token = None

    def install(self, tmp, rel, sha):
        """Copy an uploaded temp file beside its final path (made 0700 by the probe), then let the runner verify
        its sha256 and rename it into place."""
        final = self.path(rel)
        staged = "%s.tmp-%s" % (final, os.urandom(6).hex())
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(tmp, "rb") as src, os.fdopen(fd, "wb") as dst:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        doc = call(["install", "--item", staged, final, sha])
        if not doc["ok"]:
            try:
                os.unlink(staged)
            except OSError:
                pass
            raise EdgeqModuleError("the upload failed verification on the device: %s" % doc.get("error"))

    def run(self, model_path, params, eval_path, timed):
        timeout = params["run_timeout"]
        # The runner kills itself just before we would give up on it; --dir/--token keep our lock fresh.
        argv = ["run", "--model", model_path, "--max-outputs", "0",
                "--deadline", repr(max(0.5, timeout - min(2.0, 0.1 * timeout)))]
        if self.token:
            argv += ["--dir", self.dir, "--token", self.token]
        if timed:
            argv += ["--runs", str(params["runs"]), "--warmup", str(params["warmup"]),
                     "--min-seconds", repr(float(params["min_seconds"])),
                     "--min-warmup-seconds", repr(float(params["min_warmup_seconds"])),
                     "--max-runs", str(params["max_runs"])]
        else:
            argv.append("--eval-only")
        if eval_path:
            argv += ["--eval", eval_path]
        if params.get("threads"):
            argv += ["--threads", str(params["threads"])]
        if not params.get("xnnpack", True):
            argv.append("--no-xnnpack")
        return run_child(argv, timeout)

    def activate(self, sha):
        doc = call(["activate", "--dir", self.dir, "--sha", sha, "--token", self.token])
        if not doc["ok"]:
            # As edgeq deploy does: read back what is active rather than assume the switch did not happen.
            now = self.activation()
            if now.get("current") == sha:
                raise EdgeqModuleError("activating %s reported an error (%s), but the device now runs it; "
                                       "edgeq.fleet.rollback switches back" % (sha[:12], doc.get("error")))
            unchanged = ("current is %s" % now["foreign"]) if now.get("foreign") else (now.get("current") or "none")
            raise EdgeqModuleError("activating %s failed: %s; the active model is unchanged (%s)"
                                   % (sha[:12], doc.get("error"), str(unchanged)[:200]))
        return doc

    def rollback(self):
        return call(["rollback", "--dir", self.dir, "--token", self.token])

    def forget_previous(self, sha):
        """Before removing model ``sha``: if it is the rollback target, there is none any more (the record beside
        the current model and the older layout's ``previous`` link both say so)."""
        state = self.activation()
        if state["previous"] != sha:
            return
        if state["current"]:
            runner._record_previous(self.dir, state["current"], None)
        link = os.path.join(self.dir, "previous")
        if os.path.islink(link):
            os.unlink(link)

    def saved_report(self, sha):
        path = os.path.join(self.dir, "models", sha, REPORT_NAME)
        try:
            with open(path, "r") as f:
                doc = loads(f.read(1 << 20))
        except (OSError, IOError, ValueError, RecursionError):
            return None
        return doc if isinstance(doc, dict) else None

    def save_report(self, sha, doc):
        path = os.path.join(self.dir, "models", sha, REPORT_NAME)
        tmp = "%s.tmp-%s" % (path, os.urandom(6).hex())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, path)
        except (OSError, IOError):
            try:
                os.unlink(tmp)
            except OSError:
                pass


def gate(run_doc, gate_accuracy, gate_p99_ms, path, active):
    """Judge a run from ``current`` against the gate: a dict with passed, reasons, accuracy, p99_ms."""
    if not run_doc.get("ok"):
        reasons = ["smoke run from current failed: %s" % str(run_doc.get("error"))[:300]]
        return {"passed": False, "reasons": reasons, "active": active, "accuracy": None, "p99_ms": None,
                "runs": 0, "path": path}
    ev = run_doc.get("eval") if isinstance(run_doc.get("eval"), dict) else {}
    accuracy = finite(ev.get("accuracy"))
    stats = latency(run_doc.get("samples_ms"))
    p99 = stats["p99"] if stats["count"] else None
    reasons = []
    if gate_accuracy is not None:
        if accuracy is None:
            reasons.append("no accuracy measured on the device (labels missing or not a classifier)")
        elif accuracy < gate_accuracy:
            reasons.append("accuracy %.4f < %g" % (accuracy, gate_accuracy))
    if gate_p99_ms is not None:
        if p99 is None:
            reasons.append("no latency samples from the gate run")
        elif p99 > gate_p99_ms:
            reasons.append("p99 %.3f ms > %g ms" % (p99, gate_p99_ms))
    return {"passed": not reasons, "reasons": reasons, "active": active, "accuracy": accuracy, "p99_ms": p99,
            "runs": stats["count"], "path": path}


def latency(samples):
    """The same statistics as edgeq.deploy.LatencyStats (numpy percentiles, linear interpolation)."""
    vals = [finite(s) for s in samples] if isinstance(samples, list) else []
    if not vals or any(v is None for v in vals):
        return {"min": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0, "std": 0.0, "max": 0.0, "count": 0,
                "samples": []}
    import numpy as np

    a = np.asarray(vals, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
    if len(vals) > MAX_SAMPLES:
        # Statistics come from every run; the result (printed by Ansible) keeps evenly spaced samples.
        step = len(vals) / float(MAX_SAMPLES)
        vals = [vals[int(i * step)] for i in range(MAX_SAMPLES)]
    return {"min": float(a.min()), "p50": p50, "p90": p90, "p99": p99, "mean": float(a.mean()), "std": float(a.std()),
            "max": float(a.max()), "count": int(len(a)), "samples": vals}


def build_report(probe, run_doc, params, device, model, eval_info, sent, activation, started_at, duration_s,
                 warnings):
    """The document ``edgeq deploy`` writes as report.json, built from the same runner documents."""
    device_facts = dict((k, v) for k, v in probe.items()
                        if k not in ("ok", "mode", "have", "runner_version", "activation"))
    runtime = dict(run_doc.get("runtime") or {})
    runtime["threads"] = params.get("threads")
    ev = run_doc.get("eval") if isinstance(run_doc.get("eval"), dict) else None
    evaluation = None
    if ev:
        evaluation = dict((k, v) for k, v in ev.items() if k not in ("outputs", "outputs_truncated"))
        if eval_info:
            evaluation.update({"data": eval_info["name"], "sha256": eval_info["sha256"]})
    settings = {"runs": params["runs"], "warmup": params["warmup"], "min_seconds": params["min_seconds"],
                "max_runs": params["max_runs"], "warmup_runs_done": run_doc.get("warmup_runs"),
                "python": sys.executable, "remote_dir": device.dir, "inputs": run_doc.get("inputs"),
                "outputs": run_doc.get("outputs")}
    rss = run_doc.get("peak_rss_bytes")
    return {
        "edgeq_version": "edgeq.fleet %s" % COLLECTION_VERSION,
        "host": socket.gethostname(),
        "started_at": started_at,
        "duration_s": round(duration_s, 3),
        "model": {"name": model["name"], "sha256": model["sha256"], "bytes": model["bytes"],
                  "remote_path": device.path(device.model_rel(model["sha256"]))},
        "device": device_facts,
        "runtime": runtime,
        "settings": settings,
        "latency_ms": latency(run_doc.get("samples_ms")),
        "load_ms": finite(run_doc.get("load_ms")) or 0.0,
        "first_inference_ms": finite(run_doc.get("first_inference_ms")) or 0.0,
        "peak_rss_bytes": rss if isinstance(rss, int) and not isinstance(rss, bool) else None,
        "accuracy": finite((ev or {}).get("accuracy")),
        "mae": finite((ev or {}).get("mae")),
        "eval": evaluation,
        "agreement": None,
        "transfer": {"model_bytes_sent": sent.get("model", 0), "eval_bytes_sent": sent.get("eval", 0),
                     "runner_bytes_sent": 0, "seconds": 0.0, "uploaded": sorted(sent),
                     "connect_attempts": None, "stale_temp_files_removed": 0},
        "activation": activation,
        "warnings": list(warnings),
        "layer_diff": None,  # edgeq deploy --layer-diff only: it needs the host's reference run
        "delegate": run_doc.get("delegate") if isinstance(run_doc.get("delegate"), dict) else None,
    }


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def python_info():
    return platform.python_version()
