"""The ``simigrad::`` graph ops that a rewritten backward graph calls (schemas, fakes, side effects).

Each records into "the region whose backward is running" (:func:`.region.current`); passes import this module,
never the region's run-time state.
"""

from __future__ import annotations

import json
from typing import List

import torch

from . import region as _regions


@torch.library.custom_op("simigrad::split_grads", mutates_args=())
def split_grads(g1: List[torch.Tensor], g2: List[torch.Tensor], primal_indices: List[int]) -> List[torch.Tensor]:
    """``g = g1 + g2`` per parameter; records ``(g1.g2, |g1|^2, |g2|^2)`` into the active region."""
    from ..kernels import split_stats_sum

    grads, stats = split_stats_sum(list(g1), list(g2))
    region = _regions.current("split_grads")
    if region is not None:
        region.record(stats, primal_indices)
    return list(grads)


@split_grads.register_fake
def _(g1, g2, primal_indices):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in g1]


@torch.library.custom_op("simigrad::record_stats", mutates_args=())
def record_stats(stats: torch.Tensor, primal_indices: List[int]) -> None:
    """Records ``stats`` rows ``(d, a, b)`` of the parameters ``primal_indices`` into the active region."""
    region = _regions.current("record_stats")
    if region is not None:
        region.record(stats, primal_indices)


@record_stats.register_fake
def _(stats, primal_indices):
    return None


@torch.library.custom_op("simigrad::mark_unsplit", mutates_args=())
def mark_unsplit(grad: torch.Tensor, reasons: str) -> torch.Tensor:
    """Passes ``grad`` through and tells the active region which parameters were left whole, and why."""
    region = _regions.current("mark_unsplit")
    if region is not None:
        region.sink.mark_unsplit(json.loads(reasons))
    return grad.clone()


@mark_unsplit.register_fake
def _(grad, reasons):
    return torch.empty_like(grad)


torch.fx.node.has_side_effect(torch.ops.simigrad.split_grads.default)
torch.fx.node.has_side_effect(torch.ops.simigrad.record_stats.default)
torch.fx.node.has_side_effect(torch.ops.simigrad.mark_unsplit.default)
