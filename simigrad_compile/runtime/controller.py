"""The batch-size controllers: pure Python, one decision per optimizer step (``config.controller``).

Every controller keeps the same two exponential averages (decay ``noise_ema``, from zero) of the step's unbiased
estimates of the noise ``tr(Sigma)`` and the signal ``|G|^2`` (:mod:`simigrad_compile.stats.noise`), so the history
has the noise scale and the gain ratio whichever rule steers. The rules, applied every ``adjust_every`` steps:

``simigrad`` (Qin et al., 2021), on the (optionally EMA-smoothed, ``ema``) cosine ``c``:

* ``c < target``: ``B <- max(B + 1, floor(1.1 B))``  (noisy gradient: grow)
* ``c > target``: ``B <- min(B - 1, floor(0.9 B))``  (redundant batch: shrink)

``gns`` (McCandlish et al., 2018): the target is ``B_simple = EMA(noise) / EMA(signal)``, reached at the paper's
pace: ``B <- min(max(round(B_simple), min(B - 1, floor(0.9 B))), max(B + 1, floor(1.1 B)))``. An average signal
``<= 0`` with a positive noise reads as ``B_simple = inf`` (grow); with no estimate yet the batch stays.

``adascale`` (Johnson et al., 2020): the batch stays at ``batch_size``; the LR multiplier is the gain ratio of the
two groups, ``r = (s/(B/2) + m) / (s/B + m)`` with ``s``, ``m`` the averages clamped at 0 (``r`` in ``[1, 2]``; 1
before the first estimate), damped as ``(r - 1) * lr_adjust_factor + 1``. The LR schedule advances per optimizer
step: AdaScale's scale-invariant progress (``tau += r``) is left to the loop (the history has ``gain``).

Then ``B`` is clamped to ``[min_batch_size, max_batch_size]``. For ``simigrad`` and ``gns`` the LR multiplier is
``B/B0`` (``linear``), ``sqrt(B/B0)`` (``sqrt``) or 1 (``none``), damped the same way.

Steps that do not steer (the history's ``skipped``): a NaN or Inf cosine (``non-finite-cosine``: a zero half;
counted, enters no average); a **short step** (``short-step``): one that realised fewer samples than the full plan
of its target (an epoch's tail, a step cut by ``limit_next_step`` or ``end_window``). Its statistics are measured
on fewer samples (the cosine of a smaller batch is lower, so a tail would grow the batch), so it is recorded in the
history but enters no average and moves nothing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

from ..config import SimigradConfig
from ..stats import noise as nz
from ..stats.split_stats import SplitStats

log = logging.getLogger("simigrad_compile")
NAN = float("nan")


@dataclass
class Decision:
    batch_size: int
    """The target global batch size for the next step."""
    lr_scale: float
    skipped: Optional[str]
    """Why the rule was not applied this step (``"non-finite-cosine"``, ``"interval"``, ``"short-step"``), or
    None."""


@dataclass(frozen=True)
class StepStatistics:
    """One step's split statistics of the two groups' *mean* gradients, and the groups' sample counts (global)."""

    cosine: float
    dot: float = NAN
    sq_norm_1: float = NAN
    sq_norm_2: float = NAN
    n1: int = 0
    n2: int = 0
    full: bool = True
    """False for a short step (see the module docstring): recorded, does not steer."""

    @property
    def signal(self) -> float:
        """Unbiased ``|G|^2`` estimate (:func:`~simigrad_compile.stats.noise.signal_estimate`); NaN without one."""
        if self.n1 < 1 or self.n2 < 1:
            return NAN
        return nz.signal_estimate(self.dot, self.sq_norm_1, self.sq_norm_2, self.n1, self.n2)

    @property
    def noise(self) -> float:
        """Unbiased ``tr(Sigma)`` estimate (:func:`~simigrad_compile.stats.noise.noise_estimate`); NaN without."""
        if self.n1 < 1 or self.n2 < 1:
            return NAN
        return nz.noise_estimate(self.dot, self.sq_norm_1, self.sq_norm_2, self.n1, self.n2)


def step_statistics(stats: SplitStats, sizes: Sequence[int], half: int, world_size: int,
                    full: bool = True, form: Optional[int] = None) -> StepStatistics:
    """The :class:`StepStatistics` of a step whose window ran micro-batches of ``sizes`` (per rank).

    Group sizes and scale per mode: ``microsteps``: ``n1`` = the first ``half`` micro-steps' samples, statistics
    of the means; ``batch`` (one micro-batch of ``m``): ``n1 = floor(m/2)``, statistics of the contributions,
    turned into those of the means; ``ranks``: ``n1`` = the per-rank samples times ``floor(world/2)`` ranks
    (equal per-rank counts), statistics of the groups' buckets in the window's ``W/d`` form
    (:mod:`~simigrad_compile.runtime.window`; ``d = form``, by default the last micro-batch's size), scaled by
    ``(d/N)^2`` to those of the means. Any other mode (``none``, a mix) has the cosine only."""
    cosine = stats.cosine
    mode, samples = stats.mode, sum(sizes)
    d, a, b = stats.dot, stats.sq_norm_1, stats.sq_norm_2
    if mode == "microsteps" and 1 <= half < len(sizes):
        n1 = sum(sizes[:half])
        n2 = samples - n1
    elif mode == "batch" and len(sizes) == 1 and world_size == 1 and samples >= 2:
        n1, n2 = samples // 2, samples - samples // 2
        d, a, b = nz.means_from_contributions(d, a, b, n1, n2)
    elif mode == "ranks" and world_size >= 2:
        n1, n2 = samples * (world_size // 2), samples * (world_size - world_size // 2)
        f = ((form or sizes[-1]) / samples) ** 2  # the reduced buckets hold W/d (window form)
        d, a, b = d * f, a * f, b * f
    else:
        return StepStatistics(cosine, full=full)
    return StepStatistics(cosine, d, a, b, n1, n2, full)


class BatchSizeController:
    """The controller of ``config.controller`` (module docstring); ``update(cosine)`` feeds the cosine alone,
    ``observe(StepStatistics)`` the whole step."""

    def __init__(self, config: SimigradConfig, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.kind = config.controller
        self.initial_batch_size = batch_size
        self.batch_size = min(max(batch_size, config.min_batch_size), config.max_batch_size)
        self.smoothed: Optional[float] = None
        self.steps = 0
        self.non_finite = 0
        self.signal_avg = 0.0
        self.noise_avg = 0.0
        self.noise_steps = 0
        """Steps whose estimates entered the averages."""

    # --- the family's values ----------------------------------------------------------------------------------
    @property
    def noise_scale(self) -> float:
        """``B_simple`` of the averages; NaN before the first estimate, inf where the signal average is <= 0
        while the noise average is > 0."""
        if self.noise_steps == 0:
            return NAN
        if self.signal_avg <= 0.0:
            return math.inf if self.noise_avg > 0.0 else NAN
        return nz.noise_scale(self.noise_avg, self.signal_avg)

    def gain(self, batch_size: Optional[int] = None) -> float:
        """The gain ratio of a step of ``batch_size`` (default: the target) over its halves, from the averages
        clamped at 0; 1 before the first estimate."""
        batch = self.batch_size if batch_size is None else batch_size
        noise, signal = max(self.noise_avg, 0.0), max(self.signal_avg, 0.0)
        if self.noise_steps == 0 or (noise == 0.0 and signal == 0.0):
            return 1.0
        return nz.gain_ratio(noise, signal, batch / 2, batch)

    def lr_scale(self, batch_size: Optional[int] = None) -> float:
        if self.kind == "adascale":
            ratio = self.gain(batch_size)
        else:
            ratio = (self.batch_size if batch_size is None else batch_size) / self.initial_batch_size
            if self.config.lr_scaling == "sqrt":
                ratio = math.sqrt(ratio)
            elif self.config.lr_scaling == "none":
                ratio = 1.0
        return (ratio - 1.0) * self.config.lr_adjust_factor + 1.0

    # --- one step ---------------------------------------------------------------------------------------------
    def update(self, cosine: float) -> Decision:
        """Feed the cosine alone (no noise estimates) of the step that just ended; returns the next target."""
        return self.observe(StepStatistics(cosine))

    def observe(self, step: StepStatistics) -> Decision:
        """Feed the statistics of the step that just ended; returns the next step's target."""
        self.steps += 1
        cosine = step.cosine
        if not math.isfinite(cosine):
            self.non_finite += 1
            log.warning("simigrad: non-finite cosine %s at step %d (a zero gradient in one half?): batch size kept at "
                        "%d; %d such step(s) so far", cosine, self.steps, self.batch_size, self.non_finite)
            return Decision(self.batch_size, self.lr_scale(), "non-finite-cosine")
        if not step.full:
            return Decision(self.batch_size, self.lr_scale(), "short-step")
        signal, noise = step.signal, step.noise
        if math.isfinite(signal) and math.isfinite(noise):
            decay = self.config.noise_ema
            self.signal_avg = nz.ema(self.signal_avg, signal, decay)
            self.noise_avg = nz.ema(self.noise_avg, noise, decay)
            self.noise_steps += 1
        ema = self.config.ema
        self.smoothed = cosine if self.smoothed is None or ema == 0 else ema * self.smoothed + (1 - ema) * cosine
        if self.steps % self.config.adjust_every:
            return Decision(self.batch_size, self.lr_scale(), "interval")
        if self.kind == "adascale":
            return Decision(self.batch_size, self.lr_scale(), None)
        b = self.batch_size
        if self.kind == "simigrad":
            target = self.config.target_similarity
            if self.smoothed < target:
                b = max(b + 1, math.floor(1.1 * b))
            elif self.smoothed > target:
                b = min(b - 1, math.floor(0.9 * b))
        else:
            wanted = self.noise_scale
            if math.isnan(wanted):
                return Decision(self.batch_size, self.lr_scale(), "no-noise-estimate")
            up, down = max(b + 1, math.floor(1.1 * b)), min(b - 1, math.floor(0.9 * b))
            b = up if wanted >= up else down if wanted <= down else math.floor(wanted + 0.5)
        self.batch_size = min(max(b, self.config.min_batch_size), self.config.max_batch_size)
        return Decision(self.batch_size, self.lr_scale(), None)

    # --- checkpoint -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "initial_batch_size": self.initial_batch_size,
            "batch_size": self.batch_size,
            "smoothed": self.smoothed,
            "steps": self.steps,
            "non_finite": self.non_finite,
            "signal_avg": self.signal_avg,
            "noise_avg": self.noise_avg,
            "noise_steps": self.noise_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Validates every value before changing anything. A checkpoint without the noise averages (older
        versions) starts them afresh."""
        missing = [k for k in ("initial_batch_size", "batch_size", "smoothed", "steps", "non_finite") if k not in state]
        if missing:
            raise KeyError(f"simigrad: controller state lacks {', '.join(missing)}")
        initial, batch = int(state["initial_batch_size"]), int(state["batch_size"])
        steps, non_finite = int(state["steps"]), int(state["non_finite"])
        smoothed = None if state["smoothed"] is None else float(state["smoothed"])
        signal_avg, noise_avg = float(state.get("signal_avg", 0.0)), float(state.get("noise_avg", 0.0))
        noise_steps = int(state.get("noise_steps", 0))
        if initial < 1 or batch < 1 or steps < 0 or non_finite < 0 or noise_steps < 0:
            raise ValueError(f"simigrad: controller state {state} has a batch size < 1 or a negative count")
        if smoothed is not None and not math.isfinite(smoothed):
            raise ValueError(f"simigrad: controller state has a non-finite smoothed cosine {smoothed}")
        if not (math.isfinite(signal_avg) and math.isfinite(noise_avg)):
            raise ValueError(f"simigrad: controller state has non-finite noise averages {signal_avg}, {noise_avg}")
        kind = state.get("kind", "simigrad")
        if kind != self.kind:
            log.warning("simigrad: the checkpoint's controller is %r, the config's %r: resuming with %r from the "
                        "checkpoint's batch size and averages", kind, self.kind, self.kind)
        self.initial_batch_size, self.batch_size, self.smoothed = initial, batch, smoothed
        self.steps, self.non_finite = steps, non_finite
        self.signal_avg, self.noise_avg, self.noise_steps = signal_avg, noise_avg, noise_steps


__all__ = ["BatchSizeController", "Decision", "StepStatistics", "step_statistics"]
