"""Ansible inventories: INI and YAML, groups, children, vars precedence, ranges, --limit."""

from __future__ import annotations

import pytest

from edgeq.errors import InputError
from edgeq.inventory import expand_host_range, load_inventory

INI = """
# a fleet of Pis
lonely ansible_host=10.9.9.9

[pis]
pi[01:03] ansible_user=pi
pi-special ansible_host=127.0.0.1 ansible_port=2201 ansible_python_interpreter=/opt/venv/bin/python

[edge:children]
pis
cams

[cams]
cam1:2222 edgeq_remote_dir="/data/edgeq models"

[edge:vars]
ansible_user=edge
edgeq_remote_dir=/srv/edgeq

[all:vars]
ansible_ssh_private_key_file=~/.ssh/fleet
"""

YAML = """
all:
  vars:
    ansible_user: root
  hosts:
    lonely:
  children:
    pis:
      vars:
        ansible_user: pi
      hosts:
        pi[1:2]:
          ansible_port: 2202
        pi-special:
          ansible_host: 127.0.0.1
          ansible_user: admin
    cams:
      hosts:
        cam1: {}
"""


@pytest.fixture
def ini(tmp_path):
    p = tmp_path / "hosts.ini"
    p.write_text(INI)
    return load_inventory(p)


@pytest.fixture
def yml(tmp_path):
    p = tmp_path / "hosts.yml"
    p.write_text(YAML)
    return load_inventory(p)


def test_ini_hosts_in_file_order_with_ranges(ini):
    assert [h.name for h in ini.hosts] == ["lonely", "pi01", "pi02", "pi03", "pi-special", "cam1"]


def test_ini_vars_precedence_host_over_child_over_parent_over_all(ini):
    hosts = {h.name: h for h in ini.hosts}
    # pis (depth 2) beats edge (depth 1): host line sets ansible_user=pi
    assert hosts["pi01"].user == "pi"
    assert hosts["pi01"].vars["edgeq_remote_dir"] == "/srv/edgeq"
    assert hosts["pi01"].vars["ansible_ssh_private_key_file"] == "~/.ssh/fleet"
    assert hosts["pi-special"].address == "127.0.0.1"
    assert hosts["pi-special"].port == 2201
    assert hosts["pi-special"].vars["ansible_python_interpreter"] == "/opt/venv/bin/python"
    assert hosts["cam1"].port == 2222
    assert hosts["cam1"].vars["edgeq_remote_dir"] == "/data/edgeq models"
    assert hosts["cam1"].user == "edge"
    assert hosts["lonely"].user is None
    assert hosts["lonely"].groups == ("ungrouped",)
    assert set(hosts["pi02"].groups) == {"edge", "pis"}


def test_yaml_inventory(yml):
    hosts = {h.name: h for h in yml.hosts}
    assert list(hosts) == ["lonely", "pi1", "pi2", "pi-special", "cam1"]
    assert hosts["pi1"].port == 2202 and hosts["pi1"].user == "pi"
    assert hosts["pi-special"].user == "admin"
    assert hosts["cam1"].user == "root"
    assert hosts["lonely"].address == "lonely"


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("pis", ["pi01", "pi02", "pi03", "pi-special"]),
        ("pi0*", ["pi01", "pi02", "pi03"]),
        ("edge:!cams", ["pi01", "pi02", "pi03", "pi-special"]),
        ("edge,&pis,!pi-special", ["pi01", "pi02", "pi03"]),
        ("~^pi0[12]$", ["pi01", "pi02"]),
        ("all", ["lonely", "pi01", "pi02", "pi03", "pi-special", "cam1"]),
        ("lonely,cam1", ["lonely", "cam1"]),
    ],
)
def test_limit_patterns(ini, pattern, expected):
    assert [h.name for h in ini.select(pattern)] == expected


def test_limit_matching_nothing_names_the_hosts(ini):
    with pytest.raises(InputError, match="matches no host.*pi01"):
        ini.select("nope")


def test_ranges():
    assert expand_host_range("db[a:c].lan") == ["dba.lan", "dbb.lan", "dbc.lan"]
    assert expand_host_range("n[1:5:2]") == ["n1", "n3", "n5"]
    assert expand_host_range("plain") == ["plain"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("[pis\npi1\n", "unterminated section"),
        ("[pis:bogus]\npi1\n", "unknown section kind"),
        ("[pis]\npi1 novalue\n", "expected key=value"),
        ("[a:children]\nb\n[b:children]\na\n[a]\nh1\n", "its own child"),
    ],
)
def test_bad_ini_names_file_and_line(tmp_path, text, message):
    p = tmp_path / "bad.ini"
    p.write_text(text)
    with pytest.raises(InputError, match=message) as exc:
        load_inventory(p)
    assert "bad.ini" in str(exc.value)


def test_bad_yaml_names_the_key(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text("all:\n  children:\n    pis:\n      hostz: {}\n")
    with pytest.raises(InputError, match=r"bad.yml:all.children.pis.hostz: unknown key"):
        load_inventory(p)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such inventory"):
        load_inventory(tmp_path / "nope.ini")
