"""Sharded gradients (FSDP2 ``fully_shard``): the split-group reduction as FSDP's reduce-scatter, no all-gather.

FSDP reduce-scatters one flat input of ``N`` shards ``[s_0 .. s_{N-1}]`` so that rank ``r`` keeps ``s_r`` of the
mean. Here the groups are the **even and odd ranks** and the partner of ``2i`` is ``2i+1``, so a reduce-scatter
inside a half hands half-rank ``i`` the contiguous pair ``(s_2i, s_2i+1)`` of its group's sum, with no copy:

1. reduce-scatter inside the half (``N/2`` ranks): ``(s_2i, s_2i+1)`` of the group sum     S (N-2)/N bytes
2. swap with the partner: each sends the shard the other keeps                             S/N
3. ``kernels.shard_stats_mean(A's s_r, B's s_r, out=output)``: FSDP's shard of the mean + fp32 ``(d, a, b)``

``S (N-1)/N`` bytes, exactly FSDP's reduce-scatter; the all-gather of the DDP route is skipped. Every element is
held by one rank, so each rank records the statistics of its own shard; one all-reduce of the ``[units, 3]``
rows per backward runs in an autograd final callback (after FSDP's own), so every rank records the same values.

Limits: an even world (odd N would need a re-laid-out input: not built); equal sample counts; one FSDP mesh
dimension (HSDP's replicate all-reduce is outside this).
"""

from __future__ import annotations

import logging
from typing import List, Optional

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from .. import compat
from .collectives import reduce_scatter, swap
from .hook import _shard_stats_mean
from ..stats.gradient_stats import Sink

log = logging.getLogger("simigrad_compile")


class FsdpSplit:
    """Process groups, pending per-unit statistics and the sink of one FSDP-sharded model."""

    def __init__(self, root: torch.nn.Module, units: List[FSDPModule]) -> None:
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        evens, odds = list(range(0, self.world, 2)), list(range(1, self.world, 2))
        halves = {0: dist.new_group(evens), 1: dist.new_group(odds)}
        pairs = {i: dist.new_group([2 * i, 2 * i + 1]) for i in range(self.world // 2)}
        self.half_group, self.pair_group = halves[self.rank % 2], pairs[self.rank // 2]
        self.stats_group = dist.new_group(list(range(self.world)))
        names = {id(p): n for n, p in root.named_parameters()}
        groups = [[(names[id(p)], p) for p in _unit_params(u)] for u in units]
        self.sink = Sink("ranks", groups)
        self.pending: Optional[torch.Tensor] = None
        self.pending_units: set = set()

    def record(self, unit: int, stats: torch.Tensor) -> None:
        if self.pending is None:
            self.pending = torch.zeros(len(self.sink.names), 3, dtype=torch.float32, device=stats.device)
            compat.queue_engine_callback(self.fold)
        self.pending[unit] += stats.reshape(3).to(torch.float32)
        self.pending_units.add(unit)

    def fold(self) -> None:
        rows, self.pending = self.pending, None
        dist.all_reduce(rows, group=self.stats_group)
        index = sorted(self.pending_units)
        self.pending_units = set()
        self.sink.add(rows[index], index=index)


def _unit_params(unit: FSDPModule) -> List[torch.nn.Parameter]:
    return compat.fsdp_sharded_params(unit)


class SplitReduceScatter(compat.fsdp_reduce_scatter_base()):
    def __init__(self, split: FsdpSplit, unit: int) -> None:
        self.split, self.unit = split, unit

    def allocate(self, size, *, dtype, device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        sp, s = self.split, output_tensor.numel()
        if group.size() != sp.world or op not in (dist.ReduceOp.AVG, dist.ReduceOp.SUM):
            raise NotImplementedError(f"simigrad fsdp: reduce-scatter over {group.size()} ranks with {op}")
        input_tensor.mul_(2.0 / sp.world)
        pair = input_tensor.new_empty(2 * s)
        reduce_scatter(pair, input_tensor, sp.half_group)
        in_a = sp.rank % 2 == 0
        mine, theirs = (pair[:s], pair[s:]) if in_a else (pair[s:], pair[:s])
        received = torch.empty_like(theirs)
        swap(theirs, received, sp.rank ^ 1, sp.pair_group)
        a, b = (mine, received) if in_a else (received, mine)
        _, stats = _shard_stats_mean()(a, b, out=output_tensor)
        sp.record(self.unit, stats)
        if op == dist.ReduceOp.SUM:
            output_tensor.mul_(sp.world)
        return None


def enable_fsdp(root: torch.nn.Module) -> Optional[FsdpSplit]:
    """Install the split reduce-scatter on every ``fully_shard`` unit of ``root`` (before its first backward)."""
    world = dist.get_world_size()
    if world == 1:
        log.info("simigrad fsdp: world size 1, no ranks to split: using the single-process group modes")
        return None
    if world % 2:
        raise NotImplementedError(f"simigrad fsdp: the sharded split needs an even world size, got {world}")
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    split = FsdpSplit(root, units)
    for i, unit in enumerate(units):
        unit.set_custom_reduce_scatter(SplitReduceScatter(split, i))
    log.info("simigrad fsdp: %d unit(s), group 1 = even ranks, group 2 = odd ranks, no all-gather", len(units))
    return split
