"""The split pass's check of its halves before anything is rewired: shapes, and index operands that still fit.

Each half must have the shape of its whole (a ``[out, in]`` weight gradient stays ``[out, in]``), and each
``index_put`` half must still index with operands that broadcast to its values: fake kernels let values that
do not broadcast to the indexed shape through, and Inductor would then fail on the graph::

    index_put(zeros, [slice(pos, 0, 0, h)], slice(dy, 0, 0, h), True)   # fits: both cut to the half
    index_put(zeros, [pos], slice(dy, 0, 0, h), True)                   # AssertionError: values do not fit
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Tuple

import torch
import torch.fx as fx

from .batch_lattice import Size, same, shape_of, size
from .index_layout import IndexLayout
from .op_args import argument

if TYPE_CHECKING:
    from .split_context import SplitContext

aten = torch.ops.aten
_INDEX_PUTS = (aten.index_put.default, aten._unsafe_index_put.default, aten._unsafe_masked_index_put_accumulate.default)


def check_halves(ctx: "SplitContext") -> None:
    """Raises AssertionError (which the pass turns into a named refusal) when a half does not fit its whole."""
    for memo in ctx.halves:
        for whole, half in memo.items():
            if not isinstance(whole, fx.Node) or not isinstance(half, fx.Node) or whole is half:
                continue
            a, b = whole.meta.get("val"), half.meta.get("val")
            if isinstance(a, torch.Tensor) and not (
                    isinstance(b, torch.Tensor) and len(a.shape) == len(b.shape)
                    and all(same(size(x), size(y)) for x, y in zip(a.shape, b.shape))):
                raise AssertionError(f"half of {whole.name} has shape {getattr(b, 'shape', b)}, not {a.shape}")
            _check_index_put(half)


def _check_index_put(node: fx.Node) -> None:
    if node.target not in _INDEX_PUTS:
        return
    masked = node.target is aten._unsafe_masked_index_put_accumulate.default
    base, indices, values = argument(node, "self"), list(argument(node, "indices")), argument(node, "values")
    block = _broadcast([tuple(shape_of(t)) for t in indices if isinstance(t, fx.Node)], node)
    layout = IndexLayout(len(shape_of(base)), [() if isinstance(t, fx.Node) else None for t in indices])
    rest = [n for d, n in enumerate(shape_of(base)) if layout.of_self(d) is not None]
    indexed = rest[: layout.offset] + list(block) + rest[layout.offset:]
    for fitted in [values] + ([argument(node, "mask")] if masked else []):
        if tuple(_broadcast([tuple(indexed), shape_of(fitted)], node)) != tuple(indexed):
            raise AssertionError(f"{node.name}: {fitted.name} {shape_of(fitted)} does not fit {tuple(indexed)}")


def _broadcast(shapes: Sequence[Tuple[Size, ...]], node: fx.Node) -> Tuple[Size, ...]:
    out = []
    for k in range(max(len(s) for s in shapes)):
        sizes = [s[len(s) - 1 - k] for s in shapes if k < len(s)]
        big = [n for n in sizes if not same(n, 1)]
        if any(not same(n, big[0]) for n in big):
            raise AssertionError(f"{node.name}: shapes {shapes} do not broadcast")
        out.append(big[0] if big else 1)
    return tuple(reversed(out))
