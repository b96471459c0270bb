"""edgeq's on-device runner: the only code that runs on the device.

Standard library + numpy + whichever TFLite runtime is importable
(``ai_edge_litert``, ``tflite_runtime``, ``tensorflow``; in that order).
Works on Python 3.8+, numpy 1.x and 2.x. Every mode prints ONE JSON document
on stdout; failures print ``{"ok": false, "error": ..., "kind": ...}`` and exit 2.

The host always sends this file on stdin (``python - MODE ...``); nothing
ever executes a runner file found on the device.

Modes:
  probe   [--dir DIR] [--have REL SHA ...]     device facts in one round trip; the sha256 of every file the
                                               host asks about (a corrupt file is then re-sent); with --prepare,
                                               DIR and DIR/{models,data,runner} made 0700 and checked
  install --item TMP FINAL SHA256 [...]        verify sha256 on the device, then rename
  run     --model PATH [--eval NPZ] [...]      load, time, evaluate (each under its own time cap)
  layers  --model PATH --eval NPZ --count N    every intermediate tensor for N inputs (bounded)
  lock    --dir DIR --token T --owner JSON     take the device lock (atomic rename of a complete lock
                                               directory) or report who holds it; [--ttl S] the holder's own
                                               deadline; --race-hook CMD is for tests only (runs CMD between
                                               reading a lock's owner and breaking it: the race under test)
  refresh --dir DIR --token T                  heartbeat: the lock is not stale while its holder refreshes it
  unlock  --dir DIR --token T                  release it (only if T holds it)
  activate --dir DIR --sha SHA --token T       point DIR/current at models/SHA (atomic rename) [--keep N]
  rollback --dir DIR --token T                 swap DIR/current and DIR/previous
  state   --dir DIR                            which model current and previous point at

Every directory edgeq uses on the device (DIR, models/, data/, runner/, lock)
must be a real directory (not a symlink), owned by this user and not writable
by group or others; edgeq creates them 0700.

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
import errno
import glob
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import stat
import shlex
import subprocess
import sys
import tempfile
import time

RUNTIMES = ("ai_edge_litert", "tflite_runtime", "tensorflow")
RUNNER_VERSION = 3
SUBDIRS = ("models", "data", "runner")


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


# ------------------------------------------------------------ safe directories

def _remote_dir(text):
    if not text or not text.strip():
        raise RunnerError("the remote directory is empty", "usage")
    return os.path.abspath(os.path.expanduser(text))


def _check_dir(path, st):
    if stat.S_ISLNK(st.st_mode):
        raise RunnerError("%s is a symlink; edgeq refuses to follow it (remove the link, or pass a --remote-dir "
                          "that is a real directory of your own)" % path, "unsafe")
    if not stat.S_ISDIR(st.st_mode):
        raise RunnerError("%s is not a directory (remove it or pass another --remote-dir)" % path, "unsafe")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise RunnerError("%s is owned by uid %d, not by this user (uid %d); use a --remote-dir of your own"
                          % (path, st.st_uid, os.geteuid()), "unsafe")
    if st.st_mode & 0o022:
        raise RunnerError("%s is writable by group or others (mode %o); run `chmod go-w %s` on the device or use "
                          "another --remote-dir" % (path, stat.S_IMODE(st.st_mode), path), "unsafe")


def safe_dir(path, create=True):
    """Check (and with ``create`` make, mode 0700) a directory edgeq owns; never through a symlink."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT or not create:
            if exc.errno == errno.ENOENT:
                return False
            raise RunnerError("cannot inspect %s: %s" % (path, exc.strerror or exc), "io")
        parent = os.path.dirname(path)
        try:
            if parent and not os.path.isdir(parent):
                os.makedirs(parent, 0o700)
            os.mkdir(path, 0o700)
        except OSError as exc2:
            if exc2.errno != errno.EEXIST:
                raise RunnerError("cannot create %s: %s" % (path, exc2.strerror or exc2), "io")
        st = os.lstat(path)
    _check_dir(path, st)
    return True


def safe_layout(remote_dir, create=True):
    """DIR and DIR/{models,data,runner}, each checked; returns ``remote_dir``."""
    if not safe_dir(remote_dir, create):
        return remote_dir
    for sub in SUBDIRS:
        safe_dir(os.path.join(remote_dir, sub), create)
    return remote_dir


def _file_sha(path):
    """sha256 of a regular file (never through a symlink), or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    try:
        return _sha256(path, sync=False)
    except (OSError, IOError):
        return None


def probe(args):
    remote_dir = _remote_dir(args.dir) if args.dir is not None else None
    if remote_dir and args.prepare:
        safe_layout(remote_dir)
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
    for rel, _expected in args.have or []:
        if not remote_dir or rel.startswith("/") or ".." in rel.split("/"):
            raise RunnerError("not a path inside the remote directory: %r" % rel, "usage")
        full = os.path.join(remote_dir, rel)
        have[rel] = _file_sha(full)
        if args.prepare:
            # models/<sha>/ made here, 0700, so the upload lands in a directory of ours.
            safe_dir(os.path.dirname(full))
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

def _sha256(path, sync=True):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def install(args):
    done = []
    for tmp, final, expected in args.item or []:
        try:
            st = os.lstat(tmp)
            if not stat.S_ISREG(st.st_mode):
                raise RunnerError("uploaded file %s is not a regular file" % tmp, "io")
            _check_dir(os.path.dirname(final), os.lstat(os.path.dirname(final)))
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
HEARTBEAT_FILE = "heartbeat"


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


def _suffix():
    return base64.b16encode(os.urandom(6)).decode().lower()


def _lock_owner(lock_dir):
    """The owner document of a lock directory, with its age (since its last heartbeat) on the device clock."""
    path = os.path.join(lock_dir, OWNER_FILE)
    doc = None
    try:
        with open(path) as f:
            doc = json.loads(f.read(65536))
    except (OSError, IOError, ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        doc = {}
    try:
        since = float(doc.get("since")) if doc.get("since") is not None else os.stat(lock_dir).st_mtime
    except (OSError, TypeError, ValueError):
        since = time.time()
    try:
        since = max(since, os.stat(os.path.join(lock_dir, HEARTBEAT_FILE)).st_mtime)
    except OSError:
        pass
    doc["age_s"] = round(max(0.0, time.time() - since), 3)
    return doc


def _stale_after(owner, stale_after):
    """A lock is stale after ``stale_after`` s without a heartbeat, or after its holder's own deadline if longer."""
    ttl = owner.get("ttl_s")
    if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl == ttl and 0 < ttl < 10 ** 7:
        return max(stale_after, float(ttl))
    return stale_after


def _sweep(remote_dir):
    """Remove what a killed deploy left behind: temp uploads, temp links, broken locks. Never follows a symlink."""
    removed = 0
    for sub in SUBDIRS:
        top = os.path.join(remote_dir, sub)
        try:
            _check_dir(top, os.lstat(top))
        except (OSError, RunnerError):
            continue
        for root, dirs, files in os.walk(top, followlinks=False):
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
            for name in files:
                full = os.path.join(root, name)
                if ".tmp-" in name and not os.path.islink(full):
                    _unlink(full)
                    removed += 1
    for name in os.listdir(remote_dir):
        full = os.path.join(remote_dir, name)
        if name.startswith((".current.tmp-", ".previous.tmp-")):
            _unlink(full)
            removed += 1
        elif name.startswith((LOCK_NAME + ".stale-", LOCK_NAME + ".new-")) and not os.path.islink(full):
            # Another deploy may be between steps with these right now: only old ones are leftovers.
            try:
                if time.time() - os.lstat(full).st_mtime < 300:
                    continue
            except OSError:
                continue
            shutil.rmtree(full, ignore_errors=True)
            removed += 1
    return removed


def _new_lock_dir(remote_dir, owner):
    """A complete lock directory (owner.json inside) at a temporary name, ready to be renamed into place."""
    tmp_dir = os.path.join(remote_dir, "%s.new-%s" % (LOCK_NAME, _suffix()))
    try:
        os.mkdir(tmp_dir, 0o700)
        with open(os.path.join(tmp_dir, OWNER_FILE), "w") as f:
            json.dump(owner, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, IOError) as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise RunnerError("cannot write the lock owner in %s: %s (is the disk full?)"
                          % (remote_dir, getattr(exc, "strerror", None) or exc), "io")
    return tmp_dir


def _take(tmp_dir, lock_dir):
    """Rename the complete lock directory into place; False when a (non-empty) lock is already there."""
    try:
        os.rename(tmp_dir, lock_dir)
        return True
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            return False
        raise RunnerError("cannot create the lock %s: %s" % (lock_dir, exc.strerror or exc), "io")


def _break(lock_dir, stale_token):
    """Move a stale lock aside, atomically; only if the directory moved is the one judged stale.

    Two deploys that both saw the same stale lock race here: the first rename
    wins; a second rename that grabbed a *fresh* lock (whose token differs) is
    put back at once, so at most one deploy ever holds the lock.
    """
    aside = "%s.stale-%s" % (lock_dir, _suffix())
    try:
        os.rename(lock_dir, aside)
    except OSError:
        return False
    if _lock_owner(aside).get("token") != stale_token:
        try:
            os.rename(aside, lock_dir)  # fails (non-empty target) only if a third deploy holds it by now
        except OSError:
            pass
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


def lock(args):
    remote_dir = safe_layout(_remote_dir(args.dir))
    lock_dir = os.path.join(remote_dir, LOCK_NAME)
    try:
        owner = json.loads(args.owner) if args.owner else {}
    except ValueError:
        raise RunnerError("--owner is not JSON", "usage")
    if not isinstance(owner, dict):
        raise RunnerError("--owner is not a JSON object", "usage")
    owner.update({"token": args.token, "since": time.time(), "device_pid": os.getpid()})
    if args.ttl is not None:
        owner["ttl_s"] = float(args.ttl)
    tmp_dir = _new_lock_dir(remote_dir, owner)
    broke = None
    try:
        for _attempt in range(3):
            if os.path.islink(lock_dir):
                raise RunnerError("%s is a symlink; edgeq refuses to follow it (remove it)" % lock_dir, "unsafe")
            if _take(tmp_dir, lock_dir):
                tmp_dir = None
                _fsync_dir(remote_dir)
                return {"ok": True, "mode": "lock", "remote_dir": remote_dir, "broke_stale": broke,
                        "swept": _sweep(remote_dir)}
            current = _lock_owner(lock_dir)
            if args.race_hook:  # tests only: run a command (an argv, no shell) between reading and breaking
                subprocess.call(shlex.split(args.race_hook), stdout=subprocess.DEVNULL)
            limit = _stale_after(current, args.stale_after) if args.stale_after is not None else None
            stale = limit is not None and current["age_s"] > limit
            gone = bool(args.break_token) and current.get("token") == args.break_token
            if broke is None and (stale or gone) and current.get("token"):
                if _break(lock_dir, current.get("token")):
                    broke = current
                    broke["reason"] = ("older than %g s" % limit) if stale else "its holder is gone"
                continue
            return {"ok": False, "kind": "busy", "error": "the device is locked by another deploy",
                    "owner": current, "remote_dir": remote_dir}
        return {"ok": False, "kind": "busy", "error": "the device lock changed hands while breaking a stale one",
                "owner": _lock_owner(lock_dir), "remote_dir": remote_dir}
    finally:
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _holds(lock_dir, token):
    return bool(token) and _lock_owner(lock_dir).get("token") == token


def refresh(args):
    remote_dir = safe_layout(_remote_dir(args.dir), create=False)
    _guard(remote_dir, args.token)
    _heartbeat(remote_dir)
    return {"ok": True, "mode": "refresh"}


def _heartbeat(remote_dir):
    path = os.path.join(remote_dir, LOCK_NAME, HEARTBEAT_FILE)
    try:
        with open(path, "a"):
            pass
        os.utime(path, None)
    except (OSError, IOError):
        pass  # a full disk must not fail the deploy; the holder's ttl still protects the lock


def unlock(args):
    remote_dir = _remote_dir(args.dir)
    lock_dir = os.path.join(remote_dir, LOCK_NAME)
    if os.path.islink(lock_dir) or not os.path.isdir(lock_dir):
        return {"ok": True, "mode": "unlock", "released": False}
    if not _holds(lock_dir, args.token):
        return {"ok": False, "kind": "lock", "error": "the lock is held by another deploy; not releasing it"}
    aside = "%s.stale-%s" % (lock_dir, _suffix())
    try:
        os.rename(lock_dir, aside)  # atomic: the lock is gone at once, the rest is cleanup
    except OSError as exc:
        raise RunnerError("cannot release the lock %s: %s" % (lock_dir, exc.strerror or exc), "io")
    shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(remote_dir)
    return {"ok": True, "mode": "unlock", "released": not os.path.exists(lock_dir)}


def _link_sha(remote_dir, name):
    try:
        target = os.readlink(os.path.join(remote_dir, name))
    except OSError:
        return None
    parts = target.rstrip("/").split("/")
    return parts[-1] if len(parts) == 2 and parts[0] == "models" and _is_sha(parts[-1]) else None


def activation_state(remote_dir):
    """Which model ``current`` and ``previous`` point at (sha256 or None)."""
    return {"current": _link_sha(remote_dir, "current"), "previous": _link_sha(remote_dir, "previous")}


def _new_link(remote_dir, name, sha):
    tmp = os.path.join(remote_dir, ".%s.tmp-%s" % (name, _suffix()))
    try:
        os.symlink("models/" + sha, tmp)
    except OSError as exc:
        _unlink(tmp)
        raise RunnerError("cannot create a link to %s: %s" % (sha[:12], exc.strerror or exc), "io")
    return tmp


def _switch(remote_dir, name, sha):
    """Point ``remote_dir/name`` at ``models/sha`` atomically: new link at a temp name, renamed over."""
    tmp = _new_link(remote_dir, name, sha)
    try:
        os.replace(tmp, os.path.join(remote_dir, name))
    except OSError as exc:
        _unlink(tmp)
        raise RunnerError("cannot switch %s to %s: %s" % (name, sha[:12], exc.strerror or exc), "io")
    _fsync_dir(remote_dir)


def _switch_both(remote_dir, current_sha, previous_sha):
    """Set current and previous together: both new links are made first (the step a full disk fails), so a
    failure leaves both old links as they were; then two renames, which need no space."""
    new_cur = _new_link(remote_dir, "current", current_sha)
    new_prev = None
    try:
        if previous_sha:
            new_prev = _new_link(remote_dir, "previous", previous_sha)
        os.replace(new_cur, os.path.join(remote_dir, "current"))
        new_cur = None
        if new_prev:
            os.replace(new_prev, os.path.join(remote_dir, "previous"))
            new_prev = None
    except OSError as exc:
        raise RunnerError("cannot switch to %s: %s" % (current_sha[:12], exc.strerror or exc), "io")
    finally:
        for tmp in (new_cur, new_prev):
            if tmp:
                _unlink(tmp)
        _fsync_dir(remote_dir)


def _is_sha(text):
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _guard(remote_dir, token):
    lock_dir = os.path.join(remote_dir, LOCK_NAME)
    if os.path.islink(lock_dir) or not _holds(lock_dir, token):
        raise RunnerError("this deploy no longer holds the device lock (another deploy broke it as stale)", "lock")


def prune(remote_dir, keep, protect):
    """Delete all but the ``keep`` newest models (and those in ``protect``); never through a symlink."""
    models = os.path.join(remote_dir, "models")
    entries = []
    for name in os.listdir(models):
        full = os.path.join(models, name)
        try:
            st = os.lstat(full)
        except OSError:
            continue
        if _is_sha(name) and stat.S_ISDIR(st.st_mode):
            entries.append((st.st_mtime, name))
    entries.sort(reverse=True)
    kept = set(n for _t, n in entries[:max(0, keep)]) | set(p for p in protect if p)
    removed = []
    for _t, name in entries:
        if name not in kept:
            aside = os.path.join(models, "%s.tmp-prune-%s" % (name, _suffix()))
            try:
                os.rename(os.path.join(models, name), aside)
            except OSError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
            removed.append(name)
    return sorted(removed)


def activate(args):
    remote_dir = safe_layout(_remote_dir(args.dir), create=False)
    if not _is_sha(args.sha):
        raise RunnerError("not a sha256: %r" % args.sha, "usage")
    _guard(remote_dir, args.token)
    model = os.path.join(remote_dir, "models", args.sha, "model.tflite")
    actual = _file_sha(model)
    if actual != args.sha:
        raise RunnerError("%s does not match its sha256 (got %s); not activating it" % (model, actual), "checksum")
    before = activation_state(remote_dir)
    switched = before["current"] != args.sha
    if switched:
        _switch_both(remote_dir, args.sha, before["current"])
    try:
        os.utime(os.path.join(remote_dir, "models", args.sha), None)  # newest, for --keep
    except OSError:
        pass
    after = activation_state(remote_dir)
    pruned = []
    if args.keep is not None:
        pruned = prune(remote_dir, args.keep, (after["current"], after["previous"]))
    return {"ok": True, "mode": "activate", "switched": switched, "active": after["current"],
            "previous": after["previous"], "before": before, "pruned": pruned}


def rollback(args):
    remote_dir = safe_layout(_remote_dir(args.dir), create=False)
    _guard(remote_dir, args.token)
    before = activation_state(remote_dir)
    prev = before["previous"]
    if not prev:
        raise RunnerError("there is no previous model in %s to roll back to" % remote_dir, "rollback")
    if _file_sha(os.path.join(remote_dir, "models", prev, "model.tflite")) != prev:
        raise RunnerError("the previous model %s is missing or corrupt in %s/models" % (prev[:12], remote_dir),
                          "rollback")
    _switch_both(remote_dir, prev, before["current"])
    after = activation_state(remote_dir)
    return {"ok": True, "mode": "rollback", "switched": True, "active": after["current"],
            "previous": after["previous"], "before": before}


def state(args):
    remote_dir = _remote_dir(args.dir)
    return {"ok": True, "mode": "state", "remote_dir": remote_dir, "activation": activation_state(remote_dir)}


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
            data_x, data_y = _load_eval(np, args.eval)
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
        _invoke(interp, "the first inference")
        first_s = time.perf_counter() - t0
    log = cap.text
    xnnpack_active = ("XNNPACK delegate" in log) if log else None

    samples = []
    if not args.eval_only:
        # Warm-up like benchmark_model: at least N runs and at least min_warmup seconds.
        start = time.perf_counter()
        n = 0
        while n < args.warmup or (time.perf_counter() - start) < args.min_warmup_seconds:
            _invoke(interp, "a warm-up inference")
            n += 1
        warmup_runs = n
        invoke = interp.invoke
        clock = time.perf_counter
        try:
            invoke()  # one checked call; the timed loop below stays lean
        except Exception as exc:
            raise RunnerError("an inference failed: %s" % _first_line(exc), "model")
        append = samples.append
        start = clock()
        deadline_max = start + args.max_seconds
        while True:
            t0 = clock()
            try:
                invoke()
            except Exception as exc:
                raise RunnerError("an inference failed after %d timed runs: %s" % (len(samples), _first_line(exc)),
                                  "model")
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
        result["eval"] = _evaluate(np, interp, inputs, outputs, data_x, data_y, args.max_outputs,
                                   args.max_eval_seconds)
    result["peak_rss_bytes"] = _peak_rss()
    return result


def _first_line(exc):
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text[:500]


def _invoke(interp, what):
    try:
        interp.invoke()
    except Exception as exc:
        raise RunnerError("%s failed: %s" % (what, _first_line(exc)), "model")


def _load_eval(np, path):
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise RunnerError("eval data %s is not an .npz archive" % path, "data")
            if "x" not in data.files:
                raise RunnerError("eval data %s has no array 'x'" % path, "data")
            x = data["x"]
            y = data["y"] if "y" in data.files else None
    except RunnerError:
        raise
    except Exception as exc:  # a corrupt zip, an object array, a truncated file
        raise RunnerError("cannot read eval data %s: %s" % (path, _first_line(exc)), "data")
    if x.ndim < 1 or x.dtype.kind not in "iufb":
        raise RunnerError("eval x in %s is not a numeric array with samples on the first axis" % path, "data")
    if y is not None and (y.ndim < 1 or y.dtype.kind not in "iufb"):
        raise RunnerError("eval y in %s is not a numeric array" % path, "data")
    return x, y


def _evaluate(np, interp, inputs, outputs, x, y, max_outputs, max_seconds=None):
    out0 = outputs[0]
    collected = []
    t0 = time.perf_counter()
    for i in range(len(x)):
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            raise RunnerError("evaluation took longer than its cap of %g s (%d of %d samples done); use fewer "
                              "eval samples or raise the cap" % (max_seconds, i, len(x)), "eval_timeout")
        interp.set_tensor(inputs[0]["index"], _quantize(np, x[i:i + 1], inputs[0]))
        _invoke(interp, "inference on eval sample %d" % i)
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
    # Bounded output: at most max_outputs values in all (the host keeps only so much of stdout).
    per = int(np.prod(preds.shape[1:])) if preds.ndim > 1 else 1
    rows = max(0, max_outputs // max(1, per))
    if len(preds) <= rows:
        ev["outputs"] = _encode(np, preds)
    else:
        ev["outputs"] = _encode(np, preds[:rows])
        ev["outputs_truncated"] = True
    return ev


LAYER_DTYPES = ("int8", "uint8", "int16", "int32", "int64", "float16", "float32", "bool")


def layers(args):
    """Every requested intermediate tensor for the first --count eval inputs (raw values, bounded)."""
    import numpy as np

    name, Interpreter, OpResolverType, version, problems = find_runtime(args.runtime)
    if name is None:
        raise RunnerError("no TFLite runtime is importable (%s)" % "; ".join(
            "%s: %s" % kv for kv in sorted(problems.items())), "no_runtime")
    kwargs = {"model_path": args.model, "experimental_preserve_all_tensors": True}
    # Intermediate tensors exist only on the runtime's own kernels (a delegate fuses them away).
    if OpResolverType is not None:
        kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with _CaptureStderr():
        try:
            interp = Interpreter(**kwargs)
            interp.allocate_tensors()
        except TypeError:
            raise RunnerError("%s %s cannot keep intermediate tensors" % (name, version), "usage")
        except Exception as exc:
            raise RunnerError("the runtime could not load the model: %s" % _first_line(exc), "model")
    inputs = interp.get_input_details()
    if len(inputs) != 1:
        raise RunnerError("the layer diff needs a model with one input; this one has %d" % len(inputs), "data")
    x, _y = _load_eval(np, args.eval)
    want = tuple(int(d) for d in inputs[0]["shape"][1:])
    if tuple(x.shape[1:]) != want:
        raise RunnerError("eval x has samples of shape %s but the model input is %s"
                          % (list(x.shape[1:]), list(inputs[0]["shape"])), "data")
    count = max(0, min(args.count, len(x)))
    details = dict((d["index"], d) for d in interp.get_tensor_details())
    known = set(details)
    ops = []
    get_ops = getattr(interp, "_get_ops_details", None)
    if get_ops is not None:
        for op in get_ops()[:100000]:
            ops.append({"index": int(op["index"]), "op": str(op["op_name"])[:64],
                        "outputs": [int(t) for t in op["outputs"] if int(t) >= 0][:64]})
    if args.tensors:
        try:
            wanted = [int(t) for t in args.tensors.split(",") if t.strip()]
        except ValueError:
            raise RunnerError("--tensors is not a list of tensor indices", "usage")
    else:
        wanted = sorted(known)
    wanted = [t for t in wanted if t in known]
    values = dict((t, []) for t in wanted)
    total = 0
    for i in range(count):
        interp.set_tensor(inputs[0]["index"], _quantize(np, x[i:i + 1], inputs[0]))
        _invoke(interp, "inference on eval sample %d" % i)
        for t in wanted:
            try:
                v = interp.get_tensor(t)
            except ValueError:
                continue  # a tensor without data (e.g. an unused optional input)
            if v.dtype.name not in LAYER_DTYPES:
                continue
            total += int(v.nbytes)
            if total > args.max_bytes:
                raise RunnerError("the intermediate tensors of %d inputs hold more than %d bytes; use fewer "
                                  "inputs" % (count, args.max_bytes), "limit")
            values[t].append(np.array(v, copy=True))
    tensors = []
    for t in wanted:
        if len(values[t]) != count or not count:
            continue
        arr = np.stack(values[t])
        arr = arr.astype(arr.dtype.newbyteorder("<"))
        d = details[t]
        q = d.get("quantization") or (0.0, 0)
        tensors.append({"index": t, "name": str(d.get("name") or "")[:1024], "dtype": arr.dtype.name,
                        "shape": [int(n) for n in arr.shape],
                        "quantization": [float(q[0]), int(q[1])],
                        "b64": base64.b64encode(arr.tobytes()).decode("ascii")})
    return {"ok": True, "mode": "layers", "runner_version": RUNNER_VERSION,
            "runtime": {"name": name, "version": version, "xnnpack": False}, "samples": count, "tensors": tensors,
            "ops": ops}


def _peak_rss():
    # Linux carries ru_maxrss across exec, so a runner started by a large process (a local device
    # under an edgeq holding TensorFlow) would report its parent's peak. VmHWM is this process's own.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(rss if sys.platform == "darwin" else rss * 1024)


# ---------------------------------------------------------------------- main

class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting: a bad argument is one JSON document too."""

    def error(self, message):
        raise RunnerError("bad arguments: %s" % message, "usage")

    def exit(self, status=0, message=None):
        raise RunnerError("bad arguments: %s" % (message or "exit"), "usage")


def _parser():
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
    rf = sub.add_parser("refresh", add_help=False)
    rf.add_argument("--dir", required=True)
    rf.add_argument("--token", required=True)
    st = sub.add_parser("state", add_help=False)
    st.add_argument("--dir", required=True)
    ul = sub.add_parser("unlock", add_help=False)
    ul.add_argument("--dir", required=True)
    ul.add_argument("--token", required=True)
    ac = sub.add_parser("activate", add_help=False)
    ac.add_argument("--dir", required=True)
    ac.add_argument("--sha", required=True)
    ac.add_argument("--token", required=True)
    ac.add_argument("--keep", type=int)
    rb = sub.add_parser("rollback", add_help=False)
    rb.add_argument("--dir", required=True)
    rb.add_argument("--token", required=True)
    r = sub.add_parser("run", add_help=False)
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
    r.add_argument("--max-eval-seconds", type=float)
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


def _self_deadline(seconds):
    """Die by SIGALRM after ``seconds``: a runner whose host gave up (or lost the link) does not run on."""
    if seconds is None or seconds <= 0 or not hasattr(signal, "setitimer"):
        return
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def main(argv=None):
    try:
        args = _parser().parse_args(argv)
        if getattr(args, "deadline", None):
            _self_deadline(args.deadline)
        modes = {"probe": probe, "install": install, "lock": lock, "unlock": unlock, "refresh": refresh,
                 "activate": activate, "rollback": rollback, "state": state, "run": None, "layers": None}
        if args.mode in ("run", "layers"):
            if not os.path.isfile(args.model):
                raise RunnerError("model file %s does not exist on the device" % args.model, "io")
            if args.mode == "run" and args.dir and args.token:
                remote_dir = _remote_dir(args.dir)
                if _holds(os.path.join(remote_dir, LOCK_NAME), args.token):
                    _heartbeat(remote_dir)
            doc = run(args) if args.mode == "run" else layers(args)
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
        doc = {"ok": False, "error": "runner error: %s: %s" % (type(exc).__name__, _first_line(exc)),
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
