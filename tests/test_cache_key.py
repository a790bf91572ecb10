"""The passes' Inductor cache key covers every file the passes can run: a file added under ``passes/`` or an edit
to any pass or to a module a pass imports changes it, as does every field of the region plan."""

import dataclasses
import shutil
from pathlib import Path

import pytest

from simigrad_compile.compile.passes import cache_key, manager
from simigrad_compile.compile.passes.manager import SimigradPassManager
from simigrad_compile.compile.passes.plan import InputRole, RegionPlan

PACKAGE = cache_key.PACKAGE
PASSES = PACKAGE / "compile" / "passes"


@pytest.fixture
def package_copy(tmp_path) -> Path:
    """A copy of the package's sources (``.py`` files only), to edit."""
    copy = tmp_path / PACKAGE.name
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return copy


def plan(**changes) -> RegionPlan:
    base = RegionPlan(roles=(InputRole("param", "fc.weight"), InputRole("input", "x", 0)), mode="auto",
                      bucket_bytes=1 << 20)
    return dataclasses.replace(base, **changes)


def test_every_file_under_passes_and_every_module_they_import_is_in_the_key():
    names = {p.relative_to(PACKAGE).as_posix() for p in cache_key.source_files()}
    on_disk = {p.relative_to(PACKAGE).as_posix() for p in PASSES.rglob("*.py")}
    assert on_disk <= names, f"left out of the cache key: {sorted(on_disk - names)}"
    # Imported by the passes, outside passes/: the graph ops, their kernels, compat, the config.
    for imported in ("compile/ops.py", "kernels/__init__.py", "compat.py", "config.py"):
        assert imported in names, imported


def test_a_new_file_under_passes_changes_the_key(package_copy):
    before = cache_key.sources_digest(package_copy)
    assert before == cache_key.sources_digest(package_copy), "the digest must be deterministic"
    (package_copy / "compile" / "passes" / "new_rule.py").write_text('"""A rule nobody imports yet."""\nX = 1\n')
    assert "compile/passes/new_rule.py" in {p.relative_to(package_copy).as_posix()
                                            for p in cache_key.source_files(package_copy)}
    assert cache_key.sources_digest(package_copy) != before


@pytest.mark.parametrize("name", sorted(p.relative_to(PACKAGE).as_posix() for p in PASSES.rglob("*.py")))
def test_an_edit_to_any_pass_file_changes_the_key(package_copy, name):
    before = cache_key.sources_digest(package_copy)
    path = package_copy / name
    path.write_text(path.read_text() + "\n# edited\n")
    assert cache_key.sources_digest(package_copy) != before


def test_a_module_imported_by_a_pass_counts_and_an_unrelated_one_does_not(package_copy):
    """A new module outside passes/ enters the key when a pass imports it (even inside a function)."""
    (package_copy / "kernels" / "extra_rule.py").write_text("Y = 2\n")
    before = cache_key.sources_digest(package_copy)
    probe = package_copy / "compile" / "passes" / "batch_probe.py"
    probe.write_text(probe.read_text() + "\n\ndef _late():\n    from ...kernels import extra_rule  # noqa: F401\n")
    files = {p.relative_to(package_copy).as_posix() for p in cache_key.source_files(package_copy)}
    assert "kernels/extra_rule.py" in files
    (package_copy / "kernels" / "extra_rule.py").write_text("Y = 3\n")
    assert cache_key.sources_digest(package_copy) != before


def test_the_manager_uuid_follows_the_sources_and_every_plan_field(monkeypatch):
    uuid = SimigradPassManager(plan()).uuid()
    assert uuid == SimigradPassManager(plan()).uuid()
    monkeypatch.setattr(manager, "package_digest", lambda: "another source tree")
    assert SimigradPassManager(plan()).uuid() != uuid
    monkeypatch.undo()
    other = {"roles": (InputRole("param", "fc.bias"),), "mode": "batch", "bucket_bytes": 2 << 20,
             "disabled": ("split_backward",), "stats_sum": "graph", "split_contraction": "accumulate"}
    assert set(other) == {f.name for f in dataclasses.fields(RegionPlan)}, "a new plan field: add a value here"
    for field, value in other.items():
        assert SimigradPassManager(plan(**{field: value})).uuid() != uuid, field
