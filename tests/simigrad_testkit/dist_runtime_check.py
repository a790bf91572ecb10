"""AdaptiveBatching on a DDP model (``runtime``) or an FSDP2 model (``runtime_fsdp``: ``fully_shard`` on each layer
and the root): the runtime installs the split-group reduction, syncs only at the window's last micro-step, and its
first step matches an fp64 reference built from every rank's local window gradient."""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import simigrad_compile


def _sharded(net: torch.nn.Module) -> torch.nn.Module:
    for layer in (net.inp, net.mid, net.out, net):
        fully_shard(layer)
    return net


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def run_runtime_check(model_cls, rank: int, world: int, fsdp: bool = False) -> None:
    name = "runtime_fsdp" if fsdp else "runtime"
    torch.manual_seed(0)
    net = model_cls()
    local = copy.deepcopy(net)
    ddp = _sharded(copy.deepcopy(net)) if fsdp else DDP(copy.deepcopy(net), bucket_cap_mb=0.002)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    run = simigrad_compile.AdaptiveBatching(ddp, opt, batch_size=8 * world, max_micro_batch_size=4,
                                            min_batch_size=8 * world, target_similarity=0.2)
    x_all, y_all = model_cls.batch(160, torch.Generator().manual_seed(0))
    window, after_first = [], None
    for x, y in run.dataloader(torch.utils.data.TensorDataset(x_all, y_all), shuffle=True):
        if not run.history:
            window.append((x, y))
        F.cross_entropy(ddp(x), y).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
        if len(run.history) == 1 and after_first is None:
            after_first = [_full(p.detach()).clone() for p in ddp.parameters()]
        if len(run.history) == 4:
            break
    first = run.history[0]
    assert first["accumulation"] == 2 and first["batch_size"] == 8 * world, first
    samples = sum(len(x) for x, _ in window)
    for x, y in window:
        (F.cross_entropy(local(x), y) * (len(x) / samples)).backward()
    mine = torch.cat([p.grad.double().flatten() for p in local.parameters()])
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    half = world // 2
    g1, g2 = sum(every[:half]) / half, sum(every[half:]) / (world - half)
    cos = float(F.cosine_similarity(g1, g2, dim=0))
    if abs(first["cosine"] - cos) > 1e-5:
        raise AssertionError(f"{name}: first cosine {first['cosine']} vs fp64 reference {cos}")
    mean = sum(every) / world
    n1, n2 = samples * half, samples * (world - half)  # the noise family: McCandlish's two-batch estimators,
    big, n = float(mean @ mean), n1 + n2                # small = each group, big = all, averaged
    pairs = [((n * big - m * float(g @ g)) / (n - m), (float(g @ g) - big) / (1 / m - 1 / n)) for g, m in
             ((g1, n1), (g2, n2))]
    for key, want in (("signal", (pairs[0][0] + pairs[1][0]) / 2), ("noise", (pairs[0][1] + pairs[1][1]) / 2)):
        if abs(first[key] - want) > 1e-4 * abs(want) + 1e-7:
            raise AssertionError(f"{name}: first {key} {first[key]} vs fp64 reference {want}")
    offset = 0
    for p0, p1 in zip(local.parameters(), after_first):
        want = p0.detach().double() - 0.1 * first["lr_scale"] * mean[offset: offset + p0.numel()].view_as(p0)
        offset += p0.numel()
        if (p1.double() - want).abs().max() > 1e-6:
            raise AssertionError(f"{name}: the first step differs from SGD on the mean window gradient")
    sizes = torch.tensor([float(r["batch_size"]) for r in run.history] + [r["cosine"] for r in run.history])
    gathered = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(gathered, sizes)
    if not all(torch.equal(g, sizes) for g in gathered):
        raise AssertionError(f"{name}: ranks disagree on the batch sizes or cosines")
    assert all(math.isfinite(r["cosine"]) and r["skipped"] is None for r in run.history), run.history
    if rank == 0:
        print(f"CHECK {name} OK cos={first['cosine']:.6f} ref={cos:.6f} "
              f"batches={[r['batch_size'] for r in run.history]}", flush=True)
