"""Device facts for ``probe``: OS, CPU, memory, thermal state, emulation, disk, and which TFLite runtime
imports (``find_runtime``). Part of edgeq's on-device runner (see runner.py)."""

# A device module (standard library + numpy): on the device ``protocol.standalone`` installs it as
# ``edgeq_<name>`` ahead of the runner, after sys.path is cleaned; it must import nothing else before that.
import glob
import os
import platform
import shutil
import subprocess

try:
    import edgeq_protocol as protocol  # sent ahead of the runner (protocol.standalone) or set up by the collection
except ImportError:
    try:
        from edgeq._device import protocol  # imported as a module of edgeq
    except ImportError:
        import protocol  # run as a script beside it (deploy/, tests)

RUNTIMES = protocol.RUNTIMES
RunnerError = protocol.RunnerError


RUNNER_VERSION = 3


# --------------------------------------------------------------------- probe

def read_small(path, limit=65536):
    try:
        with open(path, "r") as f:
            return f.read(limit)
    except (OSError, IOError):
        return None


def os_release():
    text = read_small("/etc/os-release") or ""
    info = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            info[k.strip()] = v.strip().strip('"')
    return info.get("PRETTY_NAME") or info.get("NAME") or platform.system()


def cpu_info():
    text = read_small("/proc/cpuinfo", 1 << 20) or ""
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


def meminfo():
    text = read_small("/proc/meminfo") or ""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("MemTotal:", "MemAvailable:"):
            try:
                out[parts[0][:-1]] = int(parts[1]) * 1024
            except ValueError:
                pass
    return out.get("MemTotal"), out.get("MemAvailable")


def run_tool(argv, timeout=3.0):
    if shutil.which(argv[0]) is None:
        return None
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    if p.returncode != 0:
        return None
    return p.stdout.decode("utf-8", "replace").strip()


def thermal():
    zones = []
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        temp = read_small(os.path.join(zone, "temp"))
        if temp is None:
            continue
        try:
            celsius = int(temp.strip()) / 1000.0
        except ValueError:
            continue
        zones.append({"zone": os.path.basename(zone), "type": (read_small(os.path.join(zone, "type")) or "").strip(),
                      "celsius": celsius})
    return zones


def throttling():
    raw = run_tool(["vcgencmd", "get_throttled"])
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


def emulation(qemu_in_cpuinfo):
    binfmt = []
    for path in glob.glob("/proc/sys/fs/binfmt_misc/qemu-*"):
        text = read_small(path) or ""
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


def disk_free(path):
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


def first_line(exc):
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text[:500]
