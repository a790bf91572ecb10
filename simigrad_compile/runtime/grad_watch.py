"""Autograd's accumulations into each parameter's gradient, counted, so that a window can tell them from in-place
changes made by the loop.

Every in-place write to a tensor bumps its version counter (``compat.versions``). Autograd's accumulation into an
existing ``p.grad`` is one in-place add per backward pass that reaches ``p`` (the engine sums a parameter's
uses within one pass before it accumulates), so between two micro-steps a gradient's version must advance by
exactly the number of accumulations counted here (a post-accumulate-grad hook per parameter), and right after the
last accumulation it must be the version the hook saw (this covers a change between a window's first backward and
its first micro-step, before the window has a version of its own). Anything more is a
write by the loop: ``optimizer.zero_grad(set_to_none=False)``, ``p.grad.zero_()``, ``p.grad.mul_``,
``torch.nn.utils.clip_grad_norm_``. A door that keeps the running gradient aside and folds each fresh gradient in
with one ``held.add_(fresh)`` tells the watch (:meth:`GradWatch.folded`): that add is one write to the held
tensor, however many backward passes built the fresh one; a fresh gradient that becomes the held one (the window's
first micro-step) is handed over as the loop left it (:meth:`GradWatch.adopted`).

Used on one process only: data-parallel reducers write the reduced gradient into ``p.grad`` themselves.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Dict, Sequence

import torch

from ..compat import version

_COUNTING: set = set()
"""The handle ids of every live watch's counting hooks."""


def counting_hooks() -> set:
    """The handle ids of every live watch's counting hooks. They read ``p.grad`` and never change it, so they are
    no gradient hook of the loop's, also for a run that did not register them (two runs on one model, an earlier
    run not closed)."""
    return _COUNTING


class GradWatch:
    """Counts accumulations per parameter (``counts``: ``id(param) -> n`` since the last :meth:`take`)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.after: Dict[int, tuple] = {}
        """``id(param) -> (id(param.grad), its version)`` right after the last accumulation since :meth:`take`."""
        self._handles: Dict[int, tuple] = {}

    def watch(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Count the accumulations of ``params`` from now on (a parameter already watched is skipped)."""
        handles = self._handles
        for p in params:
            entry = handles.get(id(p))
            if entry is not None and entry[0]() is p:
                continue
            handle = p.register_post_accumulate_grad_hook(self._count)
            handles[id(p)] = (weakref.ref(p), handle)
            _COUNTING.add(handle.id)

    def _count(self, param: torch.Tensor) -> None:
        key, grad, counts = id(param), param.grad, self.counts
        counts[key] = counts.get(key, 0) + 1  # Counter's ``+= 1`` calls its Python __missing__ on a first count
        self.after[key] = (id(grad), version(grad))

    def take(self) -> Counter:
        """The counts since the last call, and start counting afresh."""
        counts, self.counts = self.counts, Counter()
        self.after = {}
        return counts

    def folded(self, params: Sequence[torch.nn.Parameter]) -> None:
        """A door added each of ``params``' fresh gradient into its held one with one in-place add: the held
        tensor's version moves by one, however many accumulations built the fresh tensor."""
        for p in params:
            if self.counts[id(p)] > 1:
                self.counts[id(p)] = 1
                self.after[id(p)] = (id(p.grad), version(p.grad))

    def adopted(self, params: Sequence[torch.nn.Parameter]) -> None:
        """A door made each of ``params``' fresh gradient, as the loop left it, the window's gradient (the first
        micro-step of a window under ``SIMIGRAD=1``): what the loop did to that tensor before handing it over (its
        own clipping of the micro-batch, ``GradScaler.unscale_``) is the loop's, and its version now is the one
        the window starts from."""
        for p in params:
            if self.counts[id(p)]:
                self.after[id(p)] = (id(p.grad), version(p.grad))

    def close(self) -> None:
        for _, handle in self._handles.values():
            handle.remove()
            _COUNTING.discard(handle.id)
        self._handles.clear()
        self.counts.clear()
        self.after = {}


__all__ = ["GradWatch", "counting_hooks"]
