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
# directory, the protocol module installed as ``edgeq_protocol``) and must import nothing before it.
import sys

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
import tempfile
import time

try:
    import edgeq_protocol as protocol  # sent ahead of this file (protocol.standalone) or set up by the collection
except ImportError:
    try:
        from edgeq._device import protocol  # imported as a module of edgeq
    except ImportError:
        import protocol  # run as a script beside it (deploy/runner.py, tests)

RUNTIMES = protocol.RUNTIMES
RunnerError = protocol.RunnerError
RUNNER_VERSION = 3
SUBDIRS = ("models", "data", "runner")


NPZ_MAX_BYTES = 1 << 30  # what an eval .npz may declare in total once loaded (documented in the README)
NPZ_BOMB_FLOOR = 64 << 20  # above this, an array packed more than NPZ_MAX_RATIO times is a bomb: real data
NPZ_MAX_RATIO = 100        # (images, features) compresses a few times, zeros a thousand times


def _npy_declared(f, where, not_npy="is not an .npy array"):
    """Bytes the .npy header at the start of the file object ``f`` declares (no data is read or allocated);
    ``RunnerError`` ("data") naming ``where`` when it is not a plain numeric array. Standard library only."""
    import ast
    import re
    import struct

    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != b"\x93NUMPY" or magic[6:7] not in (b"\x01", b"\x02", b"\x03"):
        raise RunnerError("eval data %s %s" % (where, not_npy), "data")
    fmt = "<H" if magic[6:7] == b"\x01" else "<I"
    size = struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if size > 10000:
        raise RunnerError("eval data %s has a %d-byte header" % (where, size), "data")
    header = ast.literal_eval(f.read(size).decode("latin1"))
    descr = header.get("descr") if isinstance(header, dict) else None
    shape = header.get("shape") if isinstance(header, dict) else None
    m = re.match(r"^[<>|=]?([iufb])(\d+)$", descr) if isinstance(descr, str) else None
    if (m is None or not isinstance(shape, tuple)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise RunnerError("eval data %s is not a plain numeric array" % where, "data")
    declared = int(m.group(2))
    for d in shape:
        declared *= d
    return declared


def _npz_declared_bytes(path, limit=NPZ_MAX_BYTES):
    """Bytes the arrays of the .npz at ``path`` declare, read from each member's .npy header (no data is
    decompressed); ``RunnerError`` ("data") naming the file, the member and the sizes when a member declares
    more than it holds (a zip bomb) or the total passes ``limit``. Standard library only."""
    import zipfile

    total = 0
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as member:
                    declared = _npy_declared(member, "%s member %s" % (path, info.filename))
                if declared > info.file_size or (declared > NPZ_BOMB_FLOOR
                                                 and declared > NPZ_MAX_RATIO * max(info.compress_size, 1)):
                    raise RunnerError("eval data %s: member %s declares %d bytes from %d compressed (%d in the "
                                      "archive's directory): a zip bomb or a damaged file"
                                      % (path, info.filename, declared, info.compress_size, info.file_size), "data")
                total += declared
                if total > limit:
                    raise RunnerError("eval data %s: its arrays declare %d bytes by member %s, more than the limit "
                                      "of %d" % (path, total, info.filename, limit), "data")
    except RunnerError:
        raise
    except Exception as exc:  # a corrupt zip, a header that is not a literal
        raise RunnerError("cannot read eval data %s: %s" % (path, str(exc).splitlines()[0][:200] if str(exc) else
                                                            type(exc).__name__), "data")
    return total


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


def file_sha(path):
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
        have[rel] = file_sha(full)
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
CLOCK_SLACK_S = 60.0  # a lock time further ahead than this was written by a clock that has since gone back


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


def _boot_clock():
    """(boot id, seconds since boot) from /proc, or (None, None) where it does not say. Neither moves with the
    wall clock: NTP, a fake-hwclock restore or a hand-set date leave them alone."""
    boot = (_read("/proc/sys/kernel/random/boot_id", 64) or "").strip()
    try:
        up = float((_read("/proc/uptime", 64) or "").split()[0])
    except (IndexError, ValueError):
        up = None
    if not boot or up is None or not 0 <= up < 1e10:
        return None, None
    return boot, up


def _mark_age(wall, boot, up, now, boot_now, up_now):
    """Seconds since one lock timestamp (the lock's taking or a heartbeat), judged without trusting the wall clock
    to have only gone forward.

    Same boot: the device's uptime then and now (monotonic). An earlier boot: the lock is at least as old as this
    boot. Otherwise the wall clock; a time more than CLOCK_SLACK_S in the future was written by a clock that has
    since gone back and dates nothing, so the lock counts as old as this boot (or stays fresh where the device's
    uptime is unknown)."""
    wall_age = None if wall is None else now - wall
    if wall_age is not None and wall_age < -CLOCK_SLACK_S:
        wall_age = None
    if boot_now is not None:
        if boot == boot_now and up is not None:
            return max(0.0, up_now - up)
        if (boot and boot != boot_now) or wall_age is None:  # an earlier boot, or a time from the future
            return max(up_now, wall_age or 0.0)
    return max(0.0, wall_age or 0.0)


def _lock_owner(lock_dir):
    """The owner document of a lock directory, with its age (since it was taken or last refreshed) in ``age_s``."""
    path = os.path.join(lock_dir, OWNER_FILE)
    doc = None
    try:
        with open(path) as f:
            doc = json.loads(f.read(65536))
    except (OSError, IOError, ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        doc = {}
    now = time.time()
    boot_now, up_now = _boot_clock()
    since = protocol.bounded_seconds(doc.get("since"))
    if since is None:
        try:
            since = os.stat(lock_dir).st_mtime
        except OSError:
            since = now
    boot = doc.get("boot_id") if isinstance(doc.get("boot_id"), str) else None
    ages = [_mark_age(since, boot, protocol.bounded_seconds(doc.get("uptime_s")), now, boot_now, up_now)]
    beat_path = os.path.join(lock_dir, HEARTBEAT_FILE)
    try:
        beat_wall = os.stat(beat_path).st_mtime
    except OSError:
        beat_wall = None
    if beat_wall is not None:
        beat = None
        try:
            with open(beat_path) as f:
                beat = json.loads(f.read(4096) or "null")
        except (OSError, IOError, ValueError, RecursionError):
            beat = None
        if not isinstance(beat, dict):
            beat = {}
        beat_boot = beat.get("boot_id") if isinstance(beat.get("boot_id"), str) else None
        ages.append(_mark_age(beat_wall, beat_boot, protocol.bounded_seconds(beat.get("uptime_s")), now, boot_now, up_now))
    doc["age_s"] = round(min(ages), 3)
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
    boot, up = _boot_clock()  # the lock's age is judged on these where the device has them (not the wall clock)
    owner.update({"token": args.token, "since": time.time(), "device_pid": os.getpid(), "boot_id": boot,
                  "uptime_s": up})
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
    """Mark the lock as alive now: the file's time (wall clock) and, inside it, the boot id and uptime."""
    path = os.path.join(remote_dir, LOCK_NAME, HEARTBEAT_FILE)
    boot, up = _boot_clock()
    tmp = "%s.tmp-%s" % (path, _suffix())
    try:
        with open(tmp, "w") as f:
            json.dump({"boot_id": boot, "uptime_s": up}, f)
        os.rename(tmp, path)
    except (OSError, IOError):
        _unlink(tmp)
        try:  # a full disk: at least the file's time moves
            os.utime(path, None)
        except OSError:
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
    return parts[-1] if len(parts) == 2 and parts[0] == "models" and protocol.is_sha(parts[-1]) else None


PREVIOUS_RECORD = "previous"  # models/<sha>/previous: the model that was current when <sha> was made current


def _recorded_previous(remote_dir, sha):
    """(True, sha256 or None) from ``models/<sha>/previous``; (False, None) when there is no readable record
    (a model activated by an edgeq from before the record)."""
    path = os.path.join(remote_dir, "models", sha, PREVIOUS_RECORD)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False, None
        with open(path) as f:
            text = f.read(128).strip()
    except (OSError, IOError, ValueError):
        return False, None
    if not text:
        return True, None
    return (True, text) if protocol.is_sha(text) else (False, None)


def record_previous(remote_dir, sha, previous):
    """Write ``models/<sha>/previous`` (temp file, fsync, rename): read only once ``current`` points at sha."""
    folder = os.path.join(remote_dir, "models", sha)
    safe_dir(folder, create=False)
    path = os.path.join(folder, PREVIOUS_RECORD)
    tmp = "%s.tmp-%s" % (path, _suffix())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write((previous or "") + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, IOError) as exc:
        _unlink(tmp)
        raise RunnerError("cannot record the previous model in %s: %s" % (folder, exc.strerror or exc), "io")
    _fsync_dir(folder)


def _foreign(remote_dir):
    """What ``current`` is when edgeq did not make it (a link outside models/, a file, a directory); else None."""
    path = os.path.join(remote_dir, "current")
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISLNK(st.st_mode):
        return "a directory" if stat.S_ISDIR(st.st_mode) else "a file, not a link"
    if _link_sha(remote_dir, "current"):
        return None
    try:
        return "a link to %s" % os.readlink(path)[:512]
    except OSError:
        return "a link"


def activation_state(remote_dir):
    """Which model is current and which previous (sha256 or None); ``foreign`` says what ``current`` is when
    edgeq did not make it.

    ``current`` (the link applications load) is the one commit point: the model it names carries its own
    ``previous`` record, written before the switch, so one rename changes both. A model activated by an older
    edgeq has no record; then the ``previous`` link is read (that layout keeps working)."""
    current = _link_sha(remote_dir, "current")
    doc = {"current": current, "previous": None}
    known = False
    if current:
        known, doc["previous"] = _recorded_previous(remote_dir, current)
    if not known:
        doc["previous"] = _link_sha(remote_dir, "previous")
    foreign = None if current else _foreign(remote_dir)
    if foreign:
        doc["foreign"] = foreign
    return doc


def _refuse_foreign(remote_dir, state, what):
    if state.get("foreign"):
        cur = os.path.join(remote_dir, "current")
        raise RunnerError("%s is %s, not a model edgeq deployed; edgeq will not %s over it: move it aside "
                          "(mv %s %s.mine) or use another --remote-dir" % (cur, state["foreign"], what, cur, cur),
                          "foreign")


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
    """Make ``current_sha`` current with ``previous_sha`` as its previous, in one atomic step.

    Every new file is made first (the steps a full disk fails), so a failure changes nothing: the previous
    record beside the new model (not read while that model is not current) and the new links. Then ``current``
    is renamed over, the one commit: a crash before it leaves the old pair, after it the new pair. The
    ``previous`` link is refreshed last, for readers of the older layout; the record is what counts."""
    record_previous(remote_dir, current_sha, previous_sha)
    new_cur = _new_link(remote_dir, "current", current_sha)
    new_prev = None
    committed = False
    try:
        if previous_sha:
            new_prev = _new_link(remote_dir, "previous", previous_sha)
        os.replace(new_cur, os.path.join(remote_dir, "current"))
        committed = True
    except OSError as exc:
        raise RunnerError("cannot switch to %s: %s" % (current_sha[:12], exc.strerror or exc), "io")
    finally:
        if not committed:
            for tmp in (new_cur, new_prev):
                if tmp:
                    _unlink(tmp)
    _fsync_dir(remote_dir)
    prev_link = os.path.join(remote_dir, "previous")
    try:
        if new_prev:
            os.replace(new_prev, prev_link)
        elif os.path.islink(prev_link):
            os.unlink(prev_link)
    except OSError:
        if new_prev:
            _unlink(new_prev)
    _fsync_dir(remote_dir)


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
        if protocol.is_sha(name) and stat.S_ISDIR(st.st_mode):
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
    if not protocol.is_sha(args.sha):
        raise RunnerError("not a sha256: %r" % args.sha, "usage")
    _guard(remote_dir, args.token)
    model = os.path.join(remote_dir, "models", args.sha, "model.tflite")
    actual = file_sha(model)
    if actual != args.sha:
        raise RunnerError("%s does not match its sha256 (got %s); not activating it" % (model, actual), "checksum")
    before = activation_state(remote_dir)
    _refuse_foreign(remote_dir, before, "activate a model")
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
    _refuse_foreign(remote_dir, before, "roll back")
    prev = before["previous"]
    if not prev:
        raise RunnerError("there is no previous model in %s to roll back to" % remote_dir, "rollback")
    if file_sha(os.path.join(remote_dir, "models", prev, "model.tflite")) != prev:
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


def _quantize(np, x, detail, what="the input"):
    """Eval values as the input tensor takes them: real values quantized into an int8/uint8/int16 tensor with a
    scale; anything else (token ids into an int32 tensor, floats into a float tensor) passed through unchanged."""
    dtype = np.dtype(detail["dtype"])
    scale, zero = detail.get("quantization", (0.0, 0))
    if dtype.kind in "iu" and scale and dtype.itemsize <= 2:
        info = np.iinfo(dtype)
        q = np.round(x.astype(np.float32) / np.float32(scale) + zero)
        return np.clip(q, info.min, info.max).astype(dtype)
    if dtype.kind in "iu" and x.dtype.kind in "iufb":
        # Integer ids are never scaled; they must fit the tensor's type exactly (no silent wrap or truncation).
        if x.dtype.kind == "f" and x.size and not np.all(np.isfinite(x) & (np.floor(x) == x)):
            raise RunnerError("%s takes integers (%s) but the eval data hold fractional values" % (what, dtype.name),
                              "data")
        info = np.iinfo(dtype)
        if x.size and (x.min() < info.min or x.max() > info.max):
            raise RunnerError("%s takes %s but the eval data hold values from %s to %s"
                              % (what, dtype.name, x.min(), x.max()), "data")
    return x.astype(dtype)


def _dequantize(np, y, detail):
    scale, zero = detail.get("quantization", (0.0, 0))
    if y.dtype.kind in "iu" and scale:
        return (y.astype(np.float32) - np.float32(zero)) * np.float32(scale)
    return y.astype(np.float32)


def _random_input(np, rng, detail):
    dtype = np.dtype(detail["dtype"])
    shape = tuple(int(d) for d in detail["shape"])
    scale = (detail.get("quantization") or (0.0, 0))[0]
    if dtype.kind in "iu" and not scale:
        # An integer input that is not quantized holds ids (token ids, indices): 0 is valid for every table;
        # a random -128..127 would be an out-of-range gather.
        return np.zeros(shape, dtype)
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


def _io_names(interp, details, kind):
    """``{tensor index: [names]}`` for the model's inputs or outputs (``kind``), the signature's name first, then
    the tensor's (without ``serving_default_`` and ``:0``), and the tensors in signature order where there is one."""
    try:
        sigs = interp._get_full_signature_list() or {}
    except Exception:  # a runtime without signatures
        sigs = {}
    sig = {}
    if len(sigs) == 1:
        for key, index in (list(sigs.values())[0].get(kind) or {}).items():
            sig[int(index)] = str(key)
    names = {}
    for d in details:
        raw = str(d.get("name") or "")
        short = raw.split(":")[0]
        if short.startswith("serving_default_"):
            short = short[len("serving_default_"):]
        found = []
        for n in (sig.get(int(d["index"])), short, raw):
            if n and n not in found:
                found.append(n)
        names[int(d["index"])] = found or ["tensor %d" % int(d["index"])]
    order = list(details)
    if sig and set(sig) == set(int(d["index"]) for d in details):
        position = dict((index, i) for i, index in enumerate(sig))
        order.sort(key=lambda d: position[int(d["index"])])
    return names, order


def _is_label(key):
    return key == "y" or key.startswith("y_")


def _bind_inputs(inputs, names, data, path):
    """``[(detail, array)]`` in input order: each eval array matched to a model input by name (``x``, or the
    only array, for a single-input model); one-line errors for a missing, extra or mis-shaped array."""
    chosen = {}
    for d in inputs:
        for n in names[int(d["index"])]:
            if n in data:
                chosen[int(d["index"])] = n
                break
    if len(inputs) == 1 and not chosen:
        arrays = [k for k in data if not _is_label(k)]
        if "x" in data:
            chosen[int(inputs[0]["index"])] = "x"
        elif len(arrays) == 1:
            chosen[int(inputs[0]["index"])] = arrays[0]
    wanted = ", ".join(repr(names[int(d["index"])][0]) for d in inputs)
    missing = [names[int(d["index"])][0] for d in inputs if int(d["index"]) not in chosen]
    if missing:
        raise RunnerError("eval data %s have no array for model input %s (the model takes %s; the file holds %s): "
                          "name one array after each input (or 'x' for a single-input model), labels 'y'"
                          % (path, ", ".join(repr(m) for m in missing), wanted,
                             ", ".join(repr(k) for k in data) or "nothing"), "data")
    extra = [k for k in data if k not in chosen.values() and not _is_label(k)]
    if extra:
        raise RunnerError("eval data %s: array %r is no model input (the model takes %s; labels go in 'y')"
                          % (path, extra[0], wanted), "data")
    bound = []
    count = None
    for d in inputs:
        key = chosen[int(d["index"])]
        arr = data[key]
        label = names[int(d["index"])][0]
        if arr.ndim < 1 or arr.dtype.kind not in "iufb":
            raise RunnerError("eval array %r in %s is not a numeric array with samples on the first axis"
                              % (key, path), "data")
        if count is None:
            count = len(arr)
        elif len(arr) != count:
            raise RunnerError("eval arrays in %s hold different numbers of samples (%d and %d for %r)"
                              % (path, count, len(arr), key), "data")
        sig = [int(s) for s in d.get("shape_signature", d["shape"])][1:]
        got = [int(s) for s in arr.shape[1:]]
        if len(got) != len(sig) or any(w >= 0 and w != g for w, g in zip(sig, got)):
            raise RunnerError("eval array %r in %s has samples of shape %s but model input %r takes %s "
                              "(first axis = samples; -1 = any)" % (key, path, got, label, sig), "data")
        bound.append((d, arr))
    if not count:
        raise RunnerError("eval data %s hold no samples" % path, "data")
    return bound


def _parse_shapes(specs, inputs, names):
    """``--input-shape`` values (``1x32x32x3`` or ``NAME=1x32x32x3``) as ``{tensor index: shape}``."""
    shapes = {}
    for spec in specs or []:
        try:
            label, shape = protocol.parse_shape(spec)
        except ValueError as exc:
            raise RunnerError(str(exc), "usage")
        if label:
            match = [d for d in inputs if label in names[int(d["index"])]]
        else:
            match = list(inputs) if len(inputs) == 1 else []
        if not match:
            raise RunnerError("--input-shape %r names no model input (inputs: %s); use NAME=SHAPE" % (spec, ", ".join(
                repr(names[int(d["index"])][0]) for d in inputs)), "usage")
        shapes[int(match[0]["index"])] = shape
    return shapes


def _resize_inputs(interp, inputs, names, shapes, source):
    """Resize (before ``allocate_tensors``) the inputs whose shape differs from ``shapes`` (``{index: shape}``);
    a dynamic input left without a shape is an error. Returns the resize notes for the report."""
    done = []
    for d in inputs:
        index = int(d["index"])
        sig = [int(s) for s in d.get("shape_signature", d["shape"])]
        current = [int(s) for s in d["shape"]]
        label = names[index][0]
        want = shapes.get(index)
        if want is None:
            if any(s < 0 for s in sig[1:]):
                raise RunnerError("model input %r has a dynamic shape %s; give eval data (their samples set the "
                                  "shape) or --input-shape %s" % (label, sig, "x".join(
                                      str(s if s > 0 else 32) for s in [1] + sig[1:])), "data")
            continue
        if len(want) != len(sig) or any(w >= 0 and w != g for w, g in zip(sig[1:], want[1:])):
            raise RunnerError("shape %s from %s does not fit model input %r (%s)" % (want, source, label, sig), "data")
        if want != current:
            try:
                interp.resize_tensor_input(index, want)
            except Exception as exc:
                raise RunnerError("the runtime cannot resize input %r to %s: %s" % (label, want, _first_line(exc)),
                                  "model")
            done.append({"input": label, "shape": want, "from": sig, "source": source})
    return done


def _reset_state(interp):
    """Reset variable tensors (a fused LSTM keeps its state in them across invocations); None if the runtime
    cannot."""
    reset = getattr(interp, "reset_all_variables", None)
    if reset is None:
        return None
    reset()
    return reset


def _resource_variables(interp):
    """True if the model keeps state in resource variables (VAR_HANDLE: a Keras ``stateful=True`` RNN), which
    ``reset_all_variables`` does not reset: only a fresh interpreter starts from the initial state."""
    get_ops = getattr(interp, "_get_ops_details", None)
    if get_ops is None:
        return False
    try:
        return any(str(op.get("op_name")) == "VAR_HANDLE" for op in get_ops()[:100000])
    except Exception:  # a runtime whose op details are not what we expect
        return False


def _fresh(Interpreter, kwargs, bound):
    """A new interpreter for the same model, at the input shapes of ``bound`` (the eval arrays)."""
    def make():
        interp = Interpreter(**kwargs)
        for d, arr in bound:
            want = [1] + [int(n) for n in arr.shape[1:]]
            if want != [int(n) for n in d["shape"]]:
                interp.resize_tensor_input(d["index"], want)
        interp.allocate_tensors()
        return interp
    return make


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
        except Exception as exc:
            raise RunnerError("the runtime could not load the model: %s" % (str(exc).strip().splitlines() or [""])[0],
                              "model")
        load_s = time.perf_counter() - t0
        inputs = interp.get_input_details()
        in_names, _order = _io_names(interp, inputs, "inputs")

        # Eval arrays are matched to inputs by name; a dynamic input takes its shape from them (or --input-shape).
        bound = data = None
        if args.eval:
            data = _load_eval(np, args.eval)
            bound = _bind_inputs(inputs, in_names, data, args.eval)
            shapes = dict((int(d["index"]), [1] + [int(s) for s in arr.shape[1:]]) for d, arr in bound)
            resized = _resize_inputs(interp, inputs, in_names, shapes, "the eval data")
        else:
            resized = _resize_inputs(interp, inputs, in_names,
                                     _parse_shapes(getattr(args, "input_shape", None), inputs, in_names),
                                     "--input-shape")
        # Allocated once the inputs have their shapes (a dynamic input cannot be allocated before).
        t0 = time.perf_counter()
        try:
            interp.allocate_tensors()
        except Exception as exc:
            raise RunnerError("the runtime could not load the model%s: %s" % (
                " at input shape " + ", ".join("%s %s" % (r["input"], "x".join(str(n) for n in r["shape"]))
                                               for r in resized) if resized else "", _first_line(exc)), "model")
        load_s += time.perf_counter() - t0
        if resized:
            inputs = interp.get_input_details()
            if bound is not None:
                by_index = dict((int(d["index"]), d) for d in inputs)
                bound = [(by_index[int(d["index"])], arr) for d, arr in bound]
        out_names, outputs = _io_names(interp, interp.get_output_details(), "outputs")

        rng = np.random.RandomState(0)
        _reset_state(interp)
        if bound is not None:
            feed = [_quantize(np, arr[:1], d, "model input %r" % in_names[int(d["index"])][0]) for d, arr in bound]
            inputs_fed = [d for d, _arr in bound]
        else:
            feed = [_random_input(np, rng, d) for d in inputs]
            inputs_fed = inputs
        for d, value in zip(inputs_fed, feed):
            interp.set_tensor(d["index"], value)
        t0 = time.perf_counter()
        _invoke(interp, "the first inference")
        first_s = time.perf_counter() - t0
        delegate = _delegation(interp, None if args.no_xnnpack else "xnnpack")
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
        "delegate": delegate,
    }

    if resized:
        result["resized"] = resized
    if bound is not None:
        reload = _fresh(Interpreter, kwargs, bound) if _resource_variables(interp) else None
        result["eval"] = _evaluate(np, interp, bound, outputs, out_names, in_names, data.get("y"), args.max_outputs,
                                   args.max_eval_seconds, reload)
    result["peak_rss_bytes"] = _peak_rss()
    return result


def delegated_nodes(ops):
    """Which of the model's nodes a delegate (LiteRT's default: XNNPACK) took, from the interpreter's op details.

    After the first inference (or ``allocate_tensors``) the details list the
    model's own nodes, then one ``DELEGATE`` node per partition the delegate
    took, whose inputs and outputs are the partition's boundary tensors. A node
    belongs to a partition when it is reached walking back from the partition's
    outputs without crossing its inputs. The host's check (``edgeq.micro``)
    counts with this function too.
    """
    own = [o for o in ops if o.get("op_name") != "DELEGATE"]
    partitions = [o for o in ops if o.get("op_name") == "DELEGATE"]
    producer = {}
    by_index = {}
    for o in own:
        by_index[int(o["index"])] = o
        for t in o["outputs"]:
            producer[int(t)] = int(o["index"])
    taken = set()
    for part in partitions:
        boundary = set(int(t) for t in part["inputs"])
        stack = [int(t) for t in part["outputs"]]
        seen = set()
        while stack:
            t = stack.pop()
            if t in seen or t in boundary or t not in producer:
                continue
            seen.add(t)
            node = producer[t]
            if node not in taken:
                taken.add(node)
                stack.extend(int(x) for x in by_index[node]["inputs"] if int(x) >= 0)
    return {"nodes": len(own), "partitions": len(partitions), "delegated": sorted(taken),
            "not_delegated": [[int(o["index"]), str(o["op_name"])] for o in own if int(o["index"]) not in taken]}


def _delegation(interp, requested):
    """What a delegate really took (``delegated_nodes``). A runtime that does not list its nodes (no
    ``_get_ops_details``) gives ``applied: null``: unknown, not false."""
    doc = {"requested": requested, "applied": None, "delegated_nodes": None, "nodes": None, "partitions": None}
    get = getattr(interp, "_get_ops_details", None)
    if get is None:
        return doc
    try:
        found = delegated_nodes(get())
    except Exception:  # a runtime whose op details differ: unknown, never a failed run
        return doc
    doc.update({"applied": bool(found["delegated"]), "delegated_nodes": len(found["delegated"]),
                "nodes": found["nodes"], "partitions": found["partitions"]})
    return doc


def _first_line(exc):
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text[:500]


def _invoke(interp, what):
    try:
        interp.invoke()
    except Exception as exc:
        raise RunnerError("%s failed: %s" % (what, _first_line(exc)), "model")


def _eval_limit():
    """Bytes of eval arrays the runner loads at most: NPZ_MAX_BYTES, and at most half the memory available."""
    limit = NPZ_MAX_BYTES
    _total, available = _meminfo()
    if available:
        limit = min(limit, available // 2)
    return limit


def _npy_declared_bytes(path, limit):
    """Bytes a plain .npy file declares in its header (read without numpy allocating anything)."""
    try:
        with open(path, "rb") as f:
            declared = _npy_declared(f, path, "is neither an .npz archive nor an .npy array")
            holds = os.fstat(f.fileno()).st_size - f.tell()
    except RunnerError:
        raise
    except Exception as exc:
        raise RunnerError("cannot read eval data %s: %s" % (path, _first_line(exc)), "data")
    if declared > holds or declared > limit:
        raise RunnerError("eval data %s: the array declares %d bytes (the file holds %d, the runner loads at most "
                          "%d)" % (path, declared, holds, limit), "data")
    return declared


def _load_eval(np, path):
    """``{name: array}`` from an eval .npz (``{"x": array}`` from an .npy); the sizes the arrays declare are checked
    against what the runner loads before numpy allocates any of them."""
    import zipfile

    limit = _eval_limit()
    try:
        archive = zipfile.is_zipfile(path)
    except (OSError, IOError) as exc:
        raise RunnerError("cannot read eval data %s: %s" % (path, _first_line(exc)), "data")
    if archive:
        _npz_declared_bytes(path, limit)
    else:
        _npy_declared_bytes(path, limit)
    try:
        loaded = np.load(path, allow_pickle=False)
        if hasattr(loaded, "files"):
            with loaded as npz:
                data = dict((k, npz[k]) for k in npz.files)
        else:
            data = {"x": loaded}
    except RunnerError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # a corrupt zip, an object array, a truncated file
        raise RunnerError("cannot read eval data %s: %s" % (path, _first_line(exc)), "data")
    for key, arr in data.items():
        if not hasattr(arr, "dtype") or arr.ndim < 1 or arr.dtype.kind not in "iufb":
            raise RunnerError("eval array %r in %s is not a numeric array with samples on the first axis"
                              % (key, path), "data")
    return data


def _legacy_metrics(np, ev, preds, y):
    """Accuracy / MAE of a single-output model against labels 'y' (what the rollout gate reads on the device)."""
    if y is None or len(y) != len(preds):
        return
    flat = preds.reshape(len(preds), -1)
    if y.dtype.kind in "iub" and flat.shape[1] > 1 and y.ndim == 1:
        ev["task"] = "classification"
        ev["accuracy"] = float(np.mean(np.argmax(flat, axis=1) == y.astype(np.int64)))
    elif y.ndim == 2 and y.shape[1] == flat.shape[1] and flat.shape[1] > 1 and y.dtype.kind in "iub":
        ev["task"] = "classification"
        ev["accuracy"] = float(np.mean(np.argmax(flat, axis=1) == np.argmax(y, axis=1)))
    elif y.size == flat.size:
        ev["task"] = "regression"
        ev["mae"] = float(np.mean(np.abs(flat - y.reshape(len(y), -1).astype(np.float32))))


def _evaluate(np, interp, bound, outputs, names, in_names, y, max_outputs, max_seconds=None, reload=None):
    """Run every eval sample (variable tensors reset before each, or with ``reload`` a fresh interpreter for
    each: samples are independent) and return every output, dequantized, for as many samples as
    ``max_outputs`` values allow; the host judges them."""
    count = len(bound[0][1])
    kept = [[] for _ in outputs]
    shapes = [None for _ in outputs]
    first = []
    rows = None
    reset = None
    t0 = time.perf_counter()
    for i in range(count):
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            raise RunnerError("evaluation took longer than its cap of %g s (%d of %d samples done); use fewer "
                              "eval samples or raise the cap" % (max_seconds, i, count), "eval_timeout")
        if reload is not None:
            try:
                interp = reload()
            except Exception as exc:
                raise RunnerError("reloading the model for eval sample %d failed: %s" % (i, _first_line(exc)),
                                  "model")
        reset = _reset_state(interp)
        for d, arr in bound:
            interp.set_tensor(d["index"], _quantize(np, arr[i:i + 1], d, "model input %r" % in_names[int(d["index"])][0]))
        _invoke(interp, "inference on eval sample %d" % i)
        values = [_dequantize(np, interp.get_tensor(o["index"]), o)[0] for o in outputs]
        if rows is None:
            # Bounded output: at most max_outputs values in all (the host keeps only so much of stdout).
            shapes = [v.shape for v in values]
            rows = max(0, max_outputs // max(1, sum(max(1, v.size) for v in values)))
        if i < rows:
            for j, v in enumerate(values):
                kept[j].append(v)
        if len(outputs) == 1:
            first.append(values[0])
    elapsed = time.perf_counter() - t0
    ev = {"samples": int(count), "seconds": elapsed, "accuracy": None, "mae": None, "task": None,
          "state_reset": reset is not None, "state_reload": reload is not None, "rows": int(min(rows or 0, count)),
          "per_output": []}
    if len(outputs) == 1 and first:
        _legacy_metrics(np, ev, np.stack(first), y)
    for j, o in enumerate(outputs):
        arr = np.stack(kept[j]) if kept[j] else np.zeros((0,) + tuple(shapes[j] or ()), np.float32)
        ev["per_output"].append({"name": names[int(o["index"])][0], "tensor": str(o.get("name") or "")[:1024],
                                 "outputs": _encode(np, arr)})
    if ev["rows"] < count:
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
        except TypeError:
            raise RunnerError("%s %s cannot keep intermediate tensors" % (name, version), "usage")
        except Exception as exc:
            raise RunnerError("the runtime could not load the model: %s" % _first_line(exc), "model")
        inputs = interp.get_input_details()
        in_names, _order = _io_names(interp, inputs, "inputs")
        bound = _bind_inputs(inputs, in_names, _load_eval(np, args.eval), args.eval)
        shapes = dict((int(d["index"]), [1] + [int(s) for s in arr.shape[1:]]) for d, arr in bound)
        resized = _resize_inputs(interp, inputs, in_names, shapes, "the eval data")
        try:
            interp.allocate_tensors()
        except Exception as exc:
            raise RunnerError("the runtime could not load the model: %s" % _first_line(exc), "model")
    if resized:
        by_index = dict((int(d["index"]), d) for d in interp.get_input_details())
        bound = [(by_index[int(d["index"])], arr) for d, arr in bound]
    count = max(0, min(args.count, len(bound[0][1])))
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
        _reset_state(interp)
        for d, arr in bound:
            interp.set_tensor(d["index"], _quantize(np, arr[i:i + 1], d, "model input %r" % in_names[int(d["index"])][0]))
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
