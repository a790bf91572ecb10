"""FSDP2 with the split reduce-scatter (:func:`simigrad_compile.distributed.enable_fsdp`) against plain FSDP2:
step time and bytes per rank (gloo on CPU).

    python bench/bench_fsdp.py                               # worlds 2 3 4, width 256; table + bench/results/fsdp.json
    python bench/bench_fsdp.py --worlds 3 --width 512 --repeats 11

Both models (the same MLP, one ``fully_shard`` unit per layer plus the root) run in one process per rank, their
steps interleaved (the order alternates each repeat). Step: forward, backward, ``zero_grad``; its time is the
slowest rank's (a barrier before each step), reported as the median (min, max) over repeats. Bytes per rank:
:class:`simigrad_compile.distributed.traffic.Traffic` over one step (the all-gathers of forward and backward
included), ring formulas; "ours" includes the statistics' all-reduce of ``[units, 3]`` fp32 rows. Note: gloo's
own ``reduce_scatter_tensor`` (plain FSDP2's) sends an all-reduce's bytes on the wire, twice the ring formula
counted here, while ours moves the ring amount over point-to-point sends.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


class Net(torch.nn.Module):
    def __init__(self, width: int, depth: int = 4) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 10)

    def forward(self, x):
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.head(x)


def _sharded(net: torch.nn.Module, ours: bool) -> torch.nn.Module:
    import copy

    from torch.distributed.fsdp import fully_shard

    from simigrad_compile.distributed import enable_fsdp

    m = copy.deepcopy(net)
    for layer in [*m.layers, m.head]:
        fully_shard(layer)
    fully_shard(m)
    if ours:
        enable_fsdp(m)
    return m


def _step(model, x, y) -> None:
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def worker(args) -> None:
    from bench_common import summarise

    from simigrad_compile.distributed.traffic import Traffic

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = Net(args.width)
    models = {"plain": _sharded(net, ours=False), "ours": _sharded(net, ours=True)}
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch, args.width, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen)
    for _ in range(2):
        for m in models.values():
            _step(m, x, y)
    sent = {}
    for name, m in models.items():
        traffic = Traffic()
        with traffic.counting():
            _step(m, x, y)
        sent[name] = traffic.sent
    times = {name: [] for name in models}
    for k in range(args.repeats):
        for name in (list(models) if k % 2 == 0 else list(reversed(list(models)))):
            dist.barrier()
            t0 = time.perf_counter()
            _step(models[name], x, y)
            took = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            times[name].append(float(took))
    every = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(every, torch.tensor([sent["plain"], sent["ours"]], dtype=torch.float64))
    if rank == 0:
        params = sum(p.numel() for p in net.parameters())
        out = {"world": world, "width": args.width, "batch_per_rank": args.batch, "params": params,
               "repeats": args.repeats,
               "step": {name: summarise(t) for name, t in times.items()},
               "bytes_per_rank": {"plain": [float(e[0]) for e in every], "ours": [float(e[1]) for e in every]}}
        with open(args.out, "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def main(args) -> None:
    from bench_common import hardware, versions

    rows = []
    for world in args.worlds:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            out = tmp.name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
               "--worker", "--out", out, "--width", str(args.width), "--batch", str(args.batch),
               "--repeats", str(args.repeats)]
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        with open(out) as f:
            rows.append(json.load(f))
        os.unlink(out)
    result = {"command": " ".join(["python", "bench/bench_fsdp.py", *sys.argv[1:]]), "hardware": hardware("cpu"),
              "versions": versions(), "backend": "gloo", "results": rows}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "fsdp.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'world':>5} {'plain ms':>18} {'ours ms':>18} {'ratio':>6} {'plain B/rank':>13} {'ours B/rank (max)':>18}")
    for r in rows:
        p, o = r["step"]["plain"], r["step"]["ours"]
        bp, bo = r["bytes_per_rank"]["plain"], r["bytes_per_rank"]["ours"]
        fmt = lambda s: f"{1e3 * s['median_s']:.1f} ({1e3 * s['min_s']:.0f}-{1e3 * s['max_s']:.0f})"  # noqa: E731
        print(f"{r['world']:>5} {fmt(p):>18} {fmt(o):>18} {o['median_s'] / p['median_s']:>6.2f} "
              f"{max(bp):>13.0f} {max(bo):>18.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out")
    a = parser.parse_args()
    worker(a) if a.worker else main(a)
