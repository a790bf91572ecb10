"""FSDP2 check for dist_worker.py: the sharded split reduce-scatter against plain DDP and fp64 references."""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import simigrad_compile
from simigrad_compile.distributed.fsdp import enable_fsdp


def _flat(model, full=False) -> torch.Tensor:
    grads = [p.grad.full_tensor() if full else p.grad for p in model.parameters()]
    return torch.cat([g.detach().to(torch.float64).flatten() for g in grads])


def run_fsdp_check(rank: int, world: int) -> None:
    from simigrad_testkit.dist_worker import MLP  # noqa: PLC0415 - the worker is the importer

    torch.manual_seed(0)
    net = MLP()
    local, plain, sharded = copy.deepcopy(net), DDP(copy.deepcopy(net)), copy.deepcopy(net)
    for layer in (sharded.inp, sharded.mid, sharded.out):
        fully_shard(layer)
    fully_shard(sharded)
    enable_fsdp(sharded)
    worst = {"grad": 0.0, "stats": 0.0}
    for step, n in enumerate([8, 5]):
        gen = torch.Generator().manual_seed(1000 * step + rank + 1)
        x, y = MLP.batch(n, gen)
        for m in (local, plain, sharded):
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
        stats = simigrad_compile.gradient_stats(sharded, reset=True)
        assert stats.mode == "ranks", stats
        own = _flat(local)
        every = [torch.empty_like(own) for _ in range(world)]
        dist.all_gather(every, own)
        g1 = sum(every[0::2]) / len(every[0::2])
        g2 = sum(every[1::2]) / len(every[1::2])
        got, ref = _flat(sharded, full=True), _flat(plain)
        worst["grad"] = max(worst["grad"], float((got - ref).norm() / ref.norm()))
        for v, r in zip((stats.dot, stats.sq_norm_1, stats.sq_norm_2), (g1 @ g2, g1 @ g1, g2 @ g2)):
            worst["stats"] = max(worst["stats"], abs(v - float(r)) / abs(float(r)))
        assert math.isfinite(stats.cosine), stats
    if worst["grad"] > 1e-6 or worst["stats"] > 1e-5:
        raise AssertionError(f"fsdp: worst errors {worst}")
    if rank == 0:
        print("CHECK fsdp OK " + " ".join(f"{k}={v:.2e}" for k, v in worst.items()), flush=True)
