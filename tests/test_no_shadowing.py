"""No module of this repository shadows an installed one, and the libraries the doors use import beside our paths.

A folder of ours that lands on ``sys.path`` (``tests/`` under pytest, ``bench/`` when a benchmark runs as a
script) exposes every module in it by its bare name. A dependency that imports a module of that name, or merely
probes for it (transformers probes for the PyPI package ``kernels``), then gets ours. So every module name the
repository can expose follows one rule: ``test_*`` and ``conftest`` (pytest's), ``bench_*`` (bench/), or
``simigrad*`` (the package, the test kit); and none of them is an installed distribution's or the standard library's.
"""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPOSED_DIRS = [REPO, REPO / "tests", REPO / "bench"]
PREFIXES = ("test_", "conftest", "bench_", "simigrad", "_simigrad")
THIRD_PARTY = ["transformers", "accelerate", "lightning.pytorch", "hypothesis", "matplotlib", "timm", "torchvision"]


def exposed_names() -> dict[str, Path]:
    """Every name an ``import NAME`` could resolve to in one of our folders (namespace folders excepted: a regular
    package or module anywhere on the path wins over them)."""
    names = {}
    for folder in EXPOSED_DIRS:
        for entry in folder.iterdir():
            if entry.suffix == ".py":
                names[entry.stem] = entry
            elif entry.is_dir() and (entry / "__init__.py").exists():
                names[entry.name] = entry
    return names


def test_every_exposed_name_follows_the_rule():
    bad = {name: str(path.relative_to(REPO)) for name, path in exposed_names().items() if not name.startswith(PREFIXES)}
    assert not bad, f"rename these (tests: into tests/simigrad_testkit/; bench: bench_*.py): {bad}"


def test_no_exposed_name_is_installed_or_stdlib():
    installed = set(importlib.metadata.packages_distributions())
    ours = {"simigrad_compile", "_simigrad_compile_autoload"}
    clash = sorted(n for n in exposed_names() if (n in installed and n not in ours) or n in sys.stdlib_module_names)
    assert not clash, clash


def test_our_folders_come_after_site_packages():
    site = {os.path.realpath(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}
    paths = [os.path.realpath(p or os.getcwd()) for p in sys.path]
    first_site = min(i for i, p in enumerate(paths) if p in site)
    # the repository's root may come first (``python -m pytest`` puts the working directory there); it exposes only
    # the package itself and namespace folders
    ahead = [p for p in paths[:first_site] if Path(p) in {(REPO / "tests").resolve(), (REPO / "bench").resolve()}]
    assert not ahead, f"ahead of site-packages: {ahead}"


@pytest.mark.parametrize("module", THIRD_PARTY)
def test_third_party_imports_beside_our_folders(module):
    """The worst case: our folders first on the path, as a script in them would have it."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        pytest.skip(f"{module} is not in this environment")
    code = f"import sys; sys.path[:0] = {[str(d) for d in EXPOSED_DIRS]!r}; import {module}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
