"""``check_compiled_once``: the module under a model's wrappers, refusing a model compiled twice (whose second
backend would record nothing, silently)."""

from __future__ import annotations

import weakref

import torch

from .. import compat

_MISSING = object()


def _attr(module: torch.nn.Module, name: str):
    """``getattr(module, name, None)``, without ``nn.Module.__getattr__``'s costly miss where the class leaves
    the lookup to it (read at every statistics read)."""
    cls = type(module)
    if cls.__getattr__ is not torch.nn.Module.__getattr__ or hasattr(cls, name):
        return getattr(module, name, None)
    d = module.__dict__
    value = d.get(name, _MISSING)
    if value is not _MISSING:
        return value
    for registry in compat.MODULE_REGISTRIES:
        found = d.get(registry)
        if found and name in found:
            return found[name]
    return None


def _compiled(module: torch.nn.Module) -> bool:
    """``torch.compile(module)``'s wrapper, or a module compiled in place with ``module.compile()``."""
    is_wrapper = _attr(module, compat.COMPILED_INNER) is not None and _attr(module, "dynamo_ctx") is not None
    return is_wrapper or _attr(module, compat.COMPILED_IN_PLACE) is not None


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
        if callable(model) and hasattr(model, compat.COMPILED_FUNCTION_MARK):
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
        inner = _attr(m, compat.COMPILED_INNER) or _attr(m, "module")
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
    _CHAINS[model] = tuple((weakref.ref(c), _attr(c, compat.COMPILED_IN_PLACE) is not None) for c in chain)
    return m


def chain_unchanged(chain) -> bool:
    """No module of a checked wrapper chain was compiled in place (``module.compile()``) or died since."""
    for ref, in_place in chain:
        m = ref()
        if m is None or (_attr(m, compat.COMPILED_IN_PLACE) is not None) is not in_place:
            return False
    return True


def checked_chain(model) -> tuple:
    """The wrapper chain recorded when ``model`` was last checked (empty if never), for :func:`chain_unchanged`."""
    return _CHAINS.get(model, ())
