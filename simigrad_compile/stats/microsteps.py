"""The ``microsteps`` statistic: the midpoint gradient copy and the pair kernel at the boundary.

The window arithmetic (which micro-steps form each half, ``W_h / N1`` against ``(W_k - W_h) / N2``) is in
:mod:`simigrad_compile.runtime.window`. The parameters are the window's (the optimizer's live set), so a
parameter unfrozen or added between steps is covered from its first window on.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ..kernels import pair_stats
from .gradient_stats import SplitStats


class MicrostepStats:
    """Owns the midpoint gradient copies (reused across windows while a parameter's shape and dtype hold)."""

    def __init__(self):
        self.copies: Dict[int, torch.Tensor] = {}
        self._taken: Dict[int, torch.Tensor] = {}

    def snapshot(self, params: Sequence[torch.nn.Parameter]) -> None:
        taken = {}
        for p in params:
            if p.grad is None:
                continue
            copy = self.copies.get(id(p))
            if copy is None or copy.shape != p.grad.shape or copy.dtype != p.grad.dtype or copy.device != p.grad.device:
                copy = self.copies[id(p)] = p.grad.detach().clone()
            else:
                copy.copy_(p.grad.detach())
            taken[id(p)] = copy
        self._taken = taken
        live = {id(p) for p in params}
        for key in [k for k in self.copies if k not in live]:
            del self.copies[key]

    def stats(self, params: Sequence[torch.nn.Parameter], n_mid: int, n_last: int, n1: int, n2: int) -> SplitStats:
        """Statistics of ``g1 = W_h / N1``, ``g2 = (W_k - W_h) / N2`` (module docstring) from the snapshot
        (``W_h / n_mid``) and the current gradients (``W_k / n_last``)."""
        own: List[torch.Tensor] = []
        total: List[torch.Tensor] = []
        for p in params:
            if p.grad is None:
                continue
            copy: Optional[torch.Tensor] = self._taken.get(id(p))
            own.append(copy if copy is not None else torch.zeros_like(p.grad))
            total.append(p.grad)
        if not own:  # no gradient at all: no statistics
            return SplitStats(float("nan"), float("nan"), float("nan"), "none")
        rows = _pair_rows(own, total, n_last / n_mid, -1.0)
        s1, s2 = n_mid / n1, n_mid / n2
        return SplitStats(float(rows[0]) * s1 * s2, float(rows[1]) * s1 * s1, float(rows[2]) * s2 * s2, "microsteps")


def _pair_rows(own: List[torch.Tensor], total: List[torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    """``pair_stats`` summed over parameters, in fp64 on the host. The kernels take fp32/bf16/fp16 gradients;
    fp64 gradients (an fp64 model) are summed here in fp64 with plain torch ops."""
    rows = torch.zeros(3, dtype=torch.float64)
    wide = [i for i, g in enumerate(own) if g.dtype == torch.float64]
    narrow = [i for i in range(len(own)) if own[i].dtype != torch.float64]
    if narrow:
        rows += pair_stats([own[i] for i in narrow], [total[i] for i in narrow], alpha, beta).detach().to(
            "cpu", torch.float64).sum(0)
    for i in wide:
        x, t = own[i].detach().flatten(), total[i].detach().flatten().double()
        other = alpha * t + beta * x
        rows += torch.stack([x @ other, x @ x, other @ other]).cpu()
    return rows


__all__ = ["MicrostepStats"]
