"""Step time of the one symbolic-batch graph against the static graph of the same micro-batch size, in one process.

    OMP_NUM_THREADS=1 python bench/bench_symbolic_step.py                 # gpt, bert, resnet at micro-batch 8
    OMP_NUM_THREADS=1 python bench/bench_symbolic_step.py --models resnet --batch 4 --repeats 41

``bench/bench_compile_cost.py`` times each compiler in a process of its own, so its step times carry the
machine's drift between processes (up to 2x here). This one builds the model of ``bench_compile_cost.build``
twice in one process, compiles one copy with ``backend="simigrad"`` on static shapes and the other on a batch
dim marked dynamic (what ``symbolic_batch=True`` makes the run's loader do), and times their steps (forward,
backward, SGD step; CPU time at 1 thread) interleaved, after warm-up steps. Reported: the median of each and
the median of the per-round ratios (symbolic / static). JSON: ``bench/results/symbolic_step.json``.
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


def measure(name: str, batch: int, repeats: int, warmup: int) -> dict:
    base, dataset, loss_of = build(name, batch)
    steppers, compile_s = {}, {}
    torch._dynamo.reset()
    for mode in ("static", "symbolic"):
        model = copy.deepcopy(base)
        compiled = torch.compile(model, backend="simigrad", dynamic=False if mode == "static" else None)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        data = [mark_batch(0, None, mode == "symbolic")(t.clone()) for t in dataset[:batch]]

        def step(compiled=compiled, opt=opt, data=data, model=model):
            loss_of(compiled, data).backward()
            opt.step()
            opt.zero_grad()
            gradient_stats(model, reset=True)

        t0 = time.perf_counter()
        step()
        compile_s[mode] = time.perf_counter() - t0
        steppers[mode] = step
    for _ in range(warmup):
        for step in steppers.values():
            step()
    times = {mode: [] for mode in steppers}
    for r in range(repeats):
        for mode in list(steppers)[:: 1 if r % 2 else -1]:
            c = time.process_time()
            steppers[mode]()
            times[mode].append(time.process_time() - c)
    ratios = [s / t for s, t in zip(times["symbolic"], times["static"])]
    med = {mode: statistics.median(v) for mode, v in times.items()}
    return {"model": name, "batch": batch, "first_step_s": compile_s,
            "step_cpu_ms": {m: 1e3 * v for m, v in med.items()}, "ratio": med["symbolic"] / med["static"], "ratio_paired": statistics.median(ratios),
            "times_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "symbolic_step.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"{'model':>7} {'batch':>5} | {'static ms':>9} {'symbolic ms':>11} | {'ratio':>6} {'paired':>6}")
    for name in args.models:
        r = measure(name, args.batch, args.repeats, args.warmup)
        rows.append(r)
        print(f"{name:>7} {args.batch:>5} | {r['step_cpu_ms']['static']:>9.2f} {r['step_cpu_ms']['symbolic']:>11.2f} | "
              f"{r['ratio']:>6.3f} {r['ratio_paired']:>6.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "symbolic_step", "args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows, "hardware": hardware("cpu"), "versions": versions(),
                                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
