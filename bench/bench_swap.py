"""Rung swap cost: a compiled step right after a step on another rung vs right after one on the same rung.

    python bench/bench_swap.py [--backend simigrad|inductor|aot_eager] [--rungs 8,16,32,64] [--reps 30]

Per rung it reports the median (min..max) forward+backward time of the two cases, interleaved in one loop,
and their difference of medians and of minimums (the swap cost: Dynamo's guard check walks one cache entry per rung). Compile time per
rung is reported separately. Writes bench/results/swap-<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import simigrad_compile as sc


class Block(torch.nn.Module):
    def __init__(self, d=256):
        super().__init__()
        self.fc1, self.fc2, self.norm = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d), torch.nn.LayerNorm(d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def step(model, x):
    t = time.perf_counter()
    model(x).square().mean().backward()
    return time.perf_counter() - t


def summary(xs):
    return {"median_ms": 1e3 * statistics.median(xs), "min_ms": 1e3 * min(xs), "max_ms": 1e3 * max(xs)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="aot_eager")
    ap.add_argument("--rungs", default="8,16,32,64")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    rungs = [int(r) for r in args.rungs.split(",")]
    model = Block()
    compiled = torch.compile(model, backend=args.backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    run = sc.AdaptiveBatching(compiled, opt, batch_size=rungs[0], micro_batch_sizes=rungs, group_mode="microsteps")
    inputs = {}
    for m in rungs:
        x = torch.randn(m, args.seq, 256)
        torch._dynamo.mark_static(x, 0)
        inputs[m] = x
    compile_s = {}
    for m in rungs:
        t = time.perf_counter()
        step(compiled, inputs[m])
        compile_s[m] = time.perf_counter() - t
    swap, same = {m: [] for m in rungs}, {m: [] for m in rungs}
    for _ in range(args.reps):
        for m in rungs:                      # previous call: another rung
            swap[m].append(step(compiled, inputs[m]))
        for m in rungs:                      # previous call: the same rung
            step(compiled, inputs[m])
            same[m].append(step(compiled, inputs[m]))
        model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    for target in range(1, 20001):
        run.ladder.plan(target)
    plan_us = 1e6 * (time.perf_counter() - t) / 20000
    run.close()
    rows = []
    print(f"backend={args.backend} torch={torch.__version__} threads={torch.get_num_threads()} seq={args.seq} d=256")
    print(f"{'rung':>5} {'compile s':>9} {'same ms (min..max)':>24} {'after swap ms (min..max)':>26} {'swap cost ms':>12} {'(of mins)':>9}")
    for m in rungs:
        a, b = summary(same[m]), summary(swap[m])
        cost = b["median_ms"] - a["median_ms"]
        cost_min = b["min_ms"] - a["min_ms"]
        rows.append({"rung": m, "compile_s": compile_s[m], "same": a, "after_swap": b, "swap_cost_ms": cost,
                     "swap_cost_min_ms": cost_min})
        print(f"{m:>5} {compile_s[m]:>9.2f} {a['median_ms']:>8.3f} ({a['min_ms']:.3f}..{a['max_ms']:.3f})"
              f" {b['median_ms']:>10.3f} ({b['min_ms']:.3f}..{b['max_ms']:.3f}) {cost:>12.3f} {cost_min:>9.3f}")
    print(f"ladder.plan(): {plan_us:.1f} us per uncached target (1..20000)")
    out = {"backend": args.backend, "rungs": rows, "plan_us": plan_us, "reps": args.reps, "seq": args.seq,
           "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
           "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"swap-{args.backend}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("saved", path)


if __name__ == "__main__":
    main()
