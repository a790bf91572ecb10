"""Which statistics a step uses, decided per step.

On one process a window of >= 2 micro-steps uses the ``microsteps`` split (the backend's ``batch`` sinks are read
with ``reset=True`` and ignored for that step). A window of one micro-step uses the ``batch`` statistics of the
compiled backward; when it has none (a micro-batch the split pass refused: a tail of one sample, a shape Dynamo
made dynamic) that step has none, the cause is logged and recorded (``note``), and the next step is split again.
Only while the model has *never* recorded ``batch`` statistics (not compiled with the backend, or every graph
refused) the ladder plans >= 2 micro-steps, with a warning naming the cause and how to compile the model; the
first ``batch`` statistics seen undo that. Under data parallelism the statistics are the ``ranks`` split.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple, Union

import torch

from ..config import SimigradConfig, resolve_group_mode
from ..stats.gradient_stats import StatsRead, read_stats
from ..stats.split_stats import SplitStats
from .ladder import Ladder
from .window import Window

log = logging.getLogger("simigrad_compile")


def base_accumulation(config: SimigradConfig, world_size: int) -> int:
    """The fewest micro-steps a step may have: 2 where the statistics come from the micro-steps on one process
    (``group_mode="microsteps"``), else 1."""
    return 2 if world_size == 1 and resolve_group_mode(config.group_mode, world_size) == "microsteps" else 1


def no_stats_cause(stats: Union[SplitStats, StatsRead]) -> str:
    """Why a read has no split statistics: the cause :func:`gradient_stats` names for that read."""
    return stats.reason or "no split statistics were recorded since the last step"


class StatisticsChoice:
    """Which statistics each step uses (module docstring); ``batch_seen`` survives a checkpoint."""

    def __init__(self, model: torch.nn.Module, ladder: Ladder, world_size: int, base_accumulation: int):
        self.model, self.ladder = model, ladder
        self.world_size, self.base_accumulation = world_size, base_accumulation
        self.batch_seen = False
        self.one_step_without = 0
        self.compile_hint = "compile the model with torch.compile(model, backend='simigrad')"
        """How to get ``batch`` statistics, named by the warning about a model without them (a door sets its own)."""

    def read(self, w: Window, step: int) -> Tuple[Union[SplitStats, StatsRead], Optional[str]]:
        """The step's statistics (sinks read and reset) and, when it has none, why. The ``batch`` and ``ranks``
        statistics come as a :class:`StatsRead` whose sums are still on the device (the boundary copies them
        with its own checks, in one sync)."""
        batch = read_stats(self.model, reset=True)
        if self.world_size > 1:
            return batch, (None if batch.mode != "none" else no_stats_cause(batch))
        if "batch" in batch.mode and (not self.batch_seen or self.ladder.min_accumulation > self.base_accumulation):
            self._saw_batch()
        if w.stats is not None:
            if batch.mode != "none":
                log.debug("simigrad: accumulation %d: microsteps statistics replace the %s ones", w.accumulation,
                          batch.mode)
            return w.split_stats(), None
        if batch.mode != "none":
            return batch, None
        cause = no_stats_cause(batch)
        if not self.batch_seen and self.ladder.min_accumulation < 2:
            log.warning("simigrad: no split statistics for this model (%s); planning >= 2 micro-steps per step "
                        "from now on so that the microsteps statistics exist (undone as soon as the model records "
                        "batch statistics). For statistics from one micro-step, %s.", cause, self.compile_hint)
            self.ladder.require_accumulation(2)
        elif self.batch_seen:
            self.one_step_without += 1
            log.warning("simigrad: step %d has no split statistics (%s): this step only, the next one is split "
                        "again (%d such step(s) so far)", step, cause, self.one_step_without)
        return batch, cause

    def _saw_batch(self) -> None:
        self.batch_seen = True
        if self.ladder.min_accumulation > self.base_accumulation:
            log.info("simigrad: the model records batch statistics: one micro-step per step is allowed again")
            self.ladder.require_accumulation(self.base_accumulation)


__all__ = ["StatisticsChoice", "base_accumulation", "no_stats_cause"]
