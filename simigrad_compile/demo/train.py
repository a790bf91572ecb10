"""One training run of the demo: the same compiled model, loader and optimizer wrapper for every run.

Every run goes through ``torch.compile(model, backend="simigrad")`` and :class:`AdaptiveBatching`, so the runs
share code path, statistics overhead, data order, initialisation and LR schedule (over samples). A fixed-batch
run is SimiGrad with ``min_batch_size == max_batch_size``: the controller still measures but cannot move.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

import simigrad_compile
from simigrad_compile import compat

from .model import TinyGPT
from .settings import DemoSettings

log = logging.getLogger("simigrad_compile.demo")


@dataclass
class RunResult:
    name: str
    seed: int
    batch_size: str
    """``"16"`` for a fixed batch, ``"16..1024"`` for SimiGrad's bounds."""
    lr: float
    val_loss: float = math.nan
    steps: int = 0
    samples: int = 0
    wall_s: float = 0.0
    """Training time, compiles included, evaluations excluded."""
    compile_s: float = 0.0
    eval_s: float = 0.0
    curve: list = field(default_factory=list)
    """``(samples, validation loss)`` pairs."""
    history: list = field(default_factory=list)
    """``run.history``: one record per optimizer step."""
    smoke: bool = False
    """From a ``--quick`` run (:attr:`DemoSettings.smoke`): its figures show that the code runs, nothing more."""

    @property
    def average_batch(self) -> float:
        return self.samples / max(self.steps, 1)


def lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction of the samples, then a cosine decay to zero."""
    if progress < warmup:
        return (progress + 1e-3) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def compile_seconds() -> float:
    """Dynamo + AOTAutograd + Inductor time so far, forward and (lazily compiled) backward graphs."""
    return sum(sum(v) for k, v in compat.compilation_time_metrics().items()
               if k == "_compile.compile_inner" or k.endswith("bw_compiler"))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list) -> float:
    model.eval()
    total = sum(model(x, y).item() * len(x) for x, y in batches)
    model.train()
    return total / sum(len(x) for x, _ in batches)


def train_run(name: str, settings: DemoSettings, train_set, val_batches: list, seed: int,
              min_batch: int, max_batch: int, position: str = "") -> RunResult:
    """Train for ``settings.samples`` sequences with the batch starting at ``min_batch`` within the bounds;
    ``position`` (``"2/3"``) labels the progress bar."""
    s = settings
    compat.reset_dynamo()  # a fresh model gets its own compiled regions; the FX-graph cache keeps this cheap
    torch.manual_seed(seed)
    model = TinyGPT(dim=s.dim, layers=s.layers, heads=s.heads, context=s.context)
    wrapped = _data_parallel(model)
    if s.compiler == "eager":  # no split statistics: AdaptiveBatching measures across micro-steps instead
        compiled = wrapped
    else:
        compiled = torch.compile(wrapped, backend="simigrad", options={"compiler": s.compiler})
    lr = s.lr * (math.sqrt(min_batch / s.batch_size) if s.fixed_lr_scaling == "sqrt" else 1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    run = simigrad_compile.AdaptiveBatching(
        compiled, optimizer, batch_size=min_batch, min_batch_size=min_batch, max_batch_size=max_batch,
        target_similarity=s.target, micro_batch_sizes=s.micro_batch_sizes)
    label = str(min_batch) if min_batch == max_batch else f"{min_batch}..{max_batch}"
    result = RunResult(name=name, seed=seed, batch_size=label, lr=lr, smoke=s.smoke)
    bar = _progress_bar(f"run {position} {name}" if position else name, s)
    compile_start, start = compile_seconds(), time.perf_counter()
    next_eval, samples = s.samples / s.eval_points, 0
    with run:
        while samples < s.samples:
            for x, y in run.dataloader(train_set, shuffle=True, seed=seed):
                for group in optimizer.param_groups:
                    group["lr"] = lr * lr_factor(samples / s.samples, s.warmup)
                loss = compiled(x, y)
                loss.backward()
                run.log_loss(loss)
                run.optimizer.step()
                run.optimizer.zero_grad()
                if not run.sync_gradients:  # inside a step (a skipped step ends one too)
                    continue
                record = run.history[-1]
                samples = record["samples"]
                bar.update(record["batch_size"])
                bar.set_postfix(loss=f"{record['loss']:.3f}", B=record["batch_size"], cos=f"{record['cosine']:.2f}",
                                refresh=False)
                if samples >= next_eval or samples >= s.samples:
                    t = time.perf_counter()
                    result.curve.append((samples, evaluate(model, val_batches)))
                    result.eval_s += time.perf_counter() - t
                    if bar.disable and is_reporting_rank():
                        elapsed = time.perf_counter() - start - result.eval_s
                        stepping = elapsed - (compile_seconds() - compile_start)  # the rate without the compiles
                        print(f"{name}: {samples}/{s.samples} seq, val loss {result.curve[-1][1]:.4f}, "
                              f"B {record['batch_size']}, step {record['step']}, {elapsed:.0f} s, "
                              f"{_eta(stepping, samples, s.samples)}", flush=True)
                    next_eval += s.samples / s.eval_points
                if samples >= s.samples:
                    break
                if s.samples - samples < run.batch_size:  # every run trains on exactly s.samples sequences
                    run.limit_next_step(s.samples - samples)
    bar.close()
    result.wall_s = time.perf_counter() - start - result.eval_s
    result.compile_s = compile_seconds() - compile_start
    result.history = [dict(r) for r in run.history]
    result.steps, result.samples = len(result.history), samples
    result.val_loss = result.curve[-1][1]
    log.info("%s: val loss %.4f, %d steps, average batch %.1f, %.1f s (compile %.1f s)", name, result.val_loss,
             result.steps, result.average_batch, result.wall_s, result.compile_s)
    return result


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """Under ``torchrun``: DDP, whose gradient reduction AdaptiveBatching turns into the split-group one."""
    if world_size() == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def is_reporting_rank() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _eta(elapsed: float, done: int, total: int) -> str:
    """The time left in this run at the rate of its first ``done`` samples, which took ``elapsed`` seconds."""
    if done <= 0 or done >= total:
        return "done" if done >= total else "ETA unknown"
    return f"about {elapsed * (total - done) / done:.0f} s left in this run"


def _progress_bar(name: str, s: DemoSettings):
    """One bar per run over its sample budget (a known total: tqdm shows elapsed<remaining and the rate)."""
    from tqdm.auto import tqdm

    quiet = not s.progress or not is_reporting_rank()
    return tqdm(total=s.samples, desc=f"{name:<26}", unit="seq", disable=quiet, dynamic_ncols=True, mininterval=0.5,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} seq [{elapsed}<{remaining} left, "
                           "{rate_fmt}{postfix}]")
