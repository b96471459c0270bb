"""edgeq's on-device runner: the only code that runs on the device.

Standard library + numpy + whichever TFLite runtime is importable
(``ai_edge_litert``, ``tflite_runtime``, ``tensorflow``; in that order).
Works on Python 3.8+, numpy 1.x and 2.x. Every mode prints ONE JSON document
on stdout; failures print ``{"ok": false, "error": ..., "kind": ...}`` and exit 2.

Modes:
  probe   [--dir DIR] [--have RELPATH ...]     device facts, in one round trip
  install --item TMP FINAL SHA256 [...]        verify sha256 on the device, then rename
  run     --model PATH [--eval NPZ] [...]      load, time, evaluate
  lock    --dir DIR --token T --owner JSON     take the device lock (mkdir, atomic) or report who holds it
  unlock  --dir DIR --token T                  release it (only if T holds it)
  activate --dir DIR --sha SHA --token T       point DIR/current at models/SHA (atomic rename)
  rollback --dir DIR --token T                 swap DIR/current and DIR/previous

Activation layout: ``DIR/current`` and ``DIR/previous`` are symlinks to
``models/<sha256>``; applications load ``DIR/current/model.tflite``. A switch
writes a new symlink at a temporary name and renames it over the old one, so a
reader sees the old model or the new one, never neither.

Timed runs follow benchmark_model: at least --runs (50) and at least
--min-seconds (1 s), stopping at --max-runs (10000) or --max-seconds (150 s).
"""

from __future__ import print_function

import argparse
import base64
import glob
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

RUNTIMES = ("ai_edge_litert", "tflite_runtime", "tensorflow")
RUNNER_VERSION = 2


class RunnerError(Exception):
    def __init__(self, message, kind="error"):
        Exception.__init__(self, message)
        self.kind = kind


# --------------------------------------------------------------------- probe

def _read(path, limit=65536):
    try:
        with open(path, "r") as f:
            return f.read(limit)
    except (OSError, IOError):
        return None


def _os_release():
    text = _read("/etc/os-release") or ""
    info = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            info[k.strip()] = v.strip().strip('"')
    return info.get("PRETTY_NAME") or info.get("NAME") or platform.system()


def _cpu_info():
    text = _read("/proc/cpuinfo", 1 << 20) or ""
    model = None
    board = None
    for line in text.splitlines():
        if ":" not in line:
            continue
        k, v = [s.strip() for s in line.split(":", 1)]
        if model is None and k in ("model name", "Processor", "cpu model", "uarch"):
            model = v
        if k == "Model":
            board = v
        if model is None and k == "CPU part":
            model = "ARM part " + v
    if model is None:
        model = platform.processor() or None
    return model, board, "qemu" in text.lower()


def _meminfo():
    text = _read("/proc/meminfo") or ""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("MemTotal:", "MemAvailable:"):
            try:
                out[parts[0][:-1]] = int(parts[1]) * 1024
            except ValueError:
                pass
    return out.get("MemTotal"), out.get("MemAvailable")


def _run_tool(argv, timeout=3.0):
    if shutil.which(argv[0]) is None:
        return None
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    if p.returncode != 0:
        return None
    return p.stdout.decode("utf-8", "replace").strip()


def _thermal():
    zones = []
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        temp = _read(os.path.join(zone, "temp"))
        if temp is None:
            continue
        try:
            celsius = int(temp.strip()) / 1000.0
        except ValueError:
            continue
        zones.append({"zone": os.path.basename(zone), "type": (_read(os.path.join(zone, "type")) or "").strip(),
                      "celsius": celsius})
    return zones


def _throttling():
    raw = _run_tool(["vcgencmd", "get_throttled"])
    if raw is None:
        return None
    value = raw.split("=", 1)[-1]
    try:
        bits = int(value, 16)
    except ValueError:
        return {"raw": raw}
    return {
        "raw": value,
        "under_voltage_now": bool(bits & 0x1),
        "freq_capped_now": bool(bits & 0x2),
        "throttled_now": bool(bits & 0x4),
        "soft_temp_limit_now": bool(bits & 0x8),
        "under_voltage_since_boot": bool(bits & 0x10000),
        "throttled_since_boot": bool(bits & 0x40000),
    }


def _emulation(qemu_in_cpuinfo):
    binfmt = []
    for path in glob.glob("/proc/sys/fs/binfmt_misc/qemu-*"):
        text = _read(path) or ""
        if text.startswith("enabled"):
            binfmt.append(os.path.basename(path))
    machine = platform.machine().lower()
    aliases = {"aarch64": "aarch64", "arm64": "aarch64", "armv7l": "arm", "armv6l": "arm", "riscv64": "riscv64"}
    # A qemu-user handler for our own architecture means we may be running through it.
    via_binfmt = ("qemu-" + aliases.get(machine, machine)) in binfmt
    return {"emulated": bool(qemu_in_cpuinfo or via_binfmt), "qemu_in_cpuinfo": bool(qemu_in_cpuinfo),
            "binfmt_qemu": sorted(binfmt)}


def _module_version(name, module):
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib import metadata
        return metadata.version({"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}.get(name, name))
    except Exception:
        return None


def _import_runtime(name):
    """Return (Interpreter class, OpResolverType or None, version) for one runtime module."""
    if name == "ai_edge_litert":
        import ai_edge_litert
        from ai_edge_litert import interpreter as mod
        return mod.Interpreter, getattr(mod, "OpResolverType", None), _module_version(name, ai_edge_litert)
    if name == "tflite_runtime":
        import tflite_runtime
        from tflite_runtime import interpreter as mod
        return mod.Interpreter, getattr(mod, "OpResolverType", None), _module_version(name, tflite_runtime)
    if name == "tensorflow":
        import tensorflow as tf
        ort = getattr(getattr(tf.lite, "experimental", None), "OpResolverType", None)
        return tf.lite.Interpreter, ort, _module_version(name, tf)
    raise RunnerError("unknown runtime %r; choose one of %s" % (name, ", ".join(RUNTIMES)), "usage")


def find_runtime(prefer=None):
    """First importable runtime: (name, Interpreter, OpResolverType, version, problems)."""
    names = [prefer] if prefer else list(RUNTIMES)
    problems = {}
    for name in names:
        try:
            interp, ort, version = _import_runtime(name)
            return name, interp, ort, version, problems
        except RunnerError:
            raise
        except Exception as exc:  # ImportError, or a broken install raising anything
            problems[name] = "%s: %s" % (type(exc).__name__, exc)
    return None, None, None, None, problems


def _disk_free(path):
    probe = path
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        st = os.statvfs(probe or "/")
    except OSError:
        return None
    return {"path": probe, "free_bytes": st.f_bavail * st.f_frsize, "total_bytes": st.f_blocks * st.f_frsize}


def probe(args):
    remote_dir = os.path.abspath(os.path.expanduser(args.dir)) if args.dir else None
    cpu_model, board, qemu = _cpu_info()
    total, available = _meminfo()
    try:
        import numpy
        numpy_version = numpy.__version__
    except Exception:
        numpy_version = None
    runtime = None
    problems = {}
    if numpy_version is not None:
        name, _interp, _ort, version, problems = find_runtime()
        if name:
            runtime = {"name": name, "version": version}
    else:
        problems["numpy"] = "numpy is not importable"
    temp = _run_tool(["vcgencmd", "measure_temp"])
    have = {}
    for rel in args.have or []:
        have[rel] = bool(remote_dir) and os.path.isfile(os.path.join(remote_dir, rel))
    governor = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    freq = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    return {
        "ok": True,
        "mode": "probe",
        "runner_version": RUNNER_VERSION,
        "hostname": socket.gethostname(),
        "arch": platform.machine(),
        "os": _os_release(),
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
        "thermal_zones": _thermal(),
        "vcgencmd_temp": temp,
        "throttling": _throttling(),
        "emulation": _emulation(qemu),
        "remote_dir": remote_dir,
        "disk": _disk_free(remote_dir) if remote_dir else None,
        "have": have,
        "activation": activation_state(remote_dir) if remote_dir else None,
    }


# ------------------------------------------------------------------- install

def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
        os.fsync(f.fileno())
    return h.hexdigest()


def install(args):
    done = []
    for tmp, final, expected in args.item or []:
        try:
            actual = _sha256(tmp)
        except (OSError, IOError) as exc:
            raise RunnerError("cannot read uploaded file %s: %s" % (tmp, exc), "io")
        if actual != expected:
            _unlink(tmp)
            raise RunnerError("checksum mismatch for %s: expected sha256 %s, got %s" % (final, expected, actual),
                              "checksum")
        try:
            os.replace(tmp, final)
            dfd = os.open(os.path.dirname(final) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except (OSError, IOError) as exc:
            _unlink(tmp)
            raise RunnerError("cannot move %s into place: %s" % (final, exc), "io")
        done.append(final)
    return {"ok": True, "mode": "install", "installed": done}


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------- lock, activation

LOCK_NAME = "lock"
OWNER_FILE = "owner.json"


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _lock_owner(lock_dir):
    """The owner document of a lock directory, with its age on the device clock."""
    path = os.path.join(lock_dir, OWNER_FILE)
    doc = None
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, IOError, ValueError):
        doc = None
    if not isinstance(doc, dict):
        doc = {}
    try:
        since = float(doc.get("since")) if doc.get("since") is not None else os.stat(lock_dir).st_mtime
    except (OSError, TypeError, ValueError):
        since = time.time()
    doc["age_s"] = round(max(0.0, time.time() - since), 3)
    return doc


def _sweep(remote_dir):
    """Remove what a killed deploy left behind: temp uploads, temp links, broken locks."""
    removed = 0
    for sub in ("models", "data", "runner"):
        for root, _dirs, files in os.walk(os.path.join(remote_dir, sub)):
            for name in files:
                if ".tmp-" in name:
                    _unlink(os.path.join(root, name))
                    removed += 1
    for name in os.listdir(remote_dir):
        full = os.path.join(remote_dir, name)
        if name.startswith((".current.tmp-", ".previous.tmp-")):
            _unlink(full)
            removed += 1
        elif name.startswith(LOCK_NAME + ".stale-"):
            shutil.rmtree(full, ignore_errors=True)
            removed += 1
    return removed


def lock(args):
    remote_dir = os.path.abspath(os.path.expanduser(args.dir))
    try:
        if not os.path.isdir(remote_dir):
            os.makedirs(remote_dir)
    except OSError as exc:
        raise RunnerError("cannot create %s: %s" % (remote_dir, exc.strerror or exc), "io")
    lock_dir = os.path.join(remote_dir, LOCK_NAME)
    broke = None
    for _attempt in range(2):
        try:
            os.mkdir(lock_dir)
        except OSError as exc:
            if not os.path.isdir(lock_dir):
                raise RunnerError("cannot create the lock %s: %s" % (lock_dir, exc.strerror or exc), "io")
            owner = _lock_owner(lock_dir)
            stale = args.stale_after is not None and owner["age_s"] > args.stale_after
            if broke is None and (stale or (args.break_token and owner.get("token") == args.break_token)):
                # rename is atomic: of two deploys breaking the same stale lock, one wins.
                aside = "%s.stale-%s" % (lock_dir, base64.b16encode(os.urandom(4)).decode().lower())
                try:
                    os.rename(lock_dir, aside)
                    shutil.rmtree(aside, ignore_errors=True)
                    broke = owner
                    broke["reason"] = "older than %g s" % args.stale_after if stale else "its holder is gone"
                except OSError:
                    pass
                continue
            return {"ok": False, "kind": "busy", "error": "the device is locked by another deploy",
                    "owner": owner, "remote_dir": remote_dir}
        owner = json.loads(args.owner) if args.owner else {}
        owner.update({"token": args.token, "since": time.time(), "device_pid": os.getpid()})
        tmp = os.path.join(lock_dir, OWNER_FILE + ".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(owner, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(lock_dir, OWNER_FILE))
        except (OSError, IOError) as exc:
            shutil.rmtree(lock_dir, ignore_errors=True)
            raise RunnerError("cannot write the lock owner in %s: %s (is the disk full?)"
                              % (lock_dir, getattr(exc, "strerror", None) or exc), "io")
        _fsync_dir(remote_dir)
        return {"ok": True, "mode": "lock", "remote_dir": remote_dir, "broke_stale": broke,
                "swept": _sweep(remote_dir)}
    return {"ok": False, "kind": "busy", "error": "the device lock changed hands while breaking a stale one",
            "owner": _lock_owner(lock_dir), "remote_dir": remote_dir}


def _holds(lock_dir, token):
    return _lock_owner(lock_dir).get("token") == token


def unlock(args):
    remote_dir = os.path.abspath(os.path.expanduser(args.dir))
    lock_dir = os.path.join(remote_dir, LOCK_NAME)
    if not os.path.isdir(lock_dir):
        return {"ok": True, "mode": "unlock", "released": False}
    if not _holds(lock_dir, args.token):
        return {"ok": False, "kind": "lock", "error": "the lock is held by another deploy; not releasing it"}
    shutil.rmtree(lock_dir, ignore_errors=True)
    _fsync_dir(remote_dir)
    return {"ok": True, "mode": "unlock", "released": not os.path.exists(lock_dir)}


def _link_sha(remote_dir, name):
    try:
        target = os.readlink(os.path.join(remote_dir, name))
    except OSError:
        return None
    parts = target.rstrip("/").split("/")
    return parts[-1] if len(parts) == 2 and parts[0] == "models" else None


def activation_state(remote_dir):
    """Which model ``current`` and ``previous`` point at (sha256 or None)."""
    return {"current": _link_sha(remote_dir, "current"), "previous": _link_sha(remote_dir, "previous")}


def _switch(remote_dir, name, sha):
    """Point ``remote_dir/name`` at ``models/sha`` atomically: new link at a temp name, renamed over."""
    tmp = os.path.join(remote_dir, ".%s.tmp-%s" % (name, base64.b16encode(os.urandom(4)).decode().lower()))
    try:
        os.symlink("models/" + sha, tmp)
        os.replace(tmp, os.path.join(remote_dir, name))
    except OSError as exc:
        _unlink(tmp)
        raise RunnerError("cannot switch %s to %s: %s" % (name, sha[:12], exc.strerror or exc), "io")
    _fsync_dir(remote_dir)


def _is_sha(text):
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _guard(remote_dir, token):
    if not _holds(os.path.join(remote_dir, LOCK_NAME), token):
        raise RunnerError("this deploy no longer holds the device lock (another deploy broke it as stale)", "lock")


def activate(args):
    remote_dir = os.path.abspath(os.path.expanduser(args.dir))
    if not _is_sha(args.sha):
        raise RunnerError("not a sha256: %r" % args.sha, "usage")
    _guard(remote_dir, args.token)
    model = os.path.join(remote_dir, "models", args.sha, "model.tflite")
    try:
        actual = _sha256(model)
    except (OSError, IOError) as exc:
        raise RunnerError("cannot read %s: %s" % (model, exc), "io")
    if actual != args.sha:
        raise RunnerError("%s does not match its sha256 (got %s); not activating it" % (model, actual), "checksum")
    before = activation_state(remote_dir)
    switched = before["current"] != args.sha
    if switched:
        if before["current"]:
            _switch(remote_dir, "previous", before["current"])
        _switch(remote_dir, "current", args.sha)
    after = activation_state(remote_dir)
    return {"ok": True, "mode": "activate", "switched": switched, "active": after["current"],
            "previous": after["previous"], "before": before}


def rollback(args):
    remote_dir = os.path.abspath(os.path.expanduser(args.dir))
    _guard(remote_dir, args.token)
    before = activation_state(remote_dir)
    prev = before["previous"]
    if not prev:
        raise RunnerError("there is no previous model in %s to roll back to" % remote_dir, "rollback")
    if not os.path.isfile(os.path.join(remote_dir, "models", prev, "model.tflite")):
        raise RunnerError("the previous model %s is missing from %s/models" % (prev[:12], remote_dir), "rollback")
    _switch(remote_dir, "current", prev)
    if before["current"]:
        _switch(remote_dir, "previous", before["current"])
    after = activation_state(remote_dir)
    return {"ok": True, "mode": "rollback", "switched": True, "active": after["current"],
            "previous": after["previous"], "before": before}


# ----------------------------------------------------------------------- run

class _CaptureStderr(object):
    """Capture C-level stderr (fd 2), where the runtime logs which delegate it applied."""

    def __enter__(self):
        self.text = ""
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            self._file = tempfile.TemporaryFile()
            os.dup2(self._file.fileno(), 2)
        except (OSError, IOError):
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is None:
            return False
        try:
            sys.stderr.flush()
        except Exception:
            pass
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read(65536).decode("utf-8", "replace")
        self._file.close()
        return False


def _quantize(np, x, detail):
    dtype = np.dtype(detail["dtype"])
    scale, zero = detail.get("quantization", (0.0, 0))
    if dtype.kind in "iu" and scale:
        info = np.iinfo(dtype)
        q = np.round(x.astype(np.float32) / np.float32(scale) + zero)
        return np.clip(q, info.min, info.max).astype(dtype)
    return x.astype(dtype)


def _dequantize(np, y, detail):
    scale, zero = detail.get("quantization", (0.0, 0))
    if y.dtype.kind in "iu" and scale:
        return (y.astype(np.float32) - np.float32(zero)) * np.float32(scale)
    return y.astype(np.float32)


def _random_input(np, rng, detail):
    dtype = np.dtype(detail["dtype"])
    shape = tuple(int(d) for d in detail["shape"])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.randint(max(info.min, -128), min(info.max, 127) + 1, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.randint(0, 2, size=shape).astype(dtype)
    return rng.random_sample(shape).astype(dtype)


def _encode(np, array):
    array = np.ascontiguousarray(array, dtype=np.float32)
    return {"dtype": "float32", "shape": list(array.shape),
            "b64": base64.b64encode(array.astype("<f4").tobytes()).decode("ascii")}


def run(args):
    import numpy as np

    name, Interpreter, OpResolverType, version, problems = find_runtime(args.runtime)
    if name is None:
        raise RunnerError("no TFLite runtime is importable (%s)" % "; ".join(
            "%s: %s" % kv for kv in sorted(problems.items())), "no_runtime")
    kwargs = {"model_path": args.model}
    if args.threads is not None and args.threads > 0:
        kwargs["num_threads"] = args.threads
    if args.no_xnnpack:
        if OpResolverType is None:
            raise RunnerError("%s %s cannot disable XNNPACK (no OpResolverType)" % (name, version), "usage")
        kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES

    with _CaptureStderr() as cap:
        t0 = time.perf_counter()
        try:
            interp = Interpreter(**kwargs)
            interp.allocate_tensors()
        except Exception as exc:
            raise RunnerError("the runtime could not load the model: %s" % (str(exc).strip().splitlines() or [""])[0],
                              "model")
        load_s = time.perf_counter() - t0
        inputs = interp.get_input_details()
        outputs = interp.get_output_details()

        data_x = data_y = None
        if args.eval:
            with np.load(args.eval, allow_pickle=False) as data:
                if "x" not in data.files:
                    raise RunnerError("eval data %s has no array 'x'" % args.eval, "data")
                data_x = data["x"]
                data_y = data["y"] if "y" in data.files else None
            if len(inputs) != 1:
                raise RunnerError("eval data need a model with one input; this one has %d" % len(inputs), "data")
            want = tuple(int(d) for d in inputs[0]["shape"][1:])
            if tuple(data_x.shape[1:]) != want:
                raise RunnerError("eval x has samples of shape %s but the model input is %s"
                                  % (list(data_x.shape[1:]), list(inputs[0]["shape"])), "data")

        rng = np.random.RandomState(0)
        if data_x is not None and len(data_x):
            feed = [_quantize(np, data_x[:1], inputs[0])]
        else:
            feed = [_random_input(np, rng, d) for d in inputs]
        for d, value in zip(inputs, feed):
            interp.set_tensor(d["index"], value)
        t0 = time.perf_counter()
        try:
            interp.invoke()
        except Exception as exc:
            raise RunnerError("first inference failed: %s" % str(exc).strip(), "model")
        first_s = time.perf_counter() - t0
    log = cap.text
    xnnpack_active = ("XNNPACK delegate" in log) if log else None

    samples = []
    if not args.eval_only:
        # Warm-up like benchmark_model: at least N runs and at least min_warmup seconds.
        start = time.perf_counter()
        n = 0
        while n < args.warmup or (time.perf_counter() - start) < args.min_warmup_seconds:
            interp.invoke()
            n += 1
        warmup_runs = n
        invoke = interp.invoke
        clock = time.perf_counter
        append = samples.append
        start = clock()
        deadline_max = start + args.max_seconds
        while True:
            t0 = clock()
            invoke()
            t1 = clock()
            append(t1 - t0)
            if len(samples) >= args.runs and (t1 - start) >= args.min_seconds:
                break
            # Tiny models would otherwise record 10^5+ samples per second.
            if len(samples) >= max(args.max_runs, args.runs) or (t1 >= deadline_max and samples):
                break
    else:
        warmup_runs = 0

    result = {
        "ok": True,
        "mode": "run",
        "runner_version": RUNNER_VERSION,
        "runtime": {"name": name, "version": version, "threads": args.threads,
                    "xnnpack": not args.no_xnnpack, "xnnpack_active": xnnpack_active},
        "python": platform.python_version(),
        "numpy": np.__version__,
        "inputs": [{"name": d.get("name"), "shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                    "quantization": [float(d["quantization"][0]), int(d["quantization"][1])]} for d in inputs],
        "outputs": [{"name": d.get("name"), "shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                     "quantization": [float(d["quantization"][0]), int(d["quantization"][1])]} for d in outputs],
        "load_ms": load_s * 1e3,
        "first_inference_ms": first_s * 1e3,
        "warmup_runs": warmup_runs,
        "samples_ms": [round(s * 1e3, 5) for s in samples],
        "runtime_log": log[-4000:],
    }

    if data_x is not None:
        result["eval"] = _evaluate(np, interp, inputs, outputs, data_x, data_y, args.max_outputs)
    result["peak_rss_bytes"] = _peak_rss()
    return result


def _evaluate(np, interp, inputs, outputs, x, y, max_outputs):
    out0 = outputs[0]
    collected = []
    t0 = time.perf_counter()
    for i in range(len(x)):
        interp.set_tensor(inputs[0]["index"], _quantize(np, x[i:i + 1], inputs[0]))
        interp.invoke()
        collected.append(_dequantize(np, interp.get_tensor(out0["index"]), out0)[0])
    elapsed = time.perf_counter() - t0
    preds = np.stack(collected) if collected else np.zeros((0,), np.float32)
    ev = {"samples": int(len(x)), "seconds": elapsed, "accuracy": None, "mae": None, "task": None}
    if y is not None and len(y) == len(x):
        flat = preds.reshape(len(preds), -1)
        if y.dtype.kind in "iub" and flat.shape[1] > 1 and y.ndim == 1:
            ev["task"] = "classification"
            ev["accuracy"] = float(np.mean(np.argmax(flat, axis=1) == y.astype(np.int64)))
        elif y.ndim == 2 and y.shape[1] == flat.shape[1] and flat.shape[1] > 1 and y.dtype.kind in "iub":
            ev["task"] = "classification"
            ev["accuracy"] = float(np.mean(np.argmax(flat, axis=1) == np.argmax(y, axis=1)))
        else:
            ev["task"] = "regression"
            ev["mae"] = float(np.mean(np.abs(flat - y.reshape(len(y), -1).astype(np.float32))))
    if len(preds) <= max_outputs:
        ev["outputs"] = _encode(np, preds)
    else:
        ev["outputs"] = _encode(np, preds[:max_outputs])
        ev["outputs_truncated"] = True
    return ev


def _peak_rss():
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(rss if sys.platform == "darwin" else rss * 1024)


# ---------------------------------------------------------------------- main

def _parser():
    p = argparse.ArgumentParser(prog="runner.py", description="edgeq on-device runner")
    sub = p.add_subparsers(dest="mode")
    pr = sub.add_parser("probe")
    pr.add_argument("--dir")
    pr.add_argument("--have", action="append")
    ins = sub.add_parser("install")
    ins.add_argument("--item", nargs=3, action="append", metavar=("TMP", "FINAL", "SHA256"))
    lk = sub.add_parser("lock")
    lk.add_argument("--dir", required=True)
    lk.add_argument("--token", required=True)
    lk.add_argument("--owner")
    lk.add_argument("--stale-after", type=float)
    lk.add_argument("--break-token")
    ul = sub.add_parser("unlock")
    ul.add_argument("--dir", required=True)
    ul.add_argument("--token", required=True)
    ac = sub.add_parser("activate")
    ac.add_argument("--dir", required=True)
    ac.add_argument("--sha", required=True)
    ac.add_argument("--token", required=True)
    rb = sub.add_parser("rollback")
    rb.add_argument("--dir", required=True)
    rb.add_argument("--token", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--eval")
    r.add_argument("--runs", type=int, default=50)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--min-seconds", type=float, default=1.0)
    r.add_argument("--min-warmup-seconds", type=float, default=0.5)
    r.add_argument("--max-seconds", type=float, default=150.0)
    r.add_argument("--max-runs", type=int, default=10000)
    r.add_argument("--threads", type=int)
    r.add_argument("--no-xnnpack", action="store_true")
    r.add_argument("--runtime", choices=RUNTIMES)
    r.add_argument("--eval-only", action="store_true")
    r.add_argument("--max-outputs", type=int, default=100000)
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.mode == "probe":
            doc = probe(args)
        elif args.mode == "install":
            doc = install(args)
        elif args.mode in ("lock", "unlock", "activate", "rollback"):
            doc = {"lock": lock, "unlock": unlock, "activate": activate, "rollback": rollback}[args.mode](args)
        elif args.mode == "run":
            if not os.path.isfile(args.model):
                raise RunnerError("model file %s does not exist on the device" % args.model, "io")
            doc = run(args)
        else:
            raise RunnerError("no mode given; use probe, install, lock, unlock, activate, rollback or run", "usage")
    except RunnerError as exc:
        doc = {"ok": False, "error": str(exc), "kind": exc.kind}
    except (OSError, IOError) as exc:
        doc = {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc), "kind": "io"}
    except MemoryError:
        doc = {"ok": False, "error": "out of memory", "kind": "memory"}
    sys.stdout.write(json.dumps(doc))
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
