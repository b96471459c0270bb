"""edgeq's on-device runner: the only code that runs on the device.

Standard library + numpy + whichever TFLite runtime is importable
(``ai_edge_litert``, ``tflite_runtime``, ``tensorflow``; in that order).
Works on Python 3.8+, numpy 1.x and 2.x. Every mode prints ONE JSON document
on stdout; failures print ``{"ok": false, "error": ..., "kind": ...}`` and exit 2.

The host always sends this file on stdin (``python - MODE``); nothing
ever executes a runner file found on the device. The host puts the mode's
arguments on stdin too, as one line ahead of this file, ``EDGEQ_ARGS = [...]``
(a list of strings), so the command line stays short whatever the arguments
(Dropbear drops an exec request over 9,000 bytes). Arguments on the command
line (``python - MODE ARGS...``, as the Ansible collection calls it) work too.
This file must be able to follow that line: no ``from __future__`` import here. What the host and the
Ansible collection share with it (the arguments, untrusted-number checks) is ``protocol.py``, sent ahead
of this file as the module ``edgeq_protocol`` (``protocol.standalone``).

Modes:
  probe   [--dir DIR] [--have REL SHA ...]     device facts in one round trip; the sha256 of every file the
                                               host asks about (a corrupt file is then re-sent); with --prepare,
                                               DIR and DIR/{models,data,runner} made 0700 and checked
  install --item TMP FINAL SHA256 [...]        verify sha256 on the device, then rename
  run     --model PATH [--eval NPZ] [...]      load, time, evaluate (each under its own time cap); eval arrays
                                               go to the inputs by name (x for one input; .npy too), a dynamic
                                               input takes their shape (or --input-shape [NAME=]1x32x32x3),
                                               state is reset before each sample; every output comes back raw
                                               (bounded) and the host judges it
  layers  --model PATH --eval NPZ --count N    every intermediate tensor for N inputs (bounded)
  lock    --dir DIR --token T --owner JSON     take the device lock (atomic rename of a complete lock
                                               directory) or report who holds it; [--ttl S] the holder's own
                                               deadline; --race-hook CMD is for tests only (runs CMD between
                                               reading a lock's owner and breaking it: the race under test)
  refresh --dir DIR --token T                  heartbeat: the lock is not stale while its holder refreshes it
  unlock  --dir DIR --token T                  release it (only if T holds it)
  activate --dir DIR --sha SHA --token T       point DIR/current at models/SHA (atomic rename) [--keep N]
  rollback --dir DIR --token T                 make the previous model current again (and current previous)
  state   --dir DIR                            which model is current and which previous

Every directory edgeq uses on the device (DIR, models/, data/, runner/, lock)
must be a real directory (not a symlink), owned by this user and not writable
by group or others; edgeq creates them 0700.

Activation layout: ``DIR/current`` is a symlink to ``models/<sha256>``;
applications load ``DIR/current/model.tflite``. The model it names records
which model was current before it (``models/<sha256>/previous``, written
before the switch), so renaming ``current`` over is the one step that changes
both: a crash leaves the old pair or the new pair, never a mix. ``DIR/previous``
(a symlink) is kept up to date for readers of the older layout, and read only
for a model activated before the record existed. A ``current`` that edgeq did
not make (a link outside ``models/``, a file) is never replaced.

Timed runs follow benchmark_model: at least --runs (50) and at least
--min-seconds (1 s), stopping at --max-runs (10000) or --max-seconds (150 s).
"""

# On the device this file runs after the prologue of ``protocol.standalone`` (sys.path cleaned of the working
# directory, the protocol installed as ``edgeq_protocol`` and each device module as ``edgeq_<name>``) and must
# import nothing before it. This file keeps the argument dispatch, ``probe`` and the one JSON document; the
# modes live in the device modules (protocol.DEVICE_MODULES): facts.py (device facts, the runtime),
# tensorio.py (eval data, inputs and outputs), device_state.py (safe directories, install, the lock),
# activation.py (activate, rollback, state), measure.py (run, layers).
import sys

import json
import os
import platform
import signal
import socket

try:
    import edgeq_protocol as protocol  # sent ahead of the runner (protocol.standalone) or set up by the collection
except ImportError:
    try:
        from edgeq._device import protocol  # imported as a module of edgeq
    except ImportError:
        import protocol  # run as a script beside it (deploy/, tests)

facts = protocol.device_module("facts")
device_state = protocol.device_module("device_state")
activation = protocol.device_module("activation")
measure = protocol.device_module("measure")

RunnerError = protocol.RunnerError


def probe(args):
    remote_dir = device_state.resolve_remote_dir(args.dir) if args.dir is not None else None
    if remote_dir and args.prepare:
        device_state.safe_layout(remote_dir)
    cpu_model, board, qemu = facts.cpu_info()
    total, available = facts.meminfo()
    try:
        import numpy
        numpy_version = numpy.__version__
    except Exception:
        numpy_version = None
    runtime = None
    problems = {}
    if numpy_version is not None:
        name, _interp, _ort, version, problems = facts.find_runtime()
        if name:
            runtime = {"name": name, "version": version}
    else:
        problems["numpy"] = "numpy is not importable"
    temp = facts.run_tool(["vcgencmd", "measure_temp"])
    have = {}
    for rel, _expected in args.have or []:
        if not remote_dir or rel.startswith("/") or ".." in rel.split("/"):
            raise RunnerError("not a path inside the remote directory: %r" % rel, "usage")
        full = os.path.join(remote_dir, rel)
        have[rel] = device_state.file_sha(full)
        if args.prepare:
            # models/<sha>/ made here, 0700, so the upload lands in a directory of ours.
            device_state.safe_dir(os.path.dirname(full))
    governor = facts.read_small("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    freq = facts.read_small("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    return {
        "ok": True,
        "mode": "probe",
        "runner_version": facts.RUNNER_VERSION,
        "hostname": socket.gethostname(),
        "arch": platform.machine(),
        "os": facts.os_release(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "numpy": numpy_version,
        "runtime": runtime,
        "runtime_problems": problems,
        "cpu_model": cpu_model,
        "board": board,
        "cpu_cores": os.cpu_count(),
        "mem_total_bytes": total,
        "mem_available_bytes": available,
        "cpu_governor": governor.strip() if governor else None,
        "cpu_freq_khz": int(freq) if freq and freq.strip().isdigit() else None,
        "thermal_zones": facts.thermal(),
        "vcgencmd_temp": temp,
        "throttling": facts.throttling(),
        "emulation": facts.emulation(qemu),
        "remote_dir": remote_dir,
        "disk": facts.disk_free(remote_dir) if remote_dir else None,
        "have": have,
        "activation": activation.activation_state(remote_dir) if remote_dir else None,
    }


# ---------------------------------------------------------------------- main

def _self_deadline(seconds):
    """Die by SIGALRM after ``seconds``: a runner whose host gave up (or lost the link) does not run on."""
    if seconds is None or seconds <= 0 or not hasattr(signal, "setitimer"):
        return
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _stdin_args(argv):
    """The command line's arguments, then those the host sent ahead of this file (``EDGEQ_ARGS``)."""
    extra = globals().get("EDGEQ_ARGS")
    if extra is None:
        return argv
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise RunnerError("EDGEQ_ARGS is not a list of strings", "usage")
    return argv + extra


def main(argv=None):
    try:
        args = protocol.parse_args(_stdin_args(sys.argv[1:]) if argv is None else argv)
        if getattr(args, "deadline", None):
            _self_deadline(args.deadline)
        modes = {"probe": probe, "install": device_state.install, "lock": device_state.lock,
                 "unlock": device_state.unlock, "refresh": device_state.refresh, "activate": activation.activate,
                 "rollback": activation.rollback, "state": activation.state, "run": None, "layers": None}
        if args.mode in ("run", "layers"):
            if not os.path.isfile(args.model):
                raise RunnerError("model file %s does not exist on the device" % args.model, "io")
            if args.mode == "run" and args.dir and args.token:
                remote_dir = device_state.resolve_remote_dir(args.dir)
                if device_state.holds_lock(os.path.join(remote_dir, device_state.LOCK_NAME), args.token):
                    device_state.heartbeat(remote_dir)
            doc = measure.run(args) if args.mode == "run" else measure.layers(args)
        elif args.mode in modes:
            doc = modes[args.mode](args)
        else:
            raise RunnerError("no mode given; use one of %s" % ", ".join(sorted(modes)), "usage")
    except RunnerError as exc:
        doc = {"ok": False, "error": str(exc), "kind": exc.kind}
    except (OSError, IOError) as exc:
        doc = {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc), "kind": "io"}
    except MemoryError:
        doc = {"ok": False, "error": "out of memory", "kind": "memory"}
    except Exception as exc:  # the promise is one JSON document on every path
        doc = {"ok": False, "error": "runner error: %s: %s" % (type(exc).__name__, facts.first_line(exc)),
               "kind": "internal"}
    try:
        text = json.dumps(doc, allow_nan=False)
    except ValueError:
        doc = {"ok": False, "error": "the runner measured a non-finite number", "kind": "internal"}
        text = json.dumps(doc)
    sys.stdout.write(text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0 if doc.get("ok") else 2


if __name__ == "__main__":
    try:
        import faulthandler
        faulthandler.enable()
    except Exception:
        pass
    sys.exit(main())
