"""The ``microsteps`` statistic: the midpoint gradient copy and the pair kernel at the boundary.

The window arithmetic (which micro-steps form each half, ``W_h / N1`` against ``(W_k - W_h) / N2``) is in
:mod:`simigrad_compile.runtime.window`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..kernels import pair_stats
from .gradient_stats import SplitStats


class MicrostepStats:
    """Owns the midpoint gradient copy of a model's parameters (reused across windows)."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = [p for p in params if p.requires_grad]
        self.copies: List[Optional[torch.Tensor]] = [None] * len(self.params)

    def snapshot(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                self.copies[i] = None
            elif self.copies[i] is None or self.copies[i].shape != p.grad.shape or self.copies[i].dtype != p.grad.dtype:
                self.copies[i] = p.grad.detach().clone()
            else:
                self.copies[i].copy_(p.grad.detach())
        self._valid = [c is not None for c in self.copies]

    def stats(self, n_mid: int, n_last: int, n1: int, n2: int) -> SplitStats:
        """Statistics of ``g1 = W_h / N1``, ``g2 = (W_k - W_h) / N2`` (module docstring) from the snapshot
        (``W_h / n_mid``) and the current gradients (``W_k / n_last``)."""
        own, total = [], []
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            copy = self.copies[i] if self._valid[i] else torch.zeros_like(p.grad)
            own.append(copy)
            total.append(p.grad)
        if not own:
            return SplitStats(float("nan"), float("nan"), float("nan"), "microsteps")
        rows = pair_stats(own, total, n_last / n_mid, -1.0).detach().to("cpu", torch.float64).sum(0)
        s1, s2 = n_mid / n1, n_mid / n2
        return SplitStats(float(rows[0]) * s1 * s2, float(rows[1]) * s1 * s1, float(rows[2]) * s2 * s2, "microsteps")



__all__ = ["MicrostepStats"]
