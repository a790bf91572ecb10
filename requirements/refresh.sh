#!/usr/bin/env bash
# Regenerates the locked environments from pyproject.toml's extras with pip-compile (pip-tools).
#   bash requirements/refresh.sh            # resolve again, keeping the locked versions where they still fit
#   bash requirements/refresh.sh --upgrade  # the newest releases that fit (what .ci/newest installs)
# requirements/torch.txt holds torch to 2.13.0 (the CPU wheel here) in every lock, so that no extra upgrades it.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
python3 -m venv "$tools" && "$tools/bin/pip" install -q pip-tools
lock() {  # lock FILE EXTRA...
    local out=$1 extras=() e; shift
    for e in "$@"; do extras+=(--extra "$e"); done
    "$tools/bin/pip-compile" -q --strip-extras --no-emit-index-url --no-emit-find-links --allow-unsafe \
        "${EXTRA_ARGS[@]}" "${extras[@]}" -c requirements/torch.txt -o "requirements/$out.txt" pyproject.toml
    # the CPU wheel's local label (+cpu) would tie the lock to this disk: pin the public version
    sed -i -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/' "requirements/$out.txt"
}
EXTRA_ARGS=("$@")
lock test test
lock demo demo
lock census test census     # the census environment runs the census tests too
lock outcome outcome        # bench/bench_outcome.py (scikit-learn's load_digits, matplotlib)
rm -rf "$tools"
