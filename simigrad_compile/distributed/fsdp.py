"""Sharded gradients (FSDP2 ``fully_shard``): the split-group reduction as FSDP's reduce-scatter, no all-gather.

FSDP reduce-scatters one flat input of ``N`` shards ``[s_0 .. s_{N-1}]`` (each unit's gradients, ``c`` elements a
rank) so that rank ``r`` keeps ``s_r`` of the mean. The groups are those of the DDP hook (:mod:`.layout`): ranks
``[0, N//2)`` (group 1, half A) and ``[N//2, N)`` (group 2, half B), any ``N >= 2``; rank ``r`` enters with
weight ``w_r = 2 n_r / n`` (:func:`.layout.make_weights`, equal counts unless :meth:`FsdpSplit.set_sample_counts`).
Per unit, on each rank (:class:`.layout.OwnerPlan`):

1. re-lay and scale the input (one pass): ``h`` rows ``[own shard | piece of the other half's shards]``
2. reduce-scatter the rows inside the half: the half's sum of its own shard and of its piece
3. send each part of the piece to the rank that owns it, receive the other half's sum of its own shard
4. ``kernels.shard_stats_mean(A's sum, B's sum, out=output)``: FSDP's shard of the mean + fp32 ``(d, a, b)``

Every rank sends ``(N - 1) c`` elements, what a ring reduce-scatter sends, at odd ``N`` too (plus at most
``lcm(L/|A|, L/|B|) - 1`` padding elements a shard: 1 at ``N = 3``). Each element is held by its owner only, so
each rank records the statistics of its own shard; one all-reduce of the ``[units, 3]`` rows per backward, in an
autograd final callback (after FSDP's own), gives every rank the same values, unscaled by the halves' weights.

The shard each rank keeps equals plain FSDP2's to fp32 rounding, not bit for bit: plain sums the ``N``
gradients in its ring's order, this sums each half first, then the halves (a different order of additions).

Reduce ops: FSDP passes ``AVG`` (fp32/bf16 reduction) or ``SUM`` with a post-division by ``N``
(``set_force_sum_reduction_for_comms``); both are honoured. Refused, with the reason: HSDP (a reduce-scatter
group smaller than the world), a user ``gradient_divide_factor`` (``PREMUL_SUM``), and fp16 reduction, whose
pre-division FSDP does not tell the reduce-scatter (the statistics would be off by its square).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from .. import compat
from .collectives import post_swap, reduce_scatter, wait_all
from .hook import _shard_stats_mean, unscale
from .layout import Layout, OwnerPlan, Weights, check_counts, make_layout, make_weights, owner_plan
from ..stats.gradient_stats import Sink

log = logging.getLogger("simigrad_compile")

_ATTR = "_simigrad_fsdp"


class FsdpSplit:
    """Process groups, sample weights, pending per-unit statistics and the sink of one FSDP-sharded model."""

    def __init__(self, root: torch.nn.Module, units: List[FSDPModule], layout: Layout) -> None:
        self.layout = layout
        self.counts: Optional[Tuple[int, ...]] = None
        self.weights: Weights = make_weights(layout, None)
        self.kernel: Optional[Callable] = None
        """Overrides ``kernels.shard_stats_mean`` (diagnostics)."""
        # new_group is collective over the world: every rank creates every group, in the same order.
        halves = {h: dist.new_group(list(h)) for h in (layout.half_a, layout.half_b)}
        pairs = {s: dist.new_group([s.a_rank, s.b_rank]) for s in layout.segments}
        self.half_group = halves[layout.half]
        self.pair_groups = {s: pairs[s] for s in layout.my_segments}
        self.stats_group = dist.new_group(list(range(layout.world)))
        names = {id(p): n for n, p in root.named_parameters()}
        self.sink = Sink("ranks", [[(names[id(p)], p) for p in unit_params(u)] for u in units])
        self.pending: Optional[torch.Tensor] = None
        self.pending_units: set = set()
        self.shards: Dict[int, int] = {}
        """Unit -> the ``c`` (elements a rank keeps) of its last reduce-scatter."""
        self._plans: Dict[int, OwnerPlan] = {}
        self._scratch: Dict[tuple, torch.Tensor] = {}

    def set_sample_counts(self, counts: Optional[Sequence[int]]) -> None:
        """Per-rank sample counts of the coming steps (the same list on every rank); ``None``: equal."""
        if counts is not None:
            counts = check_counts(counts, self.layout.world)
            for name, half in (("group 1", self.layout.half_a), ("group 2", self.layout.half_b)):
                if all(counts[r] == 0 for r in half):
                    log.warning("simigrad fsdp: %s (ranks %s) has no samples: statistics are NaN", name, list(half))
        self.counts = counts
        self.weights = make_weights(self.layout, counts)

    def plan(self, shard_numel: int) -> OwnerPlan:
        plan = self._plans.get(shard_numel)
        if plan is None:
            plan = self._plans[shard_numel] = owner_plan(self.layout, shard_numel)
        return plan

    def buffer(self, unit: int, role: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A scratch buffer reused across steps (fresh large CPU allocations page-fault on every step)."""
        key = (unit, role)
        old = self._scratch.get(key)
        if old is None or old.numel() != numel or old.dtype != like.dtype or old.device != like.device:
            old = self._scratch[key] = like.new_empty(numel)
        return old

    def record(self, unit: int, stats: torch.Tensor) -> None:
        if self.pending is None:
            self.pending = torch.zeros(len(self.sink.names), 3, dtype=torch.float32, device=stats.device)
            compat.queue_backward_callback(self.fold)
        self.pending[unit] += stats.reshape(3).to(torch.float32)
        self.pending_units.add(unit)

    def fold(self) -> None:
        rows, self.pending = self.pending, None
        dist.all_reduce(rows, group=self.stats_group)
        index = sorted(self.pending_units)
        self.pending_units = set()
        self.sink.add(unscale(rows[index], self.weights.stats_scale), index=index)


def unit_params(unit: FSDPModule) -> List[torch.nn.Parameter]:
    """The parameters ``unit`` reduces: its own and its submodules', less those of nested FSDP units."""
    out: List[torch.nn.Parameter] = []

    def walk(m: torch.nn.Module) -> None:
        out.extend(p for p in m.parameters(recurse=False) if p.requires_grad)
        for child in m.children():
            if not isinstance(child, FSDPModule):
                walk(child)

    walk(unit)
    return out


def _output_scale(op, dtype: torch.dtype, world: int) -> float:
    """What FSDP expects on top of the mean: 1 for ``AVG``, ``N`` for ``SUM`` (it divides by ``N`` after)."""
    if op == dist.ReduceOp.AVG:
        return 1.0
    if op == dist.ReduceOp.SUM and dtype in (torch.float32, torch.bfloat16, torch.float64):
        return float(world)
    if op == dist.ReduceOp.SUM:
        raise NotImplementedError(
            f"simigrad fsdp: reduction in {dtype}: FSDP pre-divides the gradients by a factor it does not pass "
            "to the reduce-scatter, so the statistics would be scaled; use "
            "MixedPrecisionPolicy(reduce_dtype=torch.float32) (or bfloat16)")
    raise NotImplementedError(
        f"simigrad fsdp: reduce op {op} (a gradient_divide_factor set on the module) is not supported: leave "
        "the divide factor unset (FSDP's mean)")


def relay(x: torch.Tensor, out: torch.Tensor, layout: Layout, plan: OwnerPlan, weight: float,
          scratch: Callable[[int], torch.Tensor]) -> None:
    """``out`` (``h`` rows ``[own shard | piece]``, :class:`.layout.OwnerPlan`) from FSDP's input ``x``
    (``[N, c]``), times ``weight``; ``scratch(numel)`` lends a buffer for the padded other half."""
    a, h = len(layout.half_a), plan.half
    mine, other = (x[:a], x[a:]) if layout.in_a else (x[a:], x[:a])
    rows = out.view(h, plan.shard + plan.piece)
    c, shard = x.shape[1], plan.shard
    if weight == 0.0:
        out.zero_()
        return
    torch.mul(mine, weight, out=rows[:, :c])
    if shard == c:
        torch.mul(other.reshape(h, plan.piece), weight, out=rows[:, shard:])
        return
    rows[:, c:shard].zero_()
    padded = scratch(other.shape[0] * shard).view(other.shape[0], shard)
    torch.mul(other, weight, out=padded[:, :c])
    padded[:, c:].zero_()
    rows[:, shard:].copy_(padded.view(h, plan.piece))


class SplitReduceScatter:
    """FSDP2's custom reduce-scatter (the ``ReduceScatter`` interface: ``allocate`` and ``__call__``)."""

    def __init__(self, split: FsdpSplit, unit: int) -> None:
        self.split, self.unit = split, unit

    def allocate(self, size, *, dtype, device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        sp, lay, unit = self.split, self.split.layout, self.unit
        if group.size() != lay.world:
            raise NotImplementedError(
                f"simigrad fsdp: reduce-scatter over {group.size()} of {lay.world} ranks (HSDP or a sub-mesh): "
                "the split needs FSDP to shard over the whole world")
        scale = _output_scale(op, input_tensor.dtype, lay.world)
        c = sp.shards[unit] = output_tensor.numel()
        plan = sp.plan(c)
        w = sp.weights.own
        if plan.half == 1 and lay.in_a and plan.shard == c:
            rows = input_tensor  # already [own shard | the other half's shards]: scaled in place
            if w == 0.0:
                rows.zero_()
            elif w != 1.0:
                rows.mul_(w)
        else:
            rows = sp.buffer(unit, "rows", lay.world * plan.shard, input_tensor)
            relay(input_tensor.view(lay.world, c), rows, lay, plan, w,
                  lambda n: sp.buffer(unit, "padded", n, input_tensor))
        reduced = rows
        if plan.half > 1:
            reduced = sp.buffer(unit, "reduced", plan.shard + plan.piece, input_tensor)
            reduce_scatter(reduced, rows, sp.half_group)
        own, piece = reduced[: plan.shard], reduced[plan.shard :]
        received = sp.buffer(unit, "received", plan.shard, input_tensor)
        works = []
        for t in plan.transfers:
            works += post_swap(piece[t.send[0] : t.send[1]], received[t.recv[0] : t.recv[1]], t.peer,
                               sp.pair_groups[t.segment])
        wait_all(works)
        a, b = (own, received) if lay.in_a else (received, own)
        _, stats = (sp.kernel or _shard_stats_mean())(a[:c], b[:c], out=output_tensor)
        sp.record(unit, stats)
        if scale != 1.0:
            output_tensor.mul_(scale)
        return None


def enable_fsdp(root: torch.nn.Module) -> Optional[FsdpSplit]:
    """Install the split reduce-scatter on every ``fully_shard`` unit of ``root`` (before its first backward).
    Returns its state (also reachable as :func:`fsdp_split`), or None at world size 1."""
    if getattr(root, _ATTR, None) is not None:
        return getattr(root, _ATTR)
    world = dist.get_world_size()
    if world == 1:
        log.info("simigrad fsdp: world size 1, no ranks to split: using the single-process group modes")
        return None
    units = fsdp_units(root)
    if not units:
        raise TypeError("simigrad fsdp: no fully_shard unit in the model: call fully_shard(...) before enable_fsdp")
    layout = make_layout(world, dist.get_rank())
    split = FsdpSplit(root, units, layout)
    for i, unit in enumerate(units):
        unit.set_custom_reduce_scatter(SplitReduceScatter(split, i))
    object.__setattr__(root, _ATTR, split)
    log.info("simigrad fsdp: %d unit(s), world %d, group 1 = ranks %s, group 2 = ranks %s%s; no all-gather",
             len(units), world, list(layout.half_a), list(layout.half_b),
             " (odd world: floor/ceil halves, each weighted by its samples)" if world % 2 else "")
    return split


def fsdp_units(root: torch.nn.Module) -> List[FSDPModule]:
    """The ``fully_shard`` units under ``root`` (``root`` itself included) that reduce parameters."""
    return [m for m in root.modules() if isinstance(m, FSDPModule) and unit_params(m)]


def set_gradient_sync(root: torch.nn.Module, sync: bool) -> None:
    """FSDP's ``set_requires_gradient_sync`` on every unit of ``root``: False inside an accumulation window (no
    reduce-scatter, no statistics; FSDP accumulates the unsharded gradients), True on its last micro-step."""
    for unit in fsdp_units(root):
        unit.set_requires_gradient_sync(sync, recurse=False)


def fsdp_split(root: torch.nn.Module) -> Optional[FsdpSplit]:
    """The state :func:`enable_fsdp` installed on ``root`` (or its compiled wrapper), else None."""
    m = root
    while m is not None and getattr(m, _ATTR, None) is None:
        inner = compat.compiled_original(m)
        m = inner if isinstance(inner, torch.nn.Module) else None
    return None if m is None else getattr(m, _ATTR)
