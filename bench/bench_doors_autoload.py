"""An ordinary DDP loop (``DistributedDataParallel``, ``DistributedSampler``, its ``DataLoader``), timed: the
``SIMIGRAD=1`` pair of ``bench/bench_doors_dist.py``, launched with and without ``SIMIGRAD=1``.

    OMP_NUM_THREADS=1 SIMIGRAD=1 SIMIGRAD_BATCH_SIZE=64 SIMIGRAD_MIN_BATCH_SIZE=64 SIMIGRAD_MAX_BATCH_SIZE=64 \
        python -m torch.distributed.run --standalone --nproc_per_node=2 bench/bench_doors_autoload.py OUT.json 32 1

Arguments: OUT, the loader's batch per rank, and the door's accumulation A (``SIMIGRAD_*_BATCH_SIZE`` pinned to
``world x batch x A`` by the launcher; the plain run's loader batch is then ``batch x A``, one batch a step, the
same global batch). The loop itself is the user's: the training code never imports simigrad_compile. Around
it the script records the step-end times and CPU times (``time.process_time``, all threads): every A batches
under ``SIMIGRAD=1`` (the door's history confirms each was one step). It also counts the bytes per rank per step
(:class:`~simigrad_compile.distributed.traffic.Traffic`, ring formulas): under ``SIMIGRAD=1`` over
``--count-steps`` steps of the loop after the warm-up (those steps are not timed); without it, on a twin DDP
module running the stock Python ``allreduce_hook`` before the loop.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_doors_dist import TIMING, add_options  # noqa: E402
from bench_doors_pairs import exit_without_teardown, problem, sgd  # noqa: E402


def steps_of(model, opt, loader, sampler, n: int, per_step: int, tick) -> None:
    """``n`` optimizer steps of the user's loop; ``tick()`` after each ``per_step`` batches."""
    epoch, k, done = 0, 0, 0
    while done < n:
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            k += 1
            if k % per_step == 0:
                done += 1
                tick()
                if done == n:
                    return
        epoch += 1


def main(a) -> None:
    from simigrad_compile.distributed.traffic import Traffic

    torch.set_num_threads(1)
    simigrad = os.environ.get("SIMIGRAD") == "1"
    dist.init_process_group("gloo")
    data, net = problem(a.width)
    batch = a.batch if simigrad else a.batch * a.accumulation
    per_step = a.accumulation if simigrad else 1
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=batch, sampler=sampler)
    traffic, stack = Traffic(), contextlib.ExitStack()
    if not simigrad:
        twin = DistributedDataParallel(copy.deepcopy(net))
        twin.register_comm_hook(None, allreduce_hook)
        with traffic.counting():
            steps_of(twin, sgd(twin.parameters()), loader, sampler, a.count_steps, 1, lambda: None)
    model = DistributedDataParallel(net)
    opt = sgd(model.parameters())
    ends, cpu = [], []
    count_from = a.warmup if simigrad else -1

    def tick():
        ends.append(time.perf_counter())
        cpu.append(time.process_time())
        if len(ends) == count_from:
            stack.enter_context(traffic.counting())
        elif len(ends) == count_from + a.count_steps:
            stack.close()

    skip = a.count_steps if simigrad else 0
    steps_of(model, opt, loader, sampler, a.warmup + skip + a.steps, per_step, tick)
    timed, timed_cpu = ends[a.warmup + skip - 1:], cpu[a.warmup + skip - 1:]
    intervals = [b - c for c, b in zip(timed, timed[1:])]
    cpu_median = statistics.median(b - c for c, b in zip(timed_cpu, timed_cpu[1:]))
    every = [torch.empty(len(intervals) + 2, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(every, torch.tensor([*intervals, cpu_median, traffic.sent / a.count_steps], dtype=torch.float64))
    if simigrad:
        from simigrad_compile.integrations import auto_loop

        history = auto_loop.history(opt)
        want = dist.get_world_size() * a.batch * a.accumulation
        assert len(history) == len(ends), (len(history), len(ends))
        assert {(r["batch_size"], r["accumulation"], r["statistics"]) for r in history} == \
            {(want, a.accumulation, "ranks")}, history[:2]
    if dist.get_rank() == 0:
        slowest = [max(step) for step in zip(*(e[:-2].tolist() for e in every))]
        with open(a.out, "w") as f:
            json.dump({"simigrad": simigrad, "median_s": statistics.median(slowest),
                       "cpu_s": statistics.mean(float(e[-2]) for e in every),
                       "bytes_per_step": [float(e[-1]) for e in every], "calls": dict(traffic.calls),
                       "loadavg_1_5_15": os.getloadavg()}, f)
    exit_without_teardown()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("batch", type=int)
    p.add_argument("accumulation", type=int)
    add_options(p, TIMING)
    main(p.parse_args())
