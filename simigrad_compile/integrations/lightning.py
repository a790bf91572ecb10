"""Lightning door: :class:`SimigradCallback`, a ``lightning.pytorch.Callback``: the batch adapts every optimizer step.

The user's ``DataLoader`` batch is the micro-batch (the ladder's one rung); the step's batch is
``accumulation x micro-batch``, realised through Lightning's own gradient accumulation. The runtime core
(:class:`~simigrad_compile.AdaptiveBatching`) owns the step: plan, statistics (``batch`` from a model compiled with
``backend="simigrad"`` at accumulation 1, else ``microsteps``), LR scaling, skip rules, history.

How it drives Lightning (checked on Lightning 2.6): the automatic-optimization loop reads
``trainer.accumulate_grad_batches`` on every batch, after ``on_train_batch_start``:

* it steps when ``(batch_idx + 1) % accumulate_grad_batches == 0`` (or on the epoch's last batch);
* it zeroes the gradients before the backward when ``batch_idx % accumulate_grad_batches == 0``;
* it divides the loss by ``accumulate_grad_batches``.

So at each batch's start the callback sets ``accumulate_grad_batches`` to ``1`` for a one-micro-step window, to
``batch_idx + 1`` on a window's last micro-batch (step, no zeroing) and to ``batch_idx + 2`` before it (neither), and
zeroes the gradients itself when a window opens. A hook on the loss (``on_before_backward``) multiplies its
gradient back by the same number, exactly (an integer times the seed 1, then the division's backward), so each
backward adds its micro-batch's mean gradient, as the core expects.

At the step (``on_before_optimizer_step``, after the closure's backward, before Lightning's gradient clipping) the
core makes ``p.grad`` the step's mean gradient and scales the LR: ``gradient_clip_val`` then clips the step's mean
gradient, as in the plain loop. An optimizer step post-hook puts the LR back and records the step before the
schedulers run; a skipped step (non-finite loss, gradient or statistics) changes nothing, is not clipped (it has
no gradient) and the step-interval schedulers do not step over it (:data:`HELD`; the epoch-interval ones step at
the epoch's end as always). The epoch's last batch ends a window early (the core's ``end_window``).

Logging: ``cosine``, ``batch_size`` and ``lr_scale`` through ``pl_module.log`` on every step;
``callback.run.history`` has every record (its loss filled from the backward's loss), ``log_dir`` the CSV.

Data parallelism (``strategy="ddp"``, ``"ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"``: Lightning's
``DDPStrategy``). The core is built on the ``DistributedDataParallel`` module Lightning wraps the LightningModule in
(``trainer.strategy.model``), so it installs the split-group reduction (``ranks`` statistics, the bytes of plain
DDP) before the first backward. Lightning already skips DDP's gradient sync on the batches it accumulates
(``no_sync`` while ``accumulate_grad_batches`` says accumulate): since the callback sets that number to the core's
window, DDP reduces once per step, on the window's last micro-batch, and the statistics are taken then. Lightning's
``DistributedSampler`` shards the loader; the loader's batch is the per-rank micro-batch and B0 defaults to
``world x`` that. Every rank reads the same statistics, so every rank takes the same decisions and holds the same
history (the ``loss`` entry is the rank's own loss); the CSV log (``log_dir``) is written by global rank 0 only.

FSDP2 (``ModelParallelStrategy``, ``fully_shard`` in ``configure_model``): the core is built on the LightningModule
and installs the split reduce-scatter on its units; the callback sets FSDP's gradient sync per batch
(:mod:`.lightning_fsdp`).

Refused by name: manual optimization, more than one optimizer, a precision plugin with a GradScaler
(``16-mixed``; ``bf16-mixed`` works), ``accumulate_grad_batches != 1`` or a ``GradientAccumulationScheduler``,
strategies that accumulate themselves (DeepSpeed), every multi-process strategy other than ``DDPStrategy`` and
``ModelParallelStrategy`` (FSDP1's ``FSDPStrategy``), and tensor parallelism. Lightning counts ``max_steps`` in optimizer steps; ``trainer.estimated_stepping_batches``
(read at setup) counts micro-batches.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.strategies import DDPStrategy

from .. import envvars
from ..config import SimigradConfig, from_mapping
from ..runtime.adaptive import AdaptiveBatching
from .batches import samples_in
from .door_rules import logged, one_rung, refuse, shared_refusals
from . import lightning_fsdp

log = logging.getLogger("simigrad_compile")
HELD = "simigrad-held"
"""The ``interval`` of a step-interval scheduler config over a skipped step: Lightning steps no scheduler of it."""


class SimigradCallback(Callback):
    """Adaptive batching for ``lightning.pytorch.Trainer`` (module docstring). Options are config fields (or
    ``config=SimigradConfig``) over the ``SIMIGRAD_*`` environment; B0 defaults to the loader's batch."""

    def __init__(self, config: Optional[SimigradConfig] = None, **options: Any):
        self.config = from_mapping(options, base=config if config is not None else envvars.config_from_env())
        self.run: Optional[AdaptiveBatching] = None
        self._optimizer = None
        self._hook = None
        self._state: Optional[dict] = None
        self._trainer = None
        self._reset_window()

    def _reset_window(self) -> None:
        self._divisor = 1       # this batch's accumulate_grad_batches
        self._loss = None
        self._boundary = False  # this batch ran the core's begin_step
        self._held: list = []
        """The step-interval scheduler configs set aside over a skipped step (their ``interval`` is
        :data:`HELD`, so Lightning's update of the ``"step"`` schedulers passes them by)."""
        self._clip = None
        """``trainer.gradient_clip_val``, set aside over a skipped step (``clip_grad_value_`` of no gradient
        raises)."""

    # --- setup ------------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        problems = shared_refusals(accumulation_option="accumulate_grad_batches",
                                   accumulation=trainer.accumulate_grad_batches, world_size=1,
                                   grad_scaler=None, self_accumulating=None)
        problems += _strategy_refusals(trainer)
        if any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks):
            problems.append("a GradientAccumulationScheduler (the callback sets accumulate_grad_batches)")
        refuse("SimigradCallback", problems)

    def on_train_start(self, trainer, pl_module) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None) is not None
        strategy = trainer.strategy
        problems = shared_refusals(
            accumulation_option="accumulate_grad_batches", accumulation=1, world_size=1,
            grad_scaler="precision '16-mixed' (bf16-mixed and 32-true work)" if scaler else None,
            self_accumulating=type(strategy).__name__ if strategy.handles_gradient_accumulation else None)
        if not pl_module.automatic_optimization:
            problems.append("manual optimization")
        if len(trainer.optimizers) != 1:
            problems.append(f"{len(trainer.optimizers)} optimizers (one)")
        refuse("SimigradCallback", problems)
        self._optimizer = trainer.optimizers[0]

    def _open(self, trainer, pl_module, batch) -> AdaptiveBatching:
        loader = trainer.train_dataloader
        micro = getattr(loader, "batch_size", None) or samples_in(batch, self.config.batch_dim)
        if not micro:
            raise RuntimeError("simigrad: SimigradCallback cannot tell the training loader's batch size; give "
                               "the DataLoader a batch_size")
        world = trainer.world_size
        config = one_rung(self.config.replace(batch_size=self.config.batch_size or micro * world), micro)
        if trainer.global_rank != 0:
            config = config.replace(log_dir=None)  # one log: global rank 0 writes it
        # Under DDPStrategy the core sees Lightning's DistributedDataParallel module and installs the split-group
        # reduction on it (the ranks statistics); under ModelParallelStrategy the LightningModule with its
        # fully_shard units (the split reduce-scatter); on one process, the LightningModule itself.
        model = trainer.strategy.model if world > 1 else pl_module
        if lightning_fsdp.is_fsdp(trainer):
            lightning_fsdp.check_sharded(model)
        run = AdaptiveBatching(model, self._optimizer, config=config)
        if run.world_size != world:
            raise RuntimeError(f"simigrad: Lightning runs {world} processes but torch.distributed reports "
                               f"{run.world_size}; SimigradCallback needs the default process group of the strategy")
        run.allow_direct_steps()  # Lightning's step runs the closure (the last backward) before begin_step
        if self._state is not None:
            run.load_state_dict(self._state)
            self._state = None
        self._hook = self._optimizer.register_step_post_hook(self._after_step)
        return run

    # --- every batch ------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.run is None:
            self.run = self._open(trainer, pl_module, batch)
        run, state = self.run, self.run.state
        if state.micro_step == 0:
            pl_module.optimizer_zero_grad(trainer.current_epoch, batch_idx, self._optimizer)
        samples = samples_in(batch, run.config.batch_dim)
        if samples:
            run.next_micro_batch(samples)
        last = state.micro_step == state.micro_steps - 1
        self._divisor = 1 if state.micro_steps == 1 else (batch_idx + 1 if last else batch_idx + 2)
        trainer.accumulate_grad_batches = self._divisor
        if lightning_fsdp.is_fsdp(trainer):  # Lightning's no_sync is DDP's only: FSDP's sync follows the window
            lightning_fsdp.sync_window(run, trainer)
        self._boundary = False

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        divisor = self._divisor
        self._loss = loss.detach() * divisor
        window = self.run.state.window  # under FSDP, a micro-batch of another size is weighted by its backward
        factor = divisor * window.backward_scale if window is not None else divisor
        if factor != 1 and loss.requires_grad:
            loss.register_hook(lambda grad: grad * factor)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        run = self.run
        if not run.micro_step_done(loss=self._loss):
            run.end_window()  # the epoch's last batch: Lightning steps, the window ends here
        self._loss = None
        self._boundary = True
        if not run.begin_step():  # the gradients are dropped: the optimizer's step changes nothing, and
            self._clip, trainer.gradient_clip_val = trainer.gradient_clip_val, None  # nothing is clipped

    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self._boundary:
            return
        self._restore_clip()
        run = self.run
        run.end_step()
        if not run.history[-1]["stepped"]:  # the step-interval schedulers do not step; the epoch-interval ones
            self._held = [c for c in self._trainer.lr_scheduler_configs  # still do at the epoch's last batch
                          if c.interval == "step" and not c.reduce_on_plateau]
            for c in self._held:
                c.interval = HELD

    def _release(self) -> None:
        for c in self._held:
            c.interval = "step"
        self._held = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        run = self.run
        if not self._boundary:
            if run.micro_step_done(loss=self._loss):
                raise RuntimeError("simigrad: Lightning did not step at the end of the core's window; "
                                   "accumulate_grad_batches was changed by someone else")
            self._loss = None
            return
        self._release()
        record = run.history[-1]
        pl_module.log_dict(logged(record), on_step=True, on_epoch=False)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._trainer = trainer

    def on_fit_end(self, trainer, pl_module) -> None:
        self._close(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close(trainer)

    def _restore_clip(self) -> None:
        if self._clip is not None:
            self._trainer.gradient_clip_val, self._clip = self._clip, None

    def _close(self, trainer) -> None:
        self._restore_clip()
        self._release()
        trainer.accumulate_grad_batches = 1
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.run is not None:
            self.run.close()  # a step left open is discarded, with a warning (the rule of every door)

    # --- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {} if self.run is None else self.run.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._state = state_dict


def _strategy_refusals(trainer) -> list:
    """What the callback cannot run on more than one process: any strategy but Lightning's ``DDPStrategy`` and its
    FSDP2 ``ModelParallelStrategy`` (data parallel only, :mod:`.lightning_fsdp`)."""
    strategy = trainer.strategy
    if trainer.world_size == 1 or isinstance(strategy, DDPStrategy):
        return []  # DeepSpeed (a DDPStrategy) is refused at on_train_start: it accumulates by itself
    if lightning_fsdp.is_fsdp(trainer):
        return lightning_fsdp.strategy_refusals(trainer)
    return [f"strategy {type(strategy).__name__} on {trainer.world_size} processes: use strategy='ddp' (or "
            "'ddp_spawn'), or ModelParallelStrategy (FSDP2: fully_shard in configure_model)"]


__all__ = ["SimigradCallback"]
