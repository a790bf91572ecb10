"""The split-group DDP/FSDP reduction: layout arithmetic in-process, the rest in one torchrun launch per world
size (tests/simigrad_testkit/dist_worker.py runs several checks per launch; each launch costs ~6 s)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from simigrad_compile.distributed.hook import bucket_row, unscale
from simigrad_compile.distributed.fsdp import relay
from simigrad_compile.distributed.layout import check_counts, make_layout, make_weights, owner_plan
from simigrad_compile.kernels import torch_stats
from simigrad_compile.stats.gradient_stats import Sink
from simigrad_testkit.launch import run_checks



@pytest.mark.parametrize("world", [2, 3, 4, 5, 6, 7, 8, 9])
def test_layout_covers_every_chunk_once(world):
    lay = make_layout(world, 0)
    assert len(lay.half_a) == world // 2 and len(lay.half_b) == world - world // 2
    for side in ("a_rank", "b_rank"):
        covered = sorted(c for s in lay.segments for c in range(s.lo, s.hi))
        assert covered == list(range(lay.chunks)), side
    for rank in range(world):
        mine = make_layout(world, rank)
        lo, hi = mine.own_chunks
        assert sorted(c for s in mine.my_segments for c in range(s.lo, s.hi)) == list(range(lo, hi))
    if world % 2 == 0:
        assert [(s.a_rank, s.b_rank) for s in lay.segments] == [(r, r + world // 2) for r in range(world // 2)]


@pytest.mark.parametrize("world", [2, 3, 4, 5, 8])
def test_bytes_match_plain_all_reduce(world):
    """Summed over ranks the reduction sends exactly a ring all-reduce's bytes; per rank too when N is even."""
    size = 1000 * math.lcm(world // 2, world - world // 2)
    per_rank = [make_layout(world, r).bytes_sent(size) for r in range(world)]
    plain = 2 * size * (world - 1) / world
    assert sum(per_rank) == pytest.approx(world * plain)
    if world % 2 == 0:
        assert per_rank == pytest.approx([plain] * world)
    else:
        m = world // 2
        assert max(per_rank) / plain == pytest.approx(1 + 1 / (4 * m * (m + 1)))


def test_weights_reproduce_the_sample_weighted_mean():
    lay = make_layout(3, 1)
    w = make_weights(lay, [2, 3, 5])
    assert w.own == pytest.approx(2 * 3 / 10)
    assert (w.alpha, w.beta) == pytest.approx((2 * 2 / 10, 2 * 8 / 10))
    assert make_weights(make_layout(4, 0), None).own == pytest.approx(0.5)
    assert all(math.isnan(x) for x in make_weights(lay, [0, 3, 5]).stats_scale)


def test_bad_counts_raise():
    with pytest.raises(ValueError, match="3 non-negative ints"):
        check_counts([1, 2], 3)
    with pytest.raises(ValueError, match="sum to 0"):
        check_counts([0, 0], 2)


@pytest.mark.parametrize("counted", [[True], [False], [True, False]])
def test_hook_statistics_stay_on_the_gradients_device(counted):
    """The hook's per-bucket and fold arithmetic on a non-CPU device type ('meta'): a CPU tensor anywhere in it
    (zeros for a rank that counts no segment, the unscaling divisor) raises, as it would under NCCL."""
    device = torch.device("meta")
    parts = [torch.empty(10, device=device) for _ in counted]
    others = [torch.empty(10, device=device) for _ in counted]
    row = bucket_row(torch_stats.shard_stats_mean, parts, others, counted, device)
    folded = unscale(torch.stack([row, row]), make_weights(make_layout(3, 0), [1, 2, 3]).stats_scale)
    sink = Sink("ranks", [[("w", torch.nn.Parameter(torch.empty(1)))], [("b", torch.nn.Parameter(torch.empty(1)))]])
    sink.add(folded)
    assert {row.device, folded.device, sink.acc.device} == {device}
    assert row.shape == (3,) and folded.dtype == torch.float32


def test_hook_bucket_arithmetic_against_fp64():
    g = torch.Generator().manual_seed(0)
    mine = [torch.randn(7, generator=g), torch.randn(5, generator=g)]
    theirs = [torch.randn(7, generator=g), torch.randn(5, generator=g)]
    a, b = [t.double() for t in mine], [t.double() for t in theirs]
    row = bucket_row(torch_stats.shard_stats_mean, mine, theirs, [True, False], torch.device("cpu"))
    want = torch.stack([a[0] @ b[0], a[0] @ a[0], b[0] @ b[0]])
    assert torch.allclose(row.double(), want, rtol=1e-5)
    assert all(torch.allclose(m.double(), (x + y) / 2) for m, x, y in zip(mine, a, b))
    scale = (0.5, 0.25, 4.0)
    assert torch.allclose(unscale(row[None], scale)[0].double(), want / torch.tensor(scale, dtype=torch.float64),
                          rtol=1e-5)



def _simulate_owner_reduce_scatter(world, c, counts, gen):
    """Every rank of the FSDP owner exchange in one process (sums in place of the half reduce-scatters and the
    sends): the shards each rank keeps and the summed (d, a, b) rows of the shard pairs."""
    xs = [torch.randn(world, c, generator=gen, dtype=torch.float64) for _ in range(world)]
    lays = [make_layout(world, r) for r in range(world)]
    plans = [owner_plan(lay, c) for lay in lays]
    rows = []
    for r, (lay, plan) in enumerate(zip(lays, plans)):
        out = torch.full((world * plan.shard,), float("nan"), dtype=torch.float64)
        relay(xs[r], out, lay, plan, make_weights(lay, counts).own, lambda n: torch.empty(n, dtype=torch.float64))
        rows.append(out)
    reduced = {}
    for half in (lays[0].half_a, lays[0].half_b):
        total = sum(rows[r] for r in half).view(len(half), -1)
        reduced.update({r: total[i] for i, r in enumerate(half)})
    kept, stats = {}, torch.zeros(3, dtype=torch.float64)
    for r, (lay, plan) in enumerate(zip(lays, plans)):
        own, received = reduced[r][: plan.shard], torch.full((plan.shard,), float("nan"), dtype=torch.float64)
        for t in plan.transfers:
            theirs = next(u for u in plans[t.peer].transfers if u.segment == t.segment)
            piece = reduced[t.peer][plans[t.peer].shard :]
            received[t.recv[0] : t.recv[1]] = piece[theirs.send[0] : theirs.send[1]]
        a, b = (own, received) if lay.in_a else (received, own)
        kept[r] = ((a + b) / 2)[:c]
        stats += torch.stack([a @ b, a @ a, b @ b])
    return xs, kept, unscale(stats[None], make_weights(lays[0], counts).stats_scale)[0], plans


@pytest.mark.parametrize("world", [2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("c", [1, 5, 12])
def test_fsdp_owner_exchange_against_fp64(world, c):
    """The FSDP owner plan: each rank keeps the sample-weighted mean of its own shard, the statistics are those of
    the two halves' weighted means, and every rank sends a ring reduce-scatter's elements (of the padded shard)."""
    gen = torch.Generator().manual_seed(world * 100 + c)
    counts = [1 + (3 * r) % 5 for r in range(world)]
    xs, kept, stats, plans = _simulate_owner_reduce_scatter(world, c, counts, gen)
    n, half = sum(counts), world // 2
    for r in range(world):
        want = sum(counts[q] * xs[q][r] for q in range(world)) / n
        assert torch.allclose(kept[r], want, rtol=1e-12, atol=1e-12), r
    g1 = sum(counts[q] * xs[q] for q in range(half)).flatten() / sum(counts[:half])
    g2 = sum(counts[q] * xs[q] for q in range(half, world)).flatten() / sum(counts[half:])
    assert torch.allclose(stats, torch.stack([g1 @ g2, g1 @ g1, g2 @ g2]), rtol=1e-12)
    m = world // 2
    for plan in plans:
        assert plan.sent == (world - 1) * plan.shard
        assert c <= plan.shard < c + (1 if world % 2 == 0 else m * (m + 1))
        covered = sorted(i for t in plan.transfers for i in range(*t.recv))
        assert covered == list(range(plan.shard))
        assert sorted(i for t in plan.transfers for i in range(*t.send)) == list(range(plan.piece))


FSDP = ["fsdp", "fsdp_uneven", "fsdp_bf16", "fsdp_bf16_reduce", "fsdp_accum"]
LAUNCHES = {
    1: ["world1"],
    2: ["collectives", "mlp", "mlp_same_data", "transformer", "nosync", "bf16", "fp16", "uneven", "bytes", "compiled", *FSDP, "runtime",
        "runtime_fsdp"],
    3: ["collectives", "mlp", "transformer", "nosync", "bf16", "uneven", "bytes", *FSDP, "runtime", "runtime_fsdp"],
    4: ["collectives", "mlp", "transformer", "nosync", "bf16", "uneven", "bytes", *FSDP],
}


def _launch(world, checks, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "simigrad_testkit.dist_worker", *checks]
    run_checks(cmd, checks, timeout=300, **env)


@pytest.mark.slow
@pytest.mark.parametrize("world", sorted(LAUNCHES))
def test_distributed_checks(world):
    _launch(world, LAUNCHES[world])


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_at_other_world_sizes(tmp_path):
    """DCP checkpoint of FSDP2 + split reduce-scatter + Adam saved at 2 ranks (and resumed there bit for bit),
    loaded at 3 and at 4 ranks: the same state bit for bit, then right gradients and statistics."""
    _launch(2, ["fsdp_dcp_save"], SIMIGRAD_FSDP_CKPT=str(tmp_path))
    for world in (3, 4):
        _launch(world, ["fsdp_dcp_load"], SIMIGRAD_FSDP_CKPT=str(tmp_path))
