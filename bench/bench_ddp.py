"""Data-parallel SimiGrad vs plain DDP vs the original SimiGrad scheme: bytes per rank and step time (gloo on CPU,
or NCCL with one GPU per rank).

    python bench/bench_ddp.py                       # worlds 2 and 4, widths 512 and 1024; table + bench/results/ddp_*.json
    python bench/bench_ddp.py --worlds 2 --widths 256 --repeats 5
    python bench/bench_ddp.py --backend nccl --worlds 2 --widths 2048 4096 --batch 64 --bucket-mb 25   # one GPU per rank
    python bench/bench_ddp.py --collectives 2 8 --repeats 21   # one bucket's communication: p2p rings vs gloo native

Schemes, all on the same model and data, interleaved step by step in one process per rank:

* ``plain``: DDP's built-in all-reduce (timing); bytes counted on a twin with the stock Python ``allreduce_hook``.
* ``ours``: :func:`simigrad_compile.distributed.enable_ddp` (RS in half, partner exchange, kernel, AG in half).
* ``ours_comm_only``: ours with the statistics kernel replaced by a bare mean (diagnostic: the communication
  scheme's own cost, without the kernel's CPU time).
* ``original``: the 2020 SimiGrad DeepSpeed fork's reduction, as a hook: all-reduce inside each half, rank N/2
  sends its half's whole sum to rank 0, rank 0 computes the statistics and broadcasts them, then the full
  all-reduce. The similarity part blocks the backward (it was serial in the original too); the final all-reduce
  is asynchronous like plain DDP's.

Bytes, two ways: :class:`simigrad_compile.distributed.traffic.Traffic` counts each collective call with the ring
formulas (``2B(h-1)/h`` for an all-reduce, ...), checked against ``2S(N-1)/N`` for S gradient bytes; and the
loopback interface's transmitted bytes (``/proc/net/dev``, all ranks together, divided by N; the minimum of a few
tries, since other processes on the machine may use loopback too) show what each backend really sends. Time: median (min,
max) over repeats of the slowest rank's forward+backward. Breakdown (ours): backward compute (start to the last
bucket's hook), the exposed tail after it, the kernel time and how much of it ran while the backward was still
computing or other buckets were communicating.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMES = ("plain", "ours", "ours_comm_only", "original")


class Net(torch.nn.Module):
    def __init__(self, width: int, depth: int = 4) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 10)

    def forward(self, x):
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.head(x)


class Original:
    """State of the original scheme's hook (see the module docstring)."""

    def __init__(self) -> None:
        n, r = dist.get_world_size(), dist.get_rank()
        half_a, half_b = list(range(n // 2)), list(range(n // 2, n))
        groups = {0: dist.new_group(half_a), 1: dist.new_group(half_b)}
        self.half = groups[0 if r < n // 2 else 1]
        self.pair = dist.new_group([0, n // 2])
        self.world = dist.new_group(list(range(n)))
        self.n, self.rank, self.leader_b = n, r, n // 2
        self.stats = []


def original_hook(state: Original, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buf = bucket.buffer()
    half_sum = buf.clone()
    dist.all_reduce(half_sum, group=state.half)
    if state.rank == state.leader_b:
        dist.send(half_sum, group_dst=0, group=state.pair)
    stats = torch.zeros(3, dtype=torch.float32, device=buf.device)
    if state.rank == 0:
        other = torch.empty_like(half_sum)
        dist.recv(other, group_src=1, group=state.pair)
        a, b = half_sum.float(), other.float()
        stats = torch.stack([a @ b, a @ a, b @ b])
    dist.broadcast(stats, src=0, group=state.world)
    state.stats.append(stats)
    buf.div_(state.n)
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])


original_hook.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}


def _bare_mean(a, b, out=None):
    out = torch.add(a, b, out=out) if out is not None else a + b
    return out.mul_(0.5), torch.zeros(1, 3, device=a.device)


def _loopback_tx() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith("lo:"):
                return int(line.split(":", 1)[1].split()[8])
    return -1


def _wire_bytes(step, tries: int = 3) -> float | None:
    """Loopback bytes of one step (barriers included), per rank; the minimum over tries. None on NCCL (NVLink and
    shared memory do not pass the loopback interface)."""
    if dist.get_backend() != "gloo":
        return None
    best = float("inf")
    for _ in range(tries):
        dist.barrier()
        before = _loopback_tx()
        step()
        dist.barrier()
        best = min(best, _loopback_tx() - before)
    t = torch.tensor([best], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t) / dist.get_world_size()


DEVICE = torch.device("cpu")
"""Where the model, the data and the small result exchanges live: cpu on gloo, this rank's GPU on NCCL."""


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _mean_max(x: float):
    every = [torch.zeros(1, dtype=torch.float64, device=DEVICE) for _ in range(dist.get_world_size())]
    dist.all_gather(every, torch.tensor([x], dtype=torch.float64, device=DEVICE))
    vals = [float(v) for v in every]
    return {"mean": sum(vals) / len(vals), "max": max(vals), "per_rank": vals}


def _breakdown(trace, t0: float, t_end: float) -> dict:
    by = {}
    for t, i, ev in trace:
        by.setdefault(i, {})[ev] = t
    buckets = sorted(i for i in by if i >= 0)
    last_hook = max(by[i]["hook"] for i in buckets)
    busy = [(t0, last_hook)] + [(by[i]["hook"], by[i].get("all_gather", by[i]["kernel"])) for i in buckets]
    kernel_total = hidden = 0.0
    for i in buckets:
        ks, ke = by[i]["kernel_start"], by[i]["kernel"]
        kernel_total += ke - ks
        others = [busy[0]] + [b for j, b in zip(buckets, busy[1:]) if j != i]
        hidden += _covered(ks, ke, others)
    return {"backward_compute_s": last_hook - t0, "exposed_tail_s": t_end - last_hook,
            "kernel_s": kernel_total, "kernel_hidden_frac": hidden / kernel_total if kernel_total else 1.0}


def _covered(lo: float, hi: float, intervals) -> float:
    """Length of [lo, hi] covered by the union of intervals."""
    cuts = sorted((max(a, lo), min(b, hi)) for a, b in intervals if min(b, hi) > max(a, lo))
    total, end = 0.0, lo
    for a, b in cuts:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def run_world(widths, repeats: int, warmup: int, batch: int, bucket_mb: float) -> list:
    from simigrad_compile.distributed import enable_ddp
    from simigrad_compile.distributed.traffic import Traffic

    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for width in widths:
        torch.manual_seed(0)
        net = Net(width)
        models = {}
        for s in (*SCHEMES, "plain_counted"):
            module = Net(width)
            module.load_state_dict(net.state_dict())
            models[s] = DDP(module.to(DEVICE), bucket_cap_mb=bucket_mb)
        ours = enable_ddp(models["ours"])
        enable_ddp(models["ours_comm_only"]).kernel = _bare_mean
        models["original"].register_comm_hook(Original(), original_hook)
        models["plain_counted"].register_comm_hook(None, allreduce_hook)
        gen = torch.Generator().manual_seed(rank)
        x, y = torch.randn(batch, width, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
        x, y = x.to(DEVICE), y.to(DEVICE)

        def step(name):
            m = models[name]
            m.zero_grad(set_to_none=True)
            _sync()
            dist.barrier()
            t0 = time.perf_counter()
            F.cross_entropy(m(x), y).backward()
            _sync()
            t1 = time.perf_counter()
            return t0, t1

        for _ in range(warmup):
            for name in models:
                step(name)
        grad_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
        sent = {}
        for name, counted in (("plain", "plain_counted"), ("ours", "ours"), ("original", "original")):
            traffic = Traffic()
            with traffic.counting():
                step(counted)
            sent[name] = _mean_max(traffic.sent)
            sent[name]["wire"] = _wire_bytes(lambda: step(name))
        times = {s: [] for s in SCHEMES}
        parts = []
        ours.tracing = True
        for rep in range(repeats):
            order = SCHEMES if rep % 2 == 0 else tuple(reversed(SCHEMES))
            for name in order:
                t0, t1 = step(name)
                times[name].append(_max_over_ranks(t1 - t0))
                if name == "ours":
                    parts.append(_breakdown(ours.last_trace, t0, t1))
        ours.tracing = False
        plain_formula = 2 * grad_bytes * (world - 1) / world
        med = {s: statistics.median(v) for s, v in times.items()}
        rows.append({
            "world": world, "width": width, "grad_bytes": grad_bytes, "buckets": len(ours.last_buckets),
            "bytes_sent": sent, "plain_formula_bytes": plain_formula,
            "bytes_ratio": {s: sent[s]["mean"] / sent["plain"]["mean"] for s in sent},
            "bytes_ratio_max_rank": {s: sent[s]["max"] / sent["plain"]["max"] for s in sent},
            "wire_ratio": {s: sent[s]["wire"] / sent["plain"]["wire"] for s in sent} if sent["plain"]["wire"] else None,
            "step_s": {s: {"median": med[s], "min": min(v), "max": max(v)} for s, v in times.items()},
            "time_ratio": {s: med[s] / med["plain"] for s in SCHEMES},
            "breakdown_ours": {k: statistics.median(p[k] for p in parts) for k in parts[0]},
        })
        del models
    return rows


COLLECTIVE_VARIANTS = ("plain", "p2p_rings", "native_rs_ag", "native_ar_swap")


def collective_bytes(variant: str, size: int, n: int) -> float:
    """Bytes each rank sends for one bucket of ``size`` bytes (gloo: reduce_scatter_tensor is an all-reduce)."""
    h = n // 2
    return {"plain": 2 * size * (n - 1) / n,
            "p2p_rings": 2 * size * (n - 1) / n,
            "native_rs_ag": 2 * size * (h - 1) / h + 2 * size / n + size * (h - 1) / h,
            "native_ar_swap": 2 * size * (h - 1) / h + size}[variant]


def run_collectives(sizes_mb, repeats: int) -> list:
    """One bucket's communication, without the backward: plain all-reduce against three ways to do the split-group
    reduction on gloo (the kernel apart): the point-to-point rings the hook uses (Python, one thread), gloo's
    native reduce-scatter and all-gather on the half groups, and a native all-reduce in the half followed by a
    swap of the whole half sum (no all-gather; more bytes). Each repeat runs every variant once, in turn."""
    from simigrad_compile.distributed.collectives import all_gather, reduce_scatter, swap
    from simigrad_compile.kernels import shard_stats_mean

    rank, n = dist.get_rank(), dist.get_world_size()
    h = n // 2
    halves = [dist.new_group(list(range(h))), dist.new_group(list(range(h, n)))]
    half = halves[rank // h]
    pairs = [dist.new_group([r, r + h]) for r in range(h)]
    pair, peer = pairs[rank % h], (rank + h) % n
    rows = []
    for mb in sizes_mb:
        numel = int(mb * 2**20 / 4) // n * n
        buf, out = torch.randn(numel), torch.empty(numel)
        shard, other = torch.empty(numel // h), torch.empty(numel // h)
        whole_other = torch.empty(numel)

        def p2p():
            reduce_scatter(shard, buf, half)
            swap(shard, other, peer, pair)
            all_gather(out, shard, half)

        def native_rs_ag():
            if h > 1:
                dist.reduce_scatter_tensor(shard, buf, group=half)
            swap(shard if h > 1 else buf, other if h > 1 else whole_other, peer, pair)
            if h > 1:
                dist.all_gather_into_tensor(out, shard, group=half)

        def native_ar_swap():
            if h > 1:
                dist.all_reduce(buf, group=half)
            swap(buf, whole_other, peer, pair)

        fns = {"plain": lambda: dist.all_reduce(buf), "p2p_rings": p2p, "native_rs_ag": native_rs_ag,
               "native_ar_swap": native_ar_swap,
               "kernel_shard": lambda: shard_stats_mean(shard, other, out=shard),
               "kernel_whole": lambda: shard_stats_mean(buf, whole_other, out=buf)}
        times = {k: [] for k in fns}
        for rep in range(repeats + 2):
            for name, fn in fns.items():
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dt = _max_over_ranks(time.perf_counter() - t0)
                if rep >= 2:
                    times[name].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"world": n, "bucket_mb": mb, "loadavg_1_5_15": os.getloadavg(),
                     "seconds": {k: {"median": med[k], "min": min(v), "max": max(v)} for k, v in times.items()},
                     "bytes": {k: collective_bytes(k, numel * 4, n) for k in COLLECTIVE_VARIANTS},
                     "over_plain": {k: med[k] / med["plain"] for k in COLLECTIVE_VARIANTS}})
    return rows


def worker(args) -> None:
    global DEVICE
    torch.set_num_threads(args.threads)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.backend == "nccl":
        DEVICE = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(DEVICE)
        dist.init_process_group("nccl", device_id=DEVICE)
    else:
        dist.init_process_group("gloo")
    if args.collectives:
        rows = run_collectives(args.collectives, args.repeats)
    else:
        rows = run_world(args.widths, args.repeats, args.warmup, args.batch, args.bucket_mb)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def _table(rows) -> str:
    head = (f"{'N':>2} {'width':>5} {'S MB':>6} {'bkts':>4} | {'plain MB':>8} {'2S(N-1)/N':>9} {'ours/pl':>7} "
            f"{'orig/pl':>7} {'orig max':>8} {'wire o/p':>8} | {'plain ms':>8} {'ours/pl':>7} {'comm/pl':>7} "
            f"{'orig/pl':>7} | {'compute':>7} {'tail':>6} {'kernel':>6} {'hidden':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        b, t, bd = r["bytes_ratio"], r["time_ratio"], r["breakdown_ours"]
        lines.append(
            f"{r['world']:>2} {r['width']:>5} {r['grad_bytes'] / 2**20:>6.2f} {r['buckets']:>4} | "
            f"{r['bytes_sent']['plain']['mean'] / 2**20:>8.3f} {r['plain_formula_bytes'] / 2**20:>9.3f} "
            f"{b['ours']:>7.4f} {b['original']:>7.3f} {r['bytes_ratio_max_rank']['original']:>8.3f} "
            f"{r['wire_ratio']['ours'] if r['wire_ratio'] else float('nan'):>8.3f} | "
            f"{r['step_s']['plain']['median'] * 1e3:>8.1f} {t['ours']:>7.3f} {t['ours_comm_only']:>7.3f} "
            f"{t['original']:>7.3f} | "
            f"{bd['backward_compute_s'] * 1e3:>6.1f}m {bd['exposed_tail_s'] * 1e3:>5.1f}m "
            f"{bd['kernel_s'] * 1e3:>5.2f}m {bd['kernel_hidden_frac']:>6.0%}")
    return "\n".join(lines)


def _collectives_table(rows) -> str:
    head = (f"{'N':>2} {'MiB':>5} | {'plain ms':>8} " + " ".join(f"{v:>14}" for v in COLLECTIVE_VARIANTS[1:])
            + f" | {'kernel shard':>12} {'kernel whole':>12} | bytes / plain: "
            + " ".join(f"{v[:9]:>9}" for v in COLLECTIVE_VARIANTS[1:]))
    lines = [head, "-" * len(head)]
    for r in rows:
        sec, o, b = r["seconds"], r["over_plain"], r["bytes"]
        lines.append(f"{r['world']:>2} {r['bucket_mb']:>5g} | {sec['plain']['median'] * 1e3:>8.2f} "
                     + " ".join(f"{sec[v]['median'] * 1e3:>7.2f} ({o[v]:.2f})" for v in COLLECTIVE_VARIANTS[1:])
                     + f" | {sec['kernel_shard']['median'] * 1e3:>10.2f}ms {sec['kernel_whole']['median'] * 1e3:>10.2f}ms"
                     + " | " + " ".join(f"{b[v] / b['plain']:>9.2f}" for v in COLLECTIVE_VARIANTS[1:]))
    return "\n".join(lines)


def _hardware(backend: str) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "backend": backend,
            "gpu": torch.cuda.get_device_name() if backend == "nccl" else None}


def launch(args) -> None:
    rows = []
    for world in args.worlds:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            out = tmp.name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
               "--worker", "--out", out, "--widths", *map(str, args.widths), "--repeats", str(args.repeats),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--bucket-mb", str(args.bucket_mb),
               "--threads", str(args.threads), "--backend", args.backend,
               *(["--switch-interval", str(args.switch_interval)] if args.switch_interval else []),
               *(["--collectives", *map(str, args.collectives)] if args.collectives else [])]
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        with open(out) as f:
            rows += json.load(f)
        os.unlink(out)
    print(_collectives_table(rows) if args.collectives else _table(rows))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"timestamp": stamp, "hardware": _hardware(args.backend), "args": vars(args), "rows": rows,
              "goals": {"bytes_ratio_max": 1.02, "time_ratio_max": 1.10}}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"ddp_{'collectives_' if args.collectives else ''}{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"saved {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--widths", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--bucket-mb", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"], help="nccl: one GPU per rank")
    p.add_argument("--collectives", type=float, nargs="+", metavar="MB",
                   help="instead of training steps: one bucket's communication of these sizes, four ways")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="sys.setswitchinterval in every rank (Python's GIL hand-over period, default 0.005 s)")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()
    worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    main()
