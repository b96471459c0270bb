# -*- coding: utf-8 -*-
# Copyright: edgeq contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The device side of the edgeq.fleet modules: edgeq's own runner, called as ``edgeq deploy`` calls it.

Only the Ansible glue lives here; what the host and the collection share (the
runner's arguments, the gate verdict, the latency statistics, the report
document, the checks on untrusted numbers) is ``edgeq_protocol`` (a byte copy
of deploy/protocol.py), and the runner is ``edgeq_runner`` (deploy/runner.py) with its device modules
``edgeq_<name>`` (deploy/<name>.py, ``protocol.DEVICE_MODULES``).

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

from ansible_collections.edgeq.fleet.plugins.module_utils import edgeq_protocol as protocol

# The runner and its device modules import each other as ``edgeq_<name>`` (on a device the host sends them
# ahead of the runner): each is registered under that name before the next one, in protocol.DEVICE_MODULES order.
sys.modules.setdefault("edgeq_protocol", protocol)
from ansible_collections.edgeq.fleet.plugins.module_utils import edgeq_facts as facts  # noqa: E402
sys.modules.setdefault("edgeq_facts", facts)
from ansible_collections.edgeq.fleet.plugins.module_utils import edgeq_tensorio as tensorio  # noqa: E402
sys.modules.setdefault("edgeq_tensorio", tensorio)
from ansible_collections.edgeq.fleet.plugins.module_utils import edgeq_device_state as device_state  # noqa: E402
sys.modules.setdefault("edgeq_device_state", device_state)
from ansible_collections.edgeq.fleet.plugins.module_utils import edgeq_activation as activation  # noqa: E402
sys.modules.setdefault("edgeq_activation", activation)
from ansible_collections.edgeq.fleet.plugins.module_utils import edgeq_measure as measure  # noqa: E402
sys.modules.setdefault("edgeq_measure", measure)
from ansible_collections.edgeq.fleet.plugins.module_utils import edgeq_runner as runner  # noqa: E402

DEVICE_MODULES = {"facts": facts, "tensorio": tensorio, "device_state": device_state, "activation": activation,
                  "measure": measure}

COLLECTION_VERSION = "0.1.0"
MAX_DOC_BYTES = 16 * 1024 * 1024
REPORT_NAME = "edgeq-report.json"
MAX_SAMPLES = 500  # latency samples kept in a module result

# Shared by the module (device side) and the action plugin (controller side): one spec, one set of messages.
MODEL_ARGSPEC = dict(
    src=dict(type="path"),
    sha256=dict(type="str"),
    remote_dir=dict(type="str", default="~/.edgeq"),
    state=dict(type="str", default="active", choices=["present", "active", "absent"]),
    eval=dict(type="path"),
    gate_accuracy=dict(type="float"),
    gate_p99_ms=dict(type="float"),
    runs=dict(type="int", default=protocol.RUN_DEFAULTS["runs"]),
    warmup=dict(type="int", default=protocol.RUN_DEFAULTS["warmup"]),
    min_seconds=dict(type="float", default=protocol.RUN_DEFAULTS["min_seconds"]),
    min_warmup_seconds=dict(type="float", default=protocol.RUN_DEFAULTS["min_warmup_seconds"]),
    max_runs=dict(type="int", default=protocol.RUN_DEFAULTS["max_runs"]),
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


is_sha = protocol.is_sha
loads = protocol.loads


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
    """The program to send to a child interpreter on stdin: the runner behind the protocol and the device
    modules it imports."""
    modules = [(name, protocol.module_source(DEVICE_MODULES[name])) for name in protocol.DEVICE_MODULES]
    return protocol.standalone(protocol.module_source(runner).encode("utf-8"), modules)


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
        return activation.activation_state(self.dir) if os.path.isdir(self.dir) else {"current": None, "previous": None}

    def has(self, rel, sha):
        """True when ``rel`` is a regular file with this sha256 (a corrupt file is re-sent, never trusted)."""
        return device_state.file_sha(self.path(rel)) == sha

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
        argv = ["run"] + protocol.run_args(
            model_path, timed=timed, runs=params["runs"], warmup=params["warmup"], min_seconds=params["min_seconds"],
            min_warmup_seconds=params["min_warmup_seconds"], max_runs=params["max_runs"], eval_path=eval_path,
            threads=params.get("threads"), xnnpack=params.get("xnnpack", True), max_outputs=0,
            lock_dir=self.dir if self.token else None, token=self.token)
        argv += ["--deadline", repr(max(0.5, timeout - min(2.0, 0.1 * timeout)))]
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
            activation.record_previous(self.dir, state["current"], None)
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
    """Judge a run from ``current`` against the gate (protocol.gate_verdict, as edgeq's rollout does)."""
    verdict = protocol.gate_verdict(run_doc, gate_accuracy, gate_p99_ms)
    verdict.update(active=active, path=path)
    return verdict


def build_report(probe, run_doc, params, device, model, eval_info, sent, activation, started_at, duration_s,
                 warnings, gate_doc=None):
    """The document ``edgeq deploy`` writes as report.json (protocol.report_document), from the same runner
    documents."""
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
    return protocol.report_document(
        edgeq_version="edgeq.fleet %s" % COLLECTION_VERSION,
        host=socket.gethostname(),
        started_at=started_at,
        duration_s=duration_s,
        model={"name": model["name"], "sha256": model["sha256"], "bytes": model["bytes"],
               "remote_path": device.path(device.model_rel(model["sha256"]))},
        device=protocol.device_facts(probe),
        runtime=runtime,
        settings=settings,
        latency_ms=protocol.latency(run_doc.get("samples_ms"), MAX_SAMPLES),
        load_ms=protocol.finite_number(run_doc.get("load_ms")) or 0.0,
        first_inference_ms=protocol.finite_number(run_doc.get("first_inference_ms")) or 0.0,
        peak_rss_bytes=run_doc.get("peak_rss_bytes"),
        accuracy=protocol.finite_number((ev or {}).get("accuracy")),
        mae=protocol.finite_number((ev or {}).get("mae")),
        eval=evaluation,
        agreement=None,
        transfer={"model_bytes_sent": sent.get("model", 0), "eval_bytes_sent": sent.get("eval", 0),
                  "runner_bytes_sent": 0, "seconds": 0.0, "uploaded": sorted(sent),
                  "connect_attempts": None, "stale_temp_files_removed": 0},
        activation=activation,
        warnings=list(warnings),
        layer_diff=None,  # edgeq deploy --layer-diff only: it needs the host's reference run
        delegate=run_doc.get("delegate") if isinstance(run_doc.get("delegate"), dict) else None,
        gate=gate_doc,
    )


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def python_info():
    return platform.python_version()
