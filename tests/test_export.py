"""edgeq export --format c: sources that compile and hold exactly the model's bytes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edgeq.errors import TargetError, UsageError
from edgeq.export import FILES, ExportOptions, export_c
from edgeq.targets import load_target

pytestmark = pytest.mark.slow

MAIN_CC = r"""
#include <cstdio>
#include "model_data.h"
int main(int argc, char** argv) {
  std::FILE* f = std::fopen(argv[1], "wb");
  if (!f) return 2;
  std::fwrite(g_model, 1, g_model_len, f);
  std::fclose(f);
  return (reinterpret_cast<unsigned long>(g_model) % 16 == 0) ? 0 : 3;
}
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits_int8_tflite):
    out = tmp_path_factory.mktemp("export") / "c"
    return out, export_c(digits_int8_tflite, load_target("cortex-m4"), out)


def test_files_and_resolver(exported, digits_int8_tflite):
    out, res = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    h = (out / "op_resolver.h").read_text()
    ops = res.ops
    assert set(ops) >= {"CONV_2D", "MAX_POOL_2D", "FULLY_CONNECTED", "SOFTMAX"}
    assert "tflite::MicroMutableOpResolver<kNumModelOps>" in h and f"kNumModelOps = {len(ops)};" in h
    assert re.findall(r"resolver\.(Add\w+)\(\)", h) == list(res.resolver_methods)
    assert "resolver.AddConv2D()" in h and "resolver.AddMaxPool2D()" in h and "resolver.AddFullyConnected()" in h
    assert len(set(res.resolver_methods)) == len(res.resolver_methods)
    assert f"kTensorArenaSize = {res.tensor_arena_size};" in h
    assert res.tensor_arena_size >= res.arena_bytes * 1.2 > 0
    cc = (out / "model_data.cc").read_text()
    assert "alignas(16) const unsigned char g_model[] = {" in cc
    assert f"const unsigned int g_model_len = {digits_int8_tflite.stat().st_size};" in cc


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_model_data_compiles_and_holds_the_model_bytes(exported, digits_int8_tflite, tmp_path):
    out, _ = exported
    (tmp_path / "main.cc").write_text(MAIN_CC)
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", "-c", str(out / "model_data.cc"), "-o",
                    str(tmp_path / "model_data.o")], check=True, timeout=120)
    subprocess.run(["g++", "-std=c++17", "-I", str(out), str(tmp_path / "main.cc"), str(tmp_path / "model_data.o"),
                    "-o", str(tmp_path / "dump")], check=True, timeout=120)
    subprocess.run([str(tmp_path / "dump"), str(tmp_path / "back.tflite")], check=True, timeout=30)
    assert (tmp_path / "back.tflite").read_bytes() == digits_int8_tflite.read_bytes()


def test_refuses_and_writes_nothing(tmp_path, digits_int8_tflite, digits_float_tflite):
    with pytest.raises(UsageError, match="not TFLite Micro"):
        export_c(digits_int8_tflite, load_target("rpi4"), tmp_path / "a")
    with pytest.raises(TargetError, match="does not fit"):
        export_c(digits_float_tflite, load_target("cortex-m4"), tmp_path / "b")
    with pytest.raises(UsageError):
        export_c(digits_int8_tflite, load_target("cortex-m4"), tmp_path / "c", ExportOptions(format="zip"))
    assert list(tmp_path.iterdir()) == []


def test_existing_files_need_force(tmp_path, digits_int8_tflite):
    out = tmp_path / "c"
    out.mkdir()
    (out / "model_data.cc").write_text("old")
    with pytest.raises(Exception, match="already exists"):
        export_c(digits_int8_tflite, load_target("cortex-m4"), out)
    assert (out / "model_data.cc").read_text() == "old"
    export_c(digits_int8_tflite, load_target("cortex-m4"), out, ExportOptions(force=True))
    assert "g_model" in (out / "model_data.cc").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)


# --------------------------------------- generated C: every name escaped, every method real

DATA = Path(__file__).parent / "data"


def tflm_methods() -> list[str]:
    """MicroMutableOpResolver's op methods, read from the upstream header (see the file's header)."""
    lines = (DATA / "tflm_op_resolver_methods.txt").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def stand_in_tflm(root: Path) -> Path:
    """A minimal tensorflow/lite/micro/micro_mutable_op_resolver.h declaring exactly the upstream methods."""
    header = root / "tensorflow" / "lite" / "micro" / "micro_mutable_op_resolver.h"
    header.parent.mkdir(parents=True)
    methods = "\n".join(f"  TfLiteStatus {m}() {{ return kTfLiteOk; }}" for m in tflm_methods())
    header.write_text(
        "#pragma once\n"
        "typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;\n"
        "namespace tflite {\n"
        "template <unsigned int tOpCount>\n"
        "class MicroMutableOpResolver {\n public:\n" + methods + "\n};\n}  // namespace tflite\n")
    return root


RESOLVER_MAIN = r"""
#include "op_resolver.h"
int main() {
  static_assert(kNumModelOps > 0, "no ops");
  static_assert(kTensorArenaSize > 0, "no arena");
  ModelOpResolver resolver;
  return RegisterModelOps(resolver) == kTfLiteOk ? 0 : 1;
}
"""


def test_stand_in_list_is_the_upstream_header():
    methods = tflm_methods()
    assert len(methods) == len(set(methods)) > 100
    assert {"AddConv2D", "AddDepthwiseConv2D", "AddFullyConnected", "AddSoftmax", "AddMaxPool2D"} <= set(methods)
    assert all(re.fullmatch(r"Add[A-Z][A-Za-z0-9]*", m) for m in methods)
    assert "AddCustom" not in methods and "AddBuiltin" not in methods


def test_every_shipped_mcu_profile_names_real_resolver_methods():
    from edgeq.targets import list_targets

    real = set(tflm_methods())
    checked = 0
    for profile in list_targets():
        if profile.runtime != "tflm":
            continue
        for op, support in profile.ops.items():
            if support.add_method:
                assert support.add_method in real, f"{profile.name}: {op} -> {support.add_method}"
                checked += 1
    assert checked > 20


def test_emitted_methods_are_tflite_micro_methods(exported):
    out, res = exported
    emitted = re.findall(r"resolver\.(\w+)\(\)", (out / "op_resolver.h").read_text())
    assert emitted and set(emitted) <= set(tflm_methods())


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_op_resolver_h_compiles_and_registers_against_the_stand_in(exported, tmp_path):
    out, _ = exported
    inc = stand_in_tflm(tmp_path / "tflm")
    (tmp_path / "main.cc").write_text(RESOLVER_MAIN)
    build = subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", "-I", str(out), "-I", str(inc),
                            str(tmp_path / "main.cc"), "-o", str(tmp_path / "resolver")],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    assert subprocess.run([str(tmp_path / "resolver")], timeout=30).returncode == 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_the_stand_in_catches_a_misspelled_method(exported, tmp_path):
    """The compile check has teeth: one wrong letter in a registration fails the build."""
    out, _ = exported
    bad = tmp_path / "bad"
    bad.mkdir()
    text = (out / "op_resolver.h").read_text()
    assert "resolver.AddConv2D()" in text
    (bad / "op_resolver.h").write_text(text.replace("resolver.AddConv2D()", "resolver.AddConv2d()"))
    inc = stand_in_tflm(tmp_path / "tflm")
    (tmp_path / "main.cc").write_text(RESOLVER_MAIN)
    build = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-I", str(bad), "-I", str(inc),
                            str(tmp_path / "main.cc")], capture_output=True, text=True, timeout=120)
    assert build.returncode != 0 and "AddConv2d" in build.stderr


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("evil", ["m\n#error injected line\nx.tflite", "trailing backslash\\",
                                  "m\r\n#define g_model_len 0\n.tflite", "m\u2028\x1b[2J.tflite"])
def test_model_file_names_cannot_inject_c(tmp_path, digits_int8_tflite, evil, ledger):
    src = tmp_path / "in" / evil
    src.parent.mkdir()
    src.write_bytes(digits_int8_tflite.read_bytes())
    out = tmp_path / "c"
    export_c(src, load_target("cortex-m4"), out)
    cc = (out / "model_data.cc").read_text()
    first, rest = cc.split("\n", 1)
    assert first.startswith("// Generated by edgeq export from ") and first.endswith(").")
    assert rest.startswith('#include "model_data.h"\n'), cc[:300]
    assert "#error" not in rest and "#define" not in rest and "\x1b" not in cc and "\\" not in first
    subprocess.run(["g++", "-std=c++17", "-trigraphs", "-Wall", "-Werror", "-c", str(out / "model_data.cc"), "-o",
                    str(tmp_path / "m.o")], check=True, timeout=120)
    ledger("bad_input", f"export: model file name {evil!r}")


@pytest.mark.parametrize("evil", ["m */ int injected; /* x", "m\x00\x1b[2J\x85\u2029", "x" * 5000 + "\n#error"])
def test_names_that_cannot_be_file_names_cannot_inject_c_either(evil, ledger):
    from edgeq.export import model_data_cc, op_resolver_h

    cc = model_data_cc(b"\x01\x02", evil, "ab" * 32)
    assert cc.count("\n") == model_data_cc(b"\x01\x02", "m.tflite", "ab" * 32).count("\n")
    assert cc.split("\n")[1] == '#include "model_data.h"'
    assert all(ch == "\n" or 32 <= ord(ch) < 127 for ch in cc) and "*/" not in cc and "/*" not in cc
    h = op_resolver_h(["AddConv2D"], 100, 80, 0.2, evil)
    assert h.split("\n")[1] == "#ifndef EDGEQ_OP_RESOLVER_H_"
    assert all(ch == "\n" or 32 <= ord(ch) < 127 for ch in h)
    ledger("bad_input", f"export: name {evil[:30]!r} in generated C")


def test_a_profile_cannot_put_code_in_the_resolver(tmp_path, digits_int8_tflite, ledger):
    import dataclasses
    from types import MappingProxyType

    from edgeq.targets import OpSupport

    m4 = load_target("cortex-m4")
    ops = dict(m4.ops)
    ops["CONV_2D"] = OpSupport("CONV_2D", 'AddConv2D(); system("rm -rf ~"); resolver.AddRelu', None)
    evil = dataclasses.replace(m4, ops=MappingProxyType(ops))
    with pytest.raises(TargetError, match="is not a C\\+\\+ identifier"):
        export_c(digits_int8_tflite, evil, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    ledger("bad_input", "export: a target profile whose resolver method is code")


# --------------------------------------------------------------- write errors: one line

_CHILD = """
import os, resource, signal, sys
mode = sys.argv[1]
if mode == "fsize":  # a disk that fills up: writes past 40 KB fail with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
sys.argv = ["edgeq"] + sys.argv[2:]
from edgeq.cli import main
main()
"""


def _world_readable_copy(model: Path) -> Path:
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="edgeq-export-test-"))
    d.chmod(0o755)
    (d / "model.tflite").write_bytes(model.read_bytes())
    (d / "model.tflite").chmod(0o644)
    return d


def _export_child(mode: str, model: Path, out: Path):
    import sys

    env = {**os.environ, "HOME": str(out.parent)}
    return subprocess.run([sys.executable, "-c", _CHILD, mode, "export", str(model), "--target", "cortex-m4",
                           "-o", str(out)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=str(Path(__file__).resolve().parent.parent))


def test_disk_full_while_exporting_is_one_line_and_leaves_nothing(digits_int8_tflite, ledger):
    base = _world_readable_copy(digits_int8_tflite)
    try:
        out = base / "c"
        res = _export_child("fsize", base / "model.tflite", out)
        assert res.returncode == 1, res.stderr[-800:]
        lines = res.stderr.strip().splitlines()
        assert lines[-1].startswith(f"error: cannot write the C sources to {out}: ") and "File too large" in lines[-1]
        assert "Traceback" not in res.stderr
        assert not out.exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ledger("bad_input", "export: disk full (file size limit) while writing")


def test_read_only_output_directory_is_one_line(tmp_path, digits_int8_tflite, ledger):
    from click.testing import CliRunner

    from edgeq.cli import main

    ro = tmp_path / "ro"
    ro.mkdir()
    # File modes do not stop root; the immutable flag does (root is how the CI container runs).
    lock, unlock = (["chattr", "+i", str(ro)], ["chattr", "-i", str(ro)]) if os.geteuid() == 0 else (None, None)
    if lock:
        subprocess.run(lock, check=True)
    else:
        ro.chmod(0o555)
    try:
        res = CliRunner().invoke(main, ["export", str(digits_int8_tflite), "--target", "cortex-m4", "-o",
                                        str(ro / "c")])
    finally:
        if unlock:
            subprocess.run(unlock, check=True)
        ro.chmod(0o755)
    assert res.exit_code == 1, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith(f"error: cannot write the C sources to {ro / 'c'}: {ro / 'c'}: ")
    assert line.endswith(("Permission denied; check free space and permissions, or choose another -o",
                          "Operation not permitted; check free space and permissions, or choose another -o"))
    assert list(ro.iterdir()) == []
    ledger("bad_input", "export: read-only output directory")


def test_a_directory_where_a_file_goes_is_one_line(tmp_path, digits_int8_tflite, ledger):
    from click.testing import CliRunner

    from edgeq.cli import main

    out = tmp_path / "c"
    (out / "op_resolver.h").mkdir(parents=True)
    res = CliRunner().invoke(main, ["export", str(digits_int8_tflite), "--target", "cortex-m4", "-o", str(out),
                                    "--force"])
    assert res.exit_code == 1, res.output
    assert res.output.strip() == f"error: {out / 'op_resolver.h'} is a directory; remove it or choose another -o"
    ledger("bad_input", "export: a directory where an output file goes")
