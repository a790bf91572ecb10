"""Private torch APIs live in ``simigrad_compile/compat.py`` (and ``kernels/``) only.

A package file elsewhere may not name one: no ``import torch._x`` / ``from torch.x._y import`` / ``from torch.x
import _y``, no attribute path ``torch.….._private``, no private torch attribute read off an object
(``_index_sampler``, ``_optimizer_step_pre_hooks`` ...), no torch class matched by its name as a string
(``"CompiledFunction"``) or a private attribute read by ``getattr(x, "bw_donated_idxs")``. Docstrings and
comments may mention them. The scanner is checked on snippets first, so that it can fail.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "simigrad_compile"
EXEMPT = ("compat.py", "kernels/")

PRIVATE_ATTRS = frozenset({
    "_index_sampler", "_auto_collation", "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
    "_forward_cls", "bw_donated_idxs", "_fully_shard", "_fsdp_api", "_fsdp_param_group", "_fsdp_state",
    "_get_fsdp_state", "_fsdp_param", "_fsdp_param_groups", "_patch_step_function", "_execution_engine",
    "_parameters", "_buffers", "_modules", "_orig_mod", "_compiled_call_impl", "_torchdynamo_orig_callable",
})
"""Private attributes of torch objects that the package has read (the list grows when one is found)."""

PRIVATE_CLASSES = ("CompiledFunction", "GradAOTOutput", "_BaseDataLoaderIter")
"""torch classes that code may match by name: a string holding one is flagged."""

TEMPORARY: set = set()
"""Files allowed to hold private torch names for now (each entry is a known debt, reported in the PR)."""


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return list(reversed(parts))
    return None


def _docstrings(tree) -> set:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            for stmt in body:
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
                        and isinstance(stmt.value.value, str):
                    ids.add(id(stmt.value))  # docstrings and attribute docstrings
    return ids


def private_uses(source: str) -> list:
    """``(line, what)`` for every private torch name in ``source``'s code (not in its docstrings or comments)."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "torch" and any(map(_private, parts)):
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "torch" and (any(map(_private, parts)) or any(_private(a.name) for a in node.names)):
                found.append((node.lineno, f"from {node.module} import {', '.join(a.name for a in node.names)}"))
        elif isinstance(node, ast.Attribute):
            path = _dotted(node)
            if path and path[0] == "torch" and any(map(_private, path[1:])) and _private(node.attr):
                found.append((node.lineno, ".".join(path)))
            elif node.attr in PRIVATE_ATTRS:
                found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if node.value in PRIVATE_ATTRS or (len(node.value) < 64 and any(c in node.value for c in PRIVATE_CLASSES)):
                found.append((node.lineno, repr(node.value)))
    return found


@pytest.mark.parametrize("snippet", [
    "import torch._dynamo",
    "from torch.utils.data.dataloader import _BaseDataLoaderIter",
    "from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter",
    "import torch\nx = torch._foreach_norm([])",
    "import torch\ntorch._C._current_autograd_node()",
    "sampler = it._index_sampler",
    "hooks = opt._optimizer_step_pre_hooks",
    "ok = 'CompiledFunction' in type(fn).__name__",
    "idx = getattr(meta, 'bw_donated_idxs', None)",
    "inner = getattr(m, '_orig_mod', None)",
    "for r in ('_parameters', '_modules'):\n    pass",
])
def test_the_scanner_finds(snippet):
    assert private_uses(snippet), snippet


@pytest.mark.parametrize("snippet", [
    '"""Uses ``torch._dynamo.mark_static`` through compat."""',
    "import torch\n# torch._foreach_norm in a comment\nx = torch.nn.utils.get_total_norm([])",
    "from torch.optim.optimizer import register_optimizer_step_pre_hook",
    "self._position = 0",
    "names = [n for n, _ in model.named_parameters()]\nkey = 'named_parameters'",
])
def test_the_scanner_leaves_alone(snippet):
    assert not private_uses(snippet), snippet


def _package_files():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == EXEMPT[0] or rel.startswith(EXEMPT[1]):
            continue
        yield rel, path


def test_private_torch_names_only_in_compat():
    offenders = {}
    for rel, path in _package_files():
        uses = private_uses(path.read_text())
        if uses and rel not in TEMPORARY:
            offenders[rel] = uses
    assert not offenders, ("private torch APIs outside simigrad_compile/compat.py; move each behind a compat "
                           f"function: {offenders}")


def test_the_temporary_allow_list_is_not_stale():
    clean = [rel for rel, path in _package_files() if rel in TEMPORARY and not private_uses(path.read_text())]
    assert not clean, f"these files hold no private torch name any more; remove them from TEMPORARY: {clean}"
