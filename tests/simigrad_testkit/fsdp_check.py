"""FSDP2 checks for dist_worker.py: the split reduce-scatter against plain FSDP2 and fp64 references.

References, independent of the code under test: plain ``fully_shard`` on a copy of the model (same policy) for
the gradient shards; every rank's local gradient of its whole batch (a plain, unsharded copy), all-gathered and
combined in fp64, for the statistics (and for the gradient under uneven sample counts, where plain FSDP2's
equal-weight mean is not the target). Rank 0 prints ``CHECK <name> OK <worst errors>``; a failure raises.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import simigrad_compile
from simigrad_compile.distributed import enable_fsdp, fsdp_split, set_sample_counts
from simigrad_compile.distributed.traffic import Traffic


def shard(net: torch.nn.Module, mp: Optional[MixedPrecisionPolicy] = None, ours: bool = True) -> torch.nn.Module:
    """A ``fully_shard`` copy of the MLP (one unit per layer, plus the root), with the split installed."""
    m = copy.deepcopy(net)
    kw = {"mp_policy": mp} if mp is not None else {}
    for layer in (m.inp, m.mid, m.out):
        fully_shard(layer, **kw)
    fully_shard(m, **kw)
    if ours:
        enable_fsdp(m)
    return m


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    """The full gradient (every rank's shards gathered) in fp64."""
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]
    return torch.cat([g.detach().to(torch.float64).flatten() for g in grads])


def halves_reference(local: torch.Tensor, counts: Sequence[int]):
    """fp64 ``(d, a, b)`` of the sample-weighted mean gradients of ranks ``[0, N//2)`` and ``[N//2, N)``, and
    the weighted mean gradient, from every rank's local gradient."""
    world = dist.get_world_size()
    every = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(every, local)
    half = world // 2
    n_a, n_b = sum(counts[:half]), sum(counts[half:])
    g1 = sum(counts[r] * every[r] for r in range(half)) / n_a
    g2 = sum(counts[r] * every[r] for r in range(half, world)) / n_b
    mean = sum(counts[r] * every[r] for r in range(world)) / (n_a + n_b)
    return (float(g1 @ g2), float(g1 @ g1), float(g2 @ g2)), mean


def same_everywhere(values: List[float]) -> None:
    t = torch.tensor(values, dtype=torch.float64)
    every = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(every, t)
    if not all(torch.equal(e, t) for e in every):
        raise AssertionError(f"statistics differ between ranks: {[e.tolist() for e in every]}")


def check_stats(stats, ref, worst: Dict[str, float]) -> None:
    assert stats.mode == "ranks", stats
    for v, r in zip((stats.dot, stats.sq_norm_1, stats.sq_norm_2), ref):
        worst["stats"] = max(worst["stats"], abs(v - r) / max(abs(r), 1e-30))
    ref_cos = ref[0] / math.sqrt(ref[1] * ref[2])
    worst["cos"] = max(worst["cos"], abs(stats.cosine - ref_cos))
    same_everywhere([stats.dot, stats.sq_norm_1, stats.sq_norm_2])


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def run_fsdp_check(name: str, rank: int, world: int, *, sizes, counts: bool = False, bf16: bool = False,
                   reduce_dtype: torch.dtype = torch.float32, micro: int = 1, width: int = 64, grad_tol: float = 1e-6,
                   stats_tol: float = 1e-5) -> None:
    """``sizes``: per step, the per-rank batch (an int, or a list of one count per rank); ``micro``: micro-batches
    per step, FSDP's gradient sync off for all but the last (``set_requires_gradient_sync``); ``width`` 63 makes
    the first unit's shard odd at 3 ranks (a padded shard)."""
    from simigrad_testkit.dist_worker import MLP  # noqa: PLC0415 - the worker is the importer

    torch.manual_seed(0)
    net = MLP(width)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype) if bf16 else None
    local = copy.deepcopy(net).to(torch.bfloat16) if bf16 else copy.deepcopy(net)
    ours, plain = shard(net, mp), shard(net, mp, ours=False)
    worst = {"grad": 0.0, "grad_vs_plain": 0.0, "max_abs_vs_plain": 0.0, "differing": 0.0, "stats": 0.0, "cos": 0.0}
    for step, per_rank in enumerate(sizes):
        step_counts = list(per_rank) if isinstance(per_rank, (list, tuple)) else [per_rank] * world
        n_r = step_counts[rank]
        if counts:
            set_sample_counts(ours, step_counts)
        weight = 0.0 if n_r == 0 else 1.0
        for m in (local, ours, plain):
            m.zero_grad(set_to_none=True)
        for k in range(micro):
            gen = torch.Generator().manual_seed(1000 * step + 10 * k + rank + 1)
            x, y = MLP.batch(max(n_r, 1), gen)
            for m in (local, ours, plain):
                if m is not local:
                    m.set_requires_gradient_sync(k == micro - 1)
                inp = x.to(torch.bfloat16) if (bf16 and m is local) else x
                (F.cross_entropy(m(inp).float(), y) * weight).backward()
        stats = simigrad_compile.gradient_stats(ours, reset=True)
        ref_stats, ref_mean = halves_reference(flat_grad(local), step_counts if counts else [1] * world)
        check_stats(stats, ref_stats, worst)
        got, by_plain = flat_grad(ours), flat_grad(plain)
        worst["grad"] = max(worst["grad"], _rel(got, ref_mean))
        if not counts:
            worst["grad_vs_plain"] = max(worst["grad_vs_plain"], _rel(got, by_plain))
            worst["max_abs_vs_plain"] = max(worst["max_abs_vs_plain"], float((got - by_plain).abs().max() / by_plain.abs().max()))
            worst["differing"] = max(worst["differing"], float((got != by_plain).float().mean()))
    if bf16 and fsdp_split(ours).sink.acc.dtype != torch.float32:
        raise AssertionError(f"{name}: statistics accumulate in {fsdp_split(ours).sink.acc.dtype}, not float32")
    if not counts and micro == 1 and reduce_dtype == torch.float32:
        _check_bytes(ours, plain, x, y, world, worst)
    if worst["grad"] > grad_tol or worst["grad_vs_plain"] > grad_tol or worst["stats"] > stats_tol:
        raise AssertionError(f"{name}: worst errors {worst} (grad tol {grad_tol}, stats tol {stats_tol})")
    if rank == 0:
        print(f"CHECK {name} OK " + " ".join(f"{k}={v:.2e}" for k, v in worst.items()), flush=True)


def _check_bytes(ours, plain, x, y, world: int, worst: Dict[str, float]) -> None:
    """Counted bytes of one backward: ours minus plain FSDP2 equals the padding of each unit's shard plus the
    statistics all-reduce (the backward's all-gathers are the same in both and cancel)."""
    sent = {}
    for key, m in (("ours", ours), ("plain", plain)):
        m.zero_grad(set_to_none=True)
        loss = F.cross_entropy(m(x).float(), y)
        traffic = Traffic()
        with traffic.counting():
            loss.backward()
        sent[key] = traffic.sent
    split = fsdp_split(ours)
    size = 4  # fp32 reduction
    padding = sum((split.plan(c).shard - c) * (world - 1) for c in split.shards.values()) * size
    units = len(split.sink.names)
    fold = 2 * 3 * units * size * (world - 1) / world
    extra = sent["ours"] - sent["plain"]
    if abs(extra - padding - fold) > 1e-6 * sent["plain"]:
        raise AssertionError(f"bytes: ours {sent['ours']}, plain {sent['plain']}, padding {padding}, fold {fold}")
    worst["bytes_over_plain"] = sent["ours"] - fold - sent["plain"]  # the padding: 0 at even worlds
