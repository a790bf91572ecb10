"""How to restrict a contraction over the batch to half of the samples.

For each contraction (a leaf of :mod:`.linear_gradients`) this names every tensor operand that must be cut, and
along which dim, including batch-free operands that the op lines up with the batch: a matmul's other factor, the
position ids ``arange(T).repeat(B, 1)`` that index an embedding's gradient rows. ``("slice", cuts)`` keeps only
the half's entries (no extra FLOPs); ``("mask", cuts)`` multiplies the one gradient operand by the half's 0/1
mask instead, for contractions whose other operands hold sample ids that slicing would break (embedding bags)
or whose result divides by the count (``mean``).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.fx as fx

from .batch_lattice import BatchDim, same, shape_of
from .index_layout import IndexLayout
from .op_args import argument, position

aten = torch.ops.aten
Path = Tuple
"""Where an operand sits in the call's ``args``: ``(arg position,)`` or ``(arg position, list position)``."""


class NoCut(Exception):
    """The contraction's operands cannot be restricted to a half."""


def cuts_for(node: fx.Node, info_of) -> Tuple[str, Dict[Path, BatchDim]]:
    target = node.target
    if target in (aten.sum.dim_IntList, aten.sum.default):
        return "slice", {(0,): _batched(info_of, node.args[0])}
    if target in (aten.mean.dim, aten.mean.default):
        return "mask", {(0,): _batched(info_of, node.args[0])}
    if target in (aten.mm.default, aten.bmm.default):
        off = 1 if target is aten.bmm.default else 0
        a, b = info_of(node.args[0]), info_of(node.args[1])
        i = a if isinstance(a, BatchDim) else b
        return "slice", {(0,): i.at(off + 1), (1,): i.at(off)}
    if target is aten.embedding_dense_backward.default:
        i = _batched(info_of, argument(node, "grad_output"))
        cuts = {_path(target, "grad_output"): i}
        if i.dim < len(shape_of(argument(node, "indices"))):
            cuts[_path(target, "indices")] = i
        return "slice", cuts
    if target in (aten.index_put.default, aten._unsafe_index_put.default,
                  aten._unsafe_masked_index_put_accumulate.default):
        return "slice", _index_put_cuts(node, info_of)
    if target in (aten._embedding_bag_dense_backward.default, aten._embedding_bag_backward.default):
        return "mask", {(0,): _batched(info_of, node.args[0])}
    raise NoCut(f"no way to restrict {target} to half of the batch")


def _batched(info_of, arg) -> BatchDim:
    i = info_of(arg)
    if not isinstance(i, BatchDim):
        raise NoCut(f"{arg} carries no batch dim")
    return i


def _path(target, name: str) -> Path:
    return (position(target, name),)


def _index_put_cuts(node: fx.Node, info_of) -> Dict[Path, BatchDim]:
    target = node.target
    masked = target is aten._unsafe_masked_index_put_accumulate.default
    base, values = argument(node, "self"), argument(node, "values")
    at = position(target, "indices")
    indices = list(argument(node, "indices"))
    layout = IndexLayout(len(shape_of(base)), [shape_of(t) if isinstance(t, fx.Node) else None for t in indices])
    vi = _batched(info_of, values)
    r = vi.dim + layout.ndim - len(shape_of(values))
    k = layout.block_position(r)
    if k is None:
        raise NoCut("index_put's batch is not in the indexed block")
    cuts = {_path(target, "values"): vi}
    aligned = [((at, j), t, k - layout.block) for j, t in enumerate(indices) if isinstance(t, fx.Node)]
    if masked:  # the mask broadcasts against the indexed shape, like the values
        aligned.append((_path(target, "mask"), argument(node, "mask"), r - layout.ndim))
    for path, t, from_right in aligned:
        shape = shape_of(t)
        dim = len(shape) + from_right
        if dim >= 0 and not same(shape[dim], 1):
            cuts[path] = vi.at(dim)
    return cuts
