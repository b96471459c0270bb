#!/bin/sh
# Build the edgeq.fleet collection: embed the on-device runner (deploy/*.py) into module_utils, then
# `ansible-galaxy collection build`. Usage: scripts/ansible-build.sh [OUTPUT_DIR]   (default dist/)
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/dist}
GALAXY=${ANSIBLE_GALAXY:-$ROOT/.venv/bin/ansible-galaxy}
[ -x "$GALAXY" ] || GALAXY=ansible-galaxy
SRC=$ROOT/ansible/edgeq/fleet
# One implementation: the modules run the very runner `edgeq deploy` sends (tests/ansible/test_collection.py
# fails when the two differ).
for name in runner protocol facts tensorio device_state activation measure; do  # protocol.DEVICE_MODULES
    cp "$ROOT/deploy/$name.py" "$SRC/plugins/module_utils/edgeq_$name.py"
done
mkdir -p "$OUT"
"$GALAXY" collection build "$SRC" --output-path "$OUT" --force
