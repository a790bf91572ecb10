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

Trimming changes the layouts Inductor gives the call's operands (``torch/_inductor/kernel/conv.py``): a call
that computes ``grad_weight`` gets ``input`` and ``grad_output`` in the weight's stride order (NCHW for the usual
weight), one that computes ``grad_input`` alone follows ``input``'s own layout, which is channels-last for the
activations Inductor's CPU forward saves. For most convolutions channels-last is as lean and faster. For a
dilated one, oneDNN computes ``grad_input`` on channels-last operands through a scratch many times the
activation: 24.6 MB (``2 * B * C * k * k * H * W`` floats) for each of LR-ASPP's 960-channel 5x5 depthwise
convolutions with dilation 2 at 8 x 4 x 4, where NCHW needs 1 MB; that took the model's peak step from plain
Inductor's 48 MB to 71 MB. So a dilated convolution's trimmed call reads, for its input, an uninitialised tensor
in the contiguous format (:func:`_input_like_untrimmed`): ``grad_input`` depends on the input's shape only, never
on its values, and Inductor then lays out ``grad_output`` in NCHW as in the untrimmed call. NCHW costs time
where channels-last was faster (4.3 against 3.9 ms for each of those LR-ASPP convolutions, at 1 thread), as it
does in plain Inductor::

    after:   cb = convolution_backward(dy, empty_like(x, memory_format=contiguous_format), w, ..., [True, False, False])
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

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


def trim_whole_batch(ctx: "SplitContext") -> None:
    """Each whole-batch ``convolution_backward`` computes only the outputs that something still reads (after the
    weight and bias halves replaced its own); a dilated one left with ``grad_input`` alone reads a stand-in for
    its input (see the module docstring)."""
    for node in list(ctx.graph.nodes):
        if node.target is not CONVOLUTION_BACKWARD:
            continue
        used = {u.args[1] for u in node.users if u.target is operator.getitem}
        mask = list(argument(node, "output_mask"))
        trimmed = [m and i in used for i, m in enumerate(mask)]
        if trimmed == mask:
            continue
        node.args, node.kwargs = with_argument(node, "output_mask", trimmed)
        if trimmed == [True, False, False] and mask[1]:
            _input_like_untrimmed(ctx, node)
        ctx.fake(node)


def _input_like_untrimmed(ctx: "SplitContext", node: fx.Node) -> None:
    """A dilated convolution's call trimmed to ``grad_input`` reads an uninitialised contiguous tensor of its
    input's shape, so that Inductor lays out its operands in NCHW as it would with ``grad_weight`` asked (see the
    module docstring); a channels-last weight keeps channels-last operands either way, and the call its input."""
    weight = argument(node, "weight").meta.get("val")
    if all(d == 1 for d in argument(node, "dilation")) or not isinstance(weight, torch.Tensor) \
            or not weight.is_contiguous():
        return
    with ctx.graph.inserting_before(node):
        stand_in = ctx.call(torch.ops.aten.empty_like.default, argument(node, "input"),
                            memory_format=torch.contiguous_format)
    node.args, node.kwargs = with_argument(node, "input", stand_in)
