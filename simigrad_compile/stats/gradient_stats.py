"""Split-group statistics: where ``(d, a, b) = (g1.g2, |g1|^2, |g2|^2)`` are accumulated and read back.

Producers (a compiled backward graph, the DDP reduction, the micro-step accumulator) own a :class:`Sink`. A sink
holds groups of parameters (one parameter per group for a compiled graph, one bucket per group under DDP)
and one fp32 ``[groups, 3]`` accumulator on the gradients' device, so recording never synchronises with the
host. :func:`gradient_stats` sums every live sink's rows that belong to a model's parameters.

Rows of different backward calls add up (a second backward adds its statistics like its gradient), but rows of
one parameter recorded twice within one backward call (two compiled graphs, or one graph run twice, hold the
same weight across a graph break) do not: the statistics of ``g1a + g1b`` are not those of its parts. Such a
parameter's rows are left out until the reset and the parameter is named in ``unsplit``.
"""

from __future__ import annotations

import logging
import weakref
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..compat import current_graph_task_id
from .compiled_once import chain_unchanged, check_compiled_once, checked_chain
from .split_stats import SplitStats

log = logging.getLogger("simigrad_compile")

_SINKS: "weakref.WeakSet[Sink]" = weakref.WeakSet()
_created = 0
"""Sinks made so far: a read plan made before the last one may miss it."""


class Sink:
    """Accumulates ``(d, a, b)`` rows for fixed groups of parameters."""

    def __init__(self, mode: str, groups: Sequence[Sequence[Tuple[str, torch.nn.Parameter]]]):
        global _created
        self.mode = mode
        self.names: List[Tuple[str, ...]] = [tuple(n for n, _ in g) for g in groups]
        self._params = [tuple(weakref.ref(p) for _, p in g) for g in groups]
        self.acc: Optional[torch.Tensor] = None
        self._index: Dict[Tuple[Tuple[int, ...], torch.device], torch.Tensor] = {}
        self._full: Dict[Tuple[int, ...], bool] = {}
        self.count = 0
        self.unsplit: Dict[str, str] = {}
        """Parameters a split pass left whole in a graph that ran since the last reset, with the reason."""
        self._ids = [tuple(id(p) for _, p in g) for g in groups]
        self._void: set = set()
        """Rows whose statistics are void until the reset (see :func:`_recorded_twice`)."""
        _SINKS.add(self)
        _created += 1

    def add(self, rows: torch.Tensor, index: Optional[Sequence[int]] = None) -> None:
        """Add ``rows`` (``[k, 3]``) to groups ``index`` (default: all groups, in order). After a reset the
        accumulator is stale: the first add writes every group it covers and zeroes the rest (no zeroing op at
        the reset, which runs once per step)."""
        rows = rows.detach()
        task = current_graph_task_id()
        if task >= 0:
            _recorded_twice(self, task, range(len(self.names)) if index is None else index)
        if rows.dtype != torch.float32:
            rows = rows.to(torch.float32)
        acc = self.acc
        fresh = acc is None or acc.device != rows.device
        if fresh:
            acc = self.acc = torch.zeros(len(self.names), 3, dtype=torch.float32, device=rows.device)
        if index is None:
            acc.copy_(rows) if self.count == 0 and not fresh else acc.add_(rows)
        else:
            at = self.index(index, rows.device)
            if self.count == 0 and not fresh:
                if self._covers_all(index):
                    acc.index_copy_(0, at, rows)
                    self.count = 1
                    return
                acc.zero_()
            acc.index_add_(0, at, rows)
        self.count += 1
        if self._void:
            acc.index_fill_(0, self.index(sorted(self._void), acc.device), 0.0)

    def void(self, row: int, why: str) -> None:
        """Row ``row``'s statistics are wrong until the reset: zeroed, and its parameters named in ``unsplit``."""
        self._void.add(row)
        self.unsplit.update({name: why for name in self.names[row]})
        if self.acc is not None and self.count:
            self.acc[row].zero_()

    def _covers_all(self, index: Sequence[int]) -> bool:
        key = tuple(index)
        full = self._full.get(key)
        if full is None:
            full = self._full[key] = len(key) == len(self.names) == len(set(key))
        return full

    def index(self, rows: Sequence[int], device: torch.device) -> torch.Tensor:
        """``rows`` as an index tensor on ``device`` (one host-to-device copy per set of rows)."""
        key = (tuple(rows), device)
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = torch.as_tensor(key[0], device=device)
        return index

    def mark_unsplit(self, reasons: Dict[str, str]) -> None:
        self.unsplit.update(reasons)

    def groups(self) -> Iterable[Tuple[int, Tuple[str, ...], Tuple[Optional[torch.nn.Parameter], ...]]]:
        for i, (names, refs) in enumerate(zip(self.names, self._params)):
            yield i, names, tuple(r() for r in refs)

    def reset(self) -> None:
        self.count = 0  # the accumulator is stale from now on (see add)
        if self.unsplit:
            self.unsplit = {}
        self._void = set()


_TASK: List = [-1, {}]
"""The backward call that recorded last, and which sink row recorded each parameter in it."""
RECORDED_TWICE = (
    "its gradient is summed from several compiled graphs in one backward (a weight shared by graphs that a graph "
    "break separates, or a module called again after one), and the halves' statistics of separate graphs do not "
    "add up (their cross terms are missing). Fix: remove the graph break between the uses (torch._dynamo.explain "
    "names it), or compile with fullgraph=True")


def _recorded_twice(sink: Sink, task: int, index: Iterable[int]) -> None:
    """Voids the rows of parameters that another record of the same backward call already covered."""
    if _TASK[0] != task:
        _TASK[0], _TASK[1] = task, {}
    seen = _TASK[1]
    for row in index:
        for pid in sink._ids[row]:
            earlier = seen.get(pid)
            if earlier is None:
                seen[pid] = (weakref.ref(sink), row)
                continue
            first = earlier[0]()
            if first is not None:
                first.void(earlier[1], RECORDED_TWICE)
            sink.void(row, RECORDED_TWICE)


class _Entry:
    """One sink's groups whose parameters all belong to the model: ``rows`` (None: every row), ``groups``
    (``(row, parameter ids)``) and the ids of their parameters."""

    __slots__ = ("sink", "rows", "groups", "ids")

    def __init__(self, sink: Sink, groups: List[Tuple[int, Tuple[int, ...]]]):
        self.sink = weakref.ref(sink)
        self.rows = None if len(groups) == len(sink.names) else [i for i, _ in groups]
        self.groups = groups
        self.ids = {i for _, ids in groups for i in ids}


class _Plan:
    """Which sink rows hold a model's statistics, and which of its parameters no sink holds.

    Valid while no sink was made or died, and every module of the tree holds the same parameters and children
    under the same names: checked at each read by ids, without the ``named_parameters`` walk. Ids are sound
    because every module and parameter of the tree is watched by a weak reference that voids the plan when it
    dies. The plan holds nothing strongly: a hook of a parameter that refers back to its module must not keep
    the model alive."""

    __slots__ = ("sinks_key", "tree", "watchers", "chain", "named", "owned", "entries", "uncovered", "dead",
                 "__weakref__")

    def __init__(self, named: List[Tuple[str, torch.nn.Parameter]], module: Optional[torch.nn.Module]):
        self.dead = False
        self.watchers: List[weakref.ref] = []
        self.chain = ()
        self.sinks_key = (_created, len(_SINKS))
        self.tree = self._tree(module) if module is not None else None
        self.named = [(n, weakref.ref(p)) for n, p in named]
        self.owned = {id(p): n for n, p in named}
        self.entries: List[_Entry] = []
        for sink in list(_SINKS):
            mine = [(i, tuple(map(id, params))) for i, _, params in sink.groups()
                    if params and all(p is not None and id(p) in self.owned for p in params)]
            if mine:
                self.entries.append(_Entry(sink, mine))
        covered = set().union(*(e.ids for e in self.entries))
        self.uncovered = [(n, r) for n, r in self.named if id(r()) not in covered]
        """The parameters no sink holds: the only ones that can be missing while every sink recorded."""

    def _tree(self, module: torch.nn.Module) -> list:
        void = weakref.WeakMethod(self._void)
        tree = []
        for m in module.modules():
            p, c = m._parameters, m._modules
            watched = [m] + [v for v in p.values() if v is not None]
            self.watchers += [weakref.ref(v, lambda _: _call(void)) for v in watched]
            tree.append((weakref.ref(m), tuple(p) if p else None, tuple(map(id, p.values())) if p else None,
                         tuple(c) if c else None, tuple(map(id, c.values())) if c else None))
        return tree

    def _void(self) -> None:
        self.dead = True

    def valid(self) -> bool:
        if self.dead or self.sinks_key != (_created, len(_SINKS)):
            return False
        for ref, p_names, p_ids, c_names, c_ids in self.tree:
            m = ref()
            if m is None or not _same(m._parameters, p_names, p_ids) or not _same(m._modules, c_names, c_ids):
                return False
        return True


def _same(registry: dict, names, ids) -> bool:
    """``registry`` (a module's ``_parameters`` or ``_modules``) still holds these names and objects (``ids``
    None: it was empty)."""
    if ids is None:
        return not registry
    return tuple(map(id, registry.values())) == ids and tuple(registry) == names


def _call(method: weakref.WeakMethod) -> None:
    fn = method()
    if fn is not None:
        fn()


_PLANS: Dict[int, Tuple[weakref.ref, _Plan]] = {}
"""id(model) -> (a weak reference to the model, its plan); the entry goes with the model."""


def _plan(model) -> _Plan:
    if not (isinstance(model, torch.nn.Module) or callable(model)):
        return _Plan([(f"param{i}", p) for i, p in enumerate(model)], None)
    key = id(model)
    known = _PLANS.get(key)
    if known is not None and known[0]() is model:
        plan = known[1]
        if plan.valid() and chain_unchanged(plan.chain):
            return plan
    module = check_compiled_once(model)
    plan = _Plan(list(module.named_parameters()), module)
    plan.chain = checked_chain(model)
    _PLANS[key] = (weakref.ref(model, lambda _: _PLANS.pop(key, None)), plan)
    return plan


class StatsRead:
    """One read of the sinks. Rows on the CPU are summed on the host at once; rows on an accelerator are summed
    there, and :meth:`result` copies those three sums to the host (one sync), unless a caller that syncs anyway
    copied them along with its own values and passes them."""

    __slots__ = ("host", "sums", "mode", "per_parameter", "missing", "unsplit", "reason")

    def __init__(self, host: List[float], sums: Optional[torch.Tensor], mode: str, per_parameter, missing, unsplit,
                 reason):
        self.host = host
        """fp64 ``(d, a, b)`` of the rows on the CPU."""
        self.sums = sums
        """fp64 ``[3]`` ``(d, a, b)`` of the rows on the accelerator, still there; None when there are none."""
        self.mode, self.per_parameter, self.missing, self.unsplit, self.reason = (
            mode, per_parameter, missing, unsplit, reason)

    def result(self, sums: Optional[Sequence[float]] = None) -> SplitStats:
        """The statistics; ``sums``: :attr:`sums` already copied to the host (else copied here)."""
        dot, a, b = self.host
        if self.sums is not None:
            d2, a2, b2 = self.sums.tolist() if sums is None else sums
            dot, a, b = dot + d2, a + a2, b + b2
        return SplitStats(dot, a, b, self.mode, self.per_parameter, self.missing, self.unsplit, self.reason)


def read_stats(model, reset: bool = False, per_parameter: bool = False) -> StatsRead:
    """:func:`gradient_stats` that leaves the sums of accelerator rows on the device (see :class:`StatsRead`)."""
    plan = _plan(model)
    owned = plan.owned
    host, total = [0.0, 0.0, 0.0], None
    breakdown: Dict[str, Tuple[float, float, float]] = {}
    unsplit, modes, idle, sinks = {}, set(), [], 0
    for entry in plan.entries:
        sink = entry.sink()
        if sink is None:
            continue
        sinks += 1
        if sink.unsplit:
            unsplit.update(_model_names(sink, owned))
        acc = sink.acc
        if sink.count == 0 or acc is None:
            idle.append(entry)
            if reset:
                sink.reset()
            continue
        modes.add(sink.mode)
        rows = acc.tolist() if acc.is_cpu or per_parameter else None  # fp32 values are exact as floats
        if acc.is_cpu:
            for j, column in enumerate(zip(*(rows if entry.rows is None else [rows[i] for i in entry.rows]))):
                host[j] += sum(column)
        else:
            part = (acc if entry.rows is None else acc.index_select(0, sink.index(entry.rows, acc.device))).sum(
                0, dtype=torch.float64)
            total = part if total is None else total + part.to(total.device)
        if per_parameter:
            for i, ids in entry.groups:
                key = ",".join(owned[k] for k in ids)
                prev = breakdown.get(key, (0.0, 0.0, 0.0))
                breakdown[key] = tuple(x + y for x, y in zip(prev, rows[i]))
        if reset:
            sink.reset()
    if idle:
        covered = set().union(*(e.ids for e in plan.entries if e not in idle))
        missing = _with_grad(plan.named, covered)
    else:
        missing = _with_grad(plan.uncovered, ()) if plan.uncovered else ()
    reason = _reason(modes, sinks, unsplit, missing) if unsplit or missing or not modes else ""
    if missing and modes:
        log.warning("simigrad: %d parameter(s) have gradients but no statistics: %s", len(missing), ", ".join(missing))
    mode = "+".join(sorted(modes)) if modes else "none"
    return StatsRead(host, total, mode, breakdown if per_parameter else None, missing, unsplit, reason)


def _with_grad(named, covered) -> Tuple[str, ...]:
    """The names of the parameters that require a gradient, have one, and are not in ``covered``."""
    out = []
    for name, ref in named:
        p = ref()
        if p is not None and p.requires_grad and p.grad is not None and id(p) not in covered:
            out.append(name)
    return tuple(out)


def gradient_stats(model, reset: bool = False, per_parameter: bool = False) -> SplitStats:
    """The split-group statistics summed over every backward of ``model`` since the last reset.

    ``model`` may be the compiled module, a DDP wrapper, the module they wrap, or an iterable of parameters
    (named ``param<i>``). ``reset=True`` zeroes the accumulators after reading, and forgets which graphs were
    left unsplit, so ``unsplit`` and ``reason`` describe the backwards since the previous reset (one step, when
    the runtime reads once per step). ``per_parameter=True`` adds a name -> ``(d, a, b)`` breakdown (a bucket of
    parameters under DDP appears as one entry named by its parameters). The rows are summed on their device in
    fp64 and copied to the host once.
    """
    return read_stats(model, reset, per_parameter).result()


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
