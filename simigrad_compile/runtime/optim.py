"""The optimizer wrapper: a real step only at accumulation boundaries, the LR scaled around it.

``run.optimizer`` is a ``torch.optim.Optimizer`` (so LR schedulers accept it) that shares the wrapped
optimizer's ``param_groups``, ``state`` and ``defaults``. ``step()`` marks one micro-step done; at the window's
boundary the runtime averages the gradients, multiplies every group's ``lr`` by the LR scale, runs the wrapped
``step()`` and puts the exact original ``lr`` values back, so a scheduler that writes ``lr`` keeps working.
``zero_grad()`` is real only before the first micro-step of a window. ``stepped`` tells whether the last
``step()`` call was a real one: advance a per-step scheduler only then.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def _shared(name: str) -> property:
    """An attribute read from and written to the wrapped optimizer."""
    return property(lambda self: getattr(self.optimizer, name), lambda self, v: setattr(self.optimizer, name, v))


class AdaptiveOptimizer(torch.optim.Optimizer):
    def __init__(self, optimizer: torch.optim.Optimizer, run):
        # No super().__init__: the wrapped optimizer owns the parameter groups and the state.
        from ..integrations import auto_loop

        auto_loop.exclude(optimizer)  # under SIMIGRAD=1 the global loop hooks must not accumulate a second time
        self.optimizer = optimizer
        self.run = run
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
        window = self.run._window
        if window is None or window.done == 0 or window.complete:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Callable] = None):
        if closure is not None:
            raise NotImplementedError("run.optimizer.step(closure) is not supported with gradient accumulation")
        self.stepped = self.run._micro_step_done()
        return None

    def scaled_step(self, scale: float) -> None:
        """The wrapped optimizer's step with every group's ``lr`` multiplied by ``scale``, then restored."""
        saved = []
        for group in self.optimizer.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                saved.append(lr.clone())
                lr.mul_(scale)
            else:
                saved.append(lr)
                group["lr"] = lr * scale
        try:
            self.optimizer.step()
        finally:
            for group, lr in zip(self.optimizer.param_groups, saved):
                if isinstance(lr, torch.Tensor):
                    group["lr"].copy_(lr)
                else:
                    group["lr"] = lr


__all__ = ["AdaptiveOptimizer"]
