"""The docs site builds with ``mkdocs build --strict`` (a broken link, anchor or API reference fails it), and the
API page lists exactly the public API (``simigrad_compile.__all__``)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import simigrad_compile

REPO = Path(__file__).resolve().parents[1]


def test_api_page_lists_exactly_the_public_api():
    page = (REPO / "docs" / "api.md").read_text()
    listed = re.findall(r"^::: simigrad_compile\.(?!integrations\.)(?:[\w.]+\.)?(\w+)$", page, re.M)
    assert sorted(listed) == sorted(simigrad_compile.__all__), "docs/api.md: add or remove ':::' entries"


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocstrings")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d",
                          str(tmp_path / "site")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-6000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in simigrad_compile.__all__:  # every export rendered from its docstring
        assert re.search(rf'id="simigrad_compile\.([\w.]+\.)?{name}"', api), name
    assert 'id="simigrad_compile.AdaptiveBatching.clip_grad_norm_"' in api  # the core's members, inherited
