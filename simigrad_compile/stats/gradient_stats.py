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
        """Parameters a split pass left whole in a graph that ran since the last reset, with the reason."""
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
        self.unsplit = {}


@dataclass(frozen=True, repr=False)
class SplitStats:
    """Sums of ``d = g1.g2``, ``a = |g1|^2``, ``b = |g2|^2`` over parameters, in fp32 on the host.

    Every backward since the last reset adds its own rows, so a second backward over the same graph
    (``retain_graph=True``) or a ``torch.autograd.grad`` call adds its ``(d, a, b)`` again, as it adds its
    gradient to ``.grad``: two identical backwards double ``d``, ``a`` and ``b`` and leave the cosine unchanged.
    """

    dot: float
    sq_norm_1: float
    sq_norm_2: float
    mode: str = "none"
    """Where the groups came from: ``batch``, ``microsteps``, ``ranks``, or ``none`` when nothing recorded."""
    per_parameter: Optional[Dict[str, Tuple[float, float, float]]] = None
    missing: Tuple[str, ...] = ()
    """Trainable parameters with a gradient but no statistics (outside any compiled region, or unsplit)."""
    unsplit: Dict[str, str] = field(default_factory=dict)
    """Parameters a split pass left whole, with the reason, in the graphs that ran since the last reset."""
    reason: str = ""
    """Empty when the statistics cover every parameter that has a gradient; otherwise why not, in one line
    (the split pass's cause, such as a batch of 1 or dynamic shapes, or that no compiled graph recorded)."""

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


def _compiled(module: torch.nn.Module) -> bool:
    """``torch.compile(module)``'s wrapper, or a module compiled in place with ``module.compile()``."""
    is_wrapper = hasattr(module, "_orig_mod") and hasattr(module, "dynamo_ctx")
    return is_wrapper or getattr(module, "_compiled_call_impl", None) is not None


_SUBMODULES_CHECKED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def check_compiled_once(model) -> torch.nn.Module:
    """The module under ``model``'s wrappers (compile, DDP); raises if ``model`` was compiled twice.

    A module has one Dynamo backend: torch.compile of a compiled module keeps only one of the two (an outer
    ``torch.compile`` over a ``torch.compile``'d module unwraps it and returns a plain function; an inner
    ``module.compile()`` wins over an outer ``torch.compile``), so ``backend="simigrad"`` on the other records
    nothing, silently. This names it instead.
    """
    fix = ("Compile the model once: model = torch.compile(model, backend='simigrad') (or "
           "model.compile(backend='simigrad')), and pass that model or the module it wraps.")
    if not isinstance(model, torch.nn.Module):
        if callable(model) and hasattr(model, "_torchdynamo_orig_callable"):
            raise TypeError(
                "simigrad: got a function made by torch.compile, not a module. torch.compile of an already compiled "
                "module unwraps it and compiles the inner forward again with the outer backend only (the first "
                "backend's graphs never run), and returns a function without .parameters(). " + fix)
        raise TypeError(f"simigrad: expected a module or an iterable of parameters, got {type(model).__name__}")
    layers, m = [], model
    while True:
        if _compiled(m):
            layers.append(type(m).__name__)
        inner = getattr(m, "_orig_mod", None) or getattr(m, "module", None)
        if not isinstance(inner, torch.nn.Module):
            break
        m = inner
    if layers and m not in _SUBMODULES_CHECKED:
        layers += [f"{type(sub).__name__} {name!r}" for name, sub in m.named_modules() if name and _compiled(sub)]
        if len(layers) == 1:
            _SUBMODULES_CHECKED.add(m)
    if len(layers) > 1:
        raise RuntimeError(
            f"simigrad: {type(m).__name__} is compiled more than once ({', '.join(layers)}): torch.compile was "
            "applied to a module that was already compiled. Only one of the backends runs, so statistics may "
            "silently be missing. " + fix)
    return m


def _named(model) -> List[Tuple[str, torch.nn.Parameter]]:
    if isinstance(model, torch.nn.Module) or callable(model):
        return list(check_compiled_once(model).named_parameters())
    return [(f"param{i}", p) for i, p in enumerate(model)]


def gradient_stats(model, reset: bool = False, per_parameter: bool = False) -> SplitStats:
    """The split-group statistics summed over every backward of ``model`` since the last reset.

    ``model`` may be the compiled module, a DDP wrapper, the module they wrap, or an iterable of parameters
    (named ``param<i>``). ``reset=True`` zeroes the accumulators after reading, and forgets which graphs were
    left unsplit, so ``unsplit`` and ``reason`` describe the backwards since the previous reset (one step, when
    the runtime reads once per step). ``per_parameter=True`` adds a name -> ``(d, a, b)`` breakdown (a bucket of
    parameters under DDP appears as one entry named by its parameters).
    """
    named = _named(model)
    owned = {id(p): n for n, p in named}
    total = torch.zeros(3, dtype=torch.float64)
    breakdown: Dict[str, Tuple[float, float, float]] = {}
    covered, unsplit, modes, sinks = set(), {}, set(), 0
    for sink in list(_SINKS):
        mine = []
        for i, _, params in sink.groups():
            if params and all(p is not None and id(p) in owned for p in params):
                mine.append((i, params))
        if not mine:
            continue
        sinks += 1
        unsplit.update(_model_names(sink, owned))
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
    reason = _reason(modes, sinks, unsplit, missing)
    if missing and modes:
        log.warning("simigrad: %d parameter(s) have gradients but no statistics: %s", len(missing), ", ".join(missing))
    mode = "+".join(sorted(modes)) if modes else "none"
    return SplitStats(
        float(total[0]), float(total[1]), float(total[2]), mode,
        breakdown if per_parameter else None, missing, unsplit, reason,
    )


def _model_names(sink: Sink, owned: Dict[int, str]) -> Dict[str, str]:
    """``sink.unsplit`` named as in the model: a graph names its parameters relative to the compiled module,
    which is not unique when blocks of one class are compiled one by one."""
    if not sink.unsplit:
        return {}
    tensors = {names[0]: params[0] for _, names, params in sink.groups() if len(names) == 1}
    return {owned.get(id(tensors.get(name)), name): why for name, why in sink.unsplit.items()}


def _reason(modes, sinks: int, unsplit: Dict[str, str], missing: Tuple[str, ...]) -> str:
    if unsplit:
        causes = "; ".join(sorted(set(unsplit.values())))
        return f"the split pass left {len(unsplit)} parameter gradient(s) whole (see .unsplit): {causes}"
    if not modes and not sinks:
        return ("no graph compiled with backend='simigrad' holds these parameters (not compiled with it, or "
                "compiled with group_mode 'microsteps' or 'ranks')")
    if not modes:
        return "no backward ran through a compiled graph of these parameters since the last reset"
    if missing:
        names = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        return f"{len(missing)} parameter(s) with gradients ran outside every compiled graph (see .missing): {names}"
    return ""


def reset_stats(model) -> None:
    gradient_stats(model, reset=True)
