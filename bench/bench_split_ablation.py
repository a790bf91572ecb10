"""The steady step with and without the split pass's BatchNorm rewrites, each against plain Inductor.

The rewrites: ``compile/passes/sample_sums.py`` (a sum over the batch and other dims reduced once per sample for
both halves) and ``compile/passes/whole_from_halves.py`` (a whole-batch sum that ``grad_input`` still reads,
rebuilt from its halves). Each variant runs in its own process (Dynamo would reuse one variant's graph for the
other), with its own plain Inductor model timed beside it: CPU time at 1 thread, steps interleaved, medians.

    python bench/bench_split_ablation.py resnet50 mobilenet_v3_small --repeats 15     # census builders, batch 8
    python bench/bench_split_ablation.py hf_bert_padded --rounds 2 --json /tmp/a.json

Prints a line per process and saves ``bench/results/split_ablation.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("with", "without")


def worker(spec: str, batch: int, variant: str, repeats: int) -> dict:
    import torch
    import torch._functorch.config

    import bench_step
    import bench_step_census as census
    import simigrad_compile
    from simigrad_compile.compile.passes import sample_sums, split_backward

    torch.set_num_threads(1)
    torch._functorch.config.enable_autograd_cache = False
    if variant == "without":
        sample_sums.per_sample = lambda *a: None
        split_backward.rebuild_shared = lambda ctx: 0
    census.warm_imports()
    base, data, loss_of = census.build(spec, batch)
    models, fns = {}, {}
    for name in ("inductor", "simigrad"):
        models[name] = copy.deepcopy(base)
        _, fns[name], _, _ = census.first_step(models[name], data, loss_of, name, lambda: None)
    bench_step.CLOCK[0] = time.process_time
    times = {name: [] for name in fns}
    for r in range(repeats + 2):
        for name in (list(fns) if r % 2 else list(fns)[::-1]):
            seconds, _ = bench_step.step(fns[name], models[name], None, None, lambda: None)
            if r >= 2:
                times[name].append(seconds)
        simigrad_compile.gradient_stats(models["simigrad"], reset=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"spec": spec, "batch": batch, "variant": variant, "median_s": med,
            "ratio": med["simigrad"] / med["inductor"], "loadavg_1": os.getloadavg()[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", nargs="+", help="census builder names (bench_coverage_models), or lraspp")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rounds", type=int, default=1, help="processes per variant, alternating")
    p.add_argument("--json", default=os.path.join(HERE, "results", "split_ablation.json"))
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.specs[0], a.batch, a.worker, a.repeats)))
        return 0
    from bench_common import hardware, versions

    rows = []
    for spec in a.specs:
        for _ in range(a.rounds):
            for variant in VARIANTS:
                out = subprocess.run([sys.executable, __file__, spec, "--batch", str(a.batch), "--repeats",
                                      str(a.repeats), "--worker", variant], capture_output=True, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{spec:36s} {variant:8s} inductor {r['median_s']['inductor'] * 1e3:8.2f} ms  simigrad "
                      f"{r['median_s']['simigrad'] * 1e3:8.2f} ms  ratio {r['ratio']:.3f}  load {r['loadavg_1']:.1f}",
                      flush=True)
    with open(a.json, "w") as f:
        json.dump({"command": " ".join(["python", *sys.argv]), "hardware": hardware("cpu"), "versions": versions(),
                   "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
