"""How many samples a batch holds, for doors that see the user's own batches (``SIMIGRAD=1``, Lightning)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from ..compat import tree_leaves


def samples_in(batch: Any, batch_dim: Any = 0) -> Optional[int]:
    """The size of dim ``batch_dim`` (an int; anything else means 0) of the first tensor in ``batch``, or None
    when the batch holds no tensor with that dim."""
    dim = batch_dim if isinstance(batch_dim, int) and not isinstance(batch_dim, bool) else 0
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor):
            return int(leaf.shape[dim]) if leaf.dim() > dim else None
    return None


__all__ = ["samples_in"]
