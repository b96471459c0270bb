"""Inventory values edgeq uses are checked when the file is read: ports are whole numbers, per-host timeouts are
bounded seconds; anything else is one line naming the file and the host (never exit 70, never a silent 22)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.errors import InputError
from edgeq.inventory import MAX_TIMEOUT_S, load_inventory

MODEL = Path(__file__).resolve().parent / "fleet" / "data" / "tiny_a.tflite"


def _ini(tmp_path: Path, host_vars: str) -> Path:
    path = tmp_path / "hosts.ini"
    path.write_text(f"[pis]\npi1 ansible_host=127.0.0.1 {host_vars}\n")
    return path


def _yaml(tmp_path: Path, host_vars: str) -> Path:
    path = tmp_path / "hosts.yml"
    path.write_text(f"all:\n  children:\n    pis:\n      hosts:\n        pi1:\n          {host_vars}\n")
    return path


@pytest.mark.parametrize("value", ["1e400", "22.9", "-inf", "0", "65536", "True", "'2x'", "[22]"])
def test_ini_port_that_is_not_a_whole_port_number_is_one_line(tmp_path, value, ledger):
    path = _ini(tmp_path, f"ansible_port={value}")
    with pytest.raises(InputError) as exc:
        load_inventory(path)
    text = str(exc.value)
    assert str(path) in text and "'pi1'" in text and "ansible_port=" in text and "\n" not in text
    ledger("bad_input", f"inventory INI ansible_port={value}")


@pytest.mark.parametrize("value", [".inf", "1e400", "22.9", "-22", "true", "'twenty'", "{a: 1}"])
def test_yaml_port_that_is_not_a_whole_port_number_is_one_line(tmp_path, value, ledger):
    path = _yaml(tmp_path, f"ansible_port: {value}")
    with pytest.raises(InputError) as exc:
        load_inventory(path)
    text = str(exc.value)
    assert str(path) in text and "'pi1'" in text and "ansible_port=" in text and "\n" not in text
    ledger("bad_input", f"inventory YAML ansible_port: {value}")


def test_whole_ports_are_read_as_integers(tmp_path):
    assert load_inventory(_ini(tmp_path, "ansible_port=2222")).hosts[0].port == 2222
    assert load_inventory(_yaml(tmp_path, "ansible_port: 2201")).hosts[0].port == 2201
    assert load_inventory(_yaml(tmp_path, "ansible_port: '2202'")).hosts[0].port == 2202  # Ansible takes it too


def test_cli_with_an_infinite_port_exits_with_one_error_line(tmp_path, monkeypatch):
    # Was: OverflowError, exit 70 with a traceback.
    monkeypatch.chdir(tmp_path)
    path = _yaml(tmp_path, "ansible_port: .inf")
    res = CliRunner().invoke(main, ["deploy", str(MODEL), "--inventory", str(path)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "ansible_port=" in res.output and str(path) in res.output


def test_per_host_timeouts_are_read_in_seconds(tmp_path):
    ini = _ini(tmp_path, "edgeq_probe_timeout=30 edgeq_upload_timeout=1200.5 edgeq_run_timeout=86400")
    h = load_inventory(ini).hosts[0]
    assert (h.probe_timeout, h.upload_timeout, h.run_timeout) == (30.0, 1200.5, 86400.0)
    assert isinstance(h.probe_timeout, float)
    y = load_inventory(_yaml(tmp_path, "{edgeq_run_timeout: 45, edgeq_probe_timeout: '2.5'}")).hosts[0]
    assert (y.probe_timeout, y.upload_timeout, y.run_timeout) == (2.5, None, 45.0)
    plain = load_inventory(_ini(tmp_path, "")).hosts[0]
    assert (plain.probe_timeout, plain.upload_timeout, plain.run_timeout) == (None, None, None)


def test_group_timeouts_apply_to_their_hosts(tmp_path):
    path = tmp_path / "hosts.ini"
    path.write_text("[pis]\npi1\npi2 edgeq_run_timeout=60\n[pis:vars]\nedgeq_run_timeout=300\n")
    hosts = {h.name: h for h in load_inventory(path).hosts}
    assert hosts["pi1"].run_timeout == 300.0 and hosts["pi2"].run_timeout == 60.0


@pytest.mark.parametrize("value", ["0", "-5", "1e400", "nan", "86401", "True", "'soon'", "10**9"])
def test_bad_per_host_timeout_is_one_line_naming_file_and_host(tmp_path, value, ledger):
    path = _ini(tmp_path, f"edgeq_upload_timeout={value}")
    with pytest.raises(InputError) as exc:
        load_inventory(path)
    text = str(exc.value)
    assert str(path) in text and "'pi1'" in text and "edgeq_upload_timeout=" in text and "\n" not in text
    assert f"{MAX_TIMEOUT_S:g}" in text
    ledger("bad_input", f"inventory edgeq_upload_timeout={value}")


@pytest.mark.parametrize("value", [".nan", "-.inf", "100000", "false", "[1]"])
def test_bad_per_host_timeout_in_yaml(tmp_path, value):
    with pytest.raises(InputError, match="'pi1': edgeq_run_timeout="):
        load_inventory(_yaml(tmp_path, f"edgeq_run_timeout: {value}"))
