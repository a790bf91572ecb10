"""Loop overhead: a plain ``DataLoader`` loop against ``run.dataloader`` + ``run.optimizer``, same model and data.

    python bench/bench_loop.py                                  # tiny and small MLP, workers 0 and 2, 9 repeats
    python bench/bench_loop.py --models tiny --workers 0 --profile   # + cProfile's top lines of one adaptive epoch
    python bench/bench_loop.py --workers 0 --breakdown 6      # + CPU time per step of each part, plain vs step loop
    python bench/bench_loop.py --workers 0 --accumulation 4   # 4 micro-batches per step (plain: the accumulating loop)
    python bench/bench_loop.py --models medium large --workers 0   # where the overhead is within the goal

Both loops train the same compiled model (``backend="simigrad"``, so a one-micro-step window has its statistics
from the split backward) on the same ``TensorDataset`` of random data, at the same micro-batch:

  plain     ``DataLoader(batch_size=micro, shuffle=True, drop_last=True)``; per batch ``zero_grad``, forward,
            ``backward``, ``step``;
  adaptive  ``AdaptiveBatching(min_batch_size == max_batch_size == batch_size == micro x k)`` (``k``:
            ``--accumulation``, default 1; the same micro-batch), ``run.dataloader(shuffle=True)``; the same four
            calls on ``run.optimizer`` (with k > 1 the plain loop is the usual accumulating one: ``loss / k``,
            ``zero_grad`` and ``step`` every k micro-batches);
  step      the plain loop's ``DataLoader`` with a second run's ``run.optimizer``: the runtime's step alone, so
            that adaptive/step is the loader's share and step/plain the step's share of the overhead.

Both loaders use the same ``num_workers`` (``persistent_workers`` when > 0, so worker start-up is not timed).
The dataset size is a multiple of the micro-batch, so no epoch has a tail. A repeat times one epoch of each
loop, the order alternating between repeats; reported: the median microseconds per sample of each and the ratio
adaptive/plain of the medians. Goal: ratio <= 1.03.

Each epoch is timed twice: wall time, and the main process's CPU time (``time.process_time``; the time the
loop's own process computed, so a shared, loaded machine that takes the core away counts less; with workers,
the workers' collation is not in it). JSON: ``us_per_sample`` (wall), ``cpu_us_per_sample``, ``ratio`` /
``cpu_ratio`` (adaptive/plain of the medians), ``ratio_step`` / ``cpu_ratio_step``, and the load average.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "simigrad-bench-inductor-cache"))

import argparse  # noqa: E402
import cProfile  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import simigrad_compile as sc  # noqa: E402
from bench_common import hardware, versions  # noqa: E402
from simigrad_compile.stats.gradient_stats import gradient_stats  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GOAL = 1.03
MODELS = {"tiny": (16, 32, 1), "small": (64, 256, 256, 10), "medium": (256, 1024, 1024, 10),
          "large": (512, 2048, 2048, 10)}
"""Layer widths of each MLP (ReLU between layers)."""


def mlp(widths) -> nn.Module:
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return _Module(nn.Sequential(*layers))


class _Module(nn.Module):
    """A module class around the ``Sequential`` (Dynamo compiles a top-level ``Sequential`` fine, DDP does not)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def plain_epoch(model, opt, loader, accumulation: int = 1) -> int:
    """The plain loop; with ``accumulation`` k > 1 the usual accumulating loop (loss / k, a step every k)."""
    n = 0
    for i, (x, y) in enumerate(loader):
        if i % accumulation == 0:
            opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        (loss / accumulation if accumulation > 1 else loss).backward()
        if i % accumulation == accumulation - 1:
            opt.step()
        n += len(x)
    return n


def adaptive_epoch(model, run, loader) -> int:
    n = 0
    for x, y in loader:
        run.optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        run.optimizer.step()
        n += len(x)
    return n


def profile_epoch(model, run, loader, top: int) -> str:
    """cProfile of one adaptive epoch on the process's CPU time: the top lines by own time, then the runtime's
    functions by cumulative time."""
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    adaptive_epoch(model, run, loader)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(r"simigrad_compile/(runtime|stats|compile)|adaptive_epoch", top)
    return out.getvalue()


def breakdown(model, plain_opt, run, loader, epochs: int) -> dict:
    """Thread CPU microseconds per step of each part of the plain and the step loop (same loader), interleaved:
    where the step loop's extra time goes, including what the runtime's step costs the rest of the loop."""
    clock, total = time.thread_time_ns, {}

    def add(key, ns):
        total[key] = total.get(key, 0) + ns

    def timed(key, fn):
        def call(*a, **k):
            t0 = clock()
            out = fn(*a, **k)
            add(key, clock() - t0)
            return out
        return call

    inner = run.optimizer.optimizer
    for key in ("micro_step_done", "begin_step", "end_step"):
        setattr(run, key, timed(f"step.core.{key}", getattr(run, key)))
    inner.step = timed("step.core.inner_step", inner.step)

    def epoch(opt, tag):
        it, t0 = iter(loader), clock()
        for x, y in it:
            t1 = clock()
            opt.zero_grad()
            t2 = clock()
            F.mse_loss(model(x), y).backward()
            t3 = clock()
            opt.step()
            t4 = clock()
            for part, ns in (("data", t1 - t0), ("zero_grad", t2 - t1), ("forward_backward", t3 - t2),
                             ("step", t4 - t3)):
                add(f"{tag}.{part}", ns)
            t0 = clock()

    try:
        for e in range(epochs):
            for opt, tag in ((plain_opt, "plain"), (run.optimizer, "step"))[:: 1 if e % 2 else -1]:
                epoch(opt, tag)
    finally:
        for key in ("micro_step_done", "begin_step", "end_step"):
            delattr(run, key)
        del inner.step
    steps = epochs * len(loader)
    return {k: v / steps / 1e3 for k, v in sorted(total.items())}


def bench(name: str, workers: int, args) -> dict:
    torch._dynamo.reset()  # Dynamo would run the last point's compiled region for this new instance of the class
    torch.manual_seed(0)
    widths = MODELS[name]
    x = torch.randn(args.samples, widths[0])
    ds = torch.utils.data.TensorDataset(x, torch.randn(args.samples, widths[-1]))
    model = torch.compile(mlp(widths), backend="simigrad", options={"compiler": args.compiler})
    kw = dict(num_workers=workers, persistent_workers=workers > 0)
    plain_opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    plain = torch.utils.data.DataLoader(ds, batch_size=args.micro, shuffle=True, drop_last=True, **kw)
    batch = args.micro * args.accumulation
    run, step_run = (sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=1e-3), batch_size=batch,
                                         min_batch_size=batch, max_batch_size=batch,
                                         max_micro_batch_size=args.micro) for _ in range(2))
    adaptive = run.dataloader(ds, shuffle=True, **kw)
    loops = {"plain": lambda: plain_epoch(model, plain_opt, plain, args.accumulation),
             "adaptive": lambda: adaptive_epoch(model, run, adaptive),
             "step": lambda: adaptive_epoch(model, step_run, plain)}
    for fn in loops.values():  # compile, start the workers
        fn()
    times = {k: [] for k in loops}
    cpu = {k: [] for k in loops}
    for r in range(args.repeats):
        for k in (("plain", "adaptive", "step") if r % 2 == 0 else ("step", "adaptive", "plain")):
            gradient_stats(model, reset=True)  # the plain loop's rows must not reach the adaptive loop's reads
            t0, c0 = time.perf_counter(), time.process_time()
            n = loops[k]()
            times[k].append((time.perf_counter() - t0) / n * 1e6)
            cpu[k].append((time.process_time() - c0) / n * 1e6)
    plans = {(h["micro_batch_size"], h["accumulation"]) for h in run.history + step_run.history}
    assert plans == {(args.micro, args.accumulation)}, f"the adaptive loop left its plan: {plans}"
    result = {"model": name, "widths": list(widths), "workers": workers, "micro": args.micro,
              "accumulation": args.accumulation,
              "us_per_sample": {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v}
                                for k, v in times.items()},
              "cpu_us_per_sample": {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v}
                                    for k, v in cpu.items()},
              "ratio": statistics.median(times["adaptive"]) / statistics.median(times["plain"]),
              "ratio_step": statistics.median(times["step"]) / statistics.median(times["plain"]),
              "ratio_of_min": min(times["adaptive"]) / min(times["plain"]),
              "cpu_ratio": statistics.median(cpu["adaptive"]) / statistics.median(cpu["plain"]),
              "cpu_ratio_step": statistics.median(cpu["step"]) / statistics.median(cpu["plain"]),
              "load_average": os.getloadavg()}
    if args.profile:
        result["profile"] = profile_epoch(model, run, adaptive, args.profile_lines)
    if args.breakdown:
        gradient_stats(model, reset=True)
        result["breakdown_us_per_step"] = breakdown(model, plain_opt, step_run, plain, args.breakdown)
    run.close()
    step_run.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=list(MODELS))
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--micro", type=int, default=32)
    parser.add_argument("--accumulation", type=int, default=1,
                        help="micro-batches per step (the plain loop accumulates as usual: loss / k, a step every k)")
    parser.add_argument("--samples", type=int, default=8192, help="samples per epoch (a multiple of --micro x k)")
    parser.add_argument("--repeats", type=int, default=9, help="timed epochs per loop, interleaved")
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: the box is shared)")
    parser.add_argument("--profile", action="store_true", help="cProfile one adaptive epoch per point")
    parser.add_argument("--profile-lines", type=int, default=25)
    parser.add_argument("--breakdown", type=int, default=0, metavar="EPOCHS",
                        help="per-step CPU time of each part of the plain and step loops over EPOCHS epochs "
                             "(accumulation 1)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/loop_cpu.json)")
    args = parser.parse_args()
    if args.breakdown and args.accumulation > 1:
        parser.error("--breakdown compares one step per micro-batch: use it with --accumulation 1")
    if args.samples % (args.micro * args.accumulation):
        parser.error("--samples must be a multiple of --micro x --accumulation (no epoch tail in this benchmark)")
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'model':>6} {'workers':>7} | {'plain us/sample':>15} {'adaptive':>9} {'step':>7} | "
          f"{'adaptive/plain':>14} {'(of min)':>8} {'step/plain':>10} | {'cpu: adaptive/plain':>19} "
          f"{'step/plain':>10} | load")
    for name in args.models:
        for workers in args.workers:
            row = bench(name, workers, args)
            rows.append(row)
            us = row["us_per_sample"]
            print(f"{name:>6} {workers:>7} | {us['plain']['median']:>15.2f} {us['adaptive']['median']:>9.2f} "
                  f"{us['step']['median']:>7.2f} | {row['ratio']:>14.3f} {row['ratio_of_min']:>8.3f} "
                  f"{row['ratio_step']:>10.3f} | {row['cpu_ratio']:>19.3f} {row['cpu_ratio_step']:>10.3f} | "
                  f"{row['load_average'][0]:.1f}", flush=True)
            if args.profile:
                print(row["profile"])
            if args.breakdown:
                print("  ".join(f"{k} {v:.1f}" for k, v in row["breakdown_us_per_step"].items()))
    result = {"benchmark": "loop", "goal_ratio": GOAL, "args": {k: str(v) for k, v in vars(args).items()},
              "rows": rows, "hardware": hardware("cpu"), "versions": versions(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    out = args.out or RESULTS / "loop_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
