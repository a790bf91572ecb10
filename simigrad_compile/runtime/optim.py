"""The optimizer wrapper: a real step only at accumulation boundaries, the LR scaled around it.

``run.optimizer`` is a ``torch.optim.Optimizer`` (so LR schedulers accept it) that shares the wrapped
optimizer's ``param_groups``, ``state`` and ``defaults``. ``step()`` marks one micro-step done; at the window's
boundary the core prepares the step's mean gradient (unscaled, clipped), multiplies every group's ``lr`` by the
LR scale, runs the wrapped ``step()`` and puts the exact original ``lr`` objects back, so a scheduler that writes
``lr`` keeps working. ``zero_grad()`` is real only outside a window. ``stepped`` tells whether the last
``step()`` call applied an update (False inside a window and for a skipped step): advance a per-step scheduler
only then. ``run.sync_gradients`` tells whether it ended a step.

``_step_supports_amp_scaling`` makes ``GradScaler.step(run.optimizer)`` call ``step()`` on every micro-batch
with the scale attached instead of unscaling the running sum (see :mod:`simigrad_compile.runtime.amp`).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .amp import AmpMisuse


def _shared(name: str) -> property:
    """An attribute read from and written to the wrapped optimizer."""
    return property(lambda self: getattr(self.optimizer, name), lambda self, v: setattr(self.optimizer, name, v))


def scale_lr(optimizer: torch.optim.Optimizer, scale: float) -> List:
    """Multiply every param group's ``lr`` by ``scale``; returns what :func:`restore_lr` puts back."""
    saved = []
    for group in optimizer.param_groups:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            saved.append((lr, lr.clone()))
            lr.mul_(scale)
        else:
            saved.append((lr, None))
            group["lr"] = lr * scale
    return saved


def restore_lr(optimizer: torch.optim.Optimizer, saved: List) -> None:
    """Put back the exact ``lr`` objects (a tensor LR keeps its identity and gets its value back)."""
    for group, (lr, value) in zip(optimizer.param_groups, saved):
        if value is not None:
            lr.copy_(value)
        group["lr"] = lr


class AdaptiveOptimizer(torch.optim.Optimizer):
    _step_supports_amp_scaling = True

    def __init__(self, optimizer: torch.optim.Optimizer, core):
        # No super().__init__: the wrapped optimizer owns the parameter groups and the state.
        from ..integrations import auto_loop

        auto_loop.exclude(optimizer)  # under SIMIGRAD=1 the global loop hooks must not accumulate a second time
        self.optimizer = optimizer
        self.core = core
        self.stepped = False
        self._optimizer_step_pre_hooks = optimizer._optimizer_step_pre_hooks
        self._optimizer_step_post_hooks = optimizer._optimizer_step_post_hooks

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
            raise NotImplementedError("run.optimizer.step(closure) is not supported with gradient accumulation")
        self.stepped = False
        self._check_amp()
        if not self.core.micro_step_done():
            return None
        try:
            applied = self.core.begin_step()
            if applied:
                self.optimizer.step()
        except BaseException:
            self.core.restore_lr()
            raise
        self.core.end_step()
        self.stepped = applied
        return None


__all__ = ["AdaptiveOptimizer", "restore_lr", "scale_lr"]
