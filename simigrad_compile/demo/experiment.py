"""The demo's three runs, per seed, on the same number of samples:

1. a fixed small batch B0;
2. SimiGrad starting at B0, with B0 as its lower bound;
3. a fixed batch equal to SimiGrad's average batch (samples / optimizer steps), rounded to the nearest even size
   (two equal halves for the statistics) that divides the sample budget; it runs as one micro-batch of its own
   shape (one more compiled graph).
"""

from __future__ import annotations

import logging

from .data import load_splits
from .settings import COST_FULL, COST_QUICK, DemoSettings
from .train import RunResult, is_reporting_rank, train_run, world_size

log = logging.getLogger("simigrad_compile.demo")


def validation_batches(val_set, sequences: int, batch: int = 64) -> list:
    """``sequences`` windows spread evenly over the held-out files, in batches."""
    import torch

    step = max(1, len(val_set) // sequences)
    items = [val_set[i] for i in range(0, len(val_set), step)][:sequences]
    return [tuple(torch.stack(t) for t in zip(*items[i : i + batch])) for i in range(0, len(items), batch)]


def equal_average_batch(average: float, samples: int, world: int = 1) -> int:
    """The fixed batch nearest ``average`` (ties: the larger) that divides the sample budget, so that run 3 trains
    on exactly ``samples`` sequences in steps of one micro-batch; even on one process (two equal halves), a
    multiple of ``world`` under data parallelism."""
    unit = 2 if world == 1 else world
    fits = [b for b in range(unit, samples + 1, unit) if samples % b == 0]
    if not fits:
        raise ValueError(f"demo: --samples {samples} is not a multiple of {unit}: no fixed batch of whole halves "
                         "trains on exactly that many sequences")
    return min(fits, key=lambda b: (abs(b - average), -b))


def cost_line(settings: DemoSettings, seeds: int) -> str:
    """What the demo is about to do and what it cost here, printed before it starts."""
    what = f"{seeds} seed(s) x 3 runs x {settings.samples} sequences"
    return f"simigrad demo: {what}; {COST_QUICK if settings.smoke else COST_FULL}"


def run_seed(settings: DemoSettings, seed: int, train_set, val_batches: list) -> list:
    b0, world = settings.batch_size, world_size()
    fixed = train_run(f"fixed B={b0}", settings, train_set, val_batches, seed, b0, b0, position="1/3")
    adaptive = train_run(f"SimiGrad B>={b0}", settings, train_set, val_batches, seed, b0, settings.max_batch_size,
                         position="2/3")
    b3 = equal_average_batch(adaptive.average_batch, settings.samples, world)
    log.info("run 3: SimiGrad's average batch %.1f -> fixed B=%d", adaptive.average_batch, b3)
    same_average = train_run(f"fixed B={b3} (avg)", settings.replace(micro_batch_sizes=(b3 // world,)), train_set,
                             val_batches, seed, b3, b3, position="3/3")
    return [fixed, adaptive, same_average]


def run_demo(settings: DemoSettings, seeds: list) -> list:
    """A list (one entry per seed) of the three :class:`RunResult`. Under ``torchrun`` the micro-batches are
    per rank: B0 = world x micro."""
    world = world_size()
    if settings.samples % settings.batch_size:
        raise ValueError(f"demo: --samples {settings.samples} is not a multiple of --batch-size {settings.batch_size}: "
                         "every run trains on exactly that many sequences")
    if world > 1:
        if settings.batch_size % world:
            raise ValueError(f"demo: --batch-size {settings.batch_size} is not a multiple of the {world} ranks")
        settings = settings.replace(micro_batch_sizes=tuple(max(1, m // world) for m in settings.micro_batch_sizes))
    if is_reporting_rank():
        print(cost_line(settings, len(seeds)), flush=True)
    train_set, val_set = load_splits(settings.context)
    val_batches = validation_batches(val_set, settings.eval_sequences)
    log.info("data: %d training and %d validation windows of %d bytes", len(train_set), len(val_set),
             settings.context)
    return [run_seed(settings, seed, train_set, val_batches) for seed in seeds]
