"""The ``microsteps`` boundary's pair statistics by path: fp64 flat, one concatenated call, one call per parameter.

    python bench/bench_pair_rows.py                   # MLP gradients from 0.6k to 1.3M elements, 1 thread

At a window's boundary :mod:`simigrad_compile.stats.microsteps` takes ``(own.other, |own|^2, |other|^2)`` and
``|total|^2`` over every gradient. Each path is timed on the gradients of the MLPs of ``bench/bench_loop.py``
(weights and biases, random values), with the time the boundary would add when the path does not take
``|total|^2`` itself (``torch._foreach_norm``, as ``StepRules.begin_step`` does then). Thread CPU time per call,
the median of 5 interleaved blocks. The thresholds ``FLATTEN`` and ``CONCAT`` of the module come from this
table; the row marked ``chosen`` is the path the module takes at that size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from bench_common import hardware, versions
from bench_loop import MODELS
from simigrad_compile.kernels import pair_stats
from simigrad_compile.stats import microsteps

RESULTS = Path(__file__).parent / "results"


def gradients(widths, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [s for a, b in zip(widths, widths[1:]) for s in ((b, a), (b,))]
    return [torch.randn(s, generator=g) for s in shapes]


def paths(own, total):
    return {
        "flat_fp64": lambda: microsteps._pair_flat(own, total, 1.0, -1.0),
        "concat": lambda: microsteps._pair_concat(own, total, 1.0, -1.0),
        "per_parameter": lambda: (pair_stats(own, total, 1.0, -1.0).sum(0, dtype=torch.float64).tolist(),
                                  torch._foreach_norm(total)),
    }


def chosen(n: int) -> str:
    return "flat_fp64" if n <= microsteps.FLATTEN else "concat" if n <= microsteps.CONCAT else "per_parameter"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "small", "medium"], choices=list(MODELS))
    parser.add_argument("--extra", nargs="*", default=["32,96,64,10", "48,160,128,10", "64,192,192,10",
                                                         "128,512,512,10"],
                        help="more MLPs' widths, comma-separated, between the named sizes")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "pair_rows_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = {name: MODELS[name] for name in args.models}
    for spec in args.extra:
        shapes[spec] = tuple(int(w) for w in spec.split(","))
    rows = []
    print(f"{'widths':>22} {'elements':>9} | {'flat fp64 us':>12} {'concat us':>10} {'per param us':>12} | chosen")
    for name, widths in sorted(shapes.items(), key=lambda kv: sum(a * b + b for a, b in zip(kv[1], kv[1][1:]))):
        own, total = gradients(widths, 0), gradients(widths, 1)
        n = sum(t.numel() for t in own)
        fns = paths(own, total)
        calls = max(3, int(2e5 // max(n, 1)))
        times: dict = {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in range(args.blocks):
            for k, f in fns.items():
                t0 = time.thread_time_ns()
                for _ in range(calls):
                    f()
                times[k].append((time.thread_time_ns() - t0) / calls / 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"model": name, "widths": list(widths), "elements": n, "parameters": len(own),
                     "median_us": med, "blocks_us": times, "chosen": chosen(n)})
        print(f"{','.join(map(str, widths)):>22} {n:>9} | {med['flat_fp64']:>12.1f} {med['concat']:>10.1f} "
              f"{med['per_parameter']:>12.1f} | {chosen(n)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "pair_rows", "args": {k: str(v) for k, v in vars(args).items()},
                                    "thresholds": {"FLATTEN": microsteps.FLATTEN, "CONCAT": microsteps.CONCAT},
                                    "rows": rows, "hardware": hardware("cpu"), "versions": versions(),
                                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
