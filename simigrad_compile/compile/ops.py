"""The ``simigrad::`` graph ops that a rewritten backward graph calls (schemas, fakes, side effects).

Each records into the region whose backward is running, for the parameters it was called with
(:func:`.region.current`); passes import this module, never the region's run-time state.

They are tagged ``cudagraph_unsafe``: their Python side (finding the running region, accumulating into its
sink) must run at every backward, so under ``cuda_graphs=True`` Inductor partitions them out of the CUDA
graph instead of capturing one call and replaying its memory writes (which would record into the first
caller's sink at every replay, and count nothing).
"""

from __future__ import annotations

import functools
import json
from typing import Dict, List

import torch

from . import region as _regions


_UNSAFE = (torch.Tag.cudagraph_unsafe,)


@torch.library.custom_op("simigrad::split_grads", mutates_args=(), tags=_UNSAFE)
def split_grads(g1: List[torch.Tensor], g2: List[torch.Tensor], primal_indices: List[int]) -> List[torch.Tensor]:
    """``g = g1 + g2`` per parameter; records ``(g1.g2, |g1|^2, |g2|^2)`` into the active region."""
    from ..kernels import split_stats_sum

    grads, stats = split_stats_sum(list(g1), list(g2))
    recorder = _regions.current("split_grads")
    if recorder is not None:
        recorder.record(stats, primal_indices)
    return list(grads)


@split_grads.register_fake
def _(g1, g2, primal_indices):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in g1]


@torch.library.custom_op("simigrad::pair_stats", mutates_args=())
def pair_stats(own: List[torch.Tensor], total: List[torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    """Rows ``(own.other, |own|^2, |other|^2)`` with ``other = alpha*total + beta*own`` per element (the
    ``accumulate`` form's statistics from ``(g1, g)``: alpha=1, beta=-1)."""
    from ..kernels import pair_stats as stats_of_pairs

    return stats_of_pairs(list(own), list(total), alpha, beta)


@pair_stats.register_fake
def _(own, total, alpha, beta):
    return torch.empty(len(own), 3, dtype=torch.float32, device=own[0].device if own else "cpu")


# record_stats runs in every split backward: defined through ``torch.library.Library`` (no autograd wrapper,
# which ``custom_op`` adds to every call) for its dispatch cost. It returns nothing and its input never needs
# a gradient.
_LIB = torch.library.Library("simigrad", "FRAGMENT")
_LIB.define("record_stats(Tensor stats, int[] primal_indices) -> ()", tags=_UNSAFE)


def record_stats(stats: torch.Tensor, primal_indices: List[int]) -> None:
    """Records ``stats`` rows ``(dot, sq_norm_1, sq_norm_2)`` of the parameters ``primal_indices`` into the
    active region."""
    recorder = _regions.current("record_stats")
    if recorder is not None:
        recorder.record(stats, primal_indices)


_LIB.impl("record_stats", record_stats, "CompositeExplicitAutograd")


@torch.library.register_fake("simigrad::record_stats", lib=_LIB)
def _(stats, primal_indices):
    return None


@torch.library.custom_op("simigrad::mark_unsplit", mutates_args=(), tags=_UNSAFE)
def mark_unsplit(grad: torch.Tensor, reasons: str) -> torch.Tensor:
    """Passes ``grad`` through and tells the running region which parameters were left whole, and why."""
    recorder = _regions.current("mark_unsplit")
    if recorder is not None:
        recorder.mark_unsplit(_parsed(reasons))
    return grad.clone()


@functools.lru_cache(maxsize=64)
def _parsed(reasons: str) -> Dict[str, str]:
    return json.loads(reasons)


@mark_unsplit.register_fake
def _(grad, reasons):
    return torch.empty_like(grad)


torch.fx.node.has_side_effect(torch.ops.simigrad.split_grads.default)
torch.fx.node.has_side_effect(torch.ops.simigrad.record_stats.default)
torch.fx.node.has_side_effect(torch.ops.simigrad.mark_unsplit.default)
