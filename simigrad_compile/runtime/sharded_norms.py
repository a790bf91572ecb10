"""Per-parameter gradient norms when the gradients are sharded (FSDP2: ``DTensor`` gradients, ``Shard(0)``).

Each rank holds a shard of every gradient, so the norm of a gradient is the norm of its shards' norms: the
shards' ``p``-th powers summed over the ranks (the maximum for ``inf``), in one all-reduce of a vector with one
entry per gradient. Every rank then holds the same norms, so the boundary's decisions (skip a non-finite step,
the clip coefficient, the history's ``grad_norm``) are the same on every rank. A gradient that is not sharded
over the world (a plain tensor, a replicated ``DTensor``) is the same on every rank: its entry enters with
weight ``1 / world`` in the sum.
"""

from __future__ import annotations

import math
from typing import List

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from .. import compat


def is_sharded(grads: List[torch.Tensor]) -> bool:
    """True when some gradient is a ``DTensor`` (then :func:`sharded_norms` takes the norms)."""
    return any(isinstance(g, DTensor) for g in grads)


def _sharded_over_world(g: torch.Tensor, world: int) -> bool:
    return (isinstance(g, DTensor) and g.device_mesh.ndim == 1 and g.device_mesh.size() == world
            and isinstance(g.placements[0], Shard))


def sharded_norms(grads: List[torch.Tensor], norm_type: float) -> List[torch.Tensor]:
    """The ``norm_type``-norm of each whole gradient (fp64 0-d tensors), from the local shards and one
    all-reduce over the default process group. ``grads`` are in fp32 or wider (the caller widens them)."""
    world = dist.get_world_size()
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    norms = torch.stack([n.double() for n in compat.foreach_norm(local, norm_type)])
    if math.isinf(norm_type):
        dist.all_reduce(norms, op=dist.ReduceOp.MAX)
        return list(norms.unbind())
    weight = torch.tensor([1.0 if _sharded_over_world(g, world) else 1.0 / world for g in grads],
                          dtype=torch.float64, device=norms.device)
    powers = norms.pow(norm_type) * weight
    dist.all_reduce(powers)
    return list(powers.pow(1.0 / norm_type).unbind())


__all__ = ["is_sharded", "sharded_norms"]
