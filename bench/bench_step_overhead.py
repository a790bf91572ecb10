"""The runtime's cost per optimizer step, robust to a loaded machine: plain and ``run.optimizer`` steps alternate.

    python bench/bench_step_overhead.py                          # tiny, small, medium MLPs; accumulation 1 and 4
    python bench/bench_step_overhead.py --models tiny --accumulation 1 --steps 4000

``bench/bench_loop.py`` times whole epochs of each loop; on a shared machine the load changes between epochs by more
than the overhead it looks for. Here the two loops alternate *step by step* on the same compiled model and the
same pre-made micro-batches (no loader: ``bench/bench_loop.py`` measures the loader), and each step's thread CPU time
(``time.thread_time_ns``) is recorded. Reported per model and accumulation k: the median step of each loop, their
difference (the runtime's microseconds per step) and ratio, and the step time at which that difference would be
3% (``difference / 0.03``).

  plain  ``zero_grad`` once, k x (forward, ``(loss / k).backward()``), ``step``: the usual accumulating loop;
  ours   k x (``run.optimizer.zero_grad()``, forward, ``loss.backward()``, ``run.optimizer.step()``) with
         ``AdaptiveBatching(batch_size == min == max == micro x k, max_micro_batch_size=micro)``.

Both backwards record the backend's statistics (the same compiled model), so the split's own cost is not in
the difference; the boundary's reads of them are. The plain steps' statistics rows are reset before each of
ours, so each of ours reads only its own.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "simigrad-bench-inductor-cache"))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import simigrad_compile as sc  # noqa: E402
from bench_common import hardware, versions  # noqa: E402
from bench_loop import MODELS, mlp  # noqa: E402
from simigrad_compile.stats.gradient_stats import reset_stats  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GOAL = 1.03


def measure(name: str, k: int, args) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    widths, m = MODELS[name], args.micro
    model = torch.compile(mlp(widths), backend="simigrad", options={"compiler": args.compiler})
    pool = [(torch.randn(m, widths[0]), torch.randn(m, widths[-1])) for _ in range(8 * k)]
    plain_opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    run = sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=1e-4), batch_size=m * k,
                              min_batch_size=m * k, max_batch_size=m * k, max_micro_batch_size=m)
    opt = run.optimizer
    clock = time.thread_time_ns

    def plain(i):
        plain_opt.zero_grad()
        for j in range(k):
            x, y = pool[(i * k + j) % len(pool)]
            (F.mse_loss(model(x), y) / k).backward() if k > 1 else F.mse_loss(model(x), y).backward()
        plain_opt.step()

    def ours(i):
        for j in range(k):
            x, y = pool[(i * k + j) % len(pool)]
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

    times = {"plain": [], "ours": []}
    for i in range(args.warmup + args.steps):
        for tag, fn in (("plain", plain), ("ours", ours))[:: 1 if i % 2 else -1]:
            if tag == "ours":
                reset_stats(model)
            t0 = clock()
            fn(i)
            if i >= args.warmup:
                times[tag].append((clock() - t0) / 1e3)
    plans = {(h["micro_batch_size"], h["accumulation"]) for h in run.history}
    assert plans == {(m, k)}, f"the run left its plan: {plans}"
    run.close()
    p, o = statistics.median(times["plain"]), statistics.median(times["ours"])
    q = {t: statistics.quantiles(v, n=4) for t, v in times.items()}
    return {"model": name, "widths": list(widths), "micro": m, "accumulation": k, "steps": args.steps,
            "median_us": {"plain": p, "ours": o}, "quartiles_us": q, "overhead_us": o - p, "ratio": o / p,
            "step_us_for_3pct": (o - p) / (GOAL - 1), "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "small", "medium"], choices=list(MODELS))
    parser.add_argument("--accumulation", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--micro", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1500, help="timed steps of each loop")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/step_overhead_cpu.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'model':>6} {'k':>2} | {'plain us/step':>13} {'ours':>9} | {'overhead us':>11} {'ratio':>6} | "
          f"{'3% at step us':>13} | load")
    for name in args.models:
        for k in args.accumulation:
            r = measure(name, k, args)
            rows.append(r)
            print(f"{name:>6} {k:>2} | {r['median_us']['plain']:>13.1f} {r['median_us']['ours']:>9.1f} | "
                  f"{r['overhead_us']:>11.1f} {r['ratio']:>6.3f} | {r['step_us_for_3pct']:>13.0f} | "
                  f"{r['load_average'][0]:.1f}", flush=True)
    out = args.out or RESULTS / "step_overhead_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "step_overhead", "goal_ratio": GOAL,
                               "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                               "hardware": hardware("cpu"), "versions": versions(),
                               "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
