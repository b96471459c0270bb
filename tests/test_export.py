"""edgeq export --format c: sources that compile and hold exactly the model's bytes."""

from __future__ import annotations

import re
import shutil
import subprocess

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
