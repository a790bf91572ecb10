"""The optimizer wrapper: a real step only at accumulation boundaries, the LR scaled around it.

``run.optimizer`` is a ``torch.optim.Optimizer`` (so LR schedulers accept it) that shares the wrapped
optimizer's ``param_groups``, ``state`` and ``defaults``. ``step()`` marks one micro-step done; at the window's
boundary the core prepares the step's mean gradient (unscaled, clipped), multiplies every group's ``lr`` by the
LR scale, runs the wrapped ``step()`` and puts the exact original ``lr`` objects back, so a scheduler that writes
``lr`` keeps working. ``zero_grad()`` is real only outside a window. ``stepped`` tells whether the last
``step()`` call applied an update (False inside a window and for a skipped step): advance a per-step scheduler
only then. ``run.sync_gradients`` tells whether it ended a step.

The optimizer the user passed in (``run.user_optimizer``) steps only at a step's boundary: ``AdaptiveBatching``
refuses a direct ``step()`` of it anywhere else with :class:`DirectStepError`, which names ``run.optimizer``.

``_step_supports_amp_scaling`` makes ``GradScaler.step(run.optimizer)`` call ``step()`` on every micro-batch
with the scale attached instead of unscaling the running sum (see :mod:`simigrad_compile.runtime.amp`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import compat
from .amp import AmpMisuse
from .lr import restore_lr, scale_lr  # noqa: F401  (re-exported for importers of this module)


class DirectStepError(RuntimeError):
    """The optimizer passed to ``AdaptiveBatching`` was stepped directly instead of through ``run.optimizer``."""


class ClosureStepError(NotImplementedError):
    """``run.optimizer.step(closure)``: a closure re-evaluates the gradients inside the step, which cannot be
    accumulated over micro-batches."""


def _shared(name: str) -> property:
    """An attribute read from and written to the wrapped optimizer."""
    return property(lambda self: getattr(self.optimizer, name), lambda self, v: setattr(self.optimizer, name, v))


class AdaptiveOptimizer(torch.optim.Optimizer):
    """``run.optimizer``: steps the wrapped optimizer at accumulation boundaries only (module docstring).

    Args:
        optimizer: the user's optimizer (shared ``param_groups``, ``state`` and ``defaults``).
        core: the :class:`~simigrad_compile.runtime.core.StepCore` whose protocol ``step()`` drives.

    Raises (from ``step``):
        ClosureStepError: ``step(closure)``.
        AmpMisuse: a GradScaler given to the run but ``step()`` called directly, or the reverse.
    """

    _step_supports_amp_scaling = True

    def __init__(self, optimizer: torch.optim.Optimizer, core):
        # No super().__init__: the wrapped optimizer owns the parameter groups and the state.
        self.optimizer = optimizer
        self.core = core
        self.stepped = False
        compat.share_step_hooks(self, optimizer)

    param_groups = _shared("param_groups")
    state = _shared("state")
    defaults = _shared("defaults")

    def __repr__(self) -> str:
        return f"AdaptiveOptimizer({self.optimizer!r})"

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self.core.window_open:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def _check_amp(self) -> None:
        amp = self.core.amp
        if "grad_scale" in self.__dict__:  # set by GradScaler.step (torch's contract for _step_supports_amp_scaling)
            if amp is None:
                raise AmpMisuse(
                    "simigrad: scaler.step(run.optimizer) needs the scaler handed to the run: "
                    "AdaptiveBatching(model, optimizer, ..., scaler=scaler). Without it the scale could change "
                    "inside an accumulation window and the running sum would be unscaled on every micro-batch.")
            amp.record(self)
        elif amp is not None and amp.enabled:
            raise AmpMisuse(
                "simigrad: the run has a GradScaler (scaler=) but run.optimizer.step() was called directly: the "
                "gradients would stay scaled. Call scaler.step(run.optimizer) and scaler.update() instead.")

    def step(self, closure: Optional[Callable] = None):
        if closure is not None:
            raise ClosureStepError(
                f"simigrad: run.optimizer.step(closure) is not supported: the closure recomputes the gradients "
                f"inside the step, so they cannot be accumulated over the step's micro-batches. Fix: call "
                f"loss.backward() yourself and then run.optimizer.step() with no closure; an optimizer that needs "
                f"its closure ({type(self.optimizer).__name__}, such as torch.optim.LBFGS) cannot adapt its batch: "
                f"use SGD, Adam or AdamW with AdaptiveBatching, or train it without AdaptiveBatching.")
        self.stepped = False
        self._check_amp()
        if not self.core.micro_step_done():
            return None
        try:
            applied = self.core.begin_step(checked=True)
            if applied:
                self.optimizer.step()
        except BaseException:
            self.core.restore_lr()
            raise
        self.core.end_step()
        self.stepped = applied
        return None


__all__ = ["AdaptiveOptimizer", "ClosureStepError", "DirectStepError", "restore_lr", "scale_lr"]
