"""The boundary's rules: the step's mean gradient, its norm, the skip rules, clipping, the LR scale.

:class:`StepRules` is the half of :class:`~simigrad_compile.runtime.core.StepCore` that runs at a window's
boundary (``begin_step``, ``clip_grad_norm_``, ``restore_lr``); the protocol and the skip reasons are in
:mod:`simigrad_compile.runtime.core`'s docstring.

Every gradient is reduced once per step: that reduction is the non-finite check and the history's
``grad_norm``. It is ``_foreach_norm``, except in a ``microsteps`` window whose statistics pass took
``sum |p.grad|^2`` itself (small models, :mod:`simigrad_compile.stats.microsteps`): that pass reads ``p.grad``,
so it is the same check. The ``batch`` statistics cannot stand in for it: they see only the contributions of
the compiled backward, and a parameter that is also used outside the compiled graph (or a gradient hook) can
make the gradient non-finite while the statistics are finite (``tests/test_step_rules.py``).

Non-finite steps. The skip reasons, in the history's ``skipped`` with ``stepped=False``:
``non-finite-loss``, ``non-finite-gradient``, ``non-finite-statistics``, ``amp-overflow``. A step that was
applied can still leave the controller unmoved: ``no-statistics``, ``interval``, ``non-finite-cosine`` (a zero
half: the cosine is undefined although the gradient is finite).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from typing import Any, List, NamedTuple, Optional

import torch

from .. import compat
from ..stats.gradient_stats import StatsRead
from .coverage import FULL, Coverage, coverage
from .lr import restore_lr, scale_lr
from .sharded_norms import is_sharded, sharded_norms

log = logging.getLogger("simigrad_compile")
_NARROW = (torch.float16, torch.bfloat16)
_IS_CPU = operator.attrgetter("is_cpu")
_NO_AMP = (1.0, 0.0, 0.0)
"""``(scale, drift, found_inf)`` without a GradScaler."""


class NonFiniteStep(FloatingPointError):
    """A step's loss, gradient or statistics are not finite and ``on_non_finite="raise"``.

    Catch it around ``run.optimizer.step()`` (``from simigrad_compile import NonFiniteStep``) and call
    ``run.discard_step()`` to go on from the last completed step."""


class PendingStep(NamedTuple):
    """What ``begin_step`` decided, kept for ``end_step``."""

    window: Any
    """The step's :class:`~simigrad_compile.runtime.window.Window`."""
    stats: Any
    """Its statistics (a :class:`~simigrad_compile.stats.split_stats.SplitStats`), unscaled."""
    note: Optional[str]
    """Why the step has no statistics, or None."""
    reason: Optional[str]
    """The skip reason (``non-finite-loss`` ...), or None for a step that is applied."""
    lr_scale: float
    grad_norm: float
    """The total norm of the step's mean gradient (NaN when not finite)."""
    loss_sum: float
    """The sample-weighted sum of the micro-steps' mean losses."""
    coverage: Coverage = FULL
    """What share of the step's gradient the statistics cover (:mod:`simigrad_compile.runtime.coverage`)."""


def _wide(grads: List[torch.Tensor]) -> List[torch.Tensor]:
    """fp16/bf16 gradients in fp32, for their norms; a sparse gradient as its coalesced values (the same norm)."""
    return [_values(g) if g.is_sparse else g.float() if g.dtype in _NARROW else g for g in grads]


def _values(grad: torch.Tensor) -> torch.Tensor:
    """A sparse gradient's coalesced values (one zero when it has none: its norm of every type is 0)."""
    values = grad.coalesce().values()
    if values.numel() == 0:
        values = values.new_zeros(1)
    return values.float() if values.dtype in _NARROW else values


def _norms(grads: List[torch.Tensor], norm_type: float) -> List[torch.Tensor]:
    """Each gradient's norm; of the whole gradient when it is sharded (:mod:`.sharded_norms`)."""
    wide = _wide(grads)
    return sharded_norms(wide, norm_type) if is_sharded(grads) else compat.foreach_norm(wide, norm_type)


def _to_host(scalars: List[torch.Tensor], sums: Optional[torch.Tensor]) -> List[float]:
    """The 0-d ``scalars``, then the 1-d ``sums``, as host floats (fp32 values are exact as floats). On an
    accelerator in one copy (torch promotes to the widest dtype); on the CPU, where nothing waits, directly."""
    if sums is None and all(map(_IS_CPU, scalars)):
        return [t.item() for t in scalars] if len(scalars) <= 16 else torch.stack(scalars).tolist()
    device = (scalars[0] if scalars else sums).device
    parts = [torch.stack([t.to(device) for t in scalars])] if scalars else []
    parts += [sums.to(device)] if sums is not None else []
    return torch.cat(parts).tolist() if len(parts) > 1 else parts[0].tolist()


def _total(norms: List[float], norm_type: float) -> float:
    """The ``norm_type``-norm of the gradients from their per-tensor norms (``get_total_norm`` takes the
    ``vector_norm`` of the norms), in fp64 on the host. Not finite exactly when a norm is not."""
    if not norms:
        return 0.0
    if norm_type == 2.0:
        return math.hypot(*norms)
    if any(math.isnan(v) for v in norms):
        return math.nan
    top = max(norms)
    if norm_type == math.inf or top == 0.0 or math.isinf(top):
        return top
    return top * math.fsum((v / top) ** norm_type for v in norms) ** (1.0 / norm_type)


class StepRules:
    """The boundary of :class:`~simigrad_compile.runtime.core.StepCore` (its state is the core's)."""

    # --- clipping ---------------------------------------------------------------------------------------------
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Optional[torch.Tensor]:
        """Clip the step's mean gradient (unscaled) to ``max_norm``, once, at the boundary.

        Call it between ``loss.backward()`` and ``run.optimizer.step()``, on any micro-batch of the step: the
        request holds for the step it is made in. On the micro-batch that ends the step it returns the total
        norm of the step's mean gradient (what ``torch.nn.utils.clip_grad_norm_`` would return in the plain
        loop); before it, None."""
        max_norm, norm_type = float(max_norm), float(norm_type)
        if not math.isfinite(max_norm) or max_norm < 0 or not (norm_type > 0):
            raise ValueError(f"simigrad: clip_grad_norm_ needs a finite max_norm >= 0 and norm_type > 0, got "
                             f"{max_norm}, {norm_type}")
        w = self._current_window()
        self._clip = (max_norm, norm_type)
        if w.done != w.accumulation - 1:
            return None
        factor = (w.divisor / w.samples) / self._amp_scale_now()
        return self._total_norm(w.grads(), norm_type) * factor

    @staticmethod
    def _total_norm(grads: List[torch.Tensor], norm_type: float) -> torch.Tensor:
        if not grads:
            return torch.zeros((), dtype=torch.float32)
        if is_sharded(grads):  # FSDP2: the shards' norms, combined over the ranks
            return torch.linalg.vector_norm(torch.stack(sharded_norms(_wide(grads), norm_type)), norm_type)
        return torch.nn.utils.get_total_norm(_wide(grads), norm_type)

    def _amp_scale_now(self) -> float:
        if self.amp is None or not self.amp.enabled:
            return 1.0
        return self.amp.current_scale()

    # --- the boundary -----------------------------------------------------------------------------------------
    def begin_step(self, *, checked: bool = False) -> bool:
        """Prepare the boundary's optimizer step; False when it must be skipped (core's module docstring).

        ``checked=True``: the caller called ``micro_step_done()`` (which returned True) right before, with nothing
        run in between (``run.optimizer.step()``). A window of >= 2 micro-steps was then checked by that call at
        this very point, so the boundary's :meth:`~simigrad_compile.runtime.window.Window.check` is not repeated
        (a one-micro-step window is still checked: its parameter set was taken when the window opened)."""
        w = self.state.window
        if w is None or w.done != w.accumulation or self._pending is not None:
            raise RuntimeError("simigrad: begin_step() needs a window whose last micro-step is done "
                               "(micro_step_done() returned True) and no step in progress")
        if not checked or w.accumulation < 2:
            w.check("the boundary")
        read, note = self.statistics.read(w, self.state.steps + 1)
        grads = w.grads()
        clip, amp, loss = self._clip, self.amp, self._loss
        norm_type = clip[1] if clip is not None else 2.0
        total_sq = w.stats.total_sq if w.stats is not None and clip is None and amp is None else None
        norms = _norms(grads, norm_type) if grads and total_sq is None else []
        sums = read.sums if type(read) is StatsRead else None  # the statistics' sums, still on the device
        checks = amp.checks() if amp is not None else ()
        scalars = norms if loss is None and not checks else [*norms, *([loss] if loss is not None else ()), *checks]
        values = _to_host(scalars, sums)  # the boundary's one host sync
        n = len(norms)
        raw = math.sqrt(total_sq) if total_sq is not None else _total(values[:n] if len(values) > n else values,
                                                                       norm_type)
        loss_sum = values[n] if loss is not None else 0.0
        scale, drift, found_inf = values[n + (loss is not None):n + (loss is not None) + 3] if checks else _NO_AMP
        stats = read.result(values[len(scalars):] if sums is not None else None) if type(read) is StatsRead else read
        if drift:
            raise RuntimeError("simigrad: the GradScaler's scale changed inside an accumulation window (a "
                               "scaler.update(new_scale) or another optimizer's update mid-window): the micro-"
                               "batches' gradients no longer share a scale. Drop the step with run.discard_step().")
        factor = w.divisor / w.samples / scale
        grad_norm = raw * factor
        if scale != 1.0 and stats.mode != "none":
            s2 = scale * scale
            stats = dataclasses.replace(stats, dot=stats.dot / s2, sq_norm_1=stats.sq_norm_1 / s2,
                                        sq_norm_2=stats.sq_norm_2 / s2)
        reason = None
        if not math.isfinite(loss_sum):
            reason = "non-finite-loss"
        elif amp is not None and amp.enabled and (found_inf or not math.isfinite(raw)):
            reason = "amp-overflow"
        elif not math.isfinite(raw):
            reason = "non-finite-gradient"
        elif stats.mode != "none" and not stats.finite:
            reason = "non-finite-statistics"
        lr_scale = self.controller.lr_scale(w.samples * self.world_size)
        cover = coverage(w.params, stats, self.model,
                         [v * v for v in values[:n]] if norm_type == 2.0 and total_sq is None else None)
        if cover.uncovered:
            note = self.coverage_warning.observe(self.state.steps + 1, cover)
        self._pending = PendingStep(w, stats, note, reason, lr_scale,
                                    grad_norm if math.isfinite(grad_norm) else math.nan, loss_sum, cover)
        if reason is not None:
            return self._skip(w, reason)
        if clip is not None:
            factor *= min(1.0, clip[0] / (grad_norm + 1e-6))
        if factor != 1.0 and grads:
            compat.foreach_mul_(grads, factor)
        self._saved_lr = scale_lr(self.user_optimizer, lr_scale) if lr_scale != 1.0 else None  # 1.0: lr untouched
        return True

    def _skip(self, w, reason: str) -> bool:
        self.skipped_steps[reason] += 1
        count = sum(self.skipped_steps.values())
        if self.config.on_non_finite == "raise" and reason != "amp-overflow":
            self._pending = None
            raise NonFiniteStep(f"simigrad: step {self.state.steps + 1}: {reason} (on_non_finite='raise'). Drop the "
                                "step with run.discard_step() to go on, or use on_non_finite='skip'.")
        level = logging.INFO if reason == "amp-overflow" else logging.WARNING
        log.log(level, "simigrad: step %d skipped (%s): parameters, optimizer state and LR schedule untouched; "
                "%d skipped step(s) so far", self.state.steps + 1, reason, count)
        for p in w.params:
            p.grad = None
        return False

    def restore_lr(self) -> None:
        """Put back the exact ``lr`` objects after ``begin_step`` (``end_step`` and ``discard_step`` do it)."""
        if self._saved_lr is not None:
            restore_lr(self.user_optimizer, self._saved_lr)
            self._saved_lr = None


__all__ = ["NonFiniteStep", "PendingStep", "StepRules"]
