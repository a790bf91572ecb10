"""Communication per optimizer step at 8 to 4096 ranks, on paper: an alpha-beta model of ring and tree collectives.

    python bench/bench_scale.py --calibrate      # measure gloo collectives at 2 and 4 ranks (torchrun), fit, then predict
    python bench/bench_scale.py                  # predict with the last calibration (bench/results/scale_calibration.json)

**The model.** A collective on n ranks of S bytes costs ``launch + steps * alpha + bytes * beta`` per rank:

| algorithm | all-reduce | reduce-scatter, all-gather |
| --- | --- | --- |
| ring | ``2(n-1)`` steps, ``2S(n-1)/n`` bytes | ``n-1`` steps, ``S(n-1)/n`` bytes |
| tree (Rabenseifner; recursive halving / doubling) | ``2 ceil(log2 n)`` steps, ``2S(n-1)/n`` bytes | ``ceil(log2 n)``, ``S(n-1)/n`` |

Across nodes (n > 8) every collective is hierarchical: inside the node over NVLink, then across nodes over the
network on the node's 1/8 shard (each GPU has its own NIC), then inside the node again; the bytes per rank still
add up to the textbook counts (tested in tests/test_scale.py).

**Calibration.** ``--calibrate`` times gloo's all-reduce and the point-to-point rings and swap of
``simigrad_compile.distributed.collectives`` (what the DDP hook runs on gloo) at 2 and 4 ranks on this machine,
fits ``T = steps*alpha + bytes*beta + reduced*gamma`` (gamma: the CPU adds of a reduction) by least squares, and
reports each point's error. Those constants describe loopback on a shared 2-core box; the cluster predictions use
the stated cluster constants (:class:`Cluster`), with the same formulas.

**Per-step schemes** (bf16 gradients of a 350M and a 7B model, buckets of ``--bucket-mb``):

* ``plain``: DDP, one all-reduce per bucket, the buckets one after another on one communicator.
* ``ours``: per bucket a reduce-scatter inside each half (n/2 ranks), a swap of the 2S/n shard with the partner
  rank r + n/2, the statistics kernel on the shard pair, an all-gather inside the half. Serial: each bucket's four
  stages one after another. Pipelined (what the hook does): each stage on its own communicator, so bucket k+1's
  reduce-scatter runs while bucket k swaps; the links are shared, so the time is the larger of the links' total
  busy time and the busiest stage's total, plus one bucket's fill.
* ``original`` (the 2020 SimiGrad fork): all-reduce inside each half, rank n/2 sends its half's whole gradient to
  rank 0 (one link), rank 0 computes the statistics and broadcasts them, then the full all-reduce; serial.
* ``jabas``: plain plus one more all-reduce of the whole gradient per step (JABAS's extra reduction for its
  statistic, as the issue states it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CALIBRATION = RESULTS / "scale_calibration.json"
MB = 2**20


# --- the model -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    alpha: float
    """Seconds per step (one message's latency)."""
    bytes_per_s: float


@dataclass(frozen=True)
class Cluster:
    """The stated cluster: 8 GPUs per node, NVLink inside a node, one 400 Gb/s NIC per GPU between nodes."""

    gpus_per_node: int = 8
    nvlink: Link = Link(alpha=0.7e-6, bytes_per_s=450e9)
    network: Link = Link(alpha=5e-6, bytes_per_s=400e9 / 8)
    launch: float = 6e-6
    """Fixed cost of one collective (kernel launch, proxy hand-off), paid once per call whatever its size."""
    kernel_launch: float = 4e-6
    hbm_bytes_per_s: float = 2.8e12
    """The statistics kernel's memory bandwidth (85% of an H100's 3.35 TB/s)."""


@dataclass(frozen=True)
class Cost:
    latency: float = 0.0
    """Launch and per-step latency: what pipelining can overlap."""
    transfer: float = 0.0
    """Bytes over the links: what occupies them."""
    sent: float = 0.0
    """Bytes each rank sends (all levels)."""
    network_sent: float = 0.0
    """Of which over the network."""

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    @property
    def total(self) -> float:
        return self.latency + self.transfer


def flat(op: str, n: int, size: float, link: Link, algo: str, network: bool = False) -> Cost:
    """One level: ``op`` on ``n`` ranks of ``size`` bytes over ``link``, ring or tree (no launch cost)."""
    if n <= 1:
        return Cost()
    log = math.ceil(math.log2(n))
    steps = {("ring", "all_reduce"): 2 * (n - 1), ("ring", "reduce_scatter"): n - 1, ("ring", "all_gather"): n - 1,
             ("tree", "all_reduce"): 2 * log, ("tree", "reduce_scatter"): log, ("tree", "all_gather"): log}[algo, op]
    sent = size * (n - 1) / n * (2 if op == "all_reduce" else 1)
    return Cost(steps * link.alpha, sent / link.bytes_per_s, sent, sent if network else 0.0)


def collective(op: str, n: int, size: float, c: Cluster, algo: str = "ring") -> Cost:
    """``op`` of ``size`` bytes (the full buffer) on ``n`` consecutive ranks, hierarchical across nodes."""
    g = c.gpus_per_node
    if n <= g:
        return Cost(latency=c.launch) + flat(op, n, size, c.nvlink, algo)
    if n % g:
        raise ValueError(f"{n} ranks: use a multiple of {g} beyond one node")
    nodes, shard = n // g, size / g
    inside = {"all_reduce": ("reduce_scatter", "all_gather"), "reduce_scatter": ("reduce_scatter", None),
              "all_gather": (None, "all_gather")}[op]
    cost = Cost(latency=c.launch)
    if inside[0]:
        cost = cost + flat(inside[0], g, size, c.nvlink, algo)
    cost = cost + flat(op, nodes, shard, c.network, algo, network=True)
    if inside[1]:
        cost = cost + flat(inside[1], g, size, c.nvlink, algo)
    return cost


def swap(n: int, size: float, c: Cluster) -> Cost:
    """Rank r and r + n/2 exchange ``size`` bytes: over NVLink inside one node, else over the network."""
    link, network = (c.nvlink, False) if n <= c.gpus_per_node else (c.network, True)
    return Cost(c.launch + link.alpha, size / link.bytes_per_s, size, size if network else 0.0)


def kernel(read_write_bytes: float, c: Cluster) -> Cost:
    return Cost(c.kernel_launch, read_write_bytes / c.hbm_bytes_per_s)


def ours_stages(n: int, bucket: float, c: Cluster, algo: str = "ring") -> list[Cost]:
    """One bucket of ours: reduce-scatter in the half, swap, kernel, all-gather in the half."""
    half, shard = n // 2, 2 * bucket / n
    return [collective("reduce_scatter", half, bucket, c, algo), swap(n, shard, c), kernel(3 * shard, c),
            collective("all_gather", half, bucket, c, algo)]


def buckets(total: float, bucket: float) -> list[tuple[float, int]]:
    """``(size, count)`` of the buckets of ``total`` bytes: the full ones, then the rest."""
    full, rest = divmod(total, bucket)
    return [(bucket, int(full))] * (full > 0) + [(rest, 1)] * (rest > 0)


def plain_step(n: int, total: float, bucket: float, c: Cluster, algo: str = "ring") -> float:
    return sum(k * collective("all_reduce", n, b, c, algo).total for b, k in buckets(total, bucket))


def ours_step(n: int, total: float, bucket: float, c: Cluster, algo: str = "ring", pipelined: bool = True) -> float:
    per = [(ours_stages(n, b, c, algo), k) for b, k in buckets(total, bucket)]
    if not pipelined:
        return sum(k * s.total for stages, k in per for s in stages)
    links = sum(k * s.transfer for stages, k in per for s in stages)
    busiest = max(sum(k * stages[i].total for stages, k in per) for i in range(4))
    first = per[0][0]
    fill = sum(s.total for s in first) - max(s.total for s in first)
    return max(links, busiest) + fill


def original_step(n: int, total: float, bucket: float, c: Cluster, algo: str = "ring") -> float:
    halves = sum(k * collective("all_reduce", n // 2, b, c, algo).total for b, k in buckets(total, bucket))
    send = swap(n, total, c).total
    stats = kernel(2 * total, c).total
    broadcast = c.launch + math.ceil(math.log2(n)) * (c.network if n > c.gpus_per_node else c.nvlink).alpha
    return halves + send + stats + broadcast + plain_step(n, total, bucket, c, algo)


def jabas_step(n: int, total: float, bucket: float, c: Cluster, algo: str = "ring") -> float:
    return 2 * plain_step(n, total, bucket, c, algo)


SCHEMES = {
    "plain": plain_step,
    "ours": ours_step,
    "ours_serial": lambda *a, **k: ours_step(*a, **k, pipelined=False),
    "original": original_step,
    "jabas": jabas_step,
}
MODELS = {"350M": 350e6, "7B": 7e9}
RANKS = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
BUCKETS_MB = [1, 4, 25, 100, 400]


# --- calibration on gloo ---------------------------------------------------------------------------------------
CAL_SIZES = [256 * 1024, 1 * MB, 4 * MB, 16 * MB]
CAL_OPS = {  # op -> (steps, bytes sent per rank, bytes reduced per rank) for S bytes on N ranks
    "all_reduce": lambda s, n: (2 * (n - 1), 2 * s * (n - 1) / n, s * (n - 1) / n),
    "reduce_scatter": lambda s, n: (n - 1, s * (n - 1) / n, s * (n - 1) / n),
    "all_gather": lambda s, n: (n - 1, s * (n - 1) / n, 0.0),
    "swap": lambda s, n: (1, s, 0.0),
}


def calibration_worker(out: str, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    from simigrad_compile.distributed.collectives import all_gather, reduce_scatter
    from simigrad_compile.distributed.collectives import swap as pair_swap

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    world = dist.new_group(list(range(n)))
    pairs = [dist.new_group([r, r + n // 2]) for r in range(n // 2)]
    peer = (rank + n // 2) % n
    pair = pairs[rank % (n // 2)]
    rows = []
    for size in CAL_SIZES:
        numel = size // 4
        full, shard = torch.randn(numel), torch.empty(numel // n)
        out_full, recv = torch.empty(numel), torch.empty(numel)
        ops = {
            "all_reduce": lambda: dist.all_reduce(full, group=world),
            "reduce_scatter": lambda: reduce_scatter(shard, full, world),
            "all_gather": lambda: all_gather(out_full, shard, world),
            "swap": lambda: pair_swap(full, recv, peer, pair),
        }
        times = {k: [] for k in ops}
        for rep in range(repeats + 2):
            for name, fn in ops.items():
                dist.barrier(group=world)
                t0 = time.perf_counter()
                fn()
                dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=world)
                if rep >= 2:
                    times[name].append(float(dt))
        for name, ts in times.items():
            steps, sent, reduced = CAL_OPS[name](size, n)
            rows.append({"world": n, "op": name, "bytes": size, "steps": steps, "sent": sent, "reduced": reduced,
                         "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts)})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def fit(rows: list[dict], key: str = "median_s") -> dict:
    """Least squares ``T = steps*alpha + sent*beta + reduced*gamma`` (gamma dropped if negative) on the times
    ``key``, with each point's relative error, weighted so that small and large messages count alike (relative
    residuals)."""
    import torch

    def solve(cols):
        a = torch.tensor([[r[c] / r[key] for c in cols] for r in rows], dtype=torch.float64)
        x = torch.linalg.lstsq(a, torch.ones(len(rows), 1, dtype=torch.float64)).solution.flatten().tolist()
        return dict(zip(cols, x))

    coef = solve(["steps", "sent", "reduced"])
    if coef["reduced"] < 0 or coef["steps"] < 0:
        coef = {**solve(["steps", "sent"]), "reduced": 0.0}
    errors = []
    for r in rows:
        pred = sum(coef[c] * r[c] for c in ("steps", "sent", "reduced"))
        errors.append({**r, "predicted_s": pred, "rel_err": pred / r[key] - 1})
    rel = [abs(e["rel_err"]) for e in errors]
    return {"times": key, "alpha_s": coef["steps"], "beta_s_per_byte": coef["sent"], "gamma_s_per_byte": coef["reduced"],
            "link_gb_per_s": 1e-9 / coef["sent"] if coef["sent"] > 0 else None,
            "median_abs_rel_err": statistics.median(rel), "max_abs_rel_err": max(rel), "points": errors}


def calibrate(repeats: int) -> dict:
    rows = []
    for n in (2, 4):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            out = tmp.name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "--worker", out, "--repeats", str(repeats)]
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        with open(out) as f:
            rows += json.load(f)
        os.unlink(out)
    result = {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(), "backend": "gloo (loopback)",
              "loadavg_1_5_15": os.getloadavg(), "cpu_count": os.cpu_count(), "fit": fit(rows), "fits": []}
    for key in ("median_s", "min_s"):
        for worlds in ((2, 4), (2,), (4,)):
            f = fit([r for r in rows if r["world"] in worlds], key)
            result["fits"].append({"worlds": worlds, **{k: v for k, v in f.items() if k != "points"}})
    RESULTS.mkdir(exist_ok=True)
    CALIBRATION.write_text(json.dumps(result, indent=1))
    return result


def calibration_table(cal: dict) -> str:
    f = cal["fit"]
    lines = [f"gloo calibration ({cal['timestamp'][:19]}, load {cal['loadavg_1_5_15'][0]:.1f}): "
             f"alpha {f['alpha_s'] * 1e6:.0f} us/step, beta {f['link_gb_per_s']:.2f} GB/s, "
             f"gamma {f['gamma_s_per_byte'] * 1e9:.3f} s/GB reduced; |error| median {f['median_abs_rel_err']:.0%}, "
             f"max {f['max_abs_rel_err']:.0%}",
             f"{'N':>2} {'op':<15}{'MiB':>6}{'measured ms':>13}{'model ms':>10}{'error':>8}"]
    for p in f["points"]:
        lines.append(f"{p['world']:>2} {p['op']:<15}{p['bytes'] / MB:>6.2f}{p['median_s'] * 1e3:>13.2f}"
                     f"{p['predicted_s'] * 1e3:>10.2f}{p['rel_err']:>+8.0%}")
    lines.append("fits (worlds, times): alpha us, GB/s, |error| median / max")
    for g in cal.get("fits", []):
        lines.append(f"  {str(g['worlds']):<7} {g['times']:<9} {g['alpha_s'] * 1e6:>6.0f} {g['link_gb_per_s'] or 0:>6.2f}"
                     f"   {g['median_abs_rel_err']:>4.0%} / {g['max_abs_rel_err']:.0%}")
    return "\n".join(lines)


# --- predictions -----------------------------------------------------------------------------------------------
def predict(c: Cluster, bucket_mb: float) -> dict:
    rows = []
    for model, params in MODELS.items():
        total = 2 * params  # bf16 gradients
        for algo in ("ring", "tree"):
            for n in RANKS:
                times = {s: fn(n, total, bucket_mb * MB, c, algo) for s, fn in SCHEMES.items()}
                rows.append({"model": model, "algo": algo, "ranks": n, "grad_bytes": total, "bucket_mb": bucket_mb,
                             "seconds": times, "over_plain": {s: t / times["plain"] for s, t in times.items()}})
    return {"rows": rows, "bucket_sweep": sweep(c), "latency_matters": latency_matters(c, bucket_mb)}


def sweep(c: Cluster) -> list[dict]:
    out = []
    for model, params in MODELS.items():
        for n in RANKS:
            for mb in BUCKETS_MB:
                plain = plain_step(n, 2 * params, mb * MB, c)
                out.append({"model": model, "ranks": n, "bucket_mb": mb, "plain_s": plain,
                            "ours_over_plain": ours_step(n, 2 * params, mb * MB, c) / plain,
                            "ours_serial_over_plain": ours_step(n, 2 * params, mb * MB, c, pipelined=False) / plain})
    return out


def latency_matters(c: Cluster, bucket_mb: float, tolerance: float = 0.05) -> list[dict]:
    """Per model and algorithm: the first rank count where ours (serial, i.e. nothing hidden) costs more than
    ``1 + tolerance`` times plain at ``bucket_mb``, and per rank count the smallest bucket (MiB, powers of two)
    where it does not, serial and pipelined."""
    out = []
    for model, params in MODELS.items():
        for algo in ("ring", "tree"):
            first = next((n for n in RANKS if ours_step(n, 2 * params, bucket_mb * MB, c, algo, False)
                          > (1 + tolerance) * plain_step(n, 2 * params, bucket_mb * MB, c, algo)), None)
            hides = {}
            for n in RANKS:
                hides[n] = {}
                for pipelined in (False, True):
                    mb = next((2**k for k in range(-4, 13) if ours_step(n, 2 * params, 2**k * MB, c, algo, pipelined)
                               <= (1 + tolerance) * plain_step(n, 2 * params, 2**k * MB, c, algo)), None)
                    hides[n]["pipelined" if pipelined else "serial"] = mb
            out.append({"model": model, "algo": algo, "first_ranks_over": first, "tolerance": tolerance,
                        "bucket_mb_within_tolerance": hides})
    return out


def table(pred: dict) -> str:
    head = (f"{'model':<5} {'algo':<4} {'N':>5} | {'plain ms':>9} {'ours':>6} {'serial':>6} {'original':>8} "
            f"{'jabas':>6}   (time / plain)")
    lines = [head, "-" * len(head)]
    for r in pred["rows"]:
        o = r["over_plain"]
        lines.append(f"{r['model']:<5} {r['algo']:<4} {r['ranks']:>5} | {r['seconds']['plain'] * 1e3:>9.2f} "
                     f"{o['ours']:>6.3f} {o['ours_serial']:>6.3f} {o['original']:>8.3f} {o['jabas']:>6.3f}")
    lines.append("")
    for m in pred["latency_matters"]:
        hide = ", ".join(f"{n}: {v['serial']}/{v['pipelined']}" for n, v in m["bucket_mb_within_tolerance"].items())
        lines.append(f"{m['model']} {m['algo']}: ours serial > {1 + m['tolerance']:.2f}x plain from N = "
                     f"{m['first_ranks_over']}; smallest bucket MiB within it (serial/pipelined) per N: {hide}")
    return "\n".join(lines)


def plot(pred: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for col, model in enumerate(MODELS):
        for row, algo in enumerate(("ring", "tree")):
            ax = axes[row][col]
            rows = [r for r in pred["rows"] if r["model"] == model and r["algo"] == algo]
            for scheme, style in (("plain", "k-"), ("ours", "C0-"), ("ours_serial", "C0--"), ("original", "C3-"),
                                  ("jabas", "C2-")):
                ax.plot([r["ranks"] for r in rows], [r["seconds"][scheme] * 1e3 for r in rows], style, label=scheme)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{model} bf16 grads, {algo}, {rows[0]['bucket_mb']:g} MiB buckets")
            ax.set_ylabel("communication per step (ms)")
            ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("ranks (8 GPUs per node)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calibrate", action="store_true", help="measure gloo at 2 and 4 ranks first (slow)")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--bucket-mb", type=float, default=25.0, help="DDP's default bucket_cap_mb")
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        calibration_worker(args.worker, args.repeats)
        return
    cal = calibrate(args.repeats) if args.calibrate else (json.loads(CALIBRATION.read_text())
                                                           if CALIBRATION.exists() else None)
    if cal:
        print(calibration_table(cal), end="\n\n")
    else:
        print("no calibration yet: run python bench/bench_scale.py --calibrate\n")
    cluster = Cluster()
    pred = predict(cluster, args.bucket_mb)
    print(f"cluster: {cluster}\n")
    print(table(pred))
    RESULTS.mkdir(exist_ok=True)
    png = RESULTS / "scale.png"
    plot(pred, png)
    out = RESULTS / "scale.json"
    out.write_text(json.dumps({"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                               "cluster": dataclasses.asdict(cluster), "calibration": cal and {
                                   k: v for k, v in cal["fit"].items() if k != "points"}, **pred}, indent=1))
    print(f"saved {out} and {png}")


if __name__ == "__main__":
    main()
