"""One torchrun launch that runs several distributed checks (each launch costs ~6 s, so they share one).

    cd tests && torchrun --nproc_per_node=N -m simigrad_testkit.dist_worker mlp transformer nosync bf16 uneven compiled fsdp

References are independent of the code under test: plain DDP on a copy of the model for the gradient, and
every rank's local gradient (a non-DDP copy), all-gathered and combined in fp64, for the statistics.
Rank 0 prints ``CHECK <name> OK <worst errors>``; any failure raises (non-zero exit).
"""

from __future__ import annotations

import copy
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import simigrad_compile
from simigrad_compile.distributed.traffic import Traffic
from simigrad_compile.distributed import enable_ddp, reduction, set_sample_counts

RANK = WORLD = 0


class MLP(torch.nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(12, width)
        self.mid = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, 5)

    def forward(self, x):
        return self.out(F.gelu(self.mid(F.gelu(self.inp(x)))))

    @staticmethod
    def batch(n: int, gen: torch.Generator):
        return torch.randn(n, 12, generator=gen), torch.randint(0, 5, (n,), generator=gen)


class TinyTransformer(torch.nn.Module):
    def __init__(self, vocab: int = 50, d: int = 32, ctx: int = 9) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(ctx, d) * 0.1)
        self.ln1 = torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, 4, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(d)
        self.ff = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.emb(tokens) + self.pos[: tokens.shape[1]]
        q = self.ln1(h)
        mask = torch.triu(torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool), 1)
        h = h + self.attn(q, q, q, attn_mask=mask, need_weights=False)[0]
        h = h + self.ff(self.ln2(h))
        return self.head(h).flatten(0, 1)

    @staticmethod
    def batch(n: int, gen: torch.Generator):
        tokens = torch.randint(0, 50, (n, 9), generator=gen)
        return tokens, torch.randint(0, 50, (n * 9,), generator=gen)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().to(torch.float64).flatten() for p in model.parameters()])


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def _reference_stats(local: torch.Tensor, counts):
    """fp64 (d, a, b) of the sample-weighted means of the two halves, and the weighted mean gradient."""
    every = [torch.empty_like(local) for _ in range(WORLD)]
    dist.all_gather(every, local)
    half = WORLD // 2
    n_a, n_b = sum(counts[:half]), sum(counts[half:])
    g1 = sum(counts[r] * every[r] for r in range(half)) / n_a
    g2 = sum(counts[r] * every[r] for r in range(half, WORLD)) / n_b
    mean = sum(counts[r] * every[r] for r in range(WORLD)) / (n_a + n_b)
    return (float(g1 @ g2), float(g1 @ g1), float(g2 @ g2)), mean


def _same_everywhere(values) -> None:
    t = torch.tensor(values, dtype=torch.float64)
    every = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(every, t)
    if not all(torch.equal(e, t) for e in every):
        raise AssertionError(f"statistics differ between ranks: {[e.tolist() for e in every]}")


def run_check(name, model_cls, sizes, *, micro=1, dtype=torch.float32, counts=None, compiled=False,
              same_data=False, bucket_cap_mb=0.002, grad_tol=1e-6, stats_tol=1e-5, width=None, bucket_view=False):
    torch.manual_seed(0)
    net = (model_cls(width) if width else model_cls()).to(dtype)
    local = copy.deepcopy(net)
    ours = DDP(copy.deepcopy(net), bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=bucket_view)
    plain = DDP(copy.deepcopy(net), bucket_cap_mb=bucket_cap_mb)
    enable_ddp(ours)
    run_ours = torch.compile(ours) if compiled else ours
    worst = {"grad": 0.0, "stats": 0.0, "cos": 0.0}
    for step, per_rank in enumerate(sizes):
        n_r = per_rank[RANK] if isinstance(per_rank, (list, tuple)) else per_rank
        step_counts = list(per_rank) if isinstance(per_rank, (list, tuple)) else [per_rank] * WORLD
        if counts:
            set_sample_counts(ours, step_counts)
        for m in (local, ours, plain):
            m.zero_grad(set_to_none=True)
        for k in range(micro):
            gen = torch.Generator().manual_seed(1000 * step + 10 * k + (0 if same_data else RANK + 1))
            x, y = model_cls.batch(max(n_r, 1), gen)
            x = x.to(dtype) if x.is_floating_point() else x
            weight = 0.0 if n_r == 0 else 1.0
            last = k == micro - 1
            for m, run in ((local, local), (ours, run_ours), (plain, plain)):
                ctx = m.no_sync() if (not last and m is not local) else _null()
                with ctx:
                    (F.cross_entropy(run(x).float(), y) * weight).backward()
        stats = simigrad_compile.gradient_stats(ours, reset=True)
        assert stats.mode == "ranks", stats
        ref_stats, ref_mean = _reference_stats(_flat(local), step_counts if counts else [1] * WORLD)
        got = _flat(ours)
        grad_ref = ref_mean if counts else _flat(plain)
        worst["grad"] = max(worst["grad"], _rel(got, grad_ref))
        for v, r in zip((stats.dot, stats.sq_norm_1, stats.sq_norm_2), ref_stats):
            worst["stats"] = max(worst["stats"], abs(v - r) / max(abs(r), 1e-30))
        ref_cos = ref_stats[0] / math.sqrt(ref_stats[1] * ref_stats[2])
        worst["cos"] = max(worst["cos"], abs(stats.cosine - ref_cos))
        if same_data and abs(stats.cosine - 1.0) > 1e-5:
            raise AssertionError(f"{name}: identical halves give cos {stats.cosine}")
        _same_everywhere([stats.dot, stats.sq_norm_1, stats.sq_norm_2])
    buckets = len(reduction(ours)._sinks[-1].names)
    if compiled and (buckets < 2 or torch._dynamo.utils.counters["stats"]["unique_graphs"] < 1):
        raise AssertionError(f"{name}: expected a compiled graph and >= 2 buckets, got {buckets} bucket(s)")
    if worst["grad"] > grad_tol or worst["stats"] > stats_tol:
        raise AssertionError(f"{name}: worst errors {worst} (grad tol {grad_tol}, stats tol {stats_tol})")
    if RANK == 0:
        print(f"CHECK {name} OK buckets={buckets} " + " ".join(f"{k}={v:.2e}" for k, v in worst.items()), flush=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_bytes() -> None:
    """Counted bytes of one step equal the ring formula of the padded buckets plus the statistics fold."""
    torch.manual_seed(0)
    ours = DDP(MLP(200), bucket_cap_mb=0.05)
    state = enable_ddp(ours)
    x, y = MLP.batch(4, torch.Generator().manual_seed(RANK))
    F.cross_entropy(ours(x), y).backward()  # DDP rebuilds its buckets after the first step
    traffic = Traffic()
    with traffic.counting():
        F.cross_entropy(ours(x), y).backward()
    lay, buckets = state.layout, state.last_buckets
    size = torch.finfo(torch.float32).bits // 8
    raw = sum(p.numel() for p in ours.parameters()) * size
    padded = sum(lay.padded(n) for n, _ in buckets) * size
    # The statistics fold of [buckets, 3] fp32 rows: an even world gathers them inside a half (h - 1 rows sent;
    # none at world 2), an odd world all-reduces them over the world.
    rows = 3 * len(buckets) * size
    fold = (WORLD // 2 - 1) * rows if WORLD % 2 == 0 else 2 * rows * (WORLD - 1) / WORLD
    expected = lay.bytes_sent(padded) + fold
    if abs(traffic.sent - expected) > 1e-6 * expected or padded > raw * 1.001:
        raise AssertionError(f"bytes: sent {traffic.sent}, expected {expected} (raw {raw}, padded {padded})")
    every = [torch.zeros(1, dtype=torch.float64) for _ in range(WORLD)]
    dist.all_gather(every, torch.tensor([traffic.sent], dtype=torch.float64))
    mean = float(sum(every)) / WORLD
    plain = 2 * raw * (WORLD - 1) / WORLD
    if abs(mean - fold - plain) > 2e-3 * plain:
        raise AssertionError(f"bytes: mean over ranks {mean - fold} vs plain all-reduce {plain}")
    if RANK == 0:
        print(f"CHECK bytes OK buckets={len(buckets)} sent={traffic.sent:.0f} plain={plain:.0f} "
              f"mean/plain={(mean - fold) / plain:.5f} calls={dict(traffic.calls)}", flush=True)


def check_collectives() -> None:
    """The gloo ring reduce-scatter / all-gather over the whole world (h = N) against plain arithmetic."""
    from simigrad_compile.distributed.collectives import all_gather, reduce_scatter

    group = dist.new_group(list(range(WORLD)))
    for numel in (WORLD, 7 * WORLD):
        mine = torch.arange(numel, dtype=torch.float32) * (RANK + 1)
        out = torch.empty(numel // WORLD)
        reduce_scatter(out, mine.clone(), group)
        total = torch.arange(numel, dtype=torch.float32) * sum(range(1, WORLD + 1))
        assert torch.equal(out, total.view(WORLD, -1)[RANK]), (out, total)
        gathered = torch.empty(numel)
        all_gather(gathered, out, group)
        assert torch.equal(gathered, total), (gathered, total)
    if RANK == 0:
        print("CHECK collectives OK", flush=True)


def check_world1() -> None:
    """World size 1: enable_ddp installs nothing and says so; gradients are DDP's."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("simigrad_compile").addHandler(handler)
    logging.getLogger("simigrad_compile").setLevel(logging.INFO)
    model = DDP(MLP())
    assert enable_ddp(model) is None and reduction(model) is None
    assert any("world size 1" in r.getMessage() for r in records), [r.getMessage() for r in records]
    print("CHECK world1 OK", flush=True)


def main(checks) -> None:
    global RANK, WORLD
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    uneven = [[3 + 2 * r for r in range(WORLD)], [5] * WORLD]
    if WORLD >= 3:
        uneven.append([0 if r == WORLD - 2 else 4 + r for r in range(WORLD)])
    table = {
        "mlp": lambda: run_check("mlp", MLP, [8, 5, 11]),
        "mlp_same_data": lambda: run_check("mlp_same_data", MLP, [6], same_data=True),
        "transformer": lambda: run_check("transformer", TinyTransformer, [4, 7, 3]),
        "nosync": lambda: run_check("nosync", MLP, [4, 6], micro=3, bucket_view=True),
        "bf16": lambda: run_check("bf16", MLP, [16, 9], dtype=torch.bfloat16, grad_tol=2e-2, stats_tol=3e-2),
        "fp16": lambda: run_check("fp16", MLP, [16], dtype=torch.float16, grad_tol=2e-3, stats_tol=1e-2),
        "uneven": lambda: run_check("uneven", MLP, uneven, counts=True),
        "bytes": check_bytes,
        "world1": check_world1,
        "collectives": check_collectives,
        "compiled": lambda: run_check("compiled", MLP, [8, 6], compiled=True, bucket_cap_mb=1, width=600),
    }
    for name in checks:
        if name in ("runtime", "runtime_fsdp"):
            from simigrad_testkit.dist_runtime_check import run_runtime_check  # noqa: PLC0415 - only where asked

            run_runtime_check(MLP, RANK, WORLD, fsdp=name == "runtime_fsdp")
            continue
        if name.startswith("fsdp"):
            from simigrad_testkit.fsdp_cases import run_fsdp_case  # noqa: PLC0415 - only where asked

            run_fsdp_case(name, RANK, WORLD)
            continue
        table[name]()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
