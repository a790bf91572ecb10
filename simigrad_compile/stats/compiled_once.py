"""``check_compiled_once``: the module under a model's wrappers, refusing a model compiled twice (whose second
backend would record nothing, silently)."""

from __future__ import annotations

import weakref

import torch

from .. import compat


def _compiled(module: torch.nn.Module) -> bool:
    """``torch.compile(module)``'s wrapper, or a module compiled in place with ``module.compile()``."""
    return compat.is_compile_wrapper(module) or compat.compiled_in_place(module)


_SUBMODULES_CHECKED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_CHAINS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
"""A model checked -> its wrapper chain (weakly), each with whether it was compiled in place then."""


def check_compiled_once(model) -> torch.nn.Module:
    """The module under ``model``'s wrappers (compile, DDP); raises if ``model`` was compiled twice.

    A module has one Dynamo backend: torch.compile of a compiled module keeps only one of the two (an outer
    ``torch.compile`` over a ``torch.compile``'d module unwraps it and returns a plain function; an inner
    ``module.compile()`` wins over an outer ``torch.compile``), so ``backend="simigrad"`` on the other records
    nothing, silently. This names it instead.
    """
    fix = ("Compile the model once: model = torch.compile(model, backend='simigrad') (or "
           "model.compile(backend='simigrad')), and pass that model or the module it wraps.")
    if not isinstance(model, torch.nn.Module):
        if compat.is_compiled_function(model):
            raise TypeError(
                "simigrad: got a function made by torch.compile, not a module. torch.compile of an already compiled "
                "module unwraps it and compiles the inner forward again with the outer backend only (the first "
                "backend's graphs never run), and returns a function without .parameters(). " + fix)
        raise TypeError(f"simigrad: expected a module or an iterable of parameters, got {type(model).__name__}")
    known = _CHAINS.get(model)
    if known is not None and chain_unchanged(known):
        return known[-1][0]()
    layers, m, chain = [], model, [model]
    while True:
        if _compiled(m):
            layers.append(type(m).__name__)
        inner = compat.compiled_original(m) or compat.module_member(m, "module")
        if not isinstance(inner, torch.nn.Module):
            break
        m = inner
        chain.append(m)
    if layers and m not in _SUBMODULES_CHECKED:
        layers += [f"{type(sub).__name__} {name!r}" for name, sub in m.named_modules() if name and _compiled(sub)]
        if len(layers) == 1:
            _SUBMODULES_CHECKED.add(m)
    if len(layers) > 1:
        raise RuntimeError(
            f"simigrad: {type(m).__name__} is compiled more than once ({', '.join(layers)}): torch.compile was "
            "applied to a module that was already compiled. Only one of the backends runs, so statistics may "
            "silently be missing. " + fix)
    _CHAINS[model] = tuple((weakref.ref(c), compat.compiled_in_place(c)) for c in chain)
    return m


def chain_unchanged(chain) -> bool:
    """No module of a checked wrapper chain was compiled in place (``module.compile()``) or died since."""
    for ref, in_place in chain:
        m = ref()
        if m is None or compat.compiled_in_place(m) is not in_place:
            return False
    return True


def checked_chain(model) -> tuple:
    """The wrapper chain recorded when ``model`` was last checked (empty if never), for :func:`chain_unchanged`."""
    return _CHAINS.get(model, ())
