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


# ------------------------------------------- bad inventories: one line, never a traceback


def _deploy_with(tmp_path, inventory_text: str, name: str = "hosts.yml", limit: str | None = None):
    """`edgeq deploy` with an inventory: the inventory is read before anything else is touched."""
    from click.testing import CliRunner

    from edgeq.cli import main

    inv = tmp_path / name
    inv.write_text(inventory_text)
    args = ["deploy", str(tmp_path / "model.tflite"), "--inventory", str(inv)]
    if limit is not None:
        args += ["--limit", limit]
    return CliRunner().invoke(main, args)


def _one_error_line(res, *needles: str) -> None:
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


BAD_INVENTORIES = {
    # name: (file name, text, --limit, words the error line must hold)
    "bad --limit regex '~['": ("hosts.ini", "pi1\npi2\n", "~[", ["--limit '~['", "not a valid regular expression"]),
    "bad --limit regex '~(?P<'": ("hosts.ini", "pi1\n", "pis,~(?P<", ["not a valid regular expression"]),
    "YAML hosts: as a list": ("hosts.yml", "all:\n  children:\n    pis:\n      hosts:\n        - pi1\n        - pi2\n",
                              None, ["hosts.yml:all.children.pis.hosts: must be a mapping, not a list",
                                     "pi1: {}"]),
    "YAML children: as a list": ("hosts.yml", "all:\n  children:\n    - pis\n", None,
                                 ["hosts.yml:all.children: must be a mapping, not a list"]),
    "YAML vars: as a string": ("hosts.yml", "all:\n  vars: ansible_user=pi\n", None,
                               ["hosts.yml:all.vars: must be a mapping, not a string"]),
    "INI host range with step 0": ("hosts.ini", "[pis]\npi[1:9:0]\n", None,
                                   ["hosts.ini:2: bad host range 'pi[1:9:0]': the step must be at least 1"]),
    "YAML host range with step 0": ("hosts.yml", "all:\n  hosts:\n    pi[01:10:0]:\n", None,
                                    ["hosts.yml:all.hosts: bad host range", "step must be at least 1"]),
    "host range of 100 million hosts": ("hosts.ini", "[pis]\npi[1:100000000]\n", None,
                                        ["hosts.ini:2: host range 'pi[1:100000000]' expands to more than 100000"]),
    "two ranges multiplying to 10^10 hosts": ("hosts.yml", "all:\n  hosts:\n    n[1:100000]-[1:100000]:\n", None,
                                              ["expands to more than 100000 hosts"]),
    "host range with a 30-digit end": ("hosts.ini", "pi[1:" + "9" * 30 + "]\n", None, ["at most 9 digits"]),
    "recursive YAML alias": ("hosts.yml", "all: &top\n  children:\n    loop: *top\n", None,
                             ["hosts.yml:all.children.loop: the group contains itself (a recursive YAML alias)"]),
    "YAML aliases reused 10^8 times": (
        "hosts.yml",
        "x0: &a0 {hosts: {h1: , h2: , h3: , h4: , h5: , h6: , h7: , h8: , h9: , h10: }}\n"
        + "".join(f"x{i}: &a{i} {{children: {{" + ", ".join(f"g{i}_{j}: *a{i - 1}" for j in range(10)) + "}}\n"
                  for i in range(1, 8)),
        None, ["expands to more than 2000000 group and host entries"]),
    "YAML nested 10000 levels": ("hosts.yml", "all: " + "[" * 10000 + "]" * 10000 + "\n", None,
                                 ["hosts.yml"]),
    "groups nested 2000 levels (INI children chain)": (
        "hosts.ini", "".join(f"[g{i}:children]\ng{i + 1}\n" for i in range(2000)) + "[g2000]\nh1\n", None,
        ["groups nested more than 64 levels deep"]),
}


@pytest.mark.parametrize("name", list(BAD_INVENTORIES))
def test_bad_inventory_is_one_error_line(tmp_path, name, ledger):
    fname, text, limit, needles = BAD_INVENTORIES[name]
    res = _deploy_with(tmp_path, text, fname, limit)
    _one_error_line(res, *needles)
    ledger("bad_input", f"inventory: {name}")


def test_limits_are_generous_for_real_fleets(tmp_path):
    """The bounds refuse crafted files, not big fleets: 20,000 hosts in nested groups load."""
    text = "[edge:children]\nracks\n[racks:children]\n" + "".join(f"rack{r}\n" for r in range(20))
    text += "".join(f"[rack{r}]\nr{r}n[0001:1000]\n" for r in range(20))
    p = tmp_path / "big.ini"
    p.write_text(text)
    inv = load_inventory(p)
    assert len(inv.hosts) == 20_000 and len(inv.select("rack7")) == 1000
    assert set(inv.hosts[0].groups) == {"edge", "racks", "rack0"}


def test_shared_children_are_collected_once(tmp_path):
    """A diamond of groups 30 levels deep: 2^30 paths, but each group's members are computed once."""
    lines = []
    for i in range(30):
        lines += [f"[l{i}:children]", f"a{i}", f"b{i}", f"[a{i}:children]", f"l{i + 1}", f"[b{i}:children]",
                  f"l{i + 1}"]
    lines += ["[l30]", "h1"]
    p = tmp_path / "diamond.ini"
    p.write_text("\n".join(lines) + "\n")
    inv = load_inventory(p)
    assert [h.name for h in inv.select("l0")] == ["h1"]
