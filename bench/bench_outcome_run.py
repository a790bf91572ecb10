"""One run of the outcome table: a workload, a sample budget, a seed and a batch rule, through the demo's loop.

Every run goes through ``torch.compile(model, backend="simigrad")`` and :class:`AdaptiveBatching` with the
library's controller defaults (``target_similarity``, ``ema``, ``noise_ema``, ``lr_scaling``); a fixed-batch run is
the ``simigrad`` controller with ``min_batch_size == max_batch_size`` (it measures but cannot move). The LR follows
the demo's schedule over samples (linear warm-up, cosine to zero); a fixed run at batch B gets ``lr * sqrt(B/B0)``,
the rule the adaptive runs scale by. Each run trains on exactly the budget (``run.limit_next_step``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import simigrad_compile
from simigrad_compile import compat
from simigrad_compile.demo.train import compile_seconds, lr_factor  # the demo's schedule and compile clock


@dataclass
class Workload:
    name: str
    make_model: Callable[[], torch.nn.Module]
    train_set: list
    val_batches: list
    evaluate: Callable
    """``evaluate(model, val_batches) -> (loss, accuracy)``."""
    lr: float
    b0: int
    max_batch: int
    ladder: tuple
    budgets: dict
    """``{"short": samples, "long": samples}``."""
    eval_points: int = 12
    warmup: float = 0.05


@dataclass
class Outcome:
    val_loss: float = math.nan
    val_acc: float = math.nan
    steps: int = 0
    samples: int = 0
    wall_s: float = 0.0
    """Training time, compiles included, evaluations excluded."""
    compile_s: float = 0.0
    curve: list = field(default_factory=list)
    """``[samples, step, wall_s, val_loss, val_acc]`` at each evaluation (the last: the end of the budget)."""
    batch: list = field(default_factory=list)
    """The batch of every optimizer step."""
    lr_scale: list = field(default_factory=list)

    @property
    def average_batch(self) -> float:
        return self.samples / max(self.steps, 1)


def train(work: Workload, budget: int, seed: int, controller: str, batch: int, top: int, compiler: str) -> Outcome:
    """Train ``work``'s model on exactly ``budget`` samples: the batch starts at ``batch``, within
    ``[batch, top]`` (``batch == top``: a fixed batch)."""
    compat.reset_dynamo()
    torch.manual_seed(seed)
    model = work.make_model()
    compiled = torch.compile(model, backend="simigrad", options={"compiler": compiler})
    lr = work.lr * math.sqrt(batch / work.b0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    ladder = tuple(m for m in work.ladder if m <= batch) if batch == top else work.ladder
    run = simigrad_compile.AdaptiveBatching(
        compiled, optimizer, batch_size=batch, min_batch_size=batch, max_batch_size=top, controller=controller,
        micro_batch_sizes=ladder)
    out = Outcome()
    compile_start, start, eval_s = compile_seconds(), time.perf_counter(), 0.0
    next_eval, samples = budget / work.eval_points, 0
    with run:
        while samples < budget:
            for x, y in run.dataloader(work.train_set, shuffle=True, seed=seed):
                for group in optimizer.param_groups:
                    group["lr"] = lr * lr_factor(samples / budget, work.warmup)
                loss = compiled(x, y)
                loss.backward()
                run.optimizer.step()
                run.optimizer.zero_grad()
                if not run.sync_gradients:
                    continue
                record = run.history[-1]
                samples = record["samples"]
                if samples >= next_eval or samples >= budget:
                    t = time.perf_counter()
                    trained_s = t - start - eval_s
                    loss_v, acc = work.evaluate(model, work.val_batches)
                    eval_s += time.perf_counter() - t
                    out.curve.append([samples, len(run.history), round(trained_s, 3), loss_v, acc])
                    while next_eval <= samples:
                        next_eval += budget / work.eval_points
                if samples >= budget:
                    break
                if budget - samples < run.batch_size:  # end exactly on the budget
                    run.limit_next_step(budget - samples)
    out.wall_s = time.perf_counter() - start - eval_s
    out.compile_s = compile_seconds() - compile_start
    out.batch = [h["batch_size"] for h in run.history]
    out.lr_scale = [round(h["lr_scale"], 4) for h in run.history]
    out.steps, out.samples = len(run.history), samples
    out.val_loss, out.val_acc = out.curve[-1][3], out.curve[-1][4]
    if samples != budget:
        raise RuntimeError(f"bench_outcome: the run ended at {samples} samples, not on its budget of {budget}")
    return out


# --- the demo's GPT, as a workload -------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_gpt(model, val_batches: list) -> tuple:
    """(mean next-byte cross-entropy, next-byte accuracy): TinyGPT's forward up to its logits."""
    model.eval()
    loss = correct = count = 0.0
    for idx, targets in val_batches:
        x = model.embed(idx) + model.pos[: idx.shape[1]]
        for block in model.blocks:
            x = block(x)
        logits = (model.norm(x) @ model.embed.weight.t()).reshape(-1, model.embed.num_embeddings)
        t = targets.reshape(-1)
        loss += F.cross_entropy(logits, t, reduction="sum").item()
        correct += (logits.argmax(-1) == t).sum().item()
        count += len(t)
    model.train()
    return loss / count, correct / count


def gpt_workload(dim: int, layers: int, heads: int, context: int, eval_sequences: int, budgets: dict) -> Workload:
    from simigrad_compile.demo.data import load_splits
    from simigrad_compile.demo.experiment import validation_batches
    from simigrad_compile.demo.model import TinyGPT
    from simigrad_compile.demo.settings import DemoSettings

    d = DemoSettings()
    train_set, val_set = load_splits(context)
    return Workload(
        name="gpt", make_model=lambda: TinyGPT(dim=dim, layers=layers, heads=heads, context=context),
        train_set=train_set, val_batches=validation_batches(val_set, eval_sequences), evaluate=evaluate_gpt,
        lr=d.lr, b0=d.batch_size, max_batch=d.max_batch_size, ladder=(16, 64, 256), budgets=budgets,
        warmup=d.warmup)


def cnn_workload(batch_norm: bool, budgets: dict) -> Workload:
    from bench_outcome_cnn import DigitsCNN, batches, evaluate_cnn, load_digits_splits

    train_set, val_set = load_digits_splits()
    return Workload(
        name="cnn_bn" if batch_norm else "cnn", make_model=lambda: DigitsCNN(batch_norm),
        train_set=train_set, val_batches=batches(val_set), evaluate=evaluate_cnn,
        lr=3e-3, b0=16, max_batch=1024, ladder=(16, 64, 256), budgets=budgets)
