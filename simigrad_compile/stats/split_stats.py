"""``SplitStats``: the value a statistics read returns (the sums ``dot``, ``sq_norm_1``, ``sq_norm_2`` on the host,
and what they cover)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple


@dataclass(frozen=True, repr=False)
class SplitStats:
    """Sums of ``dot = g1.g2``, ``sq_norm_1 = |g1|^2``, ``sq_norm_2 = |g2|^2`` over parameters, on the host
    (fp32 rows summed in fp64).

    Every backward since the last reset adds its own rows, so a second backward over the same graph
    (``retain_graph=True``) or a ``torch.autograd.grad`` call adds its three sums again, as it adds its
    gradient to ``.grad``: two identical backwards double ``dot``, ``sq_norm_1`` and ``sq_norm_2`` and leave the
    cosine unchanged.
    """

    dot: float
    sq_norm_1: float
    sq_norm_2: float
    mode: str = "none"
    """Where the groups came from: ``batch``, ``microsteps``, ``ranks``, or ``none`` when nothing recorded."""
    per_parameter: Optional[Dict[str, Tuple[float, float, float]]] = None
    """Name -> ``(dot, sq_norm_1, sq_norm_2)`` when asked for (a DDP bucket is one entry named by its parameters)."""
    missing: Tuple[str, ...] = ()
    """Trainable parameters with a gradient but no statistics (outside any compiled region, or unsplit)."""
    unsplit: Dict[str, str] = field(default_factory=dict)
    """Parameters a split pass left whole, with the reason, in the graphs that ran since the last reset."""
    reason: str = ""
    """Empty when the statistics cover every parameter that has a gradient; otherwise why not, in one line
    (the split pass's cause, such as a batch of 1 or dynamic shapes, or that no compiled graph recorded)."""

    @property
    def cosine(self) -> float:
        """``dot / (sqrt(sq_norm_1) sqrt(sq_norm_2))``; NaN when a norm is zero or a statistic is not finite."""
        den = math.sqrt(max(self.sq_norm_1, 0.0)) * math.sqrt(max(self.sq_norm_2, 0.0))
        if den == 0.0 or not math.isfinite(den) or not math.isfinite(self.dot):
            return float("nan")
        return self.dot / den

    @property
    def finite(self) -> bool:
        return math.isfinite(self.dot) and math.isfinite(self.sq_norm_1) and math.isfinite(self.sq_norm_2)

    def __repr__(self) -> str:
        parts = [f"cosine={self.cosine:.6g}", f"dot={self.dot:.6g}", f"sq_norm_1={self.sq_norm_1:.6g}",
                 f"sq_norm_2={self.sq_norm_2:.6g}", f"mode={self.mode!r}"]
        for name in ("missing", "unsplit", "per_parameter"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name}={len(value)} params (see .{name})")
        if self.reason:
            short = self.reason if len(self.reason) <= 100 else self.reason[:97] + "..."
            parts.append(f"reason={short!r}")
        return f"SplitStats({', '.join(parts)})"
