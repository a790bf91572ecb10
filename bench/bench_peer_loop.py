"""The training loop against its peers: plain PyTorch, HF Accelerate, Lightning and ``AdaptiveBatching``.

    python bench/bench_peer_loop.py                           # tiny, small, medium MLP; micro 32 x 2; 9 repeats
    python bench/bench_peer_loop.py --models tiny --repeats 5 --accumulation 4
    python bench/bench_peer_loop.py --compiler aot_eager      # the same graphs without Inductor's code generation

Every loop trains the same compiled model object (``torch.compile(mlp, backend="simigrad")``, Inductor by default:
the peers run the same backward graphs, so the split's own cost is in all four and the difference is the loop's)
on the same ``TensorDataset`` of random data, micro-batch ``--micro``, ``--accumulation`` k micro-batches per
optimizer step, 0 loader workers, its own ``torch.optim.SGD``:

  plain       ``DataLoader(shuffle=True, drop_last=True)``; ``zero_grad`` every k, forward, ``(loss / k).backward()``,
              ``step`` every k (``bench_loop.plain_epoch``);
  accelerate  ``Accelerator(gradient_accumulation_steps=k, cpu=True)``, ``prepare(model, optimizer, loader)``,
              per batch ``with accelerator.accumulate(model):`` forward, ``accelerator.backward(loss)``, ``step()``,
              ``zero_grad()`` (Accelerate's documented loop);
  lightning   ``Trainer(accumulate_grad_batches=k, max_epochs=1)`` on a ``LightningModule`` whose
              ``training_step`` returns the loss (no logger, checkpoint, progress bar or summary); a new Trainer
              per repeat, timed from ``on_train_epoch_start`` to ``on_train_epoch_end`` (the ``fit`` set-up, tens
              of ms, is in the JSON as ``lightning_fit``);
  adaptive    ``AdaptiveBatching(batch_size == min == max == micro x k, max_micro_batch_size=micro)`` (pinned: it
              runs the same k micro-steps of ``micro`` every step, asserted from its history), ``run.dataloader``,
              per batch ``run.optimizer.zero_grad()``, forward, ``backward()``, ``run.optimizer.step()``
              (``bench_loop.adaptive_epoch``); it also computes the step's ``microsteps`` statistics. A new run
              per repeat (made and closed outside the timing), so its gradient hooks are not in the peers' time.

A repeat times one epoch of each loop, the order rotating between repeats, with the main process's CPU time
(``time.process_time``, 1 thread; on a loaded machine CPU time swings less than wall time). Reported: the median
microseconds per sample of each, each peer's ratio to plain, and ``adaptive - plain`` per optimizer step (the
loop's extra cost a step). JSON: ``bench/results/peer_loop.json`` with every repeat and the load average.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "simigrad-bench-inductor-cache"))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import simigrad_compile as sc  # noqa: E402
from bench_common import hardware, versions  # noqa: E402
from bench_loop import MODELS, adaptive_epoch, mlp, plain_epoch  # noqa: E402
from simigrad_compile.stats.gradient_stats import reset_stats  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LOOPS = ("plain", "accelerate", "lightning", "adaptive")
GOAL = 1.03


def accelerate_loop(model, dataset, args):
    """Accelerate's documented accumulation loop; returns the epoch function."""
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=args.accumulation, cpu=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.micro, shuffle=True, drop_last=True)
    acc_model, opt, acc_loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1e-3), loader)

    def epoch() -> int:
        n = 0
        for x, y in acc_loader:
            with accelerator.accumulate(acc_model):
                loss = F.mse_loss(acc_model(x), y)
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
            n += len(x)
        return n

    return epoch


def lightning_loop(model, dataset, args):
    """A new ``Trainer(accumulate_grad_batches=k)`` per call; returns the epoch function (samples, epoch CPU
    seconds and ``fit`` CPU seconds go through ``times``)."""
    import lightning.pytorch as pl

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, _):
            x, y = batch
            return F.mse_loss(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Clock(pl.Callback):
        def on_train_epoch_start(self, *_):
            self.t0 = time.process_time()

        def on_train_epoch_end(self, *_):
            self.seconds = time.process_time() - self.t0

    module = Module()
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.micro, shuffle=True, drop_last=True)
    fits = []

    def epoch() -> tuple:
        clock = Clock()
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, accumulate_grad_batches=args.accumulation,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, callbacks=[clock],
                             default_root_dir=tempfile.gettempdir())
        t0 = time.process_time()
        trainer.fit(module, loader)
        fits.append(time.process_time() - t0)
        return len(loader) * args.micro, clock.seconds

    return epoch, fits


def adaptive_loop(model, dataset, args):
    """A new pinned ``AdaptiveBatching`` per call (made before, closed after the timing); returns the epoch
    function and the plans the runs took."""
    batch = args.micro * args.accumulation
    plans = set()

    def make():
        run = sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=1e-3), batch_size=batch,
                                  min_batch_size=batch, max_batch_size=batch, max_micro_batch_size=args.micro)
        return run, run.dataloader(dataset, shuffle=True)

    def finish(run):
        plans.update((h["micro_batch_size"], h["accumulation"]) for h in run.history)
        run.close()

    return make, finish, plans


def bench(name: str, args) -> dict:
    torch._dynamo.reset()  # Dynamo would run the last size's compiled region for this new instance of the class
    torch.manual_seed(0)
    widths = MODELS[name]
    ds = torch.utils.data.TensorDataset(torch.randn(args.samples, widths[0]), torch.randn(args.samples, widths[-1]))
    model = torch.compile(mlp(widths), backend="simigrad", options={"compiler": args.compiler})
    plain_opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    plain = torch.utils.data.DataLoader(ds, batch_size=args.micro, shuffle=True, drop_last=True)
    accelerate = accelerate_loop(model, ds, args)
    lightning, fits = lightning_loop(model, ds, args)
    make, finish, plans = adaptive_loop(model, ds, args)

    def timed(loop: str) -> tuple:
        """One epoch of ``loop``: (samples, CPU seconds)."""
        reset_stats(model)  # the rows one loop's backwards recorded must not reach another's reads
        if loop == "lightning":
            return lightning()
        run, loader = make() if loop == "adaptive" else (None, None)
        fn = {"plain": lambda: plain_epoch(model, plain_opt, plain, args.accumulation), "accelerate": accelerate,
              "adaptive": lambda: adaptive_epoch(model, run, loader)}[loop]
        c0 = time.process_time()
        n = fn()
        seconds = time.process_time() - c0
        if run is not None:
            finish(run)
        return n, seconds

    load = [os.getloadavg()]
    for loop in LOOPS:  # compile, first calls
        timed(loop)
    cpu = {k: [] for k in LOOPS}
    for r in range(args.repeats):
        for loop in LOOPS[r % len(LOOPS):] + LOOPS[:r % len(LOOPS)]:
            n, seconds = timed(loop)
            cpu[loop].append(seconds / n * 1e6)
    load.append(os.getloadavg())
    assert plans == {(args.micro, args.accumulation)}, f"the adaptive loop left its plan: {plans}"
    med = {k: statistics.median(v) for k, v in cpu.items()}
    batch = args.micro * args.accumulation
    return {"model": name, "widths": list(widths), "micro": args.micro, "accumulation": args.accumulation,
            "samples_per_epoch": args.samples,
            "cpu_us_per_sample": {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v}
                                  for k, v in cpu.items()},
            "ratio_to_plain": {k: med[k] / med["plain"] for k in LOOPS},
            "plain_us_per_step": med["plain"] * batch,
            "adaptive_extra_us_per_step": (med["adaptive"] - med["plain"]) * batch,
            "lightning_fit_cpu_s": fits, "load_average": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "small", "medium"], choices=list(MODELS))
    parser.add_argument("--micro", type=int, default=32)
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step (k)")
    parser.add_argument("--samples", type=int, default=4096, help="samples per epoch (a multiple of micro x k)")
    parser.add_argument("--repeats", type=int, default=9, help="timed epochs per loop, interleaved")
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: the box is shared)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/peer_loop.json)")
    args = parser.parse_args()
    if args.samples % (args.micro * args.accumulation):
        parser.error("--samples must be a multiple of --micro x --accumulation (no epoch tail in this benchmark)")
    torch.set_num_threads(args.threads)
    rows = []
    print(f"CPU us per sample (median of {args.repeats}), micro {args.micro} x {args.accumulation}, "
          f"compiler {args.compiler}")
    print(f"{'model':>6} | {'plain':>7} {'accel':>7} {'lightn':>7} {'ours':>7} | {'accel/pl':>8} {'light/pl':>8} "
          f"{'ours/pl':>7} | {'plain us/step':>13} {'ours-plain us/step':>18} | load")
    for name in args.models:
        row = bench(name, args)
        rows.append(row)
        us, q = row["cpu_us_per_sample"], row["ratio_to_plain"]
        print(f"{name:>6} | {us['plain']['median']:>7.2f} {us['accelerate']['median']:>7.2f} "
              f"{us['lightning']['median']:>7.2f} {us['adaptive']['median']:>7.2f} | {q['accelerate']:>8.3f} "
              f"{q['lightning']:>8.3f} {q['adaptive']:>7.3f} | {row['plain_us_per_step']:>13.0f} "
              f"{row['adaptive_extra_us_per_step']:>18.1f} | {row['load_average'][0][0]:.1f}-"
              f"{row['load_average'][1][0]:.1f}", flush=True)
    result = {"benchmark": "peer_loop", "goal_ratio": GOAL, "clock": "time.process_time",
              "backend": f"simigrad ({args.compiler}), the same compiled model for all four loops",
              "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "hardware": hardware("cpu"),
              "versions": versions(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    out = args.out or RESULTS / "peer_loop.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
