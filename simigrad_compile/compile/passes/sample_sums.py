"""A sum over the batch and other dims, reduced first over the other dims, once for both halves.

BatchNorm's ``sum(dy, [0, 2, 3])`` and ``sum(dy * (x - mean), [0, 2, 3])`` (LayerNorm's over ``[0, 1]``) are
contractions over the batch: sliced into two halves, each half is its own reduction over the large tensor, and
Inductor schedules the four of them as separate loops where the whole batch had one loop with two
accumulators. Reduced first over the dims other than the batch (``keepdim``), the large tensor is read once, into
one row per sample; each half then sums its samples' rows::

    before:  s1 = sum(slice(t, 0, 0, h), [0, 2, 3]);  s2 = sum(slice(t, 0, h, B), [0, 2, 3])
    after:   p = sum(t, [2, 3], keepdim=True)                    # [B, C, 1, 1], shared by both halves
             s1 = sum(slice(p, 0, 0, h), [0, 2, 3]);  s2 = sum(slice(p, 0, h, B), [0, 2, 3])

The same sums in another order of additions; only fp32 and fp64 sums take this form (a bf16/fp16 row per
sample would round once more), and only where each sample is one contiguous block along the batch dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.fx as fx

from .batch_lattice import BatchDim, same
from .op_args import argument

if TYPE_CHECKING:
    from .split_context import SplitContext

aten = torch.ops.aten
_EXACT_ENOUGH = (torch.float32, torch.float64)


def per_sample(ctx: "SplitContext", node: fx.Node, info: BatchDim) -> Optional[fx.Node]:
    """``p``, the summand of the contraction ``node`` reduced over its dims other than the batch (kept as size-1
    dims, so ``node``'s dims and ``info`` still apply to it); made once per ``node``. None where ``node`` is not
    such a sum."""
    if node.target is not aten.sum.dim_IntList or not (same(info.inner, 1) and same(info.outer, 1)):
        return None
    value, summand = node.meta.get("val"), node.args[0]
    if not isinstance(value, torch.Tensor) or value.dtype not in _EXACT_ENOUGH:
        return None
    rank, reduced = summand.meta["val"].dim(), argument(node, "dim")
    if not reduced:
        return None
    dims = sorted({d % rank for d in reduced})
    others = [d for d in dims if d != info.dim]
    if info.dim not in dims or not others:
        return None
    if node not in ctx.per_sample:
        with ctx.graph.inserting_before(node):
            dtype = {"dtype": node.kwargs["dtype"]} if node.kwargs.get("dtype") is not None else {}
            ctx.per_sample[node] = ctx.call(aten.sum.dim_IntList, summand, others, True, **dtype)
    return ctx.per_sample[node]
