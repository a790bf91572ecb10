"""The micro-batch ladder and the factorisation ``global = world x micro x accumulation``.

Rungs
    ``micro_batch_sizes`` when given; else the powers of two from 1 up to ``max_micro_batch_size`` (plus
    ``max_micro_batch_size`` itself when it is not a power of two). With ``symbolic_batch`` on one process they
    start at 2: every rung of 2 or more shares one graph, a rung of 1 would be a graph of its own, and no plan
    needs it there (a step has two samples or more); on several processes it stays, for global batches below
    twice the world. Small rungs are what make batches such as
    ``min_batch_size=1000 > max_micro_batch_size=256`` exact (8 x 125); they cost nothing until a plan uses one,
    since rungs compile lazily. Each rung is one compiled graph (one shape of the batch dimension).
    :meth:`Ladder.reachable_rungs` are the rungs some plan within the bounds uses (``min_batch_size=16`` on one
    process leaves 8, 16, 32, 64 of the rungs up to 64).

Rounding rule (:meth:`Ladder.plan`)
    A plan ``(micro, accumulation)`` realises ``R = world * micro * accumulation``. Candidates are the plans
    with ``R`` within ``[min_batch_size, max_batch_size]`` that give two groups (on one process a global batch
    of one sample has no second half) and at least ``min_accumulation`` micro-steps. Let
    ``reach = ceil(target / (world * top rung))`` (the fewest micro-steps that reach the target), ``k0`` the
    same without passing ``max_batch_size`` (``reach``, or ``floor(max_batch_size / (world * top rung))`` when
    that is smaller and >= 1), and ``cap = max(min_accumulation, ACCUMULATION_SLACK * reach)``.

    1. Fewest micro-steps within the resolution: counting up from ``max(k0, min_accumulation)`` to ``cap``, the
       first accumulation for which some rung realises the target within ``RESOLUTION`` (10 %, about one
       controller step); on it the nearest ``R``, ties to the larger micro. Starting at ``k0`` keeps large
       targets from being rounded down by up to 10 % (5000 on a top rung of 256 is 256 x 20 = 5120, not
       256 x 18), and a target at the upper bound that is no multiple of the top rung takes the top rung
       (8000 is 256 x 31, not 128 x 57).
    2. Otherwise the nearest ``R`` over the candidates with at most ``cap`` micro-steps; ties to fewer
       micro-steps, then the larger micro. The cap is what keeps small targets off many tiny micro-batches:
       no rung realises 9 within 10 % in four micro-steps, so 9 is 8 x 1, not 1 x 9.
    3. When no candidate has at most ``cap`` micro-steps (bounds that only small rungs realise, such as
       ``min_batch_size = max_batch_size = 1000`` on powers of two up to 256: 8 x 125), the nearest over all
       accumulations, with the same ties.
    4. When no plan lies within the bounds at all (for example an odd ``min == max`` on two ranks), the bounds
       are dropped for that target and a warning names the target and the plan.

    Every tier is computed per rung in closed form (no enumeration of accumulations), so any batch size is cheap.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from ..config import SimigradConfig

log = logging.getLogger("simigrad_compile")

RESOLUTION = 0.10
"""Relative error below which fewer micro-steps win over a nearer batch."""
ACCUMULATION_SLACK = 4
"""A plan takes at most this many times the fewest micro-steps that reach the target, unless only more can
realise a batch inside the bounds (tier 3 of the rounding rule)."""


@dataclass(frozen=True)
class BatchPlan:
    """One optimizer step's batch: ``world_size x micro_batch_size x accumulation`` samples.

    Example::

        >>> BatchPlan(16, 3, world_size=2).batch_size
        96
    """

    micro_batch_size: int
    """Samples per micro-step on each rank (a rung)."""
    accumulation: int
    world_size: int = 1

    @property
    def batch_size(self) -> int:
        return self.world_size * self.micro_batch_size * self.accumulation


def default_rungs(config: SimigradConfig, world_size: int = 1) -> Tuple[int, ...]:
    if config.micro_batch_sizes is not None:
        return tuple(config.micro_batch_sizes)
    top = config.max_micro_batch_size
    rungs = []
    r = 2 if config.symbolic_batch and world_size == 1 and top >= 2 else 1
    while r <= top:
        rungs.append(r)
        r *= 2
    if rungs[-1] != top:
        rungs.append(top)
    return tuple(rungs)


class Ladder:
    def __init__(self, config: SimigradConfig, world_size: int = 1, min_accumulation: int = 1,
                 rungs: Optional[Sequence[int]] = None):
        if world_size < 1 or min_accumulation < 1:
            raise ValueError(f"world_size and min_accumulation must be >= 1, got {world_size}, {min_accumulation}")
        self.rungs = tuple(sorted(set(rungs or default_rungs(config, world_size))))
        self.world_size = world_size
        self.min_accumulation = min_accumulation
        self.lower = config.min_batch_size
        self.any_size = config.symbolic_batch and not config.cuda_graphs
        """Every micro-batch of 2 samples or more runs on one graph (:meth:`tail_sizes`)."""
        self.upper = config.max_batch_size
        self.plan = functools.lru_cache(maxsize=4096)(self._plan)

    def __repr__(self) -> str:
        return f"Ladder(rungs={self.rungs}, world={self.world_size}, min_accumulation={self.min_accumulation})"

    def require_accumulation(self, n: int) -> None:
        """Plans from now on have at least ``n`` micro-steps."""
        if n < 1:
            raise ValueError(f"min_accumulation must be >= 1, got {n}")
        self.min_accumulation = n
        self.plan.cache_clear()

    def _k_range(self, m: int, lo: int, hi: Optional[int], bounded: bool) -> Tuple[int, Optional[int]]:
        """Accumulations ``k`` in ``[lo, hi]`` for which rung ``m`` gives two groups (and lies in the bounds)."""
        wm = self.world_size * m
        lo = max(lo, -(-2 // wm))
        if bounded:
            lo = max(lo, -(-self.lower // wm))
            hi = self.upper // wm if hi is None else min(hi, self.upper // wm)
        return lo, hi

    def _nearest(self, target: int, lo: int, hi: Optional[int], bounded: bool):
        """The key ``(|R - target|, k, -m)`` of the nearest plan with ``lo <= k <= hi``, or None."""
        best = None
        for m in self.rungs:
            k_lo, k_hi = self._k_range(m, lo, hi, bounded)
            if k_hi is not None and k_lo > k_hi:
                continue
            wm = self.world_size * m
            for k in {target // wm, target // wm + 1}:
                k = max(k, k_lo) if k_hi is None else min(max(k, k_lo), k_hi)
                key = (abs(wm * k - target), k, -m)
                best = key if best is None or key < best else best
        return best

    def _within(self, target: int, k0: int, cap: int):
        """Tier 1: the fewest micro-steps in ``[k0, cap]`` realising ``target`` within the resolution."""
        tol = RESOLUTION * target
        ranges = {}
        for m in self.rungs:
            wm = self.world_size * m
            k_lo, k_hi = self._k_range(m, k0, cap, True)
            k_lo = max(k_lo, math.ceil((target - tol) / wm))
            k_hi = min(k_hi, math.floor((target + tol) / wm))
            if k_lo <= k_hi:
                ranges[m] = (k_lo, k_hi)
        if not ranges:
            return None
        k = min(lo for lo, _ in ranges.values())
        return min((abs(self.world_size * m * k - target), k, -m) for m, (lo, hi) in ranges.items() if lo <= k <= hi)

    def _plan(self, target: int) -> BatchPlan:
        """The plan realising ``target`` (a global batch size) by the rounding rule of the module docstring."""
        target = min(max(int(target), self.lower), self.upper)
        w, top, lo = self.world_size, self.rungs[-1], self.min_accumulation
        reach = -(-target // (w * top))
        k0 = min(reach, self.upper // (w * top)) if self.upper // (w * top) >= 1 else reach
        cap = max(lo, ACCUMULATION_SLACK * reach)
        best = self._within(target, max(lo, k0), cap) or self._nearest(target, lo, cap, True) \
            or self._nearest(target, lo, None, True)
        if best is None:
            best = self._nearest(target, lo, cap, False)
            plan = BatchPlan(-best[2], best[1], w)
            log.warning("simigrad: no plan of %r realises a batch in [%d, %d] near target %d; using %s (batch %d) "
                        "outside the bounds", self, self.lower, self.upper, target, plan, plan.batch_size)
            return plan
        return BatchPlan(-best[2], best[1], w)

    def sizes(self) -> Tuple[int, ...]:
        """The micro-batch sizes a step can run: the rungs, and with :attr:`any_size` every size from 2 to the top
        rung (one graph serves them)."""
        return tuple(sorted(set(self.rungs) | set(range(2, self.rungs[-1] + 1)))) if self.any_size else self.rungs

    def cut(self, samples: int, current: BatchPlan) -> Optional[BatchPlan]:
        """The plan for a step of at most ``samples`` (global) samples, the last of a sample budget (for
        ``limit_next_step``); None when no size fits. Over the :meth:`sizes` ``m`` with ``world * m <= samples``,
        each at the most micro-steps ``k`` that fit (with :attr:`any_size` also one fewer), up to ``cap =
        max(ACCUMULATION_SLACK * ceil(samples / (world * top rung)), min_accumulation, current.accumulation)``,
        the first by: with :attr:`any_size`, no remainder that no step can take (under ``world x`` the smallest
        size); the fewest samples short of ``samples`` (exact first); at least ``min_accumulation`` micro-steps;
        the current rung (no new graph); the fewest micro-steps. Repeated cuts then end exactly on a budget that is a multiple of the world size, with a rung
        of 1 (the default ladder; not ``symbolic_batch``'s on one process) or with :attr:`any_size` and a top
        rung of 3 or more (a remainder the cap leaves is cut again on the next step). The bounds
        ``[min_batch_size, max_batch_size]`` do not apply to this step."""
        w, lo, sizes = self.world_size, self.min_accumulation, self.sizes()
        cap = max(ACCUMULATION_SLACK * -(-samples // (w * self.rungs[-1])), lo, current.accumulation)
        best = None
        for m in sizes:
            most = min(samples // (w * m), cap)
            for k in range(most, max(most - (2 if self.any_size else 1), 0), -1):
                short = samples - w * m * k
                stranded = self.any_size and 0 < short < w * sizes[0]
                key = (stranded, short, k < lo, m != current.micro_batch_size, k, -m)
                best = key if best is None or key < best else best
        return None if best is None else BatchPlan(-best[5], best[4], w)

    def reachable_rungs(self) -> Tuple[int, ...]:
        """The rungs some plan uses for a target in ``[min_batch_size, max_batch_size]``, with 1 or 2 (or the
        current) minimum micro-steps: the rungs a run can reach (``warm_up`` compiles only these). From
        ``10 x world x top rung`` on, every target takes the top rung (tier 1: it realises the target within
        ``RESOLUTION`` at the fewest micro-steps, and no smaller rung does there), so only the targets below
        that are tried."""
        saved = self.min_accumulation
        top = self.world_size * self.rungs[-1]
        targets = list(range(self.lower, min(self.upper, int(top / RESOLUTION)) + 1)) + [self.upper]
        used = set()
        try:
            for k in sorted({1, 2, saved}):
                self.min_accumulation = k
                used.update(self._plan(t).micro_batch_size for t in targets)
        finally:
            self.min_accumulation = saved
        return tuple(m for m in self.rungs if m in used)

    def tail(self, remaining: int, micro: int) -> int:
        """How many micro-batches of ``micro`` (the current rung) the last step of an epoch runs for its last
        ``remaining`` samples (per rank): enough to cover them, and at least ``min_accumulation`` and two
        samples in all, as any plan. No other rung: a tail compiles nothing."""
        return max(-(-remaining // micro), self.min_accumulation, -(-2 // (self.world_size * micro)))

    def tail_sizes(self, remaining: int, micro: int) -> Tuple[int, ...]:
        """The micro-batch sizes of the last step of an epoch for its last ``remaining`` samples (per rank), as
        many as :meth:`tail` gives. One graph serves every size of 2 or more (``symbolic_batch``, without CUDA
        graphs, which record one graph per size): then exactly the ``remaining`` samples, in near-equal parts of
        at least 2, the larger first (one rescale at most). Otherwise, or with fewer than 2 samples a part,
        micro-batches of ``micro``, whose last a loader completes from the next epoch."""
        k = self.tail(remaining, micro)
        if self.any_size and remaining >= 2 * k:
            q, r = divmod(remaining, k)
            return (q + 1,) * r + (q,) * (k - r)
        return (micro,) * k

    def state_dict(self) -> dict:
        return {"rungs": list(self.rungs), "world_size": self.world_size, "min_accumulation": self.min_accumulation}

    def mismatch(self, state: dict) -> Optional[str]:
        """What differs between a checkpoint's ladder state and this ladder, or None."""
        diffs = []
        if tuple(state["rungs"]) != self.rungs:
            diffs.append(f"rungs {tuple(state['rungs'])} in the checkpoint, {self.rungs} now")
        if int(state["world_size"]) != self.world_size:
            diffs.append(f"world size {int(state['world_size'])} in the checkpoint, {self.world_size} now")
        return "; ".join(diffs) or None

    def load_state_dict(self, state: dict) -> None:
        diff = self.mismatch(state)
        if diff:
            raise ValueError(f"simigrad: the checkpoint's ladder differs: {diff}")
        self.require_accumulation(int(state["min_accumulation"]))


Plan = BatchPlan
"""Deprecated alias of :class:`BatchPlan` (the name other modules' "plans" shared)."""

__all__ = ["Ladder", "BatchPlan", "Plan", "RESOLUTION", "ACCUMULATION_SLACK", "default_rungs"]
