"""Whole-batch contractions that the rest of the backward still reads, rebuilt as the sum of their two halves.

Once the split gradients are wired to the output, a contraction can still have readers of its own: BatchNorm's
``sum(dy)`` and ``sum(dy * (x - mean))`` give its weight and bias gradients and also its ``grad_input``. Left as
it is, the whole batch would be reduced a third time next to the two halves. Each such contraction becomes
``c_1 + c_2`` of the halves the pass already emitted::

    before:  s = sum(mul(dy, xmu), [0, 2, 3])      # read by grad_weight and grad_input
    after:   s1 = sum(mul(slice(dy, 0, 0, h), ...), [0, 2, 3]);  s2 = sum(..., h, B ...)
             grad_weight <- (s1, s2);  grad_input reads add(s1, s2)

``c_1 + c_2`` and ``c`` are the same sum in another order of additions (the reduction already differs from one
Inductor schedule to the next), so only fp32 and fp64 contractions are rebuilt; in bf16/fp16 the extra rounding
of each half would be a real change, and those keep the whole-batch reduction.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .split_context import FIRST, SECOND, SplitContext

aten = torch.ops.aten
_EXACT_ENOUGH = (torch.float32, torch.float64)


def rebuild_shared(ctx: SplitContext) -> int:
    """Replaces the remaining readers of each contraction whose both halves were emitted by ``c_1 + c_2``
    (run on a graph with its dead code removed); returns how many contractions were rebuilt."""
    order = {node: i for i, node in enumerate(ctx.graph.nodes)}
    rebuilt = 0
    for node, first in list(ctx.halves[FIRST].items()):
        second = ctx.halves[SECOND].get(node)
        if second is None or not node.users or not ctx.linear.is_contraction(node):
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dtype not in _EXACT_ENOUGH:
            continue
        if not isinstance(first, fx.Node) or not isinstance(second, fx.Node):
            continue
        readers = sorted(node.users, key=order.__getitem__)
        with ctx.graph.inserting_before(readers[0]):
            whole = ctx.call(aten.add.Tensor, first, second)
        node.replace_all_uses_with(whole)
        rebuilt += 1
    return rebuilt
