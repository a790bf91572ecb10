"""``SIMIGRAD=1``: adaptive batching of an unmodified training loop, as a thin door over the runtime core.

The loop stays as the user wrote it: ``zero_grad``, forward, ``backward``, ``step``, with its own DataLoader. Each
optimizer gets one :class:`~simigrad_compile.runtime.adaptive.AdaptiveBatching` (the step core), and every
``optimizer.step()`` of the loop is one micro-step of it. The core owns every rule of the step: the window, the
plan, the statistics, the LR scaling, the skip rules, the history and its log files (``docs/doors.md`` lists
what that means for this door). This module only translates the loop's calls into the core's protocol.

What the door observes (installed by :func:`install` at ``import torch`` when ``SIMIGRAD=1``):

* ``DataLoader`` iterators' ``__next__``: each fetched batch's declared size (its batch sampler's
  ``batch_size``) and measured size (dim ``batch_dim`` of its first tensor).
* ``torch.Tensor.backward``: which fetched batch a backward consumed (the last one fetched), and the loss
  (a scalar that is backpropagated; for ``GradScaler.scale(loss)`` the unscaled loss). The **training loader**
  is the one whose batches feed backward passes: a validation loop (no backward) never sizes a step. A loop
  that fetches ahead of its backward passes (``list(loader)``, a prefetching wrapper) is sized by the last fetch.
* ``GradScaler.update``: a micro-batch whose ``scaler.step`` found inf/NaN gradients never reached
  ``optimizer.step()``; it is left out of the step, as plain ``GradScaler`` drops it.
* optimizer step pre/post hooks (``torch.optim.optimizer.register_optimizer_step_{pre,post}_hook``).

The micro-step (step pre-hook). The samples of the batches consumed since the last ``step()`` are the
micro-batch (a loop that accumulates by itself, with several backward passes per ``step()``, gives one
micro-step of all of them). The core keeps the window's running gradient in ``p.grad`` (module docstring of
:mod:`simigrad_compile.runtime.core`); the loop zeroes ``p.grad`` before every backward, so between micro-steps
the door holds the running gradient aside and ``p.grad`` is None: the loop's ``zero_grad`` (any form) has
nothing to lose, and the in-window ``step()`` is a no-op (torch's optimizers skip a parameter whose grad is None
without touching its state). At the next ``step()`` the door puts the running gradient back, announces the
micro-batch's size to the core (``next_micro_batch``), adds the fresh gradient and calls ``micro_step_done``.
On the micro-step that ends the window, ``begin_step`` makes ``p.grad`` the step's mean gradient and scales the
LR, the optimizer takes the one real step, and the post-hook calls ``end_step``.

The ladder has one rung, the training loader's batch: the step's batch is ``accumulation x micro-batch``. B0 is
``SIMIGRAD_BATCH_SIZE``, else the micro-batch. A loop without a DataLoader must set ``SIMIGRAD_BATCH_SIZE``.

Epoch end. When the training loader's iterator is exhausted inside a window, the micro-steps so far form the
step (``end_window``): the door takes that step itself, with the LR of the window's last ``step()`` (the loop's
scheduler may have stepped since), and leaves ``p.grad`` None, as the loop's last ``zero_grad`` would. A loop that
stops early leaves its last window unapplied: at exit the core discards it and says so (``StepCore.close``, the
rule of every door).

Many processes (``torchrun`` of a loop with ``DistributedDataParallel`` and a ``DistributedSampler``): each rank
adapts the number of its loader's batches per step (the global batch is ``world x accumulation x`` that batch; B0
defaults to ``world x`` it), the core sees the DDP module (``ranks`` statistics through the split reduction, the
same on every rank, so every rank takes the same decisions), DDP reduces once per step and rank 0 alone writes the
log: :mod:`simigrad_compile.integrations.loop_ddp`.

Output. One line on stderr when the door takes effect (the first ``step()`` of an optimizer), naming the config
and where the log goes; one INFO record per step on the ``simigrad_compile`` logger. ``SIMIGRAD_LOG_DIR``: the
core's CSV (and TensorBoard events when the ``tensorboard`` package is installed), and ``simigrad.png`` written
at exit (``atexit``; needs matplotlib). A second adapted optimizer logs to ``<log dir>/optimizer1`` and so on.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import sys
import weakref
from typing import Dict, List, Optional

import torch

from .. import compat
from ..config import SimigradConfig
from ..runtime.driven import driven, mark_driven
from ..runtime.lr import SavedLr, restore_lr, save_lr
from . import loop_ddp
from .batches import samples_in
from .door_rules import one_rung
from .loop_feed import Fed, Fetch

log = logging.getLogger("simigrad_compile")
PLOT_NAME = "simigrad.png"

_config: Optional[SimigradConfig] = None
_handles: list = []
_originals: dict = {}
_doors: "weakref.WeakKeyDictionary[torch.optim.Optimizer, _Door]" = weakref.WeakKeyDictionary()
_exit_registered = False


_fed = Fed()


class _OptimizerParams:
    """The optimizer's parameters, read live: the core's "model" (this door never sees the model itself)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def named_parameters(self):
        for g, group in enumerate(self.optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                yield f"group{g}.param{i}", p

    def __iter__(self):
        return (p for _, p in self.named_parameters())


class _Door:
    """One optimizer's adaptive batching: the core, and the running gradient held aside between micro-steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, run, log_dir: Optional[str], ddp=None, rank: int = 0):
        self.optimizer, self.run, self.log_dir = optimizer, run, log_dir
        self.ddp, self.rank = ddp, rank
        """The loop's DistributedDataParallel module (its sync is steered by :mod:`.loop_ddp`), and this rank."""
        self.aside: Optional[Dict[int, torch.Tensor]] = None
        self.folded: Optional[Dict[int, torch.Tensor]] = None
        """The held tensors put back into ``p.grad`` before a reducing backward (:func:`.loop_ddp.fold`)."""
        self.synced: Optional[bool] = None
        """Whether the last backward (seen by ``Tensor.backward``) reduced across ranks."""
        self.source = None
        self.boundary = False
        self.reported = 0
        self.lrs: Optional[SavedLr] = None
        """The ``lr`` of every param group at the window's last ``step()``: the LR of a step the door takes itself."""

    def _restore(self) -> List[torch.nn.Parameter]:
        params = self.run.params
        aside, self.aside = self.aside or {}, None
        for p in params:
            p.grad = aside.get(id(p))
        return params

    def micro_step(self) -> None:
        """The loop's ``step()`` (pre-hook): one micro-step of the core; at the boundary, the real step's setup."""
        run = self.run
        if self.folded is not None:
            loop_ddp.unfold(self)
        if self.boundary:  # the last real step raised between its hooks
            log.warning("simigrad: the optimizer's step raised at a step boundary; that step is dropped")
            self.boundary = False
            run.discard_step()
            self.aside = None
        fetches, samples, source, loss = _fed.take()
        samples = samples or run.state.micro_batch_size
        fresh = [p.grad for p in run.params]
        params = self._restore()
        run.next_micro_batch(samples)
        added, adopted = [], []
        for p, g in zip(params, fresh):
            if g is not None:
                if p.grad is None:
                    p.grad = g
                    adopted.append(p)
                elif p.grad is not g:
                    p.grad.add_(g)
                    added.append(p)
        if run.grad_watch is not None:  # the loop's own changes to a fresh gradient (its clipping) are its own
            run.grad_watch.folded(added)
            run.grad_watch.adopted(adopted)
        if self.ddp is not None and run.state.micro_step + 1 >= run.state.micro_steps:
            loop_ddp.check_reduced(self)
        if not run.micro_step_done(samples=samples, loss=loss):
            self.aside = {id(p): p.grad for p in params if p.grad is not None}
            for p in params:
                p.grad = None
            self.source = source
            self.lrs = save_lr(self.optimizer)
            return
        self.boundary = True
        run.begin_step()  # False: the gradients are dropped and the optimizer's step is a no-op

    def end_step(self) -> None:
        """The real step ran (post-hook)."""
        self.boundary = False
        self.run.end_step()
        self.report()

    def flush(self) -> None:
        """The training loader ran out inside a window: its micro-steps form the step, taken here."""
        if self.ddp is not None and self.run.state.micro_step > 0:
            loop_ddp.check_reduced(self)
        params = self._restore()
        if self.run.grad_watch is not None:  # backward passes since the last step() (a micro-batch the GradScaler
            self.run.grad_watch.take()       # dropped) accumulated into fresh gradients, now dropped, not the held
        self.source = None
        if self.run.end_window():
            # The step's LR is the one at its last micro-batch's step(), as at a planned boundary; the loop's
            # scheduler may have stepped since.
            now, lrs, self.lrs = save_lr(self.optimizer), self.lrs, None
            if lrs is not None:
                restore_lr(self.optimizer, lrs)
            try:
                _fed.own_step = True
                try:
                    if self.run.begin_step():
                        self.optimizer.step()
                except BaseException:
                    self.run.discard_step()
                    raise
                finally:
                    _fed.own_step = False
                self.run.end_step()
            finally:
                restore_lr(self.optimizer, now)
            self.report()
        for p in params:
            p.grad = None

    def report(self) -> None:
        if self.rank != 0:  # one log: rank 0's (every rank holds the same records)
            self.reported = len(self.run.history)
            return
        for r in self.run.history[self.reported:]:
            why = f", {'skipped' if not r['stepped'] else 'controller unmoved'} ({r['skipped']})" \
                if r["skipped"] else ""
            log.info("simigrad step %d: cos %.4f (%s) batch %d = %d x %d, lr x%.4f%s; next target %d", r["step"],
                     r["cosine"], r["statistics"], r["batch_size"], r["accumulation"], r["micro_batch_size"],
                     r["lr_scale"], why, self.run.target_batch_size)
        self.reported = len(self.run.history)

    def close(self, plot: bool = True) -> None:
        self.run.close()  # a step left open is discarded, with a warning (the rule of every door)
        if plot and self.log_dir is not None and self.run.history:
            path = os.path.join(self.log_dir, PLOT_NAME)
            try:
                self.run.plot(path)
            except ImportError as exc:
                log.warning("simigrad: no plot at %s: %s", path, exc)


def install(config: SimigradConfig) -> None:
    """Hook every optimizer's ``step``, every DataLoader iterator and ``Tensor.backward`` (idempotent)."""
    global _config
    _config = config
    if _handles:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    iterator = compat.dataloader_iterator_class()
    _handles.append(register_optimizer_step_pre_hook(_pre_step))
    _handles.append(register_optimizer_step_post_hook(_post_step))
    _originals.update(next=iterator.__next__, backward=torch.Tensor.backward,
                      scale=torch.amp.GradScaler.scale, update=torch.amp.GradScaler.update)
    iterator.__next__ = _next_recording
    loop_ddp.install()
    torch.Tensor.backward = _backward_recording
    torch.amp.GradScaler.scale = _scale_marking
    torch.amp.GradScaler.update = _update_dropping
    log.info("simigrad: SIMIGRAD=1: adaptive batching of every optimizer's step (simigrad_compile.integrations."
             "auto_loop)")


def uninstall() -> None:
    """Remove the hooks; close every door (without plotting)."""
    while _handles:
        _handles.pop().remove()
    if _originals:
        compat.dataloader_iterator_class().__next__ = _originals.pop("next")
        torch.Tensor.backward = _originals.pop("backward")
        torch.amp.GradScaler.scale = _originals.pop("scale")
        torch.amp.GradScaler.update = _originals.pop("update")
    loop_ddp.uninstall()
    for door in list(_doors.values()):
        door.close(plot=False)
    _doors.clear()
    _fed.last = None
    _fed.drop()


def exclude(optimizer: torch.optim.Optimizer) -> None:
    """Leave ``optimizer`` alone (an optimizer that another door drives; every core marks its own optimizer,
    :func:`simigrad_compile.runtime.core.mark_driven`)."""
    mark_driven(optimizer)


def history(optimizer: torch.optim.Optimizer) -> List[dict]:
    """The core's records for ``optimizer`` (one per optimizer step; keys in ``runtime/history.py``)."""
    door = _doors.get(optimizer)
    return list(door.run.history) if door else []


# --- the observers ----------------------------------------------------------------------------------------------
def _next_recording(self):
    try:
        batch = _originals["next"](self)
    except StopIteration:
        for door in list(_doors.values()):
            if door.aside is not None and door.source is not None and door.source() is self:
                door.flush()
        raise
    from ..runtime.data import mark_batch

    dim = _config.batch_dim if isinstance(_config.batch_dim, int) else 0
    compat.tree_map(mark_batch(dim, None, _config.symbolic_batch), batch)
    _fed.last = Fetch(weakref.ref(self), compat.declared_batch_size(self), samples_in(batch, _config.batch_dim))
    if loop_ddp.recorded():
        loop_ddp.steer(self, _fed.last.declared or _fed.last.measured or _config.batch_size, list(_doors.values()),
                       _config, _door_config)
    return batch


def _backward_recording(self, *args, **kwargs):
    if _fed.in_backward:
        return _originals["backward"](self, *args, **kwargs)
    _fed.backward(self)
    for door in list(_doors.values()):
        if door.ddp is not None:
            door.synced = door.ddp.require_backward_grad_sync
            if door.aside is not None and door.synced:
                loop_ddp.fold(door)
    _fed.in_backward = True
    try:
        return _originals["backward"](self, *args, **kwargs)
    finally:
        _fed.in_backward = False


def _scale_marking(self, outputs):
    scaled = _originals["scale"](self, outputs)
    if isinstance(outputs, torch.Tensor) and scaled is not outputs:
        scaled._simigrad_loss = outputs
    return scaled


def _update_dropping(self, *args, **kwargs):
    if _fed.fetches or _fed.loss is not None:  # scaler.step() found inf/NaN and never called optimizer.step()
        log.info("simigrad: GradScaler skipped an optimizer.step() (inf/NaN gradients): that micro-batch is left "
                 "out of the step")
        _fed.drop()
    return _originals["update"](self, *args, **kwargs)


def _pre_step(optimizer, args, kwargs) -> None:
    if _fed.own_step:
        return
    door = _doors.get(optimizer)
    if door is None:
        if driven(optimizer):  # another door drives it; what the loop fed belongs to that door's step
            _fed.drop()
            return
        if kwargs.get("closure") is not None or len(args) > 1:  # args[0] is the optimizer
            raise RuntimeError(
                f"simigrad: SIMIGRAD=1 cannot accumulate {type(optimizer).__name__}.step(closure): the closure "
                "recomputes gradients inside the step; unset SIMIGRAD for this script")
        door = _doors[optimizer] = _open(optimizer)
    door.micro_step()


def _post_step(optimizer, args, kwargs) -> None:
    door = _doors.get(optimizer)
    if door is not None and door.boundary and not _fed.own_step:
        door.end_step()


# --- opening a door -------------------------------------------------------------------------------------------
def _door_config(micro: int, world_size: int) -> SimigradConfig:
    """The door's config: one rung, the loader's batch; B0 ``SIMIGRAD_BATCH_SIZE``, else ``world x`` that batch."""
    return one_rung(_config.replace(batch_size=_config.batch_size or micro * world_size), micro)


def _open(optimizer: torch.optim.Optimizer) -> _Door:
    global _exit_registered
    world_size, rank = loop_ddp.world()
    ddp = None
    if world_size > 1:
        ddp = loop_ddp.find(optimizer)
        if ddp is None:
            raise RuntimeError(
                f"simigrad: SIMIGRAD=1 on {world_size} processes steers the gradient sync of the loop's "
                f"DistributedDataParallel module, but none built in this process holds the parameters of "
                f"{type(optimizer).__name__}: wrap the model in DistributedDataParallel before its first batch and "
                "give the optimizer its parameters, or set SIMIGRAD_AUTO_LOOP=false")
        loop_ddp.check_mode(_config, world_size)
    fetches, _, declared, _ = _fed.peek()
    micro = declared or _config.batch_size
    if micro is None:
        raise RuntimeError(
            "simigrad: SIMIGRAD=1 needs the micro-batch size: no DataLoader batch fed a backward before the first "
            "optimizer.step(); set SIMIGRAD_BATCH_SIZE to the batch your loop feeds")
    log_dir = _config.log_dir if rank == 0 else None  # one log: rank 0 writes it
    if log_dir is not None and _doors:
        log_dir = os.path.join(log_dir, f"optimizer{len(_doors)}")
    from ..runtime.adaptive import AdaptiveBatching

    config = _door_config(micro, world_size).replace(log_dir=log_dir)
    # Under DDP the core sees the DDP module: the split reduction's statistics, the sample counts of the ranks.
    run = AdaptiveBatching(ddp if ddp is not None else _OptimizerParams(optimizer), optimizer, config=config)
    run.allow_direct_steps()  # the loop steps the optimizer on every micro-batch; those steps act on no gradient
    door = _Door(optimizer, run, log_dir, ddp, rank)
    if ddp is not None:  # the first backward ran before the door existed, under the sync set at its fetch
        door.synced = ddp.require_backward_grad_sync
    if rank == 0:
        print(_effect_line(optimizer, config, micro, fetches, world_size), file=sys.stderr, flush=True)
    if not _exit_registered:
        atexit.register(_at_exit)
        _exit_registered = True
    return door


def _effect_line(optimizer, config: SimigradConfig, micro: int, fetches, world_size: int = 1) -> str:
    source = "the training DataLoader's batch" if fetches else "SIMIGRAD_BATCH_SIZE"
    if world_size > 1:
        source += f" on each of {world_size} processes"
    defaults = SimigradConfig()
    shown = {"micro_batch_sizes", "batch_size", "log_dir", "auto_loop", "min_batch_size", "max_batch_size",
             "target_similarity", "lr_scaling"}
    extra = [f"{k}={v!r}" for k, v in config.as_dict().items() if k not in shown and v != getattr(defaults, k)]
    ranks = f"{world_size} x " if world_size > 1 else ""
    text = (f"simigrad: SIMIGRAD=1 adapts the batch of {type(optimizer).__name__}: micro-batch {micro} ({source}), "
            f"B0 {config.batch_size}, batch = {ranks}accumulation x {micro} in [{config.min_batch_size}, "
            f"{config.max_batch_size}], target_similarity {config.target_similarity}, lr_scaling "
            f"{config.lr_scaling}" + (f", {', '.join(extra)}" if extra else ""))
    if config.log_dir is None:
        return text + "; no log files (SIMIGRAD_LOG_DIR=<folder> writes a CSV and a plot)"
    board = ", TensorBoard events" if importlib.util.find_spec("tensorboard") else ""
    return (text + f"; log: {os.path.join(config.log_dir, 'simigrad.csv')}{board}, plot "
            f"{os.path.join(config.log_dir, PLOT_NAME)} at exit")


def _at_exit() -> None:
    for door in list(_doors.values()):
        door.close()


__all__ = ["install", "uninstall", "exclude", "history", "PLOT_NAME"]
