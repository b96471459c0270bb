#!/bin/sh
# ansible-test sanity for the edgeq.fleet collection, without internet access to ci-files.testing.ansible.com.
#
#   scripts/ansible-sanity.sh [ansible-test sanity options]   (default: --test compile --test validate-modules
#                                                               --test pep8 --test yamllint --test runtime-metadata
#                                                               --test ansible-doc)
#
# ansible-test needs the collection under .../ansible_collections/edgeq/fleet, so the source is copied into a
# scratch tree. Its sanity virtual environments are bootstrapped by a get-pip script it would download; we put our
# own (scripts/ansible-test-get-pip.py) at the cache path it checks first, under a private HOME, so nothing is
# fetched from the internet except the pinned sanity requirements from the configured package index.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
ANSIBLE_TEST=$(dirname "$PY")/ansible-test
[ -x "$ANSIBLE_TEST" ] || { echo "ansible-test is missing: pip install -e '.[ansible]'" >&2; exit 2; }
WORK=${EDGEQ_SANITY_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeq-ansible-test}
TREE=$(mktemp -d /tmp/edgeq-sanity.XXXXXX)
trap 'rm -rf "$TREE"' EXIT INT TERM
mkdir -p "$TREE/ansible_collections/edgeq" "$WORK/.ansible/test/cache"
cp -a "$ROOT/ansible/edgeq/fleet" "$TREE/ansible_collections/edgeq/fleet"
rm -rf "$TREE/ansible_collections/edgeq/fleet/tests/output"

# The pip version ansible-test bootstraps (get_venv_packages' default), and where the running pip lives.
PIP_VERSION=$("$PY" -c 'import re, ansible_test._internal.python_requirements as r
print(re.search(r"pip=.([0-9.]+).", open(r.__file__).read()).group(1))')
DONOR=$("$PY" -c 'import os, pip; print(os.path.dirname(os.path.dirname(pip.__file__)))')
sed "s#@DONOR_PIP@#$DONOR#" "$ROOT/scripts/ansible-test-get-pip.py" \
    > "$WORK/.ansible/test/cache/get_pip_$(echo "$PIP_VERSION" | tr . _).py"

# Devices run the modules with their own Python: compile them with every interpreter named in
# EDGEQ_SANITY_PYTHONS too (e.g. "/opt/py38/bin/python3.8 /opt/py313/bin/python3.13").
for interp in ${EDGEQ_SANITY_PYTHONS:-}; do
    ver=$("$interp" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    (cd "$TREE/ansible_collections/edgeq/fleet" && HOME=$WORK "$ANSIBLE_TEST" sanity --test compile --python "$ver" \
        --python-interpreter "$interp" --color no)
done

[ $# -gt 0 ] || set -- --test compile --test validate-modules --test pep8 --test yamllint --test runtime-metadata \
    --test ansible-doc
cd "$TREE/ansible_collections/edgeq/fleet"
HOME=$WORK "$ANSIBLE_TEST" sanity --python "$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
    --color no "$@"
