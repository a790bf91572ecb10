"""Keep an LR schedule where it was across a skipped optimizer step.

A step the core skips (a non-finite loss, gradient or statistic) must leave the LR schedule's position untouched,
as ``GradScaler`` does. A trainer that steps its scheduler after every optimizer step (Hugging Face) gets a
:class:`ScheduleHold` taken after the skipped step and restored after the scheduler stepped. (Lightning steps its
schedulers by interval; its door keeps the step-interval ones from stepping instead, so that an epoch-interval one
stepping on the same batch keeps its LR.) The ``lr`` values are saved and restored by
:mod:`simigrad_compile.runtime.lr`, as the core's LR scaling does.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch

from ..runtime.lr import restore_lr, save_lr


class ScheduleHold:
    """The schedulers' state and the optimizer's ``lr`` values now; :meth:`restore` puts them back."""

    def __init__(self, schedulers: Iterable, optimizer: torch.optim.Optimizer):
        self.schedulers = [(s, copy.deepcopy(s.state_dict())) for s in schedulers if s is not None]
        self.optimizer = optimizer
        self.lrs = save_lr(optimizer)

    def restore(self) -> None:
        for scheduler, state in self.schedulers:
            scheduler.load_state_dict(state)
        restore_lr(self.optimizer, self.lrs)


__all__ = ["ScheduleHold"]
