"""Run a worker that prints ``CHECK <name>`` for each check it passed, and assert that all passed in order."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def run_checks(cmd: list, checks: list, timeout: int = 600, **env) -> str:
    """``cmd`` runs from ``tests/`` with one thread per process; returns its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **env)
    proc = subprocess.run(cmd, cwd=TESTS, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    done = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("CHECK ")]
    assert done == list(checks), out[-6000:]
    return out
