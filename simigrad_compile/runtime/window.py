"""One accumulation window: its micro-steps, the live parameter set, and the gradient arithmetic.

A window runs micro-steps of ``n_1 .. n_k`` samples (per rank). The user's loss is a mean over its micro-batch,
so each backward adds that micro-batch's mean gradient ``G_i / n_i`` (``G_i``: the sum of its per-sample
gradients) to ``p.grad``. The window keeps ``p.grad = W_i / d`` with ``W_i = G_1 + .. + G_i`` and ``d`` the size
of the micro-batch whose backward comes next: when that size differs from the last one, ``p.grad`` is rescaled
by ``n_i / n_(i+1)`` before the next backward (only at an epoch's tail or when a door announces another size;
equal sizes cost nothing). At the boundary :attr:`Window.mean_factor` ``= d / N`` turns ``p.grad`` into the mean
gradient of all ``N`` samples, which is what the optimizer steps on.

Halves. The first half is the first ``h`` micro-steps, ``h`` the split whose planned sample counts are nearest
equal (ties to the smaller ``h``; ``h = floor(k/2)`` for equal sizes). With ``N1``, ``N2`` samples per half:

    g1 = W_h / N1,   g2 = (W_k - W_h) / N2         (the mean gradients over each half's samples)

so odd ``k`` weights each half by its own sample count. ``d = g1.g2``, ``a = |g1|^2``, ``b = |g2|^2`` come from
one pass at the boundary over ``(p.grad at the midpoint, p.grad)`` (:mod:`simigrad_compile.stats.microsteps`).

Parameters. The window's parameters are the optimizer's, read from its ``param_groups`` when the window opens
(those with ``requires_grad``): freezing, unfreezing and ``add_param_group`` between steps are seen by the next
window. Inside a window the set must not change, and each gradient tensor must stay the one the backward
accumulates into: :meth:`Window.check` names the parameter otherwise (``model.zero_grad()``, ``p.grad = None``,
``p.grad = tensor``, or ``requires_grad_`` inside a window all silently lose earlier micro-batches in an
accumulating loop).

Held gradients (FSDP2 under ``set_requires_gradient_sync(False)``): the micro-batches' sum lives in FSDP's own
unsharded buffers until the window's last backward reduce-scatters it into ``p.grad``, out of the window's reach.
A window made with ``held=True`` then never rescales: ``d`` stays the first micro-batch's size, and a micro-batch
of another size ``n`` is brought to the ``W / d`` form by its own backward, scaled by :attr:`Window.backward_scale`
``= n / d`` (the door multiplies its loss's gradient by it; 1 in every other window). :attr:`Window.form` is the
``d`` of the last backward, the form the data-parallel statistics were taken in.

Extra memory for the statistics: one copy of every gradient (in the gradient's dtype), taken at the midpoint and
held until the boundary; the buffers are reused across windows.
"""

from __future__ import annotations

import operator
from typing import Callable, List, Optional, Sequence

import torch

from .. import compat
from ..stats.split_stats import SplitStats
from ..stats.microsteps import MicrostepStats
from .grad_watch import GradWatch


class WindowMisuse(RuntimeError):
    """The loop changed the gradients or the parameter set inside an accumulation window."""


def midpoint(sizes: Sequence[int]) -> int:
    """The number of micro-steps in the first half: the split with the most nearly equal sample counts."""
    n, cum, best = sum(sizes), 0, None
    for h in range(1, len(sizes)):
        cum += sizes[h - 1]
        if best is None or abs(2 * cum - n) < best[0]:
            best = (abs(2 * cum - n), h)
    return best[1]


def optimizer_params(optimizer: torch.optim.Optimizer) -> List[torch.nn.Parameter]:
    """The parameters ``optimizer`` steps that require a gradient, in order, without duplicates."""
    out = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if len(set(map(id, out))) == len(out):
        return out
    seen, unique = set(), []
    for p in out:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


class Window:
    """One optimizer step's micro-steps: tracks progress and keeps ``p.grad`` in the ``W_i / d`` form."""

    __slots__ = ("sizes", "accumulation", "samples", "params", "done", "divisor", "stats", "half", "allow_views",
                 "_grads", "name_of", "live", "watch", "_versions", "_ids", "held", "form")

    def __init__(self, sizes: Sequence[int], params: Sequence[torch.nn.Parameter],
                 stats: Optional[MicrostepStats] = None, allow_views: bool = False,
                 name_of: Callable[[torch.nn.Parameter], str] = lambda p: f"of shape {tuple(p.shape)}",
                 live: Optional[Callable[[], List[torch.nn.Parameter]]] = None, watch: Optional[GradWatch] = None,
                 held: bool = False):
        self.sizes = list(map(int, sizes))
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"an accumulation window needs micro-steps of >= 1 sample, got {tuple(sizes)}")
        self.accumulation, self.samples = len(self.sizes), sum(self.sizes)
        self.params = [p for p in params if p.requires_grad]
        self.done = 0
        self.divisor = self.sizes[0]
        self.stats = stats if self.accumulation >= 2 else None
        self.half = midpoint(self.sizes) if self.accumulation >= 2 else 0
        self.allow_views = allow_views  # DDP(gradient_as_bucket_view=True) swaps p.grad for a bucket view once
        self._grads: List[Optional[torch.Tensor]] = []
        self.name_of = name_of
        self.live = live
        self.watch = watch
        """Counts autograd's accumulations (one process): with it, an in-place change of a gradient is an error."""
        self._versions: Optional[list] = None
        self._ids = [id(p) for p in self.params]
        self.held = held
        """The gradients accumulate outside ``p.grad`` until the last backward (module docstring)."""
        self.form = self.divisor
        """The ``d`` of the last backward's ``W / d`` (the reduced gradient's form)."""
        if watch is not None:
            watch.watch(self.params)

    def _resized(self) -> None:
        """``accumulation`` (the number of micro-steps) and ``samples`` (per rank) after ``sizes`` changed."""
        self.accumulation, self.samples = len(self.sizes), sum(self.sizes)

    @property
    def complete(self) -> bool:
        return self.done == self.accumulation

    @property
    def mean_factor(self) -> float:
        """What turns ``p.grad`` into the mean gradient of the window's samples at the boundary."""
        return self.divisor / self.samples

    def grads(self) -> List[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def _scale(self, factor: float) -> None:
        if factor != 1.0:
            grads = self.grads()
            if grads:
                before = compat.versions(self._grads) if self._versions is not None else None
                compat.foreach_mul_(grads, factor)
                if before is not None:  # the window's own write: the versions it expects move with it
                    self._versions = [e if e is None else e + a - b
                                      for e, b, a in zip(self._versions, before, compat.versions(self._grads))]

    @property
    def backward_scale(self) -> float:
        """What the next backward's gradient must be multiplied by: ``n / d`` in a held window (``n`` its
        micro-batch's size), else 1."""
        if self.complete or not self.held:
            return 1.0
        return self.sizes[self.done] / self.divisor

    def _prepare(self, size: int) -> None:
        """Make ``p.grad = W / size`` for a backward over ``size`` samples (a held window keeps ``d``)."""
        if self.held:
            return
        self._scale(self.divisor / size)
        self.divisor = size

    def resize_next(self, size: int) -> None:
        """The next micro-batch has ``size`` samples (announced before its backward)."""
        if self.complete:
            raise RuntimeError("simigrad: the accumulation window is complete; no micro-batch is pending")
        self.sizes[self.done] = int(size)
        self._resized()
        if self.done == 0:
            self.divisor = int(size)
        else:
            self._prepare(int(size))

    def truncate(self) -> None:
        """End the window after the micro-steps done so far (the data ran out)."""
        if self.done == 0:
            raise RuntimeError("simigrad: cannot end a window before its first micro-step")
        self.sizes = self.sizes[: self.done]
        self._resized()
        if self.stats is not None and self.half >= self.done:
            self.stats = None

    def check(self, where: str) -> None:
        """Raise :class:`WindowMisuse` when the parameter set or a gradient tensor changed since the last
        micro-step of this window."""
        if self.done == 0:
            return
        versions = self._versions
        if versions is not None:
            self._check_versions(where, versions)
        for p, g in zip(self.params, self._grads):
            if p.grad is g and p.requires_grad:
                continue
            if not p.requires_grad:
                raise WindowMisuse(
                    f"simigrad: parameter {self.name_of(p)} stopped requiring grad inside an accumulation "
                    f"window (at {where}): the window's earlier micro-batches would be lost for it. Freeze or "
                    "unfreeze parameters between optimizer steps (when run.sync_gradients is True), or drop this "
                    "step with run.discard_step().")
            if g is None:
                continue
            if p.grad is not None and (p.grad.requires_grad or (self.allow_views and p.grad._base is not None)):
                continue  # backward(create_graph=True) and DDP's bucket views replace the tensor, keeping the sum
            raise WindowMisuse(
                f"simigrad: the gradient of parameter {self.name_of(p)} was zeroed or replaced inside an accumulation "
                f"window (model.zero_grad(), p.grad = None or p.grad = <tensor>; found at {where}, after "
                f"{self.done} of {self.accumulation} micro-steps): the earlier "
                "micro-batches of this step would be lost. Zero gradients only through run.optimizer.zero_grad() "
                "(a no-op inside a window), or drop this step with run.discard_step().")
        if self.live is not None:
            live = self.live()
            if len(live) == len(self.params) and all(map(operator.is_, live, self.params)):
                return
            own = {id(p) for p in self.params}
            added = [p for p in live if id(p) not in own]
            if added:
                raise WindowMisuse(
                    f"simigrad: parameter {self.name_of(added[0])} joined the step inside an accumulation window "
                    f"(requires_grad_(True) or add_param_group; found at {where}): its gradient would miss the "
                    "window's earlier micro-batches and the averaging. Change the parameter set between optimizer "
                    "steps (when run.sync_gradients is True), or drop this step with run.discard_step().")

    def _check_versions(self, where: str, versions: Optional[list]) -> None:
        """Each gradient tensor changed only by autograd's accumulations since the window's last micro-step
        (:mod:`~simigrad_compile.runtime.grad_watch`); ``versions`` None: the window's first micro-step, where
        only the versions right after the last accumulations are known."""
        watch = self.watch
        counts, after = watch.counts, watch.after
        grads = self._grads if versions is not None else [p.grad for p in self.params]
        now = compat.versions(grads)
        if versions is not None and None not in versions:  # the common case, in a few list operations
            if now == list(map(operator.add, versions, map(counts.__getitem__, self._ids))):
                return
        for i, p in enumerate(self.params):
            g = grads[i]
            if g is None or p.grad is not g:
                continue  # a replaced tensor is check()'s error
            key = id(p)
            if versions is not None and versions[i] is not None:
                if now[i] == versions[i] + counts[key]:
                    continue
            else:
                seen = after.get(key)
                if seen is None or seen[0] != id(g) or seen[1] == now[i]:
                    continue
            raise WindowMisuse(
                f"simigrad: the gradient of parameter {self.name_of(p)} was changed in place inside an accumulation "
                f"window (optimizer.zero_grad(set_to_none=False), p.grad.zero_(), p.grad.mul_(...), "
                f"torch.nn.utils.clip_grad_norm_ or another write to p.grad; found at {where}, after {self.done} of "
                f"{self.accumulation} micro-steps): the step would apply a partial or altered sum of its "
                "micro-batches. Zero gradients only through run.optimizer.zero_grad() (a no-op inside a window), "
                "clip with run.clip_grad_norm_(max_norm) (it clips the step's mean gradient at the boundary), scale "
                "the loss rather than the gradient, or drop this step with run.discard_step().")

    def micro_step_done(self, samples: Optional[int] = None) -> None:
        """Call after each micro-step's backward; ``samples`` is checked against the size it was planned with."""
        if self.complete:
            raise RuntimeError(f"simigrad: the accumulation window of {self.accumulation} micro-steps is already "
                               "complete")
        j = self.done
        if samples is not None and int(samples) != self.sizes[j]:
            if j:
                raise RuntimeError(
                    f"simigrad: micro-batch {j + 1} of this step had {samples} samples, but the gradient was "
                    f"prepared for {self.sizes[j]}: the step's mean gradient would be mis-weighted. A door that "
                    "knows the size announces it before the backward (core.next_micro_batch(samples)).")
            self.resize_next(int(samples))
        if j:
            self.check(f"micro-step {j + 1}")
        elif self.watch is not None and self.accumulation > 1:  # one micro-step: its gradient is the step's
            self._check_versions("micro-step 1", None)
        self.form = self.divisor
        self.done = j = j + 1
        if self.stats is not None and j == self.half:
            self.stats.snapshot(self.params)
        if j < self.accumulation and self.sizes[j] != self.divisor:
            self._prepare(self.sizes[j])
        self._grads = [p.grad for p in self.params]
        if self.watch is not None:
            self._versions = compat.versions(self._grads)
            self.watch.take()

    def split_stats(self) -> SplitStats:
        n1 = sum(self.sizes[: self.half])
        return self.stats.stats(self.params, self.sizes[self.half - 1], self.divisor, n1, self.samples - n1)

    def finish(self) -> None:
        """Turn ``p.grad`` into the mean gradient over the window's samples."""
        self._scale(self.mean_factor)


__all__ = ["Window", "WindowMisuse", "midpoint", "optimizer_params"]
