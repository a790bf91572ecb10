"""How an operand of a contraction is cut to one half of the batch: sliced, or masked with the half's 0/1 mask.

Both cuts are computed just before the contraction that consumes them, so they land in the backward graph
(never among the activations the forward saves). With ``B = 4`` along dim 0 of a ``[B*T, C]`` operand::

    slice_half(x, FIRST):   slice_1 = slice(x, 0, 0, 2*T)
    slice_half(x, SECOND):  slice_2 = slice(x, 0, 2*T, 9223372036854775807)
    mask_half(x, FIRST):    iota_1 = iota(B*T);  lt_1 = lt(iota_1, 2*T)
                            keep_1 = convert_element_type(lt_1, x.dtype)
                            mul_1 = mul(x, view(keep_1, [-1, 1]))

When the batch repeats ``outer`` times along the dim (``[T, B] -> [T*B]``) a slice takes the half's entries of
each group (:func:`_slice_grouped`); when such a size is symbolic, the mask is used instead. Symbolic cut
points (``floor(B/2) * inner`` with a dynamic size) are built in the graph from the graph's SymInt inputs or
its inputs' sizes (:func:`materialize`).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Union

import sympy
import torch
import torch.fx as fx

from ...compat import FloorDiv
from .batch_lattice import BatchDim, batch_size, is_static, same, shape_of, size

if TYPE_CHECKING:
    from .split_context import SplitContext

aten, prims = torch.ops.aten, torch.ops.prims
_TO_END = 2**63 - 1
"""``slice``'s end for "to the end of the dim"."""


def slice_half(ctx: "SplitContext", node: fx.Node, half: int, consumer: fx.Node, info: BatchDim) -> fx.Node:
    """``node`` restricted to the samples of ``half`` along ``info``'s dim, computed just before ``consumer``."""
    memo, key = ctx.operands[half], ("slice", node, consumer, info)
    if key in memo:
        return memo[key]
    if not same(info.outer, 1):
        if not all(is_static(s) for s in shape_of(node) + (ctx.batch,)):
            memo[key] = mask_half(ctx, node, half, consumer, info)
        else:
            memo[key] = _slice_grouped(ctx, node, half, consumer, info)
        return memo[key]
    cut = _cut(ctx, node, info, consumer)
    start, end = (0, cut) if half == 0 else (cut, _TO_END)
    with ctx.graph.inserting_before(consumer):
        memo[key] = ctx.call(aten.slice.Tensor, node, info.dim, start, end)
    return memo[key]


def mask_half(ctx: "SplitContext", node: fx.Node, half: int, consumer: fx.Node, info: BatchDim) -> fx.Node:
    """``node`` with the other half's entries along ``info``'s dim zeroed (same shape), computed just before
    ``consumer``."""
    memo, key = ctx.operands[half], ("mask", node, consumer, info)
    if key in memo:
        return memo[key]
    val = node.meta["val"]
    cut = _cut(ctx, node, info, consumer)
    length = materialize(ctx, size(val.shape[info.dim]), consumer)
    period = materialize(ctx, batch_size(BatchDim(info.dim, info.inner), ctx.batch), consumer)
    with ctx.graph.inserting_before(consumer):
        position = ctx.call(prims.iota.default, length, start=0, step=1, dtype=torch.int64, device=val.device,
                            requires_grad=False)
        if not same(info.outer, 1):
            position = ctx.call(aten.remainder.Scalar, position, period)
        keep = ctx.call(aten.lt.Scalar if half == 0 else aten.ge.Scalar, position, cut)
        keep = ctx.call(prims.convert_element_type.default, keep, val.dtype)
        shape = [1] * val.dim()
        shape[info.dim] = -1
        memo[key] = ctx.call(aten.mul.Tensor, node, ctx.call(aten.view.default, keep, shape))
    return memo[key]


def _slice_grouped(ctx: "SplitContext", node: fx.Node, half: int, consumer: fx.Node, info: BatchDim) -> fx.Node:
    """The half's entries when the batch repeats ``outer`` times along the dim (``[T, B] -> [T*B]``)."""
    shape, d, batch = list(shape_of(node)), info.dim, ctx.batch
    if not is_static(batch) or shape[d] != info.outer * batch * info.inner:
        raise AssertionError(f"{node.name}: dim {d} has {shape[d]} != {info.outer} x {batch} x {info.inner}")
    cut = (batch // 2) * info.inner
    start, end = (0, cut) if half == 0 else (cut, batch * info.inner)
    contiguous = {"memory_format": torch.contiguous_format}
    with ctx.graph.inserting_before(consumer):
        grouped = ctx.call(aten.clone.default, node, **contiguous)
        grouped = ctx.call(aten.view.default, grouped, shape[:d] + [info.outer, batch * info.inner] + shape[d + 1:])
        part = ctx.call(aten.slice.Tensor, grouped, d + 1, start, end)
        part = ctx.call(aten.clone.default, part, **contiguous)
        return ctx.call(aten.view.default, part, shape[:d] + [info.outer * (end - start)] + shape[d + 1:])


def _cut(ctx: "SplitContext", node: fx.Node, info: BatchDim, consumer: fx.Node) -> Union[int, fx.Node]:
    """Where the second half starts along ``info.dim`` of ``node`` within each of its ``outer`` groups:
    ``floor(B/2) * inner`` entries (an int, or graph nodes when a size is symbolic)."""
    n, batch = size(node.meta["val"].shape[info.dim]), ctx.batch
    if not same(n, batch_size(info, batch)):
        raise AssertionError(f"{node.name}: dim {info.dim} has {n} != {info.outer} x {batch} x {info.inner}")
    if is_static(n):
        return (batch // 2) * (n // (batch * info.outer))
    return materialize(ctx, FloorDiv(batch, 2) * info.inner, consumer)


_COMBINE = {sympy.Add: operator.add, sympy.Mul: operator.mul}


def materialize(ctx: "SplitContext", expr, consumer: fx.Node) -> Union[int, fx.Node]:
    """An int, or graph nodes (inserted before ``consumer``) computing the symbolic size ``expr`` from the
    graph's SymInt inputs or its inputs' sizes."""
    expr = sympy.sympify(expr)
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        return _symbol(ctx, expr)
    parts = [materialize(ctx, a, consumer) for a in expr.args]
    combine = operator.floordiv if expr.func is FloorDiv else _COMBINE.get(expr.func)
    if combine is None or (expr.func is FloorDiv and len(parts) != 2):
        raise AssertionError(f"cannot build the size {expr} in the graph")
    out = parts[0]
    with ctx.graph.inserting_before(consumer):
        for part in parts[1:]:
            out = ctx.call(combine, out, part)
    return out


def _symbol(ctx: "SplitContext", symbol: sympy.Symbol) -> fx.Node:
    """The graph node holding ``symbol``: a SymInt placeholder, or a ``sym_size`` of an input placed after the
    last placeholder."""
    if symbol in ctx.sizes:
        return ctx.sizes[symbol]
    placeholders = [n for n in ctx.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt) and same(size(val), symbol):
            ctx.sizes[symbol] = node
            return node
    for node in placeholders:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            for d, n in enumerate(val.shape):
                if same(size(n), symbol):
                    with ctx.graph.inserting_after(placeholders[-1]):
                        ctx.sizes[symbol] = ctx.call(aten.sym_size.int, node, d)
                    return ctx.sizes[symbol]
    raise AssertionError(f"no input of the graph carries the size {symbol}")
