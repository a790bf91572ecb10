"""The user inputs' batch dims in a compiled graph: symbols of their own that must agree at every call, and
sizes the model's code specialized.

With ``symbolic_batch`` the loader marks each input's batch dim dynamic on its own, so Dynamo gives each a symbol
and relates two only where the model's code does: an attention mask read through ``mask[arange(B)]`` keeps a
symbol of its own. The split pass reads such symbols as the batch when they had the batch's value at trace time
(:meth:`~simigrad_compile.compile.passes.batch_dims.BatchDimPropagation._inputs`); its halves are then right
only for calls whose inputs agree on the batch size, which Dynamo's guards do not check. :func:`batch_checks`
finds those inputs in Dynamo's graph, and :func:`check` (run by the region at every call) raises a
``ValueError`` naming them when a call's batch sizes differ.

A model whose code specializes the batch size (``if x.shape[0] == 8``, a shape computed from it) gets, for
the loader's weak dynamic mark, a graph of that size: :func:`specialized` names those inputs, the backend warns
once per graph, and :data:`SPECIALIZED` counts them per input for the process.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Iterator, List, Sequence, Tuple

import torch

from ..compat import dynamo_source, weakly_dynamic_dims

if TYPE_CHECKING:
    from .passes.plan import RegionPlan

Check = Tuple[int, int, str]
"""``(input index, batch dim, name)``."""


def _batch_sizes(gm: torch.fx.GraphModule, plan: "RegionPlan") -> Iterator[Tuple[int, torch.fx.Node, int, Any]]:
    """``(input index, placeholder, batch dim, its size in the graph)`` of each user input with a batch dim."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, role) in enumerate(zip(placeholders, plan.roles)):
        val = node.meta.get("example_value")
        if role.kind == "input" and role.batch_dim is not None and isinstance(val, torch.Tensor) and val.dim():
            dim = role.batch_dim % val.dim()
            yield i, node, dim, val.shape[dim]


def _symbol(n) -> bool:
    return isinstance(n, torch.SymInt) and n.node.maybe_as_int() is None


def batch_checks(gm: torch.fx.GraphModule, plan: "RegionPlan") -> Tuple[Check, ...]:
    """The user inputs whose batch dim is a symbol, when they have two or more distinct symbols of one value at
    trace time (the pass reads them as one batch); () otherwise (one symbol, static sizes, or values that differ,
    which the pass refuses)."""
    found = [(i, dim, _shown(node, plan.roles[i].name), n.node.expr, n.node.hint)
             for i, node, dim, n in _batch_sizes(gm, plan) if _symbol(n)]
    if len({f[3] for f in found}) < 2 or len({f[4] for f in found}) != 1:
        return ()
    return tuple((i, dim, name) for i, dim, name, _, _ in found)


SPECIALIZED: collections.Counter = collections.Counter()
"""Graphs compiled in this process with a specialized batch size, per input (:func:`specialized`)."""


def specialized(gm: torch.fx.GraphModule, example_inputs: Sequence, plan: "RegionPlan") -> List[Tuple[str, int]]:
    """``(input, size)`` of the user inputs whose batch dim the loader marked dynamic and the graph has as a
    constant: the model's code specialized it."""
    return [(_shown(node, plan.roles[i].name), int(n)) for i, node, dim, n in _batch_sizes(gm, plan)
            if dim in weakly_dynamic_dims(example_inputs[i]) and not _symbol(n)]


def _shown(node: torch.fx.Node, fallback: str) -> str:
    """The input as the frame reads it (``L['kwargs']['attention_mask']``), or ``fallback``."""
    source = dynamo_source(node)
    if source is None:
        return fallback
    return source.name() if callable(source.name) else source.name


def check(inputs: Sequence, checks: Tuple[Check, ...]) -> None:
    """Raise ``ValueError`` when the inputs of ``checks`` differ in their batch sizes."""
    i, dim, name = checks[0]
    first = inputs[i].shape[dim]
    for j, d, other in checks[1:]:
        n = inputs[j].shape[d]
        if n != first:
            raise ValueError(
                f"simigrad: the inputs disagree on the batch size: {name} has {first} along dim {dim}, {other} has "
                f"{n} along dim {d}. The compiled graph halves every input's batch dim at the same point "
                "(symbolic_batch): pass inputs of one batch, give an input that has no batch the batch_dim None "
                "(the batch_dim option), or set symbolic_batch=False.")


__all__ = ["Check", "SPECIALIZED", "batch_checks", "check", "specialized"]
