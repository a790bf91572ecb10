"""The source half of the passes' Inductor cache key: every package file the passes can run, found, not listed.

Inductor's FX graph cache keys a compiled graph on the custom pass's ``uuid()`` (see
``torch/_inductor/custom_graph_pass.py``): when the passes change, the key must change, or a warm cache serves
graphs rewritten by the old passes. The files that count are

* every ``.py`` file under ``compile/passes/`` (a new pass or helper counts the moment it exists), and
* every module of the package those files import, transitively, read from their ``import`` statements
  (``from .. import ops`` pulls in ``compile/ops.py``, which pulls in ``kernels/``, ``compat.py`` and the rest).

:func:`sources_digest` hashes their paths and bytes; :class:`~.manager.SimigradPassManager` adds the options the
passes read (:meth:`~.plan.RegionPlan.key`)::

    >>> [p.relative_to(PACKAGE).as_posix() for p in source_files()][:3]
    ['compat.py', 'compile/__init__.py', 'compile/ops.py']
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

PACKAGE = Path(__file__).resolve().parents[2]
"""The ``simigrad_compile`` package directory."""
PASSES = Path("compile") / "passes"
"""The passes' directory, relative to the package."""


def source_files(package: Path = PACKAGE) -> List[Path]:
    """Every ``.py`` file under ``package/compile/passes/`` and every package module they import, transitively,
    sorted by path."""
    found = set()
    todo = sorted((package / PASSES).rglob("*.py"))
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found.add(path)
        todo.extend(p for p in _imported(path, package) if p not in found)
    return sorted(found)


def sources_digest(package: Path = PACKAGE) -> str:
    """sha256 over each of :func:`source_files`'s paths (relative to ``package``) and bytes."""
    digest = hashlib.sha256()
    for path in source_files(package):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def package_digest() -> str:
    """:func:`sources_digest` of the installed package, read once per process."""
    return sources_digest(PACKAGE)


def _imported(path: Path, package: Path) -> Iterable[Path]:
    """The package's module files that ``path``'s import statements name (anywhere in it: top level or inside a
    function). The package root's ``__init__.py`` (the public API, which imports the runtime) is not one."""
    here = path.relative_to(package).with_suffix("").parts[:-1]  # the package ``path`` belongs to
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            names = [_inside(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = node.level - 1
                base = here[: len(here) - up] if up <= len(here) else None
                if base is not None and node.module:
                    base += tuple(node.module.split("."))
            else:
                base = _inside(node.module or "")
            names = [] if base is None else [base] + [base + (alias.name,) for alias in node.names]
        else:
            continue
        for parts in names:
            found = _module_file(package, parts)
            if found is not None:
                yield found


def _inside(dotted: str) -> Optional[Tuple[str, ...]]:
    """An absolute module name's parts under the package (``simigrad_compile.kernels`` -> ``("kernels",)``);
    None for any other package."""
    first, _, rest = dotted.partition(".")
    return tuple(rest.split(".")) if first == PACKAGE.name and rest else None


def _module_file(package: Path, parts: Optional[Tuple[str, ...]]) -> Optional[Path]:
    """The file that defines module ``parts`` (``x.py`` or ``x/__init__.py``); None for the package root and for
    a name that is not a module (``from .batch_dims import UNKNOWN``)."""
    if not parts:
        return None
    stem = package.joinpath(*parts)
    for candidate in (stem.with_suffix(".py"), stem / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None
