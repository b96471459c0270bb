"""Issue 16, host side: code carried by model files, isolated child Pythons, declared sizes, bounded
reads of --target/--recipe-file, crafted Ansible results, outputs that are inputs, export --force, and
control characters in reports. Every test here reproduces the hole it closes."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _one_error_line(result, *needles: str) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code not in (0, 70), result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- 1. code anywhere in a model config


def _wrapper_h5(path: Path, marker: Path, wrapper: str) -> Path:
    """A tf_keras .h5 whose RNN cell wrapper carries a lambda (bytecode) that creates ``marker`` when run."""
    import tf_keras
    from tf_keras.src.layers import DropoutWrapper, ResidualWrapper

    fn = eval(f"lambda *a, **k: (__import__('pathlib').Path({str(marker)!r}).touch(), a[0])[1]")
    cell = tf_keras.layers.SimpleRNNCell(4, name="cell")
    if wrapper == "residual":
        wrapped = ResidualWrapper(cell, residual_fn=fn)
    else:
        wrapped = DropoutWrapper(cell, input_keep_prob=0.9, dropout_state_filter_visitor=fn)
    inp = tf_keras.Input((3, 4), name="x")
    model = tf_keras.Model(inp, tf_keras.layers.RNN(wrapped, name="rnn")(inp))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(path, save_format="h5")
    if marker.exists():  # building the model ran the function once, here, on purpose
        marker.unlink()
    return path


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["residual", "dropout"])
def test_h5_cell_wrapper_function_is_refused(tmp_path, wrapper, ledger):
    marker = tmp_path / "MARKER"
    model = _wrapper_h5(tmp_path / "evil.h5", marker, wrapper)
    np.save(tmp_path / "calib.npy", np.zeros((4, 3, 4), np.float32))
    r = _cli("convert", str(model), "--calib", str(tmp_path / "calib.npy"), "-o", str(tmp_path / "o.tflite"))
    _one_error_line(r, "carries Python code", "--unsafe-load", "config.layers[1].config.cell.config.")
    assert not marker.exists(), "loading the model ran the code it carries"
    assert not (tmp_path / "o.tflite").exists()
    ledger("bad_input", f"h5 {wrapper} wrapper with code")


def test_config_walk_finds_code_anywhere_and_is_bounded():
    from edgeq.convert.untrusted import code_in_config as _code_in_config

    assert _code_in_config({"layers": [{"class_name": "Dense", "config": {"units": 3}}]}) is None
    found = _code_in_config({"a": [{"b": {"whatever_fn": "x", "whatever_fn_type": "lambda"}}]})
    assert found and "'whatever_fn'" in found and "a[0].b.whatever_fn" in found
    named = _code_in_config({"f": "system", "f_type": "function", "f_module": "os"})
    assert named and "module 'os'" in named
    assert _code_in_config({"f": "relu", "f_type": "function", "f_module": "keras.activations"}) is None
    import base64
    import marshal

    blob = base64.b64encode(marshal.dumps((lambda: 1).__code__)).decode()
    assert "bytecode" in (_code_in_config({"odd_key": [blob, None]}) or "")
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["n"] = {}
        node = node["n"]
    assert "too deep" in (_code_in_config(deep) or "")


# ---------------------------------------------------------------- 2. child Pythons do not import from the cwd


def _plant(directory: Path, marker: Path) -> None:
    """json.py and numpy.py that record being imported (then defer to nothing: importing them is the hole)."""
    for name in ("json", "numpy"):
        (directory / f"{name}.py").write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).write_text({name!r})\nraise SystemExit(3)\n")


def test_sandbox_child_ignores_modules_in_the_cwd(tmp_path, monkeypatch, ledger):
    from edgeq.sandbox import run_in_child

    marker = tmp_path / "MARKER"
    _plant(tmp_path, marker)
    monkeypatch.chdir(tmp_path)
    res = run_in_child("json", "dumps", {"obj": [1, 2]}, timeout=60)
    assert not marker.exists(), f"the child imported a planted {marker.read_text()}.py from the cwd"
    assert res.ok and res.value == "[1, 2]", res.describe()
    ledger("bad_input", "planted module in cwd (sandbox)")


@pytest.mark.parametrize("which", ["device", "host-reference"])
def test_runner_child_ignores_modules_in_the_cwd(tmp_path, monkeypatch, device_python, which, ledger):
    from edgeq.deploy import host_reference
    from edgeq.device import DeviceClient
    from edgeq.transport import LocalTransport

    model_dir = tmp_path / "download"
    model_dir.mkdir()
    model = model_dir / "tiny.tflite"
    model.write_bytes((Path(__file__).parent / "fleet" / "data" / "tiny_a.tflite").read_bytes())
    marker = tmp_path / "MARKER"
    _plant(model_dir, marker)
    monkeypatch.chdir(model_dir)  # the user works beside the model they downloaded
    if which == "device":
        facts = DeviceClient(LocalTransport(), device_python).probe(str(tmp_path / "edgeq"), [], 60)
        assert facts.get("ok", True)
    else:
        from edgeq.tflite_file import read_tflite

        shape = [1 if d < 1 else d for d in (lambda g: g.tensors[g.inputs[0]].shape)(read_tflite(model).main)]
        np.savez(model_dir / "eval.npz", x=np.zeros([2, *shape[1:]], np.float32))
        doc = host_reference(model, model_dir / "eval.npz", timeout=120)
        assert doc["ok"], doc
    assert not marker.exists(), f"the child imported a planted {marker.read_text()}.py from the cwd"
    ledger("bad_input", f"planted module in cwd ({which})")


# ---------------------------------------------------------------- 6. an output that is an input


def _fake_keras(path: Path) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", "{}")
    return path


@pytest.mark.parametrize("case", ["output-is-model", "report-is-model", "hard-link", "inside-saved-model",
                                  "report-is-calib"])
def test_convert_refuses_an_output_that_is_an_input(tmp_path, monkeypatch, case, ledger):
    monkeypatch.chdir(tmp_path)
    model = _fake_keras(tmp_path / "m.keras")
    np.save(tmp_path / "c.npy", np.zeros((2, 3), np.float32))
    args = ["convert", "m.keras", "--calib", "c.npy", "-o", "out.tflite"]
    if case == "output-is-model":
        args[-1] = str(model)
    elif case == "report-is-model":
        args += ["--report", "./m.keras"]
    elif case == "hard-link":
        os.link(model, tmp_path / "alias.tflite")
        args[-1] = "alias.tflite"
    elif case == "inside-saved-model":
        sm = tmp_path / "sm"
        (sm / "variables").mkdir(parents=True)
        (sm / "saved_model.pb").write_bytes(b"\x08\x01")
        (sm / "variables" / "variables.index").write_bytes(b"idx")
        args[1], args[-1] = "sm", "sm/variables/variables.index"
    else:
        args += ["--report", "c.npy"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    line = _one_error_line(_cli(*args), "would destroy the input")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, line
    ledger("bad_input", f"convert output over input ({case})")


@pytest.mark.parametrize("case", ["output-is-model", "report-is-eval"])
def test_convert_max_drop_refuses_an_output_that_is_an_input(tmp_path, monkeypatch, case, ledger):
    # The repair path (convert --max-drop) writes through its own code: the same rule must hold there.
    monkeypatch.chdir(tmp_path)
    model = _fake_keras(tmp_path / "m.keras")
    np.save(tmp_path / "c.npy", np.zeros((2, 3), np.float32))
    np.savez(tmp_path / "e.npz", x=np.zeros((2, 3), np.float32), y=np.zeros(2))
    args = ["convert", "m.keras", "--calib", "c.npy", "--eval", "e.npz", "--max-drop", "1", "-o", "out.tflite"]
    if case == "output-is-model":
        args[-1] = str(model)
    else:
        args += ["--report", "e.npz"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    _one_error_line(_cli(*args), "would destroy the input")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    ledger("bad_input", f"convert --max-drop output over input ({case})")


@pytest.mark.parametrize("case", ["report-is-output", "report-is-model"])
def test_qat_refuses_a_report_over_its_model(tmp_path, monkeypatch, case, ledger):
    monkeypatch.chdir(tmp_path)
    _fake_keras(tmp_path / "m.keras")
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3), np.float32), y=np.zeros(2))
    report = "q.tflite" if case == "report-is-output" else "m.keras"
    r = _cli("qat", "m.keras", "--train", "d.npz", "--calib", "d.npz", "--eval", "d.npz", "-o", "q.tflite",
             "--report", report)
    _one_error_line(r, "report", "same file" if case == "report-is-output" else "would destroy the input")
    assert (tmp_path / "m.keras").stat().st_size > 0 and not (tmp_path / "q.tflite").exists()
    ledger("bad_input", f"qat {case}")


# ---------------------------------------------------------------- 4. --target and --recipe-file read bounded


def _deep_toml(path: Path) -> Path:
    path.write_text("name = \"x\"\nvalue = " + "[" * 5000 + "]" * 5000 + "\n")
    return path


@pytest.mark.parametrize("what", ["target", "recipe-file"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "deep"])
def test_target_and_recipe_file_are_read_bounded(tmp_path, what, kind, ledger):
    import subprocess

    if kind == "fifo":
        source = tmp_path / "p.toml"
        os.mkfifo(source)
        needle = "not a regular file"
    elif kind == "dev-zero":
        source = Path("/dev/zero")
        needle = "not a regular file"
    else:
        source = _deep_toml(tmp_path / "deep.toml")
        needle = "nested deeper than"
    model = tmp_path / "m.tflite"
    model.write_bytes((Path(__file__).parent / "fleet" / "data" / "tiny_a.tflite").read_bytes())
    if what == "target":
        argv = ["check", str(model), "--target", str(source)]
    else:
        np.save(tmp_path / "c.npy", np.zeros((2, 3), np.float32))
        argv = ["convert", str(_fake_keras(tmp_path / "m.keras")), "--calib", str(tmp_path / "c.npy"),
                "-o", str(tmp_path / "o.tflite"), "--recipe-file", str(source)]
    proc = subprocess.run([sys.executable, "-m", "edgeq", *argv], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode not in (0, 70) and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0] and str(source) in lines[0], lines[0]
    ledger("bad_input", f"--{what} {kind}")


def test_bounded_reader_refuses_growth_and_size(tmp_path):
    from edgeq.errors import InputError
    from edgeq.safeio import read_bounded

    big = tmp_path / "big"
    big.write_bytes(b"x" * 2000)
    with pytest.raises(InputError, match="larger than the limit of 1000"):
        read_bounded(big, 1000)
    assert read_bounded(big, 2000) == b"x" * 2000
    with pytest.raises(InputError, match="is a directory"):
        read_bounded(tmp_path, 10)


# ---------------------------------------------------------------- 5. crafted Ansible results


def _ansible_doc(report: dict, play_extra: dict | None = None, doc_extra: dict | None = None) -> dict:
    results = {"a": {"status": "ok", "batch": 1, "result": {"report": report, "gate": {"passed": True,
                                                                                      "reasons": 7, "runs": 10**19}}},
               "b": {"status": "failed", "batch": 10**19, "result": {"msg": 5, "reverted": True}}}
    play = {"name": "p", "hosts": ["a", "b"], "serial": ["1"], "max_fail_percentage": 0, "results": results,
            "batches": [{"index": 1, "hosts": ["a", "b"]}], **(play_extra or {})}
    return {"format": "edgeq.fleet.results/1", "started_at": "2026-01-01T00:00:00+00:00", "seconds": 1.0,
            "forks": 5, "plays": [play], **(doc_extra or {})}


def _deep(n: int) -> object:
    v: object = 1
    for _ in range(n):
        v = {"k": v}
    return v


CRAFTED = {
    "ints for lists": (_ansible_doc({"latency_ms": {"samples": 5, "count": 10**19}, "warnings": 3,
                                     "model": {"name": "m", "sha256": "0" * 64, "bytes": 10}},
                                    {"hosts": 3, "serial": 4, "batches": [{"index": 1, "hosts": 9}]}), None),
    "large integers": (_ansible_doc({"latency_ms": {"p99": 10**19, "samples": [10**19, 1.0]},
                                     "peak_rss_bytes": 10**19, "load_ms": 10**19, "accuracy": -10**19},
                                    {"max_fail_percentage": 10**19}, {"forks": 10**19, "seconds": 10**19}), None),
    "10**400": (_ansible_doc({"latency_ms": {"p99": 10**400}}), "out of range"),
    "nested 700 deep": (_ansible_doc({"eval": _deep(700)}), "nested"),
}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_ansible_results_are_not_a_crash(tmp_path, kind, ledger):
    import subprocess

    doc, refused = CRAFTED[kind]
    path = tmp_path / "results.json"
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 3000))
    path.write_text(json.dumps(doc))
    proc = subprocess.run([sys.executable, "-m", "edgeq", "report", "--ansible", str(path), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    if refused:
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and refused in lines[0], proc.stderr
        assert not (tmp_path / "out").exists()
    else:
        assert proc.returncode == 7, proc.stderr  # b failed its gate and was reverted
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert [h["status"] for h in summary["hosts"]] == ["ok", "reverted"], summary["hosts"]
        assert "10000000000000000000" not in (tmp_path / "out" / "summary.html").read_text()
    ledger("bad_input", f"ansible results: {kind}")


# ---------------------------------------------------------------- 8. control characters in reports


def test_device_control_characters_do_not_reach_report_html(tmp_path, ledger):
    from edgeq.report import write_report

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_report_untrusted import _doc
    finally:
        sys.path.pop(0)
    doc = _doc()
    doc["host"] = "pi\x1b]0;owned\x07@10.0.0.7"
    doc["device"]["board"] = "Pi\x1b[2J\x9b31m 4"
    doc["runtime"]["name"] = "tflite\x07_runtime\x00"
    doc["warnings"] = ["line one\x1b[31m red\nline two\tend"]
    paths = write_report(doc, tmp_path / "rep")
    page = paths.html.read_text(encoding="utf-8")
    assert not any(c in page for c in "\x1b\x07\x9b\x00"), "a control character reached report.html"
    assert "tflite_runtime" in page and "Pi[2J31m 4" in page and "]0;owned@10.0.0.7" in page
    md = paths.markdown.read_text(encoding="utf-8")
    assert not any(c in md for c in "\x1b\x07\x9b\x00")
    ledger("bad_input", "ESC/BEL in device strings (report.html)")


# ---------------------------------------------------------------- 3. declared sizes before loading


def _zeros_member(z, name: str, nbytes: int, header: bytes = b"") -> None:
    """A deflated member of ``header`` then ``nbytes`` zeros, written in chunks (never held in memory)."""
    chunk = bytes(1 << 20)
    with z.open(name, "w", force_zip64=True) as f:
        f.write(header)
        left = nbytes
        while left > 0:
            f.write(chunk[:min(left, len(chunk))])
            left -= len(chunk)


def _npz_bomb(path: Path, members: int, mib: int) -> Path:
    """An .npz whose float32 arrays (each ``mib`` MiB of zeros) pack about a thousand times."""
    import io
    import zipfile

    n = (mib << 20) // 4
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(members):
            head = io.BytesIO()
            np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (n, 3)})
            _zeros_member(z, "x.npy" if i == 0 else f"x{i}.npy", n * 4 * 3, head.getvalue())
    return path


@pytest.mark.slow
def test_calibration_npz_bomb_is_refused_from_its_headers(tmp_path, ledger):
    # Three 99 MiB arrays: under the old per-array floor (256 MiB) one by one, 300 MiB together.
    bomb = _npz_bomb(tmp_path / "bomb.npz", 3, 33)
    assert bomb.stat().st_size < 2 << 20
    from edgeq.calibration import InputSpec, load_dataset
    from edgeq.errors import DataError

    with pytest.raises(DataError, match=r"array 'x' expands from \d+ to \d+ bytes") as info:
        load_dataset(str(bomb), [InputSpec("x", (None, 3), "float32")], role="calibration")
    assert "\n" not in str(info.value) and str(bomb) in str(info.value)
    ledger("bad_input", "npz zip bomb (calibration)")


def test_npz_total_declared_size_has_a_limit(tmp_path):
    from edgeq.calibration import check_numpy_sizes
    from edgeq.errors import DataError

    np.savez(tmp_path / "d.npz", x=np.zeros((100, 3), np.float32), y=np.zeros(100, np.int64))
    assert check_numpy_sizes(tmp_path / "d.npz", "evaluation") == 100 * 3 * 4 + 100 * 8
    with pytest.raises(DataError, match=r"d.npz: its arrays declare 2000 bytes by array 'y', more than the limit of 1500"):
        check_numpy_sizes(tmp_path / "d.npz", "evaluation", limit=1500)


@pytest.mark.slow
def test_keras_zip_bomb_is_refused_before_keras_opens_it(tmp_path, ledger):
    import zipfile

    bomb = tmp_path / "bomb.keras"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        z.writestr("config.json", json.dumps({"class_name": "Sequential", "config": {"layers": []}}))
        _zeros_member(z, "model.weights.h5", 200 << 20)
    assert bomb.stat().st_size < 1 << 20
    np.save(tmp_path / "c.npy", np.zeros((2, 3), np.float32))
    r = _cli("convert", str(bomb), "--calib", str(tmp_path / "c.npy"), "-o", str(tmp_path / "o.tflite"))
    _one_error_line(r, str(bomb), "model.weights.h5", "expands from", str(200 << 20))
    ledger("bad_input", "keras zip bomb")


def test_runner_npz_declared_bytes(tmp_path):
    """deploy/tensorio.py's standard-library header reader (the runner calls it before numpy loads eval data)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
    try:
        import tensorio
    finally:
        sys.path.pop(0)
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 3), np.float32), y=np.arange(10))
    assert tensorio._npz_declared_bytes(str(tmp_path / "d.npz"), 1 << 20) == 120 + 80
    with pytest.raises(tensorio.RunnerError, match="more than the limit of 150"):
        tensorio._npz_declared_bytes(str(tmp_path / "d.npz"), 150)
    bomb = _npz_bomb(tmp_path / "bomb.npz", 1, 30)  # 90 MiB of zeros in well under 1 MiB
    with pytest.raises(tensorio.RunnerError, match=r"member x.npy declares \d+ bytes from \d+ compressed"):
        tensorio._npz_declared_bytes(str(bomb), 1 << 30)


# ---------------------------------------------------------------- 7. a failed export --force keeps the previous one


def test_failed_export_force_keeps_the_previous_export(tmp_path, ledger):
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root for chattr +i (the CI container runs as root)")
    model = Path(__file__).parent / "fleet" / "data" / "tiny_a.tflite"
    out = tmp_path / "c"
    assert _cli("export", str(model), "--target", "cortex-m4", "-o", str(out)).exit_code == 0
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    other = Path(__file__).parent / "fleet" / "data" / "tiny_b.tflite"
    # The last file of the set cannot be replaced: the swap fails after the first two were swapped.
    subprocess.run(["chattr", "+i", str(out / "op_resolver.h")], check=True)
    try:
        r = _cli("export", str(other), "--target", "cortex-m4", "-o", str(out), "--force")
    finally:
        subprocess.run(["chattr", "-i", str(out / "op_resolver.h")], check=True)
    _one_error_line(r, f"cannot write the C sources to {out}")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous, "the previous export was not kept"
    ledger("bad_input", "export --force failing mid-way")
