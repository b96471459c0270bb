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
    (('run_ma = 3.3', 'run_ma = "3 mA"'), "power.run_ma"),  # wrong type
    (('voltage_v = 3.0', 'voltage_v = 0'), "power.voltage_v"),  # out of range
    (('run_ma = 3.3', 'run_ma = 3.3\nidle_w = 1'), "power.idle_w"),  # a Linux board's key on an MCU
    (('run_ma = 3.3', 'run_ma = 3.3\nrun_mA = 1'), "power.run_mA"),  # unknown key
    (('run_ma = 3.3\n', ''), "power.run_ma"),  # missing
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


def test_every_shipped_profile_has_power_figures_with_a_source():
    for t in list_targets():
        assert t.power is not None, t.name
        text = Path(t.source).read_text()
        section = text.split("[power]", 1)[1]
        assert section.count("#") >= 2, f"{t.name}: [power] figures need their source in a comment"
        if t.kind == "linux":
            assert 0 < t.power.idle_w < t.power.load_w and t.power.run_ma is None
        else:
            assert t.power.voltage_v > 0 and t.power.run_ma > 0 and t.power.idle_w is None
    # The published figures (ANCHORS.md): Pi 4 1.6/5.0 W, Pi 5 2.8/9.7 W, Pi 3 1.4/3.7 W;
    # nRF52840 52 uA/MHz x 64 MHz at 3 V; ESP32-S3 32 mA at 3.3 V.
    assert (load_target("rpi4").power.idle_w, load_target("rpi4").power.load_w) == (1.6, 5.0)
    assert (load_target("rpi5").power.idle_w, load_target("rpi5").power.load_w) == (2.8, 9.7)
    assert (load_target("rpi3").power.idle_w, load_target("rpi3").power.load_w) == (1.4, 3.7)
    m4 = load_target("cortex-m4").power
    assert m4.voltage_v == 3.0 and abs(m4.run_ma - 0.052 * 64) < 0.05
    assert (load_target("esp32-s3").power.voltage_v, load_target("esp32-s3").power.run_ma) == (3.3, 32)
    assert load_target("rpi4").to_dict()["power"] == {"idle_w": 1.6, "load_w": 5.0}


def test_linux_power_load_below_idle_is_refused(tmp_path):
    src = (SHIPPED / "rpi4.toml").read_text().replace("load_w = 5.0", "load_w = 1.0")
    p = tmp_path / "pi.toml"
    p.write_text(src)
    with pytest.raises(TargetError, match=rf"{re.escape(str(p))}:power.load_w: 1 W is less than idle_w"):
        load_target(str(p))
    p.write_text((SHIPPED / "rpi4.toml").read_text().replace("idle_w = 1.6", "voltage_v = 5"))
    with pytest.raises(TargetError, match=r"power.idle_w: missing"):
        load_target(str(p))


def test_a_profile_without_power_loads_and_has_no_energy(tmp_path):
    from edgeq.energy import estimate_energy

    src = (SHIPPED / "rpi4.toml").read_text()
    p = tmp_path / "nopower.toml"
    p.write_text(src.split("[power]", 1)[0].replace('name = "rpi4"', 'name = "nopower"'))
    t = load_target(str(p))
    assert t.power is None and estimate_energy(t, 10.0) is None


def test_energy_estimates_follow_the_published_figures():
    from edgeq.energy import estimate_energy

    # Pi 4, all 4 threads: 5.0 W x 10 ms = 50 mJ, of which (5.0 - 1.6) W x 10 ms = 34 mJ above idle.
    e = estimate_energy(load_target("rpi4"), 10.0, "device")
    assert e.total_mj == pytest.approx(50.0) and e.above_idle_mj == pytest.approx(34.0)
    assert e.label == "estimate" and "estimate" in e.basis and "measured on the device" in e.basis
    # nRF52840-class M4: 3.0 V x 3.3 mA x 100 ms = 0.99 mJ; no idle share on a microcontroller.
    m = estimate_energy(load_target("cortex-m4"), 100.0)
    assert m.total_mj == pytest.approx(0.99) and m.above_idle_mj is None
    assert m.latency_source == "profile-estimate" and "profile's latency estimate" in m.basis
    assert estimate_energy(load_target("rpi4"), None) is None
