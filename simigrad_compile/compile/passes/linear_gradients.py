"""Which parameter gradients are linear maps of additive contractions over the batch.

A gradient node qualifies when every path from it back to the batched data ends in an additive contraction
over the batch (``mm``/``bmm`` over batch rows, ``sum`` over batch dims, ``convolution_backward``'s weight and
bias, ``index_put`` accumulation into zeros, ``embedding_dense_backward``) and everything after the
contractions is linear in them: views, adds of two contributions, products with a factor that is not itself
a contribution (BatchNorm's ``rsqrt(var)``, the loss's ``1/count``). :meth:`LinearGradients.leaves` returns the
contractions, or raises :class:`Refuse` with the reason.
"""

from __future__ import annotations

import operator
from typing import Dict, List, Optional

import torch
import torch.fx as fx

from .batch_dims import UNKNOWN, BatchDim, BatchDimPropagation

aten = torch.ops.aten

_ADDITIVE = {
    aten.sum.dim_IntList, aten.sum.default, aten.mm.default, aten.bmm.default,
    aten._unsafe_masked_index_put_accumulate.default, aten.index_put.default, aten.embedding_dense_backward.default,
}
_LINEAR_UNARY = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default, aten.t.default,
    aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.clone.default, aten.alias.default, aten.neg.default, aten.expand.default, aten.sum.dim_IntList,
    aten.slice.Tensor, aten.select.int, aten._to_copy.default, torch.ops.prims.convert_element_type.default,
    aten.mul.Scalar, aten.div.Scalar,
}



class Refuse(Exception):
    """This gradient cannot be split soundly; the message says why."""


class LinearGradients:
    def __init__(self, graph: fx.Graph, prop: BatchDimPropagation, tangents):
        self.prop = prop
        self.tangent_dep = _tangent_dependent(graph, tangents)
        self.memo: Dict[fx.Node, Optional[List[fx.Node]]] = {}

    def is_contraction(self, node: fx.Node) -> bool:
        return self.memo.get(node) == [node]

    def _is_leaf(self, node: fx.Node) -> bool:
        if node.target is operator.getitem:
            parent = node.args[0]
            return parent.target is aten.convolution_backward.default and node.args[1] in (1, 2)
        if node.target not in _ADDITIVE:
            return False
        if node.target in (aten._unsafe_masked_index_put_accumulate.default, aten.index_put.default):
            if not _is_zeros(node.args[0]):
                raise Refuse(f"{node.target} accumulates into a non-zero tensor")
        if node.target is aten.embedding_dense_backward.default and node.args[4]:
            raise Refuse("embedding with scale_grad_by_freq mixes the batch's counts")
        return True

    def leaves(self, node) -> Optional[List[fx.Node]]:
        """The contraction leaves ``node`` is linear in; ``None`` when it does not depend on any."""
        if not isinstance(node, fx.Node) or not self.tangent_dep.get(node, False) or node.op == "placeholder":
            return None
        if node in self.memo:
            return self.memo[node]
        info = self.prop.info.get(node)
        if info is UNKNOWN:
            raise Refuse(f"depends on {_culprit(node, self.prop)}, which has no batch-dim rule")
        if isinstance(info, BatchDim):
            raise Refuse(f"{node.name} still has the batch dim")
        batched_input = any(self.prop.info.get(a) is not None for a in node.all_input_nodes)
        if batched_input and self._is_leaf(node):
            result = [node]
        elif batched_input:
            raise Refuse(f"{node.target} reduces over the batch but is not a sum")
        else:
            result = self._combine(node)
        self.memo[node] = result
        return result

    def _combine(self, node: fx.Node) -> Optional[List[fx.Node]]:
        target = node.target
        if not any(self.leaves(a) for a in node.all_input_nodes):
            return None
        if target in _LINEAR_UNARY:
            rest = [self.leaves(a) for a in node.all_input_nodes[1:]]
            inner = self.leaves(node.args[0])
            if inner is None or any(rest):
                raise Refuse(f"{target} mixes two gradient contributions")
            return inner
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
        if scattered is not None and (base is None or _is_zeros(base)):
            values = self.leaves(scattered)
            if values and not any(self.leaves(a) for a in node.all_input_nodes if a is not scattered):
                return values
        if target in (aten.slice_scatter.default, aten.select_scatter.default) and parts[1]:
            if parts[0] or _is_zeros(node.args[0]):
                return (parts[0] or []) + parts[1]
        raise Refuse(f"gradient passes through {target}, which the split pass does not treat as linear")


def _scattered_values(node: fx.Node):
    """``(values, base)`` of an op that scatter-adds ``values`` at fixed indices (into ``base``, which must be
    zeros; None for embedding_dense_backward): linear in ``values``. ``(None, None)`` for any other op."""
    if node.target is aten._unsafe_masked_index_put_accumulate.default:
        return node.args[3], node.args[0]
    if node.target is aten.index_put.default and len(node.args) > 3 and node.args[3]:
        return node.args[2], node.args[0]
    if node.target is aten.embedding_dense_backward.default and not node.args[4]:
        return node.args[0], None
    return None, None


def _is_zeros(node) -> bool:
    return isinstance(node, fx.Node) and node.target in (aten.full.default, aten.zeros.default) and (
        node.target is aten.zeros.default or node.args[1] == 0
    )


def _tangent_dependent(graph: fx.Graph, tangents) -> Dict[fx.Node, bool]:
    dep = {t: True for t in tangents}
    for node in graph.nodes:
        if node not in dep:
            dep[node] = any(dep.get(a, False) for a in node.all_input_nodes)
    return dep


def _culprit(node: fx.Node, prop: BatchDimPropagation) -> str:
    """The first op on ``node``'s inputs whose output became UNKNOWN from known inputs."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        parents = [a for a in n.all_input_nodes if prop.info.get(a) is UNKNOWN]
        if not parents:
            return f"{n.target} ({n.name})"
        stack.extend(parents)
    return str(node.target)
