"""The ``microsteps`` statistic: the midpoint gradient copy and the pair kernel at the boundary.

The window arithmetic (which micro-steps form each half, ``W_h / N1`` against ``(W_k - W_h) / N2``) is in
:mod:`simigrad_compile.runtime.window`. A sparse gradient (``nn.Embedding(sparse=True)``) is densified per
parameter: its midpoint copy is dense (the parameter's size, allocated per window) and the pair is taken over
its dense form at the boundary. The parameters are the window's (the optimizer's live set), so a
parameter unfrozen or added between steps is covered from its first window on.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import compat
from ..kernels import pair_stats
from .split_stats import SplitStats


class MicrostepStats:
    """Owns the midpoint gradient copies (reused across windows while a parameter's shape and dtype hold)."""

    def __init__(self):
        self.copies: Dict[int, torch.Tensor] = {}
        self._taken: Dict[int, torch.Tensor] = {}
        self.total_sq: Optional[float] = None
        """``sum |p.grad|^2`` over the last :meth:`stats` call's gradients, when its pass took it (the flat and
        concatenated paths of :func:`_pair_rows`), else None: the boundary's gradient norm, at no extra pass."""

    def snapshot(self, params: Sequence[torch.nn.Parameter]) -> None:
        taken, dst, src = {}, [], []
        copies = self.copies
        for p in params:
            grad = p.grad
            if grad is None:
                continue
            if grad.requires_grad:
                grad = grad.detach()
            if grad.is_sparse:  # a sparse gradient (nn.Embedding(sparse=True)): its dense copy, taken afresh
                taken[id(p)] = copies[id(p)] = grad.to_dense()
                continue
            copy = copies.get(id(p))
            if copy is None or copy.shape != grad.shape or copy.dtype != grad.dtype or copy.device != grad.device:
                copy = copies[id(p)] = grad.clone()
            else:
                dst.append(copy)
                src.append(grad)
            taken[id(p)] = copy
        if dst:
            compat.foreach_copy_(dst, src)
        self._taken = taken
        if len(copies) > len(taken):  # else every copy is of a parameter that has a gradient now
            live = {id(p) for p in params}
            for key in [k for k in copies if k not in live]:
                del copies[key]

    def stats(self, params: Sequence[torch.nn.Parameter], n_mid: int, n_last: int, n1: int, n2: int) -> SplitStats:
        """Statistics of ``g1 = W_h / N1``, ``g2 = (W_k - W_h) / N2`` (module docstring) from the snapshot
        (``W_h / n_mid``) and the current gradients (``W_k / n_last``)."""
        own: List[torch.Tensor] = []
        total: List[torch.Tensor] = []
        for p in params:
            if p.grad is None:
                continue
            copy: Optional[torch.Tensor] = self._taken.get(id(p))
            grad = dense(p.grad)
            own.append(copy if copy is not None else torch.zeros_like(grad))
            total.append(grad)
        self.total_sq = None
        if not own:  # no gradient at all: no statistics
            return SplitStats(float("nan"), float("nan"), float("nan"), "none")
        (dot, sq_norm_1, sq_norm_2), self.total_sq = _pair_rows(own, total, n_last / n_mid, -1.0)
        s1, s2 = n_mid / n1, n_mid / n2
        return SplitStats(dot * s1 * s2, sq_norm_1 * s1 * s1, sq_norm_2 * s2 * s2, "microsteps")


def _pair_rows(own: List[torch.Tensor], total: List[torch.Tensor], alpha: float,
               beta: float) -> Tuple[List[float], Optional[float]]:
    """``(own.other, |own|^2, |other|^2)`` summed over parameters, ``other = alpha*total + beta*own``, as host
    floats, and ``|total|^2`` when taken. By the gradients' size in all (on one device), measured against one
    kernel call per parameter, whose fixed cost (about 80 us on CPU) dominates below ``CONCAT``:

    * at most ``FLATTEN`` elements: one flat pair in fp64 (a few ops in all), with ``|total|^2``;
    * at most ``CONCAT`` fp32/bf16/fp16 elements: both sides concatenated, one ``pair_stats`` call and one dot for
      ``|total|^2`` (two copies of the gradient cost less than the calls they save at this size);
    * else one ``pair_stats`` row per fp32/bf16/fp16 parameter, and fp64 gradients (an fp64 model) summed in
      fp64 here; ``|total|^2`` is not taken."""
    device = own[0].device
    n = sum(x.numel() for x in own)
    if n <= CONCAT and all(t.device == device for t in (*own, *total)):
        if n <= FLATTEN:
            return _pair_flat(own, total, alpha, beta)
        if all(t.dtype in NARROW for t in (*own, *total)):
            return _pair_concat(own, total, alpha, beta)
    rows = [0.0, 0.0, 0.0]
    narrow = [i for i in range(len(own)) if own[i].dtype != torch.float64]
    if narrow:
        part = pair_stats([own[i] for i in narrow], [total[i] for i in narrow], alpha, beta).detach().sum(
            0, dtype=torch.float64).tolist()
        rows = [r + q for r, q in zip(rows, part)]
    for x, t in zip(own, total):
        if x.dtype == torch.float64:
            part = _pair_fp64(x.detach().flatten(), t.detach().flatten().double(), alpha, beta)
            rows = [r + q for r, q in zip(rows, part)]
    return rows, None


def dense(grad: torch.Tensor) -> torch.Tensor:
    """``grad``, or its dense form when it is sparse (duplicate indices summed)."""
    return grad.to_dense() if grad.is_sparse else grad


FLATTEN = 1 << 15
"""At most this many gradient elements in all: one flat fp64 pair (small parameters, where the per-call cost
of the kernel dominates)."""

CONCAT = 1 << 19
"""At most this many gradient elements in all: one concatenated ``pair_stats`` call. Measured on CPU at 1 thread
(``python bench/bench_pair_rows.py``, MLP gradients; microseconds flat fp64 / concatenated / a call per parameter):
10k elements 117 / 211 / 536, 30k 315 / 335 / 996, 85k 603 / 365 / 749, 334k 2855 / 929 / 1001, 1.3M
14201 / 3418 / 2307."""

NARROW = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes of the ``pair_stats`` kernel."""


def _pair_fp64(x: torch.Tensor, t: torch.Tensor, alpha: float, beta: float) -> List[float]:
    """The three sums of one flat fp64 pair: one Gram product of ``(x, other)``."""
    other = t.mul(alpha).add_(x, alpha=beta)
    rows = torch.stack([x, other])
    gram = (rows @ rows.T).tolist()
    return [gram[0][1], gram[0][0], gram[1][1]]


def _pair_concat(own: List[torch.Tensor], total: List[torch.Tensor], alpha: float,
                 beta: float) -> Tuple[List[float], float]:
    """The three sums and ``t.t`` of every gradient taken as one concatenated pair ``(x, t)``: one ``pair_stats``
    row, and ``t.t`` as one fp32 dot (the precision of ``torch.nn.utils.get_total_norm``)."""
    x = torch.cat([g.detach().reshape(-1) for g in own])
    t = torch.cat([g.detach().reshape(-1) for g in total])
    tf = t if t.dtype == torch.float32 else t.float()
    row = pair_stats([x], [t], alpha, beta)[0].double()
    out = torch.cat([row, torch.dot(tf, tf).double().reshape(1)]).tolist()
    return out[:3], out[3]


def _pair_flat(own: List[torch.Tensor], total: List[torch.Tensor], alpha: float,
               beta: float) -> Tuple[List[float], float]:
    """The three sums and ``t.t`` of every gradient taken as one flat pair ``(x, t)``: one Gram product of the rows
    ``(x, other, t)`` of a fresh fp64 ``[3, n]`` operand, ``x`` and ``t`` widened straight into theirs (the
    concatenation promotes mixed float dtypes to a common one, and both widenings are exact)."""
    n = sum(x.numel() for x in own)
    rows = torch.empty(3, n, dtype=torch.float64, device=own[0].device)
    rows[0::2].copy_(torch.cat([g.detach().reshape(-1) for g in (*own, *total)]).view(2, n))
    torch.mul(rows[2], alpha, out=rows[1]).add_(rows[0], alpha=beta)
    gram = (rows @ rows.T).tolist()
    return [gram[0][1], gram[0][0], gram[1][1]], gram[2][2]


__all__ = ["MicrostepStats", "dense"]
