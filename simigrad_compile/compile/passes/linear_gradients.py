"""Which parameter gradients are linear maps of additive contractions over the batch.

A gradient node qualifies when every path from it back to the batched data ends in an additive contraction
over the batch (``mm``/``bmm`` over batch rows, ``sum``/``mean`` over batch dims, ``convolution_backward``'s
weight and bias, ``index_put`` accumulation into zeros, the embedding and embedding-bag backwards) and
everything after the contractions is linear in them: views, adds of two contributions, products with a factor
that is not itself a contribution (BatchNorm's ``rsqrt(var)``, the loss's ``1/count``), ``where``/``masked_fill``
with a zero branch, ``cat`` of contributions. :meth:`LinearGradients.leaves` returns the contractions, or raises
:class:`Refuse` with the reason.
"""

from __future__ import annotations

import operator
from typing import Dict, List, Optional

import torch
import torch.fx as fx

from .batch_dims import UNKNOWN, BatchDim, BatchDimPropagation
from .op_args import argument

aten, prims = torch.ops.aten, torch.ops.prims

ADDITIVE = {
    aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.mm.default, aten.bmm.default,
    aten._unsafe_masked_index_put_accumulate.default, aten.index_put.default, aten._unsafe_index_put.default,
    aten.embedding_dense_backward.default, aten._embedding_bag_dense_backward.default,
    aten._embedding_bag_backward.default,
}
# Linear in args[0] when no other operand is a gradient contribution.
_LINEAR_IN_FIRST = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default, aten.t.default,
    aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.clone.default, aten.alias.default, aten.neg.default, aten.expand.default, aten.sum.dim_IntList,
    aten.sum.default, aten.mean.dim, aten.slice.Tensor, aten.select.int, aten._to_copy.default,
    prims.convert_element_type.default, aten.mul.Scalar, aten.div.Scalar, prims.rev.default, aten.flip.default,
    aten.roll.default, aten.repeat.default, aten.as_strided.default, aten.index.Tensor, aten._unsafe_index.Tensor,
    aten.index_select.default, aten.gather.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.unbind.int, aten.unfold.default, operator.getitem, prims.view_of.default,
    aten._weight_norm_interface_backward.default,  # (grad_v, grad_g) is linear in grad_w for fixed v, g
}
_JOIN = {aten.cat.default, aten.stack.default}
CONV_WEIGHT_AND_BIAS = (1, 2)
"""The outputs of ``convolution_backward`` (``grad_input, grad_weight, grad_bias``) that contract over the batch."""
VALUE_FREE = {aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
              aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
              aten.new_empty_strided.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default}


class Refuse(Exception):
    """This gradient cannot be split soundly; the message says why."""


class LinearGradients:
    def __init__(self, graph: fx.Graph, prop: BatchDimPropagation, tangents, tangent_outputs=None):
        self.prop = prop
        self.tangent_dep = _tangent_dependent(graph, tangents)
        self.tangent_outputs = tangent_outputs or {}
        self.memo: Dict[fx.Node, Optional[List[fx.Node]]] = {}

    def is_contraction(self, node: fx.Node) -> bool:
        return self.memo.get(node) == [node]

    def _is_leaf(self, node: fx.Node) -> bool:
        if node.target is operator.getitem:
            parent = node.args[0]
            return parent.target is aten.convolution_backward.default and node.args[1] in CONV_WEIGHT_AND_BIAS
        if node.target not in ADDITIVE:
            return False
        if node.target in (aten._unsafe_masked_index_put_accumulate.default, aten.index_put.default,
                           aten._unsafe_index_put.default):
            if not is_zeros(argument(node, "self")):
                raise Refuse(f"{node.target} accumulates into a non-zero tensor")
        if node.target is aten.embedding_dense_backward.default and argument(node, "scale_grad_by_freq"):
            raise Refuse("embedding with scale_grad_by_freq mixes the batch's counts")
        if node.target in (aten._embedding_bag_dense_backward.default, aten._embedding_bag_backward.default):
            if argument(node, "scale_grad_by_freq"):
                raise Refuse("embedding_bag with scale_grad_by_freq mixes the batch's counts")
        return True

    def leaves(self, node) -> Optional[List[fx.Node]]:
        """The contraction leaves ``node`` is linear in; ``None`` when it does not depend on any."""
        if not isinstance(node, fx.Node) or not self.tangent_dep.get(node, False) or node.op == "placeholder":
            return None
        if node in self.memo:
            return self.memo[node]
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.layout != torch.strided:
            raise Refuse(f"{node.name} is a sparse gradient (sparse=True embedding): use sparse=False to split it")
        info = self.prop.info.get(node)
        if info is UNKNOWN:
            raise Refuse(f"depends on {culprit(node, self.prop, self.tangent_outputs)}")
        if isinstance(info, BatchDim):
            raise Refuse(f"{node.name} still has the batch dim")
        batched_input = any(self.prop.info.get(a) is not None for a in node.all_input_nodes)
        if batched_input and info is None and self._is_leaf(node):
            result = [node]
        elif batched_input and not isinstance(info, tuple):
            raise Refuse(f"{node.target} reduces over the batch but is not a sum")
        else:
            result = self._combine(node)
        self.memo[node] = result
        return result

    def _combine(self, node: fx.Node) -> Optional[List[fx.Node]]:
        target = node.target
        if target in VALUE_FREE:  # takes only a shape from its input
            return None
        if target is aten.copy.default:  # every value comes from src
            return self.leaves(node.args[1])
        if not any(self.leaves(a) for a in node.all_input_nodes):
            return None
        if target in _LINEAR_IN_FIRST:
            rest = [self.leaves(a) for a in node.all_input_nodes if a is not node.args[0]]
            inner = self.leaves(node.args[0])
            if inner is None or any(rest):
                raise Refuse(f"{target} mixes two gradient contributions")
            return inner
        if target is aten.constant_pad_nd.default and argument(node, "value") == 0:
            return self.leaves(node.args[0])
        if target in _JOIN:
            parts = [self.leaves(t) for t in node.args[0]]
            if not all(p or is_zeros(t) for p, t in zip(parts, node.args[0])):
                raise Refuse(f"{target} joins a term that does not scale with the batch")
            return [leaf for p in parts if p for leaf in p]
        if target in (aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            return self._select(node)
        parts = [self.leaves(a) for a in node.args[:2]]
        if target in (aten.add.Tensor, aten.sub.Tensor):
            if not all(parts):
                raise Refuse(f"{target} adds a term that does not scale with the batch")
            return parts[0] + parts[1]
        if target in (aten.mul.Tensor, aten.mm.default, aten.bmm.default) and sum(p is not None for p in parts) == 1:
            return parts[0] or parts[1]
        if target is aten.div.Tensor and parts[0] and parts[1] is None:
            return parts[0]
        scattered, base = _scattered_values(node)
        if scattered is not None and (base is None or is_zeros(base)):
            values = self.leaves(scattered)
            if values and not any(self.leaves(a) for a in node.all_input_nodes if a is not scattered):
                return values
        if target in (aten.slice_scatter.default, aten.select_scatter.default):
            if all(p or is_zeros(a) for p, a in zip(parts, node.args[:2])):  # a contribution written into zeros,
                return (parts[0] or []) + (parts[1] or [])                    # or zeros written into one
        raise Refuse(f"gradient passes through {target}, which the split pass does not treat as linear")

    def _select(self, node: fx.Node) -> List[fx.Node]:
        """``where(c, x, 0)``, ``where(c, 0, x)``, ``masked_fill(x, c, 0)``: linear in ``x``."""
        if node.target is aten.where.self:
            cond, branches = argument(node, "condition"), [argument(node, "self"), argument(node, "other")]
        else:
            cond, branches = argument(node, "mask"), [argument(node, "self"), argument(node, "value")]
        if self.leaves(cond):
            raise Refuse(f"{node.target}'s condition depends on a gradient contribution")
        parts = [self.leaves(b) for b in branches]
        live = [p for p in parts if p]
        others = [b for b, p in zip(branches, parts) if not p]
        if len(live) == 1 and all(is_zeros(b) for b in others):
            return live[0]
        raise Refuse(f"{node.target} mixes a gradient with a non-zero value")


def _scattered_values(node: fx.Node):
    """``(values, base)`` of an op that scatter-adds ``values`` at fixed indices (into ``base``, which must be
    zeros; None for embedding_dense_backward): linear in ``values``. ``(None, None)`` for any other op."""
    if node.target is aten._unsafe_masked_index_put_accumulate.default or (
            node.target in (aten.index_put.default, aten._unsafe_index_put.default) and argument(node, "accumulate")):
        return argument(node, "values"), argument(node, "self")
    if node.target is aten.embedding_dense_backward.default and not argument(node, "scale_grad_by_freq"):
        return argument(node, "grad_output"), None
    return None, None


def is_zeros(node) -> bool:
    """A literal 0, or a tensor filled with zeros by construction."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return node == 0
    if not isinstance(node, fx.Node):
        return False
    target = node.target
    if target in (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default):
        return True
    if target in (aten.full.default, aten.new_full.default, aten.full_like.default):
        return argument(node, "fill_value") == 0
    if target is aten.scalar_tensor.default:
        return argument(node, "s") == 0
    if target in (aten.expand.default, aten.view.default, aten.clone.default, aten._to_copy.default,
                  prims.convert_element_type.default):
        return is_zeros(node.args[0])
    if target is aten.copy.default:
        return is_zeros(node.args[1])
    return False


def _tangent_dependent(graph: fx.Graph, tangents) -> Dict[fx.Node, bool]:
    dep = {t: True for t in tangents}
    for node in graph.nodes:
        if node not in dep:
            dep[node] = any(dep.get(a, False) for a in node.all_input_nodes)
    return dep


def culprit(node: fx.Node, prop: BatchDimPropagation, tangent_outputs=None) -> str:
    """The first op on ``node``'s inputs whose output became UNKNOWN from known inputs, with its reason; a
    tangent leads to the forward output it is the gradient of."""
    tangent_outputs = tangent_outputs or {}
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        parents = [a for a in n.all_input_nodes if prop.info.get(a) is UNKNOWN]
        if n.op == "placeholder" and isinstance(tangent_outputs.get(n), fx.Node):
            parents = [tangent_outputs[n]]
        if not parents:
            why = prop.why.get(n, "no batch-dim rule")
            return f"{n.target} ({n.name}): {why}"
        stack.extend(parents)
    return str(node.target)
