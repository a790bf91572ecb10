"""One compile's rewrite state for the split pass, and the typed interface its rewrites share.

A :class:`SplitContext` lives for one call of :class:`~.split_backward.SplitBackwardPass` on one joint graph.
:meth:`SplitContext.emit` gives the half-batch version of a gradient node: it replays the node's linear map on
its contractions, each restricted to the half's samples by :mod:`.half_operands` (``B = 4``, half 0 keeps
samples 0 and 1)::

    before:   mm_4 = mm(permute_7, view)                  # [out, B*T] @ [B*T, in]
              permute_8 = permute(mm_4, [1, 0])
    emit(permute_8, 0) adds:
              slice_1 = slice(permute_7, 1, 0, 2*T)
              slice_2 = slice(view, 0, 0, 2*T)
              mm_5 = mm(slice_1, slice_2)
              permute_9 = permute(mm_5, [1, 0])           # returned; emit(permute_8, 0) again returns it too

Every node a rewrite adds goes through :meth:`SplitContext.call` or :meth:`SplitContext.copy`, which record it
(for :meth:`SplitContext.revert`), give it its fake value (``meta["val"]``, PyTorch's pass rule) and tag it
for the backward graph (a slice of an activation is cut there, never saved by the forward).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Tuple

import sympy
import torch
import torch.fx as fx

from ...compat import keep_in_backward, tree_map
from . import convolution_halves, half_operands, sample_sums
from .batch_dims import BatchDimPropagation
from .leaf_operands import cuts_for
from .linear_gradients import LinearGradients

aten = torch.ops.aten

FIRST, SECOND = 0, 1
"""The halves: ``FIRST`` holds the first ``floor(B/2)`` samples, ``SECOND`` the other ``ceil(B/2)``."""


class SplitContext:
    """The split pass's state for one joint graph: what it added, and each node's two halves.

    Args:
        graph: the joint graph being rewritten.
        output: its output node (whose arguments :meth:`revert` restores).
        prop: the batch dims of the graph's nodes (:class:`~.batch_dims.BatchDimPropagation`).
        linear: which contractions each gradient is linear in (:class:`~.linear_gradients.LinearGradients`).
    """

    def __init__(self, graph: fx.Graph, output: fx.Node, prop: BatchDimPropagation, linear: LinearGradients):
        self.graph = graph
        self.prop = prop
        self.linear = linear
        self.created: List[fx.Node] = []
        """Every node the rewrite added, in order."""
        self.halves: Tuple[Dict[fx.Node, Any], Dict[fx.Node, Any]] = ({}, {})
        """Per half: a node of the original graph -> its half-batch version."""
        self.operands: Tuple[Dict[tuple, fx.Node], Dict[tuple, fx.Node]] = ({}, {})
        """Per half: ``(how, operand, consumer, batch dim)`` -> the operand cut to the half (:mod:`.half_operands`)."""
        self.per_sample: Dict[fx.Node, fx.Node] = {}
        """A sum over the batch and other dims -> its summand reduced over the other dims (:mod:`.sample_sums`)."""
        self.sizes: Dict[sympy.Symbol, fx.Node] = {}
        """A symbolic size -> the graph node that holds it."""
        self._output = output
        self._original_outputs = output.args

    @property
    def batch(self):
        """The batch size ``B`` (an int, or a ``SymInt`` when Dynamo made it dynamic)."""
        return self.prop.batch

    def call(self, target: Callable, *args, **kwargs) -> fx.Node:
        """A new ``call_function`` node at the graph's insertion point, recorded and given its fake value."""
        node = self.graph.call_function(target, args, kwargs)
        self.created.append(node)
        self.fake(node)
        return node

    def copy(self, node: fx.Node, arg_transform: Callable[[Any], Any]) -> fx.Node:
        """A copy of ``node`` at the graph's insertion point with each argument mapped by ``arg_transform``,
        recorded and given its fake value."""
        new = self.graph.node_copy(node, arg_transform)
        self.created.append(new)
        self.fake(new)
        return new

    def fake(self, node: fx.Node) -> None:
        """Sets ``node.meta["val"]`` by running its target on its arguments' fake values, and tags it for the
        backward graph."""
        args, kwargs = tree_map(lambda a: a.meta["val"] if isinstance(a, fx.Node) else a, (node.args, node.kwargs))
        with self.prop.fake_mode:
            node.meta["val"] = node.target(*args, **kwargs)
        keep_in_backward(node)

    def emit(self, node: Any, half: int) -> Any:
        """The ``half`` (:data:`FIRST` or :data:`SECOND`) version of ``node``; ``node`` itself when it does not
        depend on a contraction over the batch (a weight, a constant, a non-node argument)."""
        if not isinstance(node, fx.Node) or self.linear.leaves(node) is None:
            return node
        memo = self.halves[half]
        if node in memo:
            return memo[node]
        if node.target is operator.getitem and node.args[0].target is aten.convolution_backward.default:
            conv = convolution_halves.weight_and_bias_half(self, node.args[0], half)
            with self.graph.inserting_after(conv):
                copy = self.call(operator.getitem, conv, node.args[1])
        elif self.linear.is_contraction(node):
            copy = self._emit_contraction(node, half)
        else:
            with self.graph.inserting_after(node):
                copy = self.copy(node, lambda a: self.emit(a, half))
        memo[node] = copy
        return copy

    def _emit_contraction(self, node: fx.Node, half: int) -> fx.Node:
        """The contraction over the ``half``'s samples only: its operands cut (or its gradient masked)."""
        how, cuts = cuts_for(node, self.prop.get)
        cut = half_operands.slice_half if how == "slice" else half_operands.mask_half
        rows = sample_sums.per_sample(self, node, cuts[(0,)]) if how == "slice" and (0,) in cuts else None
        if rows is not None:  # each half sums its samples' rows of the summand reduced once
            with self.graph.inserting_after(node):
                return self.call(node.target, cut(self, rows, half, node, cuts[(0,)]), *node.args[1:], **node.kwargs)

        def each(value, path):
            if isinstance(value, (list, tuple)):
                return type(value)(each(v, path + (j,)) for j, v in enumerate(value))
            if isinstance(value, fx.Node) and path in cuts:
                return cut(self, value, half, node, cuts[path])
            return value

        args = tuple(each(a, (i,)) for i, a in enumerate(node.args))
        with self.graph.inserting_after(node):
            return self.call(node.target, *args, **node.kwargs)

    def revert(self) -> None:
        """Restores the output node's arguments and erases every added node nothing uses."""
        self._output.args = self._original_outputs
        for node in reversed(self.created):
            if node.graph is self.graph and not node.users:
                self.graph.erase_node(node)
