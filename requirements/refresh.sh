#!/usr/bin/env bash
# Regenerates the locked environments from pyproject.toml's extras with pip-compile (pip-tools).
#   bash requirements/refresh.sh            # resolve again, keeping the locked versions where they still fit
#   bash requirements/refresh.sh --upgrade  # the newest releases that fit (what .ci/run's "newest" step tries)
# requirements/torch.txt holds torch to 2.13.0 (the CPU wheel here) in every lock, so that no extra upgrades it.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
python3 -m venv "$tools" && "$tools/bin/pip" install -q pip-tools
for extra in test demo census; do
    "$tools/bin/pip-compile" -q --strip-extras --no-emit-index-url --no-emit-find-links --allow-unsafe "$@" \
        --extra "$extra" -c requirements/torch.txt -o "requirements/$extra.txt" pyproject.toml
    # the CPU wheel's local label (+cpu) would tie the lock to this disk: pin the public version
    sed -i -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/' "requirements/$extra.txt"
done
rm -rf "$tools"
