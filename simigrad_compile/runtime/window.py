"""The ``microsteps`` group mode and the gradient arithmetic of one accumulation window.

A window runs micro-steps of ``n_1 .. n_k`` samples (per rank). The user's loss is a mean over its micro-batch,
so each backward adds that micro-batch's mean gradient ``G_i / n_i`` (``G_i``: the sum of its per-sample
gradients) to ``p.grad``. The window keeps ``p.grad = W_i / n_i`` with ``W_i = G_1 + .. + G_i``: when the next
micro-batch has another size it rescales ``p.grad`` by ``n_i / n_(i+1)`` (only at an epoch's tail; equal sizes
cost nothing). At the boundary :meth:`Window.finish` scales ``p.grad`` by ``n_k / N`` to the mean gradient of
all ``N`` samples, which is what the optimizer steps on.

Halves. The first half is the first ``h`` micro-steps, ``h`` the split whose sample counts are nearest equal
(ties to the smaller ``h``; ``h = floor(k/2)`` for equal sizes). With ``N1``, ``N2`` samples per half:

    g1 = W_h / N1,   g2 = (W_k - W_h) / N2         (the mean gradients over each half's samples)

so odd ``k`` weights each half by its own sample count. ``d = g1.g2``, ``a = |g1|^2``, ``b = |g2|^2`` come from
one ``pair_stats`` pass at the boundary over ``(p.grad at the midpoint, p.grad)``.

Extra memory: one copy of every gradient (in the gradient's dtype), taken at the midpoint and held until the
boundary; the buffers are reused across windows.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..stats.microsteps import MicrostepStats


def midpoint(sizes: Sequence[int]) -> int:
    """The number of micro-steps in the first half: the split with the most nearly equal sample counts."""
    n, cum, best = sum(sizes), 0, None
    for h in range(1, len(sizes)):
        cum += sizes[h - 1]
        if best is None or abs(2 * cum - n) < best[0]:
            best = (abs(2 * cum - n), h)
    return best[1]


class Window:
    """One optimizer step's micro-steps: tracks progress and keeps ``p.grad`` in the ``W_i / n_i`` form."""

    def __init__(self, sizes: Sequence[int], params: Sequence[torch.nn.Parameter],
                 stats: Optional[MicrostepStats] = None):
        if not sizes:
            raise ValueError("an accumulation window needs at least one micro-step")
        self.sizes = tuple(int(s) for s in sizes)
        self.params = [p for p in params if p.requires_grad]
        self.done = 0
        self.stats = stats if len(self.sizes) >= 2 else None
        self.half = midpoint(self.sizes) if len(self.sizes) >= 2 else 0

    @property
    def accumulation(self) -> int:
        return len(self.sizes)

    @property
    def samples(self) -> int:
        return sum(self.sizes)

    @property
    def complete(self) -> bool:
        return self.done == len(self.sizes)

    def _scale(self, factor: float) -> None:
        if factor == 1.0:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)

    def micro_step_done(self) -> None:
        """Call after each micro-step's backward."""
        if self.complete:
            raise RuntimeError(f"accumulation window of {self.accumulation} micro-steps is already complete")
        self.done += 1
        if self.stats is not None and self.done == self.half:
            self.stats.snapshot()
        if not self.complete and self.sizes[self.done] != self.sizes[self.done - 1]:
            self._scale(self.sizes[self.done - 1] / self.sizes[self.done])

    def split_stats(self) -> SplitStats:
        n1 = sum(self.sizes[: self.half])
        return self.stats.stats(self.sizes[self.half - 1], self.sizes[-1], n1, self.samples - n1)

    def finish(self) -> None:
        """Turn ``p.grad`` into the mean gradient over the window's samples."""
        self._scale(self.sizes[-1] / self.samples)


__all__ = ["Window", "midpoint"]
