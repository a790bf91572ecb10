"""A convolution's weight and bias gradients on half of the batch, and the whole-batch call trimmed to what stays.

``convolution_backward`` returns ``(grad_input, grad_weight, grad_bias)`` as its ``output_mask`` asks. The
weight and bias gradients are contractions over the batch: each half reruns the op on its samples of
``grad_output`` and ``input`` for those two only. The whole-batch call then keeps just ``grad_input``::

    before:  cb = convolution_backward(dy, x, w, [C], ..., [True, True, True])
             dx, dw, db = cb[0], cb[1], cb[2]
    after:   cb_a = convolution_backward(slice(dy, 0, 0, h), slice(x, 0, 0, h), w, ..., [False, True, True])
             cb_b = convolution_backward(slice(dy, 0, h, B), slice(x, 0, h, B), w, ..., [False, True, True])
             cb = convolution_backward(dy, x, w, [C], ..., [True, False, False])
             dx = cb[0];  dw_a, db_a = cb_a[1], cb_a[2];  dw_b, db_b = cb_b[1], cb_b[2]
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Callable

import torch
import torch.fx as fx

from .batch_lattice import BatchDim
from .half_operands import slice_half
from .op_args import argument, position, with_argument

if TYPE_CHECKING:
    from .split_context import SplitContext

CONVOLUTION_BACKWARD = torch.ops.aten.convolution_backward.default
_BATCHED = ("grad_output", "input")
"""The arguments that carry the batch."""


def weight_and_bias_half(ctx: "SplitContext", conv: fx.Node, half: int) -> fx.Node:
    """The ``convolution_backward`` call over ``half``'s samples that computes the weight and bias gradients only
    (made once per half)."""
    memo = ctx.halves[half]
    if conv not in memo:
        batched = [position(CONVOLUTION_BACKWARD, name) for name in _BATCHED]
        info = next(i for i in (ctx.prop.get(conv.args[k]) for k in batched) if isinstance(i, BatchDim))
        args = tuple(slice_half(ctx, a, half, conv, info) if k in batched else a for k, a in enumerate(conv.args))
        _, grad_weight, grad_bias = argument(conv, "output_mask")
        args, kwargs = with_argument(conv, "output_mask", [False, grad_weight, grad_bias], args)
        with ctx.graph.inserting_after(conv):
            memo[conv] = ctx.call(conv.target, *args, **kwargs)
    return memo[conv]


def trim_whole_batch(graph: fx.Graph, fake: Callable[[fx.Node], None]) -> None:
    """Each whole-batch ``convolution_backward`` computes only the outputs that something still reads (after the
    weight and bias halves replaced its own)."""
    for node in list(graph.nodes):
        if node.target is not CONVOLUTION_BACKWARD:
            continue
        used = {u.args[1] for u in node.users if u.target is operator.getitem}
        mask = list(argument(node, "output_mask"))
        trimmed = [m and i in used for i, m in enumerate(mask)]
        if trimmed != mask:
            node.args, node.kwargs = with_argument(node, "output_mask", trimmed)
            fake(node)
