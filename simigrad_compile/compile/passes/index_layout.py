"""Where each dim goes under advanced indexing (``x[i, :, j]``: ``index``, ``_unsafe_index``, ``index_put``).

The index tensors broadcast together into one block of dims; the block stands where the indexed dims stood
when those are adjacent, and in front otherwise. Un-indexed dims keep their order around it.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from .batch_lattice import Size


class IndexLayout:
    def __init__(self, ndim: int, index_shapes: Sequence[Optional[Tuple[Size, ...]]]):
        positions = [d for d, s in enumerate(index_shapes) if s is not None]
        self.block = max(len(index_shapes[d]) for d in positions)
        adjacent = positions == list(range(positions[0], positions[-1] + 1))
        self.offset = positions[0] if adjacent else 0
        self.indexed = set(positions)
        rest = [d for d in range(ndim) if d not in self.indexed]
        self.rest: Dict[int, int] = {}
        for j, d in enumerate(rest):
            if adjacent:
                self.rest[d] = d if d < positions[0] else d - len(positions) + self.block
            else:
                self.rest[d] = self.block + j
        self.ndim = ndim - len(positions) + self.block

    def of_self(self, d: int) -> Optional[int]:
        """The output dim of the un-indexed input dim ``d`` (None when ``d`` is indexed)."""
        return self.rest.get(d)

    def of_index(self, index_ndim: int, k: int) -> int:
        """The output dim of dim ``k`` of an index tensor with ``index_ndim`` dims (right-aligned in the block)."""
        return self.offset + self.block - index_ndim + k

    def block_position(self, out_dim: int) -> Optional[int]:
        """Position inside the broadcast block of output dim ``out_dim``; None for an un-indexed dim."""
        k = out_dim - self.offset
        return k if 0 <= k < self.block else None

    def self_dim_of(self, out_dim: int) -> Optional[int]:
        """The input dim that output dim ``out_dim`` comes from, when it is not in the block."""
        return next((d for d, o in self.rest.items() if o == out_dim), None)
