"""The CPU statistics ops of two code versions, interleaved in one process, each against its memory floor.

``--old`` names a directory holding an earlier ``kernels/`` package, importable as ``oldkernels`` (for example
``git archive 9fd8f8e simigrad_compile/kernels | tar -x -C /tmp/x && mv /tmp/x/simigrad_compile/kernels
/tmp/old/oldkernels``; kernels/ imports nothing of the package). Per repeat every variant runs twice in turn, the
second call timed (each starts from the cache state its own call leaves). Floors: ``torch.add(a, b, out=o)`` for
split_stats_sum and shard_stats_mean, ``torch.dot(a, b)`` for pair_stats; naive: separate torch ops.

    python bench/bench_kernels_before_after.py --old /tmp/old --threads 1 --sizes 1,4,16,64 --repeats 41
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from simigrad_compile.kernels import inductor_stats as new


def sq(x):
    return torch.linalg.vector_norm(x) ** 2


def variants(old, a, b, o):
    def pair_naive():
        other = 2.0 * b - a
        return torch.dot(a, other), sq(a), sq(other)

    return {
        "split old": lambda: old.split_stats_sum([a], [b], out=[o]), "split new": lambda: new.split_stats_sum([a], [b], out=[o]),
        "add floor": lambda: torch.add(a, b, out=o),
        "split naive": lambda: (torch.add(a, b, out=o), torch.dot(a, b), sq(a), sq(b)),
        "pair old": lambda: old.pair_stats([a], [b], 2.0, -1.0), "pair new": lambda: new.pair_stats([a], [b], 2.0, -1.0),
        "dot floor": lambda: torch.dot(a, b), "pair naive": pair_naive,
        "shard old": lambda: old.shard_stats_mean(a, b, out=o), "shard new": lambda: new.shard_stats_mean(a, b, out=o),
        "shard naive": lambda: ((torch.dot(a, b), sq(a), sq(b)), torch.add(a, b, out=o).mul_(0.5)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sizes", default="1,4,16,64", help="millions (2**20) of elements")
    p.add_argument("--repeats", type=int, default=41)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    sys.path.insert(0, args.old)
    from oldkernels import inductor_stats as old

    torch.set_num_threads(args.threads)
    rows = {}
    for mb in (int(s) for s in args.sizes.split(",")):
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(mb << 20, generator=gen), torch.randn(mb << 20, generator=gen)
        o = torch.empty_like(a)
        fns = variants(old, a, b, o)
        for f in fns.values():
            f()
        times = {k: [] for k in fns}
        load = os.getloadavg()
        for _ in range(args.repeats):
            for k, f in fns.items():
                f()
                start = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows[mb] = {"loadavg_before": load, "loadavg_after": os.getloadavg(), "median_s": med, "min_s": {k: min(v) for k, v in times.items()}}
        for op, floor in (("split", "add floor"), ("pair", "dot floor"), ("shard", "add floor")):
            rows[mb][op] = r = {"old/floor": med[f"{op} old"] / med[floor], "new/floor": med[f"{op} new"] / med[floor],
                                "naive/new": med[f"{op} naive"] / med[f"{op} new"]}
            print(f"{mb:>3}M {args.threads}t {op:<6} new/floor {r['new/floor']:.2f}  old/floor {r['old/floor']:.2f}  "
                  f"naive/new {r['naive/new']:.2f}  (new {med[op + ' new'] * 1e3:.3f} ms, floor {med[floor] * 1e3:.3f} ms, "
                  f"load {load[0]:.1f})", flush=True)
    out = args.out or Path(__file__).parent / "results" / f"kernels_cpu_before_after_{args.threads}t.json"
    out.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
