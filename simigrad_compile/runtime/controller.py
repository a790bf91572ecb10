"""The SimiGrad batch-size controller: pure Python, one decision per optimizer step.

Rule (Qin et al., 2021), applied every ``adjust_every`` steps to the (optionally EMA-smoothed) cosine ``c``:

* ``c < target``: ``B <- max(B + 1, floor(1.1 B))``  (noisy gradient: grow)
* ``c > target``: ``B <- min(B - 1, floor(0.9 B))``  (redundant batch: shrink)
* then ``B`` is clamped to ``[min_batch_size, max_batch_size]``.

The LR multiplier is ``r = B/B0`` (``linear``), ``sqrt(B/B0)`` (``sqrt``) or 1 (``none``), damped as
``(r - 1) * lr_adjust_factor + 1``. A NaN or Inf cosine skips the adjustment and is counted; it never enters
the EMA or the batch size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

from ..config import SimigradConfig

log = logging.getLogger("simigrad_compile")


@dataclass
class Decision:
    batch_size: int
    """The target global batch size for the next step."""
    lr_scale: float
    skipped: Optional[str]
    """Why the rule was not applied this step (``"non-finite-cosine"``, ``"interval"``), or None."""


class BatchSizeController:
    def __init__(self, config: SimigradConfig, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.initial_batch_size = batch_size
        self.batch_size = min(max(batch_size, config.min_batch_size), config.max_batch_size)
        self.smoothed: Optional[float] = None
        self.steps = 0
        self.non_finite = 0

    def lr_scale(self, batch_size: Optional[int] = None) -> float:
        ratio = (self.batch_size if batch_size is None else batch_size) / self.initial_batch_size
        if self.config.lr_scaling == "sqrt":
            ratio = math.sqrt(ratio)
        elif self.config.lr_scaling == "none":
            ratio = 1.0
        return (ratio - 1.0) * self.config.lr_adjust_factor + 1.0

    def update(self, cosine: float) -> Decision:
        """Feed the cosine measured in the step that just ended; returns the next step's target."""
        self.steps += 1
        if not math.isfinite(cosine):
            self.non_finite += 1
            log.warning("simigrad: non-finite cosine %s at step %d (a zero gradient in one half?): batch size kept at "
                        "%d; %d such step(s) so far", cosine, self.steps, self.batch_size, self.non_finite)
            return Decision(self.batch_size, self.lr_scale(), "non-finite-cosine")
        ema = self.config.ema
        self.smoothed = cosine if self.smoothed is None or ema == 0 else ema * self.smoothed + (1 - ema) * cosine
        if self.steps % self.config.adjust_every:
            return Decision(self.batch_size, self.lr_scale(), "interval")
        b, target = self.batch_size, self.config.target_similarity
        if self.smoothed < target:
            b = max(b + 1, math.floor(1.1 * b))
        elif self.smoothed > target:
            b = min(b - 1, math.floor(0.9 * b))
        self.batch_size = min(max(b, self.config.min_batch_size), self.config.max_batch_size)
        return Decision(self.batch_size, self.lr_scale(), None)

    def state_dict(self) -> dict:
        return {
            "initial_batch_size": self.initial_batch_size,
            "batch_size": self.batch_size,
            "smoothed": self.smoothed,
            "steps": self.steps,
            "non_finite": self.non_finite,
        }

    def load_state_dict(self, state: dict) -> None:
        """Validates every value before changing anything."""
        missing = [k for k in ("initial_batch_size", "batch_size", "smoothed", "steps", "non_finite") if k not in state]
        if missing:
            raise KeyError(f"simigrad: controller state lacks {', '.join(missing)}")
        initial, batch = int(state["initial_batch_size"]), int(state["batch_size"])
        steps, non_finite = int(state["steps"]), int(state["non_finite"])
        smoothed = None if state["smoothed"] is None else float(state["smoothed"])
        if initial < 1 or batch < 1 or steps < 0 or non_finite < 0:
            raise ValueError(f"simigrad: controller state {state} has a batch size < 1 or a negative count")
        if smoothed is not None and not math.isfinite(smoothed):
            raise ValueError(f"simigrad: controller state has a non-finite smoothed cosine {smoothed}")
        self.initial_batch_size, self.batch_size, self.smoothed = initial, batch, smoothed
        self.steps, self.non_finite = steps, non_finite
