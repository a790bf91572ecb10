"""Mixed precision: ``torch.amp.GradScaler`` with an accumulation window.

The recipe stays the standard one, once per micro-batch::

    scaler.scale(loss).backward()
    scaler.step(run.optimizer)
    scaler.update()

with the scaler handed to the run (``AdaptiveBatching(..., scaler=scaler)``). What happens:

* ``run.optimizer`` declares ``_step_supports_amp_scaling``, so ``scaler.step`` never unscales the running sum
  itself and never skips the call: it checks the accumulated (scaled) gradients for inf/NaN, then calls
  ``run.optimizer.step()`` with ``grad_scale`` and ``found_inf`` set on it (torch's contract for optimizers that
  handle scaling).
* Inside a window, ``scaler.update()`` keeps the scale and the growth tracker as they are (the window's
  micro-batches must share one scale): the bridge calls the scaler's own ``update(new_scale=<same scale>)``,
  which only clears the per-step bookkeeping.
* At the boundary the core unscales the window's mean gradient once (by the scale every micro-batch used),
  and ``scaler.update()`` runs for real, on the inf check of the whole window. An overflow skips the whole step
  and backs the scale off once, as ``GradScaler`` does for a plain step.

Without ``scaler=`` the first ``scaler.step(run.optimizer)`` raises (the scale could change inside a window
and each ``scaler.update()`` would count a micro-batch as a step). ``scaler.unscale_(run.optimizer)`` inside a
window would unscale the running sum: it raises too; clip with ``run.clip_grad_norm_``, which clips the unscaled
mean gradient at the boundary.
"""

from __future__ import annotations

from typing import List

import torch


class AmpMisuse(RuntimeError):
    """A GradScaler recipe that cannot give the step's unscaled mean gradient."""


class ScalerBridge:
    """Keeps a ``GradScaler``'s scale fixed inside the core's windows and records each micro-batch's scale."""

    def __init__(self, scaler, core):
        if not hasattr(scaler, "update") or not hasattr(scaler, "get_scale"):
            raise TypeError(f"scaler= expects a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler
        self.core = core
        self.scales: List[torch.Tensor] = []
        self.found_inf: List[torch.Tensor] = []
        self._update = scaler.update
        scaler.update = self._windowed_update

    @property
    def enabled(self) -> bool:
        return self.scaler.is_enabled()

    def close(self) -> None:
        if self.scaler.__dict__.get("update") == self._windowed_update:
            del self.scaler.update

    def _windowed_update(self, new_scale=None) -> None:
        if new_scale is None and self.core.window_open and self.scales:
            self._update(new_scale=self.scales[-1])  # same value: clears the per-step state, tracker untouched
            return
        self._update(new_scale)

    def record(self, optimizer) -> None:
        """Called by ``run.optimizer.step()`` on every micro-batch, with what ``scaler.step`` set on it."""
        scale = optimizer.__dict__.get("grad_scale")
        if scale is None:
            raise AmpMisuse(
                "simigrad: scaler.unscale_(run.optimizer) was called inside an accumulation window: it would "
                "unscale the running sum of the window's micro-batches. Drop it and clip with "
                "run.clip_grad_norm_(max_norm), which clips the unscaled mean gradient once, at the boundary.")
        self.scales.append(scale.detach().reshape(()).clone())
        inf = optimizer.__dict__.get("found_inf")
        if inf is not None:
            self.found_inf.append(inf.detach().reshape(()).float().clone())

    def checks(self) -> List[torch.Tensor]:
        """0-d tensors for the boundary's one host sync: the window's scale (1 when disabled or unused), how many
        micro-batches had another scale, and whether the scaler found inf/NaN in the accumulated gradients."""
        if not self.scales:
            return [torch.ones(()), torch.zeros(()), torch.zeros(())]
        first = self.scales[0]
        drift = torch.stack([(s != first) for s in self.scales]).sum()
        found = torch.stack([f.to(first.device) for f in self.found_inf]).sum() if self.found_inf else first * 0
        return [first, drift, found]

    def current_scale(self) -> float:
        return float(self.scaler.get_scale())

    def reset(self) -> None:
        self.scales.clear()
        self.found_inf.clear()


__all__ = ["AmpMisuse", "ScalerBridge"]
