"""Run a worker that prints ``CHECK <name>`` for each check it passed, and assert that all passed in order; end a
worker process past the interpreter's finalization (:func:`exit_worker`)."""

from __future__ import annotations

import os
import subprocess
import sys
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


def exit_worker() -> None:
    """The end of a worker that ran to completion: its process group destroyed, its output flushed, then
    ``os._exit(0)``. Gloo's threads can still abort a normal exit during the interpreter's finalization after a
    clean run ("terminate called without an active exception", pytorch#190489), seen with Lightning's FSDP
    strategy even after ``destroy_process_group``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
