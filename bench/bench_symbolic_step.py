"""Step time of the one symbolic-batch graph against the static graph of the same micro-batch size, in one process.

    OMP_NUM_THREADS=1 python bench/bench_symbolic_step.py                 # gpt, bert, resnet at micro-batch 8
    OMP_NUM_THREADS=1 python bench/bench_symbolic_step.py --models resnet --batch 4 --repeats 41

``bench/bench_compile_cost.py`` times each compiler in a process of its own, so its step times carry the
machine's drift between processes (up to 2x here). This one builds the model of ``bench_compile_cost.build``
four times in one process: ``backend="simigrad"`` and plain ``backend="inductor"``, each on static shapes and on a
batch dim marked dynamic (what ``symbolic_batch=True`` makes the run's loader do), and times their steps
(forward, backward, SGD step; CPU time at 1 thread) interleaved, after warm-up steps. Reported per backend: the
median of each and the median of the per-round ratios (symbolic / static). Plain Inductor's ratio is what
dynamic-shape code costs by itself; the split pass's share is the difference. JSON:
``bench/results/symbolic_step.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from bench_common import hardware, versions
from bench_compile_cost import MODELS, build
from simigrad_compile import gradient_stats
from simigrad_compile.runtime.data import mark_batch

RESULTS = Path(__file__).parent / "results"
BACKENDS = ("simigrad", "inductor")
"""Plain Inductor's own symbolic/static ratio is the baseline: the cost of dynamic-shape code itself."""


def measure(name: str, batch: int, repeats: int, warmup: int, backends=BACKENDS) -> dict:
    """Each backend's static and symbolic graph of one model, their steps interleaved in one process."""
    base, dataset, loss_of = build(name, batch)
    steppers, compile_s = {}, {}
    torch._dynamo.reset()
    for backend in backends:
        for mode in ("static", "symbolic"):
            model = copy.deepcopy(base)
            compiled = torch.compile(model, backend=backend, dynamic=False if mode == "static" else None)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            data = [mark_batch(0, None, mode == "symbolic")(t.clone()) for t in dataset[:batch]]

            def step(compiled=compiled, opt=opt, data=data, model=model, stats=backend == "simigrad"):
                loss_of(compiled, data).backward()
                opt.step()
                opt.zero_grad()
                if stats:
                    gradient_stats(model, reset=True)

            t0 = time.perf_counter()
            step()
            compile_s[f"{backend} {mode}"] = time.perf_counter() - t0
            steppers[f"{backend} {mode}"] = step
    for _ in range(warmup):
        for step in steppers.values():
            step()
    times = {key: [] for key in steppers}
    for r in range(repeats):
        for key in list(steppers)[:: 1 if r % 2 else -1]:
            c = time.process_time()
            steppers[key]()
            times[key].append(time.process_time() - c)
    med = {key: statistics.median(v) for key, v in times.items()}
    row = {"model": name, "batch": batch, "first_step_s": compile_s,
           "step_cpu_ms": {k: 1e3 * v for k, v in med.items()}, "times_s": times}
    for backend in backends:
        sym, sta = times[f"{backend} symbolic"], times[f"{backend} static"]
        row[backend] = {"ratio": med[f"{backend} symbolic"] / med[f"{backend} static"],
                        "ratio_paired": statistics.median(s / t for s, t in zip(sym, sta))}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--out", type=Path, default=RESULTS / "symbolic_step.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"{'model':>7} {'batch':>5} | {'backend':>8} {'static ms':>9} {'symbolic ms':>11} | "
          f"{'ratio':>6} {'paired':>6}")
    for name in args.models:
        r = measure(name, args.batch, args.repeats, args.warmup, tuple(args.backends))
        rows.append(r)
        for b in args.backends:
            print(f"{name:>7} {args.batch:>5} | {b:>8} {r['step_cpu_ms'][b + ' static']:>9.2f} "
                  f"{r['step_cpu_ms'][b + ' symbolic']:>11.2f} | {r[b]['ratio']:>6.3f} {r[b]['ratio_paired']:>6.3f}",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "symbolic_step", "args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows, "hardware": hardware("cpu"), "versions": versions(),
                                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
