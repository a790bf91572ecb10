"""What the split pass knows about one value of the joint graph, and size arithmetic on static and symbolic sizes.

A tensor is either batch-free (``None``: the same for every sample: parameters, constants, reductions over the
batch), batched (:class:`BatchDim`), or :data:`UNKNOWN` (an op we cannot follow touched batched data). Integer
tensors built by ``arange``/``iota`` are also tracked as :class:`Iota` (their values are their positions), which is
how ``x[arange(B), ...]`` is recognised as taking every sample's own row.

Sizes are ints, or sympy expressions where Dynamo made a dimension dynamic (the batch too, with
``symbolic_batch``): they are compared structurally, so following the batch adds no shape guards. Inside
:func:`batch_aliases`, :func:`size` reads a symbol that the analysis found to be the batch under another name
(:meth:`~.batch_dims.BatchDimPropagation._inputs`) as the batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import sympy
import torch
import torch.fx as fx
from ...compat import FloorDiv

Size = Union[int, sympy.Expr]


@dataclass(frozen=True)
class BatchDim:
    """Along ``dim`` the tensor has ``outer * B * inner`` entries; entry ``i`` is sample ``(i // inner) % B``."""

    dim: int
    inner: Size = 1
    outer: Size = 1

    def at(self, dim: int) -> "BatchDim":
        return BatchDim(dim, self.inner, self.outer)


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()
Info = Union[None, BatchDim, _Unknown, tuple]


@dataclass(frozen=True)
class Iota:
    """An integer tensor whose entry at position ``p`` is ``start + step * p[dim]`` (``length`` entries along
    ``dim``), the same along every other dim."""

    dim: int
    start: Size
    step: Size
    length: Size

    def is_identity(self, size: Size) -> bool:
        return same(self.start, 0) and same(self.step, 1) and same(self.length, size)


_ALIASES: contextvars.ContextVar[Optional[Dict[sympy.Symbol, Size]]] = contextvars.ContextVar(
    "simigrad_batch_aliases", default=None)


@contextlib.contextmanager
def batch_aliases() -> Iterator[Dict[sympy.Symbol, Size]]:
    """The scope of one graph's analysis and rewrite: the symbols recorded by :func:`alias` in it are read as
    the batch by :func:`size`."""
    token = _ALIASES.set({})
    try:
        yield _ALIASES.get()
    finally:
        _ALIASES.reset(token)


def alias(symbol: sympy.Symbol, batch: Size) -> bool:
    """Read ``symbol`` as ``batch`` for the rest of the scope; False outside a :func:`batch_aliases` scope."""
    aliases = _ALIASES.get()
    if aliases is None:
        return False
    aliases[symbol] = batch
    return True


def size(x) -> Size:
    """An int, or the sympy expression of a symbolic size (a SymInt, or a graph node computing one)."""
    if isinstance(x, fx.Node):
        x = x.meta.get("val")
    if isinstance(x, torch.SymInt):
        constant = x.node.maybe_as_int()
        if constant is not None:
            return int(constant)
        aliases = _ALIASES.get()
        return x.node.expr.xreplace(aliases) if aliases else x.node.expr
    return int(x)


def shape_of(node) -> Optional[Tuple[Size, ...]]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(size(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def is_static(x: Size) -> bool:
    return isinstance(x, int)


def _canonical(x) -> sympy.Expr:
    """``x`` with every exact floor division (``(s**2)//s``) replaced by its quotient."""
    def exact(a, b):
        q = sympy.cancel(a / b)
        return q if q.is_integer else FloorDiv(a, b)

    return sympy.sympify(x).replace(FloorDiv, exact)


def same(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return sympy.expand(_canonical(a) - _canonical(b)) == 0
    except (TypeError, sympy.SympifyError):
        return False


def quotient(a: Size, b: Size) -> Optional[Size]:
    """``a / b`` when it is exactly an integer (for every value of the symbols), else None."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b if b and a % b == 0 else None
    q = sympy.cancel(_canonical(a) / _canonical(b))
    if q.is_integer is not True:
        return None
    return int(q) if q.is_Integer else q


def prod(sizes: Sequence[Size]) -> Size:
    if all(isinstance(s, int) for s in sizes):
        return math.prod(sizes)
    out = sympy.Integer(1)
    for s in sizes:
        out = out * s
    return out


def batch_size(info: BatchDim, batch: int) -> Size:
    """How many entries ``info``'s dim has."""
    return prod([info.outer, batch, info.inner])
