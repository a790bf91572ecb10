"""The micro-batch ladder and the factorisation ``global = world x micro x accumulation``.

Rungs
    ``micro_batch_sizes`` when given; else the powers of two from 1 up to ``max_micro_batch_size`` (plus
    ``max_micro_batch_size`` itself when it is not a power of two). Small rungs are what make batches such as
    ``min_batch_size=1000 > max_micro_batch_size=256`` exact (8 x 125); they cost nothing until a plan uses one,
    since rungs compile lazily. Each rung is one compiled graph (one shape of the batch dimension).

Rounding rule (:meth:`Ladder.plan`)
    A plan ``(micro, accumulation)`` realises ``R = world * micro * accumulation``. Candidates are the plans
    with ``R`` within ``[min_batch_size, max_batch_size]`` that give two groups (on one process a global batch
    of one sample has no second half) and at least ``min_accumulation`` micro-steps.

    1. Fewest micro-steps within the resolution: counting up from ``k0 = ceil(target / (world * top rung))``
       (the fewest micro-steps that can reach the target), the first ``accumulation`` for which some rung
       realises the target within ``RESOLUTION`` (10 %, about one controller step); on it the nearest ``R``,
       ties to the larger micro. Starting at ``k0`` keeps large targets from being rounded down by up to 10 %.
    2. Otherwise the nearest ``R`` over all candidates; ties to fewer micro-steps, then the larger micro.
    3. When no plan lies within the bounds at all (for example an odd ``min == max`` on two ranks), the bounds
       are dropped for that target and a warning names the target and the plan.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from ..config import SimigradConfig

log = logging.getLogger("simigrad_compile")

RESOLUTION = 0.10
"""Relative error below which fewer micro-steps win over a nearer batch."""


@dataclass(frozen=True)
class Plan:
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
    r = 1
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
        self.upper = config.max_batch_size
        self.plan = functools.lru_cache(maxsize=4096)(self._plan)

    def __repr__(self) -> str:
        return f"Ladder(rungs={self.rungs}, world={self.world_size}, min_accumulation={self.min_accumulation})"

    def require_accumulation(self, n: int) -> None:
        self.min_accumulation = n
        self.plan.cache_clear()

    def _two_groups(self, micro: int, acc: int) -> bool:
        return self.world_size * micro * acc >= 2

    def _candidates(self, target: int, bounded: bool):
        w, lo = self.world_size, self.min_accumulation
        k0 = max(lo, -(-target // (w * self.rungs[-1])))
        k_max = max(k0, -(-target // (w * self.rungs[0])))
        for k in list(range(k0, k_max + 1)) + list(range(lo, k0)):
            row = []
            for m in self.rungs:
                r = w * m * k
                if not self._two_groups(m, k) or (bounded and not self.lower <= r <= self.upper):
                    continue
                row.append((abs(r - target), -m, k))
            yield k, row

    def _plan(self, target: int) -> Plan:
        """The plan realising ``target`` (a global batch size) by the rounding rule of the module docstring."""
        target = min(max(int(target), self.lower), self.upper)
        for bounded in (True, False):
            best = None
            for _, row in self._candidates(target, bounded):
                if not row:
                    continue
                near = min(row)
                if near[0] <= RESOLUTION * target:
                    best = near
                    break
                if best is None or (near[0], near[2], near[1]) < (best[0], best[2], best[1]):
                    best = near
            if best is not None:
                plan = Plan(-best[1], best[2], self.world_size)
                if not bounded:
                    log.warning("simigrad: no plan of %r realises a batch in [%d, %d] near target %d; using %s "
                                "(batch %d) outside the bounds", self, self.lower, self.upper, target, plan,
                                plan.batch_size)
                return plan
        raise ValueError(f"{self!r} cannot realise any batch (target {target})")

    def tail(self, remaining: int, micro: int) -> int:
        """How many micro-batches of ``micro`` (the current rung) the last step of an epoch runs for its last
        ``remaining`` samples (per rank): enough to cover them, and at least ``min_accumulation`` and two
        samples in all, as any plan. No other rung: a tail compiles nothing."""
        return max(-(-remaining // micro), self.min_accumulation, -(-2 // (self.world_size * micro)))

    def state_dict(self) -> dict:
        return {"rungs": list(self.rungs), "world_size": self.world_size, "min_accumulation": self.min_accumulation}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["rungs"]) != self.rungs or int(state["world_size"]) != self.world_size:
            raise ValueError(f"checkpoint ladder {state} does not match {self!r}")
        self.require_accumulation(int(state["min_accumulation"]))


__all__ = ["Ladder", "Plan", "RESOLUTION", "default_rungs"]
