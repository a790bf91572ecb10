"""The import rules hold: ``lint-imports`` (import-linter, configured in ``pyproject.toml``'s ``[tool.importlinter]``)
keeps every contract: the layers (cli > demo > integrations > runtime > distributed | compile > stats > kernels >
envvars > config | compat), no import cycle between the modules of any package, kernels/ alone, config a leaf,
the trainer libraries in the doors only. A copy of the package with one upward import and one cycle is refused,
so the check can fail."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (it is in the test extra)")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


def test_every_contract_is_kept():
    out = lint(REPO)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout and "BROKEN" not in out.stdout


def test_an_upward_import_and_a_cycle_are_refused(tmp_path):
    shutil.copytree(REPO / "simigrad_compile", tmp_path / "simigrad_compile",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    stats = tmp_path / "simigrad_compile" / "stats" / "split_stats.py"
    stats.write_text(stats.read_text() + "\n\ndef _late():\n    from ..runtime import core  # noqa\n")
    config = tmp_path / "simigrad_compile" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _env():\n    from . import envvars  # noqa\n")
    out = lint(tmp_path)
    assert out.returncode != 0, out.stdout[-4000:]
    assert "simigrad_compile.stats.split_stats -> simigrad_compile.runtime.core" in out.stdout, out.stdout[-4000:]
    assert "simigrad_compile.config -> simigrad_compile.envvars" in out.stdout, out.stdout[-4000:]
