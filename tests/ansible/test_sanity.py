"""`ansible-test sanity` on the collection (compile, validate-modules, pep8, yamllint, runtime-metadata,
ansible-doc), run offline through scripts/ansible-sanity.sh (our own pip bootstrap; requirements from the
configured package index, cached in ~/.cache/edgeq-ansible-test after the first run)."""

from __future__ import annotations

import subprocess

import pytest

from tests.ansible.ansible_helper import ROOT, tool

pytestmark = pytest.mark.slow


def test_ansible_test_sanity_passes_offline():
    tool("ansible-test")
    p = subprocess.run(["sh", str(ROOT / "scripts" / "ansible-sanity.sh")], capture_output=True, text=True,
                       timeout=1800)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    for test in ("compile", "validate-modules", "pep8"):
        assert f'Running sanity test "{test}"' in out
    # ansible-test logs "Downloading pip X bootstrap script: https://ci-files..." when it fetches get-pip.py;
    # pip's own "Downloading pip-24.2-...whl" from the configured package index is allowed (a fresh HOME).
    assert "bootstrap script: https://" not in out and "ci-files.testing.ansible.com" not in out
