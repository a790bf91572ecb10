"""One door against its plain library, in the same processes: the worker of ``bench/bench_doors_dist.py``.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 bench/bench_doors_pairs.py \
        hf OUT.json --steps 20 --warmup 5 --repeats 3

DOOR, each pair on the same MLP, data, micro-batch, accumulation and global batch (the door's batch pinned:
``min_batch_size = max_batch_size = batch_size``, so both do the same work every step):

* ``hf``: ``SimigradTrainer`` against ``transformers.Trainer`` (``gradient_accumulation_steps``), both on the
  Trainer's own DDP (``use_cpu=True, ddp_backend="gloo"``);
* ``lightning``: ``SimigradCallback`` against no callback (``accumulate_grad_batches``), ``strategy="ddp"``;
* ``lightning_fsdp``: the same on ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` on each Linear and the net);
  bytes are counted for ours only (plain FSDP2's reduce-scatter is not hooked; both send ``(N - 1) c`` per rank
  and unit, ``distributed/fsdp.py``);
* ``hand``: ``AdaptiveBatching`` on a ``DistributedDataParallel`` module (``run.dataloader``, ``run.optimizer``;
  the split reduction installed by the core) against the plain DDP loop (``DistributedSampler``, ``no_sync``).

Each fit is fresh (a new model copy, optimizer and Trainer) and runs ``warmup + steps`` optimizer steps; a step's
time is the interval between two optimizer-step ends, the slowest rank's; a fit's figure is the median over its
``steps`` timed steps. Beside it, the CPU time of a step (``time.process_time``: every thread of the process, so
gloo's and the split reduction's too), the median over the timed steps, averaged over the ranks: on a loaded
machine the wall time swings with the scheduler, the CPU time much less. Fits alternate ours/plain, the order
reversed every repeat. Bytes per rank per step:
:class:`~simigrad_compile.distributed.traffic.Traffic` (ring formulas) over ``count_steps`` steps after the
warm-up of one extra fit per variant; the plain fit's DDP then runs the stock Python ``allreduce_hook`` (the same
all-reduce as DDP's built-in C++ one, which Traffic cannot see).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from bench_doors_dist import LAUNCH, TIMING, add_options

os.environ.setdefault("HF_HUB_OFFLINE", "1")
IN, CLASSES, SAMPLES, LR = 32, 10, 8192, 0.01


class Net(torch.nn.Module):
    """The MLP every pair trains; with ``labels`` it returns the Trainer's ``{"loss": ...}``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(IN, width), torch.nn.GELU(), torch.nn.Linear(width, width),
                                        torch.nn.GELU(), torch.nn.Linear(width, CLASSES))

    def forward(self, x, labels=None):
        out = self.body(x)
        return out if labels is None else {"loss": F.cross_entropy(out, labels)}


def problem(width: int):
    """The same data and initial weights on every rank."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, IN, generator=g)
    y = torch.randint(0, CLASSES, (SAMPLES,), generator=g)
    torch.manual_seed(0)
    return torch.utils.data.TensorDataset(x, y), Net(width)


def sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


class Meter:
    """Step-end times of one fit, and the bytes sent over steps ``[count_from, count_from + count)``."""

    def __init__(self, count_from: int = -1, count: int = 0) -> None:
        from simigrad_compile.distributed.traffic import Traffic

        self.ends: list = []
        self.cpu: list = []
        self.count_from, self.count = count_from, count
        self.traffic, self._stack = Traffic(), contextlib.ExitStack()

    def tick(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())
        n = len(self.ends)
        if n == self.count_from:
            self._stack.enter_context(self.traffic.counting())
        elif n == self.count_from + self.count:
            self._stack.close()

    def intervals(self, warmup: int, clock: str = "wall") -> list:
        ends = self.ends if clock == "wall" else self.cpu
        return [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]


# --- Hugging Face ---------------------------------------------------------------------------------------------
class _Items(torch.utils.data.Dataset):
    def __init__(self, data):
        self.x, self.y = data.tensors

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def fit_hf(ours: bool, net, data, a, meter: Meter, counted: bool) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from simigrad_compile.integrations.hf import SimigradTrainer

    class Tick(TrainerCallback):
        trainer = None

        def on_train_begin(self, args, state, control, **kwargs):
            if counted and not ours:
                self.trainer.model_wrapped.register_comm_hook(None, allreduce_hook)

        def on_step_end(self, args, state, control, **kwargs):
            meter.tick()

    world = dist.get_world_size()
    model = copy.deepcopy(net)
    args = TrainingArguments(output_dir=os.path.join(tempfile.gettempdir(), "bench_doors_hf"), learning_rate=LR,
                             per_device_train_batch_size=a.micro, max_steps=a.warmup + a.steps, report_to="none",
                             save_strategy="no", logging_strategy="no", use_cpu=True, ddp_backend="gloo",
                             disable_tqdm=True, seed=0, lr_scheduler_type="constant", max_grad_norm=0.0,
                             gradient_accumulation_steps=1 if ours else a.accumulation)
    common = dict(model=model, args=args, train_dataset=_Items(data), data_collator=default_data_collator,
                  optimizers=(sgd(model.parameters()), None))
    tick = Tick()
    if ours:
        batch = world * a.micro * a.accumulation
        tr = SimigradTrainer(**common, simigrad=dict(batch_size=batch, min_batch_size=batch, max_batch_size=batch,
                                                     max_micro_batch_size=a.micro))
    else:
        tr = Trainer(**common)
    tick.trainer = tr
    tr.add_callback(tick)
    tr.train()
    if ours:
        assert {(r["batch_size"], r["accumulation"], r["statistics"]) for r in tr.simigrad.history} == \
            {(batch, a.accumulation, "ranks")}, tr.simigrad.history[:2]


# --- Lightning ------------------------------------------------------------------------------------------------
def fit_lightning(ours: bool, net, data, a, meter: Meter, counted: bool, fsdp: bool = False) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from simigrad_compile.integrations.lightning import SimigradCallback

    class Module(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def configure_model(self):  # FSDP2 (ModelParallelStrategy): each Linear and the net a unit
            if fsdp:
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                for m in [*(m for m in self.net.body if isinstance(m, torch.nn.Linear)), self.net]:
                    fully_shard(m, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return sgd(self.parameters())

    class Tick(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            if counted and not ours and not fsdp:
                trainer.strategy.model.register_comm_hook(None, allreduce_hook)

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step > len(meter.ends):
                meter.tick()

    world = dist.get_world_size()
    batch = world * a.micro * a.accumulation
    callbacks = [Tick()]
    if ours:
        callbacks.insert(0, SimigradCallback(batch_size=batch, min_batch_size=batch, max_batch_size=batch))
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1) if fsdp else "ddp"
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=a.warmup + a.steps,
                         accumulate_grad_batches=1 if ours else a.accumulation, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    loader = torch.utils.data.DataLoader(data, batch_size=a.micro, shuffle=True)
    trainer.fit(Module(copy.deepcopy(net)), loader)
    if ours:
        history = callbacks[0].run.history
        assert {(r["batch_size"], r["accumulation"], r["statistics"]) for r in history} == \
            {(batch, a.accumulation, "ranks")}, history[:2]


# --- the hand loop --------------------------------------------------------------------------------------------
def fit_hand(ours: bool, net, data, a, meter: Meter, counted: bool) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import simigrad_compile

    total = a.warmup + a.steps
    ddp = DDP(copy.deepcopy(net))
    opt = sgd(ddp.parameters())
    if ours:
        batch = dist.get_world_size() * a.micro * a.accumulation
        run = simigrad_compile.AdaptiveBatching(ddp, opt, batch_size=batch, min_batch_size=batch,
                                                max_batch_size=batch, micro_batch_sizes=[a.micro])
        while len(meter.ends) < total:
            for x, y in run.dataloader(data, shuffle=True):
                F.cross_entropy(ddp(x), y).backward()
                run.optimizer.step()
                run.optimizer.zero_grad()
                if len(run.history) > len(meter.ends):
                    meter.tick()
                    if len(meter.ends) == total:
                        break
        assert {(r["batch_size"], r["accumulation"], r["statistics"]) for r in run.history} == \
            {(batch, a.accumulation, "ranks")}, run.history[:2]
        run.close()
        return
    if counted:
        ddp.register_comm_hook(None, allreduce_hook)
    sampler = torch.utils.data.DistributedSampler(data, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=a.micro, sampler=sampler)
    epoch, k = 0, 0
    while len(meter.ends) < total:
        sampler.set_epoch(epoch)
        for x, y in loader:
            k += 1
            last = k % a.accumulation == 0
            with contextlib.nullcontext() if last else ddp.no_sync():
                F.cross_entropy(ddp(x), y).backward()
            if last:
                opt.step()
                opt.zero_grad()
                meter.tick()
                if len(meter.ends) == total:
                    break
        epoch += 1


def exit_without_teardown() -> None:
    """Ends the process after a barrier, without ``destroy_process_group``: with a Python comm hook's futures on
    gloo (the plain runs' counted ``allreduce_hook``), ``~ProcessGroupGloo`` joins gloo's work thread while holding
    the GIL that thread waits for, and the process hangs (seen on torch 2.13)."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


FITS = {"hf": fit_hf, "lightning": fit_lightning, "hand": fit_hand,
        "lightning_fsdp": functools.partial(fit_lightning, fsdp=True)}


def _gather(values: list) -> list:
    """Every rank's list (the same length on each), as a list per rank."""
    t = torch.tensor(values, dtype=torch.float64)
    every = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(every, t)
    return [e.tolist() for e in every]


def main(a) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    data, net = problem(a.width)
    fit = FITS[a.door]
    loads = [os.getloadavg()]
    result = {"door": a.door, "world": dist.get_world_size(), "micro": a.micro, "accumulation": a.accumulation,
              "width": a.width, "params": sum(p.numel() for p in net.parameters()), "steps": a.steps,
              "warmup": a.warmup, "repeats": a.repeats, "bytes_per_step": {}, "fit_median_s": {}, "calls": {}}
    for name in ("plain", "ours"):  # counted fits; they also warm the libraries up
        meter = Meter(count_from=a.warmup, count=a.count_steps)
        fit(name == "ours", net, data, a, meter, counted=True)
        result["bytes_per_step"][name] = [row[0] / a.count_steps for row in _gather([meter.traffic.sent])]
        result["calls"][name] = dict(meter.traffic.calls)
    times, cpu = {"plain": [], "ours": []}, {"plain": [], "ours": []}
    for r in range(a.repeats):
        for name in (("plain", "ours") if r % 2 == 0 else ("ours", "plain")):
            meter = Meter()
            dist.barrier()
            fit(name == "ours", net, data, a, meter, counted=False)
            per_rank = _gather(meter.intervals(a.warmup))
            slowest = [max(step) for step in zip(*per_rank)]
            times[name].append(statistics.median(slowest))
            per_rank_cpu = _gather(meter.intervals(a.warmup, "cpu"))
            cpu[name].append(statistics.mean(statistics.median(r) for r in per_rank_cpu))
            loads.append(os.getloadavg())
    result["fit_median_s"] = times
    result["fit_cpu_s"] = cpu
    result["loadavg_1_5_15"] = loads
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(result, f)
    exit_without_teardown()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("door", choices=sorted(FITS))
    p.add_argument("out")
    add_options(p, TIMING, LAUNCH)
    return p


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(parser().parse_args())
