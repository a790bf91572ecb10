"""User time, system time and minor page faults per steady step, plain Inductor against simigrad, one census model.

    OMP_NUM_THREADS=1 python bench/bench_step_faults.py convnext_tiny
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824 \
        OMP_NUM_THREADS=1 python bench/bench_step_faults.py convnext_tiny

``time.process_time`` (the census's clock) is user plus system time. glibc's default allocator serves a large
block with its own ``mmap`` (above a threshold that it moves as blocks are freed) and gives it back to the kernel
on ``free``, and trims the heap's free top: the next step's first writes to such memory fault its pages in again,
system time that grows with the bytes, not with the arithmetic. The second command fixes the threshold at 32 MB
and turns trimming off, so freed memory stays in the process, as a caching allocator (or jemalloc/tcmalloc) keeps it.
Prints one line per backend and round (2 rounds of ``--steps`` steps after the first steps).
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", help="a census builder name (bench_coverage_models), or lraspp")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    import torch

    import bench_step
    import bench_step_census as census
    import simigrad_compile

    torch.set_num_threads(1)
    census.warm_imports()
    base, data, loss_of = census.build(a.spec, a.batch)
    models, fns = {}, {}
    for name in ("inductor", "simigrad"):
        models[name] = copy.deepcopy(base)
        _, fns[name], _, _ = census.first_step(models[name], data, loss_of, name, lambda: None)
    for r in range(2):
        for name in fns:
            t0, f0 = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(a.steps):
                bench_step.step(fns[name], models[name], None, None, lambda: None)
            if name == "simigrad":
                simigrad_compile.gradient_stats(models[name], reset=True)
            t1, f1 = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            print(f"round {r} {name:9s} user {(t1.user - t0.user) / a.steps * 1e3:7.1f} ms/step  system "
                  f"{(t1.system - t0.system) / a.steps * 1e3:7.1f} ms/step  minor faults {(f1 - f0) / a.steps:8.0f}/step",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
