"""Benchmark of the statistics ops against their traffic floor and the naive torch path (same process, interleaved).

Per op and size (fp32 unless --dtype, flat tensors), each repeat runs every variant once, in turn:
  ours     the op (on CPU with ``out=`` where the op takes one, so that page faults of fresh outputs stay out);
           on CPU that is the Inductor-generated loop (kernels/inductor_stats.py), called without Dynamo;
  torch    (CPU) the torch-op path (kernels/torch_stats.py), which the Inductor path replaced;
  in_place (CPU, shard_stats_mean) ``out=a``, as the DDP hook calls it: two loops, not one (see inductor_stats);
  alloc    split_stats_sum as graphs call it, allocating its output (CPU: mmap page faults above ~32 MiB);
  floor    the memory traffic the op cannot avoid:
             split_stats_sum, shard_stats_mean: torch.add(a, b, out=o)  (read 2, write 1);
             pair_stats: torch.dot(a, b)  (one fused read of each input, nothing written);
  naive    separate torch ops: the add (or the ``other`` tensor), torch.dot, two squared vector norms.
  graph    (CPU, split_stats_sum) what the backend runs on CPU: the add and the three fp32 dot products as
           graph ops, fused by Inductor into one loop that allocates g; compared with ``alloc_floor``,
           ``torch.add(a, b)`` allocating its output.
Each timed call follows an untimed call of the same variant (see ``time_interleaved``): below the L3's size all
variants are timed with their tensors in cache, above it none are.
Reported: medians with min/max, ratios ours/floor and naive/ours (median, and min in brackets), GB/s of ours
(bytes the op must move / time). On CUDA also the copy bandwidth (dst.copy_(src)) and ours as a fraction of it,
per call from the host, and as kernels alone: each op captured in a CUDA graph and replayed (goal >= 85% of the
copy's GB/s, measured the same way).
The load average is recorded before and after each size: the machine may be shared.

    python bench/bench_kernels.py                     # cpu, sizes 1M,4M,16M,64M
    python bench/bench_kernels.py --threads 1 --out bench/results/kernels_cpu_1thread.json
    python bench/bench_kernels.py --sizes 1M,16M --repeats 21 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch
from bench_common import hardware, summarise, versions

from simigrad_compile.kernels import inductor_stats, ops, torch_stats

RESULTS = Path(__file__).parent / "results"


def parse_size(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x) ** 2


@torch.compile(dynamic=True)
def _graph_split(a: torch.Tensor, b: torch.Tensor):
    af, bf = a.float(), b.float()
    return a + b, torch.cat([(af * bf).sum().view(1), (af * af).sum().view(1), (bf * bf).sum().view(1)])


def variants(a: torch.Tensor, b: torch.Tensor, o: torch.Tensor, device: str) -> dict[str, dict]:
    """op -> {"bytes": traffic, name -> callable}."""
    cpu = device == "cpu"

    def split_ours():
        return inductor_stats.split_stats_sum([a], [b], out=[o]) if cpu else ops.split_stats_sum([a], [b])

    def split_naive():
        return torch.add(a, b, out=o), torch.dot(a, b), sq_norm(a), sq_norm(b)

    def pair_naive():
        other = 2.0 * b - a
        return torch.dot(a, other), sq_norm(a), sq_norm(other)

    def shard_naive():
        stats = torch.dot(a, b), sq_norm(a), sq_norm(b)
        return torch.add(a, b, out=o).mul_(0.5), stats

    n, size = a.numel(), a.element_size()
    inplace = a.clone()  # shard_stats_mean(out=a) overwrites it with means: values stay bounded
    return {
        "split_stats_sum": {
            "bytes": 3 * n * size,
            "ours": split_ours,
            "alloc": lambda: ops.split_stats_sum([a], [b]),
            "floor": lambda: torch.add(a, b, out=o),
            "naive": split_naive,
            **({"torch": lambda: torch_stats.split_stats_sum([a], [b], out=[o])} if cpu else {}),
            **({"graph": lambda: _graph_split(a, b), "alloc_floor": lambda: torch.add(a, b)} if cpu else {}),
        },
        "pair_stats": {
            "bytes": 2 * n * size,
            "ours": lambda: ops.pair_stats([a], [b], 2.0, -1.0),
            "floor": lambda: torch.dot(a, b),
            "naive": pair_naive,
            **({"torch": lambda: torch_stats.pair_stats([a], [b], 2.0, -1.0)} if cpu else {}),
        },
        "shard_stats_mean": {
            "bytes": 3 * n * size,
            "ours": lambda: ops.shard_stats_mean(a, b, out=o),
            "floor": lambda: torch.add(a, b, out=o),
            "naive": shard_naive,
            **({"torch": lambda: torch_stats.shard_stats_mean(a, b, out=o),
                "in_place": lambda: ops.shard_stats_mean(inplace, b, out=inplace)} if cpu else {}),
        },
    }


def graph_kernel_times(a: torch.Tensor, b: torch.Tensor, o: torch.Tensor, repeats: int) -> dict:
    """op -> {"ours", "copy"} summaries of CUDA-graph replay times (interleaved with a copy of ``a``)."""
    fns = {"copy": lambda: o.copy_(a),
           "split_stats_sum": lambda: ops.split_stats_sum([a], [b]),
           "pair_stats": lambda: ops.pair_stats([a], [b], 2.0, -1.0),
           "shard_stats_mean": lambda: ops.shard_stats_mean(a, b, out=o)}
    times = {k: summarise(v) for k, v in graph_times(fns, repeats).items()}
    return {op: {"ours": times[op], "copy": times["copy"]} for op in fns if op != "copy"}


def time_interleaved(fns: dict, repeats: int, sync, settle: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each callable, interleaved. ``settle``: each timed call follows an untimed call of the
    same callable, so that every variant starts from the cache state its own call leaves (below the L3's size
    the tensors are in cache for all); otherwise a variant starts from whatever the previous one left, which
    favoured those placed after a variant that read the same inputs (the floor, after ``alloc``)."""
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if settle:
                fn()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times





def graph_times(fns: dict, repeats: int, replays: int = 20) -> dict[str, list[float]]:
    """CUDA: each callable captured once in a CUDA graph; per repeat (interleaved), ``replays`` replays between two
    events. Seconds per call, without the host's launch overhead: the kernels' own time."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns.values():
            fn(), fn()  # Triton compiles, tables are built
    torch.cuda.current_stream().wait_stream(side)
    graphs = {}
    for name, fn in fns.items():
        graphs[name] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[name]):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, graph in graphs.items():
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3 / replays)
    return times


def run(sizes: list[int], repeats: int, device: str, dtype: torch.dtype = torch.float32) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for n in sizes:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, generator=gen).to(device, dtype)
        b = torch.randn(n, generator=gen).to(device, dtype)
        o = torch.empty_like(a)
        copy_gbs = None
        if device == "cuda":
            copy = summarise(time_interleaved({"copy": lambda: o.copy_(a)}, repeats, sync)["copy"])
            copy_gbs = 2 * n * a.element_size() / copy["median_s"] / 1e9
            kernel_only = graph_kernel_times(a, b, o, repeats)
        for op, spec in variants(a, b, o, device).items():
            traffic = spec.pop("bytes")
            load_before = os.getloadavg()
            stats = {k: summarise(v) for k, v in time_interleaved(spec, repeats, sync).items()}
            ours, floor, naive = stats["ours"], stats["floor"], stats["naive"]
            row = {
                "op": op, "numel": n, "dtype": str(dtype).removeprefix("torch."), "device": device,
                "traffic_bytes": traffic, "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg(),
                "variants": stats,
                "ours_over_floor": ours["median_s"] / floor["median_s"],
                "ours_over_floor_min": ours["min_s"] / floor["min_s"],
                "naive_over_ours": naive["median_s"] / ours["median_s"],
                "naive_over_ours_min": naive["min_s"] / ours["min_s"],
                "ours_gbs": traffic / ours["median_s"] / 1e9,
                "floor_gbs": traffic / floor["median_s"] / 1e9,
            }
            for k in ("torch", "in_place"):
                if k in stats:
                    row[f"{k}_over_floor"] = stats[k]["median_s"] / floor["median_s"]
            if "alloc" in stats:
                row["alloc_over_floor"] = stats["alloc"]["median_s"] / floor["median_s"]
            if "graph" in stats:
                graph = stats["graph"]["median_s"]
                row["graph_over_alloc_floor"] = graph / stats["alloc_floor"]["median_s"]
                row["naive_over_graph"] = naive["median_s"] / graph
            if copy_gbs is not None:
                row["copy_gbs"] = copy_gbs
                row["ours_over_copy_bw"] = row["ours_gbs"] / copy_gbs
                graph = kernel_only[op]
                row["graph"] = graph
                row["graph_ours_gbs"] = traffic / graph["ours"]["median_s"] / 1e9
                row["graph_copy_gbs"] = 2 * n * a.element_size() / graph["copy"]["median_s"] / 1e9
                row["graph_ours_over_copy_bw"] = row["graph_ours_gbs"] / row["graph_copy_gbs"]
            rows.append(row)
            print(format_row(row), flush=True)
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "hardware": hardware(device), "versions": versions(), "repeats": repeats,
        "rows": rows,
    }


HEADER = (f"{'op':<17}{'numel':>10}{'ours ms (min-max)':>24}{'floor ms':>10}{'naive ms':>10}"
          f"{'ours/floor':>16}{'naive/ours':>16}{'GB/s':>8}{'alloc/floor':>12}")


def format_row(r: dict) -> str:
    v = r["variants"]
    ms = lambda k: v[k]["median_s"] * 1e3  # noqa: E731
    ours = f"{ms('ours'):.2f} ({v['ours']['min_s'] * 1e3:.2f}-{v['ours']['max_s'] * 1e3:.2f})"
    line = (f"{r['op']:<17}{r['numel']:>10}{ours:>24}{ms('floor'):>10.2f}{ms('naive'):>10.2f}"
            f"{r['ours_over_floor']:>8.2f} [{r['ours_over_floor_min']:.2f}]"
            f"{r['naive_over_ours']:>8.2f} [{r['naive_over_ours_min']:.2f}]{r['ours_gbs']:>8.1f}"
            f"{r.get('alloc_over_floor', float('nan')):>12.2f}")
    if "graph_over_alloc_floor" in r:
        line += f"\n{'  graph (Inductor)':<17}{'':>10}{ms('graph'):>24.2f}{ms('alloc_floor'):>10.2f}{'':>10}" \
                f"{r['graph_over_alloc_floor']:>8.2f}{'':>8}{r['naive_over_graph']:>8.2f}"
    extra = [f"{k}/floor {r[k + '_over_floor']:.2f}" for k in ("torch", "in_place") if k + "_over_floor" in r]
    if extra:
        line += f"\n{'':<27}" + ", ".join(extra) + f"  (load {r['loadavg_1_5_15_before'][0]:.1f}" \
                f" -> {r['loadavg_1_5_15_after'][0]:.1f})"
    if "copy_gbs" in r:
        line += f"  copy {r['copy_gbs']:.0f} GB/s, ours {100 * r['ours_over_copy_bw']:.0f}%"
        line += f"\n{'':<27}CUDA graph (kernels only): ours {r['graph_ours_gbs']:.0f} GB/s, copy " \
                f"{r['graph_copy_gbs']:.0f} GB/s, ours {100 * r['graph_ours_over_copy_bw']:.0f}% (goal >= 85%)"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,4M,16M,64M", help="comma-separated element counts (K/M/G suffixes)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/kernels_<device>.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(HEADER)
    result = run([parse_size(s) for s in args.sizes.split(",")], args.repeats, args.device, getattr(torch, args.dtype))
    worst = {}
    for r in result["rows"]:
        worst[r["op"]] = max(worst.get(r["op"], 0.0), r["ours_over_floor"])
    print("worst ours/floor (median) per op:", ", ".join(f"{k} {v:.2f}" for k, v in worst.items()))
    out = args.out or RESULTS / f"kernels_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
