"""How the split pass turns each parameter's two half-batch gradients into its gradient and its statistics.

Two forms (option ``split_contraction``):

``separate``: each half contracts into its own tensor; one fused step (an Inductor loop on CPU, the
``simigrad::split_grads`` kernel on GPU) reads ``g1`` and ``g2``, writes ``g = g1 + g2`` and sums
``(g1.g2, |g1|^2, |g2|^2)``.

``accumulate``: the second half's ``mm`` writes into the first's, ``c = addmm(c1, x2^T, dy2)`` (BLAS
``beta=1``), so no sum pass remains; ``g`` is the parameter's linear map replayed on ``c``. The statistics come
from ``(g1, g)`` in one pass with ``g2 = g - g1`` per element in fp32 (the pair kernel's form,
``simigrad::pair_stats(g1, g, 1, -1)`` on GPU). ``g`` is rounded once, so each recovered element of ``g2``
carries an error of up to ``eps |g_i|``; over n elements ``|g2|^2`` is off by about ``2 eps r / sqrt(n) +
(eps r)^2`` relative, ``r = |g1| / |g2|``. Measured in fp32 against fp64 halves (256x1024): cosine error below
2e-6 down to ``r = 1e4``, 1.5e-3 relative error in ``|g2|^2`` at ``r = 1e6``. In bf16 the same ``eps`` is 2^-8,
so only ``mm`` contractions in fp32 or fp64 accumulate; a parameter with any other contraction (a bf16/fp16
``mm``, a sum over batch dims, a conv weight, an embedding's ``index_put``) keeps the separate form.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.fx as fx

from .. import ops as _ops  # noqa: F401  (registers simigrad::pair_stats)
from .split_context import FIRST, SECOND, SplitContext

aten, prims = torch.ops.aten, torch.ops.prims
_ACCUMULATING = (torch.float32, torch.float64)


@dataclass
class Pair:
    """One parameter's two halves, in the ``separate`` form (``g2``) or the ``accumulate`` form (``total``)."""

    index: int
    """The primal's index (the statistics row's parameter)."""
    grad: fx.Node
    """The whole-batch gradient of the original graph."""
    g1: fx.Node
    """The first half's gradient."""
    g2: Optional[fx.Node] = None
    """``separate``: the second half's gradient."""
    total: Optional[fx.Node] = None
    """``accumulate``: the gradient with the second half's ``mm`` written into the first's."""


def accumulates(ctx: SplitContext, grad: fx.Node) -> bool:
    """Whether every contraction of ``grad`` is an fp32/fp64 ``mm`` (so ``addmm`` can take the second half)."""
    leaves = ctx.linear.leaves(grad) or []
    return bool(leaves) and all(leaf.target is aten.mm.default and leaf.meta["val"].dtype in _ACCUMULATING
                                for leaf in leaves)


class Accumulated:
    """``node``'s whole-batch value with each ``mm`` contraction as ``addmm(first half, second half's operands)``::

        before:  mm_4 = mm(permute_7, view);  permute_8 = permute(mm_4, [1, 0])
        after:   mm_5 = mm(slice_1, slice_2)                       # the first half (SplitContext.emit)
                 addmm_1 = addmm(mm_5, slice_3, slice_4)           # + the second half's operands
                 permute_9 = permute(addmm_1, [1, 0])              # returned
    """

    def __init__(self, ctx: SplitContext):
        self.ctx = ctx
        self.memo: Dict[fx.Node, fx.Node] = {}

    def __call__(self, node):
        ctx = self.ctx
        if not isinstance(node, fx.Node) or ctx.linear.leaves(node) is None:
            return node
        if node in self.memo:
            return self.memo[node]
        if ctx.linear.is_contraction(node):
            first, second = ctx.emit(node, FIRST), ctx.emit(node, SECOND)
            assert node.target is aten.mm.default, node.format_node()
            with ctx.graph.inserting_after(_later(first, second)):
                copy = ctx.call(aten.addmm.default, first, *second.args)
        else:
            with ctx.graph.inserting_after(node):
                copy = ctx.copy(node, self)
        self.memo[node] = copy
        return copy


def _later(a: fx.Node, b: fx.Node) -> fx.Node:
    """The later of two nodes of one graph, found by walking forward from both at once (the split pass places a
    contraction's halves side by side, so this stops after a few steps)."""
    x, y = a, b
    while True:
        if x is b or y.op == "output":
            return b
        if y is a or x.op == "output":
            return a
        x, y = x.next, y.next


_REBUILT = (aten.sum.dim_IntList, aten.sum.default, aten.mm.default)
"""Contractions whose whole value is exactly the sum of their halves' values (a mean's half is not)."""


def whole_from_halves(ctx: SplitContext) -> int:
    """Each whole-batch contraction that something besides its gradient still reads becomes the sum of its two
    halves, so the batch is not contracted a third time. BatchNorm's backward reads ``sum(dy)`` and
    ``sum(dy * xhat)`` for the weight and bias gradients (split) and for ``grad_input``::

        before:  sum_1 = sum(mul_3, [0, 2, 3])             # read by grad_input's kernel, and halved:
                 sum_1a = sum(slice(mul_3, 0, 0, h), [0, 2, 3]);  sum_1b = sum(slice(mul_3, 0, h, B), [0, 2, 3])
        after:   add_7 = add(sum_1a, sum_1b)               # read by grad_input's kernel

    Run after the outputs are rewired and dead code is dropped, so only the other readers remain. Returns how
    many contractions it rebuilt."""
    alive, rebuilt = set(ctx.graph.nodes), 0
    for whole, first in list(ctx.halves[FIRST].items()):
        second = ctx.halves[SECOND].get(whole)
        if (whole not in alive or not whole.users or whole.target not in _REBUILT or second is None
                or not ctx.linear.is_contraction(whole)):
            continue
        with ctx.graph.inserting_after(_later(first, second)):
            total = ctx.call(aten.add.Tensor, first, second)
        whole.replace_all_uses_with(total)
        ctx.graph.erase_node(whole)
        rebuilt += 1
    return rebuilt


def in_graph(ctx: SplitContext, output: fx.Node, pairs: List[Pair], outs: list, slots: Dict[int, int]) -> str:
    """CPU: the sum (``separate``) and the three fp32 dot products as graph ops, so Inductor fuses them into one
    loop over each pair (one read of both tensors); ``simigrad::record_stats`` takes the rows::

        add_1 = add(g1, g2)                                   # -> the gradient's output slot
        row_1 = cat([view(sum(mul(g1, g2)), [1]), view(sum(mul(g1, g1)), [1]), view(sum(mul(g2, g2)), [1])])
        record_stats(view(cat([row_1, ...]), [pairs, 3]), [primal indices])

    Returns a line for the pass's log."""
    graph = ctx.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    rows, call = [], ctx.call
    for p in pairs:
        second = p.g2 if p.total is None else p.total
        with graph.inserting_before(max(p.g1, second, key=order.get).next):
            f1, f2 = (call(prims.convert_element_type.default, g, torch.float32)
                      if g.meta["val"].dtype != torch.float32 else g for g in (p.g1, second))
            if p.total is None:
                outs[slots[p.index]] = call(aten.add.Tensor, p.g1, p.g2)
            else:
                outs[slots[p.index]] = p.total
                f2 = call(aten.sub.Tensor, f2, f1)
            terms = [call(aten.sum.default, call(aten.mul.Tensor, x, y)) for x, y in ((f1, f2), (f1, f1), (f2, f2))]
            rows.append(call(aten.cat.default, [call(aten.view.default, t, [1]) for t in terms]))
    with graph.inserting_before(output):
        stats = call(aten.view.default, call(aten.cat.default, rows), [len(rows), 3])
        call(torch.ops.simigrad.record_stats.default, stats, [p.index for p in pairs])
    return "sums and dot products left to Inductor"


def in_kernel(ctx: SplitContext, pairs: List[Pair], outs: list, slots: Dict[int, int], bucket_bytes: int) -> str:
    """GPU: per bucket of at most ``bucket_bytes`` of halves, one ``simigrad::split_grads`` launch for the
    ``separate`` pairs and one ``simigrad::pair_stats`` (``g2 = g - g1`` per element) for the accumulated ones::

        split_grads_1 = split_grads([g1_a, g1_b], [g2_a, g2_b], [3, 5])
        grad_a, grad_b = split_grads_1[0], split_grads_1[1]   # -> the gradients' output slots

    Returns a line for the pass's log."""
    graph = ctx.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    buckets, size, launches = [[]], 0, 0
    for pair in sorted(pairs, key=lambda p: order[p.grad]):
        nbytes = 2 * pair.grad.meta["val"].numel() * pair.grad.meta["val"].element_size()
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(pair)
        size += nbytes
    for bucket in buckets:
        last = max((n for p in bucket for n in (p.g1, p.g2, p.total) if n is not None), key=order.get)
        separate = [p for p in bucket if p.total is None]
        accumulated = [p for p in bucket if p.total is not None]
        node = last
        if accumulated:
            with graph.inserting_after(node):
                stats = ctx.call(torch.ops.simigrad.pair_stats.default, [p.g1 for p in accumulated],
                                    [p.total for p in accumulated], 1.0, -1.0)
            with graph.inserting_after(stats):
                node = ctx.call(torch.ops.simigrad.record_stats.default, stats, [p.index for p in accumulated])
            for p in accumulated:
                outs[slots[p.index]] = p.total
            launches += 1
        if separate:
            with graph.inserting_after(node):
                fused = ctx.call(torch.ops.simigrad.split_grads.default, [p.g1 for p in separate],
                                    [p.g2 for p in separate], [p.index for p in separate])
            node = fused
            for j, p in enumerate(separate):
                with graph.inserting_after(node):
                    node = ctx.call(operator.getitem, fused, j)
                outs[slots[p.index]] = node
            launches += 1
    return f"{launches} fused statistics launch(es) in {len(buckets)} bucket(s)"
