"""Offline stand-in for ansible-test's pip bootstrap script (get-pip.py).

ansible-test creates each sanity test's virtual environment without pip and then
runs ``get-pip-<version>.py``, which it downloads from ci-files.testing.ansible.com
unless ``~/.ansible/test/cache/get_pip_<version>.py`` already exists. Machines
without internet access cannot download it. scripts/ansible-sanity.sh installs
this file at that cache path (under a private HOME), with DONOR_PIP replaced by
the directory holding the pip that runs ansible-test. Run here, it does what
get-pip.py does: install the requested pip (and only what is asked for) into the
running interpreter, from the configured package index.

Arguments (as ansible-test passes them): pip options, package specs such as
``pip==24.2``, and get-pip's own ``--no-setuptools`` / ``--no-wheel``.
"""

import os
import sys

DONOR_PIP = "@DONOR_PIP@"


def main() -> int:
    donor = os.environ.get("EDGEQ_DONOR_PIP") or DONOR_PIP
    if not os.path.isdir(os.path.join(donor, "pip")):
        print(f"no pip package under {donor!r}; run scripts/ansible-sanity.sh, which fills it in", file=sys.stderr)
        return 1
    args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
    sys.path.insert(0, donor)
    from pip._internal.cli.main import main as pip_main

    return pip_main(["install", "--ignore-installed", *args])


if __name__ == "__main__":
    sys.exit(main())
