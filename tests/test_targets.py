"""Target profiles: every shipped file loads; broken files name file:key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgeq.errors import TargetError
from edgeq.targets import list_targets, load_target, shipped_names
from edgeq.tflite_file import BUILTIN_OP_NAMES

SHIPPED = Path(__file__).resolve().parent.parent / "targets"
REQUIRED = {"rpi3", "rpi4", "rpi5", "rpi-zero-2w", "cortex-m4", "cortex-m7", "esp32-s3"}


def test_every_shipped_profile_loads():
    names = {t.name for t in list_targets()}
    assert REQUIRED <= names
    assert set(shipped_names()) == names


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_profile_contents(name):
    t = load_target(name)
    assert t.name == name and t.source.endswith(f"{name}.toml")
    assert 0 < t.ram_available_bytes <= t.ram_bytes and 0 < t.flash_available_bytes <= t.flash_bytes
    assert t.clock_hz > 0 and t.cores >= 1 and t.macs_per_cycle
    assert t.supports_scheme("int8")
    if t.kind == "mcu":
        assert t.runtime == "tflm" and t.requires_full_integer and not t.supports_scheme("float32")
        assert t.op_support("CONV_2D").add_method == "AddConv2D"
        assert t.op_support("TOPK_V2") is None
    else:
        assert t.runtime == "litert" and t.backend == "xnnpack" and t.supports_scheme("float32")
        assert t.op_support("TOPK_V2") is not None and t.op_support("STABLEHLO_ADD") is None


def test_issue_figures():
    m4, m7, esp = load_target("cortex-m4"), load_target("cortex-m7"), load_target("esp32-s3")
    assert (m4.ram_bytes, m4.flash_bytes, m4.clock_hz) == (256 * 1024, 1024 * 1024, 64_000_000)
    assert (m7.ram_bytes, m7.flash_bytes, m7.clock_hz) == (320 * 1024, 1024 * 1024, 216_000_000)
    assert esp.ram_bytes == 512 * 1024 and esp.psram_bytes and esp.backend == "esp-nn"
    assert not esp.supports_scheme("int16x8")  # ESP-NN accelerates int8 only


def test_every_number_cites_a_source():
    for path in SHIPPED.glob("[!_]*.toml"):
        text = path.read_text()
        assert text.count("#") >= 5, f"{path.name} has too few source comments"


def test_op_tables_name_real_ops_and_resolver_methods():
    # Method names follow MicroMutableOpResolver: AddConv2D, AddBatchMatMul, AddPadV2 ...
    t = load_target("cortex-m4")
    for op, support in t.ops.items():
        assert op in BUILTIN_OP_NAMES
        assert re.fullmatch(r"Add[A-Z][A-Za-z0-9]*", support.add_method)
    assert t.op_support("BATCH_MATMUL").add_method == "AddBatchMatMul"
    assert t.op_support("PADV2").add_method == "AddPadV2"
    assert t.op_support("UNIDIRECTIONAL_SEQUENCE_LSTM").add_method == "AddUnidirectionalSequenceLSTM"
    for op in t.accelerated:
        assert op in t.ops


def test_user_profile_by_path(tmp_path):
    src = (SHIPPED / "cortex-m4.toml").read_text().replace('name = "cortex-m4"', 'name = "my-board"')
    p = tmp_path / "board.toml"
    p.write_text(src)
    assert load_target(str(p)).name == "my-board"


@pytest.mark.parametrize("edit, key", [
    (('ram = "256 KiB"', 'ram = "256 KiB"\nrom = "1 KiB"'), "memory.rom"),  # unknown key
    (('clock_mhz = 64', 'clock_mhz = -5'), "cpu.clock_mhz"),  # out of range
    (('clock_mhz = 64', 'clock_mhz = "fast"'), "cpu.clock_mhz"),  # wrong type
    (('cores = 1', 'cores = 1.5'), "cpu.cores"),
    (('ram = "256 KiB"', 'ram = "256 KB"'), "memory.ram"),  # unit we do not guess
    (('ram_available = "192 KiB"', 'ram_available = "2 MiB"'), "memory.ram_available"),
    (('backend = "cmsis-nn"', 'backend = "tpu"'), "backend"),
    (('schemes = ["int8", "int16x8"]', 'schemes = ["int8", "int4"]'), "schemes"),
    (('requires_full_integer = true', 'requires_full_integer = "yes"'), "requires_full_integer"),
    (('int8 = 0.25', 'int8 = 0'), "compute.macs_per_cycle.int8"),
    (('threads = 1', 'threads = 4'), "compute.threads"),
    (('kind = "mcu"', 'kind = "mcu"\ncolor = "red"'), "color"),
])
def test_broken_profile_names_file_and_key(tmp_path, edit, key):
    src = (SHIPPED / "cortex-m4.toml").read_text()
    old, new = edit
    assert old in src
    p = tmp_path / "broken.toml"
    p.write_text(src.replace(old, new, 1))
    with pytest.raises(TargetError) as info:
        load_target(str(p))
    assert f"{p}:{key}" in str(info.value)


def test_missing_key_and_bad_toml(tmp_path):
    src = (SHIPPED / "cortex-m4.toml").read_text()
    p = tmp_path / "nokind.toml"
    p.write_text(src.replace('kind = "mcu"\n', ""))
    with pytest.raises(TargetError, match=r"nokind.toml:kind: missing"):
        load_target(str(p))
    p.write_text("name = [")
    with pytest.raises(TargetError, match="not valid TOML"):
        load_target(str(p))


def test_unknown_name_lists_known_targets():
    with pytest.raises(TargetError) as info:
        load_target("no-such-board")
    assert "no-such-board" in str(info.value) and "cortex-m4" in str(info.value)
    with pytest.raises(TargetError):
        load_target("_tflm-ops")
    with pytest.raises(TargetError, match="no such file"):
        load_target("/nonexistent/board.toml")
