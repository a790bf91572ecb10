"""The cost of catching in-place gradient changes (``runtime/grad_watch.py``): the same eager MLP trained by two
runs whose steps alternate, one with the run's gradient watch (a post-accumulate-grad hook per parameter, the
version lists at each micro-step) and one without it. Reported: the median thread CPU time per step of each, their
difference per step and per parameter and micro-step.

    python bench/bench_grad_watch.py --layers 4 32 --accumulation 4 --steps 400
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import simigrad_compile as sc


def mlp(layers: int, width: int) -> torch.nn.Module:
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*mods, torch.nn.Linear(width, 1))


def make(layers: int, width: int, k: int, micro: int, watch: bool):
    torch.manual_seed(0)
    model = mlp(layers, width)
    run = sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=1e-3), batch_size=micro * k,
                              min_batch_size=micro * k, max_batch_size=micro * k, max_micro_batch_size=micro,
                              group_mode="microsteps")
    if not watch:
        run.grad_watch = None
    return model, run


def one_step(model, run, xs, ys) -> int:
    t0 = time.thread_time_ns()
    for x, y in zip(xs, ys):
        F.mse_loss(model(x).squeeze(-1), y).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
    return time.thread_time_ns() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", type=int, default=[4, 32])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    k = args.accumulation
    print(f"torch {torch.__version__}, k={k}, micro={args.micro}, width={args.width}, {args.steps} steps each")
    print(" params | without us/step   with us/step | diff us/step | us per param per micro-step")
    for layers in args.layers:
        runs = [make(layers, args.width, k, args.micro, w) for w in (False, True)]
        params = sum(1 for _ in runs[0][0].parameters())
        xs = [torch.randn(args.micro, args.width) for _ in range(k)]
        ys = [torch.randn(args.micro) for _ in range(k)]
        times = ([], [])
        for s in range(args.steps + 20):
            for i, (model, run) in enumerate(runs):
                t = one_step(model, run, xs, ys)
                if s >= 20:
                    times[i].append(t / 1e3)
        off, on = statistics.median(times[0]), statistics.median(times[1])
        print(f" {params:6d} | {off:15.1f} {on:14.1f} | {on - off:12.1f} | {(on - off) / params / k:8.3f}")


if __name__ == "__main__":
    main()
