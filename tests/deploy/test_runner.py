"""The on-device runner itself: Python 3.8 syntax, probe on the device venv, install's checksum check."""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
from pathlib import Path

from edgeq._device.protocol import DEVICE_MODULES
from edgeq.deploy import runner_source

ROOT = Path(__file__).resolve().parents[2]


def _imports(tree: ast.AST, skip: tuple = ()) -> set:
    nodes = [n for n in ast.walk(tree) if not any(n is s or n in ast.walk(s) for s in skip)]
    mods = {n.module for n in nodes if isinstance(n, ast.ImportFrom)}
    return mods | {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}


def test_runner_is_python38_syntax_and_imports_nothing_of_edgeq_but_the_protocol_sent_with_it():
    src = runner_source().decode()
    tree = ast.parse(src, feature_version=(3, 8))
    # The only edgeq module the runner imports is the protocol sent ahead of it; edgeq itself (or the file
    # beside it) only when the runner is imported as edgeq._device.runner or run as a script (the ImportError
    # branch, never taken on a device).
    fallback = [h for n in ast.walk(tree) if isinstance(n, ast.Try) for h in n.handlers
                if isinstance(h.type, ast.Name) and h.type.id == "ImportError"
                and any(isinstance(i, ast.Import) and i.names[0].name == "edgeq_protocol" for i in n.body)]
    assert len(fallback) == 1 and _imports(fallback[0]) == {"edgeq._device", "protocol"}
    assert [m for m in _imports(tree, tuple(fallback)) if m and m.startswith("edgeq")] == ["edgeq_protocol"]
    # The protocol travels as a string literal in the program: Python 3.8 syntax, standard library only.
    proto = ast.parse((ROOT / "deploy" / "protocol.py").read_text(), feature_version=(3, 8))
    assert _imports(proto) <= {"argparse", "importlib", "json", "math", "sys"}
    # So does each device module: Python 3.8, standard library + numpy + a runtime, the protocol its only edgeq
    # import (the others through protocol.device_module), no private name of another device module.
    texts = [src, (ROOT / "deploy" / "protocol.py").read_text()]
    for name in DEVICE_MODULES:
        text = (ROOT / "deploy" / f"{name}.py").read_text()
        texts.append(text)
        assert f"edgeq_install('edgeq_{name}', " in src
        mod = ast.parse(text, feature_version=(3, 8))
        assert not [n for n in ast.walk(mod) if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
        edgeq = {m for m in _imports(mod) if m and ("edgeq" in m or m in ("protocol", *DEVICE_MODULES))}
        assert edgeq == {"edgeq_protocol", "edgeq._device", "protocol"}, name
        assert not [n.attr for n in ast.walk(mod) if isinstance(n, ast.Attribute) and n.attr.startswith("_")
                    and isinstance(n.value, ast.Name) and n.value.id in DEVICE_MODULES], name
    for text in texts:
        for newer in (".removeprefix(", ".removesuffix(", "functools.cache(", "zoneinfo", "math.lcm(", "str | None"):
            assert newer not in text, f"{newer} needs Python > 3.8"


def _runner(python: str, *args: str) -> dict:
    out = subprocess.run([python, "-", *args], input=runner_source(), capture_output=True, timeout=120)
    return json.loads(out.stdout)


def test_probe_on_device_venv(device_python, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m").write_bytes(b"x")
    x_sha = hashlib.sha256(b"x").hexdigest()
    doc = _runner(device_python, "probe", "--dir", str(tmp_path), "--have", "models/m", x_sha,
                  "--have", "models/n", x_sha)
    assert doc["ok"] and doc["runtime"] == {"name": "tflite_runtime", "version": "2.14.0"}
    # The device reports what it has by hash, never by existence.
    assert doc["numpy"].startswith("1.") and doc["have"] == {"models/m": x_sha, "models/n": None}
    assert doc["cpu_cores"] >= 1 and doc["disk"]["free_bytes"] > 0 and "emulated" in doc["emulation"]


def test_install_verifies_checksum_before_rename(device_python, tmp_path):
    tmp = tmp_path / "f.tmp-1"
    tmp.write_bytes(b"payload")
    final = tmp_path / "f"
    bad = _runner(device_python, "install", "--item", str(tmp), str(final), "0" * 64)
    assert not bad["ok"] and bad["kind"] == "checksum" and not final.exists() and not tmp.exists()
    tmp.write_bytes(b"payload")
    good = _runner(device_python, "install", "--item", str(tmp), str(final), hashlib.sha256(b"payload").hexdigest())
    assert good["ok"] and final.read_bytes() == b"payload" and not tmp.exists()


def test_peak_rss_is_the_runners_own_not_its_parents(device_python):
    """A local device is started by an edgeq that may hold TensorFlow (hundreds of MB); Linux carries
    ``ru_maxrss`` across exec, so the runner must report its own high-water mark, not its parent's."""
    from pathlib import Path

    model = Path(__file__).resolve().parents[1] / "fleet" / "data" / "tiny_b.tflite"
    parent = (
        "import subprocess, sys\n"
        "big = bytearray(400 * 1024 * 1024)\n"
        "for i in range(0, len(big), 4096):\n"
        "    big[i] = 1\n"
        "src = sys.stdin.buffer.read()\n"
        f"out = subprocess.run([{device_python!r}, '-', 'run', '--model', {str(model)!r}, '--runs', '3',\n"
        "                     '--min-seconds', '0', '--min-warmup-seconds', '0', '--warmup', '0'],\n"
        "                    input=src, capture_output=True, timeout=120)\n"
        "sys.stdout.buffer.write(out.stdout)\n"
    )
    out = subprocess.run([device_python, "-c", parent], input=runner_source(), capture_output=True, timeout=180)
    doc = json.loads(out.stdout)
    assert doc["ok"], doc
    # The runner with numpy and a tiny model stays far below the 400 MB its parent touched.
    assert 1_000_000 < doc["peak_rss_bytes"] < 200 * 1024 * 1024, doc["peak_rss_bytes"]
