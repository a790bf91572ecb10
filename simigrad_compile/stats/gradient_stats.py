"""Split-group statistics: where ``(d, a, b) = (g1.g2, |g1|^2, |g2|^2)`` are accumulated and read back.

Producers (a compiled backward graph, the DDP reduction, the micro-step accumulator) own a :class:`Sink`. A sink
holds groups of parameters (one parameter per group for a compiled graph, one bucket per group under DDP)
and one fp32 ``[groups, 3]`` accumulator on the gradients' device, so recording never synchronises with the
host. :func:`gradient_stats` sums every live sink's rows that belong to a model's parameters.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger("simigrad_compile")

_SINKS: "weakref.WeakSet[Sink]" = weakref.WeakSet()


class Sink:
    """Accumulates ``(d, a, b)`` rows for fixed groups of parameters."""

    def __init__(self, mode: str, groups: Sequence[Sequence[Tuple[str, torch.nn.Parameter]]]):
        self.mode = mode
        self.names: List[Tuple[str, ...]] = [tuple(n for n, _ in g) for g in groups]
        self._params = [tuple(weakref.ref(p) for _, p in g) for g in groups]
        self.acc: Optional[torch.Tensor] = None
        self._index: Dict[Tuple[int, ...], torch.Tensor] = {}
        self.count = 0
        self.unsplit: Dict[str, str] = {}
        _SINKS.add(self)

    def add(self, rows: torch.Tensor, index: Optional[Sequence[int]] = None) -> None:
        """Add ``rows`` (``[k, 3]``) to groups ``index`` (default: all groups, in order)."""
        rows = rows.detach().to(torch.float32)
        if self.acc is None or self.acc.device != rows.device:
            self.acc = torch.zeros(len(self.names), 3, dtype=torch.float32, device=rows.device)
        if index is None:
            self.acc += rows
        else:
            key = tuple(index)
            if key not in self._index or self._index[key].device != rows.device:
                self._index[key] = torch.as_tensor(key, device=rows.device)  # one host-to-device copy per graph
            self.acc.index_add_(0, self._index[key], rows)
        self.count += 1

    def mark_unsplit(self, reasons: Dict[str, str]) -> None:
        self.unsplit.update(reasons)

    def groups(self) -> Iterable[Tuple[int, Tuple[str, ...], Tuple[Optional[torch.nn.Parameter], ...]]]:
        for i, (names, refs) in enumerate(zip(self.names, self._params)):
            yield i, names, tuple(r() for r in refs)

    def reset(self) -> None:
        if self.acc is not None:
            self.acc.zero_()
        self.count = 0


@dataclass(frozen=True)
class SplitStats:
    """Sums of ``d = g1.g2``, ``a = |g1|^2``, ``b = |g2|^2`` over parameters, in fp32 on the host."""

    dot: float
    sq_norm_1: float
    sq_norm_2: float
    mode: str = "none"
    """Where the groups came from: ``batch``, ``microsteps``, ``ranks``, or ``none`` when nothing recorded."""
    per_parameter: Optional[Dict[str, Tuple[float, float, float]]] = None
    missing: Tuple[str, ...] = ()
    """Trainable parameters with a gradient but no statistics (outside any compiled region, or unsplit)."""
    unsplit: Dict[str, str] = field(default_factory=dict)
    """Parameters a split pass refused, with the reason."""

    @property
    def cosine(self) -> float:
        """``d / (sqrt(a) sqrt(b))``; NaN when a norm is zero or a statistic is not finite."""
        den = math.sqrt(max(self.sq_norm_1, 0.0)) * math.sqrt(max(self.sq_norm_2, 0.0))
        if den == 0.0 or not math.isfinite(den) or not math.isfinite(self.dot):
            return float("nan")
        return self.dot / den

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.dot, self.sq_norm_1, self.sq_norm_2))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _named(model) -> List[Tuple[str, torch.nn.Parameter]]:
    if isinstance(model, torch.nn.Module):
        return list(_unwrap(model).named_parameters())
    return [(f"param{i}", p) for i, p in enumerate(model)]


def gradient_stats(model, reset: bool = False, per_parameter: bool = False) -> SplitStats:
    """The split-group statistics summed over every backward of ``model`` since the last reset.

    ``model`` may be the compiled module, a DDP wrapper, the module they wrap, or an iterable of parameters
    (named ``param<i>``). ``reset=True`` zeroes the accumulators after reading. ``per_parameter=True`` adds a
    name -> ``(d, a, b)`` breakdown (a bucket of parameters under DDP appears as one entry named by its
    parameters).
    """
    named = _named(model)
    owned = {id(p): n for n, p in named}
    total = torch.zeros(3, dtype=torch.float64)
    breakdown: Dict[str, Tuple[float, float, float]] = {}
    covered, unsplit, modes = set(), {}, set()
    for sink in list(_SINKS):
        mine = []
        for i, _, params in sink.groups():
            if params and all(p is not None and id(p) in owned for p in params):
                mine.append((i, params))
        if not mine:
            continue
        unsplit.update(sink.unsplit)
        if sink.count == 0 or sink.acc is None:
            if reset:
                sink.reset()
            continue
        modes.add(sink.mode)
        rows = sink.acc.detach().to("cpu", torch.float64)
        for i, params in mine:
            total += rows[i]
            covered.update(id(p) for p in params)
            if per_parameter:
                key = ",".join(owned[id(p)] for p in params)
                prev = breakdown.get(key, (0.0, 0.0, 0.0))
                breakdown[key] = tuple(x + float(y) for x, y in zip(prev, rows[i]))
        if reset:
            sink.reset()
    missing = tuple(n for n, p in named if p.requires_grad and p.grad is not None and id(p) not in covered)
    if missing and modes:
        log.warning("simigrad: %d parameter(s) have gradients but no statistics: %s", len(missing), ", ".join(missing))
    mode = "+".join(sorted(modes)) if modes else "none"
    return SplitStats(
        float(total[0]), float(total[1]), float(total[2]), mode,
        breakdown if per_parameter else None, missing, unsplit,
    )


def reset_stats(model) -> None:
    gradient_stats(model, reset=True)
