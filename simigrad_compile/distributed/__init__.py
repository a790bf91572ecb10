"""Data-parallel SimiGrad for the bytes of plain DDP: ``enable_ddp(ddp_model)``.

Group mode ``ranks``: ``g1`` and ``g2`` are the mean gradients of the first and second half of the ranks
(DESIGN.md section 3). Per DDP bucket of S bytes on N ranks (ring bytes each rank sends):

1. reduce-scatter inside the rank's half                        S (N-2)/N
2. swap of the shard with the partner rank (r <-> r + N/2)       2S/N
3. ``kernels.shard_stats_mean(shard_A, shard_B, out=shard)``: fp32 ``(d, a, b)`` and the mean shard, one pass
4. all-gather inside the half                                   S (N-2)/N

which is ``2S(N-1)/N``, a plain ring all-reduce (measured on loopback too: ``bench/bench_ddp.py``). The stages run in
one worker thread (:mod:`.hook`), bucket after bucket, while the backward goes on. The per-bucket rows are
folded by one all-reduce of a ``[buckets, 3]`` fp32 tensor per step (none at world 2, where both ranks compute
every row), issued after the step's last bucket and completed before ``backward()`` returns (DDP waits on the
hook's futures): every rank records identical values, so ``gradient_stats(ddp_model)`` is the same everywhere
with no collective at read time. Scratch memory, kept across steps: the shard and the received shard per bucket (``2S/N`` at N >= 4, S at
N = 2), plus a padded copy where a bucket does not divide into the layout's chunks.

Why a comm hook rather than rewriting collectives in the graph: it is DDP's official per-bucket API; it works
unchanged under eager DDP and ``torch.compile(ddp)`` (DDPOptimizer keeps DDP's reducer and its buckets); its
futures give the pipelining; and it leaves the user's graphs and Inductor untouched. The graph route (compiled
autograd + ``optimize_ddp="python_reducer"``) sees one ``all_reduce`` per parameter rather than per bucket and
only when ``.backward()`` runs inside the compiled function, so it would need its own bucketing and would cover
fewer training loops; it is not built.

Rules:

* World size 1: nothing to split across ranks; :func:`enable_ddp` logs it and installs nothing (the compiled
  backend's single-process modes ``batch``/``microsteps`` apply).
* Odd world size: halves of ``floor(N/2)`` and ``ceil(N/2)`` ranks, each group the sample-weighted mean of its
  ranks; the bucket is padded to a multiple of ``lcm`` of the half sizes so that both halves reduce-scatter
  equal shards, and each overlapping (A, B) pair exchanges its overlap (:mod:`.distributed_layout`). No rank is
  left out; the total bytes equal plain DDP's, the busiest rank sends ``1 + 1/(4m(m+1))`` times plain's
  (``N = 2m + 1``).
* Uneven batches: :func:`set_sample_counts` (the runtime calls it; default equal). The gradient is then
  ``sum_r n_r g_r / n`` (plain DDP's mean when counts are equal) and a rank with 0 samples enters with weight 0,
  logged. A half with no samples gives NaN statistics (logged), which the controller skips.
* Accumulation: under ``no_sync`` DDP calls no hook; the boundary's backward reduces the accumulated buckets.
* bf16/fp16 buckets: communication in the bucket dtype, statistics accumulated in fp32 by the kernel.
* Sharded gradients (FSDP2): :func:`enable_fsdp` (:mod:`.fsdp`): the reduce-scatter only, no all-gather; any
  world size, the same halves and weights, :func:`set_sample_counts` too (docs/distributed.md).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .. import compat
from .fsdp import enable_fsdp, fsdp_split, fsdp_units, set_gradient_sync
from .hook import SplitReduction, ddp_hook
from .layout import make_layout

log = logging.getLogger("simigrad_compile")

_ATTR = "_simigrad_reduction"


def find_ddp(model: torch.nn.Module) -> DistributedDataParallel:
    """The ``DistributedDataParallel`` module under ``model``'s compile wrappers; TypeError when there is none."""
    m = model
    while not isinstance(m, DistributedDataParallel):
        inner = compat.compiled_original(m)
        if not isinstance(inner, torch.nn.Module):
            raise TypeError(f"simigrad: expected a DistributedDataParallel model (or its compiled wrapper), got {type(model).__name__}")
        m = inner
    return m


def enable_ddp(ddp_model: torch.nn.Module) -> Optional[SplitReduction]:
    """Install the split-group reduction on ``ddp_model`` (DDP or ``torch.compile(DDP)``), before its first
    backward. Returns its state, or None at world size 1."""
    ddp = find_ddp(ddp_model)
    if getattr(ddp, _ATTR, None) is not None:
        return getattr(ddp, _ATTR)
    group = ddp.process_group
    world = dist.get_world_size(group)
    if world == 1:
        log.info("simigrad ddp: world size 1, no ranks to split: using the single-process group modes")
        return None
    if dist.get_world_size() != world:
        raise NotImplementedError("simigrad ddp: the DDP process group must be the default (world) group")
    layout = make_layout(world, dist.get_rank())
    state = SplitReduction(ddp.module, layout)
    ddp.register_comm_hook(state, ddp_hook)
    object.__setattr__(ddp, _ATTR, state)
    log.info(
        "simigrad ddp: world %d, group 1 = ranks %s, group 2 = ranks %s%s; no rank excluded",
        world, list(layout.half_a), list(layout.half_b),
        " (odd world: floor/ceil halves, each weighted by its samples)" if world % 2 else "",
    )
    return state


def reduction(model: torch.nn.Module) -> Optional[SplitReduction]:
    return getattr(find_ddp(model), _ATTR, None)


def set_sample_counts(model: torch.nn.Module, counts: Optional[Sequence[int]]) -> None:
    """Per-rank sample counts for the coming steps (the same list on every rank); ``None`` restores equal.
    ``model``: a DDP model given to :func:`enable_ddp`, or an FSDP2 root given to :func:`enable_fsdp`."""
    state = fsdp_split(model)
    if state is None:
        state = reduction(model)
    if state is None:
        raise RuntimeError("simigrad: set_sample_counts needs enable_ddp(model) or enable_fsdp(model) first "
                           "(world size >= 2)")
    state.set_sample_counts(counts)


__all__ = ["enable_ddp", "enable_fsdp", "find_ddp", "fsdp_split", "fsdp_units", "reduction", "set_gradient_sync",
           "set_sample_counts", "SplitReduction"]
